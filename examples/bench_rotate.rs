//! Rotation throughput: one cycle that rotates N stale slots into real stores, against
//! the in-process simulator with injected latency.
//!
//! ```text
//! cargo run --release --example bench_rotate [-- --slots 500 --accounts 10 \
//!     --concurrency 16 --latency-ms 20 --runs 3 --stores file,vault]
//! ```
//!
//! `--stores vault` needs OpenBao: `source scripts/test-servers.sh` exports
//! `KEYROTD_TEST_VAULT_ADDR` and `KEYROTD_TEST_VAULT_TOKEN`.
//!
//! Setup (not timed, no latency): `slots / accounts` projects with `accounts` service
//! accounts each and one stale key per account; one rule covers them all, and every
//! slot's store already serves that stale key (promoted long ago, no previous key). The
//! timed part is one [`Engine::cycle`](keyrotd::rotation::Engine::cycle) of a fresh
//! engine, as `keyrotd once` runs it: scan (projects, keys, service accounts), read
//! every slot, then per slot: intent, mint, stage, verify, promote, read back. Each
//! store gets its own run (a fresh organization and a fresh path prefix).
//!
//! The bound counts only the Admin API's round trips: the scan's (project pages in
//! sequence, then key and service-account pages `concurrency` at a time) plus, per
//! slot, its chain of sequential API calls (mint, verify, then the replaced key's expiry,
//! `policy.expire_replaced`: 3 × latency) spread
//! over `concurrency` slots at a time. Store round trips are not in the bound: they
//! are what the ratio shows beside the API's latency. The simulator runs on its own
//! thread and runtime, like a remote API.

mod common;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use keyrotd::config::Config;
use keyrotd::openai::Endpoint;
use keyrotd::rotation::SlotOutcome;
use keyrotd::sim::{Scenario, Sim};
use keyrotd::store::{
    ConsumerDoc, DynStore, Layout, Location, SecretRecord, SecretStore, SlotState, StoreResult,
    Transition, Version, MANAGED_BY,
};
use secrecy::SecretString;

const USAGE: &str = "bench_rotate [--slots N] [--accounts N (per project)] [--concurrency N] \
[--latency-ms MS] [--runs N] [--stores file,vault]";

/// Sequential Admin API calls in one slot's rotation: mint, verify, and the replaced
/// key's expiry (`policy.expire_replaced`, on by default).
const CHAIN: usize = 3;

struct Run {
    wall: Duration,
    rotated: usize,
    api_total: u64,
    api_scan: u64,
    store_reads: u64,
    store_writes: u64,
    /// CPU seconds during the timed cycle: this process (keyrotd and the simulator),
    /// and the OpenBao server when the store is Vault and its pid is known.
    cpu_self: f64,
    cpu_store: Option<f64>,
    detail: String,
}

/// CPU seconds (user + system) process `pid` has used so far, from `/proc`.
fn cpu_of(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): utime is the 12th, stime
    // the 13th.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// The OpenBao server's pid, from the pid file `scripts/test-servers.sh` writes for
/// the address in `KEYROTD_TEST_VAULT_ADDR`.
fn openbao_pid() -> Option<String> {
    let addr = std::env::var("KEYROTD_TEST_VAULT_ADDR").ok()?;
    let port = addr.rsplit(':').next()?.trim_end_matches('/');
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let pid =
        std::fs::read_to_string(root.join(format!(".test-servers/openbao-{port}.pid"))).ok()?;
    Some(pid.trim().to_string())
}

/// Counts the store calls of the timed cycle. For the Vault store each is one request
/// (a read is one `GET <mount>/data/<path>`, a write one `cas` write); the only other
/// request, the `managed-by` metadata mark, is made once per secret, at setup here.
#[derive(Debug)]
struct Counting {
    inner: DynStore,
    reads: AtomicU64,
    writes: AtomicU64,
}

#[async_trait::async_trait]
impl SecretStore for Counting {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    async fn read(&self, path: &str) -> StoreResult<SlotState> {
        self.reads.fetch_add(1, Relaxed);
        self.inner.read(path).await
    }
    async fn apply(
        &self,
        path: &str,
        expected: &Version,
        t: &Transition,
    ) -> StoreResult<SlotState> {
        // A read and a write.
        self.reads.fetch_add(1, Relaxed);
        self.writes.fetch_add(1, Relaxed);
        self.inner.apply(path, expected, t).await
    }
    async fn apply_to(
        &self,
        path: &str,
        current: &SlotState,
        t: &Transition,
    ) -> StoreResult<SlotState> {
        // A read and a write for backends without their own `apply_to` (the file store
        // reads under its lock); a write for Vault.
        if self.inner.kind() != "vault" {
            self.reads.fetch_add(1, Relaxed);
        }
        self.writes.fetch_add(1, Relaxed);
        self.inner.apply_to(path, current, t).await
    }
    fn layout(&self) -> Layout {
        self.inner.layout()
    }
    fn state_is_compare_and_set(&self) -> bool {
        self.inner.state_is_compare_and_set()
    }
    async fn read_consumer(&self, path: &str) -> StoreResult<ConsumerDoc> {
        self.reads.fetch_add(1, Relaxed);
        self.inner.read_consumer(path).await
    }
    async fn write_consumer(
        &self,
        path: &str,
        record: Option<&SecretRecord>,
        expected: &Version,
    ) -> StoreResult<Version> {
        // The file store compares under its lock (a read); Vault's `cas` does it.
        if self.inner.kind() != "vault" {
            self.reads.fetch_add(1, Relaxed);
        }
        self.writes.fetch_add(1, Relaxed);
        self.inner.write_consumer(path, record, expected).await
    }
    async fn health(&self) -> StoreResult<()> {
        self.inner.health().await
    }
    async fn probe_write(&self, path: &str) -> StoreResult<()> {
        self.inner.probe_write(path).await
    }
}

fn store_toml(kind: &str, dir: &std::path::Path) -> String {
    match kind {
        "file" => format!("[stores.s]\ntype = \"file\"\ndir = \"{}\"\n", dir.display()),
        "vault" => vault_store_toml("s"),
        other => {
            eprintln!("unknown store kind {other:?} (file, vault)");
            std::process::exit(2);
        }
    }
}

async fn run_once(kind: &str, scenario: &Scenario, concurrency: usize, latency: Duration) -> Run {
    let sim = Sim::with_seed(ADMIN_KEY, rand::random());
    let truth = scenario.populate(&sim);
    let server = SimThread::start(&sim);
    let dir = tempfile::tempdir().expect("temp dir");
    let prefix = format!("bench-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
    let toml = format!(
        r#"
[daemon]
concurrency = {concurrency}
[openai]
base_url = "{base}"
admin_key_env = "{ADMIN_KEY_ENV}"
[policy]
max_age = "90d"
grace_period = "24h"
{stores}
[[rotate]]
name = "bench"
project = "*"
service_account = "*"
stores = ["s"]
path = "{prefix}/{{project_name}}/{{service_account_name}}"
"#,
        base = server.base_url,
        stores = store_toml(kind, dir.path()),
    );
    let cfg = Config::from_toml(&toml).expect("bench config is valid");

    // Setup: every slot's store serves the account's (stale) key.
    let setup = keyrotd::app::build_engine(&cfg, true)
        .await
        .expect("engine builds");
    let views = setup.survey().await.expect("setup scan").views;
    let store = setup.stores.get("s").expect("store s").clone();
    let long_ago = Utc::now() - chrono::Duration::days(200);
    for v in &views {
        let key = truth
            .keys
            .iter()
            .find(|k| k.owner_id == v.slot.service_account_id)
            .expect("a key per account");
        let record = SecretRecord {
            api_key: SecretString::from(key.value.clone()),
            key_id: key.key_id.clone(),
            project_id: key.project_id.clone(),
            service_account_id: key.owner_id.clone(),
            created_at: keyrotd::policy::ts(key.created_at),
            managed_by: MANAGED_BY.to_string(),
        };
        // As keyrotd left it long ago: the state record at the slot's identity, the
        // six fields at its path.
        let mut seeded = SlotState {
            current: Some(record.clone()),
            ..SlotState::default()
        };
        seeded.book.promoted_at = Some(long_ago);
        seeded.book.locations = vec![Location {
            path: v.slot.path.clone(),
            retire_after: None,
        }];
        let key_path = v.slot.state_key();
        let st = store.read(&key_path).await.expect("store read");
        store
            .apply(
                &key_path,
                &st.version,
                &Transition::Import(Box::new(seeded)),
            )
            .await
            .expect("seed state");
        let doc = store.read_consumer(&v.slot.path).await.expect("store read");
        store
            .write_consumer(&v.slot.path, Some(&record), &doc.version)
            .await
            .expect("seed document");
    }
    drop(setup);

    // The timed cycle, on a fresh engine (fresh connections), as `keyrotd once`.
    sim.update_faults(|f| f.latency = latency);
    sim.clear_requests();
    let mut engine = keyrotd::app::build_engine(&cfg, false)
        .await
        .expect("engine builds");
    engine.settings.verify_backoff = Duration::from_millis(50);
    let counting = Arc::new(Counting {
        inner: engine.stores.get("s").expect("store s").clone(),
        reads: AtomicU64::new(0),
        writes: AtomicU64::new(0),
    });
    engine
        .stores
        .insert("s".to_string(), counting.clone() as DynStore);
    let store_pid = (kind == "vault").then(openbao_pid).flatten();
    let cpu = || {
        (
            cpu_of("self").unwrap_or(0.0),
            store_pid.as_deref().and_then(cpu_of),
        )
    };
    let (self0, store0) = cpu();
    let started = Instant::now();
    let report = engine.cycle().await;
    let wall = started.elapsed();
    let (self1, store1) = cpu();
    assert!(
        report.scan_error.is_none(),
        "scan failed: {:?}",
        report.scan_error
    );
    let failed: Vec<String> = report
        .slots
        .iter()
        .filter_map(|s| s.outcome.as_ref().err().map(|e| e.to_string()))
        .take(3)
        .collect();
    assert!(failed.is_empty(), "slots failed: {failed:?}");
    let rotated = report
        .slots
        .iter()
        .filter(|s| matches!(s.outcome, Ok(SlotOutcome::Rotated { .. })))
        .count();
    let stats = engine.client.stats();
    let api_scan: u64 = stats
        .snapshot()
        .iter()
        .filter(|(e, _, _)| {
            matches!(
                e,
                Endpoint::ListProjects | Endpoint::ListApiKeys | Endpoint::ListServiceAccounts
            )
        })
        .map(|(_, _, n)| n)
        .sum();
    let run = Run {
        wall,
        rotated,
        api_total: stats.total(),
        api_scan,
        store_reads: counting.reads.load(Relaxed),
        store_writes: counting.writes.load(Relaxed),
        cpu_self: self1 - self0,
        cpu_store: store0.zip(store1).map(|(a, b)| b - a),
        detail: by_endpoint(stats),
    };
    drop(server);
    run
}

#[tokio::main]
async fn main() {
    let flags = Flags::parse(USAGE);
    let slots: usize = flags.get("slots", 500);
    let accounts: usize = flags.get("accounts", 10);
    let concurrency: usize = flags.get("concurrency", 16);
    let latency = Duration::from_millis(flags.get("latency-ms", 20));
    let runs: usize = flags.get("runs", 3);
    let kinds = flags.string("stores", "file");
    assert!(
        slots % accounts == 0,
        "--slots must be a multiple of --accounts"
    );
    let projects = slots / accounts;
    std::env::set_var(ADMIN_KEY_ENV, ADMIN_KEY);
    let scenario = Scenario::new(7)
        .projects(projects)
        .service_accounts_per_project(accounts)
        .keys_per_service_account(1)
        .user_keys_per_project(0)
        .stale_fraction(1.0)
        .never_used_fraction(0.0);

    let project_pages = pages(projects);
    let scan_rest = projects * (pages(accounts) + pages(accounts));
    let scan_min = project_pages + scan_rest;
    let l = latency.as_secs_f64();
    let scan_bound = project_pages as f64 * l + scan_rest as f64 * l / concurrency as f64;
    let rotate_bound = (slots * CHAIN) as f64 * l / concurrency as f64;
    let total_bound = scan_bound + rotate_bound;
    println!(
        "# rotate: {slots} stale slots ({projects} projects × {accounts} accounts), concurrency {concurrency}, \
         latency {} ms, {runs} run(s) per store, median shown",
        latency.as_millis()
    );

    let mut rows = Vec::new();
    for kind in kinds.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        let mut walls = Vec::new();
        let mut per_rotation = Vec::new();
        let mut scan_reqs = Vec::new();
        let mut store_calls = Vec::new();
        let (mut cpu_self, mut cpu_store) = (Vec::new(), Vec::new());
        for i in 0..runs {
            let r = run_once(kind, &scenario, concurrency, latency).await;
            assert_eq!(r.rotated, slots, "every slot rotated");
            let store_cpu = r
                .cpu_store
                .map_or(String::new(), |c| format!(", OpenBao {c:.2} s"));
            eprintln!(
                "  {kind} run {}: {:.3} s, {} rotated, {} requests ({}); CPU: bench process {:.2} s{store_cpu}",
                i + 1,
                secs(r.wall),
                r.rotated,
                r.api_total,
                r.detail,
                r.cpu_self,
            );
            cpu_self.push(r.cpu_self);
            cpu_store.extend(r.cpu_store);
            walls.push(secs(r.wall));
            per_rotation.push((r.api_total - r.api_scan) as f64 / r.rotated.max(1) as f64);
            scan_reqs.push(r.api_scan as f64);
            let n = r.rotated.max(1) as f64;
            store_calls.push((r.store_reads as f64 / n, r.store_writes as f64 / n));
        }
        let (reads, writes) = store_calls[store_calls.len() / 2];
        let wall = median(&walls);
        rows.push(vec![
            kind.to_string(),
            slots.to_string(),
            format!("{} / {scan_min}", median(&scan_reqs)),
            format!("{:.2}", median(&per_rotation)),
            format!("{reads:.2} / {writes:.2}"),
            format!("{wall:.3}"),
            format!("{:.1}", slots as f64 / wall),
            match cpu_store.is_empty() {
                true => format!("{:.2} / -", median(&cpu_self)),
                false => format!("{:.2} / {:.2}", median(&cpu_self), median(&cpu_store)),
            },
            format!("{total_bound:.3}"),
            format!("{:.2}", wall / total_bound),
        ]);
    }
    print_table(
        &[
            "store",
            "rotated",
            "scan requests / min",
            "API requests per rotation",
            "store reads / writes per rotation",
            "wall s",
            "rotations/s",
            "CPU s: bench / OpenBao",
            "bound s",
            "ratio",
        ],
        &rows,
    );
    println!(
        "bound = scan ({project_pages} × {ms} ms + {scan_rest} × {ms} ms / {concurrency} = {scan_bound:.3} s) \
         + rotations ({slots} × {CHAIN} × {ms} ms / {concurrency} = {rotate_bound:.3} s)",
        ms = latency.as_millis()
    );
}
