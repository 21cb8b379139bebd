//! The pure core: Meta's event model and rules. Parses what callers send, validates it against
//! the Conversions API's rules, and normalizes and hashes customer information.
//!
//! Nothing here does I/O, reads the clock or the environment, or logs: time and id generation
//! are passed in. Everything is tested with tables and property tests.

pub mod browser;
pub mod chatwoot;
pub mod event;
pub mod match_keys;
pub mod normalize;
pub mod quality;
pub mod rules;

pub use event::{
    normalize_event, split_request, ActionSource, IngestRules, NormalizedEvent, Problem,
    RequestEvents, Warning, MAX_EVENTS_PER_REQUEST,
};
