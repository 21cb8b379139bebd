//! `GET /v1/quality?days=N`: the match-quality report ([`crate::quality::report`]) as JSON.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;

use super::{ApiError, SharedState};
use crate::delivery::{now_ms, GraphClient};
use crate::quality::QualityReport;

/// `days`: today and the days before it (1 to 366; 7 when absent).
#[derive(Debug, Deserialize)]
pub(super) struct QualityQuery {
    days: Option<u32>,
}

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// Per event name: the share of events carrying each match key, what the memory filled in,
/// the values dropped; Meta's own EMQ beside it when the token may read it.
#[utoipa::path(get, path = "/v1/quality", tag = "operations",
    params(("days" = Option<u32>, Query, description = "Today and the days before it, 1 to 366 (7 when absent)")),
    responses(
        (status = 200, description = "Match quality per pixel and event name", body = crate::quality::QualityReport),
        (status = 400, description = "`days` out of range or not a number", body = super::error::ErrorBody),
        (status = 503, description = "Storage unavailable; retry", body = super::error::ErrorBody),
    ))]
pub(super) async fn report(
    State(state): State<SharedState>,
    query: Result<Query<QualityQuery>, QueryRejection>,
) -> Result<Json<QualityReport>, ApiError> {
    let state = &state.0;
    let Query(query) = query.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let days = query.days.unwrap_or(7);
    if !(1..=366).contains(&days) {
        return Err(ApiError::BadRequest(
            "days must be between 1 and 366".to_owned(),
        ));
    }
    let since_ms = now_ms() - i64::from(days - 1) * DAY_MS;
    let clients: Vec<GraphClient> = state
        .delivery
        .iter()
        .map(|delivery| delivery.client().clone())
        .collect();
    let report = crate::quality::report(
        state.store.as_ref(),
        since_ms,
        &state.meta_quality,
        &clients,
    )
    .await?;
    Ok(Json(report))
}
