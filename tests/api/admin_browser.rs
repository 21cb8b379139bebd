//! The operator dashboard end to end in a real headless Chromium (Debian's, driven by
//! playwright-core from `tests/browser/admin.mjs`): log in, read the overview's numbers for
//! events sent through the API, open a dead event, replay it after a forged CSRF token was
//! refused, and watch it reach the Graph stand-in; a browser without a session is refused.
//! Screenshots of every page land in `target/screenshots/`.

use serde_json::Value;

use crate::admin::{admin_app, PASSWORD};
use crate::helpers::{lead, WAIT};

#[tokio::test]
async fn an_operator_replays_a_dead_event_from_the_dashboard_in_chromium() {
    let app = admin_app(&[]).await;
    for id in ["browser-ok-1", "browser-ok-2"] {
        assert_eq!(app.post_events(&lead(id)).await.status(), 202);
        app.wait_for_state(id, "delivered").await;
    }
    // Meta refuses this one for good (missing customer information, as the stand-in is told).
    let dead = "browser-dead-1";
    app.graph.poison(dead);
    assert_eq!(app.post_events(&lead(dead)).await.status(), 202);
    app.wait_for_state(dead, "dead").await;
    // The cause is fixed: Meta would take it now, but nothing sends it until someone replays it.
    app.graph.clear_poison();
    assert!(!app.graph.accepted().iter().any(|e| e["event_id"] == dead));

    let shots = concat!(env!("CARGO_MANIFEST_DIR"), "/target/screenshots");
    std::fs::create_dir_all(shots).expect("screenshot dir");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/admin.mjs");
    let output = tokio::process::Command::new("node")
        .args([script, &app.address, PASSWORD, dead, shots])
        .output()
        .await
        .expect("node runs (scripts/test-services installs chromium and playwright-core)");
    assert!(
        output.status.success(),
        "the dashboard scenario failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_slice(&output.stdout).expect("JSON from the browser");

    assert_eq!(seen["redirectedTo"], "/admin/login", "{seen}");
    let overview = &seen["overview"];
    assert_eq!(overview["h1"], "Overview");
    assert_eq!(overview["hourAccepted"], "3", "{seen}");
    assert_eq!(overview["hourDelivered"], "2", "{seen}");
    assert_eq!(overview["hourDead"], "1", "{seen}");
    assert_eq!(overview["dayAccepted"], "3", "{seen}");
    assert_eq!(overview["queued"], "0", "{seen}");
    assert_eq!(overview["pixelState"], "running", "{seen}");
    assert!(
        seen["phoneScrollWidth"].as_u64().is_some_and(|w| w <= 390),
        "the overview fits a phone's width: {seen}"
    );
    let listed: Vec<&str> = seen["listed"]
        .as_array()
        .expect("listed")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        listed,
        [dead, "browser-ok-2", "browser-ok-1"],
        "newest first"
    );
    assert_eq!(seen["listedDead"], serde_json::json!([dead]));
    assert_eq!(seen["detailState"], "dead");
    assert_eq!(seen["detailPayloadShown"], true);
    assert_eq!(seen["deadGroupCount"], "1");
    assert_eq!(seen["forgedStatus"], 403, "{seen}");
    assert_eq!(seen["stateAfterForged"], "dead", "{seen}");
    assert!(
        seen["retryNotice"]
            .as_str()
            .is_some_and(|n| n.starts_with("Queued again")),
        "{seen}"
    );
    assert_eq!(seen["finalState"], "delivered", "{seen}");
    assert_eq!(seen["testOutcome"], "received", "{seen}");
    assert_eq!(
        seen["qualityLeadEm"], "100%",
        "every lead carried an email: {seen}"
    );
    assert_eq!(seen["strangerLandedOn"], "/admin/login", "{seen}");
    assert_eq!(seen["strangerPostStatus"], 401, "{seen}");

    // Meta has the replayed event, with the same event id.
    app.graph
        .wait_until(WAIT, "the replayed event at the Graph stand-in", |g| {
            g.accepted().iter().any(|e| e["event_id"] == dead)
        })
        .await;
    for page in [
        "login",
        "overview",
        "overview-phone",
        "events",
        "detail",
        "dead",
        "test",
        "quality",
    ] {
        let path = format!("{shots}/admin-{page}.png");
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        assert!(size > 1000, "screenshot {path}");
    }
}
