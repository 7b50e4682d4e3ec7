//! flashgate: a flash-sale reservation gateway. Holds are taken atomically by Lua
//! scripts in Redis (`store`, `lua/`); a worker flushes confirmed sales and
//! compensations to MySQL (`worker`, `db`) and a reconciler repairs drift (`reconcile`).
//! See docs/design.md for the map.

pub mod admission;
pub mod auth;
pub mod batcher;
pub mod buckets;
pub mod config;
pub mod connections;
pub mod db;
pub mod error;
pub mod events;
pub mod explore;
pub mod gateway;
pub mod http;
pub mod ids;
pub mod keys;
pub mod limits;
pub mod lua;
pub mod queue;
pub mod readiness;
pub mod reconcile;
pub mod request_id;
pub mod reservation;
pub mod server;
pub mod sold_out;
pub mod store;
pub mod telemetry;
pub mod webhooks;
pub mod worker;
