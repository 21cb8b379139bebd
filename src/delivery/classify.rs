//! What a Graph API answer means for the events in the request (`meta-capi.md` §4). Pure:
//! bytes and headers in, a [`Verdict`] out. Branches on Meta's `code`/`error_subcode`, never on
//! message text or the HTTP status alone (throttling also arrives as HTTP 400).

use serde::Deserialize;

/// Meta's error object, as recorded and shown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GraphError {
    /// HTTP status, when an answer came.
    pub http_status: Option<u16>,
    /// `code`.
    pub code: Option<i64>,
    /// `error_subcode`.
    pub subcode: Option<i64>,
    /// `fbtrace_id`.
    pub fbtrace_id: Option<String>,
    /// `error_user_title`.
    pub user_title: Option<String>,
    /// `error_user_msg`, else `message`, else a transport description.
    pub message: String,
    /// `is_transient`, when Meta says.
    pub is_transient: Option<bool>,
}

impl GraphError {
    /// A short stable description for `last_error` and logs: codes and Meta's text.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        if let Some(code) = self.code {
            out.push_str(&format!("meta error {code}"));
            if let Some(sub) = self.subcode {
                out.push_str(&format!("/{sub}"));
            }
            out.push_str(": ");
        } else if let Some(status) = self.http_status {
            out.push_str(&format!("http {status}: "));
        }
        if let Some(title) = &self.user_title {
            out.push_str(title);
            out.push_str(" - ");
        }
        out.push_str(&self.message);
        out
    }
}

/// What to do with the events of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Meta received all of them.
    Delivered {
        /// Support id.
        fbtrace_id: Option<String>,
    },
    /// Try again later: network trouble, 5xx, throttling or a transient code.
    Retry {
        /// What happened.
        error: GraphError,
        /// Meta's own hint for the wait, in milliseconds.
        hint_ms: Option<u64>,
        /// A rate limit: the whole pixel should slow down, not just these events.
        throttled: bool,
    },
    /// Meta refused the payload (code 100). One bad event sinks a whole batch, so a batch is
    /// split to find it; a single event is dead.
    Rejected {
        /// Meta's reason.
        error: GraphError,
    },
    /// Credentials or configuration are wrong: nothing can be delivered to this pixel until a
    /// person fixes it. Events stay queued.
    Pause {
        /// Meta's reason.
        error: GraphError,
    },
}

/// The parts of an HTTP answer that matter.
#[derive(Debug, Clone, Copy)]
pub struct GraphAnswer<'a> {
    /// HTTP status.
    pub status: u16,
    /// Body bytes.
    pub body: &'a [u8],
    /// `Retry-After` in seconds.
    pub retry_after_secs: Option<u64>,
    /// `X-Business-Use-Case-Usage` header text.
    pub business_use_case_usage: Option<&'a str>,
}

#[derive(Deserialize)]
struct SuccessBody {
    events_received: Option<u64>,
    fbtrace_id: Option<String>,
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    message: Option<String>,
    code: Option<i64>,
    error_subcode: Option<i64>,
    error_user_title: Option<String>,
    error_user_msg: Option<String>,
    fbtrace_id: Option<String>,
    is_transient: Option<bool>,
}

/// Codes Meta uses for rate limits; they slow the whole pixel down.
fn is_throttling(code: i64) -> bool {
    matches!(code, 4 | 17 | 32 | 341 | 613 | 80000..=80014)
}

/// Codes that are worth retrying as they are.
fn is_transient_code(code: i64) -> bool {
    // 21009: "the data set upload is temporarily not ready" (a real CAPI answer).
    matches!(code, 1 | 2 | 368 | 21009) || is_throttling(code)
}

/// Codes that need a person to fix the token, permissions, pixel id or API version.
fn needs_configuration_fix(code: i64, subcode: Option<i64>) -> bool {
    matches!(code, 3 | 10 | 102 | 190 | 200..=299 | 2635) || (code == 100 && subcode == Some(33))
}

/// Classifies an HTTP answer to a request that carried `batch_len` events.
pub fn classify(answer: &GraphAnswer<'_>, batch_len: usize) -> Verdict {
    let status = answer.status;
    if (200..300).contains(&status) {
        return match serde_json::from_slice::<SuccessBody>(answer.body) {
            Ok(body) if body.events_received == Some(batch_len as u64) => Verdict::Delivered {
                fbtrace_id: body.fbtrace_id,
            },
            Ok(body) => Verdict::Retry {
                error: GraphError {
                    http_status: Some(status),
                    fbtrace_id: body.fbtrace_id,
                    message: format!(
                        "Meta acknowledged {} of {batch_len} events; resending (Meta deduplicates by event_id)",
                        body.events_received.unwrap_or(0)
                    ),
                    ..GraphError::default()
                },
                hint_ms: None,
                throttled: false,
            },
            Err(_) => Verdict::Retry {
                error: GraphError {
                    http_status: Some(status),
                    message: "success status with an unreadable body".to_owned(),
                    ..GraphError::default()
                },
                hint_ms: None,
                throttled: false,
            },
        };
    }

    let parsed = serde_json::from_slice::<ErrorEnvelope>(answer.body).ok();
    let error = match &parsed {
        Some(envelope) => {
            let e = &envelope.error;
            GraphError {
                http_status: Some(status),
                code: e.code,
                subcode: e.error_subcode,
                fbtrace_id: e.fbtrace_id.clone(),
                user_title: e.error_user_title.clone(),
                message: e
                    .error_user_msg
                    .clone()
                    .or_else(|| e.message.clone())
                    .unwrap_or_default(),
                is_transient: e.is_transient,
            }
        }
        None => GraphError {
            http_status: Some(status),
            message: format!("HTTP {status} without a Graph error body"),
            ..GraphError::default()
        },
    };
    let header_hint_ms = answer
        .retry_after_secs
        .map(|s| s.saturating_mul(1000))
        .or_else(|| {
            answer
                .business_use_case_usage
                .and_then(regain_access_minutes)
                .map(|m| m.saturating_mul(60_000))
        });

    match error.code {
        Some(code) if is_throttling(code) => Verdict::Retry {
            error,
            hint_ms: header_hint_ms,
            throttled: true,
        },
        // Temporarily blocked for policy reasons: wait long, do not hammer.
        Some(368) => Verdict::Retry {
            error,
            hint_ms: Some(header_hint_ms.unwrap_or(0).max(15 * 60 * 1000)),
            throttled: true,
        },
        Some(code) if is_transient_code(code) || error.is_transient == Some(true) => {
            Verdict::Retry {
                error,
                hint_ms: header_hint_ms,
                throttled: false,
            }
        }
        Some(code) if needs_configuration_fix(code, error.subcode) => Verdict::Pause { error },
        Some(100) => Verdict::Rejected { error },
        _ if status == 429 => Verdict::Retry {
            error,
            hint_ms: header_hint_ms,
            throttled: true,
        },
        _ if status >= 500 => Verdict::Retry {
            error,
            hint_ms: header_hint_ms,
            throttled: false,
        },
        // An unknown code or a 4xx without Meta's envelope (a wrong META_GRAPH_URL, a proxy):
        // pausing keeps every event until a person looks, where dropping would lose them.
        _ => Verdict::Pause { error },
    }
}

/// A request that got no HTTP answer (connect error, timeout, reset) is retried.
pub fn classify_transport_failure(description: &str) -> Verdict {
    Verdict::Retry {
        error: GraphError {
            message: format!("no answer from the Graph API: {description}"),
            ..GraphError::default()
        },
        hint_ms: None,
        throttled: false,
    }
}

/// The longest `estimated_time_to_regain_access` (minutes) in an
/// `X-Business-Use-Case-Usage` header.
pub fn regain_access_minutes(header: &str) -> Option<u64> {
    let usage: serde_json::Value = serde_json::from_str(header).ok()?;
    usage
        .as_object()?
        .values()
        .filter_map(serde_json::Value::as_array)
        .flatten()
        .filter_map(|entry| entry.get("estimated_time_to_regain_access")?.as_u64())
        .max()
        .filter(|m| *m > 0)
}

/// Delay before attempt number `attempts + 1`: exponential from `base_ms`, capped at `max_ms`,
/// with `jitter` in `[0, 1)` taking up to half of it away so retries of many events spread out.
pub fn backoff_ms(attempts: i64, base_ms: u64, max_ms: u64, jitter: f64) -> u64 {
    let exponent = u32::try_from(attempts.saturating_sub(1).clamp(0, 32)).unwrap_or(32);
    let full = base_ms.saturating_mul(1u64 << exponent).min(max_ms);
    let jitter = jitter.clamp(0.0, 1.0);
    full - (full as f64 * 0.5 * jitter) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> GraphAnswer<'_> {
        GraphAnswer {
            status,
            body: body.as_bytes(),
            retry_after_secs: None,
            business_use_case_usage: None,
        }
    }

    fn sample(name: &str) -> String {
        let path = format!("{}/tests/samples/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn success_with_every_event_received_is_delivered() {
        let body = sample("meta-capi-success.json");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        let n = v["events_received"].as_u64().expect("count") as usize;
        assert!(matches!(
            classify(&answer(200, &body), n),
            Verdict::Delivered { .. }
        ));
        let body = sample("meta-capi-success-with-messages.json");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        let n = v["events_received"].as_u64().expect("count") as usize;
        assert!(matches!(
            classify(&answer(200, &body), n),
            Verdict::Delivered { .. }
        ));
    }

    #[test]
    fn success_with_fewer_events_received_is_retried() {
        let verdict = classify(&answer(200, r#"{"events_received":3}"#), 5);
        assert!(matches!(
            verdict,
            Verdict::Retry {
                throttled: false,
                ..
            }
        ));
    }

    #[test]
    fn real_meta_errors_map_to_the_documented_classes() {
        let cases = [
            (
                "meta-capi-error-100-2804003-timestamp-too-old.json",
                "rejected",
            ),
            (
                "meta-capi-error-100-2804009-purchase-missing-value.json",
                "rejected",
            ),
            (
                "meta-capi-error-100-2804050-insufficient-customer-info.json",
                "rejected",
            ),
            ("meta-capi-error-100-minimal.json", "rejected"),
            ("meta-capi-error-100-33-object-does-not-exist.json", "pause"),
            ("meta-capi-error-190-token-decrypt.json", "pause"),
            ("meta-graph-error-190-463-session-expired.json", "pause"),
            ("meta-graph-error-190-token-expired.json", "pause"),
            ("meta-capi-error-17-user-request-limit.json", "throttled"),
            ("meta-capi-error-4-rate-limit-minimal.json", "throttled"),
            (
                "meta-graph-error-80004-ads-account-rate-limit.json",
                "throttled",
            ),
            ("meta-capi-error-21009-dataset-not-ready.json", "retry"),
        ];
        for (file, expected) in cases {
            let body = sample(file);
            let verdict = classify(&answer(400, &body), 10);
            let got = match verdict {
                Verdict::Rejected { .. } => "rejected",
                Verdict::Pause { .. } => "pause",
                Verdict::Retry {
                    throttled: true, ..
                } => "throttled",
                Verdict::Retry { .. } => "retry",
                Verdict::Delivered { .. } => "delivered",
            };
            assert_eq!(got, expected, "{file}");
        }
    }

    #[test]
    fn meta_error_details_are_kept_for_people() {
        let body = sample("meta-capi-error-100-2804050-insufficient-customer-info.json");
        let Verdict::Rejected { error } = classify(&answer(400, &body), 1) else {
            panic!("expected a rejection");
        };
        assert_eq!(error.code, Some(100));
        assert_eq!(error.subcode, Some(2804050));
        assert!(error.summary().starts_with("meta error 100/2804050: "));
        assert!(!error.message.is_empty());
    }

    #[test]
    fn server_errors_and_429_are_retried() {
        assert!(matches!(
            classify(&answer(500, "oops"), 1),
            Verdict::Retry {
                throttled: false,
                ..
            }
        ));
        assert!(matches!(
            classify(&answer(503, r#"{"error":{"code":2,"message":"down"}}"#), 1),
            Verdict::Retry {
                throttled: false,
                ..
            }
        ));
        assert!(matches!(
            classify(&answer(429, ""), 1),
            Verdict::Retry {
                throttled: true,
                ..
            }
        ));
    }

    #[test]
    fn is_transient_true_is_honoured_for_unknown_codes() {
        let verdict = classify(
            &answer(
                400,
                r#"{"error":{"code":9999,"is_transient":true,"message":"x"}}"#,
            ),
            1,
        );
        assert!(matches!(verdict, Verdict::Retry { .. }));
        let verdict = classify(
            &answer(
                400,
                r#"{"error":{"code":9999,"is_transient":false,"message":"x"}}"#,
            ),
            1,
        );
        assert!(matches!(verdict, Verdict::Pause { .. }));
    }

    #[test]
    fn deprecated_version_and_permission_errors_pause() {
        for code in [2635, 10, 200, 299, 102, 3] {
            let body = format!(r#"{{"error":{{"code":{code},"message":"x"}}}}"#);
            assert!(
                matches!(classify(&answer(400, &body), 1), Verdict::Pause { .. }),
                "{code}"
            );
        }
    }

    #[test]
    fn retry_hints_come_from_retry_after_or_business_use_case_usage() {
        let mut a = answer(429, "");
        a.retry_after_secs = Some(7);
        assert!(matches!(
            classify(&a, 1),
            Verdict::Retry {
                hint_ms: Some(7000),
                ..
            }
        ));
        let header = r#"{"1234":[{"type":"ads_management","call_count":100,"estimated_time_to_regain_access":3}]}"#;
        let body = sample("meta-graph-error-80004-ads-account-rate-limit.json");
        let mut a = answer(400, &body);
        a.business_use_case_usage = Some(header);
        assert!(matches!(
            classify(&a, 1),
            Verdict::Retry {
                hint_ms: Some(180_000),
                throttled: true,
                ..
            }
        ));
    }

    #[test]
    fn no_answer_is_retried() {
        assert!(matches!(
            classify_transport_failure("connection refused"),
            Verdict::Retry { .. }
        ));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitter_only_shortens() {
        assert_eq!(backoff_ms(1, 1000, 60_000, 0.0), 1000);
        assert_eq!(backoff_ms(2, 1000, 60_000, 0.0), 2000);
        assert_eq!(backoff_ms(4, 1000, 60_000, 0.0), 8000);
        assert_eq!(backoff_ms(30, 1000, 60_000, 0.0), 60_000);
        assert_eq!(backoff_ms(i64::MAX, 1000, 60_000, 0.0), 60_000);
        assert_eq!(backoff_ms(2, 1000, 60_000, 1.0), 1000);
        let jittered = backoff_ms(3, 1000, 60_000, 0.5);
        assert!((2000..=4000).contains(&jittered));
    }
}
