//! Mapping rules: which events a source's payload (a Supabase database webhook, a Chatwoot
//! event, a CRM webhook) becomes. Conditions and field values are CEL expressions (the `cel`
//! crate), compiled once at start so a broken rule stops the service with a clear message
//! instead of parking every payload.
//!
//! A rule produces one event in the flat shape `POST /v1/events` accepts; the normal ingest
//! pipeline then validates, normalizes and hashes it, so a rule can never send anything that an
//! HTTP caller could not.
//!
//! Evaluation is in two steps because a rule may need rows fetched over the network
//! (`lookups`), which this pure module cannot do: [`RuleSet::lookup_requests`] says what to
//! fetch, [`RuleSet::build_event`] takes what was found.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;

use cel::{Context, Env, ExecutionError, Program};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// One rule as written in the configuration (`[[rules]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique; names the rule in problems and in derived event ids.
    pub name: String,
    /// The source whose payloads it reads (`supabase`, `chatwoot`, or a configured name).
    pub source: String,
    /// CEL condition; the rule applies when it is `true`. A condition that reads a field the
    /// payload does not have is `false`. Without one, every payload of the source matches.
    #[serde(default)]
    pub when: Option<String>,
    /// The event name. Either this or `fields.event_name` (an expression) is required.
    #[serde(default)]
    pub event: Option<String>,
    /// Target field (dotted for nesting: `custom_data.lead_event_source`) → CEL expression
    /// (a TOML string) or a literal (a TOML number or boolean).
    #[serde(default)]
    pub fields: BTreeMap<String, toml::Value>,
    /// Rows to fetch before `fields` are evaluated; each becomes a variable of its name.
    #[serde(default)]
    pub lookups: Vec<LookupSpec>,
    /// The pixel (name or id) its events go to; the source's or the default otherwise.
    /// (`fields.pixel` may compute one instead.)
    #[serde(default)]
    pub pixel: Option<String>,
}

/// A row to fetch over the Supabase REST API: `table` where `column` equals `value`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupSpec {
    /// The variable the row is bound to (`null` when no row matches).
    pub name: String,
    /// The table (or view).
    pub table: String,
    /// The column compared; `id` by default.
    #[serde(default = "default_lookup_column")]
    pub column: String,
    /// CEL expression giving the value to look for.
    pub value: String,
}

fn default_lookup_column() -> String {
    "id".to_owned()
}

/// One fetch a rule needs: `table` where `column = value`, bound to `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupRequest {
    /// Variable name.
    pub name: String,
    /// Table.
    pub table: String,
    /// Column.
    pub column: String,
    /// Value, as text.
    pub value: String,
}

/// Why a rule could not produce its event from a payload; the payload is parked with it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RuleFailure {
    /// The rule.
    pub rule: String,
    /// What part of it: `when`, `fields.<name>`, `lookups.<name>`.
    pub field: String,
    /// What went wrong, in words.
    pub reason: String,
}

/// The variables a source kind's payloads are known to bind (top-level keys), besides
/// `payload` (the whole body) and `source` (its name). A rule referring to anything else is a
/// configuration problem, caught at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    /// Supabase Database Webhook body (`integrations.md` §1.2).
    Supabase,
    /// Chatwoot webhook or automation body (§2.3).
    Chatwoot,
    /// Anything else: only `payload` and `source`.
    Generic,
}

impl PayloadKind {
    /// Parses `supabase`, `chatwoot`, `generic`.
    pub fn parse(raw: &str) -> Option<Self> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "supabase" => Some(Self::Supabase),
            "chatwoot" => Some(Self::Chatwoot),
            "generic" | "webhook" => Some(Self::Generic),
            _ => None,
        }
    }

    fn top_level_keys(self) -> &'static [&'static str] {
        match self {
            Self::Supabase => &["type", "table", "schema", "record", "old_record"],
            Self::Chatwoot => &[
                "event",
                "id",
                "account",
                "inbox",
                "inbox_id",
                "channel",
                "status",
                "labels",
                "meta",
                "custom_attributes",
                "additional_attributes",
                "changed_attributes",
                "contact_inbox",
                "messages",
                "conversation",
                "sender",
                "contact",
                "content",
                "content_type",
                "content_attributes",
                "message_type",
                "private",
                "source_id",
                "name",
                "email",
                "phone_number",
                "identifier",
                "current_conversation",
                "event_info",
                "created_at",
                "updated_at",
                "timestamp",
                "user",
                "is_private",
            ],
            Self::Generic => &[],
        }
    }
}

/// Compiled rules, shared by every request (immutable, `Send + Sync`).
pub struct RuleSet {
    env: Arc<Env>,
    rules: Vec<CompiledRule>,
}

impl std::fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleSet")
            .field(
                "rules",
                &self.rules.iter().map(|r| &r.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

struct CompiledRule {
    name: String,
    source: String,
    when: Option<Program>,
    event: Option<String>,
    fields: Vec<(Vec<String>, FieldValue)>,
    lookups: Vec<(LookupSpec, Program)>,
    pixel: Option<String>,
}

enum FieldValue {
    Literal(Value),
    Expression(Program),
}

/// A rule that applies to a payload, by position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleRef(usize);

impl RuleSet {
    /// An empty set: every payload is unmatched.
    pub fn empty() -> Self {
        Self {
            env: Arc::new(standard_env()),
            rules: Vec::new(),
        }
    }

    /// Compiles `specs`; `kind_of` says which payload kind a source name carries (`None`: an
    /// unknown source). Every problem is reported, each naming the rule and field.
    ///
    /// # Errors
    /// Duplicate names, unknown sources, CEL syntax errors, unknown variables, a missing
    /// event name.
    pub fn compile(
        specs: &[RuleSpec],
        kind_of: impl Fn(&str) -> Option<PayloadKind>,
    ) -> Result<Self, Vec<String>> {
        let env = Arc::new(standard_env());
        let mut problems = Vec::new();
        let mut names = BTreeSet::new();
        let mut rules = Vec::with_capacity(specs.len());
        for (index, spec) in specs.iter().enumerate() {
            let label = if spec.name.trim().is_empty() {
                format!("rules[{index}]")
            } else {
                format!("rule {:?}", spec.name)
            };
            let mut own: Vec<(String, String)> = Vec::new();
            if spec.name.trim().is_empty() {
                own.push(("name".into(), "is required".into()));
            } else if !names.insert(spec.name.clone()) {
                own.push(("name".into(), "is used by another rule".into()));
            }
            let Some(kind) = kind_of(&spec.source) else {
                own.push((
                    "source".into(),
                    format!(
                        "{:?} is not a source; use supabase, chatwoot or a name declared under [sources]",
                        spec.source
                    ),
                ));
                problems.extend(own.into_iter().map(|(f, r)| format!("{label}: {f}: {r}")));
                continue;
            };
            let mut known: BTreeSet<&str> = kind.top_level_keys().iter().copied().collect();
            known.extend(["payload", "source", "now"]);
            if kind == PayloadKind::Chatwoot {
                known.extend(super::chatwoot::DERIVED);
            }
            let mut compile = |field: &str, text: &str, known: &BTreeSet<&str>| {
                compile_expression(&env, text, known)
                    .map_err(|reason| own.push((field.to_owned(), reason)))
                    .ok()
            };
            let when = spec
                .when
                .as_deref()
                .and_then(|text| compile("when", text, &known));
            let mut lookups = Vec::new();
            for lookup in &spec.lookups {
                let field = format!("lookups.{}", lookup.name);
                if let Some(program) = compile(&field, &lookup.value, &known) {
                    lookups.push((lookup.clone(), program));
                }
            }
            // Lookups are bound for `fields` only: they are fetched after `when` holds.
            let mut with_lookups = known.clone();
            with_lookups.extend(spec.lookups.iter().map(|l| l.name.as_str()));
            let mut fields = Vec::new();
            let mut field_problems = Vec::new();
            for (target, value) in flatten_fields(&spec.fields) {
                let field = format!("fields.{target}");
                let path: Vec<String> = target.split('.').map(str::to_owned).collect();
                if path.iter().any(|part| part.trim().is_empty()) {
                    field_problems.push((field, "is not a field path".to_owned()));
                    continue;
                }
                let value = match value {
                    toml::Value::String(text) => match compile(&field, text, &with_lookups) {
                        Some(program) => FieldValue::Expression(program),
                        None => continue,
                    },
                    toml::Value::Integer(n) => FieldValue::Literal(Value::from(*n)),
                    toml::Value::Float(x) => FieldValue::Literal(Value::from(*x)),
                    toml::Value::Boolean(b) => FieldValue::Literal(Value::Bool(*b)),
                    _ => {
                        field_problems.push((
                            field,
                            "must be a CEL expression (a string), a number or a boolean".to_owned(),
                        ));
                        continue;
                    }
                };
                fields.push((path, value));
            }
            own.extend(field_problems);
            let has_name_expression = spec.fields.contains_key("event_name");
            let event = spec.event.as_ref().map(|e| e.trim().to_owned());
            match (&event, has_name_expression) {
                (Some(name), _) if name.is_empty() => own.push(("event".into(), "is empty".into())),
                (None, false) => own.push((
                    "event".into(),
                    "is required (or give fields.event_name as an expression)".into(),
                )),
                _ => {}
            }
            problems.extend(own.into_iter().map(|(f, r)| format!("{label}: {f}: {r}")));
            rules.push(CompiledRule {
                name: spec.name.clone(),
                source: spec.source.clone(),
                when,
                event,
                fields,
                lookups,
                pixel: spec.pixel.clone(),
            });
        }
        if problems.is_empty() {
            Ok(Self { env, rules })
        } else {
            Err(problems)
        }
    }

    /// How many rules there are for `source`.
    pub fn count_for(&self, source: &str) -> usize {
        self.rules.iter().filter(|r| r.source == source).count()
    }

    /// `(rule name, pixel)` of every rule that names a pixel, for checking the names.
    pub fn pixels(&self) -> impl Iterator<Item = (&str, &str)> {
        self.rules
            .iter()
            .filter_map(|r| Some((r.name.as_str(), r.pixel.as_deref()?)))
    }

    /// The names of all rules, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.name.as_str())
    }

    /// The name of a rule.
    pub fn name(&self, rule: RuleRef) -> &str {
        self.rules.get(rule.0).map_or("", |r| r.name.as_str())
    }

    /// The rules of `source` whose condition holds for `input`, in the order they are written
    /// (so several stages from one payload are sent in that order).
    ///
    /// # Errors
    /// A condition that fails for another reason than missing data, or is not a boolean.
    pub fn matching(&self, source: &str, input: &Input<'_>) -> Result<Vec<RuleRef>, RuleFailure> {
        let mut matched = Vec::new();
        // Built on first need, once for all rules: binding the payload converts it to CEL values.
        let mut context = None;
        for (index, rule) in self.rules.iter().enumerate() {
            if rule.source != source {
                continue;
            }
            let Some(when) = &rule.when else {
                matched.push(RuleRef(index));
                continue;
            };
            let context = context.get_or_insert_with(|| input.context(&self.env, &BTreeMap::new()));
            match when.execute(context) {
                Ok(cel::Value::Bool(true)) => matched.push(RuleRef(index)),
                Ok(cel::Value::Bool(false)) => {}
                Err(err) if is_missing_data(&err) => {}
                Ok(other) => {
                    return Err(RuleFailure {
                        rule: rule.name.clone(),
                        field: "when".to_owned(),
                        reason: format!("gave {} instead of true or false", type_name(&other)),
                    })
                }
                Err(err) => {
                    return Err(RuleFailure {
                        rule: rule.name.clone(),
                        field: "when".to_owned(),
                        reason: describe(&err),
                    })
                }
            }
        }
        Ok(matched)
    }

    /// The rows `rule` needs fetched for `input`.
    ///
    /// # Errors
    /// A lookup value that cannot be evaluated or is not a string or number.
    pub fn lookup_requests(
        &self,
        rule: RuleRef,
        input: &Input<'_>,
    ) -> Result<Vec<LookupRequest>, RuleFailure> {
        let Some(compiled) = self.rules.get(rule.0) else {
            return Ok(Vec::new());
        };
        let context = input.context(&self.env, &BTreeMap::new());
        let mut requests = Vec::new();
        for (spec, program) in &compiled.lookups {
            let failure = |reason: String| RuleFailure {
                rule: compiled.name.clone(),
                field: format!("lookups.{}", spec.name),
                reason,
            };
            let value = program
                .execute(&context)
                .map_err(|err| failure(describe(&err)))?;
            let value = match to_json(&value) {
                Some(Value::String(s)) => s,
                Some(Value::Number(n)) => n.to_string(),
                _ => {
                    return Err(failure(format!(
                        "gave {} instead of a string or number",
                        type_name(&value)
                    )))
                }
            };
            requests.push(LookupRequest {
                name: spec.name.clone(),
                table: spec.table.clone(),
                column: spec.column.clone(),
                value,
            });
        }
        Ok(requests)
    }

    /// The event `rule` makes of `input`, in the flat shape `POST /v1/events` takes. Fields
    /// that evaluate to `null` (or an empty optional: `record.?phone`) are left out. Without
    /// an `event_id` field the id is derived from the rule and the payload, so the same
    /// payload delivered again gives the same id.
    ///
    /// # Errors
    /// A field that cannot be evaluated (e.g. a key the payload lacks) or whose value cannot
    /// be sent.
    pub fn build_event(
        &self,
        rule: RuleRef,
        input: &Input<'_>,
        lookups: &BTreeMap<String, Value>,
    ) -> Result<Value, RuleFailure> {
        let Some(compiled) = self.rules.get(rule.0) else {
            return Ok(Value::Null);
        };
        let context = input.context(&self.env, lookups);
        let mut event = Map::new();
        if let Some(name) = &compiled.event {
            event.insert("event_name".to_owned(), Value::String(name.clone()));
        }
        if let Some(pixel) = &compiled.pixel {
            event.insert("pixel".to_owned(), Value::String(pixel.clone()));
        }
        for (path, value) in &compiled.fields {
            let failure = |reason: String| RuleFailure {
                rule: compiled.name.clone(),
                field: format!("fields.{}", path.join(".")),
                reason,
            };
            let value = match value {
                FieldValue::Literal(value) => value.clone(),
                FieldValue::Expression(program) => {
                    let result = program
                        .execute(&context)
                        .map_err(|err| failure(describe(&err)))?;
                    to_json(&result).ok_or_else(|| {
                        failure(format!("gave {}, which cannot be sent", type_name(&result)))
                    })?
                }
            };
            if !value.is_null() {
                insert_path(&mut event, path, value);
            }
        }
        split_full_name(&mut event);
        if event.get("event_id").is_none_or(Value::is_null) {
            let event_id = derived_event_id(&compiled.name, input.source, input.payload);
            event.insert("event_id".to_owned(), Value::String(event_id));
        }
        Ok(Value::Object(event))
    }
}

/// What a rule reads: the payload, its source name and the time it was received.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// Source name.
    pub source: &'a str,
    /// The body.
    pub payload: &'a Value,
    /// How the payload looks (Chatwoot payloads get derived variables).
    pub kind: PayloadKind,
    /// Unix seconds when the payload was received.
    pub received_at: i64,
}

impl Input<'_> {
    fn context<'e>(
        &self,
        env: &Arc<Env>,
        lookups: &BTreeMap<String, Value>,
    ) -> Context<'static, 'e> {
        let mut context = Context::with_env(env.clone());
        let bind = |context: &mut Context<'static, 'e>, name: &str, value: cel::Value| {
            context.add_variable_from_value(name, value);
        };
        // Every JSON value has a CEL twin, so these conversions do not fail.
        let convert = |value: &Value| cel::to_value(value).unwrap_or(cel::Value::Null);
        bind(
            &mut context,
            "source",
            cel::Value::from(self.source.to_owned()),
        );
        bind(&mut context, "now", cel::Value::Int(self.received_at));
        // The payload is converted once; its top-level keys share the converted values.
        let whole = convert(self.payload);
        if let cel::Value::Map(map) = &whole {
            for (key, value) in map.map.iter() {
                if let cel::objects::Key::String(name) = key {
                    if !matches!(name.as_str(), "payload" | "source" | "now") {
                        bind(&mut context, name.as_str(), value.clone());
                    }
                }
            }
        }
        bind(&mut context, "payload", whole);
        if self.kind == PayloadKind::Chatwoot {
            for (name, value) in super::chatwoot::derived(self.payload) {
                bind(&mut context, name, convert(&value));
            }
        }
        for (name, row) in lookups {
            bind(&mut context, name, convert(row));
        }
        context
    }
}

/// Rules may give `full_name` (CRMs and chat tools keep one name field): the first word
/// becomes `first_name`, the last `last_name`, unless those are given too.
fn split_full_name(event: &mut Map<String, Value>) {
    let Some(full) = event.remove("full_name") else {
        return;
    };
    let words: Vec<&str> = full.as_str().unwrap_or("").split_whitespace().collect();
    if let (Some(first), false) = (words.first(), event.contains_key("first_name")) {
        event.insert("first_name".to_owned(), Value::String((*first).to_owned()));
    }
    if let (Some(last), true, false) = (
        words.last(),
        words.len() > 1,
        event.contains_key("last_name"),
    ) {
        event.insert("last_name".to_owned(), Value::String((*last).to_owned()));
    }
}

/// `<rule>-<16 hex of SHA-256(source, rule, payload)>`: stable for the same payload.
fn derived_event_id(rule: &str, source: &str, payload: &Value) -> String {
    let mut hasher = Sha256::new();
    hasher.update(source.as_bytes());
    hasher.update([0]);
    hasher.update(rule.as_bytes());
    hasher.update([0]);
    // serde_json's map is ordered by key, so this text is the same for the same payload
    // whatever order the sender wrote its keys in.
    hasher.update(payload.to_string().as_bytes());
    let digest = hasher.finalize();
    let mut id = String::with_capacity(rule.len() + 17);
    id.push_str(rule);
    id.push('-');
    for byte in &digest[..8] {
        let _ = write!(id, "{byte:02x}");
    }
    id
}

fn standard_env() -> Env {
    let mut env = Env::stdlib();
    // lowerAscii, split, replace, trim …: handy for reshaping CRM values. Registering a
    // built-in extension only fails on a name clash, which cannot happen on the stdlib.
    let _ = env.add_extension(cel::extensions::strings);
    env
}

fn compile_expression(env: &Env, text: &str, known: &BTreeSet<&str>) -> Result<Program, String> {
    let program = env
        .compile(text)
        .map_err(|err| format!("is not a valid CEL expression: {err}"))?;
    let references = program.references();
    let unknown: Vec<&str> = references
        .variables()
        .into_iter()
        .filter(|name| !known.contains(name))
        .collect();
    if let Some(name) = unknown.first() {
        return Err(format!(
            "`{name}` is not a variable here (known: {}); text needs quotes inside the expression, e.g. '\"BRL\"'",
            known.iter().copied().collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(program)
}

/// Errors that mean "the payload does not have this": a condition reading them is false.
fn is_missing_data(err: &ExecutionError) -> bool {
    match err {
        ExecutionError::NoSuchKey(_) | ExecutionError::UndeclaredReference(_) => true,
        // Selecting a field of `null` (e.g. `record.status` on a DELETE).
        other => describe(other).contains("null"),
    }
}

fn describe(err: &ExecutionError) -> String {
    let text = err.to_string();
    if text.contains("add") && text.contains("String") {
        return format!(
            "{text} (CEL does not join text and numbers: wrap the number in string(), e.g. \"lead-\" + string(record.id))"
        );
    }
    text
}

fn type_name(value: &cel::Value) -> &'static str {
    match value {
        cel::Value::List(_) => "a list",
        cel::Value::Map(_) => "a map",
        cel::Value::Int(_) | cel::Value::UInt(_) | cel::Value::Float(_) => "a number",
        cel::Value::String(_) => "a string",
        cel::Value::Bool(_) => "a boolean",
        cel::Value::Null => "null",
        _ => "a value of another type",
    }
}

/// CEL value → JSON; an empty optional is `null`. `None` for values JSON cannot hold.
fn to_json(value: &cel::Value) -> Option<Value> {
    if let cel::Value::Opaque(_) = value {
        let optional = <&cel::objects::OptionalValue>::try_from(value).ok()?;
        return match optional.value() {
            Some(inner) => to_json(inner),
            None => Some(Value::Null),
        };
    }
    value.json().ok()
}

/// `custom_data.value = "x"` in TOML is a nested table; rules address fields by dotted path.
fn flatten_fields(fields: &BTreeMap<String, toml::Value>) -> Vec<(String, &toml::Value)> {
    fn walk<'a>(prefix: &str, value: &'a toml::Value, out: &mut Vec<(String, &'a toml::Value)>) {
        match value {
            toml::Value::Table(table) => {
                for (key, inner) in table {
                    walk(&format!("{prefix}.{key}"), inner, out);
                }
            }
            other => out.push((prefix.to_owned(), other)),
        }
    }
    let mut out = Vec::new();
    for (key, value) in fields {
        walk(key, value, &mut out);
    }
    out
}

fn insert_path(map: &mut Map<String, Value>, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut current = map;
    for part in parents {
        let entry = current
            .entry(part.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        let Value::Object(next) = entry else {
            return;
        };
        current = next;
    }
    current.insert(last.clone(), value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample(name: &str) -> Value {
        let path = format!("{}/tests/samples/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).expect("sample exists");
        serde_json::from_str(&text).expect("sample parses")
    }

    fn rules(toml_text: &str) -> Result<RuleSet, Vec<String>> {
        #[derive(Deserialize)]
        struct File {
            rules: Vec<RuleSpec>,
        }
        let file: File = toml::from_str(toml_text).expect("toml parses");
        RuleSet::compile(&file.rules, |source| match source {
            "supabase" | "crm" => Some(PayloadKind::Supabase),
            "chatwoot" => Some(PayloadKind::Chatwoot),
            _ => None,
        })
    }

    const LEADS: &str = r#"
        [[rules]]
        name = "lead-created"
        source = "supabase"
        when = 'type == "INSERT" && table == "leads"'
        event = "Lead"
        [rules.fields]
        event_id = '"lead-" + string(record.id)'
        email = "record.email"
        phone = "record.phone"
        full_name = "record.full_name"
        external_id = "string(record.id)"

        [[rules]]
        name = "lead-won"
        source = "supabase"
        when = 'type == "UPDATE" && record.status == "won" && old_record.status != "won"'
        event = "Purchase"
        [rules.fields]
        event_id = '"won-" + string(record.id)'
        email = "record.email"
        value = "record.deal_value"
        currency = '"BRL"'

        [[rules]]
        name = "lead-booked"
        source = "supabase"
        when = 'type == "UPDATE" && record.status == "booked" && old_record.status != "booked"'
        event = "Schedule"
        [rules.fields]
        email = "record.email"
        phone = "record.?phone"
        custom_data.note = "record.?not_a_column"
    "#;

    fn input<'a>(payload: &'a Value) -> Input<'a> {
        Input {
            source: "supabase",
            kind: PayloadKind::Supabase,
            payload,
            received_at: 1_764_000_000,
        }
    }

    fn events(set: &RuleSet, payload: &Value) -> Vec<Value> {
        let input = input(payload);
        set.matching("supabase", &input)
            .expect("conditions evaluate")
            .into_iter()
            .map(|rule| {
                set.build_event(rule, &input, &BTreeMap::new())
                    .expect("fields evaluate")
            })
            .collect()
    }

    #[test]
    fn a_supabase_insert_becomes_a_lead_with_a_deterministic_id() {
        let set = rules(LEADS).expect("rules compile");
        let produced = events(&set, &sample("supabase-leads-insert.json"));
        assert_eq!(produced.len(), 1, "{produced:?}");
        let lead = &produced[0];
        assert_eq!(lead["event_name"], "Lead");
        assert_eq!(lead["event_id"], "lead-1");
        assert_eq!(lead["external_id"], "1");
        assert_eq!(lead["email"], "Ana.Souza@Example.com");
        assert_eq!(lead["phone"], "+55 11 99999-0000");
        // full_name is split for Meta's fn / ln.
        assert_eq!(lead["first_name"], "Ana");
        assert_eq!(lead["last_name"], "Souza");
        assert!(lead.get("full_name").is_none());
    }

    #[test]
    fn status_changes_become_purchase_and_schedule_only_on_the_transition() {
        let set = rules(LEADS).expect("rules compile");
        let won = events(&set, &sample("supabase-leads-update-won.json"));
        assert_eq!(won.len(), 1, "{won:?}");
        assert_eq!(won[0]["event_name"], "Purchase");
        assert_eq!(won[0]["value"], json!(1299.90));
        assert_eq!(won[0]["currency"], "BRL");

        let booked = events(&set, &sample("supabase-leads-update-booked.json"));
        assert_eq!(booked.len(), 1, "{booked:?}");
        assert_eq!(booked[0]["event_name"], "Schedule");
        // `record.?x` of a missing column is left out instead of failing.
        assert!(booked[0].get("custom_data").is_none(), "{booked:?}");
        // No event_id field: derived from the rule and payload, the same every time.
        let id = booked[0]["event_id"].as_str().expect("derived id");
        assert!(id.starts_with("lead-booked-"), "{id}");
        let again = events(&set, &sample("supabase-leads-update-booked.json"));
        assert_eq!(again[0]["event_id"], booked[0]["event_id"]);

        // Saving a won lead again (status unchanged) is not a second purchase.
        let mut resaved = sample("supabase-leads-update-won.json");
        resaved["old_record"]["status"] = json!("won");
        assert!(events(&set, &resaved).is_empty());
    }

    #[test]
    fn a_delete_matches_nothing_because_conditions_on_missing_data_are_false() {
        let set = rules(LEADS).expect("rules compile");
        assert!(events(&set, &sample("supabase-leads-delete.json")).is_empty());
    }

    #[test]
    fn a_field_the_payload_lacks_fails_the_rule_with_its_name() {
        let set = rules(LEADS).expect("rules compile");
        let mut payload = sample("supabase-leads-update-won.json");
        payload["record"]
            .as_object_mut()
            .expect("record")
            .remove("deal_value");
        let input = input(&payload);
        let matched = set.matching("supabase", &input).expect("evaluates");
        let failure = set
            .build_event(matched[0], &input, &BTreeMap::new())
            .expect_err("missing field");
        assert_eq!(failure.rule, "lead-won");
        assert_eq!(failure.field, "fields.value");
        assert!(failure.reason.contains("deal_value"), "{failure:?}");
    }

    #[test]
    fn joining_text_and_a_number_explains_string() {
        let set = rules(
            r#"
            [[rules]]
            name = "bad"
            source = "supabase"
            event = "Lead"
            fields.event_id = '"lead-" + record.id'
            "#,
        )
        .expect("compiles: types are only known at run time");
        let payload = sample("supabase-leads-insert.json");
        let input = input(&payload);
        let failure = set
            .build_event(RuleRef(0), &input, &BTreeMap::new())
            .expect_err("string + int");
        assert!(failure.reason.contains("string("), "{failure:?}");
    }

    #[test]
    fn a_non_boolean_condition_is_a_failure_not_a_silent_skip() {
        let set = rules(
            r#"
            [[rules]]
            name = "odd"
            source = "supabase"
            when = "record.status"
            event = "Lead"
            "#,
        )
        .expect("compiles");
        let payload = sample("supabase-leads-insert.json");
        let failure = set
            .matching("supabase", &input(&payload))
            .expect_err("not a bool");
        assert_eq!(failure.field, "when");
    }

    #[test]
    fn configuration_problems_name_the_rule_and_field() {
        let problems = rules(
            r#"
            [[rules]]
            name = "a"
            source = "supabase"
            when = 'type == '
            fields.currency = "BRL"

            [[rules]]
            name = "a"
            source = "nowhere"
            event = "Lead"
            "#,
        )
        .expect_err("broken rules");
        let text = problems.join("\n");
        assert!(
            text.contains(r#"rule "a": when: is not a valid CEL expression"#),
            "{text}"
        );
        assert!(
            text.contains("fields.currency: `BRL` is not a variable"),
            "{text}"
        );
        assert!(text.contains("event: is required"), "{text}");
        assert!(text.contains("name: is used by another rule"), "{text}");
        assert!(
            text.contains(r#"source: "nowhere" is not a source"#),
            "{text}"
        );
    }

    #[test]
    fn crm_stages_become_conversion_leads_events_named_by_the_stage() {
        let set = rules(
            r#"
            [[rules]]
            name = "crm-stage"
            source = "crm"
            when = 'type == "UPDATE" && record.status != old_record.status'
            [rules.fields]
            event_name = "record.status"
            event_id = '"stage-" + string(record.lead_id) + "-" + record.status'
            action_source = '"system_generated"'
            lead_id = "record.lead_id"
            custom_data.event_source = '"crm"'
            custom_data.lead_event_source = '"In-house CRM"'
            "#,
        )
        .expect("compiles");
        let payload = sample("supabase-leads-update-won.json");
        let input = Input {
            source: "crm",
            ..input(&payload)
        };
        let matched = set.matching("crm", &input).expect("evaluates");
        let event = set
            .build_event(matched[0], &input, &BTreeMap::new())
            .expect("builds");
        assert_eq!(
            event,
            json!({
                "event_name": "won",
                "event_id": "stage-1893456789012345-won",
                "action_source": "system_generated",
                "lead_id": 1_893_456_789_012_345_i64,
                "custom_data": {"event_source": "crm", "lead_event_source": "In-house CRM"}
            })
        );
    }

    #[test]
    fn lookups_are_requested_then_bound_by_name() {
        let set = rules(
            r#"
            [[rules]]
            name = "paid"
            source = "supabase"
            when = 'table == "payments"'
            event = "Purchase"
            lookups = [{ name = "lead", table = "leads", value = "record.lead_ref" }]
            [rules.fields]
            email = "lead.email"
            value = "record.amount"
            currency = '"BRL"'
            "#,
        )
        .expect("compiles");
        let payload = json!({"type": "INSERT", "table": "payments", "schema": "public",
            "record": {"lead_ref": 7, "amount": 10}, "old_record": null});
        let input = input(&payload);
        let matched = set.matching("supabase", &input).expect("evaluates");
        let requests = set.lookup_requests(matched[0], &input).expect("requests");
        assert_eq!(
            requests,
            vec![LookupRequest {
                name: "lead".into(),
                table: "leads".into(),
                column: "id".into(),
                value: "7".into()
            }]
        );
        let found = BTreeMap::from([("lead".to_owned(), json!({"email": "a@b.co"}))]);
        let event = set.build_event(matched[0], &input, &found).expect("builds");
        assert_eq!(event["email"], "a@b.co");
    }
}
