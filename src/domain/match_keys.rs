//! Match-key memory, the pure part: what to remember about a person from an event as it is sent
//! to Meta, under which identities, and what to fill into a later event about the same person
//! that lacks it (issue 4: a CRM Purchase days after a landing-page Lead rarely carries the
//! browser identifiers that match best: `fbc`, `fbp`, IP address and user agent).
//!
//! Works on the `data[i]` payload of a [`super::NormalizedEvent`], whose `user_data` is already
//! normalized and hashed. Only values that are hashed (the eleven hashed keys) or that are not
//! contact information (`fbc`, `fbp`, `client_ip_address`, `client_user_agent`) are ever
//! remembered; anything that does not look hashed where a hash belongs is left out, so a
//! raw email, phone number or name can never reach the memory.
//!
//! Every value is remembered with the time of the event it came from (`seen_at`, unix ms) and
//! an expiry; newer values win. Identities are `x:<hashed external_id>`, `l:<lead_id>` and
//! `e:<hashed email>`: the keys of one person are linked by the events that carry them together.
//! A `lead_id` finds the person but is never filled in: Meta refuses an event whose lead id is
//! not a real Lead Ads id, and one wrong id remembered would make every later event of the
//! person fail.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::Value;

use super::event::ActionSource;

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// How long a click id is worth: the `_fbc` cookie lives 90 days, and Meta refuses click ids
/// older than about that (`meta-capi.md` §2.3).
pub const FBC_MAX_AGE_MS: i64 = 90 * DAY_MS;

/// How far a click may seem to follow the event it is filled into (the browser's clock set the
/// click time, the sender's clock the event time). Beyond that the click came after the
/// conversion and did not cause it.
const CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;

/// Identities looked up and written per event; an event carrying more ids than this is about
/// several people or is malformed, and the first ones are enough.
pub const MAX_IDENTITIES_PER_EVENT: usize = 8;

/// How often a value already remembered is written again to extend its life.
pub const REFRESH_MS: i64 = DAY_MS;

/// The longest user agent remembered; real ones are a few hundred characters.
const MAX_USER_AGENT_LEN: usize = 1024;

/// A `user_data` field the memory keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MatchField {
    /// Hashed email.
    Em,
    /// Hashed phone.
    Ph,
    /// Hashed first name.
    Fn,
    /// Hashed last name.
    Ln,
    /// Hashed city.
    Ct,
    /// Hashed state.
    St,
    /// Hashed zip code.
    Zp,
    /// Hashed country.
    Country,
    /// Hashed date of birth.
    Db,
    /// Hashed gender.
    Ge,
    /// Hashed external id.
    ExternalId,
    /// Click id.
    Fbc,
    /// Browser id.
    Fbp,
    /// The browser's IP address.
    ClientIpAddress,
    /// The browser's user agent.
    ClientUserAgent,
}

/// What a field is, which decides where it may be filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Hashed customer information: about the person, valid anywhere.
    Person,
    /// The ad click: the person's, wherever the conversion happened online.
    Click,
    /// The browser's own identifiers: belong to the request a browser made.
    Browser,
}

impl MatchField {
    /// Every field, in the order they are filled and reported.
    pub const ALL: [MatchField; 15] = [
        MatchField::Fbc,
        MatchField::Fbp,
        MatchField::ClientIpAddress,
        MatchField::ClientUserAgent,
        MatchField::Em,
        MatchField::Ph,
        MatchField::Fn,
        MatchField::Ln,
        MatchField::Ct,
        MatchField::St,
        MatchField::Zp,
        MatchField::Country,
        MatchField::Db,
        MatchField::Ge,
        MatchField::ExternalId,
    ];

    /// Meta's `user_data` key.
    pub fn as_str(self) -> &'static str {
        match self {
            MatchField::Em => "em",
            MatchField::Ph => "ph",
            MatchField::Fn => "fn",
            MatchField::Ln => "ln",
            MatchField::Ct => "ct",
            MatchField::St => "st",
            MatchField::Zp => "zp",
            MatchField::Country => "country",
            MatchField::Db => "db",
            MatchField::Ge => "ge",
            MatchField::ExternalId => "external_id",
            MatchField::Fbc => "fbc",
            MatchField::Fbp => "fbp",
            MatchField::ClientIpAddress => "client_ip_address",
            MatchField::ClientUserAgent => "client_user_agent",
        }
    }

    /// Parses Meta's key.
    pub fn parse(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == key)
    }

    fn kind(self) -> Kind {
        match self {
            MatchField::Fbc => Kind::Click,
            MatchField::Fbp | MatchField::ClientIpAddress | MatchField::ClientUserAgent => {
                Kind::Browser
            }
            _ => Kind::Person,
        }
    }

    fn is_hashed(self) -> bool {
        !matches!(
            self,
            MatchField::Fbc
                | MatchField::Fbp
                | MatchField::ClientIpAddress
                | MatchField::ClientUserAgent
        )
    }

    /// Whether a remembered value of this field may go into an event from `source`
    /// (`meta-capi.md` §1.6, §2.3, §8):
    /// - hashed customer information describes the person: every event;
    /// - `fbc` is the ad click that brought the person: online conversions and server-side
    ///   events about them (website, CRM `system_generated`, `other`, chat, email, phone call;
    ///   Meta recommends keeping the newest fbc server-side and sending it with every event),
    ///   not app, store or in-thread messaging events;
    /// - `fbp`, IP address and user agent belong to one browser request: a website event must
    ///   carry its own (Meta requires the user agent of the browser the event happened in), and
    ///   app, store and messaging events did not happen in that browser. Events that happened
    ///   outside any browser (`system_generated`, `other`, chat, email, phone call) get the
    ///   person's last browser identifiers, which is what matching needs.
    fn fillable_into(self, source: ActionSource) -> bool {
        let server_side = matches!(
            source,
            ActionSource::SystemGenerated
                | ActionSource::Other
                | ActionSource::Chat
                | ActionSource::Email
                | ActionSource::PhoneCall
        );
        match self.kind() {
            Kind::Person => true,
            Kind::Click => server_side || source == ActionSource::Website,
            Kind::Browser => server_side,
        }
    }
}

/// One remembered value.
#[derive(Debug, Clone, PartialEq)]
pub struct Remembered {
    /// The `user_data` field.
    pub field: MatchField,
    /// The value exactly as sent to Meta (hashed keys always as an array of hashes).
    pub value: Value,
    /// Unix ms: the `event_time` of the event it came from. The newest value wins.
    pub seen_at: i64,
    /// Unix ms after which it is not used and may be deleted.
    pub expires_at: i64,
}

/// How long values are remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRules {
    /// Milliseconds a value is used after the event it came from (`fbc` at most
    /// [`FBC_MAX_AGE_MS`] after its click).
    pub lifetime_ms: i64,
}

/// What the memory does with one event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recollection {
    /// The fields filled into the event from memory, in [`MatchField::ALL`] order.
    pub filled: Vec<MatchField>,
    /// What to remember: `(identity, value)` pairs. Writing them keeps, per identity and field,
    /// the value with the newest `seen_at`.
    pub remember: Vec<(String, Remembered)>,
}

/// The identities `payload` is about, to look up before [`recall_and_fill`]: `x:` hashed
/// external ids, `l:` the lead id, `e:` hashed emails (the digest without a parameter-builder
/// appendix, lowercase), at most [`MAX_IDENTITIES_PER_EVENT`]. None for a Limited Data Use
/// event: its data is neither used to enrich others nor enriched.
pub fn identities(payload: &Value) -> Vec<String> {
    if limited_data_use(payload) {
        return Vec::new();
    }
    let Some(user) = payload.get("user_data").and_then(Value::as_object) else {
        return Vec::new();
    };
    let mut keys: Vec<String> = Vec::new();
    let mut push = |key: String| {
        if keys.len() < MAX_IDENTITIES_PER_EVENT && !keys.contains(&key) {
            keys.push(key);
        }
    };
    for digest in strings(user.get("external_id")).filter_map(hash_digest) {
        push(format!("x:{digest}"));
    }
    if let Some(lead_id) = user.get("lead_id").and_then(lead_id_text) {
        push(format!("l:{lead_id}"));
    }
    for digest in strings(user.get("em")).filter_map(hash_digest) {
        push(format!("e:{digest}"));
    }
    keys
}

/// Fills into `payload` the fields it lacks from `recalled` (what is remembered under any of its
/// [`identities`]), as far as its `action_source` allows, and returns what was filled and what
/// to remember.
///
/// A remembered value is used when it is still alive at the event's `event_time` (unix seconds),
/// the newest of its field; an `fbc` additionally only when its click happened before the event
/// and at most [`FBC_MAX_AGE_MS`] before. Fields the event carries are never changed.
///
/// What is remembered, under every identity of the event once filled (so an email filled in
/// through an external id links the two): the event's own values, seen at its `event_time`, and
/// for fields it does not carry the recalled value with its original time (which copies it to
/// identities that lack it and never makes it live longer).
pub fn recall_and_fill(
    payload: &mut Value,
    action_source: ActionSource,
    event_time: i64,
    recalled: &[Remembered],
    rules: &MemoryRules,
) -> Recollection {
    if limited_data_use(payload) {
        return Recollection::default();
    }
    let event_time_ms = event_time.saturating_mul(1000);
    let own = own_values(payload, event_time_ms, rules);

    let mut best: BTreeMap<MatchField, &Remembered> = BTreeMap::new();
    for candidate in recalled
        .iter()
        .filter(|r| usable(r, event_time_ms, rules) && is_rememberable(r.field, &r.value))
    {
        let newer = best
            .get(&candidate.field)
            .is_none_or(|current| candidate.seen_at >= current.seen_at);
        if newer {
            best.insert(candidate.field, candidate);
        }
    }

    let mut filled = Vec::new();
    if let Some(Value::Object(user)) = payload.get_mut("user_data") {
        for field in MatchField::ALL {
            let Some(value) = best.get(&field) else {
                continue;
            };
            if field.fillable_into(action_source) && !has_value(user.get(field.as_str())) {
                user.insert(field.as_str().to_owned(), value.value.clone());
                filled.push(field);
            }
        }
    }

    // A record is started only by an event carrying what other systems lack: a browser
    // identifier, or an id that links systems. Contact details alone (a CRM's email and phone)
    // add to a person already known but start nothing: remembering every such event would
    // cost a write per new person and fill nothing the later event does not have itself.
    let identities_now = identities(payload);
    let starts_record = own.iter().any(|v| {
        matches!(
            v.field,
            MatchField::Fbc
                | MatchField::Fbp
                | MatchField::ClientIpAddress
                | MatchField::ClientUserAgent
        )
    }) || identities_now.iter().any(|i| !i.starts_with("e:"));
    if best.is_empty() && !starts_record {
        return Recollection {
            filled,
            remember: Vec::new(),
        };
    }

    let mut values: BTreeMap<MatchField, Remembered> = BTreeMap::new();
    for value in own.into_iter().chain(best.into_values().cloned()) {
        let newer = values
            .get(&value.field)
            .is_none_or(|current| value.seen_at > current.seen_at);
        if newer {
            values.insert(value.field, value);
        }
    }
    let remember = identities_now
        .into_iter()
        .flat_map(|identity| {
            values
                .values()
                .filter(|value| !only_identifies(&identity, value))
                .map(|value| (identity.clone(), value.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    Recollection { filled, remember }
}

/// Whether writing `candidate` under an identity whose current value for that field is
/// `stored` changes anything. Not when a newer value is stored (it would stay), nor when the
/// same value is stored from less than [`REFRESH_MS`] earlier: a value seen again is rewritten
/// at most once a day to extend its life, so a person's every event does not cost a write.
pub fn worth_writing(stored: Option<&Remembered>, candidate: &Remembered) -> bool {
    match stored {
        None => true,
        Some(stored) if stored.seen_at > candidate.seen_at => false,
        Some(stored) => {
            stored.value != candidate.value
                || candidate.seen_at.saturating_sub(stored.seen_at) >= REFRESH_MS
                || stored.expires_at < candidate.expires_at.saturating_sub(REFRESH_MS)
        }
    }
}

/// True when `value` under `identity` says nothing the identity does not: the email under its
/// own `e:` identity, the external id under its `x:`.
fn only_identifies(identity: &str, value: &Remembered) -> bool {
    let Some((kind, key)) = identity.split_once(':') else {
        return false;
    };
    match (kind, value.field) {
        ("e", MatchField::Em) | ("x", MatchField::ExternalId) => {
            let digests: Vec<String> = strings(Some(&value.value))
                .filter_map(hash_digest)
                .collect();
            digests.iter().all(|d| d == key)
        }
        _ => false,
    }
}

/// The values `payload` itself carries that the memory keeps, seen at `event_time_ms`.
fn own_values(payload: &Value, event_time_ms: i64, rules: &MemoryRules) -> Vec<Remembered> {
    let Some(user) = payload.get("user_data").and_then(Value::as_object) else {
        return Vec::new();
    };
    let mut values = Vec::new();
    for field in MatchField::ALL {
        let Some(raw) = user.get(field.as_str()) else {
            continue;
        };
        let value = if field.is_hashed() {
            // Always an array of hashes; anything unhashed is left out.
            let hashes: Vec<Value> = strings(Some(raw))
                .filter(|s| hash_digest(s).is_some())
                .map(|s| Value::String(s.to_owned()))
                .collect();
            if hashes.is_empty() {
                continue;
            }
            Value::Array(hashes)
        } else if is_rememberable(field, raw) {
            raw.clone()
        } else {
            continue;
        };
        let mut expires_at = event_time_ms.saturating_add(rules.lifetime_ms);
        if field == MatchField::Fbc {
            match value.as_str().and_then(click_time_ms) {
                Some(clicked_at) => {
                    expires_at = expires_at.min(clicked_at.saturating_add(FBC_MAX_AGE_MS));
                }
                None => continue,
            }
        }
        if expires_at <= event_time_ms {
            continue;
        }
        values.push(Remembered {
            field,
            value,
            seen_at: event_time_ms,
            expires_at,
        });
    }
    values
}

/// Whether `r` may be used for an event at `event_time_ms`: alive (under the stored expiry and
/// the current lifetime, which may have been shortened since), and for a click id, a click
/// before the event and recent enough.
fn usable(r: &Remembered, event_time_ms: i64, rules: &MemoryRules) -> bool {
    let alive =
        event_time_ms < r.expires_at && event_time_ms < r.seen_at.saturating_add(rules.lifetime_ms);
    if !alive {
        return false;
    }
    if r.field == MatchField::Fbc {
        return r
            .value
            .as_str()
            .and_then(click_time_ms)
            .is_some_and(|clicked_at| {
                clicked_at <= event_time_ms.saturating_add(CLOCK_SKEW_MS)
                    && event_time_ms.saturating_sub(clicked_at) < FBC_MAX_AGE_MS
            });
    }
    true
}

/// Whether `value` is something the memory may hold for `field`: hashes for the hashed keys
/// (never raw contact information), well-formed identifiers for the rest.
fn is_rememberable(field: MatchField, value: &Value) -> bool {
    if field.is_hashed() {
        return matches!(value, Value::Array(items)
            if !items.is_empty()
                && items.iter().all(|item| item.as_str().and_then(hash_digest).is_some()));
    }
    match field {
        MatchField::Fbc => value.as_str().and_then(click_time_ms).is_some(),
        MatchField::Fbp => value
            .as_str()
            .is_some_and(|s| s.starts_with("fb.") && !s.chars().any(char::is_whitespace)),
        MatchField::ClientIpAddress => value.as_str().is_some_and(|s| s.parse::<IpAddr>().is_ok()),
        MatchField::ClientUserAgent => value
            .as_str()
            .is_some_and(|s| !s.trim().is_empty() && s.len() <= MAX_USER_AGENT_LEN),
        _ => false,
    }
}

/// True when the event asks for Limited Data Use (`data_processing_options: ["LDU"]`).
fn limited_data_use(payload: &Value) -> bool {
    payload
        .get("data_processing_options")
        .and_then(Value::as_array)
        .is_some_and(|options| options.iter().any(|o| o.as_str() == Some("LDU")))
}

/// True when a `user_data` entry carries something (not absent, null, blank or `[]`).
fn has_value(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => !s.trim().is_empty(),
        Some(Value::Array(items)) => !items.is_empty(),
        Some(_) => true,
    }
}

/// The strings of a scalar or an array.
fn strings(value: Option<&Value>) -> impl Iterator<Item = &str> {
    let items: &[Value] = match value {
        Some(Value::Array(items)) => items,
        Some(single) => std::slice::from_ref(single),
        None => &[],
    };
    items.iter().filter_map(Value::as_str)
}

/// The lowercase SHA-256 digest of a hashed value: 64 hex digits, optionally followed by a
/// parameter-builder appendix (`.<2–8 of [A-Za-z0-9_-]>`). `None` for anything else.
fn hash_digest(value: &str) -> Option<String> {
    let (digest, appendix) = match value.split_once('.') {
        Some((digest, appendix)) => (digest, Some(appendix)),
        None => (value, None),
    };
    let digest_ok = digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit());
    let appendix_ok = appendix.is_none_or(|a| {
        (2..=8).contains(&a.len())
            && a.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    });
    (digest_ok && appendix_ok).then(|| digest.to_ascii_lowercase())
}

/// A lead id as text: digits, as a string or a number.
fn lead_id_text(value: &Value) -> Option<String> {
    let text = match value {
        Value::String(s) => s.trim().to_owned(),
        Value::Number(n) if n.is_u64() => n.to_string(),
        _ => return None,
    };
    (!text.is_empty() && text.len() <= 32 && text.bytes().all(|b| b.is_ascii_digit()))
        .then_some(text)
}

/// The click time (unix ms) of an `fbc` (`fb.<index>.<creation time>.<fbclid>[.<appendix>]`,
/// `meta-capi.md` §2.3); a creation time in seconds is taken as such. `None` when it is not an
/// fbc.
fn click_time_ms(fbc: &str) -> Option<i64> {
    let parts: Vec<&str> = fbc.split('.').collect();
    let (["fb", index, created, _fbclid] | ["fb", index, created, _fbclid, _]) = parts.as_slice()
    else {
        return None;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(index)
        || !digits(created)
        || parts.iter().any(|p| p.is_empty())
        || fbc.chars().any(char::is_whitespace)
    {
        return None;
    }
    let created: i64 = created.parse().ok()?;
    Some(if created < 100_000_000_000 {
        created.saturating_mul(1000)
    } else {
        created
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::normalize::sha256_hex;
    use crate::domain::{normalize_event, IngestRules};
    use serde_json::json;

    /// 2026-09-21, unix seconds.
    const NOW: i64 = 1_790_000_000;
    const NOW_MS: i64 = NOW * 1000;
    const DAY: i64 = 24 * 60 * 60;
    const RULES: MemoryRules = MemoryRules {
        lifetime_ms: 90 * DAY_MS,
    };
    const UA: &str = "Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0";

    fn fbc_clicked_at(ms: i64) -> String {
        format!("fb.1.{ms}.IwAR2F4-dbP0l7Mn1IawQQGCINEz7PYX")
    }

    /// A raw event through the real normalizer, so payloads are exactly as sent to Meta.
    fn normalized(raw: Value) -> (Value, ActionSource, i64) {
        let (event, _) = normalize_event(&raw, &IngestRules::default(), NOW, &mut || {
            "generated".to_owned()
        })
        .expect("valid event");
        (event.payload, event.action_source, event.event_time)
    }

    /// The landing-page Lead: email, external id and every browser identifier.
    fn website_lead(event_time: i64) -> Value {
        json!({
            "event_name": "Lead", "event_time": event_time, "action_source": "website",
            "event_source_url": "https://lp.example.com/?fbclid=x",
            "email": "Ana.Silva@Example.com", "external_id": "CRM-42", "first_name": "Ana",
            "phone": "+55 11 98765-4321",
            "fbc": fbc_clicked_at((event_time - 60) * 1000),
            "fbp": "fb.1.1596403881668.1116446470",
            "client_ip_address": "2001:db8::7", "client_user_agent": UA
        })
    }

    fn crm_purchase(user_data: Value, event_time: i64) -> Value {
        json!({
            "event_name": "Purchase", "event_time": event_time,
            "action_source": "system_generated", "value": 120, "currency": "BRL",
            "user_data": user_data
        })
    }

    /// What `remember` would leave in storage: per identity and field, the newest value.
    fn stored(remember: &[(String, Remembered)]) -> BTreeMap<(String, MatchField), Remembered> {
        let mut table: BTreeMap<(String, MatchField), Remembered> = BTreeMap::new();
        for (identity, value) in remember {
            let key = (identity.clone(), value.field);
            if table.get(&key).is_none_or(|v| value.seen_at >= v.seen_at) {
                table.insert(key, value.clone());
            }
        }
        table
    }

    /// What a later event with `identities` would read.
    fn lookup(
        table: &BTreeMap<(String, MatchField), Remembered>,
        identities: &[String],
    ) -> Vec<Remembered> {
        table
            .iter()
            .filter(|((identity, _), _)| identities.contains(identity))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Remembers `first`, then recalls for `later` as the memory would.
    fn first_then(first: Value, later: Value) -> (Value, Recollection) {
        let (mut lead, source, time) = normalized(first);
        let remembered = recall_and_fill(&mut lead, source, time, &[], &RULES);
        assert!(remembered.filled.is_empty());
        let table = stored(&remembered.remember);
        let (mut payload, source, time) = normalized(later);
        let recalled = lookup(&table, &identities(&payload));
        let recollection = recall_and_fill(&mut payload, source, time, &recalled, &RULES);
        (payload, recollection)
    }

    fn names(fields: &[MatchField]) -> Vec<&'static str> {
        fields.iter().map(|f| f.as_str()).collect()
    }

    #[test]
    fn a_crm_purchase_with_only_the_external_id_gets_the_leads_browser_identifiers() {
        let lead = website_lead(NOW - 3 * DAY);
        let (purchase, recollection) = first_then(
            lead.clone(),
            crm_purchase(json!({"external_id": "crm-42"}), NOW),
        );
        let user = &purchase["user_data"];
        assert_eq!(user["fbc"], lead["fbc"]);
        assert_eq!(user["fbp"], "fb.1.1596403881668.1116446470");
        assert_eq!(user["client_ip_address"], "2001:db8::7");
        assert_eq!(user["client_user_agent"], UA);
        assert_eq!(user["em"], json!([sha256_hex("ana.silva@example.com")]));
        assert_eq!(user["ph"], json!([sha256_hex("5511987654321")]));
        assert_eq!(user["fn"], json!([sha256_hex("ana")]));
        // Its own external id is kept, not filled.
        assert_eq!(user["external_id"], json!([sha256_hex("crm-42")]));
        assert_eq!(
            names(&recollection.filled),
            [
                "fbc",
                "fbp",
                "client_ip_address",
                "client_user_agent",
                "em",
                "ph",
                "fn"
            ]
        );
    }

    #[test]
    fn the_email_alone_or_the_lead_id_alone_find_the_person_too() {
        let (purchase, recollection) = first_then(
            website_lead(NOW - DAY),
            crm_purchase(json!({"email": "ana.silva@example.com"}), NOW),
        );
        assert_eq!(
            purchase["user_data"]["external_id"],
            json!([sha256_hex("crm-42")])
        );
        assert!(recollection.filled.contains(&MatchField::Fbc));

        let mut lead = website_lead(NOW - DAY);
        lead["lead_id"] = json!("123456789012345");
        let (purchase, _) = first_then(
            lead,
            crm_purchase(json!({"lead_id": 123_456_789_012_345_u64}), NOW),
        );
        assert_eq!(purchase["user_data"]["client_ip_address"], "2001:db8::7");
        // Its own lead id stays as given.
        assert_eq!(
            purchase["user_data"]["lead_id"],
            json!(123_456_789_012_345_u64)
        );
    }

    #[test]
    fn a_lead_id_finds_the_person_but_is_never_filled_in() {
        // An invalid lead id makes Meta refuse the event: remembered, it would sink every
        // later event of the person.
        let mut lead = website_lead(NOW - DAY);
        lead["lead_id"] = json!("123456789012345");
        let (purchase, recollection) =
            first_then(lead, crm_purchase(json!({"external_id": "crm-42"}), NOW));
        assert!(purchase["user_data"].get("lead_id").is_none());
        assert!(recollection.filled.contains(&MatchField::Fbc));
        assert!(recollection
            .remember
            .iter()
            .all(|(_, r)| r.field.as_str() != "lead_id"));
    }

    #[test]
    fn identities_are_hashed_external_ids_the_lead_id_and_hashed_emails() {
        let builder = format!("{}.AQQCAQMB", sha256_hex("b@example.com").to_uppercase());
        let payload = json!({"user_data": {
            "external_id": [sha256_hex("a"), sha256_hex("b")],
            "lead_id": "123456789012345",
            "em": [sha256_hex("a@example.com"), builder, "not-a-hash"],
            "ph": [sha256_hex("5511987654321")],
            "fbp": "fb.1.1596403881668.1116446470"
        }});
        assert_eq!(
            identities(&payload),
            [
                format!("x:{}", sha256_hex("a")),
                format!("x:{}", sha256_hex("b")),
                "l:123456789012345".to_owned(),
                format!("e:{}", sha256_hex("a@example.com")),
                // The appendix is not part of the person's identity; the digest is lowercase.
                format!("e:{}", sha256_hex("b@example.com")),
            ]
        );
        let many: Vec<String> = (0..20).map(|i| sha256_hex(&i.to_string())).collect();
        assert_eq!(
            identities(&json!({"user_data": {"em": many}})).len(),
            MAX_IDENTITIES_PER_EVENT
        );
        assert!(identities(&json!({"user_data": {"fbp": "fb.1.1.1"}})).is_empty());
    }

    #[test]
    fn nothing_raw_is_ever_remembered() {
        let raw_email = "ana.silva@example.com";
        // A payload that somehow still carries raw values where hashes belong.
        let mut payload = json!({
            "event_name": "Lead", "event_time": NOW, "action_source": "other",
            "user_data": {
                "em": [raw_email, sha256_hex(raw_email)],
                "ph": "5511987654321", "fn": ["Ana"], "ln": "Silva",
                "external_id": "crm-42", "lead_id": "not a number",
                "client_ip_address": "not an ip", "fbc": "not-an-fbc",
                "fbp": "fb.1.1596403881668.1116446470",
                "madid": "38400000-8cf0-11bd-b23e-10b96e40000d"
            }
        });
        let recollection = recall_and_fill(&mut payload, ActionSource::Other, NOW, &[], &RULES);
        let text = serde_json::to_string(
            &recollection
                .remember
                .iter()
                .map(|(i, r)| json!([i, r.field.as_str(), r.value]))
                .collect::<Vec<_>>(),
        )
        .expect("json");
        for raw in [
            raw_email,
            "5511987654321",
            "Ana",
            "Silva",
            "crm-42",
            "not a number",
            "not an ip",
            "not-an-fbc",
            "38400000",
        ] {
            assert!(!text.contains(raw), "{raw} was remembered: {text}");
        }
        let fields: std::collections::BTreeSet<&str> = recollection
            .remember
            .iter()
            .map(|(_, r)| r.field.as_str())
            .collect();
        // The hashed email is the identity itself; the browser id is what is worth keeping.
        assert_eq!(fields.into_iter().collect::<Vec<_>>(), ["fbp"]);
        assert!(recollection
            .remember
            .iter()
            .all(|(identity, _)| *identity == format!("e:{}", sha256_hex(raw_email))));
    }

    #[test]
    fn recalled_values_that_are_not_hashes_are_never_filled() {
        let mut payload = json!({"user_data": {"external_id": [sha256_hex("crm-42")]}});
        let recalled = vec![Remembered {
            field: MatchField::Em,
            value: json!(["ana.silva@example.com"]),
            seen_at: NOW_MS,
            expires_at: NOW_MS + DAY_MS,
        }];
        let recollection = recall_and_fill(
            &mut payload,
            ActionSource::SystemGenerated,
            NOW,
            &recalled,
            &RULES,
        );
        assert!(recollection.filled.is_empty());
        assert!(payload["user_data"].get("em").is_none());
    }

    #[test]
    fn fields_the_event_carries_are_never_replaced() {
        let (purchase, recollection) = first_then(
            website_lead(NOW - DAY),
            crm_purchase(
                json!({"external_id": "crm-42", "email": "new@example.com",
                       "client_ip_address": "203.0.113.9"}),
                NOW,
            ),
        );
        assert_eq!(
            purchase["user_data"]["em"],
            json!([sha256_hex("new@example.com")])
        );
        assert_eq!(purchase["user_data"]["client_ip_address"], "203.0.113.9");
        assert!(!recollection.filled.contains(&MatchField::Em));
        assert!(!recollection.filled.contains(&MatchField::ClientIpAddress));
        assert!(recollection.filled.contains(&MatchField::Fbc));
    }

    #[test]
    fn the_newest_value_of_a_field_wins() {
        let identity = format!("x:{}", sha256_hex("crm-42"));
        let remembered = |ip: &str, seen_at: i64| Remembered {
            field: MatchField::ClientIpAddress,
            value: json!(ip),
            seen_at,
            expires_at: seen_at + RULES.lifetime_ms,
        };
        let recalled = [
            remembered("192.0.2.1", NOW_MS - 5 * DAY_MS),
            remembered("192.0.2.2", NOW_MS - DAY_MS),
            remembered("192.0.2.3", NOW_MS - 3 * DAY_MS),
        ];
        let mut payload = json!({"user_data": {"external_id": [sha256_hex("crm-42")]}});
        let recollection =
            recall_and_fill(&mut payload, ActionSource::Other, NOW, &recalled, &RULES);
        assert_eq!(payload["user_data"]["client_ip_address"], "192.0.2.2");
        // Copied under the event's identities with its original time: it lives no longer.
        let copied: Vec<_> = recollection
            .remember
            .iter()
            .filter(|(_, r)| r.field == MatchField::ClientIpAddress)
            .collect();
        assert_eq!(copied.len(), 1);
        assert_eq!(copied[0].0, identity);
        assert_eq!(copied[0].1.seen_at, NOW_MS - DAY_MS);
    }

    #[test]
    fn an_older_event_does_not_displace_newer_values() {
        let lead = website_lead(NOW);
        let (mut late_backfill, source, time) = normalized(crm_purchase(
            json!({"external_id": "crm-42", "client_ip_address": "192.0.2.50"}),
            NOW - 2 * DAY,
        ));
        let (mut first, lead_source, lead_time) = normalized(lead);
        let table =
            stored(&recall_and_fill(&mut first, lead_source, lead_time, &[], &RULES).remember);
        let recalled = lookup(&table, &identities(&late_backfill));
        let recollection = recall_and_fill(&mut late_backfill, source, time, &recalled, &RULES);
        let ip: Vec<_> = recollection
            .remember
            .iter()
            .filter(|(_, r)| r.field == MatchField::ClientIpAddress)
            .map(|(_, r)| r.value.clone())
            .collect();
        assert!(!ip.is_empty());
        assert!(ip.iter().all(|v| *v == json!("2001:db8::7")), "{ip:?}");
        // The event itself keeps the IP it carries.
        assert_eq!(
            late_backfill["user_data"]["client_ip_address"],
            "192.0.2.50"
        );
    }

    #[test]
    fn expired_values_are_not_used() {
        let short = MemoryRules {
            lifetime_ms: 2 * DAY_MS,
        };
        let (mut lead, source, time) = normalized(website_lead(NOW - 3 * DAY));
        let remembered = recall_and_fill(&mut lead, source, time, &[], &short).remember;
        assert!(remembered
            .iter()
            .all(|(_, r)| r.expires_at == r.seen_at + 2 * DAY_MS));
        let recalled: Vec<Remembered> = remembered.into_iter().map(|(_, r)| r).collect();
        let (mut purchase, source, time) =
            normalized(crm_purchase(json!({"external_id": "crm-42"}), NOW));
        let recollection = recall_and_fill(&mut purchase, source, time, &recalled, &short);
        assert!(recollection.filled.is_empty(), "{:?}", recollection.filled);
        // Stored under a longer lifetime, then shortened by configuration: the shorter one holds.
        let (mut lead, source, time) = normalized(website_lead(NOW - 3 * DAY));
        let recalled: Vec<Remembered> = recall_and_fill(&mut lead, source, time, &[], &RULES)
            .remember
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        let (mut purchase, source, time) =
            normalized(crm_purchase(json!({"external_id": "crm-42"}), NOW));
        assert!(
            recall_and_fill(&mut purchase, source, time, &recalled, &short)
                .filled
                .is_empty()
        );
    }

    #[test]
    fn a_click_older_than_90_days_or_after_the_event_is_not_filled() {
        let lead_time_ms = NOW_MS - 2 * DAY_MS;
        let fbc_value = |clicked_at: i64| Remembered {
            field: MatchField::Fbc,
            value: json!(fbc_clicked_at(clicked_at)),
            seen_at: lead_time_ms,
            expires_at: lead_time_ms + RULES.lifetime_ms,
        };
        let fill = |recalled: Remembered| {
            let mut payload = json!({"user_data": {"external_id": [sha256_hex("crm-42")]}});
            recall_and_fill(
                &mut payload,
                ActionSource::SystemGenerated,
                NOW,
                &[recalled],
                &RULES,
            )
            .filled
        };
        assert_eq!(fill(fbc_value(NOW_MS - 89 * DAY_MS)), [MatchField::Fbc]);
        assert!(fill(fbc_value(NOW_MS - 91 * DAY_MS)).is_empty());
        // A click after the conversion did not cause it (a few minutes of clock skew aside).
        assert_eq!(fill(fbc_value(NOW_MS + 60_000)), [MatchField::Fbc]);
        assert!(fill(fbc_value(NOW_MS + DAY_MS)).is_empty());
        // A click id in seconds is understood as such.
        let mut seconds = fbc_value(0);
        seconds.value = json!(format!("fb.1.{}.AbC", NOW - DAY));
        assert_eq!(fill(seconds), [MatchField::Fbc]);
    }

    #[test]
    fn click_times_come_from_well_formed_click_ids_only() {
        assert_eq!(
            click_time_ms("fb.1.1554763741205.AbCdEf"),
            Some(1_554_763_741_205)
        );
        assert_eq!(
            click_time_ms("fb.1.1554763741205.AbCdEf.ABcDEFGh"),
            Some(1_554_763_741_205)
        );
        assert_eq!(
            click_time_ms("fb.1.1554763741.AbC"),
            Some(1_554_763_741_000)
        );
        for bad in [
            "",
            "fb.1.1554763741205",
            "fb.1..AbC",
            "fb.x.1554763741205.AbC",
            "fb.1.155476374120a.AbC",
            "fc.1.1554763741205.AbC",
            "fb.1.1554763741205.AbC.x.y",
            "fb.1.1554763741205.",
            "fb.1.1554763741205.Ab C",
            "fb.1.99999999999999999999.AbC",
        ] {
            assert_eq!(click_time_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_remembered_click_expires_90_days_after_the_click_whatever_the_lifetime() {
        let long = MemoryRules {
            lifetime_ms: 365 * DAY_MS,
        };
        let clicked_at = NOW_MS - 80 * DAY_MS;
        let mut payload = json!({"user_data": {
            "external_id": [sha256_hex("crm-42")], "fbc": fbc_clicked_at(clicked_at),
            "fbp": "fb.1.1596403881668.1116446470"
        }});
        let remember = recall_and_fill(&mut payload, ActionSource::Other, NOW, &[], &long).remember;
        let expiry = |field| {
            remember
                .iter()
                .find(|(_, r)| r.field == field)
                .map(|(_, r)| r.expires_at)
        };
        assert_eq!(expiry(MatchField::Fbc), Some(clicked_at + FBC_MAX_AGE_MS));
        assert_eq!(expiry(MatchField::Fbp), Some(NOW_MS + 365 * DAY_MS));
        // A click already too old is not remembered at all.
        let mut payload = json!({"user_data": {
            "external_id": [sha256_hex("crm-42")], "fbc": fbc_clicked_at(NOW_MS - 100 * DAY_MS)
        }});
        let remember = recall_and_fill(&mut payload, ActionSource::Other, NOW, &[], &long).remember;
        assert!(remember.iter().all(|(_, r)| r.field != MatchField::Fbc));
    }

    #[test]
    fn what_is_filled_depends_on_where_the_event_happened() {
        let lead = website_lead(NOW - DAY);
        let later = |source: &str| {
            let mut event = json!({
                "event_name": "Contact", "event_time": NOW, "action_source": source,
                "external_id": "crm-42"
            });
            match source {
                "website" => {
                    event["event_source_url"] = json!("https://shop.example.com/contact");
                    event["client_user_agent"] = json!("Other browser/1.0");
                }
                "app" => {
                    event["app_data"] =
                        json!({"advertiser_tracking_enabled": 1, "extinfo": ["a2"]});
                }
                "business_messaging" => event["messaging_channel"] = json!("whatsapp"),
                _ => {}
            }
            let (payload, recollection) = first_then(lead.clone(), event);
            (names(&recollection.filled), payload)
        };
        let person = ["em", "ph", "fn"];
        let everything = [
            "fbc",
            "fbp",
            "client_ip_address",
            "client_user_agent",
            "em",
            "ph",
            "fn",
        ];
        for source in ["system_generated", "other", "chat", "email", "phone_call"] {
            assert_eq!(later(source).0, everything, "{source}");
        }
        // A website event keeps its own browser: only the click and the person are added.
        let (filled, payload) = later("website");
        assert_eq!(filled, ["fbc", "em", "ph", "fn"]);
        assert_eq!(
            payload["user_data"]["client_user_agent"],
            "Other browser/1.0"
        );
        assert!(payload["user_data"].get("client_ip_address").is_none());
        for source in ["app", "physical_store", "business_messaging"] {
            assert_eq!(later(source).0, person, "{source}");
        }
    }

    #[test]
    fn limited_data_use_events_are_neither_enriched_nor_remembered() {
        let ldu = |mut event: Value| {
            event["data_processing_options"] = json!(["LDU"]);
            event["data_processing_options_country"] = json!(0);
            event["data_processing_options_state"] = json!(0);
            event
        };
        let (mut lead, source, time) = normalized(ldu(website_lead(NOW - DAY)));
        assert!(identities(&lead).is_empty());
        assert!(recall_and_fill(&mut lead, source, time, &[], &RULES)
            .remember
            .is_empty());

        let (purchase, recollection) = first_then(
            website_lead(NOW - DAY),
            ldu(crm_purchase(json!({"external_id": "crm-42"}), NOW)),
        );
        assert!(recollection.filled.is_empty());
        assert!(recollection.remember.is_empty());
        assert!(purchase["user_data"].get("fbc").is_none());
    }

    #[test]
    fn a_filled_email_links_the_identities_it_was_found_through() {
        let (purchase, recollection) = first_then(
            website_lead(NOW - DAY),
            crm_purchase(json!({"external_id": "crm-42"}), NOW),
        );
        assert!(purchase["user_data"]["em"].is_array());
        let identities: std::collections::BTreeSet<&str> = recollection
            .remember
            .iter()
            .map(|(identity, _)| identity.as_str())
            .collect();
        assert_eq!(
            identities.into_iter().collect::<Vec<_>>(),
            [
                format!("e:{}", sha256_hex("ana.silva@example.com")),
                format!("x:{}", sha256_hex("crm-42")),
            ]
        );
    }

    #[test]
    fn a_payload_without_user_data_or_memory_is_left_alone() {
        let mut payload = json!({"event_name": "Lead"});
        assert_eq!(
            recall_and_fill(&mut payload, ActionSource::Other, NOW, &[], &RULES),
            Recollection::default()
        );
        assert_eq!(payload, json!({"event_name": "Lead"}));
        let (mut lead, source, time) = normalized(website_lead(NOW));
        let before = lead.clone();
        let recollection = recall_and_fill(&mut lead, source, time, &[], &RULES);
        assert!(recollection.filled.is_empty());
        assert_eq!(lead, before);
    }

    #[test]
    fn contact_details_alone_start_no_record_but_add_to_a_known_person() {
        let email = sha256_hex("ana@example.com");
        let mut crm_only =
            json!({"user_data": {"em": [email.clone()], "ph": [sha256_hex("5511987654321")]}});
        let recollection = recall_and_fill(&mut crm_only, ActionSource::Other, NOW, &[], &RULES);
        assert!(
            recollection.remember.is_empty(),
            "{:?}",
            recollection.remember
        );

        let known = Remembered {
            field: MatchField::Fbp,
            value: json!("fb.1.1596403881668.1116446470"),
            seen_at: (NOW - 60) * 1000,
            expires_at: (NOW + 86_400) * 1000,
        };
        let mut crm_only =
            json!({"user_data": {"em": [email], "ph": [sha256_hex("5511987654321")]}});
        let recollection =
            recall_and_fill(&mut crm_only, ActionSource::Other, NOW, &[known], &RULES);
        assert!(recollection
            .remember
            .iter()
            .any(|(_, r)| r.field == MatchField::Ph));
    }

    #[test]
    fn an_identity_does_not_remember_itself() {
        let email = sha256_hex("ana.silva@example.com");
        let other = sha256_hex("ana@work.example");
        let mut payload = json!({"user_data": {
            "em": [email.clone()], "ph": [sha256_hex("5511987654321")],
            "external_id": [sha256_hex("crm-42")], "lead_id": "123456789012345"
        }});
        let remember =
            recall_and_fill(&mut payload, ActionSource::Other, NOW, &[], &RULES).remember;
        let pairs: Vec<(String, &str)> = remember
            .iter()
            .map(|(identity, r)| (identity.chars().take(2).collect(), r.field.as_str()))
            .collect();
        for (identity, field) in [("e:", "em"), ("x:", "external_id")] {
            assert!(
                !pairs.contains(&(identity.to_owned(), field)),
                "{identity}{field}"
            );
        }
        assert!(pairs.contains(&("e:".to_owned(), "ph")));
        assert!(pairs.contains(&("x:".to_owned(), "em")));
        assert!(pairs.contains(&("l:".to_owned(), "external_id")));
        assert!(pairs.contains(&("l:".to_owned(), "em")));
        // An email list says more than the identity: another address of the person.
        let mut payload = json!({"user_data": {"em": [email.clone(), other.clone()],
            "fbp": "fb.1.1596403881668.1116446470"}});
        let remember =
            recall_and_fill(&mut payload, ActionSource::Other, NOW, &[], &RULES).remember;
        assert_eq!(
            remember
                .iter()
                .filter(|(_, r)| r.field == MatchField::Em)
                .map(|(identity, r)| (identity.as_str(), r.field))
                .collect::<Vec<_>>(),
            [
                (format!("e:{email}").as_str(), MatchField::Em),
                (format!("e:{other}").as_str(), MatchField::Em)
            ]
        );
    }

    #[test]
    fn a_value_already_remembered_is_written_again_only_when_it_changes_or_a_day_later() {
        let value = |ip: &str, seen_at: i64| Remembered {
            field: MatchField::ClientIpAddress,
            value: json!(ip),
            seen_at,
            expires_at: seen_at + RULES.lifetime_ms,
        };
        let stored = value("192.0.2.1", NOW_MS);
        assert!(worth_writing(None, &stored));
        assert!(!worth_writing(Some(&stored), &value("192.0.2.1", NOW_MS)));
        assert!(!worth_writing(
            Some(&stored),
            &value("192.0.2.1", NOW_MS + REFRESH_MS - 1)
        ));
        assert!(worth_writing(
            Some(&stored),
            &value("192.0.2.1", NOW_MS + REFRESH_MS)
        ));
        assert!(worth_writing(Some(&stored), &value("192.0.2.2", NOW_MS)));
        // An older value would not replace the stored one: no point writing it.
        assert!(!worth_writing(
            Some(&stored),
            &value("192.0.2.2", NOW_MS - 1)
        ));
        // A longer life (a longer MATCH_KEY_MEMORY_DAYS since) is worth a write.
        let mut longer = value("192.0.2.1", NOW_MS);
        longer.expires_at += 30 * DAY_MS;
        assert!(worth_writing(Some(&stored), &longer));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-zA-Z0-9@._ +-]{0,40}",
                "[0-9a-f]{64}",
                "fb\\.[0-9]\\.[0-9]{1,14}\\.[A-Za-z0-9_-]{1,20}",
            ]
        }

        fn entry() -> impl Strategy<Value = Value> {
            prop_oneof![
                text().prop_map(Value::String),
                proptest::collection::vec(text().prop_map(Value::String), 0..4)
                    .prop_map(Value::Array),
                any::<u64>().prop_map(Value::from),
                Just(Value::Null),
            ]
        }

        proptest! {
            /// Whatever `user_data` holds, the memory only ever keeps hashes where hashes
            /// belong, never panics, and never fills a field the event has.
            #[test]
            fn only_hashes_and_identifiers_are_kept(
                entries in proptest::collection::btree_map(
                    prop_oneof![
                        Just("em".to_owned()), Just("ph".to_owned()), Just("fn".to_owned()),
                        Just("external_id".to_owned()), Just("lead_id".to_owned()),
                        Just("fbc".to_owned()), Just("fbp".to_owned()),
                        Just("client_ip_address".to_owned()),
                        Just("client_user_agent".to_owned()), "[a-z_]{1,12}",
                    ],
                    entry(),
                    0..10,
                ),
                event_offset in -10_000i64..10_000,
            ) {
                let mut payload = json!({"user_data": entries});
                let recollection = recall_and_fill(
                    &mut payload, ActionSource::Other, NOW + event_offset, &[], &RULES,
                );
                for (identity, remembered) in &recollection.remember {
                    prop_assert!(identity.len() <= 66);
                    prop_assert!(is_rememberable(remembered.field, &remembered.value));
                    if remembered.field.is_hashed() {
                        for item in remembered.value.as_array().into_iter().flatten() {
                            prop_assert!(item.as_str().and_then(hash_digest).is_some());
                        }
                    }
                    prop_assert!(remembered.expires_at > remembered.seen_at);
                }
                let recalled: Vec<Remembered> =
                    recollection.remember.into_iter().map(|(_, r)| r).collect();
                let before = payload.clone();
                let again = recall_and_fill(
                    &mut payload, ActionSource::Other, NOW + event_offset, &recalled, &RULES,
                );
                for field in again.filled {
                    prop_assert!(!has_value(before["user_data"].get(field.as_str())));
                }
            }
        }
    }
}
