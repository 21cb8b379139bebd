//! The real binary as a child process, for the tests that must kill it (`crash`, `cluster`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;

use crate::helpers::WAIT;

/// Log lines shown when a test fails.
const LOG_TAIL_LINES: usize = 80;

/// One capi-bridge process; killed (and the tail of its log shown on failure) when dropped.
pub struct Service {
    label: &'static str,
    child: Child,
    log: PathBuf,
    /// `http://127.0.0.1:PORT` (`https://` with `TLS_CERT_FILE`).
    pub address: String,
}

impl Service {
    /// Starts the binary in `dir` on a free port with exactly `env` (plus PATH and HOME: nothing
    /// from the developer's environment or a `.env` file leaks in), and waits for `/healthz`.
    /// A `LISTEN_ADDR` in `env` is kept (it is then reached on 127.0.0.1); with `TLS_CERT_FILE`
    /// it is reached over https, so `http` must trust the certificate.
    pub async fn start(
        label: &'static str,
        dir: &Path,
        env: &[(&str, String)],
        http: &reqwest::Client,
    ) -> Self {
        Self::start_with_ulimit(label, dir, env, http, None).await
    }

    /// Like [`Service::start`], with the shell's `ulimit` given these arguments first (e.g.
    /// `-S -n 256`: a soft open-files limit of 256).
    pub async fn start_with_ulimit(
        label: &'static str,
        dir: &Path,
        env: &[(&str, String)],
        http: &reqwest::Client,
        ulimit: Option<&str>,
    ) -> Self {
        let listen_addr = env
            .iter()
            .find(|(name, _)| *name == "LISTEN_ADDR")
            .map_or_else(|| format!("127.0.0.1:{}", free_port()), |(_, v)| v.clone());
        let port = listen_addr
            .rsplit(':')
            .next()
            .expect("LISTEN_ADDR has a port");
        let scheme = if env.iter().any(|(name, _)| *name == "TLS_CERT_FILE") {
            "https"
        } else {
            "http"
        };
        let log = dir.join(format!("{label}.log"));
        let stderr = std::fs::File::create(&log).expect("create the log file");
        let stdout = stderr.try_clone().expect("clone the log file");
        let binary = env!("CARGO_BIN_EXE_capi-bridge");
        let mut command = match ulimit {
            None => Command::new(binary),
            Some(args) => {
                // `exec`: the service is the child itself, whose limits /proc shows.
                let mut shell = Command::new("sh");
                shell
                    .arg("-c")
                    .arg(format!("ulimit {args} && exec \"$0\""))
                    .arg(binary);
                shell
            }
        };
        command.env_clear().current_dir(dir);
        for name in ["PATH", "HOME"] {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        for (name, value) in env {
            command.env(name, value);
        }
        command
            .env("LISTEN_ADDR", &listen_addr)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = command.spawn().expect("start the capi-bridge binary");
        let mut service = Self {
            label,
            child,
            log,
            address: format!("{scheme}://127.0.0.1:{port}"),
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = service.child.try_wait().expect("query the child process") {
                panic!("the {label} process exited before answering /healthz: {status}");
            }
            let health = http
                .get(format!("{}/healthz", service.address))
                .timeout(Duration::from_secs(1))
                .send()
                .await;
            if health.is_ok_and(|r| r.status() == 200) {
                return service;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the {label} process never answered /healthz on {listen_addr}"
            );
            // Polling a condition (the child has no readiness signal), not sleeping for an outcome.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The queue counts from `/readyz` (the whole database's, whichever instance answers).
    pub async fn queue(&self, http: &reqwest::Client) -> Value {
        let ready: Value = http
            .get(format!("{}/readyz", self.address))
            .send()
            .await
            .expect("GET /readyz")
            .json()
            .await
            .expect("/readyz answers JSON");
        ready["queue"].clone()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).expect("read the log file")
    }

    /// Sends SIGHUP.
    pub fn hang_up(&mut self) {
        if let Some(status) = self.child.try_wait().expect("query the child process") {
            panic!("the {} process had already exited: {status}", self.label);
        }
        let sent = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -HUP failed");
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .try_wait()
            .expect("query the child process")
            .is_none()
    }

    /// SIGKILL, then reap the process.
    pub fn kill_9(&mut self) -> ExitStatus {
        if let Some(status) = self.child.try_wait().expect("query the child process") {
            panic!("the {} process had already exited: {status}", self.label);
        }
        self.child.kill().expect("send SIGKILL");
        self.child.wait().expect("reap the killed process")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // Already reaped after `kill_9`: both calls then fail or return harmlessly.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            eprintln!(
                "--- last {} of {} log lines of the {} process ---\n{}\n--- end of the {} log ---",
                tail.len(),
                lines.len(),
                self.label,
                tail.join("\n"),
                self.label
            );
        }
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("ephemeral port address")
        .port()
}

/// A lock that survives a panicking holder (the tests report, not propagate, poison).
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
