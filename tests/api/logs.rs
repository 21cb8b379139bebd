//! The logs never hold personal data or credentials (issue 6): the real binary with JSON debug
//! logs, fed people with distinctive emails, phones, names, IPs, user agents and external ids
//! through every path (delivered, 422, Meta refusing with 100, rate limits 17/80004/4, token
//! error 190 pausing the pixel, a Supabase webhook with a URL token, `/v1/collect`, and a
//! kill -9 mid-delivery with the restarted process resuming), with a distinctive access token,
//! webhook secret and URL token. None of them may appear in the logs: raw, lower-cased,
//! normalized or hashed. The logs must also be worth reading: request ids (the ones returned
//! to the clients), event ids and Meta's error codes are there.
#![cfg(unix)]

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::graph_stand_in::{GraphStandIn, Scripted};
use crate::helpers::{sha256, WAIT};
use crate::process::Service;

const TOKEN: &str = "EAAB-distinctive-access-token-7f3a9c";
const SECRET: &str = "whsec-distinctive-secret-51d2e8";
const URL_TOKEN: &str = "distinctive-url-token-0c4b77";
const PIXEL: &str = "998877665544";

/// One person, with values found nowhere else.
struct Person {
    email: String,
    phone: String,
    first_name: String,
    last_name: String,
    ip: String,
    user_agent: String,
    external_id: String,
}

impl Person {
    fn new(n: u8, first_name: &str, last_name: &str) -> Self {
        Self {
            email: format!("{first_name}.{last_name}{n}@Example-Mail.org"),
            phone: format!("+1 (415) 555-01{n:02}"),
            first_name: first_name.to_owned(),
            last_name: last_name.to_owned(),
            ip: format!("198.51.100.{}", 100 + n),
            user_agent: format!("QuokkaBrowser/{n}.7 (Distinctive; Agent)"),
            external_id: format!("CRM-Ext-{last_name}-{n}"),
        }
    }

    /// Flat fields for `POST /v1/events`.
    fn event(&self, name: &str, event_id: &str) -> Value {
        json!({
            "event_name": name,
            "event_id": event_id,
            "event_time": chrono::Utc::now().timestamp(),
            "action_source": "website",
            "event_source_url": "https://shop.example.com/offer",
            "email": self.email,
            "phone": self.phone,
            "first_name": self.first_name,
            "last_name": self.last_name,
            "client_ip_address": self.ip,
            "client_user_agent": self.user_agent,
            "external_id": self.external_id,
        })
    }

    /// Every form a value could take in a log line: raw, lower-cased, normalized (phone
    /// digits) and the SHA-256 of the normalized form, as Meta gets it.
    fn forbidden(&self) -> Vec<String> {
        let digits: String = self.phone.chars().filter(char::is_ascii_digit).collect();
        let mut forms = Vec::new();
        for value in [
            &self.email,
            &self.first_name,
            &self.last_name,
            &self.external_id,
        ] {
            forms.push(value.clone());
            forms.push(value.to_lowercase());
            forms.push(sha256(&value.to_lowercase()));
        }
        forms.push(sha256(&self.external_id));
        forms.push(self.phone.clone());
        forms.push(digits.clone());
        forms.push(sha256(&digits));
        forms.push(self.ip.clone());
        forms.push(self.user_agent.clone());
        forms.push("QuokkaBrowser".to_owned());
        forms
    }
}

fn environment(dir: &std::path::Path, graph: &GraphStandIn) -> Vec<(&'static str, String)> {
    std::fs::write(
        dir.join("rules.toml"),
        r#"
        [[rules]]
        name = "lead"
        source = "supabase"
        event = "Lead"
        fields.event_id = '"lead-" + string(record.id)'
        fields.email = "record.email"
        fields.phone = "record.phone"
        fields.first_name = "record.first_name"
        fields.last_name = "record.last_name"
        fields.external_id = "record.external_id"
        fields.client_ip_address = "record.ip"
        fields.client_user_agent = "record.ua"
        "#,
    )
    .expect("rules");
    std::fs::write(
        dir.join("capi-bridge.toml"),
        "[sites.pk_logs_test]\norigins = [\"https://shop.example.com\"]\n",
    )
    .expect("config");
    vec![
        (
            "DATABASE_URL",
            format!("sqlite://{}", dir.join("logs.db").display()),
        ),
        ("META_ACCESS_TOKEN", TOKEN.to_owned()),
        ("META_PIXEL_ID", PIXEL.to_owned()),
        ("META_GRAPH_URL", graph.url.clone()),
        ("WEBHOOK_SECRET", SECRET.to_owned()),
        ("SUPABASE_WEBHOOK_TOKEN", URL_TOKEN.to_owned()),
        ("RULES_FILE", "rules.toml".to_owned()),
        ("CAPI_BRIDGE_CONFIG", "capi-bridge.toml".to_owned()),
        ("CLIENT_IP_SOURCE", "x-forwarded-for".to_owned()),
        ("DELIVERY_LEASE_MS", "5000".to_owned()),
        ("DELIVERY_REQUEST_TIMEOUT_MS", "5000".to_owned()),
        ("DELIVERY_RETRY_BASE_MS", "20".to_owned()),
        ("DELIVERY_RETRY_MAX_MS", "200".to_owned()),
        ("DELIVERY_POLL_INTERVAL_MS", "100".to_owned()),
        ("DELIVERY_PAUSE_PROBE_INTERVAL_MS", "100".to_owned()),
        ("LOG_FORMAT", "json".to_owned()),
        ("RUST_LOG", "debug".to_owned()),
    ]
}

/// The `x-request-id` the service answered with (a UUID it made, as none was sent).
fn request_id(response: &reqwest::Response) -> String {
    let id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("every answer carries x-request-id")
        .to_owned();
    assert!(uuid_like(&id), "{id}");
    id
}

fn uuid_like(id: &str) -> bool {
    id.len() == 36 && id.chars().filter(|c| *c == '-').count() == 4
}

async fn post_event(service: &Service, http: &reqwest::Client, body: &Value) -> (u16, String) {
    let response = http
        .post(format!("{}/v1/events", service.address))
        .bearer_auth(SECRET)
        .json(body)
        .send()
        .await
        .expect("POST /v1/events");
    let id = request_id(&response);
    (response.status().as_u16(), id)
}

async fn event_state(service: &Service, http: &reqwest::Client, event_id: &str) -> String {
    let detail: Value = http
        .get(format!("{}/v1/events/{event_id}", service.address))
        .header("x-api-key", SECRET)
        .send()
        .await
        .expect("GET /v1/events/{id}")
        .json()
        .await
        .unwrap_or(Value::Null);
    detail["state"].as_str().unwrap_or("unknown").to_owned()
}

/// Polls the event's state until it is `state` (the binary has no other signal to wait on).
async fn wait_for_state(service: &Service, http: &reqwest::Client, event_id: &str, state: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = event_state(service, http, event_id).await;
        if now == state {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{event_id} is {now}, never {state}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for_pixel_state(service: &Service, http: &reqwest::Client, state: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ready: Value = http
            .get(format!("{}/readyz", service.address))
            .send()
            .await
            .expect("GET /readyz")
            .json()
            .await
            .expect("JSON");
        if ready["pixels"][0]["state"] == state {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pixel never became {state}: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn accepted_ids(graph: &GraphStandIn) -> BTreeSet<String> {
    graph
        .accepted()
        .iter()
        .filter_map(|e| e["event_id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_personal_data_or_credentials_reach_the_logs_on_any_path() {
    let graph = GraphStandIn::start(TOKEN, PIXEL).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let env = environment(dir.path(), &graph);
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("http client");
    let mut service = Service::start("first", dir.path(), &env, &http).await;
    let mut people = Vec::new();
    let mut request_ids = Vec::new();

    // Delivered.
    let delivered = Person::new(1, "Quintessa", "Featherstonehaugh");
    let (status, id) = post_event(&service, &http, &delivered.event("Lead", "logs-ok")).await;
    assert_eq!(status, 202);
    request_ids.push(id);
    graph
        .wait_until(WAIT, "logs-ok delivered", |g| {
            accepted_ids(g).contains("logs-ok")
        })
        .await;
    // A caller's own request id is kept and returned; one that is not an id (here an email)
    // is replaced, since request ids are logged.
    let me = |id: &str| {
        http.get(format!("{}/v1/me", service.address))
            .bearer_auth(SECRET)
            .header("x-request-id", id)
            .send()
    };
    let response = me("caller-id-42.retry:1").await.expect("GET /v1/me");
    assert_eq!(response.headers()["x-request-id"], "caller-id-42.retry:1");
    request_ids.push("caller-id-42.retry:1".to_owned());
    let response = me(&delivered.email).await.expect("GET /v1/me");
    assert_eq!(response.status(), 200);
    request_ids.push(request_id(&response));
    people.push(delivered);

    // 422: a Purchase without value and currency; nothing is queued.
    let invalid = Person::new(2, "Barnabette", "Wolstenholme");
    let (status, id) = post_event(&service, &http, &invalid.event("Purchase", "logs-422")).await;
    assert_eq!(status, 422);
    request_ids.push(id);
    // 400: broken JSON that holds personal data.
    let response = http
        .post(format!("{}/v1/events", service.address))
        .bearer_auth(SECRET)
        .header("content-type", "application/json")
        .body(format!(
            "{{\"event_name\": \"Lead\", \"email\": \"{}\", ",
            invalid.email
        ))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 400);
    request_ids.push(request_id(&response));
    people.push(invalid);

    // Meta refuses the event (100 / 2804050): it is dead.
    let refused = Person::new(3, "Ottoline", "Cholmondeley");
    graph.poison("logs-refused");
    let (status, id) = post_event(&service, &http, &refused.event("Lead", "logs-refused")).await;
    assert_eq!(status, 202);
    request_ids.push(id);
    wait_for_state(&service, &http, "logs-refused", "dead").await;
    people.push(refused);

    // Rate limits: 17, 80004 and 4, then accepted.
    let throttled = Person::new(4, "Peregrina", "Marjoribanks");
    graph.script([
        Scripted::GraphError {
            status: 400,
            code: 17,
            subcode: Some(2_446_079),
        },
        Scripted::GraphError {
            status: 400,
            code: 80004,
            subcode: Some(2_446_079),
        },
        Scripted::GraphError {
            status: 400,
            code: 4,
            subcode: None,
        },
    ]);
    let (status, id) =
        post_event(&service, &http, &throttled.event("Lead", "logs-throttled")).await;
    assert_eq!(status, 202);
    request_ids.push(id);
    graph
        .wait_until(WAIT, "logs-throttled delivered", |g| {
            accepted_ids(g).contains("logs-throttled")
        })
        .await;
    people.push(throttled);

    // A token error (190) pauses the pixel; fixed, the probe resumes delivery.
    let paused = Person::new(5, "Wilhelmina", "Auchinleck");
    graph.set_valid_token("EAAB-a-token-the-service-does-not-have");
    let (status, id) = post_event(&service, &http, &paused.event("Lead", "logs-paused")).await;
    assert_eq!(status, 202);
    request_ids.push(id);
    wait_for_pixel_state(&service, &http, "paused").await;
    graph.set_valid_token(TOKEN);
    graph
        .wait_until(WAIT, "logs-paused delivered", |g| {
            accepted_ids(g).contains("logs-paused")
        })
        .await;
    people.push(paused);

    // A Supabase database webhook to the source's secret URL.
    let webhook = Person::new(6, "Thaddea", "Ffoulkes");
    let mut payload: Value = serde_json::from_str(
        &std::fs::read_to_string(format!(
            "{}/tests/samples/supabase-leads-insert.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .expect("the Supabase sample"),
    )
    .expect("JSON sample");
    let record = payload["record"].as_object_mut().expect("record");
    record.insert("id".to_owned(), json!(4242));
    for (field, value) in [
        ("email", &webhook.email),
        ("phone", &webhook.phone),
        ("first_name", &webhook.first_name),
        ("last_name", &webhook.last_name),
        ("external_id", &webhook.external_id),
        ("ip", &webhook.ip),
        ("ua", &webhook.user_agent),
    ] {
        record.insert(field.to_owned(), json!(value));
    }
    let response = http
        .post(format!(
            "{}/v1/sources/supabase/{URL_TOKEN}",
            service.address
        ))
        .json(&payload)
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 202);
    request_ids.push(request_id(&response));
    graph
        .wait_until(WAIT, "lead-4242 delivered", |g| {
            accepted_ids(g).contains("lead-4242")
        })
        .await;
    people.push(webhook);

    // A landing page's beacon: IP from X-Forwarded-For, the browser's user agent.
    let visitor = Person::new(7, "Clementina", "Baskerville");
    let beacon = json!({"site_key": "pk_logs_test", "event_name": "Lead", "event_id": "logs-page",
        "event_source_url": "https://shop.example.com/lp", "email": visitor.email,
        "phone": visitor.phone, "first_name": visitor.first_name, "last_name": visitor.last_name,
        "external_id": visitor.external_id});
    let response = http
        .post(format!("{}/v1/collect", service.address))
        .header("content-type", "text/plain")
        .header("origin", "https://shop.example.com")
        .header("user-agent", &visitor.user_agent)
        .header("x-forwarded-for", &visitor.ip)
        .body(beacon.to_string())
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 204);
    request_ids.push(request_id(&response));
    graph
        .wait_until(WAIT, "logs-page delivered", |g| {
            accepted_ids(g).contains("logs-page")
        })
        .await;
    people.push(visitor);

    // kill -9 while a delivery is in flight; the restarted process resumes it.
    let crashed = Person::new(8, "Evandra", "Throckmorton");
    graph.set_latency(Duration::from_secs(3));
    let requests_before = graph.request_count();
    let (status, id) = post_event(&service, &http, &crashed.event("Lead", "logs-crash")).await;
    assert_eq!(status, 202);
    request_ids.push(id);
    // The stand-in records a request when it arrives and answers 3 s later.
    graph
        .wait_until(WAIT, "the delivery in flight", |g| {
            g.request_count() > requests_before
        })
        .await;
    service.kill_9();
    graph.set_latency(Duration::ZERO);
    let restarted = Service::start("restarted", dir.path(), &env, &http).await;
    wait_for_state(&restarted, &http, "logs-crash", "delivered").await;
    people.push(crashed);

    // Read both processes' logs.
    drop(restarted);
    let logs = ["first", "restarted"]
        .iter()
        .map(|label| {
            std::fs::read_to_string(dir.path().join(format!("{label}.log"))).expect("read log")
        })
        .collect::<Vec<_>>()
        .join("\n");
    let lines: Vec<Value> = logs
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();

    // The logs are worth reading: each client's request id, the dead event's id, Meta's codes.
    for id in &request_ids {
        assert!(logs.contains(id.as_str()), "request id {id} not logged");
    }
    let has = |field: &str, value: Value| lines.iter().any(|l| l[field] == value);
    assert!(
        has("event_id", json!("logs-refused")),
        "the dead event's id"
    );
    for code in [100, 17, 80004, 4, 190] {
        assert!(has("code", json!(code)), "Meta's code {code} not logged");
    }
    // Every line logged while handling a request carries its request id: the lines of the
    // handlers themselves and of tower-http, whatever spans are nested inside.
    let mut in_requests = 0;
    for line in &lines {
        let request_span = line["spans"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|span| span["name"] == "request");
        if let Some(span) = request_span {
            in_requests += 1;
            let id = span["request_id"].as_str().unwrap_or("");
            assert!(
                request_ids.iter().any(|r| r == id) || uuid_like(id),
                "a request's line without its id: {line}"
            );
        }
    }
    assert!(
        in_requests >= 2 * request_ids.len(),
        "{in_requests} request lines"
    );
    for message in ["events accepted", "started processing request"] {
        let lines_of: Vec<&Value> = lines.iter().filter(|l| l["message"] == message).collect();
        assert!(!lines_of.is_empty(), "{message}");
        for line in lines_of {
            assert!(
                line["span"]["request_id"]
                    .as_str()
                    .is_some_and(|id| !id.is_empty()),
                "{line}"
            );
        }
    }

    // Nothing personal or secret, in any form. What Meta got is forbidden too: the exact
    // hashes (and plain values) the service computed.
    let mut forbidden: Vec<String> = people.iter().flat_map(Person::forbidden).collect();
    forbidden.extend([TOKEN, SECRET, URL_TOKEN].map(str::to_owned));
    for request in graph.requests() {
        for event in request.body["data"].as_array().into_iter().flatten() {
            for (key, value) in event["user_data"].as_object().into_iter().flatten() {
                let values = match value {
                    Value::Array(items) => items.clone(),
                    other => vec![other.clone()],
                };
                for value in values.iter().filter_map(Value::as_str) {
                    if !matches!(key.as_str(), "fbp" | "fbc") {
                        forbidden.push(value.to_owned());
                    }
                }
            }
        }
    }
    assert!(
        forbidden.len() > 150,
        "{} forbidden values",
        forbidden.len()
    );
    let lower = logs.to_lowercase();
    for value in &forbidden {
        assert!(
            !lower.contains(&value.to_lowercase()),
            "{value:?} appears in the logs"
        );
    }
}
