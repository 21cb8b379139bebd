//! Group commit: concurrent ingest requests share one transaction (and one fsync), so durable
//! acknowledgement costs one disk flush per batch of requests rather than one per event.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{InsertOutcome, NewEventRecord, Store, StoreError};

/// Most events written in one transaction.
const MAX_EVENTS_PER_COMMIT: usize = 4096;

type Reply = oneshot::Sender<Result<Vec<InsertOutcome>, String>>;

/// A handle that submits events to the single committing task.
#[derive(Clone)]
pub struct GroupCommit {
    sender: mpsc::Sender<(Vec<NewEventRecord>, Reply)>,
}

impl GroupCommit {
    /// Starts the committing task. It stops when every handle is dropped, after committing
    /// what it has.
    pub fn start(store: Arc<dyn Store>, clock: fn() -> i64) -> Self {
        let (sender, receiver) = mpsc::channel(1024);
        tokio::spawn(run(store, receiver, clock));
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
        match store.insert_events(&all, clock()).await {
            Ok(outcomes) => {
                let mut outcomes = outcomes.into_iter();
                for (n, reply) in replies {
                    let mine: Vec<InsertOutcome> = outcomes.by_ref().take(n).collect();
                    // The requester may have gone away (client hung up); the events are stored.
                    let _ = reply.send(Ok(mine));
                }
            }
            Err(err) => {
                tracing::error!(error = %err, n_events, "group commit failed");
                for (_, reply) in replies {
                    let _ = reply.send(Err(err.to_string()));
                }
            }
        }
    }
}
