//! `POST /v1/events`: shapes, authentication, error bodies, dedup, dry-run.

use serde_json::{json, Value};

use crate::helpers::{lead, seed_event, sha256, spawn_app, spawn_app_with, SECRET, TOKEN, WAIT};

#[tokio::test]
async fn the_seed_example_arrives_at_the_graph_with_the_right_hashes() {
    // Arrange
    let app = spawn_app().await;

    // Act
    let response = app.post_events(&seed_event()).await;

    // Assert
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["accepted"], 1);
    assert_eq!(body["duplicates"], 0);
    assert_eq!(body["events"][0]["status"], "queued");
    let event_id = body["events"][0]["event_id"]
        .as_str()
        .expect("id")
        .to_owned();
    // The seed's phone has no country code and no DEFAULT_COUNTRY is set: dropped, said so.
    assert_eq!(body["warnings"][0]["field"], "phone");

    let accepted = app.graph.wait_for_accepted(1, WAIT).await;
    let sent = &accepted[0];
    assert_eq!(sent["event_id"], event_id.as_str());
    assert_eq!(sent["event_name"], "Lead");
    assert_eq!(sent["action_source"], "other");
    assert_eq!(sent["user_data"]["em"], json!([sha256("user@example.com")]));
    assert!(sent["user_data"].get("ph").is_none());
    assert_eq!(sent["custom_data"]["source"], "Landing Page");
    assert_eq!(sent["custom_data"]["campaign"], "Test Campaign");

    let request = &app.graph.requests()[0];
    assert_eq!(request.path, "/v25.0/1234567890/events");
    assert_eq!(request.body["access_token"], TOKEN);
    assert!(request.body["partner_agent"]
        .as_str()
        .is_some_and(|a| a.starts_with("capibridge")));
    assert!(
        request.query.as_deref().is_none_or(|q| !q.contains(TOKEN)),
        "the token must never be in a URL"
    );

    let detail = app.wait_for_state(&event_id, "delivered").await;
    assert_eq!(detail.attempts, 1);
    assert_eq!(
        detail.payload["user_data"]["em"],
        json!([sha256("user@example.com")])
    );
}

#[tokio::test]
async fn the_seed_phone_is_completed_with_default_country() {
    let app = spawn_app_with(&[("DEFAULT_COUNTRY", "US")]).await;
    let mut event = seed_event();
    event["phone"] = json!("(650) 555-1212");
    let response = app.post_events(&event).await;
    assert_eq!(response.status(), 202);
    let sent = app.graph.wait_for_accepted(1, WAIT).await;
    assert_eq!(sent[0]["user_data"]["ph"], json!([sha256("16505551212")]));
}

#[tokio::test]
async fn an_array_and_metas_envelope_are_accepted_and_the_test_code_is_sent() {
    let app = spawn_app().await;
    let response = app
        .post_events(&json!([lead("arr-1"), lead("arr-2")]))
        .await;
    assert_eq!(response.status(), 202);
    let response = app
        .post_events(&json!({"data": [lead("env-1")], "test_event_code": "TEST4242"}))
        .await;
    assert_eq!(response.status(), 202);
    app.graph.wait_for_accepted(3, WAIT).await;
    let with_code: Vec<_> = app
        .graph
        .requests()
        .into_iter()
        .filter(|r| r.body["test_event_code"] == "TEST4242")
        .collect();
    assert_eq!(with_code.len(), 1);
    assert_eq!(with_code[0].body["data"][0]["event_id"], "env-1");
}

#[tokio::test]
async fn requests_without_the_right_secret_get_401() {
    let app = spawn_app().await;
    let body = serde_json::to_vec(&lead("auth-1")).expect("json");

    let none = app.post_raw(body.clone(), None).await;
    assert_eq!(none.status(), 401);
    let error: Value = none.json().await.expect("json");
    assert_eq!(error["error"]["code"], "unauthorized");

    let wrong = app
        .post_raw(
            body.clone(),
            Some(("authorization", "Bearer not-the-secret")),
        )
        .await;
    assert_eq!(wrong.status(), 401);

    for (header, value) in [
        ("authorization", format!("Bearer {SECRET}")),
        ("x-webhook-secret", SECRET.to_owned()),
        ("x-api-key", SECRET.to_owned()),
    ] {
        let ok = app.post_raw(body.clone(), Some((header, &value))).await;
        assert_eq!(ok.status(), 202, "{header}");
    }
}

#[tokio::test]
async fn a_second_secret_allows_rotation() {
    let app = spawn_app_with(&[(
        "WEBHOOK_SECRET",
        "old-secret-0123456789,new-secret-0123456789",
    )])
    .await;
    let body = serde_json::to_vec(&lead("rot-1")).expect("json");
    for secret in ["old-secret-0123456789", "new-secret-0123456789"] {
        let response = app
            .post_raw(body.clone(), Some(("x-api-key", secret)))
            .await;
        assert_eq!(response.status(), 202);
    }
}

#[tokio::test]
async fn malformed_json_gets_400_with_the_position() {
    let app = spawn_app().await;
    let response = app
        .post_raw(
            "{\n  \"event_name\": \"Lead\",\n  oops\n}",
            Some(("x-api-key", SECRET)),
        )
        .await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.expect("json");
    assert_eq!(error["error"]["code"], "malformed_json");
    assert_eq!(error["error"]["line"], 3);
    assert_eq!(error["error"]["column"], 3);
}

#[tokio::test]
async fn a_body_over_the_limit_and_over_1000_events_get_413() {
    let app = spawn_app_with(&[("BODY_LIMIT_BYTES", "2000")]).await;
    let big = json!({"event_name": "Lead", "email": "a@example.com", "custom_data": {"pad": "x".repeat(3000)}});
    let response = app.post_events(&big).await;
    assert_eq!(response.status(), 413);
    let error: Value = response.json().await.expect("json");
    assert_eq!(error["error"]["code"], "payload_too_large");

    let app = spawn_app().await;
    let many: Vec<Value> = (0..1001).map(|i| lead(&format!("many-{i}"))).collect();
    let response = app.post_events(&Value::Array(many)).await;
    assert_eq!(response.status(), 413);
    let error: Value = response.json().await.expect("json");
    assert!(error["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("1000")));
}

#[tokio::test]
async fn one_invalid_event_gets_422_listing_every_problem_and_queues_nothing() {
    let app = spawn_app().await;
    let old = chrono::Utc::now().timestamp() - 8 * 24 * 3600;
    let body = json!([
        lead("fine-1"),
        {"event_id": "bad-1", "email": "a@example.com"},
        {"event_name": "Purchase", "event_id": "bad-2", "email": "b@example.com", "event_time": old},
        {"event_name": "Lead", "event_id": "bad-3", "action_source": "website", "email": "c@example.com"},
        {"event_name": "Lead", "event_id": "bad-4", "action_source": "carrier-pigeon", "email": "d@example.com"},
        {"event_name": "Lead", "event_id": "bad-5", "gender": "f", "first_name": "Ann"},
    ]);
    let response = app.post_events(&body).await;
    assert_eq!(response.status(), 422);
    let error: Value = response.json().await.expect("json");
    assert_eq!(error["error"]["code"], "invalid_events");
    let problems: Vec<(u64, String)> = error["error"]["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .map(|p| {
            (
                p["event_index"].as_u64().expect("index"),
                p["field"].as_str().expect("field").to_owned(),
            )
        })
        .collect();
    for expected in [
        (1, "event_name"),
        (2, "event_time"),
        (2, "custom_data.value"),
        (2, "custom_data.currency"),
        (3, "event_source_url"),
        (3, "user_data.client_user_agent"),
        (4, "action_source"),
        (5, "user_data"),
    ] {
        assert!(
            problems.contains(&(expected.0, expected.1.to_owned())),
            "missing {expected:?} in {problems:?}"
        );
    }
    assert!(
        problems.iter().all(|(i, _)| *i != 0),
        "the valid event has no problem"
    );
    // Nothing was queued, not even the valid event.
    assert!(app.stored("fine-1").await.is_none());
}

#[tokio::test]
async fn a_duplicate_event_id_is_acknowledged_but_not_sent_twice() {
    let app = spawn_app().await;
    let first = app.post_events(&lead("dup-1")).await;
    assert_eq!(first.status(), 202);
    app.graph.wait_for_accepted(1, WAIT).await;

    let again: Value = app
        .post_events(&lead("dup-1"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(again["accepted"], 0);
    assert_eq!(again["duplicates"], 1);
    assert_eq!(again["events"][0]["status"], "duplicate");

    // A different name with the same id is a different event for Meta.
    let mut purchase = lead("dup-1");
    purchase["event_name"] = json!("Purchase");
    purchase["value"] = json!(10);
    purchase["currency"] = json!("BRL");
    let other: Value = app.post_events(&purchase).await.json().await.expect("json");
    assert_eq!(other["events"][0]["status"], "queued");

    app.graph.wait_for_accepted(2, WAIT).await;
    let ids: Vec<_> = app
        .graph
        .accepted()
        .iter()
        .map(|e| (e["event_name"].clone(), e["event_id"].clone()))
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
}

#[tokio::test]
async fn appointment_is_sent_as_schedule() {
    let app = spawn_app().await;
    let mut event = lead("appt-1");
    event["event_name"] = json!("appointment");
    let body: Value = app.post_events(&event).await.json().await.expect("json");
    assert_eq!(body["events"][0]["event_name"], "Schedule");
    let sent = app.graph.wait_for_accepted(1, WAIT).await;
    assert_eq!(sent[0]["event_name"], "Schedule");
}

#[tokio::test]
async fn dry_run_stores_and_shows_events_but_never_sends() {
    let app = spawn_app_with(&[("META_ACCESS_TOKEN", ""), ("META_PIXEL_ID", "")]).await;
    let body: Value = app
        .post_events(&lead("dry-1"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(body["dry_run"], true);
    assert_eq!(body["events"][0]["status"], "dry_run");

    let shown = app.get_event("dry-1").await;
    assert_eq!(shown["state"], "dry_run");
    assert_eq!(
        shown["payload"]["user_data"]["em"],
        json!([sha256("dry-1@example.com")])
    );
    let ready = app.readyz().await;
    assert_eq!(ready["dry_run"], true);
    assert_eq!(app.graph.request_count(), 0);
}

#[tokio::test]
async fn health_readiness_and_me_answer() {
    let app = spawn_app().await;
    let health = app
        .http
        .get(format!("{}/healthz", app.address))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    let ready = app.readyz().await;
    assert_eq!(ready["status"], "ok");
    assert_eq!(ready["workers"], "running");
    assert_eq!(ready["pixels"][0]["state"], "running");

    let me = app
        .http
        .get(format!("{}/v1/me", app.address))
        .send()
        .await
        .expect("me");
    assert_eq!(me.status(), 401);
    let me: Value = app
        .http
        .get(format!("{}/v1/me", app.address))
        .bearer_auth(SECRET)
        .send()
        .await
        .expect("me")
        .json()
        .await
        .expect("json");
    assert_eq!(me["ok"], true);
    assert_eq!(me["pixel_id"], "1234567890");

    let missing = app
        .http
        .get(format!("{}/v1/events/nope", app.address))
        .bearer_auth(SECRET)
        .send()
        .await
        .expect("get");
    assert_eq!(missing.status(), 404);
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    use hmac::Mac as _;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

#[tokio::test]
async fn a_body_signed_with_the_secret_is_accepted_github_style() {
    let app = spawn_app().await;
    let body = serde_json::to_vec(&lead("signed-1")).expect("json");
    let signature = format!(
        "sha256={}",
        hex::encode(hmac_sha256(SECRET.as_bytes(), &body))
    );
    let ok = app
        .post_raw(body.clone(), Some(("x-signature-256", &signature)))
        .await;
    assert_eq!(ok.status(), 202);

    let forged = format!(
        "sha256={}",
        hex::encode(hmac_sha256(b"another-secret", &body))
    );
    let refused = app
        .post_raw(body.clone(), Some(("x-signature-256", &forged)))
        .await;
    assert_eq!(refused.status(), 401);
    // A valid signature over a different body is refused too.
    let tampered = serde_json::to_vec(&lead("signed-2")).expect("json");
    let refused = app
        .post_raw(tampered, Some(("x-signature-256", &signature)))
        .await;
    assert_eq!(refused.status(), 401);
}

#[tokio::test]
async fn standard_webhooks_are_verified_and_their_retries_are_duplicates() {
    use base64::Engine as _;
    let app = spawn_app().await;
    let send = |id: &'static str, timestamp: i64, event: Value| {
        let app = &app;
        async move {
            let body = serde_json::to_vec(&event).expect("json");
            let signed = [
                id.as_bytes(),
                b".",
                timestamp.to_string().as_bytes(),
                b".",
                &body,
            ]
            .concat();
            let signature = format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD
                    .encode(hmac_sha256(SECRET.as_bytes(), &signed))
            );
            app.http
                .post(format!("{}/v1/events", app.address))
                .header("content-type", "application/json")
                .header("webhook-id", id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", signature)
                .body(body)
                .send()
                .await
                .expect("request")
        }
    };
    let now = chrono::Utc::now().timestamp();
    // No event_id: one is derived from webhook-id, so the sender's retry is a duplicate.
    let event = json!({"event_name": "Lead", "email": "sw@example.com"});
    let first: Value = send("msg_1", now, event.clone())
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(first["events"][0]["event_id"], "wh-msg_1");
    assert_eq!(first["events"][0]["status"], "queued");
    let retry: Value = send("msg_1", now + 5, event.clone())
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(retry["events"][0]["status"], "duplicate");
    // Outside the ±5-minute window: refused, whatever the signature.
    assert_eq!(send("msg_2", now - 600, event.clone()).await.status(), 401);
    app.graph.wait_for_accepted(1, WAIT).await;
    assert_eq!(app.graph.accepted_count(), 1);
}
