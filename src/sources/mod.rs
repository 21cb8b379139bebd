//! Webhook sources (Supabase database webhooks, Chatwoot, CRMs): their configuration, and the
//! [`Mapper`] that turns one of their payloads into events with the mapping rules
//! ([`crate::domain::rules`]), fetching rows the rules ask for.

pub mod settings;
pub mod supabase_rest;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;

use crate::domain::rules::{Input, RuleFailure};
pub use settings::{SourceConfig, SourcesConfig};

/// Fetches one row for a rule's `lookups` (the Supabase REST API in production).
#[async_trait]
pub trait RowLookup: Send + Sync {
    /// The row of `table` whose `column` equals `value`, if any.
    ///
    /// # Errors
    /// A description of what failed, free of the key and the value (it may be personal data).
    async fn fetch_row(
        &self,
        table: &str,
        column: &str,
        value: &str,
    ) -> Result<Option<Value>, String>;
}

#[async_trait]
impl RowLookup for supabase_rest::SupabaseRest {
    async fn fetch_row(
        &self,
        table: &str,
        column: &str,
        value: &str,
    ) -> Result<Option<Value>, String> {
        supabase_rest::SupabaseRest::fetch_row(self, table, column, value)
            .await
            .map_err(|err| err.to_string())
    }
}

/// The row lookups the configuration allows: Supabase's REST API when its URL and key are set.
///
/// # Errors
/// A client that cannot be built (the configuration was validated, so this is rare).
pub fn lookups_from(
    config: &crate::config::Config,
) -> Result<Option<Arc<dyn RowLookup>>, supabase_rest::LookupError> {
    match &config.supabase {
        Some(api) => {
            let client =
                supabase_rest::SupabaseRest::from_config(api, supabase_rest::DEFAULT_TIMEOUT)?;
            Ok(Some(Arc::new(client)))
        }
        None => Ok(None),
    }
}

/// What a payload became.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Mapped {
    /// No rule applies: acknowledged and counted, nothing sent.
    Unmatched,
    /// The events to ingest, in rule order (the flat `POST /v1/events` shape), with the rule
    /// that made each.
    Events {
        /// Events.
        events: Vec<Value>,
        /// Rule names, one per event.
        rules: Vec<String>,
    },
    /// A rule applies but cannot be evaluated on this payload: the payload is parked.
    Failed {
        /// Why, naming rule and field.
        failures: Vec<RuleFailure>,
    },
    /// A lookup could not be made now (network, Supabase down): try again later.
    Retry {
        /// Why.
        reason: String,
    },
}

/// Applies the rules to payloads of the configured sources.
#[derive(Clone)]
pub struct Mapper {
    config: SourcesConfig,
    lookups: Option<Arc<dyn RowLookup>>,
}

impl Mapper {
    /// A mapper over `config`; `lookups` serves rules with `lookups` (none: such rules fail
    /// with a message saying what to configure).
    pub fn new(config: SourcesConfig, lookups: Option<Arc<dyn RowLookup>>) -> Self {
        Self { config, lookups }
    }

    /// The source called `name`.
    pub fn source(&self, name: &str) -> Option<&SourceConfig> {
        self.config.get(name)
    }

    /// Whether any rule could apply: the cheap, synchronous check made before a payload is
    /// stored, so a payload no rule wants is acknowledged without keeping it (it may hold
    /// personal data). `Err` means a condition fails on it: it is kept and parked.
    ///
    /// # Errors
    /// The failing condition.
    pub fn any_rule_matches(
        &self,
        source: &str,
        payload: &Value,
        received_at: i64,
    ) -> Result<bool, RuleFailure> {
        let Some(config) = self.config.get(source) else {
            return Ok(false);
        };
        let input = Input {
            source,
            kind: config.kind,
            payload,
            received_at,
        };
        Ok(!self.config.rules.matching(source, &input)?.is_empty())
    }

    /// The events `payload` of `source` becomes.
    pub async fn map(&self, source: &str, payload: &Value, received_at: i64) -> Mapped {
        let Some(config) = self.config.get(source) else {
            return Mapped::Unmatched;
        };
        let rules = &self.config.rules;
        let input = Input {
            source,
            kind: config.kind,
            payload,
            received_at,
        };
        let matched = match rules.matching(source, &input) {
            Ok(matched) if matched.is_empty() => return Mapped::Unmatched,
            Ok(matched) => matched,
            Err(failure) => {
                return Mapped::Failed {
                    failures: vec![failure],
                }
            }
        };
        let mut events = Vec::with_capacity(matched.len());
        let mut names = Vec::with_capacity(matched.len());
        let mut failures = Vec::new();
        for rule in matched {
            let requests = match rules.lookup_requests(rule, &input) {
                Ok(requests) => requests,
                Err(failure) => {
                    failures.push(failure);
                    continue;
                }
            };
            let mut rows = BTreeMap::new();
            for request in requests {
                let Some(lookups) = &self.lookups else {
                    failures.push(RuleFailure {
                        rule: rules.name(rule).to_owned(),
                        field: format!("lookups.{}", request.name),
                        reason: "lookups need SUPABASE_URL (or NEXT_PUBLIC_SUPABASE_URL) and SUPABASE_SERVICE_KEY".to_owned(),
                    });
                    continue;
                };
                match lookups
                    .fetch_row(&request.table, &request.column, &request.value)
                    .await
                {
                    Ok(row) => {
                        rows.insert(request.name, row.unwrap_or(Value::Null));
                    }
                    Err(reason) => {
                        return Mapped::Retry {
                            reason: format!(
                                "rule {:?}: lookup {:?} in {}: {reason}",
                                rules.name(rule),
                                request.name,
                                request.table
                            ),
                        }
                    }
                }
            }
            match rules.build_event(rule, &input, &rows) {
                Ok(event) => {
                    events.push(event);
                    names.push(rules.name(rule).to_owned());
                }
                Err(failure) => failures.push(failure),
            }
        }
        if failures.is_empty() {
            Mapped::Events {
                events,
                rules: names,
            }
        } else {
            Mapped::Failed { failures }
        }
    }
}
