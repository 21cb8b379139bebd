//! The OpenAPI contract (`GET /openapi.json`): a valid OpenAPI 3.1 document, covering every
//! route in the code, every documented operation served, and real answers matching it.
//!
//! The coverage rule: every route of the HTTP API is documented. Routes registered with
//! `utoipa_axum::routes!` are documented by construction (the handler's `#[utoipa::path]` is
//! where axum gets the path from). Any other registration in `src/` (`.route(`,
//! `.route_service(`, `.nest(`, `.nest_service(`) must name a literal path that the document
//! lists with the same methods, unless it is one of the HTML pages under [`EXCLUDED_PREFIXES`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{json, Value};

use crate::helpers::{spawn_app, SECRET};

/// Paths that are not part of the API contract: the server-rendered HTML pages of the admin
/// dashboard. Everything else must be documented.
const EXCLUDED_PREFIXES: [&str; 1] = ["/admin"];

const METHODS: [&str; 8] = [
    "get", "post", "put", "delete", "patch", "options", "head", "trace",
];

async fn served_contract(app: &crate::helpers::TestApp) -> Value {
    let response = app
        .http
        .get(format!("{}/openapi.json", app.address))
        .send()
        .await
        .expect("GET /openapi.json");
    assert_eq!(response.status(), 200, "public, no secret needed");
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    response.json().await.expect("the contract is JSON")
}

/// Follows a local `$ref` (`#/components/schemas/X`).
fn resolve<'a>(doc: &'a Value, reference: &str) -> Option<&'a Value> {
    doc.pointer(reference.strip_prefix('#')?)
}

fn collect_refs<'a>(value: &'a Value, found: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                found.push(r);
            }
            map.values().for_each(|v| collect_refs(v, found));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, found)),
        _ => {}
    }
}

fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
    let mut found = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if let Some(operation) = item.get(method) {
                found.push((path.clone(), method.to_owned(), operation));
            }
        }
    }
    found
}

#[tokio::test]
async fn the_contract_is_a_valid_openapi_3_1_document() {
    let app = spawn_app().await;
    let doc = served_contract(&app).await;

    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "{}",
        doc["openapi"]
    );
    assert_eq!(doc["info"]["title"], "capi-bridge");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));

    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    assert!(refs.len() > 20, "schemas are referenced, not all inlined");
    for reference in refs {
        assert!(
            reference.starts_with("#/") && resolve(&doc, reference).is_some(),
            "$ref {reference} does not resolve"
        );
    }

    let schemes = doc["components"]["securitySchemes"]
        .as_object()
        .expect("security schemes");
    for scheme in [
        "bearer",
        "webhook_secret",
        "api_key",
        "body_signature",
        "standard_webhooks",
        "chatwoot_signature",
        "metrics_token",
    ] {
        assert!(schemes.contains_key(scheme), "security scheme {scheme}");
    }

    let mut operation_ids = BTreeSet::new();
    for (path, method, operation) in operations(&doc) {
        let responses = operation["responses"].as_object().expect("responses");
        assert!(!responses.is_empty(), "{method} {path} has no responses");
        for status in responses.keys() {
            let valid =
                status == "default" || status.parse::<u16>().is_ok_and(|s| (100..600).contains(&s));
            assert!(valid, "{method} {path}: response {status}");
        }
        let id = operation["operationId"].as_str().expect("operationId");
        assert!(
            operation_ids.insert(id.to_owned()),
            "operationId {id} twice"
        );
        // Each `{param}` of the path is declared as a required path parameter.
        let declared: BTreeSet<&str> = operation["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == "path" && p["required"] == true)
            .filter_map(|p| p["name"].as_str())
            .collect();
        for param in path.split('{').skip(1).filter_map(|s| s.split('}').next()) {
            assert!(
                declared.contains(param),
                "{method} {path}: path parameter {param} not declared"
            );
        }
        for requirement in operation["security"].as_array().into_iter().flatten() {
            for scheme in requirement.as_object().expect("requirement").keys() {
                assert!(
                    schemes.contains_key(scheme),
                    "{method} {path}: unknown scheme {scheme}"
                );
            }
        }
    }
    // Every answer documents the request id; throttled and unavailable ones Retry-After.
    for (path, method, operation) in operations(&doc) {
        for (status, response) in operation["responses"].as_object().expect("responses") {
            assert!(
                response["headers"]["x-request-id"].is_object(),
                "{method} {path} {status}: x-request-id"
            );
            if status == "429" || status == "503" {
                assert!(
                    response["headers"]["retry-after"].is_object(),
                    "{method} {path} {status}: retry-after"
                );
            }
        }
    }
    // The error shape of src/api/error.rs is the one documented for errors.
    let error = &doc["components"]["schemas"]["ErrorBody"];
    assert_eq!(error["required"], json!(["error"]));
    let ingest = &doc["paths"]["/v1/events"]["post"];
    for status in ["400", "401", "413", "422", "503"] {
        assert_eq!(
            ingest["responses"][status]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/ErrorBody",
            "POST /v1/events {status}"
        );
    }
    // The guarded routes say how to authenticate; the public ones need nothing.
    for (path, method) in [
        ("/v1/events", "post"),
        ("/v1/me", "get"),
        ("/v1/inbox/replay", "post"),
    ] {
        let security = doc["paths"][path][method]["security"]
            .as_array()
            .expect("security");
        assert!(
            security.iter().any(|r| r.get("bearer").is_some()),
            "{method} {path}"
        );
    }
    for (path, method) in [
        ("/v1/collect", "post"),
        ("/healthz", "get"),
        ("/openapi.json", "get"),
    ] {
        assert!(
            doc["paths"][path][method].get("security").is_none(),
            "{method} {path} is public"
        );
    }
}

/// A route registration found in the source: where, the path argument, the methods.
#[derive(Debug)]
struct Registration {
    at: String,
    call: &'static str,
    path: Option<String>,
    methods: BTreeSet<String>,
}

/// Every `.route(`, `.route_service(`, `.nest(` and `.nest_service(` call in `src/`.
fn registrations_in_source() -> Vec<Registration> {
    let mut files = Vec::new();
    collect_rust_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let mut found = Vec::new();
    for file in files {
        // Comment lines are blanked (not removed: line numbers stay right).
        let text: String = std::fs::read_to_string(&file)
            .expect("read source")
            .lines()
            .map(|line| {
                if line.trim_start().starts_with("//") {
                    ""
                } else {
                    line
                }
            })
            .flat_map(|line| [line, "\n"])
            .collect();
        for call in [".route(", ".route_service(", ".nest(", ".nest_service("] {
            let mut from = 0;
            while let Some(offset) = text[from..].find(call) {
                let start = from + offset + call.len();
                from = start;
                let arguments = balanced(&text[start..]);
                let line = text[..start].lines().count();
                let path = arguments
                    .trim_start()
                    .strip_prefix('"')
                    .and_then(|rest| rest.split('"').next())
                    .map(str::to_owned);
                found.push(Registration {
                    at: format!("{}:{line}", file.display()),
                    call,
                    path,
                    methods: method_calls(arguments),
                });
            }
        }
    }
    found
}

fn collect_rust_files(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            collect_rust_files(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// The text up to the parenthesis closing the call whose arguments start `text`.
fn balanced(text: &str) -> &str {
    let mut depth = 1usize;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &text[..i];
                }
            }
            _ => {}
        }
    }
    text
}

/// `get(…)`, `.post(…)`, `get_service(…)`, … in a route's arguments.
fn method_calls(arguments: &str) -> BTreeSet<String> {
    let mut methods = BTreeSet::new();
    for method in METHODS {
        for suffix in ["(", "_service("] {
            let needle = format!("{method}{suffix}");
            let mut from = 0;
            while let Some(offset) = arguments[from..].find(&needle) {
                let at = from + offset;
                from = at + needle.len();
                let before = arguments[..at].chars().next_back();
                if !before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    methods.insert(method.to_owned());
                }
            }
        }
    }
    methods
}

#[test]
fn the_schema_check_refuses_what_does_not_match() {
    // The checker on samples, so the conformance test cannot pass by accepting everything.
    let doc = json!({"components": {"schemas": {"A": {"type": "object", "required": ["a"],
        "properties": {"a": {"type": "integer"}, "b": {"type": ["string", "null"]},
                       "c": {"type": "array", "items": {"$ref": "#/components/schemas/B"}}}},
        "B": {"oneOf": [{"type": "string"}, {"type": "boolean"}]}}}});
    let schema = json!({"$ref": "#/components/schemas/A"});
    let check = |value: Value| conforms(&doc, &schema, &value, "$");
    assert!(check(json!({"a": 1, "b": null, "c": ["x", true]})).is_ok());
    assert!(check(json!({"b": "x"})).is_err(), "required");
    assert!(check(json!({"a": "1"})).is_err(), "type");
    assert!(check(json!({"a": 1, "b": 2})).is_err(), "nullable type");
    assert!(check(json!({"a": 1, "c": [1]})).is_err(), "items and oneOf");
    assert!(check(json!([])).is_err(), "object");
}

#[test]
fn the_source_scan_finds_routes_and_their_methods() {
    // The scanner on a sample, so the coverage test below cannot pass by finding nothing.
    let sample = r#"("/metrics", get(metrics::render).post(x)), more"#;
    let arguments = balanced(&sample[1..]);
    assert_eq!(arguments, r#""/metrics", get(metrics::render).post(x)"#);
    assert_eq!(
        method_calls(arguments),
        BTreeSet::from(["get".to_owned(), "post".to_owned()])
    );
    assert!(method_calls(r#""/x", forget(y)"#).is_empty());
}

#[tokio::test]
async fn every_route_in_the_code_is_in_the_contract() {
    let app = spawn_app().await;
    let doc = served_contract(&app).await;
    let documented: BTreeMap<String, BTreeSet<String>> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .map(|(path, item)| {
            let methods = METHODS
                .iter()
                .filter(|m| item.get(**m).is_some())
                .map(|m| (*m).to_owned())
                .collect();
            (path.clone(), methods)
        })
        .collect();
    // The routes of `api::router`, all of them registered through `routes!`.
    for (path, methods) in [
        ("/v1/events", &["post"][..]),
        ("/v1/events/{event_id}", &["get"]),
        ("/v1/me", &["get"]),
        ("/v1/sources", &["get"]),
        ("/v1/sources/{name}", &["post"]),
        ("/v1/sources/{name}/{token}", &["post"]),
        ("/v1/rules/test", &["post"]),
        ("/v1/inbox/parked", &["get"]),
        ("/v1/inbox/replay", &["post"]),
        ("/v1/collect", &["post", "options"]),
        ("/v1/capi.js", &["get"]),
        (
            &format!("/v1/capi-{}.js", env!("CARGO_PKG_VERSION")),
            &["get"],
        ),
        ("/healthz", &["get"]),
        ("/readyz", &["get"]),
        ("/openapi.json", &["get"]),
        ("/metrics", &["get"]),
        ("/v1/quality", &["get"]),
    ] {
        let expected: BTreeSet<String> = methods.iter().map(|m| (*m).to_owned()).collect();
        assert_eq!(documented.get(path), Some(&expected), "{path}");
    }
    // Anything registered past `routes!` must be documented by hand or be an HTML page.
    let mut undocumented = Vec::new();
    for registration in registrations_in_source() {
        let Some(path) = &registration.path else {
            undocumented.push(format!(
                "{} at {}: not a literal path; register it with utoipa_axum::routes! instead",
                registration.call, registration.at
            ));
            continue;
        };
        if EXCLUDED_PREFIXES.iter().any(|p| path.starts_with(p)) {
            continue;
        }
        match documented.get(path) {
            Some(methods) if registration.methods.is_subset(methods) => {}
            _ => undocumented.push(format!(
                "{path} {:?} at {}: not in /openapi.json; register it with utoipa_axum::routes! and a #[utoipa::path] attribute",
                registration.methods, registration.at
            )),
        }
    }
    assert!(undocumented.is_empty(), "{undocumented:#?}");
}

/// One call of an operation: a valid request where the test knows one, else an empty object.
struct Call {
    secret: bool,
    valid: bool,
}

/// Path parameters: a source that exists, a wrong token, an event that exists (valid) or not.
fn fill(path: &str, valid: bool) -> String {
    let event_id = if valid { "contract-1" } else { "no-such-event" };
    path.replace("{name}", "supabase")
        .replace("{token}", "not-the-token")
        .replace("{event_id}", event_id)
}

fn valid_body(path: &str) -> Value {
    match path {
        "/v1/events" => json!({"event_name": "Lead", "event_id": "contract-2",
            "email": "contract@example.com", "event_time": chrono::Utc::now().timestamp()}),
        "/v1/collect" => json!({"site_key": SITE_KEY, "event_name": "Lead",
            "event_id": "contract-3", "event_source_url": format!("{ORIGIN}/lp")}),
        _ => json!({}),
    }
}

const SITE_KEY: &str = "pk_contract_test";
const ORIGIN: &str = "https://contract.example.com";

#[tokio::test]
async fn every_documented_operation_is_served_and_answers_as_documented() {
    let config = tempfile::tempdir().expect("tempdir");
    let config_path = config.path().join("capi-bridge.toml");
    std::fs::write(
        &config_path,
        format!("[sites.{SITE_KEY}]\norigins = [\"{ORIGIN}\"]\nevents = [\"Lead\"]\n"),
    )
    .expect("config");
    let app = crate::helpers::spawn_app_with(&[(
        "CAPI_BRIDGE_CONFIG",
        config_path.to_str().expect("path"),
    )])
    .await;
    // An event to show, delivered.
    let response = app
        .http
        .post(format!("{}/v1/events", app.address))
        .bearer_auth(SECRET)
        .json(&crate::helpers::lead("contract-1"))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 202);
    app.graph.wait_for_accepted(1, crate::helpers::WAIT).await;

    let doc = served_contract(&app).await;
    let mut checked_bodies = 0;
    let mut statuses = BTreeSet::new();
    for (path, method, operation) in operations(&doc) {
        let query: Vec<(String, String)> = operation["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == "query" && p["required"] == true)
            .filter_map(|p| p["name"].as_str())
            .map(|name| (name.to_owned(), "supabase".to_owned()))
            .collect();
        for call in [
            Call {
                secret: false,
                valid: false,
            },
            Call {
                secret: true,
                valid: false,
            },
            Call {
                secret: true,
                valid: true,
            },
        ] {
            let url = format!("{}{}", app.address, fill(&path, call.valid));
            let mut request = app
                .http
                .request(method.to_uppercase().parse().expect("method"), &url)
                .query(&query)
                .header("origin", ORIGIN)
                .header(
                    "user-agent",
                    "Mozilla/5.0 (X11; Linux x86_64) contract-test",
                );
            if method == "post" {
                let body = if call.valid {
                    valid_body(&path)
                } else {
                    json!({})
                };
                request = request
                    .header("content-type", "application/json")
                    .body(body.to_string());
            }
            if call.secret {
                request = request.bearer_auth(SECRET);
            }
            let response = request.send().await.expect("request");
            let status = response.status().as_u16();
            let content_type = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let body = response.bytes().await.expect("body");
            let what = format!(
                "{method} {path} (secret: {}, valid: {}) answered {status}",
                call.secret, call.valid
            );
            // 405, or axum's bare 404 for an unknown path: the route is not really there.
            assert_ne!(status, 405, "{what}");
            if status == 404 {
                let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                assert_eq!(parsed["error"]["code"], "not_found", "{what}: not routed");
            }
            let documented = &operation["responses"][status.to_string()];
            assert!(documented.is_object(), "{what}: status not documented");
            statuses.insert(format!("{method} {path} {status}"));
            if content_type.starts_with("application/json") {
                let schema = &documented["content"]["application/json"]["schema"];
                assert!(schema.is_object(), "{what}: JSON body not documented");
                let value: Value = serde_json::from_slice(&body).expect("JSON body");
                if let Err(problem) = conforms(&doc, schema, &value, "$") {
                    panic!("{what}: {problem}\n{value:#}");
                }
                checked_bodies += 1;
            }
        }
    }
    assert!(
        checked_bodies >= 30,
        "only {checked_bodies} JSON answers checked"
    );
    // The success answers were among them, not only errors.
    for expected in [
        "post /v1/events 202",
        "post /v1/events 422",
        "get /v1/events/{event_id} 200",
        "get /v1/events/{event_id} 404",
        "post /v1/collect 204",
        "post /v1/collect 403",
        "options /v1/collect 204",
        "post /v1/sources/{name} 200",
        "post /v1/rules/test 200",
        "get /v1/me 401",
        "get /v1/quality 200",
        "get /metrics 200",
    ] {
        assert!(
            statuses.contains(expected),
            "{expected} not seen: {statuses:#?}"
        );
    }
}

/// A small JSON Schema check, enough for what utoipa generates: `$ref`, `allOf`, `oneOf`,
/// `type` (also a list, for nullable), `required`, `properties`, `items`, `enum`.
fn conforms(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(reference) = schema["$ref"].as_str() {
        let target = resolve(doc, reference).ok_or(format!("{reference} missing"))?;
        return conforms(doc, target, value, at);
    }
    for part in schema["allOf"].as_array().into_iter().flatten() {
        conforms(doc, part, value, at)?;
    }
    if let Some(options) = schema["oneOf"].as_array() {
        let matching = options
            .iter()
            .filter(|o| conforms(doc, o, value, at).is_ok())
            .count();
        if matching != 1 {
            return Err(format!("{at}: matches {matching} of oneOf"));
        }
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            return Err(format!("{at}: {value} not in {allowed:?}"));
        }
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !types.is_empty() {
        let actual = match value {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        let ok = types.contains(&actual) || (actual == "integer" && types.contains(&"number"));
        if !ok {
            return Err(format!("{at}: {actual} where {types:?} is documented"));
        }
    }
    if let Value::Object(map) = value {
        for required in schema["required"].as_array().into_iter().flatten() {
            let name = required.as_str().unwrap_or_default();
            if !map.contains_key(name) {
                return Err(format!("{at}: required {name} missing"));
            }
        }
        if let Some(properties) = schema["properties"].as_object() {
            for (name, property) in properties {
                if let Some(v) = map.get(name) {
                    conforms(doc, property, v, &format!("{at}.{name}"))?;
                }
            }
        }
    }
    if let (Value::Array(items), Some(item_schema)) = (value, schema.get("items")) {
        for (i, item) in items.iter().enumerate() {
            conforms(doc, item_schema, item, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}
