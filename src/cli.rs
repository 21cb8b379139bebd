//! The command line: `serve` (default), `check`, `hash`, `send`, `replay`, `migrate`,
//! `rules test`.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Map, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::app::{shutdown_signal, App};
use crate::config::{self, Config, Env};
use crate::delivery::{now_ms, Delivery, GraphClient, Wakes};
use crate::domain::normalize::{self, Context, HashedKey};
use crate::ingest::{IngestError, Ingestor, Route};
use crate::memory::MatchKeyMemory;
use crate::store::{self, GroupCommit, ReplayFilter};

/// Delivers conversion events to Meta's Conversions API: validated, normalized, hashed,
/// durably queued, batched, retried and deduplicated.
#[derive(Debug, Parser)]
#[command(name = "capi-bridge", version)]
pub struct Cli {
    /// TOML configuration file (also CAPI_BRIDGE_CONFIG).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server and the delivery workers (the default).
    Serve,
    /// Validate the configuration and, with credentials, prove the token can reach the pixel.
    Check,
    /// Show how one value is normalized and hashed, or why it is refused.
    Hash {
        /// Meta's key: em, ph, fn, ln, ct, st, zp, country, db, ge, external_id.
        field: String,
        /// The raw value.
        value: String,
        /// Country for phone numbers without a country code (default: DEFAULT_COUNTRY).
        #[arg(long)]
        country: Option<String>,
    },
    /// Send one event through the same pipeline (flags, or JSON on stdin without --event-name).
    Send(Box<SendArgs>),
    /// Queue dead events again.
    Replay(ReplayArgs),
    /// Apply storage migrations and exit.
    Migrate,
    /// Mapping rules: `rules test --source supabase payload.json`.
    #[command(subcommand)]
    Rules(RulesCommand),
}

/// `rules` subcommands.
#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Print the events a sample payload would produce, hashed as they would be sent, or why
    /// none. Nothing is stored or sent. Exit status 0 for events or no match, 1 when a rule
    /// fails on the payload.
    Test {
        /// The source the payload comes from (supabase, chatwoot or a configured name).
        #[arg(long)]
        source: String,
        /// The payload file (`-` for stdin).
        file: PathBuf,
    },
}

/// `send` flags.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// Event name (Lead, Purchase, Schedule, …). Without it, a JSON event is read from stdin.
    #[arg(long)]
    pub event_name: Option<String>,
    /// Event id (generated when omitted).
    #[arg(long)]
    pub event_id: Option<String>,
    /// Email address.
    #[arg(long)]
    pub email: Option<String>,
    /// Phone number.
    #[arg(long)]
    pub phone: Option<String>,
    /// First name.
    #[arg(long)]
    pub first_name: Option<String>,
    /// Last name.
    #[arg(long)]
    pub last_name: Option<String>,
    /// Country.
    #[arg(long)]
    pub country: Option<String>,
    /// Your id for the person.
    #[arg(long)]
    pub external_id: Option<String>,
    /// Monetary value.
    #[arg(long)]
    pub value: Option<f64>,
    /// ISO 4217 currency.
    #[arg(long)]
    pub currency: Option<String>,
    /// action_source (default: DEFAULT_ACTION_SOURCE).
    #[arg(long)]
    pub action_source: Option<String>,
    /// Page URL (website events).
    #[arg(long)]
    pub event_source_url: Option<String>,
    /// Test event code for Events Manager's Test Events tab.
    #[arg(long)]
    pub test_event_code: Option<String>,
    /// The pixel (name or id) to send to; the default pixel otherwise.
    #[arg(long)]
    pub pixel: Option<String>,
    /// Queue only; do not wait for delivery.
    #[arg(long)]
    pub no_wait: bool,
}

/// `replay` flags.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Event ids to replay (repeatable).
    #[arg(long = "id")]
    pub ids: Vec<String>,
    /// Replay every dead event that matches the other filters.
    #[arg(long)]
    pub all: bool,
    /// Only events with this name.
    #[arg(long)]
    pub event_name: Option<String>,
    /// Only events whose last error contains this text.
    #[arg(long)]
    pub reason_contains: Option<String>,
    /// Instead: make every invalid inbox payload (queued by the database) pending again.
    #[arg(long, conflicts_with_all = ["ids", "all", "event_name", "reason_contains"])]
    pub inbox: bool,
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> ExitCode {
    let env = match Env::from_process(&PathBuf::from(".")) {
        Ok(env) => env,
        Err(problems) => return config_failure(&problems),
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Hash {
            field,
            value,
            country,
        } => hash(
            &field,
            &value,
            country.or_else(|| env.get("DEFAULT_COUNTRY")),
        ),
        command => {
            let config = match config::load(&env, cli.config.as_deref()) {
                Ok(config) => config,
                Err(problems) => return config_failure(&problems),
            };
            crate::telemetry::init(config.log_format);
            let result = match command {
                Command::Serve => serve(config).await,
                Command::Check => check(config).await,
                Command::Send(args) => send(config, *args).await,
                Command::Replay(args) => replay(config, args).await,
                Command::Migrate => migrate(config).await,
                Command::Rules(RulesCommand::Test { source, file }) => {
                    test_rules(config, &source, &file).await
                }
                Command::Hash { .. } => Ok(ExitCode::SUCCESS),
            };
            result.unwrap_or_else(|err| {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            })
        }
    }
}

async fn test_rules(config: Config, source: &str, file: &PathBuf) -> anyhow::Result<ExitCode> {
    let text = if file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        text
    } else {
        std::fs::read_to_string(file)
            .map_err(|err| anyhow::anyhow!("cannot read {}: {err}", file.display()))?
    };
    let payload: Value = serde_json::from_str(&text)
        .map_err(|err| anyhow::anyhow!("{} is not JSON: {err}", file.display()))?;
    let mapper = crate::sources::Mapper::new(
        config.sources.clone(),
        crate::sources::lookups_from(&config)?,
    );
    if mapper.source(source).is_none() {
        eprintln!(
            "no source named {source:?}: supabase and chatwoot always exist, others are declared under [sources.<name>]"
        );
        return Ok(ExitCode::from(2));
    }
    let result = mapper
        .preview(&config.ingest, source, &payload, now_ms() / 1000)
        .await;
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(
        if result["outcome"] == "parked" || result["outcome"] == "retry" {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        },
    )
}

fn config_failure(problems: &[String]) -> ExitCode {
    eprintln!("invalid configuration:");
    for problem in problems {
        eprintln!("  - {problem}");
    }
    ExitCode::from(2)
}

async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    if config.dry_run() {
        tracing::warn!(
            "dry-run: META_ACCESS_TOKEN and META_PIXEL_ID are not set, so events are validated, hashed and stored but never sent"
        );
    }
    if config.unauthenticated() {
        tracing::warn!(
            listen_addr = %config.listen_addr,
            "NO AUTHENTICATION: WEBHOOK_SECRET is not set; accepting unauthenticated requests because the address is loopback only"
        );
    }
    if config.has_weak_secret() {
        tracing::warn!("a WEBHOOK_SECRET is shorter than 16 characters; use a long random one (e.g. openssl rand -hex 24)");
    }
    if crate::tls::needs_proxy_in_front(config.listen_addr, config.tls.as_ref()) {
        tracing::warn!(
            listen_addr = %config.listen_addr,
            "listening beyond loopback without TLS: HTTPS must then be terminated by a proxy in front (or set TLS_CERT_FILE and TLS_KEY_FILE)"
        );
    }
    let app = App::build(config.clone()).await?;
    let pixels: Vec<String> = config
        .pixels
        .iter()
        .map(|p| format!("{} ({}, {})", p.name, p.pixel_id, p.api_version))
        .collect();
    tracing::info!(
        listen_addr = %app.local_addr()?,
        https = config.tls.is_some(),
        pixels = %pixels.join(", "),
        default_pixel = config.pixels.default_pixel().map(|p| p.name.as_str()),
        "capi-bridge listening"
    );
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: no new requests; finishing in-flight work");
        trigger.cancel();
    });
    app.run_until_stopped(shutdown).await?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

async fn check(config: Config) -> anyhow::Result<ExitCode> {
    println!("configuration: ok");
    println!("  listen address: {}", config.listen_addr);
    println!("  storage: {}", config::redact_url(&config.database_url));
    println!(
        "  authentication: {}",
        if config.unauthenticated() {
            "none (loopback only)".to_owned()
        } else {
            format!("{} webhook secret(s)", config.webhook_secrets.len())
        }
    );
    for source in &config.sources.sources {
        let mut auth = Vec::new();
        if source.url_token.is_some() {
            auth.push("URL token");
        }
        if source.signing_secret.is_some() {
            auth.push("Chatwoot signature");
        }
        if !config.unauthenticated() {
            auth.push("webhook secret");
        }
        println!(
            "  source {}: POST /v1/sources/{}, {} rule(s), accepts {}",
            source.name,
            source.name,
            config.sources.rules.count_for(&source.name),
            if auth.is_empty() {
                "anything (loopback only)".to_owned()
            } else {
                auth.join(", ")
            }
        );
    }
    if config.supabase.is_some() {
        println!("  supabase lookups: configured");
    }
    match &config.tls {
        Some(files) => match crate::tls::Tls::load(files.clone()) {
            Ok(_) => println!(
                "  https: {} with {} (reloaded on SIGHUP and when the files change)",
                files.cert.display(),
                files.key.display()
            ),
            Err(err) => {
                println!("https: FAILED: {err}");
                return Ok(ExitCode::FAILURE);
            }
        },
        None if crate::tls::needs_proxy_in_front(config.listen_addr, None) => {
            println!("  https: not here; a proxy in front must terminate TLS");
        }
        None => {}
    }
    match store::open(&config.database_url, &config.database_schema).await {
        Ok(_) => println!("storage: ok"),
        Err(err) => {
            println!("storage: FAILED: {err}");
            return Ok(ExitCode::FAILURE);
        }
    }
    if config.pixels.is_empty() {
        println!(
            "meta: dry-run (META_ACCESS_TOKEN and META_PIXEL_ID not set, no [pixels]); nothing will be sent"
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut all_ok = true;
    for meta in config.pixels.iter() {
        let client = GraphClient::new(&config, meta)?;
        match client.check_pixel().await {
            Ok(name) => println!(
                "meta: ok: pixel {} ({}): the token can reach {name} on {}",
                meta.name, meta.pixel_id, meta.api_version
            ),
            Err(err) => {
                all_ok = false;
                println!(
                    "meta: FAILED: pixel {} ({}): {}",
                    meta.name,
                    meta.pixel_id,
                    err.summary()
                );
            }
        }
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn hash(field: &str, value: &str, country: Option<String>) -> ExitCode {
    let Some(key) = HashedKey::parse(field) else {
        eprintln!(
            "unknown field {field:?}: use one of {}",
            HashedKey::ALL.map(HashedKey::as_str).join(", ")
        );
        return ExitCode::from(2);
    };
    let country = match country {
        Some(raw) => match normalize::country_code(&raw) {
            Some(code) => Some(code),
            None => {
                eprintln!("unknown country {raw:?}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    match normalize::prepare(key, value, &Context { country }) {
        Ok(Some(prepared)) => {
            match prepared.normalized {
                Some(normalized) => println!("normalized: {normalized}"),
                None => println!("normalized: (already hashed; sent as is)"),
            }
            println!("sha256:     {}", prepared.sent);
            ExitCode::SUCCESS
        }
        Ok(None) => {
            eprintln!("refused: the value is empty");
            ExitCode::FAILURE
        }
        Err(refusal) => {
            eprintln!("refused: {}", refusal.reason);
            ExitCode::FAILURE
        }
    }
}

fn event_from_args(args: &SendArgs) -> anyhow::Result<Value> {
    let Some(event_name) = &args.event_name else {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        return serde_json::from_str(&text).map_err(|err| {
            anyhow::anyhow!(
                "stdin is not JSON (line {}, column {}); pass --event-name or pipe an event object",
                err.line(),
                err.column()
            )
        });
    };
    let mut event = Map::new();
    event.insert("event_name".to_owned(), json!(event_name));
    let fields = [
        ("event_id", &args.event_id),
        ("email", &args.email),
        ("phone", &args.phone),
        ("first_name", &args.first_name),
        ("last_name", &args.last_name),
        ("country", &args.country),
        ("external_id", &args.external_id),
        ("currency", &args.currency),
        ("action_source", &args.action_source),
        ("event_source_url", &args.event_source_url),
    ];
    for (name, value) in fields {
        if let Some(value) = value {
            event.insert(name.to_owned(), json!(value));
        }
    }
    if let Some(value) = args.value {
        event.insert("value".to_owned(), json!(value));
    }
    Ok(Value::Object(event))
}

async fn send(config: Config, args: SendArgs) -> anyhow::Result<ExitCode> {
    let mut body = event_from_args(&args)?;
    if let Some(code) = &args.test_event_code {
        body = json!({ "data": [body], "test_event_code": code });
    }
    let store = store::open(&config.database_url, &config.database_schema).await?;
    let memory = MatchKeyMemory::start(store.clone(), config.match_key_memory_days);
    let ingestor = Ingestor::new(
        config.ingest.clone(),
        config.pixels.clone(),
        GroupCommit::start(store.clone(), now_ms, Vec::new()),
        Wakes::default(),
    )
    .with_memory(memory.clone());
    let route = Route::from("cli").to_pixel(args.pixel.as_deref());
    let report = match ingestor.ingest(body, now_ms() / 1000, &route).await {
        Ok(report) => {
            if let Some(memory) = &memory {
                // The event is stored; the memory is an enhancement.
                if let Err(err) = memory.flush().await {
                    eprintln!("warning: could not write the match-key memory: {err}");
                }
            }
            report
        }
        Err(IngestError::Invalid(problems)) => {
            eprintln!("refused:");
            for p in problems {
                eprintln!("  - {}: {}", p.field, p.reason);
            }
            return Ok(ExitCode::FAILURE);
        }
        Err(err) => return Err(err.into()),
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    let Some(receipt) = report.events.first() else {
        return Ok(ExitCode::SUCCESS);
    };
    if args.no_wait {
        return Ok(ExitCode::SUCCESS);
    }
    let stored = store.find_event(&receipt.event_id, now_ms()).await?;
    let Some(meta) = stored.and_then(|e| config.pixels.find(&e.pixel_id).cloned()) else {
        // Dry-run: stored, never sent.
        return Ok(ExitCode::SUCCESS);
    };
    // Deliver now through the same delivery code the server uses.
    let client = GraphClient::new(&config, &meta)?;
    let delivery = Delivery::new(
        store.clone(),
        client,
        config.delivery.clone(),
        Arc::new(Notify::new()),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        delivery.run_once().await?;
        let detail = store.find_event(&receipt.event_id, now_ms()).await?;
        let state = detail.as_ref().map(|d| d.state.clone()).unwrap_or_default();
        if state != "queued" && state != "delivering" || tokio::time::Instant::now() > deadline {
            println!("{}", serde_json::to_string_pretty(&detail)?);
            return Ok(if state == "delivered" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn replay(config: Config, args: ReplayArgs) -> anyhow::Result<ExitCode> {
    if args.inbox {
        let store = store::open(&config.database_url, &config.database_schema).await?;
        let n = store.requeue_invalid_inbox(now_ms()).await?;
        println!("{n} invalid inbox payload(s) made pending again; a running server processes them at once");
        return Ok(ExitCode::SUCCESS);
    }
    if args.ids.is_empty() && !args.all {
        eprintln!("say which dead events to replay: --id EVENT_ID (repeatable) or --all (with optional --event-name / --reason-contains), or --inbox for invalid inbox payloads");
        return Ok(ExitCode::from(2));
    }
    let store = store::open(&config.database_url, &config.database_schema).await?;
    let filter = ReplayFilter {
        event_ids: args.ids,
        event_name: args.event_name,
        reason_contains: args.reason_contains,
    };
    let n = store.requeue_dead(&filter, now_ms()).await?;
    println!("requeued {n} dead event(s); a running server delivers them within its poll interval");
    Ok(ExitCode::SUCCESS)
}

async fn migrate(config: Config) -> anyhow::Result<ExitCode> {
    store::open(&config.database_url, &config.database_schema).await?;
    println!(
        "storage migrated: {}",
        config::redact_url(&config.database_url)
    );
    Ok(ExitCode::SUCCESS)
}
