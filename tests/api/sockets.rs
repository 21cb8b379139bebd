//! Connections that abuse the server (issue 12): headers or a body trickling in, connections
//! that never send a request, more connections than allowed or than file descriptors; and the
//! open-files limit raised at start. Timeouts are set to a second so that the tests take
//! seconds; raw sockets, so that a request can be left half-sent.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::helpers::{spawn_app_with, TestApp, SECRET, WAIT};
use crate::process::Service;

/// Longer than any timeout the tests configure (1 s), shorter than the old behaviour (never).
const CUT_WITHIN: Duration = Duration::from_secs(8);
/// A closure within this is one the server made at once, not one of its timeouts (the health
/// reserve's is 5 s, the configured ones are 30 s in those tests).
const AT_ONCE: Duration = Duration::from_secs(3);
/// Pace of a trickling client: the abuse the tests play, not a wait for an outcome.
const TRICKLE: Duration = Duration::from_millis(100);

/// `host:port` of an app's listener.
fn authority(app: &TestApp) -> String {
    app.address
        .split_once("://")
        .map(|(_, rest)| rest.to_owned())
        .expect("an address with a scheme")
}

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(authority(app)).await.expect("connect")
}

/// Reads until the server closes the connection (end of stream or reset), for at most
/// `limit`: how long that took and what it sent, or what it sent when it did not close.
async fn closed_within(
    stream: &mut (impl AsyncRead + Unpin),
    limit: Duration,
) -> Result<(Duration, String), String> {
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buffer = [0_u8; 4096];
    loop {
        match tokio::time::timeout_at(started + limit, stream.read(&mut buffer)).await {
            Err(_) => return Err(String::from_utf8_lossy(&received).into_owned()),
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Ok((
                    started.elapsed(),
                    String::from_utf8_lossy(&received).into_owned(),
                ))
            }
            Ok(Ok(read)) => received.extend_from_slice(&buffer[..read]),
        }
    }
}

/// Writes one byte every [`TRICKLE`] until the connection fails.
fn trickle(mut write: impl AsyncWrite + Unpin + Send + 'static) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if write.write_all(b"a").await.is_err() {
                return;
            }
            tokio::time::sleep(TRICKLE).await;
        }
    })
}

/// Reads until `text` has arrived.
async fn read_until(stream: &mut (impl AsyncRead + Unpin), text: &str) -> String {
    let mut received = Vec::new();
    let mut buffer = [0_u8; 4096];
    let deadline = Instant::now() + WAIT;
    while !String::from_utf8_lossy(&received).contains(text) {
        let read = tokio::time::timeout_at(deadline, stream.read(&mut buffer))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{text:?} never arrived: {:?}",
                    String::from_utf8_lossy(&received)
                )
            })
            .expect("read");
        assert!(
            read > 0,
            "closed before {text:?}: {:?}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&buffer[..read]);
    }
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test]
async fn request_headers_trickling_in_are_cut_after_the_header_timeout() {
    let app = spawn_app_with(&[
        ("HTTP_HEADER_TIMEOUT_MS", "1000"),
        ("HTTP_IDLE_TIMEOUT_MS", "30000"),
    ])
    .await;
    let (mut read, mut write) = connect(&app).await.into_split();
    write
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: capi-bridge\r\nx-trickle: ")
        .await
        .expect("send the start of the headers");
    let trickling = trickle(write);

    let (elapsed, answer) = closed_within(&mut read, CUT_WITHIN)
        .await
        .unwrap_or_else(|sent| panic!("headers trickled in for {CUT_WITHIN:?}; got {sent:?}"));
    trickling.abort();
    assert!(answer.is_empty(), "cut, not answered: {answer:?}");
    assert!(
        elapsed >= Duration::from_millis(900),
        "cut before the header timeout: {elapsed:?}"
    );
}

#[tokio::test]
async fn a_request_body_trickling_in_is_answered_408_after_the_body_timeout() {
    let app = spawn_app_with(&[
        ("HTTP_BODY_TIMEOUT_MS", "1000"),
        ("HTTP_HEADER_TIMEOUT_MS", "30000"),
        ("HTTP_IDLE_TIMEOUT_MS", "30000"),
    ])
    .await;
    let (mut read, mut write) = connect(&app).await.into_split();
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nhost: capi-bridge\r\nauthorization: Bearer {SECRET}\r\n\
         content-type: application/json\r\ncontent-length: 1000\r\n\r\n"
    );
    write
        .write_all(head.as_bytes())
        .await
        .expect("send headers");
    let trickling = trickle(write);

    let (elapsed, answer) = closed_within(&mut read, CUT_WITHIN)
        .await
        .unwrap_or_else(|sent| panic!("the body trickled in for {CUT_WITHIN:?}; got {sent:?}"));
    trickling.abort();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("connection: close"), "{answer}");
    assert!(lower.contains("x-request-id: "), "{answer}");
    assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");
    assert!(answer.contains("HTTP_BODY_TIMEOUT_MS"), "{answer}");
    assert!(
        elapsed >= Duration::from_millis(900),
        "cut before the body timeout: {elapsed:?}"
    );
    // Nothing was stored from the half body, and the service goes on.
    let health = app
        .http
        .get(format!("{}/healthz", app.address))
        .send()
        .await
        .expect("GET /healthz");
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn connections_without_a_request_are_closed_after_the_idle_timeout() {
    let app = spawn_app_with(&[
        ("HTTP_IDLE_TIMEOUT_MS", "1000"),
        ("HTTP_HEADER_TIMEOUT_MS", "30000"),
    ])
    .await;
    // Never sends anything.
    let mut silent = connect(&app).await;
    let (elapsed, answer) = closed_within(&mut silent, CUT_WITHIN)
        .await
        .unwrap_or_else(|_| panic!("a silent connection stayed open for {CUT_WITHIN:?}"));
    assert!(answer.is_empty(), "{answer:?}");
    assert!(
        elapsed >= Duration::from_millis(900),
        "closed before the idle timeout: {elapsed:?}"
    );

    // One request, then nothing: the keep-alive connection is closed too.
    let mut kept_alive = connect(&app).await;
    kept_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: capi-bridge\r\n\r\n")
        .await
        .expect("send a request");
    let answer = read_until(&mut kept_alive, r#"{"status":"ok"}"#).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (elapsed, more) = closed_within(&mut kept_alive, CUT_WITHIN)
        .await
        .unwrap_or_else(|_| panic!("an idle keep-alive connection stayed open"));
    assert!(more.is_empty(), "{more:?}");
    assert!(
        elapsed >= Duration::from_millis(900),
        "closed before the idle timeout: {elapsed:?}"
    );
}

#[tokio::test]
async fn at_the_connection_limit_the_connection_idle_the_longest_makes_room() {
    let app = spawn_app_with(&[
        ("HTTP_MAX_CONNECTIONS", "4"),
        ("HTTP_IDLE_TIMEOUT_MS", "30000"),
    ])
    .await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(connect(&app).await);
    }
    // A fifth connection, with a real request: served.
    let me = app
        .http
        .get(format!("{}/v1/me", app.address))
        .bearer_auth(SECRET)
        .send()
        .await
        .expect("GET /v1/me");
    assert_eq!(me.status(), 200);
    // The first idle connection was closed for it, at once.
    let (_, answer) = closed_within(&mut idle[0], AT_ONCE)
        .await
        .unwrap_or_else(|_| panic!("the idlest connection was not closed to make room"));
    assert!(answer.is_empty(), "{answer:?}");
}

#[tokio::test]
async fn when_every_connection_is_busy_new_ones_are_refused_and_health_checks_still_answer() {
    let app = spawn_app_with(&[
        ("HTTP_MAX_CONNECTIONS", "4"),
        ("HTTP_IDLE_TIMEOUT_MS", "30000"),
    ])
    .await;
    // Four requests in progress: their handlers wait for bodies that do not come yet
    // (`100 Continue` says the handler has started reading).
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nhost: capi-bridge\r\nauthorization: Bearer {SECRET}\r\n\
         content-type: application/json\r\ncontent-length: 10\r\nexpect: 100-continue\r\n\r\n"
    );
    let mut busy = Vec::new();
    for _ in 0..4 {
        let mut stream = connect(&app).await;
        stream
            .write_all(head.as_bytes())
            .await
            .expect("send headers");
        let interim = read_until(&mut stream, "\r\n\r\n").await;
        assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim}");
        busy.push(stream);
    }

    // Anything but a health check is refused, cleanly.
    let mut refused = connect(&app).await;
    refused
        .write_all(
            format!("GET /v1/me HTTP/1.1\r\nhost: capi-bridge\r\nauthorization: Bearer {SECRET}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("send a request");
    let (_, answer) = closed_within(&mut refused, AT_ONCE)
        .await
        .unwrap_or_else(|sent| panic!("not refused and closed: {sent:?}"));
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("connection: close"), "{answer}");
    assert!(lower.contains("retry-after: 1"), "{answer}");
    assert!(answer.contains(r#""code":"overloaded""#), "{answer}");

    // Health checks answer.
    let fresh = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(AT_ONCE)
            .build()
            .expect("client")
    };
    for path in ["/healthz", "/readyz"] {
        let answer = fresh()
            .get(format!("{}{path}", app.address))
            .send()
            .await
            .unwrap_or_else(|err| panic!("GET {path}: {err}"));
        assert_eq!(answer.status(), 200, "{path}");
    }

    // Idle connections filling the health reserve make room for a health check too.
    let mut idle = Vec::new();
    for _ in 0..capi_bridge::server::HEALTH_RESERVE {
        idle.push(connect(&app).await);
    }
    let health = fresh()
        .get(format!("{}/healthz", app.address))
        .send()
        .await
        .expect("GET /healthz with the reserve full of idle connections");
    assert_eq!(health.status(), 200);
    closed_within(&mut idle[0], AT_ONCE)
        .await
        .unwrap_or_else(|_| panic!("the idlest reserve connection was not closed"));

    // Once the busy connections go, requests are served again.
    drop(busy);
    let deadline = Instant::now() + WAIT;
    loop {
        let me = fresh()
            .get(format!("{}/v1/me", app.address))
            .bearer_auth(SECRET)
            .send()
            .await
            .expect("GET /v1/me");
        if me.status() == 200 {
            break;
        }
        assert_eq!(me.status(), 503);
        assert!(
            Instant::now() < deadline,
            "still refusing after the busy connections closed"
        );
        // Polling a condition (the server's connection count is not visible), not sleeping for an outcome.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn over_https_a_stalled_handshake_and_trickling_headers_are_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = crate::tls::certificate("capi-bridge sockets", 7);
    let files = crate::tls::Files::new(dir.path());
    files.install(&cert);
    let [cert_var, key_var] = files.env();
    let app = spawn_app_with(&[
        (cert_var.0, &cert_var.1),
        (key_var.0, &key_var.1),
        ("HTTP_HEADER_TIMEOUT_MS", "1000"),
        ("HTTP_IDLE_TIMEOUT_MS", "30000"),
    ])
    .await;

    // A TCP connection that never says hello.
    let mut silent = connect(&app).await;
    let (elapsed, _) = closed_within(&mut silent, Duration::from_secs(5))
        .await
        .unwrap_or_else(|_| panic!("a connection without a TLS handshake stayed open"));
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");

    // A handshake, then headers trickling in.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(cert.der.clone()))
        .expect("trust the certificate");
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let server_name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("server name");
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(server_name, connect(&app).await)
        .await
        .expect("TLS handshake");
    let (mut read, mut write) = tokio::io::split(tls);
    write
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: capi-bridge\r\nx-trickle: ")
        .await
        .expect("send the start of the headers");
    write.flush().await.expect("flush");
    let trickling = tokio::spawn(async move {
        loop {
            if write.write_all(b"a").await.is_err() || write.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(TRICKLE).await;
        }
    });
    let (elapsed, answer) = closed_within(&mut read, CUT_WITHIN)
        .await
        .unwrap_or_else(|sent| panic!("headers trickled in over TLS; got {sent:?}"));
    trickling.abort();
    assert!(answer.is_empty(), "{answer:?}");
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
}

/// The limits of open files of a process: (soft, hard).
fn open_files_limits(pid: &str) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("a Max open files line");
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

fn child_env(dir: &std::path::Path) -> Vec<(&'static str, String)> {
    vec![
        (
            "DATABASE_URL",
            format!("sqlite://{}", dir.join("sockets.db").display()),
        ),
        ("WEBHOOK_SECRET", SECRET.to_owned()),
    ]
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client")
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_binary_raises_its_soft_open_files_limit_to_the_hard_one() {
    let (_, hard) = open_files_limits("self");
    assert!(
        hard > 256,
        "this test needs a hard open-files limit above 256, not {hard}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut env = child_env(dir.path());
    env.push(("LOG_FORMAT", "json".to_owned()));
    let service =
        Service::start_with_ulimit("limits", dir.path(), &env, &client(), Some("-S -n 256")).await;
    let (soft, child_hard) = open_files_limits(&service.pid().to_string());
    assert_eq!(soft, child_hard, "the soft limit was not raised");
    assert!(soft > 256, "{soft}");
    // The figure is logged.
    let log = service.log();
    let logged: serde_json::Value = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["message"] == "open-files limit (RLIMIT_NOFILE)")
        .unwrap_or_else(|| panic!("no open-files line in {log}"));
    assert_eq!(logged["soft"], soft, "{logged}");
    assert_eq!(logged["raised_from"], 256, "{logged}");
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn idle_connections_beyond_the_file_descriptors_do_not_take_health_checks_down() {
    // 300 descriptors in all, as a small container might give; more idle connections than that.
    let dir = tempfile::tempdir().expect("tempdir");
    let http = client();
    let service = Service::start_with_ulimit(
        "descriptors",
        dir.path(),
        &child_env(dir.path()),
        &http,
        Some("-n 300"),
    )
    .await;
    let authority = service.address.trim_start_matches("http://").to_owned();
    let mut idle = Vec::new();
    for _ in 0..400 {
        idle.push(TcpStream::connect(&authority).await.expect("connect"));
    }
    // New connections (the start's pooled one would not show anything).
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client");
    let health = http
        .get(format!("{}/healthz", service.address))
        .send()
        .await
        .expect("GET /healthz answers with 400 idle connections open");
    assert_eq!(health.status(), 200);
    let me = http
        .get(format!("{}/v1/me", service.address))
        .bearer_auth(SECRET)
        .send()
        .await
        .expect("GET /v1/me");
    assert_eq!(me.status(), 200);
    let log = service.log();
    assert!(log.contains("does not fit the open-files limit"), "{log}");
    assert!(!log.contains("cannot accept connections"), "{log}");
}

#[tokio::test]
async fn request_headers_over_32_kib_are_answered_431_and_not_buffered() {
    let app = spawn_app_with(&[]).await;
    let mut stream = connect(&app).await;
    // 40 KiB of headers: within hyper's default buffer (about 400 KiB), over ours.
    let padding = "a".repeat(1000);
    let mut head = String::from("GET /healthz HTTP/1.1\r\nhost: capi-bridge\r\n");
    for i in 0..40 {
        head.push_str(&format!("x-padding-{i}: {padding}\r\n"));
    }
    head.push_str("\r\n");
    // The server may answer and close before it has read everything.
    let _ = stream.write_all(head.as_bytes()).await;
    let (_, answer) = closed_within(&mut stream, CUT_WITHIN)
        .await
        .unwrap_or_else(|sent| panic!("not answered and closed: {sent:?}"));
    // 431, or a reset that overtook it (the server closes with the rest of the headers unread).
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
}
