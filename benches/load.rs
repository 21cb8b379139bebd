//! Load harness: the real release binary, a real HTTP Graph API stand-in, and a load generator
//! on the same machine. Prints accepted events/s, ingest latency percentiles, delivered
//! events/s, Graph request count and batch size, the service's peak memory and the CPU split
//! between the service, the generator (and, on Postgres, the database server) and everything
//! else. On Postgres it can run several instances side by side (`BENCH_INSTANCES`).
//!
//! Run: `cargo bench --bench load` (cargo builds the release binary and passes its path).
//! Without `--bench` (as in `cargo test --benches`) it runs a one-second smoke check instead.
//!
//! Settings (environment variables):
//! - `BENCH_CONNECTIONS` (64): concurrent keep-alive HTTP/1.1 connections, one request in
//!   flight on each (a closed loop).
//! - `BENCH_SECONDS` (10): how long to send; ignored when `BENCH_EVENTS` is set.
//! - `BENCH_EVENTS`: send exactly this many events instead (capped at 10 minutes).
//! - `BENCH_GRAPH_LATENCY_MS` (150): how long the Graph stand-in takes to answer.
//! - `BENCH_CLIENT` (`raw`): `raw` (hand-written HTTP/1.1 over tokio sockets, the cheapest) or
//!   `reqwest` (pooled client).
//! - `BENCH_CLIENT_THREADS` (1): worker threads of the load generator.
//! - `BENCH_DRAIN_TIMEOUT_SECS` (120): how long to wait for delivery to finish after the load.
//! - `BENCH_SERVICE_ENV`: extra `KEY=VALUE` pairs for the service, comma-separated
//!   (e.g. `DELIVERY_MAX_IN_FLIGHT=8`).
//! - `BENCH_BIN`: another `capi-bridge` binary to measure (e.g. an experimental build).
//! - `BENCH_DB_DIR`: where the fresh database goes (default: cargo's target tmp directory, on
//!   the same disk as the build; never a tmpfs unless you say so). The service logs go there
//!   too, whatever the database.
//! - `BENCH_DATABASE` (`sqlite`): `sqlite` (a fresh file in `BENCH_DB_DIR`) or `postgres`: the
//!   service(s) then use `BENCH_POSTGRES_URL` (`postgres://postgres@127.0.0.1:5432/test`, which
//!   must name 127.0.0.1, localhost or ::1) with a fresh schema `bench_<hex>`
//!   (`DATABASE_SCHEMA`), dropped with `psql` once every instance has exited. `psql` must be on
//!   the PATH; `bash scripts/test-services` starts a local Postgres.
//! - `BENCH_INSTANCES` (1): with `postgres`, start this many copies of the binary on the one
//!   schema, each on its own port; the generator spreads its connections over them
//!   round-robin. Refused with SQLite (one process owns the file).
//! - `BENCH_NO_DELIVERY=1`: start the service without Meta credentials (dry-run) to measure
//!   ingest alone; delivery figures are then skipped.
//! - `BENCH_SOURCE=supabase`: send Supabase database-webhook payloads (a `leads` INSERT) to
//!   `POST /v1/sources/supabase` instead, mapped to Lead events by a rule: measures the source
//!   path (stored in the inbox before the answer, then mapped and ingested by the inbox worker).
//! - `BENCH_PREFILL` (0): write this many delivered events into the fresh database by SQL
//!   before the service starts (received over the last 30 days, without payload rows; the
//!   kept counts filled as migration 9 fills them), e.g. `10000000` for a month of a large
//!   shop. The run then also probes, every 1.1 s during the load (so each probe misses the
//!   one-second snapshot), `GET /readyz`, `GET /metrics` and the dashboard overview's store
//!   reads (stats, the two activity charts, the latest errors) and prints their latencies.
//! - `BENCH_KEEP_DB=1`: keep the database (the Postgres schema) and the service logs.
//! - `BENCH_ENFORCE=1`: exit 1 when a target (15,000 events/s, p99 < 20 ms, delivery keeping
//!   up) is missed. Lost events, non-202 answers or an unclean exit (of any instance) always
//!   fail.
//!
//! Only 127.0.0.1 is ever contacted.

#[path = "../tests/support/graph_stand_in.rs"]
mod graph_stand_in;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use graph_stand_in::GraphStandIn;

const TOKEN: &str = "EAAB-bench-token";
const PIXEL: &str = "1234567890";
const SECRET: &str = "bench-webhook-secret-0123456789";

/// The issue's targets.
const TARGET_EVENTS_PER_SEC: f64 = 15_000.0;
const TARGET_P99_MS: f64 = 20.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientKind {
    Raw,
    Reqwest,
}

/// Where the service(s) keep their queue.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Database {
    /// A fresh file in `db_dir`.
    Sqlite,
    /// A fresh schema in this database.
    Postgres { url: String },
}

#[derive(Debug, Clone)]
struct Settings {
    mode: &'static str,
    smoke: bool,
    connections: usize,
    seconds: f64,
    events: Option<u64>,
    graph_latency: Duration,
    client: ClientKind,
    client_threads: usize,
    drain_timeout: Duration,
    service_env: Vec<(String, String)>,
    bin: PathBuf,
    db_dir: PathBuf,
    keep_db: bool,
    enforce: bool,
    no_delivery: bool,
    database: Database,
    instances: usize,
    prefill: u64,
    supabase_source: bool,
}

/// The rule `BENCH_SOURCE=supabase` runs the payloads through.
const BENCH_RULES: &str = r#"
[[rules]]
name = "bench-lead"
source = "supabase"
when = 'type == "INSERT" && table == "leads"'
event = "Lead"
[rules.fields]
event_id = "record.ref"
email = "record.email"
phone = "record.phone"
event_time = "record.created_at"
custom_data.source = '"Landing Page"'
"#;

fn env_or<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(raw) if !raw.trim().is_empty() => raw
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {raw:?}")),
        _ => default,
    }
}

fn env_flag(name: &str) -> bool {
    matches!(
        std::env::var(name).as_deref().map(str::trim),
        Ok("1" | "true" | "yes")
    )
}

impl Settings {
    fn from_env(bench: bool) -> Self {
        // Without --bench (cargo test --benches) this is a quick check that the harness works.
        let (mode, connections, seconds, latency_ms) = if bench {
            ("benchmark", 64, 10.0, 150)
        } else {
            (
                "smoke check (not a benchmark: run `cargo bench --bench load`)",
                8,
                1.0,
                20,
            )
        };
        let client = match std::env::var("BENCH_CLIENT").as_deref().map(str::trim) {
            Ok("reqwest") => ClientKind::Reqwest,
            Ok("raw" | "") | Err(_) => ClientKind::Raw,
            Ok(other) => panic!("BENCH_CLIENT must be raw or reqwest, got {other:?}"),
        };
        let service_env = std::env::var("BENCH_SERVICE_ENV")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (k, v) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("BENCH_SERVICE_ENV: {pair:?} is not KEY=VALUE"));
                (k.trim().to_owned(), v.trim().to_owned())
            })
            .collect();
        let bin = std::env::var_os("BENCH_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_capi-bridge")));
        let db_dir = std::env::var_os("BENCH_DB_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
        let database = match std::env::var("BENCH_DATABASE").as_deref().map(str::trim) {
            Ok("sqlite" | "") | Err(_) => Database::Sqlite,
            Ok("postgres" | "postgresql") => {
                let url = std::env::var("BENCH_POSTGRES_URL")
                    .ok()
                    .map(|u| u.trim().to_owned())
                    .filter(|u| !u.is_empty())
                    .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned());
                assert!(
                    postgres_url_is_local(&url),
                    "BENCH_POSTGRES_URL must be a postgres:// URL on 127.0.0.1, localhost or \
                     [::1] (the harness contacts nothing else), got {url:?}"
                );
                Database::Postgres { url }
            }
            Ok(other) => panic!("BENCH_DATABASE must be sqlite or postgres, got {other:?}"),
        };
        Self {
            mode,
            smoke: !bench,
            connections: env_or("BENCH_CONNECTIONS", connections).max(1),
            seconds: env_or("BENCH_SECONDS", seconds),
            events: std::env::var("BENCH_EVENTS")
                .ok()
                .filter(|s| !s.trim().is_empty())
                .map(|_| env_or("BENCH_EVENTS", 0u64)),
            graph_latency: Duration::from_millis(env_or("BENCH_GRAPH_LATENCY_MS", latency_ms)),
            client,
            client_threads: env_or("BENCH_CLIENT_THREADS", 1usize).max(1),
            drain_timeout: Duration::from_secs(env_or("BENCH_DRAIN_TIMEOUT_SECS", 120)),
            service_env,
            bin,
            db_dir,
            keep_db: env_flag("BENCH_KEEP_DB"),
            supabase_source: match std::env::var("BENCH_SOURCE").as_deref().map(str::trim) {
                Ok("supabase") => true,
                Ok("") | Err(_) => false,
                Ok(other) => panic!("BENCH_SOURCE must be supabase, got {other:?}"),
            },
            enforce: env_flag("BENCH_ENFORCE"),
            no_delivery: env_flag("BENCH_NO_DELIVERY"),
            database,
            instances: env_or("BENCH_INSTANCES", 1usize).max(1),
            prefill: env_or("BENCH_PREFILL", 0u64),
        }
    }
}

/// Whether a Postgres URL names this machine (by address or `localhost`).
fn postgres_url_is_local(url: &str) -> bool {
    let Some(rest) = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
    else {
        return false;
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if host_port.starts_with('[') {
        host_port.split_inclusive(']').next().unwrap_or_default()
    } else {
        host_port.split(':').next().unwrap_or_default()
    };
    matches!(host, "127.0.0.1" | "localhost" | "[::1]")
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let settings = Settings::from_env(bench);
    if settings.instances > 1 && settings.database == Database::Sqlite {
        eprintln!(
            "load: BENCH_INSTANCES={} needs BENCH_DATABASE=postgres: a SQLite file belongs to one \
             process",
            settings.instances
        );
        std::process::exit(2);
    }
    // The stand-in gets its own thread so that its CPU time can be told apart from the
    // generator's in /proc.
    let stand_in_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("graph-stand-in")
        .enable_all()
        .build()
        .expect("stand-in runtime");
    let graph = stand_in_rt.block_on(GraphStandIn::start(TOKEN, PIXEL));
    graph.set_latency(settings.graph_latency);
    let load_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.client_threads)
        .thread_name("load-gen")
        .enable_all()
        .build()
        .expect("load generator runtime");
    let code = load_rt.block_on(run(&settings, &graph));
    drop(load_rt);
    drop(stand_in_rt);
    std::process::exit(code);
}

// ---------------------------------------------------------------------------------------------
// The service as a child process.

/// The child process; killed if the harness fails before stopping it properly.
struct Service {
    child: Option<Child>,
    pid: u32,
    addr: SocketAddr,
    log: PathBuf,
    spawned: Instant,
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on 127.0.0.1")
        .port()
}

/// A fresh Postgres schema for the run, dropped (with `psql`) when this goes out of scope
/// unless it is to be kept. Declared before the services, so that it is dropped after them:
/// only once every instance has exited.
struct PgSchema {
    url: String,
    name: String,
    keep: bool,
    dropped: bool,
}

impl PgSchema {
    fn new(url: &str, keep: bool) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Self {
            url: url.to_owned(),
            name: format!("bench_{:x}{:x}", std::process::id(), nanos & 0xffff_ffff),
            keep,
            dropped: false,
        }
    }

    /// Drops the schema now (unless kept): "dropped after the run", "kept", or the failure.
    fn finish(&mut self) -> String {
        if self.keep {
            return "kept: BENCH_KEEP_DB=1".to_owned();
        }
        self.dropped = true;
        match psql(
            &self.url,
            &format!("drop schema if exists \"{}\" cascade", self.name),
        ) {
            Ok(_) => "dropped after the run".to_owned(),
            Err(e) => format!("NOT dropped: {e}"),
        }
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        if !self.dropped && !self.keep {
            let _ = self.finish();
        }
    }
}

/// One statement through `psql`; its unaligned output.
fn psql(url: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([
            url,
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// The server's version and durability settings, and the file system its data is on.
fn postgres_facts(url: &str) -> Result<String, String> {
    let show = |name: &str| psql(url, &format!("show {name}"));
    let version = show("server_version")?;
    let data_fs =
        show("data_directory").map_or_else(|_| "?".to_owned(), |d| fs_type(Path::new(&d)));
    Ok(format!(
        "server {version} on {data_fs}, synchronous_commit={}, fsync={}",
        show("synchronous_commit")?,
        show("fsync")?
    ))
}

fn start_service(
    settings: &Settings,
    graph: &GraphStandIn,
    dir: &Path,
    schema: Option<&PgSchema>,
    instance: usize,
) -> Service {
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let db = dir.join("capi-bridge.db");
    let log = if settings.instances == 1 {
        dir.join("service.log")
    } else {
        dir.join(format!("service-{}.log", instance + 1))
    };
    let log_file = std::fs::File::create(&log).expect("service log file");
    let mut command = Command::new(&settings.bin);
    command.env_clear();
    if !settings.no_delivery {
        command
            .env("META_ACCESS_TOKEN", TOKEN)
            .env("META_PIXEL_ID", PIXEL);
    }
    match (&settings.database, schema) {
        (Database::Postgres { url }, Some(schema)) => command
            .env("DATABASE_URL", url)
            .env("DATABASE_SCHEMA", &schema.name),
        _ => command.env("DATABASE_URL", format!("sqlite://{}", db.display())),
    };
    if settings.supabase_source {
        let rules = dir.join("bench-rules.toml");
        std::fs::write(&rules, BENCH_RULES).expect("bench rules");
        command.env("RULES_FILE", rules);
    }
    command
        .arg("serve")
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::var_os("HOME").unwrap_or_default())
        .env("LISTEN_ADDR", addr.to_string())
        .env("META_GRAPH_URL", &graph.url)
        .env("WEBHOOK_SECRET", SECRET)
        // Logging every request would dominate the measurement.
        .env("RUST_LOG", "warn")
        .envs(settings.service_env.iter().map(|(k, v)| (k, v)))
        // No .env files from the working tree: the service reads them from its directory.
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("log file"))
        .stderr(log_file);
    let spawned = Instant::now();
    let child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", settings.bin.display()));
    Service {
        pid: child.id(),
        child: Some(child),
        addr,
        log,
        spawned,
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits for `/healthz`; how long after the spawn the service answered.
async fn wait_healthy(service: &mut Service) -> Result<Duration, String> {
    let started = service.spawned;
    let deadline = started + Duration::from_secs(60);
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        service.addr
    );
    loop {
        if let Some(child) = &mut service.child {
            if let Ok(Some(status)) = child.try_wait() {
                service.child = None;
                return Err(format!(
                    "the service exited before becoming healthy ({status}):\n{}",
                    log_tail(&service.log, 30)
                ));
            }
        }
        if let Ok(mut conn) = RawConn::connect(service.addr).await {
            if let Ok((200, _)) = conn.exchange(request.as_bytes()).await {
                return Ok(started.elapsed());
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "/healthz did not answer 200 within 60 s:\n{}",
                log_tail(&service.log, 30)
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGTERM, then wait (bounded) for the exit status.
fn stop_service(service: &mut Service) -> (Option<ExitStatus>, Duration) {
    let Some(mut child) = service.child.take() else {
        return (None, Duration::ZERO);
    };
    let started = Instant::now();
    let _ = Command::new("kill")
        .args(["-TERM", &service.pid.to_string()])
        .status();
    let deadline = started + Duration::from_secs(30);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return (Some(status), started.elapsed()),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return (None, started.elapsed());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// /proc readings.

fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// utime + stime, in clock ticks, from a `/proc/.../stat` file.
fn stat_ticks(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let after_comm = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU ticks per thread, keyed by thread id, with the thread's name.
fn thread_ticks(pid: &str) -> BTreeMap<String, (String, u64)> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        if let Some(ticks) = stat_ticks(&path.join("stat")) {
            out.insert(
                task.file_name().to_string_lossy().into_owned(),
                (name, ticks),
            );
        }
    }
    out
}

/// Busy and total ticks of the whole machine, from `/proc/stat`.
fn machine_ticks() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is included in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// CPU ticks per process whose name is `postgres` (the server and its backends), keyed by pid.
fn postgres_ticks() -> BTreeMap<String, (String, u64)> {
    let mut out = BTreeMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in procs.flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let path = entry.path();
        let is_postgres =
            std::fs::read_to_string(path.join("comm")).is_ok_and(|c| c.trim() == "postgres");
        if let (true, Some(ticks)) = (is_postgres, stat_ticks(&path.join("stat"))) {
            out.insert(pid, ("postgres".to_owned(), ticks));
        }
    }
    out
}

struct CpuSnapshot {
    /// Per instance: thread id => (name, ticks).
    service: Vec<BTreeMap<String, (String, u64)>>,
    harness: BTreeMap<String, (String, u64)>,
    /// Postgres processes (only with `BENCH_DATABASE=postgres`).
    postgres: BTreeMap<String, (String, u64)>,
    machine: (u64, u64),
}

fn cpu_snapshot(service_pids: &[u32], postgres: bool) -> CpuSnapshot {
    CpuSnapshot {
        service: service_pids
            .iter()
            .map(|pid| thread_ticks(&pid.to_string()))
            .collect(),
        harness: thread_ticks("self"),
        postgres: if postgres {
            postgres_ticks()
        } else {
            BTreeMap::new()
        },
        machine: machine_ticks(),
    }
}

/// Ticks spent between two snapshots, grouped by thread name (threads that came and went
/// count from zero).
fn ticks_by_name(
    before: &BTreeMap<String, (String, u64)>,
    after: &BTreeMap<String, (String, u64)>,
) -> BTreeMap<String, (u64, usize)> {
    let mut out: BTreeMap<String, (u64, usize)> = BTreeMap::new();
    for (tid, (name, ticks)) in after {
        let base = before.get(tid).map_or(0, |(_, t)| *t);
        let entry = out.entry(name.clone()).or_default();
        entry.0 += ticks.saturating_sub(base);
        entry.1 += 1;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The load generator.

/// One keep-alive HTTP/1.1 connection with one request in flight, written by hand: much
/// cheaper per request than a general-purpose client, which matters when the generator shares
/// two cores with the service.
struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    async fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        assert!(
            addr.ip().is_loopback(),
            "the harness only talks to 127.0.0.1"
        );
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(8192),
        })
    }

    /// Sends one request and reads one response: (status, body).
    async fn exchange(&mut self, request: &[u8]) -> std::io::Result<(u16, &[u8])> {
        self.stream.write_all(request).await?;
        self.buf.clear();
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
        loop {
            if let Some(head_end) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..head_end]).map_err(|_| bad("head"))?;
                let mut lines = head.split("\r\n");
                let status: u16 = lines
                    .next()
                    .and_then(|l| l.split(' ').nth(1))
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| bad("status line"))?;
                let mut length = 0usize;
                for line in lines {
                    let Some((name, value)) = line.split_once(':') else {
                        continue;
                    };
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse().map_err(|_| bad("content-length"))?;
                    } else if name.eq_ignore_ascii_case("transfer-encoding") {
                        return Err(bad("chunked responses are not supported"));
                    }
                }
                let total = head_end + 4 + length;
                while self.buf.len() < total {
                    if self.stream.read_buf(&mut self.buf).await? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                }
                return Ok((status, &self.buf[head_end + 4..total]));
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The seed example with a unique id, email and phone.
fn seed_body(prefix: &str, i: u64) -> String {
    format!(
        concat!(
            r#"{{"event_name":"Lead","event_id":"{prefix}-{i}","email":"user{i}@example.com","#,
            r#""phone":"+1650555{phone:04}","event_time":{now},"#,
            r#""custom_data":{{"source":"Landing Page","campaign":"Test Campaign"}}}}"#
        ),
        prefix = prefix,
        i = i,
        phone = i % 10_000,
        now = unix_now()
    )
}

/// A Supabase database webhook body for a new `leads` row (see `BENCH_RULES`).
fn supabase_body(prefix: &str, i: u64) -> String {
    format!(
        concat!(
            r#"{{"type": "INSERT", "table": "leads", "record": {{"ref": "{prefix}-{i}", "email": "user{i}@example.com", "#,
            r#""phone": "+1650555{phone:04}", "status": "new", "created_at": {now}}}, "schema": "public", "old_record": null}}"#
        ),
        prefix = prefix,
        i = i,
        phone = i % 10_000,
        now = unix_now()
    )
}

impl Load {
    fn body(&self, i: u64) -> String {
        if self.supabase_source {
            supabase_body(&self.prefix, i)
        } else {
            seed_body(&self.prefix, i)
        }
    }

    fn path(&self) -> &'static str {
        if self.supabase_source {
            "/v1/sources/supabase"
        } else {
            "/v1/events"
        }
    }
}

#[derive(Default)]
struct WorkerStats {
    latencies_us: Vec<u32>,
    acked: Vec<u64>,
    statuses: BTreeMap<u16, u64>,
    io_errors: u64,
    first_ack: Option<Instant>,
    samples: Vec<String>,
}

impl WorkerStats {
    fn record(&mut self, i: u64, started: Instant, status: u16, body: &[u8]) {
        let now = Instant::now();
        let us = now.duration_since(started).as_micros();
        self.latencies_us
            .push(u32::try_from(us).unwrap_or(u32::MAX));
        *self.statuses.entry(status).or_default() += 1;
        if status == 202 {
            self.acked.push(i);
            self.first_ack.get_or_insert(now);
        } else if self.samples.len() < 3 {
            self.samples.push(format!(
                "{status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            ));
        }
    }
}

struct Load {
    prefix: String,
    next: AtomicU64,
    limit: u64,
    deadline: Instant,
    acked: AtomicU64,
    supabase_source: bool,
}

impl Load {
    /// The next event index, or None when the load is over.
    fn take(&self) -> Option<u64> {
        if Instant::now() >= self.deadline {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        (i < self.limit).then_some(i)
    }
}

async fn raw_worker(load: Arc<Load>, addr: SocketAddr) -> WorkerStats {
    let mut stats = WorkerStats::default();
    let mut conn: Option<RawConn> = None;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {SECRET}\r\nContent-Type: application/json\r\nContent-Length: ",
        load.path()
    );
    let mut request = Vec::with_capacity(1024);
    while let Some(i) = load.take() {
        let body = load.body(i);
        request.clear();
        request.extend_from_slice(head.as_bytes());
        request.extend_from_slice(format!("{}\r\n\r\n", body.len()).as_bytes());
        request.extend_from_slice(body.as_bytes());
        let started = Instant::now();
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match RawConn::connect(addr).await {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    stats.io_errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        match c.exchange(&request).await {
            Ok((status, body)) => {
                if status == 202 {
                    load.acked.fetch_add(1, Ordering::Relaxed);
                }
                stats.record(i, started, status, body);
            }
            Err(_) => {
                stats.io_errors += 1;
                conn = None;
            }
        }
    }
    stats
}

async fn reqwest_worker(load: Arc<Load>, client: reqwest::Client, addr: SocketAddr) -> WorkerStats {
    let mut stats = WorkerStats::default();
    let url = format!("http://{addr}{}", load.path());
    while let Some(i) = load.take() {
        let body = load.body(i);
        let started = Instant::now();
        let sent = client
            .post(&url)
            .bearer_auth(SECRET)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        let answer = match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                response.bytes().await.map(|b| (status, b))
            }
            Err(e) => Err(e),
        };
        match answer {
            Ok((status, body)) => {
                if status == 202 {
                    load.acked.fetch_add(1, Ordering::Relaxed);
                }
                stats.record(i, started, status, &body);
            }
            Err(_) => stats.io_errors += 1,
        }
    }
    stats
}

/// (seconds since start, events acknowledged, events delivered)
type Sample = (f64, u64, u64);

fn sample(t0: Instant, load: &Load, graph: &GraphStandIn) -> Sample {
    (
        t0.elapsed().as_secs_f64(),
        load.acked.load(Ordering::Relaxed),
        graph.accepted_count() as u64,
    )
}

// ---------------------------------------------------------------------------------------------
// A large event log (BENCH_PREFILL).

/// Writes `settings.prefill` delivered events by SQL, a million per statement, into the
/// migrated (fresh) database, and the kept counts for them; then `analyze`.
async fn prefill(
    settings: &Settings,
    dir: &Path,
    schema: Option<&PgSchema>,
) -> Result<Duration, String> {
    const DAY: i64 = 24 * 60 * 60 * 1000;
    const SLICE: i64 = 1_000_000;
    let started = Instant::now();
    let total = i64::try_from(settings.prefill).map_err(|e| e.to_string())?;
    let now = i64::try_from(unix_now()).map_err(|e| e.to_string())? * 1000;
    // Received over the 30 days before the last minute, oldest first.
    let first = now - 30 * DAY;
    let step = ((30 * DAY - 60_000) / total).max(1);
    let (url, prefix, series) = match (&settings.database, schema) {
        (Database::Postgres { url }, Some(schema)) => (
            url.clone(),
            format!("\"{}\".", schema.name),
            "generate_series(FROM::int8, TO::int8) as g(i)",
        ),
        _ => (
            format!("sqlite://{}", dir.join("capi-bridge.db").display()),
            String::new(),
            "(with recursive g(i) as (select FROM union all select i + 1 from g where i < TO)
              select i from g) as g",
        ),
    };
    // The service's own migrations, applied here first.
    let store = capi_bridge::store::open(&url, schema.map_or("capi_bridge", |s| s.name.as_str()))
        .await
        .map_err(|e| e.to_string())?;
    drop(store);
    let mut statements = Vec::new();
    let mut from = 1;
    while from <= total {
        let to = (from + SLICE - 1).min(total);
        statements.push(format!(
            "insert into {prefix}event (pixel_id, event_id, event_name, state, attempts,
                 next_attempt_at, deadline_at, received_at, updated_at, delivered_at, source)
             select '{PIXEL}', 'prefill-' || i, 'Lead', 'delivered', 1, t, t, t, t + 200,
                 t + 200, 'api'
             from (select i, {first} + i * {step} as t from {series}) as s",
            series = series
                .replace("FROM", &from.to_string())
                .replace("TO", &to.to_string())
        ));
        from = to + 1;
    }
    let tally = format!("{prefix}event_tally");
    let event = format!("{prefix}event");
    statements.push(format!(
        "insert into {tally} (bucket, pixel_id, state, shard, n)
         select 0, pixel_id, state, 0, count(*) from {event} group by pixel_id, state"
    ));
    statements.push(format!(
        "insert into {tally} (bucket, pixel_id, state, shard, n)
         select received_at - received_at % 300000, '', 'accepted', 0, count(*) from {event}
         group by 1"
    ));
    statements.push(format!(
        "insert into {tally} (bucket, pixel_id, state, shard, n)
         select delivered_at - delivered_at % 300000, '', 'delivered', 0, count(*) from {event}
         where state = 'delivered' group by 1"
    ));
    statements.push(format!(
        "analyze {}",
        if prefix.is_empty() {
            String::new()
        } else {
            event.clone()
        }
    ));
    if schema.is_some() {
        for sql in &statements {
            psql(&url, sql)?;
        }
    } else {
        use sqlx::{Connection, Executor};
        let mut conn = sqlx::SqliteConnection::connect(&url)
            .await
            .map_err(|e| e.to_string())?;
        for sql in &statements {
            conn.execute(sql.as_str())
                .await
                .map_err(|e| e.to_string())?;
        }
        conn.execute("pragma wal_checkpoint(truncate)")
            .await
            .map_err(|e| e.to_string())?;
        conn.close().await.map_err(|e| e.to_string())?;
    }
    Ok(started.elapsed())
}

/// Every 1.1 s until `until`: how long `GET /readyz` and `GET /metrics` take, and the store
/// reads of the dashboard's overview (through a store of its own on the same database).
async fn probe_health(
    store: Arc<dyn capi_bridge::store::Store>,
    addr: SocketAddr,
    until: Instant,
) -> Vec<(&'static str, Vec<Duration>)> {
    const FIVE_MINUTES: i64 = 5 * 60 * 1000;
    const HOUR: i64 = 60 * 60 * 1000;
    let http = reqwest::Client::new();
    let mut readyz = Vec::new();
    let mut metrics = Vec::new();
    let mut overview = Vec::new();
    while Instant::now() + Duration::from_millis(1100) < until {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        for (path, times) in [("/readyz", &mut readyz), ("/metrics", &mut metrics)] {
            let started = Instant::now();
            let ok = http
                .get(format!("http://{addr}{path}"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                times.push(started.elapsed());
            }
        }
        let now = i64::try_from(unix_now()).unwrap_or(0) * 1000;
        let started = Instant::now();
        let read = async {
            store.stats().await?;
            let hour_start = (now.div_euclid(FIVE_MINUTES) - 11) * FIVE_MINUTES;
            store.activity(hour_start, FIVE_MINUTES, 12).await?;
            store
                .activity((now.div_euclid(HOUR) - 23) * HOUR, HOUR, 24)
                .await?;
            store.recent_errors(10).await
        };
        if read.await.is_ok() {
            overview.push(started.elapsed());
        }
    }
    vec![
        ("GET /readyz", readyz),
        ("GET /metrics", metrics),
        ("overview reads", overview),
    ]
}

// ---------------------------------------------------------------------------------------------
// The run.

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1]) / 1000.0
}

fn fs_type(path: &Path) -> String {
    Command::new("df")
        .arg("--output=fstype")
        .arg(path)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().last().map(|l| l.trim().to_owned()))
        .unwrap_or_else(|| "?".to_owned())
}

/// Removes terminal colour codes from a log line.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters, then a final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn git(args: &[&str]) -> Option<String> {
    Command::new("git")
        .arg("-C")
        .arg(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
}

/// The commit the default binary was built from, and whether src/ had local changes.
fn source_version() -> String {
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".to_owned());
    match git(&["status", "--porcelain", "--", "src", "migrations"]) {
        Some(changes) if !changes.is_empty() => format!("{commit} + uncommitted changes in src/"),
        _ => commit,
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (k, c) in s.chars().enumerate() {
        if k > 0 && (s.len() - k) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn rate(n: u64, secs: f64) -> String {
    if secs <= 0.0 {
        return "-".to_owned();
    }
    thousands((n as f64 / secs).round() as u64)
}

#[allow(clippy::too_many_lines)]
async fn run(settings: &Settings, graph: &GraphStandIn) -> i32 {
    let load_before = load_average();
    std::fs::create_dir_all(&settings.db_dir).expect("database directory");
    let dir = tempfile::Builder::new()
        .prefix("capi-bridge-load-")
        .tempdir_in(&settings.db_dir)
        .expect("temp dir");
    // Declared before the services, so that it is dropped after them (see `PgSchema`).
    let (mut schema, postgres) = match &settings.database {
        Database::Sqlite => (None, String::new()),
        Database::Postgres { url } => match postgres_facts(url) {
            Ok(facts) => (Some(PgSchema::new(url, settings.keep_db)), facts),
            Err(e) => {
                eprintln!("load: cannot reach Postgres at {url} with psql: {e}");
                return 1;
            }
        },
    };
    if settings.prefill > 0 {
        match prefill(settings, dir.path(), schema.as_ref()).await {
            Ok(took) => println!(
                "prefilled {} delivered events in {:.1} s",
                settings.prefill,
                took.as_secs_f64()
            ),
            Err(e) => {
                eprintln!("load: prefill: {e}");
                return 1;
            }
        }
    }
    let mut services: Vec<Service> = (0..settings.instances)
        .map(|k| start_service(settings, graph, dir.path(), schema.as_ref(), k))
        .collect();
    let mut startups = Vec::with_capacity(services.len());
    for (k, service) in services.iter_mut().enumerate() {
        match wait_healthy(service).await {
            Ok(d) => startups.push(d),
            Err(e) if settings.instances == 1 => {
                eprintln!("load: {e}");
                return 1;
            }
            Err(e) => {
                eprintln!("load: instance {}: {e}", k + 1);
                return 1;
            }
        }
    }
    let pids: Vec<u32> = services.iter().map(|s| s.pid).collect();
    let addrs: Vec<SocketAddr> = services.iter().map(|s| s.addr).collect();

    // ---- load window
    let duration = if settings.events.is_some() {
        Duration::from_secs(600)
    } else {
        Duration::from_secs_f64(settings.seconds)
    };
    let cpu0 = cpu_snapshot(&pids, schema.is_some());
    let t0 = Instant::now();
    let load = Arc::new(Load {
        prefix: format!("load-{}-{}", std::process::id(), unix_now()),
        next: AtomicU64::new(0),
        limit: settings.events.unwrap_or(u64::MAX),
        deadline: t0 + duration,
        acked: AtomicU64::new(0),
        supabase_source: settings.supabase_source,
    });
    let samples = Arc::new(Mutex::new(vec![(0.0, 0, 0)]));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (load, graph, samples, sampling) = (
            load.clone(),
            graph.clone(),
            samples.clone(),
            sampling.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::from_std(t0 + Duration::from_secs(1)),
                Duration::from_secs(1),
            );
            while sampling.load(Ordering::Relaxed) {
                tick.tick().await;
                let s = sample(t0, &load, &graph);
                samples.lock().unwrap_or_else(|e| e.into_inner()).push(s);
            }
        })
    };
    let reqwest_client = reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(settings.connections)
        .build()
        .expect("reqwest client");
    let probes = if settings.prefill > 0 {
        let url = match &settings.database {
            Database::Postgres { url } => url.clone(),
            Database::Sqlite => format!("sqlite://{}", dir.path().join("capi-bridge.db").display()),
        };
        let name = schema.as_ref().map_or("capi_bridge", |s| s.name.as_str());
        let store = capi_bridge::store::open(&url, name)
            .await
            .expect("probe store");
        Some(tokio::spawn(probe_health(store, addrs[0], t0 + duration)))
    } else {
        None
    };
    // Connection k goes to instance k mod N.
    let workers: Vec<_> = (0..settings.connections)
        .map(|k| {
            let addr = addrs[k % addrs.len()];
            match settings.client {
                ClientKind::Raw => tokio::spawn(raw_worker(load.clone(), addr)),
                ClientKind::Reqwest => {
                    tokio::spawn(reqwest_worker(load.clone(), reqwest_client.clone(), addr))
                }
            }
        })
        .collect();
    let mut stats = WorkerStats::default();
    let mut acked_per_instance = vec![0u64; addrs.len()];
    for (k, worker) in workers.into_iter().enumerate() {
        let s = worker.await.expect("load worker");
        acked_per_instance[k % addrs.len()] += s.acked.len() as u64;
        stats.latencies_us.extend(s.latencies_us);
        stats.acked.extend(s.acked);
        for (status, n) in s.statuses {
            *stats.statuses.entry(status).or_default() += n;
        }
        stats.io_errors += s.io_errors;
        stats.first_ack = match (stats.first_ack, s.first_ack) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        stats.samples.extend(s.samples);
    }
    let t_end = Instant::now();
    let probed = match probes {
        Some(task) => Some(task.await.expect("health probes")),
        None => None,
    };
    let delivered_at_end = graph.accepted_count() as u64;
    let cpu1 = cpu_snapshot(&pids, schema.is_some());
    let load_secs = t_end.duration_since(t0).as_secs_f64();
    let load_after = load_average();

    // ---- drain: every acknowledged event must reach the stand-in
    let acked = stats.acked.len() as u64;
    let drain_deadline = t_end + settings.drain_timeout;
    let drained_at = loop {
        if settings.no_delivery || graph.accepted_count() as u64 >= acked {
            break Some(Instant::now());
        }
        if Instant::now() > drain_deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    let mut samples = samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
    samples.push(sample(t0, &load, graph));

    // ---- service memory and exit, then the schema (once no instance uses it)
    let peak_rss_kib: Vec<Option<u64>> = pids
        .iter()
        .map(|pid| proc_status_kib(*pid, "VmHWM"))
        .collect();
    let rss_kib: Vec<Option<u64>> = pids
        .iter()
        .map(|pid| proc_status_kib(*pid, "VmRSS"))
        .collect();
    let exits: Vec<(Option<ExitStatus>, Duration)> =
        services.iter_mut().map(stop_service).collect();
    let schema_outcome = schema.as_mut().map(PgSchema::finish);
    let all_exited_0 = exits.iter().all(|(e, _)| e.is_some_and(|s| s.success()));

    // ---- what the stand-in saw
    let requests = graph.requests();
    let batch_sizes: Vec<usize> = requests
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.body["data"].as_array().map_or(0, Vec::len))
        .collect();
    let graph_errors = requests.iter().filter(|r| r.status != 200).count();
    let first_delivery = requests
        .iter()
        .find(|r| r.status == 200)
        .map(|r| r.at + settings.graph_latency);
    drop(requests);
    let delivered_events = graph.accepted();
    let delivered_total = delivered_events.len() as u64;
    let prefix = format!("{}-", load.prefix);
    let delivered_ids: HashSet<u64> = delivered_events
        .iter()
        .filter_map(|e| e["event_id"].as_str()?.strip_prefix(&prefix)?.parse().ok())
        .collect();
    drop(delivered_events);
    let lost = if settings.no_delivery {
        0
    } else {
        stats
            .acked
            .iter()
            .filter(|i| !delivered_ids.contains(i))
            .count()
    };
    let duplicates = delivered_total.saturating_sub(delivered_ids.len() as u64);

    // ---- report
    let mut lat = std::mem::take(&mut stats.latencies_us);
    lat.sort_unstable();
    let sent = lat.len() as u64 + stats.io_errors;
    let non_202: u64 = stats
        .statuses
        .iter()
        .filter(|(s, _)| **s != 202)
        .map(|(_, n)| n)
        .sum();
    let ticks = clock_ticks_per_sec();
    let pct = |t: u64| 100.0 * t as f64 / ticks / load_secs;
    let per_instance_cpu: Vec<BTreeMap<String, (u64, usize)>> = cpu0
        .service
        .iter()
        .zip(&cpu1.service)
        .map(|(a, b)| ticks_by_name(a, b))
        .collect();
    let mut service_cpu: BTreeMap<String, (u64, usize)> = BTreeMap::new();
    for instance in &per_instance_cpu {
        for (name, (t, n)) in instance {
            let entry = service_cpu.entry(name.clone()).or_default();
            entry.0 += t;
            entry.1 += n;
        }
    }
    let harness_cpu = ticks_by_name(&cpu0.harness, &cpu1.harness);
    let postgres_cpu = ticks_by_name(&cpu0.postgres, &cpu1.postgres);
    let service_total: u64 = service_cpu.values().map(|v| v.0).sum();
    let harness_total: u64 = harness_cpu.values().map(|v| v.0).sum();
    let postgres_total: u64 = postgres_cpu.values().map(|v| v.0).sum();
    let postgres_busy = cpu1
        .postgres
        .iter()
        .filter(|(pid, (_, t))| cpu0.postgres.get(*pid).map_or(0, |(_, t0)| *t0) < *t)
        .count();
    let machine_busy = cpu1.machine.0.saturating_sub(cpu0.machine.0);
    let machine_total = cpu1.machine.1.saturating_sub(cpu0.machine.1);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let others = machine_busy.saturating_sub(service_total + harness_total + postgres_total);
    let accepted_rate = acked as f64 / load_secs;
    let p99 = percentile(&lat, 99.0);
    let drain_secs = drained_at.map(|d| d.duration_since(t_end).as_secs_f64());
    let overall_secs = match (stats.first_ack, drained_at) {
        (Some(a), Some(d)) => d.duration_since(a).as_secs_f64(),
        _ => f64::NAN,
    };
    // Keeping up: once the load stops, what is left is only what was in flight (a couple of
    // Graph round trips), not a backlog that grew during the run.
    let keep_up_bound = 1.0 + 2.0 * settings.graph_latency.as_secs_f64();
    let keeps_up = !settings.no_delivery && drain_secs.is_some_and(|d| d <= keep_up_bound);
    let mean_batch = if batch_sizes.is_empty() {
        0.0
    } else {
        batch_sizes.iter().sum::<usize>() as f64 / batch_sizes.len() as f64
    };

    let mut r = String::new();
    let mut line = |s: String| {
        r.push_str(&s);
        r.push('\n');
    };
    line("=== capi-bridge load test ===".to_owned());
    line(format!("mode                    {}", settings.mode));
    line(format!(
        "settings                connections={} {} graph_latency_ms={} client={} client_threads={}{}{}{}",
        settings.connections,
        match settings.events {
            Some(n) => format!("events={n}"),
            None => format!("seconds={}", settings.seconds),
        },
        settings.graph_latency.as_millis(),
        match settings.client {
            ClientKind::Raw => "raw",
            ClientKind::Reqwest => "reqwest",
        },
        settings.client_threads,
        if settings.no_delivery {
            " no_delivery=1"
        } else {
            ""
        },
        match settings.database {
            Database::Sqlite => String::new(),
            Database::Postgres { .. } => {
                format!(" database=postgres instances={}", settings.instances)
            }
        },
        if settings.service_env.is_empty() {
            String::new()
        } else {
            format!(
                " service_env={}",
                settings
                    .service_env
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            )
        }
    ));
    line(format!(
        "binary                  {}{}",
        settings.bin.display(),
        if std::env::var_os("BENCH_BIN").is_some() {
            " (BENCH_BIN)".to_owned()
        } else {
            format!(" (work tree at {})", source_version())
        }
    ));
    match (&settings.database, &schema) {
        (Database::Postgres { url }, Some(schema)) => line(format!(
            "database                {url} schema {} (fresh, {}); {postgres}",
            schema.name,
            schema_outcome.as_deref().unwrap_or("?")
        )),
        _ => line(format!(
            "database                {} ({}, fresh; the service commits with synchronous=FULL)",
            dir.path().join("capi-bridge.db").display(),
            fs_type(dir.path())
        )),
    }
    line(format!(
        "machine                 {cores} cores; load average before {load_before}, after load {load_after}"
    ));
    let ms_list = |d: &[Duration]| {
        d.iter()
            .map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if startups.len() == 1 {
        line(format!(
            "service start           healthy after {} ms",
            ms_list(&startups)
        ));
    } else {
        line(format!(
            "service start           {} instances on one schema, healthy after {} ms",
            startups.len(),
            ms_list(&startups)
        ));
    }
    line(String::new());
    line(if settings.supabase_source {
        "ingest (POST /v1/sources/supabase, one leads INSERT per request, mapped by a rule)"
            .to_owned()
    } else {
        "ingest (POST /v1/events, one seed-example event per request)".to_owned()
    });
    line(format!(
        "  load window           {load_secs:.2} s, {} requests sent",
        thousands(sent)
    ));
    line(format!(
        "  accepted (202)        {}  =>  {} events/s",
        thousands(acked),
        rate(acked, load_secs)
    ));
    if acked_per_instance.len() > 1 {
        line(format!(
            "  per instance          {}",
            acked_per_instance
                .iter()
                .enumerate()
                .map(|(k, n)| format!(
                    "{}: {} ({} events/s)",
                    k + 1,
                    thousands(*n),
                    rate(*n, load_secs)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    line(format!(
        "  non-202 / io errors   {} / {}{}",
        non_202,
        stats.io_errors,
        if non_202 > 0 {
            format!(
                "  statuses {:?}  e.g. {}",
                stats.statuses,
                stats.samples.join(" | ")
            )
        } else {
            String::new()
        }
    ));
    if let Some(probed) = &probed {
        for (what, times) in probed {
            let mut sorted: Vec<u32> = times
                .iter()
                .map(|d| u32::try_from(d.as_micros()).unwrap_or(u32::MAX))
                .collect();
            sorted.sort_unstable();
            line(format!(
                "  {what:<22}{} probes during the load: p50 {:.2}  max {:.2} ms",
                sorted.len(),
                percentile(&sorted, 50.0),
                percentile(&sorted, 100.0)
            ));
        }
    }
    line(format!(
        "  latency ms            p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        percentile(&lat, 50.0),
        percentile(&lat, 90.0),
        p99,
        percentile(&lat, 99.9),
        percentile(&lat, 100.0)
    ));
    line(String::new());
    line(if settings.no_delivery {
        "delivery: SKIPPED (BENCH_NO_DELIVERY=1: the service ran in dry-run, ingest only)"
            .to_owned()
    } else {
        format!(
            "delivery (Graph stand-in answering in {} ms)",
            settings.graph_latency.as_millis()
        )
    });
    if !settings.no_delivery {
        line(format!(
            "  during load window    {}  =>  {} events/s",
            thousands(delivered_at_end),
            rate(delivered_at_end, load_secs)
        ));
        line(format!(
        "  overall               {} in {:.2} s from first accept to last delivery  =>  {} events/s",
        thousands(delivered_total),
        overall_secs,
        rate(acked, overall_secs)
    ));
        if let (Some(first), Some(last)) = (first_delivery, drained_at) {
            let secs = last.duration_since(first).as_secs_f64();
            line(format!(
                "  delivering            {:.2} s from first to last delivery  =>  {} events/s",
                secs,
                rate(acked, secs)
            ));
        }
        line(format!(
            "  backlog at load end   {} events; {}",
            thousands(acked.saturating_sub(delivered_at_end)),
            match drain_secs {
                Some(d) => format!("all delivered {:.0} ms after the load stopped", d * 1000.0),
                None => format!(
                    "NOT all delivered within {} s: {} of {} arrived",
                    settings.drain_timeout.as_secs(),
                    thousands(graph.accepted_count() as u64),
                    thousands(acked)
                ),
            }
        ));
        line(format!(
            "  graph requests        {} ok ({} refused), mean batch {:.1} events (min {}, max {})",
            batch_sizes.len(),
            graph_errors,
            mean_batch,
            batch_sizes.iter().min().copied().unwrap_or(0),
            batch_sizes.iter().max().copied().unwrap_or(0)
        ));
        line(format!("  lost / duplicates     {lost} / {duplicates}"));
    }
    line(String::new());
    let mib = |kib: Option<u64>| kib.unwrap_or(0) as f64 / 1024.0;
    let exit_text = |exit: Option<ExitStatus>| match exit {
        Some(s) if s.success() => "exited 0".to_owned(),
        Some(s) => format!("exited with {s}"),
        None => "did not exit within 30 s (killed)".to_owned(),
    };
    if pids.len() == 1 {
        line("service".to_owned());
        line(format!(
            "  peak RSS (VmHWM)      {:.1} MiB (VmRSS at the end {:.1} MiB)",
            mib(peak_rss_kib[0]),
            mib(rss_kib[0])
        ));
        line(format!(
            "  SIGTERM               {} after {:.0} ms",
            exit_text(exits[0].0),
            exits[0].1.as_secs_f64() * 1000.0
        ));
    } else {
        let each = |f: &dyn Fn(usize) -> String| {
            (0..pids.len())
                .map(|k| format!("{}: {}", k + 1, f(k)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        line(format!("service ({} instances)", pids.len()));
        line(format!(
            "  peak RSS (VmHWM)      {}  (VmRSS at the end {})",
            each(&|k| format!("{:.1} MiB", mib(peak_rss_kib[k]))),
            each(&|k| format!("{:.1} MiB", mib(rss_kib[k])))
        ));
        line(format!(
            "  SIGTERM               {}{}",
            if all_exited_0 {
                format!("all {} exited 0; ", pids.len())
            } else {
                "NOT ALL EXITED 0; ".to_owned()
            },
            each(&|k| format!(
                "{} after {:.0} ms",
                exit_text(exits[k].0),
                exits[k].1.as_secs_f64() * 1000.0
            ))
        ));
    }
    line(String::new());
    line(format!(
        "cpu during the load window (100% = one core, {}% = the whole machine)",
        cores * 100
    ));
    let by_thread = |m: &BTreeMap<String, (u64, usize)>| {
        m.iter()
            .filter(|(_, (t, _))| *t > 0)
            .map(|(name, (t, n))| format!("{name}×{n} {:.0}%", pct(*t)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    line(format!(
        "  service               {:.0}%  ({})",
        pct(service_total),
        by_thread(&service_cpu)
    ));
    if per_instance_cpu.len() > 1 {
        line(format!(
            "  per instance          {}",
            per_instance_cpu
                .iter()
                .enumerate()
                .map(|(k, m)| format!("{}: {:.0}%", k + 1, pct(m.values().map(|v| v.0).sum())))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    line(format!(
        "  harness               {:.0}%  ({})",
        pct(harness_total),
        by_thread(&harness_cpu)
    ));
    if schema.is_some() {
        line(format!(
            "  postgres server       {:.0}%  ({} of {} postgres processes busy; all of the server's \
             work, whoever asked)",
            pct(postgres_total),
            postgres_busy,
            cpu1.postgres.len()
        ));
    }
    line(format!(
        "  rest of the machine   {:.0}%  (machine busy {:.0}% of {}%)",
        pct(others),
        if machine_total == 0 {
            0.0
        } else {
            100.0 * cores as f64 * machine_busy as f64 / machine_total as f64
        },
        cores * 100
    ));
    line(String::new());
    line("timeline (per interval: ingest events/s, delivered events/s, backlog)".to_owned());
    for w in samples.windows(2) {
        let ((t_a, a_a, d_a), (t_b, a_b, d_b)) = (w[0], w[1]);
        let dt = t_b - t_a;
        if dt < 0.05 {
            continue;
        }
        line(format!(
            "  {t_a:5.1}-{t_b:5.1} s   ingest {:>7}/s   delivered {:>7}/s   backlog {:>7}",
            rate(a_b - a_a, dt),
            rate(d_b.saturating_sub(d_a), dt),
            thousands(a_b.saturating_sub(d_b))
        ));
    }
    line(String::new());
    let verdict = |ok: bool| if ok { "PASS" } else { "FAIL" };
    let rate_ok = accepted_rate >= TARGET_EVENTS_PER_SEC;
    let p99_ok = p99 < TARGET_P99_MS;
    if settings.smoke {
        line("targets: not checked in a smoke run (debug build, short load)".to_owned());
    } else {
        line("targets (2-core machine, generator on the same machine)".to_owned());
        line(format!(
            "  {}  accepted >= 15,000 events/s     ({} events/s)",
            verdict(rate_ok),
            rate(acked, load_secs)
        ));
        line(format!(
            "  {}  ingest p99 < 20 ms              ({p99:.2} ms)",
            verdict(p99_ok)
        ));
        line(format!(
            "  {}  delivery keeps up               (drained {} after the load; bound {:.1} s)",
            if settings.no_delivery {
                "SKIP"
            } else {
                verdict(keeps_up)
            },
            drain_secs.map_or("never".to_owned(), |d| format!("{d:.2} s")),
            keep_up_bound
        ));
    }
    let correct =
        non_202 == 0 && stats.io_errors == 0 && lost == 0 && drained_at.is_some() && all_exited_0;
    line(format!(
        "  {}  correctness                     (every request 202, every acknowledged event delivered, clean exit)",
        verdict(correct)
    ));
    for (k, service) in services.iter().enumerate() {
        let log = log_tail(&service.log, 15);
        if log.trim().is_empty() {
            continue;
        }
        line(String::new());
        if services.len() == 1 {
            line("service log (last lines, RUST_LOG=warn)".to_owned());
        } else {
            line(format!(
                "service log, instance {} (last lines, RUST_LOG=warn)",
                k + 1
            ));
        }
        for l in log.lines() {
            let mut plain = strip_ansi(l);
            // sqlx's slow-statement warnings: keep the summary and timings, not the SQL text.
            if let (Some(a), Some(b)) =
                (plain.find(" db.statement="), plain.find(" rows_affected="))
            {
                if a < b {
                    plain.replace_range(a..b, "");
                }
            }
            let short: String = plain.chars().take(400).collect();
            let cut = if short.len() < plain.len() {
                " …"
            } else {
                ""
            };
            line(format!("  {short}{cut}"));
        }
    }
    print!("{r}");
    if settings.keep_db {
        let kept = dir.keep();
        println!("kept {}", kept.display());
        if let (Database::Postgres { url }, Some(schema)) = (&settings.database, &schema) {
            println!("kept schema {} in {url}", schema.name);
        }
    }
    if !correct || (settings.enforce && !(rate_ok && p99_ok && keeps_up)) {
        1
    } else {
        0
    }
}
