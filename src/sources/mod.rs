//! Webhook sources (Supabase database webhooks, Chatwoot, CRMs): their configuration, and the
//! [`Mapper`] that turns one of their payloads into events with the mapping rules
//! ([`crate::domain::rules`]), fetching rows the rules ask for.

pub mod counters;
pub mod settings;
pub mod supabase_rest;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::{json, Value};

use crate::domain::rules::{Input, RuleFailure};
use crate::ingest::IngestError;
pub use counters::SourceCounters;
pub use settings::{SourceConfig, SourcesConfig};

/// Fetches one row for a rule's `lookups` (the Supabase REST API in production).
#[async_trait]
pub trait RowLookup: Send + Sync {
    /// The row of `table` whose `column` equals `value`, if any.
    ///
    /// # Errors
    /// What failed, free of the key and the value (it may be personal data).
    async fn fetch_row(
        &self,
        table: &str,
        column: &str,
        value: &str,
    ) -> Result<Option<Value>, LookupFailure>;
}

/// Why a row could not be fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupFailure {
    /// In words, without the key or the value.
    pub reason: String,
    /// Worth trying again later (an outage), rather than parking the payload until a fix.
    pub transient: bool,
}

#[async_trait]
impl RowLookup for supabase_rest::SupabaseRest {
    async fn fetch_row(
        &self,
        table: &str,
        column: &str,
        value: &str,
    ) -> Result<Option<Value>, LookupFailure> {
        supabase_rest::SupabaseRest::fetch_row(self, table, column, value)
            .await
            .map_err(|err| LookupFailure {
                transient: err.is_transient(),
                reason: err.to_string(),
            })
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

    /// The events `payload` would become, as Meta would get them, or why none: shared by
    /// `POST /v1/rules/test` and `capi-bridge rules test`.
    pub async fn preview(
        &self,
        ingest_rules: &crate::domain::IngestRules,
        source: &str,
        payload: &Value,
        now_secs: i64,
    ) -> Value {
        match self.map(source, payload, now_secs).await {
            Mapped::Unmatched => json!({
                "source": source,
                "outcome": "unmatched",
                "reason": "no rule of this source matches the payload; it would be acknowledged and counted, nothing sent",
            }),
            Mapped::Failed { failures } => json!({
                "source": source,
                "outcome": "parked",
                "reason": "a rule matches but fails on the payload; it would be parked until the rule is fixed",
                "problems": failures,
            }),
            Mapped::Retry { reason } => json!({
                "source": source,
                "outcome": "retry",
                "reason": reason,
            }),
            Mapped::Events { events, rules } => {
                match crate::ingest::preview(ingest_rules, Value::Array(events), now_secs) {
                    Ok((normalized, warnings)) => json!({
                        "source": source,
                        "outcome": "events",
                        "events": normalized.iter().zip(&rules).map(|(event, rule)| json!({
                            "rule": rule,
                            "data": event.payload,
                        })).collect::<Vec<_>>(),
                        "warnings": warnings,
                    }),
                    Err(IngestError::Invalid(problems)) => json!({
                        "source": source,
                        "outcome": "parked",
                        "reason": "the rules' events break Meta's rules; the payload would be parked",
                        "rules": rules,
                        "problems": problems,
                    }),
                    Err(err) => json!({
                        "source": source,
                        "outcome": "parked",
                        "reason": err.to_string(),
                    }),
                }
            }
        }
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
            let mut not_found = Vec::new();
            let failures_before = failures.len();
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
                        if row.is_none() {
                            not_found.push(format!(
                                "lookup {:?} found no row in {} where {} = the value given",
                                request.name, request.table, request.column
                            ));
                        }
                        rows.insert(request.name, row.unwrap_or(Value::Null));
                    }
                    Err(failure) if failure.transient => {
                        return Mapped::Retry {
                            reason: format!(
                                "rule {:?}: lookup {:?} in {}: {}",
                                rules.name(rule),
                                request.name,
                                request.table,
                                failure.reason
                            ),
                        }
                    }
                    Err(failure) => failures.push(RuleFailure {
                        rule: rules.name(rule).to_owned(),
                        field: format!("lookups.{}", request.name),
                        reason: failure.reason,
                    }),
                }
            }
            if failures.len() > failures_before {
                // A row it needs is missing: its fields would only fail again.
                continue;
            }
            match rules.build_event(rule, &input, &rows) {
                Ok(event) => {
                    events.push(event);
                    names.push(rules.name(rule).to_owned());
                }
                Err(mut failure) => {
                    if !not_found.is_empty() {
                        failure.reason = format!("{} ({})", failure.reason, not_found.join("; "));
                    }
                    failures.push(failure);
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Env;
    use crate::domain::rules::RuleSpec;
    use serde_json::json;

    /// Answers every lookup with the same result.
    struct Fixed(Result<Option<Value>, LookupFailure>);

    #[async_trait]
    impl RowLookup for Fixed {
        async fn fetch_row(
            &self,
            _: &str,
            _: &str,
            _: &str,
        ) -> Result<Option<Value>, LookupFailure> {
            self.0.clone()
        }
    }

    fn mapper(lookups: Option<Arc<dyn RowLookup>>) -> Mapper {
        #[derive(serde::Deserialize)]
        struct File {
            rules: Vec<RuleSpec>,
        }
        let file: File = toml::from_str(
            r#"
            [[rules]]
            name = "payment"
            source = "supabase"
            event = "Purchase"
            lookups = [{ name = "lead", table = "leads", value = "record.lead_id" }]
            fields.email = "lead.email"
            fields.value = "record.amount"
            fields.currency = '"BRL"'
            "#,
        )
        .expect("rules parse");
        let mut problems = Vec::new();
        let config = settings::load(
            &Env::from_pairs(std::iter::empty::<(&str, &str)>()),
            BTreeMap::new(),
            file.rules,
            None,
            &mut problems,
        );
        assert!(problems.is_empty(), "{problems:?}");
        Mapper::new(config, lookups)
    }

    fn payment() -> Value {
        json!({"type": "INSERT", "table": "payments", "schema": "public",
               "record": {"lead_id": 7, "amount": 10}, "old_record": null})
    }

    async fn map(lookups: Option<Arc<dyn RowLookup>>) -> Mapped {
        mapper(lookups).map("supabase", &payment(), 0).await
    }

    #[tokio::test]
    async fn a_found_row_fills_the_event() {
        let found = Fixed(Ok(Some(json!({"email": "a@b.co"}))));
        let Mapped::Events { events, rules } = map(Some(Arc::new(found))).await else {
            panic!("events expected");
        };
        assert_eq!(events[0]["email"], "a@b.co");
        assert_eq!(rules, ["payment"]);
    }

    #[tokio::test]
    async fn an_outage_is_retried_and_a_configuration_problem_parks() {
        let outage = Fixed(Err(LookupFailure {
            reason: "did not answer".into(),
            transient: true,
        }));
        assert!(matches!(
            map(Some(Arc::new(outage))).await,
            Mapped::Retry { .. }
        ));

        let missing_table = Fixed(Err(LookupFailure {
            reason: "table \"leads\" was not found".into(),
            transient: false,
        }));
        let Mapped::Failed { failures } = map(Some(Arc::new(missing_table))).await else {
            panic!("parked expected");
        };
        // One reason: the fields that need the row are not tried.
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert_eq!(failures[0].field, "lookups.lead");
    }

    #[tokio::test]
    async fn lookups_without_supabase_configured_say_what_to_set() {
        let Mapped::Failed { failures } = map(None).await else {
            panic!("parked expected");
        };
        assert!(
            failures[0].reason.contains("SUPABASE_SERVICE_KEY"),
            "{failures:?}"
        );
    }

    #[tokio::test]
    async fn a_missing_row_parks_the_payload_saying_so() {
        let Mapped::Failed { failures } = map(Some(Arc::new(Fixed(Ok(None))))).await else {
            panic!("parked expected");
        };
        assert_eq!(failures[0].field, "fields.email");
        assert!(
            failures[0]
                .reason
                .contains("lookup \"lead\" found no row in leads"),
            "{failures:?}"
        );
    }
}
