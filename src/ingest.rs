//! The ingest pipeline every entry point shares (HTTP today; the CLI's `send`; database and
//! webhook sources later): split the request, validate and normalize each event with the pure
//! [`crate::domain`], store them durably, wake delivery. All or nothing: one invalid event
//! means nothing is queued.

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use crate::api::error::EventProblem;
use crate::delivery::Wakes;
use crate::domain::{self, IngestRules, NormalizedEvent, Problem};
use crate::memory::{MatchKeyMemory, Recall};
use crate::pixels::Pixels;
use crate::store::{GroupCommit, InsertOutcome, NewEventRecord, StoreError};

/// The result of an accepted request.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct IngestReport {
    /// Events newly stored.
    pub accepted: usize,
    /// Events acknowledged as duplicates of one seen within 48 hours.
    pub duplicates: usize,
    /// True when nothing will be sent (no Meta credentials).
    pub dry_run: bool,
    /// One receipt per event, in request order.
    pub events: Vec<EventReceipt>,
    /// Values dropped from accepted events.
    pub warnings: Vec<EventProblem>,
}

/// What happened to one event.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EventReceipt {
    /// Kept or generated id: the Pixel's `eventID` for deduplication.
    pub event_id: String,
    /// Name sent to Meta.
    pub event_name: String,
    /// `queued`, `duplicate` or `dry_run`.
    pub status: InsertOutcome,
    /// `user_data` fields filled from what was remembered about the same person
    /// ([`MatchKeyMemory`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub filled_from_memory: Vec<&'static str>,
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The body shape is wrong.
    #[error("{0}")]
    BadRequest(String),
    /// More events than Meta takes in one request.
    #[error("{0}")]
    TooMany(String),
    /// Events break Meta's rules.
    #[error("invalid events")]
    Invalid(Vec<EventProblem>),
    /// Storage failed; nothing is known to be stored.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a request's events come from, and the pixel they go to unless an event or the
/// request envelope names another (a `pixel` field).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `api`, `cli`, `sql`, a source's name or `site:<key>`; stored with each event.
    pub source: String,
    /// A pixel name or id (the `X-Capi-Pixel` header, a source's or a site's `pixel`).
    pub pixel: Option<String>,
}

impl Route {
    /// Events from `source` for the default pixel.
    pub fn from(source: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            pixel: None,
        }
    }

    /// The same, for `pixel` (none keeps the default).
    #[must_use]
    pub fn to_pixel(mut self, pixel: Option<&str>) -> Self {
        self.pixel = pixel.map(str::to_owned);
        self
    }
}

/// Shared by every entry point.
#[derive(Clone)]
pub struct Ingestor {
    rules: Arc<IngestRules>,
    pixels: Arc<Pixels>,
    commit: GroupCommit,
    wakes: Wakes,
    memory: Option<MatchKeyMemory>,
    quality: Option<crate::quality::QualityCounters>,
}

impl Ingestor {
    /// An ingestor storing through `commit` for `pixels` (none: dry-run).
    pub fn new(rules: IngestRules, pixels: Pixels, commit: GroupCommit, wakes: Wakes) -> Self {
        Self {
            rules: Arc::new(rules),
            pixels: Arc::new(pixels),
            commit,
            wakes,
            memory: None,
            quality: None,
        }
    }

    fn dry_run(&self) -> bool {
        self.pixels.is_empty()
    }

    /// Fills events from (and remembers them in) the match-key memory; `None` leaves it off.
    pub fn with_memory(mut self, memory: Option<MatchKeyMemory>) -> Self {
        self.memory = memory;
        self
    }

    /// Wakes an idle delivery worker: events were made due outside ingest (a replay).
    pub fn wake_delivery(&self) {
        self.wakes.wake_all();
    }

    /// Counts what the stored events carry (match quality); `None` leaves it off.
    pub fn with_quality(mut self, quality: Option<crate::quality::QualityCounters>) -> Self {
        self.quality = quality;
        self
    }

    /// Validates and normalizes the events of one request body without storing them: what
    /// [`Ingestor::store`] then stores (the inbox checks many payloads one by one this way,
    /// then stores the good ones together).
    ///
    /// # Errors
    /// [`IngestError`] naming every problem.
    pub fn prepare(
        &self,
        body: Value,
        now_secs: i64,
        route: &Route,
    ) -> Result<Prepared, IngestError> {
        let labels = crate::metrics::event_labels(&body);
        self.prepare_for(body, now_secs, route).inspect_err(|err| {
            let pixel_id = self.pixels.resolve(route.pixel.as_deref()).unwrap_or("");
            crate::metrics::refused(pixel_id, &route.source, &labels, err);
        })
    }

    fn prepare_for(
        &self,
        body: Value,
        now_secs: i64,
        route: &Route,
    ) -> Result<Prepared, IngestError> {
        let (mut prepared, request_pixel) = prepare(&self.rules, body, now_secs)?;
        // An event's own `pixel` wins over the envelope's, which wins over the route's.
        let fallback = request_pixel.as_deref().or(route.pixel.as_deref());
        let mut problems = Vec::new();
        prepared.pixel_ids = prepared
            .normalized
            .iter()
            .enumerate()
            .map(|(event_index, event)| {
                match self.pixels.resolve(event.pixel.as_deref().or(fallback)) {
                    Ok(pixel_id) => pixel_id.to_owned(),
                    Err(err) => {
                        problems.push(EventProblem {
                            event_index,
                            event_id: Some(event.event_id.clone()),
                            field: "pixel".to_owned(),
                            reason: err.to_string(),
                        });
                        String::new()
                    }
                }
            })
            .collect();
        if !problems.is_empty() {
            return Err(IngestError::Invalid(problems));
        }
        prepared.sources = vec![route.source.clone(); prepared.normalized.len()];
        Ok(prepared)
    }

    /// Validates, normalizes and durably stores the events of one request body.
    ///
    /// # Errors
    /// [`IngestError`] naming every problem; nothing is stored then.
    pub async fn ingest(
        &self,
        body: Value,
        now_secs: i64,
        route: &Route,
    ) -> Result<IngestReport, IngestError> {
        let prepared = self.prepare(body, now_secs, route)?;
        self.store(prepared, now_secs).await
    }

    /// Durably stores prepared events (filled from the match-key memory first).
    ///
    /// # Errors
    /// [`IngestError::Store`]: nothing is known to be stored.
    pub async fn store(
        &self,
        prepared: Prepared,
        now_secs: i64,
    ) -> Result<IngestReport, IngestError> {
        let Prepared {
            mut normalized,
            warnings,
            test_event_code,
            pixel_ids,
            sources,
        } = prepared;
        let dry_run = self.dry_run();
        let recall = match &self.memory {
            Some(memory) => {
                memory
                    .recall_and_fill(&mut normalized, now_secs.saturating_mul(1000))
                    .await
            }
            None => Recall::default(),
        };

        let records: Vec<NewEventRecord> = normalized
            .iter()
            .zip(pixel_ids.iter().zip(&sources))
            .map(|(event, (pixel_id, source))| NewEventRecord {
                pixel_id: pixel_id.clone(),
                event_id: event.event_id.clone(),
                event_name: event.event_name.clone(),
                payload: event.payload.to_string(),
                test_event_code: test_event_code.clone(),
                deadline_at: event.deadline.saturating_mul(1000),
                dry_run,
                source: Some(source.clone()),
                lease_until: None,
            })
            .collect();
        // The pixels to wake once stored: usually one.
        let mut pixels_to_wake: Vec<String> = Vec::new();
        for record in &records {
            if !pixels_to_wake.contains(&record.pixel_id) {
                pixels_to_wake.push(record.pixel_id.clone());
            }
        }
        let outcomes = self.commit.insert(records).await?;
        for (i, outcome) in outcomes.iter().enumerate() {
            if let (Some(event), Some(pixel_id), Some(source)) =
                (normalized.get(i), pixel_ids.get(i), sources.get(i))
            {
                crate::metrics::stored(pixel_id, source, &event.event_name, *outcome);
            }
        }
        if let Some(quality) = &self.quality {
            let now_ms = now_secs.saturating_mul(1000);
            quality.record(
                &pixel_ids,
                now_ms,
                &normalized,
                &recall.filled,
                &warnings,
                &outcomes,
            );
        }
        let mut filled = recall.filled.into_iter();
        if let Some(memory) = &self.memory {
            memory.remember(recall.remember);
        }
        if outcomes.contains(&InsertOutcome::Queued) {
            for pixel in &pixels_to_wake {
                self.wakes.wake(pixel);
            }
        }
        let accepted = outcomes
            .iter()
            .filter(|o| **o != InsertOutcome::Duplicate)
            .count();
        Ok(IngestReport {
            accepted,
            duplicates: outcomes.len() - accepted,
            dry_run,
            events: normalized
                .into_iter()
                .zip(outcomes)
                .map(|(event, status)| EventReceipt {
                    event_id: event.event_id,
                    event_name: event.event_name,
                    status,
                    filled_from_memory: filled.next().unwrap_or_default(),
                })
                .collect(),
            warnings,
        })
    }
}

/// Events validated and normalized, not yet stored.
#[derive(Debug)]
pub struct Prepared {
    normalized: Vec<NormalizedEvent>,
    warnings: Vec<EventProblem>,
    test_event_code: Option<String>,
    /// Each event's pixel, resolved ("" in dry-run).
    pixel_ids: Vec<String>,
    /// Each event's source.
    sources: Vec<String>,
}

impl Prepared {
    /// How many events.
    pub fn len(&self) -> usize {
        self.normalized.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.normalized.is_empty()
    }

    /// The events of `other` after these, in one request (their warnings renumbered); the
    /// test event code stays this one's (requests combined this way carry none).
    pub fn append(&mut self, other: Prepared) {
        let offset = self.normalized.len();
        self.warnings
            .extend(other.warnings.into_iter().map(|mut warning| {
                warning.event_index += offset;
                warning
            }));
        self.normalized.extend(other.normalized);
        self.pixel_ids.extend(other.pixel_ids);
        self.sources.extend(other.sources);
    }
}

/// Exactly what an ingest would store for `body` — each event's `data[i]` as Meta would get
/// it, hashed — without storing anything ("show me what would be sent").
///
/// # Errors
/// As [`Ingestor::ingest`], except storage.
pub fn preview(
    rules: &IngestRules,
    body: Value,
    now_secs: i64,
) -> Result<(Vec<NormalizedEvent>, Vec<EventProblem>), IngestError> {
    let (prepared, _) = prepare(rules, body, now_secs)?;
    Ok((prepared.normalized, prepared.warnings))
}

/// Splits, validates and normalizes; all events or none. Also returns the envelope's pixel.
fn prepare(
    rules: &IngestRules,
    body: Value,
    now_secs: i64,
) -> Result<(Prepared, Option<String>), IngestError> {
    {
        let request = domain::split_request(body).map_err(|p| {
            let message = if p.field.is_empty() {
                p.reason
            } else {
                format!("{}: {}", p.field, p.reason)
            };
            if message.contains("the limit is") {
                IngestError::TooMany(message)
            } else {
                IngestError::BadRequest(message)
            }
        })?;

        let mut problems = Vec::new();
        let mut warnings = Vec::new();
        let mut normalized = Vec::with_capacity(request.events.len());
        let mut new_id = || uuid::Uuid::now_v7().to_string();
        for (event_index, raw) in request.events.iter().enumerate() {
            let given_id = raw
                .get("event_id")
                .and_then(|v| match v {
                    Value::String(s) => Some(s.trim().to_owned()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
                .filter(|s| !s.is_empty());
            match domain::normalize_event(raw, rules, now_secs, &mut new_id) {
                Ok((event, event_warnings)) => {
                    warnings.extend(event_warnings.into_iter().map(|w| EventProblem {
                        event_index,
                        event_id: Some(event.event_id.clone()),
                        field: w.field,
                        reason: w.reason,
                    }));
                    normalized.push(event);
                }
                Err(event_problems) => {
                    problems.extend(event_problems.into_iter().map(|p: Problem| EventProblem {
                        event_index,
                        event_id: given_id.clone(),
                        field: p.field,
                        reason: p.reason,
                    }));
                }
            }
        }
        if !problems.is_empty() {
            return Err(IngestError::Invalid(problems));
        }
        Ok((
            Prepared {
                normalized,
                warnings,
                test_event_code: request.test_event_code,
                pixel_ids: Vec::new(),
                sources: Vec::new(),
            },
            request.pixel,
        ))
    }
}

/// Gives every event without an `event_id` one derived from `base` — `base` for a single
/// event, `base-<index>` in an array or envelope — so that the same delivery processed again
/// (a webhook retry, an inbox row after a crash) is a duplicate, never a second conversion.
pub fn with_stable_event_ids(mut body: Value, base: &str) -> Value {
    let fill = |event: &mut Value, index: Option<usize>| {
        if let Value::Object(map) = event {
            if map.get("event_id").is_none_or(Value::is_null) {
                let event_id = match index {
                    Some(index) => format!("{base}-{index}"),
                    None => base.to_owned(),
                };
                map.insert("event_id".to_owned(), Value::String(event_id));
            }
        }
    };
    match &mut body {
        Value::Array(events) => {
            for (index, event) in events.iter_mut().enumerate() {
                fill(event, Some(index));
            }
        }
        Value::Object(map) if map.get("data").is_some_and(Value::is_array) => {
            if let Some(Value::Array(events)) = map.get_mut("data") {
                for (index, event) in events.iter_mut().enumerate() {
                    fill(event, Some(index));
                }
            }
        }
        event => fill(event, None),
    }
    body
}
