//! Webhook sources end to end: real sample payloads (Supabase database webhooks, Chatwoot)
//! through the real HTTP server, the mapping rules and the inbox, to the Graph stand-in.

use std::path::PathBuf;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::helpers::{sha256, spawn_app_with, TestApp, SECRET, WAIT};

/// The README's Supabase rules (plus a CRM stage rule on a `crm` source of Supabase kind).
const RULES: &str = r#"
[[rules]]
name = "lead-created"
source = "supabase"
when = 'type == "INSERT" && table == "leads"'
event = "Lead"
[rules.fields]
event_id = '"lead-" + string(record.id)'
email = "record.email"
phone = "record.phone"
full_name = "record.full_name"
external_id = "string(record.id)"
fbc = "record.fbc"
fbp = "record.fbp"
client_ip_address = "record.client_ip"
client_user_agent = "record.user_agent"

[[rules]]
name = "lead-won"
source = "supabase"
when = 'type == "UPDATE" && record.status == "won" && old_record.status != "won"'
event = "Purchase"
[rules.fields]
event_id = '"won-" + string(record.id)'
email = "record.email"
external_id = "string(record.id)"
value = "record.deal_value"
currency = '"BRL"'

[[rules]]
name = "lead-booked"
source = "supabase"
when = 'type == "UPDATE" && record.status == "booked" && old_record.status != "booked"'
event = "Schedule"
[rules.fields]
event_id = '"booked-" + string(record.id)'
email = "record.email"
external_id = "string(record.id)"

[[rules]]
name = "crm-stage"
source = "crm"
when = 'type == "UPDATE" && record.stage != old_record.stage'
[rules.fields]
event_name = "record.stage"
event_id = '"stage-" + string(record.lead_id) + "-" + record.stage'
action_source = '"system_generated"'
lead_id = "record.lead_id"
custom_data.event_source = '"crm"'
custom_data.lead_event_source = '"In-house CRM"'
"#;

const CONFIG: &str = r#"
[sources.crm]
kind = "supabase"

[sources.chatwoot]
currency = "BRL"
"#;

const SUPABASE_TOKEN: &str = "supabase-url-token-0123456789abcdef";
const CHATWOOT_TOKEN: &str = "chatwoot-url-token-0123456789abcdef";
const CHATWOOT_SECRET: &str = "cw_secret";

fn sample(name: &str) -> Value {
    let path = format!("{}/tests/samples/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("sample exists");
    serde_json::from_str(&text).expect("sample parses")
}

/// Files the service reads; kept for the test's life.
struct Files {
    _dir: tempfile::TempDir,
    rules: PathBuf,
    config: PathBuf,
}

fn files(rules: &str) -> Files {
    let dir = tempfile::tempdir().expect("tempdir");
    let rules_path = dir.path().join("rules.toml");
    std::fs::write(&rules_path, rules).expect("write rules");
    let config = dir.path().join("capi-bridge.toml");
    std::fs::write(&config, CONFIG).expect("write config");
    Files {
        _dir: dir,
        rules: rules_path,
        config,
    }
}

async fn spawn(files: &Files) -> TestApp {
    spawn_app_with(&[
        ("RULES_FILE", files.rules.to_str().expect("path")),
        ("CAPI_BRIDGE_CONFIG", files.config.to_str().expect("path")),
        ("SUPABASE_WEBHOOK_TOKEN", SUPABASE_TOKEN),
        ("CHATWOOT_WEBHOOK_TOKEN", CHATWOOT_TOKEN),
        ("CHATWOOT_WEBHOOK_SECRET", CHATWOOT_SECRET),
    ])
    .await
}

impl TestApp {
    async fn post_source(
        &self,
        path: &str,
        body: &[u8],
        headers: &[(&str, String)],
    ) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!("{}{path}", self.address))
            .header("content-type", "application/json")
            .body(body.to_vec());
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// As Supabase sends it: the trigger's `Authorization: Bearer` header.
    async fn supabase(&self, payload: &Value) -> (u16, Value) {
        self.post_source(
            "/v1/sources/supabase",
            payload.to_string().as_bytes(),
            &[("authorization", format!("Bearer {SECRET}"))],
        )
        .await
    }

    /// As Chatwoot ≥ 4.11.2 sends it: signed over `timestamp.body`.
    async fn chatwoot_signed(&self, payload: &Value, delivery: &str, at: i64) -> (u16, Value) {
        let body = payload.to_string();
        let signature = chatwoot_signature(&at.to_string(), body.as_bytes());
        self.post_source(
            "/v1/sources/chatwoot",
            body.as_bytes(),
            &[
                ("x-chatwoot-signature", signature),
                ("x-chatwoot-timestamp", at.to_string()),
                ("x-chatwoot-delivery", delivery.to_owned()),
            ],
        )
        .await
    }

    async fn source_counts(&self, source: &str) -> Value {
        let listing: Value = self
            .http
            .get(format!("{}/v1/sources", self.address))
            .bearer_auth(SECRET)
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json");
        listing["sources"]
            .as_array()
            .and_then(|all| all.iter().find(|s| s["name"] == source))
            .map(|s| s["counts"].clone())
            .unwrap_or(Value::Null)
    }

    /// Waits for a counter to reach `n` (they are written just after the answer).
    async fn wait_for_count(&self, source: &str, outcome: &str, n: i64) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let counts = self.source_counts(source).await;
            if counts[outcome].as_i64() == Some(n) {
                return counts;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{source}.{outcome} never reached {n}: {counts}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

fn chatwoot_signature(timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(CHATWOOT_SECRET.as_bytes()).expect("key");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[tokio::test]
async fn supabase_insert_update_and_delete_become_exactly_the_expected_events() {
    let files = files(RULES);
    let app = spawn(&files).await;

    let (status, receipt) = app.supabase(&sample("supabase-leads-insert.json")).await;
    assert_eq!(status, 202, "{receipt}");
    assert_eq!(receipt["status"], "queued");
    let (status, _) = app
        .supabase(&sample("supabase-leads-update-booked.json"))
        .await;
    assert_eq!(status, 202);
    let (status, _) = app
        .supabase(&sample("supabase-leads-update-won.json"))
        .await;
    assert_eq!(status, 202);
    // A DELETE matches no rule: acknowledged (so pg_net is done with it), counted, not kept.
    let (status, receipt) = app.supabase(&sample("supabase-leads-delete.json")).await;
    assert_eq!(
        (status, receipt["status"].as_str()),
        (200, Some("unmatched"))
    );

    let accepted = app.graph.wait_for_accepted(3, WAIT).await;
    let by_id = |id: &str| {
        accepted
            .iter()
            .find(|e| e["event_id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no {id} in {accepted:?}"))
    };
    let mut lead = by_id("lead-1");
    // Exactly what Meta receives (event_time is when the payload was mapped).
    let event_time = lead
        .as_object_mut()
        .and_then(|e| e.remove("event_time"))
        .and_then(|t| t.as_i64())
        .expect("event_time");
    assert!((now() - event_time).abs() < 60);
    let sample = sample("supabase-leads-insert.json");
    let record = &sample["record"];
    assert_eq!(
        lead,
        json!({
            "event_name": "Lead",
            "event_id": "lead-1",
            "action_source": "other",
            "user_data": {
                "em": [sha256("ana.souza@example.com")],
                "ph": [sha256("5511999990000")],
                "fn": [sha256("ana")],
                "ln": [sha256("souza")],
                "external_id": [sha256("1")],
                "fbc": record["fbc"],
                "fbp": record["fbp"],
                "client_ip_address": record["client_ip"],
                "client_user_agent": record["user_agent"],
            }
        })
    );
    let user = &lead["user_data"];
    assert_eq!(user["em"], json!([sha256("ana.souza@example.com")]));
    assert_eq!(user["ph"], json!([sha256("5511999990000")]));
    assert_eq!(user["fn"], json!([sha256("ana")]));
    assert_eq!(user["ln"], json!([sha256("souza")]));
    assert_eq!(user["external_id"], json!([sha256("1")]));
    assert_eq!(
        user["fbc"],
        "fb.1.1763647391482.IwAR2F4-dbP0l7Mn1IawQQGCINEz7PYX"
    );
    assert_eq!(user["client_ip_address"], "2001:db8::42");
    let schedule = by_id("booked-1");
    assert_eq!(schedule["event_name"], "Schedule");
    let purchase = by_id("won-1");
    assert_eq!(purchase["event_name"], "Purchase");
    assert_eq!(purchase["custom_data"]["value"], json!(1299.9));
    assert_eq!(purchase["custom_data"]["currency"], "BRL");
    app.wait_for_count("supabase", "mapped", 3).await;
    // Counts written once a second.
    let counts = app.wait_for_count("supabase", "received", 4).await;
    assert_eq!(counts["unmatched"], 1, "{counts}");
    assert_eq!(app.graph.accepted_count(), 3);
}

#[tokio::test]
async fn a_redelivered_webhook_is_a_duplicate_not_a_second_conversion() {
    let files = files(RULES);
    let app = spawn(&files).await;
    let won = sample("supabase-leads-update-won.json");

    assert_eq!(app.supabase(&won).await.0, 202);
    app.graph.wait_for_accepted(1, WAIT).await;
    // The user re-sends the failed requests from net._http_response: same payload again.
    assert_eq!(app.supabase(&won).await.0, 202);
    app.wait_for_count("supabase", "mapped", 2).await;

    let detail = app.get_event("won-1").await;
    assert_eq!(detail["state"], "delivered");
    assert_eq!(app.graph.accepted_count(), 1, "{:?}", app.graph.accepted());
}

#[tokio::test]
async fn a_url_token_authenticates_senders_that_cannot_set_headers() {
    let files = files(RULES);
    let app = spawn(&files).await;
    let body = sample("supabase-leads-insert.json").to_string();

    let (status, _) = app
        .post_source(
            &format!("/v1/sources/supabase/{SUPABASE_TOKEN}"),
            body.as_bytes(),
            &[],
        )
        .await;
    assert_eq!(status, 202);
    let (status, error) = app
        .post_source(
            "/v1/sources/supabase/wrong-token-0123456789abcdef",
            body.as_bytes(),
            &[],
        )
        .await;
    assert_eq!(status, 401);
    assert_eq!(error["error"]["message"], "wrong token for source supabase");
    let (status, _) = app
        .post_source("/v1/sources/supabase", body.as_bytes(), &[])
        .await;
    assert_eq!(status, 401);
    // Another source's token is not this one's.
    let (status, _) = app
        .post_source(
            &format!("/v1/sources/supabase/{CHATWOOT_TOKEN}"),
            body.as_bytes(),
            &[],
        )
        .await;
    assert_eq!(status, 401);
    let (status, error) = app
        .post_source("/v1/sources/nowhere", body.as_bytes(), &[])
        .await;
    assert_eq!(status, 404, "{error}");

    app.graph.wait_for_accepted(1, WAIT).await;
    assert_eq!(app.graph.accepted()[0]["event_id"], "lead-1");
}

#[tokio::test]
async fn a_rule_that_fails_parks_the_payload_until_the_rule_is_fixed_and_replayed() {
    // `deal_valeu`: a typo the payload does not have.
    let broken = RULES.replace(
        "value = \"record.deal_value\"",
        "value = \"record.deal_valeu\"",
    );
    let files = files(&broken);
    let app = spawn(&files).await;

    let (status, _) = app
        .supabase(&sample("supabase-leads-update-won.json"))
        .await;
    assert_eq!(
        status, 202,
        "stored before the answer, whatever the rules make of it"
    );
    app.wait_for_count("supabase", "parked", 1).await;
    let parked: Value = app
        .http
        .get(format!("{}/v1/inbox/parked", app.address))
        .bearer_auth(SECRET)
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    let entry = &parked["parked"][0];
    assert_eq!(entry["source"], "supabase");
    assert_eq!(entry["problems"][0]["rule"], "lead-won");
    assert_eq!(entry["problems"][0]["field"], "fields.value");
    assert!(
        entry["problems"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("deal_valeu")),
        "{parked}"
    );
    assert!(
        !parked.to_string().contains("Ana"),
        "no payload values: {parked}"
    );
    assert_eq!(app.graph.accepted_count(), 0);

    // Fix the rule, restart, replay the parked payloads.
    std::fs::write(&files.rules, RULES).expect("fix rules");
    let app = app.restart().await;
    let replayed: Value = app
        .http
        .post(format!("{}/v1/inbox/replay", app.address))
        .bearer_auth(SECRET)
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(replayed["requeued"], 1);
    let accepted = app.graph.wait_for_accepted(1, WAIT).await;
    assert_eq!(accepted[0]["event_id"], "won-1");
    assert_eq!(accepted[0]["custom_data"]["value"], json!(1299.9));
}

#[tokio::test]
async fn crm_stage_changes_become_conversion_leads_events_in_order() {
    let files = files(RULES);
    let app = spawn(&files).await;
    let stages = ["Marketing Qualified Lead", "Sales Opportunity", "Converted"];
    let mut previous = "Initial Lead from Facebook".to_owned();
    for stage in stages {
        let payload = json!({"type": "UPDATE", "table": "deals", "schema": "public",
            "record": {"id": 9, "lead_id": 1_893_456_789_012_345_i64, "stage": stage},
            "old_record": {"id": 9, "lead_id": 1_893_456_789_012_345_i64, "stage": previous}});
        let (status, _) = app
            .post_source(
                "/v1/sources/crm",
                payload.to_string().as_bytes(),
                &[("x-webhook-secret", SECRET.to_owned())],
            )
            .await;
        assert_eq!(status, 202);
        previous = stage.to_owned();
    }

    let accepted = app.graph.wait_for_accepted(3, WAIT).await;
    let names: Vec<&str> = accepted
        .iter()
        .filter_map(|e| e["event_name"].as_str())
        .collect();
    assert_eq!(names, stages);
    for event in &accepted {
        assert_eq!(event["action_source"], "system_generated");
        assert_eq!(event["custom_data"]["event_source"], "crm");
        assert_eq!(event["custom_data"]["lead_event_source"], "In-house CRM");
        assert_eq!(
            event["user_data"]["lead_id"],
            json!(1_893_456_789_012_345_i64)
        );
    }
}

fn label_added(label: &str) -> Value {
    let mut payload = sample("chatwoot-conversation_status_changed.json");
    payload["event"] = json!("conversation_updated");
    payload["account"] = json!({"id": 1, "name": "Acme"});
    payload["labels"] = json!(["hot", label]);
    payload["custom_attributes"] = json!({"deal_value": 1200});
    payload["meta"]["sender"]["email"] = json!("Jane@Example.com");
    payload["meta"]["sender"]["phone_number"] = json!("+5511999990000");
    payload["changed_attributes"] = json!([
        {"label_list": {"previous_value": ["hot"], "current_value": ["hot", label]}}
    ]);
    payload
}

#[tokio::test]
async fn chatwoot_signed_label_changes_become_lead_and_purchase_once() {
    let files = files(RULES);
    let app = spawn(&files).await;

    let (status, receipt) = app
        .chatwoot_signed(&label_added("lead"), "delivery-1", now())
        .await;
    assert_eq!(status, 202, "{receipt}");
    // Chatwoot's job retry reuses the delivery id: acknowledged, not queued again.
    let (status, receipt) = app
        .chatwoot_signed(&label_added("lead"), "delivery-1", now())
        .await;
    assert_eq!(
        (status, receipt["status"].as_str()),
        (200, Some("duplicate"))
    );
    let (status, _) = app
        .chatwoot_signed(&label_added("paid"), "delivery-2", now())
        .await;
    assert_eq!(status, 202);

    let accepted = app.graph.wait_for_accepted(2, WAIT).await;
    let conversation = label_added("lead")["id"].clone();
    let lead = &accepted[0];
    assert_eq!(lead["event_name"], "Lead");
    assert_eq!(
        lead["event_id"],
        format!("chatwoot-a1-c{conversation}-lead")
    );
    assert_eq!(lead["action_source"], "chat");
    assert_eq!(lead["user_data"]["em"], json!([sha256("jane@example.com")]));
    assert_eq!(lead["user_data"]["ph"], json!([sha256("5511999990000")]));
    let purchase = &accepted[1];
    assert_eq!(purchase["event_name"], "Purchase");
    assert_eq!(purchase["custom_data"]["value"], json!(1200));
    assert_eq!(purchase["custom_data"]["currency"], "BRL");
    let counts = app.wait_for_count("chatwoot", "received", 3).await;
    assert_eq!(counts["duplicate"], 1, "{counts}");
}

#[tokio::test]
async fn chatwoot_forged_and_stale_signatures_are_refused_with_their_reason() {
    let files = files(RULES);
    let app = spawn(&files).await;
    let body = label_added("lead").to_string();
    let at = now();

    let forged = chatwoot_signature(&at.to_string(), b"{\"event\":\"something else\"}");
    let (status, error) = app
        .post_source(
            "/v1/sources/chatwoot",
            body.as_bytes(),
            &[
                ("x-chatwoot-signature", forged),
                ("x-chatwoot-timestamp", at.to_string()),
            ],
        )
        .await;
    assert_eq!(status, 401);
    assert!(error["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("does not match")));

    let (status, error) = app
        .chatwoot_signed(&label_added("lead"), "d-old", at - 600)
        .await;
    assert_eq!(status, 401);
    assert!(error["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("5 minutes")));

    // Unsigned and without a token: refused, since a signing secret is configured.
    let (status, _) = app
        .post_source("/v1/sources/chatwoot", body.as_bytes(), &[])
        .await;
    assert_eq!(status, 401);
    // Refused deliveries are not counted: after one good one, the count is one.
    assert_eq!(
        app.chatwoot_signed(&label_added("lead"), "d-good", now())
            .await
            .0,
        202
    );
    let counts = app.wait_for_count("chatwoot", "received", 1).await;
    assert_eq!(counts["received"], 1, "{counts}");
    app.graph.wait_for_accepted(1, WAIT).await;
    assert_eq!(app.graph.accepted_count(), 1);
}

#[tokio::test]
async fn chatwoot_automation_events_come_unsigned_to_the_url_token() {
    let files = files(RULES);
    let app = spawn(&files).await;
    let mut payload = sample("chatwoot-conversation_status_changed.json");
    payload["event"] = json!("automation_event.conversation_updated");
    payload["labels"] = json!(["won"]);
    payload["custom_attributes"] = json!({"deal_value": "349.90", "currency": "usd"});
    payload["meta"]["sender"]["email"] = json!("jane@example.com");
    payload["channel"] = json!("Channel::Whatsapp");
    payload["additional_attributes"]["referral"] = json!({"ctwa_clid": "ARAkLkA8rmlFeiCktEJQ"});

    let (status, _) = app
        .post_source(
            &format!("/v1/sources/chatwoot/{CHATWOOT_TOKEN}"),
            payload.to_string().as_bytes(),
            &[],
        )
        .await;
    assert_eq!(status, 202);

    let accepted = app.graph.wait_for_accepted(1, WAIT).await;
    let purchase = &accepted[0];
    assert_eq!(purchase["event_name"], "Purchase");
    assert_eq!(purchase["action_source"], "business_messaging");
    assert_eq!(purchase["messaging_channel"], "whatsapp");
    assert_eq!(purchase["user_data"]["ctwa_clid"], "ARAkLkA8rmlFeiCktEJQ");
    assert_eq!(purchase["custom_data"]["value"], json!(349.9));
    assert_eq!(purchase["custom_data"]["currency"], "USD");
}

#[tokio::test]
async fn every_chatwoot_event_type_is_acknowledged_and_unknown_ones_are_not_refused() {
    let files = files(RULES);
    let app = spawn(&files).await;
    let mut files_sent = 0;
    for file in [
        "chatwoot-conversation_opened.json",
        "chatwoot-conversation_resolved.json",
        "chatwoot-conversation_status_changed.json",
        "chatwoot-conversation_updated-template.json",
        "chatwoot-message_created-api_channel.json",
        "chatwoot-message_created.json",
        "chatwoot-message_updated.json",
        "chatwoot-webwidget_triggered.json",
    ] {
        let (status, receipt) = app
            .chatwoot_signed(&sample(file), &format!("d-{file}"), now())
            .await;
        assert!(status == 200 || status == 202, "{file}: {status} {receipt}");
        files_sent += 1;
    }
    for event in [
        "contact_created",
        "inbox_created",
        "conversation_typing_on",
        "message_incoming",
    ] {
        let payload = json!({"event": event, "id": 1, "name": "x", "account": {"id": 1}});
        let (status, receipt) = app.chatwoot_signed(&payload, event, now()).await;
        assert_eq!(
            (status, receipt["status"].as_str()),
            (200, Some("unmatched")),
            "{event}"
        );
        files_sent += 1;
    }
    // A conversation created with contact details is a Contact event.
    let mut created = sample("chatwoot-conversation_status_changed.json");
    created["event"] = json!("conversation_created");
    created["meta"]["sender"]["email"] = json!("jane@example.com");
    let (status, _) = app.chatwoot_signed(&created, "d-created", now()).await;
    assert_eq!(status, 202);
    files_sent += 1;

    let accepted = app.graph.wait_for_accepted(1, WAIT).await;
    assert_eq!(accepted[0]["event_name"], "Contact");
    assert_eq!(accepted[0]["action_source"], "chat");
    let counts = app.wait_for_count("chatwoot", "received", files_sent).await;
    assert!(counts["unmatched"].as_i64().unwrap_or(0) >= 4, "{counts}");
    assert_eq!(app.graph.accepted_count(), 1);
}

#[tokio::test]
async fn rules_can_be_tried_over_http_without_storing_anything() {
    let files = files(RULES);
    let app = spawn(&files).await;
    let response = app
        .http
        .post(format!("{}/v1/rules/test?source=supabase", app.address))
        .bearer_auth(SECRET)
        .json(&sample("supabase-leads-insert.json"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let preview: Value = response.json().await.expect("json");
    assert_eq!(preview["outcome"], "events", "{preview}");
    assert_eq!(preview["events"][0]["rule"], "lead-created");
    assert_eq!(
        preview["events"][0]["data"]["user_data"]["em"],
        json!([sha256("ana.souza@example.com")])
    );
    assert!(
        app.stored("lead-1").await.is_none(),
        "a preview stores nothing"
    );
}

#[tokio::test]
async fn a_trigger_carrying_only_an_id_gets_its_user_data_from_a_supabase_lookup() {
    const KEY: &str = "sb_secret_Zm9yLXRlc3RzLW9ubHktMDEyMzQ1Njc4OQ";
    let supabase = crate::postgrest_stand_in::PostgrestStandIn::start(KEY).await;
    supabase.insert_table(
        "leads",
        vec![json!({"id": 77, "email": "Bruno@Example.com", "phone": "+55 21 98888-7777"})],
    );
    let rules = r#"
        [[rules]]
        name = "payment"
        source = "supabase"
        when = 'type == "INSERT" && table == "payments"'
        event = "Purchase"
        lookups = [{ name = "lead", table = "leads", value = "record.lead_id" }]
        [rules.fields]
        event_id = '"payment-" + string(record.id)'
        email = "lead.email"
        phone = "lead.phone"
        value = "record.amount"
        currency = '"BRL"'
    "#;
    let files = files(rules);
    let app = spawn_app_with(&[
        ("RULES_FILE", files.rules.to_str().expect("path")),
        ("SUPABASE_URL", supabase.url.as_str()),
        ("SUPABASE_SERVICE_KEY", KEY),
    ])
    .await;
    let payload = json!({"type": "INSERT", "table": "payments", "schema": "public",
        "record": {"id": 5, "lead_id": 77, "amount": 99.5}, "old_record": null});

    assert_eq!(app.supabase(&payload).await.0, 202);

    let accepted = app.graph.wait_for_accepted(1, WAIT).await;
    let purchase = &accepted[0];
    assert_eq!(purchase["event_id"], "payment-5");
    assert_eq!(
        purchase["user_data"]["em"],
        json!([sha256("bruno@example.com")])
    );
    assert_eq!(
        purchase["user_data"]["ph"],
        json!([sha256("5521988887777")])
    );
    assert_eq!(purchase["custom_data"]["value"], json!(99.5));
    let lookups = supabase.requests();
    assert_eq!(lookups.len(), 1);
    assert_eq!(lookups[0].header("apikey"), Some(KEY));
    assert_eq!(lookups[0].header("authorization"), None);
}

#[tokio::test]
async fn sources_work_the_same_on_postgres() {
    let files = files(RULES);
    let schema = crate::helpers::new_postgres_schema();
    let app = crate::helpers::spawn_app_in_schema(
        &schema,
        &[
            ("RULES_FILE", files.rules.to_str().expect("path")),
            ("CAPI_BRIDGE_CONFIG", files.config.to_str().expect("path")),
            ("CHATWOOT_WEBHOOK_SECRET", CHATWOOT_SECRET),
        ],
    )
    .await;

    assert_eq!(
        app.supabase(&sample("supabase-leads-insert.json")).await.0,
        202
    );
    assert_eq!(
        app.chatwoot_signed(&label_added("lead"), "pg-1", now())
            .await
            .0,
        202
    );
    let (status, receipt) = app
        .chatwoot_signed(&label_added("lead"), "pg-1", now())
        .await;
    assert_eq!(
        (status, receipt["status"].as_str()),
        (200, Some("duplicate"))
    );

    let accepted = app.graph.wait_for_accepted(2, WAIT).await;
    let mut names: Vec<&str> = accepted
        .iter()
        .filter_map(|e| e["event_name"].as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["Lead", "Lead"]);
    app.wait_for_count("supabase", "mapped", 1).await;
    app.wait_for_count("chatwoot", "duplicate", 1).await;
}

#[tokio::test]
async fn a_burst_with_one_bad_payload_and_a_repeat_parks_only_the_bad_one() {
    let files = files(RULES);
    let app = spawn(&files).await;
    let insert = |id: i64| {
        let mut payload = sample("supabase-leads-insert.json");
        payload["record"]["id"] = json!(id);
        payload["record"]["email"] = json!(format!("lead{id}@example.com"));
        payload
    };
    let mut sent = Vec::new();
    for id in 1..=40 {
        sent.push(insert(id));
        if id == 20 {
            // The same row delivered twice in a row, and a won lead without a deal value
            // (Meta refuses a Purchase without one).
            sent.push(insert(id));
            let mut no_value = sample("supabase-leads-update-won.json");
            no_value["record"]["deal_value"] = Value::Null;
            sent.push(no_value);
        }
    }
    // Concurrently, so the inbox worker takes many at once.
    let answers = post_all_at_once(&app, &sent).await;
    assert!(answers.iter().all(|s| *s == 202), "{answers:?}");

    let accepted = app.graph.wait_for_accepted(40, WAIT).await;
    let ids: std::collections::BTreeSet<String> = accepted
        .iter()
        .filter_map(|e| e["event_id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(ids.len(), 40, "{ids:?}");
    assert!(ids.iter().all(|id| id.starts_with("lead-")));
    // Counters are written once a second, after each inbox pass: wait for both.
    app.wait_for_count("supabase", "parked", 1).await;
    let counts = app.wait_for_count("supabase", "mapped", 41).await;
    assert_eq!(counts["parked"], 1, "{counts}");
    let parked = app.store.parked_payloads(10).await.expect("parked");
    assert_eq!(parked.len(), 1);
    assert!(
        parked[0].problems.to_string().contains("value"),
        "{parked:?}"
    );
    assert_eq!(app.graph.accepted_count(), 40);
}

/// Posts every payload at once and returns the statuses.
async fn post_all_at_once(app: &TestApp, payloads: &[Value]) -> Vec<u16> {
    let mut tasks = tokio::task::JoinSet::new();
    for payload in payloads {
        let (http, url, body) = (
            app.http.clone(),
            format!("{}/v1/sources/supabase", app.address),
            payload.to_string(),
        );
        tasks.spawn(async move {
            http.post(url)
                .bearer_auth(SECRET)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        });
    }
    let mut statuses = Vec::new();
    while let Some(status) = tasks.join_next().await {
        statuses.push(status.unwrap_or(0));
    }
    statuses
}

#[tokio::test]
async fn crm_webhooks_signed_with_the_secret_are_accepted_and_their_retries_are_duplicates() {
    use base64::Engine as _;
    let files = files(RULES);
    let app = spawn(&files).await;
    let payload = json!({"type": "UPDATE", "table": "deals", "schema": "public",
        "record": {"id": 9, "lead_id": 1_893_456_789_012_345_i64, "stage": "Converted"},
        "old_record": {"id": 9, "lead_id": 1_893_456_789_012_345_i64, "stage": "Sales Opportunity"}});
    let body = payload.to_string();
    let standard = |id: &str, at: i64| {
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
        mac.update(format!("{id}.{at}.{body}").as_bytes());
        let signature =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        vec![
            ("webhook-id", id.to_owned()),
            ("webhook-timestamp", at.to_string()),
            ("webhook-signature", format!("v1,{signature}")),
        ]
    };

    let (status, receipt) = app
        .post_source(
            "/v1/sources/crm",
            body.as_bytes(),
            &standard("msg_1", now()),
        )
        .await;
    assert_eq!(status, 202, "{receipt}");
    // The sender's retry of the same message: acknowledged, not queued again.
    let (status, receipt) = app
        .post_source(
            "/v1/sources/crm",
            body.as_bytes(),
            &standard("msg_1", now()),
        )
        .await;
    assert_eq!(
        (status, receipt["status"].as_str()),
        (200, Some("duplicate"))
    );
    // Stale and tampered ones are refused.
    let (status, _) = app
        .post_source(
            "/v1/sources/crm",
            body.as_bytes(),
            &standard("msg_2", now() - 600),
        )
        .await;
    assert_eq!(status, 401);
    let (status, _) = app
        .post_source(
            "/v1/sources/crm",
            b"{\"type\": \"UPDATE\"}",
            &standard("msg_3", now()),
        )
        .await;
    assert_eq!(status, 401);

    // GitHub style on another source.
    let insert = sample("supabase-leads-insert.json").to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(insert.as_bytes());
    let signed = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let (status, _) = app
        .post_source(
            "/v1/sources/supabase",
            insert.as_bytes(),
            &[("x-signature-256", signed)],
        )
        .await;
    assert_eq!(status, 202);

    let accepted = app.graph.wait_for_accepted(2, WAIT).await;
    let mut names: Vec<&str> = accepted
        .iter()
        .filter_map(|e| e["event_name"].as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["Converted", "Lead"]);
}
