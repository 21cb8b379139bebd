//! capi-bridge: takes conversion events from webhooks, automations and landing pages, and
//! delivers them to Meta's Conversions API — validated, normalized, hashed, durably queued,
//! batched, retried and deduplicated. See `ARCHITECTURE.md` for the map.

pub mod admin;
pub mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod domain;
pub mod inbox;
pub mod ingest;
pub mod memory;
pub mod metrics;
pub mod pixels;
pub mod quality;
pub mod server;
pub mod sites;
pub mod sources;
pub mod store;
pub mod telemetry;
pub mod tls;
