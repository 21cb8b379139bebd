//! `POST /v1/events` and `GET /v1/events/{event_id}`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::{Extension, Json};

use super::{ApiError, DeliveryId, SharedState};
use crate::delivery::now_ms;
use crate::ingest::{with_stable_event_ids, IngestError, Route};

/// Chooses the pixel (name or id) of a request's events that do not name one themselves.
pub(super) const PIXEL_HEADER: &str = "x-capi-pixel";
use crate::store::EventDetail;

/// Validates, normalizes and durably queues events; answers 202 after the commit.
#[utoipa::path(post, path = "/v1/events", tag = "events",
    params(("x-capi-pixel" = Option<String>, Header, description = "The pixel (name or id) of events that name none with a `pixel` field; the default pixel otherwise")),
    request_body(content = super::openapi::IncomingEvents, description = "Raw or hashed; at most 1000 events and BODY_LIMIT_BYTES"),
    responses(
        (status = 202, description = "Stored durably (or acknowledged as duplicates); delivery follows", body = crate::ingest::IngestReport),
        (status = 400, description = "Malformed JSON (with line and column) or not a request of events", body = super::error::ErrorBody),
        (status = 413, description = "Body over BODY_LIMIT_BYTES or more than 1000 events", body = super::error::ErrorBody),
        (status = 422, description = "An event breaks Meta's rules; nothing was queued (`problems` names each field)", body = super::error::ErrorBody),
        (status = 503, description = "Storage unavailable; retry (`Retry-After`)", body = super::error::ErrorBody),
    ))]
pub(super) async fn ingest(
    State(state): State<SharedState>,
    delivery: Option<Extension<DeliveryId>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let state = &state.0;
    let timer = crate::metrics::IngestTimer::start("/v1/events");
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!(
                "the request body is larger than {} bytes (BODY_LIMIT_BYTES)",
                state.config.body_limit_bytes
            ))
        } else {
            ApiError::BadRequest(rejection.body_text())
        }
    })?;
    let value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|err| ApiError::MalformedJson {
            line: err.line(),
            column: err.column(),
            // The parser's own description names the syntax problem, not the data.
            message: describe_json_error(&err),
        })?;
    let value = match delivery {
        Some(Extension(DeliveryId(base))) => with_stable_event_ids(value, &base),
        None => value,
    };
    let now_secs = now_ms() / 1000;
    let pixel = headers
        .get(PIXEL_HEADER)
        .map(|v| {
            v.to_str().map_err(|_| {
                ApiError::BadRequest(format!("the {PIXEL_HEADER} header must be text"))
            })
        })
        .transpose()?;
    let route = Route::from("api").to_pixel(pixel);
    let report = state
        .ingestor
        .ingest(value, now_secs, &route)
        .await
        .map_err(|err| match err {
            IngestError::BadRequest(message) => ApiError::BadRequest(message),
            IngestError::TooMany(message) => ApiError::PayloadTooLarge(message),
            IngestError::Invalid(problems) => ApiError::Invalid(problems),
            IngestError::Store(err) => ApiError::from(err),
        })?;
    // Per-request logging is debug: at thousands of requests a second it would cost more than
    // the work itself.
    tracing::debug!(
        accepted = report.accepted,
        duplicates = report.duplicates,
        warnings = report.warnings.len(),
        "events accepted"
    );
    timer.stored();
    Ok((StatusCode::ACCEPTED, Json(report)))
}

fn describe_json_error(err: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match err.classify() {
        Category::Eof => "the body ends before the JSON is complete".to_owned(),
        Category::Syntax => "invalid JSON syntax".to_owned(),
        Category::Data | Category::Io => "unreadable JSON".to_owned(),
    }
}

/// An event's state, its attempts with Meta's answers, and the exact payload sent.
#[utoipa::path(get, path = "/v1/events/{event_id}", tag = "events",
    params(("event_id" = String, Path, description = "The event's `event_id`")),
    responses(
        (status = 200, description = "The event", body = EventDetail),
        (status = 404, description = "No such event (or pruned after its retention)", body = super::error::ErrorBody),
        (status = 503, description = "Storage unavailable; retry", body = super::error::ErrorBody),
    ))]
pub(super) async fn show(
    State(state): State<SharedState>,
    Path(event_id): Path<String>,
) -> Result<Json<EventDetail>, ApiError> {
    let state = &state.0;
    state
        .store
        .find_event(&event_id, now_ms())
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no event with event_id {event_id:?}")))
}
