//! Who may use the dashboard: the admin password (constant-time, or argon2 for a hash), a
//! per-IP login rate limit, server-side sessions behind an HttpOnly cookie, and a CSRF token
//! per session that every POST must carry.
//!
//! Sessions live in this process's memory (a random id → its CSRF token and expiry): logging
//! out ends one for good, a restart ends them all, and nothing secret has to be configured
//! besides the password. The cookie holds only the random id; the map is keyed by the id's
//! SHA-256, so a lookup's timing says nothing about stored ids.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::PasswordVerifier;
use argon2::Argon2;
use axum::http::{header, HeaderMap, HeaderValue};
use base64::Engine as _;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use rand::RngCore as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::settings::AdminPassword;

/// The session cookie's name.
pub const COOKIE: &str = "capi_admin";

/// Most sessions kept at once; the oldest goes when a login would exceed it.
const MAX_SESSIONS: usize = 1000;

/// Login attempts per IP address: a burst of this many, then one every 12 seconds.
const LOGINS_PER_MINUTE: u32 = 5;

/// Login attempts between two clean-ups of the per-IP limiters.
const CLEANUP_EVERY: u64 = 1000;

/// A logged-in session, as handlers see it.
#[derive(Debug, Clone)]
pub struct Session {
    /// The token every form of this session carries.
    pub csrf: String,
    expires_at: Instant,
}

/// The sessions of this process.
pub struct Sessions {
    by_digest: Mutex<HashMap<[u8; 32], Session>>,
    ttl: Duration,
}

impl Sessions {
    /// No sessions; each new one lasts `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            by_digest: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        // Plain data: a panic elsewhere cannot leave it half-updated.
        self.by_digest.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a session; returns the id for the cookie.
    pub fn create(&self) -> String {
        let id = random_token();
        let now = Instant::now();
        let session = Session {
            csrf: random_token(),
            expires_at: now + self.ttl,
        };
        let mut sessions = self.lock();
        sessions.retain(|_, s| s.expires_at > now);
        if sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires_at)
                .map(|(k, _)| *k)
            {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(digest(&id), session);
        id
    }

    /// The live session with this id.
    pub fn get(&self, id: &str) -> Option<Session> {
        let key = digest(id);
        let mut sessions = self.lock();
        match sessions.get(&key) {
            Some(session) if session.expires_at > Instant::now() => Some(session.clone()),
            Some(_) => {
                sessions.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Ends the session with this id.
    pub fn end(&self, id: &str) {
        self.lock().remove(&digest(id));
    }

    /// How long a new session lasts.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// 256 random bits from the operating system, URL-safe.
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Whether a form's token is the session's, in constant time (hashing first makes the
/// comparison independent of the length too).
pub fn csrf_matches(session: &Session, presented: &str) -> bool {
    bool::from(digest(&session.csrf).ct_eq(&digest(presented)))
}

/// Whether `presented` is the admin password. A hash is verified by argon2 off the async
/// threads (it is slow on purpose); a plain password's digest is compared in constant time.
pub async fn password_matches(password: &AdminPassword, presented: String) -> bool {
    match password {
        AdminPassword::Plain(expected) => bool::from(expected.ct_eq(&digest(&presented))),
        AdminPassword::Hash(hash) => {
            let hash = hash.clone();
            tokio::task::spawn_blocking(move || {
                Argon2::default()
                    .verify_password(presented.as_bytes(), hash.as_str())
                    .is_ok()
            })
            .await
            .unwrap_or(false)
        }
    }
}

/// An argon2id PHC string for `password` (argon2's recommended parameters, a random salt):
/// what `ADMIN_PASSWORD_HASH` takes.
///
/// # Errors
/// When the system's random source fails.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    use argon2::password_hash::PasswordHasher as _;
    Ok(Argon2::default()
        .hash_password(password.as_bytes())?
        .to_string())
}

/// Per-IP limits on login attempts.
pub struct LoginLimiter {
    per_ip: DefaultKeyedRateLimiter<IpAddr>,
    checks: std::sync::atomic::AtomicU64,
}

impl Default for LoginLimiter {
    fn default() -> Self {
        let quota =
            Quota::per_minute(NonZeroU32::new(LOGINS_PER_MINUTE).unwrap_or(NonZeroU32::MIN));
        Self {
            per_ip: RateLimiter::keyed(quota),
            checks: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl LoginLimiter {
    /// `Err(seconds to wait)` when `ip` has tried too often.
    pub fn check(&self, ip: IpAddr) -> Result<(), u64> {
        use governor::clock::Clock as _;
        let n = self
            .checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // One entry per address: now and then forget those whose limit has fully recovered.
        if n % CLEANUP_EVERY == CLEANUP_EVERY - 1 {
            self.per_ip.retain_recent();
        }
        let clock = governor::clock::DefaultClock::default();
        self.per_ip
            .check_key(&ip)
            .map_err(|not_until| not_until.wait_time_from(clock.now()).as_secs().max(1))
    }
}

/// The session id the request's `Cookie` header carries, if any.
pub fn session_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
        .filter(|value| !value.is_empty())
}

/// `Set-Cookie` for a new session: readable by no script, sent to `/admin` only and never
/// from another site, gone after `ttl`; `Secure` when the dashboard is served over HTTPS.
pub fn session_cookie(id: &str, ttl: Duration, secure: bool) -> Option<HeaderValue> {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={id}; Path=/admin; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        ttl.as_secs()
    ))
    .ok()
}

/// `Set-Cookie` that removes the session cookie.
pub fn cleared_cookie(secure: bool) -> HeaderValue {
    if secure {
        HeaderValue::from_static(
            "capi_admin=; Path=/admin; HttpOnly; SameSite=Strict; Max-Age=0; Secure",
        )
    } else {
        HeaderValue::from_static("capi_admin=; Path=/admin; HttpOnly; SameSite=Strict; Max-Age=0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_end() {
        let sessions = Sessions::new(Duration::from_secs(60));
        let id = sessions.create();
        let session = sessions.get(&id).expect("live");
        assert_eq!(session.csrf.len(), 43);
        assert!(sessions.get("someone-elses-guess").is_none());
        sessions.end(&id);
        assert!(sessions.get(&id).is_none());

        let short = Sessions::new(Duration::ZERO);
        let id = short.create();
        assert!(short.get(&id).is_none(), "expired at once");
    }

    #[test]
    fn sessions_are_bounded() {
        let sessions = Sessions::new(Duration::from_secs(60));
        let first = sessions.create();
        for _ in 0..MAX_SESSIONS {
            sessions.create();
        }
        assert_eq!(sessions.lock().len(), MAX_SESSIONS);
        assert!(sessions.get(&first).is_none(), "the oldest went");
    }

    #[test]
    fn csrf_tokens_must_match_exactly() {
        let sessions = Sessions::new(Duration::from_secs(60));
        let session = sessions.get(&sessions.create()).expect("live");
        assert!(csrf_matches(&session, &session.csrf.clone()));
        assert!(!csrf_matches(&session, ""));
        assert!(!csrf_matches(&session, &session.csrf[..42]));
        assert!(!csrf_matches(&session, &format!("{}x", session.csrf)));
    }

    #[tokio::test]
    async fn passwords_are_checked_plain_or_by_argon2_hash() {
        let plain = AdminPassword::Plain(digest("correct horse battery"));
        assert!(password_matches(&plain, "correct horse battery".to_owned()).await);
        assert!(!password_matches(&plain, "correct horse batter".to_owned()).await);

        let hash = hash_password("correct horse battery").expect("hash");
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        let hashed = AdminPassword::Hash(hash);
        assert!(password_matches(&hashed, "correct horse battery".to_owned()).await);
        assert!(!password_matches(&hashed, "Correct horse battery".to_owned()).await);
    }

    #[test]
    fn the_cookie_is_http_only_strict_scoped_and_secure_over_https() {
        let cookie = session_cookie("abc", Duration::from_secs(3600), false).expect("valid");
        assert_eq!(
            cookie,
            "capi_admin=abc; Path=/admin; HttpOnly; SameSite=Strict; Max-Age=3600"
        );
        let cookie = session_cookie("abc", Duration::from_secs(3600), true).expect("valid");
        assert!(cookie.to_str().is_ok_and(|c| c.ends_with("; Secure")));
        assert!(cleared_cookie(true)
            .to_str()
            .is_ok_and(|c| c.contains("Max-Age=0") && c.ends_with("; Secure")));
    }

    #[test]
    fn the_session_id_is_found_among_other_cookies() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; capi_admin=xyz; b=2"),
        );
        assert_eq!(session_id(&headers), Some("xyz"));
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("capi_admin_other=1"),
        );
        assert_eq!(session_id(&headers), None);
    }

    #[test]
    fn logins_are_limited_per_address() {
        let limiter = LoginLimiter::default();
        let ip: IpAddr = [192, 0, 2, 1].into();
        for _ in 0..LOGINS_PER_MINUTE {
            assert!(limiter.check(ip).is_ok());
        }
        let wait = limiter.check(ip).expect_err("limited");
        assert!((1..=12).contains(&wait), "{wait}");
        assert!(limiter.check([192, 0, 2, 2].into()).is_ok(), "others may");
    }
}
