//! Prometheus metrics (`GET /metrics`): the names, the one-line recording calls the pipeline
//! makes, and the scrape.
//!
//! Counters and histograms go to one process-wide recorder (the `metrics` facade): events
//! happen in the process, and Prometheus scrapes a process. Installed once, by the first
//! [`App`](crate::app::App) built. State gauges (queue depth, oldest event, dead events, pixel
//! states) are not kept there: each scrape reads them from *its* app's store and delivery and
//! renders them through a recorder of its own, so two apps in one process (the tests) never
//! show each other's queue. Labels stay bounded: event names are Meta's standard names or
//! `custom`, sources are configured names, pixels are configured ids, routes are templates.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ::metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::delivery::classify::Verdict;
use crate::delivery::PixelStatus;
use crate::ingest::IngestError;
use crate::store::{EventUpdate, InsertOutcome, QueueStats, Settlement};

/// Counter: events by `pixel_id`, `source` (`api`, `site:<key>`, `cli`, `sql`, a webhook source's
/// name), `event_name` (standard name or `custom`) and `outcome` (`accepted`, `duplicate`,
/// `rejected`).
pub const EVENTS: &str = "capi_bridge_events_total";
/// Histogram: seconds from request to the 202/204 answer, by `route`.
pub const INGEST_SECONDS: &str = "capi_bridge_ingest_duration_seconds";
/// Histogram: seconds per Graph API request, by `pixel_id`.
pub const DELIVERY_SECONDS: &str = "capi_bridge_delivery_request_duration_seconds";
/// Histogram: events per Graph API request, by `pixel_id`.
pub const BATCH_SIZE: &str = "capi_bridge_delivery_batch_size";
/// Counter: events settled by `pixel_id` and `outcome` (`delivered`, `retry`, `dead`,
/// `released`).
pub const DELIVERED: &str = "capi_bridge_delivery_events_total";
/// Counter: Graph API answers with an error, by `pixel_id` and `code` (Meta's code; `http`
/// for an error without one; `transport` when no answer came).
pub const META_ERRORS: &str = "capi_bridge_meta_errors_total";
/// Gauge: events waiting or being delivered.
pub const QUEUE_DEPTH: &str = "capi_bridge_queue_depth";
/// Gauge: age in seconds of the oldest waiting event (0 when none waits).
pub const OLDEST_AGE: &str = "capi_bridge_queue_oldest_age_seconds";
/// Gauge: dead events (kept for replay).
pub const DEAD: &str = "capi_bridge_dead_events";
/// Gauge: 1 for each pixel's current `state` (`running`, `paused`, `throttled`), else 0.
pub const PIXEL_STATE: &str = "capi_bridge_pixel_state";

/// Every metric name, as documented in the README and queried by `ops/grafana`.
pub const ALL: [&str; 10] = [
    EVENTS,
    INGEST_SECONDS,
    DELIVERY_SECONDS,
    BATCH_SIZE,
    DELIVERED,
    META_ERRORS,
    QUEUE_DEPTH,
    OLDEST_AGE,
    DEAD,
    PIXEL_STATE,
];

const SECONDS_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

static GLOBAL: OnceLock<PrometheusHandle> = OnceLock::new();

fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &SECONDS_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.to_owned()), &BATCH_BUCKETS)
        })
        // Only empty bucket lists fail, and these are constants.
        .unwrap_or_else(|_| PrometheusBuilder::new())
}

/// Installs the process-wide recorder on the first call; later calls return its handle.
pub fn install() -> &'static PrometheusHandle {
    GLOBAL.get_or_init(|| {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        if ::metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!(
                "another metrics recorder is installed; /metrics shows only the state gauges"
            );
        }
        describe_counter!(EVENTS, "Events received, by source, event name and outcome");
        describe_histogram!(
            INGEST_SECONDS,
            ::metrics::Unit::Seconds,
            "Request to 202/204"
        );
        describe_histogram!(
            DELIVERY_SECONDS,
            ::metrics::Unit::Seconds,
            "Graph API request duration"
        );
        describe_histogram!(BATCH_SIZE, "Events per Graph API request");
        describe_counter!(
            DELIVERED,
            "Events settled after a Graph API request, by outcome"
        );
        describe_counter!(
            META_ERRORS,
            "Graph API answers with an error, by Meta's code"
        );
        handle
    })
}

/// Keeps histograms' memory bounded between scrapes; runs until `shutdown`.
pub async fn run_upkeep(shutdown: tokio_util::sync::CancellationToken) {
    let handle = install();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(5)) => handle.run_upkeep(),
        }
    }
}

/// The label for an event name: Meta's standard name, or `custom`.
pub fn event_label(name: &str) -> &'static str {
    crate::domain::event::standard_event_name(name).unwrap_or("custom")
}

/// The labels of a request body's events (object, array or `{"data": [...]}`), read before
/// ingest so refused events are counted by name too.
pub fn event_labels(body: &serde_json::Value) -> Vec<&'static str> {
    let events = match body {
        serde_json::Value::Array(events) => events.as_slice(),
        serde_json::Value::Object(map) => match map.get("data") {
            Some(serde_json::Value::Array(events)) => events.as_slice(),
            _ => std::slice::from_ref(body),
        },
        _ => &[],
    };
    events
        .iter()
        .map(|e| event_label(e.get("event_name").and_then(|n| n.as_str()).unwrap_or("")))
        .collect()
}

/// Counts a refused request's events (`labels`) as rejected when they broke Meta's rules.
pub fn refused(pixel_id: &str, source: &str, labels: &[&'static str], err: &IngestError) {
    // Anything else is no judgement on the events: a malformed body, storage down.
    if matches!(err, IngestError::Invalid(_)) {
        for label in labels {
            count_event(pixel_id, source, label, "rejected");
        }
    }
}

/// Counts one stored event: accepted, or duplicate.
pub fn stored(pixel_id: &str, source: &str, event_name: &str, outcome: InsertOutcome) {
    let outcome = match outcome {
        InsertOutcome::Duplicate => "duplicate",
        InsertOutcome::Queued | InsertOutcome::DryRun => "accepted",
    };
    count_event(pixel_id, source, event_label(event_name), outcome);
}

fn count_event(pixel_id: &str, source: &str, event_name: &'static str, outcome: &'static str) {
    counter!(EVENTS, "pixel_id" => pixel_id.to_owned(), "source" => source.to_owned(), "event_name" => event_name, "outcome" => outcome).increment(1);
}

/// Times one ingest request (`POST /v1/events`, `/v1/collect`, `/v1/sources/…`) from its
/// handler's start to its answer, recorded by route template only when the request was stored
/// (202 or 204). A timer in the handler rather than a middleware around every route: one less
/// boxed layer per request, measurably so on the ingest benchmark.
pub struct IngestTimer {
    route: &'static str,
    started: Instant,
}

impl IngestTimer {
    /// Starts timing `route` (`/v1/sources/:name`: braces in label values trip up simple
    /// exposition parsers).
    pub fn start(route: &'static str) -> Self {
        Self {
            route,
            started: Instant::now(),
        }
    }

    /// The request was stored: records how long it took.
    pub fn stored(&self) {
        histogram!(INGEST_SECONDS, "route" => self.route)
            .record(self.started.elapsed().as_secs_f64());
    }
}

/// Records one Graph API request: its duration, its size and Meta's error code if any.
pub fn graph_request(pixel_id: &str, n_events: usize, elapsed: Duration, verdict: &Verdict) {
    let pixel = pixel_id.to_owned();
    histogram!(DELIVERY_SECONDS, "pixel_id" => pixel.clone()).record(elapsed.as_secs_f64());
    histogram!(BATCH_SIZE, "pixel_id" => pixel.clone()).record(n_events as f64);
    let error = match verdict {
        Verdict::Delivered { .. } => return,
        Verdict::Retry { error, .. } | Verdict::Rejected { error } | Verdict::Pause { error } => {
            error
        }
    };
    let code = match (error.code, error.http_status) {
        (Some(code), _) => code.to_string(),
        (None, Some(_)) => "http".to_owned(),
        (None, None) => "transport".to_owned(),
    };
    counter!(META_ERRORS, "pixel_id" => pixel, "code" => code).increment(1);
}

/// Counts how the events of one delivery pass were settled.
pub fn settled(pixel_id: &str, updates: &[EventUpdate]) {
    let mut counts = [0u64; 4];
    for update in updates {
        counts[match update.settlement {
            Settlement::Delivered => 0,
            // A postponed event is retried later (without an attempt counted).
            Settlement::Retry { .. } | Settlement::Postpone { .. } => 1,
            Settlement::Dead { .. } => 2,
            Settlement::Release { .. } => 3,
        }] += 1;
    }
    for (outcome, n) in ["delivered", "retry", "dead", "released"]
        .into_iter()
        .zip(counts)
    {
        if n > 0 {
            counter!(DELIVERED, "pixel_id" => pixel_id.to_owned(), "outcome" => outcome)
                .increment(n);
        }
    }
}

/// The scrape: the process's counters and histograms, then this app's state gauges (`stats`
/// is `None` when the store could not be read; those gauges are then left out).
pub fn render(stats: Option<&QueueStats>, pixels: &[PixelStatus], now_ms: i64) -> String {
    let local = PrometheusBuilder::new().build_recorder();
    ::metrics::with_local_recorder(&local, || {
        describe_gauge!(QUEUE_DEPTH, "Events waiting or being delivered");
        describe_gauge!(
            OLDEST_AGE,
            ::metrics::Unit::Seconds,
            "Age of the oldest waiting event"
        );
        describe_gauge!(DEAD, "Dead events, kept for replay");
        describe_gauge!(PIXEL_STATE, "1 for each pixel's current delivery state");
        if let Some(stats) = stats {
            gauge!(QUEUE_DEPTH).set(stats.queued as f64);
            let age_ms = stats.oldest_queued_at.map_or(0, |at| (now_ms - at).max(0));
            gauge!(OLDEST_AGE).set(age_ms as f64 / 1000.0);
            gauge!(DEAD).set(stats.dead as f64);
        }
        for pixel in pixels {
            for state in ["running", "paused", "throttled"] {
                let value = if pixel.state == state { 1.0 } else { 0.0 };
                gauge!(PIXEL_STATE, "pixel_id" => pixel.pixel_id.clone(), "state" => state)
                    .set(value);
            }
        }
    });
    let mut out = install().render();
    out.push_str(&local.handle().render());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn event_labels_keep_standard_names_and_fold_the_rest() {
        assert_eq!(event_labels(&json!({"event_name": "lead"})), ["Lead"]);
        assert_eq!(
            event_labels(
                &json!([{"event_name": "Purchase"}, {"event_name": "jane@example.com"}, {}])
            ),
            ["Purchase", "custom", "custom"]
        );
        assert_eq!(
            event_labels(&json!({"data": [{"event_name": "ViewContent"}]})),
            ["ViewContent"]
        );
        assert_eq!(event_labels(&json!("nope")), Vec::<&str>::new());
    }

    #[test]
    fn state_gauges_come_from_the_stats_given() {
        let stats = QueueStats {
            queued: 7,
            dead: 2,
            oldest_queued_at: Some(1_000),
            ..QueueStats::default()
        };
        let pixels = [PixelStatus {
            pixel_id: "42".to_owned(),
            state: "paused".to_owned(),
            ..PixelStatus::default()
        }];
        let text = render(Some(&stats), &pixels, 31_000);
        assert!(text.contains("capi_bridge_queue_depth 7\n"), "{text}");
        assert!(
            text.contains("capi_bridge_queue_oldest_age_seconds 30\n"),
            "{text}"
        );
        assert!(text.contains("capi_bridge_dead_events 2\n"), "{text}");
        assert!(
            text.contains("capi_bridge_pixel_state{pixel_id=\"42\",state=\"paused\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("capi_bridge_pixel_state{pixel_id=\"42\",state=\"running\"} 0\n"),
            "{text}"
        );
    }
}
