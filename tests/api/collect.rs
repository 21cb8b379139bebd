//! `POST /v1/collect`, the public door for landing pages: site keys, origins, CORS, rate
//! limits, the visitor's IP by trust mode, and the website event Meta receives.

use serde_json::{json, Value};

use crate::helpers::{sha256, spawn_app_with, TestApp, WAIT};

const SITE: &str = "pk_test_landing";
const ORIGIN: &str = "https://shop.example.com";
const UA: &str = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/156.0 Safari/537.36";

struct Config(tempfile::TempDir);

fn config(per_ip: u32) -> Config {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("capi-bridge.toml"),
        format!(
            r#"
            [sites.{SITE}]
            origins = ["{ORIGIN}"]
            events = ["PageView", "Lead"]
            per_ip_per_minute = {per_ip}
            "#
        ),
    )
    .expect("write config");
    Config(dir)
}

async fn spawn(config: &Config, extra: &[(&str, &str)]) -> TestApp {
    let path = config.0.path().join("capi-bridge.toml");
    let mut env = vec![("CAPI_BRIDGE_CONFIG", path.to_str().expect("path"))];
    env.extend_from_slice(extra);
    spawn_app_with(&env).await
}

fn lead(event_id: &str) -> Value {
    json!({
        "site_key": SITE,
        "event_name": "Lead",
        "event_id": event_id,
        "event_source_url": "https://shop.example.com/lp?fbclid=IwAR2F4-dbP0l7Mn1IawQQ",
        "fbclid": "IwAR2F4-dbP0l7Mn1IawQQ",
        "fbclid_seen_at": 1_764_000_000_123_i64,
        "fbp": "fb.1.1764000000000.1116446470",
        "email": "Visitor@Example.com",
        "client_ip_address": "6.6.6.6"
    })
}

async fn post(
    app: &TestApp,
    body: String,
    content_type: &str,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = app
        .http
        .post(format!("{}/v1/collect", app.address))
        .header("content-type", content_type)
        .header("user-agent", UA)
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.expect("request")
}

#[tokio::test]
async fn a_beacon_from_an_allowed_page_becomes_a_website_event_decided_by_the_server() {
    let config = config(60);
    let app = spawn(&config, &[]).await;

    // sendBeacon: text/plain, no preflight; a spoofed X-Forwarded-For is not trusted.
    let response = post(
        &app,
        lead("page-1").to_string(),
        "text/plain;charset=UTF-8",
        &[("origin", ORIGIN), ("x-forwarded-for", "6.6.6.6")],
    )
    .await;
    assert_eq!(response.status(), 204);
    assert_eq!(
        response
            .headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some(ORIGIN)
    );
    assert_eq!(
        response.headers().get("vary").and_then(|v| v.to_str().ok()),
        Some("Origin")
    );

    let accepted = app.graph.wait_for_accepted(1, WAIT).await;
    let event = &accepted[0];
    assert_eq!(event["event_id"], "page-1");
    assert_eq!(event["action_source"], "website");
    let user = &event["user_data"];
    assert_eq!(user["client_ip_address"], "127.0.0.1");
    assert_eq!(user["client_user_agent"], UA);
    assert_eq!(user["fbc"], "fb.1.1764000000123.IwAR2F4-dbP0l7Mn1IawQQ");
    assert_eq!(user["fbp"], "fb.1.1764000000000.1116446470");
    assert_eq!(user["em"], json!([sha256("visitor@example.com")]));
    assert!(
        !event.to_string().contains("Visitor@"),
        "only hashed: {event}"
    );
}

#[tokio::test]
async fn other_origins_unknown_keys_and_other_events_are_refused() {
    let config = config(60);
    let app = spawn(&config, &[]).await;
    let body = lead("page-x").to_string();

    let evil = post(
        &app,
        body.clone(),
        "text/plain",
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(evil.status(), 403);
    assert!(evil.headers().get("access-control-allow-origin").is_none());
    let no_origin = post(&app, body.clone(), "text/plain", &[]).await;
    assert_eq!(no_origin.status(), 403);
    // The Referer stands in when there is no Origin.
    let referer = post(
        &app,
        lead("page-ref").to_string(),
        "text/plain",
        &[("referer", "https://shop.example.com/lp")],
    )
    .await;
    assert_eq!(referer.status(), 204);

    let mut unknown = lead("page-y");
    unknown["site_key"] = json!("pk_nobody_here");
    let response = post(
        &app,
        unknown.to_string(),
        "text/plain",
        &[("origin", ORIGIN)],
    )
    .await;
    assert_eq!(response.status(), 403);

    let mut purchase = lead("page-z");
    purchase["event_name"] = json!("Purchase");
    purchase["value"] = json!(1_000_000);
    purchase["currency"] = json!("USD");
    let response = post(
        &app,
        purchase.to_string(),
        "text/plain",
        &[("origin", ORIGIN)],
    )
    .await;
    assert_eq!(response.status(), 422);
    let error: Value = response.json().await.expect("json");
    assert_eq!(error["error"]["problems"][0]["field"], "event_name");

    let huge = json!({"site_key": SITE, "event_name": "Lead", "pad": "x".repeat(70 * 1024)});
    let response = post(&app, huge.to_string(), "text/plain", &[("origin", ORIGIN)]).await;
    assert_eq!(response.status(), 413);

    app.graph.wait_for_accepted(1, WAIT).await;
    assert!(app.stored("page-x").await.is_none());
    assert!(app.stored("page-z").await.is_none());
}

#[tokio::test]
async fn json_posts_are_preflighted_for_allowed_origins_only() {
    let config = config(60);
    let app = spawn(&config, &[]).await;
    let preflight = |origin: &'static str| {
        app.http
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/v1/collect?site_key={SITE}", app.address),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
    };
    let allowed = preflight(ORIGIN).await.expect("request");
    assert_eq!(allowed.status(), 204);
    let header = |r: &reqwest::Response, n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(
        header(&allowed, "access-control-allow-origin").as_deref(),
        Some(ORIGIN)
    );
    assert_eq!(
        header(&allowed, "access-control-allow-methods").as_deref(),
        Some("POST")
    );
    assert_eq!(header(&allowed, "vary").as_deref(), Some("Origin"));
    let refused = preflight("https://evil.example").await.expect("request");
    assert_eq!(refused.status(), 403);
    assert!(header(&refused, "access-control-allow-origin").is_none());

    let response = post(
        &app,
        lead("json-1").to_string(),
        "application/json",
        &[("origin", ORIGIN)],
    )
    .await;
    assert_eq!(response.status(), 204);
}

#[tokio::test]
async fn one_visitor_over_the_limit_gets_429_with_retry_after() {
    let config = config(3);
    let app = spawn(&config, &[]).await;
    for i in 0..3 {
        let response = post(
            &app,
            lead(&format!("burst-{i}")).to_string(),
            "text/plain",
            &[("origin", ORIGIN)],
        )
        .await;
        assert_eq!(response.status(), 204);
    }
    let response = post(
        &app,
        lead("burst-3").to_string(),
        "text/plain",
        &[("origin", ORIGIN)],
    )
    .await;
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_address_is_the_visitors() {
    let config = config(60);
    let app = spawn(
        &config,
        &[
            ("CLIENT_IP_SOURCE", "x-forwarded-for"),
            ("TRUSTED_PROXY_HOPS", "1"),
        ],
    )
    .await;
    let response = post(
        &app,
        lead("proxied-1").to_string(),
        "text/plain",
        &[
            ("origin", ORIGIN),
            ("x-forwarded-for", "6.6.6.6, 2001:db8::42"),
        ],
    )
    .await;
    assert_eq!(response.status(), 204);
    let accepted = app.graph.wait_for_accepted(1, WAIT).await;
    assert_eq!(
        accepted[0]["user_data"]["client_ip_address"],
        "2001:db8::42"
    );
}

#[tokio::test]
async fn the_whole_site_has_a_limit_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("capi-bridge.toml");
    std::fs::write(
        &path,
        format!(
            "[sites.{SITE}]\norigins = [\"{ORIGIN}\"]\nevents = [\"Lead\"]\nper_site_per_minute = 2\n"
        ),
    )
    .expect("config");
    let app = spawn_app_with(&[
        ("CAPI_BRIDGE_CONFIG", path.to_str().expect("path")),
        ("CLIENT_IP_SOURCE", "x-real-ip"),
    ])
    .await;
    // Three different visitors: the third is over the site's limit.
    let mut statuses = Vec::new();
    for (i, ip) in ["198.51.100.1", "198.51.100.2", "198.51.100.3"]
        .iter()
        .enumerate()
    {
        let response = post(
            &app,
            lead(&format!("site-{i}")).to_string(),
            "text/plain",
            &[("origin", ORIGIN), ("x-real-ip", ip)],
        )
        .await;
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [204, 204, 429]);
}

#[tokio::test]
async fn the_script_is_served_cacheable_and_readable_cross_origin() {
    let config = config(60);
    let app = spawn(&config, &[]).await;
    let get = |path: &str| app.http.get(format!("{}{path}", app.address)).send();
    let script = get("/v1/capi.js").await.expect("request");
    assert_eq!(script.status(), 200);
    let header = |r: &reqwest::Response, n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(
        header(&script, "cache-control").as_deref(),
        Some("public, max-age=86400")
    );
    assert_eq!(
        header(&script, "access-control-allow-origin").as_deref(),
        Some("*")
    );
    assert!(header(&script, "content-type").is_some_and(|t| t.starts_with("text/javascript")));
    let etag = header(&script, "etag").expect("etag");
    let body = script.text().await.expect("body");
    assert!(body.contains("capiBridge"));
    let again = app
        .http
        .get(format!("{}/v1/capi.js", app.address))
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("request");
    assert_eq!(again.status(), 304);
    let versioned = get(&format!("/v1/capi-{}.js", env!("CARGO_PKG_VERSION")))
        .await
        .expect("request");
    assert_eq!(
        header(&versioned, "cache-control").as_deref(),
        Some("public, max-age=31536000, immutable")
    );
    assert_eq!(versioned.text().await.expect("body"), body);
}
