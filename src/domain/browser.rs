//! Events from landing pages (`POST /v1/collect`): what a browser may say, and what the server
//! decides for it (`integrations.md` §4). Pure: headers arrive as values, the peer as an
//! address.

use std::net::IpAddr;

use serde_json::{Map, Value};

use super::Problem;

/// Where the visitor's IP address comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientIpSource {
    /// The TCP peer (no proxy in front).
    Socket,
    /// `X-Forwarded-For`, trusting this many proxies in front of us.
    ForwardedFor {
        /// Proxies we run (each appends one address).
        trusted_hops: usize,
    },
    /// Cloudflare: `CF-Connecting-IPv6`, else `CF-Connecting-IP`.
    Cloudflare,
    /// `X-Real-IP` (nginx).
    RealIp,
}

impl ClientIpSource {
    /// Parses `socket`, `x-forwarded-for`, `cloudflare`, `x-real-ip`.
    pub fn parse(raw: &str, trusted_hops: usize) -> Option<Self> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "socket" | "peer" => Some(Self::Socket),
            "x-forwarded-for" | "xff" => Some(Self::ForwardedFor { trusted_hops }),
            "cloudflare" | "cf" => Some(Self::Cloudflare),
            "x-real-ip" => Some(Self::RealIp),
            _ => None,
        }
    }
}

/// The request headers the client IP may come from.
#[derive(Debug, Clone, Copy, Default)]
pub struct IpHeaders<'a> {
    /// `X-Forwarded-For`.
    pub forwarded_for: Option<&'a str>,
    /// `CF-Connecting-IP`.
    pub cf_connecting_ip: Option<&'a str>,
    /// `CF-Connecting-IPv6`.
    pub cf_connecting_ipv6: Option<&'a str>,
    /// `X-Real-IP`.
    pub real_ip: Option<&'a str>,
}

/// The visitor's address under `source`. Headers not trusted by `source` are ignored, so a
/// spoofed header changes nothing; a trusted header that is missing or malformed falls back to
/// the peer.
pub fn client_ip(source: ClientIpSource, peer: IpAddr, headers: &IpHeaders<'_>) -> IpAddr {
    let parse = |v: Option<&str>| v.and_then(|s| s.trim().parse::<IpAddr>().ok());
    let found = match source {
        ClientIpSource::Socket => None,
        ClientIpSource::ForwardedFor { trusted_hops } => {
            // Each proxy appends the address it got the request from; the last `trusted_hops`
            // entries were written by our proxies, the one before them by the first proxy we
            // trust, about the visitor. Anything further left was written by the client.
            headers.forwarded_for.and_then(|list| {
                let hops: Vec<&str> = list.split(',').map(str::trim).collect();
                let index = hops.len().checked_sub(trusted_hops.max(1))?;
                hops.get(index).and_then(|s| s.parse().ok())
            })
        }
        // IPv6 is preferred when both are known (it identifies the device better).
        ClientIpSource::Cloudflare => {
            parse(headers.cf_connecting_ipv6).or_else(|| parse(headers.cf_connecting_ip))
        }
        ClientIpSource::RealIp => parse(headers.real_ip),
    };
    found.unwrap_or(peer)
}

/// Whether a request from a page is allowed: its `Origin`, else the origin of its `Referer`,
/// must be one of `allowed` (`https://example.com`, exact scheme, host and port).
pub fn origin_allowed(allowed: &[String], origin: Option<&str>, referer: Option<&str>) -> bool {
    let from_referer = referer.and_then(|r| {
        let url = url::Url::parse(r).ok()?;
        Some(url.origin().ascii_serialization())
    });
    let Some(origin) = origin
        .filter(|o| !o.is_empty() && *o != "null")
        .map(str::to_owned)
        .or(from_referer)
    else {
        return false;
    };
    let origin = origin.trim_end_matches('/');
    allowed
        .iter()
        .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin))
}

/// What one site (a public site key) allows.
#[derive(Debug, Clone, PartialEq)]
pub struct SitePolicy {
    /// Event names the page may send (case-insensitive).
    pub events: Vec<String>,
    /// Fields every event gets unless the page sent them (objects merged one level deep).
    pub defaults: Map<String, Value>,
}

/// The event to ingest from a page's body: the server decides `action_source` (`website`),
/// the IP address and the user agent; the page cannot set them. `fbc` is the page's `_fbc`
/// cookie byte for byte, else built from `fbclid` and the time the page first saw it
/// (`fbclid_seen_at`, unix ms), else left to the normal `fbclid` handling.
///
/// # Errors
/// The event name is missing or not allowed for the site.
pub fn browser_event(
    body: &Map<String, Value>,
    site: &SitePolicy,
    ip: IpAddr,
    user_agent: Option<&str>,
) -> Result<Value, Vec<Problem>> {
    let name = body
        .get("event_name")
        .and_then(Value::as_str)
        .map(str::trim)
        .unwrap_or("");
    if name.is_empty() {
        return Err(vec![Problem {
            field: "event_name".to_owned(),
            reason: "is required".to_owned(),
        }]);
    }
    if !site.events.iter().any(|e| e.eq_ignore_ascii_case(name)) {
        return Err(vec![Problem {
            field: "event_name".to_owned(),
            reason: format!(
                "{name:?} is not allowed for this site (allowed: {})",
                site.events.join(", ")
            ),
        }]);
    }
    let mut event = body.clone();
    // The site decides the pixel, not the page.
    for key in ["site_key", "fbclid_seen_at", "consent", "pixel"] {
        event.remove(key);
    }
    for (key, default) in &site.defaults {
        match (event.get_mut(key), default) {
            (Some(Value::Object(given)), Value::Object(defaults)) => {
                for (inner, value) in defaults {
                    given.entry(inner.clone()).or_insert_with(|| value.clone());
                }
            }
            (Some(given), _) if !given.is_null() => {}
            _ => {
                event.insert(key.clone(), default.clone());
            }
        }
    }
    if let Some(Value::Object(user)) = event.get_mut("user_data") {
        user.remove("client_ip_address");
        user.remove("client_user_agent");
    }
    event.insert(
        "action_source".to_owned(),
        Value::String("website".to_owned()),
    );
    event.insert(
        "client_ip_address".to_owned(),
        Value::String(ip.to_string()),
    );
    match user_agent.map(str::trim).filter(|ua| !ua.is_empty()) {
        Some(ua) => {
            event.insert("client_user_agent".to_owned(), Value::String(ua.to_owned()));
        }
        None => {
            event.remove("client_user_agent");
        }
    }
    let has_fbc = event
        .get("fbc")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.trim().is_empty());
    if !has_fbc {
        let clicked = event
            .get("fbclid")
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty() && !s.contains(|c: char| c.is_whitespace() || c == '.'));
        let seen_at = body.get("fbclid_seen_at").and_then(Value::as_i64);
        if let (Some(fbclid), Some(seen_at)) = (clicked, seen_at.filter(|t| *t > 0)) {
            // The click's time, not the send time: the fbclid is kept byte for byte.
            let fbc = format!("fb.1.{seen_at}.{fbclid}");
            event.remove("fbclid");
            event.insert("fbc".to_owned(), Value::String(fbc));
        }
    } else {
        event.remove("fbclid");
    }
    Ok(Value::Object(event))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn peer() -> IpAddr {
        "10.0.0.1".parse().expect("ip")
    }

    #[test]
    fn spoofed_headers_are_ignored_unless_trusted() {
        let headers = IpHeaders {
            forwarded_for: Some("6.6.6.6, 203.0.113.7"),
            cf_connecting_ip: Some("198.51.100.1"),
            cf_connecting_ipv6: Some("2001:db8::1"),
            real_ip: Some("192.0.2.9"),
        };
        assert_eq!(client_ip(ClientIpSource::Socket, peer(), &headers), peer());
        // One trusted proxy: the last entry is what it saw; the client wrote 6.6.6.6.
        let xff = ClientIpSource::ForwardedFor { trusted_hops: 1 };
        assert_eq!(client_ip(xff, peer(), &headers).to_string(), "203.0.113.7");
        let two = ClientIpSource::ForwardedFor { trusted_hops: 2 };
        assert_eq!(client_ip(two, peer(), &headers).to_string(), "6.6.6.6");
        let three = ClientIpSource::ForwardedFor { trusted_hops: 3 };
        assert_eq!(client_ip(three, peer(), &headers), peer());
        assert_eq!(
            client_ip(ClientIpSource::Cloudflare, peer(), &headers).to_string(),
            "2001:db8::1"
        );
        let v4_only = IpHeaders {
            cf_connecting_ipv6: None,
            ..headers
        };
        assert_eq!(
            client_ip(ClientIpSource::Cloudflare, peer(), &v4_only).to_string(),
            "198.51.100.1"
        );
        assert_eq!(
            client_ip(ClientIpSource::RealIp, peer(), &headers).to_string(),
            "192.0.2.9"
        );
        let garbage = IpHeaders {
            real_ip: Some("not-an-ip"),
            ..IpHeaders::default()
        };
        assert_eq!(client_ip(ClientIpSource::RealIp, peer(), &garbage), peer());
    }

    #[test]
    fn origins_must_match_exactly_with_the_referer_as_fallback() {
        let allowed = vec!["https://shop.example.com".to_owned()];
        assert!(origin_allowed(
            &allowed,
            Some("https://shop.example.com"),
            None
        ));
        assert!(origin_allowed(
            &allowed,
            None,
            Some("https://shop.example.com/lp?x=1")
        ));
        assert!(!origin_allowed(
            &allowed,
            Some("https://evil.example"),
            None
        ));
        assert!(!origin_allowed(
            &allowed,
            Some("http://shop.example.com"),
            None
        ));
        assert!(!origin_allowed(
            &allowed,
            Some("https://shop.example.com.evil.io"),
            None
        ));
        assert!(!origin_allowed(&allowed, None, None));
        assert!(!origin_allowed(&allowed, Some("null"), None));
    }

    fn site() -> SitePolicy {
        SitePolicy {
            events: vec!["Lead".to_owned(), "PageView".to_owned()],
            defaults: json!({"currency": "BRL", "custom_data": {"site": "lp", "campaign": "x"}})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        }
    }

    #[test]
    fn site_defaults_fill_what_the_page_did_not_send() {
        let body = json!({"event_name": "Lead", "custom_data": {"campaign": "bf"}});
        let event =
            browser_event(body.as_object().expect("object"), &site(), peer(), None).expect("ok");
        assert_eq!(event["currency"], "BRL");
        assert_eq!(
            event["custom_data"],
            json!({"campaign": "bf", "site": "lp"})
        );
    }

    #[test]
    fn the_server_decides_source_ip_and_user_agent() {
        let body = json!({"event_name": "Lead", "event_id": "e1", "site_key": "pk",
            "action_source": "system_generated", "client_ip_address": "6.6.6.6",
            "user_data": {"client_ip_address": "6.6.6.6"}, "email": "a@b.co"});
        let event = browser_event(
            body.as_object().expect("object"),
            &site(),
            "2001:db8::7".parse().expect("ip"),
            Some("Mozilla/5.0 test"),
        )
        .expect("allowed");
        assert_eq!(event["action_source"], "website");
        assert_eq!(event["client_ip_address"], "2001:db8::7");
        assert_eq!(event["client_user_agent"], "Mozilla/5.0 test");
        assert!(event["user_data"].get("client_ip_address").is_none());
        assert!(event.get("site_key").is_none());
    }

    #[test]
    fn only_the_sites_event_names_are_accepted() {
        let body = json!({"event_name": "Purchase", "value": 1e9, "currency": "USD"});
        let problems = browser_event(body.as_object().expect("object"), &site(), peer(), None)
            .expect_err("not allowed");
        assert_eq!(problems[0].field, "event_name");
        assert!(problems[0].reason.contains("not allowed"));
    }

    #[test]
    fn fbc_is_passed_through_or_built_from_the_first_seen_click() {
        let five = "fb.1.1596403881668.IwAR2F4-dbP0l7Mn1IawQQGCINEz7PYX.AQQCAQMB";
        let body = json!({"event_name": "Lead", "fbc": five, "fbclid": "other"});
        let event =
            browser_event(body.as_object().expect("object"), &site(), peer(), None).expect("ok");
        assert_eq!(event["fbc"], five);
        assert!(event.get("fbclid").is_none());

        let body = json!({"event_name": "Lead", "fbclid": "IwAR2F4-dbP0l7Mn1IawQQ",
            "fbclid_seen_at": 1_764_000_000_123_i64});
        let event =
            browser_event(body.as_object().expect("object"), &site(), peer(), None).expect("ok");
        assert_eq!(event["fbc"], "fb.1.1764000000123.IwAR2F4-dbP0l7Mn1IawQQ");
    }
}
