//! Several pixels (datasets) in one instance: each with its own token, API version and test
//! code; requests choose one by header, field, rule, source or site; a paused pixel never
//! holds up the others. (The single `META_PIXEL_ID` setup is what every other test runs.)

use serde_json::{json, Value};

use crate::helpers::{lead, sha256, spawn_app_with, TestApp, SECRET, WAIT};

const SHOP: &str = "1111111111";
const SHOP_TOKEN: &str = "EAAB-shop-token";
const CLINIC: &str = "2222222222";
const CLINIC_TOKEN: &str = "EAAB-clinic-token";
const SITE: &str = "pk_clinic_landing";
const ORIGIN: &str = "https://clinic.example.com";
const SUPABASE_TOKEN: &str = "supabase-url-token-0123456789abcdef";

fn config(default_pixel: Option<&str>) -> String {
    let default = default_pixel
        .map(|d| format!("default_pixel = \"{d}\"\n"))
        .unwrap_or_default();
    format!(
        r#"{default}
[pixels.shop]
pixel_id = "{SHOP}"
test_event_code = "TESTSHOP1"

[pixels.clinic]
pixel_id = "{CLINIC}"
access_token_env = "CLINIC_TOKEN"
api_version = "v24.0"

[sites.{SITE}]
origins = ["{ORIGIN}"]
events = ["Lead"]
pixel = "clinic"

[sources.supabase]
pixel = "shop"

[[rules]]
name = "lead-created"
source = "supabase"
when = 'type == "INSERT"'
event = "Lead"
[rules.fields]
event_id = '"lead-" + string(record.id)'
email = "record.email"

[[rules]]
name = "lead-won"
source = "supabase"
when = 'type == "UPDATE" && record.status == "won"'
event = "Purchase"
pixel = "clinic"
[rules.fields]
event_id = '"won-" + string(record.id)'
email = "record.email"
value = "record.deal_value"
currency = '"BRL"'
"#
    )
}

/// Two pixels beside the stand-in's own; the single-pixel variables are removed.
async fn spawn(default_pixel: Option<&str>) -> (TestApp, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("capi-bridge.toml");
    std::fs::write(&path, config(default_pixel)).expect("config");
    let app = spawn_app_with(&[
        ("META_ACCESS_TOKEN", ""),
        ("META_PIXEL_ID", ""),
        ("META_ACCESS_TOKEN_SHOP", SHOP_TOKEN),
        ("CLINIC_TOKEN", CLINIC_TOKEN),
        ("SUPABASE_WEBHOOK_TOKEN", SUPABASE_TOKEN),
        ("CAPI_BRIDGE_CONFIG", path.to_str().expect("path")),
    ])
    .await;
    app.graph.add_pixel(SHOP, SHOP_TOKEN);
    app.graph.add_pixel(CLINIC, CLINIC_TOKEN);
    (app, dir)
}

impl TestApp {
    async fn post_with_pixel(&self, body: &Value, pixel: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/events", self.address))
            .bearer_auth(SECRET)
            .header("x-capi-pixel", pixel)
            .json(body)
            .send()
            .await
            .expect("request")
    }

    /// The path and token of the Graph request that carried `event_id`.
    fn delivered_to(&self, event_id: &str) -> Option<(String, String, Value)> {
        self.graph.requests().into_iter().find_map(|r| {
            let carried = r.body["data"]
                .as_array()?
                .iter()
                .any(|e| e["event_id"] == event_id);
            (carried && r.status == 200).then(|| {
                (
                    r.path.clone(),
                    r.body["access_token"].as_str().unwrap_or("").to_owned(),
                    r.body["test_event_code"].clone(),
                )
            })
        })
    }
}

#[tokio::test]
async fn each_request_reaches_the_pixel_it_chose_with_that_pixels_credentials() {
    let (app, _dir) = spawn(Some("shop")).await;
    // No choice: the default pixel.
    assert_eq!(app.post_events(&lead("to-default")).await.status(), 202);
    // By name in the header, by id in the header.
    assert_eq!(
        app.post_with_pixel(&lead("by-header"), "clinic")
            .await
            .status(),
        202
    );
    assert_eq!(
        app.post_with_pixel(&lead("by-header-id"), CLINIC)
            .await
            .status(),
        202
    );
    // A `pixel` field on the event wins over the header; the envelope's applies to the rest.
    let mut own = lead("by-field");
    own["pixel"] = json!("shop");
    let envelope = json!({"pixel": "clinic", "data": [lead("by-envelope"), own]});
    assert_eq!(app.post_with_pixel(&envelope, "shop").await.status(), 202);
    app.graph.wait_for_accepted(5, WAIT).await;

    let shop_path = format!("/v25.0/{SHOP}/events");
    let clinic_path = format!("/v24.0/{CLINIC}/events");
    for (event_id, path, token) in [
        ("to-default", &shop_path, SHOP_TOKEN),
        ("by-header", &clinic_path, CLINIC_TOKEN),
        ("by-header-id", &clinic_path, CLINIC_TOKEN),
        ("by-envelope", &clinic_path, CLINIC_TOKEN),
        ("by-field", &shop_path, SHOP_TOKEN),
    ] {
        let (got_path, got_token, test_code) = app
            .delivered_to(event_id)
            .unwrap_or_else(|| panic!("{event_id} was delivered"));
        assert_eq!(&got_path, path, "{event_id}");
        assert_eq!(got_token, token, "{event_id}");
        // Each pixel's own test event code.
        let expected_code = if token == SHOP_TOKEN {
            json!("TESTSHOP1")
        } else {
            Value::Null
        };
        assert_eq!(test_code, expected_code, "{event_id}");
    }
    // The `pixel` field chooses; it is never sent to Meta.
    assert!(app
        .graph
        .accepted()
        .iter()
        .all(|e| e.get("pixel").is_none()));
    // Stored under the pixel, with where it came from.
    let stored = app.stored("by-header").await.expect("stored");
    assert_eq!(stored.pixel_id, CLINIC);
    assert_eq!(stored.source.as_deref(), Some("api"));
    app.stop().await;
}

#[tokio::test]
async fn an_unknown_pixel_or_no_choice_without_a_default_is_refused_naming_the_field() {
    let (app, _dir) = spawn(None).await;
    let response = app.post_events(&lead("no-choice")).await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.expect("json");
    let problem = &body["error"]["problems"][0];
    assert_eq!(problem["field"], "pixel", "{body}");
    assert!(
        problem["reason"]
            .as_str()
            .is_some_and(|r| r.contains("several pixels are configured (clinic, shop)")),
        "{body}"
    );
    let response = app.post_with_pixel(&lead("typo"), "shoes").await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["problems"][0]["field"], "pixel");
    assert_eq!(body["error"]["problems"][0]["event_id"], "typo");
    assert!(app.stored("typo").await.is_none());
    // The same event id for two pixels is two conversions, not a duplicate.
    assert_eq!(
        app.post_with_pixel(&lead("same-id"), "shop").await.status(),
        202
    );
    let second: Value = app
        .post_with_pixel(&lead("same-id"), "clinic")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(second["accepted"], 1, "{second}");
    app.graph.wait_for_accepted(2, WAIT).await;
    app.stop().await;
}

#[tokio::test]
async fn a_paused_pixel_never_holds_up_the_others() {
    let (app, _dir) = spawn(Some("shop")).await;
    // The clinic's token was revoked: Meta answers 190 and that pixel pauses.
    app.graph.add_pixel(CLINIC, "EAAB-a-newer-clinic-token");
    assert_eq!(
        app.post_with_pixel(&lead("clinic-1"), "clinic")
            .await
            .status(),
        202
    );
    app.graph
        .wait_until(WAIT, "the clinic's refusal", |g| {
            g.requests().iter().any(|r| r.status == 400)
        })
        .await;
    let ready = app.readyz().await;
    let clinic = ready["pixels"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "clinic"))
        .cloned()
        .expect("clinic in readyz");
    assert_eq!(clinic["state"], "paused", "{ready}");
    // Meanwhile the shop's events keep flowing, many of them.
    for i in 0..20 {
        let response = app.post_events(&lead(&format!("shop-{i}"))).await;
        assert_eq!(response.status(), 202);
    }
    app.graph.wait_for_accepted(20, WAIT).await;
    assert!(app.graph.accepted().iter().all(|e| e["event_id"]
        .as_str()
        .is_some_and(|id| id.starts_with("shop-"))));
    let shop = app.readyz().await["pixels"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "shop").cloned())
        .expect("shop");
    assert_eq!(shop["state"], "running");
    // Kept: waiting, or leased by one of the paused pixel's probes at this very moment.
    let clinic_state = app.stored("clinic-1").await.expect("kept").state;
    assert!(
        clinic_state == "queued" || clinic_state == "delivering",
        "the paused pixel's event must wait, not {clinic_state}"
    );
    // Each pixel's queue, apart: the clinic's one event waits while the shop's drain (their
    // rows settle just after Meta's answer, hence the wait).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let queues = app.readyz().await["queue"]["by_pixel"].clone();
        let waiting = |pixel: &str| {
            queues
                .as_array()
                .and_then(|q| q.iter().find(|p| p["pixel_id"] == pixel))
                .map(|p| p["queued"].clone())
        };
        assert_eq!(waiting(CLINIC), Some(json!(1)), "{queues}");
        if waiting(SHOP) == Some(json!(0)) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{queues}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The clinic's token is fixed: its event goes out after the next probe.
    app.graph.add_pixel(CLINIC, CLINIC_TOKEN);
    app.graph.wait_for_accepted(21, WAIT).await;
    assert_eq!(
        app.delivered_to("clinic-1").map(|d| d.0),
        Some(format!("/v24.0/{CLINIC}/events"))
    );
    app.stop().await;
}

#[tokio::test]
async fn a_sites_events_go_to_its_pixel_whatever_the_page_says() {
    let (app, _dir) = spawn(Some("shop")).await;
    let response = app
        .http
        .post(format!("{}/v1/collect", app.address))
        .header("origin", ORIGIN)
        .header("content-type", "text/plain;charset=UTF-8")
        .header("user-agent", "Mozilla/5.0 (pixels test)")
        .body(
            json!({
                "site_key": SITE,
                "event_name": "Lead",
                "event_id": "page-lead",
                "event_source_url": format!("{ORIGIN}/offer"),
                "pixel": "shop",
                "user_data": {"em": "visitor@example.com"}
            })
            .to_string(),
        )
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 204);
    app.graph.wait_for_accepted(1, WAIT).await;
    let (path, token, _) = app.delivered_to("page-lead").expect("delivered");
    assert_eq!(path, format!("/v24.0/{CLINIC}/events"));
    assert_eq!(token, CLINIC_TOKEN);
    let stored = app.stored("page-lead").await.expect("stored");
    assert_eq!(stored.source.as_deref(), Some(&*format!("site:{SITE}")));
    app.stop().await;
}

#[tokio::test]
async fn a_source_and_a_rule_choose_pixels_for_mapped_events() {
    let (app, _dir) = spawn(None).await;
    let post = |payload: Value| {
        let url = format!("{}/v1/sources/supabase/{SUPABASE_TOKEN}", app.address);
        let http = app.http.clone();
        async move {
            http.post(url)
                .json(&payload)
                .send()
                .await
                .expect("request")
                .status()
                .as_u16()
        }
    };
    let record = json!({"id": 7, "email": "Buyer@Example.com", "status": "won", "deal_value": 990});
    // The source's pixel (shop) for the Lead; the rule's (clinic) for the Purchase.
    assert_eq!(
        post(json!({"type": "INSERT", "table": "leads", "schema": "public", "record": record, "old_record": null})).await,
        202
    );
    assert_eq!(
        post(json!({"type": "UPDATE", "table": "leads", "schema": "public", "record": record, "old_record": {"id": 7, "status": "new"}})).await,
        202
    );
    app.graph.wait_for_accepted(2, WAIT).await;
    let (lead_path, _, _) = app.delivered_to("lead-7").expect("lead delivered");
    let (won_path, won_token, _) = app.delivered_to("won-7").expect("purchase delivered");
    assert_eq!(lead_path, format!("/v25.0/{SHOP}/events"));
    assert_eq!(won_path, format!("/v24.0/{CLINIC}/events"));
    assert_eq!(won_token, CLINIC_TOKEN);
    let purchase = app
        .graph
        .accepted()
        .into_iter()
        .find(|e| e["event_id"] == "won-7")
        .expect("purchase");
    assert_eq!(purchase["user_data"]["em"][0], sha256("buyer@example.com"));
    assert_eq!(
        app.stored("won-7").await.expect("stored").source.as_deref(),
        Some("supabase")
    );
    app.stop().await;
}

#[tokio::test]
async fn a_pixel_name_nobody_configured_stops_the_service_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("capi-bridge.toml");
    std::fs::write(
        &path,
        config(Some("shop")).replace(
            "pixel = \"clinic\"\n[rules.fields]",
            "pixel = \"clnic\"\n[rules.fields]",
        ),
    )
    .expect("config");
    let env = capi_bridge::config::Env::from_pairs([
        ("META_ACCESS_TOKEN_SHOP", SHOP_TOKEN),
        ("CLINIC_TOKEN", CLINIC_TOKEN),
        ("CAPI_BRIDGE_CONFIG", path.to_str().expect("path")),
    ]);
    let problems = capi_bridge::config::load(&env, None).expect_err("refused");
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("rule lead-won: pixel: unknown pixel \"clnic\"")),
        "{problems:?}"
    );
}
