//! The OpenAPI 3.1 contract of the HTTP API, generated from the code and served at
//! `GET /openapi.json`.
//!
//! Every documented route is registered with `utoipa_axum::routes!` in [`super::router`]: the
//! handler's `#[utoipa::path]` attribute gives both its path (for axum) and its documentation,
//! so a route added that way cannot be undocumented. This module holds what is not a handler:
//! the document's frame ([`ApiDoc`]), the security schemes, the secret requirement of the
//! protected routes ([`requires_secret`]), the shapes of bodies built with `json!` or read
//! field by field (described here by hand), and the handler that serves the document.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi as Document, RefOr, ResponseBuilder, SecurityRequirement};
use utoipa::{Modify, OpenApi, ToSchema};

use super::error::ErrorBody;

/// The document's frame; the paths come from the router.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "capi-bridge",
        description = "Receives conversion events, normalizes and hashes them as Meta specifies, queues them durably and delivers them to Meta's Conversions API. Errors share one JSON shape (`ErrorBody`); every answer carries an `x-request-id` header (the caller's, or a new UUID) that the service's logs carry too."
    ),
    modifiers(&SecuritySchemes),
    tags(
        (name = "events", description = "Events in Meta's shape or flat fields, from servers and automation tools"),
        (name = "sources", description = "Webhook sources (Supabase, Chatwoot, CRMs) in their own shape, mapped by rules"),
        (name = "pages", description = "Landing pages: the public collect endpoint and the browser script"),
        (name = "operations", description = "Health, readiness and this document"),
    )
)]
pub(super) struct ApiDoc;

/// How a caller presents a `WEBHOOK_SECRET` (any one of them is enough).
pub(super) const SECRET_SCHEMES: [&str; 5] = [
    "bearer",
    "webhook_secret",
    "api_key",
    "body_signature",
    "standard_webhooks",
];

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut Document) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let header = |name: &str, description: &str| {
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                name,
                description,
            )))
        };
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("`Authorization: Bearer <WEBHOOK_SECRET>`"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "webhook_secret",
            header(
                "X-Webhook-Secret",
                "A `WEBHOOK_SECRET` (several may be configured, for rotation)",
            ),
        );
        components.add_security_scheme(
            "api_key",
            header(
                "X-API-Key",
                "A `WEBHOOK_SECRET`, for tools that call it an API key",
            ),
        );
        components.add_security_scheme(
            "body_signature",
            header(
                "X-Signature-256",
                "`sha256=<hex>`: HMAC-SHA256 of the raw body with a `WEBHOOK_SECRET` (GitHub style; `X-Hub-Signature-256` is read too)",
            ),
        );
        components.add_security_scheme(
            "standard_webhooks",
            header(
                "webhook-signature",
                "Standard Webhooks: `webhook-id`, `webhook-timestamp` (within 5 minutes) and `webhook-signature` (`v1,<base64 HMAC-SHA256>` with a `WEBHOOK_SECRET`); events without an `event_id` get one derived from `webhook-id`, so the sender's retries are duplicates",
            ),
        );
        components.add_security_scheme(
            "metrics_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("`GET /metrics` only, when `METRICS_TOKEN` is set: `Authorization: Bearer <METRICS_TOKEN>`"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "chatwoot_signature",
            header(
                "X-Chatwoot-Signature",
                "Chatwoot sources with a signing secret: `sha256=<hex>` of `<X-Chatwoot-Timestamp>.<body>`, timestamp within 5 minutes",
            ),
        );
    }
}

/// Marks every operation of `doc` as needing a `WEBHOOK_SECRET` (any of [`SECRET_SCHEMES`]) and
/// answering 401 without one: called on the routes the `authenticate` middleware guards, next
/// to where it is applied, so the contract and the guard cannot drift apart.
pub(super) fn requires_secret(doc: &mut Document) {
    let unauthorized = ResponseBuilder::new()
        .description("Missing or wrong secret or signature (with `WWW-Authenticate: Bearer`)")
        .content(
            "application/json",
            utoipa::openapi::ContentBuilder::new()
                .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                    ErrorBody::name(),
                ))))
                .build(),
        )
        .build();
    for item in doc.paths.paths.values_mut() {
        for operation in operations_mut(item) {
            operation.security = Some(
                SECRET_SCHEMES
                    .iter()
                    .map(|scheme| SecurityRequirement::new(*scheme, Vec::<String>::new()))
                    .collect(),
            );
            operation
                .responses
                .responses
                .entry("401".to_owned())
                .or_insert_with(|| RefOr::T(unauthorized.clone()));
        }
    }
}

/// Headers every answer has, added to every documented response: `x-request-id` always,
/// `Retry-After` with 429 and 503 (set by `ApiError` and the rate limiter).
pub(super) fn add_common_headers(doc: &mut Document) {
    let header = |description: &str| {
        let mut header = utoipa::openapi::header::Header::default();
        header.description = Some(description.to_owned());
        header
    };
    for item in doc.paths.paths.values_mut() {
        for operation in operations_mut(item) {
            for (status, response) in &mut operation.responses.responses {
                let RefOr::T(response) = response else {
                    continue;
                };
                response.headers.insert(
                    "x-request-id".to_owned(),
                    header("The caller's request id (letters, digits, `-_.:`, at most 64) or a new UUID; the logs of this request carry it"),
                );
                if status == "429" || status == "503" {
                    response.headers.insert(
                        "retry-after".to_owned(),
                        header("Seconds to wait before retrying"),
                    );
                }
            }
        }
    }
}

fn operations_mut(
    item: &mut utoipa::openapi::PathItem,
) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    [
        &mut item.get,
        &mut item.post,
        &mut item.put,
        &mut item.delete,
        &mut item.patch,
        &mut item.options,
        &mut item.head,
        &mut item.trace,
    ]
    .into_iter()
    .flatten()
}

/// The served document, serialized once when the router is built.
#[derive(Clone)]
pub(super) struct Served(Bytes);

impl Served {
    pub(super) fn new(doc: &Document) -> Self {
        match serde_json::to_vec_pretty(doc) {
            Ok(json) => Self(Bytes::from(json)),
            // Cannot happen with utoipa's types; said loudly rather than served half.
            Err(err) => {
                tracing::error!(error = %err, "the OpenAPI document could not be serialized");
                Self(Bytes::from_static(b"{}"))
            }
        }
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", body = Object, content_type = "application/json")))]
pub(super) async fn serve(Extension(served): Extension<Served>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], served.0).into_response()
}

// Shapes described by hand: bodies that handlers read field by field (the domain stays free of
// OpenAPI) or build with `json!`. Never constructed; only their schemas are used.
#[allow(dead_code)]
mod shapes {
    use utoipa::openapi::schema::{ArrayBuilder, OneOfBuilder, Schema};
    use utoipa::openapi::Ref;
    use utoipa::PartialSchema as _;

    use super::*;

    /// One event: Meta's native shape (`user_data`, `custom_data`, … raw or already hashed) or
    /// the original forwarder's flat fields (`email`, `phone`, `value`, `currency`, …). Raw
    /// values are normalized and hashed here; unknown fields are dropped with a warning.
    #[derive(ToSchema)]
    pub struct IncomingEvent {
        /// A standard event (`Lead`, `Purchase`, …; case-insensitive) or a custom name.
        event_name: String,
        /// Unix seconds or an ISO 8601 time; now when absent. At most 7 days old.
        event_time: Option<serde_json::Value>,
        /// The deduplication id shared with the Pixel's `eventID`; generated when absent.
        event_id: Option<String>,
        /// The pixel (name or id) this event goes to; never sent to Meta. Else the request's
        /// `X-Capi-Pixel`, else the default pixel.
        pixel: Option<String>,
        /// `website`, `email`, `app`, `phone_call`, `chat`, `physical_store`,
        /// `system_generated`, `business_messaging` or `other`.
        action_source: Option<String>,
        /// The page (required for `website`).
        event_source_url: Option<String>,
        /// Customer information in Meta's keys (`em`, `ph`, `fn`, `ln`, …), raw or hashed.
        user_data: Option<BTreeMap<String, serde_json::Value>>,
        /// `value`, `currency`, `content_ids`, … (`Purchase` needs `value` and `currency`).
        custom_data: Option<BTreeMap<String, serde_json::Value>>,
        /// Flat field: the person's email (normalized and hashed into `user_data.em`).
        email: Option<String>,
        /// Flat field: the phone number, any format (E.164 digits, hashed into `user_data.ph`).
        phone: Option<String>,
        /// Flat field: first name (`user_data.fn`).
        first_name: Option<String>,
        /// Flat field: last name (`user_data.ln`).
        last_name: Option<String>,
        /// Flat field: your id for the person (`user_data.external_id`, hashed).
        external_id: Option<String>,
        /// Flat field: the person's IP address (sent unhashed, as Meta requires).
        client_ip_address: Option<String>,
        /// Flat field: the person's browser user agent (sent unhashed).
        client_user_agent: Option<String>,
        /// Flat field: the `_fbc` click id cookie.
        fbc: Option<String>,
        /// Flat field: the `_fbp` browser id cookie.
        fbp: Option<String>,
        /// Flat field: a Meta lead ad's lead id.
        lead_id: Option<String>,
    }

    /// Meta's envelope.
    #[derive(ToSchema)]
    pub struct EventEnvelope {
        /// The events (at most 1000).
        data: Vec<IncomingEvent>,
        /// Sends these events to Events Manager's Test Events tab.
        test_event_code: Option<String>,
        /// The pixel (name or id) of events that name none.
        pixel: Option<String>,
    }

    /// The body of `POST /v1/events`: one event, an array of them (all valid, or none is
    /// queued), or Meta's `{"data": [...]}` envelope. Written by hand: the variants are told
    /// apart by shape, which a derived schema cannot say.
    pub struct IncomingEvents;

    impl utoipa::PartialSchema for IncomingEvents {
        fn schema() -> RefOr<Schema> {
            let event = || Ref::from_schema_name(IncomingEvent::name());
            OneOfBuilder::new()
                .description(Some(
                    "One event, an array of events, or Meta's {\"data\": [...]} envelope",
                ))
                .item(event())
                .item(ArrayBuilder::new().items(event()).max_items(Some(1000)))
                .item(Ref::from_schema_name(EventEnvelope::name()))
                .into()
        }
    }

    impl ToSchema for IncomingEvents {
        fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
            schemas.push((IncomingEvent::name().into_owned(), IncomingEvent::schema()));
            schemas.push((EventEnvelope::name().into_owned(), EventEnvelope::schema()));
            <IncomingEvent as ToSchema>::schemas(schemas);
            <EventEnvelope as ToSchema>::schemas(schemas);
        }
    }

    /// What a landing page sends (`web/capi.js` builds it). The server decides the rest:
    /// `action_source` = `website`, the IP address (by `CLIENT_IP_SOURCE`) and the user agent.
    #[derive(ToSchema)]
    pub struct BrowserEvent {
        /// The site's public key (or `?site_key=`).
        site_key: Option<String>,
        /// One of the site's allowed event names.
        event_name: String,
        /// The id the Pixel used too, for deduplication.
        event_id: Option<String>,
        /// The page; its origin must be one of the site's.
        event_source_url: Option<String>,
        /// The `_fbc` cookie.
        fbc: Option<String>,
        /// The `_fbp` cookie.
        fbp: Option<String>,
        /// The `fbclid` of the landing URL, when no `_fbc` cookie exists yet.
        fbclid: Option<String>,
        /// Unix ms when the `fbclid` was seen.
        fbclid_seen_at: Option<i64>,
    }

    /// `GET /healthz`.
    #[derive(ToSchema)]
    pub struct Health {
        /// Always `ok`.
        status: String,
    }

    /// `GET /readyz`.
    #[derive(ToSchema)]
    pub struct Readiness {
        /// `ok`, `degraded` (a pixel is paused; ingest still works) or `unavailable`.
        status: String,
        /// `ok`, `unreachable`, or `failing`: reads work but writes do not commit (a full
        /// disk, a broken writer connection); ingest answers 503 until they do.
        storage: String,
        /// `running`, `stopped` or `dry_run`.
        workers: String,
        /// No Meta credentials: events are stored, not sent.
        dry_run: bool,
        /// Each pixel's delivery state.
        pixels: Vec<crate::delivery::PixelStatus>,
        /// Counts by state (absent when storage is unreachable).
        queue: Option<crate::store::QueueStats>,
    }

    /// `GET /v1/me`.
    #[derive(ToSchema)]
    pub struct Me {
        /// Always true: the secret was accepted.
        ok: bool,
        /// `capi-bridge`.
        service: String,
        /// The service's version.
        version: String,
        /// The default pixel (absent in dry-run).
        pixel_id: Option<String>,
        /// Every configured pixel.
        pixels: Vec<MePixel>,
        /// No Meta credentials: events are stored, not sent.
        dry_run: bool,
        /// Graph API version used.
        api_version: String,
    }

    /// One configured pixel.
    #[derive(ToSchema)]
    pub struct MePixel {
        /// The name requests choose it by (`pixel` field, `X-Capi-Pixel`).
        name: String,
        /// Meta's pixel (dataset) id.
        pixel_id: String,
        /// Graph API version used for it.
        api_version: String,
        /// Whether events naming no pixel go to it.
        default: bool,
    }

    /// `GET /v1/sources`.
    #[derive(ToSchema)]
    pub struct SourceList {
        /// Every configured source.
        sources: Vec<SourceSummary>,
    }

    /// One source and its counters.
    #[derive(ToSchema)]
    pub struct SourceSummary {
        /// The name in `/v1/sources/<name>`.
        name: String,
        /// `supabase`, `chatwoot` or `generic`.
        kind: String,
        /// Where it posts.
        path: String,
        /// Whether a URL token is configured.
        url_token: bool,
        /// Whether a signing secret is configured.
        signing_secret: bool,
        /// Rules for this source.
        rules: usize,
        /// Counts by outcome (`received`, `unmatched`, `duplicate`, `mapped`, `parked`, …).
        counts: BTreeMap<String, u64>,
    }

    /// `POST /v1/rules/test`: what the payload would become; nothing is stored.
    #[derive(ToSchema)]
    pub struct RulesPreview {
        /// The source.
        source: String,
        /// `events`, `unmatched`, `parked` or `retry`.
        outcome: String,
        /// Why, for every outcome but `events`.
        reason: Option<String>,
        /// With `events`: each rule's event, `data` exactly as it would be sent (hashed).
        events: Option<Vec<serde_json::Value>>,
        /// With `parked`: the rules' problems.
        problems: Option<Vec<serde_json::Value>>,
    }

    /// `GET /v1/inbox/parked`.
    #[derive(ToSchema)]
    pub struct ParkedList {
        /// Newest first, at most 500; what is wrong, never the payload.
        parked: Vec<crate::store::ParkedPayload>,
    }

    /// `POST /v1/inbox/replay`.
    #[derive(ToSchema)]
    pub struct Requeued {
        /// Parked payloads made pending again.
        requeued: u64,
    }
}

pub(super) use shapes::{
    BrowserEvent, Health, IncomingEvents, Me, ParkedList, Readiness, Requeued, RulesPreview,
    SourceList,
};
