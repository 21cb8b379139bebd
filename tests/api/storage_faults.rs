//! Storage faults for real: a full disk (a tmpfs made by the test), a database locked by
//! another process past the busy timeout, Postgres backends terminated under load. Whatever
//! happens, a 202 means the event is committed — visible to another connection, and delivered
//! after a kill -9 and restart.
#![cfg(unix)]

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use sqlx::Row as _;

use crate::graph_stand_in::GraphStandIn;
use crate::helpers::{lead, PIXEL, SECRET, TOKEN, WAIT};
use crate::process::{lock, Service};

/// Size of the test's filesystem: a few megabytes fill in a second or two.
const FILESYSTEM_MB: u32 = 6;

/// A tmpfs of [`FILESYSTEM_MB`], mounted for the test and unmounted when dropped. A real
/// filesystem that runs out of space, so SQLite gets a real `SQLITE_FULL`.
struct SmallFilesystem {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallFilesystem {
    fn mount() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("small");
        std::fs::create_dir(&path).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={FILESYSTEM_MB}m")])
            .arg("tmpfs")
            .arg(&path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a {FILESYSTEM_MB} MB tmpfs failed ({status}): this test fills a real \
             filesystem and needs to run as root (CI does)"
        );
        Self { path, _dir: dir }
    }

    /// Writes a file until the filesystem has no space left.
    fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).expect("create the filler");
        let block = vec![0xa5_u8; 64 * 1024];
        loop {
            if file.write_all(&block).is_err() {
                break;
            }
        }
        // The last partial blocks, so not even a page is left.
        let small = [0xa5_u8; 512];
        while file.write_all(&small).is_ok() {}
        filler
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

fn service_env(database_url: String, graph: &GraphStandIn) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", database_url),
        ("META_ACCESS_TOKEN", TOKEN.to_owned()),
        ("META_PIXEL_ID", PIXEL.to_owned()),
        ("META_GRAPH_URL", graph.url.clone()),
        ("WEBHOOK_SECRET", SECRET.to_owned()),
        ("DELIVERY_LEASE_MS", "2000".to_owned()),
        ("DELIVERY_REQUEST_TIMEOUT_MS", "2000".to_owned()),
        ("DELIVERY_RETRY_BASE_MS", "20".to_owned()),
        ("DELIVERY_RETRY_MAX_MS", "200".to_owned()),
        ("DELIVERY_POLL_INTERVAL_MS", "100".to_owned()),
        ("DELIVERY_PAUSE_PROBE_INTERVAL_MS", "200".to_owned()),
    ]
}

/// `n` leads with ids `{prefix}-{i}` in one request body.
fn leads(prefix: &str, n: usize) -> (Vec<String>, Value) {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let body = Value::Array(ids.iter().map(|id| lead(id)).collect());
    (ids, body)
}

/// POSTs `body`; the status, or 0 when the request itself failed.
async fn post(http: &reqwest::Client, service: &Service, body: &Value) -> u16 {
    http.post(format!("{}/v1/events", service.address))
        .bearer_auth(SECRET)
        .json(body)
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

async fn readyz(http: &reqwest::Client, service: &Service) -> (u16, Value) {
    let response = http
        .get(format!("{}/readyz", service.address))
        .send()
        .await
        .expect("GET /readyz");
    let status = response.status().as_u16();
    (status, response.json().await.expect("/readyz answers JSON"))
}

/// Which of `ids` another connection sees in the event table.
async fn visible_ids(database: &Path, ids: &BTreeSet<String>) -> BTreeSet<String> {
    let url = format!("sqlite://{}?mode=ro", database.display());
    let pool = sqlx::SqlitePool::connect(&url)
        .await
        .expect("open the database read-only");
    let mut seen = BTreeSet::new();
    for id in ids {
        let found = sqlx::query("select 1 from event where event_id = ?1")
            .bind(id)
            .fetch_optional(&pool)
            .await
            .expect("query the event table");
        if found.is_some() {
            seen.insert(id.clone());
        }
    }
    pool.close().await;
    seen
}

/// Another process's writer can take the write lock (nothing is left holding it).
async fn another_writer_can_write(database: &Path) -> Result<(), String> {
    use sqlx::ConnectOptions as _;
    let mut conn = format!("sqlite://{}", database.display())
        .parse::<sqlx::sqlite::SqliteConnectOptions>()
        .map_err(|e| e.to_string())?
        .busy_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let result = async {
        sqlx::query("begin immediate").execute(&mut conn).await?;
        sqlx::query("rollback").execute(&mut conn).await
    }
    .await;
    result.map(|_| ()).map_err(|e| e.to_string())
}

/// Waits until every id in `expected` was accepted by the stand-in; panics listing the missing.
async fn wait_until_delivered(graph: &GraphStandIn, expected: &BTreeSet<String>, what: &str) {
    let expected = Arc::new(expected.clone());
    let waiter = {
        let graph = graph.clone();
        let expected = expected.clone();
        tokio::spawn(async move {
            graph
                .wait_until(
                    WAIT * 2,
                    "every acknowledged event at the stand-in",
                    move |g| {
                        let accepted: BTreeSet<String> = g
                            .accepted()
                            .iter()
                            .filter_map(|e| e["event_id"].as_str().map(str::to_owned))
                            .collect();
                        expected.iter().all(|id| accepted.contains(id))
                    },
                )
                .await;
        })
    };
    let _ = waiter.await;
    let accepted: BTreeSet<String> = graph
        .accepted()
        .iter()
        .filter_map(|e| e["event_id"].as_str().map(str::to_owned))
        .collect();
    let missing: Vec<&String> = expected.difference(&accepted).collect();
    assert!(
        missing.is_empty(),
        "{what}: {} of {} acknowledged events never reached the Graph API, e.g. {:?}",
        missing.len(),
        expected.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_loses_no_acknowledged_event() {
    // Arrange: the database on a tiny real filesystem.
    let filesystem = SmallFilesystem::mount();
    let database = filesystem.path.join("capi-bridge.db");
    let graph = GraphStandIn::start(TOKEN, PIXEL).await;
    let http = client();
    let env = service_env(format!("sqlite://{}", database.display()), &graph);
    let logs = tempfile::tempdir().expect("tempdir");
    let mut first = Service::start("first", logs.path(), &env, &http).await;
    let mut acknowledged = BTreeSet::new();
    let (ids, body) = leads("before", 20);
    assert_eq!(post(&http, &first, &body).await, 202);
    acknowledged.extend(ids);

    // Act 1: fill the filesystem, then keep posting until the service refuses.
    let filler = filesystem.fill();
    let mut refused = 0;
    let mut after_first_refusal = 0;
    for round in 0..200 {
        let (ids, body) = leads(&format!("full-{round}"), 100);
        match post(&http, &first, &body).await {
            // Maybe true (SQLite reuses free pages); the visibility check below tells.
            202 => acknowledged.extend(ids),
            503 => refused += 1,
            other => panic!("a full disk must give 503, not {other}"),
        }
        if refused > 0 {
            after_first_refusal += 1;
            if after_first_refusal > 10 {
                break;
            }
        }
    }
    assert!(refused > 0, "the disk never filled up");
    let (status, ready) = readyz(&http, &first).await;
    assert_eq!(
        (status, ready["storage"].as_str()),
        (503, Some("failing")),
        "while commits fail /readyz must say so: {ready}"
    );

    // Act 2: give the space back, without a restart.
    std::fs::remove_file(&filler).expect("remove the filler");
    let mut recovered = false;
    for round in 0..50 {
        let (ids, body) = leads(&format!("freed-{round}"), 50);
        if post(&http, &first, &body).await == 202 {
            acknowledged.extend(ids);
            recovered = true;
        } else {
            assert!(!recovered, "after a success every request must succeed");
        }
    }
    assert!(
        recovered,
        "the service never accepted events again once space was free"
    );
    // `/readyz` reads the store at most once a second: wait for a fresh reading.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, ready) = readyz(&http, &first).await;
        if (status, ready["storage"].as_str()) == (200, Some("ok")) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "with space again /readyz must recover: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Assert 1: every acknowledged event is committed: another connection sees it, and
    // another writer is not locked out by a transaction left open.
    let visible = visible_ids(&database, &acknowledged).await;
    let invisible: Vec<&String> = acknowledged.difference(&visible).collect();
    assert!(
        invisible.is_empty(),
        "{} of {} acknowledged events are not visible to another connection, e.g. {:?}",
        invisible.len(),
        acknowledged.len(),
        invisible.iter().take(5).collect::<Vec<_>>()
    );
    another_writer_can_write(&database)
        .await
        .expect("another writer must be able to write");

    // Act 3: the pixel pauses (token refused), events are acknowledged, then kill -9.
    graph.set_valid_token("a-token-meta-no-longer-accepts");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, ready) = readyz(&http, &first).await;
        if ready["pixels"][0]["state"] == "paused" {
            break;
        }
        let (ids, body) = leads(&format!("pausing-{}", acknowledged.len()), 1);
        if post(&http, &first, &body).await == 202 {
            acknowledged.extend(ids);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pixel never paused: {ready}"
        );
        // Polling a condition (the pixel state has no change feed).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ids, body) = leads("paused", 100);
    assert_eq!(post(&http, &first, &body).await, 202);
    acknowledged.extend(ids);
    first.kill_9();

    // Assert 2: restarted with a working token, every acknowledged event reaches Meta.
    graph.set_valid_token(TOKEN);
    let _second = Service::start("second", logs.path(), &env, &http).await;
    wait_until_delivered(&graph, &acknowledged, "after a full disk and a kill -9").await;
    println!(
        "{} events acknowledged around a full disk ({refused} requests refused while full), all delivered",
        acknowledged.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_locked_past_the_busy_timeout_loses_no_acknowledged_event() {
    // Arrange
    let dir = tempfile::tempdir().expect("tempdir");
    let database = dir.path().join("locked.db");
    let graph = GraphStandIn::start(TOKEN, PIXEL).await;
    let http = client();
    let env = service_env(format!("sqlite://{}", database.display()), &graph);
    let mut service = Service::start("locked", dir.path(), &env, &http).await;
    let mut acknowledged = BTreeSet::new();
    let (ids, body) = leads("before-lock", 10);
    assert_eq!(post(&http, &service, &body).await, 202);
    acknowledged.extend(ids);

    // Act 1: another process (this test) holds the write lock longer than the busy timeout.
    use sqlx::ConnectOptions as _;
    let mut holder = format!("sqlite://{}", database.display())
        .parse::<sqlx::sqlite::SqliteConnectOptions>()
        .expect("options")
        .busy_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect");
    sqlx::query("begin immediate")
        .execute(&mut holder)
        .await
        .expect("take the write lock");
    // Every writer queued on the one writer connection (a settle, the memory's flush, this
    // commit) waits out its own 10 s busy timeout in turn, so the answer can take a while.
    let (ids, body) = leads("during-lock", 10);
    let during = http
        .post(format!("{}/v1/events", service.address))
        .bearer_auth(SECRET)
        .json(&body)
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .map(|r| r.status().as_u16());
    assert_eq!(
        during.map_err(|e| e.to_string()),
        Ok(503),
        "a write locked out past the busy timeout is a 503"
    );
    sqlx::query("rollback")
        .execute(&mut holder)
        .await
        .expect("release the write lock");
    drop(ids);

    // Act 2: the lock is gone.
    let (ids, body) = leads("after-lock", 10);
    assert_eq!(post(&http, &service, &body).await, 202);
    acknowledged.extend(ids);

    // Assert
    let visible = visible_ids(&database, &acknowledged).await;
    assert_eq!(
        visible, acknowledged,
        "every acknowledged event is committed"
    );
    another_writer_can_write(&database)
        .await
        .expect("another writer must be able to write");
    service.kill_9();
    let _second = Service::start("locked-restarted", dir.path(), &env, &http).await;
    wait_until_delivered(&graph, &acknowledged, "after a lock and a kill -9").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminated_postgres_backends_lose_no_acknowledged_event() {
    // Arrange: the service on Postgres under a name of its own, so only its backends are hit.
    let schema = crate::helpers::new_postgres_schema();
    let application = format!("capi-faults-{}", std::process::id());
    let separator = if schema.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{separator}application_name={application}", schema.url);
    let graph = GraphStandIn::start(TOKEN, PIXEL).await;
    let http = client();
    let mut env = service_env(url, &graph);
    env.push(("DATABASE_SCHEMA", schema.schema.clone()));
    let dir = tempfile::tempdir().expect("tempdir");
    let service = Arc::new(Service::start("postgres", dir.path(), &env, &http).await);

    // Act: clients post while their backends are terminated over and over.
    let acknowledged: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|task| {
            let (http, service) = (http.clone(), service.clone());
            let (acknowledged, stop) = (acknowledged.clone(), stop.clone());
            tokio::spawn(async move {
                let mut refused = 0;
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let (ids, body) = leads(&format!("pg-{task}-{i}"), 5);
                    match post(&http, &service, &body).await {
                        202 => lock(&acknowledged).extend(ids),
                        503 => refused += 1,
                        other => panic!("a dropped connection must give 503, not {other}"),
                    }
                }
                refused
            })
        })
        .collect();
    let admin = sqlx::PgPool::connect(&schema.url).await.expect("connect");
    let mut terminated = 0_i64;
    for _ in 0..20 {
        let n: i64 = sqlx::query_scalar(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity
             where application_name = $1",
        )
        .bind(&application)
        .fetch_one(&admin)
        .await
        .expect("terminate the service's backends");
        terminated += n;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // The service must work again once the terminations stop.
    let deadline = tokio::time::Instant::now() + WAIT;
    let (ids, body) = leads("pg-after", 5);
    loop {
        if post(&http, &service, &body).await == 202 {
            lock(&acknowledged).extend(ids);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the service never recovered from its terminated connections"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut refused = 0;
    for client in clients {
        refused += client.await.expect("client task");
    }
    assert!(
        terminated > 0,
        "no backend of the service was ever terminated"
    );

    // Assert: every acknowledged event is stored and delivered.
    let acknowledged = lock(&acknowledged).clone();
    let stored: Vec<String> =
        sqlx::query(&format!("select event_id from \"{}\".event", schema.schema))
            .fetch_all(&admin)
            .await
            .expect("read the events")
            .iter()
            .map(|row| row.get::<String, _>(0))
            .collect();
    let stored: BTreeSet<String> = stored.into_iter().collect();
    let lost: Vec<&String> = acknowledged.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged events are not in Postgres, e.g. {:?}",
        lost.len(),
        lost.iter().take(5).collect::<Vec<_>>()
    );
    wait_until_delivered(&graph, &acknowledged, "after terminated backends").await;
    println!(
        "{} events acknowledged while {terminated} backends were terminated ({refused} requests refused), all stored and delivered",
        acknowledged.len()
    );
}
