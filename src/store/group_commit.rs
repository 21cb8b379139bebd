//! Group commit: concurrent ingest requests share one transaction (and one fsync), so durable
//! acknowledgement costs one disk flush per batch of requests rather than one per event.
//!
//! With a [`Handoff`], freshly queued events are stored already leased to this process and
//! passed straight to its delivery workers, which then need no claim round trip through the
//! database. When the workers' inbox is full or delivery is paused, events are stored unleased
//! and the workers find them by polling, as after a restart.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::{ClaimedEvent, InsertOutcome, NewEventRecord, Store, StoreError};

/// Most events written in one transaction.
const MAX_EVENTS_PER_COMMIT: usize = 4096;

type Reply = oneshot::Sender<Result<Vec<InsertOutcome>, String>>;

/// Where freshly committed events go when delivery can take them at once.
#[derive(Clone)]
pub struct Handoff {
    /// The delivery workers' inbox: one message per commit.
    pub inbox: mpsc::UnboundedSender<Vec<ClaimedEvent>>,
    /// Free event slots in the inbox: it is bounded in events, not messages, because commits
    /// range from one event to thousands. Workers give slots back as they take events.
    pub room: Arc<Semaphore>,
    /// False while delivery is paused or throttled: events then wait in the database.
    pub accepting: Arc<AtomicBool>,
    /// How long handed-off events stay leased to this process.
    pub lease: Duration,
}

/// Each pixel's [`Handoff`] by pixel id (none in dry-run or for tools that do not deliver).
pub type Handoffs = Vec<(String, Handoff)>;

/// A handle that submits events to the single committing task.
#[derive(Clone)]
pub struct GroupCommit {
    sender: mpsc::Sender<(Vec<NewEventRecord>, Reply)>,
}

impl GroupCommit {
    /// Starts the committing task. It stops when every handle is dropped, after committing
    /// what it has.
    pub fn start(store: Arc<dyn Store>, clock: fn() -> i64, handoffs: Handoffs) -> Self {
        let (sender, receiver) = mpsc::channel(1024);
        tokio::spawn(run(store, receiver, clock, handoffs));
        Self { sender }
    }

    /// Stores `events` durably; resolves after the commit that includes them.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the commit failed or the task is gone.
    pub async fn insert(
        &self,
        events: Vec<NewEventRecord>,
    ) -> Result<Vec<InsertOutcome>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send((events, reply))
            .await
            .map_err(|_| StoreError::Unavailable("the commit task has stopped".to_owned()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the commit task has stopped".to_owned()))?
            .map_err(StoreError::Unavailable)
    }
}

async fn run(
    store: Arc<dyn Store>,
    mut receiver: mpsc::Receiver<(Vec<NewEventRecord>, Reply)>,
    clock: fn() -> i64,
    handoffs: Handoffs,
) {
    while let Some(first) = receiver.recv().await {
        let mut pending = vec![first];
        let mut n_events = pending[0].0.len();
        // Take whatever else is already waiting; never wait for more (no added latency).
        while n_events < MAX_EVENTS_PER_COMMIT {
            match receiver.try_recv() {
                Ok(next) => {
                    n_events += next.0.len();
                    pending.push(next);
                }
                Err(_) => break,
            }
        }
        let mut all = Vec::with_capacity(n_events);
        let mut replies = Vec::with_capacity(pending.len());
        for (events, reply) in pending {
            replies.push((events.len(), reply));
            all.extend(events);
        }

        // Reserve room in each pixel's inbox before committing, so that every event stored
        // as leased is certain to reach a worker. A pixel that is paused or full gets its
        // events stored unleased; the others are not held up by it.
        let now = clock();
        let mut reserved: Vec<(&Handoff, OwnedSemaphorePermit, Vec<usize>)> = Vec::new();
        for (pixel_id, handoff) in &handoffs {
            let mine: Vec<usize> = all
                .iter()
                .enumerate()
                .filter(|(_, e)| !e.dry_run && e.pixel_id == *pixel_id)
                .map(|(i, _)| i)
                .collect();
            if mine.is_empty() || !handoff.accepting.load(Ordering::Relaxed) {
                continue;
            }
            let Ok(n) = u32::try_from(mine.len()) else {
                continue;
            };
            if let Ok(slots) = handoff.room.clone().try_acquire_many_owned(n) {
                let lease_until = now
                    .saturating_add(i64::try_from(handoff.lease.as_millis()).unwrap_or(i64::MAX));
                for &i in &mine {
                    all[i].lease_until = Some(lease_until);
                }
                reserved.push((handoff, slots, mine));
            }
        }

        match store.insert_events(&all, now).await {
            Ok(results) => {
                store.write_health().succeeded();
                // Hand off before answering, so that by the time ingest wakes a worker the
                // events are already in its inbox.
                let mut stored: Vec<Option<NewEventRecord>> = all.into_iter().map(Some).collect();
                for (handoff, slots, mine) in reserved {
                    // The slots now belong to the handed events; duplicates give theirs back.
                    // (Dropped unforgotten, as on a failed commit, they return to the room.)
                    slots.forget();
                    let handed: Vec<ClaimedEvent> = mine
                        .iter()
                        .filter_map(|&i| {
                            let result = results.get(i)?;
                            match (result.outcome, result.row_id) {
                                (InsertOutcome::Queued, Some(row_id)) => {
                                    let event = stored.get_mut(i)?.take()?;
                                    Some(ClaimedEvent {
                                        row_id,
                                        event_id: event.event_id,
                                        payload: event.payload,
                                        test_event_code: event.test_event_code,
                                        attempts: 1,
                                        deadline_at: event.deadline_at,
                                    })
                                }
                                _ => None,
                            }
                        })
                        .collect();
                    handoff.room.add_permits(mine.len() - handed.len());
                    if !handed.is_empty() && handoff.inbox.send(handed).is_err() {
                        // Delivery has stopped (shutdown): the events stay leased in storage
                        // and are sent when the lease expires.
                        tracing::debug!(
                            "delivery inbox closed; handed-off events wait for their lease"
                        );
                    }
                }
                let mut outcomes = results.iter().map(|r| r.outcome);
                for (n, reply) in replies {
                    let mine: Vec<InsertOutcome> = outcomes.by_ref().take(n).collect();
                    // The requester may have gone away (client hung up); the events are stored.
                    let _ = reply.send(Ok(mine));
                }
            }
            Err(err) => {
                tracing::error!(error = %err, n_events, "group commit failed");
                store.write_health().failed(&err.to_string());
                for (_, reply) in replies {
                    let _ = reply.send(Err(err.to_string()));
                }
            }
        }
    }
}
