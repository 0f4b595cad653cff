//! Helpers shared by the `bench_*` examples: flags, medians, tables, bounds.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use keyrotd::openai::ApiStats;
use keyrotd::sim::Sim;

/// The admin key the in-process simulator accepts.
pub const ADMIN_KEY: &str = "sk-admin-bench-0123456789";
/// The environment variable the generated configs read it from.
pub const ADMIN_KEY_ENV: &str = "KEYROTD_BENCH_ADMIN_KEY";

/// `--name value` flags; anything else is an error.
pub struct Flags(BTreeMap<String, String>);

impl Flags {
    /// Parses `std::env::args()`; `--help` prints `usage` and exits.
    pub fn parse(usage: &str) -> Flags {
        let mut map = BTreeMap::new();
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            if a == "--help" || a == "-h" {
                println!("{usage}");
                std::process::exit(0);
            }
            let Some(name) = a.strip_prefix("--") else {
                eprintln!("unexpected argument {a:?}\n{usage}");
                std::process::exit(2);
            };
            let (name, value) = match name.split_once('=') {
                Some((n, v)) => (n.to_string(), v.to_string()),
                None => match args.next() {
                    Some(v) => (name.to_string(), v),
                    None => {
                        eprintln!("--{name} needs a value\n{usage}");
                        std::process::exit(2);
                    }
                },
            };
            map.insert(name, value);
        }
        Flags(map)
    }

    pub fn get<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        match self.0.get(name) {
            None => default,
            Some(v) => v.parse().unwrap_or_else(|_| {
                eprintln!("--{name}: cannot parse {v:?}");
                std::process::exit(2)
            }),
        }
    }

    pub fn list(&self, name: &str, default: &[usize]) -> Vec<usize> {
        match self.0.get(name) {
            None => default.to_vec(),
            Some(v) => v
                .split(',')
                .map(|s| {
                    s.trim().parse().unwrap_or_else(|_| {
                        eprintln!("--{name}: cannot parse {s:?}");
                        std::process::exit(2)
                    })
                })
                .collect(),
        }
    }

    pub fn string(&self, name: &str, default: &str) -> String {
        self.0
            .get(name)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    }
}

/// The median of a non-empty sample (mean of the middle two for an even count).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Pages a listing of `n` items takes at `limit = 100` (an empty listing is one page).
pub fn pages(n: usize) -> usize {
    n.div_ceil(100).max(1)
}

/// Round-trip lower bounds for `first` strictly sequential requests followed by
/// `rest` requests at most `concurrency` at a time, each costing `latency`.
///
/// - `simple`: every request in parallel slots: (first + rest) × latency / concurrency.
/// - `tight`: first × latency + rest × latency / concurrency (the sequential prefix,
///   e.g. the project pages a scan must read before it knows the projects).
pub struct Bound {
    pub simple: f64,
    pub tight: f64,
}

pub fn bound(first: usize, rest: usize, latency: Duration, concurrency: usize) -> Bound {
    let l = latency.as_secs_f64();
    let c = concurrency.max(1) as f64;
    Bound {
        simple: (first + rest) as f64 * l / c,
        tight: first as f64 * l + rest as f64 * l / c,
    }
}

/// Requests per (method, path, query) the simulator saw more than once: pages or
/// calls made twice.
pub fn repeated_requests(sim: &Sim) -> u64 {
    sim.request_counts()
        .into_iter()
        .filter(|((method, _, _), _)| method == "GET")
        .map(|(_, n)| n.saturating_sub(1))
        .sum()
}

/// `endpoint=count` for every endpoint the client called, with failures marked.
pub fn by_endpoint(stats: &ApiStats) -> String {
    let mut out: BTreeMap<String, u64> = BTreeMap::new();
    for (endpoint, status, n) in stats.snapshot() {
        let key = if (200..300).contains(&status) {
            endpoint.as_str().to_string()
        } else {
            format!("{}[{status}]", endpoint.as_str())
        };
        *out.entry(key).or_insert(0) += n;
    }
    out.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A Markdown table, columns padded to their widest cell.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:>w$}", w = width[i]))
            .collect();
        println!("| {} |", padded.join(" | "));
    };
    line(header.iter().map(|h| h.to_string()).collect());
    println!(
        "|{}|",
        width
            .iter()
            .map(|w| format!("{}:", "-".repeat(w + 1)))
            .collect::<Vec<_>>()
            .join("|")
    );
    for r in rows {
        line(r.clone());
    }
}

/// The simulator served from its own thread and runtime, so that its timers and
/// handlers do not queue behind the client's tasks (as a remote API's would not).
pub struct SimThread {
    pub base_url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SimThread {
    pub fn start(sim: &Sim) -> SimThread {
        let sim = sim.clone();
        let (url_tx, url_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("sim".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("simulator runtime");
                rt.block_on(async move {
                    let server = sim.start().await.expect("simulator starts");
                    let _ = url_tx.send(server.base_url.clone());
                    let _ = stopped.await;
                    server.shutdown().await;
                });
            })
            .expect("simulator thread");
        let base_url = url_rx.recv().expect("simulator base URL");
        SimThread {
            base_url,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for SimThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The round trip a bare HTTP client sees at `concurrency`: `n` GETs of `urls` (cycled)
/// with a fresh `reqwest` client, wall time × concurrency / n. This is the latency the
/// simulator really adds on this machine (timer granularity, scheduling), the floor
/// under any client.
pub async fn bare_rtt(urls: &[String], concurrency: usize, n: usize) -> Duration {
    use futures::stream::{self, StreamExt};
    let http = reqwest::Client::new();
    let started = std::time::Instant::now();
    let done = stream::iter((0..n).map(|i| {
        let http = http.clone();
        let url = urls[i % urls.len()].clone();
        async move {
            let resp = http
                .get(url)
                .bearer_auth(ADMIN_KEY)
                .send()
                .await
                .expect("simulator answers");
            assert!(
                resp.status().is_success(),
                "bare request: {}",
                resp.status()
            );
            resp.bytes().await.expect("body").len()
        }
    }))
    .buffer_unordered(concurrency.max(1))
    .count()
    .await;
    started
        .elapsed()
        .mul_f64(concurrency.max(1) as f64 / done as f64)
}

/// A `[stores.NAME]` section for the OpenBao that `scripts/test-servers.sh` started
/// (`KEYROTD_TEST_VAULT_ADDR`, `KEYROTD_TEST_VAULT_TOKEN`); exits 2 when it is not there.
pub fn vault_store_toml(name: &str) -> String {
    let addr = std::env::var("KEYROTD_TEST_VAULT_ADDR").unwrap_or_default();
    if addr.is_empty() || std::env::var("KEYROTD_TEST_VAULT_TOKEN").is_err() {
        eprintln!(
            "--stores vault: KEYROTD_TEST_VAULT_ADDR / KEYROTD_TEST_VAULT_TOKEN are not set \
             (source scripts/test-servers.sh)"
        );
        std::process::exit(2);
    }
    format!(
        "[stores.{name}]\ntype = \"vault\"\naddress = \"{addr}\"\nmount = \"secret\"\n\
         auth = {{ method = \"token\", token_env = \"KEYROTD_TEST_VAULT_TOKEN\" }}\n"
    )
}

/// One timed scan as `keyrotd plan` runs it: a fresh dry-run engine (fresh connections)
/// over a file store and one rule (`project_glob` / `sa_glob`, plus `extra` TOML, e.g. a
/// `[usage]` section), then `Engine::survey` and its plan, timed together.
pub struct TimedSurvey {
    pub engine: keyrotd::rotation::Engine,
    pub survey: keyrotd::rotation::Survey,
    /// Keys the plan shows.
    pub planned_keys: usize,
    pub wall: Duration,
}

pub async fn timed_survey(
    sim: &Sim,
    base_url: &str,
    concurrency: usize,
    project_glob: &str,
    sa_glob: &str,
    extra: &str,
) -> TimedSurvey {
    let dir = tempfile::tempdir().expect("temp dir");
    let toml = format!(
        r#"
[daemon]
concurrency = {concurrency}
[openai]
base_url = "{base_url}"
admin_key_env = "{ADMIN_KEY_ENV}"
[stores.file]
type = "file"
dir = "{dir}"
[[rotate]]
name = "bench"
project = "{project_glob}"
service_account = "{sa_glob}"
stores = ["file"]
path = "bench/{{project_name}}/{{service_account_name}}"
{extra}
"#,
        dir = dir.path().display()
    );
    let cfg = keyrotd::config::Config::from_toml(&toml).expect("bench config is valid");
    let engine = keyrotd::app::build_engine(&cfg, true)
        .await
        .expect("engine builds");
    sim.clear_requests();
    let started = std::time::Instant::now();
    let survey = engine.survey().await.expect("scan succeeds");
    let planned_keys = engine.plan(&survey).keys.len();
    let wall = started.elapsed();
    TimedSurvey {
        engine,
        survey,
        planned_keys,
        wall,
    }
}
