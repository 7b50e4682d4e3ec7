//! Webhook endpoints and their deliveries (src/webhooks.rs): the SQL.
