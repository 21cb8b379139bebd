//! The service end to end on Postgres: the same black-box paths as on SQLite.

use std::collections::HashSet;

use serde_json::{json, Value};
use sqlx::{Connection, Executor, PgConnection, Row};

use crate::graph_stand_in::Scripted;
use crate::helpers::{lead, sha256, spawn_app_on_postgres, TOKEN, WAIT};

#[tokio::test]
async fn events_are_deduplicated_batched_and_delivered_on_postgres() {
    let app = spawn_app_on_postgres().await;
    let events: Vec<Value> = (0..2500).map(|i| lead(&format!("pg-{i}"))).collect();
    for chunk in events.chunks(1000) {
        let response = app.post_events(&Value::Array(chunk.to_vec())).await;
        assert_eq!(response.status(), 202);
    }
    let again: Value = app
        .post_events(&lead("pg-7"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(again["events"][0]["status"], "duplicate");

    let accepted = app.graph.wait_for_accepted(2500, WAIT).await;
    let ids: HashSet<_> = accepted.iter().map(|e| e["event_id"].clone()).collect();
    assert_eq!(ids.len(), 2500);
    assert_eq!(app.graph.request_count(), 3);
    let detail = app.wait_for_state("pg-7", "delivered").await;
    assert_eq!(
        detail.payload["user_data"]["em"][0],
        sha256("pg-7@example.com").as_str()
    );
}

#[tokio::test]
async fn retries_pauses_and_restarts_work_on_postgres() {
    let app = spawn_app_on_postgres().await;
    app.graph.script([Scripted::Raw(500, "flaky".to_owned())]);
    app.graph.set_valid_token("not-yet");
    let response = app
        .post_events(&Value::Array(
            (0..30).map(|i| lead(&format!("pgr-{i}"))).collect(),
        ))
        .await;
    assert_eq!(response.status(), 202);
    app.graph
        .wait_until(WAIT, "a refused request", |g| g.request_count() >= 2)
        .await;
    assert_eq!(app.readyz().await["pixels"][0]["state"], "paused");

    let app = app.restart().await;
    app.graph.set_valid_token(TOKEN);
    let accepted = app.graph.wait_for_accepted(30, WAIT).await;
    let ids: HashSet<_> = accepted.iter().map(|e| e["event_id"].clone()).collect();
    assert_eq!(ids.len(), 30);
    let shown = app.wait_for_state("pgr-0", "delivered").await;
    assert!(shown
        .attempts_log
        .iter()
        .any(|a| a.record.code == Some(190)));
}

async fn connect(app: &crate::helpers::TestApp) -> (PgConnection, String) {
    let (url, schema) = app.postgres().expect("a Postgres app");
    let conn = PgConnection::connect(url).await.expect("connect");
    (conn, schema.to_owned())
}

async fn enqueue(conn: &mut PgConnection, schema: &str, event: &Value) {
    sqlx::query(&format!("select \"{schema}\".enqueue($1::text::jsonb)"))
        .bind(event.to_string())
        .execute(conn)
        .await
        .expect("enqueue");
}

#[tokio::test]
async fn enqueue_in_a_rolled_back_transaction_queues_nothing_and_in_a_committed_one_delivers() {
    let app = spawn_app_on_postgres().await;
    let (mut conn, schema) = connect(&app).await;

    let mut tx = conn.begin().await.expect("begin");
    enqueue(&mut tx, &schema, &lead("rolled-back-1")).await;
    tx.rollback().await.expect("rollback");
    let mut tx = conn.begin().await.expect("begin");
    enqueue(&mut tx, &schema, &lead("committed-1")).await;
    // A raw event without an id gets one derived from its inbox row.
    enqueue(
        &mut tx,
        &schema,
        &json!({"event_name": "Contact", "email": "raw@example.com"}),
    )
    .await;
    tx.commit().await.expect("commit");

    let accepted = app.graph.wait_for_accepted(2, WAIT).await;
    let ids: HashSet<String> = accepted
        .iter()
        .map(|e| e["event_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(ids.contains("committed-1"));
    assert!(ids.iter().any(|id| id.starts_with("inbox-")), "{ids:?}");
    assert!(!ids.contains("rolled-back-1"));
    let committed = accepted
        .iter()
        .find(|e| e["event_id"] == "committed-1")
        .expect("committed event");
    assert_eq!(
        committed["user_data"]["em"][0],
        sha256("committed-1@example.com").as_str()
    );
    // Processed rows leave the inbox (once their events are stored, which may be a moment after
    // delivery began); the rolled-back one never entered it.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left: i64 = conn
            .fetch_one(format!("select count(*) from \"{schema}\".inbox").as_str())
            .await
            .expect("count")
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} rows left in the inbox"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_invalid_enqueued_event_is_kept_with_its_reason_and_replayable_after_a_fix() {
    let app = spawn_app_on_postgres().await;
    let (mut conn, schema) = connect(&app).await;
    enqueue(
        &mut conn,
        &schema,
        &json!({"event_name": "Purchase", "event_id": "order-1", "email": "buyer@example.com"}),
    )
    .await;

    let deadline = tokio::time::Instant::now() + WAIT;
    let problems: String = loop {
        let row = conn
            .fetch_optional(
                format!("select problems::text from \"{schema}\".inbox where state = 'invalid'")
                    .as_str(),
            )
            .await
            .expect("query");
        if let Some(row) = row {
            break row.get(0);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never marked invalid"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(problems.contains("custom_data.value"), "{problems}");
    assert_eq!(app.graph.accepted_count(), 0);
    // The documented view shows it to the user's own tools.
    let shown: i64 = conn
        .fetch_one(format!("select count(*) from \"{schema}\".inbox_problems").as_str())
        .await
        .expect("view")
        .get(0);
    assert_eq!(shown, 1);

    // The user fixes the payload and replays it.
    conn.execute(
        format!(
            "update \"{schema}\".inbox set payload = payload || '{{\"value\": 99.9, \"currency\": \"BRL\"}}'"
        )
        .as_str(),
    )
    .await
    .expect("fix");
    assert_eq!(
        app.store
            .requeue_invalid_inbox(capi_bridge::delivery::now_ms())
            .await
            .expect("replay"),
        1
    );
    let accepted = app.graph.wait_for_accepted(1, WAIT).await;
    assert_eq!(accepted[0]["event_id"], "order-1");
    assert_eq!(accepted[0]["custom_data"]["value"], json!(99.9));
}

#[tokio::test]
async fn the_example_leads_trigger_sends_lead_schedule_and_purchase() {
    let app = spawn_app_on_postgres().await;
    let (mut conn, schema) = connect(&app).await;
    conn.execute(
        format!(
            "create table \"{schema}\".leads (
                 id bigserial primary key, email text, phone text, first_name text,
                 last_name text, status text not null default 'new', deal_value numeric)"
        )
        .as_str(),
    )
    .await
    .expect("leads table");
    // The shipped example, pointed at this test's schema.
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/sql/leads-trigger-example.sql"
    ))
    .expect("example")
    .replace("capi_bridge.", &format!("\"{schema}\"."))
    .replace("public.", &format!("\"{schema}\"."))
    .replace(
        "search_path = public",
        &format!("search_path = \"{schema}\""),
    );
    conn.execute(example.as_str())
        .await
        .expect("install the example trigger");

    let leads = format!("\"{schema}\".leads");
    let id: i64 = conn
        .fetch_one(
            format!(
                "insert into {leads} (email, phone, first_name) \
                 values ('Ana@Example.com', '(11) 98765-4321', 'Ana') returning id"
            )
            .as_str(),
        )
        .await
        .expect("insert")
        .get(0);
    conn.execute(format!("update {leads} set status = 'booked' where id = {id}").as_str())
        .await
        .expect("booked");
    conn.execute(
        format!("update {leads} set status = 'won', deal_value = 1500 where id = {id}").as_str(),
    )
    .await
    .expect("won");
    // A change that rolls back sends nothing.
    let mut tx = conn.begin().await.expect("begin");
    tx.execute(format!("insert into {leads} (email) values ('ghost@example.com')").as_str())
        .await
        .expect("insert");
    tx.rollback().await.expect("rollback");

    let accepted = app.graph.wait_for_accepted(3, WAIT).await;
    let by_name = |name: &str| {
        accepted
            .iter()
            .find(|e| e["event_name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {accepted:?}"))
            .clone()
    };
    let lead_event = by_name("Lead");
    assert_eq!(lead_event["event_id"], format!("lead-{id}"));
    assert_eq!(lead_event["action_source"], "system_generated");
    assert_eq!(
        lead_event["user_data"]["em"][0],
        sha256("ana@example.com").as_str()
    );
    // The national number is completed with the row's country (BR).
    assert_eq!(
        lead_event["user_data"]["ph"][0],
        sha256("5511987654321").as_str()
    );
    assert_eq!(by_name("Schedule")["event_id"], format!("schedule-{id}"));
    let purchase = by_name("Purchase");
    assert_eq!(purchase["event_id"], format!("purchase-{id}"));
    assert_eq!(purchase["custom_data"]["value"], json!(1500));
    assert_eq!(purchase["custom_data"]["currency"], "BRL");
    assert_eq!(accepted.len(), 3, "the rolled-back insert sent nothing");

    // The stable view the user's dashboard reads.
    app.wait_for_state(&format!("purchase-{id}"), "delivered")
        .await;
    let row = conn
        .fetch_one(
            format!(
                "select status, attempts, received_at <= now() as past from \"{schema}\".event_log \
                 where event_id = 'purchase-{id}'"
            )
            .as_str(),
        )
        .await
        .expect("event_log");
    assert_eq!(row.get::<String, _>(0), "delivered");
    assert_eq!(row.get::<i32, _>(1), 1);
    assert!(row.get::<bool, _>(2));
}

#[tokio::test]
async fn sslmode_require_connects_over_tls_with_rustls() {
    let base = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let separator = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{separator}sslmode=require");
    // The store itself opens and answers over it.
    let schema = format!("tls_{}", hex::encode(rand::random::<[u8; 6]>()));
    let store = capi_bridge::store::open(&url, &schema)
        .await
        .expect("open the store with sslmode=require");
    store.ping().await.expect("ping over TLS");
    // And the server sees an encrypted session from the same client stack.
    let mut conn = PgConnection::connect(&url).await.expect("connect with TLS");
    let ssl: bool = conn
        .fetch_one("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(ssl, "the session is not encrypted");
    conn.execute(format!("drop schema {schema} cascade").as_str())
        .await
        .expect("drop the schema");
}

#[tokio::test]
async fn an_idle_instance_is_woken_by_notify_for_events_another_cannot_send() {
    // Polling is slowed to 10 s, so only LISTEN/NOTIFY can explain a quick delivery.
    let slow = [
        ("DELIVERY_POLL_INTERVAL_MS", "10000"),
        ("DELIVERY_PAUSE_PROBE_INTERVAL_MS", "3600000"),
    ];
    let schema = crate::helpers::new_postgres_schema();
    let mut a_env = slow.to_vec();
    a_env.push(("META_ACCESS_TOKEN", "a-token-meta-refuses"));
    let a = crate::helpers::spawn_app_in_schema(&schema, &a_env).await;
    let b = crate::helpers::spawn_app_in_schema(&schema, &slow).await;

    // A takes the first event, Meta refuses A's token: A pauses and gives the event back.
    let started = std::time::Instant::now();
    assert_eq!(a.post_events(&lead("notify-1")).await.status(), 202);
    // Paused, A stores the next one for anyone.
    a.graph
        .wait_until(WAIT, "A's refused request", |g| g.request_count() >= 1)
        .await;
    assert_eq!(a.post_events(&lead("notify-2")).await.status(), 202);

    let accepted = b.graph.wait_for_accepted(2, WAIT).await;
    let elapsed = started.elapsed();
    let ids: HashSet<_> = accepted.iter().map(|e| e["event_id"].clone()).collect();
    assert_eq!(ids.len(), 2);
    assert!(
        elapsed < std::time::Duration::from_secs(5),
        "B delivered after {elapsed:?}: it waited for its 10 s poll instead of being notified"
    );
}
