//! The dashboard's HTML (maud: compile-time templates, everything escaped unless marked).
//! Plain HTML and one inline stylesheet; no script. Every page has one `h1`, a skip link,
//! labelled form controls and tables with header cells.

use std::sync::LazyLock;

use base64::Engine as _;
use maud::{html, Markup, PreEscaped, DOCTYPE};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest, Sha256};

use super::chart;
use crate::delivery::PixelStatus;
use crate::domain::quality::MatchKey;
use crate::quality::QualityReport;
use crate::store::{
    ActivityBucket, AttemptView, EventDetail, EventSummary, QueueStats, ReasonCount, RecentError,
    EVENT_STATES,
};

/// The stylesheet, inlined in every page.
const CSS: &str = include_str!("admin.css");

/// `Content-Security-Policy` for every dashboard response: this stylesheet and nothing else
/// (no script, no frames, forms only to this origin).
pub static CONTENT_SECURITY_POLICY: LazyLock<String> = LazyLock::new(|| {
    let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(CSS.as_bytes()));
    format!(
        "default-src 'none'; style-src 'sha256-{hash}'; img-src 'self'; form-action 'self'; \
         frame-ancestors 'none'; base-uri 'none'"
    )
});

/// The section a page belongs to, for the navigation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Overview,
    Events,
    Dead,
    Quality,
    Test,
}

const NAV: [(Nav, &str, &str); 5] = [
    (Nav::Overview, "/admin", "Overview"),
    (Nav::Events, "/admin/events", "Events"),
    (Nav::Dead, "/admin/dead", "Dead letters"),
    (Nav::Quality, "/admin/quality", "Match quality"),
    (Nav::Test, "/admin/test", "Test event"),
];

/// A whole page. With `nav` (the current section and the session's CSRF token), the
/// navigation and the log-out button are shown.
pub fn page(title: &str, nav: Option<(Nav, &str)>, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="robots" content="noindex";
                title { (title) " · capi-bridge" }
                style { (PreEscaped(CSS)) }
            }
            body {
                a class="skip" href="#main" { "Skip to content" }
                header {
                    nav aria-label="Dashboard" {
                        span class="brand" { "capi-bridge" }
                        @if let Some((current, csrf)) = nav {
                            @for (section, href, label) in NAV {
                                @if section == current {
                                    a href=(href) aria-current="page" { (label) }
                                } @else {
                                    a href=(href) { (label) }
                                }
                            }
                            form method="post" action="/admin/logout" {
                                (csrf_field(csrf))
                                button type="submit" { "Log out" }
                            }
                        }
                    }
                }
                main id="main" { (content) }
            }
        }
    }
}

/// The hidden field every form of a session carries.
pub fn csrf_field(csrf: &str) -> Markup {
    html! { input type="hidden" name="csrf" value=(csrf); }
}

/// What an event id keeps unencoded in a path: letters, digits, `-`, `_`, `~` (not `.`, so
/// an id `..` cannot climb out of the path).
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'~');

/// `/admin/events/<id>`, the id percent-encoded.
pub fn event_href(event_id: &str) -> String {
    format!(
        "/admin/events/{}",
        utf8_percent_encode(event_id, PATH_SEGMENT)
    )
}

/// A time as `2026-11-27 16:40:12 UTC`.
pub fn utc(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
        || ms.to_string(),
        |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    )
}

fn time(ms: i64) -> Markup {
    let machine = chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default();
    html! { time datetime=(machine) { (utc(ms)) } }
}

/// A duration in words: `45 s`, `3 min 12 s`, `2 h 5 min`, `4 d 3 h`.
pub fn duration(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        3600..=86_399 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

fn state_badge(state: &str) -> Markup {
    let label = match state {
        "dry_run" => "dry run",
        other => other,
    };
    html! { span class=(format!("state state-{state}")) { (label) } }
}

fn notice(text: Option<&str>) -> Markup {
    html! {
        @if let Some(text) = text {
            p class="notice" role="status" { (text) }
        }
    }
}

fn error_notice(text: Option<&str>) -> Markup {
    html! {
        @if let Some(text) = text {
            p class="error" role="alert" { (text) }
        }
    }
}

/// The login form; `problem` says why the last attempt failed.
pub fn login(problem: Option<&str>) -> Markup {
    page(
        "Log in",
        None,
        html! {
            div class="login" {
                h1 { "Operator dashboard" }
                (error_notice(problem))
                form method="post" action="/admin/login" {
                    div {
                        label for="password" { "Admin password" }
                        input id="password" name="password" type="password"
                            autocomplete="current-password" required autofocus;
                    }
                    button type="submit" { "Log in" }
                }
            }
        },
    )
}

/// What `/admin` says when no admin password is configured.
pub fn disabled() -> Markup {
    page(
        "Dashboard off",
        None,
        html! {
            h1 { "The operator dashboard is off" }
            p { "It is turned on by an admin password in the service's configuration:" }
            ol {
                li { "Run " code { "capi-bridge admin hash-password" } ", type the password, and put the line it prints in "
                    code { "ADMIN_PASSWORD_HASH" } " (or put the password itself in " code { "ADMIN_PASSWORD" } ")." }
                li { "Restart capi-bridge and open " code { "/admin" } " again." }
            }
        },
    )
}

/// A page for an error, without navigation.
pub fn error(title: &str, message: &str) -> Markup {
    page(
        title,
        None,
        html! {
            h1 { (title) }
            p { (message) }
            p { a href="/admin" { "Back to the dashboard" } }
        },
    )
}

/// Everything the overview shows.
pub struct Overview {
    pub now: i64,
    pub stats: QueueStats,
    pub pixels: Vec<PixelStatus>,
    pub dry_run: bool,
    pub hour: Vec<ActivityBucket>,
    pub day: Vec<ActivityBucket>,
    pub errors: Vec<RecentError>,
}

fn clock(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map_or_else(String::new, |t| t.format("%H:%M").to_string())
}

fn activity(id: &str, caption: &str, buckets: &[ActivityBucket]) -> Markup {
    let [accepted, delivered, dead] = chart::totals(buckets);
    html! {
        section aria-labelledby=(format!("{id}-heading")) {
            h2 id=(format!("{id}-heading")) { (caption) }
            dl class="totals" {
                div { dt { "Accepted" } dd data-metric=(format!("{id}-accepted")) { (accepted) } }
                div { dt { "Delivered" } dd data-metric=(format!("{id}-delivered")) { (delivered) } }
                div { dt { "Dead" } dd data-metric=(format!("{id}-dead")) { (dead) } }
            }
            ul class="legend" aria-hidden="true" {
                li class="accepted" { "accepted" }
                li class="delivered" { "delivered" }
                li class="dead" { "dead" }
            }
            (chart::bars(id, caption, buckets, clock))
            details {
                summary { "The numbers (UTC)" }
                div class="scroll" { (chart::table(caption, buckets, clock)) }
            }
        }
    }
}

/// `/admin`.
pub fn overview(data: &Overview, csrf: &str) -> Markup {
    let stats = &data.stats;
    page(
        "Overview",
        Some((Nav::Overview, csrf)),
        html! {
            h1 { "Overview" }
            dl class="cards" {
                div { dt { "Waiting in the queue" } dd data-metric="queued" { (stats.queued) } }
                div {
                    dt { "Oldest waiting for" }
                    dd data-metric="oldest" {
                        @match stats.oldest_queued_at {
                            Some(at) => (duration(data.now - at)),
                            None => "nothing waits",
                        }
                    }
                }
                div { dt { "Delivered (kept)" } dd data-metric="delivered" { (stats.delivered) } }
                div { dt { "Dead" } dd data-metric="dead" { a href="/admin/dead" { (stats.dead) } } }
                @if stats.dry_run > 0 {
                    div { dt { "Dry run" } dd data-metric="dry-run" { (stats.dry_run) } }
                }
            }
            h2 { "Pixels" }
            @if data.dry_run {
                p class="error" { "No pixel is configured: this is a dry run. Events are stored and shown, never sent. Set META_PIXEL_ID and META_ACCESS_TOKEN to deliver." }
            } @else {
                div class="scroll" {
                    table {
                        thead { tr { th scope="col" { "Pixel" } th scope="col" { "Id" } th scope="col" { "State" } th scope="col" { "Waiting" } th scope="col" { "Oldest waiting for" } th scope="col" { "Why" } th scope="col" { "Until" } } }
                        tbody {
                            @for pixel in &data.pixels {
                                @let queue = stats.by_pixel.iter().find(|q| q.pixel_id == pixel.pixel_id);
                                tr data-pixel=(pixel.name) {
                                    td { (pixel.name) }
                                    td class="mono nowrap" { (pixel.pixel_id) }
                                    td { (state_badge(&pixel.state)) }
                                    td data-metric="pixel-queued" { (queue.map_or(0, |q| q.queued)) }
                                    td { @if let Some(oldest) = queue.and_then(|q| q.oldest_queued_at) { (duration(data.now - oldest)) } }
                                    td { (pixel.reason.as_deref().unwrap_or("")) }
                                    td { @if let Some(until) = pixel.until { (time(until)) } }
                                }
                            }
                        }
                    }
                }
            }
            (activity("hour", "Last hour, per 5 minutes", &data.hour))
            (activity("day", "Last 24 hours, per hour", &data.day))
            h2 { "Latest errors from Meta" }
            @if data.errors.is_empty() {
                p { "None recorded." }
            } @else {
                div class="scroll" { (errors_table(&data.errors)) }
            }
        },
    )
}

fn meta_code(record: &crate::store::AttemptRecord) -> String {
    match (record.http_status, record.code, record.subcode) {
        (_, Some(code), Some(sub)) => format!("{code}/{sub}"),
        (_, Some(code), None) => code.to_string(),
        (Some(status), None, _) => format!("HTTP {status}"),
        (None, None, _) => String::new(),
    }
}

fn meta_message(record: &crate::store::AttemptRecord) -> String {
    match (&record.error_title, &record.error_message) {
        (Some(title), Some(message)) => format!("{title}: {message}"),
        (Some(text), None) | (None, Some(text)) => text.clone(),
        (None, None) => String::new(),
    }
}

fn errors_table(errors: &[RecentError]) -> Markup {
    html! {
        table class="responsive" {
            thead { tr {
                th scope="col" { "When" } th scope="col" { "Event" } th scope="col" { "Outcome" }
                th scope="col" { "Code" } th scope="col" { "Meta said" }
                th scope="col" class="hide-narrow" { "fbtrace_id" }
            } }
            tbody {
                @for error in errors {
                    tr {
                        td class="nowrap" data-label="When" { (time(error.attempt.attempted_at)) }
                        td class="mono nowrap" data-label="Event" { a href=(event_href(&error.event_id)) { (error.event_id) } " " (error.event_name) }
                        td data-label="Outcome" { (error.attempt.record.outcome) }
                        td class="mono nowrap" data-label="Code" { (meta_code(&error.attempt.record)) }
                        td data-label="Meta said" { (meta_message(&error.attempt.record)) }
                        td class="mono nowrap hide-narrow" { (error.attempt.record.fbtrace_id.as_deref().unwrap_or("")) }
                    }
                }
            }
        }
    }
}

/// The search form's values, as typed.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct EventSearch {
    #[serde(default)]
    pub event_id: String,
    #[serde(default)]
    pub event_name: String,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub to: String,
    #[serde(default)]
    pub before: String,
}

impl EventSearch {
    /// This search's URL: its first page, or the page of rows older than `before`.
    pub fn href(&self, before: Option<i64>) -> String {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        for (key, value) in [
            ("event_id", &self.event_id),
            ("event_name", &self.event_name),
            ("source", &self.source),
            ("state", &self.state),
            ("from", &self.from),
            ("to", &self.to),
        ] {
            if !value.is_empty() {
                query.append_pair(key, value);
            }
        }
        if let Some(before) = before {
            query.append_pair("before", &before.to_string());
        }
        format!("/admin/events?{}", query.finish())
    }
}

/// `/admin/events`: the search form and one page of results.
pub fn events(
    search: &EventSearch,
    problem: Option<&str>,
    rows: &[EventSummary],
    older: Option<i64>,
    csrf: &str,
) -> Markup {
    page(
        "Events",
        Some((Nav::Events, csrf)),
        html! {
            h1 { "Events" }
            form class="search" method="get" action="/admin/events" role="search" {
                div {
                    label for="event_id" { "Event id" }
                    input id="event_id" name="event_id" type="search" value=(search.event_id);
                }
                div {
                    label for="event_name" { "Event name" }
                    input id="event_name" name="event_name" type="search" value=(search.event_name) placeholder="Lead";
                }
                div {
                    label for="source" { "Source" }
                    input id="source" name="source" type="search" value=(search.source) placeholder="api";
                }
                div {
                    label for="state" { "State" }
                    select id="state" name="state" {
                        option value="" selected[search.state.is_empty()] { "any" }
                        @for state in EVENT_STATES {
                            option value=(state) selected[search.state == state] { (state) }
                        }
                    }
                }
                div {
                    label for="from" { "Received from (UTC)" }
                    input id="from" name="from" type="datetime-local" value=(search.from);
                }
                div {
                    label for="to" { "Received before (UTC)" }
                    input id="to" name="to" type="datetime-local" value=(search.to);
                }
                div { button type="submit" { "Search" } }
            }
            (error_notice(problem))
            @if rows.is_empty() {
                p { "No events match." }
            } @else {
                div class="scroll" {
                    table class="responsive" {
                        caption { "Newest first" }
                        thead { tr {
                            th scope="col" { "Received" } th scope="col" { "Event id" } th scope="col" { "Name" }
                            th scope="col" { "Source" } th scope="col" { "State" } th scope="col" class="num" { "Attempts" }
                            th scope="col" class="hide-narrow" { "Pixel" } th scope="col" class="hide-narrow" { "Last error" }
                        } }
                        tbody {
                            @for row in rows {
                                tr {
                                    td class="nowrap" data-label="Received" { (time(row.received_at)) }
                                    td class="mono nowrap" data-label="Event id" { a href=(event_href(&row.event_id)) { (row.event_id) } }
                                    td data-label="Name" { (row.event_name) }
                                    td class="mono" data-label="Source" { (row.source.as_deref().unwrap_or("")) }
                                    td data-label="State" { (state_badge(&row.state)) }
                                    td class="num" data-label="Attempts" { (row.attempts) }
                                    td class="mono nowrap hide-narrow" { (row.pixel_id) }
                                    td class="hide-narrow" { (row.last_error.as_deref().unwrap_or("")) }
                                }
                            }
                        }
                    }
                }
            }
            nav class="pager" aria-label="Pages" {
                @if !search.before.is_empty() {
                    a href=(search.href(None)) { "Newest" }
                }
                @if let Some(older) = older {
                    a href=(search.href(Some(older))) rel="next" { "Older" }
                }
            }
        },
    )
}

/// `/admin/events/<id>`.
pub fn event(detail: &EventDetail, message: Option<&str>, csrf: &str) -> Markup {
    let retryable = matches!(detail.state.as_str(), "dead" | "failed");
    let payload = serde_json::to_string_pretty(&detail.payload).unwrap_or_default();
    page(
        &format!("Event {}", detail.event_id),
        Some((Nav::Events, csrf)),
        html! {
            h1 { "Event " span class="mono" { (detail.event_id) } }
            (notice(message))
            dl class="facts" {
                dt { "Name" } dd { (detail.event_name) }
                dt { "State" } dd data-field="state" { (state_badge(&detail.state)) }
                dt { "Pixel" } dd class="mono" { (detail.pixel_id) }
                @if let Some(source) = &detail.source { dt { "Source" } dd class="mono" { (source) } }
                dt { "Received" } dd { (time(detail.received_at)) }
                dt { "Attempts" } dd { (detail.attempts) }
                @if let Some(at) = detail.delivered_at { dt { "Delivered" } dd { (time(at)) } }
                @if let Some(at) = detail.next_attempt_at { dt { "Next attempt" } dd { (time(at)) } }
                @if let Some(code) = &detail.test_event_code { dt { "Test event code" } dd class="mono" { (code) } }
                @if let Some(error) = &detail.last_error { dt { "Last error" } dd { (error) } }
            }
            @if retryable {
                form method="post" action=(format!("{}/retry", event_href(&detail.event_id))) {
                    (csrf_field(csrf))
                    button type="submit" { @if detail.state == "dead" { "Replay this event" } @else { "Retry now" } }
                }
            }
            h2 { "Meta's answers" }
            @if detail.attempts_log.is_empty() {
                p { "No attempt yet." }
            } @else {
                div class="scroll" { (attempts_table(&detail.attempts_log)) }
            }
            h2 { "Payload sent (hashed)" }
            pre { code { (payload) } }
        },
    )
}

fn attempts_table(attempts: &[AttemptView]) -> Markup {
    html! {
        table class="responsive" {
            thead { tr {
                th scope="col" { "When" } th scope="col" { "Outcome" } th scope="col" { "HTTP" }
                th scope="col" { "Code" } th scope="col" { "Meta said" } th scope="col" { "fbtrace_id" }
            } }
            tbody {
                @for attempt in attempts {
                    tr {
                        td class="nowrap" data-label="When" { (time(attempt.attempted_at)) }
                        td data-label="Outcome" { (attempt.record.outcome) }
                        td class="num" data-label="HTTP" { (attempt.record.http_status.map(|s| s.to_string()).unwrap_or_default()) }
                        td class="mono nowrap" data-label="Code" { (meta_code(&attempt.record)) }
                        td data-label="Meta said" { (meta_message(&attempt.record)) }
                        td class="mono nowrap" data-label="fbtrace_id" { (attempt.record.fbtrace_id.as_deref().unwrap_or("")) }
                    }
                }
            }
        }
    }
}

/// Parked payloads sharing a source and the same problems.
#[derive(Debug, Clone)]
pub struct ParkedGroup {
    /// Stable handle for the replay form (a digest of source and problems).
    pub key: String,
    pub source: String,
    pub problems: Vec<String>,
    pub count: usize,
    pub last_at: i64,
    pub ids: Vec<i64>,
}

/// Everything the dead-letters page shows.
pub struct DeadLetters {
    pub dead: Vec<ReasonCount>,
    pub parked: Vec<ParkedGroup>,
    /// More parked payloads exist than were grouped.
    pub parked_truncated: bool,
}

/// `/admin/dead`.
pub fn dead_letters(data: &DeadLetters, message: Option<&str>, csrf: &str) -> Markup {
    page(
        "Dead letters",
        Some((Nav::Dead, csrf)),
        html! {
            h1 { "Dead letters and parked payloads" }
            (notice(message))
            h2 { "Dead events, by reason" }
            p { "Meta refused these for good, or they ran out of time. Fix the cause, then replay a group: its events are queued again with their original event ids (Meta deduplicates)." }
            @if data.dead.is_empty() {
                p { "No dead events." }
            } @else {
                div class="scroll" {
                    table {
                        thead { tr { th scope="col" { "Reason" } th scope="col" class="num" { "Events" } th scope="col" { "Latest" } th scope="col" { "Action" } } }
                        tbody {
                            @for group in &data.dead {
                                tr {
                                    td { @if group.reason.is_empty() { "(no reason recorded)" } @else { (group.reason) } }
                                    td class="num" data-metric="dead-count" { (group.count) }
                                    td class="nowrap" { (time(group.last_at)) }
                                    td {
                                        form method="post" action="/admin/dead/replay" {
                                            (csrf_field(csrf))
                                            input type="hidden" name="reason" value=(group.reason);
                                            button type="submit" class="nowrap" {
                                                "Replay " (group.count)
                                                span class="visually-hidden" { " dead events with this reason" }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            h2 { "Parked source payloads, by reason" }
            p { "Payloads from sources that a rule or Meta's rules refused; their contents are not shown. Fix the rule or the sender, then replay." }
            @if data.parked.is_empty() {
                p { "No parked payloads." }
            } @else {
                @if data.parked_truncated {
                    p { "Only the newest payloads are grouped here; “Replay all” takes every parked payload." }
                }
                div class="scroll" {
                    table {
                        thead { tr { th scope="col" { "Source" } th scope="col" { "Problems" } th scope="col" class="num" { "Payloads" } th scope="col" { "Latest" } th scope="col" { "Action" } } }
                        tbody {
                            @for group in &data.parked {
                                tr {
                                    td class="mono nowrap" { (group.source) }
                                    td { ul { @for problem in &group.problems { li { (problem) } } } }
                                    td class="num" { (group.count) }
                                    td class="nowrap" { (time(group.last_at)) }
                                    td {
                                        form method="post" action="/admin/parked/replay" {
                                            (csrf_field(csrf))
                                            input type="hidden" name="group" value=(group.key);
                                            button type="submit" class="nowrap" {
                                                "Replay " (group.count)
                                                span class="visually-hidden" { " payloads with these problems" }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                form method="post" action="/admin/parked/replay" {
                    (csrf_field(csrf))
                    input type="hidden" name="group" value="all";
                    button type="submit" class="secondary" { "Replay all parked payloads" }
                }
            }
        },
    )
}

/// The periods the match-quality page offers, in days.
pub const QUALITY_PERIODS: [(u32, &str); 3] = [(1, "Today"), (7, "7 days"), (30, "30 days")];

fn percent(share: f64) -> String {
    format!("{:.0}%", share * 100.0)
}

/// `/admin/quality`: per event name the share of events carrying each match key (and how many
/// the match-key memory filled), the values the normalizer dropped, and Meta's own EMQ.
pub fn quality(report: &QualityReport, days: u32, csrf: &str) -> Markup {
    page(
        "Match quality",
        Some((Nav::Quality, csrf)),
        html! {
            h1 { "Match quality" }
            nav class="pager" aria-label="Period" {
                @for (n, label) in QUALITY_PERIODS {
                    @if n == days {
                        a href=(format!("/admin/quality?days={n}")) aria-current="page" { strong { (label) } }
                    } @else {
                        a href=(format!("/admin/quality?days={n}")) { (label) }
                    }
                }
            }
            p { "Since " (time(report.since_ms)) ". The share of stored events that carried each match key; in brackets, how many of those the match-key memory filled in." }
            @if report.events.is_empty() {
                p { "No events in this period." }
            } @else {
                div class="scroll" {
                    table class="responsive" {
                        thead { tr {
                            th scope="col" { "Event" } th scope="col" class="num" { "Events" }
                            @for key in MatchKey::ALL { th scope="col" class="num" { (key.as_str()) } }
                        } }
                        tbody {
                            @for event in &report.events {
                                tr {
                                    th scope="row" data-label="Event" {
                                        (event.event_name)
                                        @if report.meta.len() > 1 { " " span class="mono" { (event.pixel_id) } }
                                    }
                                    td class="num" data-label="Events" { (event.events) }
                                    @for share in &event.keys {
                                        td class="num" data-label=(share.key.as_str())
                                            data-metric=(format!("quality-{}-{}", event.event_name, share.key.as_str())) {
                                            (percent(share.share))
                                            @if share.filled_from_memory > 0 { " (" (share.filled_from_memory) ")" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            h2 { "Values dropped by the normalizer" }
            p { "Invalid values are left out of what Meta gets; they are counted here by field and reason, never shown." }
            @if report.dropped.is_empty() {
                p { "None." }
            } @else {
                div class="scroll" {
                    table class="responsive" {
                        thead { tr { th scope="col" { "Event" } th scope="col" { "Field" } th scope="col" { "Reason" } th scope="col" class="num" { "Values" } } }
                        tbody {
                            @for dropped in &report.dropped {
                                tr {
                                    td data-label="Event" { (dropped.event_name) }
                                    td class="mono" data-label="Field" { (dropped.field) }
                                    td data-label="Reason" { (dropped.reason) }
                                    td class="num" data-label="Values" { (dropped.count) }
                                }
                            }
                        }
                    }
                }
            }
            h2 { "Meta's Event Match Quality" }
            @if report.meta.is_empty() {
                p { "No pixel is configured (dry run)." }
            }
            @for pixel in &report.meta {
                h3 { "Pixel " span class="mono" { (pixel.pixel_id) } }
                @if let Some(reason) = &pixel.not_available {
                    p { (reason) }
                }
                @if let Some(events) = &pixel.events {
                    @if events.is_empty() {
                        p { "Meta has no score for this pixel yet." }
                    } @else {
                        div class="scroll" {
                            table class="responsive" {
                                thead { tr { th scope="col" { "Event" } th scope="col" class="num" { "EMQ (0–10)" } th scope="col" { "Coverage as Meta saw it" } } }
                                tbody {
                                    @for event in events {
                                        tr {
                                            td data-label="Event" { (event.event_name) }
                                            td class="num" data-label="EMQ" { (event.composite_score.map(|s| format!("{s:.1}")).unwrap_or_default()) }
                                            td data-label="Coverage" {
                                                @for (i, key) in event.match_key_coverage.iter().enumerate() {
                                                    @if i > 0 { ", " }
                                                    (key.identifier) " " (format!("{:.0}%", key.percentage))
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// Standard event names offered by the test form.
pub const TEST_EVENT_NAMES: [&str; 10] = [
    "Lead",
    "Purchase",
    "CompleteRegistration",
    "Contact",
    "Schedule",
    "SubmitApplication",
    "InitiateCheckout",
    "AddToCart",
    "ViewContent",
    "Subscribe",
];

/// What Meta answered to a test event.
pub struct TestOutcome {
    pub pixel_id: String,
    pub event_name: String,
    pub test_event_code: String,
    /// `Ok(fbtrace_id)` when Meta received it, else Meta's error in words.
    pub answer: Result<Option<String>, TestRefusal>,
    pub payload: String,
}

/// Meta's refusal of a test event.
pub struct TestRefusal {
    pub code: String,
    pub message: String,
    pub fbtrace_id: Option<String>,
}

/// `/admin/test`: the form, and Meta's answer after a send.
pub fn test_event(
    pixels: &[(String, String)],
    default_code: &str,
    outcome: Option<&TestOutcome>,
    problem: Option<&str>,
    csrf: &str,
) -> Markup {
    page(
        "Test event",
        Some((Nav::Test, csrf)),
        html! {
            h1 { "Send a test event" }
            p { "The event goes straight to Meta with your test event code, so it shows in Events Manager under " em { "Test events" } " and counts nowhere else. It is not stored here." }
            (error_notice(problem))
            @if pixels.is_empty() {
                p class="error" { "No pixel is configured (dry run): there is nothing to send a test event to. Set META_PIXEL_ID and META_ACCESS_TOKEN." }
            } @else {
                form class="stack" method="post" action="/admin/test" {
                    (csrf_field(csrf))
                    div {
                        label for="pixel" { "Pixel" }
                        select id="pixel" name="pixel" {
                            @for (name, id) in pixels { option value=(id) { (name) " (" (id) ")" } }
                        }
                    }
                    div {
                        label for="event_name" { "Event name" }
                        select id="event_name" name="event_name" {
                            @for name in TEST_EVENT_NAMES { option value=(name) { (name) } }
                        }
                    }
                    div {
                        label for="test_event_code" { "Test event code (from Events Manager → Test events)" }
                        input id="test_event_code" name="test_event_code" required
                            pattern="[A-Za-z0-9_\\-]{1,64}" value=(default_code) placeholder="TEST12345";
                    }
                    div { button type="submit" { "Send test event" } }
                }
            }
            @if let Some(outcome) = outcome {
                section aria-labelledby="answer-heading" {
                    h2 id="answer-heading" { "Meta's answer" }
                    @match &outcome.answer {
                        Ok(fbtrace_id) => {
                            p class="notice" role="status" data-outcome="received" {
                                "Meta received it: events_received 1"
                                @if let Some(id) = fbtrace_id { ", fbtrace_id " span class="mono" { (id) } }
                                ". Look for " (outcome.event_name) " under test code " span class="mono" { (outcome.test_event_code) }
                                " on pixel " span class="mono" { (outcome.pixel_id) } "."
                            }
                        }
                        Err(refusal) => {
                            p class="error" role="alert" data-outcome="refused" {
                                "Meta refused it"
                                @if !refusal.code.is_empty() { " (" (refusal.code) ")" }
                                ": " (refusal.message)
                                @if let Some(id) = &refusal.fbtrace_id { " — fbtrace_id " span class="mono" { (id) } }
                            }
                        }
                    }
                    h3 { "What was sent (hashed)" }
                    pre { code { (outcome.payload) } }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(0), "0 s");
        assert_eq!(duration(45_999), "45 s");
        assert_eq!(duration(192_000), "3 min 12 s");
        assert_eq!(duration(7_500_000), "2 h 5 min");
        assert_eq!(duration(4 * 86_400_000 + 3 * 3_600_000), "4 d 3 h");
    }

    #[test]
    fn each_pixel_shows_its_own_queue() {
        let status = |name: &str, id: &str, state: &str| PixelStatus {
            name: name.to_owned(),
            pixel_id: id.to_owned(),
            state: state.to_owned(),
            ..PixelStatus::default()
        };
        let now = 1_790_000_000_000;
        let data = Overview {
            now,
            stats: QueueStats::from_counts([
                (
                    "queued".to_owned(),
                    "222".to_owned(),
                    7,
                    Some(now - 192_000),
                ),
                ("delivered".to_owned(), "111".to_owned(), 3, None),
            ]),
            pixels: vec![
                status("shop", "111", "running"),
                status("clinic", "222", "paused"),
            ],
            dry_run: false,
            hour: Vec::new(),
            day: Vec::new(),
            errors: Vec::new(),
        };
        let html = overview(&data, "token").into_string();
        let row = |name: &str| {
            let start = html
                .find(&format!("data-pixel=\"{name}\""))
                .unwrap_or_else(|| panic!("{name}'s row in {html}"));
            html[start..].split("</tr>").next().unwrap_or("").to_owned()
        };
        assert!(row("clinic").contains(">7</td>"), "{}", row("clinic"));
        assert!(row("clinic").contains("3 min 12 s"), "{}", row("clinic"));
        assert!(row("shop").contains(">0</td>"), "{}", row("shop"));
    }

    #[test]
    fn event_links_encode_the_id() {
        assert_eq!(event_href("a b/c?d"), "/admin/events/a%20b%2Fc%3Fd");
        assert_eq!(event_href("lead-1_x~"), "/admin/events/lead-1_x~");
        assert_eq!(event_href(".."), "/admin/events/%2E%2E");
    }

    #[test]
    fn text_from_the_store_is_escaped() {
        let search = EventSearch {
            event_id: "\"><script>alert(1)</script>".to_owned(),
            ..EventSearch::default()
        };
        let html = events(&search, None, &[], None, "token").into_string();
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;"), "{html}");
    }

    #[test]
    fn the_policy_allows_exactly_the_inline_stylesheet() {
        let expected = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(CSS));
        assert!(CONTENT_SECURITY_POLICY.contains(&format!("'sha256-{expected}'")));
        assert!(CONTENT_SECURITY_POLICY.contains("default-src 'none'"));
        let html = login(None).into_string();
        assert!(
            html.contains(&format!("<style>{CSS}</style>")),
            "the hashed text is the text served"
        );
    }
}
