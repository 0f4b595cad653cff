//! End-to-end scan benchmark against the in-process simulator with injected latency.
//!
//! ```text
//! cargo run --release --example bench_scan [-- --projects 2000 --keys 10 \
//!     --latency-ms 20 --concurrency 1,4,16,64 --runs 3 --sa-listing 16]
//! ```
//!
//! A *scan* here is [`Engine::survey`](keyrotd::rotation::Engine::survey) and its plan, what `keyrotd
//! plan` and the first half of every cycle do: list every project, list every
//! project's keys, list service accounts for the projects a rule covers, derive the
//! slots, read their stores and build the plan. The config's one rule matches no
//! project (`no-such-project-*`), so only the listings touch the network (with the
//! keys' creators from the audit log, one request per 100 listed keys, and the usage
//! and costs requests beside them): there are no service-account listings, no slots
//! and no store reads. `--sa-listing C` adds rows at
//! concurrency C whose rule covers every project but no service account
//! (`project = "*"`, `service_account = "no-such-sa-*"`): one service-account listing
//! per project, still no slots.
//!
//! Per concurrency it prints the median of `--runs` runs (a fresh engine, so a fresh
//! connection pool, each run): requests made (the client's `ApiStats`), the minimum
//! the pagination needs (listings and creators; the 3 usage and costs requests are
//! not counted: they wait for nothing and nothing waits for them), requests the simulator saw more than once, wall time, and two
//! round-trip lower bounds:
//!
//! - `bound`: min requests × latency / concurrency, as if every request could be in
//!   flight from the start;
//! - `seq bound`: project pages × latency + the other requests × latency /
//!   concurrency. Project pages are inherently sequential (each needs the previous
//!   page's cursor); this is the bound for a scan that lists all projects before
//!   listing any keys, and `bound` is the one a scan that starts listing keys as
//!   soon as the first project page arrives can approach.
//!
//! Both bounds take the nominal latency. `bare RTT` is the round trip a bare `reqwest`
//! loop measures against the same simulator at the same concurrency (the simulator's
//! sleep ends on tokio's 1 ms timer tick, and all requests share two cores); `ratio @
//! bare RTT` is the wall time over `bound` recomputed with it: what is left is
//! keyrotd's own overhead and the sequential project pages.
//!
//! The simulator runs on its own thread and runtime, like a remote API.

mod common;

use std::time::Duration;

use common::*;
use keyrotd::sim::{Scenario, Sim};

const USAGE: &str = "bench_scan [--projects N] [--keys N (per project, even, >= 2)] \
[--latency-ms MS] [--concurrency 1,4,16,64] [--runs N] [--sa-listing C (0: off)]";

struct Run {
    requests: u64,
    repeated: u64,
    wall: Duration,
    keys: usize,
    detail: String,
}

async fn run_once(
    sim: &Sim,
    base_url: &str,
    concurrency: usize,
    project_glob: &str,
    sa_glob: &str,
) -> Run {
    let TimedSurvey {
        engine,
        survey,
        planned_keys,
        wall,
    } = timed_survey(sim, base_url, concurrency, project_glob, sa_glob, "").await;
    assert!(
        survey.views.is_empty(),
        "the bench rule must define no slot"
    );
    assert_eq!(planned_keys, survey.inventory.key_count());
    let stats = engine.client.stats();
    Run {
        requests: stats.total(),
        repeated: repeated_requests(sim),
        wall,
        keys: survey.inventory.key_count(),
        detail: by_endpoint(stats),
    }
}

#[tokio::main]
async fn main() {
    let flags = Flags::parse(USAGE);
    let projects: usize = flags.get("projects", 2000);
    let keys: usize = flags.get("keys", 10);
    let latency = Duration::from_millis(flags.get("latency-ms", 20));
    let concurrencies = flags.list("concurrency", &[1, 4, 16, 64]);
    let runs: usize = flags.get("runs", 3);
    let sa_listing: usize = flags.get("sa-listing", 16);
    assert!(keys >= 2 && keys % 2 == 0, "--keys must be even and >= 2");

    // keys per project = 4 accounts × keys_per_sa + user keys.
    let (sas, per_sa, users) = if keys >= 10 {
        (4, (keys - 2) / 4, 2 + (keys - 2) % 4)
    } else {
        (1, keys - 1, 1)
    };
    let scenario = Scenario::new(42)
        .projects(projects)
        .service_accounts_per_project(sas)
        .keys_per_service_account(per_sa)
        .user_keys_per_project(users)
        .stale_fraction(0.3);
    std::env::set_var(ADMIN_KEY_ENV, ADMIN_KEY);
    let sim = Sim::with_seed(ADMIN_KEY, 42);
    let truth = scenario.populate(&sim);
    assert_eq!(truth.keys.len(), projects * keys);
    let server = SimThread::start(&sim);
    sim.update_faults(|f| f.latency = latency);
    let key_urls: Vec<String> = truth
        .projects
        .iter()
        .map(|p| {
            format!(
                "{}/organization/projects/{}/api_keys?limit=100&owner_project_access=any",
                server.base_url, p.id
            )
        })
        .collect();

    let project_pages = pages(projects);
    let key_pages = projects * pages(keys);
    // The keys' creators: one audit-log request per 100 listed keys, sent during the
    // listing under the same concurrency limit (`plan::CREATIONS_PER_REQUEST`).
    let creation_requests = (projects * keys).div_ceil(keyrotd::plan::CREATIONS_PER_REQUEST);
    println!(
        "# scan: {projects} projects × {keys} keys = {} keys, latency {} ms, {runs} run(s) each, median shown",
        projects * keys,
        latency.as_millis()
    );

    let mut cases: Vec<(String, usize, &str, &str, usize)> = concurrencies
        .iter()
        .map(|&c| (c.to_string(), c, "no-such-project-*", "*", 0))
        .collect();
    if sa_listing > 0 {
        cases.push((
            format!("{sa_listing} +SA"),
            sa_listing,
            "*",
            "no-such-sa-*",
            projects * pages(sas),
        ));
    }

    let mut rows = Vec::new();
    for (label, c, pglob, sglob, sa_pages) in cases {
        let min = project_pages + key_pages + sa_pages + creation_requests;
        let rest = key_pages + sa_pages + creation_requests;
        let b = bound(project_pages, rest, latency, c);
        let mut walls = Vec::new();
        let mut requests = Vec::new();
        let mut rtts = Vec::new();
        let mut repeated = 0;
        for i in 0..runs {
            rtts.push(secs(bare_rtt(&key_urls, c, (8 * c).max(100)).await));
            let r = run_once(&sim, &server.base_url, c, pglob, sglob).await;
            assert_eq!(r.keys, projects * keys, "the scan saw every key");
            eprintln!(
                "  c={label} run {}: {:.3} s, {} requests ({})",
                i + 1,
                secs(r.wall),
                r.requests,
                r.detail
            );
            walls.push(secs(r.wall));
            requests.push(r.requests as f64);
            repeated += r.repeated;
        }
        let wall = median(&walls);
        let rtt = median(&rtts);
        let floor = bound(project_pages, rest, Duration::from_secs_f64(rtt), c);
        rows.push(vec![
            label,
            format!("{}", median(&requests)),
            min.to_string(),
            repeated.to_string(),
            format!("{wall:.3}"),
            format!("{:.3}", b.simple),
            format!("{:.3}", b.tight),
            format!("{:.2}", wall / b.simple),
            format!("{:.2}", wall / b.tight),
            format!("{:.1}", rtt * 1000.0),
            format!("{:.2}", wall / floor.simple),
        ]);
    }
    print_table(
        &[
            "concurrency",
            "requests",
            "min requests",
            "repeated",
            "wall s",
            "bound s",
            "seq bound s",
            "ratio",
            "seq ratio",
            "bare RTT ms",
            "ratio @ bare RTT",
        ],
        &rows,
    );
    drop(server);
}
