//! Per-source counters (received, duplicate, unmatched…), added up in memory and written once
//! a second: counting must not cost every webhook a transaction of its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::{SourceCount, Store};

/// How often counts are written.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Counts waiting to be written; cheap to clone.
#[derive(Clone)]
pub struct SourceCounters {
    store: Arc<dyn Store>,
    pending: Arc<Mutex<HashMap<(String, &'static str), u64>>>,
}

impl SourceCounters {
    /// Counters written to `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            pending: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Adds `n` to `source`'s `outcome`.
    pub fn add(&self, source: &str, outcome: &'static str, n: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        *pending.entry((source.to_owned(), outcome)).or_default() += n;
    }

    /// Writes what was counted; kept for the next try when storage fails.
    pub async fn flush(&self, now: i64) {
        let taken: Vec<SourceCount> = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending
                .drain()
                .map(|((source, outcome), count)| SourceCount {
                    source,
                    outcome,
                    count,
                })
                .collect()
        };
        if taken.is_empty() {
            return;
        }
        if let Err(err) = self.store.count_source_outcomes(&taken, now).await {
            tracing::warn!(error = %err, "could not update source counters; retrying");
            for count in taken {
                self.add(&count.source, count.outcome, count.count);
            }
        }
    }

    /// Flushes every second until `shutdown`, then once more.
    pub async fn run(&self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(FLUSH_INTERVAL) => {}
            }
            self.flush(crate::delivery::now_ms()).await;
        }
        self.flush(crate::delivery::now_ms()).await;
    }
}
