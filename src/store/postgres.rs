//! The production backend: Postgres (Supabase included), shared by any number of instances.
//!
//! Same semantics as [`super::SqliteStore`], method for method; what differs is how Postgres is
//! best used:
//! - Several instances share one database. Claims lock the rows they take with
//!   `for update skip locked`, so two instances never lease the same event and never wait on
//!   each other; deduplication is the `dedup_key` primary key, so it holds across instances.
//! - Multi-row statements pass one array per column (`unnest($1::text[], …)`), so every
//!   statement has one shape whatever the batch size: one prepared statement, not one per
//!   row count.
//! - Every table lives in capi-bridge's own schema (`DATABASE_SCHEMA`, default `capi_bridge`),
//!   and every statement names its tables with that schema. Nothing at run time depends on
//!   `search_path`, which a transaction-mode pooler does not carry from one transaction to the
//!   next; only the migrations, which must name their tables without a schema, run with
//!   `set local search_path` inside their one transaction.
//! - Behind a transaction-mode pooler (Supabase's port 6543) see
//!   [`detect_transaction_pooler`].

use std::collections::{HashMap, HashSet};
use std::ops::{Deref, DerefMut};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::query::Query;
use sqlx::{Connection, Executor, PgConnection, PgPool, Postgres, QueryBuilder, Row, Transaction};

use super::dashboard::{activity_grid, event_list_query, fill_buckets, DashboardRow};
use super::{
    newest_match_keys, ActivityBucket, AttemptRecord, AttemptView, ClaimedEvent, EventDetail,
    EventQuery, EventRow, EventSummary, EventUpdate, InboxItem, InsertOutcome, Inserted,
    MatchKeyRow, NewEventRecord, Notice, ParkedPayload, Pruned, QueueStats, ReasonCount,
    RecentError, ReplayFilter, Retention, Settlement, SourceCount, SourcePayload, SourceStat,
    Store, StoreError, DEDUP_WINDOW_MS,
};
use super::{DropCount, QualityCount, Tally, WriteHealth};

/// Connections per instance. Several instances (and the user's own tools) share the server's
/// `max_connections`, so the pool is bounded; group commit keeps ingest to one writer anyway.
const MAX_CONNECTIONS: u32 = 10;

/// A statement running longer than this is cancelled by the server: the queue's statements
/// touch a few thousand rows at most, so anything slower is stuck (a lock held elsewhere).
const STATEMENT_TIMEOUT_MS: u32 = 30_000;

/// How long to wait for a free connection, or for a new one to be established.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Supabase's transaction-mode pooler (Supavisor, or the dedicated PgBouncer) listens here.
const TRANSACTION_POOLER_PORT: u16 = 6543;

/// Rows deleted per statement when pruning, so ingest never waits long behind a clean-up.
const DELETE_SLICE: i64 = 2000;

/// The `event_tally` shard a statement adds to: one per server connection (see the
/// migration), so concurrent transactions rarely share a row and never wait long.
const TALLY_SHARD: &str = "(pg_backend_pid() % 16)";

/// The schema-qualified, quoted names of capi-bridge's tables.
#[derive(Debug, Clone)]
struct Tables {
    event: String,
    payload: String,
    attempt: String,
    dedup: String,
    match_key: String,
    inbox: String,
    source_delivery: String,
    source_count: String,
    match_quality: String,
    match_quality_drop: String,
    write_probe: String,
    tally: String,
    /// `NOTIFY` channel of `enqueue()` for this schema.
    inbox_channel: String,
    /// `NOTIFY` channel for events any instance may claim.
    queue_channel: String,
}

impl Tables {
    fn new(schema: &str) -> Self {
        let name = |table: &str| format!("\"{schema}\".{table}");
        Self {
            event: name("event"),
            payload: name("event_payload"),
            attempt: name("attempt"),
            dedup: name("dedup_key"),
            match_key: name("match_key"),
            inbox: name("inbox"),
            source_delivery: name("source_delivery"),
            source_count: name("source_count"),
            match_quality: name("match_quality"),
            match_quality_drop: name("match_quality_drop"),
            write_probe: name("write_probe"),
            tally: name("event_tally"),
            inbox_channel: format!("capi_bridge_inbox_{schema}"),
            queue_channel: format!("capi_bridge_queue_{schema}"),
        }
    }
}

/// [`Store`] over Postgres.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    tables: Tables,
    /// Behind a transaction-mode pooler: no named prepared statements, every operation in an
    /// explicit transaction (see [`detect_transaction_pooler`]).
    transaction_pooler: bool,
    /// `LISTEN`s for `enqueue()` and for claimable events; opened on first use, reopened after
    /// a failure.
    listener: std::sync::Arc<tokio::sync::Mutex<Option<PgListener>>>,
    /// Whether the latest group commit committed (`ping`, so `/readyz`, reports it).
    health: WriteHealth,
}

/// A connection for one operation: a plain pooled connection, or behind a transaction-mode
/// pooler an open transaction (the only way to keep one server connection for a statement's
/// Parse and its Bind, which sqlx sends in two round trips).
enum Conn {
    Pooled(PoolConnection<Postgres>),
    Transaction(Transaction<'static, Postgres>),
}

impl Conn {
    /// Commits, when this is a transaction.
    async fn finish(self) -> Result<(), sqlx::Error> {
        match self {
            Conn::Pooled(_) => Ok(()),
            Conn::Transaction(tx) => tx.commit().await,
        }
    }
}

impl Deref for Conn {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        match self {
            Conn::Pooled(conn) => conn,
            Conn::Transaction(tx) => tx,
        }
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match self {
            Conn::Pooled(conn) => conn,
            Conn::Transaction(tx) => tx,
        }
    }
}

/// Whether `url` goes through a transaction-mode pooler, and the connect options for it (the
/// `pgbouncer` parameter is ours, so it is taken out before sqlx reads the rest).
///
/// A transaction-mode pooler (Supabase's Supavisor or PgBouncer on port 6543) hands each
/// transaction, or each statement outside one, to whichever server connection is free. sqlx
/// prepares every statement under a name (`sqlx_s_1`, …) and keeps it on the server connection
/// for reuse; through such a pooler the name is missing on the next server connection or
/// already taken by another client's, and queries fail with "prepared statement … does not
/// exist / already exists". Turning the statement cache off is not enough in sqlx 0.8: it still
/// prepares under a name (and never closes it). So behind the pooler the store
/// - turns the statement cache off, and marks every query non-persistent, which makes sqlx
///   use the unnamed statement;
/// - runs every operation inside an explicit transaction, because sqlx sends Parse and Bind in
///   two round trips and only an open transaction keeps them on the same server connection;
/// - sets `statement_timeout` with `set local` at the start of each transaction instead of once
///   per session, since session settings do not follow a client through the pooler;
/// - migrates inside one transaction (pinned to one server connection, `search_path` set with
///   `set local`, an advisory transaction lock instead of sqlx's session lock) and removes the
///   named statements sqlx's migrator leaves behind.
///
/// Detection is by port 6543, Supabase's (and the usual self-hosted) transaction-mode port, or
/// an explicit `pgbouncer=true` parameter (Prisma's spelling) for a pooler elsewhere. Session
/// mode (5432) and direct connections keep named statements, cached, which saves a parse per
/// statement. `LISTEN/NOTIFY` does not work through a transaction-mode pooler at all, so a
/// long-running instance is better served by session mode or a direct connection.
pub(crate) fn detect_transaction_pooler(url: &str) -> Result<(PgConnectOptions, bool), StoreError> {
    let mut parsed = url::Url::parse(url)
        .map_err(|e| StoreError::InvalidConfig(format!("DATABASE_URL is not a valid URL: {e}")))?;
    let mut flag = false;
    let kept: Vec<(String, String)> = parsed
        .query_pairs()
        .filter_map(|(key, value)| {
            if key == "pgbouncer" {
                flag = matches!(value.to_ascii_lowercase().as_str(), "true" | "1" | "yes");
                None
            } else {
                Some((key.into_owned(), value.into_owned()))
            }
        })
        .collect();
    if kept.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(kept);
    }
    let options = PgConnectOptions::from_str(parsed.as_str())?;
    // The port as sqlx resolved it: from the URL, a `port` parameter or PGPORT.
    let pooled = flag || options.get_port() == TRANSACTION_POOLER_PORT;
    Ok((options, pooled))
}

/// A lowercase SQL identifier, safe to put between double quotes in SQL text.
fn valid_schema(schema: &str) -> bool {
    schema
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && schema.len() <= 63
}

impl PostgresStore {
    /// Connects to `url`, creates `schema` if needed and applies the migrations in it.
    ///
    /// TLS follows the URL's `sslmode` (`require` encrypts without checking the certificate,
    /// `verify-full` checks it against `sslrootcert` or the bundled web roots), with rustls.
    ///
    /// # Errors
    /// When the schema name is not a lowercase identifier, or the database cannot be reached
    /// or migrated.
    pub async fn open(url: &str, schema: &str) -> Result<Self, StoreError> {
        if !valid_schema(schema) {
            return Err(StoreError::InvalidConfig(format!(
                "the Postgres schema must be a lowercase SQL identifier, got {schema:?}"
            )));
        }
        let (mut options, transaction_pooler) = detect_transaction_pooler(url)?;
        if options.get_application_name().is_none() {
            // Shown in pg_stat_activity, so the user can tell our connections from theirs.
            options = options.application_name("capi-bridge");
        }
        let mut pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT);
        if transaction_pooler {
            options = options.statement_cache_capacity(0);
        } else {
            // One server session per connection: a session setting holds for its lifetime.
            pool = pool.after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute(
                        format!("set statement_timeout = {STATEMENT_TIMEOUT_MS}").as_str(),
                    )
                    .await?;
                    Ok(())
                })
            });
        }
        // The migrations run on a connection of their own, made before the pool: a failure to
        // connect (refused; unreachable, as Supabase's IPv6-only direct host is from an
        // IPv4-only network) is reported as it is, where the pool would only time out.
        let mut conn = PgConnection::connect_with(&options).await?;
        migrate(&mut conn, schema, transaction_pooler).await?;
        conn.close().await?;
        Ok(Self {
            pool: pool.connect_with(options).await?,
            tables: Tables::new(schema),
            listener: std::sync::Arc::new(tokio::sync::Mutex::new(None)),
            transaction_pooler,
            health: WriteHealth::default(),
        })
    }

    /// The queries `/readyz`, `/metrics` and the dashboard's overview run on every call, for
    /// the tables of `schema`.
    #[doc(hidden)]
    #[must_use]
    pub fn hot_queries(schema: &str, now: i64) -> Vec<super::HotQuery> {
        let tables = Tables::new(schema);
        [
            ("stats", stats_sql(&tables)),
            ("activity", activity_sql(&tables)),
            ("recent_errors", recent_errors_sql(&tables)),
        ]
        .into_iter()
        .map(|(name, sql)| super::HotQuery {
            name,
            sql,
            params: super::hot_query_params(name, now),
        })
        .collect()
    }

    /// A query, prepared under a name (and cached) unless behind a transaction-mode pooler.
    fn query<'q>(&self, sql: &'q str) -> Query<'q, Postgres, PgArguments> {
        sqlx::query(sql).persistent(!self.transaction_pooler)
    }

    /// A transaction; behind a transaction-mode pooler it also carries the statement timeout.
    async fn begin(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        if self.transaction_pooler {
            self.pool
                .begin_with(format!(
                    "begin; set local statement_timeout = {STATEMENT_TIMEOUT_MS}"
                ))
                .await
        } else {
            self.pool.begin().await
        }
    }

    /// A connection for an operation that needs no transaction of its own.
    async fn conn(&self) -> Result<Conn, sqlx::Error> {
        if self.transaction_pooler {
            Ok(Conn::Transaction(self.begin().await?))
        } else {
            Ok(Conn::Pooled(self.pool.acquire().await?))
        }
    }

    /// Deletes the rows of `table` that `condition` (one `$1` parameter) selects, a slice at a
    /// time, so each write is short and ingest never waits long behind a clean-up. `key` names
    /// the columns that identify a row. Rows another transaction holds (another instance
    /// pruning at the same moment, a replay) are skipped rather than waited for, and picked
    /// up by a later pass: a clean-up never blocks, and two never deadlock.
    async fn delete_in_slices(
        &self,
        table: &str,
        key: &[&str],
        condition: &str,
        before: i64,
    ) -> Result<u64, StoreError> {
        let columns = key.join(", ");
        let matches = key
            .iter()
            .map(|c| format!("t.{c} = doomed.{c}"))
            .collect::<Vec<_>>()
            .join(" and ");
        let sql = format!(
            "with doomed as materialized (
                 select {columns} from {table} where {condition}
                 limit {DELETE_SLICE}
                 for update skip locked
             )
             delete from {table} as t using doomed where {matches}"
        );
        let mut total = 0;
        loop {
            let mut conn = self.conn().await?;
            let n = self
                .query(&sql)
                .bind(before)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            conn.finish().await?;
            total += n;
            if n == 0 {
                return Ok(total);
            }
        }
    }
}

impl PostgresStore {
    /// [`PostgresStore::delete_in_slices`] for events: the same statement also takes the
    /// deleted events off the counts (`event_tally`), so counts and rows change together.
    async fn delete_events_in_slices(
        &self,
        condition: &str,
        before: i64,
    ) -> Result<u64, StoreError> {
        let Tables { event, tally, .. } = &self.tables;
        let sql = format!(
            "with doomed as materialized (
                 select id from {event} where {condition}
                 limit {DELETE_SLICE}
                 for update skip locked
             ),
             gone as (
                 delete from {event} as t using doomed where t.id = doomed.id
                 returning t.pixel_id, t.state
             ),
             counted as (
                 insert into {tally} as c (bucket, pixel_id, state, shard, n)
                 select 0, pixel_id, state, {TALLY_SHARD}, -count(*) from gone
                 group by pixel_id, state
                 order by pixel_id collate \"C\", state collate \"C\"
                 on conflict (bucket, pixel_id, state, shard) do update set n = c.n + excluded.n
             )
             select count(*) from gone"
        );
        let mut total = 0;
        loop {
            let mut conn = self.conn().await?;
            let n: i64 = self
                .query(&sql)
                .bind(before)
                .fetch_one(&mut *conn)
                .await?
                .try_get(0)?;
            conn.finish().await?;
            total += u64::try_from(n).unwrap_or(0);
            if n == 0 {
                return Ok(total);
            }
        }
    }

    /// Adds `tally` to `event_tally` in this connection's shard, inside the caller's
    /// transaction (rows in `Tally` order, the one every transaction follows).
    async fn add_tally(&self, conn: &mut PgConnection, tally: &Tally) -> Result<(), sqlx::Error> {
        let rows: Vec<_> = tally.rows().collect();
        if rows.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "insert into {} as t (bucket, pixel_id, state, shard, n)
             select bucket, pixel_id, state, {TALLY_SHARD}, n
             from unnest($1::int8[], $2::text[], $3::text[], $4::int8[]) with ordinality
                 as d(bucket, pixel_id, state, n, ord)
             order by ord
             on conflict (bucket, pixel_id, state, shard) do update set n = t.n + excluded.n",
            self.tables.tally
        );
        self.query(&sql)
            .bind(rows.iter().map(|r| r.0).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.1).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.2).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.3).collect::<Vec<_>>())
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}

/// `Store::stats`: counts from `event_tally`, kept as events change; the oldest waiting event
/// of each pixel with a queue is one seek in `event_queued_oldest`. Nothing here reads more
/// rows than there are pixels (times shards).
fn stats_sql(tables: &Tables) -> String {
    let Tables { event, tally, .. } = tables;
    format!(
        "select t.state, t.pixel_id, t.n,
                 case when t.state = 'queued' then
                     (select min(e.received_at) from {event} as e
                      where e.state = 'queued' and e.pixel_id = t.pixel_id)
                 end as oldest
             from (select pixel_id, state, sum(n)::int8 as n from {tally} where bucket = 0
                   group by pixel_id, state having sum(n) <> 0) as t"
    )
}

/// `Store::activity`: counted as it happens, per five minutes (`event_tally`), so a day is 288
/// rows per shard however many events it had.
fn activity_sql(tables: &Tables) -> String {
    format!(
        "select case state when 'accepted' then 0::int8 when 'delivered' then 1 else 2 end,
                 (bucket - $1) / $2, sum(n)::int8
             from {}
             where bucket >= $1 and bucket < $3 and bucket > 0 and pixel_id = ''
             group by 1, 2",
        tables.tally
    )
}

/// `Store::recent_errors`: the newest attempts by id, each joined to its event by key.
fn recent_errors_sql(tables: &Tables) -> String {
    let Tables { event, attempt, .. } = tables;
    format!(
        "select e.event_id, e.event_name, e.pixel_id, a.attempted_at, a.outcome,
                a.http_status, a.code, a.subcode, a.fbtrace_id, a.error_title, a.error_message
             from {attempt} as a join {event} as e on e.id = a.event_row_id
             order by a.id desc limit $1"
    )
}

/// Creates the schema and applies the migrations, in one transaction. Instances starting
/// together wait for each other on an advisory transaction lock (sqlx's own lock is a
/// session lock, which a transaction-mode pooler cannot hold). `search_path` is set for
/// this transaction only, so the migrations and sqlx's `_sqlx_migrations` table land in
/// the schema, and two schemas in one database keep separate migration histories.
async fn migrate(
    conn: &mut PgConnection,
    schema: &str,
    transaction_pooler: bool,
) -> Result<(), StoreError> {
    let mut tx = conn.begin().await?;
    if transaction_pooler {
        forget_sqlx_statements(&mut tx).await?;
    }
    sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 0))")
        .persistent(!transaction_pooler)
        .bind(format!("capi-bridge migrate {schema}"))
        .execute(&mut *tx)
        .await?;
    // Schema changes may take longer than a queue statement.
    tx.execute(
        format!(
            "create schema if not exists \"{schema}\";
             set local search_path to \"{schema}\";
             set local statement_timeout = 0"
        )
        .as_str(),
    )
    .await?;
    let mut migrator = sqlx::migrate!("./migrations/postgres");
    migrator.set_locking(false);
    migrator.run(&mut *tx).await?;
    if transaction_pooler {
        forget_sqlx_statements(&mut tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Removes the named statements sqlx prepared on this server connection (`sqlx_s_…`). Behind a
/// transaction-mode pooler they outlive the client and collide with the next sqlx client's
/// names; sqlx's migrator prepares named statements whatever the settings. Statements a pooler
/// manages itself (PgBouncer renames them) do not carry this prefix and are left alone.
async fn forget_sqlx_statements(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let names: Vec<String> = sqlx::query_scalar(
        "select name from pg_prepared_statements where name like 'sqlx\\_s\\_%'",
    )
    .persistent(false)
    .fetch_all(&mut *conn)
    .await?;
    for name in names {
        conn.execute(format!("deallocate \"{}\"", name.replace('"', "\"\"")).as_str())
            .await?;
    }
    Ok(())
}

#[async_trait]
impl Store for PostgresStore {
    async fn insert_events(
        &self,
        events: &[NewEventRecord],
        now: i64,
    ) -> Result<Vec<Inserted>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let Tables {
            event,
            payload,
            dedup,
            tally,
            ..
        } = &self.tables;
        let cutoff = now - DEDUP_WINDOW_MS;
        // Each key once (`on conflict do update` may not touch a row twice in one statement):
        // the first event with a key is the candidate, later ones in the batch are duplicates.
        let mut seen: HashSet<(&str, &str, &str)> = HashSet::with_capacity(events.len());
        let candidates: Vec<(usize, &NewEventRecord)> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| {
                seen.insert((
                    e.pixel_id.as_str(),
                    e.event_name.as_str(),
                    e.event_id.as_str(),
                ))
            })
            .collect();
        let rows: Vec<_> = candidates
            .iter()
            .map(|(_, e)| match e.lease_until {
                _ if e.dry_run => ("dry_run", 0_i32, now, None),
                Some(until) => ("queued", 1, until, Some(until)),
                None => ("queued", 0, now, None),
            })
            .collect();
        // Dedup keys, events and payloads in ONE statement, run on its own (no BEGIN/COMMIT
        // round trips): a statement is atomic, and one round trip per group commit is what
        // keeps ingest fast on Postgres.
        // - A key older than the window is renewed (a new conversion) and returned as fresh; a
        //   key another instance is inserting right now waits for its commit, then counts as a
        //   duplicate. Keys are taken in sorted order, so concurrent inserts from several
        //   instances lock them in the same order and never deadlock.
        // - The database assigns the ids; Postgres does not promise that `returning` follows
        //   the input order, so ids are matched back by key, unique among the candidates.
        //   `order by ord` hands the rows to the insert in input order, so ids ascend in input
        //   order as on SQLite (claims take equal due times by id).
        let sql = format!(
            "with input as (
                 select * from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                     $6::int4[], $7::int8[], $8::int8[], $9::int8[], $10::text[], $13::text[])
                     with ordinality
                     as i(pixel_id, event_id, event_name, test_event_code, state, attempts,
                         next_attempt_at, leased_until, deadline_at, payload, source, ord)
             ),
             fresh as (
                 insert into {dedup} as d (pixel_id, event_name, event_id, first_seen_at)
                 select pixel_id, event_name, event_id, $11 from input
                 order by pixel_id, event_name, event_id
                 on conflict (pixel_id, event_name, event_id)
                 do update set first_seen_at = excluded.first_seen_at
                 where d.first_seen_at < $12
                 returning pixel_id, event_name, event_id
             ),
             stored as (
                 insert into {event} (pixel_id, event_id, event_name, test_event_code, state,
                     attempts, next_attempt_at, leased_until, deadline_at, received_at, updated_at,
                     source)
                 select i.pixel_id, i.event_id, i.event_name, i.test_event_code, i.state,
                     i.attempts, i.next_attempt_at, i.leased_until, i.deadline_at, $11, $11,
                     i.source
                 from input as i join fresh using (pixel_id, event_name, event_id)
                 order by i.ord
                 returning id, pixel_id, event_name, event_id, state
             ),
             payloads as (
                 insert into {payload} (event_row_id, payload)
                 select stored.id, input.payload
                 from stored join input using (pixel_id, event_name, event_id)
             ),
             counted as (
                 insert into {tally} as t (bucket, pixel_id, state, shard, n)
                 select bucket, pixel_id, state, {TALLY_SHARD}, n from (
                     select 0::int8 as bucket, pixel_id, state, count(*) as n from stored
                     group by pixel_id, state
                     union all
                     select $14::int8, '', 'accepted', count(*) from stored having count(*) > 0
                 ) as c
                 order by bucket, pixel_id collate \"C\", state collate \"C\"
                 on conflict (bucket, pixel_id, state, shard) do update set n = t.n + excluded.n
             )
             select id, pixel_id, event_name, event_id from stored"
        );
        let texts = |f: fn(&NewEventRecord) -> &str| -> Vec<&str> {
            candidates.iter().map(|(_, e)| f(e)).collect()
        };
        let mut conn = self.conn().await?;
        let stored = self
            .query(&sql)
            .bind(texts(|e| e.pixel_id.as_str()))
            .bind(texts(|e| e.event_id.as_str()))
            .bind(texts(|e| e.event_name.as_str()))
            .bind(
                candidates
                    .iter()
                    .map(|(_, e)| e.test_event_code.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(rows.iter().map(|r| r.0).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.1).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.2).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.3).collect::<Vec<_>>())
            .bind(
                candidates
                    .iter()
                    .map(|(_, e)| e.deadline_at)
                    .collect::<Vec<_>>(),
            )
            .bind(texts(|e| e.payload.as_str()))
            .bind(now)
            .bind(cutoff)
            .bind(
                candidates
                    .iter()
                    .map(|(_, e)| e.source.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(super::activity_bucket(now))
            .fetch_all(&mut *conn)
            .await?;
        // Events nobody has leased: tell every instance, so an idle one claims them at once.
        let unleased = candidates
            .iter()
            .any(|(_, e)| !e.dry_run && e.lease_until.is_none());
        if unleased && !stored.is_empty() {
            self.query("select pg_notify($1, '')")
                .bind(&self.tables.queue_channel)
                .execute(&mut *conn)
                .await?;
        }
        conn.finish().await?;
        let mut ids: HashMap<(String, String, String), i64> = HashMap::with_capacity(stored.len());
        for row in stored {
            ids.insert(
                (row.try_get(1)?, row.try_get(2)?, row.try_get(3)?),
                row.try_get(0)?,
            );
        }
        let mut results = vec![
            Inserted {
                outcome: InsertOutcome::Duplicate,
                row_id: None,
            };
            events.len()
        ];
        for (index, e) in &candidates {
            let key = (e.pixel_id.clone(), e.event_name.clone(), e.event_id.clone());
            if let Some(id) = ids.get(&key) {
                results[*index] = Inserted {
                    outcome: if e.dry_run {
                        InsertOutcome::DryRun
                    } else {
                        InsertOutcome::Queued
                    },
                    row_id: Some(*id),
                };
            }
        }
        Ok(results)
    }

    async fn remember_match_keys(&self, rows: &[MatchKeyRow]) -> Result<(), StoreError> {
        // One key once (an upsert may not touch a row twice), in key order: the lock order every
        // instance follows, so two instances writing the same keys never deadlock.
        let rows = newest_match_keys(rows);
        if rows.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "insert into {} as m (identity, field, value, seen_at, expires_at)
             select * from unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[])
                 as r(identity, field, value, seen_at, expires_at)
             order by identity, field
             on conflict (identity, field) do update
             set value = excluded.value, seen_at = excluded.seen_at,
                 expires_at = excluded.expires_at
             where excluded.seen_at >= m.seen_at",
            self.tables.match_key
        );
        let texts =
            |f: fn(&MatchKeyRow) -> &str| -> Vec<&str> { rows.iter().map(|m| f(m)).collect() };
        let mut conn = self.conn().await?;
        self.query(&sql)
            .bind(texts(|m| m.identity.as_str()))
            .bind(texts(|m| m.field.as_str()))
            .bind(texts(|m| m.value.as_str()))
            .bind(rows.iter().map(|m| m.seen_at).collect::<Vec<_>>())
            .bind(rows.iter().map(|m| m.expires_at).collect::<Vec<_>>())
            .execute(&mut *conn)
            .await?;
        conn.finish().await?;
        Ok(())
    }

    async fn recall_match_keys(
        &self,
        identities: &[String],
        now: i64,
    ) -> Result<Vec<MatchKeyRow>, StoreError> {
        if identities.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "select identity, field, value, seen_at, expires_at from {}
             where identity = any($1::text[]) and expires_at > $2",
            self.tables.match_key
        );
        let mut conn = self.conn().await?;
        let rows = self
            .query(&sql)
            .bind(identities)
            .bind(now)
            .fetch_all(&mut *conn)
            .await?;
        conn.finish().await?;
        rows.into_iter()
            .map(|row| {
                Ok(MatchKeyRow {
                    identity: row.try_get(0)?,
                    field: row.try_get(1)?,
                    value: row.try_get(2)?,
                    seen_at: row.try_get(3)?,
                    expires_at: row.try_get(4)?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    async fn claim_due(
        &self,
        pixel_id: &str,
        limit: usize,
        now: i64,
        lease_until: i64,
    ) -> Result<Vec<ClaimedEvent>, StoreError> {
        let Tables { event, payload, .. } = &self.tables;
        // `for update skip locked`: rows another instance is claiming at this moment are
        // passed over, not waited for, and never claimed twice (a row claimed and committed
        // meanwhile is re-checked and no longer due). The lease end doubles as the next attempt
        // time: leased rows leave the due range of the index, and an expired lease makes the
        // row due again by itself. `materialized` keeps the locking select a separate step that
        // runs once. Payloads come back in the same round trip.
        let sql = format!(
            "with due as materialized (
                 select id from {event}
                 where state = 'queued' and pixel_id = $1 and next_attempt_at <= $2
                 order by next_attempt_at, id
                 limit $4
                 for update skip locked
             ),
             claimed as (
                 update {event} as e
                 set leased_until = $3, next_attempt_at = $3, attempts = e.attempts + 1
                 from due where e.id = due.id
                 returning e.id, e.event_id, e.test_event_code, e.attempts, e.deadline_at
             )
             select claimed.*, p.payload
             from claimed left join {payload} as p on p.event_row_id = claimed.id
             order by claimed.id"
        );
        let mut conn = self.conn().await?;
        let rows = self
            .query(&sql)
            .bind(pixel_id)
            .bind(now)
            .bind(lease_until)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *conn)
            .await?;
        conn.finish().await?;
        let claimed = rows
            .into_iter()
            .map(|row| {
                Ok(ClaimedEvent {
                    row_id: row.try_get("id")?,
                    event_id: row.try_get("event_id")?,
                    // Written in the same transaction as the event, so always there; should it
                    // ever be missing, an empty object makes Meta refuse the event and it is
                    // parked, not lost.
                    payload: row
                        .try_get::<Option<String>, _>("payload")?
                        .unwrap_or_else(|| "{}".to_owned()),
                    test_event_code: row.try_get("test_event_code")?,
                    attempts: i64::from(row.try_get::<i32, _>("attempts")?),
                    deadline_at: row.try_get("deadline_at")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(claimed)
    }

    async fn extend_lease(&self, row_ids: &[i64], lease_until: i64) -> Result<(), StoreError> {
        if row_ids.is_empty() {
            return Ok(());
        }
        let event = &self.tables.event;
        let sql = format!(
            "update {event} set leased_until = $1, next_attempt_at = $1
             where state = 'queued' and id = any($2)"
        );
        let mut conn = self.conn().await?;
        self.query(&sql)
            .bind(lease_until)
            .bind(row_ids)
            .execute(&mut *conn)
            .await?;
        conn.finish().await?;
        Ok(())
    }

    async fn settle(&self, updates: &[EventUpdate], now: i64) -> Result<(), StoreError> {
        if updates.is_empty() {
            return Ok(());
        }
        let Tables { event, attempt, .. } = &self.tables;
        let mut tx = self.begin().await?;
        let mut tally = Tally::default();
        // Three statements whatever the batch size: attempts, deliveries, everything else.
        // The delivering attempt is recorded on the event row itself (see the migration).
        let attempts: Vec<(i64, &AttemptRecord)> = updates
            .iter()
            .filter(|u| u.settlement != Settlement::Delivered)
            .filter_map(|u| u.attempt.as_ref().map(|a| (u.row_id, a)))
            .collect();
        if !attempts.is_empty() {
            let sql = format!(
                "insert into {attempt} (event_row_id, attempted_at, outcome, http_status, code,
                     subcode, fbtrace_id, error_title, error_message)
                 select event_row_id, $9, outcome, http_status, code, subcode, fbtrace_id,
                     error_title, error_message
                 from unnest($1::int8[], $2::text[], $3::int4[], $4::int8[], $5::int8[],
                     $6::text[], $7::text[], $8::text[]) with ordinality
                     as a(event_row_id, outcome, http_status, code, subcode, fbtrace_id,
                         error_title, error_message, ord)
                 order by ord"
            );
            self.query(&sql)
                .bind(attempts.iter().map(|(id, _)| *id).collect::<Vec<_>>())
                .bind(
                    attempts
                        .iter()
                        .map(|(_, a)| a.outcome.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    attempts
                        .iter()
                        .map(|(_, a)| a.http_status.map(i32::from))
                        .collect::<Vec<_>>(),
                )
                .bind(attempts.iter().map(|(_, a)| a.code).collect::<Vec<_>>())
                .bind(attempts.iter().map(|(_, a)| a.subcode).collect::<Vec<_>>())
                .bind(
                    attempts
                        .iter()
                        .map(|(_, a)| a.fbtrace_id.as_deref())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    attempts
                        .iter()
                        .map(|(_, a)| a.error_title.as_deref())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    attempts
                        .iter()
                        .map(|(_, a)| a.error_message.as_deref())
                        .collect::<Vec<_>>(),
                )
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        // Deliveries first, as on SQLite: a row also listed with another settlement stays
        // delivered (the later statement only touches queued rows). Each row once: an update
        // joined to two input rows would pick one of them at random.
        let mut seen = HashSet::new();
        let delivered: Vec<(i64, Option<&str>)> = updates
            .iter()
            .filter(|u| u.settlement == Settlement::Delivered && seen.insert(u.row_id))
            .map(|u| {
                let trace = u.attempt.as_ref().and_then(|a| a.fbtrace_id.as_deref());
                (u.row_id, trace)
            })
            .collect();
        if !delivered.is_empty() {
            let sql = format!(
                "update {event} as e
                 set state = 'delivered', leased_until = null, last_error = null,
                     delivered_at = $3, updated_at = $3, delivered_fbtrace_id = d.fbtrace_id
                 from unnest($1::int8[], $2::text[]) as d(id, fbtrace_id)
                 where e.id = d.id and e.state = 'queued'
                 returning e.pixel_id"
            );
            let rows = self
                .query(&sql)
                .bind(delivered.iter().map(|d| d.0).collect::<Vec<_>>())
                .bind(delivered.iter().map(|d| d.1).collect::<Vec<_>>())
                .bind(now)
                .fetch_all(&mut *tx)
                .await?;
            for row in rows {
                let pixel_id: String = row.try_get(0)?;
                tally.state(&pixel_id, "queued", -1);
                tally.state(&pixel_id, "delivered", 1);
                tally.activity(now, "delivered", 1);
            }
        }
        // The rest in one statement. A row listed twice takes its last settlement (SQLite
        // applies them in turn, so there the last one wins too, unless an earlier one was
        // dead); the delivery loop never lists a row twice.
        let mut seen = HashSet::new();
        let mut rest: Vec<(i64, &str, Option<i64>, &str)> = updates
            .iter()
            .rev()
            .filter_map(|u| {
                let (kind, next_attempt_at, reason) = match &u.settlement {
                    Settlement::Delivered => return None,
                    Settlement::Retry {
                        next_attempt_at,
                        reason,
                    } => ("retry", Some(*next_attempt_at), reason),
                    Settlement::Dead { reason } => ("dead", None, reason),
                    Settlement::Release { reason } => ("release", None, reason),
                    Settlement::Postpone {
                        next_attempt_at,
                        reason,
                    } => ("postpone", Some(*next_attempt_at), reason),
                };
                seen.insert(u.row_id)
                    .then_some((u.row_id, kind, next_attempt_at, reason.as_str()))
            })
            .collect();
        rest.reverse();
        if !rest.is_empty() {
            // retry: due again later. dead: parked. release: not attempted after all, so the
            // attempt counted by the claim is given back and the event is due at once.
            // postpone: the attempt is given back too, and the event is due later.
            let sql = format!(
                "update {event} as e
                 set state = case when u.kind = 'dead' then 'dead' else e.state end,
                     leased_until = null,
                     attempts = case when u.kind in ('release', 'postpone')
                         then greatest(e.attempts - 1, 0) else e.attempts end,
                     next_attempt_at = case u.kind
                         when 'retry' then u.next_attempt_at
                         when 'postpone' then u.next_attempt_at
                         when 'release' then $5
                         else e.next_attempt_at end,
                     last_error = u.reason,
                     updated_at = $5
                 from unnest($1::int8[], $2::text[], $3::int8[], $4::text[])
                     as u(id, kind, next_attempt_at, reason)
                 where e.id = u.id and e.state = 'queued'
                 returning e.pixel_id, u.kind"
            );
            let rows = self
                .query(&sql)
                .bind(rest.iter().map(|r| r.0).collect::<Vec<_>>())
                .bind(rest.iter().map(|r| r.1).collect::<Vec<_>>())
                .bind(rest.iter().map(|r| r.2).collect::<Vec<_>>())
                .bind(rest.iter().map(|r| r.3).collect::<Vec<_>>())
                .bind(now)
                .fetch_all(&mut *tx)
                .await?;
            for row in rows {
                let pixel_id: String = row.try_get(0)?;
                let kind: String = row.try_get(1)?;
                if kind == "dead" {
                    tally.state(&pixel_id, "queued", -1);
                    tally.state(&pixel_id, "dead", 1);
                    tally.activity(now, "dead", 1);
                }
            }
        }
        // The counts last: every transaction takes its tally rows after its event rows, in
        // one order, so tallies never take part in a deadlock.
        self.add_tally(&mut tx, &tally).await?;
        // Released events (a paused instance giving them back) are claimable by any instance:
        // tell them, in the same transaction (delivered at commit).
        if updates
            .iter()
            .any(|u| matches!(u.settlement, Settlement::Release { .. }))
        {
            self.query("select pg_notify($1, '')")
                .bind(&self.tables.queue_channel)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn find_event(
        &self,
        event_id: &str,
        now: i64,
    ) -> Result<Option<EventDetail>, StoreError> {
        let Tables {
            event,
            payload,
            attempt,
            ..
        } = &self.tables;
        let sql = format!(
            "select id, event_id, event_name, pixel_id, state, attempts, last_error, received_at,
                next_attempt_at, leased_until, delivered_at, delivered_fbtrace_id, test_event_code, source,
                (select payload from {payload} as p where p.event_row_id = e.id) as payload
             from {event} as e where event_id = $1 order by id desc limit 1"
        );
        let mut conn = self.conn().await?;
        let Some(row) = self
            .query(&sql)
            .bind(event_id)
            .fetch_optional(&mut *conn)
            .await?
        else {
            conn.finish().await?;
            return Ok(None);
        };
        let row_id: i64 = row.try_get("id")?;
        let attempts_sql = format!(
            "select attempted_at, outcome, http_status, code, subcode, fbtrace_id, error_title,
                error_message
             from {attempt} where event_row_id = $1 order by id"
        );
        let attempt_rows = self
            .query(&attempts_sql)
            .bind(row_id)
            .fetch_all(&mut *conn)
            .await?;
        conn.finish().await?;
        let attempts_log = attempt_rows
            .into_iter()
            .map(|r| {
                Ok(AttemptView {
                    attempted_at: r.try_get("attempted_at")?,
                    record: AttemptRecord {
                        outcome: r.try_get("outcome")?,
                        http_status: r
                            .try_get::<Option<i32>, _>("http_status")?
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
            attempts: i64::from(row.try_get::<i32, _>("attempts")?),
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
        let event = &self.tables.event;
        // The rows are locked first (a concurrent replay's rows are re-checked after it
        // commits and skipped if no longer dead); the update returns each one's pixel and the
        // time it died, which come off the counts in the same transaction.
        let mut query = QueryBuilder::new(format!(
            "with doomed as (select id, pixel_id, updated_at from {event} where state = 'dead'"
        ));
        if !filter.event_ids.is_empty() {
            query.push(" and event_id = any(");
            query.push_bind(filter.event_ids.as_slice());
            query.push(")");
        }
        if let Some(name) = &filter.event_name {
            query.push(" and event_name = ");
            query.push_bind(name);
        }
        if let Some(text) = &filter.reason_contains {
            // strpos, not like: the text is matched literally, `%` and `_` included.
            query.push(" and strpos(coalesce(last_error, ''), ");
            query.push_bind(text);
            query.push(") > 0");
        }
        if let Some(reason) = &filter.reason {
            query.push(" and coalesce(last_error, '') = ");
            query.push_bind(reason);
        }
        query.push(format!(
            " for update)
             update {event} as e set state = 'queued', leased_until = null, attempts = 0,
                 next_attempt_at = "
        ));
        query.push_bind(now);
        query.push(", updated_at = ");
        query.push_bind(now);
        // A replayed event gets a fresh 7-day window only if its event_time allows it; the
        // deadline stays, so an event Meta would refuse as too old dies again at once.
        query.push(
            " from doomed where e.id = doomed.id and e.state = 'dead'
             returning doomed.pixel_id, doomed.updated_at",
        );
        let mut tx = self.begin().await?;
        let rows = query
            .build()
            .persistent(!self.transaction_pooler)
            .fetch_all(&mut *tx)
            .await?;
        let mut tally = Tally::default();
        for row in &rows {
            let pixel_id: String = row.try_get(0)?;
            let died_at: i64 = row.try_get(1)?;
            tally.state(&pixel_id, "dead", -1);
            tally.state(&pixel_id, "queued", 1);
            tally.activity(died_at, "dead", -1);
        }
        self.add_tally(&mut tx, &tally).await?;
        tx.commit().await?;
        Ok(rows.len() as u64)
    }

    async fn stats(&self) -> Result<QueueStats, StoreError> {
        let sql = stats_sql(&self.tables);
        let mut conn = self.conn().await?;
        let rows = self.query(&sql).fetch_all(&mut *conn).await?;
        conn.finish().await?;
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
        let Tables {
            dedup,
            match_key,
            inbox,
            match_quality,
            match_quality_drop,
            tally,
            ..
        } = &self.tables;
        let dedup_keys = self
            .delete_in_slices(
                dedup,
                &["pixel_id", "event_name", "event_id"],
                "first_seen_at < $1",
                now - DEDUP_WINDOW_MS,
            )
            .await?
            + self
                .delete_in_slices(
                    &self.tables.source_delivery,
                    &["source", "delivery_id"],
                    "received_at < $1",
                    now - DEDUP_WINDOW_MS,
                )
                .await?;
        // Payloads and attempts go with their event (on delete cascade).
        let delivered_before = now - retention.delivered_ms;
        let delivered = self
            .delete_events_in_slices(
                "state = 'delivered' and delivered_at < $1",
                delivered_before,
            )
            .await?
            + self
                .delete_events_in_slices("state = 'dry_run' and received_at < $1", delivered_before)
                .await?;
        let dead = self
            .delete_events_in_slices(
                "state = 'dead' and updated_at < $1",
                now - retention.dead_ms,
            )
            .await?;
        let match_keys = self
            .delete_in_slices(match_key, &["identity", "field"], "expires_at <= $1", now)
            .await?;
        let parked = self
            .delete_in_slices(
                inbox,
                &["id"],
                "state = 'invalid' and updated_at < $1",
                now - retention.dead_ms,
            )
            .await?;
        let counts_before = now - retention.counts_ms;
        let day = counts_before.div_euclid(super::DAY_MS);
        let counts = self
            .delete_in_slices(
                match_quality,
                &["day", "pixel_id", "event_name"],
                "day < $1",
                day,
            )
            .await?
            + self
                .delete_in_slices(
                    match_quality_drop,
                    &["day", "pixel_id", "event_name", "field", "reason"],
                    "day < $1",
                    day,
                )
                .await?
            + self
                .delete_in_slices(
                    tally,
                    &["bucket", "pixel_id", "state", "shard"],
                    "bucket > 0 and bucket < $1",
                    counts_before,
                )
                .await?;
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
        let sql = format!(
            "insert into {} (source, payload, created_at, updated_at)
             values ($1, $2::jsonb, $3, $3) returning id",
            self.tables.inbox
        );
        let mut conn = self.conn().await?;
        let id: i64 = self
            .query(&sql)
            .bind(source)
            .bind(payload.to_string())
            .bind(now)
            .fetch_one(&mut *conn)
            .await?
            .try_get(0)?;
        conn.finish().await?;
        Ok(id)
    }

    async fn claim_inbox(
        &self,
        limit: usize,
        now: i64,
        lease_until: i64,
    ) -> Result<Vec<InboxItem>, StoreError> {
        let inbox = &self.tables.inbox;
        // Skip locked: several instances take disjoint rows and never wait on each other.
        let sql = format!(
            "with picked as materialized (
                 select id from {inbox}
                 where state = 'pending' and (leased_until is null or leased_until <= $2)
                 order by id limit $1
                 for update skip locked
             )
             update {inbox} as t set leased_until = $3 from picked where t.id = picked.id
             returning t.id, t.source, t.payload::text as payload"
        );
        let mut conn = self.conn().await?;
        let rows = self
            .query(&sql)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(now)
            .bind(lease_until)
            .fetch_all(&mut *conn)
            .await?;
        conn.finish().await?;
        let mut items = rows
            .into_iter()
            .map(|row| {
                let payload: String = row.try_get("payload")?;
                Ok(InboxItem {
                    id: row.try_get("id")?,
                    source: row.try_get("source")?,
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
        let inbox = &self.tables.inbox;
        let mut tx = self.begin().await?;
        if !stored.is_empty() {
            let sql = format!("delete from {inbox} where id = any($1::bigint[])");
            self.query(&sql).bind(stored).execute(&mut *tx).await?;
        }
        if !invalid.is_empty() {
            let ids: Vec<i64> = invalid.iter().map(|(id, _)| *id).collect();
            let problems: Vec<String> = invalid.iter().map(|(_, p)| p.to_string()).collect();
            let sql = format!(
                "update {inbox} as t
                 set state = 'invalid', problems = v.problems::jsonb, leased_until = null,
                     updated_at = $3
                 from unnest($1::bigint[], $2::text[]) as v(id, problems)
                 where t.id = v.id"
            );
            self.query(&sql)
                .bind(&ids)
                .bind(&problems)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn requeue_invalid_inbox(&self, now: i64) -> Result<u64, StoreError> {
        let sql = format!(
            "update {} set state = 'pending', problems = null, leased_until = null,
                 updated_at = $1
             where state = 'invalid'",
            self.tables.inbox
        );
        let mut conn = self.conn().await?;
        let n = self
            .query(&sql)
            .bind(now)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        conn.finish().await?;
        Ok(n)
    }

    async fn enqueue_source_payloads(
        &self,
        payloads: &[SourcePayload],
        now: i64,
    ) -> Result<Vec<Option<i64>>, StoreError> {
        let Tables {
            inbox,
            source_delivery,
            ..
        } = &self.tables;
        let claim_delivery = format!(
            "insert into {source_delivery} as d (source, delivery_id, received_at)
             values ($1, $2, $3)
             on conflict (source, delivery_id) do update set received_at = excluded.received_at
             where d.received_at < $4"
        );
        let insert = format!(
            "insert into {inbox} (source, payload, created_at, updated_at)
             values ($1, $2::jsonb, $3, $3) returning id"
        );
        let mut tx = self.begin().await?;
        let mut ids = Vec::with_capacity(payloads.len());
        for item in payloads {
            if let Some(delivery_id) = &item.delivery_id {
                let fresh = self
                    .query(&claim_delivery)
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
            let id: i64 = self
                .query(&insert)
                .bind(&item.source)
                .bind(item.payload.to_string())
                .bind(now)
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
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
        let counts: Vec<&SourceCount> = counts.iter().filter(|c| c.count > 0).collect();
        if counts.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "insert into {} as c (source, outcome, count, last_at)
             select s, o, n, $4 from unnest($1::text[], $2::text[], $3::bigint[]) as u(s, o, n)
             on conflict (source, outcome) do update
             set count = c.count + excluded.count, last_at = excluded.last_at",
            self.tables.source_count
        );
        let mut conn = self.conn().await?;
        self.query(&sql)
            .bind(counts.iter().map(|c| c.source.clone()).collect::<Vec<_>>())
            .bind(
                counts
                    .iter()
                    .map(|c| c.outcome.to_owned())
                    .collect::<Vec<_>>(),
            )
            .bind(
                counts
                    .iter()
                    .map(|c| i64::try_from(c.count).unwrap_or(i64::MAX))
                    .collect::<Vec<_>>(),
            )
            .bind(now)
            .execute(&mut *conn)
            .await?;
        conn.finish().await?;
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
        let upsert = super::quality_upsert_sql(&self.tables.match_quality, '$');
        let upsert_drop = super::quality_drop_upsert_sql(&self.tables.match_quality_drop, '$');
        // A few rows a second at most (one per day, pixel and event name): a statement each.
        let mut tx = self.begin().await?;
        for count in counts {
            let mut query = self
                .query(&upsert)
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
            self.query(&upsert_drop)
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
        let counts_sql = format!(
            "select day, pixel_id, event_name, events, {} from {} where day >= $1
             order by day, pixel_id, event_name",
            super::quality_columns().join(", "),
            self.tables.match_quality
        );
        let drops_sql = format!(
            "select day, pixel_id, event_name, field, reason, count from {}
             where day >= $1 order by day, pixel_id, event_name, field, reason",
            self.tables.match_quality_drop
        );
        let mut conn = self.conn().await?;
        let count_rows = self
            .query(&counts_sql)
            .bind(since_day)
            .fetch_all(&mut *conn)
            .await?;
        let drop_rows = self
            .query(&drops_sql)
            .bind(since_day)
            .fetch_all(&mut *conn)
            .await?;
        conn.finish().await?;
        let counts = count_rows
            .iter()
            .map(super::quality_count_from_row)
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        let drops = drop_rows
            .iter()
            .map(super::drop_count_from_row)
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok((counts, drops))
    }

    async fn parked_payloads(&self, limit: usize) -> Result<Vec<ParkedPayload>, StoreError> {
        let sql = format!(
            "select id, source, problems::text, created_at, updated_at from {}
             where state = 'invalid' order by id desc limit $1",
            self.tables.inbox
        );
        let mut conn = self.conn().await?;
        let rows = self
            .query(&sql)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *conn)
            .await?;
        conn.finish().await?;
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
        let sql = format!(
            "select source, outcome, count, last_at from {}
             union all
             select source, case state when 'pending' then 'pending' else 'parked_now' end,
                    count(*), max(updated_at)
             from {} group by source, state
             order by 1, 2",
            self.tables.source_count, self.tables.inbox
        );
        let mut conn = self.conn().await?;
        let rows = self.query(&sql).fetch_all(&mut *conn).await?;
        conn.finish().await?;
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

    async fn wait_for_notice(&self, timeout: Duration) -> Option<Notice> {
        // LISTEN needs a session of its own, which a transaction-mode pooler cannot keep.
        if self.transaction_pooler {
            tokio::time::sleep(timeout).await;
            return None;
        }
        let mut listener = self.listener.lock().await;
        if listener.is_none() {
            match PgListener::connect_with(&self.pool).await {
                Ok(mut fresh) => {
                    let channels = [
                        self.tables.inbox_channel.as_str(),
                        self.tables.queue_channel.as_str(),
                    ];
                    match fresh.listen_all(channels).await {
                        Ok(()) => *listener = Some(fresh),
                        Err(err) => tracing::warn!(error = %err, "cannot LISTEN; polling"),
                    }
                }
                Err(err) => tracing::warn!(error = %err, "cannot LISTEN; polling"),
            }
        }
        let Some(active) = listener.as_mut() else {
            drop(listener);
            tokio::time::sleep(timeout).await;
            return None;
        };
        match tokio::time::timeout(timeout, active.recv()).await {
            Ok(Ok(notification)) => Some(if notification.channel() == self.tables.inbox_channel {
                Notice::Inbox
            } else {
                Notice::Queued
            }),
            Err(_) => None,
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "LISTEN connection lost; reconnecting");
                *listener = None;
                drop(listener);
                tokio::time::sleep(timeout).await;
                None
            }
        }
    }

    async fn activity(
        &self,
        since: i64,
        bucket_ms: i64,
        buckets: usize,
    ) -> Result<Vec<ActivityBucket>, StoreError> {
        let (since, bucket_ms, until) = activity_grid(since, bucket_ms, buckets);
        let sql = activity_sql(&self.tables);
        let mut conn = self.conn().await?;
        let rows = self
            .query(&sql)
            .bind(since)
            .bind(bucket_ms)
            .bind(until)
            .fetch_all(&mut *conn)
            .await?;
        conn.finish().await?;
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
        let mut conn = self.conn().await?;
        let rows = event_list_query(&self.tables.event, query, now)
            .build()
            .persistent(!self.transaction_pooler)
            .fetch_all(&mut *conn)
            .await?;
        conn.finish().await?;
        Ok(rows
            .iter()
            .map(DashboardRow::event_summary)
            .collect::<Result<_, _>>()?)
    }

    async fn dead_reasons(&self, limit: usize) -> Result<Vec<ReasonCount>, StoreError> {
        let sql = format!(
            "select coalesce(last_error, '') as reason, count(*) as n, max(updated_at) as last_at
             from {} where state = 'dead'
             group by coalesce(last_error, '') order by n desc, last_at desc limit $1",
            self.tables.event
        );
        let mut conn = self.conn().await?;
        let rows = self
            .query(&sql)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *conn)
            .await?;
        conn.finish().await?;
        Ok(rows
            .iter()
            .map(DashboardRow::reason_count)
            .collect::<Result<_, _>>()?)
    }

    async fn recent_errors(&self, limit: usize) -> Result<Vec<RecentError>, StoreError> {
        let sql = recent_errors_sql(&self.tables);
        let mut conn = self.conn().await?;
        let rows = self
            .query(&sql)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *conn)
            .await?;
        conn.finish().await?;
        Ok(rows
            .iter()
            .map(DashboardRow::recent_error)
            .collect::<Result<_, _>>()?)
    }

    async fn retry_now(&self, event_id: &str, now: i64) -> Result<u64, StoreError> {
        // A live lease means a worker is sending it right now: leave that row alone.
        let sql = format!(
            "update {} set next_attempt_at = $2, updated_at = $2
             where event_id = $1 and state = 'queued'
               and (leased_until is null or leased_until <= $2)",
            self.tables.event
        );
        let mut conn = self.conn().await?;
        let n = self
            .query(&sql)
            .bind(event_id)
            .bind(now)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        // Due now for any instance: tell them, as for newly queued events.
        if n > 0 {
            self.query("select pg_notify($1, '')")
                .bind(&self.tables.queue_channel)
                .execute(&mut *conn)
                .await?;
        }
        conn.finish().await?;
        Ok(n)
    }

    async fn requeue_parked(&self, ids: &[i64], now: i64) -> Result<u64, StoreError> {
        let sql = format!(
            "update {} set state = 'pending', problems = null, leased_until = null,
                 updated_at = $2
             where state = 'invalid' and id = any($1::bigint[])",
            self.tables.inbox
        );
        let mut conn = self.conn().await?;
        let n = self
            .query(&sql)
            .bind(ids)
            .bind(now)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        conn.finish().await?;
        Ok(n)
    }

    async fn release_orphaned_leases(&self, _now: i64) -> Result<u64, StoreError> {
        // Other instances may be alive and holding these leases: they expire by themselves.
        Ok(0)
    }

    fn write_health(&self) -> &WriteHealth {
        &self.health
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        self.query("select 1").execute(&mut *conn).await?;
        conn.finish().await?;
        if let Some(failure) = self.health.failure() {
            // Writes were failing: only a committed write says they work again.
            let probe = async {
                let mut tx = self.begin().await?;
                self.query(&format!(
                    "insert into {} (id, written_at) values (1, $1)
                     on conflict (id) do update set written_at = excluded.written_at",
                    self.tables.write_probe
                ))
                .bind(chrono::Utc::now().timestamp_millis())
                .execute(&mut *tx)
                .await?;
                tx.commit().await
            };
            match probe.await {
                Ok(()) => self.health.succeeded(),
                Err(err) => {
                    self.health.failed(&err.to_string());
                    tracing::debug!(error = %err, previous = %failure, "storage write probe failed");
                    return Err(StoreError::WritesFailing(err.to_string()));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::detect_transaction_pooler;

    fn pooled(url: &str) -> bool {
        detect_transaction_pooler(url).expect("valid url").1
    }

    #[test]
    fn supabase_transaction_pooler_is_detected_by_its_port() {
        assert!(pooled(
            "postgresql://postgres.abcdefghijklmnop:secret@aws-0-eu-central-1.pooler.supabase.com:6543/postgres?sslmode=require"
        ));
        assert!(pooled(
            "postgres://postgres:secret@db.abcdefghijklmnop.supabase.co:6543/postgres"
        ));
        assert!(pooled("postgres://postgres@localhost/postgres?port=6543"));
    }

    #[test]
    fn session_pooler_and_direct_connections_keep_prepared_statements() {
        assert!(!pooled(
            "postgresql://postgres.abcdefghijklmnop:secret@aws-0-eu-central-1.pooler.supabase.com:5432/postgres?sslmode=require"
        ));
        assert!(!pooled(
            "postgres://postgres:secret@db.abcdefghijklmnop.supabase.co:5432/postgres"
        ));
        assert!(!pooled("postgres://postgres@127.0.0.1/test"));
        assert!(!pooled(
            "postgres://postgres@127.0.0.1:6432/test?pgbouncer=false"
        ));
    }

    #[test]
    fn the_pgbouncer_parameter_marks_a_pooler_on_any_port_and_the_rest_of_the_url_is_kept() {
        let (options, flagged) = detect_transaction_pooler(
            "postgres://app@pgbouncer.internal:6432/app?pgbouncer=true&sslmode=require&application_name=x",
        )
        .expect("valid url");
        assert!(flagged);
        assert_eq!(options.get_port(), 6432);
        assert_eq!(options.get_database(), Some("app"));
        assert_eq!(options.get_application_name(), Some("x"));
        assert!(matches!(
            options.get_ssl_mode(),
            sqlx::postgres::PgSslMode::Require
        ));
        assert!(pooled("postgres://app@h/app?pgbouncer=1"));
        assert!(pooled("postgres://app@h/app?pgbouncer=TRUE"));
    }
}
