//! What `[usage]` adds to a scan: [`Engine::survey`](keyrotd::rotation::Engine::survey)
//! of an organization with a week of usage, with `usage.enabled = false` and `true`,
//! against the in-process simulator with injected latency.
//!
//! ```text
//! cargo run --release --example bench_usage [-- --projects 200 --keys 10 \
//!     --latency-ms 100 --concurrency 16 --runs 3]
//! ```
//!
//! Every key gets four usage records spread over eight days. The rule covers every
//! project and no service account, so the scan lists projects and keys only (as
//! `bench_scan`); the usage fetch is its three requests (1 h buckets, the last hour's
//! 1 m buckets, 1 d costs), made in parallel with the audit-log read. Prints the
//! median wall time of each, and the added time as a share of the scan without usage.

mod common;

use std::time::Duration;

use common::*;
use keyrotd::sim::{Scenario, Sim};

const USAGE: &str = "bench_usage [--projects N] [--keys N (per project, even, >= 2)] \
[--latency-ms MS] [--concurrency N] [--runs N]";

async fn run_once(
    sim: &Sim,
    base_url: &str,
    concurrency: usize,
    usage: bool,
) -> (Duration, String) {
    let TimedSurvey {
        engine,
        survey,
        wall,
        ..
    } = timed_survey(
        sim,
        base_url,
        concurrency,
        "no-such-project-*",
        "*",
        &format!("[usage]\nenabled = {usage}"),
    )
    .await;
    assert_eq!(survey.inventory.usage.known().is_some(), usage);
    (wall, by_endpoint(engine.client.stats()))
}

#[tokio::main]
async fn main() {
    let flags = Flags::parse(USAGE);
    let projects: usize = flags.get("projects", 200);
    let keys: usize = flags.get("keys", 10);
    let latency = Duration::from_millis(flags.get("latency-ms", 100));
    let concurrency: usize = flags.get("concurrency", 16);
    let runs: usize = flags.get("runs", 3);
    let scenario = Scenario::new(42)
        .projects(projects)
        .service_accounts_per_project(4)
        .keys_per_service_account((keys - 2) / 4)
        .user_keys_per_project(2 + (keys - 2) % 4);
    std::env::set_var(ADMIN_KEY_ENV, ADMIN_KEY);
    let sim = Sim::with_seed(ADMIN_KEY, 42);
    let truth = scenario.populate(&sim);
    let now = sim.now();
    let mut n = 7u64;
    for k in &truth.keys {
        for _ in 0..4 {
            n = n
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let at = now - 120 - ((n >> 33) % (8 * 86_400)) as i64;
            sim.record_usage(&k.key_id, at, 1 + (n >> 40) % 50, 3000, 1200);
        }
    }
    let server = SimThread::start(&sim);
    sim.update_faults(|f| f.latency = latency);
    println!(
        "# usage: {projects} projects, {} keys with a week of usage, latency {} ms, concurrency {concurrency}, {runs} run(s), median shown",
        truth.keys.len(),
        latency.as_millis()
    );
    let mut walls = [Vec::new(), Vec::new()];
    for i in 0..runs {
        for (j, usage) in [false, true].into_iter().enumerate() {
            let (wall, detail) = run_once(&sim, &server.base_url, concurrency, usage).await;
            eprintln!(
                "  usage={usage} run {}: {:.3} s ({detail})",
                i + 1,
                secs(wall)
            );
            walls[j].push(secs(wall));
        }
    }
    let (off, on) = (median(&walls[0]), median(&walls[1]));
    print_table(
        &[
            "scan, usage off (s)",
            "scan, usage on (s)",
            "added (s)",
            "added / scan",
        ],
        &[vec![
            format!("{off:.3}"),
            format!("{on:.3}"),
            format!("{:.3}", on - off),
            format!("{:.1}%", (on - off) / off * 100.0),
        ]],
    );
}
