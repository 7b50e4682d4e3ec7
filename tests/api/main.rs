//! Black-box tests of the HTTP contract against the real Redis and MariaDB.

#[path = "../common/mod.rs"]
mod common;

mod admission;
mod auth;
mod buckets;
mod connections;
mod edges;
mod events;
mod events_audit;
mod input;
mod keys;
mod lifecycle;
mod money;
mod operations;
mod operators;
mod ops;
mod queue;
mod races;
mod reserve;
mod retirement;
mod server;
mod webhooks;
