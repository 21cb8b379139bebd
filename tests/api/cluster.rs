//! Several instances on one Postgres: the work is split, nothing lost, nothing sent twice beyond crash retries.
//!
//! Three copies of the real binary share one Postgres schema and one Graph stand-in. 50,000
//! events go in through all three; halfway one instance is killed with SIGKILL (no graceful
//! shutdown, no release of its leases). Every acknowledged event must reach the stand-in, and an
//! event may reach it twice only when the killed instance sent it and died before recording the
//! delivery (its lease then expires and a survivor sends it again: at-least-once).
//!
//! Each instance runs with its own `META_TEST_EVENT_CODE`, which the service puts on every Graph
//! request it makes; the stand-in records the request bodies, so every copy of every event that
//! reached it can be traced to the instance that sent it.
#![cfg(unix)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::process::ExitStatusExt as _;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Row as _;

use crate::graph_stand_in::{GraphStandIn, Received};
use crate::helpers::{lead, PIXEL, SECRET, TOKEN, WAIT};
use crate::process::{lock, Service};

/// The instances, by label; the label is also in each one's test event code.
const LABELS: [&str; 3] = ["a", "b", "c"];
/// The instance killed with -9 (index in [`LABELS`]).
const VICTIM: usize = 1;
/// Events sent in all.
const EVENTS: usize = 50_000;
/// Events per `POST /v1/events`.
const EVENTS_PER_REQUEST: usize = 250;
/// Concurrent client tasks.
const CLIENTS: usize = 6;
/// Latency of the stand-in, so that deliveries are in flight when the kill happens.
const GRAPH_LATENCY: Duration = Duration::from_millis(30);
/// `DELIVERY_MAX_BATCH_EVENTS` (the default, set explicitly: the duplicate bound depends on it).
const MAX_BATCH_EVENTS: usize = 1000;
/// `DELIVERY_MAX_IN_FLIGHT` (the default, likewise).
const MAX_IN_FLIGHT: usize = 4;
/// The signal `Child::kill` sends on Unix.
const SIGKILL: i32 = 9;
/// Lines of a service's log shown when the test fails.
/// Missing events listed, with their rows, when some never arrive.
const LISTED: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_share_the_work_and_survive_a_kill_9() {
    let started = Instant::now();
    // Declared first, dropped last: after every process using the schema is gone.
    let schema = Schema::fresh();
    let graph = GraphStandIn::start(TOKEN, PIXEL).await;
    graph.set_latency(GRAPH_LATENCY);
    let dir = tempfile::tempdir().expect("tempdir for the logs");
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("http client");
    // One after another: each start runs the migrations (the first creates the schema).
    let mut services = Vec::with_capacity(LABELS.len());
    for (index, label) in LABELS.into_iter().enumerate() {
        let env = service_env(index, &schema, &graph);
        services.push(Service::start(label, dir.path(), &env, &http).await);
    }
    let db = PgPoolOptions::new()
        .max_connections(2)
        .connect(&schema.url)
        .await
        .expect("connect to the test database");
    println!(
        "{} instances up on schema {} after {:?}",
        services.len(),
        schema.name,
        started.elapsed()
    );

    // Act 1: clients send every event, round-robin over the instances still alive.
    let shared = Arc::new(Shared {
        addresses: services.iter().map(|s| s.address.clone()).collect(),
        alive: LABELS.map(|_| AtomicBool::new(true)),
        next_request: AtomicUsize::new(0),
        ingest: Mutex::default(),
    });
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(client(shared.clone(), http.clone())))
        .collect();

    // Act 2: with about half acknowledged and deliveries in flight, kill -9 one instance.
    let deadline = Instant::now() + WAIT;
    let in_flight_at_kill = loop {
        let acked = lock(&shared.ingest).acknowledged.len();
        if acked >= EVENTS / 2 {
            // Accepted first: every accepted event's request is then in the list read after.
            let accepted = graph.accepted_count();
            let requests = graph.requests();
            let answered_ok: usize = requests
                .iter()
                .filter(|r| r.status == 200)
                .map(|r| r.body["data"].as_array().map_or(0, Vec::len))
                .sum();
            let victim_delivering = requests.iter().any(|r| sender(r) == Some(VICTIM));
            if victim_delivering && answered_ok > accepted {
                break answered_ok - accepted;
            }
        }
        {
            let ingest = lock(&shared.ingest);
            assert!(
                ingest.failures.is_empty(),
                "requests failed before the kill: {:?}",
                ingest.failures
            );
        }
        assert!(
            !clients.iter().all(tokio::task::JoinHandle::is_finished),
            "every client finished before the kill ({acked} events acknowledged): ingest outran the test"
        );
        assert!(
            Instant::now() < deadline,
            "never reached {} acknowledged events with instance {} delivering: {acked} acknowledged, {} accepted by the stand-in",
            EVENTS / 2,
            LABELS[VICTIM],
            graph.accepted_count()
        );
        // Polling a condition (acknowledgements have no change feed), not sleeping for an outcome.
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Clients see the flag before they can see the dead socket, so a failed request to the
    // victim is always recognised as one to move elsewhere.
    shared.alive[VICTIM].store(false, Ordering::SeqCst);
    let killed_at = Instant::now();
    let acknowledged_at_kill = lock(&shared.ingest).acknowledged.len();
    let accepted_at_kill = graph.accepted_count();
    let status = services[VICTIM].kill_9();
    assert_eq!(
        status.signal(),
        Some(SIGKILL),
        "instance {} must die of SIGKILL, not exit on its own: {status}",
        LABELS[VICTIM]
    );
    // Every lease the victim held is still in the database: nobody may take it before it
    // expires (DELIVERY_LEASE_MS after it was taken), and this runs at once. The survivors'
    // current leases are in the snapshot too, so it is a superset of the victim's.
    let leased_at_kill = leased_events(&db, &schema.name).await;
    println!(
        "killed instance {} after {:?}: {acknowledged_at_kill} events acknowledged, {accepted_at_kill} accepted by the stand-in, about {in_flight_at_kill} in requests in flight, {} queued events leased",
        LABELS[VICTIM],
        started.elapsed(),
        leased_at_kill.len()
    );

    for client in clients {
        client.await.expect("client task");
    }
    let ingest = std::mem::take(&mut *lock(&shared.ingest));
    assert!(
        ingest.failures.is_empty(),
        "requests failed: {:?}",
        ingest.failures
    );
    assert_eq!(
        ingest.acknowledged.len(),
        EVENTS,
        "every event is acknowledged once the requests the kill cut off are sent elsewhere"
    );
    // A request cut off by the kill may have been committed before the process died: sent
    // again to a survivor, its events are duplicates (acknowledged, stored once). Nothing else
    // may be a duplicate: every event id is new.
    assert!(
        ingest.duplicate_receipts <= ingest.moved_requests * EVENTS_PER_REQUEST,
        "{} duplicate receipts, but only {} requests were sent again after the kill",
        ingest.duplicate_receipts,
        ingest.moved_requests
    );
    let ingested_at = started.elapsed();

    // Act 3: wait until every acknowledged event has reached the stand-in.
    let acknowledged = Arc::new(ingest.acknowledged);
    let waiter = {
        let graph = graph.clone();
        let expected = acknowledged.clone();
        tokio::spawn(async move {
            graph
                .wait_until(
                    WAIT * 4,
                    "every acknowledged event at the stand-in",
                    move |g| {
                        // Cheap test first: the full one copies every accepted event.
                        g.accepted_count() >= expected.len() && {
                            let delivered = accepted_ids(g);
                            expected.iter().all(|id| delivered.contains(id))
                        }
                    },
                )
                .await;
        })
    };
    // A timeout panics inside the task; the assertion below then lists what is missing.
    let _ = waiter.await;
    let delivered = accepted_ids(&graph);
    let mut missing: Vec<&str> = acknowledged
        .iter()
        .filter(|id| !delivered.contains(*id))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        missing.sort_unstable();
        let rows = stored_rows(&db, &schema.name, &missing[..missing.len().min(LISTED)]).await;
        panic!(
            "{} of {} acknowledged events never reached the Graph API; the first in the database:\n{}",
            missing.len(),
            acknowledged.len(),
            rows.join("\n")
        );
    }
    let all_delivered_at = started.elapsed();

    // The victim's events the stand-in got but the victim never marked delivered are sent
    // again when their lease expires: wait for that, so that the duplicate count is final.
    let deadline = Instant::now() + WAIT;
    let queue = loop {
        let queue = services[0].queue(&http).await;
        if queue["queued"] == 0 {
            break queue;
        }
        assert!(
            Instant::now() < deadline,
            "the queue never drained after every event arrived: {queue}"
        );
        // Polling a condition (the queue has no change feed), not sleeping for an outcome.
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(queue["dead"], 0, "no event may die: {queue}");
    assert_eq!(
        queue["delivered"].as_u64(),
        u64::try_from(EVENTS).ok(),
        "every event is stored once and delivered: {queue}"
    );

    // Assert: who sent what. Every copy that reached the stand-in, by sending instance.
    let requests = graph.requests();
    let refused: Vec<String> = requests
        .iter()
        .filter(|r| r.status != 200)
        .map(|r| format!("{} {}", r.status, r.body))
        .collect();
    assert!(
        refused.is_empty(),
        "the stand-in refused requests: {refused:?}"
    );
    // Event id -> (sending instance, arrival at the stand-in) of every copy. Counted from the
    // requests the stand-in received, not from the events it accepted once the answer went out:
    // a request of the victim's that arrived but whose answer it never read counts too (Meta
    // would have processed it), so the duplicate count errs on the high side.
    let mut senders: HashMap<&str, Vec<(usize, Instant)>> = HashMap::with_capacity(EVENTS);
    let mut sent_per_instance = [0usize; LABELS.len()];
    for request in &requests {
        let instance = sender(request).unwrap_or_else(|| {
            panic!(
                "a Graph request without a known test event code: {:?}",
                request.body["test_event_code"]
            )
        });
        for event in request.body["data"].as_array().into_iter().flatten() {
            let event_id = event["event_id"]
                .as_str()
                .expect("every event sent has an event_id");
            senders
                .entry(event_id)
                .or_default()
                .push((instance, request.at));
            sent_per_instance[instance] += 1;
        }
    }
    let unknown: Vec<&&str> = senders
        .keys()
        .filter(|id| !acknowledged.contains(**id))
        .take(LISTED)
        .collect();
    assert!(
        unknown.is_empty(),
        "events reached the Graph API that were never acknowledged: {unknown:?}"
    );
    // At-least-once allows a second copy only where the victim sent the first and died before
    // recording it: a survivor takes the event when the victim's lease expires, so after the
    // kill. Live instances must never send an event twice: not one instance twice (no retries
    // happen here, the stand-in accepts everything), not two survivors once each, and not a
    // survivor while the victim was still alive (claims are exclusive, a lease outlives the
    // request timeout, and a handed-off event must be sent before its lease runs out).
    let mut duplicates: BTreeMap<&str, &[(usize, Instant)]> = BTreeMap::new();
    for (event_id, copies) in &senders {
        if copies.len() > 1 {
            duplicates.insert(event_id, copies);
        }
    }
    let describe = |id: &str, copies: &[(usize, Instant)]| {
        let copies: Vec<String> = copies
            .iter()
            .map(|(i, at)| format!("{} at {}", LABELS[*i], since(killed_at, *at)))
            .collect();
        format!("{id} sent by {}", copies.join(", "))
    };
    let double_sent: Vec<String> = duplicates
        .iter()
        .filter(|(_, copies)| {
            let survivors: Vec<Instant> = copies
                .iter()
                .filter(|(i, _)| *i != VICTIM)
                .map(|(_, at)| *at)
                .collect();
            copies.len() != 2 || survivors.len() != 1 || survivors[0] < killed_at
        })
        .take(LISTED)
        .map(|(id, copies)| describe(id, copies))
        .collect();
    assert!(
        double_sent.is_empty(),
        "events sent twice other than by the killed instance and then one survivor after the kill (times relative to the kill): {double_sent:?}"
    );
    // Cross-check in the database: each duplicate was leased (claimed, not settled) when the
    // victim died, and its row counts a second attempt.
    let not_leased: Vec<&&str> = duplicates
        .keys()
        .filter(|id| !leased_at_kill.contains(**id))
        .take(LISTED)
        .collect();
    assert!(
        not_leased.is_empty(),
        "duplicates that were not leased when the instance was killed: {not_leased:?}"
    );
    let duplicate_ids: Vec<&str> = duplicates.keys().copied().collect();
    let single_attempt = single_attempt_events(&db, &schema.name, &duplicate_ids).await;
    assert!(
        single_attempt.is_empty(),
        "duplicates whose row records one attempt only: {single_attempt:?}"
    );
    // The victim's workers hold at most one batch each between sending it and recording the
    // answer; only those can reach the stand-in without being marked delivered.
    let bound = MAX_IN_FLIGHT * MAX_BATCH_EVENTS;
    assert!(
        duplicates.len() <= bound,
        "{} events were sent twice; the killed instance could have had at most {bound} sent and not recorded",
        duplicates.len()
    );
    // The work is shared: every instance delivered some of it.
    for (instance, sent) in sent_per_instance.iter().enumerate() {
        assert!(
            *sent > 0,
            "instance {} sent nothing: {sent_per_instance:?}",
            LABELS[instance]
        );
    }
    db.close().await;

    let copies: usize = senders.values().map(Vec::len).sum();
    println!(
        "acknowledged {} (after the kill {} requests were sent again, {} events in them acknowledged as duplicates), ingest done after {ingested_at:?}, all delivered after {all_delivered_at:?}, queue drained after {:?}",
        acknowledged.len(),
        ingest.moved_requests,
        ingest.duplicate_receipts,
        started.elapsed()
    );
    println!(
        "the stand-in got {copies} events in {} requests ({} once the answer went out): {} distinct, {} duplicates (bound {bound}; {} events were leased at the kill), sent per instance {}",
        requests.len(),
        graph.accepted_count(),
        senders.len(),
        duplicates.len(),
        leased_at_kill.len(),
        LABELS
            .iter()
            .zip(sent_per_instance)
            .map(|(label, n)| format!("{label}={n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let resent_after: Vec<Duration> = duplicates
        .values()
        .flat_map(|copies| copies.iter().filter(|(i, _)| *i != VICTIM))
        .map(|(_, at)| at.saturating_duration_since(killed_at))
        .collect();
    if let (Some(first), Some(last)) = (resent_after.iter().min(), resent_after.iter().max()) {
        println!("the survivors sent the duplicates {first:?} to {last:?} after the kill");
    }
}

/// What the client tasks share.
struct Shared {
    addresses: Vec<String>,
    alive: [AtomicBool; LABELS.len()],
    /// The next request to send (request `n` carries events `n * EVENTS_PER_REQUEST ..`).
    next_request: AtomicUsize,
    ingest: Mutex<Ingest>,
}

/// What the clients observed.
#[derive(Default)]
struct Ingest {
    acknowledged: HashSet<String>,
    /// Events acknowledged as `duplicate`.
    duplicate_receipts: usize,
    /// Requests sent again to another instance after the kill cut them off.
    moved_requests: usize,
    failures: Vec<String>,
}

/// Sends requests until every event is taken, round-robin over the instances alive: request `n`
/// goes to the `n % alive`th. A request the kill cut off (its outcome unknown) is sent again to
/// an instance alive.
async fn client(shared: Arc<Shared>, http: reqwest::Client) {
    loop {
        let n = shared.next_request.fetch_add(1, Ordering::SeqCst);
        if n >= EVENTS / EVENTS_PER_REQUEST {
            return;
        }
        let ids: Vec<String> = (n * EVENTS_PER_REQUEST..(n + 1) * EVENTS_PER_REQUEST)
            .map(|i| format!("cluster-{i}"))
            .collect();
        let body = Value::Array(ids.iter().map(|id| lead(id)).collect());
        let mut moved = false;
        loop {
            let alive: Vec<usize> = (0..LABELS.len())
                .filter(|i| shared.alive[*i].load(Ordering::SeqCst))
                .collect();
            let target = alive[n % alive.len()];
            let answer = async {
                let response = http
                    .post(format!("{}/v1/events", shared.addresses[target]))
                    .bearer_auth(SECRET)
                    .json(&body)
                    .send()
                    .await?;
                let status = response.status();
                Ok::<_, reqwest::Error>((status, response.json::<Value>().await?))
            }
            .await;
            let failure = match answer {
                Ok((status, report)) if status == 202 => {
                    match record(&mut lock(&shared.ingest), &ids, &report, moved) {
                        Ok(()) => break,
                        Err(problem) => problem,
                    }
                }
                Ok((status, report)) => format!("{status}: {report}"),
                Err(_) if !shared.alive[target].load(Ordering::SeqCst) => {
                    moved = true;
                    continue;
                }
                Err(err) => err.to_string(),
            };
            lock(&shared.ingest)
                .failures
                .push(format!("request {n} to {}: {failure}", LABELS[target]));
            return;
        }
    }
}

/// Records an acknowledgement, checking that it covers exactly the events sent.
fn record(ingest: &mut Ingest, ids: &[String], report: &Value, moved: bool) -> Result<(), String> {
    let receipts = report["events"].as_array().map_or(&[][..], Vec::as_slice);
    if receipts.len() != ids.len() {
        return Err(format!(
            "{} receipts for {} events",
            receipts.len(),
            ids.len()
        ));
    }
    for (id, receipt) in ids.iter().zip(receipts) {
        if receipt["event_id"] != id.as_str() {
            return Err(format!("receipt {receipt} for event {id}"));
        }
        match receipt["status"].as_str() {
            Some("queued") => {}
            Some("duplicate") if moved => ingest.duplicate_receipts += 1,
            _ => return Err(format!("unexpected receipt {receipt}")),
        }
        ingest.acknowledged.insert(id.clone());
    }
    if moved {
        ingest.moved_requests += 1;
    }
    Ok(())
}

/// `at` relative to `reference`, signed, for messages.
fn since(reference: Instant, at: Instant) -> String {
    match at.checked_duration_since(reference) {
        Some(after) => format!("+{after:?}"),
        None => format!("-{:?}", reference.duration_since(at)),
    }
}

/// The instance that sent a Graph request, from its test event code.
fn sender(request: &Received) -> Option<usize> {
    let code = request.body["test_event_code"].as_str()?;
    LABELS.iter().position(|label| test_code(label) == code)
}

fn test_code(label: &str) -> String {
    format!("TEST_CLUSTER_{}", label.to_uppercase())
}

/// Every distinct event id the stand-in accepted.
fn accepted_ids(graph: &GraphStandIn) -> HashSet<String> {
    graph
        .accepted()
        .iter()
        .filter_map(|event| event["event_id"].as_str().map(str::to_owned))
        .collect()
}

/// Event ids of queued rows with a lease (claimed or handed off, not settled).
async fn leased_events(db: &PgPool, schema: &str) -> HashSet<String> {
    let sql = format!(
        "select event_id from \"{schema}\".event where state = 'queued' and leased_until is not null"
    );
    sqlx::query_scalar(&sql)
        .fetch_all(db)
        .await
        .expect("read the leased events")
        .into_iter()
        .collect()
}

/// The given events whose row records fewer than two attempts.
async fn single_attempt_events(db: &PgPool, schema: &str, event_ids: &[&str]) -> Vec<String> {
    let sql = format!(
        "select event_id, attempts from \"{schema}\".event where event_id = any($1) and attempts < 2"
    );
    sqlx::query(&sql)
        .bind(event_ids)
        .fetch_all(db)
        .await
        .expect("read the attempts of the duplicates")
        .iter()
        .map(|row| {
            format!(
                "{:?} attempts {:?}",
                row.try_get::<String, _>("event_id"),
                row.try_get::<i32, _>("attempts")
            )
        })
        .collect()
}

/// The stored rows of these events, for a failure message.
async fn stored_rows(db: &PgPool, schema: &str, event_ids: &[&str]) -> Vec<String> {
    let sql = format!(
        "select event_id, state, attempts, leased_until, next_attempt_at, last_error, delivered_at
         from \"{schema}\".event where event_id = any($1) order by event_id"
    );
    let rows = match sqlx::query(&sql).bind(event_ids).fetch_all(db).await {
        Ok(rows) => rows,
        Err(err) => return vec![format!("  (query failed: {err})")],
    };
    let mut found: HashSet<String> = HashSet::new();
    let mut lines: Vec<String> = rows
        .iter()
        .map(|row| {
            let event_id: String = row.try_get("event_id").unwrap_or_default();
            found.insert(event_id.clone());
            format!(
                "  {event_id}: state {:?}, attempts {:?}, leased_until {:?}, next_attempt_at {:?}, delivered_at {:?}, last_error {:?}",
                row.try_get::<String, _>("state"),
                row.try_get::<i32, _>("attempts"),
                row.try_get::<Option<i64>, _>("leased_until"),
                row.try_get::<i64, _>("next_attempt_at"),
                row.try_get::<Option<i64>, _>("delivered_at"),
                row.try_get::<Option<String>, _>("last_error"),
            )
        })
        .collect();
    lines.extend(
        event_ids
            .iter()
            .filter(|id| !found.contains(**id))
            .map(|id| format!("  {id}: no row")),
    );
    lines
}

/// A Postgres schema of the test's own, dropped when the guard goes.
struct Schema {
    url: String,
    name: String,
}

impl Schema {
    fn fresh() -> Self {
        Self {
            url: std::env::var("TEST_DATABASE_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned()),
            name: format!("cluster_{}", hex::encode(rand::random::<[u8; 6]>())),
        }
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let dropped = Command::new("psql")
            .args([
                self.url.as_str(),
                "-q",
                "-c",
                &format!("drop schema if exists {} cascade", self.name),
            ])
            .output();
        if !dropped.is_ok_and(|o| o.status.success()) {
            eprintln!("could not drop test schema {}", self.name);
        }
    }
}

/// One instance's settings: the shared schema, the stand-in, a test event code naming the
/// instance (so every copy of an event at the stand-in says who sent it), short leases.
fn service_env(index: usize, schema: &Schema, graph: &GraphStandIn) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", schema.url.clone()),
        ("DATABASE_SCHEMA", schema.name.clone()),
        ("META_ACCESS_TOKEN", TOKEN.to_owned()),
        ("META_PIXEL_ID", PIXEL.to_owned()),
        ("META_GRAPH_URL", graph.url.clone()),
        ("META_TEST_EVENT_CODE", test_code(LABELS[index])),
        ("WEBHOOK_SECRET", SECRET.to_owned()),
        ("DELIVERY_LEASE_MS", "3000".to_owned()),
        ("DELIVERY_REQUEST_TIMEOUT_MS", "2000".to_owned()),
        ("DELIVERY_POLL_INTERVAL_MS", "100".to_owned()),
        ("DELIVERY_RETRY_BASE_MS", "50".to_owned()),
        ("DELIVERY_RETRY_MAX_MS", "500".to_owned()),
        ("DELIVERY_MAX_BATCH_EVENTS", MAX_BATCH_EVENTS.to_string()),
        ("DELIVERY_MAX_IN_FLIGHT", MAX_IN_FLIGHT.to_string()),
        ("RUST_LOG", "warn".to_owned()),
    ]
}
