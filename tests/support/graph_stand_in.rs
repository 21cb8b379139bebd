//! A real HTTP server standing in for Meta's Graph API, following `meta-capi.md`: it checks the
//! token (190), the pixel (100/33), each event's age (100/2804003), Purchase value/currency
//! (100/2804009), that customer information is present and hashed (100/2804050), and rejects
//! the whole batch when any event is bad (§1.9). Tests can script answers, poison event ids, add
//! latency and inject random faults (transient 500s and throttling, from a seeded generator).
//! Shared by the integration tests and the load benchmark.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::Notify;

/// One scripted answer, used instead of the normal checks for the next request.
#[derive(Debug, Clone)]
pub enum Scripted {
    /// Behave normally for this request (to script a later one).
    Normal,
    /// An HTTP status with a raw body.
    Raw(u16, String),
    /// Meta's rate-limit error (code 4) with a `Retry-After` header.
    RateLimited {
        /// `Retry-After` in seconds.
        retry_after_secs: u64,
    },
    /// A Graph error envelope with this code (and subcode).
    GraphError {
        /// HTTP status.
        status: u16,
        /// `code`.
        code: i64,
        /// `error_subcode`.
        subcode: Option<i64>,
    },
}

/// Random faults for every request that is not scripted, as in a Graph API storm: a share of
/// the requests is answered 500 with code 1 or 2 (transient) and a share is throttled (HTTP 400
/// with code 4, 17 or 80004/2446079, `meta-capi.md` §4.3), before any check of the events, so
/// nothing in a failed request is accepted. The draws come from a generator seeded with `seed`:
/// the n-th request meets the same fault in every run.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// Share of requests answered 500 (0 to 1).
    pub server_errors: f64,
    /// Share of requests throttled (0 to 1).
    pub throttling: f64,
    /// Seed of the generator.
    pub seed: u64,
}

/// Faults injected so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Requests answered 500.
    pub server_errors: usize,
    /// Requests throttled.
    pub throttled: usize,
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Path (`/v25.0/123/events`).
    pub path: String,
    /// Query string, if any (must never hold the token).
    pub query: Option<String>,
    /// Parsed body.
    pub body: Value,
    /// What the stand-in answered.
    pub status: u16,
    /// When it arrived.
    pub at: std::time::Instant,
}

#[derive(Default)]
struct Inner {
    valid_token: String,
    pixel_id: String,
    /// Further pixels (datasets) and the token each accepts.
    other_pixels: std::collections::BTreeMap<String, String>,
    scripted: VecDeque<Scripted>,
    poison_event_ids: Vec<String>,
    latency: Duration,
    faults: Option<(Faults, StdRng)>,
    fault_counts: FaultCounts,
    requests: Vec<Received>,
    /// Events Meta accepted, in order (duplicates included: Meta would dedup them).
    accepted: Vec<Value>,
    /// The token lacks the Dataset Quality API's permissions (`ads_read` …): code 10.
    dataset_quality_denied: bool,
    /// Dataset Quality API requests (path and query) as received.
    dataset_quality_requests: Vec<Received>,
}

/// Handle to a running stand-in.
#[derive(Clone)]
pub struct GraphStandIn {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    inner: Arc<Mutex<Inner>>,
    changed: Arc<Notify>,
}

type Shared = (Arc<Mutex<Inner>>, Arc<Notify>);

impl Inner {
    /// The token `pixel` accepts, if the pixel exists.
    fn token_for(&self, pixel: &str) -> Option<&str> {
        if pixel == self.pixel_id {
            Some(&self.valid_token)
        } else {
            self.other_pixels.get(pixel).map(String::as_str)
        }
    }

    /// Meta checks the token first: an unknown pixel with a valid token is "does not exist".
    fn token_valid(&self, pixel: &str, presented: Option<&str>) -> bool {
        presented.is_some() && presented == Some(self.token_for(pixel).unwrap_or(&self.valid_token))
    }
}

impl GraphStandIn {
    /// Starts a stand-in that accepts `token` for `pixel_id`.
    pub async fn start(token: &str, pixel_id: &str) -> Self {
        let inner = Arc::new(Mutex::new(Inner {
            valid_token: token.to_owned(),
            pixel_id: pixel_id.to_owned(),
            ..Inner::default()
        }));
        let changed = Arc::new(Notify::new());
        let router = Router::new()
            .route("/{version}/{pixel}/events", post(events))
            .route("/{version}/dataset_quality", get(dataset_quality))
            .route("/{version}/{pixel}", get(pixel))
            .with_state((inner.clone(), changed.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the stand-in");
        let addr: SocketAddr = listener.local_addr().expect("local addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self {
            url: format!("http://{addr}"),
            inner,
            changed,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers the next requests with these, in order, before normal behaviour resumes.
    pub fn script(&self, answers: impl IntoIterator<Item = Scripted>) {
        self.lock().scripted.extend(answers);
    }

    /// Meta will refuse (100/2804050) any batch holding one of these event ids.
    pub fn poison(&self, event_id: &str) {
        self.lock().poison_event_ids.push(event_id.to_owned());
    }

    /// Meta accepts every event id again (the user fixed the cause).
    pub fn clear_poison(&self) {
        self.lock().poison_event_ids.clear();
    }

    /// Also accepts events for `pixel_id` with `token` (another dataset, maybe another
    /// business's token), or changes the token an added pixel accepts.
    pub fn add_pixel(&self, pixel_id: &str, token: &str) {
        self.lock()
            .other_pixels
            .insert(pixel_id.to_owned(), token.to_owned());
    }

    /// Changes the token the stand-in accepts (a user fixing their credentials).
    pub fn set_valid_token(&self, token: &str) {
        self.lock().valid_token = token.to_owned();
    }

    /// The token loses (or regains) the permissions the Dataset Quality API needs.
    pub fn deny_dataset_quality(&self, denied: bool) {
        self.lock().dataset_quality_denied = denied;
    }

    /// Every Dataset Quality API request so far.
    pub fn dataset_quality_requests(&self) -> Vec<Received> {
        self.lock().dataset_quality_requests.clone()
    }

    /// Injects random faults into every later request that is not scripted (see [`Faults`]).
    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = Some((faults, StdRng::seed_from_u64(faults.seed)));
    }

    /// Stops injecting faults.
    pub fn clear_faults(&self) {
        self.lock().faults = None;
    }

    /// How many faults were injected so far.
    pub fn fault_counts(&self) -> FaultCounts {
        self.lock().fault_counts
    }

    /// Adds latency to every answer.
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Received> {
        self.lock().requests.clone()
    }

    /// Number of requests so far.
    pub fn request_count(&self) -> usize {
        self.lock().requests.len()
    }

    /// Every event accepted so far.
    pub fn accepted(&self) -> Vec<Value> {
        self.lock().accepted.clone()
    }

    /// Number of events accepted so far.
    pub fn accepted_count(&self) -> usize {
        self.lock().accepted.len()
    }

    /// Waits until `condition` holds on the stand-in's state, or panics after `timeout`.
    /// Wakes on every request: no polling sleeps.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        condition: impl Fn(&GraphStandIn) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if condition(self) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "timed out after {timeout:?} waiting for {what}: {} requests, {} events accepted",
                    self.request_count(),
                    self.accepted_count()
                );
            }
        }
    }

    /// Waits until at least `n` events were accepted.
    pub async fn wait_for_accepted(&self, n: usize, timeout: Duration) -> Vec<Value> {
        self.wait_until(timeout, &format!("{n} accepted events"), |g| {
            g.accepted_count() >= n
        })
        .await;
        self.accepted()
    }
}

fn graph_error(status: u16, code: i64, subcode: Option<i64>, title: &str, msg: &str) -> Response {
    let mut error = json!({
        "message": if code == 100 { "Invalid parameter" } else { msg },
        "type": "OAuthException",
        "code": code,
        "is_transient": false,
        "error_user_title": title,
        "error_user_msg": msg,
        "fbtrace_id": "StandInTrace",
    });
    if let Some(sub) = subcode {
        error["error_subcode"] = json!(sub);
    }
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        Json(json!({ "error": error })),
    )
        .into_response()
}

/// A fault for this request, if the generator draws one.
fn injected_fault(state: &mut Inner) -> Option<Response> {
    let (faults, rng) = state.faults.as_mut()?;
    let draw: f64 = rng.gen();
    let variant: u8 = rng.gen_range(0..3);
    let response = if draw < faults.server_errors {
        state.fault_counts.server_errors += 1;
        let (code, msg) = if variant == 0 {
            (1, "An unknown error occurred")
        } else {
            (
                2,
                "An unexpected error has occurred. Please retry your request later.",
            )
        };
        let body = json!({"error": {
            "message": msg,
            "type": "OAuthException",
            "code": code,
            "is_transient": true,
            "fbtrace_id": "StandInTrace",
        }});
        (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
    } else if draw < faults.server_errors + faults.throttling {
        state.fault_counts.throttled += 1;
        match variant {
            0 => graph_error(400, 4, None, "", "Application request limit reached"),
            1 => graph_error(400, 17, None, "", "User request limit reached"),
            _ => graph_error(
                400,
                80004,
                Some(2446079),
                "",
                "There have been too many calls to this ad-account. Wait a bit and try again.",
            ),
        }
    } else {
        return None;
    };
    Some(response)
}

fn is_sha256_hex(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        let hash = s.split('.').next().unwrap_or("");
        hash.len() == 64
            && hash
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    })
}

/// Meta's per-event checks; `Some(answer)` refuses the whole batch.
fn check_event(event: &Value, now: i64, poison: &[String]) -> Option<Response> {
    let event_id = event["event_id"].as_str().unwrap_or("");
    if poison.iter().any(|p| p == event_id) {
        return Some(graph_error(
            400,
            100,
            Some(2804050),
            "Customer information parameters",
            "This event has insufficient customer information.",
        ));
    }
    let event_time = event["event_time"].as_i64().unwrap_or(0);
    if now - event_time > 7 * 24 * 3600 {
        return Some(graph_error(
            400,
            100,
            Some(2804003),
            "Event Timestamp Too Old",
            "The timestamp for this event is too far in the past.",
        ));
    }
    if event["event_name"] == "Purchase"
        && (event["custom_data"]["value"].is_null() || event["custom_data"]["currency"].is_null())
    {
        return Some(graph_error(
            400,
            100,
            Some(2804009),
            "Missing Value for Purchase Event",
            "Your purchase event doesn't include a value parameter.",
        ));
    }
    let user_data = event["user_data"].as_object()?;
    if user_data.is_empty() {
        return Some(graph_error(
            400,
            100,
            Some(2804050),
            "Customer information parameters",
            "This event has insufficient customer information.",
        ));
    }
    // Meta rejects unhashed contact information (meta-capi.md §2.1).
    for key in [
        "em",
        "ph",
        "fn",
        "ln",
        "ct",
        "st",
        "zp",
        "country",
        "db",
        "ge",
        "external_id",
    ] {
        if let Some(values) = user_data.get(key) {
            let all_hashed = match values {
                Value::Array(items) => items.iter().all(is_sha256_hex),
                single => is_sha256_hex(single),
            };
            if !all_hashed {
                return Some(graph_error(
                    400,
                    100,
                    None,
                    "Unhashed customer information",
                    "Customer information must be hashed with SHA-256.",
                ));
            }
        }
    }
    None
}

async fn events(
    State((inner, changed)): State<Shared>,
    Path((_version, pixel)): Path<(String, String)>,
    uri: axum::http::Uri,
    body: Bytes,
) -> Response {
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (latency, response, accepted) = {
        let mut state = inner.lock().unwrap_or_else(|e| e.into_inner());
        let latency = state.latency;
        let data = parsed["data"].as_array().cloned().unwrap_or_default();
        let now = chrono::Utc::now().timestamp();
        let scripted = match state.scripted.pop_front() {
            Some(Scripted::Normal) | None => None,
            Some(other) => Some(other),
        };
        let fault = if scripted.is_none() {
            injected_fault(&mut state)
        } else {
            None
        };
        let (response, accepted): (Response, Vec<Value>) = if let Some(fault) = fault {
            (fault, Vec::new())
        } else if let Some(s) = scripted {
            let response = match s {
                Scripted::Normal => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                Scripted::Raw(status, body) => (
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    body,
                )
                    .into_response(),
                Scripted::GraphError {
                    status,
                    code,
                    subcode,
                } => graph_error(status, code, subcode, "Scripted", "scripted error"),
                Scripted::RateLimited { retry_after_secs } => {
                    let mut response =
                        graph_error(400, 4, None, "", "Application request limit reached");
                    if let Ok(value) = retry_after_secs.to_string().parse() {
                        response.headers_mut().insert("retry-after", value);
                    }
                    response
                }
            };
            (response, Vec::new())
        } else if !state.token_valid(&pixel, parsed["access_token"].as_str()) {
            (
                graph_error(
                    400,
                    190,
                    Some(463),
                    "Session expired",
                    "Error validating access token.",
                ),
                Vec::new(),
            )
        } else if state.token_for(&pixel).is_none() {
            (
                graph_error(
                    400,
                    100,
                    Some(33),
                    "",
                    "Unsupported post request. Object does not exist.",
                ),
                Vec::new(),
            )
        } else if data.is_empty() || data.len() > 1000 {
            (
                graph_error(400, 100, None, "", "data must hold 1 to 1000 events"),
                Vec::new(),
            )
        } else if let Some(refusal) = data
            .iter()
            .find_map(|e| check_event(e, now, &state.poison_event_ids))
        {
            (refusal, Vec::new())
        } else {
            let n = data.len();
            (
                Json(json!({ "events_received": n, "messages": [], "fbtrace_id": "StandInOk" }))
                    .into_response(),
                data,
            )
        };
        let status = response.status().as_u16();
        state.requests.push(Received {
            path: uri.path().to_owned(),
            query: uri.query().map(str::to_owned),
            body: parsed,
            status,
            at: std::time::Instant::now(),
        });
        (latency, response, accepted)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    // Count events as received once the answer is about to go out.
    inner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .accepted
        .extend(accepted);
    changed.notify_waiters();
    response
}

async fn pixel(
    State((inner, _)): State<Shared>,
    Path((_version, pixel)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let state = inner.lock().unwrap_or_else(|e| e.into_inner());
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !state.token_valid(&pixel, presented) {
        return graph_error(400, 190, None, "", "Invalid OAuth access token.");
    }
    if state.token_for(&pixel).is_none() {
        return graph_error(400, 100, Some(33), "", "Object does not exist.");
    }
    Json(json!({ "id": pixel, "name": "Stand-in pixel" })).into_response()
}

/// Meta's identifiers in `match_key_feedback` and the `user_data` keys they stand for.
const DATASET_QUALITY_KEYS: [(&str, &str); 7] = [
    ("email", "em"),
    ("phone", "ph"),
    ("external_id", "external_id"),
    ("ip_address", "client_ip_address"),
    ("user_agent", "client_user_agent"),
    ("fbc", "fbc"),
    ("fbp", "fbp"),
];

/// `GET /{version}/dataset_quality?dataset_id=…&agent_name=…&fields=web{event_match_quality,
/// event_name}` (`meta-capi.md` §9): the token in the `Authorization` header, permission
/// checked, then per event name of the events accepted so far `composite_score` and
/// `match_key_feedback[{identifier, coverage{percentage}}]`. Meta does not publish its score;
/// the stand-in's is 10 × the mean coverage of the keys above, to one decimal.
async fn dataset_quality(
    State((inner, _)): State<Shared>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    let mut state = inner.lock().unwrap_or_else(|e| e.into_inner());
    let query: Vec<(String, String)> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let expected = format!("Bearer {}", state.valid_token);
    let response =
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
            graph_error(400, 190, None, "", "Invalid OAuth access token.")
        } else if state.dataset_quality_denied {
            graph_error(
                400,
                10,
                None,
                "",
                "(#10) Application does not have permission for this action",
            )
        } else if param("dataset_id") != Some(state.pixel_id.as_str())
            || !param("fields").is_some_and(|f| f.contains("event_match_quality"))
        {
            graph_error(400, 100, None, "", "Invalid parameter")
        } else {
            let mut names: Vec<String> = state
                .accepted
                .iter()
                .filter_map(|e| e["event_name"].as_str().map(str::to_owned))
                .collect();
            names.sort();
            names.dedup();
            let web: Vec<Value> = names
                .iter()
                .map(|name| {
                    let events: Vec<&Value> = state
                        .accepted
                        .iter()
                        .filter(|e| e["event_name"] == name.as_str())
                        .collect();
                    let feedback: Vec<(&str, f64)> = DATASET_QUALITY_KEYS
                        .iter()
                        .map(|(identifier, key)| {
                            let with = events
                                .iter()
                                .filter(|e| !e["user_data"][*key].is_null())
                                .count();
                            (*identifier, 100.0 * with as f64 / events.len() as f64)
                        })
                        .collect();
                    let mean = feedback.iter().map(|(_, p)| p).sum::<f64>() / feedback.len() as f64;
                    json!({
                        "event_name": name,
                        "event_match_quality": {
                            "composite_score": mean.round() / 10.0,
                            "match_key_feedback": feedback
                                .iter()
                                .map(|(identifier, percentage)| json!({
                                    "identifier": identifier,
                                    "coverage": {"percentage": percentage}
                                }))
                                .collect::<Vec<_>>(),
                        }
                    })
                })
                .collect();
            Json(json!({ "web": web })).into_response()
        };
    let status = response.status().as_u16();
    state.dataset_quality_requests.push(Received {
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        body: Value::Null,
        status,
        at: std::time::Instant::now(),
    });
    response
}
