//! Delivery against the Graph stand-in: batching, retries, splitting, pausing, restarts.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::graph_stand_in::{Faults, Scripted};
use crate::helpers::{lead, spawn_app, spawn_app_with, TOKEN, WAIT};

fn leads(prefix: &str, n: usize) -> Vec<Value> {
    (0..n).map(|i| lead(&format!("{prefix}-{i}"))).collect()
}

#[tokio::test]
async fn events_2500_leave_as_3_requests() {
    // Arrange
    let app = spawn_app().await;

    // Act: 1000 + 1000 + 500 events, each request committed whole.
    let all = leads("bulk", 2500);
    for chunk in all.chunks(1000) {
        let response = app.post_events(&Value::Array(chunk.to_vec())).await;
        assert_eq!(response.status(), 202);
    }

    // Assert
    let accepted = app.graph.wait_for_accepted(2500, WAIT).await;
    let unique: HashSet<_> = accepted.iter().map(|e| e["event_id"].clone()).collect();
    assert_eq!(unique.len(), 2500);
    let sizes: Vec<usize> = app
        .graph
        .requests()
        .iter()
        .map(|r| r.body["data"].as_array().map_or(0, Vec::len))
        .collect();
    assert_eq!(sizes.len(), 3, "request sizes: {sizes:?}");
    assert!(sizes.iter().all(|n| *n <= 1000));
}

#[tokio::test]
async fn a_500_then_200_delivers_once() {
    let app = spawn_app().await;
    app.graph
        .script([Scripted::Raw(500, "upstream trouble".to_owned())]);

    assert_eq!(app.post_events(&lead("flaky-1")).await.status(), 202);

    app.graph.wait_for_accepted(1, WAIT).await;
    let detail = app.wait_for_state("flaky-1", "delivered").await;
    assert_eq!(app.graph.accepted_count(), 1);
    assert_eq!(app.graph.request_count(), 2);
    let outcomes: Vec<_> = detail
        .attempts_log
        .iter()
        .map(|a| (a.record.outcome.clone(), a.record.http_status))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("retry".to_owned(), Some(500)),
            ("delivered".to_owned(), Some(200))
        ]
    );
}

#[tokio::test]
async fn throttling_codes_back_off_before_trying_again() {
    let app = spawn_app_with(&[
        ("DELIVERY_RETRY_BASE_MS", "300"),
        ("DELIVERY_RETRY_MAX_MS", "300"),
    ])
    .await;
    app.graph.script([
        Scripted::GraphError {
            status: 400,
            code: 17,
            subcode: None,
        },
        Scripted::GraphError {
            status: 400,
            code: 80004,
            subcode: Some(2446079),
        },
    ]);

    assert_eq!(app.post_events(&lead("slow-1")).await.status(), 202);
    app.graph
        .wait_until(WAIT, "the first throttled answer", |g| {
            g.request_count() >= 1
        })
        .await;
    let status = app.readyz().await;
    assert_eq!(status["pixels"][0]["state"], "throttled", "{status}");

    app.graph.wait_for_accepted(1, WAIT).await;
    let times: Vec<_> = app.graph.requests().iter().map(|r| r.at).collect();
    assert_eq!(times.len(), 3);
    for pair in times.windows(2) {
        // Backoff with jitter takes at most half of the 300 ms delay away.
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(150),
            "retried after {:?}",
            pair[1] - pair[0]
        );
    }
}

#[tokio::test]
async fn a_retry_after_header_from_meta_is_honoured() {
    // Backoff alone would retry after at most 20 ms.
    let app = spawn_app().await;
    app.graph.script([Scripted::RateLimited {
        retry_after_secs: 1,
    }]);
    assert_eq!(app.post_events(&lead("hint-1")).await.status(), 202);
    app.graph.wait_for_accepted(1, WAIT).await;
    let times: Vec<_> = app.graph.requests().iter().map(|r| r.at).collect();
    assert_eq!(times.len(), 2);
    assert!(
        times[1] - times[0] >= Duration::from_millis(950),
        "retried after {:?}",
        times[1] - times[0]
    );
}

#[tokio::test]
async fn an_outage_in_the_middle_of_a_split_waits_then_goes_on_where_it_stopped() {
    let app = spawn_app_with(&[
        ("DELIVERY_RETRY_BASE_MS", "300"),
        ("DELIVERY_RETRY_MAX_MS", "300"),
    ])
    .await;
    app.graph.poison("split-7");
    // The batch is refused for split-7, then the Graph API goes down for one answer.
    app.graph
        .script([Scripted::Normal, Scripted::Raw(503, "down".to_owned())]);
    assert_eq!(
        app.post_events(&Value::Array(leads("split", 100)))
            .await
            .status(),
        202
    );
    app.graph.wait_for_accepted(99, WAIT).await;
    let dead = app.wait_for_state("split-7", "dead").await;
    let requests = app.graph.requests();
    let log: Vec<_> = requests
        .iter()
        .map(|r| (r.status, r.body["data"].as_array().map_or(0, Vec::len)))
        .collect();
    // Refused whole, then the first half meets the outage; after the wait the split goes on
    // with that same half (not the whole batch), and once it is refused its sibling goes next.
    assert_eq!(
        log[..4],
        [(400, 100), (503, 50), (400, 50), (200, 50)],
        "{log:?}"
    );
    let times: Vec<_> = requests.iter().map(|r| r.at).collect();
    // The request after the 503 waits for the backoff instead of hitting the outage again.
    assert!(
        times[2] - times[1] >= Duration::from_millis(150),
        "next request after {:?}",
        times[2] - times[1]
    );
    // The outage hit the search, not the events: nobody's attempts grew.
    assert_eq!(dead.attempts, 1);
    let mate = app.wait_for_state("split-3", "delivered").await;
    assert_eq!(mate.attempts, 1);
    assert_eq!(app.graph.accepted_count(), 99);
}

#[tokio::test]
async fn a_split_waiting_out_an_outage_has_settled_its_delivered_half() {
    // Long enough a wait to look at the store while the split waits (the 10 s test lease
    // lets a split wait up to 5 s in memory).
    let app = spawn_app_with(&[
        ("DELIVERY_RETRY_BASE_MS", "3000"),
        ("DELIVERY_RETRY_MAX_MS", "3000"),
    ])
    .await;
    app.graph.poison("held-70");
    // Refused whole; the first half (held-0..49) goes through, so the second half holds the bad
    // event and is split without being sent; its first quarter meets an outage.
    app.graph.script([
        Scripted::Normal,
        Scripted::Normal,
        Scripted::Raw(503, "down".to_owned()),
    ]);
    assert_eq!(
        app.post_events(&Value::Array(leads("held", 100)))
            .await
            .status(),
        202
    );
    app.graph
        .wait_until(WAIT, "the outage", |g| g.request_count() >= 3)
        .await;

    // The delivered half is settled already; the rest waits leased, not charged.
    let delivered = app.stored("held-3").await.expect("stored");
    assert_eq!(delivered.state, "delivered");
    let waiting = app.stored("held-80").await.expect("stored");
    assert_eq!(
        (waiting.state.as_str(), waiting.attempts),
        ("delivering", 1)
    );
    assert_eq!(app.graph.request_count(), 3, "the split waits");

    app.graph.wait_for_accepted(99, WAIT).await;
    app.wait_for_state("held-70", "dead").await;
    let log: Vec<_> = app
        .graph
        .requests()
        .iter()
        .map(|r| (r.status, r.body["data"].as_array().map_or(0, Vec::len)))
        .collect();
    assert_eq!(log[..3], [(400, 100), (200, 50), (503, 25)], "{log:?}");
    assert_eq!(app.graph.accepted_count(), 99);
    assert_eq!(app.wait_for_state("held-80", "delivered").await.attempts, 1);
}

#[tokio::test]
async fn a_long_rate_limit_during_a_split_hands_the_batch_back_without_counting_attempts() {
    // A 2 s lease: a split waits at most 1 s in memory, and Meta asks for 2 s.
    let app = spawn_app_with(&[
        ("DELIVERY_LEASE_MS", "2000"),
        ("DELIVERY_REQUEST_TIMEOUT_MS", "1000"),
    ])
    .await;
    app.graph.poison("long-7");
    app.graph.script([
        Scripted::Normal,
        Scripted::RateLimited {
            retry_after_secs: 2,
        },
    ]);
    assert_eq!(
        app.post_events(&Value::Array(leads("long", 100)))
            .await
            .status(),
        202
    );

    // Back in storage, due when Meta said, with the claim's attempt given back.
    let waiting = app.wait_for_state("long-60", "queued").await;
    assert_eq!(waiting.attempts, 0);
    assert!(
        waiting
            .last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("batch split waiting: meta error 4")),
        "{:?}",
        waiting.last_error
    );
    let due_in = waiting.next_attempt_at.expect("due") - capi_bridge::delivery::now_ms();
    assert!(due_in > 1000, "due in {due_in} ms");

    app.graph.wait_for_accepted(99, WAIT).await;
    let dead = app.wait_for_state("long-7", "dead").await;
    assert_eq!(dead.attempts, 1);
    assert_eq!(app.wait_for_state("long-60", "delivered").await.attempts, 1);
    let times: Vec<_> = app.graph.requests().iter().map(|r| r.at).collect();
    assert!(
        times[2] - times[1] >= Duration::from_millis(1900),
        "next request after {:?}",
        times[2] - times[1]
    );
    assert_eq!(app.graph.accepted_count(), 99);
}

#[tokio::test]
async fn a_split_waiting_at_shutdown_is_given_back_and_sent_after_a_restart() {
    let app = spawn_app_with(&[
        ("DELIVERY_RETRY_BASE_MS", "4000"),
        ("DELIVERY_RETRY_MAX_MS", "4000"),
    ])
    .await;
    app.graph.poison("stop-7");
    app.graph
        .script([Scripted::Normal, Scripted::Raw(503, "down".to_owned())]);
    assert_eq!(
        app.post_events(&Value::Array(leads("stop", 100)))
            .await
            .status(),
        202
    );
    app.graph
        .wait_until(WAIT, "the outage", |g| g.request_count() >= 2)
        .await;

    // Stopping gives the waiting split back: the restarted service sends it at once, where a
    // lease left behind would hold it for 10 s (the test lease) after the split's wait.
    let app = app.restart().await;
    app.graph
        .wait_for_accepted(99, Duration::from_secs(3))
        .await;
    let dead = app.wait_for_state("stop-7", "dead").await;
    assert_eq!(dead.attempts, 1, "the interrupted split counted no attempt");
    assert_eq!(app.graph.accepted_count(), 99);
}

#[tokio::test]
async fn a_batch_with_one_bad_event_delivers_the_other_999_and_parks_the_bad_one() {
    let app = spawn_app().await;
    app.graph.poison("batch-417");

    let response = app.post_events(&Value::Array(leads("batch", 1000))).await;
    assert_eq!(response.status(), 202);

    let accepted = app.graph.wait_for_accepted(999, WAIT).await;
    let dead = app.wait_for_state("batch-417", "dead").await;
    let ids: HashSet<_> = accepted
        .iter()
        .map(|e| e["event_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(ids.len(), 999);
    assert!(!ids.contains("batch-417"));
    let reason = dead.last_error.expect("a reason");
    assert!(reason.contains("2804050"), "{reason}");
    assert!(
        reason.contains("insufficient customer information"),
        "{reason}"
    );
    let last = dead.attempts_log.last().expect("an attempt");
    assert_eq!(last.record.code, Some(100));
    assert_eq!(last.record.fbtrace_id.as_deref(), Some("StandInTrace"));
    // Splitting is logarithmic, not one request per event.
    assert!(
        app.graph.request_count() < 40,
        "{} requests",
        app.graph.request_count()
    );
}

#[tokio::test]
async fn when_meta_refuses_every_event_alike_the_pixel_pauses_instead_of_killing_them_all() {
    let app = spawn_app_with(&[("DELIVERY_PAUSE_PROBE_INTERVAL_MS", "1000")]).await;
    for i in 0..200 {
        app.graph.poison(&format!("refused-{i}"));
    }
    let response = app.post_events(&Value::Array(leads("refused", 200))).await;
    assert_eq!(response.status(), 202);

    app.wait_for_state("refused-9", "dead").await;
    let status = app.readyz().await;
    assert_eq!(status["pixels"][0]["state"], "paused", "{status}");
    assert!(status["pixels"][0]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("every event the same way")));
    // Splitting stopped early: far fewer than the ~400 requests isolating all would take.
    let after_pause = app.graph.request_count();
    assert!(after_pause < 30, "{after_pause} requests");

    // A probe refused the same way keeps the pixel paused (one more event dies, not ten).
    app.graph
        .wait_until(WAIT, "a probe", |g| g.request_count() > after_pause)
        .await;
    app.wait_for_state("refused-10", "dead").await;
    assert_eq!(app.readyz().await["pixels"][0]["state"], "paused");

    // The user fixes the cause: the next probe succeeds and the waiting events go out.
    app.graph.clear_poison();
    let delivered = app.graph.wait_for_accepted(200 - 11, WAIT).await;
    let mut dead = 0;
    for i in 0..200 {
        let state = app
            .stored(&format!("refused-{i}"))
            .await
            .expect("stored")
            .state;
        if state == "dead" {
            dead += 1;
        }
    }
    assert_eq!(dead, 11, "ten to recognise the pattern, one probe");
    assert_eq!(delivered.len(), 189);
    assert_eq!(app.readyz().await["pixels"][0]["state"], "running");
}

#[tokio::test]
async fn an_invalid_token_pauses_without_loss_and_resumes_after_the_fix() {
    let app = spawn_app().await;
    app.graph
        .set_valid_token("a-token-the-user-has-not-set-yet");

    let response = app.post_events(&Value::Array(leads("paused", 20))).await;
    assert_eq!(response.status(), 202);
    app.graph
        .wait_until(WAIT, "a refused request", |g| g.request_count() >= 1)
        .await;

    let status = app.readyz().await;
    assert_eq!(status["pixels"][0]["state"], "paused", "{status}");
    assert_eq!(status["status"], "degraded");
    assert!(status["pixels"][0]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("190")));
    // Nothing is dead: the events wait.
    for i in 0..20 {
        let detail = app.stored(&format!("paused-{i}")).await.expect("stored");
        assert_ne!(detail.state, "dead");
    }

    // The user fixes the token at Meta; the periodic probe resumes delivery by itself.
    app.graph.set_valid_token(TOKEN);
    app.graph.wait_for_accepted(20, WAIT).await;
    app.wait_for_state("paused-19", "delivered").await;
    assert_eq!(app.readyz().await["pixels"][0]["state"], "running");
}

#[tokio::test]
async fn a_restart_with_queued_events_delivers_them() {
    // A long probe interval keeps the events queued while the first instance runs.
    let app = spawn_app_with(&[("DELIVERY_PAUSE_PROBE_INTERVAL_MS", "3600000")]).await;
    app.graph.set_valid_token("not-yet");
    let response = app.post_events(&Value::Array(leads("restart", 50))).await;
    assert_eq!(response.status(), 202);
    app.graph
        .wait_until(WAIT, "a refused request", |g| g.request_count() >= 1)
        .await;

    let app = app.restart().await;
    app.graph.set_valid_token(TOKEN);
    let accepted = app.graph.wait_for_accepted(50, WAIT).await;
    let ids: HashSet<_> = accepted.iter().map(|e| e["event_id"].clone()).collect();
    assert_eq!(ids.len(), 50);
}

#[tokio::test]
async fn an_event_whose_deadline_passes_while_retrying_is_dead_with_that_reason() {
    let app = spawn_app_with(&[
        ("DELIVERY_RETRY_BASE_MS", "5000"),
        ("DELIVERY_RETRY_MAX_MS", "5000"),
    ])
    .await;
    app.graph
        .script([Scripted::Raw(503, "maintenance".to_owned())]);
    // One second short of Meta's 7-day limit: the next retry would be too late.
    let mut event = lead("late-1");
    event["event_time"] = json!(chrono::Utc::now().timestamp() - 7 * 24 * 3600 + 1);
    assert_eq!(app.post_events(&event).await.status(), 202);

    let dead = app.wait_for_state("late-1", "dead").await;
    assert!(dead.last_error.is_some_and(|e| e.contains("deadline")));
    assert_eq!(app.graph.accepted_count(), 0);
}

#[tokio::test]
async fn get_event_shows_attempts_with_metas_answers_and_the_payload_sent() {
    let app = spawn_app().await;
    app.graph.script([Scripted::GraphError {
        status: 500,
        code: 2,
        subcode: None,
    }]);
    assert_eq!(app.post_events(&lead("shown-1")).await.status(), 202);
    app.wait_for_state("shown-1", "delivered").await;

    let shown = app.get_event("shown-1").await;
    assert_eq!(shown["state"], "delivered");
    assert_eq!(shown["attempts"], 2);
    assert_eq!(shown["attempts_log"][0]["outcome"], "retry");
    assert_eq!(shown["attempts_log"][0]["code"], 2);
    assert_eq!(shown["attempts_log"][0]["fbtrace_id"], "StandInTrace");
    assert_eq!(shown["attempts_log"][1]["outcome"], "delivered");
    assert_eq!(shown["payload"]["event_id"], "shown-1");
    assert!(shown["payload"]["user_data"]["em"][0]
        .as_str()
        .is_some_and(|h| h.len() == 64));
}

#[tokio::test]
async fn a_poisoned_event_in_a_storm_does_not_hold_its_batch_mates() {
    // Arrange: the retry, lease and poll settings a user gets by default (the test helpers'
    // 20 ms retries would hide the growing backoff this is about), and a Graph API that fails
    // 20% of the requests with a 500 and throttles 10%, from a fixed seed. One event is one
    // Meta refuses.
    let app = spawn_app_with(&[
        ("DELIVERY_RETRY_BASE_MS", ""),
        ("DELIVERY_RETRY_MAX_MS", ""),
        ("DELIVERY_LEASE_MS", ""),
        ("DELIVERY_POLL_INTERVAL_MS", ""),
        ("DELIVERY_REQUEST_TIMEOUT_MS", ""),
    ])
    .await;
    app.graph.set_faults(Faults {
        server_errors: 0.2,
        throttling: 0.1,
        seed: 12,
    });
    app.graph.poison("storm-1234");
    let all = leads("storm", 2500);

    // Act: five requests of 500 events.
    let started = tokio::time::Instant::now();
    for chunk in all.chunks(500) {
        let response = app.post_events(&Value::Array(chunk.to_vec())).await;
        assert_eq!(response.status(), 202);
    }

    // Assert: every good event arrives within 60 s, whatever the storm does to the search.
    let unique_accepted = |g: &crate::graph_stand_in::GraphStandIn| {
        g.accepted()
            .iter()
            .filter_map(|e| e["event_id"].as_str().map(str::to_owned))
            .collect::<HashSet<_>>()
            .len()
    };
    app.graph
        .wait_until(Duration::from_secs(60), "2499 distinct events", |g| {
            unique_accepted(g) >= 2499
        })
        .await;
    let took = started.elapsed();
    let dead = app.wait_for_state("storm-1234", "dead").await;
    let reason = dead.last_error.expect("a reason");
    assert!(reason.contains("100/2804050"), "{reason}");
    assert!(
        reason.contains("insufficient customer information"),
        "{reason}"
    );
    // Nothing is left queued, so nothing more goes out: the counts below are final.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stats = app.store.stats().await.expect("stats");
        if stats.queued == 0 {
            assert_eq!((stats.delivered, stats.dead), (2499, 1));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still queued: {stats:?}"
        );
        // Polling a condition (the store has no change feed), not sleeping for an outcome.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let accepted = app.graph.accepted();
    let ids: HashSet<_> = accepted
        .iter()
        .map(|e| e["event_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(accepted.len(), 2499, "each good event exactly once");
    assert_eq!(ids.len(), 2499);
    assert!(!ids.contains("storm-1234"));
    // The storm did happen.
    let faults = app.graph.fault_counts();
    assert!(
        faults.server_errors > 0 && faults.throttled > 0,
        "{faults:?}"
    );
    eprintln!(
        "storm: 2499 events in {took:?}, {} requests, {faults:?}",
        app.graph.request_count()
    );
}
