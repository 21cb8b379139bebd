//! Row lookups over Supabase's REST API (PostgREST): one row of a table by one column's value,
//! `GET {base}/rest/v1/{table}?{column}=eq.{value}&select=*&limit=1`. Rules use it to fill in
//! user data when a trigger carries only an id.
//!
//! Keys (`integrations.md` §1.8): every request carries `apikey: <key>`. A legacy JWT key
//! (`service_role`, `anon`: `eyJ…`) also goes in `Authorization: Bearer`; the new
//! `sb_secret_…` / `sb_publishable_…` keys are not JWTs and never go there (the database layer
//! would reject them). Requests identify as `capi-bridge/<version>`: Supabase answers 401 to a
//! secret key sent with a browser-like `User-Agent`.
//!
//! Filter values: in a top-level filter PostgREST takes everything after `eq.` verbatim
//! (`pSingleVal = many anyChar` in `PostgREST.ApiRequest.QueryParams`). The double quotes its
//! documentation asks for around reserved characters (`,` `.` `:` `(` `)`) belong inside
//! `in.(…)` lists and `or=(…)` / `and=(…)` trees, where those characters separate items;
//! quoting an `eq.` value would make the quotes part of it. So the value is only
//! percent-encoded: every byte outside RFC 3986's unreserved set, including `+` (which PostgREST
//! decodes as a space), `&`, `#` and `%`. Table and column names are restricted to identifier
//! characters, so a rule cannot add query syntax through them.
//!
//! The key and the looked-up value (it may be an email or a phone number) never appear in an
//! error message or a log line, even when the server echoes them.

use std::fmt;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT, AUTHORIZATION};
use reqwest::{StatusCode, Url};
use serde_json::Value;

/// A sensible per-request timeout for row lookups.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The `User-Agent` sent: not a browser's, as Supabase requires for secret keys.
pub const USER_AGENT: &str = concat!("capi-bridge/", env!("CARGO_PKG_VERSION"));

/// The variable error messages name when the caller did not say where the key came from.
const DEFAULT_KEY_VARIABLE: &str = "SUPABASE_SERVICE_KEY";

/// Postgres truncates identifiers longer than this.
const MAX_IDENTIFIER_LEN: usize = 63;

/// Server messages quoted in errors are cut to this many characters.
const MAX_MESSAGE_CHARS: usize = 300;

/// The kinds of Supabase API keys, which decide the headers sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// A legacy `service_role` or `anon` JWT (`eyJ…`): sent as `apikey` and as
    /// `Authorization: Bearer`.
    LegacyJwt,
    /// `sb_secret_…` (elevated, like `service_role`): sent as `apikey` only.
    Secret,
    /// `sb_publishable_…` (low privilege, row level security applies): `apikey` only.
    Publishable,
    /// Any other format: sent as `apikey` only.
    Other,
}

impl KeyKind {
    /// The kind of `key`, from its prefix.
    pub fn of(key: &str) -> Self {
        if key.starts_with("eyJ") {
            Self::LegacyJwt
        } else if key.starts_with("sb_secret_") {
            Self::Secret
        } else if key.starts_with("sb_publishable_") {
            Self::Publishable
        } else {
            Self::Other
        }
    }

    /// True when the key also goes in `Authorization: Bearer` (JWT keys only).
    pub fn sends_bearer(self) -> bool {
        matches!(self, Self::LegacyJwt)
    }
}

/// What an error answer said, with the key and the looked-up value removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerMessage {
    /// PostgREST's or Postgres's error code (`PGRST205`, `42P01`, `42501`, …).
    pub code: Option<String>,
    /// `message` (and `hint`, when there is one).
    pub message: Option<String>,
}

impl fmt::Display for ServerMessage {
    /// `": CODE message"`, or nothing when the answer said nothing usable.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.code, &self.message) {
            (Some(code), Some(message)) => write!(f, ": {code} {message}"),
            (Some(code), None) => write!(f, ": {code}"),
            (None, Some(message)) => write!(f, ": {message}"),
            (None, None) => Ok(()),
        }
    }
}

/// Why a lookup failed. No variant holds the key or the looked-up value.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// The base URL is unusable.
    #[error("invalid Supabase URL: {reason}")]
    InvalidUrl {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The key cannot be sent.
    #[error("invalid Supabase key in {variable}: {reason}")]
    InvalidKey {
        /// The variable the key came from.
        variable: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A table, column or schema name that is not a plain identifier.
    #[error(
        "invalid {what} name {name:?} for a Supabase lookup: use letters, digits and _ \
         (not starting with a digit), at most 63 characters"
    )]
    InvalidName {
        /// `table`, `column` or `schema`.
        what: &'static str,
        /// The name as given (cut to 64 characters).
        name: String,
    },
    /// There is nothing to look up by.
    #[error("cannot look up a row of {table:?}: the value for {column:?} is empty")]
    EmptyValue {
        /// The table.
        table: String,
        /// The column.
        column: String,
    },
    /// 401 or 403: the key is wrong, of another project, or its role may not read the table.
    #[error("Supabase refused the key in {variable} (HTTP {status}{server}): {advice}")]
    KeyRefused {
        /// The HTTP status.
        status: u16,
        /// The variable the key came from.
        variable: &'static str,
        /// What the server said.
        server: ServerMessage,
        /// What to check.
        advice: &'static str,
    },
    /// 404: the table does not exist or is not exposed by the REST API.
    #[error(
        "table {table:?} (schema {schema}) was not found by Supabase's REST API \
         (HTTP 404{server}): check the name, the schema, and that the schema is exposed \
         (Project Settings → Data API)"
    )]
    TableNotFound {
        /// The table.
        table: String,
        /// The schema asked for (`public` unless one was set).
        schema: String,
        /// What the server said.
        server: ServerMessage,
    },
    /// No answer within the timeout.
    #[error("Supabase's REST API did not answer within {after:?}")]
    Timeout {
        /// The timeout.
        after: Duration,
    },
    /// Connection or TLS failure.
    #[error("could not reach Supabase's REST API: {reason}")]
    Unreachable {
        /// The transport error (without the URL).
        reason: String,
    },
    /// Any other error status.
    #[error("Supabase's REST API refused the lookup in {table:?} (HTTP {status}{server})")]
    Rejected {
        /// The table.
        table: String,
        /// The HTTP status.
        status: u16,
        /// What the server said.
        server: ServerMessage,
    },
    /// A 2xx answer that is not a JSON array of rows.
    #[error(
        "Supabase's REST API answered with something other than a JSON array of rows: {reason}"
    )]
    InvalidResponse {
        /// What was wrong.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("could not build the HTTP client for Supabase: {0}")]
    Client(String),
}

impl LookupError {
    /// Whether trying again later may succeed (an outage, a timeout, a rate limit), as opposed
    /// to something only a configuration or rule fix cures.
    pub fn is_transient(&self) -> bool {
        match self {
            LookupError::Timeout { .. }
            | LookupError::Unreachable { .. }
            | LookupError::InvalidResponse { .. } => true,
            LookupError::Rejected { status, .. } => *status >= 500 || *status == 429,
            LookupError::InvalidUrl { .. }
            | LookupError::InvalidKey { .. }
            | LookupError::InvalidName { .. }
            | LookupError::EmptyValue { .. }
            | LookupError::KeyRefused { .. }
            | LookupError::TableNotFound { .. }
            | LookupError::Client(_) => false,
        }
    }
}

/// A client for Supabase's REST API with a service key. Cheap to clone (the connection pool is
/// shared).
#[derive(Clone)]
pub struct SupabaseRest {
    http: reqwest::Client,
    /// `{base}/rest/v1`, without a trailing slash.
    rest_base: String,
    key: String,
    key_kind: KeyKind,
    key_variable: &'static str,
    schema: Option<String>,
    timeout: Duration,
}

impl fmt::Debug for SupabaseRest {
    // Hand-written so that the key never reaches a log through `{:?}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SupabaseRest")
            .field("rest_base", &self.rest_base)
            .field("key_kind", &self.key_kind)
            .field("key_variable", &self.key_variable)
            .field("schema", &self.schema)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl SupabaseRest {
    /// A client for the project at `base_url` (`https://<ref>.supabase.co`; a trailing
    /// `/rest/v1` is accepted), authenticating with `service_key`. `timeout` bounds each
    /// request as a whole.
    ///
    /// # Errors
    /// [`LookupError::InvalidUrl`] when `base_url` is not an `https` URL (plain `http` is
    /// accepted for loopback addresses only: the key would travel in clear);
    /// [`LookupError::InvalidKey`] when the key is empty or cannot be sent in a header;
    /// [`LookupError::Client`] when the TLS backend cannot be initialised.
    pub fn new(base_url: &str, service_key: &str, timeout: Duration) -> Result<Self, LookupError> {
        let base = check_base_url(base_url)?;
        let key_kind = check_key(service_key, DEFAULT_KEY_VARIABLE)?;
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(
            HeaderName::from_static("apikey"),
            sensitive_header(service_key, DEFAULT_KEY_VARIABLE)?,
        );
        if key_kind.sends_bearer() {
            headers.insert(
                AUTHORIZATION,
                sensitive_header(&format!("Bearer {service_key}"), DEFAULT_KEY_VARIABLE)?,
            );
        }
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .default_headers(headers)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_idle_timeout(Duration::from_secs(90))
            // A redirect could carry the key elsewhere; PostgREST never redirects.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|err| LookupError::Client(err.without_url().to_string()))?;
        Ok(Self {
            http,
            rest_base: format!("{}/rest/v1", base.as_str().trim_end_matches('/')),
            key: service_key.to_owned(),
            key_kind,
            key_variable: DEFAULT_KEY_VARIABLE,
            schema: None,
            timeout,
        })
    }

    /// The client for the configured project.
    ///
    /// # Errors
    /// As [`SupabaseRest::new`].
    pub fn from_config(
        config: &crate::config::SupabaseApiConfig,
        timeout: Duration,
    ) -> Result<Self, LookupError> {
        Self::new(&config.url, &config.service_key, timeout)
            .map(|client| client.with_key_variable(config.key_variable))
            .map_err(|err| match err {
                LookupError::InvalidKey { reason, .. } => LookupError::InvalidKey {
                    variable: config.key_variable,
                    reason,
                },
                other => other,
            })
    }

    /// Names `variable` as the key's source in error messages (`SUPABASE_SERVICE_KEY` by
    /// default).
    pub fn with_key_variable(mut self, variable: &'static str) -> Self {
        self.key_variable = variable;
        self
    }

    /// Looks rows up in `schema` (sent as `Accept-Profile`) instead of the API's default
    /// schema (`public` on Supabase). The schema must be exposed by the project's Data API.
    ///
    /// # Errors
    /// [`LookupError::InvalidName`] when `schema` is not a plain identifier.
    pub fn with_schema(mut self, schema: &str) -> Result<Self, LookupError> {
        check_identifier("schema", schema)?;
        self.schema = Some(schema.to_owned());
        Ok(self)
    }

    /// The kind of the key, which decides the headers sent.
    pub fn key_kind(&self) -> KeyKind {
        self.key_kind
    }

    /// The first row of `table` whose `column` equals `value`, or `None` when there is none.
    ///
    /// # Errors
    /// [`LookupError::InvalidName`] or [`LookupError::EmptyValue`] before any request;
    /// [`LookupError::KeyRefused`] (401, 403), [`LookupError::TableNotFound`] (404),
    /// [`LookupError::Rejected`] (other statuses, with PostgREST's code and message),
    /// [`LookupError::Timeout`], [`LookupError::Unreachable`] or
    /// [`LookupError::InvalidResponse`].
    pub async fn fetch_row(
        &self,
        table: &str,
        column: &str,
        value: &str,
    ) -> Result<Option<Value>, LookupError> {
        let url = self.row_url(table, column, value)?;
        let mut request = self.http.get(url);
        if let Some(schema) = &self.schema {
            request = request.header("accept-profile", schema);
        }
        let started = Instant::now();
        let response = request
            .send()
            .await
            .map_err(|err| self.transport_error(err, value))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|err| self.transport_error(err, value))?;
        tracing::debug!(
            table,
            column,
            status = status.as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "supabase row lookup"
        );
        if status.is_success() {
            return match serde_json::from_slice::<Value>(&body) {
                Ok(Value::Array(mut rows)) => Ok((!rows.is_empty()).then(|| rows.swap_remove(0))),
                Ok(_) => Err(LookupError::InvalidResponse {
                    reason: "not an array".to_owned(),
                }),
                // serde_json's syntax errors give a position, never the text.
                Err(err) => Err(LookupError::InvalidResponse {
                    reason: err.to_string(),
                }),
            };
        }
        let server = self.server_message(&body, value);
        Err(match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => LookupError::KeyRefused {
                status: status.as_u16(),
                variable: self.key_variable,
                advice: key_advice(status, self.key_kind, &server),
                server,
            },
            StatusCode::NOT_FOUND => LookupError::TableNotFound {
                table: table.to_owned(),
                schema: self.schema.clone().unwrap_or_else(|| "public".to_owned()),
                server,
            },
            _ => LookupError::Rejected {
                table: table.to_owned(),
                status: status.as_u16(),
                server,
            },
        })
    }

    /// `{base}/rest/v1/{table}?{column}=eq.{value}&select=*&limit=1`, validated and encoded.
    fn row_url(&self, table: &str, column: &str, value: &str) -> Result<Url, LookupError> {
        check_identifier("table", table)?;
        check_identifier("column", column)?;
        if value.is_empty() {
            return Err(LookupError::EmptyValue {
                table: table.to_owned(),
                column: column.to_owned(),
            });
        }
        let raw = format!(
            "{}/{table}?{column}=eq.{}&select=*&limit=1",
            self.rest_base,
            encode_component(value)
        );
        Url::parse(&raw).map_err(|_| LookupError::InvalidUrl {
            reason: "cannot hold this lookup",
        })
    }

    fn transport_error(&self, err: reqwest::Error, value: &str) -> LookupError {
        if err.is_timeout() {
            return LookupError::Timeout {
                after: self.timeout,
            };
        }
        // The URL holds the looked-up value: leave it out, keep the causes.
        let err = err.without_url();
        let mut reason = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            reason.push_str(": ");
            reason.push_str(&cause.to_string());
            source = cause.source();
        }
        LookupError::Unreachable {
            reason: self.scrub(&reason, value),
        }
    }

    /// PostgREST's `{code, message, details, hint}` (or the gateway's `{message, hint}`), minus
    /// anything secret.
    fn server_message(&self, body: &[u8], value: &str) -> ServerMessage {
        let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(body) else {
            return ServerMessage::default();
        };
        let text = |key: &str| {
            object
                .get(key)
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| self.scrub(s, value))
        };
        let message = match (text("message").or_else(|| text("msg")), text("hint")) {
            (Some(message), Some(hint)) => Some(format!("{message} (hint: {hint})")),
            (message, hint) => message.or(hint),
        };
        ServerMessage {
            code: text("code").or_else(|| text("error_code")),
            message,
        }
    }

    /// Removes the key and the looked-up value (raw and encoded) from a server's text, flattens
    /// it to one line and bounds its length. Values shorter than 4 characters are left alone:
    /// they are not personal data, and masking them would garble every message.
    fn scrub(&self, text: &str, value: &str) -> String {
        let encoded = encode_component(value);
        let mut out = text.replace(['\r', '\n'], " ");
        for secret in [self.key.as_str(), value, encoded.as_str()] {
            if secret.chars().count() >= 4 {
                out = out.replace(secret, "<redacted>");
            }
        }
        if out.chars().count() > MAX_MESSAGE_CHARS {
            out = out.chars().take(MAX_MESSAGE_CHARS).collect::<String>() + "…";
        }
        out
    }
}

/// What to check after a 401 or 403.
fn key_advice(status: StatusCode, kind: KeyKind, server: &ServerMessage) -> &'static str {
    let message = server.message.as_deref().unwrap_or("").to_lowercase();
    if message.contains("browser") {
        return "secret keys are refused with a browser User-Agent; something between \
                capi-bridge and Supabase changed it";
    }
    if kind == KeyKind::Publishable {
        return "a sb_publishable_ key only reads what row level security allows; use the \
                project's sb_secret_ (or legacy service_role) key";
    }
    if server.code.as_deref() == Some("42501") || status == StatusCode::FORBIDDEN {
        "the key's role may not read this table; use the service_role or sb_secret_ key, \
         or grant select on the table"
    } else {
        "use this project's service_role or sb_secret_ key (Project Settings → API Keys), \
         and check that the URL names the same project"
    }
}

/// Checks a base URL: `https`, or `http` to a loopback address. A trailing `/` or `/rest/v1`
/// is accepted and removed.
///
/// # Errors
/// [`LookupError::InvalidUrl`] saying what is wrong (the URL itself is not repeated).
pub fn check_base_url(raw: &str) -> Result<Url, LookupError> {
    let invalid = |reason| LookupError::InvalidUrl { reason };
    let trimmed = raw.trim().trim_end_matches('/');
    let trimmed = trimmed
        .strip_suffix("/rest/v1")
        .unwrap_or(trimmed)
        .trim_end_matches('/');
    let url = Url::parse(trimmed).map_err(|_| invalid("not a URL"))?;
    if url.cannot_be_a_base() || url.host().is_none() {
        return Err(invalid("not a URL"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("must not have a query or a fragment"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("must not hold a user name or password"));
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if crate::config::is_loopback_url(&url) => Ok(url),
        "http" => Err(invalid(
            "must use https (plain http is allowed only for 127.0.0.1, localhost or ::1: \
             the key would travel in clear)",
        )),
        _ => Err(invalid("must use https")),
    }
}

/// Checks that a key can be sent and says what kind it is.
///
/// # Errors
/// [`LookupError::InvalidKey`] naming `variable` (never the key).
pub fn check_key(key: &str, variable: &'static str) -> Result<KeyKind, LookupError> {
    if key.is_empty() {
        return Err(LookupError::InvalidKey {
            variable,
            reason: "it is empty",
        });
    }
    sensitive_header(key, variable)?;
    Ok(KeyKind::of(key))
}

fn sensitive_header(value: &str, variable: &'static str) -> Result<HeaderValue, LookupError> {
    let mut header = HeaderValue::from_str(value)
        .ok()
        .filter(|_| value.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
        .ok_or(LookupError::InvalidKey {
            variable,
            reason: "it holds characters that cannot be sent in an HTTP header \
                     (a line break, or a character outside ASCII?)",
        })?;
    header.set_sensitive(true);
    Ok(header)
}

/// Checks a table, column or schema name: an unquoted SQL identifier (ASCII letters, digits and
/// `_`, not starting with a digit, at most 63 characters).
///
/// # Errors
/// [`LookupError::InvalidName`] naming `what`.
pub fn check_identifier(what: &'static str, name: &str) -> Result<(), LookupError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_IDENTIFIER_LEN
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(LookupError::InvalidName {
            what,
            name: name.chars().take(64).collect(),
        })
    }
}

/// Percent-encodes every byte outside RFC 3986's unreserved set (`A-Z a-z 0-9 - . _ ~`).
fn encode_component(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push_str(&format!("{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.c2lnbmF0dXJl";
    const SECRET: &str = "sb_secret_abcdefghijklmnopqrstuvwxyz012345";

    fn client(base: &str) -> SupabaseRest {
        SupabaseRest::new(base, SECRET, DEFAULT_TIMEOUT).expect("valid client")
    }

    /// Decodes a query value the way PostgREST does (`parseQueryReplacePlus True`).
    fn decode_like_postgrest(query: &str, key: &str) -> Option<String> {
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    }

    #[test]
    fn the_row_url_is_an_eq_filter_with_select_and_limit() {
        let url = client("https://abcd.supabase.co")
            .row_url("leads", "id", "42")
            .expect("url");
        assert_eq!(
            url.as_str(),
            "https://abcd.supabase.co/rest/v1/leads?id=eq.42&select=*&limit=1"
        );
    }

    #[test]
    fn a_trailing_slash_or_rest_v1_on_the_base_url_is_accepted() {
        for base in [
            "https://abcd.supabase.co/",
            "https://abcd.supabase.co/rest/v1",
            "https://abcd.supabase.co/rest/v1/",
            " https://abcd.supabase.co ",
        ] {
            let url = client(base).row_url("leads", "id", "1").expect("url");
            assert_eq!(
                url.as_str(),
                "https://abcd.supabase.co/rest/v1/leads?id=eq.1&select=*&limit=1",
                "{base}"
            );
        }
        // A self-hosted gateway under a path keeps its path.
        let url = client("http://127.0.0.1:8000/supabase")
            .row_url("leads", "id", "1")
            .expect("url");
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8000/supabase/rest/v1/leads?id=eq.1&select=*&limit=1"
        );
    }

    #[test]
    fn values_are_percent_encoded_not_quoted() {
        let client = client("https://abcd.supabase.co");
        let cases = [
            ("Hebdon,John", "Hebdon%2CJohn"),
            ("a.b:c(d)", "a.b%3Ac%28d%29"),
            ("+5511987654321", "%2B5511987654321"),
            ("x&select=secret", "x%26select%3Dsecret"),
            ("50% off #1", "50%25%20off%20%231"),
            ("\"quoted\"", "%22quoted%22"),
            ("São", "S%C3%A3o"),
            ("ana@example.com", "ana%40example.com"),
        ];
        for (value, encoded) in cases {
            let url = client.row_url("leads", "email", value).expect("url");
            let query = url.query().expect("query");
            assert_eq!(
                query,
                format!("email=eq.{encoded}&select=*&limit=1"),
                "{value}"
            );
            assert_eq!(
                decode_like_postgrest(query, "email").as_deref(),
                Some(format!("eq.{value}").as_str())
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn any_value_reaches_postgrest_unchanged(value in "\\PC{1,40}") {
            let url = client("https://abcd.supabase.co").row_url("leads", "email", &value).expect("url");
            let query = url.query().expect("query");
            let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            proptest::prop_assert_eq!(pairs.len(), 3);
            proptest::prop_assert_eq!(&pairs[0], &("email".to_owned(), format!("eq.{value}")));
        }
    }

    #[test]
    fn names_must_be_plain_identifiers() {
        for name in ["leads", "Leads", "_x", "lead_2024", &"a".repeat(63)] {
            assert!(check_identifier("table", name).is_ok(), "{name}");
        }
        for name in [
            "",
            "2024_leads",
            "leads?select=*",
            "leads&or=(id.eq.1)",
            "public.leads",
            "lead s",
            "leads-x",
            "lead\"s",
            "léads",
            &"a".repeat(64),
        ] {
            assert!(
                matches!(
                    check_identifier("table", name),
                    Err(LookupError::InvalidName { .. })
                ),
                "{name}"
            );
        }
        let client = client("https://abcd.supabase.co");
        assert!(matches!(
            client.row_url("leads", "id=eq.1&x", "1"),
            Err(LookupError::InvalidName { what: "column", .. })
        ));
        assert!(matches!(
            client.row_url("leads", "id", ""),
            Err(LookupError::EmptyValue { .. })
        ));
        assert!(client.clone().with_schema("crm").is_ok());
        assert!(client.with_schema("crm;drop").is_err());
    }

    #[test]
    fn plain_http_is_only_for_loopback() {
        for ok in [
            "https://abcd.supabase.co",
            "https://db.example.com:8443/base",
            "http://127.0.0.1:54321",
            "http://localhost:54321",
            "http://[::1]:54321",
        ] {
            assert!(check_base_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://abcd.supabase.co",
            "http://10.0.0.5:8000",
            "ftp://abcd.supabase.co",
            "abcd.supabase.co",
            "https://user:pass@abcd.supabase.co",
            "https://abcd.supabase.co/?x=1",
            "",
        ] {
            assert!(
                matches!(check_base_url(bad), Err(LookupError::InvalidUrl { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn key_kinds_decide_the_headers() {
        assert_eq!(KeyKind::of(JWT), KeyKind::LegacyJwt);
        assert_eq!(KeyKind::of(SECRET), KeyKind::Secret);
        assert_eq!(KeyKind::of("sb_publishable_x"), KeyKind::Publishable);
        assert_eq!(KeyKind::of("something-else"), KeyKind::Other);
        assert!(KeyKind::LegacyJwt.sends_bearer());
        assert!(!KeyKind::Secret.sends_bearer());
        assert!(!KeyKind::Publishable.sends_bearer());
        assert!(!KeyKind::Other.sends_bearer());
    }

    #[test]
    fn a_key_that_cannot_be_a_header_is_refused_without_showing_it() {
        let err = SupabaseRest::new(
            "https://abcd.supabase.co",
            "sb_secret_abc\ndef",
            DEFAULT_TIMEOUT,
        )
        .expect_err("newline");
        let shown = err.to_string();
        assert!(shown.contains("SUPABASE_SERVICE_KEY"), "{shown}");
        assert!(!shown.contains("sb_secret_abc"), "{shown}");
        assert!(check_key("", "SUPABASE_SECRET_KEY").is_err());
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let client =
            SupabaseRest::new("https://abcd.supabase.co", JWT, DEFAULT_TIMEOUT).expect("client");
        let shown = format!("{client:?}");
        assert!(!shown.contains("eyJ"), "{shown}");
        assert!(shown.contains("LegacyJwt"), "{shown}");
    }

    #[test]
    fn server_messages_lose_the_key_and_the_value() {
        let client = client("https://abcd.supabase.co");
        let body = serde_json::json!({
            "code": "22P02",
            "message": "invalid input syntax for type bigint: \"ana@example.com\"",
            "hint": format!("key was {SECRET}\nsee docs"),
        });
        let message = client.server_message(body.to_string().as_bytes(), "ana@example.com");
        let shown = message.to_string();
        assert_eq!(message.code.as_deref(), Some("22P02"));
        assert!(!shown.contains("ana@example.com"), "{shown}");
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(!shown.contains('\n'), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        // Not JSON: nothing is quoted.
        assert_eq!(
            client.server_message(b"<html>ana@example.com</html>", "x"),
            ServerMessage::default()
        );
        // Long messages are cut.
        let long = serde_json::json!({ "message": "x".repeat(1000) });
        let cut = client.server_message(long.to_string().as_bytes(), "v");
        assert!(cut.message.expect("message").chars().count() <= MAX_MESSAGE_CHARS + 1);
    }
}
