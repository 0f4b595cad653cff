//! `keyrotd demo`: the whole product in a few seconds, with nothing to set up.
//!
//! An in-process Admin API simulator holds a small generated organization (four
//! projects, service-account and user keys, some stale), a file store lives in a
//! temporary directory, and the config is built in code: two rules (`prod-*`,
//! `staging-*`), a 2-second grace period, verification on. The demo prints the plan,
//! runs one cycle (every managed slot gets a fresh, verified key in the file store),
//! shows what went where with redacted values, waits out the grace period and runs a
//! second cycle, which revokes the stale keys the new ones replaced.
//!
//! Nothing leaves the machine (the simulator listens on loopback), no credential is
//! needed, and no key value is ever printed in full.

use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use secrecy::ExposeSecret;

use crate::config::{Config, FileConfig};
use crate::plan::Plan;
use crate::policy::Verdict;
use crate::rotation::{CycleReport, Engine, SlotOutcome};
use crate::sim::{OwnerRef, Scenario, Sim, SimServer};
use crate::store::file::FileStore;

/// Seed of the generated organization: the same ids and ages on every run.
const SEED: u64 = 2026;
/// The grace period between promoting a new key and revoking the old one.
const GRACE: Duration = Duration::from_secs(2);
/// `policy.max_age` of the demo, in days.
const MAX_AGE_DAYS: i64 = 90;
/// The store every rule writes to.
const STORE: &str = "local";

/// Runs the showcase. Returns the exit code.
pub async fn run() -> i32 {
    crate::telemetry::quiet_by_default("warn");
    let mut out = Out {
        color: std::io::stdout().is_terminal(),
    };
    match demo(&mut out).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("keyrotd demo: {e}");
            crate::EXIT_FAILED
        }
    }
}

/// Stdout with optional ANSI styling.
struct Out {
    color: bool,
}

impl Out {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    fn heading(&self, text: &str) {
        println!();
        println!("{}", self.paint("1;36", &format!("== {text}")));
    }
}

/// The simulator, the temporary directory and the engine of one demo run.
struct World {
    sim: Sim,
    server: SimServer,
    dir: tempfile::TempDir,
    engine: Engine,
    files: FileStore,
}

async fn demo(out: &mut Out) -> Result<(), String> {
    let started = Instant::now();
    let world = setup().await?;
    let sim = &world.sim;
    let key_count = sim.all_keys().len();
    let project_count = sim.projects().len();
    println!(
        "{} an in-process OpenAI Admin API simulator ({project_count} projects, {key_count} \
         keys, on {}) and a file store in {}",
        out.paint("1", "keyrotd demo:"),
        world.server.addr,
        world.dir.path().display()
    );
    println!(
        "rules: prod-* and staging-* -> store \"{STORE}\" at openai/{{project_name}}/{{service_account_name}}; \
         max_age {MAX_AGE_DAYS}d, grace period {} s, verify on",
        GRACE.as_secs()
    );

    out.heading("1. Plan (read-only: what keyrotd sees and would do)");
    let survey = world
        .engine
        .survey()
        .await
        .map_err(|e| format!("plan: {e}"))?;
    let plan = world.engine.plan(&survey);
    let mut stdout = std::io::stdout().lock();
    plan.render_table(&mut stdout, out.color)
        .map_err(|e| format!("stdout: {e}"))?;
    drop(stdout);

    out.heading("2. Rotation cycle: mint, store, verify, promote");
    let first = world.engine.cycle().await;
    check(&first, "first cycle")?;
    let grace_from = Instant::now();
    let rotated = show_rotated(out, &world, &first).await?;
    show_reported(out, &plan);

    out.heading(&format!(
        "3. Grace period ({} s): old keys stay valid while consumers pick up the new ones",
        GRACE.as_secs()
    ));
    let before: BTreeSet<String> = sim.deleted_keys().into_iter().collect();
    let wait = (GRACE + Duration::from_millis(100)).saturating_sub(grace_from.elapsed());
    println!("waiting {:.1} s ...", wait.as_secs_f64());
    tokio::time::sleep(wait).await;
    let second = world.engine.cycle().await;
    check(&second, "second cycle")?;
    let revoked: Vec<String> = sim
        .deleted_keys()
        .into_iter()
        .filter(|k| !before.contains(k))
        .collect();
    show_revoked(out, &world, &revoked);
    let live = serving_live_keys(&world, &second).await?;

    out.heading("Done");
    let m = &world.engine.metrics;
    println!(
        "metrics: keyrotd_rotations_total{{outcome=\"completed\"}} {}, \
         keyrotd_revocations_total{{outcome=\"revoked\"}} {}",
        m.rotations(crate::metrics::RotationOutcome::Completed),
        m.revocations(crate::metrics::RevocationOutcome::Revoked)
    );
    println!(
        "{} in {:.1} s: {rotated} keys minted, verified and stored; {} old keys revoked after \
         the grace period; {live}/{} slots serve a live key.",
        out.paint("1;32", "Demo finished"),
        started.elapsed().as_secs_f64(),
        revoked.len(),
        second.slots.len(),
    );
    println!(
        "No credentials used, nothing left this machine; the temporary directory is removed \
         now. Next: README.md (\"Deploying\"), config/keyrotd.example.toml."
    );
    let World { server, dir, .. } = world;
    server.shutdown().await;
    drop(dir);
    Ok(())
}

/// Starts the simulator, writes the admin key file and builds the engine.
async fn setup() -> Result<World, String> {
    let admin_key = format!("sk-admin-demo-{:032x}", rand::random::<u128>());
    let sim = Sim::with_seed(&admin_key, SEED);
    Scenario::new(SEED)
        .projects(4)
        .service_accounts_per_project(2)
        .keys_per_service_account(1)
        .user_keys_per_project(1)
        .stale_fraction(0.5)
        .never_used_fraction(0.1)
        .populate(&sim);
    let server = sim
        .start()
        .await
        .map_err(|e| format!("cannot start the simulator: {e}"))?;
    let dir = tempfile::Builder::new()
        .prefix("keyrotd-demo-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    // The admin key reaches keyrotd the way it does in production: from a file.
    let key_file = dir.path().join("admin-key");
    write_private(&key_file, admin_key.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", key_file.display()))?;
    let secrets = dir.path().join("secrets");
    let toml = format!(
        r#"
[daemon]
concurrency = 4
[openai]
base_url = "{base}"
admin_key_file = "{key_file}"
max_retries = 2
request_timeout = "5s"
[policy]
max_age = "{MAX_AGE_DAYS}d"
grace_period = "{grace}s"
verify = true
verify_timeout = "5s"
user_keys = "report"
[stores.{STORE}]
type = "file"
dir = "{secrets}"
[[rotate]]
name = "prod"
project = "prod-*"
stores = ["{STORE}"]
path = "openai/{{project_name}}/{{service_account_name}}"
[[rotate]]
name = "staging"
project = "staging-*"
stores = ["{STORE}"]
path = "openai/{{project_name}}/{{service_account_name}}"
"#,
        base = server.base_url,
        key_file = key_file.display(),
        grace = GRACE.as_secs(),
        secrets = secrets.display(),
    );
    let cfg = isolated_config(&toml)?;
    let engine = crate::app::build_engine(&cfg, false)
        .await
        .map_err(|e| format!("cannot build the engine: {e}"))?;
    let files = FileStore::new(STORE, &FileConfig { dir: secrets })
        .map_err(|e| format!("file store: {e}"))?;
    Ok(World {
        sim,
        server,
        dir,
        engine,
        files,
    })
}

/// Parses and validates the demo's TOML without the `KEYROTD__*` environment
/// overrides [`Config::from_toml`] applies: an operator's real settings (a real
/// `base_url`, say) must never leak into the demo.
fn isolated_config(toml: &str) -> Result<Config, String> {
    let raw = ::config::Config::builder()
        .add_source(::config::File::from_str(toml, ::config::FileFormat::Toml))
        .build()
        .map_err(|e| format!("demo config: {e}"))?;
    let cfg: Config = raw
        .try_deserialize()
        .map_err(|e| format!("demo config: {e}"))?;
    cfg.validate().map_err(|e| format!("demo config: {e}"))?;
    Ok(cfg)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

/// Fails the demo when a cycle did not go as it must.
fn check(report: &CycleReport, what: &str) -> Result<(), String> {
    if let Some(e) = &report.scan_error {
        return Err(format!("{what}: scan failed: {e}"));
    }
    let failed: Vec<String> = report
        .slots
        .iter()
        .filter_map(|s| {
            s.outcome
                .as_ref()
                .err()
                .map(|e| format!("{}: {e}", s.slot.path))
        })
        .collect();
    if !failed.is_empty() {
        return Err(format!("{what}: {}", failed.join("; ")));
    }
    Ok(())
}

/// `sk-svca…3f9a`: enough to recognise a key, far too little to use it.
pub fn redact(value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    if chars.len() < 16 {
        return "sk-…".to_string();
    }
    let head: String = chars[..7].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}

/// Prints each rotated slot: store path → file, new key id, redacted value, and the
/// old key it replaces. Returns how many slots rotated.
async fn show_rotated(out: &Out, w: &World, report: &CycleReport) -> Result<usize, String> {
    let mut rotated = 0;
    let mut sample: Option<PathBuf> = None;
    let store = w
        .engine
        .stores
        .get(STORE)
        .ok_or_else(|| format!("store {STORE} is not configured"))?;
    for r in &report.slots {
        let Ok(SlotOutcome::Rotated { key_id }) = &r.outcome else {
            continue;
        };
        rotated += 1;
        let s = &r.slot;
        let state = store
            .read(&s.path)
            .await
            .map_err(|e| format!("read back {}: {e}", s.path))?;
        let value = state
            .current
            .as_ref()
            .map(|c| redact(c.api_key.expose_secret()))
            .unwrap_or_else(|| "-".into());
        let file = w
            .files
            .file_path(&s.path)
            .map_err(|e| format!("{}: {e}", s.path))?;
        println!(
            "{} {:<28} new key {key_id}  {value}",
            out.paint("32", "rotated"),
            format!("{}/{}", s.project_name, s.service_account_name),
        );
        println!(
            "        {STORE}:{} -> {} ({})",
            s.path,
            file.display(),
            file_mode(&file)
        );
        for old in w.sim.keys(&s.project_id).iter().filter(|k| {
            k.owner == OwnerRef::ServiceAccount(s.service_account_id.clone())
                && k.id != *key_id
                && k.deleted_at.is_none()
        }) {
            let age = (w.sim.now() - old.created_at) / 86_400;
            let fate = if age > MAX_AGE_DAYS {
                "stale: revoked after the grace period"
            } else {
                "fresh: left alone until it is stale"
            };
            println!("        old key {} ({age} days, {fate})", old.id);
        }
        sample.get_or_insert(file);
    }
    if let Some(file) = sample {
        println!();
        println!(
            "what a consumer reads, e.g. {} (api_key redacted here):",
            file.display()
        );
        let doc = std::fs::read_to_string(&file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let mut v: serde_json::Value =
            serde_json::from_str(&doc).map_err(|e| format!("{}: {e}", file.display()))?;
        redact_json(&mut v);
        let pretty = serde_json::to_string_pretty(&v).unwrap_or_default();
        for line in pretty.lines() {
            println!("  {line}");
        }
    }
    Ok(rotated)
}

/// Replaces every string that looks like a key (`sk-...`) with its redacted form.
fn redact_json(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) if s.starts_with("sk-") => *s = redact(s),
        serde_json::Value::Array(a) => a.iter_mut().for_each(redact_json),
        serde_json::Value::Object(o) => o.values_mut().for_each(redact_json),
        _ => {}
    }
}

fn file_mode(path: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| format!("mode {:04o}", m.permissions().mode() & 0o7777))
        .unwrap_or_else(|e| e.to_string())
}

/// Keys keyrotd only reports: stale user keys and keys no rule manages.
fn show_reported(out: &Out, plan: &Plan) {
    let reported: Vec<_> = plan
        .keys
        .iter()
        .filter(|k| {
            k.verdict == Verdict::Report || (k.rule.is_none() && k.age_days > MAX_AGE_DAYS as u64)
        })
        .collect();
    if reported.is_empty() {
        return;
    }
    println!();
    println!(
        "{}",
        out.paint("35", "reported, not touched (a human decides):")
    );
    for k in reported {
        let why = if k.owner_type() == "user" {
            "user-owned: the API cannot re-issue it; its owner must replace it"
        } else {
            "no rule manages this project"
        };
        println!(
            "  {:<24} {:<18} {:>4} days  {}",
            k.key_id(),
            k.project_name(),
            k.age_days,
            why
        );
    }
}

/// Prints the keys the second cycle revoked.
fn show_revoked(out: &Out, w: &World, revoked: &[String]) {
    if revoked.is_empty() {
        println!("nothing was due for revocation");
        return;
    }
    for id in revoked {
        let Some(k) = w.sim.key(id) else {
            continue;
        };
        let project = w
            .sim
            .project(&k.project_id)
            .map(|p| p.name)
            .unwrap_or_else(|| k.project_id.clone());
        let age = (w.sim.now() - k.created_at) / 86_400;
        println!(
            "{} {id}  {:<28} ({age} days old, replaced by a verified key)",
            out.paint("31", "revoked"),
            format!("{project}/{}", k.owner_name),
        );
    }
}

/// How many slots serve a key the API accepts (DESIGN.md §5 I1), checked as a consumer would.
async fn serving_live_keys(w: &World, report: &CycleReport) -> Result<usize, String> {
    let store = w
        .engine
        .stores
        .get(STORE)
        .ok_or_else(|| format!("store {STORE} is not configured"))?;
    let mut live = 0;
    for r in &report.slots {
        let state = store
            .read(&r.slot.path)
            .await
            .map_err(|e| format!("read {}: {e}", r.slot.path))?;
        if state
            .current
            .is_some_and(|c| w.sim.use_key(c.api_key.expose_secret()))
        {
            live += 1;
        }
    }
    Ok(live)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_keeps_prefix_and_last_four() {
        assert_eq!(
            redact("sk-svcacct-abcdefghijklmnopqrstuvwxyz0123453f9a"),
            "sk-svca…3f9a"
        );
        assert_eq!(redact("sk-short"), "sk-…");
    }
}
