//! The binary as operators run it: `keyrotd once` (JSON audit log, notifications
//! flushed before exit), `keyrotd run` (sd_notify, the HTTP listener, SIGTERM) and
//! `--log-format journald` (native journal fields, or JSON when there is no journal).

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::e2e::{Stores, World, ADMIN_KEY, ADMIN_KEY_ENV};
use keyrotd::sim::Scenario;
use serde_json::Value;

fn scenario(seed: u64) -> Scenario {
    Scenario::new(seed)
        .projects(6)
        .service_accounts_per_project(2)
        .user_keys_per_project(1)
        .stale_fraction(0.5)
}

/// Writes the world's config (plus `daemon_extra` in `[daemon]` and `tail` at the end).
pub(crate) fn write_config(w: &World, daemon_extra: &str, tail: &str) -> std::path::PathBuf {
    let path = w.dir.path().join("keyrotd.toml");
    let toml = w
        .toml
        .replacen("[daemon]\n", &format!("[daemon]\n{daemon_extra}\n"), 1);
    std::fs::write(&path, format!("{toml}\n{tail}")).unwrap();
    path
}

pub(crate) fn keyrotd(config: &std::path::Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keyrotd"));
    c.arg("--config")
        .arg(config)
        .args(args)
        .env(ADMIN_KEY_ENV, ADMIN_KEY)
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC");
    c
}

/// Runs `cmd` to completion, killing it (and failing) after `limit`.
pub(crate) fn output_within(mut cmd: Command, limit: Duration) -> std::process::Output {
    use std::io::Read;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keyrotd");
    let mut pipes = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = pipes.1.read_to_end(&mut v);
        v
    });
    let mut stdout = Vec::new();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("keyrotd did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = pipes.0.read_to_end(&mut stdout);
    std::process::Output {
        status,
        stdout,
        stderr: err.join().unwrap_or_default(),
    }
}

/// Every secret value the simulator knows of, and the admin key.
pub(crate) fn secrets(w: &World) -> Vec<String> {
    let mut out: Vec<String> = w.sim.all_keys().into_iter().map(|k| k.value).collect();
    out.extend(
        w.sim
            .deleted_keys()
            .iter()
            .filter_map(|id| w.sim.key_value(id)),
    );
    out.push(ADMIN_KEY.to_string());
    out
}

/// A webhook receiver collecting JSON bodies.
async fn receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = got.clone();
    let app = axum::Router::new().fallback(move |body: String| {
        let sink = sink.clone();
        async move {
            if let Ok(v) = serde_json::from_str(&body) {
                sink.lock().unwrap().push(v);
            }
            "ok"
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/hooks/secret-path"), got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_logs_json_audit_events_and_flushes_notifications_before_exit() {
    let w = World::new(scenario(61), Stores::File, "").await;
    let (url, got) = receiver().await;
    let config = write_config(
        &w,
        "",
        "[[notify.webhooks]]\nurl_env = \"KEYROTD_TEST_DAEMON_HOOK\"\nevents = [\"rotation.completed\"]\n",
    );
    let mut cmd = keyrotd(&config, &["--log-format", "json", "once"]);
    cmd.env("KEYROTD_TEST_DAEMON_HOOK", &url);
    let out = tokio::task::spawn_blocking(move || output_within(cmd, Duration::from_secs(60)))
        .await
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "{log}");

    // Every line is one JSON object with timestamp, level and an event name.
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let mut events: BTreeMap<String, usize> = BTreeMap::new();
    for v in &lines {
        assert!(v["timestamp"].is_string() && v["level"].is_string(), "{v}");
        let event = v["event"]
            .as_str()
            .unwrap_or_else(|| panic!("line without event: {v}"));
        *events.entry(event.to_string()).or_default() += 1;
    }
    let rotated = w.sim.all_keys().iter().filter(|k| k.minted).count();
    assert!(rotated >= 2);
    for (event, n) in [
        ("cycle.started", 1),
        ("rotation.started", rotated),
        ("key.minted", rotated),
        ("key.verified", rotated),
        ("cycle.finished", 1),
    ] {
        assert_eq!(events.get(event), Some(&n), "{event} in {events:?}\n{log}");
    }
    for event in ["secret.staged", "secret.promoted", "key.stale"] {
        assert!(events.contains_key(event), "{event} in {events:?}");
    }
    // Audit events carry the ids as fields, and the names an operator reads beside
    // them (as the simulator knows them).
    let slot_events = [
        "rotation.started",
        "key.minted",
        "secret.staged",
        "secret.promoted",
        "rotation.completed",
    ];
    for v in lines
        .iter()
        .filter(|v| slot_events.contains(&v["event"].as_str().unwrap_or("")))
    {
        for field in [
            "project_id",
            "service_account_id",
            "project_name",
            "service_account_name",
        ] {
            assert!(v[field].is_string(), "{field} in {v}");
        }
        let project = w
            .sim
            .projects()
            .into_iter()
            .find(|p| Some(p.id.as_str()) == v["project_id"].as_str())
            .expect("a simulated project");
        assert_eq!(
            v["project_name"].as_str(),
            Some(project.name.as_str()),
            "{v}"
        );
    }
    for v in lines.iter().filter(|v| v["event"] == "key.minted") {
        assert!(v["key_id"].is_string(), "key_id in {v}");
    }
    for s in secrets(&w) {
        assert!(!log.contains(&s), "a secret value in the log");
    }
    assert!(!log.contains("secret-path"), "webhook URL in the log");

    // The process exited only after the notifications were delivered.
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), rotated, "{got:?}");
    assert!(got.iter().all(|v| v["event"] == "rotation.completed"));
}

/// A child process killed if the test fails before it exits.
struct Running(Option<std::process::Child>);

impl Running {
    fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, |c| c.id())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// systemd's notification socket, in a temp dir.
struct NotifySocket {
    sock: UnixDatagram,
    path: std::path::PathBuf,
}

impl NotifySocket {
    fn new(dir: &std::path::Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        NotifySocket { sock, path }
    }

    /// Waits (up to 20 s) for a datagram containing `what`.
    fn wait_for(&self, what: &str) -> String {
        let started = Instant::now();
        let mut buf = [0u8; 4096];
        while started.elapsed() < Duration::from_secs(20) {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                if msg.contains(what) {
                    return msg;
                }
            }
        }
        panic!("no {what} from keyrotd");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_notifies_systemd_serves_metrics_and_stops_on_sigterm() {
    let w = World::new(scenario(62), Stores::File, "").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = write_config(
        &w,
        &format!(
            "listen = \"127.0.0.1:{port}\"\nschedule = \"0 0 0 1 1 *\"\nrun_on_start = true\n"
        ),
        "",
    );
    let notify = NotifySocket::new(w.dir.path());
    let mut cmd = keyrotd(&config, &["--log-format", "json", "run"]);
    cmd.env("NOTIFY_SOCKET", &notify.path)
        .stderr(Stdio::piped());
    let mut child = Running(Some(cmd.spawn().unwrap()));
    notify.wait_for("READY=1");

    // The first cycle runs on start; /metrics shows it.
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let metrics = loop {
        let text = match client.get(format!("{base}/metrics")).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if text.contains("keyrotd_cycles_total{result=\"ok\"} 1") {
            break text;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no finished cycle in /metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let minted = w.sim.all_keys().iter().filter(|k| k.minted).count();
    assert!(
        metrics.contains(&format!(
            "keyrotd_rotations_total{{outcome=\"completed\"}} {minted}\n"
        )),
        "{metrics}"
    );
    for path in ["/healthz", "/readyz"] {
        let r = client.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
    }

    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    notify.wait_for("STOPPING=1");
    let child = child.0.take().unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("\"event\":\"daemon.stopped\""), "{log}");
    // Says when it runs next, and carries no third-party INFO noise.
    let started = log
        .lines()
        .find(|l| l.contains("\"event\":\"daemon.started\""))
        .expect("daemon.started");
    let started: Value = serde_json::from_str(started).unwrap();
    assert!(
        started["next_cycle"]
            .as_str()
            .is_some_and(|t| t.len() == 20 && t.ends_with('Z')),
        "{started}"
    );
    assert!(
        started["version"]
            .as_str()
            .is_some_and(|v| v.contains("commit")),
        "{started}"
    );
    // Each cycle's last line says when the next one runs.
    let finished = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["event"] == "cycle.finished")
        .unwrap_or_else(|| panic!("no cycle.finished:\n{log}"));
    assert!(
        finished["next_cycle"]
            .as_str()
            .is_some_and(|t| t.len() == 20 && t.ends_with('Z')),
        "{finished}"
    );
    for noise in ["Uninited", "Job creator created"] {
        assert!(!log.contains(noise), "scheduler noise {noise:?}:\n{log}");
    }
}

#[test]
fn version_names_the_commit() {
    let out = Command::new(env!("CARGO_BIN_EXE_keyrotd"))
        .arg("--version")
        .output()
        .unwrap();
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        v.starts_with(&format!("keyrotd {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{v}"
    );
    assert!(!v.contains("(commit )"), "{v}");
}

const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Parses journald's native protocol: `NAME=value\n` or `NAME\n<u64 LE len><data>\n`.
fn parse_journal_entry(mut b: &[u8]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    while !b.is_empty() {
        let nl = b.iter().position(|&c| c == b'\n').expect("newline");
        let line = &b[..nl];
        if let Some(eq) = line.iter().position(|&c| c == b'=') {
            out.insert(
                String::from_utf8_lossy(&line[..eq]).to_string(),
                String::from_utf8_lossy(&line[eq + 1..]).to_string(),
            );
            b = &b[nl + 1..];
        } else {
            let name = String::from_utf8_lossy(line).to_string();
            let rest = &b[nl + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            out.insert(name, String::from_utf8_lossy(&rest[8..8 + len]).to_string());
            assert_eq!(rest[8 + len], b'\n');
            b = &rest[8 + len + 1..];
        }
    }
    out
}

/// Removes the fake journal socket (and the directories it created) on drop.
struct FakeJournal {
    created: Vec<std::path::PathBuf>,
}

impl Drop for FakeJournal {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(JOURNAL_SOCKET);
        for d in self.created.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journald_format_writes_native_fields_or_falls_back_to_json() {
    let w = World::new(scenario(63), Stores::File, "").await;
    let config = write_config(&w, "", "");
    let journal_exists = std::path::Path::new(JOURNAL_SOCKET).exists();

    // Without a journal: JSON lines on stderr, and a warning saying so.
    if !journal_exists {
        let cmd = keyrotd(&config, &["--log-format", "journald", "plan"]);
        let out = tokio::task::spawn_blocking(move || output_within(cmd, Duration::from_secs(60)))
            .await
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{log}");
        let first: Value = serde_json::from_str(log.lines().next().unwrap_or("")).unwrap();
        assert_eq!(first["event"], "log.journald_unavailable", "{log}");
    }

    // With a journal (a fake one where this machine has none; skipped when a real
    // journal owns the socket or /run is not writable): PROJECT_ID etc. are fields.
    if journal_exists {
        eprintln!("a real journal runs here; native-field check skipped");
        return;
    }
    let mut created = Vec::new();
    for d in ["/run/systemd", "/run/systemd/journal"] {
        if !std::path::Path::new(d).exists() {
            if std::fs::create_dir(d).is_err() {
                eprintln!("cannot create {d}; native-field check skipped");
                return;
            }
            created.push(d.into());
        }
    }
    let guard = FakeJournal { created };
    let journal = match UnixDatagram::bind(JOURNAL_SOCKET) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot bind {JOURNAL_SOCKET} ({e}); native-field check skipped");
            return;
        }
    };
    journal
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    // Read while keyrotd runs: a full socket buffer blocks its writes, as journald's does.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut entries = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match journal.recv(&mut buf) {
                    Ok(n) if n > 0 => entries.push(parse_journal_entry(&buf[..n])),
                    Ok(_) => {}
                    Err(_) if done.load(std::sync::atomic::Ordering::SeqCst) => break,
                    Err(_) => {}
                }
            }
            entries
        })
    };
    let cmd = keyrotd(&config, &["--log-format", "journald", "once"]);
    let out = tokio::task::spawn_blocking(move || output_within(cmd, Duration::from_secs(60)))
        .await
        .unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let entries = reader.join().expect("journal reader");
    drop(guard);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "nothing on stderr when the journal takes the logs"
    );
    let minted: Vec<&BTreeMap<String, String>> = entries
        .iter()
        .filter(|e| e.get("EVENT").map(String::as_str) == Some("key.minted"))
        .collect();
    assert!(!minted.is_empty(), "{entries:#?}");
    for e in &minted {
        assert!(e["PROJECT_ID"].starts_with("proj_"), "{e:?}");
        assert!(e["SERVICE_ACCOUNT_ID"].starts_with("svc_acct_"), "{e:?}");
        assert!(e["KEY_ID"].starts_with("key_"), "{e:?}");
        assert_eq!(e["SYSLOG_IDENTIFIER"], "keyrotd");
        assert!(e.contains_key("MESSAGE") && e.contains_key("PRIORITY"));
    }
    let all = format!("{entries:?}");
    for s in secrets(&w) {
        assert!(!all.contains(&s), "a secret value in the journal");
    }
}

/// `daemon::run` in-process: cycles on its schedule until the shutdown signal it was
/// given resolves, then returns within `shutdown_timeout` and runs no further cycle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_cycles_until_its_shutdown_signal_and_returns_in_time() {
    let w = World::new(scenario(71), Stores::File, "").await;
    let shutdown_timeout = Duration::from_secs(5);
    let mut cfg = w.config();
    cfg.daemon.schedule = "* * * * * *".into();
    cfg.daemon.run_on_start = true;
    cfg.daemon.listen = None;
    cfg.daemon.shutdown_timeout = shutdown_timeout;
    let d = crate::lifecycle::daemon_on(&w, cfg, None);
    let shared = d.shared.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(keyrotd::daemon::run(
        d,
        async {
            let _ = stopped.await;
        },
        Arc::new(tokio::sync::Notify::new()),
    ));
    // The start-up cycle, then at least one from the schedule (one tick a second).
    let deadline = Instant::now() + Duration::from_secs(20);
    while shared.metrics.cycles(true) < 2 {
        assert!(
            !daemon.is_finished(),
            "the daemon returned before its signal"
        );
        assert!(
            Instant::now() < deadline,
            "fewer than two cycles in 20 s: {} ok, {} failed",
            shared.metrics.cycles(true),
            shared.metrics.cycles(false)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(shared.metrics.cycles(false), 0);
    assert!(!shared.shutdown.is_cancelled());

    let asked = Instant::now();
    stop.send(()).unwrap();
    let returned = tokio::time::timeout(shutdown_timeout, daemon)
        .await
        .expect("run returns within shutdown_timeout of its signal")
        .expect("run does not panic");
    returned.expect("a clean shutdown");
    assert!(asked.elapsed() < shutdown_timeout);
    assert!(
        shared.shutdown.is_cancelled(),
        "in-flight work was told to stop"
    );

    // The cycles did their work, and none runs once it has returned.
    let engine = w.engine(false).await;
    let states = w.store_states(&engine).await;
    crate::e2e::assert_i1(&w, &states);
    assert!(states.values().any(|s| s.current.is_some()), "{states:?}");
    let cycles = shared.metrics.cycles(true);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        shared.metrics.cycles(true),
        cycles,
        "a cycle after shutdown"
    );
}

/// A fatal error under `--log-format json` is one JSON line like every other
/// (`keyrotd.failed`, ERROR), and plain `keyrotd: ...` text for a human.
#[test]
fn fatal_errors_follow_the_log_format() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[policy]\nmax_agee = \"1d\"\n").unwrap();
    let run = |format: &str| {
        Command::new(env!("CARGO_BIN_EXE_keyrotd"))
            .args([
                "--config",
                path.to_str().unwrap(),
                "--log-format",
                format,
                "once",
            ])
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let out = run("json");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert_eq!(lines[0]["event"], "keyrotd.failed");
    assert_eq!(lines[0]["level"], "ERROR");
    assert!(
        lines[0]["message"].as_str().unwrap().contains("max_agee"),
        "{err}"
    );
    let out = run("pretty");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("keyrotd: ") && err.contains("max_agee"),
        "{err}"
    );
}
