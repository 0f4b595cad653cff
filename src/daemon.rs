//! `keyrotd run`: cycles on the cron schedule, the HTTP listener, signals, systemd.
//!
//! Ticks from tokio-cron-scheduler go through a channel of capacity one into a single
//! worker, so cycles never overlap: a tick that arrives during a cycle is kept and
//! starts the next cycle as soon as the running one ends (and says it is late); more
//! ticks than that are coalesced. The shutdown signal is [`run`]'s argument (the
//! binary passes [`shutdown_signal`], SIGTERM/SIGINT; tests pass their own): it stops
//! new work, and the running cycle finishes its in-flight slots within
//! `shutdown_timeout`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, Notify};
use tokio_cron_scheduler::{Job, JobScheduler};
use tracing::{error, info, warn};

use std::path::PathBuf;

use crate::app::{BuildError, Shared};
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::openai::ApiStats;
use crate::rotation::{CycleReport, Engine};

/// How long shutdown (and `keyrotd once`) waits for queued notifications.
pub const NOTIFY_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Shared state of the HTTP listener.
#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub api: Arc<ApiStats>,
    /// False while the last cycle failed wholesale (see [`HttpState::record_cycle`]).
    pub ready: Arc<AtomicBool>,
    /// A cycle is running.
    running: Arc<AtomicBool>,
    /// The schedule ticked while a cycle was still running.
    overrun: Arc<AtomicBool>,
}

impl HttpState {
    /// The listener state of a daemon: its counters, ready (the config is loaded)
    /// until a cycle fails wholesale or overruns its schedule.
    pub fn new(shared: &Shared) -> HttpState {
        HttpState {
            metrics: shared.metrics.clone(),
            api: shared.api.clone(),
            ready: Arc::new(AtomicBool::new(true)),
            running: Arc::new(AtomicBool::new(false)),
            overrun: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The listener state of one engine's counters.
    pub fn for_engine(engine: &Engine) -> HttpState {
        HttpState::new(&Shared {
            metrics: engine.metrics.clone(),
            api: engine.client.stats().clone(),
            shutdown: engine.shutdown.clone(),
            memory: engine.memory.clone(),
        })
    }

    /// Updates `/readyz` from a finished cycle: not ready when the cycle failed
    /// wholesale, i.e. the scan failed (bad admin key, API down) or every slot failed
    /// (a store unreachable); ready again after the next cycle that did some good.
    pub fn record_cycle(&self, report: &CycleReport) {
        let wholesale = report.scan_error.is_some()
            || (!report.slots.is_empty() && report.failed_slots() == report.slots.len());
        self.ready.store(!wholesale, Ordering::Relaxed);
        self.running.store(false, Ordering::Relaxed);
        self.overrun.store(false, Ordering::Relaxed);
    }

    /// A cycle that could not even start (no engine: the admin key's store or the
    /// configuration could not be reached) is a wholesale failure.
    fn record_no_engine(&self) {
        self.ready.store(false, Ordering::Relaxed);
        self.running.store(false, Ordering::Relaxed);
        self.overrun.store(false, Ordering::Relaxed);
    }

    fn cycle_started(&self) {
        self.running.store(true, Ordering::Relaxed);
    }

    /// The schedule ticked: while a cycle runs, that cycle now overruns its schedule.
    fn ticked(&self) {
        if self.running.load(Ordering::Relaxed) {
            self.overrun.store(true, Ordering::Relaxed);
        }
    }

    /// Why the daemon is not ready, if it is not.
    pub fn not_ready(&self) -> Option<&'static str> {
        if !self.ready.load(Ordering::Relaxed) {
            Some("last cycle failed wholesale")
        } else if self.overrun.load(Ordering::Relaxed) {
            Some("a cycle is overrunning its schedule")
        } else {
            None
        }
    }
}

/// The `/metrics`, `/healthz`, `/readyz` router.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(Some(&s.api)),
    )
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    match s.not_ready() {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

/// Serves the listener until `shutdown` is cancelled.
pub async fn serve_http(
    addr: SocketAddr,
    state: HttpState,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    info!(event = "http.listening", addr = %local, "serving /metrics, /healthz, /readyz");
    tokio::spawn(async move {
        let r = axum::serve(listener, router(state))
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = r {
            error!(error = %e, "http listener stopped");
        }
    });
    Ok(local)
}

/// Sends a datagram to systemd's notification socket, if there is one.
pub fn sd_notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let r = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|a| sock.send_to_addr(msg.as_bytes(), &a))
    } else {
        sock.send_to(msg.as_bytes(), std::path::Path::new(&path))
    };
    if let Err(e) = r {
        warn!(error = %e, "sd_notify failed");
    }
}

/// The daemon options a configuration describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOptions {
    /// 6-field cron.
    pub schedule: String,
    pub run_on_start: bool,
    pub listen: Option<SocketAddr>,
    pub shutdown_timeout: Duration,
}

impl RunOptions {
    /// The `[daemon]` options of `cfg`, checked.
    pub fn from_config(cfg: &Config) -> Result<RunOptions, ConfigError> {
        let schedule = crate::config::parse_schedule(&cfg.daemon.schedule)
            .map_err(|e| ConfigError::invalid("daemon.schedule", e))?;
        let listen = match cfg.daemon.listen.as_deref() {
            None => None,
            Some(l) => Some(l.parse().map_err(|e| {
                ConfigError::invalid("daemon.listen", format!("{l:?} is not host:port ({e})"))
            })?),
        };
        Ok(RunOptions {
            schedule,
            run_on_start: cfg.daemon.run_on_start,
            listen,
            shutdown_timeout: cfg.daemon.shutdown_timeout,
        })
    }
}

/// Builds the engine a daemon runs on from a configuration, counting into and
/// stopping on the daemon's [`Shared`].
pub type BuildEngine =
    Arc<dyn Fn(Config, Shared) -> BoxFuture<'static, Result<Engine, BuildError>> + Send + Sync>;

/// What `keyrotd run` runs: a configuration, where SIGHUP re-reads it from, and how an
/// engine is built from it.
pub struct Daemon {
    pub config: Config,
    /// Reloaded from on SIGHUP; `None`: a reload request is refused with a warning.
    pub config_path: Option<PathBuf>,
    pub build: BuildEngine,
    pub shared: Shared,
}

impl Daemon {
    /// The binary's daemon: engines built by [`crate::app::build_engine_in`].
    pub fn new(config: Config, config_path: Option<PathBuf>) -> Daemon {
        Daemon {
            config,
            config_path,
            build: Arc::new(|cfg, shared| {
                Box::pin(async move { crate::app::build_engine_in(&cfg, false, &shared).await })
            }),
            shared: Shared::default(),
        }
    }
}

/// Why `run` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is invalid (exit 2).
    #[error("{0}")]
    Config(String),
    /// Anything else: the listener could not bind, the scheduler failed (exit 1).
    #[error("{0}")]
    Failed(String),
}

/// Runs cycles on the schedule until `shutdown` resolves, then stops new work, waits
/// up to `shutdown_timeout` for the running cycle and returns.
///
/// Start-up order: the listener binds first (so `/healthz` answers at once, before
/// any store or API call), then the scheduler starts and systemd hears `READY=1`; the
/// engine (store connections, the admin key from its store) is built by the worker
/// before its first cycle. An engine that cannot be built because a store or the API
/// is down is retried at the start of every cycle, as is an engine with a store that
/// could not be connected; one that cannot be built because the configuration is
/// invalid ends the daemon (exit 2). `reload` (SIGHUP) re-reads the configuration
/// between cycles: a configuration that fails validation, or whose engine cannot be
/// built for a configuration reason, is refused and the one in use kept.
pub async fn run(
    daemon: Daemon,
    shutdown: impl std::future::Future<Output = ()>,
    reload: Arc<Notify>,
) -> Result<(), RunError> {
    let opts =
        RunOptions::from_config(&daemon.config).map_err(|e| RunError::Config(e.to_string()))?;
    let shared = daemon.shared.clone();
    let http = HttpState::new(&shared);
    if let Some(addr) = opts.listen {
        serve_http(addr, http.clone(), shared.shutdown.clone())
            .await
            .map_err(|e| RunError::Failed(format!("daemon.listen {addr}: {e}")))?;
    }

    let (tx, rx) = mpsc::channel::<()>(1);
    let sched = JobScheduler::new()
        .await
        .map_err(|e| RunError::Failed(format!("scheduler: {e}")))?;
    let job = add_tick_job(&sched, &opts.schedule, &tx, &http).await?;
    sched
        .start()
        .await
        .map_err(|e| RunError::Failed(format!("scheduler: {e}")))?;
    if opts.run_on_start {
        let _ = tx.try_send(());
    }

    // Watchdog: systemd restarts us if the runtime stops answering.
    if let Some(usec) = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        let every = Duration::from_micros(usec / 2);
        let token = shared.shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(every) => sd_notify("WATCHDOG=1"),
                }
            }
        });
    }
    sd_notify("READY=1");
    let next = next_cycle(&sched, job).await;
    info!(event = "daemon.started", version = crate::VERSION, schedule = %opts.schedule, next_cycle = %next, "keyrotd running");

    let shutdown_timeout = Arc::new(std::sync::Mutex::new(opts.shutdown_timeout));
    let mut worker = tokio::spawn(
        Worker {
            daemon,
            engine: None,
            rebuild: false,
            http,
            sched: sched.clone(),
            job,
            tx: tx.clone(),
            opts,
            shutdown_timeout: shutdown_timeout.clone(),
        }
        .run(rx, reload),
    );

    let fatal = tokio::select! {
        _ = shutdown => None,
        r = &mut worker => Some(r),
    };
    let mut sched = sched;
    if let Some(r) = fatal {
        // The worker ended by itself: an invalid configuration at start.
        shared.shutdown.cancel();
        let _ = sched.shutdown().await;
        return match r {
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => Ok(()),
            Err(e) => Err(RunError::Failed(format!("the cycle worker stopped: {e}"))),
        };
    }
    info!(
        event = "daemon.stopping",
        "shutdown requested; finishing in-flight work"
    );
    sd_notify("STOPPING=1");
    shared.shutdown.cancel();
    let _ = sched.shutdown().await;
    drop(tx);
    let limit = *shutdown_timeout.lock().unwrap_or_else(|p| p.into_inner());
    let finished = tokio::time::timeout(limit, worker).await;
    if finished.is_ok() {
        info!(event = "daemon.stopped", outcome = "clean", "stopped");
    } else {
        warn!(
            event = "daemon.stopped",
            outcome = "timeout",
            "in-flight work did not finish within shutdown_timeout"
        );
    }
    Ok(())
}

/// When the schedule ticks next (RFC 3339), or `unknown`.
async fn next_cycle(sched: &JobScheduler, job: uuid::Uuid) -> String {
    let mut sched = sched.clone();
    match sched.next_tick_for_job(job).await {
        Ok(Some(t)) => t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        _ => "unknown".into(),
    }
}

/// Registers the cron job whose ticks feed the worker's channel.
async fn add_tick_job(
    sched: &JobScheduler,
    schedule: &str,
    tx: &mpsc::Sender<()>,
    http: &HttpState,
) -> Result<uuid::Uuid, RunError> {
    let tick_tx = tx.clone();
    let http = http.clone();
    let job = Job::new_async(schedule, move |_id, _l| {
        let tx = tick_tx.clone();
        let http = http.clone();
        Box::pin(async move {
            http.ticked();
            if tx.try_send(()).is_err() {
                warn!(
                    event = "cycle.overrun",
                    "a cycle is still running and another is queued; this tick is coalesced"
                );
            }
        })
    })
    .map_err(|e| RunError::Config(format!("config key `daemon.schedule`: {e}")))?;
    sched
        .add(job)
        .await
        .map_err(|e| RunError::Failed(format!("scheduler: {e}")))
}

/// The single task that runs cycles (so they never overlap) and reloads between them.
struct Worker {
    daemon: Daemon,
    engine: Option<Arc<Engine>>,
    /// The configuration changed: build a new engine before the next cycle.
    rebuild: bool,
    http: HttpState,
    sched: JobScheduler,
    job: uuid::Uuid,
    tx: mpsc::Sender<()>,
    opts: RunOptions,
    shutdown_timeout: Arc<std::sync::Mutex<Duration>>,
}

impl Worker {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<()>,
        reload: Arc<Notify>,
    ) -> Result<(), RunError> {
        let shutdown = self.daemon.shared.shutdown.clone();
        // The engine is built before the first tick, so a bad configuration ends the
        // daemon at start and the first cycle does not wait for store logins.
        if self.engine().await?.is_none() {
            self.http.record_no_engine();
        }
        let mut late = false;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = reload.notified() => {
                    self.reload().await;
                    continue;
                }
                tick = rx.recv() => if tick.is_none() { break },
            }
            if late {
                info!(
                    event = "cycle.late",
                    "the previous cycle overran the schedule; starting late"
                );
            }
            let Some(engine) = self.engine().await? else {
                self.http.record_no_engine();
                late = !rx.is_empty();
                continue;
            };
            self.http.cycle_started();
            // The tick that started this cycle has fired: this is the one after it.
            let next = next_cycle(&self.sched, self.job).await;
            let report = engine.scheduled_cycle(next).await;
            self.http.record_cycle(&report);
            // A tick queued during the cycle means we are late.
            late = !rx.is_empty();
        }
        if let Some(engine) = &self.engine {
            // Notices of the last cycle (a failure above all) are worth a short wait.
            engine.notifier.flush(NOTIFY_FLUSH_TIMEOUT).await;
        }
        Ok(())
    }

    /// The engine to run the next cycle on: the current one, or a new one when there
    /// is none yet, the configuration changed, or a store could not be connected last
    /// time. `Ok(None)`: none can be built now (a store or the API is down; logged and
    /// counted as a failed cycle). `Err`: the configuration is invalid and there is no
    /// engine to carry on with.
    async fn engine(&mut self) -> Result<Option<Arc<Engine>>, RunError> {
        let degraded = self
            .engine
            .as_ref()
            .is_some_and(|e| !e.unavailable.is_empty());
        if self.engine.is_some() && !self.rebuild && !degraded {
            return Ok(self.engine.clone());
        }
        let before: Vec<String> = self
            .engine
            .as_ref()
            .map(|e| e.unavailable.clone())
            .unwrap_or_default();
        match (self.daemon.build)(self.daemon.config.clone(), self.daemon.shared.clone()).await {
            Ok(engine) => {
                for name in before.iter().filter(|n| !engine.unavailable.contains(n)) {
                    info!(event = "store.connected", store = %name, "store reached again; its slots carry on this cycle");
                }
                if let Some(old) = self.engine.replace(Arc::new(engine)) {
                    old.notifier.flush(NOTIFY_FLUSH_TIMEOUT).await;
                }
                self.rebuild = false;
            }
            Err(e) if e.is_invalid_config() && self.engine.is_none() => {
                error!(event = "daemon.failed", error = %e, "invalid configuration");
                return Err(RunError::Config(e.to_string()));
            }
            Err(e) => {
                let shared = &self.daemon.shared;
                if self.engine.is_none() {
                    error!(event = "cycle.failed", outcome = "engine_unavailable", error = %e, "cannot start: retrying at the next cycle");
                    shared.metrics.cycle_finished(0.0, false, unix_now());
                } else {
                    warn!(event = "engine.rebuild_failed", error = %e, "cannot rebuild the engine; this cycle runs on the one in use");
                }
            }
        }
        Ok(self.engine.clone())
    }

    /// SIGHUP: re-reads the configuration file. Applied only when it validates and
    /// its engine builds (or fails to build only for a transient reason, retried at
    /// the next cycle); otherwise the configuration in use is kept and the reason
    /// logged.
    async fn reload(&mut self) {
        let Some(path) = self.daemon.config_path.clone() else {
            warn!(
                event = "config.reload_failed",
                "reload requested but the daemon has no configuration file to re-read"
            );
            return;
        };
        let checked = Config::load(&path).and_then(|cfg| {
            cfg.require_rules()?;
            cfg.check_admin_key()?;
            let opts = RunOptions::from_config(&cfg)?;
            Ok((cfg, opts))
        });
        let (cfg, opts) = match checked {
            Ok(c) => c,
            Err(e) => {
                error!(event = "config.reload_failed", path = %path.display(), error = %e, "the new configuration is invalid; keeping the one in use");
                return;
            }
        };
        let engine = match (self.daemon.build)(cfg.clone(), self.daemon.shared.clone()).await {
            Ok(engine) => Some(Arc::new(engine)),
            Err(e) if e.is_invalid_config() => {
                error!(event = "config.reload_failed", path = %path.display(), error = %e, "the new configuration is invalid; keeping the one in use");
                return;
            }
            Err(e) => {
                warn!(event = "engine.rebuild_failed", error = %e, "the new configuration is valid but its engine cannot be built now; retrying at the next cycle");
                None
            }
        };
        if opts.schedule != self.opts.schedule {
            match add_tick_job(&self.sched, &opts.schedule, &self.tx, &self.http).await {
                Ok(job) => {
                    let _ = self.sched.remove(&self.job).await;
                    self.job = job;
                }
                Err(e) => {
                    error!(event = "config.reload_failed", path = %path.display(), error = %e, "cannot schedule the new daemon.schedule; keeping the configuration in use");
                    return;
                }
            }
        }
        if opts.listen != self.opts.listen {
            warn!(
                event = "config.restart_needed",
                key = "daemon.listen",
                "daemon.listen changes at the next restart"
            );
        }
        *self
            .shutdown_timeout
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = opts.shutdown_timeout;
        self.daemon.config = cfg;
        self.rebuild = engine.is_none();
        if let Some(engine) = engine {
            if let Some(old) = self.engine.replace(engine) {
                old.notifier.flush(NOTIFY_FLUSH_TIMEOUT).await;
            }
        }
        info!(event = "config.reloaded", path = %path.display(), schedule = %opts.schedule, "configuration reloaded");
        self.opts = RunOptions {
            listen: self.opts.listen,
            ..opts
        };
    }
}

fn unix_now() -> f64 {
    chrono::Utc::now().timestamp_millis() as f64 / 1000.0
}

/// A [`Notify`] that SIGHUP wakes (once per signal; a signal during a cycle is kept
/// until the cycle ends). Installed at once, so a SIGHUP during start-up no longer
/// kills the process.
pub fn reload_signal() -> Arc<Notify> {
    use tokio::signal::unix::{signal, SignalKind};
    let notify = Arc::new(Notify::new());
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            let n = notify.clone();
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    info!(
                        event = "config.reload_requested",
                        "SIGHUP: reloading the configuration"
                    );
                    n.notify_one();
                }
            });
        }
        Err(e) => warn!(error = %e, "cannot listen for SIGHUP; configuration reload is off"),
    }
    notify
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
