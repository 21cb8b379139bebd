//! `GET /metrics`: events sent through the API and delivered to the stand-in (one refused by
//! Meta), the scrape parsed with a Prometheus text-format parser, the values checked. Counters
//! are process-wide and the tests of this binary run side by side, so every test reads them
//! under a pixel id of its own; the queue gauges are each app's own.

use std::collections::BTreeSet;

use prometheus_parse::{Sample, Scrape, Value as PromValue};
use serde_json::{json, Value};

use crate::helpers::{lead, spawn_app_for_pixel, TestApp, SECRET, WAIT};

/// A pixel id no other test uses.
fn unique_pixel() -> String {
    format!("9{:014}", rand::random::<u64>() % 100_000_000_000_000)
}

async fn scrape(app: &TestApp, token: Option<&str>) -> reqwest::Response {
    let mut request = app.http.get(format!("{}/metrics", app.address));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("scrape")
}

async fn parsed(app: &TestApp) -> (String, Scrape) {
    let response = scrape(app, None).await;
    assert_eq!(response.status(), 200);
    assert!(response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain")));
    let text = response.text().await.expect("body");
    let scrape =
        Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("prometheus text format");
    (text, scrape)
}

fn matches(sample: &Sample, metric: &str, labels: &[(&str, &str)]) -> bool {
    sample.metric == metric
        && labels
            .iter()
            .all(|(name, value)| sample.labels.get(name) == Some(*value))
}

/// The value of the one sample of `metric` with these labels (others may exist), if any.
fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| matches(s, metric, labels))
        .map(|s| match &s.value {
            PromValue::Counter(v) | PromValue::Gauge(v) | PromValue::Untyped(v) => *v,
            other => panic!("{metric} is not a single value: {other:?}"),
        })
        .collect();
    assert!(found.len() <= 1, "{metric} {labels:?} matches {found:?}");
    found.first().copied()
}

/// The bucket counts of the histogram `metric` with these labels.
fn histogram(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Vec<(f64, f64)> {
    scrape
        .samples
        .iter()
        .find(|s| matches(s, metric, labels))
        .map(|s| match &s.value {
            PromValue::Histogram(buckets) => {
                buckets.iter().map(|b| (b.less_than, b.count)).collect()
            }
            other => panic!("{metric} is not a histogram: {other:?}"),
        })
        .unwrap_or_default()
}

/// Every metric name a scrape holds (histograms by their base name).
fn names(scrape: &Scrape) -> BTreeSet<String> {
    scrape
        .samples
        .iter()
        .map(|s| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| s.metric.strip_suffix(suffix))
                .unwrap_or(&s.metric)
                .to_owned()
        })
        .collect()
}

/// Sends through the API: two Leads, one of them again, a custom event, a Purchase that
/// breaks Meta's rules (422), and a Lead Meta refuses (100/2804050); waits until every event
/// is settled.
async fn send_the_mix(app: &TestApp) {
    let first = app.post_events(&lead("m-lead-1")).await;
    assert_eq!(first.status(), 202);
    assert_eq!(app.post_events(&lead("m-lead-2")).await.status(), 202);
    let again = app.post_events(&lead("m-lead-1")).await;
    assert_eq!(again.status(), 202);
    let again: Value = again.json().await.expect("json");
    assert_eq!(again["duplicates"], 1);
    let mut custom = lead("m-custom-1");
    custom["event_name"] = json!("quiz_finished");
    assert_eq!(app.post_events(&custom).await.status(), 202);
    let purchase = json!({
        "event_name": "purchase",
        "event_id": "m-purchase-1",
        "email": "buyer@example.com",
        "event_time": chrono::Utc::now().timestamp(),
    });
    assert_eq!(app.post_events(&purchase).await.status(), 422);
    app.graph.poison("m-refused-1");
    assert_eq!(app.post_events(&lead("m-refused-1")).await.status(), 202);

    app.wait_for_state("m-refused-1", "dead").await;
    for id in ["m-lead-1", "m-lead-2", "m-custom-1"] {
        app.wait_for_state(id, "delivered").await;
    }
}

#[tokio::test]
async fn the_scrape_counts_events_deliveries_meta_errors_and_the_queue() {
    let pixel = unique_pixel();
    let app = spawn_app_for_pixel(&pixel, &[]).await;
    send_the_mix(&app).await;
    let (text, scrape) = parsed(&app).await;
    let p = pixel.as_str();

    let events = |name: &str, outcome: &str| {
        value(
            &scrape,
            "capi_bridge_events_total",
            &[
                ("pixel_id", p),
                ("source", "api"),
                ("event_name", name),
                ("outcome", outcome),
            ],
        )
    };
    assert_eq!(events("Lead", "accepted"), Some(3.0), "{text}");
    assert_eq!(events("Lead", "duplicate"), Some(1.0));
    assert_eq!(events("custom", "accepted"), Some(1.0));
    // The refused Purchase is counted under Meta's standard name, whatever its case.
    assert_eq!(events("Purchase", "rejected"), Some(1.0));
    assert_eq!(events("Purchase", "accepted"), None);

    let delivered = |outcome: &str| {
        value(
            &scrape,
            "capi_bridge_delivery_events_total",
            &[("pixel_id", p), ("outcome", outcome)],
        )
    };
    assert_eq!(delivered("delivered"), Some(3.0), "{text}");
    assert_eq!(delivered("dead"), Some(1.0));
    // Meta refused the poisoned event's batch (code 100) at least once: alone, or first in a
    // batch that was split.
    let refusals = value(
        &scrape,
        "capi_bridge_meta_errors_total",
        &[("pixel_id", p), ("code", "100")],
    )
    .unwrap_or(0.0);
    assert!(refusals >= 1.0, "{text}");

    // One duration and one size per Graph request; the sizes add up to every event sent,
    // more than once for events in a split batch.
    let requests = app.graph.request_count() as f64;
    let sizes = histogram(
        &scrape,
        "capi_bridge_delivery_batch_size",
        &[("pixel_id", p)],
    );
    let size_count = value(
        &scrape,
        "capi_bridge_delivery_batch_size_count",
        &[("pixel_id", p)],
    );
    assert_eq!(size_count, Some(requests), "{text}");
    assert_eq!(
        sizes.last().map(|(le, n)| (le.is_infinite(), *n)),
        Some((true, requests))
    );
    let sent: f64 = app
        .graph
        .requests()
        .iter()
        .map(|r| r.body["data"].as_array().map_or(0, Vec::len) as f64)
        .sum();
    assert_eq!(
        value(
            &scrape,
            "capi_bridge_delivery_batch_size_sum",
            &[("pixel_id", p)]
        ),
        Some(sent)
    );
    assert_eq!(
        value(
            &scrape,
            "capi_bridge_delivery_request_duration_seconds_count",
            &[("pixel_id", p)]
        ),
        Some(requests)
    );

    // Ingest latency is per route, shared by every app of this process: at least ours.
    let ingest = value(
        &scrape,
        "capi_bridge_ingest_duration_seconds_count",
        &[("route", "/v1/events")],
    )
    .unwrap_or(0.0);
    assert!(ingest >= 5.0, "{text}");

    // This app's queue: nothing waiting, one dead; the pixel is running.
    assert_eq!(value(&scrape, "capi_bridge_queue_depth", &[]), Some(0.0));
    assert_eq!(
        value(&scrape, "capi_bridge_queue_oldest_age_seconds", &[]),
        Some(0.0)
    );
    assert_eq!(value(&scrape, "capi_bridge_dead_events", &[]), Some(1.0));
    let state = |s: &str| {
        value(
            &scrape,
            "capi_bridge_pixel_state",
            &[("pixel_id", p), ("state", s)],
        )
    };
    assert_eq!(state("running"), Some(1.0));
    assert_eq!(state("paused"), Some(0.0));
}

#[tokio::test]
async fn a_paused_pixel_and_its_waiting_events_show_in_the_gauges() {
    let pixel = unique_pixel();
    let app = spawn_app_for_pixel(&pixel, &[]).await;
    // The token was revoked: Meta answers 190 and delivery pauses.
    app.graph.set_valid_token("a-rotated-token");
    assert_eq!(app.post_events(&lead("m-paused-1")).await.status(), 202);
    let deadline = tokio::time::Instant::now() + WAIT;
    let scrape = loop {
        let (_, scrape) = parsed(&app).await;
        let paused = value(
            &scrape,
            "capi_bridge_pixel_state",
            &[("pixel_id", pixel.as_str()), ("state", "paused")],
        );
        if paused == Some(1.0) {
            break scrape;
        }
        assert!(tokio::time::Instant::now() < deadline, "never paused");
        // Polling a condition, not sleeping for an outcome.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let p = pixel.as_str();
    assert_eq!(
        value(
            &scrape,
            "capi_bridge_pixel_state",
            &[("pixel_id", p), ("state", "running")]
        ),
        Some(0.0)
    );
    assert!(value(
        &scrape,
        "capi_bridge_meta_errors_total",
        &[("pixel_id", p), ("code", "190")]
    )
    .is_some_and(|n| n >= 1.0));
    assert_eq!(value(&scrape, "capi_bridge_queue_depth", &[]), Some(1.0));
    assert!(value(&scrape, "capi_bridge_queue_oldest_age_seconds", &[]).is_some_and(|s| s >= 0.0));
    assert_eq!(
        value(
            &scrape,
            "capi_bridge_delivery_events_total",
            &[("pixel_id", p), ("outcome", "delivered")]
        ),
        None
    );
}

#[tokio::test]
async fn metrics_token_is_required_when_set() {
    let token = "scrape-token-0123456789abcdef";
    let app = spawn_app_for_pixel(&unique_pixel(), &[("METRICS_TOKEN", token)]).await;
    assert_eq!(scrape(&app, None).await.status(), 401);
    assert_eq!(scrape(&app, Some("wrong-token")).await.status(), 401);
    // The API's secret is not the metrics token.
    assert_eq!(scrape(&app, Some(SECRET)).await.status(), 401);
    let response = scrape(&app, Some(token)).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("body");
    assert!(text.contains("capi_bridge_queue_depth 0"), "{text}");

    // Without a token the endpoint is open (bind it to a private address, or set one).
    let open = spawn_app_for_pixel(&unique_pixel(), &[]).await;
    assert_eq!(scrape(&open, None).await.status(), 200);
}

#[tokio::test]
async fn every_metric_the_grafana_dashboard_queries_is_in_a_scrape() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/ops/grafana/capi-bridge.json"
        ))
        .expect("ops/grafana/capi-bridge.json"),
    )
    .expect("the dashboard is JSON");
    let mut queried = BTreeSet::new();
    collect_queried_metrics(&dashboard, &mut queried);
    assert!(queried.len() >= 8, "the dashboard queries {queried:?}");

    let app = spawn_app_for_pixel(&unique_pixel(), &[]).await;
    send_the_mix(&app).await;
    let (text, scrape) = parsed(&app).await;
    let scraped = names(&scrape);
    let missing: Vec<&String> = queried.difference(&scraped).collect();
    assert!(
        missing.is_empty(),
        "queried but not scraped: {missing:?}\n{text}"
    );
    // And every metric the service documents is on the dashboard.
    for name in capi_bridge::metrics::ALL {
        assert!(queried.contains(name), "{name} is not on the dashboard");
    }
}

/// The `capi_bridge_*` names in every `expr` of the dashboard (histogram suffixes removed).
fn collect_queried_metrics(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                if key == "expr" {
                    let expr = inner.as_str().unwrap_or("");
                    for (start, _) in expr.match_indices("capi_bridge_") {
                        let name: String = expr[start..]
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect();
                        let base = ["_bucket", "_sum", "_count"]
                            .iter()
                            .find_map(|suffix| name.strip_suffix(suffix))
                            .unwrap_or(&name)
                            .to_owned();
                        out.insert(base);
                    }
                } else {
                    collect_queried_metrics(inner, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| collect_queried_metrics(i, out)),
        _ => {}
    }
}

#[tokio::test]
async fn events_from_a_webhook_source_are_counted_under_its_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        r#"
[[rules]]
name = "lead-created"
source = "supabase"
when = 'type == "INSERT" && table == "leads"'
event = "Lead"
[rules.fields]
event_id = '"lead-" + string(record.id)'
email = "record.email"
"#,
    )
    .expect("write rules");
    let pixel = unique_pixel();
    let app = spawn_app_for_pixel(&pixel, &[("RULES_FILE", rules.to_str().expect("path"))]).await;
    let insert = |id: i64, email: &str| {
        json!({"type": "INSERT", "table": "leads", "schema": "public",
               "record": {"id": id, "email": email}, "old_record": null})
    };
    // Two leads, the first again (a duplicate event), and one whose only customer
    // information is no email address (Meta's rules refuse it: rejected, parked).
    for payload in [
        insert(1, "one@example.com"),
        insert(2, "two@example.com"),
        insert(1, "one@example.com"),
        insert(3, "not an email"),
    ] {
        let response = app
            .http
            .post(format!("{}/v1/sources/supabase", app.address))
            .bearer_auth(SECRET)
            .json(&payload)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 202);
    }
    let p = pixel.as_str();
    let count = |scrape: &Scrape, outcome: &str| {
        value(
            scrape,
            "capi_bridge_events_total",
            &[
                ("pixel_id", p),
                ("source", "supabase"),
                ("event_name", "Lead"),
                ("outcome", outcome),
            ],
        )
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    let scrape = loop {
        let (_, scrape) = parsed(&app).await;
        let seen: f64 = ["accepted", "duplicate", "rejected"]
            .iter()
            .filter_map(|o| count(&scrape, o))
            .sum();
        if seen >= 4.0 {
            break scrape;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {seen} counted"
        );
        // The inbox worker maps payloads after the 202: poll for the condition.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(count(&scrape, "accepted"), Some(2.0));
    assert_eq!(count(&scrape, "duplicate"), Some(1.0));
    assert_eq!(count(&scrape, "rejected"), Some(1.0));
    let route = value(
        &scrape,
        "capi_bridge_ingest_duration_seconds_count",
        &[("route", "/v1/sources/:name")],
    );
    assert!(route.is_some_and(|n| n >= 4.0), "{route:?}");
}
