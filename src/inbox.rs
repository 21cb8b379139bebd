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
use crate::ingest::{with_stable_event_ids, IngestError, Ingestor};
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
    delivery_wake: Arc<Notify>,
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
            Some(Notice::Queued) => delivery_wake.notify_one(),
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
            let result = ingestor.ingest(body, now_ms() / 1000).await;
            (item.id, result.map(|_| ()))
        });
    }
    while let Some(joined) = tasks.join_next().await {
        if let Ok((id, result)) = joined {
            done.record(id, result);
        }
    }
}

/// Source payloads: mapped by the rules, checked one by one (so one bad payload parks alone),
/// then the events of all good ones stored together in arrival order (one transaction for many
/// payloads, and stages of one lead stay in order).
async fn map_source_payloads(
    ingestor: &Ingestor,
    mapper: &Mapper,
    items: Vec<InboxItem>,
    done: &mut Finished,
) {
    let mut ready: Vec<(InboxItem, Vec<serde_json::Value>)> = Vec::new();
    for item in items {
        let received_at = now_ms() / 1000;
        match mapper.map(&item.source, &item.payload, received_at).await {
            Mapped::Unmatched => {
                done.stored.push(item.id);
                done.count(&item.source, "unmatched");
            }
            Mapped::Failed { failures } => {
                done.invalid
                    .push((item.id, serde_json::to_value(&failures).unwrap_or_default()));
                done.count(&item.source, "parked");
            }
            Mapped::Retry { reason } => {
                // Rule, lookup and table names only: no payload values.
                tracing::warn!(source = %item.source, %reason, "lookup failed; the payload is retried later");
            }
            Mapped::Events { events, .. } => {
                match ingestor.check(serde_json::Value::Array(events.clone()), received_at) {
                    Ok(()) => ready.push((item, events)),
                    Err(err) => {
                        done.count(&item.source, "parked");
                        done.record(item.id, Err(err));
                    }
                }
            }
        }
    }

    let mut batch: Vec<(InboxItem, Vec<serde_json::Value>)> = Vec::new();
    let mut n_events = 0;
    for (item, events) in ready {
        if n_events + events.len() > crate::domain::MAX_EVENTS_PER_REQUEST && !batch.is_empty() {
            ingest_together(ingestor, std::mem::take(&mut batch), done).await;
            n_events = 0;
        }
        n_events += events.len();
        batch.push((item, events));
    }
    if !batch.is_empty() {
        ingest_together(ingestor, batch, done).await;
    }
}

/// Stores the events of several checked payloads in one request; should that fail for another
/// reason than storage (two payloads giving the same event twice, say), one by one instead.
async fn ingest_together(
    ingestor: &Ingestor,
    batch: Vec<(InboxItem, Vec<serde_json::Value>)>,
    done: &mut Finished,
) {
    let all: Vec<serde_json::Value> = batch
        .iter()
        .flat_map(|(_, events)| events.iter().cloned())
        .collect();
    match ingestor
        .ingest(serde_json::Value::Array(all), now_ms() / 1000)
        .await
    {
        Ok(_) => {
            for (item, _) in batch {
                done.count(&item.source, "mapped");
                done.stored.push(item.id);
            }
        }
        // Left leased: retried once the lease expires, nothing is lost.
        Err(IngestError::Store(err)) => done.failed = Some(err),
        Err(_) => {
            for (item, events) in batch {
                let result = ingestor
                    .ingest(serde_json::Value::Array(events), now_ms() / 1000)
                    .await
                    .map(|_| ());
                match &result {
                    Ok(()) => done.count(&item.source, "mapped"),
                    Err(IngestError::Store(_)) => {}
                    Err(_) => done.count(&item.source, "parked"),
                }
                done.record(item.id, result);
            }
        }
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
