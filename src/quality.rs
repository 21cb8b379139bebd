//! Match quality (issue 6): per event name, the share of stored events carrying each match key,
//! how many had it filled in by the match-key memory, and the values the normalizer dropped
//! (by field and reason, never the value). [`QualityCounters`] adds them up in memory as
//! events are stored and writes them once a second (like the source counters); [`report`]
//! reads them back for `GET /v1/quality` and the dashboard, with Meta's own Event Match
//! Quality beside ours when the token may read it ([`MetaQuality`]).

use std::collections::hash_map::Entry;
use std::collections::{btree_map, BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::api::error::EventProblem;
use crate::delivery::{GraphClient, MetaEventQuality};
use crate::domain::quality::{self, MatchKey, MatchKeys};
use crate::domain::{NormalizedEvent, Warning};
use crate::store::{DropCount, InsertOutcome, QualityCount, Store, StoreError};

/// How often counts are written.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// How long Meta's answer (or refusal) is reused: the Dataset Quality API is slow-moving and
/// rate-limited, and a dashboard may be reloaded often.
const META_CACHE_TTL: Duration = Duration::from_secs(300);

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

type CountKey = (i64, String, String);
type DropKey = (i64, String, String, String, String);

#[derive(Default)]
struct Pending {
    counts: HashMap<CountKey, QualityCount>,
    drops: HashMap<DropKey, i64>,
}

/// Match-quality counts waiting to be written; cheap to clone.
#[derive(Clone)]
pub struct QualityCounters {
    store: Arc<dyn Store>,
    pending: Arc<Mutex<Pending>>,
}

impl QualityCounters {
    /// Counters written to `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            pending: Arc::new(Mutex::new(Pending::default())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Plain counters: a panic while holding the lock cannot leave them inconsistent.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts the events of one request once stored (duplicates are not counted again):
    /// `events` as stored (after the memory filled them), `filled` the fields the memory
    /// filled per event, `warnings` the values dropped, `outcomes` per event.
    pub fn record(
        &self,
        pixel_ids: &[String],
        now_ms: i64,
        events: &[NormalizedEvent],
        filled: &[Vec<&'static str>],
        warnings: &[EventProblem],
        outcomes: &[InsertOutcome],
    ) {
        let day = now_ms.div_euclid(DAY_MS);
        let stored = |i: usize| {
            outcomes
                .get(i)
                .is_some_and(|o| *o != InsertOutcome::Duplicate)
        };
        // Worked out before taking the lock that concurrent requests share.
        let pixel_of = |i: usize| pixel_ids.get(i).map_or("", String::as_str);
        let keys: Vec<(&str, &str, MatchKeys, MatchKeys)> = events
            .iter()
            .enumerate()
            .filter(|(i, _)| stored(*i))
            .map(|(i, event)| {
                let carries = quality::carried(&event.payload);
                let fields = filled.get(i).map(Vec::as_slice).unwrap_or_default();
                (
                    pixel_of(i),
                    event.event_name.as_str(),
                    carries,
                    quality::filled(fields, carries),
                )
            })
            .collect();
        let dropped: Vec<(&str, &str, quality::Dropped)> = warnings
            .iter()
            .filter(|w| stored(w.event_index))
            .filter_map(|w| {
                let event = events.get(w.event_index)?;
                let warning = Warning {
                    field: w.field.clone(),
                    reason: w.reason.clone(),
                };
                Some((
                    pixel_of(w.event_index),
                    event.event_name.as_str(),
                    quality::dropped(&warning),
                ))
            })
            .collect();
        let mut pending = self.lock();
        for (pixel_id, event_name, carries, from_memory) in keys {
            let count = pending
                .counts
                .entry((day, pixel_id.to_owned(), event_name.to_owned()))
                .or_insert_with(|| QualityCount {
                    day,
                    pixel_id: pixel_id.to_owned(),
                    event_name: event_name.to_owned(),
                    ..QualityCount::default()
                });
            count.events += 1;
            for key in carries.iter() {
                count.carried[key.index()] += 1;
            }
            for key in from_memory.iter() {
                count.filled[key.index()] += 1;
            }
        }
        for (pixel_id, event_name, dropped) in dropped {
            let key = (
                day,
                pixel_id.to_owned(),
                event_name.to_owned(),
                dropped.field,
                dropped.reason,
            );
            *pending.drops.entry(key).or_default() += 1;
        }
    }

    /// Writes what was counted; kept for the next try when storage fails.
    pub async fn flush(&self) {
        let taken = std::mem::take(&mut *self.lock());
        if taken.counts.is_empty() && taken.drops.is_empty() {
            return;
        }
        let counts: Vec<QualityCount> = taken.counts.values().cloned().collect();
        let drops: Vec<DropCount> = taken
            .drops
            .iter()
            .map(
                |((day, pixel_id, event_name, field, reason), count)| DropCount {
                    day: *day,
                    pixel_id: pixel_id.clone(),
                    event_name: event_name.clone(),
                    field: field.clone(),
                    reason: reason.clone(),
                    count: *count,
                },
            )
            .collect();
        if let Err(err) = self.store.count_match_quality(&counts, &drops).await {
            tracing::warn!(error = %err, "could not write match-quality counters; retrying");
            let mut pending = self.lock();
            for (key, count) in taken.counts {
                match pending.counts.entry(key) {
                    Entry::Occupied(mut kept) => add(kept.get_mut(), &count),
                    Entry::Vacant(slot) => {
                        slot.insert(count);
                    }
                }
            }
            for (key, n) in taken.drops {
                *pending.drops.entry(key).or_default() += n;
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
            self.flush().await;
        }
        self.flush().await;
    }
}

/// Adds `more`'s counts to `total`.
fn add(total: &mut QualityCount, more: &QualityCount) {
    total.events += more.events;
    for i in 0..total.carried.len() {
        total.carried[i] += more.carried[i];
        total.filled[i] += more.filled[i];
    }
}

/// What `GET /v1/quality` answers and the dashboard shows.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct QualityReport {
    /// Unix ms: counted from the start of this UTC day on.
    pub since_ms: i64,
    /// Per pixel and event name, most events first.
    pub events: Vec<EventQuality>,
    /// Values the normalizer dropped, most first.
    pub dropped: Vec<DroppedValues>,
    /// Meta's own Event Match Quality, per pixel.
    pub meta: Vec<MetaPixelQuality>,
}

/// Our view of one event name's match keys.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EventQuality {
    /// Pixel.
    pub pixel_id: String,
    /// Event name.
    pub event_name: String,
    /// Events stored.
    pub events: i64,
    /// One entry per match key, in [`MatchKey::ALL`] order.
    pub keys: Vec<KeyShare>,
}

/// How often one match key was there.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct KeyShare {
    /// `em`, `ph`, `fn_ln`, `external_id`, `fbc`, `fbp`, `ip`, `user_agent` or `lead_id`.
    #[schema(value_type = String)]
    pub key: MatchKey,
    /// Events carrying it.
    pub events: i64,
    /// `events` / all events of the name, 0 to 1.
    pub share: f64,
    /// Of those, events that had it filled in by the match-key memory.
    pub filled_from_memory: i64,
}

/// Dropped values of one event name, field and reason.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DroppedValues {
    /// Pixel.
    pub pixel_id: String,
    /// Event name.
    pub event_name: String,
    /// Meta's key (`ph`, `em`, …) or `unknown`.
    pub field: String,
    /// Why, e.g. `not a valid phone number`.
    pub reason: String,
    /// How many.
    pub count: i64,
}

/// Meta's Event Match Quality of one pixel, or why it is not shown.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MetaPixelQuality {
    /// Pixel.
    pub pixel_id: String,
    /// Per event name, when Meta answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<MetaEventQuality>>,
    /// `not available: <reason>` when Meta did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_available: Option<String>,
    /// Unix ms of Meta's answer (answers are reused for a few minutes).
    pub fetched_at: i64,
}

/// Meta's Dataset Quality answers per pixel, reused for [`META_CACHE_TTL`]; cheap to clone.
#[derive(Clone, Default)]
pub struct MetaQuality {
    cache: Arc<Mutex<HashMap<String, (Instant, MetaPixelQuality)>>>,
}

impl MetaQuality {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Meta's EMQ for `client`'s pixel: from the cache when fresh, else asked.
    pub async fn for_pixel(&self, client: &GraphClient) -> MetaPixelQuality {
        let pixel_id = client.pixel_id().to_owned();
        if let Some((at, cached)) = self.lock().get(&pixel_id) {
            if at.elapsed() < META_CACHE_TTL {
                return cached.clone();
            }
        }
        let fetched_at = crate::delivery::now_ms();
        let quality = match client.dataset_quality().await {
            Ok(events) => MetaPixelQuality {
                pixel_id: pixel_id.clone(),
                events: Some(events),
                not_available: None,
                fetched_at,
            },
            Err(error) => {
                // Codes and Meta's text only; the token is never part of an error.
                tracing::info!(
                    pixel_id,
                    code = error.code,
                    "meta's dataset quality is not available"
                );
                MetaPixelQuality {
                    pixel_id: pixel_id.clone(),
                    events: None,
                    not_available: Some(not_available(&error)),
                    fetched_at,
                }
            }
        };
        self.lock()
            .insert(pixel_id, (Instant::now(), quality.clone()));
        quality
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, MetaPixelQuality)>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `not available: <reason>`, saying what to fix when the token lacks a permission.
fn not_available(error: &crate::delivery::classify::GraphError) -> String {
    let permission = matches!(error.code, Some(10 | 200..=299));
    if permission {
        format!(
            "not available: the access token lacks the permission ({}); Meta's Dataset Quality API needs ads_read plus ads_management or business_management",
            error.summary()
        )
    } else {
        format!("not available: {}", error.summary())
    }
}

/// The match-quality report from the start of the UTC day of `since_ms` on, with Meta's EMQ
/// for each of `clients`' pixels (cached by `meta`).
///
/// # Errors
/// Storage failures.
pub async fn report(
    store: &dyn Store,
    since_ms: i64,
    meta: &MetaQuality,
    clients: &[GraphClient],
) -> Result<QualityReport, StoreError> {
    let since_day = since_ms.div_euclid(DAY_MS);
    let (counts, drops) = store.match_quality(since_day).await?;
    let mut totals: BTreeMap<(String, String), QualityCount> = BTreeMap::new();
    for count in counts {
        match totals.entry((count.pixel_id.clone(), count.event_name.clone())) {
            btree_map::Entry::Occupied(mut total) => add(total.get_mut(), &count),
            btree_map::Entry::Vacant(slot) => {
                slot.insert(count);
            }
        }
    }
    let mut events: Vec<EventQuality> = totals
        .into_iter()
        .map(|((pixel_id, event_name), total)| EventQuality {
            keys: MatchKey::ALL
                .iter()
                .map(|key| {
                    let carried = total.carried[key.index()];
                    KeyShare {
                        key: *key,
                        events: carried,
                        share: if total.events > 0 {
                            carried as f64 / total.events as f64
                        } else {
                            0.0
                        },
                        filled_from_memory: total.filled[key.index()],
                    }
                })
                .collect(),
            pixel_id,
            event_name,
            events: total.events,
        })
        .collect();
    events.sort_by_key(|e| std::cmp::Reverse(e.events));
    let mut dropped_totals: BTreeMap<(String, String, String, String), i64> = BTreeMap::new();
    for drop in drops {
        *dropped_totals
            .entry((drop.pixel_id, drop.event_name, drop.field, drop.reason))
            .or_default() += drop.count;
    }
    let mut dropped: Vec<DroppedValues> = dropped_totals
        .into_iter()
        .map(
            |((pixel_id, event_name, field, reason), count)| DroppedValues {
                pixel_id,
                event_name,
                field,
                reason,
                count,
            },
        )
        .collect();
    dropped.sort_by_key(|d| std::cmp::Reverse(d.count));
    let mut meta_pixels = Vec::with_capacity(clients.len());
    for client in clients {
        meta_pixels.push(meta.for_pixel(client).await);
    }
    Ok(QualityReport {
        since_ms: since_day * DAY_MS,
        events,
        dropped,
        meta: meta_pixels,
    })
}
