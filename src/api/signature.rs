//! Signed webhooks, for senders that sign instead of sending the secret itself (n8n, CRMs,
//! Make, Zapier, anything built on Standard Webhooks): the body is verified against every
//! configured `WEBHOOK_SECRET` (rotation), in constant time, over the raw bytes
//! (`integrations.md` §6). Pure: no I/O, the clock is passed in.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How far a Standard Webhooks timestamp may be from now, either way (the reference library's).
pub const TOLERANCE_SECS: i64 = 5 * 60;

/// Why a signature was refused; the reason never contains secrets or the body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The header is not in the expected format.
    #[error("malformed signature header")]
    Malformed,
    /// `webhook-timestamp` is outside the ±5-minute window (a replay, or a wrong clock).
    #[error("the signed timestamp is more than 5 minutes from now")]
    OutOfWindow,
    /// No configured secret produces this signature.
    #[error("signature does not match")]
    Mismatch,
}

/// An HMAC-SHA256 over `parts`, ready to `verify_slice` (constant time).
fn new_mac(key: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    for part in parts {
        mac.update(part);
    }
    mac
}

/// GitHub style: `X-Signature-256` (or `X-Hub-Signature-256`) = `sha256=<hex HMAC of body>`.
///
/// # Errors
/// [`SignatureError::Malformed`] or [`SignatureError::Mismatch`].
pub fn verify_body_hmac(
    secrets: &[String],
    body: &[u8],
    header: &str,
) -> Result<(), SignatureError> {
    let hex_signature = header
        .trim()
        .strip_prefix("sha256=")
        .ok_or(SignatureError::Malformed)?;
    let given = hex::decode(hex_signature).map_err(|_| SignatureError::Malformed)?;
    let matched = secrets.iter().any(|secret| {
        // `verify_slice` compares in constant time.
        new_mac(secret.as_bytes(), &[body])
            .verify_slice(&given)
            .is_ok()
    });
    if matched {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// Standard Webhooks v1: `webhook-signature` holds space-separated `v1,<base64>` entries over
/// `"{webhook-id}.{webhook-timestamp}.{body}"`. A `whsec_` secret is base64-decoded to get the
/// key, as the specification says; any other secret is used as it is.
///
/// # Errors
/// [`SignatureError`] naming what is wrong.
pub fn verify_standard_webhook(
    secrets: &[String],
    id: &str,
    timestamp: &str,
    body: &[u8],
    header: &str,
    now_secs: i64,
) -> Result<(), SignatureError> {
    let sent_at: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| SignatureError::Malformed)?;
    if (now_secs - sent_at).abs() > TOLERANCE_SECS {
        return Err(SignatureError::OutOfWindow);
    }
    let signatures: Vec<Vec<u8>> = header
        .split_whitespace()
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter_map(|b64| BASE64.decode(b64).ok())
        .collect();
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    let matched = secrets.iter().any(|secret| {
        let key = match secret.strip_prefix("whsec_") {
            Some(encoded) => match BASE64.decode(encoded) {
                Ok(key) => key,
                Err(_) => return false,
            },
            None => secret.as_bytes().to_vec(),
        };
        let signed: [&[u8]; 5] = [id.as_bytes(), b".", timestamp.trim().as_bytes(), b".", body];
        signatures
            .iter()
            .any(|given| new_mac(&key, &signed).verify_slice(given).is_ok())
    });
    if matched {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// Chatwoot (v4.11.2+): `X-Chatwoot-Signature: sha256=<hex>` over
/// `"{X-Chatwoot-Timestamp}.{body}"` with the webhook's secret; the timestamp must be within
/// ±5 minutes (`integrations.md` §2.4).
///
/// # Errors
/// [`SignatureError`] naming what is wrong.
pub fn verify_chatwoot(
    secret: &str,
    timestamp: &str,
    body: &[u8],
    header: &str,
    now_secs: i64,
) -> Result<(), SignatureError> {
    let sent_at: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| SignatureError::Malformed)?;
    let given = header
        .trim()
        .strip_prefix("sha256=")
        .and_then(|hex_signature| hex::decode(hex_signature).ok())
        .ok_or(SignatureError::Malformed)?;
    // The signature is checked before the window, so a stale but genuine delivery is told
    // apart from a forged one in the answer.
    new_mac(
        secret.as_bytes(),
        &[timestamp.trim().as_bytes(), b".", body],
    )
    .verify_slice(&given)
    .map_err(|_| SignatureError::Mismatch)?;
    if (now_secs - sent_at).abs() > TOLERANCE_SECS {
        return Err(SignatureError::OutOfWindow);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn github_style_body_hmac_matches_the_documented_vector() {
        // integrations.md §6.3.
        let header = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        let keys = secrets(&["old-secret", "It's a Secret to Everybody"]);
        assert_eq!(verify_body_hmac(&keys, b"Hello, World!", header), Ok(()));
        assert_eq!(
            verify_body_hmac(&keys, b"Hello, World?", header),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_body_hmac(&keys, b"Hello, World!", "sha1=abc"),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn standard_webhooks_match_the_reference_vector_within_the_window() {
        // integrations.md §6.2 (the reference library's test vector).
        let keys = secrets(&["whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"]);
        let id = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
        let body = br#"{"email":"test@example.com","username":"test_user"}"#;
        let header = "v1a,ignored= v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";
        let ts = 1_649_367_553;
        assert_eq!(
            verify_standard_webhook(&keys, id, &ts.to_string(), body, header, ts + 10),
            Ok(())
        );
        // A replay outside the window, or from the future, is refused.
        assert_eq!(
            verify_standard_webhook(&keys, id, &ts.to_string(), body, header, ts + 301),
            Err(SignatureError::OutOfWindow)
        );
        assert_eq!(
            verify_standard_webhook(&keys, id, &ts.to_string(), body, header, ts - 301),
            Err(SignatureError::OutOfWindow)
        );
        // Any change to the id, time or body breaks it.
        assert_eq!(
            verify_standard_webhook(&keys, "msg_other", &ts.to_string(), body, header, ts),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_standard_webhook(&keys, id, &ts.to_string(), b"{}", header, ts),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_standard_webhook(&keys, id, "yesterday", body, header, ts),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn chatwoot_signatures_follow_the_documented_vector() {
        // integrations.md §2.4.
        let body = br#"{"event":"message_created"}"#;
        let header = "sha256=6b5803aab446b6a9246d078d04b1da194e3a9f5d5a4e8eaf964f00e9272d4e47";
        let now = 1_700_000_000;
        assert_eq!(
            verify_chatwoot("cw_secret", "1700000000", body, header, now),
            Ok(())
        );
        assert_eq!(
            verify_chatwoot("other", "1700000000", body, header, now),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_chatwoot("cw_secret", "1700000001", body, header, now),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_chatwoot("cw_secret", "1700000000", body, header, now + 301),
            Err(SignatureError::OutOfWindow)
        );
        assert_eq!(
            verify_chatwoot("cw_secret", "1700000000", body, "6b58", now),
            Err(SignatureError::Malformed)
        );
    }
}
