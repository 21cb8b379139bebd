//! The dashboard's configuration: `ADMIN_PASSWORD` or `ADMIN_PASSWORD_HASH` (an argon2 PHC
//! string), `ADMIN_COOKIE_SECURE` and `ADMIN_SESSION_HOURS`. Read by [`crate::config::load`].

use std::time::Duration;

use argon2::password_hash::phc::PasswordHash;
use sha2::{Digest, Sha256};

use crate::config::Env;

/// Shortest accepted `ADMIN_PASSWORD`: the login is rate limited, but a short password is
/// still guessed in reasonable time.
pub const MIN_PASSWORD_CHARS: usize = 12;

/// How the admin password is checked.
#[derive(Clone)]
pub enum AdminPassword {
    /// `ADMIN_PASSWORD`, kept only as its SHA-256 (compared in constant time).
    Plain([u8; 32]),
    /// `ADMIN_PASSWORD_HASH`: an argon2 PHC string (`$argon2id$v=19$…`).
    Hash(String),
}

/// The operator dashboard at `/admin`.
#[derive(Clone)]
pub struct AdminSettings {
    /// How a login is checked.
    pub password: AdminPassword,
    /// Mark the session cookie `Secure` on every response, not only on requests that came
    /// over HTTPS (`X-Forwarded-Proto: https` from a declared proxy). Set it when TLS is
    /// terminated in front of the service without that header.
    pub cookie_secure: bool,
    /// How long a session lasts after login.
    pub session_ttl: Duration,
}

impl std::fmt::Debug for AdminSettings {
    // Hand-written so that neither the password's digest nor its hash reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.password {
            AdminPassword::Plain(_) => "ADMIN_PASSWORD",
            AdminPassword::Hash(_) => "ADMIN_PASSWORD_HASH",
        };
        f.debug_struct("AdminSettings")
            .field("password", &kind)
            .field("cookie_secure", &self.cookie_secure)
            .field("session_ttl", &self.session_ttl)
            .finish()
    }
}

/// Reads the dashboard settings; `None` (the dashboard off) when no password is set.
pub(crate) fn load(env: &Env, problems: &mut Vec<String>) -> Option<AdminSettings> {
    let cookie_secure = match env.get("ADMIN_COOKIE_SECURE").as_deref() {
        None | Some("false" | "0" | "no") => false,
        Some("true" | "1" | "yes") => true,
        Some(other) => {
            problems.push(format!(
                "ADMIN_COOKIE_SECURE must be true or false, got {other:?}"
            ));
            false
        }
    };
    let session_ttl = match env.get("ADMIN_SESSION_HOURS") {
        None => Duration::from_secs(12 * 3600),
        Some(raw) => match raw.parse::<u64>() {
            Ok(hours @ 1..=720) => Duration::from_secs(hours * 3600),
            _ => {
                problems.push(format!(
                    "ADMIN_SESSION_HOURS must be a whole number of hours from 1 to 720, got {raw:?}"
                ));
                Duration::from_secs(12 * 3600)
            }
        },
    };
    let password = match (env.get("ADMIN_PASSWORD"), env.get("ADMIN_PASSWORD_HASH")) {
        (None, None) => return None,
        (Some(_), Some(_)) => {
            problems.push(
                "set ADMIN_PASSWORD or ADMIN_PASSWORD_HASH, not both (the hash is the safer one to keep in configuration)"
                    .to_owned(),
            );
            return None;
        }
        (Some(password), None) => {
            if password.chars().count() < MIN_PASSWORD_CHARS {
                problems.push(format!(
                    "ADMIN_PASSWORD must be at least {MIN_PASSWORD_CHARS} characters long"
                ));
                return None;
            }
            AdminPassword::Plain(Sha256::digest(password.as_bytes()).into())
        }
        (None, Some(hash)) => {
            // Checked now, so a mistyped hash fails at start rather than at the first login.
            let is_argon2 = PasswordHash::new(&hash)
                .is_ok_and(|parsed| parsed.algorithm.as_str().starts_with("argon2"));
            if !is_argon2 {
                problems.push(
                    "ADMIN_PASSWORD_HASH must be an argon2 PHC string ($argon2id$v=19$m=…); make one with `capi-bridge admin hash-password`"
                        .to_owned(),
                );
                return None;
            }
            AdminPassword::Hash(hash)
        }
    };
    Some(AdminSettings {
        password,
        cookie_secure,
        session_ttl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_pairs(pairs: &[(&str, &str)]) -> (Option<AdminSettings>, Vec<String>) {
        let mut problems = Vec::new();
        let settings = load(&Env::from_pairs(pairs.iter().copied()), &mut problems);
        (settings, problems)
    }

    #[test]
    fn without_a_password_the_dashboard_is_off() {
        let (settings, problems) = load_pairs(&[("ADMIN_COOKIE_SECURE", "true")]);
        assert!(settings.is_none());
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn a_plain_password_is_kept_as_its_digest_and_must_be_long_enough() {
        let (settings, problems) = load_pairs(&[("ADMIN_PASSWORD", "correct horse battery")]);
        assert!(problems.is_empty(), "{problems:?}");
        let settings = settings.expect("on");
        assert!(matches!(settings.password, AdminPassword::Plain(_)));
        assert_eq!(settings.session_ttl, Duration::from_secs(12 * 3600));
        assert!(!format!("{settings:?}").contains("horse"));

        let (settings, problems) = load_pairs(&[("ADMIN_PASSWORD", "short")]);
        assert!(settings.is_none());
        assert!(problems[0].contains("at least 12"), "{problems:?}");
    }

    #[test]
    fn a_hash_must_be_an_argon2_phc_string_and_not_beside_a_password() {
        let (_, problems) =
            load_pairs(&[("ADMIN_PASSWORD_HASH", "5f4dcc3b5aa765d61d8327deb882cf99")]);
        assert!(problems[0].contains("argon2 PHC"), "{problems:?}");
        let hash = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc";
        let (settings, problems) = load_pairs(&[("ADMIN_PASSWORD_HASH", hash)]);
        assert!(problems.is_empty(), "{problems:?}");
        assert!(matches!(
            settings.expect("on").password,
            AdminPassword::Hash(h) if h == hash
        ));
        let (settings, problems) = load_pairs(&[
            ("ADMIN_PASSWORD_HASH", hash),
            ("ADMIN_PASSWORD", "correct horse battery"),
        ]);
        assert!(settings.is_none());
        assert!(problems[0].contains("not both"), "{problems:?}");
    }

    #[test]
    fn cookie_and_session_settings_are_validated() {
        let (settings, problems) = load_pairs(&[
            ("ADMIN_PASSWORD", "correct horse battery"),
            ("ADMIN_COOKIE_SECURE", "true"),
            ("ADMIN_SESSION_HOURS", "2"),
        ]);
        assert!(problems.is_empty(), "{problems:?}");
        let settings = settings.expect("on");
        assert!(settings.cookie_secure);
        assert_eq!(settings.session_ttl, Duration::from_secs(7200));
        let (_, problems) = load_pairs(&[
            ("ADMIN_PASSWORD", "correct horse battery"),
            ("ADMIN_COOKIE_SECURE", "maybe"),
            ("ADMIN_SESSION_HOURS", "0"),
        ]);
        assert_eq!(problems.len(), 2, "{problems:?}");
    }
}
