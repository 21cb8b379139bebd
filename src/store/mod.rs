//! Durable storage: the event log and the delivery queue behind one narrow [`Store`] trait.
//!
//! An accepted event and its queue entry are one row written in one transaction; the HTTP
//! answer comes after the commit ([`GroupCommit`] batches many requests into one commit).
//! Workers own events only through time-limited leases, so a crashed worker's events are
//! picked up again. Times are unix milliseconds. No transaction is ever held across a network
//! call; this module never calls Meta. The match-key memory's table (`match_key`) lives here too,
//! written and read in batches by [`crate::memory`].

mod dashboard;
mod error;
mod group_commit;
mod inbox_commit;
mod postgres;
mod sqlite;
mod sqlite_write;
mod write_health;

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::Serialize;

pub use dashboard::{
    ActivityBucket, EventQuery, EventSummary, ReasonCount, RecentError, EVENT_STATES,
};
pub use error::StoreError;
pub use group_commit::{GroupCommit, Handoff};
pub use inbox_commit::InboxCommit;
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;
pub use write_health::WriteHealth;

/// How long a `(pixel, event_name, event_id)` key stays a duplicate: Meta's window.
pub const DEDUP_WINDOW_MS: i64 = 48 * 60 * 60 * 1000;

/// An event to store.
#[derive(Debug, Clone)]
pub struct NewEventRecord {
    /// Pixel the event goes to (empty in dry-run without a pixel).
    pub pixel_id: String,
    /// The dedup id.
    pub event_id: String,
    /// Canonical event name.
    pub event_name: String,
    /// `data[i]` as JSON text.
    pub payload: String,
    /// Sent with the request when set.
    pub test_event_code: Option<String>,
    /// Unix ms after which Meta refuses the event.
    pub deadline_at: i64,
    /// Stored as `dry_run` instead of `queued`: shown, never sent.
    pub dry_run: bool,
    /// Where it came from: `api`, `cli`, `sql`, a source's name or `site:<key>`.
    pub source: Option<String>,
    /// Stored already leased to this process until then (one attempt counted), because the
    /// group commit hands it straight to its pixel's delivery workers; `None`: stored due now.
    pub lease_until: Option<i64>,
}

/// One remembered match key: the newest value of one `user_data` field for one person identity
/// (`x:<hashed external_id>`, `l:<lead_id>`, `e:<hashed email>`; see `domain::match_keys`).
/// Hashed customer information and browser identifiers only, never raw contact information.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchKeyRow {
    /// Whose: the person identity.
    pub identity: String,
    /// Meta's `user_data` key (`em`, `fbc`, `client_ip_address`, …).
    pub field: String,
    /// The value as sent to Meta, as JSON text.
    pub value: String,
    /// Unix ms: the `event_time` of the event it came from. Per identity and field the row with
    /// the newest `seen_at` is kept.
    pub seen_at: i64,
    /// Unix ms after which it is not recalled, and pruned.
    pub expires_at: i64,
}

/// Per `(identity, field)` the row with the newest `seen_at` (the later one on a tie), sorted by
/// key: one row per key, as one upsert statement needs, taken in the same order by every
/// instance so concurrent writers never deadlock.
pub(crate) fn newest_match_keys(rows: &[MatchKeyRow]) -> Vec<&MatchKeyRow> {
    let mut newest: BTreeMap<(&str, &str), &MatchKeyRow> = BTreeMap::new();
    for row in rows {
        let key = (row.identity.as_str(), row.field.as_str());
        if newest
            .get(&key)
            .is_none_or(|kept| row.seen_at >= kept.seen_at)
        {
            newest.insert(key, row);
        }
    }
    newest.into_values().collect()
}

/// What happened to one stored event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InsertOutcome {
    /// New, waiting for delivery.
    Queued,
    /// New, stored without delivery (no credentials).
    DryRun,
    /// The same key was accepted within 48 hours; nothing stored.
    Duplicate,
}

/// The result of storing one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    /// What happened.
    pub outcome: InsertOutcome,
    /// The new row, unless a duplicate.
    pub row_id: Option<i64>,
}

/// A queued event a worker has leased.
#[derive(Debug, Clone)]
pub struct ClaimedEvent {
    /// Row id, the handle for settling.
    pub row_id: i64,
    /// The dedup id.
    pub event_id: String,
    /// `data[i]` as JSON text.
    pub payload: String,
    /// Request-level test code.
    pub test_event_code: Option<String>,
    /// Attempts including this one.
    pub attempts: i64,
    /// Unix ms after which Meta refuses the event.
    pub deadline_at: i64,
}

/// Meta's answer to one attempt, as recorded for each event in it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AttemptRecord {
    /// `delivered`, `retry`, `rejected`, `paused` or `split`.
    pub outcome: String,
    /// HTTP status, when an answer came.
    pub http_status: Option<u16>,
    /// Meta's error code.
    pub code: Option<i64>,
    /// Meta's error subcode.
    pub subcode: Option<i64>,
    /// Meta's support id.
    pub fbtrace_id: Option<String>,
    /// `error_user_title`.
    pub error_title: Option<String>,
    /// `error_user_msg`, else `message`, else a transport error description.
    pub error_message: Option<String>,
}

/// How an attempt ends for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Meta has it.
    Delivered,
    /// Try again at this unix ms.
    Retry {
        /// When the event becomes due again.
        next_attempt_at: i64,
        /// Short stable reason.
        reason: String,
    },
    /// Never sent again (unless replayed).
    Dead {
        /// Why, as shown to people.
        reason: String,
    },
    /// Not attempted after all (pixel paused): give it back without counting the attempt.
    Release {
        /// Why it is waiting.
        reason: String,
    },
    /// Give it back without counting the attempt, due again at this unix ms: the event did
    /// nothing wrong (a batch split it was part of met an outage or a rate limit), so its own
    /// backoff does not grow.
    Postpone {
        /// When the event becomes due again.
        next_attempt_at: i64,
        /// Why it is waiting.
        reason: String,
    },
}

/// One event's settlement and the attempt that led to it.
#[derive(Debug, Clone)]
pub struct EventUpdate {
    /// Row id from [`ClaimedEvent`].
    pub row_id: i64,
    /// What happens next.
    pub settlement: Settlement,
    /// Meta's answer, when a request was made.
    pub attempt: Option<AttemptRecord>,
}

/// Which dead events to queue again.
#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    /// Only these event ids (all dead events when empty).
    pub event_ids: Vec<String>,
    /// Only events with this name.
    pub event_name: Option<String>,
    /// Only events whose last error contains this text.
    pub reason_contains: Option<String>,
    /// Only events whose last error is exactly this (empty: none recorded).
    pub reason: Option<String>,
}

/// Everything known about one stored event.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EventDetail {
    /// The dedup id.
    pub event_id: String,
    /// Canonical name.
    pub event_name: String,
    /// Pixel.
    pub pixel_id: String,
    /// queued, delivering, delivered, failed, dead or dry_run.
    pub state: String,
    /// Attempts made.
    pub attempts: i64,
    /// Last error, if any.
    pub last_error: Option<String>,
    /// Unix ms.
    pub received_at: i64,
    /// Unix ms of the next try while queued.
    pub next_attempt_at: Option<i64>,
    /// Unix ms.
    pub delivered_at: Option<i64>,
    /// Test code the event is sent with.
    pub test_event_code: Option<String>,
    /// Where it came from (see [`NewEventRecord::source`]).
    pub source: Option<String>,
    /// The exact `data[i]` sent (hashed).
    pub payload: serde_json::Value,
    /// Every attempt with Meta's answer, oldest first.
    pub attempts_log: Vec<AttemptView>,
}

/// The columns of an event row that both backends read for [`EventDetail`].
pub(crate) struct EventRow {
    pub(crate) event_id: String,
    pub(crate) event_name: String,
    pub(crate) pixel_id: String,
    pub(crate) stored_state: String,
    pub(crate) attempts: i64,
    pub(crate) last_error: Option<String>,
    pub(crate) received_at: i64,
    pub(crate) next_attempt_at: i64,
    pub(crate) leased_until: Option<i64>,
    pub(crate) delivered_at: Option<i64>,
    pub(crate) delivered_fbtrace_id: Option<String>,
    pub(crate) test_event_code: Option<String>,
    pub(crate) source: Option<String>,
    pub(crate) payload: Option<String>,
}

impl EventRow {
    /// The event as shown: the derived states (`delivering` = queued with a live lease,
    /// `failed` = queued to retry after an error), the payload parsed, and the delivering
    /// attempt (kept on the row, see the migrations) appended to the failed ones.
    pub(crate) fn into_detail(self, mut attempts_log: Vec<AttemptView>, now: i64) -> EventDetail {
        let queued = self.stored_state == "queued";
        let state = match self.stored_state.as_str() {
            "queued" if self.leased_until.is_some_and(|l| l > now) => "delivering".to_owned(),
            "queued" if self.attempts > 0 && self.last_error.is_some() => "failed".to_owned(),
            other => other.to_owned(),
        };
        if let (Some(attempted_at), "delivered") = (self.delivered_at, state.as_str()) {
            attempts_log.push(AttemptView {
                attempted_at,
                record: AttemptRecord {
                    outcome: "delivered".to_owned(),
                    http_status: Some(200),
                    fbtrace_id: self.delivered_fbtrace_id,
                    ..AttemptRecord::default()
                },
            });
        }
        let payload = self.payload.map_or(serde_json::Value::Null, |text| {
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
        });
        EventDetail {
            event_id: self.event_id,
            event_name: self.event_name,
            pixel_id: self.pixel_id,
            state,
            attempts: self.attempts,
            last_error: self.last_error,
            received_at: self.received_at,
            next_attempt_at: queued.then_some(self.next_attempt_at),
            delivered_at: self.delivered_at,
            test_event_code: self.test_event_code,
            source: self.source,
            payload,
            attempts_log,
        }
    }
}

/// One attempt as shown by the API.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AttemptView {
    /// Unix ms.
    pub attempted_at: i64,
    /// The recorded answer.
    #[serde(flatten)]
    pub record: AttemptRecord,
}

/// How long finished events are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Delivered and dry-run events, after delivery (or receipt for dry-run), in ms.
    pub delivered_ms: i64,
    /// Dead events, after they died, in ms. Longer: people replay them after a fix. Parked
    /// (invalid) inbox payloads are kept as long, after they were parked.
    pub dead_ms: i64,
    /// Counters by day or time bucket (match quality, the dashboard's activity), in ms.
    pub counts_ms: i64,
}

/// One day in ms.
pub(crate) const DAY_MS: i64 = 24 * 60 * 60 * 1000;

impl Default for Retention {
    fn default() -> Self {
        Self {
            delivered_ms: 30 * DAY_MS,
            dead_ms: 90 * DAY_MS,
            // The longest match-quality report (`/v1/quality?days=366`).
            counts_ms: 366 * DAY_MS,
        }
    }
}

/// What one pruning pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    /// Expired dedup keys.
    pub dedup_keys: u64,
    /// Delivered and dry-run events.
    pub delivered: u64,
    /// Dead events.
    pub dead: u64,
    /// Expired match keys.
    pub match_keys: u64,
    /// Parked (invalid) inbox payloads.
    pub parked: u64,
    /// Counter rows past `counts_ms`: match quality by day, activity by five minutes.
    pub counts: u64,
}

/// A query that `/readyz`, `/metrics` or the dashboard's overview run on every call, with
/// parameters to explain it with: the tests check on a large table that none reads the
/// event table beyond an index seek.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct HotQuery {
    /// Which store method runs it.
    pub name: &'static str,
    /// The SQL as run.
    pub sql: String,
    /// Values for its parameters, in order.
    pub params: Vec<i64>,
}

/// The hot queries' parameters for a time near `now`: activity over a day in hours, the
/// latest ten errors.
pub(crate) fn hot_query_params(name: &str, now: i64) -> Vec<i64> {
    const HOUR: i64 = 60 * 60 * 1000;
    let since = activity_bucket(now - 23 * HOUR);
    match name {
        "activity" => vec![since, HOUR, since + 24 * HOUR],
        "recent_errors" => vec![10],
        _ => Vec::new(),
    }
}

/// The length of the dashboard's activity buckets as they are counted (`event_tally`):
/// five minutes of UTC. [`Store::activity`] answers in multiples of it.
pub const ACTIVITY_BUCKET_MS: i64 = 5 * 60 * 1000;

/// The activity bucket holding `at`.
pub(crate) fn activity_bucket(at: i64) -> i64 {
    at - at.rem_euclid(ACTIVITY_BUCKET_MS)
}

/// Changes to `event_tally` made by one transaction: `(bucket, pixel_id, state)` → how much
/// to add (see the migration). Sorted, so every transaction takes the rows in one order.
#[derive(Debug, Default)]
pub(crate) struct Tally(pub(crate) BTreeMap<(i64, String, String), i64>);

impl Tally {
    /// Adds `n` to the events of `pixel_id` now in `state`.
    pub(crate) fn state(&mut self, pixel_id: &str, state: &str, n: i64) {
        self.add(0, pixel_id, state, n);
    }

    /// Adds `n` to what happened (`accepted`, `delivered`, `dead`) in the bucket holding `at`.
    pub(crate) fn activity(&mut self, at: i64, what: &str, n: i64) {
        self.add(activity_bucket(at), "", what, n);
    }

    fn add(&mut self, bucket: i64, pixel_id: &str, state: &str, n: i64) {
        if n != 0 {
            *self
                .0
                .entry((bucket, pixel_id.to_owned(), state.to_owned()))
                .or_default() += n;
        }
    }

    /// The rows to upsert, zero sums left out.
    pub(crate) fn rows(&self) -> impl Iterator<Item = (i64, &str, &str, i64)> {
        self.0
            .iter()
            .filter(|(_, n)| **n != 0)
            .map(|((b, p, s), n)| (*b, p.as_str(), s.as_str(), *n))
    }
}

/// A webhook source's payload to queue.
#[derive(Debug, Clone, PartialEq)]
pub struct SourcePayload {
    /// Source name.
    pub source: String,
    /// The sender's id for the delivery, reused by its retries.
    pub delivery_id: Option<String>,
    /// The body.
    pub payload: serde_json::Value,
}

/// An increment of one source's counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceCount {
    /// Source name.
    pub source: String,
    /// `received`, `duplicate`, `unmatched`, `mapped` or `parked`.
    pub outcome: &'static str,
    /// By how much.
    pub count: u64,
}

/// One source counter as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SourceStat {
    /// Source name.
    pub source: String,
    /// Outcome counted (or `pending` / `parked_now` for inbox rows waiting).
    pub outcome: String,
    /// Total.
    pub count: i64,
    /// Unix ms of the last increment (of the newest row for inbox rows).
    pub last_at: Option<i64>,
}

/// A payload parked in the inbox: what is wrong with it, not what it holds.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ParkedPayload {
    /// Inbox row.
    pub id: i64,
    /// Who sent it (`sql` for `enqueue()`, else the source name).
    pub source: String,
    /// The problems, as recorded (rule, field, reason).
    pub problems: serde_json::Value,
    /// Unix ms when it arrived.
    pub received_at: i64,
    /// Unix ms when it was parked.
    pub parked_at: i64,
}

/// A raw payload waiting in the inbox.
#[derive(Debug, Clone, PartialEq)]
pub struct InboxItem {
    /// Row id.
    pub id: i64,
    /// Who queued it (`sql` for `enqueue()`).
    pub source: String,
    /// An event, an array of events or Meta's envelope, unvalidated.
    pub payload: serde_json::Value,
}

/// Match-quality counts of one UTC day, pixel and event name: an increment to add, or what is
/// stored. Counts only, no values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QualityCount {
    /// Days since 1970-01-01 (UTC).
    pub day: i64,
    /// Pixel.
    pub pixel_id: String,
    /// Canonical event name.
    pub event_name: String,
    /// Events stored.
    pub events: i64,
    /// Per key of [`crate::domain::quality::MatchKey::ALL`]: events carrying it.
    pub carried: [i64; 9],
    /// Per key of [`crate::domain::quality::MatchKey::ALL`]: events the match-key memory
    /// filled it into.
    pub filled: [i64; 9],
}

/// Values the normalizer dropped, by field and reason, on one UTC day (never the values).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DropCount {
    /// Days since 1970-01-01 (UTC).
    pub day: i64,
    /// Pixel.
    pub pixel_id: String,
    /// Canonical event name.
    pub event_name: String,
    /// Meta's key (`ph`, `em`, …) or `unknown`.
    pub field: String,
    /// The normalizer's reason, e.g. `not a valid phone number`.
    pub reason: String,
    /// How many.
    pub count: i64,
}

/// The count columns of `match_quality`, in [`QualityCount`] order: the carried keys, then
/// `filled_<key>`.
pub(crate) fn quality_columns() -> Vec<String> {
    let keys = crate::domain::quality::MatchKey::ALL.map(|k| k.as_str());
    keys.iter()
        .map(|k| (*k).to_owned())
        .chain(keys.iter().map(|k| format!("filled_{k}")))
        .collect()
}

/// The upsert that adds one [`QualityCount`] to `table` (`match_quality`, schema-qualified as
/// the backend needs), with parameters `{mark}1`…: day, pixel, name, events, the counts.
pub(crate) fn quality_upsert_sql(table: &str, mark: char) -> String {
    let columns = quality_columns();
    let params: Vec<String> = (1..=columns.len() + 4)
        .map(|i| format!("{mark}{i}"))
        .collect();
    let sums: Vec<String> = std::iter::once("events".to_owned())
        .chain(columns.iter().cloned())
        .map(|c| format!("{c} = t.{c} + excluded.{c}"))
        .collect();
    format!(
        "insert into {table} as t (day, pixel_id, event_name, events, {}) values ({})
         on conflict (day, pixel_id, event_name) do update set {}",
        columns.join(", "),
        params.join(", "),
        sums.join(", ")
    )
}

/// The upsert that adds one [`DropCount`] to `table` (`match_quality_drop`).
pub(crate) fn quality_drop_upsert_sql(table: &str, mark: char) -> String {
    format!(
        "insert into {table} as t (day, pixel_id, event_name, field, reason, count)
         values ({mark}1, {mark}2, {mark}3, {mark}4, {mark}5, {mark}6)
         on conflict (day, pixel_id, event_name, field, reason) do update
         set count = t.count + excluded.count"
    )
}

/// A `match_quality` row read by either backend: day, pixel, name, events, the counts.
pub(crate) fn quality_count_from_row<R>(row: &R) -> Result<QualityCount, sqlx::Error>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let mut count = QualityCount {
        day: row.try_get(0)?,
        pixel_id: row.try_get(1)?,
        event_name: row.try_get(2)?,
        events: row.try_get(3)?,
        ..QualityCount::default()
    };
    let n = count.carried.len();
    for i in 0..n {
        count.carried[i] = row.try_get(4 + i)?;
        count.filled[i] = row.try_get(4 + n + i)?;
    }
    Ok(count)
}

/// A `match_quality_drop` row read by either backend.
pub(crate) fn drop_count_from_row<R>(row: &R) -> Result<DropCount, sqlx::Error>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(DropCount {
        day: row.try_get(0)?,
        pixel_id: row.try_get(1)?,
        event_name: row.try_get(2)?,
        field: row.try_get(3)?,
        reason: row.try_get(4)?,
        count: row.try_get(5)?,
    })
}

/// Counts by state, for readiness and metrics.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct QueueStats {
    /// Waiting or being delivered.
    pub queued: i64,
    /// Delivered.
    pub delivered: i64,
    /// Parked for good.
    pub dead: i64,
    /// Stored in dry-run.
    pub dry_run: i64,
    /// Unix ms of the oldest queued event.
    pub oldest_queued_at: Option<i64>,
    /// The same for each pixel that has events, by pixel id.
    pub by_pixel: Vec<PixelQueue>,
}

/// One pixel's share of [`QueueStats`]: a paused pixel's queue grows while others drain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct PixelQueue {
    /// Pixel id (empty for dry-run events).
    pub pixel_id: String,
    /// Waiting or being delivered.
    pub queued: i64,
    /// Parked for good.
    pub dead: i64,
    /// Unix ms of its oldest queued event.
    pub oldest_queued_at: Option<i64>,
}

impl QueueStats {
    /// Adds up `(state, pixel_id, count, oldest received_at)` rows of a
    /// `group by state, pixel_id` over the events.
    pub(crate) fn from_counts(
        rows: impl IntoIterator<Item = (String, String, i64, Option<i64>)>,
    ) -> Self {
        let mut stats = Self::default();
        for (state, pixel_id, n, oldest) in rows {
            let index = match stats.by_pixel.iter().position(|p| p.pixel_id == pixel_id) {
                Some(index) => index,
                None => {
                    stats.by_pixel.push(PixelQueue {
                        pixel_id,
                        ..PixelQueue::default()
                    });
                    stats.by_pixel.len() - 1
                }
            };
            let pixel = &mut stats.by_pixel[index];
            match state.as_str() {
                "queued" => {
                    stats.queued += n;
                    stats.oldest_queued_at = earliest(stats.oldest_queued_at, oldest);
                    pixel.queued += n;
                    pixel.oldest_queued_at = earliest(pixel.oldest_queued_at, oldest);
                }
                "delivered" => stats.delivered += n,
                "dead" => {
                    stats.dead += n;
                    pixel.dead += n;
                }
                "dry_run" => stats.dry_run += n,
                _ => {}
            }
        }
        stats.by_pixel.sort_by(|a, b| a.pixel_id.cmp(&b.pixel_id));
        stats
    }
}

fn earliest(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The storage contract shared by every backend.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores new events in one transaction, skipping keys seen in the last 48 hours.
    /// Results are in input order.
    ///
    /// Queued events with a `lease_until` are stored already leased (one attempt counted) to
    /// this process, which hands them straight to its delivery workers: no claim needed. If the
    /// process dies, the lease expires and any worker claims them as usual.
    async fn insert_events(
        &self,
        events: &[NewEventRecord],
        now: i64,
    ) -> Result<Vec<Inserted>, StoreError>;

    /// Remembers match keys, in one transaction: per identity and field the row with the newest
    /// `seen_at` stays (a row never replaces a newer one, so instances and late writes merge
    /// instead of overwriting each other; on a tie the later write wins).
    async fn remember_match_keys(&self, rows: &[MatchKeyRow]) -> Result<(), StoreError>;

    /// The remembered match keys of these identities that are still alive (`expires_at` after
    /// `now`), in no particular order.
    async fn recall_match_keys(
        &self,
        identities: &[String],
        now: i64,
    ) -> Result<Vec<MatchKeyRow>, StoreError>;

    /// Leases up to `limit` due events of `pixel_id` until `lease_until`, counting an attempt.
    async fn claim_due(
        &self,
        pixel_id: &str,
        limit: usize,
        now: i64,
        lease_until: i64,
    ) -> Result<Vec<ClaimedEvent>, StoreError>;

    /// Keeps leased events leased while a long delivery (a batch split) goes on.
    async fn extend_lease(&self, row_ids: &[i64], lease_until: i64) -> Result<(), StoreError>;

    /// Records attempts and settles events, in one transaction.
    async fn settle(&self, updates: &[EventUpdate], now: i64) -> Result<(), StoreError>;

    /// The most recent event with this id.
    async fn find_event(&self, event_id: &str, now: i64)
        -> Result<Option<EventDetail>, StoreError>;

    /// Queues dead events again; returns how many.
    async fn requeue_dead(&self, filter: &ReplayFilter, now: i64) -> Result<u64, StoreError>;

    /// Counts by state. Read from counts kept as events change and one index seek per pixel
    /// with a queue: cheap however many events are kept.
    async fn stats(&self) -> Result<QueueStats, StoreError>;

    /// Deletes what is past its retention: dedup keys older than the 48-hour window (they can
    /// no longer match anything), delivered and dry-run events older than
    /// `retention.delivered_ms`, dead events older than `retention.dead_ms`, and expired match
    /// keys; parked inbox payloads older than `retention.dead_ms`, and match-quality and
    /// activity counts older than `retention.counts_ms`. Queued events are never pruned.
    async fn prune(&self, now: i64, retention: &Retention) -> Result<Pruned, StoreError>;

    /// Releases the leases that no live worker can hold, at start, so that what a killed
    /// process had in flight is due at once instead of when its lease ends. On SQLite one
    /// process owns the file, so every lease found then is a dead process's (events and inbox
    /// rows); on Postgres other instances may be alive and holding theirs, so none is touched
    /// and leases expire as usual. Returns how many were released.
    async fn release_orphaned_leases(&self, now: i64) -> Result<u64, StoreError>;

    /// Whether storage can be read and written: a read, and while writes are failing (the
    /// latest write transaction did not commit) one small committed write, so that a store
    /// that answers reads on a full disk is not reported healthy.
    async fn ping(&self) -> Result<(), StoreError>;

    /// The outcome of the latest write transaction, which `ping` reports; the group commit
    /// records each of its commits here.
    fn write_health(&self) -> &WriteHealth;

    /// Puts a raw payload in the inbox (what `enqueue()` does inside a user's transaction on
    /// Postgres); returns its id.
    async fn enqueue_inbox(
        &self,
        source: &str,
        payload: &serde_json::Value,
        now: i64,
    ) -> Result<i64, StoreError>;

    /// Leases up to `limit` pending inbox rows until `lease_until`, oldest first.
    async fn claim_inbox(
        &self,
        limit: usize,
        now: i64,
        lease_until: i64,
    ) -> Result<Vec<InboxItem>, StoreError>;

    /// Deletes the rows whose events are stored, and marks the others invalid with their
    /// problems (JSON), in one transaction.
    async fn finish_inbox(
        &self,
        stored: &[i64],
        invalid: &[(i64, serde_json::Value)],
        now: i64,
    ) -> Result<(), StoreError>;

    /// Makes invalid inbox rows pending again (after a fix); returns how many.
    async fn requeue_invalid_inbox(&self, now: i64) -> Result<u64, StoreError>;

    /// Queues webhook sources' payloads in the inbox in one transaction, in order; a payload
    /// whose sender's `delivery_id` was already queued within the 48-hour window (or earlier in
    /// the same batch) is skipped: `None` in its place.
    async fn enqueue_source_payloads(
        &self,
        payloads: &[SourcePayload],
        now: i64,
    ) -> Result<Vec<Option<i64>>, StoreError>;

    /// One payload: [`Store::enqueue_source_payloads`] of one.
    async fn enqueue_source_payload(
        &self,
        source: &str,
        delivery_id: Option<&str>,
        payload: &serde_json::Value,
        now: i64,
    ) -> Result<Option<i64>, StoreError> {
        let one = SourcePayload {
            source: source.to_owned(),
            delivery_id: delivery_id.map(str::to_owned),
            payload: payload.clone(),
        };
        Ok(self
            .enqueue_source_payloads(std::slice::from_ref(&one), now)
            .await?
            .into_iter()
            .next()
            .flatten())
    }

    /// Adds to the per-source outcome counters.
    async fn count_source_outcomes(
        &self,
        counts: &[SourceCount],
        now: i64,
    ) -> Result<(), StoreError>;

    /// Every source's counters, and how many of its payloads are pending or parked.
    async fn source_stats(&self) -> Result<Vec<SourceStat>, StoreError>;

    /// The newest `limit` parked (invalid) inbox payloads, with their problems; not the
    /// payloads themselves, which may hold personal data.
    async fn parked_payloads(&self, limit: usize) -> Result<Vec<ParkedPayload>, StoreError>;

    /// Events accepted, delivered and dead in `buckets` consecutive buckets of `bucket_ms`
    /// starting at `since` (unix ms), oldest first; empty buckets included. Counted as it
    /// happens per [`ACTIVITY_BUCKET_MS`], so `since` is taken down to a multiple of it and
    /// `bucket_ms` up to one (the returned buckets say where they start); kept for
    /// `retention.counts_ms`, whatever became of the events since (only a replay takes a dead
    /// event off the bucket it died in).
    async fn activity(
        &self,
        since: i64,
        bucket_ms: i64,
        buckets: usize,
    ) -> Result<Vec<ActivityBucket>, StoreError>;

    /// The events `query` selects, newest first (by row), without payloads. `now` decides the
    /// shown state of leased rows.
    async fn list_events(
        &self,
        query: &EventQuery,
        now: i64,
    ) -> Result<Vec<EventSummary>, StoreError>;

    /// Dead events grouped by their exact last error, the largest groups first, at most
    /// `limit` groups.
    async fn dead_reasons(&self, limit: usize) -> Result<Vec<ReasonCount>, StoreError>;

    /// The newest `limit` unsuccessful attempts (Meta's codes and messages) with their events'
    /// ids, newest first.
    async fn recent_errors(&self, limit: usize) -> Result<Vec<RecentError>, StoreError>;

    /// Makes the queued, not currently leased rows of `event_id` due at `now` (a failed event
    /// waiting for its next retry goes at once); returns how many.
    async fn retry_now(&self, event_id: &str, now: i64) -> Result<u64, StoreError>;

    /// Makes these parked (invalid) inbox rows pending again; returns how many.
    async fn requeue_parked(&self, ids: &[i64], now: i64) -> Result<u64, StoreError>;

    /// Adds to the match-quality counters (`match_quality`, `match_quality_drop`), in one
    /// transaction.
    async fn count_match_quality(
        &self,
        counts: &[QualityCount],
        drops: &[DropCount],
    ) -> Result<(), StoreError>;

    /// The match-quality counters of `since_day` (days since 1970-01-01, UTC) and later, one
    /// row per day.
    async fn match_quality(
        &self,
        since_day: i64,
    ) -> Result<(Vec<QualityCount>, Vec<DropCount>), StoreError>;

    /// Waits for a sign that work is waiting, or `timeout` (then `None`). Backends that other
    /// processes can signal (Postgres `LISTEN/NOTIFY`) wake at once; the default just waits.
    async fn wait_for_notice(&self, timeout: std::time::Duration) -> Option<Notice> {
        tokio::time::sleep(timeout).await;
        None
    }
}

/// What another process (or a database trigger) signalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// A payload was put in the inbox (`enqueue()`).
    Inbox,
    /// Events were queued for any worker to claim (not handed to one instance's workers).
    Queued,
}

/// Opens the store named by `database_url` and applies its migrations. `schema` is the
/// Postgres schema that holds capi-bridge's tables (SQLite ignores it).
///
/// # Errors
/// [`StoreError::Unsupported`] for a scheme this build cannot serve, else connection or
/// migration failures.
pub async fn open(
    database_url: &str,
    schema: &str,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    if database_url.starts_with("sqlite:") {
        let store = SqliteStore::open(database_url).await?;
        Ok(std::sync::Arc::new(store))
    } else if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
        let store = PostgresStore::open(database_url, schema).await?;
        Ok(std::sync::Arc::new(store))
    } else {
        Err(StoreError::Unsupported(
            "DATABASE_URL must start with sqlite:// or postgres://".to_owned(),
        ))
    }
}
