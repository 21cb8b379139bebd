//! Starting the service for a test, and talking to it.

use std::sync::Arc;
use std::time::Duration;

use capi_bridge::app::App;
use capi_bridge::config::{self, Env};
use capi_bridge::store::{EventDetail, Store};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::graph_stand_in::GraphStandIn;

pub const TOKEN: &str = "EAAB-test-token";
pub const PIXEL: &str = "1234567890";
pub const SECRET: &str = "test-webhook-secret-0123456789";
/// Generous bound for conditions the tests wait on (they wake as soon as the condition holds).
pub const WAIT: Duration = Duration::from_secs(30);

pub struct TestApp {
    pub address: String,
    pub graph: GraphStandIn,
    pub store: Arc<dyn Store>,
    pub http: reqwest::Client,
    pub dir: Arc<tempfile::TempDir>,
    env: Vec<(String, String)>,
    _schema: Option<Arc<PostgresSchemaGuard>>,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Environment for a test app: fast retries, short probe interval, the stand-in as Graph.
fn test_env(graph: &GraphStandIn, dir: &tempfile::TempDir) -> Vec<(String, String)> {
    let db = dir.path().join("capi-bridge.db");
    [
        ("LISTEN_ADDR", "127.0.0.1:0".to_owned()),
        ("DATABASE_URL", format!("sqlite://{}", db.display())),
        ("META_ACCESS_TOKEN", TOKEN.to_owned()),
        ("META_PIXEL_ID", PIXEL.to_owned()),
        ("META_GRAPH_URL", graph.url.clone()),
        ("WEBHOOK_SECRET", SECRET.to_owned()),
        ("DELIVERY_RETRY_BASE_MS", "20".to_owned()),
        ("DELIVERY_RETRY_MAX_MS", "200".to_owned()),
        ("DELIVERY_PAUSE_PROBE_INTERVAL_MS", "100".to_owned()),
        ("DELIVERY_POLL_INTERVAL_MS", "100".to_owned()),
        ("DELIVERY_REQUEST_TIMEOUT_MS", "5000".to_owned()),
        ("DELIVERY_LEASE_MS", "10000".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The service with credentials and a secret, delivering to a fresh stand-in.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// Like [`spawn_app`], with some variables changed (an empty value removes one).
pub async fn spawn_app_with(overrides: &[(&str, &str)]) -> TestApp {
    let graph = GraphStandIn::start(TOKEN, PIXEL).await;
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let mut env = test_env(&graph, &dir);
    for (key, value) in overrides {
        env.retain(|(k, _)| k != key);
        if !value.is_empty() {
            env.push(((*key).to_owned(), (*value).to_owned()));
        }
    }
    start(graph, dir, env).await
}

/// Like [`spawn_app_with`] for another pixel, with a stand-in that knows only that one: for
/// tests that read process-wide metrics by their own pixel's labels.
pub async fn spawn_app_for_pixel(pixel: &str, overrides: &[(&str, &str)]) -> TestApp {
    let graph = GraphStandIn::start(TOKEN, pixel).await;
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let mut env = test_env(&graph, &dir);
    let pixel = [("META_PIXEL_ID", pixel)];
    for (key, value) in pixel.iter().chain(overrides) {
        env.retain(|(k, _)| k != key);
        if !value.is_empty() {
            env.push(((*key).to_owned(), (*value).to_owned()));
        }
    }
    start(graph, dir, env).await
}

/// The service on the local Postgres, in a schema of its own that is dropped afterwards.
pub async fn spawn_app_on_postgres() -> TestApp {
    spawn_app_in_schema(&new_postgres_schema(), &[]).await
}

/// A fresh schema name on the test Postgres, dropped when the last handle goes.
pub fn new_postgres_schema() -> Arc<PostgresSchemaGuard> {
    let url = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    Arc::new(PostgresSchemaGuard {
        url,
        schema: format!("api_{}", hex::encode(rand::random::<[u8; 6]>())),
    })
}

/// The service in `schema` (several apps may share one: several instances), with overrides.
pub async fn spawn_app_in_schema(
    schema: &Arc<PostgresSchemaGuard>,
    overrides: &[(&str, &str)],
) -> TestApp {
    let mut env = vec![
        ("DATABASE_URL", schema.url.as_str()),
        ("DATABASE_SCHEMA", schema.schema.as_str()),
    ];
    env.extend_from_slice(overrides);
    let mut app = spawn_app_with(&env).await;
    app._schema = Some(schema.clone());
    app
}

/// Drops a test's Postgres schema when the last handle goes.
pub struct PostgresSchemaGuard {
    pub url: String,
    pub schema: String,
}

impl Drop for PostgresSchemaGuard {
    fn drop(&mut self) {
        // Not waited for: the app's tasks may still hold a transaction that only this test's
        // runtime (blocked while we wait) could finish. psql runs on, waits for those locks to
        // go when the runtime ends, and drops the schema, even after this process has exited.
        let spawned = std::process::Command::new("psql")
            .args([
                self.url.as_str(),
                "-q",
                "-c",
                &format!(
                    "set lock_timeout = '120s'; drop schema if exists {} cascade",
                    self.schema
                ),
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if spawned.is_err() {
            eprintln!("could not drop test schema {}", self.schema);
        }
    }
}

async fn start(
    graph: GraphStandIn,
    dir: Arc<tempfile::TempDir>,
    env: Vec<(String, String)>,
) -> TestApp {
    let config = config::load(&Env::from_pairs(env.clone()), None).expect("test config is valid");
    let app = App::build(config).await.expect("app builds");
    let scheme = if env.iter().any(|(k, _)| k == "TLS_CERT_FILE") {
        "https"
    } else {
        "http"
    };
    let address = format!("{scheme}://{}", app.local_addr().expect("addr"));
    let store = app.store.clone();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    TestApp {
        address,
        graph,
        store,
        http: reqwest::Client::new(),
        dir,
        env,
        _schema: None,
        shutdown,
        server,
    }
}

impl TestApp {
    /// POSTs `body` to `/v1/events` with the secret.
    pub async fn post_events(&self, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/events", self.address))
            .bearer_auth(SECRET)
            .json(body)
            .send()
            .await
            .expect("request")
    }

    /// POSTs raw bytes with optional auth header.
    pub async fn post_raw(
        &self,
        body: impl Into<reqwest::Body>,
        auth: Option<(&str, &str)>,
    ) -> reqwest::Response {
        let mut request = self
            .http
            .post(format!("{}/v1/events", self.address))
            .header("content-type", "application/json")
            .body(body);
        if let Some((name, value)) = auth {
            request = request.header(name, value);
        }
        request.send().await.expect("request")
    }

    /// GET `/v1/events/{id}` as JSON.
    pub async fn get_event(&self, event_id: &str) -> Value {
        self.http
            .get(format!("{}/v1/events/{event_id}", self.address))
            .bearer_auth(SECRET)
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json")
    }

    /// The Postgres URL and schema of an app from [`spawn_app_on_postgres`].
    pub fn postgres(&self) -> Option<(&str, &str)> {
        self._schema
            .as_deref()
            .map(|g| (g.url.as_str(), g.schema.as_str()))
    }

    /// `GET /readyz` as JSON.
    pub async fn readyz(&self) -> Value {
        self.http
            .get(format!("{}/readyz", self.address))
            .send()
            .await
            .expect("readyz")
            .json()
            .await
            .expect("json")
    }

    /// The stored event, straight from the store.
    pub async fn stored(&self, event_id: &str) -> Option<EventDetail> {
        self.store
            .find_event(event_id, capi_bridge::delivery::now_ms())
            .await
            .expect("store")
    }

    /// Waits until the stored event reaches `state`.
    pub async fn wait_for_state(&self, event_id: &str, state: &str) -> EventDetail {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(detail) = self.stored(event_id).await {
                if detail.state == state {
                    return detail;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "event {event_id} never reached {state}: {:?}",
                self.stored(event_id).await.map(|d| d.state)
            );
            // Polling a condition (the store has no change feed), not sleeping for an outcome.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the service gracefully (as SIGTERM does) and waits for it.
    pub async fn stop(
        self,
    ) -> (
        GraphStandIn,
        Arc<tempfile::TempDir>,
        Vec<(String, String)>,
        Option<Arc<PostgresSchemaGuard>>,
    ) {
        self.shutdown.cancel();
        self.server
            .await
            .expect("server task")
            .expect("server stopped cleanly");
        (self.graph, self.dir, self.env, self._schema)
    }

    /// Stops and starts the service again on the same database and stand-in.
    pub async fn restart(self) -> TestApp {
        let (graph, dir, env, schema) = self.stop().await;
        let mut app = start(graph, dir, env).await;
        app._schema = schema;
        app
    }
}

/// The original service's seed example, with a current `event_time`.
pub fn seed_event() -> Value {
    json!({
        "event_name": "Lead",
        "email": "user@example.com",
        "phone": "1234567890",
        "event_time": chrono::Utc::now().timestamp(),
        "custom_data": {"source": "Landing Page", "campaign": "Test Campaign"}
    })
}

/// A valid event with a known id.
pub fn lead(event_id: &str) -> Value {
    json!({
        "event_name": "Lead",
        "event_id": event_id,
        "email": format!("{event_id}@example.com"),
        "event_time": chrono::Utc::now().timestamp(),
    })
}

pub fn sha256(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}
