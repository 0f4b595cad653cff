//! `keyrotd run` when the world is not ready for it: a store down at start and
//! brought up later, a store that accepts connections and never answers, the admin
//! key's store down, an admin key file rotated under the daemon, SIGHUP with a good
//! and a broken configuration, a cycle that overruns its schedule. Real binary, real
//! OpenBao (`bao server -dev` started by the test on a port of its own).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::e2e::{free_port, Stores, World, ADMIN_KEY, ADMIN_KEY_ENV};
use keyrotd::config::Config;
use keyrotd::sim::{Faults, Scenario};

fn scenario(seed: u64) -> Scenario {
    Scenario::new(seed)
        .projects(3)
        .service_accounts_per_project(1)
        .stale_fraction(0.0)
}

/// An in-process daemon on `cfg` whose engines run on the world's clock.
pub fn daemon_on(w: &World, cfg: Config, path: Option<PathBuf>) -> keyrotd::daemon::Daemon {
    let clock = w.clock.clone();
    let mut d = keyrotd::daemon::Daemon::new(cfg, path);
    d.build = Arc::new(move |cfg, shared| {
        let clock = clock.clone();
        Box::pin(async move {
            let mut e = keyrotd::app::build_engine_in(&cfg, false, &shared).await?;
            e.clock = Arc::new(clock);
            e.settings.verify_backoff = Duration::from_millis(50);
            Ok(e)
        })
    });
    d
}

/// A `keyrotd` child whose stderr goes to a file the test reads while it runs.
struct Keyrotd {
    child: Option<Child>,
    log: PathBuf,
    started: Instant,
}

impl Keyrotd {
    fn spawn(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Keyrotd {
        let log = config.with_extension(format!("{}.log", rand::random::<u32>()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyrotd"));
        cmd.arg("--config")
            .arg(config)
            .args(["--log-format", "json"])
            .args(args)
            .env(ADMIN_KEY_ENV, ADMIN_KEY)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let started = Instant::now();
        let child = cmd.spawn().expect("spawn keyrotd");
        Keyrotd {
            child: Some(child),
            log,
            started,
        }
    }

    fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        assert!(Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .unwrap()
            .success());
    }

    /// Waits for the log to contain `needle`, failing with the log after `limit`.
    fn wait_log(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log within {limit:?}:\n{log}"
            );
            assert!(self.alive(), "keyrotd exited early:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_exit(&mut self, limit: Duration) -> i32 {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("keyrotd did not exit within {limit:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Keyrotd {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An OpenBao dev server on `port` (root token `root`), killed on drop.
struct Bao(Child);

impl Bao {
    fn start(port: u16) -> Bao {
        let bao = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv-test/bin/bao");
        assert!(
            Path::new(bao).exists(),
            "{bao} is missing: run the tests through scripts/test, which installs it"
        );
        let child = Command::new(bao)
            .args([
                "server",
                "-dev",
                "-dev-root-token-id=root",
                &format!("-dev-listen-address=127.0.0.1:{port}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start bao");
        Bao(child)
    }

    /// Waits until the server on `port` reports healthy.
    async fn ready(self, port: u16) -> Bao {
        wait_status(port, "/v1/sys/health", 200, Duration::from_secs(30)).await;
        self
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn status(client: &reqwest::Client, port: u16, path: &str) -> Option<(u16, String)> {
    let r = client
        .get(format!("http://127.0.0.1:{port}{path}"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let code = r.status().as_u16();
    Some((code, r.text().await.unwrap_or_default()))
}

/// Waits until `path` answers `code`, failing after `limit` with what it answered.
async fn wait_status(port: u16, path: &str, code: u16, limit: Duration) -> String {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + limit;
    loop {
        let got = status(&client, port, path).await;
        if let Some((c, body)) = &got {
            if *c == code {
                return body.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{path} did not answer {code} within {limit:?}: last {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A config on the world's simulator: `[daemon]` with `daemon`, `[openai]` with
/// `openai` (the admin key from the environment unless it says otherwise), then `tail`.
fn write_config(w: &World, name: &str, daemon: &str, openai: &str, tail: &str) -> PathBuf {
    let key = if openai.contains("admin_key_") {
        String::new()
    } else {
        format!("admin_key_env = \"{ADMIN_KEY_ENV}\"\n")
    };
    let path = w.dir.path().join(name);
    std::fs::write(
        &path,
        format!(
            r#"
[daemon]
concurrency = 2
shutdown_timeout = "5s"
{daemon}
[openai]
base_url = "{base}"
max_retries = 1
{key}{openai}
[policy]
grace_period = "1h"
verify_timeout = "2s"
[stores.file]
type = "file"
dir = "{dir}"
{tail}
"#,
            base = w.server.base_url,
            dir = w.dir.path().join("secrets").display(),
        ),
    )
    .unwrap();
    path
}

/// The `[daemon]` lines of a daemon serving on `port` that cycles on `schedule` and
/// at start.
fn listening(port: u16, schedule: &str) -> String {
    format!("listen = \"127.0.0.1:{port}\"\nschedule = \"{schedule}\"\nrun_on_start = true")
}

/// A store `bao`: the OpenBao dev server on `port`, root token from
/// `LIFECYCLE_BAO_TOKEN`.
fn bao_store(port: u16) -> String {
    format!(
        "[stores.bao]\ntype = \"vault\"\naddress = \"http://127.0.0.1:{port}\"\n\
         auth = {{ method = \"token\", token_env = \"LIFECYCLE_BAO_TOKEN\" }}"
    )
}

const FILE_RULE: &str = r#"
[[rotate]]
name = "all"
project = "*"
service_account = "*"
stores = ["file"]
path = "openai/{project_name}/{service_account_name}"
"#;

fn served_files(w: &World, prefix: &str) -> usize {
    let root = w.dir.path().join("secrets").join(prefix);
    walk(&root)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .count()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// /healthz answers within a second of start although the only store accepts TCP and
/// never answers (the store login hangs until its timeout), and the rotation of the
/// other store's slots is not held up for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_at_once_while_a_store_never_answers() {
    let w = World::new(scenario(81), Stores::File, "").await;
    let tarpit = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tarpit_port = tarpit.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in tarpit.incoming().flatten() {
            held.push(s);
        }
    });
    let port = free_port();
    let config = write_config(
        &w,
        "tarpit.toml",
        &listening(port, "0 0 0 1 1 *"),
        "",
        &format!(
            r#"
[stores.hang]
type = "vault"
address = "http://127.0.0.1:{tarpit_port}"
auth = {{ method = "token", token_env = "LIFECYCLE_HANG_TOKEN" }}
{FILE_RULE}"#
        ),
    );
    let mut k = Keyrotd::spawn(&config, &["run"], &[("LIFECYCLE_HANG_TOKEN", "hvs.x")]);
    let client = reqwest::Client::new();
    let deadline = k.started + Duration::from_secs(1);
    let health = loop {
        if let Some(got) = status(&client, port, "/healthz").await {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz did not answer within 1 s of start:\n{}",
            k.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(health.0, 200, "{health:?}");
    assert!(k.alive());
}

/// A Vault that is down when the daemon starts: its slots fail, /readyz says so, the
/// process stays up; once OpenBao listens on that port the next cycle connects and
/// rotates, with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_down_at_start_is_reached_at_the_next_cycle() {
    let w = World::new(scenario(82), Stores::File, "").await;
    let bao_port = free_port();
    let port = free_port();
    let bao = bao_store(bao_port);
    let config = write_config(
        &w,
        "late-bao.toml",
        &listening(port, "*/2 * * * * *"),
        "",
        &format!(
            r#"
{bao}
[[rotate]]
name = "all"
project = "*"
service_account = "*"
stores = ["bao"]
path = "lifecycle/{{project_name}}/{{service_account_name}}"
"#
        ),
    );
    let mut k = Keyrotd::spawn(&config, &["run"], &[("LIFECYCLE_BAO_TOKEN", "root")]);
    k.wait_log("\"event\":\"store.unavailable\"", Duration::from_secs(20));
    k.wait_log("\"event\":\"rotation.failed\"", Duration::from_secs(20));
    let why = wait_status(port, "/readyz", 503, Duration::from_secs(20)).await;
    assert!(why.contains("failed wholesale"), "{why}");
    assert_eq!(
        wait_status(port, "/healthz", 200, Duration::from_secs(1)).await,
        "ok\n"
    );
    assert_eq!(w.sim.all_keys().iter().filter(|k| k.minted).count(), 0);

    let _bao = Bao::start(bao_port).ready(bao_port).await;
    let log = k.wait_log("\"event\":\"store.connected\"", Duration::from_secs(30));
    assert!(log.contains("\"store\":\"bao\""), "{log}");
    k.wait_log("\"event\":\"rotation.completed\"", Duration::from_secs(30));
    wait_status(port, "/readyz", 200, Duration::from_secs(20)).await;
    // Every slot's key is in OpenBao, read back through its HTTP API.
    let client = reqwest::Client::new();
    let list = client
        .request(
            reqwest::Method::from_bytes(b"LIST").unwrap(),
            format!("http://127.0.0.1:{bao_port}/v1/secret/metadata/lifecycle"),
        )
        .header("X-Vault-Token", "root")
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = list.json().await.unwrap();
    assert_eq!(
        body["data"]["keys"].as_array().map_or(0, Vec::len),
        3,
        "{body}"
    );
    assert!(k.alive());
}

/// The admin key's store down: `once` exits 1 (retry), not 2 (bad config); `run`
/// stays up, alive but not ready, and retries every cycle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_key_store_down_is_transient_not_bad_config() {
    let w = World::new(scenario(83), Stores::File, "").await;
    let bao_port = free_port();
    let port = free_port();
    let bao = bao_store(bao_port);
    let config = write_config(
        &w,
        "admin-store-down.toml",
        &listening(port, "*/1 * * * * *"),
        &format!("admin_key_env = \"{ADMIN_KEY_ENV}\"\nadmin_key_store = \"bao\""),
        &format!(
            r#"
{bao}
{FILE_RULE}"#
        ),
    );
    let env = [("LIFECYCLE_BAO_TOKEN", "root")];
    let mut once = Keyrotd::spawn(&config, &["once"], &env);
    let code = once.wait_exit(Duration::from_secs(60));
    assert_eq!(
        code,
        1,
        "a store that is down is not a bad config:\n{}",
        once.log()
    );

    let mut k = Keyrotd::spawn(&config, &["run"], &env);
    assert_eq!(
        wait_status(port, "/healthz", 200, Duration::from_secs(2)).await,
        "ok\n"
    );
    let log = k.wait_log(
        "\"outcome\":\"engine_unavailable\"",
        Duration::from_secs(30),
    );
    assert!(log.contains("\"event\":\"cycle.failed\""), "{log}");
    wait_status(port, "/readyz", 503, Duration::from_secs(10)).await;
    // Retried: a second attempt, and the process is still there.
    let deadline = Instant::now() + Duration::from_secs(30);
    while k.log().matches("engine_unavailable").count() < 2 {
        assert!(Instant::now() < deadline, "not retried:\n{}", k.log());
        assert!(k.alive(), "{}", k.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(k.alive());
}

/// The admin key file is re-read every cycle; SIGHUP reloads the configuration,
/// refusing a broken one and applying a good one, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config_and_the_admin_key_file_is_reread() {
    let w = World::new(scenario(84), Stores::File, "").await;
    let port = free_port();
    let key_file = w.dir.path().join("admin-key");
    std::fs::write(&key_file, "sk-admin-not-the-right-one\n").unwrap();
    let daemon = listening(port, "*/1 * * * * *");
    let openai = format!("admin_key_file = \"{}\"", key_file.display());
    let config = write_config(&w, "hup.toml", &daemon, &openai, FILE_RULE);
    let mut k = Keyrotd::spawn(&config, &["run"], &[]);

    // A wrong key: the scan fails with 401, not ready.
    k.wait_log("\"outcome\":\"scan_failed\"", Duration::from_secs(20));
    wait_status(port, "/readyz", 503, Duration::from_secs(10)).await;
    assert!(!k.log().contains("sk-admin-not-the-right-one"));
    // The Secret is rotated under the daemon: the next cycle uses the new key.
    std::fs::write(&key_file, format!("{ADMIN_KEY}\n")).unwrap();
    k.wait_log("\"event\":\"admin_key.reloaded\"", Duration::from_secs(10));
    k.wait_log("\"event\":\"rotation.completed\"", Duration::from_secs(20));
    wait_status(port, "/readyz", 200, Duration::from_secs(10)).await;
    assert_eq!(served_files(&w, "openai"), 3);

    // A broken file: refused, the daemon carries on with what it has.
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, "[daemon\nthis is not toml").unwrap();
    k.signal("HUP");
    let log = k.wait_log(
        "\"event\":\"config.reload_failed\"",
        Duration::from_secs(10),
    );
    assert!(log.contains("hup.toml"), "names the file:\n{log}");
    let ok_before = k.log().matches("\"event\":\"cycle.finished\"").count();
    let deadline = Instant::now() + Duration::from_secs(10);
    while k.log().matches("\"event\":\"cycle.finished\"").count() < ok_before + 2 {
        assert!(Instant::now() < deadline, "cycles stopped:\n{}", k.log());
        assert!(k.alive(), "SIGHUP killed the daemon:\n{}", k.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A good one with a new path template: applied, the slots move there.
    std::fs::write(&config, good.replace("path = \"openai/", "path = \"moved/")).unwrap();
    k.signal("HUP");
    k.wait_log("\"event\":\"config.reloaded\"", Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(20);
    while served_files(&w, "moved") < 3 {
        assert!(
            Instant::now() < deadline,
            "no move after reload:\n{}",
            k.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(k.alive());
    let minted = w.sim.all_keys().iter().filter(|k| k.minted).count();
    assert_eq!(minted, 3, "a move keeps the key");
    k.signal("TERM");
    assert_eq!(k.wait_exit(Duration::from_secs(10)), 0, "{}", k.log());
}

/// A cycle that is still running when the schedule ticks again: /readyz says the
/// daemon is overrunning; ready again once the cycles keep up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reports_a_cycle_overrunning_its_schedule() {
    let w = World::new(scenario(85), Stores::File, "").await;
    w.sim.set_faults(Faults {
        latency: Duration::from_millis(700),
        ..Faults::default()
    });
    let port = free_port();
    let config = write_config(
        &w,
        "slow.toml",
        &listening(port, "*/1 * * * * *"),
        "",
        FILE_RULE,
    );
    let mut k = Keyrotd::spawn(&config, &["run"], &[]);
    let why = wait_status(port, "/readyz", 503, Duration::from_secs(20)).await;
    assert!(why.contains("overrunning"), "{why}");
    w.sim.set_faults(Faults::default());
    wait_status(port, "/readyz", 200, Duration::from_secs(20)).await;
    assert!(k.alive(), "{}", k.log());
}
