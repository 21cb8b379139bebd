//! Black-box tests: the real service on a random port, a real SQLite file, and a real HTTP
//! server standing in for the Graph API. One binary for all of them.

#[path = "../support/graph_stand_in.rs"]
mod graph_stand_in;
#[path = "../support/postgrest_stand_in.rs"]
mod postgrest_stand_in;

mod admin;
mod admin_browser;
mod browser;
mod cli;
mod cluster;
mod collect;
mod crash;
mod delivery;
mod helpers;
mod ingest;
mod logs;
mod match_keys;
mod metrics;
mod n8n_example;
mod openapi;
mod pixels;
mod postgres;
mod process;
mod quality;
mod scale;
mod sockets;
mod sources;
mod storage_faults;
mod store_contract;
mod supabase_lookup;
mod tls;
