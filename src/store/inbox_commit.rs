//! Group commit for webhook sources: concurrent payloads share one transaction (one fsync), as
//! events do in [`super::GroupCommit`], so a burst of database webhooks is acknowledged at the
//! disk's pace per batch, not per payload.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{SourcePayload, Store, StoreError};

/// Most payloads written in one transaction.
const MAX_PER_COMMIT: usize = 512;

type Reply = oneshot::Sender<Result<Option<i64>, String>>;

/// A handle that submits payloads to the single committing task.
#[derive(Clone)]
pub struct InboxCommit {
    sender: mpsc::Sender<(SourcePayload, Reply)>,
}

impl InboxCommit {
    /// Starts the committing task; it stops when every handle is dropped.
    pub fn start(store: Arc<dyn Store>, clock: fn() -> i64) -> Self {
        let (sender, receiver) = mpsc::channel(1024);
        tokio::spawn(run(store, receiver, clock));
        Self { sender }
    }

    /// Queues `payload` durably; resolves after the commit that includes it, with the inbox
    /// row, or `None` when its delivery id was already queued.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the commit failed or the task is gone.
    pub async fn enqueue(&self, payload: SourcePayload) -> Result<Option<i64>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send((payload, reply))
            .await
            .map_err(|_| StoreError::Unavailable("the inbox commit task has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the inbox commit task has stopped".into()))?
            .map_err(StoreError::Unavailable)
    }
}

async fn run(
    store: Arc<dyn Store>,
    mut receiver: mpsc::Receiver<(SourcePayload, Reply)>,
    clock: fn() -> i64,
) {
    while let Some(first) = receiver.recv().await {
        // Whatever arrived while the previous commit ran goes into this one.
        let mut batch = vec![first];
        while batch.len() < MAX_PER_COMMIT {
            match receiver.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (payloads, replies): (Vec<SourcePayload>, Vec<Reply>) = batch.into_iter().unzip();
        match store.enqueue_source_payloads(&payloads, clock()).await {
            Ok(ids) => {
                for (reply, id) in replies.into_iter().zip(ids) {
                    let _ = reply.send(Ok(id));
                }
            }
            Err(err) => {
                let message = err.to_string();
                for reply in replies {
                    let _ = reply.send(Err(message.clone()));
                }
            }
        }
    }
}
