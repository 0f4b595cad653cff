//! The `keyrotd` binary: CLI parsing, telemetry, exit codes.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use keyrotd::config::Config;
use keyrotd::rotation::{Engine, RevokeOld};
use keyrotd::telemetry::{self, LogFormat};
use keyrotd::{app, daemon, EXIT_BAD_CONFIG, EXIT_FAILED};

/// Rotates OpenAI project API keys into the secret stores their consumers read.
#[derive(Parser, Debug)]
#[command(name = "keyrotd", version = keyrotd::VERSION, about, long_about = None)]
struct Cli {
    /// Configuration file [default: $KEYROTD_CONFIG, else /etc/keyrotd/keyrotd.toml]
    #[arg(long, global = true, env = "KEYROTD_CONFIG")]
    config: Option<PathBuf>,
    /// Log format [default: pretty on a TTY, json otherwise]
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    /// Log level or filter directive (RUST_LOG wins when set)
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The daemon: rotation cycles on daemon.schedule until SIGTERM/SIGINT
    Run,
    /// One full cycle, then exit (for a CronJob or a systemd timer)
    Once {
        /// Print the actions the cycle would perform; mint, write and revoke nothing
        #[arg(long)]
        dry_run: bool,
        /// How --dry-run prints its actions [default: table on a TTY, json otherwise]
        #[arg(long, value_enum)]
        format: Option<PlanFormat>,
        /// At exit, write the run's metrics (what `keyrotd run` serves on /metrics) to
        /// this file, atomically, for node_exporter's textfile collector (systemd
        /// timer); exit 1 when it cannot be written
        #[arg(long, value_name = "PATH", conflicts_with = "dry_run")]
        metrics_textfile: Option<PathBuf>,
        /// At exit, PUT the run's metrics to this Pushgateway URL
        /// (`http://host:9091/metrics/job/<job>`, replacing that group; CronJob); exit 1
        /// when the push fails
        #[arg(long, value_name = "URL", conflicts_with = "dry_run")]
        metrics_push: Option<String>,
    },
    /// Rotate chosen slots now, whatever their keys' age (incident response)
    Rotate(RotateArgs),
    /// Revoke project keys now (any key, user-owned included); refuses a key a store
    /// serves unless --rotate-first
    Revoke {
        /// The key ids (key_...)
        #[arg(required = true)]
        keys: Vec<String>,
        /// Rotate the slot serving a key first (its replaced key, this one, is revoked
        /// as soon as every store serves the new one)
        #[arg(long)]
        rotate_first: bool,
    },
    /// Read-only: every key with its verdict and reasons
    Plan {
        #[arg(long, value_enum, default_value = "table")]
        format: PlanFormat,
    },
    /// Read-only org-wide inventory report: every key, its owner, age and verdict
    Report {
        #[arg(long, value_enum, default_value = "html")]
        format: keyrotd::report::Format,
        /// Write to this file (atomically) instead of stdout
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Load and validate the configuration
    CheckConfig {
        /// Also prove the admin key and reach every store
        #[arg(long)]
        connect: bool,
    },
    /// Self-contained showcase: simulator, file store, plan, one cycle
    Demo,
    /// Serve the OpenAI Admin API simulator (for tests and benchmarks)
    Sim(SimArgs),
    /// Print a shell completion script, e.g. `keyrotd completions bash`
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `keyrotd man | man -l -`, or a subcommand's
    /// (`keyrotd man run` is keyrotd-run(1))
    Man {
        /// The subcommand whose page to print [default: keyrotd(1)]
        subcommand: Option<String>,
    },
}

#[derive(Args, Debug)]
struct RotateArgs {
    /// Slots of this rule
    #[arg(long)]
    rule: Option<String>,
    /// Slots of this project (id or name)
    #[arg(long)]
    project: Option<String>,
    /// Slots of this service account (id or name)
    #[arg(long)]
    service_account: Option<String>,
    /// The slot that serves this key, or whose service account owns it
    #[arg(long)]
    key: Option<String>,
    /// Every slot
    #[arg(long)]
    all: bool,
    /// When the replaced key is revoked: `now` (as soon as every store serves and has
    /// read back the new key), `grace` (the rule's grace period), or a DURATION after
    /// the promotion (`15m`, `2h`: recorded in the stores, kept by the daemon)
    #[arg(long, value_name = "now|grace|DURATION", default_value = "grace", value_parser = RevokeOld::parse)]
    revoke_old: RevokeOld,
    /// Print what it would do; change nothing
    #[arg(long)]
    dry_run: bool,
    /// Output of --dry-run and of the result [default: table on a TTY, json otherwise]
    #[arg(long, value_enum)]
    format: Option<PlanFormat>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PlanFormat {
    Table,
    Json,
}

#[derive(Args, Debug)]
struct SimArgs {
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1:8787")]
    listen: String,
    /// The admin key the simulator accepts [default: a fresh random sk-admin-...]
    #[arg(long)]
    admin_key: Option<String>,
    /// The organization: key=value pairs, e.g. projects=50,service_accounts=2,keys_per_sa=1,user_keys=1,stale=0.3,seed=7
    #[arg(long, default_value = "projects=3")]
    scenario: String,
}

/// Marks the process non-dumpable: no core file and no ptrace by other processes of
/// the same user. A core of a process that ran a cycle holds the admin key and every
/// key it minted (the systemd watchdog's SIGABRT would write one).
fn forbid_core_dumps() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) takes integer arguments only and touches no
    // memory of this process.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}

/// The log format in effect, for [`fatal`].
static FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// Reports why keyrotd stops: `keyrotd: <problem>` on stderr for a human, or, with
/// JSON or journald logs, one ERROR event (`event = "keyrotd.failed"`) a log pipeline
/// parses like every other line.
fn fatal(problem: impl std::fmt::Display) {
    match FORMAT.get() {
        Some(LogFormat::Json | LogFormat::Journald) => {
            tracing::error!(event = "keyrotd.failed", "keyrotd: {problem}");
        }
        _ => eprintln!("keyrotd: {problem}"),
    }
}

fn main() -> ExitCode {
    forbid_core_dumps();
    // Test builds only: reads FAILPOINTS (e.g. `after_mint=return`) so the crash tests
    // can stop the real binary at a step boundary of the rotation state machine.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    let format = cli.log_format.unwrap_or_else(LogFormat::detect);
    telemetry::init(format, &cli.log_level);
    let _ = FORMAT.set(format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            fatal(format_args!("cannot start the async runtime: {e}"));
            return ExitCode::from(EXIT_FAILED as u8);
        }
    };
    let code = rt.block_on(dispatch(cli));
    ExitCode::from(code as u8)
}

fn config_path(cli: &Cli) -> PathBuf {
    cli.config
        .clone()
        .unwrap_or_else(|| PathBuf::from("/etc/keyrotd/keyrotd.toml"))
}

fn load(cli: &Cli) -> Result<Config, i32> {
    Config::load(&config_path(cli)).map_err(|e| {
        fatal(&e);
        EXIT_BAD_CONFIG
    })
}

/// Loads the config (and, for commands that rotate, insists on rules) and builds the
/// engine. `Err` is the exit code, the problem already printed.
async fn engine(cli: &Cli, dry_run: bool, needs_rules: bool) -> Result<(Config, Engine), i32> {
    let cfg = load(cli)?;
    if needs_rules {
        cfg.require_rules().map_err(|e| {
            fatal(&e);
            EXIT_BAD_CONFIG
        })?;
    }
    let engine = app::build_engine(&cfg, dry_run).await.map_err(|e| {
        fatal(&e);
        // A store or the API down is worth retrying (a systemd restart, the next
        // CronJob run); a configuration that cannot work is not.
        if e.is_invalid_config() {
            EXIT_BAD_CONFIG
        } else {
            EXIT_FAILED
        }
    })?;
    Ok((cfg, engine))
}

async fn dispatch(cli: Cli) -> i32 {
    match &cli.command {
        Command::Demo => keyrotd::demo::run().await,
        Command::Sim(args) => sim(args).await,
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "keyrotd", &mut out);
            print_generated(&out, "completions")
        }
        Command::Man { subcommand } => man_page(subcommand.as_deref()),
        Command::CheckConfig { connect } => {
            let cfg = match load(&cli) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if let Err(e) = cfg.check_admin_key() {
                fatal(&e);
                return EXIT_BAD_CONFIG;
            }
            println!("config OK: {}", config_path(&cli).display());
            if *connect {
                return keyrotd::check::connect(&cfg).await;
            }
            0
        }
        Command::Plan { format } => {
            let (_, engine) = match engine(&cli, true, false).await {
                Ok(e) => e,
                Err(code) => return code,
            };
            match engine.survey().await {
                Ok(survey) => {
                    let plan = engine.plan(&survey);
                    match format {
                        PlanFormat::Json => println!("{}", plan.to_json()),
                        PlanFormat::Table => {
                            let color = std::io::stdout().is_terminal();
                            let _ = plan.render_table(&mut std::io::stdout().lock(), color);
                        }
                    }
                    0
                }
                Err(e) => {
                    fatal(&e);
                    EXIT_FAILED
                }
            }
        }
        Command::Rotate(args) => rotate(&cli, args).await,
        Command::Revoke { keys, rotate_first } => revoke(&cli, keys, *rotate_first).await,
        Command::Report { format, output } => {
            let (_, engine) = match engine(&cli, true, false).await {
                Ok(e) => e,
                Err(code) => return code,
            };
            match engine.survey().await {
                Ok(survey) => {
                    use keyrotd::report::{self, Report};
                    let plan = engine.plan(&survey);
                    let r = Report::build(&survey.inventory, &plan, &engine.rules, &engine.policy);
                    match report::emit(&report::render(&r, *format), output.as_deref()) {
                        Ok(()) => 0,
                        Err(e) => {
                            fatal(format_args!("cannot write the report: {e}"));
                            EXIT_FAILED
                        }
                    }
                }
                Err(e) => {
                    fatal(&e);
                    EXIT_FAILED
                }
            }
        }
        Command::Once {
            dry_run,
            format,
            metrics_textfile,
            metrics_push,
        } => {
            // Checked here, not by clap, whose message would repeat the value and with
            // it a password the URL may hold.
            let metrics_push = match metrics_push
                .as_deref()
                .map(keyrotd::metrics::push::parse_push_url)
                .transpose()
            {
                Ok(u) => u,
                Err(e) => {
                    fatal(format_args!("--metrics-push: {e}"));
                    return EXIT_BAD_CONFIG;
                }
            };
            let engine = match engine(&cli, *dry_run, true).await {
                Ok((_, e)) => Arc::new(e),
                Err(code) => return code,
            };
            let token = engine.shutdown.clone();
            tokio::spawn(async move {
                daemon::shutdown_signal().await;
                tracing::info!(
                    event = "daemon.stopping",
                    "shutdown requested; finishing in-flight slots"
                );
                token.cancel();
            });
            let report = engine.cycle().await;
            engine.notifier.flush(daemon::NOTIFY_FLUSH_TIMEOUT).await;
            let tty = std::io::stdout().is_terminal();
            if *dry_run {
                let json = match format {
                    Some(f) => matches!(f, PlanFormat::Json),
                    None => !tty,
                };
                let mut out = std::io::stdout().lock();
                let _ = if json {
                    let doc = keyrotd::plan::ActionsDoc {
                        generated_at: keyrotd::plan::Timestamp::from(chrono::Utc::now()),
                        actions: &report.planned,
                    };
                    writeln!(out, "{}", doc.to_json())
                } else {
                    keyrotd::plan::render_actions(&mut out, &report.planned)
                };
            } else if tty {
                let _ = keyrotd::rotation::render_summary(&mut std::io::stdout().lock(), &report);
            }
            let mut code = if report.any_failed() { EXIT_FAILED } else { 0 };
            let text = || engine.metrics.render(Some(engine.client.stats()));
            if let Some(url) = &metrics_push {
                match keyrotd::metrics::push::push(url, text()).await {
                    Ok(()) => {
                        tracing::debug!(event = "metrics.pushed", url = %keyrotd::metrics::push::shown(url), "pushed the run's metrics")
                    }
                    Err(e) => {
                        tracing::error!(event = "metrics.push_failed", error = %e, "cannot push the run's metrics (--metrics-push); alerts that read them go blind");
                        code = EXIT_FAILED;
                    }
                }
            }
            if let Some(path) = metrics_textfile {
                let text = text();
                // 0644: node_exporter reads it as another user; it holds no secret.
                match keyrotd::files::replace(path, text.as_bytes(), 0o644) {
                    Ok(()) => {
                        tracing::debug!(event = "metrics.textfile_written", path = %path.display(), "wrote the run's metrics")
                    }
                    Err(e) => {
                        tracing::error!(event = "metrics.textfile_failed", path = %path.display(), error = %e, "cannot write the run's metrics (--metrics-textfile); alerts that read them go blind");
                        code = EXIT_FAILED;
                    }
                }
            }
            code
        }
        Command::Run => {
            // Before anything else: a SIGHUP during start-up must not kill the daemon.
            let reload = daemon::reload_signal();
            let cfg = match load(&cli) {
                Ok(c) => c,
                Err(code) => return code,
            };
            // Pure checks only: the listener binds before any store or API call.
            if let Err(e) = cfg.require_rules().and_then(|()| cfg.check_admin_key()) {
                fatal(&e);
                return EXIT_BAD_CONFIG;
            }
            let d = daemon::Daemon::new(cfg, Some(config_path(&cli)));
            match daemon::run(d, daemon::shutdown_signal(), reload).await {
                Ok(()) => 0,
                Err(e @ daemon::RunError::Config(_)) => {
                    fatal(&e);
                    EXIT_BAD_CONFIG
                }
                Err(e) => {
                    fatal(&e);
                    EXIT_FAILED
                }
            }
        }
    }
}

/// Prints keyrotd(1), or with a subcommand keyrotd-<subcommand>(1), the pages
/// keyrotd(1) refers to.
fn man_page(subcommand: Option<&str>) -> i32 {
    let mut cmd = Cli::command();
    // Gives subcommands their display names (keyrotd-run) and global flags.
    cmd.build();
    let page = match subcommand {
        None => cmd,
        Some(name) => match cmd.find_subcommand(name) {
            Some(sub) => sub.clone().version(keyrotd::VERSION),
            None => {
                let known: Vec<_> = cmd.get_subcommands().map(|c| c.get_name()).collect();
                fatal(format_args!(
                    "man: no subcommand {name:?}; one of: {}",
                    known.join(", ")
                ));
                return EXIT_BAD_CONFIG;
            }
        },
    };
    let mut out = Vec::new();
    match clap_mangen::Man::new(page).render(&mut out) {
        Ok(()) => print_generated(&out, "man page"),
        Err(e) => {
            fatal(format_args!("cannot render the man page: {e}"));
            EXIT_FAILED
        }
    }
}

/// Writes generated text (completions, the man page) to stdout; a closed pipe is an
/// error message and exit code, not a panic.
fn print_generated(text: &[u8], what: &str) -> i32 {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text).and_then(|()| stdout.flush()) {
        Ok(()) => 0,
        Err(e) => {
            fatal(format_args!("cannot write the {what}: {e}"));
            EXIT_FAILED
        }
    }
}

/// The engine of a manual command, when it was asked (before the scan), and its
/// survey; `Err(exit code)` when either cannot be had.
async fn engine_and_survey(
    cli: &Cli,
    needs_rules: bool,
) -> Result<
    (
        Engine,
        chrono::DateTime<chrono::Utc>,
        keyrotd::rotation::Survey,
    ),
    i32,
> {
    let (_, engine) = engine(cli, false, needs_rules).await?;
    let asked_at = engine.clock.now();
    match engine.survey_for_incident().await {
        Ok(survey) => Ok((engine, asked_at, survey)),
        Err(e) => {
            fatal(&e);
            Err(EXIT_FAILED)
        }
    }
}

/// `keyrotd rotate`: exit 0 every chosen slot rotated, 1 some failed or was busy, 2 bad
/// arguments, bad configuration, or no slot matched.
async fn rotate(cli: &Cli, args: &RotateArgs) -> i32 {
    use keyrotd::rotation::manual::Selection;
    let (engine, asked_at, survey) = match engine_and_survey(cli, true).await {
        Ok(e) => e,
        Err(code) => return code,
    };
    let sel = Selection {
        rule: args.rule.clone(),
        project: args.project.clone(),
        service_account: args.service_account.clone(),
        key: args.key.clone(),
        all: args.all,
    };
    let picked = match sel.pick(&survey) {
        Ok(p) => p,
        Err(e) => {
            fatal(format_args!("rotate: {e}"));
            return EXIT_BAD_CONFIG;
        }
    };
    let revoke_old = args.revoke_old;
    let tty = std::io::stdout().is_terminal();
    let json = match args.format {
        Some(f) => matches!(f, PlanFormat::Json),
        None => !tty,
    };
    let mut out = std::io::stdout().lock();
    if args.dry_run {
        let actions = engine.plan_rotation(&survey, &picked, revoke_old);
        let _ = if json {
            let doc = keyrotd::plan::ActionsDoc {
                generated_at: keyrotd::plan::Timestamp::from(survey.now),
                actions: &actions,
            };
            writeln!(out, "{}", doc.to_json())
        } else {
            keyrotd::plan::render_actions(&mut out, &actions)
        };
        return 0;
    }
    let report = engine
        .rotate_now(&picked, &survey, revoke_old, asked_at)
        .await;
    engine.notifier.flush(daemon::NOTIFY_FLUSH_TIMEOUT).await;
    let _ = print_result(&mut out, &report, json);
    let busy = report
        .slots
        .iter()
        .any(|s| matches!(s.outcome, Ok(keyrotd::rotation::SlotOutcome::Busy)));
    if report.any_failed() || busy {
        EXIT_FAILED
    } else {
        0
    }
}

/// What a manual command did: the one-screen summary, or JSON
/// `{"slots": [{"slot", "outcome", "performed": [{"action", "id", "reason"}]}], "revoked", "failures"}`.
fn print_result(
    out: &mut dyn Write,
    report: &keyrotd::rotation::CycleReport,
    json: bool,
) -> std::io::Result<()> {
    if !json {
        return keyrotd::rotation::render_summary(out, report);
    }
    let slots: Vec<serde_json::Value> = report
        .slots
        .iter()
        .map(|s| {
            let outcome = match &s.outcome {
                Ok(keyrotd::rotation::SlotOutcome::Rotated { .. }) => "rotated".to_string(),
                Ok(keyrotd::rotation::SlotOutcome::Busy) => "busy".to_string(),
                Ok(keyrotd::rotation::SlotOutcome::Fresh) => "unchanged".to_string(),
                Err(e) => format!("failed ({}): {e}", e.kind.as_str()),
            };
            serde_json::json!({
                "slot": s.slot.id(),
                "project_name": s.slot.project_name,
                "service_account_name": s.slot.service_account_name,
                "outcome": outcome,
                "performed": s.performed.iter().map(|p| serde_json::json!({
                    "action": p.kind.as_str(), "id": p.id, "reason": p.reason,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let doc = serde_json::json!({
        "slots": slots,
        "revoked": report.user_keys_revoked,
        "failures": report.other_failures,
    });
    writeln!(
        out,
        "{}",
        serde_json::to_string_pretty(&doc).unwrap_or_default()
    )
}

/// `keyrotd revoke`: exit 0 every key revoked, 1 refused (a store serves one; nothing
/// changed) or a revocation failed, 2 bad configuration.
async fn revoke(cli: &Cli, keys: &[String], rotate_first: bool) -> i32 {
    let (engine, asked_at, survey) = match engine_and_survey(cli, false).await {
        Ok(e) => e,
        Err(code) => return code,
    };
    match engine
        .revoke_now(&survey, keys, rotate_first, asked_at)
        .await
    {
        Ok(report) => {
            engine.notifier.flush(daemon::NOTIFY_FLUSH_TIMEOUT).await;
            let json = !std::io::stdout().is_terminal();
            let _ = print_result(&mut std::io::stdout().lock(), &report, json);
            if report.any_failed() {
                EXIT_FAILED
            } else {
                0
            }
        }
        Err(why) => {
            fatal(format_args!("revoke: refused, nothing changed: {why}"));
            EXIT_FAILED
        }
    }
}

async fn sim(args: &SimArgs) -> i32 {
    let scenario: keyrotd::sim::Scenario = match args.scenario.parse() {
        Ok(s) => s,
        Err(e) => {
            fatal(format_args!("sim: --scenario: {e}"));
            return EXIT_BAD_CONFIG;
        }
    };
    match keyrotd::sim::run_standalone(&args.listen, args.admin_key.clone(), &scenario).await {
        Ok(()) => 0,
        Err(e) => {
            fatal(format_args!("sim: {}: {e}", args.listen));
            EXIT_FAILED
        }
    }
}
