//! The binary as users run it: `hash`, `check`, `send`, `replay`, configuration errors, and a
//! graceful SIGTERM.

use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};

use crate::graph_stand_in::GraphStandIn;
use crate::helpers::{sha256, PIXEL, SECRET, TOKEN, WAIT};

/// The binary in a clean environment, run from `dir` so no developer `.env` leaks in.
fn capi_bridge(dir: &std::path::Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_capi-bridge"));
    command
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("run capi-bridge")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn hash_prints_the_normalized_value_and_metas_documented_hash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = capi_bridge(dir.path(), &[], &["hash", "em", "  John_Smith@gmail.com "]);
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    assert!(stdout.contains("john_smith@gmail.com"), "{stdout}");
    assert!(stdout.contains("62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"));

    // A national number is refused without a country, and completed with DEFAULT_COUNTRY.
    let out = capi_bridge(dir.path(), &[], &["hash", "ph", "(650)555-1212"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("country"),
        "{}",
        text(&out.stderr)
    );
    let out = capi_bridge(
        dir.path(),
        &[("DEFAULT_COUNTRY", "US")],
        &["hash", "ph", "(650)555-1212"],
    );
    assert!(out.status.success());
    assert!(text(&out.stdout)
        .contains("e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"));

    let out = capi_bridge(dir.path(), &[], &["hash", "email", "a@b.com"]);
    assert_eq!(out.status.code(), Some(2), "unknown field name");
}

#[test]
fn invalid_configuration_fails_at_start_with_one_line_per_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = capi_bridge(
        dir.path(),
        &[
            ("LISTEN_ADDR", "0.0.0.0:8080"),
            ("META_API_VERSION", "25"),
            ("META_PIXEL_ID", "1"),
        ],
        &["serve"],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    let problems: Vec<_> = stderr
        .lines()
        .filter(|l| l.trim_start().starts_with("- "))
        .collect();
    assert_eq!(problems.len(), 3, "{stderr}");
    assert!(stderr.contains("WEBHOOK_SECRET"));
    assert!(stderr.contains("META_API_VERSION"));
    assert!(stderr.contains("META_ACCESS_TOKEN"));
}

#[test]
fn check_and_migrate_work_on_postgres_in_their_own_schema() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let schema = format!("cli_{}", hex::encode(rand::random::<[u8; 6]>()));
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("DATABASE_SCHEMA", schema.as_str()),
    ];
    let out = capi_bridge(dir.path(), &env, &["migrate"]);
    let check = capi_bridge(dir.path(), &env, &["check"]);
    // Clean up before asserting, so a failure leaves nothing behind.
    let dropped = Command::new("psql")
        .args([
            url.as_str(),
            "-q",
            "-c",
            &format!("drop schema if exists {schema} cascade"),
        ])
        .output();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("storage migrated"));
    assert!(check.status.success(), "{}", text(&check.stdout));
    assert!(text(&check.stdout).contains("storage: ok"));
    assert!(
        dropped.is_ok_and(|o| o.status.success()),
        "schema {schema} not dropped"
    );
}

#[test]
fn the_env_local_file_is_read_and_the_real_environment_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(".env.local"), "DEFAULT_COUNTRY=GB\n").expect("write");
    let out = capi_bridge(dir.path(), &[], &["hash", "ph", "020 7946 0958"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("442079460958"));
    let out = capi_bridge(
        dir.path(),
        &[("DEFAULT_COUNTRY", "US")],
        &["hash", "ph", "020 7946 0958"],
    );
    assert!(
        !out.status.success(),
        "a US reading of a UK number is refused"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_proves_the_token_reaches_the_pixel() {
    let graph = GraphStandIn::start(TOKEN, PIXEL).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let env = [
        ("META_ACCESS_TOKEN", TOKEN),
        ("META_PIXEL_ID", PIXEL),
        ("META_GRAPH_URL", graph.url.as_str()),
    ];
    let out = tokio::task::block_in_place(|| capi_bridge(dir.path(), &env, &["check"]));
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("meta: ok"));

    graph.set_valid_token("another");
    let out = tokio::task::block_in_place(|| capi_bridge(dir.path(), &env, &["check"]));
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("190"), "{stdout}");
    assert!(!stdout.contains(TOKEN), "the token is never printed");
}

#[tokio::test(flavor = "multi_thread")]
async fn send_delivers_one_event_and_replay_requeues_a_dead_one() {
    let graph = GraphStandIn::start(TOKEN, PIXEL).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let env = [
        ("META_ACCESS_TOKEN", TOKEN),
        ("META_PIXEL_ID", PIXEL),
        ("META_GRAPH_URL", graph.url.as_str()),
    ];
    let out = tokio::task::block_in_place(|| {
        capi_bridge(
            dir.path(),
            &env,
            &[
                "send",
                "--event-name",
                "Lead",
                "--event-id",
                "cli-1",
                "--email",
                "Cli@Example.com",
            ],
        )
    });
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let sent = graph.wait_for_accepted(1, WAIT).await;
    assert_eq!(sent[0]["event_id"], "cli-1");
    assert_eq!(
        sent[0]["user_data"]["em"][0],
        sha256("cli@example.com").as_str()
    );

    // An event Meta rejects ends up dead; replay (after a fix) queues it again.
    graph.poison("cli-2");
    let out = tokio::task::block_in_place(|| {
        capi_bridge(
            dir.path(),
            &env,
            &[
                "send",
                "--event-name",
                "Lead",
                "--event-id",
                "cli-2",
                "--email",
                "b@example.com",
            ],
        )
    });
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("\"dead\""));

    let out = tokio::task::block_in_place(|| capi_bridge(dir.path(), &env, &["replay"]));
    assert_eq!(out.status.code(), Some(2), "replay needs --id or --all");
    let out = tokio::task::block_in_place(|| {
        capi_bridge(
            dir.path(),
            &env,
            &["replay", "--all", "--reason-contains", "2804050"],
        )
    });
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("requeued 1"),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_the_server_gracefully_after_in_flight_work() {
    let graph = GraphStandIn::start(TOKEN, PIXEL).await;
    graph.set_latency(std::time::Duration::from_millis(300));
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_capi-bridge"))
        .current_dir(dir.path())
        .env_clear()
        .env("LISTEN_ADDR", &listen)
        .env("META_ACCESS_TOKEN", TOKEN)
        .env("META_PIXEL_ID", PIXEL)
        .env("META_GRAPH_URL", &graph.url)
        .env("WEBHOOK_SECRET", SECRET)
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "debug")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let up = http.get(format!("http://{listen}/healthz")).send().await;
        if up.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "server never came up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let response = http
        .post(format!("http://{listen}/v1/events"))
        .bearer_auth(SECRET)
        .json(&json!({
            "event_name": "Lead", "event_id": "term-1", "email": "Distinctive.Person@Example.com",
            "phone": "+55 11 98765-4321", "first_name": "Zebediah", "client_ip_address": "203.0.113.77",
            "client_user_agent": "DistinctiveAgent/9.9", "event_time": chrono::Utc::now().timestamp()
        }))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 202);
    // Stop while the delivery is in flight (the stand-in takes 300 ms to answer).
    graph
        .wait_until(WAIT, "the delivery request", |g| g.request_count() >= 1)
        .await;
    let pid = child.id().expect("pid").to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits in time")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
    // The in-flight delivery finished and was recorded before exit.
    assert_eq!(graph.accepted_count(), 1);
    let db = format!("sqlite://{}", dir.path().join("capi-bridge.db").display());
    let store = capi_bridge::store::open(&db, "capi_bridge")
        .await
        .expect("open");
    let detail = store
        .find_event("term-1", capi_bridge::delivery::now_ms())
        .await
        .expect("find")
        .expect("stored");
    assert_eq!(detail.state, "delivered");

    // Logs: one JSON object per line, even at debug level, and no personal data or secrets,
    // raw or hashed.
    let mut stderr = String::new();
    use tokio::io::AsyncReadExt as _;
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .await
        .expect("read logs");
    // Debug level really was on (request spans and per-request lines are there to inspect).
    assert!(stderr.contains("events accepted"), "{stderr}");
    for line in stderr.lines() {
        let parsed: Result<Value, _> = serde_json::from_str(line);
        assert!(parsed.is_ok(), "not JSON: {line}");
    }
    for secret in [
        TOKEN,
        SECRET,
        "distinctive",
        "Distinctive",
        "98765",
        "Zebediah",
        "zebediah",
        "203.0.113.77",
        "DistinctiveAgent",
        &sha256("distinctive.person@example.com"),
        &sha256("5511987654321"),
        &sha256("zebediah"),
    ] {
        assert!(!stderr.contains(secret), "{secret:?} appears in the logs");
    }
}

#[test]
fn send_reads_an_event_as_json_from_stdin_and_refuses_invalid_ones() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |input: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_capi-bridge"))
            .arg("send")
            .current_dir(dir.path())
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
        child.wait_with_output().expect("output")
    };
    // Without credentials this is a dry run: validated, hashed, stored, shown.
    let out =
        run(r#"{"event_name":"purchase","email":"a@example.com","value":"9.90","currency":"brl"}"#);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: Value = serde_json::from_str(&text(&out.stdout)).expect("a JSON report");
    assert_eq!(report["events"][0]["status"], "dry_run");
    assert_eq!(report["events"][0]["event_name"], "Purchase");

    let out = run(r#"{"event_name":"Purchase","email":"a@example.com"}"#);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("custom_data.value"),
        "{}",
        text(&out.stderr)
    );

    let out = run("not json");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not JSON"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn rules_test_prints_what_a_sample_payload_would_send_or_why_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        r#"
        [[rules]]
        name = "lead-created"
        source = "supabase"
        when = 'type == "INSERT" && table == "leads"'
        event = "Lead"
        fields.event_id = '"lead-" + string(record.id)'
        fields.email = "record.email"
        fields.phone = "record.phone"

        [[rules]]
        name = "lead-won"
        source = "supabase"
        when = 'type == "UPDATE" && record.status == "won"'
        event = "Purchase"
        fields.email = "record.email"
        fields.value = "record.deal_valeu"
        fields.currency = '"BRL"'
        "#,
    )
    .expect("write rules");
    let samples = format!("{}/tests/samples", env!("CARGO_MANIFEST_DIR"));
    let env = [("RULES_FILE", rules.to_str().expect("path"))];
    let run = |file: &str| {
        let output = capi_bridge(
            dir.path(),
            &env,
            &[
                "rules",
                "test",
                "--source",
                "supabase",
                &format!("{samples}/{file}"),
            ],
        );
        let printed: Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|_| panic!("JSON on stdout: {}", text(&output.stderr)));
        (output.status.code(), printed)
    };

    let (code, insert) = run("supabase-leads-insert.json");
    assert_eq!(code, Some(0));
    assert_eq!(insert["outcome"], "events");
    let data = &insert["events"][0]["data"];
    assert_eq!(data["event_id"], "lead-1");
    assert_eq!(
        data["user_data"]["em"],
        json!([sha256("ana.souza@example.com")])
    );
    assert!(
        !insert.to_string().contains("Ana.Souza"),
        "only hashed values: {insert}"
    );

    let (code, won) = run("supabase-leads-update-won.json");
    assert_eq!(code, Some(1));
    assert_eq!(won["outcome"], "parked");
    assert_eq!(won["problems"][0]["rule"], "lead-won");
    assert_eq!(won["problems"][0]["field"], "fields.value");

    let (code, delete) = run("supabase-leads-delete.json");
    assert_eq!(code, Some(0));
    assert_eq!(delete["outcome"], "unmatched");
    // Nothing was stored: no database file was even needed beyond migrations.
    assert!(!dir.path().join("capi-bridge.db").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn source_and_page_paths_log_no_personal_data_or_tokens() {
    const URL_TOKEN: &str = "distinctive-url-token-0123456789";
    let graph = GraphStandIn::start(TOKEN, PIXEL).await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("rules.toml"),
        r#"
        [[rules]]
        name = "lead"
        source = "supabase"
        event = "Lead"
        fields.event_id = '"lead-" + string(record.id)'
        fields.email = "record.email"
        fields.phone = "record.phone"
        fields.full_name = "record.name"
        fields.client_ip_address = "record.ip"
        fields.client_user_agent = "record.ua"
        "#,
    )
    .expect("rules");
    std::fs::write(
        dir.path().join("capi-bridge.toml"),
        "[sites.pk_log_test]\norigins = [\"https://shop.example.com\"]\n",
    )
    .expect("config");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_capi-bridge"))
        .current_dir(dir.path())
        .env_clear()
        .env("LISTEN_ADDR", &listen)
        .env("META_ACCESS_TOKEN", TOKEN)
        .env("META_PIXEL_ID", PIXEL)
        .env("META_GRAPH_URL", &graph.url)
        .env("WEBHOOK_SECRET", SECRET)
        .env("SUPABASE_WEBHOOK_TOKEN", URL_TOKEN)
        .env("RULES_FILE", "rules.toml")
        .env("CAPI_BRIDGE_CONFIG", "capi-bridge.toml")
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "debug")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !http
        .get(format!("http://{listen}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "server never came up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let webhook = json!({"type": "INSERT", "table": "leads", "schema": "public", "old_record": null,
        "record": {"id": 7, "email": "Distinctive.Person@Example.com", "phone": "+55 11 98765-4321",
                   "name": "Zebediah Quux", "ip": "203.0.113.77", "ua": "DistinctiveAgent/9.9"}});
    let response = http
        .post(format!("http://{listen}/v1/sources/supabase/{URL_TOKEN}"))
        .json(&webhook)
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 202);
    let beacon = json!({"site_key": "pk_log_test", "event_name": "Lead", "event_id": "page-7",
        "event_source_url": "https://shop.example.com/lp", "email": "Distinctive.Person@Example.com"});
    let response = http
        .post(format!("http://{listen}/v1/collect"))
        .header("content-type", "text/plain")
        .header("origin", "https://shop.example.com")
        .header("user-agent", "DistinctiveAgent/9.9")
        .body(beacon.to_string())
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 204);
    graph.wait_for_accepted(2, WAIT).await;

    let pid = child.id().expect("pid").to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits in time")
        .expect("wait");
    let mut stderr = String::new();
    use tokio::io::AsyncReadExt as _;
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .await
        .expect("read logs");
    assert!(
        stderr.contains("/v1/sources/"),
        "debug request spans are on: {stderr}"
    );
    for secret in [
        TOKEN,
        SECRET,
        URL_TOKEN,
        "distinctive.person",
        "Distinctive.Person",
        "98765",
        "Zebediah",
        "zebediah",
        "203.0.113.77",
        "DistinctiveAgent",
        &sha256("distinctive.person@example.com"),
        &sha256("5511987654321"),
        &sha256("zebediah"),
    ] {
        assert!(!stderr.contains(secret), "{secret:?} appears in the logs");
    }
}
