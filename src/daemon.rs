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
use tokio::sync::mpsc;
use tokio_cron_scheduler::{Job, JobScheduler};
use tracing::{error, info, warn};

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
}

impl HttpState {
    /// The listener state of an engine: its metrics and API counters, ready (the config
    /// is loaded) until a cycle fails wholesale.
    pub fn for_engine(engine: &Engine) -> HttpState {
        HttpState {
            metrics: engine.metrics.clone(),
            api: engine.client.stats().clone(),
            ready: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Updates `/readyz` from a finished cycle: not ready when the cycle failed
    /// wholesale, i.e. the scan failed (bad admin key, API down) or every slot failed
    /// (a store unreachable); ready again after the next cycle that did some good.
    pub fn record_cycle(&self, report: &CycleReport) {
        let wholesale = report.scan_error.is_some()
            || (!report.slots.is_empty() && report.failed_slots() == report.slots.len());
        self.ready.store(!wholesale, Ordering::Relaxed);
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
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "last cycle failed wholesale\n",
        )
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

/// Daemon options beyond the engine.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// 6-field cron.
    pub schedule: String,
    pub run_on_start: bool,
    pub listen: Option<SocketAddr>,
    pub shutdown_timeout: Duration,
}

/// Runs cycles on the schedule until `shutdown` resolves, then stops new work, waits
/// up to `shutdown_timeout` for the running cycle and returns.
pub async fn run(
    engine: Arc<Engine>,
    opts: RunOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let http = HttpState::for_engine(&engine);
    if let Some(addr) = opts.listen {
        serve_http(addr, http.clone(), engine.shutdown.clone())
            .await
            .map_err(|e| anyhow::anyhow!("daemon.listen {addr}: {e}"))?;
    }

    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut sched = JobScheduler::new().await?;
    let tick_tx = tx.clone();
    let job = Job::new_async(opts.schedule.as_str(), move |_id, _l| {
        let tx = tick_tx.clone();
        Box::pin(async move {
            if tx.try_send(()).is_err() {
                warn!(
                    event = "cycle.overrun",
                    "a cycle is still running and another is queued; this tick is coalesced"
                );
            }
        })
    })?;
    sched.add(job).await?;
    sched.start().await?;
    if opts.run_on_start {
        let _ = tx.try_send(());
    }

    // Watchdog: systemd restarts us if the runtime stops answering.
    if let Some(usec) = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        let every = Duration::from_micros(usec / 2);
        let token = engine.shutdown.clone();
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
    info!(event = "daemon.started", schedule = %opts.schedule, "keyrotd running");

    let worker_engine = engine.clone();
    let worker_http = http.clone();
    let worker = tokio::spawn(async move {
        let mut busy_until_late = false;
        loop {
            tokio::select! {
                biased;
                _ = worker_engine.shutdown.cancelled() => break,
                tick = rx.recv() => if tick.is_none() { break },
            }
            if busy_until_late {
                info!(
                    event = "cycle.late",
                    "the previous cycle overran the schedule; starting late"
                );
            }
            let report = worker_engine.cycle().await;
            worker_http.record_cycle(&report);
            // A tick queued during the cycle means we are late.
            busy_until_late = !rx.is_empty();
        }
    });

    shutdown.await;
    info!(
        event = "daemon.stopping",
        "shutdown requested; finishing in-flight work"
    );
    sd_notify("STOPPING=1");
    engine.shutdown.cancel();
    let _ = sched.shutdown().await;
    drop(tx);
    let finished = tokio::time::timeout(opts.shutdown_timeout, worker)
        .await
        .is_ok();
    // Notices of the last cycle (a failure above all) are worth a short wait.
    engine.notifier.flush(NOTIFY_FLUSH_TIMEOUT).await;
    if finished {
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
