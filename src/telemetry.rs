//! Logging: JSON lines (DESIGN.md §6) or a human format on stderr, or native journald.
//!
//! Audit events are `tracing` events with an `event` field (`key.minted`, ...) and the
//! ids as fields; the JSON formatter flattens them next to `timestamp` and `level`.
//! With `--log-format journald` the same fields become journal fields, upper-cased and
//! without prefix (`EVENT`, `PROJECT_ID`, `KEY_ID`, ...), so
//! `journalctl -u keyrotd PROJECT_ID=proj_...` selects one project's lines.

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Layer, Registry};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// JSON lines on stderr.
    Json,
    /// Compact human-readable lines on stderr.
    Pretty,
    /// Native journald entries with structured fields (falls back to JSON on stderr when
    /// the journal socket is unavailable).
    Journald,
}

impl LogFormat {
    /// Pretty on a TTY, JSON otherwise (DESIGN.md §1).
    pub fn detect() -> LogFormat {
        if std::io::stderr().is_terminal() {
            LogFormat::Pretty
        } else {
            LogFormat::Json
        }
    }
}

/// The `--log-level` default; [`quiet_by_default`] only overrides this one.
pub const DEFAULT_LEVEL: &str = "info";

/// vaultrs/rustify log every non-2xx (a 404 for a slot not created yet included) at
/// ERROR, and aws-config logs a failed credential provider at WARN with a 1 KB debug
/// dump of the error; the store layer reports what matters itself, on one line. The
/// cron scheduler announces its internals at INFO ("Uninited", "Job creator created").
const QUIET_DEPENDENCIES: &str =
    ",rustify=off,vaultrs=off,aws_config=error,tokio_cron_scheduler=warn";

struct Installed {
    filter: reload::Handle<EnvFilter, Registry>,
    /// The level came from the command line's default (not RUST_LOG, not the user).
    default_level: bool,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

fn filter_for(level: &str) -> EnvFilter {
    EnvFilter::try_new(format!("{level}{QUIET_DEPENDENCIES}"))
        .unwrap_or_else(|_| EnvFilter::new(format!("info{QUIET_DEPENDENCIES}")))
}

type Boxed = Box<
    dyn Layer<tracing_subscriber::layer::Layered<reload::Layer<EnvFilter, Registry>, Registry>>
        + Send
        + Sync,
>;

fn json_layer() -> Boxed {
    fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_target(false)
        .with_writer(std::io::stderr)
        .boxed()
}

/// Installs the global subscriber. `level` is an `EnvFilter` directive (`info`,
/// `keyrotd=debug`, ...); `RUST_LOG` wins when set.
pub fn init(format: LogFormat, level: &str) {
    let (filter, from_env) = match EnvFilter::try_from_default_env() {
        Ok(f) => (f, true),
        Err(_) => (filter_for(level), false),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let mut journald_error = None;
    let output: Boxed = match format {
        LogFormat::Json => json_layer(),
        LogFormat::Pretty => fmt::layer()
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .compact()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(j) => j
                .with_field_prefix(None)
                .with_syslog_identifier("keyrotd".into())
                .boxed(),
            Err(e) => {
                journald_error = Some(e);
                json_layer()
            }
        },
    };
    if tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()
        .is_ok()
    {
        let _ = INSTALLED.set(Installed {
            filter: handle,
            default_level: !from_env && level == DEFAULT_LEVEL,
        });
    }
    if let Some(e) = journald_error {
        tracing::warn!(event = "log.journald_unavailable", error = %e, "cannot reach the journal socket; logging JSON lines to stderr instead");
    }
}

/// Lowers logging to `level` unless `RUST_LOG` or an explicit `--log-level` chose one
/// (`keyrotd demo` prints for humans and keeps the logs to warnings).
pub fn quiet_by_default(level: &str) {
    if let Some(i) = INSTALLED.get() {
        if i.default_level {
            let _ = i.filter.reload(filter_for(level));
        }
    }
}
