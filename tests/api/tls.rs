//! Native HTTPS: self-signed certificates made here, events over https with HSTS, and the
//! certificate replaced on disk (a file change, SIGHUP, a broken replacement) while the service
//! runs; the configuration errors; the warning about plain HTTP beyond loopback.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{lead, spawn_app, spawn_app_with, PIXEL, SECRET, TOKEN, WAIT};
use crate::process::{free_port, Service};

/// A self-signed certificate for 127.0.0.1 and localhost, with its key.
pub(crate) struct Certificate {
    pub(crate) pem: String,
    pub(crate) key_pem: String,
    pub(crate) der: Vec<u8>,
}

pub(crate) fn certificate(common_name: &str, serial: u64) -> Certificate {
    let mut params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("certificate parameters");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    params.serial_number = Some(rcgen::SerialNumber::from(serial));
    let key = rcgen::KeyPair::generate().expect("generate a key");
    let cert = params.self_signed(&key).expect("self-sign");
    Certificate {
        pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().to_vec(),
    }
}

/// The certificate and key files, replaced as certbot and Kubernetes do: written beside, then
/// renamed over (a reader never sees half a file).
pub(crate) struct Files {
    cert: PathBuf,
    key: PathBuf,
}

impl Files {
    pub(crate) fn new(dir: &Path) -> Self {
        Self {
            cert: dir.join("fullchain.pem"),
            key: dir.join("privkey.pem"),
        }
    }

    pub(crate) fn install(&self, certificate: &Certificate) {
        replace(&self.cert, &certificate.pem);
        replace(&self.key, &certificate.key_pem);
    }

    pub(crate) fn env(&self) -> [(&'static str, String); 2] {
        [
            ("TLS_CERT_FILE", self.cert.display().to_string()),
            ("TLS_KEY_FILE", self.key.display().to_string()),
        ]
    }
}

fn replace(path: &Path, contents: &str) {
    let beside = path.with_extension("new");
    std::fs::write(&beside, contents).expect("write the new file");
    std::fs::rename(&beside, path).expect("rename it over the old one");
}

/// A client trusting `roots` that opens a new connection for every request (so each one
/// sees the certificate served at that moment) and reports the peer's certificate.
fn client(roots: &[&Certificate]) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5));
    for root in roots {
        builder = builder.add_root_certificate(
            reqwest::Certificate::from_pem(root.pem.as_bytes()).expect("a PEM certificate"),
        );
    }
    builder.build().expect("https client")
}

/// The certificate a new connection to `address` is served.
async fn served_certificate(https: &reqwest::Client, address: &str) -> Vec<u8> {
    let response = https
        .get(format!("{address}/healthz"))
        .send()
        .await
        .expect("GET /healthz over https");
    assert_eq!(response.status(), 200);
    response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(reqwest::tls::TlsInfo::peer_certificate)
        .expect("the peer certificate")
        .to_vec()
}

/// Waits until new connections are served `expected`.
async fn wait_for_certificate(https: &reqwest::Client, address: &str, expected: &Certificate) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while served_certificate(https, address).await != expected.der {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new connections never got the replaced certificate"
        );
        // Polling a condition (the reload is not announced to clients), not sleeping for it.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn hsts(response: &reqwest::Response) -> Option<&str> {
    response
        .headers()
        .get("strict-transport-security")
        .and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn events_arrive_over_https_with_hsts_and_a_renewed_certificate_needs_no_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = Files::new(dir.path());
    let first = certificate("capi-bridge test certificate one", 1);
    let renewed = certificate("capi-bridge test certificate two", 2);
    files.install(&first);
    let [cert_var, key_var] = files.env();
    let app = spawn_app_with(&[(cert_var.0, &cert_var.1), (key_var.0, &key_var.1)]).await;
    assert!(app.address.starts_with("https://"), "{}", app.address);
    let https = client(&[&first, &renewed]);
    assert_eq!(served_certificate(&https, &app.address).await, first.der);

    // An event over https is accepted, with HSTS, and reaches Meta.
    let accepted = https
        .post(format!("{}/v1/events", app.address))
        .bearer_auth(SECRET)
        .json(&lead("tls-1"))
        .send()
        .await
        .expect("POST /v1/events over https");
    assert_eq!(accepted.status(), 202);
    assert_eq!(hsts(&accepted), Some("max-age=31536000"));
    let sent = app.graph.wait_for_accepted(1, WAIT).await;
    assert_eq!(sent[0]["event_id"], "tls-1");

    // HSTS on every response: refusals and unknown paths too.
    let refused = https
        .post(format!("{}/v1/events", app.address))
        .json(&lead("tls-refused"))
        .send()
        .await
        .expect("POST without the secret");
    assert_eq!(refused.status(), 401);
    assert_eq!(hsts(&refused), Some("max-age=31536000"));
    let unknown = https
        .get(format!("{}/nowhere", app.address))
        .send()
        .await
        .expect("GET an unknown path");
    assert_eq!(unknown.status(), 404);
    assert_eq!(hsts(&unknown), Some("max-age=31536000"));

    // The port speaks TLS only: plain http gets no answer.
    let plain_address = app.address.replacen("https://", "http://", 1);
    let plain = reqwest::Client::new()
        .get(format!("{plain_address}/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "plain http was answered: {plain:?}");

    // Renewal: the files are replaced and new connections get the new certificate.
    files.install(&renewed);
    wait_for_certificate(&https, &app.address, &renewed).await;
    let after = https
        .post(format!("{}/v1/events", app.address))
        .bearer_auth(SECRET)
        .json(&lead("tls-2"))
        .send()
        .await
        .expect("POST after the renewal");
    assert_eq!(after.status(), 202);
    assert_eq!(app.graph.wait_for_accepted(2, WAIT).await.len(), 2);
}

#[tokio::test]
async fn plain_http_has_no_hsts() {
    let app = spawn_app().await;
    assert!(app.address.starts_with("http://"));
    let response = app.post_events(&lead("plain-1")).await;
    assert_eq!(response.status(), 202);
    assert_eq!(hsts(&response), None);
}

#[tokio::test]
async fn the_landing_page_door_still_sees_the_visitors_socket_address_over_https() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = Files::new(dir.path());
    let cert = certificate("capi-bridge collect", 3);
    files.install(&cert);
    let config = dir.path().join("capi-bridge.toml");
    std::fs::write(
        &config,
        r#"
        [sites.pk_test_tls]
        origins = ["https://shop.example.com"]
        events = ["Lead"]
        "#,
    )
    .expect("write config");
    let [cert_var, key_var] = files.env();
    let app = spawn_app_with(&[
        ("CAPI_BRIDGE_CONFIG", config.to_str().expect("path")),
        (cert_var.0, &cert_var.1),
        (key_var.0, &key_var.1),
    ])
    .await;
    let response = client(&[&cert])
        .post(format!("{}/v1/collect", app.address))
        .header("content-type", "text/plain")
        .header("origin", "https://shop.example.com")
        .header("user-agent", "Mozilla/5.0 (X11; Linux x86_64) Chrome/156.0")
        .body(
            json!({
                "site_key": "pk_test_tls",
                "event_name": "Lead",
                "event_id": "page-tls-1",
                "event_source_url": "https://shop.example.com/lp",
                "email": "visitor@example.com"
            })
            .to_string(),
        )
        .send()
        .await
        .expect("POST /v1/collect over https");
    assert_eq!(response.status(), 204);
    assert_eq!(hsts(&response), Some("max-age=31536000"));
    let sent = app.graph.wait_for_accepted(1, WAIT).await;
    // The socket peer, through ConnectInfo over the TLS connection.
    assert_eq!(sent[0]["user_data"]["client_ip_address"], "127.0.0.1");
}

/// The binary's JSON log lines with this `message`.
fn logged(service: &Service, message: &str) -> Vec<Value> {
    service
        .log()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["message"] == message)
        .collect()
}

/// Waits until the binary has logged `message` with `trigger` at least `count` times.
async fn wait_for_log(service: &Service, message: &str, trigger: &str, count: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let lines: Vec<Value> = logged(service, message)
            .into_iter()
            .filter(|line| line["trigger"] == trigger)
            .collect();
        if lines.len() >= count {
            return lines;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never logged {message:?} ({trigger}) {count} time(s):\n{}",
            service.log()
        );
        // Polling a condition (the log file), not sleeping for an outcome.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_binary_reloads_on_sighup_and_keeps_serving_when_a_replacement_is_broken() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = Files::new(dir.path());
    let first = certificate("capi-bridge binary one", 11);
    let second = certificate("capi-bridge binary two", 12);
    let third = certificate("capi-bridge binary three", 13);
    files.install(&first);
    let https = client(&[&first, &second, &third]);
    let mut env = vec![
        (
            "DATABASE_URL",
            format!("sqlite://{}", dir.path().join("capi-bridge.db").display()),
        ),
        ("WEBHOOK_SECRET", SECRET.to_owned()),
        ("LOG_FORMAT", "json".to_owned()),
    ];
    env.extend(files.env());
    let mut service = Service::start("https", dir.path(), &env, &https).await;
    assert_eq!(
        served_certificate(&https, &service.address).await,
        first.der
    );

    // A broken replacement: refused with the reason, and the old certificate stays.
    replace(&files.cert, "-----BEGIN CERTIFICATE-----\nMIIBtruncated\n");
    let refused = wait_for_log(
        &service,
        "certificate not reloaded; still serving the previous one",
        "file change",
        1,
    )
    .await;
    let reason = refused[0]["error"].as_str().expect("an error field");
    assert!(reason.contains("TLS_CERT_FILE"), "{reason}");
    assert_eq!(
        served_certificate(&https, &service.address).await,
        first.der
    );

    // SIGHUP tries again (and does not stop the process); still broken, still the old one.
    service.hang_up();
    wait_for_log(
        &service,
        "certificate not reloaded; still serving the previous one",
        "SIGHUP",
        1,
    )
    .await;
    assert!(service.is_running());
    assert_eq!(
        served_certificate(&https, &service.address).await,
        first.der
    );

    // Fixed files and SIGHUP: new connections get the new certificate.
    files.install(&second);
    service.hang_up();
    wait_for_log(&service, "certificate reloaded", "SIGHUP", 1).await;
    wait_for_certificate(&https, &service.address, &second).await;
    assert!(service.is_running());

    // A renewal without a signal is noticed by itself.
    files.install(&third);
    wait_for_certificate(&https, &service.address, &third).await;
    wait_for_log(&service, "certificate reloaded", "file change", 1).await;

    // No key material in the logs.
    let log = service.log();
    for certificate in [&first, &second, &third] {
        let key_body: String = certificate
            .key_pem
            .lines()
            .filter(|line| !line.starts_with("-----"))
            .collect();
        for piece in key_body.as_bytes().chunks(16) {
            let piece = std::str::from_utf8(piece).expect("base64 is ASCII");
            assert!(!log.contains(piece), "key material in the logs");
        }
    }
}

/// Lines that warn about plain HTTP beyond loopback.
fn proxy_warnings(service: &Service) -> usize {
    service
        .log()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| {
            line["level"] == "WARN"
                && line["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("terminated by a proxy in front"))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_beyond_loopback_warns_once_at_start_that_a_proxy_must_terminate_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = Files::new(dir.path());
    let cert = certificate("capi-bridge everywhere", 21);
    files.install(&cert);
    let base = |name: &str| {
        vec![
            (
                "DATABASE_URL",
                format!(
                    "sqlite://{}",
                    dir.path().join(format!("{name}.db")).display()
                ),
            ),
            ("WEBHOOK_SECRET", SECRET.to_owned()),
            ("LOG_FORMAT", "json".to_owned()),
        ]
    };
    let plain = reqwest::Client::new();

    // Every interface, plain HTTP: one warning.
    let mut env = base("everywhere");
    env.push(("LISTEN_ADDR", format!("0.0.0.0:{}", free_port())));
    let everywhere = Service::start("everywhere", dir.path(), &env, &plain).await;
    assert_eq!(proxy_warnings(&everywhere), 1, "{}", everywhere.log());
    drop(everywhere);

    // Every interface with TLS: none.
    let mut env = base("everywhere-tls");
    env.push(("LISTEN_ADDR", format!("0.0.0.0:{}", free_port())));
    env.extend(files.env());
    let with_tls = Service::start("everywhere-tls", dir.path(), &env, &client(&[&cert])).await;
    assert_eq!(proxy_warnings(&with_tls), 0, "{}", with_tls.log());
    drop(with_tls);

    // Loopback, plain HTTP: none.
    let loopback = Service::start("loopback", dir.path(), &base("loopback"), &plain).await;
    assert_eq!(proxy_warnings(&loopback), 0, "{}", loopback.log());
}

/// Runs the binary to its exit (bounded: a binary that serves instead of failing fails the test).
async fn run_to_exit(dir: &Path, env: &[(&str, String)], args: &[&str]) -> (Option<i32>, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_capi-bridge"));
    command
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    let output = tokio::time::timeout(WAIT, command.output())
        .await
        .expect("the binary exits instead of serving")
        .expect("run capi-bridge");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!text.contains("panicked"), "{text}");
    (output.status.code(), text)
}

#[tokio::test]
async fn configuration_errors_name_what_to_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = Files::new(dir.path());
    let listen = ("LISTEN_ADDR", "127.0.0.1:0".to_owned());

    // One of the two files without the other.
    let [cert_var, key_var] = files.env();
    for only in [cert_var.clone(), key_var.clone()] {
        let (code, text) = run_to_exit(dir.path(), &[listen.clone(), only], &[]).await;
        assert_eq!(code, Some(2), "{text}");
        assert!(text.contains("invalid configuration"), "{text}");
        assert!(
            text.contains("TLS_CERT_FILE") && text.contains("TLS_KEY_FILE"),
            "{text}"
        );
    }

    // Plain http to a Graph API that is not on this machine.
    for url in [
        "http://graph.example.com",
        "http://10.0.0.5:8080",
        "http://localhost.example.com",
    ] {
        let env = [
            listen.clone(),
            ("META_ACCESS_TOKEN", TOKEN.to_owned()),
            ("META_PIXEL_ID", PIXEL.to_owned()),
            ("META_GRAPH_URL", url.to_owned()),
        ];
        let (code, text) = run_to_exit(dir.path(), &env, &["check"]).await;
        assert_eq!(code, Some(2), "{url}: {text}");
        assert!(text.contains("META_GRAPH_URL must use https"), "{text}");
    }

    // Files that cannot be served: `check` says so, and `serve` stops at start.
    let mut env = vec![listen.clone()];
    env.extend(files.env());
    let missing = format!("cannot read TLS_CERT_FILE {}", files.cert.display());
    let (code, text) = run_to_exit(dir.path(), &env, &["check"]).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains(&missing), "{text}");
    let (code, text) = run_to_exit(dir.path(), &env, &["serve"]).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("cannot serve HTTPS"), "{text}");
    assert!(text.contains(&missing), "{text}");

    // A key that belongs to another certificate.
    let one = certificate("capi-bridge one", 31);
    let other = certificate("capi-bridge other", 32);
    replace(&files.cert, &one.pem);
    replace(&files.key, &other.key_pem);
    let (code, text) = run_to_exit(dir.path(), &env, &["serve"]).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(
            "the private key in TLS_KEY_FILE does not belong to the certificate in TLS_CERT_FILE"
        ),
        "{text}"
    );

    // Both fine: `check` says where the certificate comes from.
    replace(&files.key, &one.key_pem);
    let (code, text) = run_to_exit(dir.path(), &env, &["check"]).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("https: "), "{text}");
}

#[tokio::test]
async fn shutdown_over_https_finishes_the_request_in_flight_and_then_stops() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let dir = tempfile::tempdir().expect("tempdir");
    let files = Files::new(dir.path());
    let cert = certificate("capi-bridge drain", 41);
    files.install(&cert);
    let [cert_var, key_var] = files.env();
    let app = spawn_app_with(&[(cert_var.0, &cert_var.1), (key_var.0, &key_var.1)]).await;
    let authority = app
        .address
        .strip_prefix("https://")
        .expect("https")
        .to_owned();

    // A raw TLS connection, so the request can be left half-sent.
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
    let tcp = tokio::net::TcpStream::connect(&authority)
        .await
        .expect("connect");
    let server_name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("server name");
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(server_name, tcp)
        .await
        .expect("TLS handshake");

    // Headers only; `Expect: 100-continue` tells when the handler has started reading.
    let body = lead("drain-1").to_string();
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nhost: {authority}\r\nauthorization: Bearer {SECRET}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.expect("send headers");
    let mut answer = vec![0_u8; 1024];
    let read = tokio::time::timeout(WAIT, tls.read(&mut answer))
        .await
        .expect("100 Continue in time")
        .expect("read");
    let interim = String::from_utf8_lossy(&answer[..read]).into_owned();
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim}");

    // Stop while the request is in flight; it is still answered.
    let address = app.address.clone();
    let store = app.store.clone();
    let stopping = tokio::spawn(app.stop());
    tls.write_all(body.as_bytes()).await.expect("send the body");
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, tls.read_to_end(&mut response))
        .await
        .expect("the response in time")
        .expect("read the response");
    let response = String::from_utf8_lossy(&response).into_owned();
    assert!(response.starts_with("HTTP/1.1 202"), "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains("strict-transport-security: max-age=31536000"),
        "{response}"
    );
    // (The database lives in the returned directory: kept until the end.)
    let (_graph, _dir, ..) = tokio::time::timeout(WAIT, stopping)
        .await
        .expect("the service stops after the request")
        .expect("stop task");
    // Stopped: nothing listens any more, and the answered event was kept.
    let refused = client(&[&cert])
        .get(format!("{address}/healthz"))
        .send()
        .await;
    assert!(refused.is_err(), "still answering after the stop");
    let kept = store
        .find_event("drain-1", capi_bridge::delivery::now_ms())
        .await
        .expect("read the store");
    assert!(kept.is_some(), "the answered event was not stored");
}
