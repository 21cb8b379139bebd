//! Match-key memory (issue 4): remembers, per person, the hashed match keys and the browser
//! identifiers (`fbc`, `fbp`, IP address, user agent) of accepted events, and fills them into
//! later events about the same person that lack them, such as a CRM Purchase days after the
//! landing-page Lead. What is remembered, under which identities, and what may be filled where
//! are the pure rules of [`crate::domain::match_keys`]; this module only reads and writes them.
//!
//! Cost per request: one read for the identities of all its events (on SQLite from the read
//! pool, beside the writer), and no write of its own: the values to remember ride in the
//! request's group commit ([`crate::store::GroupCommit::insert_remembering`]). Memory is an
//! enhancement, so a failed read only means the events go as they came.

use std::collections::HashMap;
use std::sync::Arc;

use crate::domain::match_keys::{self, MatchField, MemoryRules, Remembered};
use crate::domain::NormalizedEvent;
use crate::store::{MatchKeyRow, Store};

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// Reads and writes the match-key memory for the [`crate::ingest::Ingestor`].
#[derive(Clone)]
pub struct MatchKeyMemory {
    store: Arc<dyn Store>,
    rules: MemoryRules,
}

/// What the memory did to the events of one request.
#[derive(Debug, Default)]
pub struct Recall {
    /// Per event, in request order, the `user_data` fields filled from memory.
    pub filled: Vec<Vec<&'static str>>,
    /// What to remember, written with the events (`GroupCommit::insert_remembering`).
    pub remember: Vec<MatchKeyRow>,
}

impl MatchKeyMemory {
    /// A memory keeping values for `days` days (`MATCH_KEY_MEMORY_DAYS`); `None` for 0, which
    /// turns the feature off.
    pub fn new(store: Arc<dyn Store>, days: u64) -> Option<Self> {
        if days == 0 {
            return None;
        }
        let lifetime_ms = i64::try_from(days)
            .unwrap_or(i64::MAX)
            .saturating_mul(DAY_MS);
        Some(Self {
            store,
            rules: MemoryRules { lifetime_ms },
        })
    }

    /// Fills into `events` (normalized, in request order) what they lack and the memory holds
    /// about their people, and returns what was filled and what to remember. Events later in
    /// the request see what earlier ones will remember.
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
            match self.store.recall_match_keys(&wanted, now_ms).await {
                Ok(rows) => {
                    for row in rows {
                        if let Some(value) = remembered(&row) {
                            known.entry(row.identity).or_default().push(value);
                        }
                    }
                }
                // Ids and the error only: never values.
                Err(err) => tracing::warn!(
                    error = %err,
                    identities = wanted.len(),
                    "match-key memory unavailable; events go without it"
                ),
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
                recall.remember.push(MatchKeyRow {
                    identity: identity.clone(),
                    field: value.field.as_str().to_owned(),
                    value: value.value.to_string(),
                    seen_at: value.seen_at,
                    expires_at: value.expires_at,
                });
                known.entry(identity).or_default().push(value);
            }
        }
        recall
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
