//! Delivery: workers lease due events, send them to the Graph API in batches of up to 1000,
//! classify Meta's answer with a pure function ([`classify`]) and settle each event:
//! delivered, retried with backoff (never past its 7-day deadline), dead with Meta's reason
//! (after splitting a refused batch to isolate the bad event), or released while the pixel is
//! paused for a credential or configuration problem. Only this module calls Meta, and it never
//! holds a database transaction across an HTTP call.

pub mod batch;
pub mod classify;
pub mod client;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::DeliveryConfig;
use crate::store::{
    AttemptRecord, ClaimedEvent, EventUpdate, Handoff, Settlement, Store, StoreError,
};
use classify::{backoff_ms, GraphError, Verdict};
pub use client::{GraphClient, KeyCoverage, MetaEventQuality};

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Each pixel's wake-up for its idle delivery workers, by pixel id. Waking only the pixel
/// whose events were queued keeps the other pixels' workers asleep.
#[derive(Clone, Default)]
pub struct Wakes(Arc<Vec<(String, Arc<Notify>)>>);

impl Wakes {
    /// Wake-ups for these pixels.
    pub fn new(wakes: Vec<(String, Arc<Notify>)>) -> Self {
        Self(Arc::new(wakes))
    }

    /// Wakes one idle worker of `pixel_id`; one is enough, it takes up to a full batch.
    pub fn wake(&self, pixel_id: &str) {
        if let Some((_, notify)) = self.0.iter().find(|(id, _)| id == pixel_id) {
            notify.notify_one();
        }
    }

    /// Wakes one idle worker of every pixel (a notice that does not say which pixel).
    pub fn wake_all(&self) {
        for (_, notify) in self.0.iter() {
            notify.notify_one();
        }
    }
}

/// What one pass of a worker did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Nothing was due; `until` is when it makes sense to look again (unix ms), if known.
    Idle {
        /// Earliest useful wake-up.
        until: Option<i64>,
    },
    /// Events were attempted.
    Worked(usize),
}

/// A pixel's delivery state as shown by `/readyz`.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct PixelStatus {
    /// The configured name.
    pub name: String,
    /// Pixel id.
    pub pixel_id: String,
    /// `running`, `paused` or `throttled`.
    pub state: String,
    /// Meta's reason while paused or throttled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Unix ms of the next probe (paused) or the end of the slow-down (throttled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<i64>,
}

/// Handed-off commits, and what is left of one that was larger than a batch.
struct Inbox {
    receiver: mpsc::UnboundedReceiver<Vec<ClaimedEvent>>,
    carried: VecDeque<ClaimedEvent>,
}

/// Part of a batch whose fate is not known yet.
struct Chunk {
    events: Vec<ClaimedEvent>,
    /// Holds an event Meta refuses: its batch was refused and the other half went through.
    refused: bool,
    /// The first half of a refused batch, sent before its sibling, which lies right under it
    /// in the stack.
    first_half: bool,
    /// The second half of a refused batch, sent ahead of its refused first half's halves.
    ahead: bool,
}

/// A batch on its way out, and once Meta refuses it, the split that isolates its bad events.
/// While the split waits out a transient failure it is kept in memory, leased, and goes on where
/// it stopped: the halves already delivered are settled, the suspect half stays small.
struct Search {
    test_code: Option<String>,
    /// Chunks still to send, the next one last.
    pending: Vec<Chunk>,
    /// Meta refused the batch: it is being split.
    splitting: bool,
    /// Single events refused in a row for the very same reason, with nothing delivered in
    /// between: past a few, the cause is not the events (a field Meta stopped accepting, a
    /// bad test code) and splitting on would cost two requests per event and kill them all.
    same_refusals: Option<(String, u32)>,
    /// Transient failures in a row during the split, for its own backoff.
    failures: u32,
    /// Send the sibling of a refused first half before splitting that half further: right
    /// while the batch seems to hold one bad event.
    sibling_first: bool,
    /// When it may go on (unix ms).
    due_at: i64,
    /// Until when its events are known to be leased (unix ms).
    lease_until: i64,
}

impl Search {
    /// A batch claimed (or handed off) just now; its lease is renewed before the split's first
    /// request, since a handed-off batch's lease started at its commit.
    fn new(events: Vec<ClaimedEvent>, test_code: Option<String>, now: i64) -> Self {
        Self {
            test_code,
            pending: vec![Chunk {
                events,
                refused: false,
                first_half: false,
                ahead: false,
            }],
            splitting: false,
            same_refusals: None,
            failures: 0,
            sibling_first: true,
            due_at: now,
            lease_until: now,
        }
    }

    /// Splits refused `events` in halves, the first half to be sent next.
    fn push_halves(&mut self, mut events: Vec<ClaimedEvent>) {
        let second = events.split_off(events.len() / 2);
        self.pending.push(Chunk {
            events: second,
            refused: false,
            first_half: false,
            ahead: false,
        });
        self.pending.push(Chunk {
            events,
            refused: false,
            first_half: true,
            ahead: false,
        });
    }

    fn n_events(&self) -> usize {
        self.pending.iter().map(|c| c.events.len()).sum()
    }

    fn row_ids(&self) -> Vec<i64> {
        self.pending
            .iter()
            .flat_map(|c| c.events.iter().map(|e| e.row_id))
            .collect()
    }

    /// Row ids of `chunk` (taken off the stack) and of the rest.
    fn row_ids_with(&self, chunk: &Chunk) -> Vec<i64> {
        let mut ids = self.row_ids();
        ids.extend(chunk.events.iter().map(|e| e.row_id));
        ids
    }
}

#[derive(Debug, Default)]
struct PixelState {
    paused: Option<(String, i64)>,
    throttled_until: i64,
    throttle_reason: Option<String>,
    probing: bool,
}

/// Delivery for one pixel, shared by its worker loops.
#[derive(Clone)]
pub struct Delivery {
    store: Arc<dyn Store>,
    client: GraphClient,
    config: DeliveryConfig,
    wake: Arc<Notify>,
    state: Arc<Mutex<PixelState>>,
    /// Events ingest committed already leased to us (see [`Handoff`]).
    inbox: Arc<tokio::sync::Mutex<Inbox>>,
    inbox_sender: mpsc::UnboundedSender<Vec<ClaimedEvent>>,
    inbox_room: Arc<Semaphore>,
    /// Mirrors "neither paused nor throttled" for the committing task.
    accepting: Arc<AtomicBool>,
    /// Batch splits waiting out a transient failure, leased; due ones go before anything else.
    searches: Arc<Mutex<Vec<Search>>>,
}

impl Delivery {
    /// Delivery over `store` with `client`; `wake` is signalled when new events are queued.
    pub fn new(
        store: Arc<dyn Store>,
        client: GraphClient,
        config: DeliveryConfig,
        wake: Arc<Notify>,
    ) -> Self {
        // A few batches' worth: enough to keep every in-flight slot fed, small enough that
        // handed-off events are sent long before their lease runs out. When it is full, new
        // events wait in the database instead.
        let (inbox_sender, receiver) = mpsc::unbounded_channel();
        let inbox_room = Arc::new(Semaphore::new(
            config.max_batch_events * (config.max_in_flight + 1),
        ));
        let inbox = Inbox {
            receiver,
            carried: VecDeque::new(),
        };
        Self {
            store,
            client,
            config,
            wake,
            state: Arc::new(Mutex::new(PixelState::default())),
            inbox: Arc::new(tokio::sync::Mutex::new(inbox)),
            inbox_sender,
            inbox_room,
            accepting: Arc::new(AtomicBool::new(true)),
            searches: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Lets the group commit hand freshly stored events straight to these workers.
    pub fn handoff(&self) -> Handoff {
        Handoff {
            inbox: self.inbox_sender.clone(),
            room: self.inbox_room.clone(),
            accepting: self.accepting.clone(),
            lease: self.config.lease,
        }
    }

    /// The Graph client of this pixel (for tools such as the dashboard's test event).
    pub fn client(&self) -> &GraphClient {
        &self.client
    }

    /// The pixel's current state.
    pub fn status(&self) -> PixelStatus {
        let now = now_ms();
        let state = self.lock();
        let (state_name, reason, until) = match &state.paused {
            Some((reason, probe_at)) => ("paused", Some(reason.clone()), Some(*probe_at)),
            None if state.throttled_until > now => (
                "throttled",
                state.throttle_reason.clone(),
                Some(state.throttled_until),
            ),
            None => ("running", None, None),
        };
        PixelStatus {
            name: self.client.pixel_name().to_owned(),
            pixel_id: self.client.pixel_id().to_owned(),
            state: state_name.to_owned(),
            reason,
            until,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PixelState> {
        // A panic while holding this lock cannot leave it inconsistent (plain fields).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `max_in_flight` worker loops until `shutdown`, then lets in-flight requests finish.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut loops = tokio::task::JoinSet::new();
        for worker in 0..self.config.max_in_flight {
            let delivery = self.clone();
            let shutdown = shutdown.clone();
            loops.spawn(async move { delivery.run_loop(worker, shutdown).await });
        }
        while loops.join_next().await.is_some() {}
        // Events handed over but not started: give them back now rather than when their lease
        // expires, so a restart sends them at once.
        let mut leftover = self.take_handed_off().await;
        // So are the events of batch splits waiting in memory.
        leftover.extend(
            self.lock_searches()
                .drain(..)
                .flat_map(|s| s.pending)
                .flat_map(|c| c.events),
        );
        if !leftover.is_empty() {
            let updates = release_all(leftover, "shutting down");
            if let Err(err) = self.store.settle(&updates, now_ms()).await {
                tracing::warn!(error = %err, "could not release handed-off events at shutdown; they are sent when their lease expires");
            }
        }
    }

    /// Takes up to one batch of handed-off events without waiting.
    async fn take_handed_off(&self) -> Vec<ClaimedEvent> {
        let Ok(mut inbox) = self.inbox.try_lock() else {
            // Another worker is taking a batch right now.
            return Vec::new();
        };
        let max = self.config.max_batch_events;
        let mut events: Vec<ClaimedEvent> = Vec::new();
        while events.len() < max {
            if inbox.carried.is_empty() {
                match inbox.receiver.try_recv() {
                    Ok(commit) => inbox.carried.extend(commit),
                    Err(_) => break,
                }
            }
            let take = (max - events.len()).min(inbox.carried.len());
            events.extend(inbox.carried.drain(..take));
        }
        self.inbox_room.add_permits(events.len());
        events
    }

    async fn run_loop(&self, worker: usize, shutdown: CancellationToken) {
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            // Registered before looking at the queue, so an event queued meanwhile is not missed.
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wait = match self.run_once().await {
                Ok(Progress::Worked(_)) => {
                    failures = 0;
                    continue;
                }
                Ok(Progress::Idle { until }) => {
                    failures = 0;
                    let poll = self.config.poll_interval;
                    until
                        .map(|t| Duration::from_millis(u64::try_from(t - now_ms()).unwrap_or(0)))
                        .map_or(poll, |d| d.min(poll).max(Duration::from_millis(5)))
                }
                Err(err) => {
                    failures = failures.saturating_add(1);
                    tracing::error!(worker, error = %err, "delivery pass failed; retrying");
                    Duration::from_millis(100u64 << failures.min(6))
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = &mut notified => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One pass: take handed-off events, top the batch up with due events from the database,
    /// send it, settle every event.
    ///
    /// # Errors
    /// Storage failures; the leased events are then picked up again when their lease expires.
    pub async fn run_once(&self) -> Result<Progress, StoreError> {
        let now = now_ms();
        let (blocked, probing) = {
            let mut state = self.lock();
            if let Some((reason, probe_at)) = &state.paused {
                if now < *probe_at || state.probing {
                    (Some((format!("pixel paused: {reason}"), *probe_at)), false)
                } else {
                    // One worker probes with a single event; the others wait for its answer.
                    state.probing = true;
                    (None, true)
                }
            } else if state.throttled_until > now {
                let reason = state.throttle_reason.as_deref().unwrap_or("rate limited");
                (
                    Some((format!("pixel throttled: {reason}"), state.throttled_until)),
                    false,
                )
            } else {
                self.accepting.store(true, Ordering::Relaxed);
                (None, false)
            }
        };
        // However this pass ends, a probe in progress ends with it.
        let _probe = ProbeEnd {
            delivery: self,
            probing,
        };
        if blocked.is_none() && !probing {
            // A batch split that waited out a failure goes on first: its events are the oldest.
            if let Some(search) = self.take_due_search(now) {
                return self.resume(search).await;
            }
        }
        let handed = self.take_handed_off().await;
        if let Some((reason, until)) = blocked {
            // Waiting splits stay in memory only while their lease outlasts the wait.
            let paused = self.lock().paused.is_some();
            let given_back = self.give_back_searches(&reason, until, paused).await?;
            if handed.is_empty() {
                if given_back > 0 {
                    return Ok(Progress::Worked(given_back));
                }
                return Ok(Progress::Idle { until: Some(until) });
            }
            // Paused or slowed down since the handoff: back to the database they go.
            let n = handed.len();
            self.store
                .settle(&release_all(handed, &reason), now)
                .await?;
            return Ok(Progress::Worked(n + given_back));
        }
        let limit = if probing {
            1
        } else {
            self.config.max_batch_events
        };
        let mut batch = if probing {
            // The probe is one event from storage; these wait there too until it succeeds.
            if !handed.is_empty() {
                self.store
                    .settle(&release_all(handed, "pixel paused: probing"), now)
                    .await?;
            }
            Vec::new()
        } else {
            handed
        };
        if batch.len() < limit {
            // Events that could not be handed off (inbox full, paused, restarted) wait here.
            let lease_ms = millis_i64(self.config.lease);
            match self
                .store
                .claim_due(
                    self.client.pixel_id(),
                    limit - batch.len(),
                    now,
                    now + lease_ms,
                )
                .await
            {
                Ok(claimed) => batch.extend(claimed),
                Err(err) => {
                    if !batch.is_empty() {
                        // Keep what was handed off; its lease covers a retry by anyone.
                        tracing::warn!(error = %err, "claiming from storage failed; sending what was handed off");
                    } else {
                        return Err(err);
                    }
                }
            }
        }
        if batch.is_empty() {
            return Ok(Progress::Idle {
                until: self.next_search_due(),
            });
        }
        self.deliver(batch).await
    }

    /// Sends leased events (grouped by test code) and settles each of them.
    async fn deliver(&self, events: Vec<ClaimedEvent>) -> Result<Progress, StoreError> {
        let n_events = events.len();
        let mut by_test_code: BTreeMap<Option<String>, Vec<ClaimedEvent>> = BTreeMap::new();
        for event in events {
            by_test_code
                .entry(event.test_event_code.clone())
                .or_default()
                .push(event);
        }
        let mut updates = Vec::with_capacity(n_events);
        for (test_code, events) in by_test_code {
            let search = Search::new(events, test_code, now_ms());
            if let Some(waiting) = self.advance(search, &mut updates).await {
                self.park(waiting).await;
            }
        }
        self.flush(&mut updates).await?;
        Ok(Progress::Worked(n_events))
    }

    /// Goes on with a search that waited out a transient failure.
    async fn resume(&self, search: Search) -> Result<Progress, StoreError> {
        let n_events = search.n_events();
        let mut updates = Vec::new();
        if let Some(waiting) = self.advance(search, &mut updates).await {
            self.park(waiting).await;
        }
        self.flush(&mut updates).await?;
        Ok(Progress::Worked(n_events))
    }

    /// Settles `updates` and empties it.
    async fn flush(&self, updates: &mut Vec<EventUpdate>) -> Result<(), StoreError> {
        if updates.is_empty() {
            return Ok(());
        }
        self.store.settle(updates, now_ms()).await?;
        crate::metrics::settled(self.client.pixel_id(), updates);
        updates.clear();
        Ok(())
    }

    /// Sends the chunks of `search`, which share a test code. A refused batch is split in
    /// halves until the bad events are alone; a transient failure during the split returns the
    /// search to wait in memory (still leased) and go on where it stopped, or hands it back to
    /// storage without counting an attempt when Meta asks for a longer wait.
    async fn advance(&self, mut search: Search, updates: &mut Vec<EventUpdate>) -> Option<Search> {
        let test_code = search.test_code.clone();
        let test_code = test_code.as_deref();
        let pixel_id = self.client.pixel_id();
        let lease_ms = millis_i64(self.config.lease);
        while let Some(chunk) = search.pending.pop() {
            if chunk.refused && chunk.events.len() > 1 {
                // Its batch was refused and the other half went through: the bad event is in
                // here, so sending it whole would only be refused again.
                search.push_halves(chunk.events);
                continue;
            }
            if search.splitting {
                // Delivered halves and dead events are settled as they are known, so a crash or
                // a long storm does not hold them (one settle per answer; SQLite's writer takes
                // a few hundred a second).
                if let Err(err) = self.flush(updates).await {
                    tracing::warn!(error = %err, "could not settle during a batch split; trying again at its end");
                }
                // Splitting takes several requests; keep the lease so no one else takes these.
                let now = now_ms();
                let margin = millis_i64(self.config.request_timeout).max(lease_ms / 2);
                if search.lease_until - now < margin {
                    let ids = search.row_ids_with(&chunk);
                    match self.store.extend_lease(&ids, now + lease_ms).await {
                        Ok(()) => search.lease_until = now + lease_ms,
                        Err(err) => {
                            tracing::warn!(error = %err, "could not extend a lease during a batch split")
                        }
                    }
                }
            }
            let started = std::time::Instant::now();
            let verdict = self
                .client
                .send_events(
                    chunk.events.iter().map(|e| e.payload.as_str()),
                    chunk.events.len(),
                    test_code,
                )
                .await;
            crate::metrics::graph_request(
                pixel_id,
                chunk.events.len(),
                started.elapsed(),
                &verdict,
            );
            let now = now_ms();
            match verdict {
                Verdict::Delivered { fbtrace_id } => {
                    search.same_refusals = None;
                    search.failures = 0;
                    tracing::info!(
                        pixel_id,
                        n_events = chunk.events.len(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "delivered"
                    );
                    self.clear_pause();
                    if chunk.first_half {
                        // Its sibling (the next chunk: nothing was pushed since) holds the
                        // refused event.
                        if let Some(sibling) = search.pending.last_mut() {
                            sibling.refused = true;
                        }
                    }
                    let attempt = AttemptRecord {
                        outcome: "delivered".to_owned(),
                        http_status: Some(200),
                        fbtrace_id,
                        ..AttemptRecord::default()
                    };
                    updates.extend(chunk.events.into_iter().map(|e| EventUpdate {
                        row_id: e.row_id,
                        settlement: Settlement::Delivered,
                        attempt: Some(attempt.clone()),
                    }));
                }
                Verdict::Retry {
                    error,
                    hint_ms,
                    throttled,
                } => {
                    self.clear_pause();
                    let hint = i64::try_from(hint_ms.unwrap_or(0)).unwrap_or(i64::MAX);
                    tracing::warn!(
                        pixel_id,
                        n_events = chunk.events.len(),
                        code = error.code,
                        subcode = error.subcode,
                        http_status = error.http_status,
                        fbtrace_id = error.fbtrace_id.as_deref(),
                        throttled,
                        splitting = search.splitting,
                        "delivery will be retried"
                    );
                    // One draw for the whole batch: events that failed together retry together
                    // (one request, not dozens); jitter spreads different batches apart.
                    let jitter = rand::random::<f64>();
                    if search.splitting {
                        // The search failed, not these events: it waits by its own failures in
                        // a row, capped so that it can wait leased in memory, and goes on with
                        // this chunk. Nobody's attempts or backoff grow.
                        search.failures = search.failures.saturating_add(1);
                        let longest_wait = lease_ms / 2;
                        let delay = i64::try_from(backoff_ms(
                            i64::from(search.failures),
                            millis(self.config.retry_base),
                            millis(self.config.retry_max)
                                .min(u64::try_from(longest_wait).unwrap_or(0)),
                            jitter,
                        ))
                        .unwrap_or(i64::MAX)
                        .max(hint);
                        if throttled {
                            self.throttle(now.saturating_add(delay), &error);
                        }
                        search.pending.push(chunk);
                        search.due_at = now.saturating_add(delay);
                        if delay <= longest_wait {
                            return Some(search);
                        }
                        // Meta asks for a longer wait than a lease covers: back to storage,
                        // each event due then, without an attempt counted. The next claim
                        // starts the split again.
                        let reason = format!("batch split waiting: {}", error.summary());
                        for event in search.pending.drain(..).flat_map(|c| c.events) {
                            updates.push(postpone_or_expire(event, search.due_at, &reason, &error));
                        }
                        return None;
                    }
                    let mut longest = 0;
                    // The rest of a split batch would meet the same outage or limit: it waits
                    // too, instead of spending requests on a Graph API that is not answering.
                    for event in chunk
                        .events
                        .into_iter()
                        .chain(search.pending.drain(..).flat_map(|c| c.events))
                    {
                        let delay = i64::try_from(backoff_ms(
                            event.attempts,
                            millis(self.config.retry_base),
                            millis(self.config.retry_max),
                            jitter,
                        ))
                        .unwrap_or(i64::MAX)
                        .max(hint);
                        longest = longest.max(delay);
                        let next = now.saturating_add(delay);
                        updates.push(retry_or_expire(event, next, &error));
                    }
                    if throttled {
                        self.throttle(now.saturating_add(longest), &error);
                    }
                }
                Verdict::Rejected { error } if chunk.events.len() == 1 => {
                    search.failures = 0;
                    if chunk.ahead {
                        search.sibling_first = false;
                    }
                    // The event id lets an operator find the dead event (never its payload).
                    tracing::warn!(
                        pixel_id,
                        event_id = chunk.events.first().map(|e| e.event_id.as_str()),
                        code = error.code,
                        subcode = error.subcode,
                        fbtrace_id = error.fbtrace_id.as_deref(),
                        "meta rejected an event; it is dead"
                    );
                    let summary = error.summary();
                    // A probe refused for the reason the pixel was paused for keeps it paused.
                    let paused_reason = self.lock().paused.as_ref().map(|(r, _)| r.clone());
                    match paused_reason {
                        Some(reason) if reason.ends_with(&summary) => self.pause(reason, now),
                        _ => self.clear_pause(),
                    }
                    let refusals = match &search.same_refusals {
                        Some((last, n)) if *last == summary => n + 1,
                        _ => 1,
                    };
                    search.same_refusals = Some((summary.clone(), refusals));
                    updates.extend(chunk.events.into_iter().map(|e| EventUpdate {
                        row_id: e.row_id,
                        settlement: Settlement::Dead {
                            reason: summary.clone(),
                        },
                        attempt: Some(attempt_record("rejected", &error)),
                    }));
                    if refusals >= SYSTEMIC_REFUSALS && !search.pending.is_empty() {
                        let reason = format!("Meta refuses every event the same way: {summary}");
                        tracing::error!(
                            pixel_id,
                            code = error.code,
                            subcode = error.subcode,
                            refusals,
                            "delivery paused: meta refuses every event for the same reason; the rest stay queued"
                        );
                        self.pause(reason.clone(), now);
                        for event in search.pending.drain(..).flat_map(|c| c.events) {
                            updates.push(EventUpdate {
                                row_id: event.row_id,
                                settlement: Settlement::Release {
                                    reason: format!("pixel paused: {reason}"),
                                },
                                attempt: None,
                            });
                        }
                    }
                }
                Verdict::Rejected { error } => {
                    search.failures = 0;
                    tracing::info!(
                        pixel_id,
                        n_events = chunk.events.len(),
                        code = error.code,
                        subcode = error.subcode,
                        "meta rejected a batch; splitting it to isolate the bad events"
                    );
                    search.splitting = true;
                    if chunk.ahead {
                        // More than one bad event: the split goes on in order from the first
                        // half's halves (right above where this one goes back, to be split
                        // without another request), as it would have without sending this one
                        // ahead; no more siblings are sent ahead.
                        search.sibling_first = false;
                        let at = search.pending.len().saturating_sub(2);
                        search.pending.insert(
                            at,
                            Chunk {
                                refused: true,
                                ahead: false,
                                ..chunk
                            },
                        );
                        continue;
                    }
                    // With a first half refused, its sibling (right under it) is most likely
                    // clean: it goes next, before the suspect half is split further.
                    let sibling = if chunk.first_half && search.sibling_first {
                        search.pending.pop().map(|mut sibling| {
                            sibling.ahead = true;
                            sibling
                        })
                    } else {
                        None
                    };
                    search.push_halves(chunk.events);
                    search.pending.extend(sibling);
                }
                Verdict::Pause { error } => {
                    tracing::error!(
                        pixel_id,
                        code = error.code,
                        subcode = error.subcode,
                        http_status = error.http_status,
                        fbtrace_id = error.fbtrace_id.as_deref(),
                        reason = %error.summary(),
                        "delivery paused: fix the credentials or configuration; events stay queued and delivery resumes by itself"
                    );
                    self.pause(error.summary(), now);
                    let reason = format!("pixel paused: {}", error.summary());
                    let attempt = attempt_record("paused", &error);
                    for event in chunk
                        .events
                        .into_iter()
                        .chain(search.pending.drain(..).flat_map(|c| c.events))
                    {
                        updates.push(EventUpdate {
                            row_id: event.row_id,
                            settlement: Settlement::Release {
                                reason: reason.clone(),
                            },
                            attempt: Some(attempt.clone()),
                        });
                    }
                }
            }
        }
        None
    }

    /// Slows the whole pixel down until `until` for Meta's rate limit `error`.
    fn throttle(&self, until: i64, error: &GraphError) {
        let mut state = self.lock();
        state.throttled_until = state.throttled_until.max(until);
        state.throttle_reason = Some(error.summary());
        self.accepting.store(false, Ordering::Relaxed);
    }

    /// Keeps a search that waits out a transient failure in memory, its events leased until
    /// a lease after it is due.
    async fn park(&self, mut search: Search) {
        let lease_until = search.due_at.saturating_add(millis_i64(self.config.lease));
        let ids = search.row_ids();
        match self.store.extend_lease(&ids, lease_until).await {
            Ok(()) => search.lease_until = lease_until,
            // It goes on while its current lease lasts, or is dropped (see `take_due_search`).
            Err(err) => {
                tracing::warn!(error = %err, "could not extend the lease of a waiting batch split")
            }
        }
        self.lock_searches().push(search);
    }

    /// The waiting search that is due first, if one is due. A search whose lease ran out (it
    /// could not be extended) is dropped: its events are due in storage again, and sending
    /// them from here as well could send them twice.
    fn take_due_search(&self, now: i64) -> Option<Search> {
        let mut searches = self.lock_searches();
        searches.retain(|s| {
            let alive = s.lease_until > now;
            if !alive {
                tracing::warn!(
                    pixel_id = self.client.pixel_id(),
                    n_events = s.n_events(),
                    "a waiting batch split lost its lease; its events are due in storage again"
                );
            }
            alive
        });
        let (index, _) = searches
            .iter()
            .enumerate()
            .filter(|(_, s)| s.due_at <= now)
            .min_by_key(|(_, s)| s.due_at)?;
        Some(searches.swap_remove(index))
    }

    /// When the first waiting search is due.
    fn next_search_due(&self) -> Option<i64> {
        self.lock_searches().iter().map(|s| s.due_at).min()
    }

    /// Gives waiting searches back to storage while the pixel is blocked until `until`: all of
    /// them when it is paused (`paused`), those whose lease would run out first when it is
    /// slowed down. No attempt is counted. Returns how many events went back.
    async fn give_back_searches(
        &self,
        reason: &str,
        until: i64,
        paused: bool,
    ) -> Result<usize, StoreError> {
        let margin = millis_i64(self.config.request_timeout);
        let given_back: Vec<Search> = {
            let mut searches = self.lock_searches();
            let (back, keep) = searches
                .drain(..)
                .partition(|s| paused || s.lease_until < until.saturating_add(margin));
            *searches = keep;
            back
        };
        let updates: Vec<EventUpdate> = given_back
            .into_iter()
            .flat_map(|s| s.pending)
            .flat_map(|c| c.events)
            .map(|event| EventUpdate {
                row_id: event.row_id,
                settlement: if paused {
                    Settlement::Release {
                        reason: reason.to_owned(),
                    }
                } else {
                    Settlement::Postpone {
                        next_attempt_at: until,
                        reason: reason.to_owned(),
                    }
                },
                attempt: None,
            })
            .collect();
        let n = updates.len();
        if n > 0 {
            self.store.settle(&updates, now_ms()).await?;
            crate::metrics::settled(self.client.pixel_id(), &updates);
        }
        Ok(n)
    }

    fn lock_searches(&self) -> std::sync::MutexGuard<'_, Vec<Search>> {
        // A panic while holding this lock cannot leave the list inconsistent.
        self.searches.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pause(&self, reason: String, now: i64) {
        let probe_at = now + millis_i64(self.config.pause_probe_interval);
        self.lock().paused = Some((reason, probe_at));
        self.accepting.store(false, Ordering::Relaxed);
    }

    fn clear_pause(&self) {
        let mut state = self.lock();
        if state.throttled_until <= now_ms() {
            self.accepting.store(true, Ordering::Relaxed);
        }
        if state.paused.take().is_some() {
            tracing::info!(
                pixel_id = self.client.pixel_id(),
                "delivery resumed: meta accepts requests again"
            );
        }
    }
}

/// Identical single-event refusals in a row that pause the pixel instead of splitting on.
const SYSTEMIC_REFUSALS: u32 = 10;

/// Clears the probing flag when a probing pass ends, on every path.
struct ProbeEnd<'a> {
    delivery: &'a Delivery,
    probing: bool,
}

impl Drop for ProbeEnd<'_> {
    fn drop(&mut self) {
        if self.probing {
            self.delivery.lock().probing = false;
        }
    }
}

fn release_all(events: Vec<ClaimedEvent>, reason: &str) -> Vec<EventUpdate> {
    events
        .into_iter()
        .map(|event| EventUpdate {
            row_id: event.row_id,
            settlement: Settlement::Release {
                reason: reason.to_owned(),
            },
            attempt: None,
        })
        .collect()
}

fn retry_or_expire(event: ClaimedEvent, next: i64, error: &GraphError) -> EventUpdate {
    let settlement = if next > event.deadline_at {
        Settlement::Dead {
            reason: format!(
                "deadline passed (Meta refuses events older than their window) after: {}",
                error.summary()
            ),
        }
    } else {
        Settlement::Retry {
            next_attempt_at: next,
            reason: error.summary(),
        }
    };
    EventUpdate {
        row_id: event.row_id,
        settlement,
        attempt: Some(attempt_record("retry", error)),
    }
}

/// Hands an event of an interrupted batch split back to storage without counting the attempt,
/// due at `next`, unless that is past its deadline.
fn postpone_or_expire(
    event: ClaimedEvent,
    next: i64,
    reason: &str,
    error: &GraphError,
) -> EventUpdate {
    if next > event.deadline_at {
        return retry_or_expire(event, next, error);
    }
    EventUpdate {
        row_id: event.row_id,
        settlement: Settlement::Postpone {
            next_attempt_at: next,
            reason: reason.to_owned(),
        },
        attempt: None,
    }
}

fn attempt_record(outcome: &str, error: &GraphError) -> AttemptRecord {
    AttemptRecord {
        outcome: outcome.to_owned(),
        http_status: error.http_status,
        code: error.code,
        subcode: error.subcode,
        fbtrace_id: error.fbtrace_id.clone(),
        error_title: error.user_title.clone(),
        error_message: Some(error.message.clone()),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn millis_i64(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
