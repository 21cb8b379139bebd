//! The operator dashboard at `/admin`: server-rendered pages (maud, no script) that show what
//! the service is doing — activity charts, queue depth, each pixel's state, Meta's latest
//! errors — and let an operator search events, replay dead and failed ones, replay parked
//! source payloads, and send a test event to Meta.
//!
//! Off unless `ADMIN_PASSWORD` or `ADMIN_PASSWORD_HASH` is set ([`settings`]). Everything but
//! the login page needs a session ([`auth`]); every POST carries the session's CSRF token.
//! Pages read the store through [`Store`] queries that never return payloads in lists; an
//! event's detail shows its payload, which holds hashed values only.

mod auth;
mod chart;
mod pages;
pub mod settings;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, Extensions, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{any, get, post};
use axum::{Extension, Form, Router};
use maud::Markup;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::api::AppState;
use crate::delivery::classify::Verdict;
use crate::delivery::now_ms;
use crate::domain::browser::{self, ClientIpSource, IpHeaders};
use crate::store::{EventQuery, ParkedPayload, ReplayFilter, StoreError, EVENT_STATES};
use auth::{LoginLimiter, Session, Sessions};
use pages::{DeadLetters, EventSearch, Overview, ParkedGroup, TestOutcome, TestRefusal};

pub use auth::hash_password;
pub use settings::{AdminPassword, AdminSettings};

/// Largest form the dashboard accepts.
const FORM_LIMIT: usize = 16 * 1024;

/// Events per page of the list.
const PAGE_SIZE: usize = 50;

/// Parked payloads grouped on the dead-letters page (the newest ones).
const PARKED_GROUPED: usize = 1000;

/// What the dashboard's handlers share.
struct Admin {
    app: AppState,
    settings: AdminSettings,
    sessions: Sessions,
    logins: LoginLimiter,
}

type Shared = Arc<Admin>;

/// The dashboard's routes, to merge into the service's router. Without an admin password
/// every `/admin` path answers 404 with a page that says how to turn the dashboard on.
pub fn router<S: Clone + Send + Sync + 'static>(app: &AppState) -> Router<S> {
    let Some(settings) = app.config.admin.clone() else {
        return Router::new()
            .route("/admin", any(disabled))
            .route("/admin/{*rest}", any(disabled))
            .layer(middleware::from_fn(security_headers));
    };
    let admin = Arc::new(Admin {
        app: app.clone(),
        sessions: Sessions::new(settings.session_ttl),
        settings,
        logins: LoginLimiter::default(),
    });
    let protected = Router::new()
        .route("/admin", get(overview))
        .route("/admin/events", get(events))
        .route("/admin/events/{event_id}", get(event_detail))
        .route("/admin/events/{event_id}/retry", post(retry_event))
        .route("/admin/dead", get(dead_letters))
        .route("/admin/dead/replay", post(replay_dead))
        .route("/admin/parked/replay", post(replay_parked))
        .route("/admin/quality", get(quality))
        .route("/admin/test", get(test_form).post(send_test))
        .route("/admin/logout", post(logout))
        .route_layer(middleware::from_fn_with_state(
            admin.clone(),
            require_session,
        ));
    Router::new()
        .merge(protected)
        .route("/admin/login", get(login_page).post(login))
        // People type the trailing slash.
        .route("/admin/", get(|| async { Redirect::permanent("/admin") }))
        .layer(DefaultBodyLimit::max(FORM_LIMIT))
        .layer(middleware::from_fn(security_headers))
        .with_state(admin)
}

/// Every dashboard response: no caching, no framing, no sniffing, no referrer, and a
/// content security policy that allows the inline stylesheet and nothing else.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    if let Ok(policy) = HeaderValue::from_str(&pages::CONTENT_SECURITY_POLICY) {
        headers.insert(header::CONTENT_SECURITY_POLICY, policy);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

async fn disabled() -> Response {
    (StatusCode::NOT_FOUND, pages::disabled()).into_response()
}

/// The dashboard's errors, each a page.
#[derive(Debug, thiserror::Error)]
enum AdminError {
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("not found: {0}")]
    NotFound(String),
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        match self {
            AdminError::Store(err) => {
                tracing::error!(error = %err, "the dashboard could not read or write storage");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    pages::error(
                        "Storage is unavailable",
                        "The database could not be reached or answered with an error; the service's log has the details. Try again in a moment.",
                    ),
                )
                    .into_response()
            }
            AdminError::NotFound(what) => {
                (StatusCode::NOT_FOUND, pages::error("Not found", &what)).into_response()
            }
        }
    }
}

/// Whether this request reached us over HTTPS, so the cookie may be marked `Secure`: always
/// when the service serves TLS itself (`TLS_CERT_FILE`) or `ADMIN_COOKIE_SECURE` says so, else
/// when a proxy the configuration declares (`CLIENT_IP_SOURCE` other than `socket`) says
/// `X-Forwarded-Proto: https`.
fn over_https(admin: &Admin, headers: &HeaderMap) -> bool {
    if admin.settings.cookie_secure || admin.app.config.tls.is_some() {
        return true;
    }
    let behind_proxy = admin.app.config.sites.client_ip != ClientIpSource::Socket;
    behind_proxy
        && headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"))
}

/// Lets a request through only with a live session, and a POST only with its CSRF token:
/// pages redirect to the login form, POSTs without a session get 401, with a missing or
/// wrong token 403. The session is handed to the handler.
async fn require_session(State(admin): State<Shared>, request: Request, next: Next) -> Response {
    let session = auth::session_id(request.headers()).and_then(|id| admin.sessions.get(id));
    let Some(session) = session else {
        return if matches!(*request.method(), Method::GET | Method::HEAD) {
            Redirect::to("/admin/login").into_response()
        } else {
            (
                StatusCode::UNAUTHORIZED,
                pages::error(
                    "Not logged in",
                    "Your session has ended or never began. Log in and try again.",
                ),
            )
                .into_response()
        };
    };
    let mut request = if request.method() == Method::POST {
        let (parts, body) = request.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, FORM_LIMIT).await else {
            return StatusCode::PAYLOAD_TOO_LARGE.into_response();
        };
        let presented = url::form_urlencoded::parse(&bytes)
            .find(|(name, _)| name == "csrf")
            .map(|(_, value)| value.into_owned());
        if !presented.is_some_and(|token| auth::csrf_matches(&session, &token)) {
            tracing::warn!("dashboard form refused: missing or wrong CSRF token");
            return (
                StatusCode::FORBIDDEN,
                pages::error(
                    "Form refused",
                    "The form's security token is missing or does not belong to your session. Reload the page and try again.",
                ),
            )
                .into_response();
        }
        Request::from_parts(parts, Body::from(bytes))
    } else {
        request
    };
    request.extensions_mut().insert(session);
    next.run(request).await
}

async fn login_page(State(admin): State<Shared>, headers: HeaderMap) -> Response {
    if auth::session_id(&headers).is_some_and(|id| admin.sessions.get(id).is_some()) {
        return Redirect::to("/admin").into_response();
    }
    pages::login(None).into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    password: String,
}

async fn login(
    State(admin): State<Shared>,
    headers: HeaderMap,
    extensions: Extensions,
    Form(form): Form<LoginForm>,
) -> Response {
    let peer = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([127, 0, 0, 1]), |c| c.0.ip());
    let header_str = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let ip = browser::client_ip(
        admin.app.config.sites.client_ip,
        peer,
        &IpHeaders {
            forwarded_for: header_str("x-forwarded-for"),
            cf_connecting_ip: header_str("cf-connecting-ip"),
            cf_connecting_ipv6: header_str("cf-connecting-ipv6"),
            real_ip: header_str("x-real-ip"),
        },
    );
    if let Err(wait) = admin.logins.check(ip) {
        let mut response = (
            StatusCode::TOO_MANY_REQUESTS,
            pages::login(Some(&format!(
                "Too many attempts from your address. Wait {wait} seconds and try again."
            ))),
        )
            .into_response();
        if let Ok(value) = HeaderValue::from_str(&wait.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        return response;
    }
    if !auth::password_matches(&admin.settings.password, form.password).await {
        // Neither the address nor what was typed: both would be personal data or a secret.
        tracing::warn!("dashboard login failed: wrong password");
        return (
            StatusCode::UNAUTHORIZED,
            pages::login(Some("That is not the admin password.")),
        )
            .into_response();
    }
    let id = admin.sessions.create();
    let mut response = Redirect::to("/admin").into_response();
    if let Some(cookie) =
        auth::session_cookie(&id, admin.sessions.ttl(), over_https(&admin, &headers))
    {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    tracing::info!("dashboard login");
    response
}

async fn logout(State(admin): State<Shared>, headers: HeaderMap) -> Response {
    if let Some(id) = auth::session_id(&headers) {
        admin.sessions.end(id);
    }
    let mut response = Redirect::to("/admin/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        auth::cleared_cookie(over_https(&admin, &headers)),
    );
    response
}

/// The start of the bucket holding `now`, `count - 1` buckets back: the chart's last bar is
/// the bucket now running.
fn first_bucket(now: i64, bucket_ms: i64, count: i64) -> i64 {
    (now.div_euclid(bucket_ms) - (count - 1)) * bucket_ms
}

async fn overview(
    State(admin): State<Shared>,
    Extension(session): Extension<Session>,
) -> Result<Markup, AdminError> {
    const FIVE_MINUTES: i64 = 5 * 60 * 1000;
    const HOUR: i64 = 60 * 60 * 1000;
    let store = &admin.app.store;
    let now = now_ms();
    let stats = store.stats().await?;
    let hour = store
        .activity(first_bucket(now, FIVE_MINUTES, 12), FIVE_MINUTES, 12)
        .await?;
    let day = store
        .activity(first_bucket(now, HOUR, 24), HOUR, 24)
        .await?;
    let errors = store.recent_errors(10).await?;
    let data = Overview {
        now,
        stats,
        pixels: admin.app.delivery.iter().map(|d| d.status()).collect(),
        dry_run: admin.app.config.dry_run(),
        hour,
        day,
        errors,
    };
    Ok(pages::overview(&data, &session.csrf))
}

/// A `datetime-local` value (`2026-11-27T16:40`, seconds optional), read as UTC.
fn parse_utc(raw: &str) -> Option<i64> {
    ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"]
        .iter()
        .find_map(|format| chrono::NaiveDateTime::parse_from_str(raw.trim(), format).ok())
        .map(|t| t.and_utc().timestamp_millis())
}

/// The store query a search asks for, or what is wrong with it.
fn event_query(search: &EventSearch) -> Result<EventQuery, String> {
    let text = |value: &str| Some(value.trim().to_owned()).filter(|v| !v.is_empty());
    let time = |value: &str, label: &str| match text(value) {
        None => Ok(None),
        Some(raw) => parse_utc(&raw)
            .map(Some)
            .ok_or_else(|| format!("{label} must be a date and time such as 2026-11-27T16:40")),
    };
    let state = text(&search.state);
    if let Some(state) = &state {
        if !EVENT_STATES.contains(&state.as_str()) {
            return Err(format!("State must be one of {}", EVENT_STATES.join(", ")));
        }
    }
    Ok(EventQuery {
        event_id: text(&search.event_id),
        event_name: text(&search.event_name),
        source: text(&search.source),
        state,
        received_from: time(&search.from, "Received from")?,
        received_until: time(&search.to, "Received before")?,
        before_row: text(&search.before).and_then(|b| b.parse().ok()),
        // One more than a page tells whether an older page exists.
        limit: PAGE_SIZE + 1,
    })
}

async fn events(
    State(admin): State<Shared>,
    Extension(session): Extension<Session>,
    Query(search): Query<EventSearch>,
) -> Result<Markup, AdminError> {
    let (rows, problem) = match event_query(&search) {
        Ok(query) => (admin.app.store.list_events(&query, now_ms()).await?, None),
        Err(problem) => (Vec::new(), Some(problem)),
    };
    let older = (rows.len() > PAGE_SIZE)
        .then(|| rows.get(PAGE_SIZE - 1).map(|r| r.row_id))
        .flatten();
    let shown = &rows[..rows.len().min(PAGE_SIZE)];
    Ok(pages::events(
        &search,
        problem.as_deref(),
        shown,
        older,
        &session.csrf,
    ))
}

#[derive(Deserialize)]
struct Notice {
    retried: Option<u64>,
    replayed: Option<u64>,
}

async fn event_detail(
    State(admin): State<Shared>,
    Extension(session): Extension<Session>,
    Path(event_id): Path<String>,
    Query(notice): Query<Notice>,
) -> Result<Markup, AdminError> {
    let detail = admin
        .app
        .store
        .find_event(&event_id, now_ms())
        .await?
        .ok_or_else(|| {
            AdminError::NotFound(format!("No event with the id {event_id} is stored."))
        })?;
    let message = notice.retried.map(|n| match n {
        0 => "Nothing to retry: the event is no longer dead or waiting to retry.".to_owned(),
        _ => "Queued again: it is sent within moments.".to_owned(),
    });
    Ok(pages::event(&detail, message.as_deref(), &session.csrf))
}

/// Replays a dead event, or makes a failed one (waiting for its next retry) due now.
async fn retry_event(
    State(admin): State<Shared>,
    Path(event_id): Path<String>,
) -> Result<Response, AdminError> {
    let store = &admin.app.store;
    let now = now_ms();
    let state = store
        .find_event(&event_id, now)
        .await?
        .map(|detail| detail.state)
        .ok_or_else(|| {
            AdminError::NotFound(format!("No event with the id {event_id} is stored."))
        })?;
    let n = match state.as_str() {
        "dead" => {
            let filter = ReplayFilter {
                event_ids: vec![event_id.clone()],
                ..ReplayFilter::default()
            };
            store.requeue_dead(&filter, now).await?
        }
        "failed" => store.retry_now(&event_id, now).await?,
        _ => 0,
    };
    if n > 0 {
        admin.app.ingestor.wake_delivery();
        tracing::info!(requeued = n, "dashboard: event queued again");
    }
    Ok(Redirect::to(&format!("{}?retried={n}", pages::event_href(&event_id))).into_response())
}

/// Groups parked payloads by source and problems, the largest groups first.
fn group_parked(parked: Vec<ParkedPayload>) -> Vec<ParkedGroup> {
    let mut groups: BTreeMap<String, ParkedGroup> = BTreeMap::new();
    for payload in parked {
        let mut problems: Vec<String> = match &payload.problems {
            serde_json::Value::Array(items) => items.iter().map(describe_problem).collect(),
            serde_json::Value::Null => Vec::new(),
            other => vec![describe_problem(other)],
        };
        problems.sort();
        problems.dedup();
        let key = hex::encode(
            &Sha256::digest(format!("{}\n{}", payload.source, problems.join("\n")).as_bytes())
                [..12],
        );
        let group = groups.entry(key.clone()).or_insert_with(|| ParkedGroup {
            key,
            source: payload.source.clone(),
            problems,
            count: 0,
            last_at: payload.parked_at,
            ids: Vec::new(),
        });
        group.count += 1;
        group.last_at = group.last_at.max(payload.parked_at);
        group.ids.push(payload.id);
    }
    let mut groups: Vec<ParkedGroup> = groups.into_values().collect();
    groups.sort_by(|a, b| b.count.cmp(&a.count).then(b.last_at.cmp(&a.last_at)));
    groups
}

/// One recorded problem (`{rule?, field, reason}`) in words.
fn describe_problem(problem: &serde_json::Value) -> String {
    let part = |key: &str| {
        problem
            .get(key)
            .and_then(serde_json::Value::as_str)
            .filter(|s| !s.is_empty())
    };
    match (part("rule"), part("field"), part("reason")) {
        (rule, field, Some(reason)) => [rule, field, Some(reason)]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(": "),
        _ => problem.to_string(),
    }
}

async fn dead_letters(
    State(admin): State<Shared>,
    Extension(session): Extension<Session>,
    Query(notice): Query<Notice>,
) -> Result<Markup, AdminError> {
    let store = &admin.app.store;
    let dead = store.dead_reasons(100).await?;
    let parked = store.parked_payloads(PARKED_GROUPED).await?;
    let parked_truncated = parked.len() >= PARKED_GROUPED;
    let data = DeadLetters {
        dead,
        parked: group_parked(parked),
        parked_truncated,
    };
    let message = notice
        .replayed
        .map(|n| format!("{n} queued again; they are processed within moments."));
    Ok(pages::dead_letters(
        &data,
        message.as_deref(),
        &session.csrf,
    ))
}

#[derive(Deserialize)]
struct ReasonForm {
    #[serde(default)]
    reason: String,
}

async fn replay_dead(
    State(admin): State<Shared>,
    Form(form): Form<ReasonForm>,
) -> Result<Response, AdminError> {
    let filter = ReplayFilter {
        reason: Some(form.reason),
        ..ReplayFilter::default()
    };
    let n = admin.app.store.requeue_dead(&filter, now_ms()).await?;
    if n > 0 {
        admin.app.ingestor.wake_delivery();
        tracing::info!(requeued = n, "dashboard: dead events replayed");
    }
    Ok(Redirect::to(&format!("/admin/dead?replayed={n}")).into_response())
}

#[derive(Deserialize)]
struct GroupForm {
    #[serde(default)]
    group: String,
}

async fn replay_parked(
    State(admin): State<Shared>,
    Form(form): Form<GroupForm>,
) -> Result<Response, AdminError> {
    let store = &admin.app.store;
    let now = now_ms();
    let n = if form.group == "all" {
        store.requeue_invalid_inbox(now).await?
    } else {
        let groups = group_parked(store.parked_payloads(PARKED_GROUPED).await?);
        match groups.into_iter().find(|g| g.key == form.group) {
            Some(group) => store.requeue_parked(&group.ids, now).await?,
            None => 0,
        }
    };
    if n > 0 {
        admin.app.inbox_wake.notify_one();
        tracing::info!(requeued = n, "dashboard: parked payloads replayed");
    }
    Ok(Redirect::to(&format!("/admin/dead?replayed={n}")).into_response())
}

#[derive(Deserialize)]
struct QualityQuery {
    days: Option<u32>,
}

async fn quality(
    State(admin): State<Shared>,
    Extension(session): Extension<Session>,
    Query(query): Query<QualityQuery>,
) -> Result<Markup, AdminError> {
    const DAY_MS: i64 = 24 * 60 * 60 * 1000;
    let days = query
        .days
        .filter(|d| pages::QUALITY_PERIODS.iter().any(|(n, _)| n == d))
        .unwrap_or(7);
    let clients: Vec<crate::delivery::GraphClient> = admin
        .app
        .delivery
        .iter()
        .map(|d| d.client().clone())
        .collect();
    let report = crate::quality::report(
        admin.app.store.as_ref(),
        now_ms() - i64::from(days - 1) * DAY_MS,
        &admin.app.meta_quality,
        &clients,
    )
    .await?;
    Ok(pages::quality(&report, days, &session.csrf))
}

/// The delivering pixels: `(name, id)`.
fn pixel_choices(admin: &Admin) -> Vec<(String, String)> {
    admin
        .app
        .delivery
        .iter()
        .map(|d| {
            let client = d.client();
            (client.pixel_name().to_owned(), client.pixel_id().to_owned())
        })
        .collect()
}

/// The default pixel's configured test event code, to prefill the form.
fn default_test_code(admin: &Admin) -> String {
    admin
        .app
        .config
        .pixels
        .default_pixel()
        .and_then(|p| p.test_event_code.clone())
        .unwrap_or_default()
}

async fn test_form(State(admin): State<Shared>, Extension(session): Extension<Session>) -> Markup {
    pages::test_event(
        &pixel_choices(&admin),
        &default_test_code(&admin),
        None,
        None,
        &session.csrf,
    )
}

#[derive(Deserialize)]
struct TestForm {
    #[serde(default)]
    pixel: String,
    #[serde(default)]
    event_name: String,
    #[serde(default)]
    test_event_code: String,
}

/// Sends one test event straight to the chosen pixel with the test event code, through the
/// same client and rules as delivery, and shows Meta's answer. Nothing is stored.
async fn send_test(
    State(admin): State<Shared>,
    Extension(session): Extension<Session>,
    Form(form): Form<TestForm>,
) -> Response {
    let pixels = pixel_choices(&admin);
    let page = |outcome: Option<&TestOutcome>, problem: Option<&str>| {
        pages::test_event(
            &pixels,
            &form.test_event_code,
            outcome,
            problem,
            &session.csrf,
        )
    };
    let code = form.test_event_code.trim();
    let valid_code = !code.is_empty()
        && code.len() <= 64
        && code
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid_code {
        let problem = "The test event code is the one Events Manager shows under Test events (letters and digits, such as TEST12345).";
        return (StatusCode::UNPROCESSABLE_ENTITY, page(None, Some(problem))).into_response();
    }
    if !pages::TEST_EVENT_NAMES.contains(&form.event_name.as_str()) {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            page(None, Some("Choose one of the listed event names.")),
        )
            .into_response();
    }
    let Some(delivery) = admin
        .app
        .delivery
        .iter()
        .find(|d| d.client().pixel_id() == form.pixel)
    else {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            page(None, Some("No such pixel is configured.")),
        )
            .into_response();
    };
    let now_secs = now_ms() / 1000;
    // A made-up person (a fixed external id, hashed by the normalizer): enough customer
    // information for Meta to accept the event, and nobody's personal data.
    let event = serde_json::json!({
        "event_name": form.event_name,
        "event_id": format!("admin-test-{}", uuid::Uuid::now_v7()),
        "event_time": now_secs,
        "action_source": "other",
        "external_id": "capi-bridge-dashboard-test",
        "custom_data": {"currency": "USD", "value": 1.0},
    });
    let payload = match crate::ingest::preview(&admin.app.config.ingest, event, now_secs) {
        Ok((events, _warnings)) => match events.into_iter().next() {
            Some(event) => event.payload.to_string(),
            None => {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    page(None, Some("The test event could not be built.")),
                )
                    .into_response()
            }
        },
        Err(err) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                page(
                    None,
                    Some(&format!("The test event could not be built: {err}")),
                ),
            )
                .into_response()
        }
    };
    let verdict = delivery
        .client()
        .send_events([payload.as_str()], 1, Some(code))
        .await;
    let answer = match verdict {
        Verdict::Delivered { fbtrace_id } => Ok(fbtrace_id),
        Verdict::Retry { error, .. } | Verdict::Rejected { error } | Verdict::Pause { error } => {
            Err(TestRefusal {
                code: match (error.code, error.subcode, error.http_status) {
                    (Some(code), Some(sub), _) => format!("{code}/{sub}"),
                    (Some(code), None, _) => code.to_string(),
                    (None, _, Some(status)) => format!("HTTP {status}"),
                    (None, _, None) => String::new(),
                },
                message: match error.user_title {
                    Some(title) => format!("{title}: {}", error.message),
                    None => error.message,
                },
                fbtrace_id: error.fbtrace_id,
            })
        }
    };
    tracing::info!(
        pixel_id = %form.pixel,
        received = answer.is_ok(),
        "dashboard: test event sent"
    );
    let outcome = TestOutcome {
        pixel_id: form.pixel.clone(),
        event_name: form.event_name.clone(),
        test_event_code: code.to_owned(),
        answer,
        payload: serde_json::from_str::<serde_json::Value>(&payload)
            .and_then(|v| serde_json::to_string_pretty(&v))
            .unwrap_or(payload),
    };
    page(Some(&outcome), None).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_bucket_is_the_one_now_running() {
        let five = 300_000;
        let now = 1_790_000_123_456;
        let first = first_bucket(now, five, 12);
        assert_eq!(first % five, 0);
        assert!(first + 11 * five <= now && now < first + 12 * five);
    }

    #[test]
    fn searches_become_store_queries_or_say_what_is_wrong() {
        let search = EventSearch {
            event_id: " ev-1 ".to_owned(),
            state: "dead".to_owned(),
            from: "2026-11-27T16:40".to_owned(),
            before: "120".to_owned(),
            ..EventSearch::default()
        };
        let query = event_query(&search).expect("valid");
        assert_eq!(query.event_id.as_deref(), Some("ev-1"));
        assert_eq!(query.event_name, None);
        assert_eq!(query.state.as_deref(), Some("dead"));
        assert_eq!(query.received_from, Some(1_795_797_600_000));
        assert_eq!(query.before_row, Some(120));
        assert_eq!(query.limit, PAGE_SIZE + 1);

        let bad_state = EventSearch {
            state: "lost".to_owned(),
            ..EventSearch::default()
        };
        assert!(event_query(&bad_state).is_err_and(|e| e.contains("State")));
        let bad_time = EventSearch {
            to: "yesterday".to_owned(),
            ..EventSearch::default()
        };
        assert!(event_query(&bad_time).is_err_and(|e| e.contains("Received before")));
    }

    #[test]
    fn parked_payloads_are_grouped_by_source_and_problems() {
        let parked = |id: i64, source: &str, problems: serde_json::Value| ParkedPayload {
            id,
            source: source.to_owned(),
            problems,
            received_at: id,
            parked_at: id * 10,
        };
        let missing_email =
            serde_json::json!([{"rule": "lead", "field": "fields.email", "reason": "no such key"}]);
        let groups = group_parked(vec![
            parked(1, "crm", missing_email.clone()),
            parked(2, "crm", missing_email.clone()),
            parked(3, "chatwoot", missing_email),
            parked(
                4,
                "crm",
                serde_json::json!([{"field": "event_time", "reason": "too old"}]),
            ),
        ]);
        assert_eq!(groups.len(), 3);
        assert_eq!(groups[0].source, "crm");
        assert_eq!(groups[0].count, 2);
        assert_eq!(groups[0].ids, [1, 2]);
        assert_eq!(groups[0].last_at, 20);
        assert_eq!(groups[0].problems, ["lead: fields.email: no such key"]);
        assert_ne!(groups[0].key, groups[1].key);
        assert!(groups.iter().any(|g| g.problems == ["event_time: too old"]));
    }
}
