//! The HTTP adapter (axum): routes, authentication, the JSON error shape. Handlers translate
//! HTTP to calls of [`crate::ingest::Ingestor`] and [`crate::store::Store`]; no Meta rules live
//! here.

mod collect;
pub mod error;
mod events;
mod health;
mod metrics;
mod openapi;
mod quality;
pub mod signature;
pub mod sources;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::{Extension, Router};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::Config;
use crate::delivery::Delivery;
use crate::ingest::Ingestor;
use crate::store::Store;
pub use collect::Limits as CollectLimits;
pub use error::ApiError;
pub use health::StoreSnapshots;

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Validated configuration.
    pub config: Arc<Config>,
    /// Storage.
    pub store: Arc<dyn Store>,
    /// The ingest pipeline.
    pub ingestor: Ingestor,
    /// Delivery of each pixel (none in dry-run), for pixel status.
    pub delivery: Vec<Delivery>,
    /// Set while the delivery workers run.
    pub workers_alive: Arc<std::sync::atomic::AtomicBool>,
    /// Maps source payloads to events.
    pub mapper: crate::sources::Mapper,
    /// Rate limits of `POST /v1/collect`.
    pub collect_limits: Arc<collect::Limits>,
    /// Per-source counters, written once a second.
    pub counters: crate::sources::SourceCounters,
    /// Queues source payloads, many per transaction.
    pub inbox_commit: crate::store::InboxCommit,
    /// Wakes the inbox worker when a source payload is queued.
    pub inbox_wake: Arc<tokio::sync::Notify>,
    /// Meta's Event Match Quality answers, cached for a few minutes.
    pub meta_quality: crate::quality::MetaQuality,
    /// What `/readyz` and `/metrics` read from the store, at most once a second.
    pub store_snapshots: Arc<StoreSnapshots>,
}

/// Shared by every request: one `Arc` clone per request, nothing else copied.
pub(crate) type SharedState = Arc<(AppState, SecretDigests)>;

/// SHA-256 of each configured secret, computed once at start.
pub(crate) struct SecretDigests(Vec<[u8; 32]>);

impl SecretDigests {
    /// Whether `presented` is one of the secrets, in constant time (hashing first makes the
    /// comparison constant-time in the length too).
    fn matches(&self, presented: &str) -> bool {
        let presented = Sha256::digest(presented.as_bytes());
        let mut matched = subtle::Choice::from(0);
        for digest in &self.0 {
            matched |= digest.ct_eq(presented.as_slice());
        }
        bool::from(matched)
    }
}

/// All routes.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.body_limit_bytes;
    let digests = SecretDigests(
        state
            .config
            .webhook_secrets
            .iter()
            .map(|secret| Sha256::digest(secret.as_bytes()).into())
            .collect(),
    );
    let admin = crate::admin::router(&state);
    let state: SharedState = Arc::new((state, digests));
    // Routes are registered with `routes!`: each handler's `#[utoipa::path]` gives its path and
    // its documentation at once (see `openapi`). A route added with `.route(...)` instead is
    // undocumented, and `tests/api/openapi.rs` fails on it.
    let mut protected = OpenApiRouter::new()
        .routes(routes!(events::ingest))
        .routes(routes!(events::show))
        .routes(routes!(health::me))
        .routes(routes!(sources::list))
        .routes(routes!(sources::test_rules))
        .routes(routes!(sources::parked))
        .routes(routes!(sources::replay_parked))
        .routes(routes!(quality::report));
    openapi::requires_secret(protected.get_openapi_mut());
    let protected =
        protected.route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    // Sources authenticate themselves: a URL token or a sender's signature besides the secret.
    let sources = OpenApiRouter::new()
        .routes(routes!(sources::receive))
        .routes(routes!(sources::receive_with_token));
    // Pages: public, fenced by site key, origin and rate limits; a small body limit of its own.
    let pages = OpenApiRouter::new()
        .routes(routes!(collect::collect, collect::preflight))
        .routes(routes!(collect::script))
        .routes(routes!(collect::versioned_script))
        .layer(axum::extract::DefaultBodyLimit::max(collect::BODY_LIMIT));
    let (router, mut contract) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(protected)
        .merge(sources)
        .merge(pages)
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(metrics::scrape))
        .routes(routes!(openapi::serve))
        .split_for_parts();
    openapi::add_common_headers(&mut contract);
    router
        // The operator dashboard (HTML pages, not part of the JSON API's contract).
        .merge(admin)
        .layer(Extension(openapi::Served::new(&contract)))
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            // Spans carry the method, the matched route and the request id: never the body,
            // the query string or headers (they may hold secrets or personal data).
            TraceLayer::new_for_http().make_span_with(|request: &Request| {
                let route = request
                    .extensions()
                    .get::<axum::extract::MatchedPath>()
                    .map_or("unmatched", |p| p.as_str())
                    .to_owned();
                let request_id = request
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                tracing::info_span!("request", method = %request.method(), route, request_id)
            }),
        )
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(tower::util::MapRequestLayer::new(plain_request_id))
        .with_state(state)
}

/// Keeps a caller's `x-request-id` only when it looks like an id (at most 64 letters, digits,
/// `-`, `_`, `.`, `:`); anything else (an email, a long string) is replaced by a new UUID,
/// because the id is logged with every line of the request.
fn plain_request_id(mut request: Request) -> Request {
    let plain = request.headers().get("x-request-id").is_none_or(|id| {
        id.len() <= 64
            && id
                .as_bytes()
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
    });
    if !plain {
        request.headers_mut().remove("x-request-id");
    }
    request
}

/// Accepts `Authorization: Bearer <secret>`, `X-Webhook-Secret` or `X-API-Key`, compared in
/// constant time against every configured secret (several allow rotation); or, for senders
/// that sign rather than send the secret, a body signed with one of those secrets:
/// `X-Signature-256: sha256=<hex>` (GitHub style) or Standard Webhooks (`webhook-id`,
/// `webhook-timestamp`, `webhook-signature`, within ±5 minutes). A Standard Webhooks delivery
/// also gives events without an `event_id` one derived from `webhook-id`, so the sender's
/// retries are duplicates, and a replay inside the window changes nothing.
async fn authenticate(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (state, digests) = &*state;
    if state.config.unauthenticated() {
        return Ok(next.run(request).await);
    }
    if let Some(presented) = presented_secret(request.headers()) {
        return if digests.matches(&presented) {
            Ok(next.run(request).await)
        } else {
            Err(ApiError::Unauthorized)
        };
    }
    let Some(signed) = BodySignature::from_headers(request.headers()) else {
        return Err(ApiError::Unauthorized);
    };
    // Signatures are over the raw bytes: read them (within the body limit), verify, and hand
    // the same bytes on.
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, state.config.body_limit_bytes)
        .await
        .map_err(|_| {
            ApiError::PayloadTooLarge(format!(
                "the request body is larger than {} bytes (BODY_LIMIT_BYTES) or unreadable",
                state.config.body_limit_bytes
            ))
        })?;
    let now_secs = crate::delivery::now_ms() / 1000;
    let delivery_id = signed
        .verify(&state.config.webhook_secrets, &bytes, now_secs)
        .map_err(|_| ApiError::Unauthorized)?
        .map(str::to_owned);
    let mut request = Request::from_parts(parts, axum::body::Body::from(bytes));
    if let Some(id) = delivery_id {
        request
            .extensions_mut()
            .insert(DeliveryId(format!("wh-{id}")));
    }
    Ok(next.run(request).await)
}

/// A body signed with a `WEBHOOK_SECRET`, as its headers say: Standard Webhooks
/// (`webhook-id`, `webhook-timestamp`, `webhook-signature`) or GitHub style
/// (`X-Signature-256` / `X-Hub-Signature-256`). Shared by `/v1/events` and the sources.
pub(crate) enum BodySignature {
    /// Standard Webhooks; the id is the sender's delivery id.
    Standard {
        id: String,
        timestamp: String,
        signature: String,
    },
    /// `sha256=<hex>` over the body.
    Hmac(String),
}

impl BodySignature {
    /// The signature the headers carry, if any (owned: the request's body is not `Sync`).
    pub(crate) fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        if let (Some(id), Some(timestamp), Some(signature)) = (
            header("webhook-id"),
            header("webhook-timestamp"),
            header("webhook-signature"),
        ) {
            return Some(Self::Standard {
                id,
                timestamp,
                signature,
            });
        }
        header("x-signature-256")
            .or_else(|| header("x-hub-signature-256"))
            .map(Self::Hmac)
    }

    /// Checks `body` against every secret; the sender's delivery id for Standard Webhooks.
    pub(crate) fn verify(
        &self,
        secrets: &[String],
        body: &[u8],
        now_secs: i64,
    ) -> Result<Option<&str>, signature::SignatureError> {
        match self {
            Self::Standard {
                id,
                timestamp,
                signature,
            } => signature::verify_standard_webhook(
                secrets, id, timestamp, body, signature, now_secs,
            )
            .map(|()| Some(id.as_str())),
            Self::Hmac(signed) => signature::verify_body_hmac(secrets, body, signed).map(|()| None),
        }
    }
}

/// The sender's id for one delivery (Standard Webhooks `webhook-id`), unchanged across its
/// retries; events without an `event_id` get ids derived from it.
#[derive(Debug, Clone)]
pub(crate) struct DeliveryId(pub(crate) String);

fn presented_secret(headers: &HeaderMap) -> Option<String> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    if let Some(auth) = header("authorization") {
        let mut parts = auth.splitn(2, ' ');
        if let (Some(scheme), Some(token)) = (parts.next(), parts.next()) {
            if scheme.eq_ignore_ascii_case("bearer") {
                return Some(token.trim().to_owned());
            }
        }
    }
    header("x-webhook-secret")
        .or_else(|| header("x-api-key"))
        .map(str::to_owned)
}
