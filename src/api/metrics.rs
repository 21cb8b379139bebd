//! `GET /metrics`: Prometheus text format (see [`crate::metrics`]), behind `METRICS_TOKEN`
//! when one is set.

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{ApiError, SharedState};
use crate::delivery::{now_ms, Delivery, PixelStatus};

/// The scrape: process counters and histograms, this app's queue and pixel gauges.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain; version=0.0.4"),
        (status = 401, description = "`METRICS_TOKEN` is set and was not presented", body = super::error::ErrorBody),
    ),
    security((), ("metrics_token" = [])))]
pub(super) async fn scrape(
    State(state): State<SharedState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let state = &state.0;
    if let Some(token) = &state.config.metrics_token {
        if !bearer_matches(&headers, token) {
            return Err(ApiError::Unauthorized);
        }
    }
    // Shared with /readyz: read at most once a second, however often either is asked.
    let stats = state.store_snapshots.get(state.store.as_ref()).await.stats;
    let pixels: Vec<PixelStatus> = state.delivery.iter().map(Delivery::status).collect();
    let body = crate::metrics::render(stats.as_ref(), &pixels, now_ms());
    Ok((
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
        .into_response())
}

/// `Authorization: Bearer <token>`, compared in constant time (hashed first, so the length
/// leaks nothing either).
fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, presented)| presented.trim());
    let Some(presented) = presented else {
        return false;
    };
    let presented = Sha256::digest(presented.as_bytes());
    let expected = Sha256::digest(token.as_bytes());
    bool::from(presented.ct_eq(&expected))
}
