//! Logging: JSON lines (SPEC §6) or a human format, on stderr.
//!
//! Audit events are `tracing` events with an `event` field (`key.minted`, ...) and the
//! ids as fields; the JSON formatter flattens them next to `timestamp` and `level`.

use std::io::IsTerminal;

use tracing_subscriber::{fmt, EnvFilter};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

impl LogFormat {
    /// Pretty on a TTY, JSON otherwise (SPEC §1).
    pub fn detect() -> LogFormat {
        if std::io::stderr().is_terminal() {
            LogFormat::Pretty
        } else {
            LogFormat::Json
        }
    }
}

/// Installs the global subscriber. `level` is an `EnvFilter` directive (`info`,
/// `keyrotd=debug`, ...); `RUST_LOG` wins when set.
pub fn init(format: LogFormat, level: &str) {
    // vaultrs/rustify log every non-2xx (a 404 for a slot not created yet included)
    // at ERROR; the store layer reports what matters itself.
    let quiet = ",rustify=off,vaultrs=off";
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{level}{quiet}")))
        .unwrap_or_else(|_| EnvFilter::new(format!("info{quiet}")));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_target(false)
            .try_init(),
        LogFormat::Pretty => builder.with_target(false).compact().try_init(),
    };
}
