//! Liveness, readiness and the credential check automation tools call.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use super::SharedState;
use crate::store::StoreError;

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is up", body = super::openapi::Health)))]
pub(super) async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// Storage reachable and delivery workers alive; pixel states and queue depth for people.
/// A paused pixel does not make the instance unready: ingest still works and nothing is lost.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready (`status` is `degraded` while a pixel is paused)", body = super::openapi::Readiness),
        (status = 503, description = "Storage unreachable or failing to write, or delivery workers stopped", body = super::openapi::Readiness),
    ))]
pub(super) async fn readyz(State(state): State<SharedState>) -> impl IntoResponse {
    let state = &state.0;
    let storage = state.store.ping().await;
    let stats = state.store.stats().await.ok();
    let workers_alive = state.workers_alive.load(Ordering::Relaxed);
    let ready = storage.is_ok() && (state.config.dry_run() || workers_alive);
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
            "storage": match &storage {
                Ok(()) => "ok",
                Err(StoreError::WritesFailing(_)) => "failing",
                Err(_) => "unreachable",
            },
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
