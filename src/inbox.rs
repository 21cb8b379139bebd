//! The inbox worker: takes raw payloads that a database queued (Postgres `enqueue()`, called
//! inside the user's own transaction) and runs them through exactly the same pipeline as HTTP
//! events ([`Ingestor`]). A payload whose events are stored is deleted from the inbox; one that
//! breaks a rule stays there as `invalid` with its problems, visible and replayable after a fix
//! (`capi-bridge replay --inbox`). Nothing is dropped.
//!
//! Payloads of webhook sources (`POST /v1/sources/<name>`) are first turned into events by
//! the mapping rules ([`Mapper`]); one no rule wants is deleted and counted, one a rule fails
//! on is parked like an invalid one. They are processed one by one in arrival order, so
//! stage changes of one lead are stored (and sent) in the order they happened.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::delivery::now_ms;
use crate::ingest::{with_stable_event_ids, IngestError, Ingestor, Prepared, Route};
use crate::sources::{Mapped, Mapper};
use crate::store::{InboxItem, Notice, SourceCount, Store, StoreError};

/// Payloads taken per pass.
const BATCH: usize = 200;

/// How long a taken payload belongs to this worker; another instance retries it after that.
const LEASE: Duration = Duration::from_secs(60);

/// Runs until `shutdown`: processes what is in the inbox, then waits for `wake` (signalled on
/// Postgres `NOTIFY` by [`relay_notices`]) or `poll_interval`.
pub async fn run(
    store: Arc<dyn Store>,
    ingestor: Ingestor,
    mapper: Mapper,
    wake: Arc<Notify>,
    poll_interval: Duration,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let worked = match process_once(store.as_ref(), &ingestor, &mapper).await {
            Ok(n) => n > 0,
            Err(err) => {
                tracing::warn!(error = %err, "inbox pass failed; retrying");
                false
            }
        };
        if worked {
            continue;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = &mut notified => {}
            () = tokio::time::sleep(poll_interval) => {}
        }
    }
}

/// Passes the store's notices (Postgres `LISTEN/NOTIFY`) on: `enqueue()` wakes the inbox
/// worker, events another instance left for anyone wake the delivery workers. With no notices
/// (SQLite, a transaction-mode pooler) everything falls back to polling.
pub async fn relay_notices(
    store: Arc<dyn Store>,
    inbox_wake: Arc<Notify>,
    delivery_wakes: crate::delivery::Wakes,
    poll_interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let notice = tokio::select! {
            () = shutdown.cancelled() => return,
            notice = store.wait_for_notice(poll_interval) => notice,
        };
        match notice {
            Some(Notice::Inbox) => inbox_wake.notify_one(),
            Some(Notice::Queued) => delivery_wakes.wake_all(),
            None => {}
        }
    }
}

/// Takes one batch of pending payloads and processes it; returns how many were taken.
///
/// # Errors
/// Storage failures; taken payloads are then retried when their lease expires.
pub async fn process_once(
    store: &dyn Store,
    ingestor: &Ingestor,
    mapper: &Mapper,
) -> Result<usize, StoreError> {
    let now = now_ms();
    let lease_ms = i64::try_from(LEASE.as_millis()).unwrap_or(i64::MAX);
    let items = store.claim_inbox(BATCH, now, now + lease_ms).await?;
    if items.is_empty() {
        return Ok(0);
    }
    let n_items = items.len();
    let (from_sources, events): (Vec<InboxItem>, Vec<InboxItem>) = items
        .into_iter()
        .partition(|item| mapper.source(&item.source).is_some());
    let mut done = Finished::default();
    ingest_events(ingestor, events, &mut done).await;
    map_source_payloads(ingestor, mapper, from_sources, &mut done).await;

    store
        .finish_inbox(&done.stored, &done.invalid, now_ms())
        .await?;
    if !done.counts.is_empty() {
        store.count_source_outcomes(&done.counts, now_ms()).await?;
    }
    if !done.invalid.is_empty() {
        tracing::warn!(
            n_invalid = done.invalid.len(),
            "inbox payloads break Meta's rules or a mapping rule; kept as invalid with their problems"
        );
    }
    match done.failed {
        Some(err) => Err(err),
        None => Ok(n_items),
    }
}

/// What became of the payloads of one pass.
#[derive(Default)]
struct Finished {
    /// Done with: deleted.
    stored: Vec<i64>,
    /// Parked with their problems.
    invalid: Vec<(i64, serde_json::Value)>,
    /// Per-source counters.
    counts: Vec<SourceCount>,
    /// A storage failure; the payloads it hit stay leased and are retried.
    failed: Option<StoreError>,
}

impl Finished {
    fn count(&mut self, source: &str, outcome: &'static str) {
        match self
            .counts
            .iter_mut()
            .find(|c| c.source == source && c.outcome == outcome)
        {
            Some(count) => count.count += 1,
            None => self.counts.push(SourceCount {
                source: source.to_owned(),
                outcome,
                count: 1,
            }),
        }
    }

    /// A failure storing a batch: its payloads stay leased.
    fn record_failure(&mut self, err: IngestError) {
        match err {
            IngestError::Store(err) => self.failed = Some(err),
            // Prepared events only fail in storage; anything else would be a bug, and leaving
            // the payloads leased retries them rather than losing them.
            other => tracing::error!(error = %other, "storing prepared events failed"),
        }
    }

    fn record(&mut self, id: i64, result: Result<(), IngestError>) {
        match result {
            Ok(()) => self.stored.push(id),
            Err(IngestError::Invalid(problems)) => {
                self.invalid
                    .push((id, serde_json::to_value(&problems).unwrap_or_default()));
            }
            Err(IngestError::BadRequest(reason) | IngestError::TooMany(reason)) => {
                self.invalid
                    .push((id, json!([{ "field": "", "reason": reason }])));
            }
            // Left leased: retried once the lease expires, nothing is lost.
            Err(IngestError::Store(err)) => self.failed = Some(err),
        }
    }
}

/// Event payloads (`enqueue()`): concurrently, so the group commit stores them in a few
/// transactions rather than one each.
async fn ingest_events(ingestor: &Ingestor, items: Vec<InboxItem>, done: &mut Finished) {
    let mut tasks = tokio::task::JoinSet::new();
    for item in items {
        let ingestor = ingestor.clone();
        tasks.spawn(async move {
            let body = with_stable_event_ids(item.payload, &format!("inbox-{}", item.id));
            let route = Route::from(item.source.as_str());
            let result = ingestor.ingest(body, now_ms() / 1000, &route).await;
            (item.id, result.map(|_| ()))
        });
    }
    while let Some(joined) = tasks.join_next().await {
        if let Ok((id, result)) = joined {
            done.record(id, result);
        }
    }
}

/// Source payloads: mapped by the rules and prepared one by one (so one bad payload parks
/// alone), then the events of all good ones stored together in arrival order (one
/// transaction for many payloads, and stages of one lead stay in order).
async fn map_source_payloads(
    ingestor: &Ingestor,
    mapper: &Mapper,
    items: Vec<InboxItem>,
    done: &mut Finished,
) {
    let mut batch: Vec<InboxItem> = Vec::new();
    let mut events: Option<Prepared> = None;
    for item in items {
        let received_at = now_ms() / 1000;
        let prepared = match mapper.map(&item.source, &item.payload, received_at).await {
            Mapped::Unmatched => {
                done.stored.push(item.id);
                done.count(&item.source, "unmatched");
                continue;
            }
            Mapped::Failed { failures } => {
                done.invalid
                    .push((item.id, serde_json::to_value(&failures).unwrap_or_default()));
                done.count(&item.source, "parked");
                continue;
            }
            Mapped::Retry { reason } => {
                // Rule, lookup and table names only: no payload values.
                tracing::warn!(source = %item.source, %reason, "lookup failed; the payload is retried later");
                continue;
            }
            Mapped::Events { events, .. } => {
                let pixel = mapper
                    .source(&item.source)
                    .and_then(|source| source.pixel.as_deref());
                let route = Route::from(item.source.as_str()).to_pixel(pixel);
                match ingestor.prepare(serde_json::Value::Array(events), received_at, &route) {
                    Ok(prepared) => prepared,
                    Err(err) => {
                        done.count(&item.source, "parked");
                        done.record(item.id, Err(err));
                        continue;
                    }
                }
            }
        };
        let full = events
            .as_ref()
            .is_some_and(|e| e.len() + prepared.len() > crate::domain::MAX_EVENTS_PER_REQUEST);
        if full {
            store_together(ingestor, std::mem::take(&mut batch), events.take(), done).await;
        }
        match &mut events {
            Some(events) => events.append(prepared),
            None => events = Some(prepared),
        }
        batch.push(item);
    }
    store_together(ingestor, batch, events, done).await;
}

/// Stores the prepared events of several payloads in one request.
async fn store_together(
    ingestor: &Ingestor,
    batch: Vec<InboxItem>,
    events: Option<Prepared>,
    done: &mut Finished,
) {
    let Some(events) = events else {
        return;
    };
    match ingestor.store(events, now_ms() / 1000).await {
        Ok(_) => {
            for item in batch {
                done.count(&item.source, "mapped");
                done.stored.push(item.id);
            }
        }
        // Left leased: retried once the lease expires, nothing is lost.
        Err(err) => done.record_failure(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn item(payload: Value) -> Value {
        with_stable_event_ids(payload, "inbox-42")
    }

    #[test]
    fn events_without_an_id_get_one_derived_from_the_inbox_row() {
        let one = item(json!({"event_name": "Lead"}));
        assert_eq!(one["event_id"], "inbox-42");
        let kept = item(json!({"event_name": "Lead", "event_id": "x"}));
        assert_eq!(kept["event_id"], "x");
        let many = item(json!([{"event_name": "Lead"}, {"event_id": "y"}]));
        assert_eq!(many[0]["event_id"], "inbox-42-0");
        assert_eq!(many[1]["event_id"], "y");
        let envelope = item(json!({"data": [{"event_name": "Lead"}]}));
        assert_eq!(envelope["data"][0]["event_id"], "inbox-42-0");
        // The same row processed twice gives the same ids.
        assert_eq!(item(json!({"event_name": "Lead"})), one);
    }
}
