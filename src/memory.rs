//! Match-key memory (issue 4): remembers, per person, the hashed match keys and the browser
//! identifiers (`fbc`, `fbp`, IP address, user agent) of accepted events, and fills them into
//! later events about the same person that lack them, such as a CRM Purchase days after the
//! landing-page Lead. What is remembered, under which identities, and what may be filled where
//! are the pure rules of [`crate::domain::match_keys`]; this module reads and writes them.
//!
//! Cost per request: a share of one read (the identities of all concurrent requests are read
//! in one query, on SQLite from the read pool beside the writer) and no write on the request's
//! path. What a request remembers is kept here, where the next request already sees it, and
//! written behind, every [`FLUSH_INTERVAL`], in key order and short slices. (Written with the
//! events instead, every group commit paid for a random page of the memory's index per new
//! person, which cut ingest on SQLite to a third.) What has not been written when the process
//! dies is lost: memory is an enhancement, never a condition for accepting an event, so a
//! failed read or write only means events go as they came.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::domain::match_keys::{self, MatchField, MemoryRules, Remembered};
use crate::domain::NormalizedEvent;
use crate::store::{MatchKeyRow, Store, StoreError};

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// How often remembered values are written.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Values written per transaction: short enough that the events' commits, which share
/// SQLite's single writer, never wait long behind one.
const FLUSH_SLICE: usize = 500;

/// Values kept waiting at most (while storage is unavailable); beyond that new ones are
/// dropped.
const MAX_PENDING: usize = 200_000;

/// Identities looked up in one read at most.
const MAX_IDENTITIES_PER_READ: usize = 4096;

/// The identities one request looks up, when, and where the rows go.
type Lookup = (
    Vec<String>,
    i64,
    oneshot::Sender<Result<Vec<MatchKeyRow>, String>>,
);

/// Per identity, the newest value of each field (a handful: a small vector beats a map).
type Values = HashMap<String, Vec<Remembered>>;

/// Reads and writes the match-key memory for the [`crate::ingest::Ingestor`].
#[derive(Clone)]
pub struct MatchKeyMemory {
    store: Arc<dyn Store>,
    /// The task that reads for all concurrent requests at once.
    lookups: mpsc::Sender<Lookup>,
    rules: MemoryRules,
    pending: Arc<Mutex<Pending>>,
    /// One flush at a time.
    flushing: Arc<tokio::sync::Mutex<()>>,
}

/// Remembered values not yet written.
#[derive(Default)]
struct Pending {
    /// Waiting for the next flush.
    waiting: Values,
    /// Being written by the current flush (still recalled from here until it has committed).
    writing: Arc<Values>,
    /// How many values `waiting` holds.
    n_waiting: usize,
    /// Values dropped because too many were waiting.
    dropped: u64,
}

/// What the memory did to the events of one request.
#[derive(Debug, Default)]
pub struct Recall {
    /// Per event, in request order, the `user_data` fields filled from memory.
    pub filled: Vec<Vec<&'static str>>,
    /// What to remember once the events are stored ([`MatchKeyMemory::remember`]).
    pub remember: Vec<(String, Remembered)>,
}

impl MatchKeyMemory {
    /// A memory keeping values for `days` days (`MATCH_KEY_MEMORY_DAYS`), and its reading
    /// task; `None` for 0, which turns the feature off. Values are written by
    /// [`MatchKeyMemory::run`] and [`MatchKeyMemory::flush`].
    pub fn start(store: Arc<dyn Store>, days: u64) -> Option<Self> {
        if days == 0 {
            return None;
        }
        let lifetime_ms = i64::try_from(days)
            .unwrap_or(i64::MAX)
            .saturating_mul(DAY_MS);
        let (lookups, receiver) = mpsc::channel(1024);
        tokio::spawn(read_for_everyone(store.clone(), receiver));
        Some(Self {
            store,
            lookups,
            rules: MemoryRules { lifetime_ms },
            pending: Arc::new(Mutex::new(Pending::default())),
            flushing: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// Fills into `events` (normalized, in request order) what they lack and the memory holds
    /// about their people, and returns what was filled and what to remember. Events later in
    /// the request see what earlier ones remember.
    pub async fn recall_and_fill(&self, events: &mut [NormalizedEvent], now_ms: i64) -> Recall {
        let identities: Vec<Vec<String>> = events
            .iter()
            .map(|event| match_keys::identities(&event.payload))
            .collect();
        let mut wanted: Vec<String> = identities.iter().flatten().cloned().collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mut known: HashMap<String, Vec<Remembered>> = HashMap::new();
        if !wanted.is_empty() {
            match self.read(wanted.clone(), now_ms).await {
                Ok(rows) => {
                    for row in rows {
                        if let Some(value) = remembered(&row) {
                            known.entry(row.identity).or_default().push(value);
                        }
                    }
                }
                // Counts and the error only: never values.
                Err(err) => tracing::warn!(
                    error = %err,
                    identities = wanted.len(),
                    "match-key memory unavailable; events go without it"
                ),
            }
            let pending = self.pending();
            for identity in &wanted {
                for values in [&pending.waiting, pending.writing.as_ref()] {
                    if let Some(fields) = values.get(identity) {
                        known
                            .entry(identity.clone())
                            .or_default()
                            .extend(fields.iter().cloned());
                    }
                }
            }
        }

        let mut recall = Recall {
            filled: Vec::with_capacity(events.len()),
            remember: Vec::new(),
        };
        for (event, identities) in events.iter_mut().zip(identities) {
            let recalled: Vec<Remembered> = identities
                .iter()
                .filter_map(|identity| known.get(identity))
                .flatten()
                .cloned()
                .collect();
            let recollection = match_keys::recall_and_fill(
                &mut event.payload,
                event.action_source,
                event.event_time,
                &recalled,
                &self.rules,
            );
            let filled: Vec<&'static str> =
                recollection.filled.iter().map(|f| f.as_str()).collect();
            event
                .match_keys
                .extend(filled.iter().map(|f| (*f).to_owned()));
            recall.filled.push(filled);
            for (identity, value) in recollection.remember {
                let stored = known.get(&identity).and_then(|values| {
                    values
                        .iter()
                        .filter(|v| v.field == value.field)
                        .max_by_key(|v| v.seen_at)
                });
                if match_keys::worth_writing(stored, &value) {
                    known
                        .entry(identity.clone())
                        .or_default()
                        .push(value.clone());
                    recall.remember.push((identity, value));
                }
            }
        }
        recall
    }

    /// Keeps `values` (from [`Recall::remember`], once their events are stored) for the next
    /// flush; the next request already recalls them.
    pub fn remember(&self, values: Vec<(String, Remembered)>) {
        if values.is_empty() {
            return;
        }
        let mut pending = self.pending();
        for (identity, value) in values {
            if pending.n_waiting >= MAX_PENDING {
                pending.dropped += 1;
                continue;
            }
            let fields = pending.waiting.entry(identity).or_default();
            match fields.iter_mut().find(|kept| kept.field == value.field) {
                Some(kept) if kept.seen_at > value.seen_at => {}
                Some(kept) => *kept = value,
                None => {
                    fields.push(value);
                    pending.n_waiting += 1;
                }
            }
        }
    }

    /// Writes what is waiting, in key order and slices of about 500 values (`FLUSH_SLICE`; each
    /// its own transaction); returns how many values were written. What could not be written
    /// waits for the next flush.
    ///
    /// # Errors
    /// The storage error that stopped the flush.
    pub async fn flush(&self) -> Result<usize, StoreError> {
        let _one_at_a_time = self.flushing.lock().await;
        let (writing, dropped) = {
            let mut pending = self.pending();
            let writing = Arc::new(std::mem::take(&mut pending.waiting));
            pending.n_waiting = 0;
            pending.writing = writing.clone();
            (writing, std::mem::take(&mut pending.dropped))
        };
        if dropped > 0 {
            tracing::warn!(dropped, "match-key memory was full; values dropped");
        }
        // Key order: consecutive slices cover disjoint key ranges, so a page of the index is
        // written about once per flush however many people it holds.
        let mut entries: Vec<(&String, &Vec<Remembered>)> = writing.iter().collect();
        entries.sort_unstable_by_key(|(identity, _)| *identity);
        let mut written = 0;
        let mut failure = None;
        let mut rows: Vec<MatchKeyRow> = Vec::with_capacity(FLUSH_SLICE + 16);
        let mut entries = entries.into_iter().peekable();
        while entries.peek().is_some() {
            rows.clear();
            while rows.len() < FLUSH_SLICE {
                let Some((identity, values)) = entries.next() else {
                    break;
                };
                rows.extend(values.iter().map(|value| MatchKeyRow {
                    identity: identity.clone(),
                    field: value.field.as_str().to_owned(),
                    value: value.value.to_string(),
                    seen_at: value.seen_at,
                    expires_at: value.expires_at,
                }));
            }
            match self.store.remember_match_keys(&rows).await {
                Ok(()) => written += rows.len(),
                Err(err) => {
                    failure = Some(err);
                    break;
                }
            }
        }
        self.pending().writing = Arc::new(Values::new());
        match failure {
            None => Ok(written),
            Some(err) => {
                // Everything goes back (rewriting what was written is harmless); newer values
                // remembered meanwhile win.
                let unwritten = writing
                    .iter()
                    .flat_map(|(identity, values)| {
                        values.iter().map(|value| (identity.clone(), value.clone()))
                    })
                    .collect();
                self.remember(unwritten);
                Err(err)
            }
        }
    }

    /// Flushes every [`FLUSH_INTERVAL`] until `shutdown`. Call [`MatchKeyMemory::flush`] once
    /// more after the last request has been served.
    pub async fn run(&self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(FLUSH_INTERVAL) => {}
            }
            if let Err(err) = self.flush().await {
                tracing::warn!(error = %err, "could not write the match-key memory; retrying");
            }
        }
    }

    /// The stored rows of `identities`, read together with those of concurrent requests.
    async fn read(&self, identities: Vec<String>, now_ms: i64) -> Result<Vec<MatchKeyRow>, String> {
        let (reply, answer) = oneshot::channel();
        let gone = || "the match-key reading task has stopped".to_owned();
        self.lookups
            .send((identities, now_ms, reply))
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves consistent maps (every update is one insert).
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Serves lookups as group commit serves inserts: takes every request waiting, reads their
/// identities in one query, hands each its rows. One read per batch of concurrent requests
/// instead of one per request; it stops when every [`MatchKeyMemory`] is dropped.
async fn read_for_everyone(store: Arc<dyn Store>, mut receiver: mpsc::Receiver<Lookup>) {
    while let Some(first) = receiver.recv().await {
        let mut n_identities = first.0.len();
        let mut batch = vec![first];
        while n_identities < MAX_IDENTITIES_PER_READ {
            match receiver.try_recv() {
                Ok(next) => {
                    n_identities += next.0.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let mut wanted: Vec<String> = batch.iter().flat_map(|l| l.0.iter().cloned()).collect();
        wanted.sort_unstable();
        wanted.dedup();
        // The earliest `now`: a row alive for any of the requests is read.
        let now_ms = batch.iter().map(|l| l.1).min().unwrap_or_default();
        match store.recall_match_keys(&wanted, now_ms).await {
            Ok(rows) => {
                let mut by_identity: HashMap<&str, Vec<&MatchKeyRow>> = HashMap::new();
                for row in &rows {
                    by_identity
                        .entry(row.identity.as_str())
                        .or_default()
                        .push(row);
                }
                for (identities, _, reply) in batch {
                    let mine = identities
                        .iter()
                        .filter_map(|identity| by_identity.get(identity.as_str()))
                        .flatten()
                        .map(|row| (*row).clone())
                        .collect();
                    // The requester may have gone away (client hung up).
                    let _ = reply.send(Ok(mine));
                }
            }
            Err(err) => {
                let err = err.to_string();
                for (_, _, reply) in batch {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }
}

/// A stored row as the domain sees it; `None` for a row that is not one (written by hand).
fn remembered(row: &MatchKeyRow) -> Option<Remembered> {
    Some(Remembered {
        field: MatchField::parse(&row.field)?,
        value: serde_json::from_str(&row.value).ok()?,
        seen_at: row.seen_at,
        expires_at: row.expires_at,
    })
}
