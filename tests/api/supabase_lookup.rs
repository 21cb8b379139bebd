//! Row lookups over Supabase's REST API, against a real HTTP server behaving like PostgREST.

use std::time::Duration;

use capi_bridge::config::{self, Env};
use capi_bridge::sources::supabase_rest::{KeyKind, LookupError, SupabaseRest, USER_AGENT};
use serde_json::{json, Value};

use crate::postgrest_stand_in::{PostgrestStandIn, UnknownTable};

/// A legacy `service_role` key (a JWT; the stand-in does not check signatures).
const JWT_KEY: &str =
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.c3RhbmQtaW4";
const SECRET_KEY: &str = "sb_secret_Zm9yLXRlc3RzLW9ubHktMDEyMzQ1Njc4OQ";
const TIMEOUT: Duration = Duration::from_secs(10);

fn leads() -> Vec<Value> {
    vec![
        json!({"id": 42, "email": "ana@example.com", "phone": "+55 11 98765-4321",
               "first_name": "Ana", "status": "new"}),
        json!({"id": 43, "email": "bruno@example.com", "phone": null,
               "first_name": "Bruno", "status": "won"}),
    ]
}

async fn stand_in(key: &str) -> PostgrestStandIn {
    let stand_in = PostgrestStandIn::start(key).await;
    stand_in.insert_table("leads", leads());
    stand_in
}

#[tokio::test]
async fn a_legacy_jwt_key_goes_in_apikey_and_authorization() {
    // Arrange
    let supabase = stand_in(JWT_KEY).await;
    let client = SupabaseRest::new(&supabase.url, JWT_KEY, TIMEOUT).expect("client");
    assert_eq!(client.key_kind(), KeyKind::LegacyJwt);

    // Act
    let row = client.fetch_row("leads", "id", "42").await.expect("lookup");

    // Assert
    assert_eq!(row.expect("found")["email"], "ana@example.com");
    let requests = supabase.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.status, 200);
    assert_eq!(request.path, "/rest/v1/leads");
    assert_eq!(request.query.as_deref(), Some("id=eq.42&select=*&limit=1"));
    assert_eq!(request.header("apikey"), Some(JWT_KEY));
    assert_eq!(
        request.header("authorization"),
        Some(format!("Bearer {JWT_KEY}").as_str())
    );
    assert_eq!(request.header("user-agent"), Some(USER_AGENT));
    assert!(USER_AGENT.starts_with("capi-bridge/"));
    assert_eq!(request.header("accept"), Some("application/json"));
    assert_eq!(request.header("accept-profile"), None);
}

#[tokio::test]
async fn an_sb_secret_key_goes_in_apikey_only_with_a_non_browser_user_agent() {
    let supabase = stand_in(SECRET_KEY).await;
    let client = SupabaseRest::new(&supabase.url, SECRET_KEY, TIMEOUT).expect("client");
    assert_eq!(client.key_kind(), KeyKind::Secret);

    let row = client
        .fetch_row("leads", "email", "bruno@example.com")
        .await
        .expect("lookup")
        .expect("found");

    assert_eq!(row["id"], 43);
    let request = &supabase.requests()[0];
    assert_eq!(request.header("apikey"), Some(SECRET_KEY));
    assert_eq!(request.header("authorization"), None);
    assert_eq!(request.header("user-agent"), Some(USER_AGENT));
}

#[tokio::test]
async fn the_stand_in_refuses_secret_keys_as_supabase_does() {
    // Proves the stand-in enforces §1.8, so the tests above mean something.
    let supabase = stand_in(SECRET_KEY).await;
    let http = reqwest::Client::new();
    let url = format!("{}/rest/v1/leads?id=eq.42&select=*&limit=1", supabase.url);
    let browser = http
        .get(&url)
        .header("apikey", SECRET_KEY)
        .header(
            "user-agent",
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_0) AppleWebKit/605.1.15",
        )
        .send()
        .await
        .expect("request");
    assert_eq!(browser.status(), 401);
    let bearer = http
        .get(&url)
        .header("apikey", SECRET_KEY)
        .bearer_auth(SECRET_KEY)
        .send()
        .await
        .expect("request");
    assert_eq!(bearer.status(), 401);
    let right = http
        .get(&url)
        .header("apikey", SECRET_KEY)
        .send()
        .await
        .expect("request");
    assert_eq!(right.status(), 200);

    // A JWT key without the bearer header is refused too.
    let supabase = stand_in(JWT_KEY).await;
    let url = format!("{}/rest/v1/leads?id=eq.42", supabase.url);
    let apikey_only = http
        .get(&url)
        .header("apikey", JWT_KEY)
        .send()
        .await
        .expect("request");
    assert_eq!(apikey_only.status(), 401);
}

#[tokio::test]
async fn a_wrong_key_is_a_clear_error_that_names_the_variable_but_not_the_key() {
    let supabase = stand_in(SECRET_KEY).await;
    let wrong = "sb_secret_this-is-not-the-project-key-0123";
    for (key, variable) in [
        (wrong, "SUPABASE_SERVICE_KEY"),
        (JWT_KEY, "SUPABASE_SERVICE_ROLE_KEY"),
    ] {
        let client = SupabaseRest::new(&supabase.url, key, TIMEOUT)
            .expect("client")
            .with_key_variable(variable);

        let err = client
            .fetch_row("leads", "email", "ana@example.com")
            .await
            .expect_err("refused");

        assert!(
            matches!(err, LookupError::KeyRefused { status: 401, .. }),
            "{err:?}"
        );
        let shown = err.to_string();
        assert!(shown.contains(variable), "{shown}");
        assert!(shown.contains("Invalid API key"), "{shown}");
        assert!(!shown.contains(key), "{shown}");
        assert!(!shown.contains("ana@example.com"), "{shown}");
        assert!(!format!("{err:?}").contains(key));
    }
}

#[tokio::test]
async fn a_missing_row_is_none() {
    let supabase = stand_in(SECRET_KEY).await;
    let client = SupabaseRest::new(&supabase.url, SECRET_KEY, TIMEOUT).expect("client");

    let row = client
        .fetch_row("leads", "email", "nobody@example.com")
        .await
        .expect("lookup");

    assert_eq!(row, None);
    // A null column never equals a value.
    assert_eq!(
        client
            .fetch_row("leads", "phone", "null")
            .await
            .expect("lookup"),
        None
    );
}

#[tokio::test]
async fn an_unknown_table_is_a_clear_error_in_both_postgrest_shapes() {
    let supabase = stand_in(JWT_KEY).await;
    let client = SupabaseRest::new(&supabase.url, JWT_KEY, TIMEOUT).expect("client");
    for (shape, code) in [
        (UnknownTable::SchemaCache, "PGRST205"),
        (UnknownTable::Relation, "42P01"),
    ] {
        supabase.set_unknown_table(shape);

        let err = client
            .fetch_row("lead", "id", "42")
            .await
            .expect_err("no such table");

        match &err {
            LookupError::TableNotFound {
                table,
                schema,
                server,
            } => {
                assert_eq!(table, "lead");
                assert_eq!(schema, "public");
                assert_eq!(server.code.as_deref(), Some(code));
            }
            other => panic!("expected TableNotFound, got {other:?}"),
        }
        let shown = err.to_string();
        assert!(shown.contains("\"lead\""), "{shown}");
        assert!(shown.contains("404"), "{shown}");
        assert!(shown.contains("exposed"), "{shown}");
    }
}

#[tokio::test]
async fn values_with_reserved_characters_round_trip() {
    // Each value is stored in a row and must find exactly that row.
    let values = [
        "Hebdon,John",
        "a.b.c",
        "f(x)",
        "ratio:1:2",
        "\"quoted\"",
        "back\\slash",
        "x&select=id",
        "a=b",
        "+5511987654321",
        "50% off",
        "two  spaces",
        "#hash?",
        "eq.nested",
        "not.eq.1",
        "São Paulo – 日本",
        "in.(1,2)",
        "*",
        "trailing.",
    ];
    let supabase = PostgrestStandIn::start(SECRET_KEY).await;
    supabase.insert_table(
        "contacts",
        values
            .iter()
            .enumerate()
            .map(|(i, v)| json!({"n": i, "external_ref": v}))
            .collect(),
    );
    let client = SupabaseRest::new(&supabase.url, SECRET_KEY, TIMEOUT).expect("client");

    for (i, value) in values.iter().enumerate() {
        let row = client
            .fetch_row("contacts", "external_ref", value)
            .await
            .expect("lookup")
            .unwrap_or_else(|| panic!("{value:?} not found"));
        assert_eq!(row["n"], i, "{value:?}");
        assert_eq!(row["external_ref"], *value);
    }
}

#[tokio::test]
async fn a_schema_goes_in_accept_profile() {
    let supabase = stand_in(SECRET_KEY).await;
    supabase.insert_table_in("crm", "deals", vec![json!({"id": "d-1", "value": 990})]);
    let client = SupabaseRest::new(&supabase.url, SECRET_KEY, TIMEOUT).expect("client");

    let row = client
        .clone()
        .with_schema("crm")
        .expect("schema")
        .fetch_row("deals", "id", "d-1")
        .await
        .expect("lookup");
    assert_eq!(row.expect("found")["value"], 990);
    assert_eq!(supabase.requests()[0].header("accept-profile"), Some("crm"));

    // A schema that is not exposed: PostgREST's own message.
    let err = client
        .with_schema("private")
        .expect("schema")
        .fetch_row("deals", "id", "d-1")
        .await
        .expect_err("not exposed");
    assert!(
        matches!(err, LookupError::Rejected { status: 406, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("PGRST106"), "{err}");
}

#[tokio::test]
async fn errors_never_show_the_key_or_the_looked_up_value() {
    let supabase = stand_in(JWT_KEY).await;
    let client = SupabaseRest::new(&supabase.url, JWT_KEY, TIMEOUT).expect("client");

    // Postgres quotes the value in its message; it is removed.
    let err = client
        .fetch_row("leads", "id", "ana@example.com")
        .await
        .expect_err("not a number");
    assert!(
        matches!(err, LookupError::Rejected { status: 400, .. }),
        "{err:?}"
    );
    let shown = err.to_string();
    assert!(shown.contains("22P02"), "{shown}");
    assert!(!shown.contains("ana@example.com"), "{shown}");
    assert!(!shown.contains(JWT_KEY), "{shown}");

    // An unknown column names the column (not data).
    let err = client
        .fetch_row("leads", "mail", "ana@example.com")
        .await
        .expect_err("no such column");
    let shown = err.to_string();
    assert!(shown.contains("42703") && shown.contains("mail"), "{shown}");
    assert!(!shown.contains("ana@example.com"), "{shown}");

    // A slow server: a timeout, named as such.
    supabase.set_latency(Duration::from_secs(5));
    let impatient =
        SupabaseRest::new(&supabase.url, JWT_KEY, Duration::from_millis(200)).expect("client");
    let err = impatient
        .fetch_row("leads", "email", "ana@example.com")
        .await
        .expect_err("timeout");
    assert!(matches!(err, LookupError::Timeout { .. }), "{err:?}");
    assert!(!err.to_string().contains(JWT_KEY));

    // Nobody listening: the transport error, without the URL (it holds the value).
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let unreachable =
        SupabaseRest::new(&format!("http://{closed}"), JWT_KEY, TIMEOUT).expect("client");
    let err = unreachable
        .fetch_row("leads", "email", "ana@example.com")
        .await
        .expect_err("unreachable");
    assert!(matches!(err, LookupError::Unreachable { .. }), "{err:?}");
    let shown = err.to_string();
    assert!(!shown.contains("ana"), "{shown}");
    assert!(!shown.contains(JWT_KEY), "{shown}");
    assert!(!format!("{err:?}").contains("ana"), "{err:?}");
}

#[tokio::test]
async fn names_that_could_inject_query_syntax_never_reach_the_server() {
    let supabase = stand_in(SECRET_KEY).await;
    let client = SupabaseRest::new(&supabase.url, SECRET_KEY, TIMEOUT).expect("client");
    for (table, column) in [
        ("leads?select=email&x", "id"),
        ("leads", "id=neq.0&or"),
        ("../admin", "id"),
        ("leads", "email->>x"),
    ] {
        let err = client
            .fetch_row(table, column, "1")
            .await
            .expect_err("invalid name");
        assert!(matches!(err, LookupError::InvalidName { .. }), "{err:?}");
    }
    assert!(supabase.requests().is_empty());
}

#[tokio::test]
async fn the_configuration_builds_a_working_client() {
    let supabase = stand_in(SECRET_KEY).await;
    let config = config::load(
        &Env::from_pairs([
            ("NEXT_PUBLIC_SUPABASE_URL", supabase.url.as_str()),
            ("SUPABASE_SECRET_KEY", SECRET_KEY),
        ]),
        None,
    )
    .expect("valid");
    let supabase_config = config.supabase.as_ref().expect("configured");
    let client = SupabaseRest::from_config(supabase_config, TIMEOUT).expect("client");

    let row = client
        .fetch_row("leads", "id", "42")
        .await
        .expect("lookup")
        .expect("found");
    assert_eq!(row["first_name"], "Ana");

    // Errors name the variable the key actually came from.
    let wrong = config::SupabaseApiConfig {
        service_key: "sb_secret_wrong-wrong-wrong-wrong".to_owned(),
        ..supabase_config.clone()
    };
    let err = SupabaseRest::from_config(&wrong, TIMEOUT)
        .expect("client")
        .fetch_row("leads", "id", "42")
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("SUPABASE_SECRET_KEY"), "{err}");
}
