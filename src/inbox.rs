//! The inbox worker: takes raw payloads that a database queued (Postgres `enqueue()`, called
//! inside the user's own transaction) and runs them through exactly the same pipeline as HTTP
//! events ([`Ingestor`]). A payload whose events are stored is deleted from the inbox; one that
//! breaks a rule stays there as `invalid` with its problems, visible and replayable after a fix
//! (`capi-bridge replay --inbox`). Nothing is dropped.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::delivery::now_ms;
use crate::ingest::{with_stable_event_ids, IngestError, Ingestor};
use crate::store::{Notice, Store, StoreError};

/// Payloads taken per pass.
const BATCH: usize = 200;

/// How long a taken payload belongs to this worker; another instance retries it after that.
const LEASE: Duration = Duration::from_secs(60);

/// Runs until `shutdown`: processes what is in the inbox, then waits for `wake` (signalled on
/// Postgres `NOTIFY` by [`relay_notices`]) or `poll_interval`.
pub async fn run(
    store: Arc<dyn Store>,
    ingestor: Ingestor,
    wake: Arc<Notify>,
    poll_interval: Duration,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let worked = match process_once(store.as_ref(), &ingestor).await {
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
pub async fn process_once(store: &dyn Store, ingestor: &Ingestor) -> Result<usize, StoreError> {
    let now = now_ms();
    let lease_ms = i64::try_from(LEASE.as_millis()).unwrap_or(i64::MAX);
    let items = store.claim_inbox(BATCH, now, now + lease_ms).await?;
    if items.is_empty() {
        return Ok(0);
    }
    let n_items = items.len();
    // Concurrently: the group commit then stores them in a few transactions, not one each.
    let mut tasks = tokio::task::JoinSet::new();
    for item in items {
        let ingestor = ingestor.clone();
        tasks.spawn(async move {
            let body = with_stable_event_ids(item.payload.clone(), &format!("inbox-{}", item.id));
            let result = ingestor.ingest(body, now_ms() / 1000).await;
            (item.id, result)
        });
    }
    let mut stored = Vec::new();
    let mut invalid = Vec::new();
    let mut failed = None;
    while let Some(joined) = tasks.join_next().await {
        let Ok((id, result)) = joined else {
            continue;
        };
        match result {
            Ok(_) => stored.push(id),
            Err(IngestError::Invalid(problems)) => {
                invalid.push((id, serde_json::to_value(&problems).unwrap_or_default()));
            }
            Err(IngestError::BadRequest(reason) | IngestError::TooMany(reason)) => {
                invalid.push((id, json!([{ "field": "", "reason": reason }])));
            }
            // Left leased: retried once the lease expires, nothing is lost.
            Err(IngestError::Store(err)) => failed = Some(err),
        }
    }
    store.finish_inbox(&stored, &invalid, now_ms()).await?;
    if !invalid.is_empty() {
        tracing::warn!(
            n_invalid = invalid.len(),
            "inbox payloads break Meta's rules; kept as invalid with their problems"
        );
    }
    match failed {
        Some(err) => Err(err),
        None => Ok(n_items),
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
