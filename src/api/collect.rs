//! `POST /v1/collect`: events from landing pages. Public (a page cannot hold a secret), so it
//! is fenced instead: a public site key whose allowed origins must match the request's
//! `Origin` (or `Referer`), per-IP and per-site rate limits, the site's event names only, and
//! the server deciding `action_source`, IP address and user agent
//! ([`crate::domain::browser`]). Bodies may be `text/plain` (what `navigator.sendBeacon`
//! sends, no CORS preflight) or `application/json` (preflighted; answered for allowed origins
//! only).

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;

use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use serde_json::Value;

use super::{ApiError, SharedState};
use crate::delivery::now_ms;
use crate::domain::browser::{self, IpHeaders, SitePolicy};
use crate::ingest::{IngestError, Route};
use crate::sites::{SiteConfig, SitesConfig};

/// Requests between two clean-ups of the per-visitor limiters.
const CLEANUP_EVERY: u64 = 10_000;

/// Largest body a page may send.
pub const BODY_LIMIT: usize = 64 * 1024;

/// Per-site and per-IP limiters, built once from the configuration.
pub struct Limits {
    per_ip: Vec<(String, DefaultKeyedRateLimiter<IpAddr>)>,
    per_site: Vec<(String, governor::DefaultDirectRateLimiter)>,
    checks: std::sync::atomic::AtomicU64,
}

impl Limits {
    /// One pair of limiters per site.
    pub fn new(sites: &SitesConfig) -> Self {
        let quota = |n: u32| Quota::per_minute(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN));
        Self {
            per_ip: sites
                .sites
                .iter()
                .map(|s| {
                    (
                        s.key.clone(),
                        RateLimiter::keyed(quota(s.per_ip_per_minute)),
                    )
                })
                .collect(),
            per_site: sites
                .sites
                .iter()
                .map(|s| {
                    (
                        s.key.clone(),
                        RateLimiter::direct(quota(s.per_site_per_minute)),
                    )
                })
                .collect(),
            checks: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Err(seconds to wait)` when `ip` or the site is over its limit.
    fn check(&self, site: &str, ip: IpAddr) -> Result<(), u64> {
        let clock = governor::clock::DefaultClock::default();
        let wait = |not_until: governor::NotUntil<governor::clock::QuantaInstant>| {
            use governor::clock::Clock as _;
            not_until.wait_time_from(clock.now()).as_secs().max(1)
        };
        if let Some((_, limiter)) = self.per_site.iter().find(|(k, _)| k == site) {
            limiter.check().map_err(wait)?;
        }
        if let Some((_, limiter)) = self.per_ip.iter().find(|(k, _)| k == site) {
            // One entry per visitor: now and then, forget the ones whose limit has fully
            // recovered, so the map does not grow without bound.
            let n = self
                .checks
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n % CLEANUP_EVERY == CLEANUP_EVERY - 1 {
                limiter.retain_recent();
            }
            limiter.check_key(&ip).map_err(wait)?;
        }
        Ok(())
    }
}

/// `?site_key=` (lets a preflight, which has no body, name its site).
#[derive(Debug, Default, Deserialize)]
pub(super) struct CollectQuery {
    site_key: Option<String>,
}

/// An event from a page; 204 once it is durably queued.
#[utoipa::path(post, path = "/v1/collect", tag = "pages",
    params(("site_key" = Option<String>, Query, description = "The site's public key (or `site_key` in the body)")),
    request_body(description = "`text/plain` (what `navigator.sendBeacon` sends, no preflight) or `application/json`; at most 64 KiB",
        content((super::openapi::BrowserEvent = "text/plain"), (super::openapi::BrowserEvent = "application/json"))),
    responses(
        (status = 204, description = "Stored durably; CORS headers for the page's origin"),
        (status = 400, description = "Malformed JSON or not one JSON object", body = super::error::ErrorBody),
        (status = 403, description = "Unknown or missing site key, or an origin the site does not allow", body = super::error::ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = super::error::ErrorBody),
        (status = 422, description = "An event name the site does not allow, or an event Meta would refuse", body = super::error::ErrorBody),
        (status = 429, description = "Over the site's or the visitor's rate limit (`Retry-After`)", body = super::error::ErrorBody),
        (status = 503, description = "Storage unavailable; retry", body = super::error::ErrorBody),
    ))]
pub(super) async fn collect(
    State(state): State<SharedState>,
    Query(query): Query<CollectQuery>,
    request: Request,
) -> Result<Response, ApiError> {
    let timer = crate::metrics::IngestTimer::start("/v1/collect");
    let app = &state.0;
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([127, 0, 0, 1]), |c| c.0.ip());
    let headers = request.headers().clone();
    let bytes = axum::body::to_bytes(request.into_body(), BODY_LIMIT)
        .await
        .map_err(|_| {
            ApiError::PayloadTooLarge(format!("a page may send at most {BODY_LIMIT} bytes"))
        })?;
    let body: Value = serde_json::from_slice(&bytes).map_err(|err| ApiError::MalformedJson {
        line: err.line(),
        column: err.column(),
        message: "invalid JSON".to_owned(),
    })?;
    let Value::Object(body) = body else {
        return Err(ApiError::BadRequest(
            "the body must be one JSON object".to_owned(),
        ));
    };
    let key = query
        .site_key
        .or_else(|| {
            body.get("site_key")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let site = app
        .config
        .sites
        .get(&key)
        .ok_or_else(|| ApiError::Forbidden("unknown or missing site_key".to_owned()))?;
    let origin = header_str(&headers, header::ORIGIN);
    if !browser::origin_allowed(&site.origins, origin, header_str(&headers, header::REFERER)) {
        return Err(ApiError::Forbidden(
            "this page's origin is not allowed for the site key".to_owned(),
        ));
    }
    let ip = browser::client_ip(
        app.config.sites.client_ip,
        peer,
        &IpHeaders {
            forwarded_for: header_str(&headers, "x-forwarded-for"),
            cf_connecting_ip: header_str(&headers, "cf-connecting-ip"),
            cf_connecting_ipv6: header_str(&headers, "cf-connecting-ipv6"),
            real_ip: header_str(&headers, "x-real-ip"),
        },
    );
    if let Err(retry_after) = app.collect_limits.check(&site.key, ip) {
        return Err(ApiError::RateLimited(retry_after));
    }
    let policy = SitePolicy {
        events: site.events.clone(),
        defaults: site.defaults.clone(),
    };
    let event =
        browser::browser_event(&body, &policy, ip, header_str(&headers, header::USER_AGENT))
            .map_err(|problems| {
                ApiError::Invalid(
                    problems
                        .into_iter()
                        .map(|p| super::error::EventProblem {
                            event_index: 0,
                            event_id: body
                                .get("event_id")
                                .and_then(Value::as_str)
                                .map(str::to_owned),
                            field: p.field,
                            reason: p.reason,
                        })
                        .collect(),
                )
            })?;
    let route = Route::from(format!("site:{}", site.key)).to_pixel(site.pixel.as_deref());
    app.ingestor
        .ingest(event, now_ms() / 1000, &route)
        .await
        .map_err(|err| match err {
            IngestError::BadRequest(message) => ApiError::BadRequest(message),
            IngestError::TooMany(message) => ApiError::PayloadTooLarge(message),
            IngestError::Invalid(problems) => ApiError::Invalid(problems),
            IngestError::Store(err) => ApiError::from(err),
        })?;
    timer.stored();
    let mut response = StatusCode::NO_CONTENT.into_response();
    cors(response.headers_mut(), origin, site);
    Ok(response)
}

/// The CORS preflight of a JSON `POST`: allowed only for a site's origins.
#[utoipa::path(options, path = "/v1/collect", tag = "pages",
    params(("site_key" = Option<String>, Query, description = "The site's public key; else the site is found by `Origin`")),
    responses(
        (status = 204, description = "Allowed: `Access-Control-Allow-Origin`, `-Methods: POST`, `-Headers: content-type`"),
        (status = 403, description = "No site allows this origin (no body)"),
    ))]
pub(super) async fn preflight(
    State(state): State<SharedState>,
    Query(query): Query<CollectQuery>,
    headers: HeaderMap,
) -> Response {
    let sites = &state.0.config.sites;
    let origin = header_str(&headers, header::ORIGIN);
    let site = match &query.site_key {
        Some(key) => sites.get(key),
        None => sites
            .sites
            .iter()
            .find(|s| browser::origin_allowed(&s.origins, origin, None)),
    };
    let mut response = StatusCode::NO_CONTENT.into_response();
    match site.filter(|s| browser::origin_allowed(&s.origins, origin, None)) {
        Some(site) => {
            cors(response.headers_mut(), origin, site);
            let h = response.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("POST"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("content-type"),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("86400"),
            );
        }
        None => {
            *response.status_mut() = StatusCode::FORBIDDEN;
            response
                .headers_mut()
                .insert(header::VARY, HeaderValue::from_static("Origin"));
        }
    }
    response
}

fn cors(headers: &mut HeaderMap, origin: Option<&str>, site: &SiteConfig) {
    headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(origin) = origin.filter(|o| browser::origin_allowed(&site.origins, Some(o), None)) {
        if let Ok(value) = HeaderValue::from_str(origin) {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        }
    }
}

fn header_str<K: header::AsHeaderName>(headers: &HeaderMap, name: K) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The browser script (`web/capi.js`), served as it is in the repository.
pub const SCRIPT: &str = include_str!("../../web/capi.js");

/// The versioned path of the script: cached for a year, since its content never changes.
pub const VERSIONED_SCRIPT_PATH: &str = concat!("/v1/capi-", env!("CARGO_PKG_VERSION"), ".js");

/// `GET /v1/capi-<version>.js`: immutable, cached for a year.
#[utoipa::path(get, path = VERSIONED_SCRIPT_PATH, tag = "pages",
    responses(
        (status = 200, description = "`web/capi.js` of this version; immutable, cached for a year", content_type = "text/javascript"),
        (status = 304, description = "Not modified (`If-None-Match` matched the ETag)"),
    ))]
pub(super) async fn versioned_script(headers: HeaderMap) -> Response {
    let mut response = script(headers).await;
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    response
}

/// `GET /v1/capi.js`: cached for a day, revalidated by its ETag (the SHA-256 of the file),
/// and readable cross-origin so a page can pin it with Subresource Integrity.
#[utoipa::path(get, path = "/v1/capi.js", tag = "pages",
    responses(
        (status = 200, description = "`web/capi.js`; cached for a day, revalidated by its ETag, CORS `*` (for Subresource Integrity)", content_type = "text/javascript"),
        (status = 304, description = "Not modified (`If-None-Match` matched the ETag)"),
    ))]
pub(super) async fn script(headers: HeaderMap) -> Response {
    // The script is compiled in: its tag is worked out once, not per request.
    static ETAG: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        use sha2::{Digest, Sha256};
        format!(
            "\"{}\"",
            hex::encode(&Sha256::digest(SCRIPT.as_bytes())[..16])
        )
    });
    let etag = ETAG.as_str();
    let not_modified = header_str(&headers, header::IF_NONE_MATCH).is_some_and(|v| v == etag);
    let mut response = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        SCRIPT.into_response()
    };
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=86400"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    if let Ok(value) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use sha2::Digest as _;

    #[test]
    fn the_readme_documents_the_scripts_integrity_hash() {
        let digest = sha2::Sha384::digest(super::SCRIPT.as_bytes());
        let integrity = format!(
            "sha384-{}",
            base64::engine::general_purpose::STANDARD.encode(digest)
        );
        let readme = include_str!("../../README.md");
        assert!(
            readme.contains(&format!("integrity=\"{integrity}\"")),
            "README must show integrity=\"{integrity}\""
        );
    }
}
