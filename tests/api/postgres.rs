//! The service end to end on Postgres: the same black-box paths as on SQLite.

use std::collections::HashSet;

use serde_json::Value;

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
