//! The storage contract, written once as `check_*` functions over `&dyn Store` so every backend
//! runs the same suite: SQLite in a temporary file, Postgres in a throwaway schema of the
//! database `TEST_DATABASE_URL` names (default: the local CI server). Postgres tests fail, never
//! skip, when that server is not reachable.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use capi_bridge::store::{
    self, ActivityBucket, AttemptRecord, DropCount, EventQuery, EventUpdate, InsertOutcome,
    MatchKeyRow, NewEventRecord, PixelQueue, QualityCount, ReplayFilter, Retention, Settlement,
    SourceCount, SourcePayload, Store, DEDUP_WINDOW_MS,
};
use sqlx::{Connection, Executor, PgConnection};

const T0: i64 = 1_790_000_000_000;
const PIXEL: &str = "1234567890";

fn record(event_id: &str) -> NewEventRecord {
    NewEventRecord {
        pixel_id: PIXEL.to_owned(),
        event_id: event_id.to_owned(),
        event_name: "Lead".to_owned(),
        payload: format!(r#"{{"event_id":"{event_id}"}}"#),
        test_event_code: None,
        deadline_at: T0 + 7 * 24 * 3600 * 1000,
        dry_run: false,
        source: Some("api".to_owned()),
        lease_until: None,
    }
}

/// Inserts unleased (the polling path) and returns the outcomes.
async fn insert(store: &dyn Store, records: &[NewEventRecord], now: i64) -> Vec<InsertOutcome> {
    store
        .insert_events(records, now)
        .await
        .expect("insert")
        .into_iter()
        .map(|r| r.outcome)
        .collect()
}

async fn sqlite() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("contract.db").display());
    (store::open(&url, "capi_bridge").await.expect("open"), dir)
}

pub(crate) fn postgres_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A transaction-mode PgBouncer in front of the test database, on Supabase's pooler port.
fn pooler_url() -> String {
    std::env::var("TEST_POOLER_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:6543/test".to_owned())
}

/// A Postgres schema of its own for one test, dropped with everything in it when the test ends
/// (passed or failed), so tests run in parallel on one database.
pub(crate) struct PostgresSchema {
    url: String,
    pub(crate) name: String,
}

impl PostgresSchema {
    /// Checks that the server answers (failing the test with a clear message if not) and
    /// picks a fresh schema name; the store creates the schema when it opens.
    pub(crate) async fn new(url: String) -> Self {
        let conn = PgConnection::connect(&url).await.unwrap_or_else(|e| {
            panic!(
                "Postgres is not reachable at {url} ({e}). The store contract runs against a real \
                 Postgres: run scripts/test-services (it starts Postgres and a transaction-mode \
                 PgBouncer), or point TEST_DATABASE_URL (TEST_POOLER_URL for the pooler tests) \
                 at one."
            )
        });
        conn.close().await.expect("close");
        let name = format!("contract_{}", hex::encode(rand::random::<[u8; 8]>()));
        Self { url, name }
    }

    pub(crate) async fn open(&self) -> Arc<dyn Store> {
        store::open(&self.url, &self.name)
            .await
            .expect("open the Postgres store")
    }
}

impl Drop for PostgresSchema {
    fn drop(&mut self) {
        let url = self.url.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot be blocked on: clean up from a
        // thread with a runtime of its own, and wait for it.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let mut conn = PgConnection::connect(&url).await?;
                conn.execute("set lock_timeout = '10s'").await?;
                conn.execute(format!("drop schema if exists \"{name}\" cascade").as_str())
                    .await?;
                conn.close().await
            })
        });
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop test schema {}: {e}", self.name),
            Err(_) => eprintln!("could not drop test schema {}", self.name),
        }
    }
}

/// A Postgres store in a fresh schema; the schema goes when the guard is dropped (after the
/// store: fields drop in order).
struct PostgresTestStore {
    store: Arc<dyn Store>,
    _schema: PostgresSchema,
}

async fn postgres(url: String) -> PostgresTestStore {
    let schema = PostgresSchema::new(url).await;
    PostgresTestStore {
        store: schema.open().await,
        _schema: schema,
    }
}

async fn check_duplicates_within_48_hours_are_skipped(store: &dyn Store) {
    let first = insert(store, &[record("a"), record("b"), record("a")], T0).await;
    assert_eq!(
        first,
        [
            InsertOutcome::Queued,
            InsertOutcome::Queued,
            InsertOutcome::Duplicate
        ]
    );
    let within = insert(store, &[record("a")], T0 + DEDUP_WINDOW_MS - 1).await;
    assert_eq!(within, [InsertOutcome::Duplicate]);
    let mut other_name = record("a");
    other_name.event_name = "Purchase".to_owned();
    let mut other_pixel = record("a");
    other_pixel.pixel_id = "999".to_owned();
    let different = insert(store, &[other_name, other_pixel], T0).await;
    assert_eq!(different, [InsertOutcome::Queued, InsertOutcome::Queued]);
    let after = insert(store, &[record("a")], T0 + DEDUP_WINDOW_MS + 1).await;
    assert_eq!(
        after,
        [InsertOutcome::Queued],
        "a new conversion after the window"
    );
}

async fn check_claims_respect_leases_and_due_times(store: &dyn Store) {
    insert(store, &[record("c1"), record("c2"), record("c3")], T0).await;
    let claimed = store
        .claim_due(PIXEL, 2, T0, T0 + 1000)
        .await
        .expect("claim");
    assert_eq!(
        claimed
            .iter()
            .map(|c| c.event_id.as_str())
            .collect::<Vec<_>>(),
        ["c1", "c2"]
    );
    assert!(claimed.iter().all(|c| c.attempts == 1));
    // Leased events are not claimed again while the lease lives…
    let second = store
        .claim_due(PIXEL, 10, T0 + 10, T0 + 1000)
        .await
        .expect("claim");
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].event_id, "c3");
    assert!(store
        .claim_due(PIXEL, 10, T0 + 20, T0 + 1000)
        .await
        .expect("claim")
        .is_empty());
    // …and are picked up again once it expires (a crashed worker).
    let again = store
        .claim_due(PIXEL, 10, T0 + 1001, T0 + 2000)
        .await
        .expect("claim");
    assert_eq!(again.len(), 3);
    assert!(again.iter().all(|c| c.attempts == 2));
    // Other pixels are not touched.
    assert!(store
        .claim_due("other", 10, T0 + 5000, T0 + 6000)
        .await
        .expect("claim")
        .is_empty());
}

async fn check_settlements_move_events_through_their_states(store: &dyn Store) {
    insert(
        store,
        &[record("s1"), record("s2"), record("s3"), record("s4")],
        T0,
    )
    .await;
    let claimed = store
        .claim_due(PIXEL, 10, T0, T0 + 1000)
        .await
        .expect("claim");
    let attempt = AttemptRecord {
        outcome: "retry".to_owned(),
        http_status: Some(500),
        ..AttemptRecord::default()
    };
    let updates = vec![
        EventUpdate {
            row_id: claimed[0].row_id,
            settlement: Settlement::Delivered,
            attempt: None,
        },
        EventUpdate {
            row_id: claimed[1].row_id,
            settlement: Settlement::Retry {
                next_attempt_at: T0 + 5000,
                reason: "http 500".to_owned(),
            },
            attempt: Some(attempt.clone()),
        },
        EventUpdate {
            row_id: claimed[2].row_id,
            settlement: Settlement::Dead {
                reason: "meta error 100: bad".to_owned(),
            },
            attempt: Some(attempt),
        },
        EventUpdate {
            row_id: claimed[3].row_id,
            settlement: Settlement::Release {
                reason: "pixel paused".to_owned(),
            },
            attempt: None,
        },
    ];
    store.settle(&updates, T0 + 100).await.expect("settle");

    let state = |id: &'static str| async move {
        store
            .find_event(id, T0 + 200)
            .await
            .expect("find")
            .expect("exists")
    };
    assert_eq!(state("s1").await.state, "delivered");
    let retried = state("s2").await;
    assert_eq!(retried.state, "failed");
    assert_eq!(retried.next_attempt_at, Some(T0 + 5000));
    assert_eq!(retried.attempts_log.len(), 1);
    assert_eq!(state("s3").await.state, "dead");
    let released = state("s4").await;
    assert_eq!(
        released.attempts, 0,
        "a release does not count as an attempt"
    );

    // Not due yet: only the released one is claimable now.
    let due = store
        .claim_due(PIXEL, 10, T0 + 200, T0 + 1200)
        .await
        .expect("claim");
    assert_eq!(
        due.iter().map(|c| c.event_id.as_str()).collect::<Vec<_>>(),
        ["s4"]
    );
    let stats = store.stats().await.expect("stats");
    assert_eq!((stats.queued, stats.delivered, stats.dead), (2, 1, 1));

    // Another pixel's queue is counted apart.
    let mut other = record("s5");
    other.pixel_id = "999".to_owned();
    insert(store, &[other], T0 + 300).await;
    let stats = store.stats().await.expect("stats");
    assert_eq!((stats.queued, stats.oldest_queued_at), (3, Some(T0)));
    assert_eq!(
        stats.by_pixel,
        [
            PixelQueue {
                pixel_id: PIXEL.to_owned(),
                queued: 2,
                dead: 1,
                oldest_queued_at: Some(T0),
            },
            PixelQueue {
                pixel_id: "999".to_owned(),
                queued: 1,
                dead: 0,
                oldest_queued_at: Some(T0 + 300),
            },
        ]
    );
}

async fn check_a_postponed_event_waits_without_its_attempt_counted(store: &dyn Store) {
    insert(store, &[record("p1"), record("p2")], T0).await;
    let claimed = store
        .claim_due(PIXEL, 10, T0, T0 + 1000)
        .await
        .expect("claim");
    assert!(claimed.iter().all(|c| c.attempts == 1));
    let postpone = |row_id: i64, next_attempt_at: i64| EventUpdate {
        row_id,
        settlement: Settlement::Postpone {
            next_attempt_at,
            reason: "batch split waiting: http 500".to_owned(),
        },
        attempt: None,
    };
    store
        .settle(
            &[
                postpone(claimed[0].row_id, T0 + 5000),
                postpone(claimed[1].row_id, T0 + 9000),
            ],
            T0 + 100,
        )
        .await
        .expect("settle");

    let p1 = store
        .find_event("p1", T0 + 200)
        .await
        .expect("find")
        .expect("exists");
    assert_eq!(p1.state, "queued");
    assert_eq!(
        p1.attempts, 0,
        "a postponement does not count as an attempt"
    );
    assert_eq!(p1.next_attempt_at, Some(T0 + 5000));
    assert_eq!(
        p1.last_error.as_deref(),
        Some("batch split waiting: http 500")
    );
    // Due at its own time, not before, and then claimed as a first attempt again.
    assert!(store
        .claim_due(PIXEL, 10, T0 + 4999, T0 + 6000)
        .await
        .expect("claim")
        .is_empty());
    let due = store
        .claim_due(PIXEL, 10, T0 + 5000, T0 + 6000)
        .await
        .expect("claim");
    assert_eq!(
        due.iter()
            .map(|c| (c.event_id.as_str(), c.attempts))
            .collect::<Vec<_>>(),
        [("p1", 1)]
    );
}

async fn check_replay_requeues_only_matching_dead_events(store: &dyn Store) {
    let mut purchase = record("r3");
    purchase.event_name = "Purchase".to_owned();
    insert(store, &[record("r1"), record("r2"), purchase], T0).await;
    let claimed = store
        .claim_due(PIXEL, 10, T0, T0 + 1000)
        .await
        .expect("claim");
    let updates: Vec<_> = claimed
        .iter()
        .zip([
            "meta error 190: token",
            "meta error 100: bad",
            "meta error 190: token",
        ])
        .map(|(c, reason)| EventUpdate {
            row_id: c.row_id,
            settlement: Settlement::Dead {
                reason: reason.to_owned(),
            },
            attempt: None,
        })
        .collect();
    store.settle(&updates, T0).await.expect("settle");

    let by_id = ReplayFilter {
        event_ids: vec!["r2".to_owned()],
        ..ReplayFilter::default()
    };
    assert_eq!(store.requeue_dead(&by_id, T0 + 1).await.expect("replay"), 1);
    let by_reason = ReplayFilter {
        reason_contains: Some("190".to_owned()),
        event_name: Some("Purchase".to_owned()),
        ..ReplayFilter::default()
    };
    assert_eq!(
        store
            .requeue_dead(&by_reason, T0 + 1)
            .await
            .expect("replay"),
        1
    );
    assert_eq!(
        store
            .find_event("r1", T0 + 2)
            .await
            .expect("find")
            .expect("r1")
            .state,
        "dead"
    );
    let replayed = store
        .find_event("r3", T0 + 2)
        .await
        .expect("find")
        .expect("r3");
    assert_eq!(replayed.state, "queued");
    assert_eq!(replayed.attempts, 0);
    assert_eq!(
        store
            .requeue_dead(&ReplayFilter::default(), T0 + 3)
            .await
            .expect("replay"),
        1,
        "an empty filter replays every dead event"
    );
}

async fn check_dry_run_events_are_stored_but_never_claimed(store: &dyn Store) {
    let mut dry = record("d1");
    dry.dry_run = true;
    let outcome = insert(store, &[dry], T0).await;
    assert_eq!(outcome, [InsertOutcome::DryRun]);
    assert!(store
        .claim_due(PIXEL, 10, T0, T0 + 1000)
        .await
        .expect("claim")
        .is_empty());
    assert_eq!(
        store
            .find_event("d1", T0)
            .await
            .expect("find")
            .expect("d1")
            .state,
        "dry_run"
    );
}

async fn check_events_inserted_with_a_lease_are_claimable_only_after_it(store: &dyn Store) {
    let inserted = store
        .insert_events(
            &[record("l1"), record("l2"), record("l1")].map(|r| NewEventRecord {
                lease_until: Some(T0 + 1000),
                ..r
            }),
            T0,
        )
        .await
        .expect("insert");
    let ids: Vec<_> = inserted.iter().map(|r| r.row_id).collect();
    assert!(ids[0].is_some() && ids[1].is_some() && ids[0] != ids[1]);
    assert_eq!(inserted[2].outcome, InsertOutcome::Duplicate);
    assert_eq!(ids[2], None);
    let shown = store
        .find_event("l1", T0 + 10)
        .await
        .expect("find")
        .expect("l1");
    assert_eq!(shown.state, "delivering");
    assert_eq!(shown.attempts, 1);
    // Handed to this process's workers: nobody claims them while the lease lives.
    assert!(store
        .claim_due(PIXEL, 10, T0 + 999, T0 + 2000)
        .await
        .expect("claim")
        .is_empty());
    // A crash leaves them leased; once the lease expires they are claimed like any other.
    let again = store
        .claim_due(PIXEL, 10, T0 + 1000, T0 + 2000)
        .await
        .expect("claim");
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(|c| c.attempts == 2));
    assert_eq!(again[0].payload, r#"{"event_id":"l1"}"#);
}

async fn check_retention_prunes_finished_events_and_expired_dedup_keys(store: &dyn Store) {
    const DAY: i64 = 24 * 60 * 60 * 1000;
    let retention = Retention {
        delivered_ms: 30 * DAY,
        dead_ms: 90 * DAY,
        counts_ms: 366 * DAY,
    };
    let mut dry = record("p-dry");
    dry.dry_run = true;
    insert(
        store,
        &[
            record("p-delivered"),
            record("p-dead"),
            record("p-queued"),
            dry,
        ],
        T0,
    )
    .await;
    let claimed = store
        .claim_due(PIXEL, 2, T0, T0 + 1000)
        .await
        .expect("claim");
    let updates = vec![
        EventUpdate {
            row_id: claimed[0].row_id,
            settlement: Settlement::Delivered,
            attempt: None,
        },
        EventUpdate {
            row_id: claimed[1].row_id,
            settlement: Settlement::Dead {
                reason: "meta error 100: bad".to_owned(),
            },
            attempt: Some(AttemptRecord {
                outcome: "rejected".to_owned(),
                ..AttemptRecord::default()
            }),
        },
    ];
    store.settle(&updates, T0).await.expect("settle");

    // Past the dedup window only the keys go.
    let pruned = store
        .prune(T0 + DEDUP_WINDOW_MS + 1, &retention)
        .await
        .expect("prune");
    assert_eq!(pruned.dedup_keys, 4);
    assert_eq!((pruned.delivered, pruned.dead), (0, 0));
    // A month later the delivered and dry-run events go; the dead and the queued stay.
    let pruned = store.prune(T0 + 31 * DAY, &retention).await.expect("prune");
    assert_eq!((pruned.delivered, pruned.dead), (2, 0));
    let exists =
        |id: &'static str| async move { store.find_event(id, T0).await.expect("find").is_some() };
    assert!(!exists("p-delivered").await);
    assert!(!exists("p-dry").await);
    assert!(exists("p-dead").await);
    assert!(exists("p-queued").await);
    // Dead letters are kept longer; queued events never expire here.
    let pruned = store.prune(T0 + 91 * DAY, &retention).await.expect("prune");
    assert_eq!(pruned.dead, 1);
    assert!(!exists("p-dead").await);
    assert!(exists("p-queued").await);
    // A key past its window may come again as a new conversion.
    assert_eq!(
        insert(store, &[record("p-delivered")], T0 + 91 * DAY).await,
        [InsertOutcome::Queued]
    );
}

/// Two instances (two stores, each with its own pool, on one schema) claim the same 500 due
/// events at once, 100 at a time, until none are left: `for update skip locked` must hand each
/// event to exactly one of them.
async fn check_concurrent_claims_take_each_event_once(url: String) {
    const EVENTS: usize = 500;
    let schema = PostgresSchema::new(url).await;
    let first = schema.open().await;
    let records: Vec<_> = (0..EVENTS).map(|i| record(&format!("race-{i}"))).collect();
    let outcomes = insert(first.as_ref(), &records, T0).await;
    assert!(outcomes.iter().all(|o| *o == InsertOutcome::Queued));
    let second = schema.open().await;

    let claimer = |store: Arc<dyn Store>| {
        tokio::spawn(async move {
            let mut claimed = Vec::new();
            loop {
                let batch = store
                    .claim_due(PIXEL, 100, T0, T0 + 60_000)
                    .await
                    .expect("claim");
                if batch.is_empty() {
                    return claimed;
                }
                claimed.extend(batch.into_iter().map(|c| c.event_id));
            }
        })
    };
    let (a, b) = tokio::join!(claimer(first.clone()), claimer(second));
    let (a, b) = (a.expect("first claimer"), b.expect("second claimer"));

    let mut seen = HashSet::new();
    for id in a.iter().chain(&b) {
        assert!(seen.insert(id.as_str()), "{id} was claimed twice");
    }
    assert_eq!(seen.len(), EVENTS, "every event is claimed");
    assert!(first
        .claim_due(PIXEL, 100, T0, T0 + 60_000)
        .await
        .expect("claim")
        .is_empty());
}

async fn check_inbox_payloads_are_leased_then_stored_or_kept_invalid(store: &dyn Store) {
    let a = store
        .enqueue_inbox("sql", &serde_json::json!({"event_name": "Lead"}), T0)
        .await
        .expect("enqueue");
    let b = store
        .enqueue_inbox("sql", &serde_json::json!([{"event_name": "Purchase"}]), T0)
        .await
        .expect("enqueue");
    let taken = store.claim_inbox(10, T0, T0 + 1000).await.expect("claim");
    assert_eq!(taken.iter().map(|i| i.id).collect::<Vec<_>>(), [a, b]);
    assert_eq!(taken[0].payload["event_name"], "Lead");
    assert_eq!(taken[0].source, "sql");
    // Leased: not taken again until the lease ends (a crashed worker's rows come back).
    assert!(store
        .claim_inbox(10, T0 + 999, T0 + 2000)
        .await
        .expect("claim")
        .is_empty());
    assert_eq!(
        store
            .claim_inbox(10, T0 + 1000, T0 + 2000)
            .await
            .expect("claim")
            .len(),
        2
    );

    let problems = serde_json::json!([{"field": "custom_data.value", "reason": "needed"}]);
    store
        .finish_inbox(&[a], &[(b, problems.clone())], T0 + 1001)
        .await
        .expect("finish");
    let parked = store.parked_payloads(10).await.expect("parked");
    assert_eq!(parked.len(), 1);
    assert_eq!(
        (parked[0].id, parked[0].source.as_str(), &parked[0].problems),
        (b, "sql", &problems)
    );
    assert_eq!(
        (parked[0].received_at, parked[0].parked_at),
        (T0, T0 + 1001)
    );
    // Stored ones are gone, invalid ones stay out of the way until replayed.
    assert!(store
        .claim_inbox(10, T0 + 5000, T0 + 6000)
        .await
        .expect("claim")
        .is_empty());
    assert_eq!(
        store
            .requeue_invalid_inbox(T0 + 5001)
            .await
            .expect("replay"),
        1
    );
    let again = store
        .claim_inbox(10, T0 + 5002, T0 + 6000)
        .await
        .expect("claim");
    assert_eq!(again.iter().map(|i| i.id).collect::<Vec<_>>(), [b]);
}

async fn check_source_payloads_dedup_delivery_ids_and_count_outcomes(store: &dyn Store) {
    let payload = serde_json::json!({"event": "conversation_created", "id": 1});
    let first = store
        .enqueue_source_payload("chatwoot", Some("d-1"), &payload, T0)
        .await
        .expect("enqueue");
    assert!(first.is_some());
    let retry = store
        .enqueue_source_payload("chatwoot", Some("d-1"), &payload, T0 + 1000)
        .await
        .expect("enqueue");
    assert_eq!(retry, None, "the same delivery id within 48 hours");
    let other_source = store
        .enqueue_source_payload("helpdesk", Some("d-1"), &payload, T0 + 1000)
        .await
        .expect("enqueue");
    assert!(other_source.is_some(), "delivery ids are per source");
    let without_id = store
        .enqueue_source_payload("supabase", None, &payload, T0)
        .await
        .expect("enqueue");
    assert!(without_id.is_some());
    // In one batch, the second of two deliveries with the same id is the duplicate.
    let twice = SourcePayload {
        source: "chatwoot".to_owned(),
        delivery_id: Some("d-9".to_owned()),
        payload: payload.clone(),
    };
    let batch = store
        .enqueue_source_payloads(&[twice.clone(), twice], T0)
        .await
        .expect("enqueue");
    assert!(batch[0].is_some());
    assert_eq!(batch[1], None);
    let claimed = store.claim_inbox(10, T0, T0 + 1000).await.expect("claim");
    assert_eq!(claimed.len(), 4);
    assert_eq!(claimed[0].payload, payload);

    let count = |outcome: &'static str, n: u64| SourceCount {
        source: "chatwoot".to_owned(),
        outcome,
        count: n,
    };
    store
        .count_source_outcomes(&[count("received", 2), count("unmatched", 1)], T0)
        .await
        .expect("count");
    store
        .count_source_outcomes(&[count("received", 1)], T0 + 5)
        .await
        .expect("count");
    let stats = store.source_stats().await.expect("stats");
    let get = |source: &str, outcome: &str| {
        stats
            .iter()
            .find(|s| s.source == source && s.outcome == outcome)
            .map(|s| (s.count, s.last_at))
    };
    assert_eq!(get("chatwoot", "received"), Some((3, Some(T0 + 5))));
    assert_eq!(get("chatwoot", "unmatched"), Some((1, Some(T0))));
    assert_eq!(get("chatwoot", "pending").map(|(n, _)| n), Some(2));

    // After the window the delivery id may be used again, and pruning forgets it.
    let later = T0 + DEDUP_WINDOW_MS + 1;
    let again = store
        .enqueue_source_payload("chatwoot", Some("d-1"), &payload, later)
        .await
        .expect("enqueue");
    assert!(again.is_some());
    let pruned = store
        .prune(later + DEDUP_WINDOW_MS + 1, &Retention::default())
        .await
        .expect("prune");
    assert!(pruned.dedup_keys >= 2, "{pruned:?}");
}

fn match_key(identity: &str, field: &str, value: &str, seen_at: i64) -> MatchKeyRow {
    MatchKeyRow {
        identity: identity.to_owned(),
        field: field.to_owned(),
        value: value.to_owned(),
        seen_at,
        expires_at: seen_at + 90 * 24 * 3600 * 1000,
    }
}

/// What `recall_match_keys` returns, sorted, as `(identity, field, value, seen_at)`.
async fn recall(
    store: &dyn Store,
    identities: &[&str],
    now: i64,
) -> Vec<(String, String, String, i64)> {
    let identities: Vec<String> = identities.iter().map(|i| (*i).to_owned()).collect();
    let mut rows: Vec<_> = store
        .recall_match_keys(&identities, now)
        .await
        .expect("recall")
        .into_iter()
        .map(|m| (m.identity, m.field, m.value, m.seen_at))
        .collect();
    rows.sort();
    rows
}

fn row(identity: &str, field: &str, value: &str, seen_at: i64) -> (String, String, String, i64) {
    (
        identity.to_owned(),
        field.to_owned(),
        value.to_owned(),
        seen_at,
    )
}

async fn check_match_keys_keep_the_newest_value_per_identity_and_field(store: &dyn Store) {
    let ip = |v: &str| format!("\"{v}\"");
    // One write; within it, the same key twice keeps the newer.
    store
        .remember_match_keys(&[
            match_key("x:a", "client_ip_address", &ip("192.0.2.1"), T0),
            match_key("x:a", "client_ip_address", &ip("192.0.2.2"), T0 + 5),
            match_key("x:a", "client_ip_address", &ip("192.0.2.3"), T0 + 1),
            match_key("x:a", "em", r#"["aa"]"#, T0),
            match_key("e:aa", "client_ip_address", &ip("192.0.2.2"), T0 + 5),
        ])
        .await
        .expect("remember");
    assert_eq!(
        recall(store, &["x:a", "e:aa", "x:unknown"], T0).await,
        [
            row("e:aa", "client_ip_address", &ip("192.0.2.2"), T0 + 5),
            row("x:a", "client_ip_address", &ip("192.0.2.2"), T0 + 5),
            row("x:a", "em", r#"["aa"]"#, T0),
        ]
    );
    assert!(recall(store, &[], T0).await.is_empty());
    store.remember_match_keys(&[]).await.expect("nothing");

    // Later writes: an older value never replaces a newer one (a backfilled event, another
    // instance's late flush); a newer one does, expiry included; a tie goes to the later write;
    // nothing else is touched.
    let mut renewed = match_key("x:a", "em", r#"["bb"]"#, T0 + 10);
    renewed.expires_at = T0 + 20_000;
    store
        .remember_match_keys(&[
            match_key("x:a", "client_ip_address", &ip("192.0.2.9"), T0 + 4),
            renewed,
            match_key("e:aa", "client_ip_address", &ip("192.0.2.7"), T0 + 5),
        ])
        .await
        .expect("remember");
    assert_eq!(
        recall(store, &["x:a", "e:aa"], T0 + 10).await,
        [
            row("e:aa", "client_ip_address", &ip("192.0.2.7"), T0 + 5),
            row("x:a", "client_ip_address", &ip("192.0.2.2"), T0 + 5),
            row("x:a", "em", r#"["bb"]"#, T0 + 10),
        ]
    );
    let em = store
        .recall_match_keys(&["x:a".to_owned()], T0)
        .await
        .expect("recall")
        .into_iter()
        .find(|m| m.field == "em")
        .expect("em");
    assert_eq!(em.expires_at, T0 + 20_000);
    // The events are not touched by any of it.
    assert_eq!(
        insert(store, &[record("mk-1")], T0).await,
        [InsertOutcome::Queued]
    );
}

async fn check_expired_match_keys_are_not_recalled_and_are_pruned(store: &dyn Store) {
    let mut short = match_key("x:a", "fbc", r#""fb.1.1.abc""#, T0);
    short.expires_at = T0 + 1000;
    let long = match_key("x:a", "fbp", r#""fb.1.1.2""#, T0);
    let mut other = match_key("e:b", "em", r#"["bb"]"#, T0);
    other.expires_at = T0 + 1000;
    store
        .remember_match_keys(&[short, long, other])
        .await
        .expect("remember");
    assert_eq!(recall(store, &["x:a", "e:b"], T0 + 999).await.len(), 3);
    // Expired: no longer recalled, even before the clean-up runs.
    assert_eq!(
        recall(store, &["x:a", "e:b"], T0 + 1000).await,
        [row("x:a", "fbp", r#""fb.1.1.2""#, T0)]
    );
    let pruned = store
        .prune(T0 + 1000, &Retention::default())
        .await
        .expect("prune");
    assert_eq!(pruned.match_keys, 2);
    let pruned = store
        .prune(T0 + 1000, &Retention::default())
        .await
        .expect("prune");
    assert_eq!(pruned.match_keys, 0);
    assert_eq!(recall(store, &["x:a", "e:b"], T0).await.len(), 1);
}

fn quality(day: i64, event_name: &str, events: i64, em: i64, filled_fbc: i64) -> QualityCount {
    let mut count = QualityCount {
        day,
        pixel_id: PIXEL.to_owned(),
        event_name: event_name.to_owned(),
        events,
        ..QualityCount::default()
    };
    count.carried[0] = em;
    count.carried[4] = filled_fbc;
    count.filled[4] = filled_fbc;
    count
}

fn dropped(day: i64, field: &str, count: i64) -> DropCount {
    DropCount {
        day,
        pixel_id: PIXEL.to_owned(),
        event_name: "Lead".to_owned(),
        field: field.to_owned(),
        reason: "not a valid phone number".to_owned(),
        count,
    }
}

async fn check_match_quality_counts_add_up_per_day_pixel_and_name(store: &dyn Store) {
    let day = T0 / (24 * 3600 * 1000);
    store
        .count_match_quality(
            &[
                quality(day - 1, "Lead", 5, 5, 0),
                quality(day, "Lead", 2, 1, 1),
            ],
            &[dropped(day, "ph", 1)],
        )
        .await
        .expect("count");
    // Later increments add to the same rows; every column is its own counter.
    store
        .count_match_quality(
            &[
                quality(day, "Lead", 3, 3, 2),
                quality(day, "Purchase", 1, 0, 0),
            ],
            &[dropped(day, "ph", 2), dropped(day, "em", 1)],
        )
        .await
        .expect("count again");
    store
        .count_match_quality(&[], &[])
        .await
        .expect("nothing to count");

    let (counts, drops) = store.match_quality(day).await.expect("read");
    assert_eq!(
        counts,
        [
            quality(day, "Lead", 5, 4, 3),
            quality(day, "Purchase", 1, 0, 0)
        ]
    );
    assert_eq!(drops, [dropped(day, "em", 1), dropped(day, "ph", 3)]);
    let (counts, _) = store.match_quality(day - 1).await.expect("read");
    assert_eq!(counts.len(), 3);
    assert_eq!(counts[0], quality(day - 1, "Lead", 5, 5, 0));
    let (counts, drops) = store.match_quality(day + 1).await.expect("read");
    assert!(counts.is_empty() && drops.is_empty());
}

/// Runs every check against every backend: one list, so no backend can miss a check.
/// The dashboard's reads: activity per bucket, the event list with its filters and pages,
/// dead letters by exact reason, the latest errors; and its writes: retry now, replay by
/// exact reason, replay chosen parked payloads.
async fn check_dashboard_queries_count_list_group_and_replay(store: &dyn Store) {
    const FIVE_MIN: i64 = 5 * 60 * 1000;
    let mut purchase = record("d5");
    purchase.event_name = "Purchase".to_owned();
    purchase.source = Some("chatwoot".to_owned());
    insert(
        store,
        &[
            record("d1"),
            record("d2"),
            record("d3"),
            record("d4"),
            purchase,
        ],
        T0,
    )
    .await;
    let claimed = store
        .claim_due(PIXEL, 10, T0, T0 + 1000)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 5);
    let refused = AttemptRecord {
        outcome: "rejected".to_owned(),
        http_status: Some(400),
        code: Some(100),
        subcode: Some(2_804_050),
        fbtrace_id: Some("trace-1".to_owned()),
        error_title: Some("Missing customer information".to_owned()),
        error_message: Some("Add em or ph".to_owned()),
    };
    let dead = |row_id: i64| EventUpdate {
        row_id,
        settlement: Settlement::Dead {
            reason: "meta error 100/2804050: Missing customer information".to_owned(),
        },
        attempt: Some(refused.clone()),
    };
    let updates = vec![
        EventUpdate {
            row_id: claimed[0].row_id,
            settlement: Settlement::Delivered,
            attempt: None,
        },
        dead(claimed[1].row_id),
        dead(claimed[2].row_id),
        EventUpdate {
            row_id: claimed[3].row_id,
            settlement: Settlement::Retry {
                next_attempt_at: T0 + 60_000,
                reason: "http 500".to_owned(),
            },
            attempt: Some(AttemptRecord {
                outcome: "retry".to_owned(),
                http_status: Some(500),
                ..AttemptRecord::default()
            }),
        },
        EventUpdate {
            row_id: claimed[4].row_id,
            settlement: Settlement::Release {
                reason: "pixel paused".to_owned(),
            },
            attempt: None,
        },
    ];
    store.settle(&updates, T0 + 100).await.expect("settle");
    // One more, two buckets later.
    insert(store, &[record("d6")], T0 + 2 * FIVE_MIN + 1).await;

    // Counted per five minutes of UTC: the answer starts at the bucket holding T0.
    let start = T0 - T0.rem_euclid(FIVE_MIN);
    let activity = store.activity(T0, FIVE_MIN, 3).await.expect("activity");
    assert_eq!(
        activity,
        [
            ActivityBucket {
                start,
                accepted: 5,
                delivered: 1,
                dead: 2
            },
            ActivityBucket {
                start: start + FIVE_MIN,
                ..ActivityBucket::default()
            },
            ActivityBucket {
                start: start + 2 * FIVE_MIN,
                accepted: 1,
                delivered: 0,
                dead: 0
            },
        ]
    );
    // Before the window: nothing; a window of one bucket ignores later events.
    let earlier = store
        .activity(T0 - 3 * FIVE_MIN, FIVE_MIN, 3)
        .await
        .expect("activity");
    assert!(earlier
        .iter()
        .all(|b| b.accepted + b.delivered + b.dead == 0));
    assert_eq!(
        store.activity(T0, FIVE_MIN, 1).await.expect("activity")[0].accepted,
        5
    );

    let now = T0 + 200;
    let list = |query: EventQuery| async move {
        store
            .list_events(&query, now)
            .await
            .expect("list")
            .into_iter()
            .map(|e| (e.event_id, e.state))
            .collect::<Vec<_>>()
    };
    let page = |limit: usize| EventQuery {
        limit,
        ..EventQuery::default()
    };
    let all = list(page(10)).await;
    let ids: Vec<&str> = all.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["d6", "d5", "d4", "d3", "d2", "d1"], "newest first");
    let state_of = |id: &str| all.iter().find(|(i, _)| i == id).map(|(_, s)| s.as_str());
    assert_eq!(state_of("d1"), Some("delivered"));
    assert_eq!(state_of("d2"), Some("dead"));
    assert_eq!(state_of("d4"), Some("failed"));
    assert_eq!(state_of("d6"), Some("queued"));
    let by_state = |state: &str| EventQuery {
        state: Some(state.to_owned()),
        ..page(10)
    };
    assert_eq!(
        list(by_state("dead")).await,
        [
            ("d3".to_owned(), "dead".to_owned()),
            ("d2".to_owned(), "dead".to_owned())
        ]
    );
    assert_eq!(list(by_state("failed")).await.len(), 1);
    assert_eq!(list(by_state("delivered")).await.len(), 1);
    assert_eq!(list(by_state("lost")).await, []);
    let named = EventQuery {
        event_name: Some("Purchase".to_owned()),
        ..page(10)
    };
    assert_eq!(list(named).await, [("d5".to_owned(), "queued".to_owned())]);
    let from_chatwoot = EventQuery {
        source: Some("chatwoot".to_owned()),
        ..page(10)
    };
    assert_eq!(
        list(from_chatwoot).await,
        [("d5".to_owned(), "queued".to_owned())]
    );
    let listed_source = store
        .list_events(&page(1), now)
        .await
        .expect("list")
        .remove(0)
        .source;
    assert_eq!(listed_source.as_deref(), Some("api"));
    let by_id = EventQuery {
        event_id: Some("d2".to_owned()),
        ..page(10)
    };
    assert_eq!(list(by_id).await.len(), 1);
    let later = EventQuery {
        received_from: Some(T0 + 1),
        ..page(10)
    };
    assert_eq!(list(later).await, [("d6".to_owned(), "queued".to_owned())]);
    let earlier = EventQuery {
        received_until: Some(T0 + 1),
        ..page(10)
    };
    assert_eq!(list(earlier).await.len(), 5);
    // Pages: two rows, then the two after the last row shown.
    let first = store.list_events(&page(2), now).await.expect("list");
    assert_eq!(first.len(), 2);
    let next = EventQuery {
        before_row: first.last().map(|e| e.row_id),
        ..page(2)
    };
    let second: Vec<String> = list(next).await.into_iter().map(|(id, _)| id).collect();
    assert_eq!(second, ["d4", "d3"]);

    let reasons = store.dead_reasons(10).await.expect("reasons");
    assert_eq!(reasons.len(), 1);
    assert_eq!(
        reasons[0].reason,
        "meta error 100/2804050: Missing customer information"
    );
    assert_eq!((reasons[0].count, reasons[0].last_at), (2, T0 + 100));

    let errors = store.recent_errors(2).await.expect("errors");
    assert_eq!(errors.len(), 2);
    assert!(errors.iter().all(|e| e.attempt.attempted_at == T0 + 100));
    let refused_one = errors
        .iter()
        .find(|e| e.attempt.record.code == Some(100))
        .expect("a refusal among the newest");
    assert_eq!(refused_one.attempt.record, refused);
    assert_eq!(refused_one.event_name, "Lead");
    assert_eq!(store.recent_errors(10).await.expect("errors").len(), 3);

    // Retry now: the failed event is due at once, not at T0 + 60 s; a leased one is left alone.
    assert_eq!(store.retry_now("d4", T0 + 300).await.expect("retry"), 1);
    let due: Vec<String> = store
        .claim_due(PIXEL, 10, T0 + 300, T0 + 1300)
        .await
        .expect("claim")
        .into_iter()
        .map(|c| c.event_id)
        .collect();
    assert!(due.contains(&"d4".to_owned()), "{due:?}");
    assert_eq!(store.retry_now("d4", T0 + 400).await.expect("retry"), 0);
    assert_eq!(store.retry_now("d2", T0 + 400).await.expect("retry"), 0);

    // Replay by exact reason: a prefix matches nothing.
    let prefix = ReplayFilter {
        reason: Some("meta error 100".to_owned()),
        ..ReplayFilter::default()
    };
    assert_eq!(
        store.requeue_dead(&prefix, T0 + 500).await.expect("replay"),
        0
    );
    let exact = ReplayFilter {
        reason: Some(reasons[0].reason.clone()),
        ..ReplayFilter::default()
    };
    assert_eq!(
        store.requeue_dead(&exact, T0 + 500).await.expect("replay"),
        2
    );
    assert!(store.dead_reasons(10).await.expect("reasons").is_empty());

    // Parked payloads: only the chosen ones go back to pending.
    let mut ids = Vec::new();
    for n in 0..3 {
        let payload = serde_json::json!({"event_name": "Lead", "n": n});
        ids.push(
            store
                .enqueue_inbox("sql", &payload, T0)
                .await
                .expect("enqueue"),
        );
    }
    let claimed = store
        .claim_inbox(10, T0, T0 + 1000)
        .await
        .expect("claim inbox");
    assert_eq!(claimed.len(), 3);
    let problems = serde_json::json!([{"field": "email", "reason": "missing"}]);
    let invalid: Vec<(i64, serde_json::Value)> =
        ids.iter().map(|id| (*id, problems.clone())).collect();
    store
        .finish_inbox(&[], &invalid, T0 + 10)
        .await
        .expect("park");
    assert_eq!(
        store
            .requeue_parked(&[ids[0], ids[2]], T0 + 20)
            .await
            .expect("replay parked"),
        2
    );
    let still: Vec<i64> = store
        .parked_payloads(10)
        .await
        .expect("parked")
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(still, [ids[1]]);
    assert_eq!(
        store
            .requeue_parked(&[ids[0]], T0 + 30)
            .await
            .expect("again"),
        0,
        "already pending"
    );
}

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// Per pixel `[queued, delivered, dead, dry_run]` and the oldest queued `received_at`, counted
/// row by row from the event list (the rows themselves, not the kept counts).
async fn counted_rows(store: &dyn Store, now: i64) -> BTreeMap<String, ([i64; 4], Option<i64>)> {
    let rows = store
        .list_events(
            &EventQuery {
                limit: 100_000,
                ..EventQuery::default()
            },
            now,
        )
        .await
        .expect("list");
    let mut counted: BTreeMap<String, ([i64; 4], Option<i64>)> = BTreeMap::new();
    for row in rows {
        let entry = counted.entry(row.pixel_id).or_default();
        let index = match row.state.as_str() {
            "queued" | "delivering" | "failed" => 0,
            "delivered" => 1,
            "dead" => 2,
            _ => 3,
        };
        entry.0[index] += 1;
        if index == 0 {
            entry.1 = Some(entry.1.map_or(row.received_at, |o| o.min(row.received_at)));
        }
    }
    counted
}

/// `Store::stats` (kept counts) agrees with the rows, in total and per pixel, and the totals
/// are `expected` (queued, delivered, dead, dry_run).
async fn assert_counts(store: &dyn Store, now: i64, expected: (i64, i64, i64, i64), step: &str) {
    let stats = store.stats().await.expect("stats");
    let rows = counted_rows(store, now).await;
    let total = |i: usize| rows.values().map(|(c, _)| c[i]).sum::<i64>();
    assert_eq!(
        (total(0), total(1), total(2), total(3)),
        expected,
        "{step}: the rows"
    );
    assert_eq!(
        (stats.queued, stats.delivered, stats.dead, stats.dry_run),
        expected,
        "{step}: the counts"
    );
    assert_eq!(
        stats.oldest_queued_at,
        rows.values().filter_map(|(_, oldest)| *oldest).min(),
        "{step}: oldest"
    );
    let from_stats: Vec<PixelQueue> = stats
        .by_pixel
        .into_iter()
        .filter(|p| p.queued != 0 || p.dead != 0)
        .collect();
    let from_rows: Vec<PixelQueue> = rows
        .into_iter()
        .filter(|(_, (c, _))| c[0] != 0 || c[2] != 0)
        .map(|(pixel_id, (c, oldest))| PixelQueue {
            pixel_id,
            queued: c[0],
            dead: c[2],
            oldest_queued_at: oldest,
        })
        .collect();
    assert_eq!(from_stats, from_rows, "{step}: per pixel");
}

/// The counts `stats` and `activity` answer from are kept as events change: every transition
/// (insert, duplicate, leased insert, delivered, dead, retry, release, a stale settlement of a
/// row that is no longer queued, replay, retry now, pruning) leaves them equal to the rows.
async fn check_counts_stay_exact_through_every_transition(store: &dyn Store) {
    const FIVE_MIN: i64 = 5 * 60 * 1000;
    let mut other = record("c-b1");
    other.pixel_id = "999".to_owned();
    let mut dry = record("c-dry");
    dry.dry_run = true;
    dry.pixel_id = String::new();
    let outcomes = insert(
        store,
        &[
            record("c-a1"),
            record("c-a2"),
            record("c-a3"),
            record("c-a4"),
            other,
            record("c-a1"),
            dry,
        ],
        T0,
    )
    .await;
    assert_eq!(outcomes[5], InsertOutcome::Duplicate);
    assert_eq!(
        insert(store, &[record("c-a2")], T0 + 5).await,
        [InsertOutcome::Duplicate]
    );
    assert_counts(store, T0, (5, 0, 0, 1), "inserted").await;
    let mut leased = record("c-l1");
    leased.lease_until = Some(T0 + 1000);
    let leased_row = store
        .insert_events(&[leased], T0 + 10)
        .await
        .expect("insert leased")[0]
        .row_id
        .expect("row");
    assert_counts(store, T0 + 20, (6, 0, 0, 1), "inserted leased").await;

    let claimed = store
        .claim_due(PIXEL, 10, T0 + 20, T0 + 1000)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 4);
    let id = |event_id: &str| {
        claimed
            .iter()
            .find(|c| c.event_id == event_id)
            .map(|c| c.row_id)
            .expect("claimed")
    };
    let dead = |row_id: i64| EventUpdate {
        row_id,
        settlement: Settlement::Dead {
            reason: "meta error 100: bad".to_owned(),
        },
        attempt: None,
    };
    let delivered = |row_id: i64| EventUpdate {
        row_id,
        settlement: Settlement::Delivered,
        attempt: None,
    };
    let updates = vec![
        delivered(id("c-a1")),
        dead(id("c-a2")),
        EventUpdate {
            row_id: id("c-a3"),
            settlement: Settlement::Retry {
                next_attempt_at: T0 + 5000,
                reason: "http 500".to_owned(),
            },
            attempt: None,
        },
        EventUpdate {
            row_id: id("c-a4"),
            settlement: Settlement::Release {
                reason: "pixel paused".to_owned(),
            },
            attempt: None,
        },
    ];
    store.settle(&updates, T0 + 100).await.expect("settle");
    assert_counts(store, T0 + 200, (4, 1, 1, 1), "settled").await;
    // A worker whose lease ran out settles rows that are no longer queued: nothing changes.
    store
        .settle(&[dead(id("c-a1")), delivered(id("c-a2"))], T0 + 150)
        .await
        .expect("stale settle");
    assert_counts(store, T0 + 200, (4, 1, 1, 1), "stale settlement").await;
    store
        .settle(&[delivered(leased_row)], T0 + 160)
        .await
        .expect("settle the handed-off one");
    assert_counts(store, T0 + 200, (3, 2, 1, 1), "handed-off delivered").await;
    let bucket = |at: i64| async move {
        store
            .activity(at, FIVE_MIN, 1)
            .await
            .expect("activity")
            .remove(0)
    };
    let first = bucket(T0).await;
    assert_eq!((first.accepted, first.delivered, first.dead), (7, 2, 1));

    // Replays: a filter matching nothing, then the dashboard's replay by exact reason.
    let none = ReplayFilter {
        event_name: Some("Purchase".to_owned()),
        ..ReplayFilter::default()
    };
    assert_eq!(
        store.requeue_dead(&none, T0 + 300).await.expect("replay"),
        0
    );
    assert_counts(store, T0 + 300, (3, 2, 1, 1), "replay of nothing").await;
    let exact = ReplayFilter {
        reason: Some("meta error 100: bad".to_owned()),
        ..ReplayFilter::default()
    };
    assert_eq!(
        store.requeue_dead(&exact, T0 + 300).await.expect("replay"),
        1
    );
    assert_counts(store, T0 + 300, (4, 2, 0, 1), "replayed").await;
    assert_eq!(
        bucket(T0).await.dead,
        0,
        "a replayed event is no longer dead"
    );
    assert_eq!(
        store.retry_now("c-a3", T0 + 400).await.expect("retry now"),
        1
    );
    assert_counts(store, T0 + 400, (4, 2, 0, 1), "retried now").await;

    // It dies again, later.
    let later = T0 + 3 * FIVE_MIN;
    let again = store
        .claim_due(PIXEL, 10, later, later + 1000)
        .await
        .expect("claim");
    let a2 = again
        .iter()
        .find(|c| c.event_id == "c-a2")
        .expect("replayed one claimed");
    store
        .settle(&[dead(a2.row_id)], later)
        .await
        .expect("settle");
    assert_eq!(bucket(later).await.dead, 1);
    let released: Vec<EventUpdate> = again
        .iter()
        .filter(|c| c.event_id != "c-a2")
        .map(|c| EventUpdate {
            row_id: c.row_id,
            settlement: Settlement::Release {
                reason: "pixel paused".to_owned(),
            },
            attempt: None,
        })
        .collect();
    store.settle(&released, later).await.expect("release");
    assert_counts(store, later, (3, 2, 1, 1), "dead again").await;

    // Pruning: delivered and dry-run first, then the dead; the queued stay.
    let retention = Retention {
        delivered_ms: 2 * DAY_MS,
        dead_ms: 10 * DAY_MS,
        counts_ms: 366 * DAY_MS,
    };
    let pruned = store
        .prune(T0 + 3 * DAY_MS, &retention)
        .await
        .expect("prune");
    assert_eq!((pruned.delivered, pruned.dead), (3, 0));
    assert_counts(store, T0 + 3 * DAY_MS, (3, 0, 1, 0), "pruned delivered").await;
    let pruned = store
        .prune(T0 + 11 * DAY_MS, &retention)
        .await
        .expect("prune");
    assert_eq!(pruned.dead, 1);
    assert_counts(store, T0 + 11 * DAY_MS, (3, 0, 0, 0), "pruned dead").await;
    // What happened stays counted in its bucket until the counts' own retention.
    assert_eq!(bucket(T0).await.accepted, 7);
}

/// Match-quality counts, activity counts and parked payloads do not grow without bound: they
/// are pruned per `retention.counts_ms` (and parked payloads per `retention.dead_ms`).
async fn check_retention_prunes_old_counts_and_parked_payloads(store: &dyn Store) {
    let retention = Retention {
        counts_ms: 30 * DAY_MS,
        ..Retention::default()
    };
    let today = T0.div_euclid(DAY_MS);
    let count = |day: i64| QualityCount {
        day,
        pixel_id: PIXEL.to_owned(),
        event_name: "Lead".to_owned(),
        events: 1,
        ..QualityCount::default()
    };
    let drop = |day: i64| DropCount {
        day,
        pixel_id: PIXEL.to_owned(),
        event_name: "Lead".to_owned(),
        field: "ph".to_owned(),
        reason: "not a valid phone number".to_owned(),
        count: 1,
    };
    store
        .count_match_quality(
            &[count(today - 40), count(today - 29), count(today)],
            &[drop(today - 40), drop(today)],
        )
        .await
        .expect("count");
    // An event accepted 40 days ago (still queued: events waiting are never pruned).
    let old = T0 - 40 * DAY_MS;
    insert(store, &[record("old-1")], old).await;
    let accepted_then = || async move {
        store
            .activity(old, 5 * 60 * 1000, 1)
            .await
            .expect("activity")[0]
            .accepted
    };
    assert_eq!(accepted_then().await, 1);
    // Two payloads parked: 100 days ago and yesterday.
    let mut parked = Vec::new();
    for at in [T0 - 100 * DAY_MS, T0 - DAY_MS] {
        let id = store
            .enqueue_inbox("sql", &serde_json::json!({"event_name": "Lead"}), at)
            .await
            .expect("enqueue");
        store.claim_inbox(10, at, at + 1000).await.expect("claim");
        store
            .finish_inbox(&[], &[(id, serde_json::json!([]))], at)
            .await
            .expect("park");
        parked.push(id);
    }

    let pruned = store.prune(T0, &retention).await.expect("prune");
    assert_eq!(pruned.parked, 1);
    assert!(pruned.counts >= 3, "{pruned:?}");
    let (counts, drops) = store.match_quality(0).await.expect("quality");
    assert_eq!(
        counts.iter().map(|c| c.day).collect::<Vec<_>>(),
        [today - 29, today]
    );
    assert_eq!(drops.iter().map(|d| d.day).collect::<Vec<_>>(), [today]);
    assert_eq!(accepted_then().await, 0);
    assert!(store.find_event("old-1", T0).await.expect("find").is_some());
    let kept: Vec<i64> = store
        .parked_payloads(10)
        .await
        .expect("parked")
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(kept, [parked[1]]);
}

/// Three instances (three stores on one schema) insert overlapping events (so some are
/// duplicates across instances), claim, settle with every outcome, replay and prune at the
/// same time: the kept counts end equal to the rows, counted by SQL.
async fn check_counts_stay_exact_under_concurrent_instances(url: String) {
    let schema = PostgresSchema::new(url.clone()).await;
    let stores = [
        schema.open().await,
        schema.open().await,
        schema.open().await,
    ];
    let worker = |n: usize, store: Arc<dyn Store>| {
        tokio::spawn(async move {
            for round in 0..8 {
                let now = T0 + i64::try_from(round).expect("small") * 1000;
                // Instance n shares half of its ids with instance n + 1.
                let records: Vec<_> = (0..40)
                    .map(|i| {
                        let mut r = record(&format!("k-{}-{}", (n * 40 + i) / 2, round));
                        if i % 7 == 0 {
                            r.pixel_id = "999".to_owned();
                        }
                        r
                    })
                    .collect();
                store.insert_events(&records, now).await.expect("insert");
                for pixel in [PIXEL, "999"] {
                    let claimed = store
                        .claim_due(pixel, 15, now, now + 60_000)
                        .await
                        .expect("claim");
                    let updates: Vec<EventUpdate> = claimed
                        .iter()
                        .enumerate()
                        .map(|(i, c)| EventUpdate {
                            row_id: c.row_id,
                            settlement: match i % 4 {
                                0 | 1 => Settlement::Delivered,
                                2 => Settlement::Dead {
                                    reason: "meta error 100: bad".to_owned(),
                                },
                                _ => Settlement::Release {
                                    reason: "pixel paused".to_owned(),
                                },
                            },
                            attempt: None,
                        })
                        .collect();
                    store.settle(&updates, now + 10).await.expect("settle");
                }
                if round % 3 == n % 3 {
                    store
                        .requeue_dead(&ReplayFilter::default(), now + 20)
                        .await
                        .expect("replay");
                }
                if round == 6 {
                    let retention = Retention {
                        delivered_ms: 2 * DAY_MS,
                        ..Retention::default()
                    };
                    // Only events delivered in the first rounds are old enough.
                    store
                        .prune(T0 + 2 * DAY_MS + 3500, &retention)
                        .await
                        .expect("prune");
                }
            }
        })
    };
    let tasks: Vec<_> = stores
        .iter()
        .enumerate()
        .map(|(n, s)| worker(n, s.clone()))
        .collect();
    for task in tasks {
        task.await.expect("worker");
    }
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    let rows: Vec<(String, String, i64)> = sqlx::query_as(&format!(
        "select pixel_id, state, count(*) from \"{}\".event group by 1, 2",
        schema.name
    ))
    .fetch_all(&mut conn)
    .await
    .expect("count rows");
    conn.close().await.expect("close");
    let total = |state: &str| -> i64 { rows.iter().filter(|r| r.1 == state).map(|r| r.2).sum() };
    let stats = stores[0].stats().await.expect("stats");
    assert!(total("delivered") > 0 && total("queued") > 0, "{rows:?}");
    assert_eq!(
        (stats.queued, stats.delivered, stats.dead, stats.dry_run),
        (
            total("queued"),
            total("delivered"),
            total("dead"),
            total("dry_run")
        ),
        "{rows:?}"
    );
    for pixel in &stats.by_pixel {
        let of = |state: &str| -> i64 {
            rows.iter()
                .filter(|r| r.0 == pixel.pixel_id && r.1 == state)
                .map(|r| r.2)
                .sum()
        };
        assert_eq!(
            (pixel.queued, pixel.dead),
            (of("queued"), of("dead")),
            "{rows:?}"
        );
    }
}

macro_rules! store_contract {
    ($($check:ident),* $(,)?) => {
        mod sqlite_store {
            $(
                #[tokio::test]
                async fn $check() {
                    let (store, _dir) = super::sqlite().await;
                    super::$check(store.as_ref()).await;
                }
            )*
        }

        mod postgres_store {
            $(
                #[tokio::test]
                async fn $check() {
                    let test = super::postgres(super::postgres_url()).await;
                    super::$check(test.store.as_ref()).await;
                }
            )*

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_claims_from_two_instances_take_each_event_once() {
                super::check_concurrent_claims_take_each_event_once(super::postgres_url()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn counts_stay_exact_under_concurrent_instances() {
                super::check_counts_stay_exact_under_concurrent_instances(super::postgres_url())
                    .await;
            }
        }

        /// The same suite through a transaction-mode pooler, where named prepared statements
        /// and session settings do not survive from one transaction to the next: a PgBouncer
        /// with `pool_mode = transaction` on port 6543, as `scripts/test-services` starts.
        mod postgres_transaction_pooler {
            $(
                #[tokio::test]
                async fn $check() {
                    let test = super::postgres(super::pooler_url()).await;
                    super::$check(test.store.as_ref()).await;
                }
            )*

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_claims_from_two_instances_take_each_event_once() {
                super::check_concurrent_claims_take_each_event_once(super::pooler_url()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn counts_stay_exact_under_concurrent_instances() {
                super::check_counts_stay_exact_under_concurrent_instances(super::pooler_url())
                    .await;
            }
        }
    };
}

store_contract!(
    check_duplicates_within_48_hours_are_skipped,
    check_claims_respect_leases_and_due_times,
    check_settlements_move_events_through_their_states,
    check_a_postponed_event_waits_without_its_attempt_counted,
    check_replay_requeues_only_matching_dead_events,
    check_dry_run_events_are_stored_but_never_claimed,
    check_events_inserted_with_a_lease_are_claimable_only_after_it,
    check_retention_prunes_finished_events_and_expired_dedup_keys,
    check_inbox_payloads_are_leased_then_stored_or_kept_invalid,
    check_source_payloads_dedup_delivery_ids_and_count_outcomes,
    check_match_keys_keep_the_newest_value_per_identity_and_field,
    check_expired_match_keys_are_not_recalled_and_are_pruned,
    check_dashboard_queries_count_list_group_and_replay,
    check_match_quality_counts_add_up_per_day_pixel_and_name,
    check_counts_stay_exact_through_every_transition,
    check_retention_prunes_old_counts_and_parked_payloads,
);
