//! What the operator dashboard (`crate::admin`) reads from the store: activity per time bucket,
//! a searchable event list, dead letters grouped by reason, the latest failed attempts. The
//! types live here; both backends implement the queries (`Store::activity`, …) with the same
//! SQL shapes. Nothing here holds personal data: payloads stay out of every list.

use serde::Serialize;
use sqlx::{ColumnIndex, Database, Decode, Encode, QueryBuilder, Row, Type};

use super::{AttemptRecord, AttemptView};

/// The states an event is shown in (stored `queued` splits into `queued`, `delivering` and
/// `failed`; see [`super::EventRow::into_detail`]).
pub const EVENT_STATES: [&str; 6] = [
    "queued",
    "delivering",
    "failed",
    "delivered",
    "dead",
    "dry_run",
];

/// Which events to list, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventQuery {
    /// Exactly this event id.
    pub event_id: Option<String>,
    /// Exactly this event name.
    pub event_name: Option<String>,
    /// Exactly this source (`api`, `cli`, `sql`, a source's name, `site:<key>`).
    pub source: Option<String>,
    /// One of [`EVENT_STATES`]; anything else matches nothing.
    pub state: Option<String>,
    /// Received at or after this unix ms.
    pub received_from: Option<i64>,
    /// Received before this unix ms.
    pub received_until: Option<i64>,
    /// Only rows older than this row id: the next page after a page ending there.
    pub before_row: Option<i64>,
    /// At most this many.
    pub limit: usize,
}

/// One event in a list: what it is and where it stands, never its payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventSummary {
    /// Row id (the page cursor).
    pub row_id: i64,
    /// The dedup id.
    pub event_id: String,
    /// Canonical name.
    pub event_name: String,
    /// Pixel.
    pub pixel_id: String,
    /// Where it came from, when recorded.
    pub source: Option<String>,
    /// One of [`EVENT_STATES`].
    pub state: String,
    /// Attempts made.
    pub attempts: i64,
    /// Last error, if any.
    pub last_error: Option<String>,
    /// Unix ms.
    pub received_at: i64,
}

/// Events accepted, delivered and dead within one time bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ActivityBucket {
    /// Unix ms where the bucket starts.
    pub start: i64,
    /// Stored (queued or dry-run) in the bucket; duplicates are not stored, so not counted.
    pub accepted: i64,
    /// Delivered in the bucket.
    pub delivered: i64,
    /// Died in the bucket (and still dead).
    pub dead: i64,
}

/// Dead events sharing one reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReasonCount {
    /// The exact `last_error` (empty when none was recorded).
    pub reason: String,
    /// How many dead events have it.
    pub count: i64,
    /// Unix ms of the latest of them dying.
    pub last_at: i64,
}

/// A recent unsuccessful attempt and whose it was.
#[derive(Debug, Clone, Serialize)]
pub struct RecentError {
    /// The event's dedup id.
    pub event_id: String,
    /// Its name.
    pub event_name: String,
    /// Its pixel.
    pub pixel_id: String,
    /// Meta's answer (codes and messages only).
    pub attempt: AttemptView,
}

/// Appends the `case` expression that derives the shown state from a stored row, as
/// `EventRow::into_detail` does (`delivering`: a live lease; `failed`: waiting to retry).
pub(crate) fn push_shown_state<'q, DB>(query: &mut QueryBuilder<'q, DB>, now: i64)
where
    DB: Database,
    i64: Encode<'q, DB> + Type<DB>,
{
    query.push("(case when state = 'queued' and leased_until > ");
    query.push_bind(now);
    query.push(
        " then 'delivering' when state = 'queued' and attempts > 0 and last_error is not null \
         then 'failed' else state end)",
    );
}

/// The `list_events` query over `event_table` (both backends): the search's conditions,
/// newest first, one page.
pub(crate) fn event_list_query<'q, DB>(
    event_table: &str,
    query: &'q EventQuery,
    now: i64,
) -> QueryBuilder<'q, DB>
where
    DB: Database,
    i64: Encode<'q, DB> + Type<DB>,
    &'q str: Encode<'q, DB> + Type<DB>,
{
    let mut sql = QueryBuilder::new("select id, event_id, event_name, pixel_id, source, ");
    push_shown_state(&mut sql, now);
    sql.push(format!(
        " as shown, attempts, last_error, received_at from {event_table} where 1 = 1"
    ));
    if let Some(state) = &query.state {
        sql.push(" and state = ");
        sql.push_bind(stored_state(state));
        sql.push(" and ");
        push_shown_state(&mut sql, now);
        sql.push(" = ");
        sql.push_bind(state.as_str());
    }
    let texts = [
        ("event_id", &query.event_id),
        ("event_name", &query.event_name),
        ("source", &query.source),
    ];
    for (column, value) in texts {
        if let Some(value) = value {
            sql.push(format!(" and {column} = "));
            sql.push_bind(value.as_str());
        }
    }
    let numbers = [
        ("received_at >= ", query.received_from),
        ("received_at < ", query.received_until),
        ("id < ", query.before_row),
    ];
    for (condition, value) in numbers {
        if let Some(value) = value {
            sql.push(format!(" and {condition}"));
            sql.push_bind(value);
        }
    }
    sql.push(" order by id desc limit ");
    sql.push_bind(i64::try_from(query.limit).unwrap_or(i64::MAX));
    sql
}

/// Column types both backends decode the dashboard's rows with.
pub(crate) trait DashboardRow: Row
where
    for<'r> &'r str: ColumnIndex<Self>,
{
    /// One row of [`event_list_query`].
    fn event_summary(&self) -> Result<EventSummary, sqlx::Error>;
    /// One row of `dead_reasons`: `reason`, `n`, `last_at`.
    fn reason_count(&self) -> Result<ReasonCount, sqlx::Error>;
    /// One row of `recent_errors`: the event's id, name and pixel beside its attempt.
    fn recent_error(&self) -> Result<RecentError, sqlx::Error>;
}

impl<R> DashboardRow for R
where
    R: Row,
    for<'r> &'r str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<i64>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i32: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<i32>: Decode<'r, R::Database> + Type<R::Database>,
{
    fn event_summary(&self) -> Result<EventSummary, sqlx::Error> {
        Ok(EventSummary {
            row_id: self.try_get("id")?,
            event_id: self.try_get("event_id")?,
            event_name: self.try_get("event_name")?,
            pixel_id: self.try_get("pixel_id")?,
            source: self.try_get("source")?,
            state: self.try_get("shown")?,
            // `integer` on Postgres is 4 bytes.
            attempts: i64::from(self.try_get::<i32, _>("attempts")?),
            last_error: self.try_get("last_error")?,
            received_at: self.try_get("received_at")?,
        })
    }

    fn reason_count(&self) -> Result<ReasonCount, sqlx::Error> {
        Ok(ReasonCount {
            reason: self.try_get("reason")?,
            count: self.try_get("n")?,
            last_at: self.try_get("last_at")?,
        })
    }

    fn recent_error(&self) -> Result<RecentError, sqlx::Error> {
        Ok(RecentError {
            event_id: self.try_get("event_id")?,
            event_name: self.try_get("event_name")?,
            pixel_id: self.try_get("pixel_id")?,
            attempt: AttemptView {
                attempted_at: self.try_get("attempted_at")?,
                record: AttemptRecord {
                    outcome: self.try_get("outcome")?,
                    http_status: self
                        .try_get::<Option<i32>, _>("http_status")?
                        .and_then(|s| u16::try_from(s).ok()),
                    code: self.try_get("code")?,
                    subcode: self.try_get("subcode")?,
                    fbtrace_id: self.try_get("fbtrace_id")?,
                    error_title: self.try_get("error_title")?,
                    error_message: self.try_get("error_message")?,
                },
            },
        })
    }
}

/// The stored state behind a shown one, for an indexable condition beside the derived one.
pub(crate) fn stored_state(shown: &str) -> &str {
    match shown {
        "delivering" | "failed" => "queued",
        other => other,
    }
}

/// `buckets` buckets of `bucket_ms` from `since`, filled from `(kind, bucket index, count)`
/// rows (`kind`: 0 accepted, 1 delivered, 2 dead); rows outside the range are ignored.
pub(crate) fn fill_buckets(
    rows: impl IntoIterator<Item = (i64, i64, i64)>,
    since: i64,
    bucket_ms: i64,
    buckets: usize,
) -> Vec<ActivityBucket> {
    let mut out: Vec<ActivityBucket> = (0..buckets)
        .map(|i| ActivityBucket {
            start: since + bucket_ms * i64::try_from(i).unwrap_or(i64::MAX / bucket_ms.max(1)),
            ..ActivityBucket::default()
        })
        .collect();
    for (kind, index, count) in rows {
        let Some(bucket) = usize::try_from(index).ok().and_then(|i| out.get_mut(i)) else {
            continue;
        };
        match kind {
            0 => bucket.accepted += count,
            1 => bucket.delivered += count,
            _ => bucket.dead += count,
        }
    }
    out
}

/// The activity grid as counted: `since` down to a whole bucket, `bucket_ms` up to a multiple
/// of it; and where the last bucket ends.
pub(crate) fn activity_grid(since: i64, bucket_ms: i64, buckets: usize) -> (i64, i64, i64) {
    let since = super::activity_bucket(since);
    let step = super::ACTIVITY_BUCKET_MS;
    let bucket_ms = (bucket_ms.max(1).saturating_add(step - 1) / step) * step;
    let until =
        since.saturating_add(bucket_ms.saturating_mul(i64::try_from(buckets).unwrap_or(i64::MAX)));
    (since, bucket_ms, until)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_filled_in_order_and_rows_outside_are_dropped() {
        let filled = fill_buckets(
            [
                (0, 0, 3),
                (1, 0, 2),
                (2, 2, 1),
                (0, 2, 4),
                (0, 3, 9),
                (1, -1, 9),
            ],
            1_000,
            100,
            3,
        );
        assert_eq!(
            filled,
            [
                ActivityBucket {
                    start: 1_000,
                    accepted: 3,
                    delivered: 2,
                    dead: 0
                },
                ActivityBucket {
                    start: 1_100,
                    ..ActivityBucket::default()
                },
                ActivityBucket {
                    start: 1_200,
                    accepted: 4,
                    delivered: 0,
                    dead: 1
                },
            ]
        );
    }
}
