//! Whether writes are succeeding, for `/readyz`: a store that can be read but not written (a
//! full disk, a broken writer connection) must not report itself healthy.

use std::sync::{Arc, Mutex};

/// The outcome of the latest write transaction, shared by a store's clones.
#[derive(Debug, Clone, Default)]
pub struct WriteHealth {
    /// Why the latest write failed; `None` once one succeeds again.
    failure: Arc<Mutex<Option<String>>>,
}

impl WriteHealth {
    /// A write transaction committed.
    pub fn succeeded(&self) {
        if let Ok(mut failure) = self.failure.lock() {
            if failure.take().is_some() {
                tracing::info!("storage writes succeed again");
            }
        }
    }

    /// A write transaction failed (its statements or its commit). `reason` is the driver's
    /// message, which names the condition (`database or disk is full`), never a value.
    pub fn failed(&self, reason: &str) {
        if let Ok(mut failure) = self.failure.lock() {
            *failure = Some(reason.to_owned());
        }
    }

    /// Why writes are failing, if the latest one did.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }
}
