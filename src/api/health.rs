//! Liveness, readiness and the credential check automation tools call.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use super::SharedState;
use crate::store::{QueueStats, Store, StoreError};

/// How long one reading of the store serves `/readyz` and `/metrics`.
const SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(1);

/// What `/readyz` and `/metrics` read from the store (reachable? the queue counts), read at
/// most once a second and by one caller at a time, whoever asks: `/readyz` is public, and
/// however many clients poll it, it holds at most one of the read connections that ingest's
/// match-key lookups need, for one cheap query a second.
#[derive(Debug, Default)]
pub struct StoreSnapshots {
    slot: tokio::sync::Mutex<Option<(Instant, StoreSnapshot)>>,
}

/// One reading.
#[derive(Debug, Clone)]
pub(crate) struct StoreSnapshot {
    /// `Store::ping` answered.
    pub(crate) reachable: bool,
    /// `ok`, `failing` (reads work, writes do not commit) or `unreachable`, for `/readyz`.
    pub(crate) storage: &'static str,
    /// `Store::stats`, unless it failed.
    pub(crate) stats: Option<QueueStats>,
}

impl StoreSnapshots {
    /// The latest reading if it is under a second old, else a new one. Callers arriving while
    /// one is being read wait for it and share it.
    pub(crate) async fn get(&self, store: &dyn Store) -> StoreSnapshot {
        let mut slot = self.slot.lock().await;
        if let Some((at, snapshot)) = slot.as_ref() {
            if at.elapsed() < SNAPSHOT_MAX_AGE {
                return snapshot.clone();
            }
        }
        let storage = match store.ping().await {
            Ok(()) => "ok",
            Err(StoreError::WritesFailing(_)) => "failing",
            Err(_) => "unreachable",
        };
        let reachable = storage == "ok";
        let stats = match store.stats().await {
            Ok(stats) => Some(stats),
            Err(err) => {
                tracing::warn!(error = %err, "cannot read queue stats");
                None
            }
        };
        let snapshot = StoreSnapshot {
            reachable,
            storage,
            stats,
        };
        *slot = Some((Instant::now(), snapshot.clone()));
        snapshot
    }
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is up", body = super::openapi::Health)))]
pub(super) async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// Storage reachable and delivery workers alive; pixel states and queue depth for people.
/// A paused pixel does not make the instance unready: ingest still works and nothing is lost.
/// Storage and queue are read at most once a second ([`StoreSnapshots`]).
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready (`status` is `degraded` while a pixel is paused)", body = super::openapi::Readiness),
        (status = 503, description = "Storage unreachable or failing to write, or delivery workers stopped", body = super::openapi::Readiness),
    ))]
pub(super) async fn readyz(State(state): State<SharedState>) -> impl IntoResponse {
    let state = &state.0;
    let snapshot = state.store_snapshots.get(state.store.as_ref()).await;
    let stats = snapshot.stats;
    let workers_alive = state.workers_alive.load(Ordering::Relaxed);
    let ready = snapshot.reachable && (state.config.dry_run() || workers_alive);
    let pixels: Vec<_> = state.delivery.iter().map(|d| d.status()).collect();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if !ready { "unavailable" } else if pixels.iter().any(|p| p.state == "paused") { "degraded" } else { "ok" },
            "storage": snapshot.storage,
            "workers": if state.config.dry_run() { "dry_run" } else if workers_alive { "running" } else { "stopped" },
            "dry_run": state.config.dry_run(),
            "pixels": pixels,
            "queue": stats,
        })),
    )
}

/// A cheap authenticated call to test credentials from n8n, Make or Zapier.
#[utoipa::path(get, path = "/v1/me", tag = "operations",
    responses((status = 200, description = "The secret is accepted", body = super::openapi::Me)))]
pub(super) async fn me(State(state): State<SharedState>) -> impl IntoResponse {
    let state = &state.0;
    Json(json!({
        "ok": true,
        "service": "capi-bridge",
        "version": env!("CARGO_PKG_VERSION"),
        // The default pixel, as before several pixels existed.
        "pixel_id": state.config.pixels.default_pixel().map(|m| m.pixel_id.as_str()),
        "pixels": state.config.pixels.iter().map(|m| json!({
            "name": m.name,
            "pixel_id": m.pixel_id,
            "api_version": m.api_version,
            "default": state.config.pixels.default_pixel().is_some_and(|d| d.name == m.name),
        })).collect::<Vec<_>>(),
        "dry_run": state.config.dry_run(),
        "api_version": state.config.api_version,
    }))
}
