//! The example landing page in a real headless Chromium (Debian's, driven by playwright-core
//! from `tests/browser`): the Pixel (a stub: no internet) and capi-bridge get the same event
//! id, and the Graph stand-in receives the website event the browser caused.

use serde_json::{json, Value};

use crate::helpers::{sha256, spawn_app_with, TestApp, WAIT};

const SITE: &str = "pk_browser_test";
const FBCLID: &str = "IwAR-Browser_Test1";

async fn app_for(origin: &str) -> (TestApp, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("capi-bridge.toml");
    std::fs::write(
        &path,
        format!("[sites.{SITE}]\norigins = [\"{origin}\"]\nevents = [\"PageView\", \"Lead\"]\n"),
    )
    .expect("config");
    let app = spawn_app_with(&[("CAPI_BRIDGE_CONFIG", path.to_str().expect("path"))]).await;
    (app, dir)
}

/// Runs `tests/browser/landing.mjs` and returns what it printed.
async fn chromium(scenario: &str, url: &str) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/landing.mjs");
    let output = tokio::process::Command::new("node")
        .arg(script)
        .arg(scenario)
        .arg(url)
        .output()
        .await
        .expect("node runs (scripts/test-services installs chromium and playwright-core)");
    assert!(
        output.status.success(),
        "browser scenario {scenario} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON from the browser script")
}

/// The page's origin, as the browser sends it.
async fn page_and_app(allowed: Option<&str>) -> (TestApp, tempfile::TempDir, String) {
    page_and_app_with(allowed, false).await
}

/// Like [`page_and_app`]; `pending_consent` marks the script tag `data-consent="pending"`.
async fn page_and_app_with(
    allowed: Option<&str>,
    pending_consent: bool,
) -> (TestApp, tempfile::TempDir, String) {
    // The page server's port is only known after the app starts, so the allowed origin is
    // reserved first: bind, note the port, and serve the page there.
    let probe = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = probe.local_addr().expect("addr").port();
    drop(probe);
    let origin = format!("http://127.0.0.1:{port}");
    let (app, dir) = app_for(allowed.unwrap_or(&origin)).await;
    let mut html = include_str!("../../examples/landing/index.html")
        .replace("http://127.0.0.1:8080", &app.address)
        .replace("pk_example_landing", SITE);
    if pending_consent {
        html = html.replace(" defer>", " data-consent=\"pending\" defer>");
    }
    let router = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let html = html.clone();
            async move { axum::response::Html(html) }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the reserved port");
    tokio::spawn(async move { axum::serve(listener, router).await });
    (app, dir, format!("{origin}/?fbclid={FBCLID}"))
}

#[tokio::test]
async fn a_lead_from_the_example_page_reaches_meta_with_the_pixels_event_id() {
    let (app, _dir, url) = page_and_app(None).await;

    let result = chromium("submit", &url).await;

    let event_id = result["eventId"].as_str().expect("event id").to_owned();
    assert!(!event_id.is_empty());
    // The Pixel got the same id, and no personal data.
    let lead_call = result["fbqCalls"]
        .as_array()
        .and_then(|calls| calls.iter().find(|c| c[1] == "Lead"))
        .cloned()
        .expect("fbq('track', 'Lead', …)");
    assert_eq!(lead_call[0], "track");
    assert_eq!(lead_call[3], json!({"eventID": event_id}));
    assert!(lead_call[2].get("email").is_none(), "{lead_call}");

    let accepted = app.graph.wait_for_accepted(1, WAIT).await;
    let event = accepted
        .iter()
        .find(|e| e["event_id"] == event_id.as_str())
        .expect("the page's event at Meta");
    assert_eq!(event["event_name"], "Lead");
    assert_eq!(event["action_source"], "website");
    let user = &event["user_data"];
    assert_eq!(user["client_user_agent"], result["userAgent"]);
    assert_eq!(user["client_ip_address"], "127.0.0.1");
    let fbc = user["fbc"].as_str().expect("fbc");
    assert!(
        fbc.starts_with("fb.1.") && fbc.ends_with(&format!(".{FBCLID}")),
        "{fbc}"
    );
    assert_eq!(user["em"], json!([sha256("visitor.browser@example.com")]));
    assert_eq!(user["ph"], json!([sha256("16505550100")]));
    assert!(!event.to_string().contains("Visitor.Browser"), "{event}");
    assert!(event["event_source_url"]
        .as_str()
        .is_some_and(|u| u.contains(FBCLID)));
}

#[tokio::test]
async fn a_beacon_sent_while_the_page_unloads_still_arrives() {
    let (app, _dir, url) = page_and_app(None).await;

    let result = chromium("unload", &url).await;

    let event_id = result["eventId"].as_str().expect("event id").to_owned();
    app.graph
        .wait_until(WAIT, "the unload beacon", |g| {
            g.accepted()
                .iter()
                .any(|e| e["event_id"] == event_id.as_str())
        })
        .await;
}

#[tokio::test]
async fn a_page_on_another_origin_is_refused() {
    let (app, _dir, url) = page_and_app(Some("https://shop.example.com")).await;

    let result = chromium("submit", &url).await;

    assert_eq!(result["collect"], json!([403]), "{result}");
    let event_id = result["eventId"].as_str().expect("event id");
    assert!(app.stored(event_id).await.is_none());
    assert_eq!(app.graph.accepted_count(), 0);
}

#[tokio::test]
async fn without_consent_the_script_sends_nothing() {
    // Consent withdrawn, as a banner's callback would: track gives no id and sends nothing.
    let (app, _dir, url) = page_and_app(None).await;

    let result = chromium("noconsent", &url).await;

    assert_eq!(result["eventId"], Value::Null, "{result}");
    assert_eq!(result["sent"], json!([]), "{result}");
    assert_eq!(app.graph.request_count(), 0);
    assert_eq!(app.graph.accepted_count(), 0);
}

#[tokio::test]
async fn with_consent_pending_nothing_is_sent_or_stored_until_it_is_granted() {
    let (app, _dir, url) = page_and_app_with(None, true).await;

    let result = chromium("pending", &url).await;

    assert_eq!(result["before"], Value::Null, "{result}");
    let cookies_before = result["cookiesBefore"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!cookies_before.contains(&json!("_fbc")), "{result}");
    let event_id = result["eventId"]
        .as_str()
        .expect("an id once consent is given");
    let accepted = app.graph.wait_for_accepted(1, WAIT).await;
    assert_eq!(
        accepted.len(),
        1,
        "only the event after consent: {accepted:?}"
    );
    assert_eq!(accepted[0]["event_id"], event_id);
    // The click id still counts: the fbclid seen on load becomes the event's fbc.
    assert!(accepted[0]["user_data"]["fbc"]
        .as_str()
        .is_some_and(|f| f.ends_with(FBCLID)));
}
