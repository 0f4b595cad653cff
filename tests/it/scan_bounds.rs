//! Bounds on a scan of the organization (issue 14): a listing whose cursor never ends
//! or comes round again, a response body of any size, a scan that outlasts its
//! deadline or a shutdown. Through the client against the simulator, and through the
//! real binary, whose memory is sampled from /proc while it runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::*;
use keyrotd::openai::{ApiError, Client, ClientConfig};
use keyrotd::sim::{BadCursor, CursorFault, Padding, Route, Sim, SimServer};
use secrecy::SecretString;

const MIB: usize = 1 << 20;

/// What the binary may use at most while it scans (its resident set peaks near 32 MB
/// on a well-behaved scan).
const RSS_BOUND_KB: u64 = 64 * 1024;

// ----- the client ------------------------------------------------------------------

const CLIENT_ADMIN: &str = "sk-admin-scan-bounds-0123456789abcdef";

fn client_config(base_url: &str) -> ClientConfig {
    ClientConfig {
        base_url: base_url.to_owned(),
        request_timeout: Duration::from_secs(10),
        max_retries: 3,
        max_retry_after: Duration::from_secs(1),
        backoff_base: Duration::from_millis(5),
        max_pages: keyrotd::openai::DEFAULT_MAX_PAGES,
        max_response_bytes: keyrotd::openai::DEFAULT_MAX_RESPONSE_BYTES,
    }
}

/// A simulator with one project holding one service account and one key.
async fn client_world(cfg: impl FnOnce(&mut ClientConfig)) -> (Sim, SimServer, Client, String) {
    let sim = Sim::with_seed(CLIENT_ADMIN, 14);
    let server = sim.start().await.expect("simulator starts");
    let p = sim.add_project("prod-a");
    let sa = sim
        .add_service_account(&p, "backend")
        .expect("service account");
    sim.add_key(&p, keyrotd::sim::OwnerRef::ServiceAccount(sa), "k")
        .expect("key");
    let mut c = client_config(&server.base_url);
    cfg(&mut c);
    let client = Client::new(c, SecretString::from(CLIENT_ADMIN)).expect("client");
    (sim, server, client, p)
}

fn bad_cursor(sim: &Sim, route: Route, kind: CursorFault) {
    sim.clear_requests();
    sim.update_faults(|f| f.bad_cursor = Some(BadCursor { route, kind }));
}

#[tokio::test]
async fn every_listing_refuses_a_cursor_that_comes_round_again() {
    let (sim, _server, client, p) = client_world(|_| {}).await;
    for route in [
        Route::ListProjects,
        Route::ListApiKeys,
        Route::ListServiceAccounts,
        Route::ListAdminKeys,
    ] {
        // A, B, A: the third page points back at the first page's cursor.
        bad_cursor(&sim, route, CursorFault::Cycle(2));
        let err = match route {
            Route::ListProjects => client.list_projects(false).await.map(|_| ()),
            Route::ListApiKeys => client.list_api_keys(&p).await.map(|_| ()),
            Route::ListServiceAccounts => client.list_service_accounts(&p).await.map(|_| ()),
            _ => client.list_admin_api_keys().await.map(|_| ()),
        }
        .expect_err("a cycling cursor must fail the listing");
        let endpoint = route_endpoint(route).as_str();
        match &err {
            ApiError::CursorLoop {
                endpoint: e,
                pages,
                first_seen,
            } => assert_eq!(
                (e.as_str(), *pages, *first_seen),
                (endpoint, 3, 1),
                "{route}"
            ),
            other => panic!("{route}: {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.contains(endpoint) && text.contains("page 3") && text.contains("page 1"),
            "{text}"
        );
        assert_eq!(
            sim.requests_to(route).len(),
            3,
            "{route}: three pages, no more"
        );

        // The same cursor twice in a row is the shortest loop.
        bad_cursor(&sim, route, CursorFault::Cycle(1));
        let err = match route {
            Route::ListProjects => client.list_projects(false).await.map(|_| ()),
            Route::ListApiKeys => client.list_api_keys(&p).await.map(|_| ()),
            Route::ListServiceAccounts => client.list_service_accounts(&p).await.map(|_| ()),
            _ => client.list_admin_api_keys().await.map(|_| ()),
        }
        .expect_err("a repeated cursor must fail the listing");
        assert!(
            matches!(
                err,
                ApiError::CursorLoop {
                    pages: 2,
                    first_seen: 1,
                    ..
                }
            ),
            "{route}: {err:?}"
        );
    }
}

/// The client's endpoint for a simulator listing route.
fn route_endpoint(route: Route) -> keyrotd::openai::Endpoint {
    use keyrotd::openai::Endpoint;
    match route {
        Route::ListProjects => Endpoint::ListProjects,
        Route::ListApiKeys => Endpoint::ListApiKeys,
        Route::ListServiceAccounts => Endpoint::ListServiceAccounts,
        Route::ListAdminKeys => Endpoint::ListAdminApiKeys,
        other => panic!("{other} is not a listing"),
    }
}

#[tokio::test]
async fn an_endless_listing_stops_at_max_pages() {
    let (sim, _server, client, p) = client_world(|c| c.max_pages = 25).await;
    bad_cursor(&sim, Route::ListProjects, CursorFault::Endless);
    let err = client.list_projects(false).await.unwrap_err();
    assert!(
        matches!(&err, ApiError::TooManyPages { endpoint, pages: 25 } if endpoint == "list_projects"),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("list_projects") && text.contains("25 pages") && text.contains("max_pages"),
        "{text}"
    );
    assert_eq!(sim.requests_to(Route::ListProjects).len(), 25);

    // Page by page, as the scan reads projects: 24 pages, then the error.
    sim.clear_requests();
    let mut pages = client.project_pages(false);
    let mut read = 0;
    let err = loop {
        match pages.next_page().await {
            Ok(Some(projects)) => {
                assert_eq!(projects.len(), 1, "the real first page, again");
                read += 1;
            }
            Ok(None) => panic!("an endless listing ended after {read} pages"),
            Err(e) => break e,
        }
    };
    assert_eq!(read, 24);
    assert!(
        matches!(err, ApiError::TooManyPages { pages: 25, .. }),
        "{err:?}"
    );
    assert!(
        matches!(pages.next_page().await, Ok(None)),
        "a failed listing stays finished"
    );

    // A listing of another endpoint carries on: the fault is on projects only.
    assert_eq!(client.list_api_keys(&p).await.unwrap().len(), 1);
    sim.update_faults(|f| f.bad_cursor = None);
    assert_eq!(client.list_projects(false).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_body_over_the_cap_is_refused_and_not_retried() {
    let (sim, _server, client, _) = client_world(|c| c.max_response_bytes = MIB as u64).await;
    // Padding below the cap: the same JSON, read whole.
    sim.update_faults(|f| {
        f.padding = Some(Padding {
            route: Some(Route::ListProjects),
            bytes: MIB / 2,
        })
    });
    assert_eq!(client.list_projects(false).await.unwrap().len(), 1);

    sim.clear_requests();
    sim.update_faults(|f| {
        f.padding = Some(Padding {
            route: Some(Route::ListProjects),
            bytes: 50 * MIB,
        })
    });
    let started = Instant::now();
    let err = client.list_projects(false).await.unwrap_err();
    match &err {
        ApiError::ResponseTooLarge {
            endpoint,
            status,
            limit,
        } => assert_eq!(
            (endpoint.as_str(), *status, *limit),
            ("list_projects", 200, MIB as u64)
        ),
        other => panic!("{other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("list_projects")
            && text.contains("HTTP 200")
            && text.contains("1048576 bytes")
            && text.contains("openai.max_response_bytes"),
        "{text}"
    );
    assert!(!err.is_temporary());
    assert_eq!(
        sim.requests_to(Route::ListProjects).len(),
        1,
        "an oversized answer is not asked for again"
    );
    println!("refused after {:?}", started.elapsed());
}

#[tokio::test]
async fn an_announced_length_over_the_cap_is_refused_before_reading() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Announces 100 MB, sends a few bytes, then keeps the connection open: a client
    // that waited for the body would time out instead.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let _ = conn
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                          content-length: 100000000\r\n\r\n{\"object\": ",
                    )
                    .await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    let mut cfg = client_config(&format!("http://{addr}/v1"));
    cfg.max_response_bytes = MIB as u64;
    let client = Client::new(cfg, SecretString::from(CLIENT_ADMIN)).unwrap();
    let started = Instant::now();
    let err = client.list_projects(false).await.unwrap_err();
    assert!(
        matches!(&err, ApiError::ResponseTooLarge { endpoint, status: 200, .. } if endpoint == "list_projects"),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused on the header, not after reading: {:?}",
        started.elapsed()
    );
}

// ----- the binary ------------------------------------------------------------------

/// A bench with three `prod-*` projects, each with a `backend` account, and `openai`
/// settings on top of the harness's.
async fn bench(openai: &[(&'static str, &str)], daemon: &[(&'static str, &str)]) -> Bench {
    let mut spec = Spec::new(&[StoreKind::File]);
    for (k, v) in openai {
        spec = spec.openai(k, v);
    }
    for (k, v) in daemon {
        spec = spec.daemon(k, v);
    }
    let b = Bench::new(spec).await;
    for name in ["prod-a", "prod-b", "prod-c"] {
        let p = b.sim.add_project(name);
        b.sim
            .add_service_account(&p, "backend")
            .expect("service account");
    }
    b
}

/// Resident set of a running keyrotd, sampled from /proc/<pid>/status.
#[derive(Debug, Default)]
struct Memory {
    samples: usize,
    /// Largest VmRSS seen, and the last VmHWM (the kernel's own peak) seen, in kB.
    max_rss_kb: u64,
    peak_kb: u64,
}

/// Samples `pid` every 5 ms until `stop`; only while it is still keyrotd (not a
/// zombie, not a reused pid).
fn sample_memory(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Memory> {
    std::thread::spawn(move || {
        let mut m = Memory::default();
        while !stop.load(Ordering::Relaxed) {
            if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                let field = |name: &str| {
                    status
                        .lines()
                        .find_map(|l| l.strip_prefix(name))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                };
                let is_keyrotd = status.lines().any(|l| l == "Name:\tkeyrotd");
                if let (true, Some(rss), Some(hwm)) = (is_keyrotd, field("VmRSS:"), field("VmHWM:"))
                {
                    m.samples += 1;
                    m.max_rss_kb = m.max_rss_kb.max(rss);
                    m.peak_kb = m.peak_kb.max(hwm);
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        m
    })
}

/// Runs `keyrotd <args>` (killed after `limit`), sampling its memory while it runs.
async fn run_sampled(b: &Bench, args: &[&str], limit: Duration) -> (Exit, Memory) {
    let child = b.command(args, None).spawn().expect("spawn keyrotd");
    let pid = child.id().expect("pid");
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_memory(pid, stop.clone());
    let exit = wait_child(child, limit).await;
    stop.store(true, Ordering::Relaxed);
    let memory = sampler.join().expect("sampler");
    (exit, memory)
}

fn assert_memory_bounded(memory: &Memory, exit: &Exit) {
    assert!(
        memory.samples >= 5,
        "too few memory samples ({}) to say anything: {memory:?}",
        memory.samples
    );
    assert!(
        memory.peak_kb < RSS_BOUND_KB && memory.max_rss_kb < RSS_BOUND_KB,
        "resident set grew to {} kB (peak {} kB), bound {RSS_BOUND_KB} kB:\n{}",
        memory.max_rss_kb,
        memory.peak_kb,
        exit.tail()
    );
}

/// The `error` field of the `cycle.failed` line.
fn scan_error(exit: &Exit) -> String {
    let failed = exit.events("cycle.failed");
    assert_eq!(failed.len(), 1, "one cycle.failed:\n{}", exit.tail());
    assert_eq!(failed[0]["outcome"], "scan_failed");
    let error = failed[0]["error"].as_str().unwrap_or_default().to_string();
    println!("cycle.failed error={error}");
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_ends_an_endless_cursor_at_the_page_cap() {
    let b = bench(&[("max_pages", "40")], &[]).await;
    bad_cursor(&b.sim, Route::ListProjects, CursorFault::Endless);
    let exit = b.run_once(None).await;
    assert_eq!(exit.code, Some(1), "{}\n{}", exit.describe(), exit.tail());
    let error = scan_error(&exit);
    assert!(
        error.contains("list_projects still had more after 40 pages (openai.max_pages)"),
        "{error}"
    );
    assert_eq!(b.sim.requests_to(Route::ListProjects).len(), 40);
    assert!(b.sim.all_keys().iter().all(|k| !k.minted), "nothing minted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_ends_an_endless_cursor_at_the_scan_deadline_in_flat_memory() {
    // No page cap to speak of: only the deadline ends the scan.
    let b = bench(
        &[("max_pages", "100000000"), ("scan_timeout", "\"3s\"")],
        &[],
    )
    .await;
    bad_cursor(&b.sim, Route::ListProjects, CursorFault::Endless);
    let (exit, memory) = run_sampled(&b, &["once"], Duration::from_secs(60)).await;
    println!(
        "{} after {:.1}s, {} project pages, {memory:?}",
        exit.describe(),
        exit.elapsed.as_secs_f64(),
        b.sim.requests_to(Route::ListProjects).len()
    );
    assert_eq!(exit.code, Some(1), "{}\n{}", exit.describe(), exit.tail());
    assert!(
        exit.elapsed >= Duration::from_secs(3) && exit.elapsed < Duration::from_secs(20),
        "ended after {:?}, the deadline is 3 s",
        exit.elapsed
    );
    let error = scan_error(&exit);
    assert!(
        error.contains("did not finish within 3s (openai.scan_timeout)")
            && error.contains("list_projects"),
        "{error}"
    );
    assert!(
        b.sim.requests_to(Route::ListProjects).len() > 40,
        "the scan was busy paging until the deadline"
    );
    assert_memory_bounded(&memory, &exit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_fails_at_once_on_a_cycling_cursor() {
    let b = bench(&[], &[]).await;
    bad_cursor(&b.sim, Route::ListProjects, CursorFault::Cycle(2));
    let exit = b.run_once(None).await;
    assert_eq!(exit.code, Some(1), "{}\n{}", exit.describe(), exit.tail());
    assert!(
        exit.elapsed < Duration::from_secs(20),
        "took {:?}",
        exit.elapsed
    );
    let error = scan_error(&exit);
    assert!(
        error.contains(
            "pagination loop on list_projects: page 3 returned the same cursor as page 1"
        ),
        "{error}"
    );
    assert_eq!(b.sim.requests_to(Route::ListProjects).len(), 3);
}

/// Waits until the simulator has served `n` project pages.
async fn wait_for_pages(sim: &Sim, n: usize) {
    let started = Instant::now();
    while sim.requests_to(Route::ListProjects).len() < n {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the scan never got going"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const LONG_SCAN: &[(&str, &str)] = &[("max_pages", "100000000"), ("scan_timeout", "\"1h\"")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_an_endless_scan_of_once_promptly() {
    let b = bench(LONG_SCAN, &[("shutdown_timeout", "\"2s\"")]).await;
    bad_cursor(&b.sim, Route::ListProjects, CursorFault::Endless);
    let child = b.command(&["once"], None).spawn().expect("spawn keyrotd");
    let pid = child.id().expect("pid");
    wait_for_pages(&b.sim, 20).await;
    let signalled = Instant::now();
    signal(pid, "TERM");
    let exit = wait_child(child, Duration::from_secs(30)).await;
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(2 + 3),
        "exited {took:?} after SIGTERM (shutdown_timeout 2s):\n{}",
        exit.tail()
    );
    assert!(exit.code.is_some(), "exited by itself: {}", exit.describe());
    let error = scan_error(&exit);
    assert!(error.contains("shutdown requested"), "{error}");
    let pages = b.sim.requests_to(Route::ListProjects).len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        b.sim.requests_to(Route::ListProjects).len(),
        pages,
        "nothing listed after exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_an_endless_scan_of_run_within_shutdown_timeout() {
    let b = bench(
        LONG_SCAN,
        &[
            ("schedule", "\"0 0 1 1 *\""),
            ("run_on_start", "true"),
            ("shutdown_timeout", "\"2s\""),
        ],
    )
    .await;
    bad_cursor(&b.sim, Route::ListProjects, CursorFault::Endless);
    let child = b.command(&["run"], None).spawn().expect("spawn keyrotd");
    let pid = child.id().expect("pid");
    wait_for_pages(&b.sim, 20).await;
    let signalled = Instant::now();
    signal(pid, "TERM");
    let exit = wait_child(child, Duration::from_secs(30)).await;
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(2 + 3),
        "exited {took:?} after SIGTERM (shutdown_timeout 2s):\n{}",
        exit.tail()
    );
    assert_eq!(exit.code, Some(0), "{}\n{}", exit.describe(), exit.tail());
    // The scan saw the shutdown: the cycle ended, not the shutdown timeout.
    let stopped = exit.events("daemon.stopped");
    assert_eq!(stopped.len(), 1, "{}", exit.tail());
    assert_eq!(stopped[0]["outcome"], "clean", "{}", exit.tail());
    assert!(scan_error(&exit).contains("shutdown requested"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_refuses_an_oversized_page_in_bounded_memory() {
    let b = bench(&[("max_response_bytes", "\"1MiB\"")], &[]).await;
    b.sim.update_faults(|f| {
        f.padding = Some(Padding {
            route: Some(Route::ListProjects),
            bytes: 50 * MIB,
        });
        // Keeps the process alive long enough to be sampled before and after the page.
        f.latency = Duration::from_millis(300);
    });
    let (exit, memory) = run_sampled(&b, &["once"], Duration::from_secs(60)).await;
    println!(
        "{} after {:.1}s, {memory:?}",
        exit.describe(),
        exit.elapsed.as_secs_f64()
    );
    assert_eq!(exit.code, Some(1), "{}\n{}", exit.describe(), exit.tail());
    let error = scan_error(&exit);
    assert!(
        error.contains(
            "response from list_projects (HTTP 200) is larger than 1048576 bytes \
             (openai.max_response_bytes)"
        ),
        "{error}"
    );
    assert_eq!(
        b.sim.requests_to(Route::ListProjects).len(),
        1,
        "not asked for again"
    );
    assert_memory_bounded(&memory, &exit);
}

#[test]
fn the_new_keys_load_from_the_file_and_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyrotd.toml");
    std::fs::write(
        &path,
        "[openai]\nadmin_key_env = \"SCAN_BOUNDS_ADMIN_KEY\"\nmax_pages = 10\n\
         max_response_bytes = \"2MiB\"\nscan_timeout = \"5m\"\n",
    )
    .unwrap();
    let check = |env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["--config", path.to_str().unwrap(), "check-config"])
            .env("SCAN_BOUNDS_ADMIN_KEY", "sk-admin-scan-bounds")
            .env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    assert_eq!(check(&[]).0, Some(0), "{}", check(&[]).1);
    let ok = [
        ("KEYROTD__OPENAI__MAX_PAGES", "5000"),
        ("KEYROTD__OPENAI__MAX_RESPONSE_BYTES", "16MiB"),
        ("KEYROTD__OPENAI__MAX_RESPONSE_BYTES", "1048576"),
        ("KEYROTD__OPENAI__SCAN_TIMEOUT", "30m"),
    ];
    for (var, value) in ok {
        let (code, err) = check(&[(var, value)]);
        assert_eq!(code, Some(0), "{var}={value}: {err}");
    }
    let bad = [
        ("KEYROTD__OPENAI__MAX_PAGES", "0"),
        ("KEYROTD__OPENAI__MAX_RESPONSE_BYTES", "1KiB"),
        ("KEYROTD__OPENAI__MAX_RESPONSE_BYTES", "lots"),
        ("KEYROTD__OPENAI__SCAN_TIMEOUT", "0s"),
    ];
    for (var, value) in bad {
        let (code, err) = check(&[(var, value)]);
        assert_eq!(code, Some(2), "{var}={value}: {err}");
        assert!(err.contains(var), "{var}={value}: {err}");
    }
}
