//! Builds the body of one Graph request from stored payloads. Pure.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Sent as `partner_agent` so Meta's Dataset Quality API can attribute our events.
pub const PARTNER_AGENT: &str = concat!(
    "capibridge_",
    env!("CARGO_PKG_VERSION_MAJOR"),
    "_",
    env!("CARGO_PKG_VERSION_MINOR")
);

/// Request-level fields of a Graph `/{pixel}/events` call.
pub struct RequestFields<'a> {
    /// The access token; it travels in the body, never in the URL.
    pub access_token: &'a str,
    /// `appsecret_proof`, when an app secret is configured.
    pub appsecret_proof: Option<&'a str>,
    /// Routes the events to Events Manager's Test Events tab.
    pub test_event_code: Option<&'a str>,
}

/// The JSON body: `{"data":[…], "access_token", "appsecret_proof"?, "test_event_code"?,
/// "partner_agent"}`. Payloads are already JSON objects and are inserted as they are.
pub fn build_body<'p>(
    payloads: impl IntoIterator<Item = &'p str>,
    fields: &RequestFields<'_>,
) -> String {
    let mut body = String::from("{\"data\":[");
    for (i, payload) in payloads.into_iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(payload);
    }
    body.push(']');
    push_field(&mut body, "access_token", fields.access_token);
    if let Some(proof) = fields.appsecret_proof {
        push_field(&mut body, "appsecret_proof", proof);
    }
    if let Some(code) = fields.test_event_code {
        push_field(&mut body, "test_event_code", code);
    }
    push_field(&mut body, "partner_agent", PARTNER_AGENT);
    body.push('}');
    body
}

fn push_field(body: &mut String, name: &str, value: &str) {
    body.push_str(",\"");
    body.push_str(name);
    body.push_str("\":");
    // Serializing a &str cannot fail; fall back to an empty string all the same.
    body.push_str(&serde_json::to_string(value).unwrap_or_else(|_| "\"\"".to_owned()));
}

/// `appsecret_proof`: hex HMAC-SHA256 of the access token keyed with the app secret
/// (`meta-capi.md` §6, the form both official SDKs send).
pub fn appsecret_proof(app_secret: &str, access_token: &str) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(app_secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(access_token.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_carries_the_events_and_request_fields_as_valid_json() {
        let body = build_body(
            [r#"{"event_name":"Lead"}"#, r#"{"event_name":"Purchase"}"#],
            &RequestFields {
                access_token: "to\"ken",
                appsecret_proof: Some("proof"),
                test_event_code: Some("TEST123"),
            },
        );
        let v: serde_json::Value = serde_json::from_str(&body).expect("valid json");
        assert_eq!(v["data"].as_array().map(Vec::len), Some(2));
        assert_eq!(v["data"][1]["event_name"], "Purchase");
        assert_eq!(v["access_token"], "to\"ken");
        assert_eq!(v["appsecret_proof"], "proof");
        assert_eq!(v["test_event_code"], "TEST123");
        assert_eq!(v["partner_agent"], PARTNER_AGENT);
    }

    #[test]
    fn optional_fields_are_left_out() {
        let body = build_body(
            [],
            &RequestFields {
                access_token: "t",
                appsecret_proof: None,
                test_event_code: None,
            },
        );
        let v: serde_json::Value = serde_json::from_str(&body).expect("valid json");
        assert!(v.get("appsecret_proof").is_none());
        assert!(v.get("test_event_code").is_none());
    }

    #[test]
    fn appsecret_proof_matches_the_sdk_formula() {
        // Python: hmac.new(b"secret", b"token", hashlib.sha256).hexdigest()
        assert_eq!(
            appsecret_proof("secret", "token"),
            "e941110e3d2bfe82621f0e3e1434730d7305d106c5f68c87165d0b27a4611a4a"
        );
    }
}
