//! Match quality end to end: events with and without match keys through the API, one with an
//! invalid phone dropped, one filled by the match-key memory; `GET /v1/quality` reports the
//! shares, the fills and the drops (never the dropped value), and Meta's own Event Match
//! Quality from the stand-in's Dataset Quality API, or why it is not available.

use serde_json::{json, Value};

use crate::helpers::{spawn_app, TestApp, PIXEL, SECRET, TOKEN, WAIT};

async fn quality(app: &TestApp, query: &str) -> reqwest::Response {
    app.http
        .get(format!("{}/v1/quality{query}", app.address))
        .bearer_auth(SECRET)
        .send()
        .await
        .expect("request")
}

/// Polls the report until the counters (written once a second) hold `n` events.
async fn report_with(app: &TestApp, n: i64) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let response = quality(app, "?days=1").await;
        assert_eq!(response.status(), 200);
        let report: Value = response.json().await.expect("json");
        let counted: i64 = report["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| e["events"].as_i64().unwrap_or(0))
            .sum();
        if counted >= n {
            assert_eq!(counted, n, "{report:#}");
            return report;
        }
        assert!(tokio::time::Instant::now() < deadline, "{report:#}");
        // Polling a condition (the counters are written every second), not an outcome.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn event<'r>(report: &'r Value, name: &str) -> &'r Value {
    report["events"]
        .as_array()
        .and_then(|events| events.iter().find(|e| e["event_name"] == name))
        .unwrap_or_else(|| panic!("no {name} in {report:#}"))
}

/// `(events, share, filled_from_memory)` of one match key.
fn key(event: &Value, key: &str) -> (i64, f64, i64) {
    let entry = event["keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|k| k["key"] == key))
        .unwrap_or_else(|| panic!("no {key} in {event:#}"));
    (
        entry["events"].as_i64().expect("events"),
        entry["share"].as_f64().expect("share"),
        entry["filled_from_memory"].as_i64().expect("filled"),
    )
}

const INVALID_PHONE: &str = "98-76";

async fn send_events(app: &TestApp) -> Value {
    let now = chrono::Utc::now().timestamp();
    // Everything Meta matches on.
    let rich = json!({
        "event_name": "Lead",
        "event_id": "q-lead-rich",
        "event_time": now,
        "email": "rich.person@example.com",
        "phone": "+55 11 98765-4321",
        "first_name": "Rica",
        "last_name": "Pessoa",
        "external_id": "crm-7",
        "fbc": format!("fb.1.{}.IwAR-quality", (now - 60) * 1000),
        "fbp": "fb.1.1700000000000.123456789",
        "client_ip_address": "203.0.113.7",
        "client_user_agent": "Mozilla/5.0 (quality test)",
        "lead_id": 1234567890123456_i64,
    });
    assert_eq!(app.post_events(&rich).await.status(), 202);
    // Only an email; the phone cannot be a phone number and is dropped.
    let thin = json!({
        "event_name": "Lead",
        "event_id": "q-lead-thin",
        "event_time": now,
        "email": "thin.person@example.com",
        "phone": INVALID_PHONE,
    });
    let response = app.post_events(&thin).await;
    assert_eq!(response.status(), 202);
    let receipt: Value = response.json().await.expect("json");
    // The same delivery again: a duplicate, not counted twice.
    assert_eq!(app.post_events(&thin).await.status(), 202);
    // The rich person buys, from the CRM, with only their email: the memory fills the rest.
    let purchase = json!({
        "event_name": "Purchase",
        "event_id": "q-purchase",
        "event_time": now,
        "action_source": "system_generated",
        "email": "rich.person@example.com",
        "value": 99.9,
        "currency": "BRL",
    });
    let response = app.post_events(&purchase).await;
    assert_eq!(response.status(), 202);
    let bought: Value = response.json().await.expect("json");
    let filled: Vec<&str> = bought["events"][0]["filled_from_memory"]
        .as_array()
        .expect("filled from memory")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for field in [
        "fbc",
        "fbp",
        "ph",
        "fn",
        "ln",
        "external_id",
        "client_ip_address",
    ] {
        assert!(filled.contains(&field), "{field} not filled: {bought:#}");
    }
    receipt
}

#[tokio::test]
async fn the_report_counts_match_keys_fills_and_drops_and_shows_meta_emq() {
    let app = spawn_app().await;
    let thin_receipt = send_events(&app).await;
    // Meta's view needs the events there first; its answer is then cached.
    app.graph.wait_for_accepted(3, WAIT).await;
    let report = report_with(&app, 3).await;
    let text = report.to_string();

    let lead = event(&report, "Lead");
    assert_eq!(lead["events"], 2);
    assert_eq!(lead["pixel_id"], PIXEL);
    assert_eq!(key(lead, "em"), (2, 1.0, 0));
    assert_eq!(key(lead, "ph"), (1, 0.5, 0));
    for k in [
        "fn_ln",
        "external_id",
        "fbc",
        "fbp",
        "ip",
        "user_agent",
        "lead_id",
    ] {
        assert_eq!(key(lead, k), (1, 0.5, 0), "{k}");
    }
    let purchase = event(&report, "Purchase");
    assert_eq!(purchase["events"], 1);
    assert_eq!(key(purchase, "em"), (1, 1.0, 0));
    for k in [
        "ph",
        "fn_ln",
        "external_id",
        "fbc",
        "fbp",
        "ip",
        "user_agent",
    ] {
        assert_eq!(key(purchase, k), (1, 1.0, 1), "{k}");
    }
    // A lead id finds the person but is never filled in (Meta would refuse it).
    assert_eq!(key(purchase, "lead_id"), (0, 0.0, 0));

    // The dropped phone: by field and reason, once (the duplicate is not counted), never shown.
    let warning = thin_receipt["warnings"][0]["reason"]
        .as_str()
        .expect("the phone is dropped with a warning");
    let reason = warning.split(';').next().unwrap_or("").trim();
    assert_eq!(
        report["dropped"],
        json!([{"pixel_id": PIXEL, "event_name": "Lead", "field": "ph", "reason": reason, "count": 1}])
    );
    assert!(!text.contains(INVALID_PHONE), "{text}");
    for raw in ["rich.person@example.com", "203.0.113.7", "crm-7", "Rica"] {
        assert!(!text.contains(raw), "{raw} in {text}");
    }

    // Meta's own EMQ, from the Dataset Quality API (the stand-in computes it from what it got).
    let meta = &report["meta"][0];
    assert_eq!(meta["pixel_id"], PIXEL);
    assert!(meta["not_available"].is_null(), "{meta:#}");
    let meta_lead = meta["events"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["event_name"] == "Lead"))
        .expect("Meta's Lead");
    let coverage = |identifier: &str| {
        meta_lead["match_key_coverage"]
            .as_array()
            .and_then(|keys| keys.iter().find(|k| k["identifier"] == identifier))
            .and_then(|k| k["percentage"].as_f64())
    };
    assert_eq!(coverage("email"), Some(100.0));
    assert_eq!(coverage("phone"), Some(50.0));
    assert!(meta_lead["composite_score"]
        .as_f64()
        .is_some_and(|s| (0.0..=10.0).contains(&s)));
    // The token went in a header, never the URL; the pixel was asked for as a dataset.
    let asked = app.graph.dataset_quality_requests();
    assert_eq!(asked.len(), 1);
    let query = asked[0].query.clone().unwrap_or_default();
    assert!(asked[0].path.ends_with("/dataset_quality"));
    assert!(query.contains(&format!("dataset_id={PIXEL}")), "{query}");
    assert!(!query.contains(TOKEN), "{query}");

    // Asked again: Meta's answer comes from the cache.
    assert_eq!(quality(&app, "?days=7").await.status(), 200);
    assert_eq!(app.graph.dataset_quality_requests().len(), 1);
}

#[tokio::test]
async fn meta_emq_is_not_available_when_the_token_lacks_the_permission() {
    let app = spawn_app().await;
    app.graph.deny_dataset_quality(true);
    let response = quality(&app, "").await;
    assert_eq!(response.status(), 200);
    let report: Value = response.json().await.expect("json");
    let meta = &report["meta"][0];
    assert!(meta["events"].is_null(), "{meta:#}");
    let reason = meta["not_available"].as_str().expect("a reason");
    assert!(reason.starts_with("not available: "), "{reason}");
    assert!(reason.contains("meta error 10"), "{reason}");
    assert!(reason.contains("ads_read"), "{reason}");
    assert!(!reason.contains(TOKEN), "{reason}");
    // Cached too: the permission is not asked about on every page view.
    assert_eq!(quality(&app, "").await.status(), 200);
    assert_eq!(app.graph.dataset_quality_requests().len(), 1);
}

#[tokio::test]
async fn the_report_needs_the_secret_and_a_sane_number_of_days() {
    let app = spawn_app().await;
    let anonymous = app
        .http
        .get(format!("{}/v1/quality", app.address))
        .send()
        .await
        .expect("request");
    assert_eq!(anonymous.status(), 401);
    for days in ["0", "367", "many"] {
        let response = quality(&app, &format!("?days={days}")).await;
        assert_eq!(response.status(), 400, "days={days}");
        let body: Value = response.json().await.expect("json error shape");
        assert!(body["error"]["message"].is_string());
    }
    let empty: Value = quality(&app, "?days=30").await.json().await.expect("json");
    assert_eq!(empty["events"], json!([]));
    assert_eq!(empty["dropped"], json!([]));
}
