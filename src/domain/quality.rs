//! Match quality, our side of it: which match keys a normalized event carries, which of them the
//! match-key memory filled in, and what a dropped value was (field and kind of reason, never the
//! value). Pure: callers count; [`crate::quality`] stores and reports.

use serde::Serialize;
use serde_json::Value;

use super::Warning;

/// A match key as the quality report counts it: Meta's high-value keys (`meta-capi.md` §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchKey {
    /// Hashed email.
    Em,
    /// Hashed phone number.
    Ph,
    /// Hashed first *and* last name: Meta counts the pair (`fn` + `ln`).
    FnLn,
    /// Hashed external id.
    ExternalId,
    /// Click id.
    Fbc,
    /// Browser id.
    Fbp,
    /// `client_ip_address`.
    Ip,
    /// `client_user_agent`.
    UserAgent,
    /// Lead Ads lead id.
    LeadId,
}

impl MatchKey {
    /// Every key, in report order.
    pub const ALL: [MatchKey; 9] = [
        MatchKey::Em,
        MatchKey::Ph,
        MatchKey::FnLn,
        MatchKey::ExternalId,
        MatchKey::Fbc,
        MatchKey::Fbp,
        MatchKey::Ip,
        MatchKey::UserAgent,
        MatchKey::LeadId,
    ];

    /// Stable name (report fields, table columns).
    pub fn as_str(self) -> &'static str {
        match self {
            MatchKey::Em => "em",
            MatchKey::Ph => "ph",
            MatchKey::FnLn => "fn_ln",
            MatchKey::ExternalId => "external_id",
            MatchKey::Fbc => "fbc",
            MatchKey::Fbp => "fbp",
            MatchKey::Ip => "ip",
            MatchKey::UserAgent => "user_agent",
            MatchKey::LeadId => "lead_id",
        }
    }

    /// Position in [`MatchKey::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The key a `user_data` field counts towards (`fn` and `ln` both count towards `fn_ln`).
    pub fn of_user_data_key(key: &str) -> Option<Self> {
        Some(match key {
            "em" => MatchKey::Em,
            "ph" => MatchKey::Ph,
            "fn" | "ln" => MatchKey::FnLn,
            "external_id" => MatchKey::ExternalId,
            "fbc" => MatchKey::Fbc,
            "fbp" => MatchKey::Fbp,
            "client_ip_address" => MatchKey::Ip,
            "client_user_agent" => MatchKey::UserAgent,
            "lead_id" => MatchKey::LeadId,
            _ => return None,
        })
    }
}

/// A set of [`MatchKey`]s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MatchKeys(u16);

impl MatchKeys {
    /// Whether `key` is in the set.
    pub fn contains(self, key: MatchKey) -> bool {
        self.0 & (1 << key.index()) != 0
    }

    fn insert(&mut self, key: MatchKey) {
        self.0 |= 1 << key.index();
    }

    /// The keys in the set, in report order.
    pub fn iter(self) -> impl Iterator<Item = MatchKey> {
        MatchKey::ALL.into_iter().filter(move |k| self.contains(*k))
    }
}

/// The match keys a normalized event (`data[i]` as sent) carries. `fn_ln` needs both names.
pub fn carried(payload: &Value) -> MatchKeys {
    let mut keys = MatchKeys::default();
    let Some(user_data) = payload.get("user_data").and_then(Value::as_object) else {
        return keys;
    };
    let has = |field: &str| {
        user_data.get(field).is_some_and(|v| match v {
            Value::Null => false,
            Value::String(s) => !s.is_empty(),
            Value::Array(items) => !items.is_empty(),
            _ => true,
        })
    };
    for key in MatchKey::ALL {
        let present = match key {
            MatchKey::FnLn => has("fn") && has("ln"),
            other => user_data
                .keys()
                .any(|field| MatchKey::of_user_data_key(field) == Some(other) && has(field)),
        };
        if present {
            keys.insert(key);
        }
    }
    keys
}

/// The match keys among `fields` (`user_data` keys the memory filled in) that the event now
/// `carries`: a filled `fn` counts for `fn_ln` only when the event has both names.
pub fn filled(fields: &[&str], carries: MatchKeys) -> MatchKeys {
    let mut keys = MatchKeys::default();
    for key in fields.iter().filter_map(|f| MatchKey::of_user_data_key(f)) {
        if carries.contains(key) {
            keys.insert(key);
        }
    }
    keys
}

/// A dropped value as counted: which field (Meta's key, or `unknown` for names we do not
/// know, which are the sender's and may be anything) and why, in a few words. Never the value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Dropped {
    /// `ph`, `em`, `fbc`, `event_source_url`, `custom_data.currency`, … or `unknown`.
    pub field: String,
    /// The normalizer's reason without advice, e.g. `not a valid phone number`.
    pub reason: String,
}

/// Fields whose names may be counted as they are (every other name is the sender's).
const KNOWN_FIELDS: [&str; 27] = [
    "em",
    "ph",
    "fn",
    "ln",
    "ct",
    "st",
    "zp",
    "country",
    "db",
    "ge",
    "external_id",
    "client_ip_address",
    "client_user_agent",
    "fbc",
    "fbp",
    "fbclid",
    "lead_id",
    "subscription_id",
    "fb_login_id",
    "anon_id",
    "madid",
    "page_id",
    "ctwa_clid",
    "event_source_url",
    "referrer_url",
    "value",
    "currency",
];

/// Flat field names and the `user_data` key they stand for.
const LONG_NAMES: [(&str, &str); 10] = [
    ("email", "em"),
    ("phone", "ph"),
    ("first_name", "fn"),
    ("last_name", "ln"),
    ("city", "ct"),
    ("state", "st"),
    ("zip", "zp"),
    ("date_of_birth", "db"),
    ("gender", "ge"),
    ("opt_out", "opt_out"),
];

/// What a normalizer [`Warning`] dropped, as counted: the field named by Meta's key (list
/// indices and the `user_data.` prefix removed; long names mapped), the reason cut before any
/// advice (`…; set DEFAULT_COUNTRY`) and the trailing "dropped".
pub fn dropped(warning: &Warning) -> Dropped {
    let reason = warning
        .reason
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .chars()
        .take(80)
        .collect::<String>();
    let unknown = reason.starts_with("unknown");
    let path = warning.field.split('[').next().unwrap_or("");
    let (prefix, name) = match path.rsplit_once('.') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, path),
    };
    let name = LONG_NAMES
        .iter()
        .find(|(long, _)| *long == name)
        .map_or(name, |(_, key)| *key);
    let field = if unknown || !KNOWN_FIELDS.contains(&name) {
        "unknown".to_owned()
    } else {
        match prefix {
            Some("custom_data") => format!("custom_data.{name}"),
            _ => name.to_owned(),
        }
    };
    Dropped { field, reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys(set: MatchKeys) -> Vec<&'static str> {
        set.iter().map(MatchKey::as_str).collect()
    }

    #[test]
    fn carried_keys_are_read_from_user_data() {
        let payload = json!({
            "event_name": "Lead",
            "user_data": {
                "em": ["a".repeat(64)],
                "ph": [],
                "fn": ["b".repeat(64)],
                "client_ip_address": "203.0.113.9",
                "client_user_agent": "",
                "fbp": "fb.1.1.2",
                "lead_id": 1234567890,
                "zp": ["c".repeat(64)]
            }
        });
        assert_eq!(keys(carried(&payload)), ["em", "fbp", "ip", "lead_id"]);
        let both = json!({"user_data": {"fn": ["x"], "ln": ["y"], "external_id": ["z"], "fbc": "fb.1.2.abc"}});
        assert_eq!(keys(carried(&both)), ["fn_ln", "external_id", "fbc"]);
        assert_eq!(
            keys(carried(&json!({"event_name": "Lead"}))),
            Vec::<&str>::new()
        );
        assert_eq!(
            keys(carried(&json!({"user_data": "nope"}))),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn filled_counts_only_keys_the_event_now_carries() {
        let payload =
            json!({"user_data": {"em": ["e"], "fn": ["f"], "fbc": "fb.1.2.x", "ct": ["c"]}});
        let carries = carried(&payload);
        // `fn` alone does not make the pair; `ct` is no match key of the report.
        assert_eq!(keys(filled(&["fbc", "fn", "ct"], carries)), ["fbc"]);
        assert_eq!(keys(filled(&["em"], carries)), ["em"]);
    }

    fn warning(field: &str, reason: &str) -> Warning {
        Warning {
            field: field.to_owned(),
            reason: reason.to_owned(),
        }
    }

    #[test]
    fn dropped_names_the_field_and_reason_but_never_a_sender_chosen_name() {
        let cases = [
            (
                warning("phone", "not a valid phone number; dropped"),
                ("ph", "not a valid phone number"),
            ),
            (
                warning(
                    "user_data.ph[1]",
                    "phone number has no country code; set the event's country or DEFAULT_COUNTRY; dropped",
                ),
                ("ph", "phone number has no country code"),
            ),
            (
                warning("user_data.email", "not an email address; dropped"),
                ("em", "not an email address"),
            ),
            (
                warning("custom_data.currency", "not an ISO 4217 currency code; dropped"),
                ("custom_data.currency", "not an ISO 4217 currency code"),
            ),
            (
                warning("event_source_url", "not an http(s) URL; dropped"),
                ("event_source_url", "not an http(s) URL"),
            ),
            (
                warning(
                    "jane.doe@example.com",
                    "unknown field; dropped (nothing unknown is sent to Meta)",
                ),
                ("unknown", "unknown field"),
            ),
            (
                warning(
                    "user_data.em",
                    "unknown user_data key; dropped (nothing unknown is sent to Meta)",
                ),
                ("unknown", "unknown user_data key"),
            ),
            (
                warning("user_data.whatever", "must be a string; dropped"),
                ("unknown", "must be a string"),
            ),
        ];
        for (input, (field, reason)) in cases {
            let out = dropped(&input);
            assert_eq!(
                (out.field.as_str(), out.reason.as_str()),
                (field, reason),
                "{input:?}"
            );
        }
    }
}
