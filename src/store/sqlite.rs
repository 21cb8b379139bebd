//! The embedded default backend: one SQLite file, zero setup.

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, SqliteConnection, SqlitePool};

use super::dashboard::{activity_grid, event_list_query, fill_buckets, DashboardRow};
use super::sqlite_write::WriteTx;
use super::{
    newest_match_keys, ActivityBucket, AttemptRecord, AttemptView, ClaimedEvent, EventDetail,
    EventQuery, EventRow, EventSummary, EventUpdate, InboxItem, InsertOutcome, Inserted,
    MatchKeyRow, NewEventRecord, ParkedPayload, Pruned, QueueStats, ReasonCount, RecentError,
    ReplayFilter, Retention, Settlement, SourceCount, SourcePayload, SourceStat, Store, StoreError,
    Tally, DEDUP_WINDOW_MS,
};
use super::{DropCount, QualityCount, WriteHealth};

/// Rows per multi-row statement (9 parameters each stays far below SQLite's limit).
const ROWS_PER_STATEMENT: usize = 100;

/// `Store::stats`: counts from `event_tally`, kept as events change; the oldest waiting event
/// of each pixel with a queue is one seek in `event_queued_oldest`. Nothing here reads more
/// rows than there are pixels.
const STATS_SQL: &str = "select t.state, t.pixel_id, t.n,
                 case when t.state = 'queued' then
                     (select min(e.received_at) from event as e
                      where e.state = 'queued' and e.pixel_id = t.pixel_id)
                 end as oldest
             from (select pixel_id, state, sum(n) as n from event_tally where bucket = 0
                   group by pixel_id, state having sum(n) <> 0) as t";

/// `Store::activity`: counted as it happens, per five minutes (`event_tally`), so a day is 288
/// rows however many events it had.
const ACTIVITY_SQL: &str =
    "select case state when 'accepted' then 0 when 'delivered' then 1 else 2 end,
                 (bucket - ?1) / ?2, sum(n)
             from event_tally
             where bucket >= ?1 and bucket < ?3 and bucket > 0 and pixel_id = ''
             group by 1, 2";

/// `Store::recent_errors`: the newest attempts by id, each joined to its event by key.
const RECENT_ERRORS_SQL: &str =
    "select e.event_id, e.event_name, e.pixel_id, a.attempted_at, a.outcome,
                a.http_status, a.code, a.subcode, a.fbtrace_id, a.error_title, a.error_message
             from attempt as a join event as e on e.id = a.event_row_id
             order by a.id desc limit ?1";

/// [`Store`] over a SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// The one connection that writes. SQLite has a single writer anyway; funnelling every
    /// write through one connection queues writers in the pool (fair, no sleeping) instead of
    /// in SQLite's busy handler, which sleeps in steps of up to 100 ms and starves ingest.
    writer: SqlitePool,
    /// Readers for status queries; WAL lets them run beside the writer.
    reader: SqlitePool,
    /// Whether the latest write transaction committed (`ping`, so `/readyz`, reports it).
    health: WriteHealth,
}

impl SqliteStore {
    /// Deletes the events `select_ids` (one `?1` parameter) returns, a slice at a time, each
    /// slice in a transaction that also takes its events off the counts (`event_tally`).
    async fn delete_in_slices(&self, select_ids: &str, before: i64) -> Result<u64, StoreError> {
        let sql = format!(
            "delete from event where id in (select id from ({select_ids}) limit 2000)
             returning pixel_id, state"
        );
        let mut total = 0;
        loop {
            let mut tx = WriteTx::begin(&self.writer, &self.health).await?;
            let rows = sqlx::query(&sql).bind(before).fetch_all(&mut *tx).await?;
            if rows.is_empty() {
                tx.commit().await?;
                return Ok(total);
            }
            let mut tally = Tally::default();
            for row in &rows {
                let pixel_id: String = row.try_get(0)?;
                let state: String = row.try_get(1)?;
                tally.state(&pixel_id, &state, -1);
            }
            add_tally(&mut tx, &tally).await?;
            tx.commit().await?;
            total += rows.len() as u64;
        }
    }

    /// The queries `/readyz`, `/metrics` and the dashboard's overview run on every call.
    #[doc(hidden)]
    #[must_use]
    pub fn hot_queries(now: i64) -> Vec<super::HotQuery> {
        [
            ("stats", STATS_SQL),
            ("activity", ACTIVITY_SQL),
            ("recent_errors", RECENT_ERRORS_SQL),
        ]
        .into_iter()
        .map(|(name, sql)| super::HotQuery {
            name,
            sql: sql.to_owned(),
            params: super::hot_query_params(name, now),
        })
        .collect()
    }

    /// Opens (creating if needed) the database at `url` and applies migrations.
    ///
    /// # Errors
    /// When the file cannot be opened or migrated.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            // Zero setup: the file is created on first start.
            .create_if_missing(true)
            // Readers (status queries) never block the single writer.
            .journal_mode(SqliteJournalMode::Wal)
            // Every commit reaches the disk before we answer 202; group commit keeps this
            // to one fsync per batch of requests, not one per event.
            .synchronous(SqliteSynchronous::Full)
            // Ingest and delivery share the one writer; wait for it instead of failing.
            .busy_timeout(Duration::from_secs(10))
            // attempt rows cascade with their event.
            .foreign_keys(true)
            // 32 MiB of page cache (the default is 2 MiB): dedup keys and event ids arrive in no
            // particular order, so their indexes are updated all over; once they outgrow the
            // cache every insert pays for page reads and throughput sags as the log grows.
            .pragma("cache_size", "-32768")
            // Multi-row statements come in one shape per row count (1..=100) for each of the
            // batched statements: keep them all prepared instead of re-parsing SQL per commit.
            .statement_cache_capacity(1024);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self {
            writer,
            reader,
            health: WriteHealth::default(),
        })
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_events(
        &self,
        events: &[NewEventRecord],
        now: i64,
    ) -> Result<Vec<Inserted>, StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.health).await?;
        let cutoff = now - DEDUP_WINDOW_MS;
        // Multi-row statements: each statement is a round trip to sqlx's SQLite thread, so one
        // per 100 events instead of two per event is what lets group commit scale.
        let mut fresh_keys: HashSet<(String, String, String)> = HashSet::new();
        for chunk in events.chunks(ROWS_PER_STATEMENT) {
            // A key older than the window is renewed (a new conversion); a fresh one is returned.
            let mut query = QueryBuilder::new(
                "insert into dedup_key (pixel_id, event_name, event_id, first_seen_at) ",
            );
            query.push_values(chunk, |mut row, e| {
                row.push_bind(&e.pixel_id)
                    .push_bind(&e.event_name)
                    .push_bind(&e.event_id)
                    .push_bind(now);
            });
            query.push(
                " on conflict (pixel_id, event_name, event_id)
                 do update set first_seen_at = excluded.first_seen_at
                 where dedup_key.first_seen_at < ",
            );
            query.push_bind(cutoff);
            query.push(" returning pixel_id, event_name, event_id");
            for row in query.build().fetch_all(&mut *tx).await? {
                fresh_keys.insert((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?));
            }
        }
        // Row ids are assigned here so the payload rows can refer to them without relying on
        // the order of RETURNING; safe because this transaction is the only writer.
        let mut next_id: i64 = sqlx::query_scalar("select coalesce(max(id), 0) + 1 from event")
            .fetch_one(&mut *tx)
            .await?;
        let mut results = Vec::with_capacity(events.len());
        let mut fresh = Vec::with_capacity(events.len());
        let mut tally = Tally::default();
        for e in events {
            let key = (e.pixel_id.clone(), e.event_name.clone(), e.event_id.clone());
            // `remove`: a key repeated within this batch is fresh only the first time.
            if fresh_keys.remove(&key) {
                fresh.push((next_id, e));
                let state = if e.dry_run { "dry_run" } else { "queued" };
                tally.state(&e.pixel_id, state, 1);
                tally.activity(now, "accepted", 1);
                results.push(Inserted {
                    outcome: if e.dry_run {
                        InsertOutcome::DryRun
                    } else {
                        InsertOutcome::Queued
                    },
                    row_id: Some(next_id),
                });
                next_id += 1;
            } else {
                results.push(Inserted {
                    outcome: InsertOutcome::Duplicate,
                    row_id: None,
                });
            }
        }
        for chunk in fresh.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::new(
                "insert into event (id, pixel_id, event_id, event_name, test_event_code,
                    state, attempts, next_attempt_at, leased_until, deadline_at, received_at,
                    updated_at, source) ",
            );
            query.push_values(chunk, |mut row, (id, e)| {
                let (state, attempts, next_attempt_at, leased_until) = match e.lease_until {
                    _ if e.dry_run => ("dry_run", 0, now, None),
                    Some(until) => ("queued", 1_i64, until, Some(until)),
                    None => ("queued", 0, now, None),
                };
                row.push_bind(id)
                    .push_bind(&e.pixel_id)
                    .push_bind(&e.event_id)
                    .push_bind(&e.event_name)
                    .push_bind(&e.test_event_code)
                    .push_bind(state)
                    .push_bind(attempts)
                    .push_bind(next_attempt_at)
                    .push_bind(leased_until)
                    .push_bind(e.deadline_at)
                    .push_bind(now)
                    .push_bind(now)
                    .push_bind(&e.source);
            });
            query.build().execute(&mut *tx).await?;
            let mut query = QueryBuilder::new("insert into event_payload (event_row_id, payload) ");
            query.push_values(chunk, |mut row, (id, e)| {
                row.push_bind(id).push_bind(&e.payload);
            });
            query.build().execute(&mut *tx).await?;
        }
        add_tally(&mut tx, &tally).await?;
        tx.commit().await?;
        Ok(results)
    }

    async fn remember_match_keys(&self, rows: &[MatchKeyRow]) -> Result<(), StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.health).await?;
        for chunk in newest_match_keys(rows).chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::new(
                "insert into match_key (identity, field, value, seen_at, expires_at) ",
            );
            query.push_values(chunk, |mut row, m| {
                row.push_bind(&m.identity)
                    .push_bind(&m.field)
                    .push_bind(&m.value)
                    .push_bind(m.seen_at)
                    .push_bind(m.expires_at);
            });
            query.push(
                " on conflict (identity, field) do update
                 set value = excluded.value, seen_at = excluded.seen_at,
                     expires_at = excluded.expires_at
                 where excluded.seen_at >= match_key.seen_at",
            );
            query.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn recall_match_keys(
        &self,
        identities: &[String],
        now: i64,
    ) -> Result<Vec<MatchKeyRow>, StoreError> {
        let mut rows = Vec::new();
        for chunk in identities.chunks(ROWS_PER_STATEMENT * 5) {
            let mut query = QueryBuilder::new(
                "select identity, field, value, seen_at, expires_at from match_key
                 where identity in (",
            );
            let mut list = query.separated(", ");
            for identity in chunk {
                list.push_bind(identity);
            }
            query.push(") and expires_at > ");
            query.push_bind(now);
            for row in query.build().fetch_all(&self.reader).await? {
                rows.push(MatchKeyRow {
                    identity: row.try_get(0)?,
                    field: row.try_get(1)?,
                    value: row.try_get(2)?,
                    seen_at: row.try_get(3)?,
                    expires_at: row.try_get(4)?,
                });
            }
        }
        Ok(rows)
    }

    async fn claim_due(
        &self,
        pixel_id: &str,
        limit: usize,
        now: i64,
        lease_until: i64,
    ) -> Result<Vec<ClaimedEvent>, StoreError> {
        let rows = sqlx::query(
            // The lease end doubles as the next attempt time: leased rows move out of the due
            // range of the index, so a claim never scans past other workers' rows, and an
            // expired lease makes the row due again by itself.
            "update event set leased_until = ?3, next_attempt_at = ?3, attempts = attempts + 1
             where id in (
                 select id from event
                 where state = 'queued' and pixel_id = ?1 and next_attempt_at <= ?2
                 order by next_attempt_at, id
                 limit ?4)
             returning id, event_id, test_event_code, attempts, deadline_at",
        )
        .bind(pixel_id)
        .bind(now)
        .bind(lease_until)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.writer)
        .await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut claimed = rows
            .into_iter()
            .map(|row| {
                Ok(ClaimedEvent {
                    row_id: row.try_get("id")?,
                    event_id: row.try_get("event_id")?,
                    payload: String::new(),
                    test_event_code: row.try_get("test_event_code")?,
                    attempts: row.try_get("attempts")?,
                    deadline_at: row.try_get("deadline_at")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        claimed.sort_by_key(|c| c.row_id);
        // Payloads never change, so they are read outside the writer, from the read pool.
        let ids: Vec<i64> = claimed.iter().map(|c| c.row_id).collect();
        let mut payloads = BTreeMap::new();
        for chunk in ids.chunks(ROWS_PER_STATEMENT * 5) {
            let mut query = QueryBuilder::new(
                "select event_row_id, payload from event_payload where event_row_id in ",
            );
            push_id_list(&mut query, chunk);
            for row in query.build().fetch_all(&self.reader).await? {
                let id: i64 = row.try_get(0)?;
                let payload: String = row.try_get(1)?;
                payloads.insert(id, payload);
            }
        }
        for event in &mut claimed {
            // Written in the same transaction as the event, so always there; should it ever be
            // missing, an empty object makes Meta refuse the event and it is parked, not lost.
            event.payload = payloads
                .remove(&event.row_id)
                .unwrap_or_else(|| "{}".to_owned());
        }
        Ok(claimed)
    }

    async fn extend_lease(&self, row_ids: &[i64], lease_until: i64) -> Result<(), StoreError> {
        if row_ids.is_empty() {
            return Ok(());
        }
        let mut query = QueryBuilder::new("update event set leased_until = ");
        query.push_bind(lease_until);
        query.push(", next_attempt_at = ");
        query.push_bind(lease_until);
        query.push(" where state = 'queued' and id in ");
        push_id_list(&mut query, row_ids);
        query.build().execute(&self.writer).await?;
        Ok(())
    }

    async fn settle(&self, updates: &[EventUpdate], now: i64) -> Result<(), StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.health).await?;
        // Attempts and deliveries are written in multi-row statements: a 1000-event batch costs
        // a handful of statements, not two thousand, on SQLite's single writer.
        // The delivering attempt is recorded on the event row itself (see the migration).
        let attempts: Vec<(i64, &AttemptRecord)> = updates
            .iter()
            .filter(|u| u.settlement != Settlement::Delivered)
            .filter_map(|u| u.attempt.as_ref().map(|a| (u.row_id, a)))
            .collect();
        for chunk in attempts.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::new(
                "insert into attempt (event_row_id, attempted_at, outcome, http_status, code,
                    subcode, fbtrace_id, error_title, error_message) ",
            );
            query.push_values(chunk, |mut row, (row_id, attempt)| {
                row.push_bind(row_id)
                    .push_bind(now)
                    .push_bind(&attempt.outcome)
                    .push_bind(attempt.http_status.map(i64::from))
                    .push_bind(attempt.code)
                    .push_bind(attempt.subcode)
                    .push_bind(&attempt.fbtrace_id)
                    .push_bind(&attempt.error_title)
                    .push_bind(&attempt.error_message);
            });
            query.build().execute(&mut *tx).await?;
        }
        let mut tally = Tally::default();
        let mut delivered: BTreeMap<Option<&str>, Vec<i64>> = BTreeMap::new();
        for update in updates {
            if update.settlement == Settlement::Delivered {
                let trace = update
                    .attempt
                    .as_ref()
                    .and_then(|a| a.fbtrace_id.as_deref());
                delivered.entry(trace).or_default().push(update.row_id);
            }
        }
        for (trace, row_ids) in &delivered {
            for chunk in row_ids.chunks(ROWS_PER_STATEMENT) {
                let mut query = QueryBuilder::new(
                    "update event set state = 'delivered', leased_until = null, last_error = null, delivered_at = ",
                );
                query.push_bind(now);
                query.push(", updated_at = ");
                query.push_bind(now);
                query.push(", delivered_fbtrace_id = ");
                query.push_bind(*trace);
                query.push(" where state = 'queued' and id in ");
                push_id_list(&mut query, chunk);
                query.push(" returning pixel_id");
                for row in query.build().fetch_all(&mut *tx).await? {
                    let pixel_id: String = row.try_get(0)?;
                    tally.state(&pixel_id, "queued", -1);
                    tally.state(&pixel_id, "delivered", 1);
                    tally.activity(now, "delivered", 1);
                }
            }
        }
        for update in updates {
            let query = match &update.settlement {
                Settlement::Delivered => continue,
                Settlement::Retry {
                    next_attempt_at,
                    reason,
                } => sqlx::query(
                    "update event set leased_until = null, next_attempt_at = ?3, last_error = ?4,
                        updated_at = ?2
                     where id = ?1 and state = 'queued'",
                )
                .bind(update.row_id)
                .bind(now)
                .bind(next_attempt_at)
                .bind(reason),
                Settlement::Dead { reason } => {
                    let died = sqlx::query(
                        "update event set state = 'dead', leased_until = null, last_error = ?3,
                            updated_at = ?2
                         where id = ?1 and state = 'queued'
                         returning pixel_id",
                    )
                    .bind(update.row_id)
                    .bind(now)
                    .bind(reason)
                    .fetch_optional(&mut *tx)
                    .await?;
                    if let Some(row) = died {
                        let pixel_id: String = row.try_get(0)?;
                        tally.state(&pixel_id, "queued", -1);
                        tally.state(&pixel_id, "dead", 1);
                        tally.activity(now, "dead", 1);
                    }
                    continue;
                }
                Settlement::Release { reason } => sqlx::query(
                    "update event set leased_until = null, attempts = max(attempts - 1, 0),
                        next_attempt_at = ?2, last_error = ?3, updated_at = ?2
                     where id = ?1 and state = 'queued'",
                )
                .bind(update.row_id)
                .bind(now)
                .bind(reason),
                Settlement::Postpone {
                    next_attempt_at,
                    reason,
                } => sqlx::query(
                    "update event set leased_until = null, attempts = max(attempts - 1, 0),
                        next_attempt_at = ?3, last_error = ?4, updated_at = ?2
                     where id = ?1 and state = 'queued'",
                )
                .bind(update.row_id)
                .bind(now)
                .bind(next_attempt_at)
                .bind(reason),
            };
            query.execute(&mut *tx).await?;
        }
        add_tally(&mut tx, &tally).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn find_event(
        &self,
        event_id: &str,
        now: i64,
    ) -> Result<Option<EventDetail>, StoreError> {
        let Some(row) = sqlx::query(
            "select id, event_id, event_name, pixel_id, state, attempts, last_error, received_at,
                next_attempt_at, leased_until, delivered_at, delivered_fbtrace_id, test_event_code, source,
                (select payload from event_payload where event_row_id = event.id) as payload
             from event where event_id = ?1 order by id desc limit 1",
        )
        .bind(event_id)
        .fetch_optional(&self.reader)
        .await?
        else {
            return Ok(None);
        };
        let row_id: i64 = row.try_get("id")?;
        let attempt_rows = sqlx::query(
            "select attempted_at, outcome, http_status, code, subcode, fbtrace_id, error_title,
                error_message
             from attempt where event_row_id = ?1 order by id",
        )
        .bind(row_id)
        .fetch_all(&self.reader)
        .await?;
        let attempts_log = attempt_rows
            .into_iter()
            .map(|r| {
                Ok(AttemptView {
                    attempted_at: r.try_get("attempted_at")?,
                    record: AttemptRecord {
                        outcome: r.try_get("outcome")?,
                        http_status: r
                            .try_get::<Option<i64>, _>("http_status")?
                            .and_then(|s| u16::try_from(s).ok()),
                        code: r.try_get("code")?,
                        subcode: r.try_get("subcode")?,
                        fbtrace_id: r.try_get("fbtrace_id")?,
                        error_title: r.try_get("error_title")?,
                        error_message: r.try_get("error_message")?,
                    },
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        let detail = EventRow {
            event_id: row.try_get("event_id")?,
            event_name: row.try_get("event_name")?,
            pixel_id: row.try_get("pixel_id")?,
            stored_state: row.try_get("state")?,
            attempts: row.try_get("attempts")?,
            last_error: row.try_get("last_error")?,
            received_at: row.try_get("received_at")?,
            next_attempt_at: row.try_get("next_attempt_at")?,
            leased_until: row.try_get("leased_until")?,
            delivered_at: row.try_get("delivered_at")?,
            delivered_fbtrace_id: row.try_get("delivered_fbtrace_id")?,
            test_event_code: row.try_get("test_event_code")?,
            source: row.try_get("source")?,
            payload: row.try_get("payload")?,
        }
        .into_detail(attempts_log, now);
        Ok(Some(detail))
    }

    async fn requeue_dead(&self, filter: &ReplayFilter, now: i64) -> Result<u64, StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.health).await?;
        // What leaves the dead counts (and the activity bucket each event died in) is read
        // first, in the same transaction as the update: the writer is alone, so both see the
        // same rows.
        let mut query = QueryBuilder::new("select pixel_id, updated_at, count(*) from event");
        push_replay_filter(&mut query, filter);
        query.push(" group by pixel_id, updated_at");
        let mut tally = Tally::default();
        for row in query.build().fetch_all(&mut *tx).await? {
            let pixel_id: String = row.try_get(0)?;
            let died_at: i64 = row.try_get(1)?;
            let n: i64 = row.try_get(2)?;
            tally.state(&pixel_id, "dead", -n);
            tally.state(&pixel_id, "queued", n);
            tally.activity(died_at, "dead", -n);
        }
        let mut query = QueryBuilder::new(
            "update event set state = 'queued', leased_until = null, attempts = 0, next_attempt_at = ",
        );
        query.push_bind(now);
        query.push(", updated_at = ");
        query.push_bind(now);
        // A replayed event gets a fresh 7-day window only if its event_time allows it; the
        // deadline stays, so an event Meta would refuse as too old dies again at once.
        push_replay_filter(&mut query, filter);
        let result = query.build().execute(&mut *tx).await?;
        add_tally(&mut tx, &tally).await?;
        tx.commit().await?;
        Ok(result.rows_affected())
    }

    async fn stats(&self) -> Result<QueueStats, StoreError> {
        let rows = sqlx::query(STATS_SQL).fetch_all(&self.reader).await?;
        let counts = rows
            .iter()
            .map(|row| {
                Ok((
                    row.try_get("state")?,
                    row.try_get("pixel_id")?,
                    row.try_get("n")?,
                    row.try_get("oldest")?,
                ))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(QueueStats::from_counts(counts))
    }

    async fn prune(&self, now: i64, retention: &Retention) -> Result<Pruned, StoreError> {
        let dedup_keys = sqlx::query("delete from dedup_key where first_seen_at < ?1")
            .bind(now - DEDUP_WINDOW_MS)
            .execute(&self.writer)
            .await?
            .rows_affected()
            + sqlx::query("delete from source_delivery where received_at < ?1")
                .bind(now - DEDUP_WINDOW_MS)
                .execute(&self.writer)
                .await?
                .rows_affected();
        // Payloads and attempts go with their event (on delete cascade). Deleting in slices
        // keeps each write short, so ingest never waits long behind a big clean-up.
        let delivered_before = now - retention.delivered_ms;
        let delivered = self
            .delete_in_slices(
                "select id from event where state = 'delivered' and delivered_at < ?1
                 union all
                 select id from event where state = 'dry_run' and received_at < ?1",
                delivered_before,
            )
            .await?;
        let dead = self
            .delete_in_slices(
                "select id from event where state = 'dead' and updated_at < ?1",
                now - retention.dead_ms,
            )
            .await?;
        let parked = sqlx::query("delete from inbox where state = 'invalid' and updated_at < ?1")
            .bind(now - retention.dead_ms)
            .execute(&self.writer)
            .await?
            .rows_affected();
        let counts_before = now - retention.counts_ms;
        let day = counts_before.div_euclid(super::DAY_MS);
        let counts = sqlx::query("delete from match_quality where day < ?1")
            .bind(day)
            .execute(&self.writer)
            .await?
            .rows_affected()
            + sqlx::query("delete from match_quality_drop where day < ?1")
                .bind(day)
                .execute(&self.writer)
                .await?
                .rows_affected()
            + sqlx::query("delete from event_tally where bucket > 0 and bucket < ?1")
                .bind(counts_before)
                .execute(&self.writer)
                .await?
                .rows_affected();
        let mut match_keys = 0;
        loop {
            let n = sqlx::query(
                "delete from match_key where (identity, field) in (
                     select identity, field from match_key where expires_at <= ?1 limit 2000)",
            )
            .bind(now)
            .execute(&self.writer)
            .await?
            .rows_affected();
            match_keys += n;
            if n == 0 {
                break;
            }
        }
        Ok(Pruned {
            dedup_keys,
            delivered,
            dead,
            match_keys,
            parked,
            counts,
        })
    }

    async fn enqueue_inbox(
        &self,
        source: &str,
        payload: &serde_json::Value,
        now: i64,
    ) -> Result<i64, StoreError> {
        let id = sqlx::query_scalar(
            "insert into inbox (source, payload, created_at, updated_at) values (?1, ?2, ?3, ?3)
             returning id",
        )
        .bind(source)
        .bind(payload.to_string())
        .bind(now)
        .fetch_one(&self.writer)
        .await?;
        Ok(id)
    }

    async fn enqueue_source_payloads(
        &self,
        payloads: &[SourcePayload],
        now: i64,
    ) -> Result<Vec<Option<i64>>, StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.health).await?;
        let mut ids = Vec::with_capacity(payloads.len());
        for item in payloads {
            if let Some(delivery_id) = &item.delivery_id {
                let fresh = sqlx::query(
                    "insert into source_delivery (source, delivery_id, received_at) values (?1, ?2, ?3)
                     on conflict (source, delivery_id) do update set received_at = excluded.received_at
                     where source_delivery.received_at < ?4",
                )
                .bind(&item.source)
                .bind(delivery_id)
                .bind(now)
                .bind(now - DEDUP_WINDOW_MS)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if fresh == 0 {
                    ids.push(None);
                    continue;
                }
            }
            let id: i64 = sqlx::query_scalar(
                "insert into inbox (source, payload, created_at, updated_at) values (?1, ?2, ?3, ?3)
                 returning id",
            )
            .bind(&item.source)
            .bind(item.payload.to_string())
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            ids.push(Some(id));
        }
        tx.commit().await?;
        Ok(ids)
    }

    async fn count_source_outcomes(
        &self,
        counts: &[SourceCount],
        now: i64,
    ) -> Result<(), StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.health).await?;
        for count in counts.iter().filter(|c| c.count > 0) {
            sqlx::query(
                "insert into source_count (source, outcome, count, last_at) values (?1, ?2, ?3, ?4)
                 on conflict (source, outcome) do update
                 set count = source_count.count + excluded.count, last_at = excluded.last_at",
            )
            .bind(&count.source)
            .bind(count.outcome)
            .bind(i64::try_from(count.count).unwrap_or(i64::MAX))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn count_match_quality(
        &self,
        counts: &[QualityCount],
        drops: &[DropCount],
    ) -> Result<(), StoreError> {
        if counts.is_empty() && drops.is_empty() {
            return Ok(());
        }
        let upsert = super::quality_upsert_sql("match_quality", '?');
        let upsert_drop = super::quality_drop_upsert_sql("match_quality_drop", '?');
        let mut tx = WriteTx::begin(&self.writer, &self.health).await?;
        for count in counts {
            let mut query = sqlx::query(&upsert)
                .bind(count.day)
                .bind(&count.pixel_id)
                .bind(&count.event_name)
                .bind(count.events);
            for n in count.carried.iter().chain(&count.filled) {
                query = query.bind(*n);
            }
            query.execute(&mut *tx).await?;
        }
        for drop in drops {
            sqlx::query(&upsert_drop)
                .bind(drop.day)
                .bind(&drop.pixel_id)
                .bind(&drop.event_name)
                .bind(&drop.field)
                .bind(&drop.reason)
                .bind(drop.count)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn match_quality(
        &self,
        since_day: i64,
    ) -> Result<(Vec<QualityCount>, Vec<DropCount>), StoreError> {
        let sql = format!(
            "select day, pixel_id, event_name, events, {} from match_quality where day >= ?1
             order by day, pixel_id, event_name",
            super::quality_columns().join(", ")
        );
        let rows = sqlx::query(&sql)
            .bind(since_day)
            .fetch_all(&self.reader)
            .await?;
        let counts = rows
            .iter()
            .map(super::quality_count_from_row)
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        let rows = sqlx::query(
            "select day, pixel_id, event_name, field, reason, count from match_quality_drop
             where day >= ?1 order by day, pixel_id, event_name, field, reason",
        )
        .bind(since_day)
        .fetch_all(&self.reader)
        .await?;
        let drops = rows
            .iter()
            .map(super::drop_count_from_row)
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok((counts, drops))
    }

    async fn parked_payloads(&self, limit: usize) -> Result<Vec<ParkedPayload>, StoreError> {
        let rows = sqlx::query(
            "select id, source, problems, created_at, updated_at from inbox
             where state = 'invalid' order by id desc limit ?1",
        )
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter()
            .map(|row| {
                let problems: Option<String> = row.try_get(2)?;
                Ok(ParkedPayload {
                    id: row.try_get(0)?,
                    source: row.try_get(1)?,
                    problems: problems
                        .and_then(|text| serde_json::from_str(&text).ok())
                        .unwrap_or(serde_json::Value::Null),
                    received_at: row.try_get(3)?,
                    parked_at: row.try_get(4)?,
                })
            })
            .collect()
    }

    async fn source_stats(&self) -> Result<Vec<SourceStat>, StoreError> {
        let rows = sqlx::query(
            "select source, outcome, count, last_at from source_count
             union all
             select source, case state when 'pending' then 'pending' else 'parked_now' end,
                    count(*), max(updated_at)
             from inbox group by source, state
             order by 1, 2",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(SourceStat {
                    source: row.try_get(0)?,
                    outcome: row.try_get(1)?,
                    count: row.try_get(2)?,
                    last_at: row.try_get(3)?,
                })
            })
            .collect()
    }

    async fn claim_inbox(
        &self,
        limit: usize,
        now: i64,
        lease_until: i64,
    ) -> Result<Vec<InboxItem>, StoreError> {
        let rows = sqlx::query(
            "update inbox set leased_until = ?3
             where id in (
                 select id from inbox
                 where state = 'pending' and (leased_until is null or leased_until <= ?2)
                 order by id limit ?1)
             returning id, source, payload",
        )
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(now)
        .bind(lease_until)
        .fetch_all(&self.writer)
        .await?;
        let mut items = rows
            .into_iter()
            .map(|row| {
                let payload: String = row.try_get("payload")?;
                Ok(InboxItem {
                    id: row.try_get("id")?,
                    source: row.try_get("source")?,
                    // A row written by hand may not be JSON: it is then invalid, not lost.
                    payload: serde_json::from_str(&payload)
                        .unwrap_or(serde_json::Value::String(payload)),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        items.sort_by_key(|item| item.id);
        Ok(items)
    }

    async fn finish_inbox(
        &self,
        stored: &[i64],
        invalid: &[(i64, serde_json::Value)],
        now: i64,
    ) -> Result<(), StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.health).await?;
        for chunk in stored.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::new("delete from inbox where id in ");
            push_id_list(&mut query, chunk);
            query.build().execute(&mut *tx).await?;
        }
        for (id, problems) in invalid {
            sqlx::query(
                "update inbox set state = 'invalid', problems = ?2, leased_until = null,
                    updated_at = ?3
                 where id = ?1",
            )
            .bind(id)
            .bind(problems.to_string())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn requeue_invalid_inbox(&self, now: i64) -> Result<u64, StoreError> {
        let result = sqlx::query(
            "update inbox set state = 'pending', problems = null, leased_until = null,
                updated_at = ?1
             where state = 'invalid'",
        )
        .bind(now)
        .execute(&self.writer)
        .await?;
        Ok(result.rows_affected())
    }

    async fn activity(
        &self,
        since: i64,
        bucket_ms: i64,
        buckets: usize,
    ) -> Result<Vec<ActivityBucket>, StoreError> {
        let (since, bucket_ms, until) = activity_grid(since, bucket_ms, buckets);
        let rows = sqlx::query(ACTIVITY_SQL)
            .bind(since)
            .bind(bucket_ms)
            .bind(until)
            .fetch_all(&self.reader)
            .await?;
        let rows = rows
            .into_iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(fill_buckets(rows, since, bucket_ms, buckets))
    }

    async fn list_events(
        &self,
        query: &EventQuery,
        now: i64,
    ) -> Result<Vec<EventSummary>, StoreError> {
        let rows = event_list_query("event", query, now)
            .build()
            .fetch_all(&self.reader)
            .await?;
        Ok(rows
            .iter()
            .map(DashboardRow::event_summary)
            .collect::<Result<_, _>>()?)
    }

    async fn dead_reasons(&self, limit: usize) -> Result<Vec<ReasonCount>, StoreError> {
        let rows = sqlx::query(
            "select coalesce(last_error, '') as reason, count(*) as n, max(updated_at) as last_at
             from event where state = 'dead'
             group by coalesce(last_error, '') order by n desc, last_at desc limit ?1",
        )
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.reader)
        .await?;
        Ok(rows
            .iter()
            .map(DashboardRow::reason_count)
            .collect::<Result<_, _>>()?)
    }

    async fn recent_errors(&self, limit: usize) -> Result<Vec<RecentError>, StoreError> {
        let rows = sqlx::query(RECENT_ERRORS_SQL)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.reader)
            .await?;
        Ok(rows
            .iter()
            .map(DashboardRow::recent_error)
            .collect::<Result<_, _>>()?)
    }

    async fn retry_now(&self, event_id: &str, now: i64) -> Result<u64, StoreError> {
        // A live lease means a worker is sending it right now: leave that row alone.
        let result = sqlx::query(
            "update event set next_attempt_at = ?2, updated_at = ?2
             where event_id = ?1 and state = 'queued'
               and (leased_until is null or leased_until <= ?2)",
        )
        .bind(event_id)
        .bind(now)
        .execute(&self.writer)
        .await?;
        Ok(result.rows_affected())
    }

    async fn requeue_parked(&self, ids: &[i64], now: i64) -> Result<u64, StoreError> {
        let mut total = 0;
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::new(
                "update inbox set state = 'pending', problems = null, leased_until = null,
                    updated_at = ",
            );
            query.push_bind(now);
            query.push(" where state = 'invalid' and id in ");
            push_id_list(&mut query, chunk);
            total += query.build().execute(&self.writer).await?.rows_affected();
        }
        Ok(total)
    }

    async fn release_orphaned_leases(&self, now: i64) -> Result<u64, StoreError> {
        let mut tx = WriteTx::begin(&self.writer, &self.health).await?;
        // The attempt stays counted: the dead process may have sent it.
        let events = sqlx::query(
            "update event set leased_until = null, next_attempt_at = ?1, updated_at = ?1
             where state = 'queued' and leased_until is not null",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let inbox = sqlx::query(
            "update inbox set leased_until = null, updated_at = ?1
             where state = 'pending' and leased_until is not null",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(events + inbox)
    }

    fn write_health(&self) -> &WriteHealth {
        &self.health
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("select 1").execute(&self.reader).await?;
        if let Some(failure) = self.health.failure() {
            // Writes were failing: only a committed write says they work again.
            let probe = async {
                let mut tx = WriteTx::begin(&self.writer, &self.health).await?;
                sqlx::query(
                    // 64 KiB, about what a commit of a few requests writes: a write of a few
                    // bytes can fit in WAL space SQLite already holds while real commits fail.
                    "insert into write_probe (id, written_at, padding)
                     values (1, ?1, randomblob(65536))
                     on conflict (id) do update
                     set written_at = excluded.written_at, padding = excluded.padding",
                )
                .bind(chrono::Utc::now().timestamp_millis())
                .execute(&mut *tx)
                .await?;
                tx.commit().await
            };
            if let Err(err) = probe.await {
                tracing::debug!(error = %err, "storage write probe failed");
                let failure = self.health.failure().unwrap_or(failure);
                return Err(StoreError::WritesFailing(failure));
            }
        }
        Ok(())
    }
}

/// Adds `tally` to `event_tally` (shard 0: SQLite has one writer), inside the caller's
/// transaction.
async fn add_tally(conn: &mut SqliteConnection, tally: &Tally) -> Result<(), sqlx::Error> {
    let rows: Vec<_> = tally.rows().collect();
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut query =
            QueryBuilder::new("insert into event_tally (bucket, pixel_id, state, shard, n) ");
        query.push_values(chunk, |mut row, (bucket, pixel_id, state, n)| {
            row.push_bind(*bucket)
                .push_bind(*pixel_id)
                .push_bind(*state)
                .push_bind(0_i64)
                .push_bind(*n);
        });
        query.push(
            " on conflict (bucket, pixel_id, state, shard)
             do update set n = event_tally.n + excluded.n",
        );
        query.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// ` where state = 'dead' and …`: the dead events `filter` selects.
fn push_replay_filter<'q>(query: &mut QueryBuilder<'q, sqlx::Sqlite>, filter: &'q ReplayFilter) {
    query.push(" where state = 'dead'");
    if !filter.event_ids.is_empty() {
        query.push(" and event_id in (");
        let mut ids = query.separated(", ");
        for id in &filter.event_ids {
            ids.push_bind(id);
        }
        query.push(")");
    }
    if let Some(name) = &filter.event_name {
        query.push(" and event_name = ");
        query.push_bind(name);
    }
    if let Some(text) = &filter.reason_contains {
        query.push(" and instr(coalesce(last_error, ''), ");
        query.push_bind(text);
        query.push(") > 0");
    }
    if let Some(reason) = &filter.reason {
        query.push(" and coalesce(last_error, '') = ");
        query.push_bind(reason);
    }
}

/// Appends `(?, ?, …)` binding each id.
fn push_id_list<'q>(query: &mut QueryBuilder<'q, sqlx::Sqlite>, ids: &'q [i64]) {
    query.push("(");
    let mut list = query.separated(", ");
    for id in ids {
        list.push_bind(id);
    }
    query.push(")");
}
