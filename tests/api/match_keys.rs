//! Match-key memory (issue 4), black-box: a later event about the same person is completed with
//! what an earlier one carried, as the Graph API receives it; expired memory is not used; and
//! nothing raw is stored.

use serde_json::{json, Value};

use crate::helpers::{sha256, spawn_app_on_postgres, spawn_app_with, TestApp, WAIT};

const DAY: i64 = 24 * 60 * 60;
const EMAIL: &str = "Ana.Silva@Example.com";
const PHONE: &str = "+55 11 98765-4321";
const UA: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/141.0";
const FBP: &str = "fb.1.1596403881668.1116446470";
const IP: &str = "2001:db8::7";

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The click id of an ad click at unix seconds `at`.
fn fbc(at: i64) -> String {
    format!("fb.1.{}.IwAR2F4-dbP0l7Mn1IawQQGCINEz7PYX", at * 1000)
}

/// The landing-page Lead: everything a browser knows.
fn website_lead(event_id: &str, event_time: i64) -> Value {
    json!({
        "event_name": "Lead", "event_id": event_id, "event_time": event_time,
        "action_source": "website", "event_source_url": "https://lp.example.com/oferta",
        "email": EMAIL, "phone": PHONE, "first_name": "Ana", "last_name": "Silva",
        "external_id": "CRM-42",
        "fbc": fbc(event_time - 60), "fbp": FBP,
        "client_ip_address": IP, "client_user_agent": UA
    })
}

/// The CRM's Purchase: one identifier, nothing from a browser.
fn crm_purchase(event_id: &str, user_data: Value) -> Value {
    json!({
        "event_name": "Purchase", "event_id": event_id, "event_time": now(),
        "action_source": "system_generated", "value": 1490, "currency": "BRL",
        "custom_data": {"lead_event_source": "In-house CRM", "event_source": "crm"},
        "user_data": user_data
    })
}

/// Posts `event`, expects 202 and returns its receipt.
async fn post(app: &TestApp, event: &Value) -> Value {
    let response = app.post_events(event).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.expect("json");
    body["events"][0].clone()
}

/// The events the Graph stand-in has accepted, by id, once `ids` all have arrived.
async fn sent(app: &TestApp, ids: &[&str]) -> std::collections::HashMap<String, Value> {
    let by_id = |events: Vec<Value>| -> std::collections::HashMap<String, Value> {
        events
            .into_iter()
            .map(|e| (e["event_id"].as_str().unwrap_or_default().to_owned(), e))
            .collect()
    };
    app.graph
        .wait_until(WAIT, &format!("events {ids:?}"), |graph| {
            let accepted = by_id(graph.accepted());
            ids.iter().all(|id| accepted.contains_key(*id))
        })
        .await;
    by_id(app.graph.accepted())
}

/// The Lead, then (after a restart, when `restart`: the memory is read back from storage, not
/// from the process) the CRM's Purchases.
async fn a_later_crm_purchase_is_sent_with_what_the_lead_carried(mut app: TestApp, restart: bool) {
    // Arrange: the Lead, three days ago.
    let lead = post(&app, &website_lead("lead-42", now() - 3 * DAY)).await;
    assert!(
        lead.get("filled_from_memory").is_none(),
        "nothing to recall for the first event: {lead}"
    );
    if restart {
        sent(&app, &["lead-42"]).await;
        app = app.restart().await;
    }
    let app = &app;

    // Act: the CRM's Purchases, one knowing only the external id, one only the email.
    let by_id = post(
        app,
        &crm_purchase("purchase-42", json!({"external_id": "crm-42"})),
    )
    .await;
    let by_email = post(
        app,
        &crm_purchase("purchase-43", json!({"email": "ana.silva@example.com"})),
    )
    .await;

    // Assert: the receipts say what was filled, and Meta gets it.
    assert_eq!(
        by_id["filled_from_memory"],
        json!([
            "fbc",
            "fbp",
            "client_ip_address",
            "client_user_agent",
            "em",
            "ph",
            "fn",
            "ln"
        ])
    );
    assert_eq!(
        by_email["filled_from_memory"],
        json!([
            "fbc",
            "fbp",
            "client_ip_address",
            "client_user_agent",
            "ph",
            "fn",
            "ln",
            "external_id"
        ])
    );
    let sent = sent(app, &["lead-42", "purchase-42", "purchase-43"]).await;
    let lead = &sent["lead-42"]["user_data"];
    for purchase_id in ["purchase-42", "purchase-43"] {
        let purchase = &sent[purchase_id];
        assert_eq!(purchase["action_source"], "system_generated");
        let user = &purchase["user_data"];
        assert_eq!(user["fbc"], lead["fbc"], "{purchase_id}");
        assert_eq!(user["fbp"], FBP);
        assert_eq!(user["client_ip_address"], IP);
        assert_eq!(user["client_user_agent"], UA);
        assert_eq!(user["em"], json!([sha256("ana.silva@example.com")]));
        assert_eq!(user["ph"], json!([sha256("5511987654321")]));
        assert_eq!(user["external_id"], json!([sha256("crm-42")]));
    }
    // The stored payload is what was sent.
    let stored = app.stored("purchase-42").await.expect("stored");
    assert_eq!(stored.payload, sent["purchase-42"]);
}

#[tokio::test]
async fn a_later_crm_purchase_is_sent_with_the_leads_browser_identifiers() {
    let app = spawn_app_with(&[]).await;
    a_later_crm_purchase_is_sent_with_what_the_lead_carried(app, false).await;
}

#[tokio::test]
async fn the_memory_outlives_a_restart() {
    let app = spawn_app_with(&[]).await;
    a_later_crm_purchase_is_sent_with_what_the_lead_carried(app, true).await;
}

#[tokio::test]
async fn the_memory_outlives_a_restart_on_postgres() {
    let app = spawn_app_on_postgres().await;
    a_later_crm_purchase_is_sent_with_what_the_lead_carried(app, true).await;
}

#[tokio::test]
async fn memory_past_its_lifetime_is_not_used() {
    // Arrange: memory for one day, and a Lead two days ago.
    let app = spawn_app_with(&[("MATCH_KEY_MEMORY_DAYS", "1")]).await;
    post(&app, &website_lead("lead-old", now() - 2 * DAY)).await;

    // Act
    let receipt = post(
        &app,
        &crm_purchase("purchase-late", json!({"external_id": "crm-42"})),
    )
    .await;

    // Assert: sent as it came.
    assert!(receipt.get("filled_from_memory").is_none(), "{receipt}");
    let sent = sent(&app, &["lead-old", "purchase-late"]).await;
    let user = sent["purchase-late"]["user_data"]
        .as_object()
        .expect("user_data");
    assert_eq!(
        user.keys().map(String::as_str).collect::<Vec<_>>(),
        ["external_id"]
    );
}

#[tokio::test]
async fn memory_days_0_turns_the_memory_off() {
    let app = spawn_app_with(&[("MATCH_KEY_MEMORY_DAYS", "0")]).await;
    post(&app, &website_lead("lead-off", now() - DAY)).await;
    let receipt = post(
        &app,
        &crm_purchase("purchase-off", json!({"external_id": "crm-42"})),
    )
    .await;
    assert!(receipt.get("filled_from_memory").is_none(), "{receipt}");
    let sent = sent(&app, &["lead-off", "purchase-off"]).await;
    assert!(sent["purchase-off"]["user_data"].get("fbc").is_none());
}

#[tokio::test]
async fn a_website_event_keeps_its_own_browser() {
    // A later website visit from another browser gets the click and the person, never the
    // earlier browser's IP address or user agent (Meta wants the event's own).
    let app = spawn_app_with(&[]).await;
    post(&app, &website_lead("lead-web", now() - DAY)).await;
    let receipt = post(
        &app,
        &json!({
            "event_name": "Contact", "event_id": "contact-web", "action_source": "website",
            "event_source_url": "https://shop.example.com/contato",
            "external_id": "crm-42", "client_user_agent": "Safari/18.0"
        }),
    )
    .await;
    assert_eq!(
        receipt["filled_from_memory"],
        json!(["fbc", "em", "ph", "fn", "ln"])
    );
    let sent = sent(&app, &["lead-web", "contact-web"]).await;
    let user = &sent["contact-web"]["user_data"];
    assert_eq!(user["client_user_agent"], "Safari/18.0");
    assert!(user.get("client_ip_address").is_none());
    assert!(user.get("fbp").is_none());
}

#[tokio::test]
async fn raw_contact_information_never_reaches_the_database() {
    // Arrange and act: a Lead and a Purchase remembered and recalled.
    let app = spawn_app_with(&[]).await;
    post(&app, &website_lead("lead-raw", now() - DAY)).await;
    post(
        &app,
        &crm_purchase("purchase-raw", json!({"external_id": "crm-42"})),
    )
    .await;
    sent(&app, &["lead-raw", "purchase-raw"]).await;

    // Assert: the memory (written at the latest when the service stops) holds hashes and
    // browser identifiers only ...
    let (_, dir, _, _) = app.stop().await;
    let db = dir.path().join("capi-bridge.db");
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!(
        "sqlite://{}?mode=ro",
        db.display()
    ))
    .await
    .expect("open the database");
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("select identity, field, value from match_key order by identity, field")
            .fetch_all(&mut conn)
            .await
            .expect("match_key");
    let fields: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(
        fields.into_iter().collect::<Vec<_>>(),
        [
            "client_ip_address",
            "client_user_agent",
            "em",
            "external_id",
            "fbc",
            "fbp",
            "fn",
            "ln",
            "ph"
        ]
    );
    let identities: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        identities.into_iter().collect::<Vec<_>>(),
        [
            format!("e:{}", sha256("ana.silva@example.com")),
            format!("x:{}", sha256("crm-42")),
        ]
    );
    for (_, field, value) in &rows {
        if ["em", "ph", "fn", "ln", "external_id"].contains(&field.as_str()) {
            let hashes: Vec<String> = serde_json::from_str(value).expect("array");
            assert!(
                hashes
                    .iter()
                    .all(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())),
                "{field}: {value}"
            );
        }
    }
    drop(conn);

    // ... and no table, index or journal page anywhere holds a raw value.
    let raw = [
        EMAIL,
        "ana.silva@example.com",
        "98765-4321",
        "5511987654321",
        "CRM-42",
        "crm-42",
        "Silva",
    ];
    let contains = |bytes: &[u8], value: &str| {
        bytes
            .windows(value.len())
            .any(|w| w.eq_ignore_ascii_case(value.as_bytes()))
    };
    let mut user_agent_seen = false;
    for entry in std::fs::read_dir(dir.path()).expect("dir") {
        let path = entry.expect("entry").path();
        let bytes = std::fs::read(&path).expect("read");
        // The scan finds what is there: the user agent is stored (sent and remembered) as is.
        user_agent_seen |= contains(&bytes, UA);
        for value in raw {
            assert!(
                !contains(&bytes, value),
                "{value} found in {}",
                path.display()
            );
        }
    }
    assert!(user_agent_seen, "the scan read no data");
}
