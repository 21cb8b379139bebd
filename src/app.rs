//! Wiring: opens storage, starts the group-commit task, the HTTP server and the delivery
//! workers, and stops them in order on shutdown (stop accepting, finish in-flight requests and
//! deliveries, exit).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::delivery::{now_ms, Delivery, GraphClient, Wakes};
use crate::ingest::Ingestor;
use crate::memory::MatchKeyMemory;
use crate::store::{self, GroupCommit, Pruned, Retention, Store};

/// A built, bound, not yet running service.
pub struct App {
    listener: TcpListener,
    router: axum::Router,
    delivery: Vec<Delivery>,
    workers_alive: Arc<AtomicBool>,
    retention: Retention,
    ingestor: Ingestor,
    mapper: crate::sources::Mapper,
    counters: crate::sources::SourceCounters,
    inbox_wake: Arc<Notify>,
    delivery_wakes: Wakes,
    poll_interval: std::time::Duration,
    memory: Option<MatchKeyMemory>,
    /// Native HTTPS when a certificate is configured.
    tls: Option<crate::tls::Tls>,
    /// Connection limits and timeouts, the maximum fitted to the open-files limit.
    http: crate::server::Limits,
    quality: crate::quality::QualityCounters,
    /// The store, for tests and tools.
    pub store: Arc<dyn Store>,
}

impl App {
    /// Opens storage and binds the listener.
    ///
    /// # Errors
    /// Storage that cannot be opened, an address that cannot be bound, a TLS setup failure.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        // Before anything is opened: a certificate that cannot be served is a start failure.
        let tls = config
            .tls
            .clone()
            .map(crate::tls::Tls::load)
            .transpose()
            .context("cannot serve HTTPS")?;
        let store = store::open(&config.database_url, &config.database_schema)
            .await
            .with_context(|| {
                format!(
                    "cannot open storage {}",
                    crate::config::redact_url(&config.database_url)
                )
            })?;
        // Before any worker claims: what a killed process had leased is due again at once.
        let released = store
            .release_orphaned_leases(now_ms())
            .await
            .context("cannot release the leases of a previous process")?;
        if released > 0 {
            tracing::info!(
                released,
                "released the leases a previous process left; their events are due now"
            );
        }
        // Each connection is a file descriptor: take what the system allows, and serve no more
        // connections than fit.
        let open_files = crate::server::raise_open_files_limit();
        let http = crate::server::Limits {
            max_connections: crate::server::fit_connections(
                config.http.max_connections,
                open_files.map(|(soft, _)| soft),
            ),
            ..config.http
        };
        let listener = TcpListener::bind(config.listen_addr)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen_addr))?;
        crate::metrics::install();
        // One delivery per pixel, each with its own workers, wake-up and handoff: a paused
        // pixel never holds up the others.
        let mut delivery = Vec::new();
        let mut wakes = Vec::new();
        for meta in config.pixels.iter() {
            let wake = Arc::new(Notify::new());
            let client = GraphClient::new(&config, meta).context("cannot build the HTTP client")?;
            delivery.push(Delivery::new(
                store.clone(),
                client,
                config.delivery.clone(),
                wake.clone(),
            ));
            wakes.push((meta.pixel_id.clone(), wake));
        }
        let wakes = Wakes::new(wakes);
        let handoffs = delivery
            .iter()
            .map(|d| (d.client().pixel_id().to_owned(), d.handoff()))
            .collect();
        let commit = GroupCommit::start(store.clone(), now_ms, handoffs);
        let memory = MatchKeyMemory::start(store.clone(), config.match_key_memory_days);
        let quality = crate::quality::QualityCounters::new(store.clone());
        let ingestor = Ingestor::new(
            config.ingest.clone(),
            config.pixels.clone(),
            commit,
            wakes.clone(),
        )
        .with_memory(memory.clone())
        .with_quality(Some(quality.clone()));
        let workers_alive = Arc::new(AtomicBool::new(false));
        let lookups =
            crate::sources::lookups_from(&config).context("cannot build the Supabase client")?;
        let mapper = crate::sources::Mapper::new(config.sources.clone(), lookups);
        let inbox_wake = Arc::new(Notify::new());
        let counters = crate::sources::SourceCounters::new(store.clone());
        let collect_limits = Arc::new(api::CollectLimits::new(&config.sites));
        let retention = config.retention;
        let poll_interval = config.delivery.poll_interval;
        let delivery_wakes = wakes;
        let state = AppState {
            config: Arc::new(config),
            store: store.clone(),
            ingestor: ingestor.clone(),
            delivery: delivery.clone(),
            workers_alive: workers_alive.clone(),
            mapper: mapper.clone(),
            inbox_commit: crate::store::InboxCommit::start(store.clone(), now_ms),
            counters: counters.clone(),
            collect_limits,
            inbox_wake: inbox_wake.clone(),
            meta_quality: crate::quality::MetaQuality::new(),
            store_snapshots: Arc::default(),
        };
        Ok(Self {
            listener,
            router: api::router(state),
            delivery,
            workers_alive,
            retention,
            ingestor,
            mapper,
            counters,
            inbox_wake,
            delivery_wakes,
            poll_interval,
            memory,
            tls,
            http,
            quality,
            store,
        })
    }

    /// The bound address (useful with port 0).
    ///
    /// # Errors
    /// When the socket has no local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` is cancelled, then drains and returns.
    ///
    /// # Errors
    /// When the server fails.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let workers = (!self.delivery.is_empty()).then(|| {
            let alive = self.workers_alive.clone();
            let shutdown = shutdown.clone();
            alive.store(true, Ordering::Relaxed);
            let pixels = self.delivery;
            tokio::spawn(async move {
                let mut running = tokio::task::JoinSet::new();
                for delivery in pixels {
                    running.spawn(delivery.run(shutdown.clone()));
                }
                while running.join_next().await.is_some() {}
                alive.store(false, Ordering::Relaxed);
            })
        });
        let maintenance = tokio::spawn(prune_periodically(
            self.store.clone(),
            self.retention,
            shutdown.clone(),
        ));
        let memory_writer = self.memory.clone().map(|memory| {
            let shutdown = shutdown.clone();
            tokio::spawn(async move { memory.run(shutdown).await })
        });
        let inbox_wake = self.inbox_wake;
        let counting = {
            let (counters, shutdown) = (self.counters.clone(), shutdown.clone());
            tokio::spawn(async move { counters.run(shutdown).await })
        };
        let quality_counting = {
            let (quality, shutdown) = (self.quality.clone(), shutdown.clone());
            tokio::spawn(async move { quality.run(shutdown).await })
        };
        let metrics_upkeep = tokio::spawn(crate::metrics::run_upkeep(shutdown.clone()));
        let inbox = tokio::spawn(crate::inbox::run(
            self.store.clone(),
            self.ingestor,
            self.mapper,
            inbox_wake.clone(),
            self.poll_interval,
            shutdown.clone(),
        ));
        let notices = tokio::spawn(crate::inbox::relay_notices(
            self.store.clone(),
            inbox_wake,
            self.delivery_wakes.clone(),
            self.poll_interval,
            shutdown.clone(),
        ));
        let served = match self.tls {
            Some(tls) => tls
                .serve(self.listener, self.router, self.http, shutdown.clone())
                .await
                .context("the HTTPS server failed"),
            None => crate::server::serve(
                self.listener,
                self.router,
                None,
                self.http,
                shutdown.clone(),
            )
            .await
            .context("the HTTP server failed"),
        };
        // Whatever stopped the server also stops delivery; in-flight batches finish first.
        shutdown.cancel();
        if let Some(workers) = workers {
            if let Err(err) = workers.await {
                tracing::error!(error = %err, "delivery workers ended abnormally");
            }
        }
        let _ = maintenance.await;
        let _ = inbox.await;
        let _ = counting.await;
        let _ = quality_counting.await;
        // What requests drained after the counting task stopped counted.
        self.quality.flush().await;
        let _ = metrics_upkeep.await;
        let _ = notices.await;
        if let (Some(memory), Some(writer)) = (self.memory, memory_writer) {
            let _ = writer.await;
            // What the last requests remembered.
            if let Err(err) = memory.flush().await {
                tracing::warn!(error = %err, "could not write the match-key memory at shutdown");
            }
        }
        served
    }
}

/// How often retention runs.
const PRUNE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);

/// Applies retention, and keeps the dedup index to the 48-hour window so inserts stay fast as
/// months go by.
async fn prune_periodically(
    store: Arc<dyn Store>,
    retention: Retention,
    shutdown: CancellationToken,
) {
    loop {
        match store.prune(now_ms(), &retention).await {
            Ok(pruned) if pruned == Pruned::default() => {}
            Ok(pruned) => tracing::info!(
                dedup_keys = pruned.dedup_keys,
                delivered = pruned.delivered,
                dead = pruned.dead,
                match_keys = pruned.match_keys,
                parked = pruned.parked,
                counts = pruned.counts,
                "pruned past retention"
            ),
            Err(err) => tracing::warn!(error = %err, "could not prune past retention"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(PRUNE_INTERVAL) => {}
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
