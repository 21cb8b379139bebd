//! The event log grows; health checks must not (issue 12). A real store is filled with a
//! million delivered events by SQL (a recursive CTE on SQLite, `generate_series` on Postgres),
//! and the queries behind `/readyz`, `/metrics` and the dashboard's overview
//! (`SqliteStore::hot_queries`, `PostgresStore::hot_queries`: the SQL exactly as run) are
//! explained: none may read the event table other than by an index seek. Then the store's
//! answers are checked against the rows.

use capi_bridge::store::{self, HotQuery, PostgresStore, SqliteStore, Store};
use sqlx::{Connection, Executor, PgConnection, Row, SqliteConnection};

use crate::store_contract::{postgres_url, PostgresSchema};

const ROWS: i64 = 1_000_000;
const QUEUED: i64 = 1_000;
const DEAD: i64 = 500;
const NOW: i64 = 1_790_000_000_000;
const PIXEL: &str = "1234567890";
const OTHER: &str = "999";

/// `ROWS` delivered events received over the last month, `QUEUED` queued ones of two pixels
/// (the oldest of each known), `DEAD` dead ones and a few attempts; then the counts for them,
/// as the migration that introduced the counts fills them.
fn fill_sql(event: &str, attempt: &str, series: &str) -> Vec<String> {
    vec![
        format!(
            "insert into {event} (pixel_id, event_id, event_name, state, attempts,
                 next_attempt_at, deadline_at, received_at, updated_at, delivered_at)
             select '{PIXEL}', 'big-' || i, 'Lead', 'delivered', 1, {NOW}, {NOW},
                 {NOW} - i * 2500, {NOW} - i * 2500 + 100, {NOW} - i * 2500 + 100
             from {series}",
            series = series.replace("LIMIT", &ROWS.to_string())
        ),
        format!(
            "insert into {event} (pixel_id, event_id, event_name, state, attempts,
                 next_attempt_at, deadline_at, received_at, updated_at)
             select case when i % 2 = 0 then '{PIXEL}' else '{OTHER}' end, 'queued-' || i,
                 'Lead', 'queued', 0, {NOW}, {NOW}, {NOW} - i * 1000, {NOW} - i * 1000
             from {series}",
            series = series.replace("LIMIT", &QUEUED.to_string())
        ),
        format!(
            "insert into {event} (pixel_id, event_id, event_name, state, attempts,
                 next_attempt_at, deadline_at, last_error, received_at, updated_at)
             select '{PIXEL}', 'dead-' || i, 'Lead', 'dead', 1, {NOW}, {NOW},
                 'meta error 100: bad', {NOW} - i * 3000, {NOW} - i * 3000
             from {series}",
            series = series.replace("LIMIT", &DEAD.to_string())
        ),
        format!(
            "insert into {attempt} (event_row_id, attempted_at, outcome, http_status)
             select id, updated_at, 'rejected', 400 from {event} where state = 'dead'"
        ),
    ]
}

/// The counts for rows written by SQL (what migration 9 does for existing rows).
fn tally_sql(event: &str, tally: &str) -> Vec<String> {
    vec![
        format!(
            "insert into {tally} (bucket, pixel_id, state, shard, n)
             select 0, pixel_id, state, 0, count(*) from {event} group by pixel_id, state"
        ),
        format!(
            "insert into {tally} (bucket, pixel_id, state, shard, n)
             select received_at - received_at % 300000, '', 'accepted', 0, count(*)
             from {event} group by 1"
        ),
        format!(
            "insert into {tally} (bucket, pixel_id, state, shard, n)
             select delivered_at - delivered_at % 300000, '', 'delivered', 0, count(*)
             from {event} where state = 'delivered' group by 1"
        ),
    ]
}

/// Checks the store's answers on the filled table against what was written.
async fn check_answers(store: &dyn Store) {
    let stats = store.stats().await.expect("stats");
    assert_eq!(
        (stats.queued, stats.delivered, stats.dead, stats.dry_run),
        (QUEUED, ROWS, DEAD, 0)
    );
    assert_eq!(stats.oldest_queued_at, Some(NOW - QUEUED * 1000));
    let pixel = |id: &str| {
        stats
            .by_pixel
            .iter()
            .find(|p| p.pixel_id == id)
            .cloned()
            .expect("pixel")
    };
    assert_eq!(pixel(PIXEL).queued, QUEUED / 2);
    assert_eq!(pixel(PIXEL).oldest_queued_at, Some(NOW - QUEUED * 1000));
    assert_eq!(
        pixel(OTHER).oldest_queued_at,
        Some(NOW - (QUEUED - 1) * 1000)
    );
    const HOUR: i64 = 60 * 60 * 1000;
    let day = store
        .activity(NOW - 23 * HOUR, HOUR, 24)
        .await
        .expect("activity");
    let delivered: i64 = day.iter().map(|b| b.delivered).sum();
    // One delivered event every 2.5 s, at NOW - i * 2500 + 100, since the start of the
    // five-minute bucket holding NOW - 23 h.
    let since = (NOW - 23 * HOUR) - (NOW - 23 * HOUR).rem_euclid(5 * 60 * 1000);
    assert_eq!(delivered, (NOW + 100 - since) / 2500);
    assert_eq!(store.recent_errors(10).await.expect("errors").len(), 10);
}

/// The plan lines that read the event table other than by seeking an index: on SQLite a
/// `SCAN` of `event` (aliased `e`), on Postgres a sequential or bitmap heap scan of it.
fn table_scans(plan: &[String]) -> Vec<String> {
    plan.iter()
        .filter(|line| {
            let line = line.trim();
            let sqlite_scan = line == "SCAN event"
                || line == "SCAN e"
                || line.starts_with("SCAN event ")
                || line.starts_with("SCAN e ");
            let postgres_scan = ["Seq Scan on event", "Bitmap Heap Scan on event"]
                .iter()
                .any(|scan| {
                    line.split("->").any(|part| {
                        let part = part.trim();
                        part.starts_with(&format!("{scan} "))
                            && !part.starts_with(&format!("{scan}_"))
                    })
                });
            sqlite_scan || postgres_scan
        })
        .cloned()
        .collect()
}

fn assert_plans_seek(plans: &[(HotQuery, Vec<String>)]) {
    for (query, plan) in plans {
        assert!(
            table_scans(plan).is_empty(),
            "{} reads the event table: {plan:#?}",
            query.name
        );
    }
    let stats = plans
        .iter()
        .find(|(q, _)| q.name == "stats")
        .expect("stats plan");
    assert!(
        stats.1.iter().any(|l| l.contains("event_queued_oldest")),
        "the oldest waiting event comes from its index: {:#?}",
        stats.1
    );
}

#[tokio::test]
async fn sqlite_health_queries_seek_indexes_on_a_million_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("big.db").display());
    let store = store::open(&url, "capi_bridge").await.expect("open");
    let mut conn = SqliteConnection::connect(&url).await.expect("connect");
    let series = "(with recursive s(i) as (select 1 union all select i + 1 from s where i < LIMIT)
                  select i from s)";
    for sql in fill_sql("event", "attempt", series)
        .into_iter()
        .chain(tally_sql("event", "event_tally"))
    {
        conn.execute(sql.as_str()).await.expect("fill");
    }
    conn.execute("analyze").await.expect("analyze");

    let mut plans = Vec::new();
    for query in SqliteStore::hot_queries(NOW) {
        let sql = format!("explain query plan {}", query.sql);
        let mut explain = sqlx::query(&sql);
        for param in &query.params {
            explain = explain.bind(*param);
        }
        let plan: Vec<String> = explain
            .fetch_all(&mut conn)
            .await
            .expect("explain")
            .iter()
            .map(|row| row.try_get::<String, _>(3).expect("detail"))
            .collect();
        plans.push((query, plan));
    }
    conn.close().await.expect("close");
    assert_plans_seek(&plans);
    check_answers(store.as_ref()).await;
}

#[tokio::test]
async fn postgres_health_queries_seek_indexes_on_a_million_events() {
    let schema = PostgresSchema::new(postgres_url()).await;
    let store = schema.open().await;
    let mut conn = PgConnection::connect(&postgres_url())
        .await
        .expect("connect");
    let name = |table: &str| format!("\"{}\".{table}", schema.name);
    let series = "generate_series(1::int8, LIMIT) as i";
    for sql in fill_sql(&name("event"), &name("attempt"), series)
        .into_iter()
        .chain(tally_sql(&name("event"), &name("event_tally")))
    {
        conn.execute(sql.as_str()).await.expect("fill");
    }
    let analyze = format!(
        "analyze {}; analyze {}; analyze {}",
        name("event"),
        name("attempt"),
        name("event_tally")
    );
    conn.execute(analyze.as_str()).await.expect("analyze");

    let mut plans = Vec::new();
    for (i, query) in PostgresStore::hot_queries(&schema.name, NOW)
        .into_iter()
        .enumerate()
    {
        let prepare = format!("prepare hot_{i} as {}", query.sql);
        conn.execute(prepare.as_str()).await.expect("prepare");
        let args = query
            .params
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let execute = if args.is_empty() {
            format!("explain execute hot_{i}")
        } else {
            format!("explain execute hot_{i}({args})")
        };
        let plan: Vec<String> = conn
            .fetch_all(execute.as_str())
            .await
            .expect("explain")
            .iter()
            .map(|row| row.try_get::<String, _>(0).expect("plan line"))
            .collect();
        plans.push((query, plan));
    }
    conn.close().await.expect("close");
    assert_plans_seek(&plans);
    check_answers(store.as_ref()).await;
}
