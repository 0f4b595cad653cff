//! Logging: JSON lines (DESIGN.md §6) or a human format on stderr, or native journald.
//!
//! Audit events are `tracing` events with an `event` field (`key.minted`, ...) and the
//! ids as fields; the JSON formatter ([`FlatJson`]) flattens them next to `timestamp`
//! and `level`, together with the fields of the spans the event is in (a slot's run is
//! a span carrying its rule, project and service account ids and names, so its events
//! name only what is their own).
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
        .event_format(FlatJson)
        .fmt_fields(fmt::format::JsonFields::new())
        .with_writer(std::io::stderr)
        .boxed()
}

/// One JSON object per line: `timestamp`, `level`, the fields of every span in scope
/// (outermost first) and the event's own fields, which win over a span's of the same
/// name. `tracing-subscriber`'s JSON format nests span fields under `span`; log
/// pipelines select by top-level fields (`project_id`), so they are flattened here.
pub struct FlatJson;

impl<S, N> fmt::FormatEvent<S, N> for FlatJson
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &fmt::FmtContext<'_, S, N>,
        mut w: fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use serde_json::{Map, Value};
        let mut m = Map::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                let Some(f) = ext.get::<fmt::FormattedFields<N>>() else {
                    continue;
                };
                if let Ok(Value::Object(o)) = serde_json::from_str::<Value>(&f.fields) {
                    m.extend(o);
                }
            }
        }
        event.record(&mut JsonVisitor(&mut m));
        m.insert("level".into(), event.metadata().level().as_str().into());
        m.insert(
            "timestamp".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .into(),
        );
        writeln!(w, "{}", Value::Object(m))
    }
}

/// Records an event's fields into a JSON object (`%` fields as their Display text).
struct JsonVisitor<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonVisitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(
        &mut self,
        field: &tracing::field::Field,
        value: &(dyn std::error::Error + 'static),
    ) {
        self.0.insert(field.name().into(), value.to_string().into());
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_the_span_fields_at_the_top_level() {
        let buf = Buf::default();
        let out = buf.clone();
        let layer = fmt::layer()
            .event_format(FlatJson)
            .fmt_fields(fmt::format::JsonFields::new())
            .with_writer(move || out.clone());
        let sub = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(sub, || {
            let span =
                tracing::error_span!("slot", project_id = %"proj_1", project_name = "a \"b\"");
            let _g = span.enter();
            tracing::info!(event = "key.minted", key_id = %"key_1", service_account_id = "sa_event", n = 3, ok = true, "minted");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON line");
        assert_eq!(line["event"], "key.minted");
        assert_eq!(line["project_id"], "proj_1", "{line}");
        assert_eq!(line["project_name"], "a \"b\"");
        assert_eq!(line["service_account_id"], "sa_event");
        assert_eq!(line["key_id"], "key_1");
        assert_eq!(line["n"], 3);
        assert_eq!(line["ok"], true);
        assert_eq!(line["message"], "minted");
        assert_eq!(line["level"], "INFO");
        assert!(line["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(line.get("span").is_none());
    }
}
