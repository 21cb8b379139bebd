//! The operator dashboard over HTTP, as a browser would talk to it but without one (the
//! Chromium run is `admin_browser`): login and its rate limit, the session cookie's
//! attributes, pages and forms refused without a session or with a forged CSRF token, replays,
//! the test event, and the page shown when the dashboard is off.

use std::io::Write as _;
use std::process::{Command, Stdio};

use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{lead, spawn_app_with, TestApp, WAIT};

pub const PASSWORD: &str = "operator-password-0123";

/// A client that shows redirects instead of following them, and keeps no cookies.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

pub async fn admin_app(extra: &[(&str, &str)]) -> TestApp {
    let mut env = vec![("ADMIN_PASSWORD", PASSWORD)];
    env.extend_from_slice(extra);
    spawn_app_with(&env).await
}

/// A logged-in session: the `Cookie` header value and the session's CSRF token.
struct Login {
    cookie: String,
    csrf: String,
}

async fn try_login(app: &TestApp, password: &str) -> reqwest::Response {
    client()
        .post(format!("{}/admin/login", app.address))
        .form(&[("password", password)])
        .send()
        .await
        .expect("login request")
}

async fn log_in(app: &TestApp) -> Login {
    let response = try_login(app, PASSWORD).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[LOCATION], "/admin");
    let set_cookie = response.headers()[SET_COOKIE]
        .to_str()
        .expect("ascii")
        .to_owned();
    let cookie = set_cookie.split(';').next().expect("name=value").to_owned();
    let page = get(app, "/admin", Some(&cookie)).await;
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.expect("html");
    Login {
        cookie,
        csrf: csrf_in(&html),
    }
}

/// The CSRF token in a page's forms.
fn csrf_in(html: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let start = html.find(marker).expect("a form with a CSRF token") + marker.len();
    let end = html[start..].find('"').expect("closing quote") + start;
    html[start..end].to_owned()
}

async fn get(app: &TestApp, path: &str, cookie: Option<&str>) -> reqwest::Response {
    let mut request = client().get(format!("{}{path}", app.address));
    if let Some(cookie) = cookie {
        request = request.header(COOKIE, cookie);
    }
    request.send().await.expect("request")
}

async fn post_form(
    app: &TestApp,
    path: &str,
    cookie: Option<&str>,
    form: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = client().post(format!("{}{path}", app.address)).form(form);
    if let Some(cookie) = cookie {
        request = request.header(COOKIE, cookie);
    }
    request.send().await.expect("request")
}

/// An event Meta refuses for good (the stand-in is told to), dead once delivery gives up.
async fn dead_event(app: &TestApp, event_id: &str) {
    app.graph.poison(event_id);
    let response = app.post_events(&lead(event_id)).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    app.wait_for_state(event_id, "dead").await;
}

#[tokio::test]
async fn without_an_admin_password_the_dashboard_is_off_and_says_how_to_turn_it_on() {
    let app = spawn_app_with(&[]).await;
    for path in ["/admin", "/admin/events", "/admin/login"] {
        let response = get(&app, path, None).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        let html = response.text().await.expect("html");
        assert!(html.contains("ADMIN_PASSWORD_HASH"), "{html}");
        assert!(html.contains("capi-bridge admin hash-password"), "{html}");
    }
    let response = try_login(&app, PASSWORD).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(response.headers().get(SET_COOKIE).is_none());
}

#[tokio::test]
async fn without_a_session_pages_redirect_to_the_login_and_posts_are_refused() {
    let app = admin_app(&[]).await;
    dead_event(&app, "no-session-1").await;
    for path in [
        "/admin",
        "/admin/events",
        "/admin/events/no-session-1",
        "/admin/dead",
        "/admin/test",
    ] {
        for cookie in [None, Some("capi_admin=made-up-session-id")] {
            let response = get(&app, path, cookie).await;
            assert_eq!(response.status(), StatusCode::SEE_OTHER, "{path}");
            assert_eq!(response.headers()[LOCATION], "/admin/login", "{path}");
        }
    }
    for path in [
        "/admin/events/no-session-1/retry",
        "/admin/dead/replay",
        "/admin/parked/replay",
        "/admin/test",
        "/admin/logout",
    ] {
        let response = post_form(&app, path, None, &[("csrf", "x"), ("reason", "")]).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    assert_eq!(
        app.stored("no-session-1").await.expect("stored").state,
        "dead",
        "nothing was replayed"
    );
    // A typed trailing slash leads to the overview (and so to the login).
    let response = get(&app, "/admin/", None).await;
    assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(response.headers()[LOCATION], "/admin");
    // The login page itself is open, and says nothing about the service.
    let response = get(&app, "/admin/login", None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let html = response.text().await.expect("html");
    assert!(html.contains("type=\"password\""), "{html}");
    assert!(!html.contains("no-session-1"));
}

#[tokio::test]
async fn a_wrong_password_is_refused_and_logins_from_one_address_are_rate_limited() {
    let app = admin_app(&[]).await;
    for _ in 0..5 {
        let response = try_login(&app, "not-the-password").await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.headers().get(SET_COOKIE).is_none());
        let html = response.text().await.expect("html");
        assert!(html.contains("not the admin password"), "{html}");
    }
    // The sixth attempt within the minute is not even checked, the right password included.
    let response = try_login(&app, PASSWORD).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(response.headers().get(SET_COOKIE).is_none());
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
}

#[tokio::test]
async fn the_session_cookie_is_http_only_same_site_strict_scoped_to_admin_and_expires() {
    let app = admin_app(&[]).await;
    let response = try_login(&app, PASSWORD).await;
    let cookie = response.headers()[SET_COOKIE].to_str().expect("ascii");
    let attributes: Vec<&str> = cookie.split(';').map(str::trim).collect();
    assert!(attributes[0].starts_with("capi_admin="), "{cookie}");
    assert!(attributes[0].len() > "capi_admin=".len() + 40, "{cookie}");
    for expected in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/admin",
        "Max-Age=43200",
    ] {
        assert!(attributes.contains(&expected), "{expected} in {cookie}");
    }
    assert!(!attributes.contains(&"Secure"), "plain http: {cookie}");

    // X-Forwarded-Proto counts only from a proxy the configuration declares.
    let forwarded_login = |app: &TestApp| {
        client()
            .post(format!("{}/admin/login", app.address))
            .header("x-forwarded-proto", "https")
            .form(&[("password", PASSWORD)])
            .send()
    };
    let response = forwarded_login(&app).await.expect("login");
    assert!(!response.headers()[SET_COOKIE]
        .to_str()
        .expect("ascii")
        .contains("Secure"));
    let behind_proxy = admin_app(&[("CLIENT_IP_SOURCE", "x-forwarded-for")]).await;
    let response = forwarded_login(&behind_proxy).await.expect("login");
    assert!(response.headers()[SET_COOKIE]
        .to_str()
        .expect("ascii")
        .ends_with("; Secure"));
    let forced = admin_app(&[
        ("ADMIN_COOKIE_SECURE", "true"),
        ("ADMIN_SESSION_HOURS", "2"),
    ])
    .await;
    let response = try_login(&forced, PASSWORD).await;
    let cookie = response.headers()[SET_COOKIE].to_str().expect("ascii");
    assert!(cookie.ends_with("; Secure"), "{cookie}");
    assert!(cookie.contains("Max-Age=7200"), "{cookie}");
}

#[tokio::test]
async fn every_response_forbids_framing_caching_and_scripts() {
    let app = admin_app(&[]).await;
    let login = log_in(&app).await;
    for response in [
        get(&app, "/admin/login", None).await,
        get(&app, "/admin", Some(&login.cookie)).await,
    ] {
        let headers = response.headers();
        let policy = headers["content-security-policy"].to_str().expect("ascii");
        assert!(policy.contains("default-src 'none'"), "{policy}");
        assert!(!policy.contains("script-src"), "{policy}");
        assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
        assert_eq!(headers["x-frame-options"], "DENY");
        assert_eq!(headers["cache-control"], "no-store");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        let html = response.text().await.expect("html");
        assert!(!html.contains("<script"), "no script on any page");
    }
}

#[tokio::test]
async fn a_post_without_the_sessions_csrf_token_is_refused_and_changes_nothing() {
    let app = admin_app(&[]).await;
    dead_event(&app, "csrf-1").await;
    app.graph.clear_poison();
    let login = log_in(&app).await;
    let other = log_in(&app).await;
    assert_ne!(login.csrf, other.csrf, "a token per session");

    let retry = "/admin/events/csrf-1/retry";
    for form in [
        vec![],
        vec![("csrf", "")],
        vec![("csrf", "forged-token-0123456789")],
        vec![("csrf", other.csrf.as_str())],
    ] {
        let response = post_form(&app, retry, Some(&login.cookie), &form).await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{form:?}");
        let html = response.text().await.expect("html");
        assert!(html.contains("security token"), "{html}");
    }
    assert_eq!(app.stored("csrf-1").await.expect("stored").state, "dead");
    assert_eq!(app.graph.accepted_count(), 0);

    let response = post_form(&app, retry, Some(&login.cookie), &[("csrf", &login.csrf)]).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        response.headers()[LOCATION],
        "/admin/events/csrf-1?retried=1"
    );
    app.graph
        .wait_until(WAIT, "the replayed event at Meta", |g| {
            g.accepted().iter().any(|e| e["event_id"] == "csrf-1")
        })
        .await;
}

#[tokio::test]
async fn logging_out_ends_the_session() {
    let app = admin_app(&[]).await;
    let login = log_in(&app).await;
    let response = post_form(
        &app,
        "/admin/logout",
        Some(&login.cookie),
        &[("csrf", &login.csrf)],
    )
    .await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[LOCATION], "/admin/login");
    let cleared = response.headers()[SET_COOKIE].to_str().expect("ascii");
    assert!(
        cleared.starts_with("capi_admin=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );
    let response = get(&app, "/admin", Some(&login.cookie)).await;
    assert_eq!(
        response.status(),
        StatusCode::SEE_OTHER,
        "the old cookie is dead"
    );
}

#[tokio::test]
async fn the_pages_show_events_dead_letters_and_replay_a_group() {
    let app = admin_app(&[]).await;
    for id in ["pages-ok-1", "pages-ok-2"] {
        app.post_events(&lead(id)).await;
        app.wait_for_state(id, "delivered").await;
    }
    dead_event(&app, "pages-dead-1").await;
    dead_event(&app, "pages-dead-2").await;
    let login = log_in(&app).await;
    let cookie = Some(login.cookie.as_str());

    let overview = get(&app, "/admin", cookie)
        .await
        .text()
        .await
        .expect("html");
    for (metric, value) in [
        ("hour-accepted", 4),
        ("hour-delivered", 2),
        ("hour-dead", 2),
        ("day-accepted", 4),
        ("queued", 0),
        ("delivered", 2),
    ] {
        assert!(
            overview.contains(&format!("data-metric=\"{metric}\">{value}<")),
            "{metric} = {value} in {overview}"
        );
    }
    assert!(overview.contains("state-running"), "the pixel runs");
    assert!(
        overview.contains("2804050"),
        "Meta's refusal among the errors"
    );

    let from_api = get(&app, "/admin/events?source=api", cookie)
        .await
        .text()
        .await
        .expect("html");
    assert!(from_api.contains("pages-ok-1") && from_api.contains("pages-dead-2"));
    let from_elsewhere = get(&app, "/admin/events?source=chatwoot", cookie)
        .await
        .text()
        .await
        .expect("html");
    assert!(
        from_elsewhere.contains("No events match"),
        "{from_elsewhere}"
    );
    let list = get(&app, "/admin/events?state=dead", cookie)
        .await
        .text()
        .await
        .expect("html");
    assert!(list.contains("pages-dead-1") && list.contains("pages-dead-2"));
    assert!(!list.contains("pages-ok-1"));
    let bad = get(&app, "/admin/events?from=yesterday", cookie)
        .await
        .text()
        .await
        .expect("html");
    assert!(bad.contains("Received from must be a date"), "{bad}");

    let detail = get(&app, "/admin/events/pages-dead-1", cookie).await;
    assert_eq!(detail.status(), StatusCode::OK);
    let detail = detail.text().await.expect("html");
    assert!(detail.contains("Replay this event"));
    assert!(detail.contains("&quot;em&quot;"), "the payload is shown");
    assert!(!detail.contains("pages-dead-1@example.com"), "hashed only");
    let missing = get(&app, "/admin/events/nope", cookie).await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);

    let dead = get(&app, "/admin/dead", cookie)
        .await
        .text()
        .await
        .expect("html");
    assert!(dead.contains("data-metric=\"dead-count\">2<"), "{dead}");
    let reason = app
        .stored("pages-dead-1")
        .await
        .and_then(|d| d.last_error)
        .expect("a reason");
    app.graph.clear_poison();
    let response = post_form(
        &app,
        "/admin/dead/replay",
        cookie,
        &[("csrf", &login.csrf), ("reason", &reason)],
    )
    .await;
    assert_eq!(response.headers()[LOCATION], "/admin/dead?replayed=2");
    app.graph
        .wait_until(WAIT, "both replayed events at Meta", |g| {
            let ids: Vec<_> = g.accepted().iter().map(|e| e["event_id"].clone()).collect();
            ids.contains(&json!("pages-dead-1")) && ids.contains(&json!("pages-dead-2"))
        })
        .await;
}

#[tokio::test]
async fn parked_payloads_are_grouped_by_problem_and_replayed_by_group() {
    let app = admin_app(&[]).await;
    // Two payloads with the same problem (no customer information), queued as enqueue() would.
    for n in 0..2 {
        app.store
            .enqueue_inbox(
                "sql",
                &json!({"event_name": "Lead", "event_id": format!("parked-{n}")}),
                capi_bridge::delivery::now_ms(),
            )
            .await
            .expect("enqueue");
    }
    let login = log_in(&app).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let page = loop {
        let page = get(&app, "/admin/dead", Some(&login.cookie))
            .await
            .text()
            .await
            .expect("html");
        if page.contains("name=\"group\" value=\"") && page.contains("Replay 2") {
            break page;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never parked: {page}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let marker = "name=\"group\" value=\"";
    let start = page.find(marker).expect("group") + marker.len();
    let group = &page[start..start + page[start..].find('"').expect("quote")];
    assert_ne!(group, "all");
    let response = post_form(
        &app,
        "/admin/parked/replay",
        Some(&login.cookie),
        &[("csrf", &login.csrf), ("group", group)],
    )
    .await;
    assert_eq!(response.headers()[LOCATION], "/admin/dead?replayed=2");
}

#[tokio::test]
async fn a_test_event_goes_to_meta_with_the_code_and_shows_metas_answer() {
    let app = admin_app(&[]).await;
    let login = log_in(&app).await;
    let form = |code: &'static str| {
        [
            ("csrf", login.csrf.clone()),
            ("pixel", crate::helpers::PIXEL.to_owned()),
            ("event_name", "Purchase".to_owned()),
            ("test_event_code", code.to_owned()),
        ]
    };
    let send = |form: [(&'static str, String); 4]| {
        client()
            .post(format!("{}/admin/test", app.address))
            .header(COOKIE, &login.cookie)
            .form(&form)
            .send()
    };
    let response = send(form("TEST4242")).await.expect("send");
    assert_eq!(response.status(), StatusCode::OK);
    let html = response.text().await.expect("html");
    assert!(html.contains("data-outcome=\"received\""), "{html}");
    assert!(html.contains("events_received 1"), "{html}");
    let requests = app.graph.requests();
    let sent = requests.last().expect("a request to Meta");
    assert_eq!(sent.body["test_event_code"], "TEST4242");
    assert_eq!(sent.body["data"][0]["event_name"], "Purchase");
    assert!(
        app.store
            .list_events(
                &capi_bridge::store::EventQuery {
                    limit: 10,
                    ..Default::default()
                },
                capi_bridge::delivery::now_ms()
            )
            .await
            .expect("list")
            .is_empty(),
        "a test event is not stored"
    );

    // Meta's refusal is shown with its code.
    app.graph.set_valid_token("another-token");
    let html = send(form("TEST4242"))
        .await
        .expect("send")
        .text()
        .await
        .expect("html");
    assert!(html.contains("data-outcome=\"refused\""), "{html}");
    assert!(html.contains("(190/"), "{html}");

    let response = send(form("not a code!")).await.expect("send");
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn in_dry_run_the_test_page_says_no_pixel_is_configured() {
    let app = admin_app(&[("META_ACCESS_TOKEN", ""), ("META_PIXEL_ID", "")]).await;
    let login = log_in(&app).await;
    let html = get(&app, "/admin/test", Some(&login.cookie))
        .await
        .text()
        .await
        .expect("html");
    assert!(html.contains("No pixel is configured"), "{html}");
    let overview = get(&app, "/admin", Some(&login.cookie))
        .await
        .text()
        .await
        .expect("html");
    assert!(overview.contains("dry run"), "{overview}");
}

#[tokio::test]
async fn a_hash_from_the_cli_logs_in_and_the_plain_password_is_not_needed() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_capi-bridge"))
        .args(["admin", "hash-password"])
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run capi-bridge");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{PASSWORD}\n").as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("output");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hash = String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned();
    assert!(hash.starts_with("$argon2id$v=19$"), "{hash}");
    assert!(!hash.contains(PASSWORD));

    let app = spawn_app_with(&[("ADMIN_PASSWORD_HASH", &hash)]).await;
    assert_eq!(
        try_login(&app, "operator-password-0124").await.status(),
        StatusCode::UNAUTHORIZED
    );
    log_in(&app).await;
}

#[tokio::test]
async fn a_failed_event_waiting_for_its_retry_is_sent_at_once_from_its_page() {
    // Retries an hour apart: only the button can make it go sooner.
    let app = admin_app(&[
        ("DELIVERY_RETRY_BASE_MS", "3600000"),
        ("DELIVERY_RETRY_MAX_MS", "3600000"),
    ])
    .await;
    app.graph.script([crate::graph_stand_in::Scripted::Raw(
        503,
        "upstream unavailable".to_owned(),
    )]);
    app.post_events(&lead("failed-1")).await;
    let failed = app.wait_for_state("failed-1", "failed").await;
    assert!(failed
        .next_attempt_at
        .is_some_and(|at| at > capi_bridge::delivery::now_ms() + 60_000));
    let login = log_in(&app).await;
    let page = get(&app, "/admin/events/failed-1", Some(&login.cookie))
        .await
        .text()
        .await
        .expect("html");
    assert!(page.contains("Retry now"), "{page}");
    let response = post_form(
        &app,
        "/admin/events/failed-1/retry",
        Some(&login.cookie),
        &[("csrf", &login.csrf)],
    )
    .await;
    assert_eq!(
        response.headers()[LOCATION],
        "/admin/events/failed-1?retried=1"
    );
    app.wait_for_state("failed-1", "delivered").await;
    let page = get(
        &app,
        "/admin/events/failed-1?retried=1",
        Some(&login.cookie),
    )
    .await
    .text()
    .await
    .expect("html");
    assert!(page.contains("Queued again"), "{page}");
    assert!(page.contains("503"), "the failed attempt is listed: {page}");
}

#[tokio::test]
async fn served_over_native_https_the_cookie_is_secure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("self-sign");
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).expect("write");
    std::fs::write(&key_file, key.serialize_pem()).expect("write");
    let app = admin_app(&[
        ("TLS_CERT_FILE", cert_file.to_str().expect("path")),
        ("TLS_KEY_FILE", key_file.to_str().expect("path")),
    ])
    .await;
    assert!(app.address.starts_with("https://"), "{}", app.address);
    let https = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .add_root_certificate(reqwest::Certificate::from_pem(cert.pem().as_bytes()).expect("pem"))
        .build()
        .expect("client");
    let response = https
        .post(format!("{}/admin/login", app.address))
        .form(&[("password", PASSWORD)])
        .send()
        .await
        .expect("login over https");
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let cookie = response.headers()[SET_COOKIE].to_str().expect("ascii");
    assert!(cookie.ends_with("; Secure"), "{cookie}");
}

#[tokio::test]
async fn match_quality_shows_the_share_of_each_key_and_the_dropped_values() {
    let app = admin_app(&[]).await;
    for id in ["quality-1", "quality-2"] {
        assert_eq!(
            app.post_events(&lead(id)).await.status(),
            StatusCode::ACCEPTED
        );
    }
    let mut with_bad_phone = lead("quality-3");
    with_bad_phone["phone"] = json!("12");
    assert_eq!(
        app.post_events(&with_bad_phone).await.status(),
        StatusCode::ACCEPTED
    );
    let login = log_in(&app).await;
    // The counters are written once a second, maybe between two of the three requests: wait
    // until all three events are counted (not just the first ones, whose email share is
    // already 100%).
    let deadline = tokio::time::Instant::now() + WAIT;
    let page = loop {
        let page = get(&app, "/admin/quality?days=1", Some(&login.cookie))
            .await
            .text()
            .await
            .expect("html");
        if page.contains("<td class=\"num\" data-label=\"Events\">3</td>") {
            break page;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never counted: {page}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(
        page.contains("aria-current=\"page\">Match quality"),
        "in the navigation"
    );
    assert!(
        page.contains("data-metric=\"quality-Lead-em\">100%"),
        "{page}"
    );
    assert!(
        page.contains("data-metric=\"quality-Lead-ph\">0%"),
        "{page}"
    );
    assert!(
        page.contains("<td class=\"mono\" data-label=\"Field\">ph</td>"),
        "the dropped phone: {page}"
    );
    assert!(
        !page.contains(">12<"),
        "the dropped value itself is never shown"
    );
    assert!(page.contains("Meta's Event Match Quality"));
}
