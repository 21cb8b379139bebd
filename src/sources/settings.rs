//! Configuration of the webhook sources (`[sources.<name>]`) and the mapping rules
//! (`[[rules]]`, also from `RULES_FILE`), read by [`crate::config::load`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use crate::config::Env;
use crate::domain::rules::{PayloadKind, RuleSet, RuleSpec};

/// Shortest URL token accepted: it is the only thing standing between the internet and an
/// unsigned sender.
const MIN_TOKEN_LEN: usize = 24;

/// A place payloads come from: `POST /v1/sources/<name>`.
#[derive(Clone)]
pub struct SourceConfig {
    /// The path segment.
    pub name: String,
    /// How its payloads look.
    pub kind: PayloadKind,
    /// Accepted as the last path segment (`/v1/sources/<name>/<token>`) by senders that
    /// cannot set headers.
    pub url_token: Option<String>,
    /// Chatwoot's per-webhook secret: `X-Chatwoot-Signature` is verified with it.
    pub signing_secret: Option<String>,
    /// The pixel (name or id) its events go to unless a rule names another.
    pub pixel: Option<String>,
}

impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceConfig")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("url_token", &self.url_token.as_ref().map(|_| "<set>"))
            .field(
                "signing_secret",
                &self.signing_secret.as_ref().map(|_| "<set>"),
            )
            .field("pixel", &self.pixel)
            .finish()
    }
}

/// The sources and the compiled rules.
#[derive(Clone, Debug)]
pub struct SourcesConfig {
    /// Every source, `supabase` and `chatwoot` always among them.
    pub sources: Vec<SourceConfig>,
    /// Rules for all sources (the shipped Chatwoot rules included unless replaced).
    pub rules: Arc<RuleSet>,
}

impl Default for SourcesConfig {
    fn default() -> Self {
        Self {
            sources: Vec::new(),
            rules: Arc::new(RuleSet::empty()),
        }
    }
}

impl SourcesConfig {
    /// The source called `name`.
    pub fn get(&self, name: &str) -> Option<&SourceConfig> {
        self.sources.iter().find(|s| s.name == name)
    }
}

/// `[sources.<name>]` in the TOML file. Secrets come from the environment only.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileSource {
    /// `supabase`, `chatwoot` or `generic`; the name when that is one of them.
    kind: Option<String>,
    /// Chatwoot: the custom attribute holding a deal's value (default `deal_value`).
    value_attribute: Option<String>,
    /// Chatwoot: the currency of that value when the conversation has no `currency` attribute.
    currency: Option<String>,
    /// Chatwoot: sent with Click-to-WhatsApp events.
    whatsapp_business_account_id: Option<String>,
    /// Chatwoot: `false` turns the shipped rules off.
    default_rules: Option<bool>,
    /// The pixel (name or id) of this source's events.
    pixel: Option<String>,
}

/// The rules file: `[[rules]]` entries only.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    rules: Vec<RuleSpec>,
}

/// Reads sources and rules; problems are appended to `problems`.
pub(crate) fn load(
    env: &Env,
    file_sources: BTreeMap<String, FileSource>,
    mut rules: Vec<RuleSpec>,
    rules_file: Option<String>,
    problems: &mut Vec<String>,
) -> SourcesConfig {
    if let Some(path) = env.get("RULES_FILE").or(rules_file) {
        match std::fs::read_to_string(Path::new(&path)) {
            Ok(text) => match toml::from_str::<RulesFile>(&text) {
                Ok(file) => rules.extend(file.rules),
                Err(err) => problems.push(format!("{path}: {}", err.message().trim_end())),
            },
            Err(err) => problems.push(format!("cannot read RULES_FILE {path}: {err}")),
        }
    }

    let mut declared = file_sources;
    for builtin in ["supabase", "chatwoot"] {
        declared.entry(builtin.to_owned()).or_default();
    }
    let mut sources = Vec::new();
    for (name, file) in &declared {
        let valid_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if !valid_name {
            problems.push(format!(
                "sources.{name}: a source name must be lowercase letters, digits, - or _"
            ));
            continue;
        }
        let kind_text = file.kind.clone().unwrap_or_else(|| match name.as_str() {
            "supabase" | "chatwoot" => name.clone(),
            _ => "generic".to_owned(),
        });
        let Some(kind) = PayloadKind::parse(&kind_text) else {
            problems.push(format!(
                "sources.{name}.kind must be supabase, chatwoot or generic, got {kind_text:?}"
            ));
            continue;
        };
        let var = name.to_ascii_uppercase().replace('-', "_");
        let url_token = env
            .get(&format!("SOURCE_{var}_TOKEN"))
            .or_else(|| match name.as_str() {
                "supabase" => env.get("SUPABASE_WEBHOOK_TOKEN"),
                "chatwoot" => env.get("CHATWOOT_WEBHOOK_TOKEN"),
                _ => None,
            });
        if let Some(token) = &url_token {
            if token.len() < MIN_TOKEN_LEN || token.contains('/') {
                problems.push(format!(
                    "SOURCE_{var}_TOKEN must be at least {MIN_TOKEN_LEN} characters without '/' (it is the only protection of /v1/sources/{name}/<token>)"
                ));
            }
        }
        let signing_secret = env
            .get(&format!("SOURCE_{var}_SIGNING_SECRET"))
            .or_else(|| (name == "chatwoot").then(|| env.get("CHATWOOT_WEBHOOK_SECRET"))?);
        if signing_secret.is_some() && kind != PayloadKind::Chatwoot {
            problems.push(format!(
                "SOURCE_{var}_SIGNING_SECRET is only used by chatwoot sources (X-Chatwoot-Signature); {name} is {kind_text}"
            ));
        }
        let has_own_rules = rules.iter().any(|r| &r.source == name);
        if kind == PayloadKind::Chatwoot && file.default_rules != Some(false) && !has_own_rules {
            match chatwoot_default_rules(name, file) {
                Ok(defaults) => rules.extend(defaults),
                Err(problem) => problems.push(problem),
            }
        }
        sources.push(SourceConfig {
            name: name.clone(),
            kind,
            url_token,
            signing_secret,
            pixel: file.pixel.clone(),
        });
    }

    let kinds: BTreeMap<String, PayloadKind> =
        sources.iter().map(|s| (s.name.clone(), s.kind)).collect();
    let rules = match RuleSet::compile(&rules, |source| kinds.get(source).copied()) {
        Ok(set) => set,
        Err(rule_problems) => {
            problems.extend(rule_problems);
            RuleSet::empty()
        }
    };
    SourcesConfig {
        sources,
        rules: Arc::new(rules),
    }
}

/// The shipped Chatwoot rules (README "Chatwoot"), for source `name`.
const CHATWOOT_DEFAULTS: &str = include_str!("chatwoot_rules.toml");

fn chatwoot_default_rules(name: &str, file: &FileSource) -> Result<Vec<RuleSpec>, String> {
    let value_attribute = file.value_attribute.as_deref().unwrap_or("deal_value");
    let identifier_ok = |s: &str| {
        !s.is_empty()
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !s.starts_with(|c: char| c.is_ascii_digit())
    };
    if !identifier_ok(value_attribute) {
        return Err(format!(
            "sources.{name}.value_attribute must be a custom attribute key (letters, digits, _), got {value_attribute:?}"
        ));
    }
    let currency = match &file.currency {
        Some(code) if code.len() == 3 && code.chars().all(|c| c.is_ascii_alphabetic()) => {
            format!("\"{}\"", code.to_ascii_uppercase())
        }
        Some(code) => {
            return Err(format!(
                "sources.{name}.currency must be an ISO 4217 code such as BRL, got {code:?}"
            ))
        }
        None => "null".to_owned(),
    };
    let waba = match &file.whatsapp_business_account_id {
        Some(id) if id.chars().all(|c| c.is_ascii_digit()) => format!("\"{id}\""),
        Some(id) => {
            return Err(format!(
                "sources.{name}.whatsapp_business_account_id must be numeric, got {id:?}"
            ))
        }
        None => "null".to_owned(),
    };
    let text = CHATWOOT_DEFAULTS
        .replace("{source}", name)
        .replace("{value_attribute}", value_attribute)
        .replace("{currency}", &currency)
        .replace("{waba}", &waba);
    toml::from_str::<RulesFile>(&text)
        .map(|file| file.rules)
        .map_err(|err| format!("the shipped Chatwoot rules do not parse: {}", err.message()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_with(pairs: &[(&str, &str)], sources_toml: &str) -> (SourcesConfig, Vec<String>) {
        let env = Env::from_pairs(pairs.iter().copied());
        let sources: BTreeMap<String, FileSource> =
            toml::from_str(sources_toml).expect("sources parse");
        let mut problems = Vec::new();
        let config = load(&env, sources, Vec::new(), None, &mut problems);
        (config, problems)
    }

    #[test]
    fn the_shipped_chatwoot_rules_compile_with_and_without_settings() {
        let (config, problems) = load_with(&[], "");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(config.rules.count_for("chatwoot"), 3);
        let (config, problems) = load_with(
            &[],
            "[chatwoot]\ncurrency = \"brl\"\nvalue_attribute = \"amount\"\nwhatsapp_business_account_id = \"1234\"\n[helpdesk]\nkind = \"chatwoot\"",
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(config.rules.count_for("helpdesk"), 3);
        let (config, problems) = load_with(&[], "[chatwoot]\ndefault_rules = false");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(config.rules.count_for("chatwoot"), 0);
    }

    #[test]
    fn tokens_and_settings_are_checked() {
        let (_, problems) = load_with(
            &[
                ("SUPABASE_WEBHOOK_TOKEN", "short"),
                ("SOURCE_CRM_SIGNING_SECRET", "x"),
            ],
            "[crm]\nkind = \"supabase\"\n[chatwoot]\ncurrency = \"reais\"\n[Bad]\n",
        );
        let text = problems.join("\n");
        assert!(
            text.contains("SOURCE_SUPABASE_TOKEN must be at least 24"),
            "{text}"
        );
        assert!(text.contains("only used by chatwoot sources"), "{text}");
        assert!(
            text.contains("sources.chatwoot.currency must be an ISO 4217"),
            "{text}"
        );
        assert!(text.contains("sources.Bad: a source name"), "{text}");
    }

    #[test]
    fn the_readmes_rules_compile() {
        let readme = include_str!("../../README.md");
        let section = readme
            .split("## Sources and mapping rules")
            .nth(1)
            .expect("README section");
        let block = section
            .split("```toml")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("first toml block");
        let file: RulesFile = toml::from_str(block).expect("README rules parse");
        assert!(file.rules.len() >= 5);
        RuleSet::compile(&file.rules, |source| {
            matches!(source, "supabase" | "crm").then_some(PayloadKind::Supabase)
        })
        .expect("README rules compile");
    }

    #[test]
    fn debug_output_hides_tokens() {
        let (config, _) = load_with(
            &[("SUPABASE_WEBHOOK_TOKEN", "supabase-secret-token-0123456789")],
            "",
        );
        let text = format!("{config:?}");
        assert!(!text.contains("supabase-secret-token"), "{text}");
    }
}
