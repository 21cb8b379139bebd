//! Configuration: built-in defaults, then an optional TOML file, then `.env`, `.env.local` and
//! the real environment (the real environment wins). Validated once at start; every problem is
//! reported on its own line. Nothing else in the crate reads the environment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::domain::{ActionSource, IngestRules};
use crate::store::Retention;

/// Everything the service needs to run, validated.
#[derive(Clone)]
pub struct Config {
    /// Address the HTTP server binds to.
    pub listen_addr: SocketAddr,
    /// Storage location, e.g. `sqlite://capi-bridge.db` or `postgres://…`.
    pub database_url: String,
    /// Postgres schema holding capi-bridge's tables (ignored by SQLite).
    pub database_schema: String,
    /// The pixels events go to, with their credentials; none means dry-run.
    pub pixels: crate::pixels::Pixels,
    /// Graph API version, e.g. `v25.0` (a pixel may set its own).
    pub api_version: String,
    /// Base URL of the Graph API (tests point it at a local stand-in).
    pub graph_url: String,
    /// Accepted webhook secrets (several allow rotation). Empty means unauthenticated.
    pub webhook_secrets: Vec<String>,
    /// Supabase's REST API, for rules that look rows up; `None` when not configured.
    pub supabase: Option<SupabaseApiConfig>,
    /// Rules applied to every incoming event.
    pub ingest: IngestRules,
    /// Largest accepted request body in bytes.
    pub body_limit_bytes: usize,
    /// Delivery tuning.
    pub delivery: DeliveryConfig,
    /// `json` or `text` log lines.
    pub log_format: LogFormat,
    /// Webhook sources and their mapping rules.
    pub sources: crate::sources::SourcesConfig,
    /// Landing pages (`POST /v1/collect`).
    pub sites: crate::sites::SitesConfig,
    /// How long finished events are kept.
    pub retention: Retention,
    /// Days the match-key memory keeps a person's match keys (0: off).
    pub match_key_memory_days: u64,
    /// The operator dashboard at `/admin`; `None` when no admin password is set.
    pub admin: Option<crate::admin::AdminSettings>,
    /// Certificate and key files for native HTTPS; `None` serves plain HTTP.
    pub tls: Option<crate::tls::TlsFiles>,
    /// Bearer token `GET /metrics` requires (`METRICS_TOKEN`); `None` leaves it open.
    pub metrics_token: Option<String>,
    /// Connection limits and timeouts of the HTTP server (`HTTP_*`).
    pub http: crate::server::Limits,
}

/// Credentials for one pixel (dataset).
#[derive(Clone)]
pub struct MetaConfig {
    /// The name requests choose it by (`default` for `META_PIXEL_ID`).
    pub name: String,
    /// Pixel or dataset id.
    pub pixel_id: String,
    /// System-user access token. Never logged, never put in a URL.
    pub access_token: String,
    /// App secret used for `appsecret_proof`.
    pub app_secret: Option<String>,
    /// Routes every event to Events Manager's Test Events tab.
    pub test_event_code: Option<String>,
    /// Graph API version, e.g. `v25.0`.
    pub api_version: String,
}

/// Supabase's REST API (PostgREST) with a service key, for row lookups.
#[derive(Clone)]
pub struct SupabaseApiConfig {
    /// Project URL, e.g. `https://<ref>.supabase.co`.
    pub url: String,
    /// Legacy `service_role` JWT or `sb_secret_…` key. Never logged, never in a URL.
    pub service_key: String,
    /// The variable the key came from, named in error messages.
    pub key_variable: &'static str,
}

impl std::fmt::Debug for SupabaseApiConfig {
    // Hand-written so that the key can never reach a log through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupabaseApiConfig")
            .field("url", &self.url)
            .field("key_variable", &self.key_variable)
            .finish_non_exhaustive()
    }
}

/// How the delivery workers behave.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Events per Graph request (Meta's limit is 1000).
    pub max_batch_events: usize,
    /// Graph requests in flight at once per pixel.
    pub max_in_flight: usize,
    /// How long a claimed batch belongs to a worker before others may take it.
    pub lease: Duration,
    /// How often an idle worker looks for due events when nothing woke it.
    pub poll_interval: Duration,
    /// Whole-request timeout for Graph calls.
    pub request_timeout: Duration,
    /// TCP/TLS connect timeout for Graph calls.
    pub connect_timeout: Duration,
    /// First retry delay; doubles with each attempt.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// How long a paused pixel waits before it is probed again.
    pub pause_probe_interval: Duration,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl std::fmt::Debug for Config {
    // Hand-written so that secrets can never reach a log through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen_addr", &self.listen_addr)
            .field("database_url", &redact_url(&self.database_url))
            .field("pixels", &self.pixels)
            .field("api_version", &self.api_version)
            .field("graph_url", &self.graph_url)
            .field("webhook_secrets", &self.webhook_secrets.len())
            .field("metrics_token", &self.metrics_token.is_some())
            .field("supabase", &self.supabase)
            .field("delivery", &self.delivery)
            .field("tls", &self.tls)
            .field("http", &self.http)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// True when no Meta credentials are configured: events are stored, never sent.
    pub fn dry_run(&self) -> bool {
        self.pixels.is_empty()
    }

    /// True when a configured secret is short enough to guess. Short secrets from the original
    /// service are still accepted (switching must not break callers) but warned about.
    pub fn has_weak_secret(&self) -> bool {
        self.webhook_secrets.iter().any(|s| s.len() < 16)
    }

    /// True when requests may arrive without a secret (only allowed on loopback).
    pub fn unauthenticated(&self) -> bool {
        self.webhook_secrets.is_empty()
    }
}

/// The optional TOML file; every key is optional and overrides the default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen_addr: Option<String>,
    database_url: Option<String>,
    database_schema: Option<String>,
    supabase_url: Option<String>,
    default_country: Option<String>,
    default_action_source: Option<String>,
    body_limit_bytes: Option<usize>,
    max_future_skew_secs: Option<u64>,
    log_format: Option<String>,
    retention_delivered_days: Option<u64>,
    retention_dead_days: Option<u64>,
    retention_counts_days: Option<u64>,
    match_key_memory_days: Option<u64>,
    tls_cert_file: Option<String>,
    tls_key_file: Option<String>,
    #[serde(default)]
    meta: FileMeta,
    /// Several pixels by name.
    #[serde(default)]
    pixels: BTreeMap<String, crate::pixels::FilePixel>,
    /// The pixel of requests that choose none.
    default_pixel: Option<String>,
    #[serde(default)]
    delivery: FileDelivery,
    #[serde(default)]
    http: FileHttp,
    /// Incoming event name (case-insensitive) → name sent to Meta.
    #[serde(default)]
    event_aliases: BTreeMap<String, String>,
    /// A file of `[[rules]]` (RULES_FILE wins).
    rules_file: Option<String>,
    /// Webhook sources by name.
    #[serde(default)]
    sources: BTreeMap<String, crate::sources::settings::FileSource>,
    /// Mapping rules.
    #[serde(default)]
    rules: Vec<crate::domain::rules::RuleSpec>,
    /// Landing pages by public site key.
    #[serde(default)]
    sites: BTreeMap<String, crate::sites::FileSite>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMeta {
    pixel_id: Option<String>,
    api_version: Option<String>,
    graph_url: Option<String>,
    test_event_code: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDelivery {
    max_batch_events: Option<usize>,
    max_in_flight: Option<usize>,
    lease_ms: Option<u64>,
    poll_interval_ms: Option<u64>,
    request_timeout_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
    retry_base_ms: Option<u64>,
    retry_max_ms: Option<u64>,
    pause_probe_interval_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHttp {
    header_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    body_timeout_ms: Option<u64>,
    max_connections: Option<usize>,
}

/// Variables looked up by name: the real environment first, then `.env.local`, then `.env`.
#[derive(Debug, Default, Clone)]
pub struct Env {
    files: BTreeMap<String, String>,
    real: BTreeMap<String, String>,
}

impl Env {
    /// Reads the process environment and the `.env`/`.env.local` files in `dir`.
    ///
    /// # Errors
    /// When a `.env` file exists but cannot be parsed.
    pub fn from_process(dir: &Path) -> Result<Self, Vec<String>> {
        let mut files = BTreeMap::new();
        let mut problems = Vec::new();
        // `.env.local` overrides `.env`, as in Next.js and the original service.
        for name in [".env", ".env.local"] {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            match dotenvy::from_path_iter(&path) {
                Ok(iter) => {
                    for item in iter {
                        match item {
                            Ok((key, value)) => {
                                files.insert(key, value);
                            }
                            Err(err) => problems.push(format!("{name}: {err}")),
                        }
                    }
                }
                Err(err) => problems.push(format!("{name}: {err}")),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Self {
            files,
            real: std::env::vars().collect(),
        })
    }

    /// An environment made of the given pairs only (for tests and embedding).
    pub fn from_pairs<I, K, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self {
            files: BTreeMap::new(),
            real: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// The value of `key`, with blank values treated as unset.
    pub fn get(&self, key: &str) -> Option<String> {
        self.real
            .get(key)
            .or_else(|| self.files.get(key))
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }
}

/// Builds the configuration from `env` and the optional TOML file.
///
/// The file comes from `config_path`, else `CAPI_BRIDGE_CONFIG`.
///
/// # Errors
/// One line per problem found.
pub fn load(env: &Env, config_path: Option<&Path>) -> Result<Config, Vec<String>> {
    let mut problems = Vec::new();
    let path: Option<PathBuf> = config_path
        .map(Path::to_path_buf)
        .or_else(|| env.get("CAPI_BRIDGE_CONFIG").map(PathBuf::from));
    let file = match path {
        Some(path) => match std::fs::read_to_string(&path) {
            Ok(text) => match toml::from_str::<FileConfig>(&text) {
                Ok(file) => file,
                Err(err) => {
                    problems.push(format!("{}: {}", path.display(), err.message().trim_end()));
                    FileConfig::default()
                }
            },
            Err(err) => {
                problems.push(format!("cannot read config file {}: {err}", path.display()));
                FileConfig::default()
            }
        },
        None => FileConfig::default(),
    };

    let listen_addr = match (env.get("LISTEN_ADDR"), env.get("PORT"), file.listen_addr) {
        (Some(addr), _, _) => parse_addr("LISTEN_ADDR", &addr, &mut problems),
        // The usual PaaS convention: a bare PORT means listen on every interface.
        (None, Some(port), _) => match port.parse::<u16>() {
            Ok(port) => SocketAddr::from(([0, 0, 0, 0], port)),
            Err(_) => {
                problems.push(format!(
                    "PORT must be a number from 0 to 65535, got {port:?}"
                ));
                default_addr()
            }
        },
        (None, None, Some(addr)) => parse_addr("listen_addr", &addr, &mut problems),
        (None, None, None) => default_addr(),
    };

    // SUPABASE_DB_URL: the name Supabase's own docs and CLI use for the Postgres connection.
    let database_url = env
        .get("DATABASE_URL")
        .or_else(|| env.get("SUPABASE_DB_URL"))
        .or(file.database_url)
        .unwrap_or_else(|| "sqlite://capi-bridge.db".to_owned());
    if !database_url.starts_with("sqlite:")
        && !database_url.starts_with("postgres://")
        && !database_url.starts_with("postgresql://")
    {
        problems.push(format!(
            "DATABASE_URL must start with sqlite:// or postgres://, got {:?}",
            redact_url(&database_url)
        ));
    }
    let database_schema = env
        .get("DATABASE_SCHEMA")
        .or(file.database_schema)
        .unwrap_or_else(|| "capi_bridge".to_owned());
    let valid_identifier = database_schema
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && database_schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && database_schema.len() <= 63;
    if !valid_identifier {
        problems.push(format!(
            "DATABASE_SCHEMA must be a lowercase SQL identifier (letters, digits, _), got {database_schema:?}"
        ));
    }

    let api_version = env
        .get("META_API_VERSION")
        .or(file.meta.api_version)
        .unwrap_or_else(|| "v25.0".to_owned());
    if !is_api_version(&api_version) {
        problems.push(format!(
            "META_API_VERSION must look like v25.0, got {api_version:?}"
        ));
    }

    let pixels = crate::pixels::load(
        env,
        crate::pixels::Inputs {
            file_pixel_id: file.meta.pixel_id,
            file_test_event_code: file.meta.test_event_code,
            file_pixels: file.pixels,
            file_default: file.default_pixel,
            api_version: &api_version,
        },
        &mut problems,
    );

    let graph_url = env
        .get("META_GRAPH_URL")
        .or(file.meta.graph_url)
        .unwrap_or_else(|| "https://graph.facebook.com".to_owned())
        .trim_end_matches('/')
        .to_owned();
    if let Err(problem) = check_graph_url(&graph_url) {
        problems.push(problem);
    }

    let webhook_secrets: Vec<String> = env
        .get("WEBHOOK_SECRET")
        .map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();

    let supabase = load_supabase(env, file.supabase_url, &mut problems);

    let default_country = match env.get("DEFAULT_COUNTRY").or(file.default_country) {
        Some(raw) => match crate::domain::normalize::country_code(&raw) {
            Some(code) => Some(code.to_owned()),
            None => {
                problems.push(format!(
                    "DEFAULT_COUNTRY must be an ISO 3166-1 country code such as BR or US, got {raw:?}"
                ));
                None
            }
        },
        None => None,
    };

    let default_action_source = match env
        .get("DEFAULT_ACTION_SOURCE")
        .or(file.default_action_source)
    {
        Some(raw) => match ActionSource::parse(&raw) {
            Some(source) => source,
            None => {
                problems.push(format!(
                    "DEFAULT_ACTION_SOURCE must be one of {}, got {raw:?}",
                    ActionSource::ALL.map(ActionSource::as_str).join(", ")
                ));
                ActionSource::Other
            }
        },
        None => ActionSource::Other,
    };

    let mut event_aliases = BTreeMap::from([("appointment".to_owned(), "Schedule".to_owned())]);
    for (from, to) in file.event_aliases {
        if to.trim().is_empty() {
            problems.push(format!("event_aliases.{from} must not be empty"));
        }
        event_aliases.insert(from.to_lowercase(), to);
    }

    let max_future_skew_secs = number(env, "MAX_FUTURE_SKEW_SECS", &mut problems)
        .or(file.max_future_skew_secs)
        .unwrap_or(300);
    let body_limit_bytes = number(env, "BODY_LIMIT_BYTES", &mut problems)
        .map(|n| n as usize)
        .or(file.body_limit_bytes)
        .unwrap_or(5 * 1024 * 1024);

    let d = file.delivery;
    let ms = |name: &str, file_value: Option<u64>, default: u64, problems: &mut Vec<String>| {
        Duration::from_millis(
            number(env, name, problems)
                .or(file_value)
                .unwrap_or(default),
        )
    };
    let delivery = DeliveryConfig {
        max_batch_events: number(env, "DELIVERY_MAX_BATCH_EVENTS", &mut problems)
            .map(|n| n as usize)
            .or(d.max_batch_events)
            .unwrap_or(1000),
        max_in_flight: number(env, "DELIVERY_MAX_IN_FLIGHT", &mut problems)
            .map(|n| n as usize)
            .or(d.max_in_flight)
            .unwrap_or(4),
        lease: ms("DELIVERY_LEASE_MS", d.lease_ms, 60_000, &mut problems),
        poll_interval: ms(
            "DELIVERY_POLL_INTERVAL_MS",
            d.poll_interval_ms,
            1_000,
            &mut problems,
        ),
        request_timeout: ms(
            "DELIVERY_REQUEST_TIMEOUT_MS",
            d.request_timeout_ms,
            30_000,
            &mut problems,
        ),
        connect_timeout: ms(
            "DELIVERY_CONNECT_TIMEOUT_MS",
            d.connect_timeout_ms,
            5_000,
            &mut problems,
        ),
        retry_base: ms(
            "DELIVERY_RETRY_BASE_MS",
            d.retry_base_ms,
            1_000,
            &mut problems,
        ),
        retry_max: ms(
            "DELIVERY_RETRY_MAX_MS",
            d.retry_max_ms,
            3_600_000,
            &mut problems,
        ),
        pause_probe_interval: ms(
            "DELIVERY_PAUSE_PROBE_INTERVAL_MS",
            d.pause_probe_interval_ms,
            60_000,
            &mut problems,
        ),
    };
    if !(1..=1000).contains(&delivery.max_batch_events) {
        problems.push("DELIVERY_MAX_BATCH_EVENTS must be between 1 and 1000".to_owned());
    }
    if !(1..=64).contains(&delivery.max_in_flight) {
        problems.push("DELIVERY_MAX_IN_FLIGHT must be between 1 and 64".to_owned());
    }
    if delivery.lease < delivery.request_timeout {
        problems.push(
            "DELIVERY_LEASE_MS must be at least DELIVERY_REQUEST_TIMEOUT_MS, or two workers could send the same batch at once"
                .to_owned(),
        );
    }

    let h = file.http;
    let defaults = crate::server::Limits::default();
    let http = crate::server::Limits {
        header_timeout: ms(
            "HTTP_HEADER_TIMEOUT_MS",
            h.header_timeout_ms,
            defaults.header_timeout.as_millis() as u64,
            &mut problems,
        ),
        idle_timeout: ms(
            "HTTP_IDLE_TIMEOUT_MS",
            h.idle_timeout_ms,
            defaults.idle_timeout.as_millis() as u64,
            &mut problems,
        ),
        body_timeout: ms(
            "HTTP_BODY_TIMEOUT_MS",
            h.body_timeout_ms,
            defaults.body_timeout.as_millis() as u64,
            &mut problems,
        ),
        max_connections: number(env, "HTTP_MAX_CONNECTIONS", &mut problems)
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
            .or(h.max_connections)
            .unwrap_or(defaults.max_connections),
    };
    for (name, value) in [
        ("HTTP_HEADER_TIMEOUT_MS", http.header_timeout),
        ("HTTP_IDLE_TIMEOUT_MS", http.idle_timeout),
        ("HTTP_BODY_TIMEOUT_MS", http.body_timeout),
    ] {
        if value.is_zero() {
            problems.push(format!("{name} must be at least 1"));
        }
    }
    if http.max_connections == 0 {
        problems.push("HTTP_MAX_CONNECTIONS must be at least 1".to_owned());
    }

    let log_format = match env
        .get("LOG_FORMAT")
        .or(file.log_format)
        .as_deref()
        .map(str::to_lowercase)
        .as_deref()
    {
        None | Some("text") | Some("pretty") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            problems.push(format!("LOG_FORMAT must be text or json, got {other:?}"));
            LogFormat::Text
        }
    };

    const DAY_MS: i64 = 24 * 60 * 60 * 1000;
    let days = |name: &str, file_value: Option<u64>, default: i64, problems: &mut Vec<String>| {
        number(env, name, problems)
            .or(file_value)
            .map_or(default, |d| {
                i64::try_from(d)
                    .unwrap_or(i64::MAX / DAY_MS)
                    .saturating_mul(DAY_MS)
            })
    };
    let retention = Retention {
        delivered_ms: days(
            "RETENTION_DELIVERED_DAYS",
            file.retention_delivered_days,
            Retention::default().delivered_ms,
            &mut problems,
        ),
        dead_ms: days(
            "RETENTION_DEAD_DAYS",
            file.retention_dead_days,
            Retention::default().dead_ms,
            &mut problems,
        ),
        counts_ms: days(
            "RETENTION_COUNTS_DAYS",
            file.retention_counts_days,
            Retention::default().counts_ms,
            &mut problems,
        ),
    };
    if retention.counts_ms < DAY_MS {
        problems.push("RETENTION_COUNTS_DAYS must be at least 1".to_owned());
    }
    if retention.delivered_ms < 2 * DAY_MS || retention.dead_ms < 2 * DAY_MS {
        problems.push(
            "RETENTION_DELIVERED_DAYS and RETENTION_DEAD_DAYS must be at least 2 (Meta's 48-hour dedup window)"
                .to_owned(),
        );
    }

    let sites = crate::sites::load(env, file.sites, &mut problems);
    let sources = crate::sources::settings::load(
        env,
        file.sources,
        file.rules,
        file.rules_file,
        &mut problems,
    );
    // 90 days: what an fbc (the ad click) is worth.
    let match_key_memory_days = number(env, "MATCH_KEY_MEMORY_DAYS", &mut problems)
        .or(file.match_key_memory_days)
        .unwrap_or(90);

    let admin = crate::admin::settings::load(env, &mut problems);
    let tls = crate::tls::TlsFiles::from_settings(
        env.get("TLS_CERT_FILE").or(file.tls_cert_file),
        env.get("TLS_KEY_FILE").or(file.tls_key_file),
    )
    .unwrap_or_else(|problem| {
        problems.push(problem);
        None
    });

    if webhook_secrets.is_empty() && !listen_addr.ip().is_loopback() {
        problems.push(format!(
            "refusing to listen on {listen_addr} without authentication: set WEBHOOK_SECRET (a long random string; several may be separated by commas), or LISTEN_ADDR=127.0.0.1:{} for local use",
            listen_addr.port()
        ));
    }

    // Every pixel a site, a source or a rule names must exist.
    let named = sites
        .sites
        .iter()
        .filter_map(|s| Some((format!("sites.{}.pixel", s.key), s.pixel.as_deref()?)))
        .chain(
            sources
                .sources
                .iter()
                .filter_map(|s| Some((format!("sources.{}.pixel", s.name), s.pixel.as_deref()?))),
        )
        .chain(
            sources
                .rules
                .pixels()
                .map(|(rule, pixel)| (format!("rule {rule}: pixel"), pixel)),
        );
    for (place, pixel) in named {
        if let Err(err) = pixels.check_name(pixel) {
            problems.push(format!("{place}: {err}"));
        }
    }

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Config {
        listen_addr,
        database_url,
        database_schema,
        pixels,
        api_version,
        graph_url,
        webhook_secrets,
        supabase,
        ingest: IngestRules {
            default_country,
            default_action_source,
            event_aliases,
            max_future_skew_secs: max_future_skew_secs as i64,
        },
        body_limit_bytes,
        delivery,
        log_format,
        retention,
        sources,
        sites,
        match_key_memory_days,
        admin,
        tls,
        metrics_token: env.get("METRICS_TOKEN"),
        http,
    })
}

fn default_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn parse_addr(name: &str, raw: &str, problems: &mut Vec<String>) -> SocketAddr {
    raw.parse().unwrap_or_else(|_| {
        problems.push(format!(
            "{name} must be an address with a port such as 127.0.0.1:8080, got {raw:?}"
        ));
        default_addr()
    })
}

fn number(env: &Env, name: &str, problems: &mut Vec<String>) -> Option<u64> {
    let raw = env.get(name)?;
    match raw.parse::<u64>() {
        Ok(n) => Some(n),
        Err(_) => {
            problems.push(format!("{name} must be a whole number, got {raw:?}"));
            None
        }
    }
}

pub(crate) fn is_api_version(raw: &str) -> bool {
    let Some(rest) = raw.strip_prefix('v') else {
        return false;
    };
    let mut parts = rest.split('.');
    matches!(
        (parts.next(), parts.next(), parts.next()),
        (Some(major), Some(minor), None)
            if !major.is_empty() && !minor.is_empty()
                && major.chars().all(|c| c.is_ascii_digit())
                && minor.chars().all(|c| c.is_ascii_digit())
    )
}

/// Plain HTTP is only allowed to a loopback stand-in; the token travels in the body.
fn check_graph_url(raw: &str) -> Result<(), String> {
    let Ok(url) = reqwest::Url::parse(raw) else {
        return Err(format!("META_GRAPH_URL is not a URL: {raw:?}"));
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" => {
            if is_loopback_url(&url) {
                Ok(())
            } else {
                Err("META_GRAPH_URL must use https (plain http is allowed only for a loopback test stand-in)".to_owned())
            }
        }
        other => Err(format!("META_GRAPH_URL must use https, got {other}")),
    }
}

/// True when `url` names this machine (127.0.0.0/8, ::1 or localhost): the only place plain
/// http may go, because nothing then travels over a network.
pub fn is_loopback_url(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// `SUPABASE_URL` (or `NEXT_PUBLIC_SUPABASE_URL`, or `supabase_url` in the file) with
/// `SUPABASE_SERVICE_KEY` (or `SUPABASE_SERVICE_ROLE_KEY`, `SUPABASE_SECRET_KEY`): both or neither.
fn load_supabase(
    env: &Env,
    file_url: Option<String>,
    problems: &mut Vec<String>,
) -> Option<SupabaseApiConfig> {
    use crate::sources::supabase_rest::{check_base_url, check_key};
    let url = ["SUPABASE_URL", "NEXT_PUBLIC_SUPABASE_URL"]
        .into_iter()
        .find_map(|name| env.get(name).map(|url| (name, url)))
        .or(file_url.map(|url| ("supabase_url", url)));
    let key = [
        "SUPABASE_SERVICE_KEY",
        "SUPABASE_SERVICE_ROLE_KEY",
        "SUPABASE_SECRET_KEY",
    ]
    .into_iter()
    .find_map(|name| env.get(name).map(|key| (name, key)));
    match (url, key) {
        (Some((url_name, url)), Some((key_name, service_key))) => {
            let mut valid = true;
            if let Err(err) = check_base_url(&url) {
                problems.push(format!("{url_name}: {err}"));
                valid = false;
            }
            if let Err(err) = check_key(&service_key, key_name) {
                problems.push(err.to_string());
                valid = false;
            }
            valid.then_some(SupabaseApiConfig {
                url: url.trim_end_matches('/').to_owned(),
                service_key,
                key_variable: key_name,
            })
        }
        // A Next.js .env.local commonly has the public URL without a service key: that must
        // keep working. Rules that look rows up then park with a message saying what to set.
        (Some(_), None) => None,
        (None, Some((key_name, _))) => {
            problems.push(format!(
                "{key_name} is set but SUPABASE_URL (or NEXT_PUBLIC_SUPABASE_URL) is not: set both for row lookups over Supabase's REST API, or neither"
            ));
            None
        }
        (None, None) => None,
    }
}

/// Hides the password of a database URL.
pub fn redact_url(raw: &str) -> String {
    match reqwest::Url::parse(raw) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        _ => raw.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_pairs(pairs: &[(&str, &str)]) -> Result<Config, Vec<String>> {
        load(&Env::from_pairs(pairs.iter().copied()), None)
    }

    #[test]
    fn no_configuration_gives_a_loopback_dry_run_on_sqlite() {
        let config = load_pairs(&[]).expect("defaults are valid");
        assert_eq!(config.listen_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(config.database_url, "sqlite://capi-bridge.db");
        assert!(config.dry_run());
        assert!(config.unauthenticated());
        assert_eq!(config.api_version, "v25.0");
        assert_eq!(config.graph_url, "https://graph.facebook.com");
        assert_eq!(config.ingest.default_action_source, ActionSource::Other);
    }

    #[test]
    fn match_key_memory_lasts_90_days_unless_configured_and_0_turns_it_off() {
        assert_eq!(load_pairs(&[]).expect("valid").match_key_memory_days, 90);
        let config = load_pairs(&[("MATCH_KEY_MEMORY_DAYS", "0")]).expect("valid");
        assert_eq!(config.match_key_memory_days, 0);
        let problems = load_pairs(&[("MATCH_KEY_MEMORY_DAYS", "ninety")]).expect_err("invalid");
        assert!(
            problems[0].contains("MATCH_KEY_MEMORY_DAYS"),
            "{problems:?}"
        );
    }

    #[test]
    fn connections_are_limited_and_timed_unless_configured_otherwise() {
        let http = load_pairs(&[]).expect("valid").http;
        assert_eq!(http.header_timeout, Duration::from_secs(30));
        assert_eq!(http.idle_timeout, Duration::from_secs(60));
        assert_eq!(http.body_timeout, Duration::from_secs(30));
        assert_eq!(http.max_connections, 1024);
        let http = load_pairs(&[
            ("HTTP_HEADER_TIMEOUT_MS", "1000"),
            ("HTTP_IDLE_TIMEOUT_MS", "2000"),
            ("HTTP_BODY_TIMEOUT_MS", "3000"),
            ("HTTP_MAX_CONNECTIONS", "8"),
        ])
        .expect("valid")
        .http;
        assert_eq!(http.header_timeout, Duration::from_secs(1));
        assert_eq!(http.idle_timeout, Duration::from_secs(2));
        assert_eq!(http.body_timeout, Duration::from_secs(3));
        assert_eq!(http.max_connections, 8);
        let problems = load_pairs(&[
            ("HTTP_HEADER_TIMEOUT_MS", "0"),
            ("HTTP_MAX_CONNECTIONS", "0"),
            ("HTTP_IDLE_TIMEOUT_MS", "soon"),
        ])
        .expect_err("invalid");
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    #[test]
    fn a_bare_port_listens_everywhere_and_then_needs_a_secret() {
        let problems = load_pairs(&[("PORT", "3000")]).expect_err("needs a secret");
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("WEBHOOK_SECRET"), "{problems:?}");
        let config =
            load_pairs(&[("PORT", "3000"), ("WEBHOOK_SECRET", "0123456789abcdef")]).expect("valid");
        assert_eq!(config.listen_addr.to_string(), "0.0.0.0:3000");
    }

    #[test]
    fn webhook_secret_is_a_comma_separated_list_for_rotation() {
        let config = load_pairs(&[(
            "WEBHOOK_SECRET",
            "old-secret-0123456789, new-secret-0123456789",
        )])
        .expect("valid");
        assert_eq!(
            config.webhook_secrets,
            ["old-secret-0123456789", "new-secret-0123456789"]
        );
    }

    #[test]
    fn every_problem_is_reported_on_its_own_line() {
        let problems = load_pairs(&[
            ("META_ACCESS_TOKEN", "token"),
            ("META_API_VERSION", "25"),
            ("META_GRAPH_URL", "http://example.com"),
            ("DEFAULT_COUNTRY", "Atlantis"),
            ("DELIVERY_MAX_IN_FLIGHT", "many"),
        ])
        .expect_err("invalid");
        assert_eq!(problems.len(), 5, "{problems:#?}");
        assert!(problems.iter().any(|p| p.contains("META_PIXEL_ID")));
        assert!(problems.iter().any(|p| p.contains("META_API_VERSION")));
        assert!(problems.iter().any(|p| p.contains("META_GRAPH_URL")));
        assert!(problems.iter().any(|p| p.contains("DEFAULT_COUNTRY")));
        assert!(problems
            .iter()
            .any(|p| p.contains("DELIVERY_MAX_IN_FLIGHT")));
    }

    #[test]
    fn the_real_environment_wins_over_env_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(".env"),
            "META_API_VERSION=v20.0\nLOG_FORMAT=json\n",
        )
        .expect("write");
        std::fs::write(dir.path().join(".env.local"), "META_API_VERSION=v21.0\n").expect("write");
        let mut env = Env::from_process(dir.path()).expect("parse");
        env.real.clear();
        assert_eq!(env.get("META_API_VERSION").as_deref(), Some("v21.0"));
        assert_eq!(env.get("LOG_FORMAT").as_deref(), Some("json"));
        env.real
            .insert("META_API_VERSION".to_owned(), "v26.0".to_owned());
        assert_eq!(env.get("META_API_VERSION").as_deref(), Some("v26.0"));
    }

    #[test]
    fn a_toml_file_sets_what_does_not_fit_in_variables() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("capi-bridge.toml");
        std::fs::write(
            &path,
            "[event_aliases]\nBooking = \"Schedule\"\n\n[delivery]\nmax_in_flight = 2\n",
        )
        .expect("write");
        let config = load(&Env::default(), Some(&path)).expect("valid");
        assert_eq!(config.delivery.max_in_flight, 2);
        assert_eq!(
            config
                .ingest
                .event_aliases
                .get("booking")
                .map(String::as_str),
            Some("Schedule")
        );
        // The built-in alias stays.
        assert!(config.ingest.event_aliases.contains_key("appointment"));
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let config = load_pairs(&[
            ("META_ACCESS_TOKEN", "EAAB-secret-token"),
            ("META_PIXEL_ID", "123"),
            ("WEBHOOK_SECRET", "hook-secret-0123456789"),
        ])
        .expect("valid");
        let shown = format!("{config:?}");
        assert!(!shown.contains("EAAB-secret-token"));
        assert!(!shown.contains("hook-secret"));
    }

    #[test]
    fn supabase_needs_a_url_and_a_key_and_never_shows_the_key() {
        let key = "sb_secret_0123456789abcdefghijklmnop";
        let config = load_pairs(&[
            ("NEXT_PUBLIC_SUPABASE_URL", "https://abcd.supabase.co/"),
            ("SUPABASE_SERVICE_KEY", key),
        ])
        .expect("valid");
        let supabase = config.supabase.as_ref().expect("configured");
        assert_eq!(supabase.url, "https://abcd.supabase.co");
        assert_eq!(supabase.key_variable, "SUPABASE_SERVICE_KEY");
        let shown = format!("{config:?}");
        assert!(shown.contains("abcd.supabase.co"), "{shown}");
        assert!(!shown.contains(key), "{shown}");

        // The aliases, and SUPABASE_URL over NEXT_PUBLIC_SUPABASE_URL.
        for alias in ["SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_SECRET_KEY"] {
            let config = load_pairs(&[
                ("SUPABASE_URL", "https://wxyz.supabase.co"),
                ("NEXT_PUBLIC_SUPABASE_URL", "https://abcd.supabase.co"),
                (alias, key),
            ])
            .expect("valid");
            let supabase = config.supabase.expect("configured");
            assert_eq!(supabase.url, "https://wxyz.supabase.co");
            assert_eq!(supabase.key_variable, alias);
        }

        // A Next.js .env.local with only the public URL keeps working (no lookups).
        let config = load_pairs(&[("NEXT_PUBLIC_SUPABASE_URL", "https://abcd.supabase.co")])
            .expect("the public URL alone is fine");
        assert!(config.supabase.is_none());
        let problems = load_pairs(&[("SUPABASE_SECRET_KEY", key)]).expect_err("no url");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("SUPABASE_URL"), "{problems:?}");
        assert!(!problems[0].contains(key), "{problems:?}");

        // The key would travel in clear.
        let problems = load_pairs(&[
            ("SUPABASE_URL", "http://abcd.supabase.co"),
            ("SUPABASE_SERVICE_KEY", key),
        ])
        .expect_err("plain http");
        assert!(problems[0].starts_with("SUPABASE_URL: "), "{problems:?}");
        assert!(problems[0].contains("https"), "{problems:?}");
        assert!(load_pairs(&[
            ("SUPABASE_URL", "http://127.0.0.1:54321"),
            ("SUPABASE_SERVICE_KEY", key),
        ])
        .is_ok());
    }

    #[test]
    fn the_toml_file_may_set_the_supabase_url_but_not_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("capi-bridge.toml");
        std::fs::write(&path, "supabase_url = \"https://abcd.supabase.co\"\n").expect("write");
        let env = Env::from_pairs([("SUPABASE_SERVICE_KEY", "sb_secret_0123456789")]);
        let config = load(&env, Some(&path)).expect("valid");
        assert_eq!(
            config.supabase.map(|s| s.url).as_deref(),
            Some("https://abcd.supabase.co")
        );
        std::fs::write(&path, "supabase_service_key = \"sb_secret_0123456789\"\n").expect("write");
        assert!(load(&Env::default(), Some(&path)).is_err());
    }

    #[test]
    fn plain_http_to_the_graph_api_is_only_for_a_loopback_stand_in() {
        for url in [
            "https://graph.facebook.com",
            "http://127.0.0.1:9000",
            "http://127.1.2.3:9000",
            "http://localhost:9000",
            "http://LOCALHOST:9000",
            "http://[::1]:9000",
        ] {
            let config = load_pairs(&[("META_GRAPH_URL", url)]);
            assert!(config.is_ok(), "{url}: {:?}", config.err());
        }
        for url in [
            "http://graph.facebook.com",
            "http://10.0.0.5:8080",
            "http://localhost.example.com",
            "http://127.0.0.1.example.com",
            "ftp://graph.facebook.com",
        ] {
            let problems = load_pairs(&[("META_GRAPH_URL", url)]).expect_err(url);
            assert!(
                problems[0].starts_with("META_GRAPH_URL must use https"),
                "{url}: {problems:?}"
            );
        }
    }

    #[test]
    fn https_needs_both_files_from_the_environment_or_the_toml_file() {
        assert!(load_pairs(&[]).expect("valid").tls.is_none());
        let config =
            load_pairs(&[("TLS_CERT_FILE", "c.pem"), ("TLS_KEY_FILE", "k.pem")]).expect("valid");
        let files = config.tls.expect("https");
        assert_eq!(
            (files.cert.to_str(), files.key.to_str()),
            (Some("c.pem"), Some("k.pem"))
        );
        let problems = load_pairs(&[("TLS_KEY_FILE", "k.pem")]).expect_err("one of two");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("TLS_CERT_FILE") && problems[0].contains("TLS_KEY_FILE"),
            "{problems:?}"
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("capi-bridge.toml");
        std::fs::write(
            &path,
            "tls_cert_file = \"/le/fullchain.pem\"\ntls_key_file = \"/le/privkey.pem\"\n",
        )
        .expect("write");
        let files = load(&Env::default(), Some(&path))
            .expect("valid")
            .tls
            .expect("https");
        assert_eq!(files.cert.to_str(), Some("/le/fullchain.pem"));
        // The environment wins, file by file.
        let env = Env::from_pairs([("TLS_KEY_FILE", "/other/privkey.pem")]);
        let files = load(&env, Some(&path)).expect("valid").tls.expect("https");
        assert_eq!(files.key.to_str(), Some("/other/privkey.pem"));
        assert_eq!(files.cert.to_str(), Some("/le/fullchain.pem"));
    }

    #[test]
    fn every_key_documented_in_the_example_file_is_real() {
        let example = include_str!("../capi-bridge.example.toml");
        // Uncomment every `# key = value` and `# [table]` line: deny_unknown_fields rejects a
        // misspelt key.
        let uncommented: String = example
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest) if rest.split(" = ").count() >= 2 && !rest.starts_with(' ') => {
                    rest.split("  #").next().unwrap_or(rest).to_owned()
                }
                Some(rest) if rest.starts_with('[') => rest.to_owned(),
                _ => line.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let file: FileConfig = toml::from_str(&uncommented).expect("example parses");
        assert_eq!(file.delivery.max_in_flight, Some(4));
        assert_eq!(file.http.idle_timeout_ms, Some(60_000));
        assert_eq!(file.meta.api_version.as_deref(), Some("v25.0"));
        assert_eq!(
            file.pixels.get("shop").and_then(|p| p.pixel_id.as_deref()),
            Some("1111111111")
        );
        assert_eq!(
            file.event_aliases.get("venda").map(String::as_str),
            Some("Purchase")
        );
    }
}
