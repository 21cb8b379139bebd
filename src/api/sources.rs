//! `POST /v1/sources/<name>[/<token>]`: payloads of webhook sources (Supabase database
//! webhooks, Chatwoot, CRMs) in their own shape. The payload is stored in the inbox before the
//! answer and mapped to events there by the rules, so the answer takes milliseconds (pg_net and
//! Chatwoot give up after a few seconds and never retry).
//!
//! Also `GET /v1/sources` (counters) and `POST /v1/rules/test` ("what would be sent").

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{signature, ApiError, SecretDigests, SharedState};
use crate::delivery::now_ms;
use crate::domain::rules::PayloadKind;
use crate::sources::SourceConfig;
use crate::store::SourcePayload;

/// A payload sent with the source's header secret or signature.
#[utoipa::path(post, path = "/v1/sources/{name}", tag = "sources",
    params(("name" = String, Path, description = "The source: `supabase`, `chatwoot` or one declared under `[sources.<name>]`")),
    request_body(content = Object, description = "The sender's own payload (a Supabase database webhook, a Chatwoot event, a CRM's JSON object)"),
    responses(
        (status = 200, description = "Acknowledged without queueing: `unmatched` (no rule wants it; counted, not kept) or `duplicate` (this delivery id was queued before)", body = Receipt),
        (status = 202, description = "Stored in the inbox; mapped to events by the rules right after", body = Receipt),
        (status = 400, description = "Malformed JSON or not a JSON object", body = super::error::ErrorBody),
        (status = 401, description = "Wrong or missing token, secret or signature (a stale or forged signature says why)", body = super::error::ErrorBody),
        (status = 404, description = "No source of this name", body = super::error::ErrorBody),
        (status = 413, description = "Body over BODY_LIMIT_BYTES (plain-text answer)", content_type = "text/plain"),
        (status = 503, description = "Storage unavailable; retry", body = super::error::ErrorBody),
    ),
    security(("bearer" = []), ("webhook_secret" = []), ("api_key" = []), ("body_signature" = []), ("standard_webhooks" = []), ("chatwoot_signature" = [])))]
pub(super) async fn receive(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let timer = crate::metrics::IngestTimer::start("/v1/sources/:name");
    timed(timer, accept(&state, &name, None, &headers, &body).await)
}

/// A payload sent to the source's secret URL (senders that cannot set headers).
#[utoipa::path(post, path = "/v1/sources/{name}/{token}", tag = "sources",
    params(
        ("name" = String, Path, description = "The source"),
        ("token" = String, Path, description = "The source's URL token (`SOURCE_<NAME>_TOKEN`, `SUPABASE_WEBHOOK_TOKEN`): the credential itself, for senders that cannot set headers; compared in constant time, never logged"),
    ),
    request_body(content = Object, description = "The sender's own payload"),
    responses(
        (status = 200, description = "Acknowledged without queueing: `unmatched` (no rule wants it; counted, not kept) or `duplicate` (this delivery id was queued before)", body = Receipt),
        (status = 202, description = "Stored in the inbox; mapped to events by the rules right after", body = Receipt),
        (status = 400, description = "Malformed JSON or not a JSON object", body = super::error::ErrorBody),
        (status = 401, description = "Wrong or missing token, secret or signature (a stale or forged signature says why)", body = super::error::ErrorBody),
        (status = 404, description = "No source of this name", body = super::error::ErrorBody),
        (status = 413, description = "Body over BODY_LIMIT_BYTES (plain-text answer)", content_type = "text/plain"),
        (status = 503, description = "Storage unavailable; retry", body = super::error::ErrorBody),
    ),
    security(()))]
pub(super) async fn receive_with_token(
    State(state): State<SharedState>,
    Path((name, token)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let timer = crate::metrics::IngestTimer::start("/v1/sources/:name/:token");
    timed(
        timer,
        accept(&state, &name, Some(&token), &headers, &body).await,
    )
}

/// Records the time of a stored (202) payload.
fn timed(
    timer: crate::metrics::IngestTimer,
    answer: Result<(StatusCode, Json<Receipt>), ApiError>,
) -> Result<(StatusCode, Json<Receipt>), ApiError> {
    if matches!(answer, Ok((StatusCode::ACCEPTED, _))) {
        timer.stored();
    }
    answer
}

/// The answer to a source.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = SourceReceipt)]
struct Receipt {
    /// `queued`, `duplicate` (the same delivery id was queued before) or `unmatched`.
    status: &'static str,
    /// The inbox row, for `queued`.
    #[serde(skip_serializing_if = "Option::is_none")]
    inbox_id: Option<i64>,
}

async fn accept(
    state: &SharedState,
    name: &str,
    url_token: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(StatusCode, Json<Receipt>), ApiError> {
    let (app, digests) = &**state;
    let source = app.mapper.source(name).ok_or_else(|| {
        ApiError::NotFound(format!(
            "no source named {name:?}; supabase and chatwoot always exist, others are declared under [sources.<name>]"
        ))
    })?;
    let now = now_ms();
    authenticate(app, digests, source, url_token, headers, body, now / 1000)?;

    let payload: Value = serde_json::from_slice(body).map_err(|err| ApiError::MalformedJson {
        line: err.line(),
        column: err.column(),
        message: "invalid JSON".to_owned(),
    })?;
    if !payload.is_object() {
        return Err(ApiError::BadRequest(format!(
            "a {name} payload must be a JSON object"
        )));
    }
    let delivery_id = delivery_id(source, headers);
    let received_at = now / 1000;

    // A payload no rule wants is acknowledged and counted without being kept: it may hold
    // personal data we have no use for. One a condition fails on is kept, and parked.
    let wanted = app
        .mapper
        .any_rule_matches(name, &payload, received_at)
        .unwrap_or(true);
    if !wanted {
        count(app, name, &[("received", 1), ("unmatched", 1)]);
        return Ok((
            StatusCode::OK,
            Json(Receipt {
                status: "unmatched",
                inbox_id: None,
            }),
        ));
    }
    let stored = app
        .inbox_commit
        .enqueue(SourcePayload {
            source: name.to_owned(),
            delivery_id,
            payload,
        })
        .await?;
    match stored {
        Some(inbox_id) => {
            app.inbox_wake.notify_one();
            count(app, name, &[("received", 1)]);
            Ok((
                StatusCode::ACCEPTED,
                Json(Receipt {
                    status: "queued",
                    inbox_id: Some(inbox_id),
                }),
            ))
        }
        None => {
            count(app, name, &[("received", 1), ("duplicate", 1)]);
            Ok((
                StatusCode::OK,
                Json(Receipt {
                    status: "duplicate",
                    inbox_id: None,
                }),
            ))
        }
    }
}

fn count(app: &super::AppState, source: &str, outcomes: &[(&'static str, u64)]) {
    for (outcome, n) in outcomes {
        app.counters.add(source, outcome, *n);
    }
}

/// A source accepts, in this order: its URL token in the path; a valid `X-Chatwoot-Signature`
/// (Chatwoot sources with a signing secret; a bad or stale one is refused outright); a body
/// signed with a `WEBHOOK_SECRET` (Standard Webhooks or `X-Signature-256`); any
/// `WEBHOOK_SECRET` in a header; anything on a loopback-only service without secrets.
fn authenticate(
    app: &super::AppState,
    digests: &SecretDigests,
    source: &SourceConfig,
    url_token: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
    now_secs: i64,
) -> Result<(), ApiError> {
    let name = &source.name;
    if let Some(given) = url_token {
        let Some(expected) = &source.url_token else {
            return Err(ApiError::Refused(format!(
                "source {name} has no URL token configured (SOURCE_{}_TOKEN)",
                name.to_ascii_uppercase().replace('-', "_")
            )));
        };
        let matched = Sha256::digest(given.as_bytes()).ct_eq(&Sha256::digest(expected.as_bytes()));
        return if bool::from(matched) {
            Ok(())
        } else {
            Err(ApiError::Refused(format!("wrong token for source {name}")))
        };
    }
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    if source.kind == PayloadKind::Chatwoot {
        if let (Some(secret), Some(signed)) =
            (&source.signing_secret, header("x-chatwoot-signature"))
        {
            let timestamp = header("x-chatwoot-timestamp").unwrap_or("");
            return signature::verify_chatwoot(secret, timestamp, body, signed, now_secs).map_err(
                |err| match err {
                    signature::SignatureError::OutOfWindow => ApiError::Refused(
                        "X-Chatwoot-Timestamp is more than 5 minutes from now: a replayed delivery or a wrong clock".to_owned(),
                    ),
                    signature::SignatureError::Mismatch => ApiError::Refused(
                        "X-Chatwoot-Signature does not match this source's signing secret".to_owned(),
                    ),
                    signature::SignatureError::Malformed => ApiError::Refused(
                        "X-Chatwoot-Signature must be sha256=<hex> with X-Chatwoot-Timestamp in unix seconds".to_owned(),
                    ),
                },
            );
        }
    }
    // Senders that sign with WEBHOOK_SECRET instead of sending it (CRMs, Make, Zapier, n8n):
    // the same formats as /v1/events.
    let secrets = &app.config.webhook_secrets;
    if let Some(signed) =
        super::BodySignature::from_headers(headers).filter(|_| !secrets.is_empty())
    {
        return signed
            .verify(secrets, body, now_secs)
            .map(|_| ())
            .map_err(|err| {
                let format = match signed {
                    super::BodySignature::Standard { .. } => "Standard Webhooks signature",
                    super::BodySignature::Hmac(_) => "X-Signature-256",
                };
                ApiError::Refused(format!("{format} refused: {err}"))
            });
    }
    if let Some(presented) = super::presented_secret(headers) {
        return if digests.matches(&presented) {
            Ok(())
        } else {
            Err(ApiError::Unauthorized)
        };
    }
    if app.config.unauthenticated() && source.signing_secret.is_none() {
        return Ok(());
    }
    Err(ApiError::Refused(format!(
        "source {name} needs a secret: a header (Authorization: Bearer <WEBHOOK_SECRET>, X-Webhook-Secret or X-API-Key){}, or its URL token (/v1/sources/{name}/<token>)",
        if source.kind == PayloadKind::Chatwoot { ", a Chatwoot signature" } else { "" }
    )))
}

/// The sender's own id for this delivery, reused by its retries.
fn delivery_id(source: &SourceConfig, headers: &HeaderMap) -> Option<String> {
    let header = match source.kind {
        PayloadKind::Chatwoot => "x-chatwoot-delivery",
        PayloadKind::Supabase | PayloadKind::Generic => "webhook-id",
    };
    headers
        .get(header)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 200)
        .map(str::to_owned)
}

/// Every source with its counters.
#[utoipa::path(get, path = "/v1/sources", tag = "sources",
    responses(
        (status = 200, description = "Every source with its counters", body = super::openapi::SourceList),
        (status = 503, description = "Storage unavailable; retry", body = super::error::ErrorBody),
    ))]
pub(super) async fn list(State(state): State<SharedState>) -> Result<Json<Value>, ApiError> {
    let app = &state.0;
    let stats = app.store.source_stats().await?;
    let sources: Vec<Value> = app
        .config
        .sources
        .sources
        .iter()
        .map(|source| {
            let counters: serde_json::Map<String, Value> = stats
                .iter()
                .filter(|s| s.source == source.name)
                .map(|s| (s.outcome.clone(), json!(s.count)))
                .collect();
            json!({
                "name": source.name,
                "kind": format!("{:?}", source.kind).to_lowercase(),
                "path": format!("/v1/sources/{}", source.name),
                "url_token": source.url_token.is_some(),
                "signing_secret": source.signing_secret.is_some(),
                "rules": app.config.sources.rules.count_for(&source.name),
                "counts": counters,
            })
        })
        .collect();
    Ok(Json(json!({ "sources": sources })))
}

/// `?source=<name>` for `POST /v1/rules/test`.
#[derive(Debug, Deserialize)]
pub(super) struct RulesTestQuery {
    source: String,
}

/// What a payload would become, hashed as it would be sent; nothing is stored.
#[utoipa::path(post, path = "/v1/rules/test", tag = "sources",
    params(("source" = String, Query, description = "The source whose rules apply")),
    request_body(content = Object, description = "A sample payload of that source (`Content-Type: application/json`)"),
    responses(
        (status = 200, description = "The outcome: `events` (each with `data` as sent), `unmatched`, `parked` or `retry`", body = super::openapi::RulesPreview),
        (status = 400, description = "`?source=` missing, or the body is not JSON (plain-text answer)", content_type = "text/plain"),
        (status = 404, description = "No source of this name", body = super::error::ErrorBody),
        (status = 413, description = "Body over BODY_LIMIT_BYTES (plain-text answer)", content_type = "text/plain"),
        (status = 415, description = "Not `Content-Type: application/json` (plain-text answer)", content_type = "text/plain"),
    ))]
pub(super) async fn test_rules(
    State(state): State<SharedState>,
    Query(query): Query<RulesTestQuery>,
    Json(payload): Json<Value>,
) -> Result<Json<Value>, ApiError> {
    let app = &state.0;
    if app.mapper.source(&query.source).is_none() {
        return Err(ApiError::NotFound(format!(
            "no source named {:?}",
            query.source
        )));
    }
    Ok(Json(
        app.mapper
            .preview(&app.config.ingest, &query.source, &payload, now_ms() / 1000)
            .await,
    ))
}

/// Parked payloads (newest first, at most 500): source, problems and times, never the payload.
#[utoipa::path(get, path = "/v1/inbox/parked", tag = "sources",
    responses(
        (status = 200, description = "Parked payloads", body = super::openapi::ParkedList),
        (status = 503, description = "Storage unavailable; retry", body = super::error::ErrorBody),
    ))]
pub(super) async fn parked(State(state): State<SharedState>) -> Result<Json<Value>, ApiError> {
    let parked = state.0.store.parked_payloads(500).await?;
    Ok(Json(json!({ "parked": parked })))
}

/// Makes every parked payload pending again (after a rule or configuration fix).
#[utoipa::path(post, path = "/v1/inbox/replay", tag = "sources",
    responses(
        (status = 200, description = "How many were requeued", body = super::openapi::Requeued),
        (status = 503, description = "Storage unavailable; retry", body = super::error::ErrorBody),
    ))]
pub(super) async fn replay_parked(
    State(state): State<SharedState>,
) -> Result<Json<Value>, ApiError> {
    let app = &state.0;
    let requeued = app.store.requeue_invalid_inbox(now_ms()).await?;
    if requeued > 0 {
        app.inbox_wake.notify_one();
    }
    Ok(Json(json!({ "requeued": requeued })))
}
