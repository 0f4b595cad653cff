//! Incident response end to end: `keyrotd rotate --project prod-payments
//! --service-account backend --revoke-old now`, the real binary, against the
//! simulator at a given API latency (100 ms by default), into real stores.
//!
//! ```text
//! cargo build --release --bin keyrotd --example bench_incident
//! target/release/examples/bench_incident [--latency-ms 100 --projects 20 --runs 5 \
//!     --stores file,vault]
//! ```
//!
//! `--stores vault` needs OpenBao: `source scripts/test-servers.sh` exports
//! `KEYROTD_TEST_VAULT_ADDR` and `KEYROTD_TEST_VAULT_TOKEN`. `KEYROTD_BIN` names the
//! binary (default `target/release/keyrotd`).
//!
//! Setup (not timed, no latency): `prod-payments` (backend, worker) and `--projects`
//! more projects with two service accounts each, every account with one stale key;
//! one `keyrotd once` puts a key of its own into every slot. Timed: the whole
//! `keyrotd rotate` process, start to exit. After each run the bench checks what the
//! command promises: exit 0, every store serves a new key the simulator accepts, and
//! the key it replaced is revoked.
//!
//! The bound is the chain of Admin API round trips the command cannot avoid, one after
//! the other: the project pages; each project's key and service-account listings, at
//! most `daemon.concurrency` (16) in flight, so ⌈2 × projects / 16⌉ round trips; then
//! the slot's own chain: mint the new key, verify it (`GET /models` with it), revoke
//! the old one. Process start, configuration and the local stores' round trips are not
//! in it: they are what the ratio shows beside the API's latency. The bench also counts
//! the round trips keyrotd actually chained (from the simulator's log: a request that
//! arrived at least one latency after the previous link of the chain is the next
//! link).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use keyrotd::sim::{OwnerRef, Sim};

const USAGE: &str = "bench_incident [--latency-ms MS] [--projects N] [--runs N] \
[--stores file,vault] [--verbose yes]";

/// Listings in flight at once (`daemon.concurrency` of the bench's config).
const CONCURRENCY: usize = 16;
/// The slot's own chain: mint, verify, revoke.
const SLOT_CHAIN: usize = 3;

fn store_toml(kind: &str, dir: &std::path::Path) -> String {
    match kind {
        "file" => format!(
            "[stores.file]\ntype = \"file\"\ndir = \"{}\"\n",
            dir.display()
        ),
        "vault" => vault_store_toml("vault"),
        other => {
            eprintln!("unknown store kind {other:?} (file, vault)");
            std::process::exit(2);
        }
    }
}

struct Bench {
    sim: Sim,
    _server: SimThread,
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
    bin: String,
    file_dir: std::path::PathBuf,
    prefix: String,
    stores: Vec<String>,
}

impl Bench {
    fn new(kinds: &[String], projects: usize) -> Bench {
        let sim = Sim::with_seed(ADMIN_KEY, 7);
        let now = sim.now();
        let seed = |name: &str, accounts: &[&str]| {
            let p = sim.add_project(name);
            for a in accounts {
                let id = sim.add_service_account(&p, a).expect("service account");
                sim.add_key_at(
                    &p,
                    OwnerRef::ServiceAccount(id),
                    "legacy",
                    now - 200 * 86400,
                    None,
                )
                .expect("key");
            }
        };
        seed("prod-payments", &["backend", "worker"]);
        for i in 0..projects {
            seed(&format!("prod-team-{i:03}"), &["backend", "worker"]);
        }
        let server = SimThread::start(&sim);
        let dir = tempfile::tempdir().expect("temp dir");
        let file_dir = dir.path().join("secrets");
        std::fs::create_dir_all(&file_dir).expect("store dir");
        let prefix = format!("bench-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
        let stores: String = kinds.iter().map(|k| store_toml(k, &file_dir)).collect();
        let names: Vec<String> = kinds.iter().map(|k| format!("\"{k}\"")).collect();
        let toml = format!(
            r#"
[daemon]
concurrency = {CONCURRENCY}
[openai]
base_url = "{base}"
admin_key_env = "{ADMIN_KEY_ENV}"
[policy]
max_age = "90d"
grace_period = "24h"
{stores}
[[rotate]]
name = "bench"
project = "prod-*"
service_account = "*"
stores = [{names}]
path = "{prefix}/{{project_name}}/{{service_account_name}}"
"#,
            base = server.base_url,
            names = names.join(", "),
        );
        let config = dir.path().join("keyrotd.toml");
        std::fs::write(&config, toml).expect("config");
        let bin = std::env::var("KEYROTD_BIN").unwrap_or_else(|_| "target/release/keyrotd".into());
        Bench {
            sim,
            _server: server,
            _dir: dir,
            config,
            bin,
            file_dir,
            prefix,
            stores: kinds.to_vec(),
        }
    }

    fn run(&self, args: &[&str]) -> (std::process::Output, Duration) {
        let started = Instant::now();
        let out = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .arg("--log-format")
            .arg("json")
            .args(args)
            .env(ADMIN_KEY_ENV, ADMIN_KEY)
            .env_remove("RUST_LOG")
            .output()
            .unwrap_or_else(|e| {
                eprintln!(
                    "cannot run {}: {e} (cargo build --release --bin keyrotd)",
                    self.bin
                );
                std::process::exit(2)
            });
        (out, started.elapsed())
    }

    /// The key id each store serves for prod-payments/backend.
    async fn served(&self) -> Vec<(String, Option<String>)> {
        let path = format!("{}/prod-payments/backend", self.prefix);
        let mut out = Vec::new();
        for kind in &self.stores {
            let id = match kind.as_str() {
                "file" => std::fs::read_to_string(self.file_dir.join(format!("{path}.json")))
                    .ok()
                    .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                    .and_then(|v| v["key_id"].as_str().map(str::to_string)),
                _ => vault_key_id(&path).await,
            };
            out.push((kind.clone(), id));
        }
        out
    }
}

async fn vault_key_id(path: &str) -> Option<String> {
    let addr = std::env::var("KEYROTD_TEST_VAULT_ADDR").ok()?;
    let token = std::env::var("KEYROTD_TEST_VAULT_TOKEN").ok()?;
    let v: serde_json::Value = reqwest::Client::new()
        .get(format!("{addr}/v1/secret/data/{path}"))
        .header("X-Vault-Token", token)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    v["data"]["data"]["key_id"].as_str().map(str::to_string)
}

/// Links of the chain of round trips in the simulator's log: a request that arrived at
/// least (nearly) one latency after the previous link could not start before an answer.
fn chained(sim: &Sim, latency: Duration, verbose: bool) -> usize {
    let mut reqs = sim.requests();
    reqs.sort_by_key(|r| r.at);
    let mut links = 0;
    let mut last: Option<Instant> = None;
    let first = reqs.first().map(|r| r.at);
    for r in reqs {
        let link = last.is_none_or(|l| r.at.duration_since(l) >= latency.mul_f64(0.9));
        if link {
            links += 1;
            last = Some(r.at);
        }
        if verbose {
            let ms = first.map_or(0, |f| r.at.duration_since(f).as_millis());
            let mark = if link { "*" } else { " " };
            eprintln!("    {mark} +{ms:>5} ms {} {}", r.method, r.path);
        }
    }
    links
}

#[tokio::main]
async fn main() {
    let flags = Flags::parse(USAGE);
    let latency = Duration::from_millis(flags.get("latency-ms", 100));
    let projects: usize = flags.get("projects", 20);
    let runs: usize = flags.get("runs", 5);
    let verbose = flags.string("verbose", "no") == "yes";
    let kinds: Vec<String> = flags
        .string("stores", "file")
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let b = Bench::new(&kinds, projects);
    let (boot, _) = b.run(&["once"]);
    assert!(
        boot.status.success(),
        "setup: keyrotd once failed:\n{}",
        String::from_utf8_lossy(&boot.stderr)
    );
    b.sim.update_faults(|f| f.latency = latency);
    let args = [
        "rotate",
        "--project",
        "prod-payments",
        "--service-account",
        "backend",
        "--revoke-old",
        "now",
        "--format",
        "json",
    ];
    let mut walls = Vec::new();
    let mut requests = Vec::new();
    let mut links = Vec::new();
    for i in 0..runs {
        // A rotation asked for in the second of the last promotion counts as answered
        // by it (promotion times are kept to the second).
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let before = b.served().await;
        let old = before[0].1.clone().expect("the slot serves a key");
        b.sim.clear_requests();
        let (out, wall) = b.run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "run {}: rotate failed:\n{stderr}",
            i + 1
        );
        let after = b.served().await;
        for (store, id) in &after {
            let id = id
                .as_deref()
                .unwrap_or_else(|| panic!("{store} serves nothing"));
            assert_ne!(id, old, "{store} still serves the old key");
            assert!(
                b.sim.is_live(id),
                "{store} serves a key the API does not accept"
            );
            assert_eq!(Some(id), after[0].1.as_deref(), "the stores agree");
        }
        assert!(
            !b.sim.is_live(&old),
            "run {}: the old key is revoked",
            i + 1
        );
        let n = b.sim.requests().len();
        let l = chained(&b.sim, latency, verbose);
        eprintln!(
            "  run {}: {:.3} s, {n} API requests, {l} chained round trips",
            i + 1,
            secs(wall)
        );
        walls.push(secs(wall));
        requests.push(n as f64);
        links.push(l as f64);
    }
    let wall = median(&walls);
    let all = projects + 1;
    let waves = (2 * all).div_ceil(CONCURRENCY);
    let needed = pages(all) + waves + SLOT_CHAIN;
    let bound = needed as f64 * latency.as_secs_f64();
    println!(
        "# keyrotd rotate --revoke-old now, one slot, {} + 1 projects, latency {} ms, stores {}, \
         {runs} runs, median shown",
        projects,
        latency.as_millis(),
        kinds.join("+")
    );
    print_table(
        &[
            "stores",
            "API requests",
            "chained round trips / needed",
            "wall s",
            "bound s",
            "ratio",
        ],
        &[vec![
            kinds.join("+"),
            format!("{}", median(&requests)),
            format!("{} / {needed}", median(&links)),
            format!("{wall:.3}"),
            format!("{bound:.3}"),
            format!("{:.2}", wall / bound),
        ]],
    );
    println!(
        "bound = ({} project page(s) + {waves} listing round trips ({} listings, {CONCURRENCY} in \
         flight) + {SLOT_CHAIN} (mint, verify, revoke)) × {} ms",
        pages(all),
        2 * all,
        latency.as_millis()
    );
}
