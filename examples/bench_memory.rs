//! Where a cycle's heap goes: a counting global allocator around the pieces of one
//! scan-only cycle over 2,000 projects × 10 keys (the in-process simulator, no latency).
//!
//! ```text
//! cargo run --release --example bench_memory [-- --projects 2000]
//! ```
//!
//! Prints the heap the inventory holds after `plan::scan`, what `Plan::build` adds, the
//! plan's JSON, and the peak of a whole `Engine::cycle` above what was allocated
//! before it. The process's RSS (`scripts/bench.sh memory`) is these plus the binary,
//! the runtime and the allocator's slack. The simulator's own allocations happen
//! before the baseline, except its per-request buffers and request log (small).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

use common::*;
use keyrotd::config::Config;
use keyrotd::plan::{self, Plan};
use keyrotd::sim::{Scenario, Sim};

const USAGE: &str = "bench_memory [--projects N]";

/// Counts live heap bytes and their high-water mark.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn grew(by: isize) {
    let now = LIVE.fetch_add(by, Relaxed) + by;
    PEAK.fetch_max(now, Relaxed);
}

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        grew(l.size() as isize);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        grew(new as isize - l.size() as isize);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn mib(bytes: isize) -> String {
    format!("{:.1}", bytes as f64 / 1_048_576.0)
}

/// Live bytes now, with the high-water mark reset to it.
fn mark() -> isize {
    let now = LIVE.load(Relaxed);
    PEAK.store(now, Relaxed);
    now
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let flags = Flags::parse(USAGE);
    let projects: usize = flags.get("projects", 2000);
    std::env::set_var(ADMIN_KEY_ENV, ADMIN_KEY);
    let sim = Sim::with_seed(ADMIN_KEY, 42);
    Scenario::new(42)
        .projects(projects)
        .service_accounts_per_project(4)
        .keys_per_service_account(2)
        .user_keys_per_project(2)
        .stale_fraction(0.3)
        .populate(&sim);
    let server = SimThread::start(&sim);
    let dir = tempfile::tempdir().expect("temp dir");
    let toml = format!(
        r#"
[openai]
base_url = "{base}"
admin_key_env = "{ADMIN_KEY_ENV}"
[stores.file]
type = "file"
dir = "{dir}"
[[rotate]]
name = "none"
project = "no-such-project-*"
service_account = "*"
stores = ["file"]
path = "bench/{{project_name}}/{{service_account_name}}"
"#,
        base = server.base_url,
        dir = dir.path().display()
    );
    let cfg = Config::from_toml(&toml).expect("bench config is valid");
    let engine = keyrotd::app::build_engine(&cfg, true)
        .await
        .expect("engine builds");
    let concurrency = engine.settings.concurrency;

    let mut rows = Vec::new();
    let base = mark();
    let inv = plan::scan(&engine.client, &engine.rules, false, concurrency)
        .await
        .expect("scan");
    let keys = inv.key_count();
    let inventory = LIVE.load(Relaxed) - base;
    rows.push(vec![
        "inventory after plan::scan".to_string(),
        mib(inventory),
        mib(PEAK.load(Relaxed) - base),
    ]);
    let before = mark();
    let built = Plan::build(&inv, &[], &engine.rules, &engine.policy, chrono::Utc::now());
    rows.push(vec![
        "Plan::build (no slots)".to_string(),
        mib(LIVE.load(Relaxed) - before),
        mib(PEAK.load(Relaxed) - before),
    ]);
    let before = mark();
    let json = built.to_json();
    rows.push(vec![
        "plan JSON (`keyrotd plan --format json`)".to_string(),
        mib(LIVE.load(Relaxed) - before),
        mib(PEAK.load(Relaxed) - before),
    ]);
    drop((json, built));
    drop(inv);

    let before = mark();
    let report = engine.cycle().await;
    assert!(report.scan_error.is_none(), "cycle scan failed");
    rows.push(vec![
        "whole Engine::cycle (held: its report)".to_string(),
        mib(LIVE.load(Relaxed) - before),
        mib(PEAK.load(Relaxed) - before),
    ]);
    drop(report);

    println!("# heap of a scan-only cycle over {projects} projects, {keys} keys");
    print_table(&["what", "held MiB", "peak MiB"], &rows);
    println!(
        "inventory: {} bytes per key",
        inventory / keys.max(1) as isize
    );
    drop(server);
}
