//! Harness for tests that drive the real `keyrotd` binary (crash matrix, replicas,
//! API faults, secret hygiene): an in-process simulator, real stores (file, OpenBao,
//! moto from `scripts/test-servers.sh`), a config file in a temp dir, the binary run as
//! a child process, and invariant checks (DESIGN.md §5) over what the stores and the
//! simulator hold after every process exit.
//!
//! The checks read the stores through the library's own backends, built from the same
//! config the binary reads (always against the real server addresses, even when the
//! binary is pointed at a [`Cutoff`] proxy), and never call the simulator over HTTP, so
//! they neither consume injected faults nor show up in its request log.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyrotd::config::Config;
use keyrotd::sim::{OwnerRef, Sim, SimServer};
use keyrotd::store::{DynStore, Layout, SlotState};
use secrecy::ExposeSecret;
use tokio::io::AsyncReadExt;

pub const ADMIN_KEY: &str = "sk-admin-harness-7Qm2xV9pL4cR8tZ1";
pub const ADMIN_KEY_ENV: &str = "KEYROTD_HARNESS_ADMIN_KEY";
pub const BIN: &str = env!("CARGO_BIN_EXE_keyrotd");
pub const NEEDS_SERVERS: &str = "run scripts/test (it starts OpenBao and moto)";
pub const DAY: i64 = 86_400;

/// An environment variable the test servers export; a missing one fails the test.
pub fn env(var: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!("{var} is not set: {NEEDS_SERVERS}"),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum StoreKind {
    File,
    Vault,
    Aws,
}

impl StoreKind {
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::File => "file",
            StoreKind::Vault => "vault",
            StoreKind::Aws => "aws",
        }
    }
}

pub fn store_names(stores: &[StoreKind]) -> String {
    stores
        .iter()
        .map(|s| s.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the config file says. Policy and `[openai]` defaults are short so that leases,
/// grace periods and retries pass in seconds.
#[derive(Clone, Debug)]
pub struct Spec {
    pub stores: Vec<StoreKind>,
    /// Overrides of `[policy]` keys (value is TOML, e.g. `"\"4s\""`).
    pub policy: Vec<(&'static str, String)>,
    pub openai: Vec<(&'static str, String)>,
    pub daemon: Vec<(&'static str, String)>,
    /// The rule's `project` and `service_account` globs.
    pub project_glob: String,
    pub sa_glob: String,
    /// `strategy = ...` of the rule, if set.
    pub strategy: Option<&'static str>,
    /// The Vault address the binary gets (a [`Cutoff`] proxy, a closed port); the
    /// harness's own reads always use the real server.
    pub vault_addr_for_binary: Option<String>,
    /// The environment variable holding the Vault token.
    pub vault_token_env: String,
}

impl Spec {
    pub fn new(stores: &[StoreKind]) -> Spec {
        Spec {
            stores: stores.to_vec(),
            policy: Vec::new(),
            openai: Vec::new(),
            daemon: Vec::new(),
            project_glob: "prod-*".into(),
            sa_glob: "backend".into(),
            strategy: None,
            vault_addr_for_binary: None,
            vault_token_env: "KEYROTD_TEST_VAULT_TOKEN".into(),
        }
    }
    pub fn policy(mut self, key: &'static str, toml_value: &str) -> Spec {
        self.policy.push((key, toml_value.to_string()));
        self
    }
    pub fn openai(mut self, key: &'static str, toml_value: &str) -> Spec {
        self.openai.push((key, toml_value.to_string()));
        self
    }
    pub fn daemon(mut self, key: &'static str, toml_value: &str) -> Spec {
        self.daemon.push((key, toml_value.to_string()));
        self
    }
    pub fn sa_glob(mut self, g: &str) -> Spec {
        self.sa_glob = g.into();
        self
    }
    pub fn strategy(mut self, s: &'static str) -> Spec {
        self.strategy = Some(s);
        self
    }

    fn setting(&self, list: &[(&'static str, String)], key: &str, default: &str) -> String {
        list.iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| default.to_string())
    }

    /// A duration setting of `[policy]`, parsed.
    pub fn policy_duration(&self, key: &str) -> Duration {
        let v = self.setting(&self.policy, key, POLICY_DEFAULTS_LOOKUP(key));
        humantime::parse_duration(v.trim_matches('"')).expect("duration")
    }

    fn render(&self, base_url: &str, file_dir: &str, prefix: &str, for_binary: bool) -> String {
        let section = |name: &str, defaults: &[(&str, &str)], over: &[(&'static str, String)]| {
            let mut keys: BTreeMap<String, String> = defaults
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            for (k, v) in over {
                keys.insert(k.to_string(), v.clone());
            }
            let mut s = format!("[{name}]\n");
            for (k, v) in keys {
                s.push_str(&format!("{k} = {v}\n"));
            }
            s
        };
        let mut t = String::new();
        t.push_str(&section("daemon", DAEMON_DEFAULTS, &self.daemon));
        let base = format!("\"{base_url}\"");
        let key_env = format!("\"{ADMIN_KEY_ENV}\"");
        let mut openai = self.openai.clone();
        openai.insert(0, ("base_url", base));
        openai.insert(1, ("admin_key_env", key_env));
        t.push_str(&section("openai", OPENAI_DEFAULTS, &openai));
        t.push_str(&section("policy", POLICY_DEFAULTS, &self.policy));
        for kind in &self.stores {
            match kind {
                StoreKind::File => t.push_str(&format!(
                    "[stores.file]\ntype = \"file\"\ndir = \"{file_dir}\"\n"
                )),
                StoreKind::Vault => {
                    let real = env("KEYROTD_TEST_VAULT_ADDR");
                    let _ = env(&self.vault_token_env);
                    let token_env = &self.vault_token_env;
                    let addr = match (&self.vault_addr_for_binary, for_binary) {
                        (Some(a), true) => a.clone(),
                        _ => real,
                    };
                    t.push_str(&format!(
                        "[stores.vault]\ntype = \"vault\"\naddress = \"{addr}\"\nmax_retries = 1\n\
                         request_timeout = \"3s\"\n\
                         auth = {{ method = \"token\", token_env = \"{token_env}\" }}\n"
                    ));
                }
                StoreKind::Aws => t.push_str(&format!(
                    "[stores.aws]\ntype = \"aws_secrets_manager\"\nregion = \"us-east-1\"\n\
                     endpoint_url = \"{}\"\nmax_retries = 1\n",
                    env("KEYROTD_TEST_AWS_ENDPOINT")
                )),
            }
        }
        let stores: Vec<String> = self
            .stores
            .iter()
            .map(|s| format!("\"{}\"", s.name()))
            .collect();
        t.push_str(&format!(
            "[[rotate]]\nname = \"prod\"\nproject = \"{}\"\nservice_account = \"{}\"\n\
             stores = [{}]\npath = \"{prefix}/{{project_name}}/{{service_account_name}}\"\n",
            self.project_glob,
            self.sa_glob,
            stores.join(", ")
        ));
        if let Some(s) = self.strategy {
            t.push_str(&format!("strategy = \"{s}\"\n"));
        }
        t
    }
}

const DAEMON_DEFAULTS: &[(&str, &str)] = &[("concurrency", "2")];
const OPENAI_DEFAULTS: &[(&str, &str)] = &[
    ("max_retries", "2"),
    ("max_retry_after", "\"1s\""),
    ("request_timeout", "\"5s\""),
];
const POLICY_DEFAULTS: &[(&str, &str)] = &[
    ("max_age", "\"90d\""),
    ("grace_period", "\"2s\""),
    ("lease", "\"1s\""),
    ("orphan_min_age", "\"0s\""),
    ("verify_timeout", "\"2s\""),
];

#[allow(non_snake_case)]
fn POLICY_DEFAULTS_LOOKUP(key: &str) -> &'static str {
    POLICY_DEFAULTS
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| *v)
        .unwrap_or("\"0s\"")
}

/// One slot the rule covers (by path; a slot that moves to a new service account keeps
/// its path).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SlotRef {
    pub project_id: String,
    pub project_name: String,
    pub sa_name: String,
    pub path: String,
}

/// (store, path) → state.
pub type Snapshot = BTreeMap<(String, String), SlotState>;

/// How a process ended, and what it wrote to stderr (JSON log lines).
#[derive(Clone, Debug)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Exit {
    pub fn crashed(&self) -> bool {
        self.signal.is_some()
    }
    pub fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exit {c}"),
            (_, Some(6)) => "SIGABRT (failpoint)".into(),
            (_, Some(9)) => "SIGKILL".into(),
            (_, Some(s)) => format!("signal {s}"),
            _ => "?".into(),
        }
    }
    /// The JSON log lines that parse.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        self.stderr
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
    /// Lines with `event == name`.
    pub fn events(&self, name: &str) -> Vec<serde_json::Value> {
        self.log_lines()
            .into_iter()
            .filter(|l| l["event"] == name)
            .collect()
    }
    pub fn tail(&self) -> String {
        let lines: Vec<&str> = self.stderr.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

/// A test world: simulator, temp dir, config file, stores as the binary sees them.
pub struct Bench {
    pub sim: Sim,
    pub server: SimServer,
    pub dir: tempfile::TempDir,
    pub prefix: String,
    pub spec: Spec,
    pub config_path: PathBuf,
    /// The config text with real store addresses (the harness's reads).
    pub observer_toml: String,
    pub stores: BTreeMap<String, DynStore>,
    pub slots: Vec<SlotRef>,
    /// More values that must never appear in output (see [`Bench::secrets`]).
    pub extra_secrets: Mutex<Vec<String>>,
}

impl Bench {
    pub async fn new(spec: Spec) -> Bench {
        std::env::set_var(ADMIN_KEY_ENV, ADMIN_KEY);
        let sim = Sim::new(ADMIN_KEY);
        let server = sim.start().await.expect("simulator starts");
        let dir = tempfile::tempdir().expect("temp dir");
        let prefix = format!("h-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
        let file_dir = dir.path().join("secrets").display().to_string();
        let observer_toml = spec.render(&server.base_url, &file_dir, &prefix, false);
        let binary_toml = spec.render(&server.base_url, &file_dir, &prefix, true);
        let config_path = dir.path().join("keyrotd.toml");
        std::fs::write(&config_path, &binary_toml).expect("write config");
        let cfg = Config::from_toml(&observer_toml).expect("harness config is valid");
        let mut stores = BTreeMap::new();
        for (name, sc) in &cfg.stores {
            let s = keyrotd::store::build(name, sc)
                .await
                .unwrap_or_else(|e| panic!("store {name}: {e} ({NEEDS_SERVERS})"));
            stores.insert(name.clone(), s);
        }
        Bench {
            sim,
            server,
            dir,
            prefix,
            spec,
            config_path,
            observer_toml,
            stores,
            slots: Vec::new(),
            extra_secrets: Mutex::new(Vec::new()),
        }
    }

    /// Rewrites the binary's config with a change to the spec (e.g. the Vault address).
    pub fn rewrite_config(&mut self, change: impl FnOnce(&mut Spec)) {
        change(&mut self.spec);
        let file_dir = self.dir.path().join("secrets").display().to_string();
        let text = self
            .spec
            .render(&self.server.base_url, &file_dir, &self.prefix, true);
        std::fs::write(&self.config_path, text).expect("write config");
    }

    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config_path).unwrap_or_default()
    }

    /// A service account `sa_name` in `project_id` with one key, "legacy", created 200
    /// days ago and never used (stale under the harness's 90-day `max_age`).
    pub fn add_legacy_account(&self, project_id: &str, sa_name: &str) -> keyrotd::sim::SimKey {
        let id = self
            .sim
            .add_service_account(project_id, sa_name)
            .expect("project exists");
        self.sim
            .add_key_at(
                project_id,
                keyrotd::sim::OwnerRef::ServiceAccount(id),
                "legacy",
                self.sim.now() - 200 * DAY,
                None,
            )
            .expect("key")
    }

    /// Registers the slots the rule covers, from the simulator's organization.
    pub fn register_slots(&mut self) {
        let proj = globset::Glob::new(&self.spec.project_glob)
            .unwrap()
            .compile_matcher();
        let sa = globset::Glob::new(&self.spec.sa_glob)
            .unwrap()
            .compile_matcher();
        let mut slots = BTreeSet::new();
        for p in self.sim.projects() {
            if p.archived_at.is_some() || !(proj.is_match(&p.name) || proj.is_match(&p.id)) {
                continue;
            }
            for s in self.sim.service_accounts(&p.id) {
                if sa.is_match(&s.name) {
                    slots.insert(SlotRef {
                        project_id: p.id.clone(),
                        project_name: p.name.clone(),
                        sa_name: s.name.clone(),
                        path: format!("{}/{}/{}", self.prefix, p.name, s.name),
                    });
                }
            }
        }
        self.slots = slots.into_iter().collect();
    }

    /// Whether the rule manages keys of this service account (by project and name).
    pub fn managed(&self, project_id: &str, sa_name: &str) -> bool {
        self.slots
            .iter()
            .any(|s| s.project_id == project_id && s.sa_name == sa_name)
    }

    pub fn store_order(&self) -> Vec<String> {
        self.spec
            .stores
            .iter()
            .map(|s| s.name().to_string())
            .collect()
    }

    /// The service account a slot's state record is addressed by: its oldest live
    /// account of that name (as the engine's scan sees it).
    pub fn anchor(&self, slot: &SlotRef) -> Option<String> {
        self.accounts(slot).into_iter().next()
    }

    /// The slot's live accounts, oldest first (ties by id, as the engine sorts them).
    pub fn accounts(&self, slot: &SlotRef) -> Vec<String> {
        let mut accounts: Vec<_> = self
            .sim
            .service_accounts(&slot.project_id)
            .into_iter()
            .filter(|sa| sa.name == slot.sa_name && sa.deleted_at.is_none())
            .collect();
        accounts.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        accounts.into_iter().map(|sa| sa.id).collect()
    }

    /// Every slot's state in every store, as consumers and the engine see it: at
    /// (store, path) the consumer document's record as `current` with the state
    /// record's pending key and bookkeeping; where the state record's own current key
    /// differs (a promotion between its two writes), the state record too, at
    /// (store, `state:<path>`); and the documents at former paths still serving, at
    /// (store, `<path>@<former path>`).
    pub async fn snapshot(&self) -> Result<Snapshot, String> {
        let mut out = Snapshot::new();
        for slot in &self.slots {
            let accounts = self.accounts(slot);
            for (name, store) in &self.stores {
                let e =
                    |e: keyrotd::store::StoreError| format!("reading {name} {}: {e}", slot.path);
                if store.layout() == Layout::WithConsumer {
                    let st = store.read(&slot.path).await.map_err(e)?;
                    out.insert((name.clone(), slot.path.clone()), st);
                    continue;
                }
                // The oldest account's record, or the one that exists (as the engine).
                let mut state = SlotState::default();
                for a in &accounts {
                    let st = store
                        .read(&keyrotd::store::state_key(&slot.project_id, a))
                        .await
                        .map_err(e)?;
                    if !st.is_empty() {
                        state = st;
                        break;
                    }
                }
                let doc = store.read_consumer(&slot.path).await.map_err(e)?;
                if state.is_empty() {
                    let view = doc.legacy.unwrap_or(SlotState {
                        current: doc.record,
                        ..SlotState::default()
                    });
                    out.insert((name.clone(), slot.path.clone()), view);
                    continue;
                }
                let key =
                    |r: &Option<keyrotd::store::SecretRecord>| r.as_ref().map(|r| r.key_id.clone());
                if key(&state.current) != key(&doc.record) {
                    out.insert(
                        (name.clone(), format!("state:{}", slot.path)),
                        state.clone(),
                    );
                }
                for l in &state.book.locations {
                    if l.path != slot.path {
                        let d = store.read_consumer(&l.path).await.map_err(e)?;
                        out.insert(
                            (name.clone(), format!("{}@{}", slot.path, l.path)),
                            SlotState {
                                current: d.record,
                                ..SlotState::default()
                            },
                        );
                    }
                }
                let mut view = state;
                view.current = doc.record;
                out.insert((name.clone(), slot.path.clone()), view);
            }
        }
        Ok(out)
    }

    /// Puts `key_id` as the current key of `slot` in every store, promoted at
    /// `promoted_at`, as if an earlier keyrotd had rotated it in long ago.
    pub async fn seed_current(&self, slot: &SlotRef, key_id: &str, promoted_ago: Duration) {
        let k = self.sim.key(key_id).expect("seeded key exists");
        let sa = match &k.owner {
            OwnerRef::ServiceAccount(sa) => sa.clone(),
            OwnerRef::User(_) => panic!("seed a service-account key"),
        };
        let rec = keyrotd::store::SecretRecord {
            api_key: secrecy::SecretString::from(k.value.clone()),
            key_id: k.id.clone(),
            project_id: k.project_id.clone(),
            service_account_id: sa,
            created_at: keyrotd::policy::ts(k.created_at),
            managed_by: keyrotd::store::MANAGED_BY.into(),
        };
        let at = {
            use chrono::SubsecRound;
            (chrono::Utc::now() - chrono::Duration::from_std(promoted_ago).unwrap())
                .trunc_subsecs(0)
        };
        for (name, store) in &self.stores {
            if store.layout() == Layout::Separate {
                // The state record at the slot's identity, the six fields at its path.
                let anchor = self.anchor(slot).expect("the slot's account exists");
                let key = keyrotd::store::state_key(&slot.project_id, &anchor);
                let mut seeded = SlotState {
                    current: Some(rec.clone()),
                    ..SlotState::default()
                };
                seeded.book.promoted_at = Some(at);
                seeded.book.locations = vec![keyrotd::store::Location {
                    path: slot.path.clone(),
                    retire_after: None,
                }];
                let st = store.read(&key).await.expect("read");
                store
                    .apply(
                        &key,
                        &st.version,
                        &keyrotd::store::Transition::Import(Box::new(seeded)),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("seed state {name}: {e}"));
                let doc = store.read_consumer(&slot.path).await.expect("read");
                store
                    .write_consumer(&slot.path, Some(&rec), &doc.version)
                    .await
                    .unwrap_or_else(|e| panic!("seed document {name}: {e}"));
                continue;
            }
            let st = store.read(&slot.path).await.expect("read");
            let st = store
                .apply(
                    &slot.path,
                    &st.version,
                    &keyrotd::store::Transition::Stage(rec.clone()),
                )
                .await
                .unwrap_or_else(|e| panic!("seed stage {name}: {e}"));
            store
                .apply(
                    &slot.path,
                    &st.version,
                    &keyrotd::store::Transition::Promote {
                        key_id: rec.key_id.clone(),
                        at,
                        previous_until: None,
                    },
                )
                .await
                .unwrap_or_else(|e| panic!("seed promote {name}: {e}"));
        }
    }

    /// The command line for `keyrotd <args>` with this bench's config, JSON logs, and
    /// FAILPOINTS when given. Core dumps are off (a failpoint aborts).
    pub fn command(&self, args: &[&str], failpoints: Option<&str>) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("sh");
        c.arg("-c")
            .arg("ulimit -c 0; exec \"$0\" \"$@\"")
            .arg(BIN)
            .arg("--config")
            .arg(&self.config_path)
            .arg("--log-format")
            .arg("json");
        c.args(args)
            .env(ADMIN_KEY_ENV, ADMIN_KEY)
            .env_remove("RUST_LOG")
            .env_remove("FAILPOINTS")
            .env_remove("KEYROTD_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(fp) = failpoints {
            c.env("FAILPOINTS", fp);
        }
        c
    }

    /// Runs `keyrotd once` to its end (at most 60 s).
    pub async fn run_once(&self, failpoints: Option<&str>) -> Exit {
        self.run(&["once"], failpoints).await
    }

    pub async fn run(&self, args: &[&str], failpoints: Option<&str>) -> Exit {
        let child = self
            .command(args, failpoints)
            .spawn()
            .expect("spawn keyrotd");
        wait_child(child, Duration::from_secs(60)).await
    }

    /// Every key value the simulator ever issued (deleted ones too), plus the admin key
    /// and the Vault token: what must never appear in logs.
    pub fn secrets(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.sim.all_keys().into_iter().map(|k| k.id).collect();
        ids.extend(self.sim.deleted_keys());
        let mut out: Vec<String> = ids.iter().filter_map(|id| self.sim.key_value(id)).collect();
        out.push(ADMIN_KEY.to_string());
        // The dev server's root token ("root") is too short to search for; the
        // hygiene test uses a generated token.
        if let Ok(t) = std::env::var(&self.spec.vault_token_env) {
            if t.len() >= 8 {
                out.push(t);
            }
        }
        out.extend(self.extra_secrets.lock().unwrap().iter().cloned());
        out
    }

    /// Live keys keyrotd is responsible for: minted through the API, or named `keyrotd-*`.
    pub fn own_live_keys(&self) -> BTreeSet<String> {
        self.sim
            .all_keys()
            .into_iter()
            .filter(|k| k.deleted_at.is_none() && (k.minted || k.name.starts_with("keyrotd-")))
            .map(|k| k.id)
            .collect()
    }
}

/// Waits for a child, collecting its output; kills it after `timeout`.
pub async fn wait_child(child: tokio::process::Child, timeout: Duration) -> Exit {
    wait_child_watching(child, timeout, None).await
}

/// [`wait_child`] in a task, and a receiver that fires when the child logs `event`
/// (dropped unfired if it never does): to act at a moment of the run, not a guess.
pub fn spawn_watching(
    child: tokio::process::Child,
    timeout: Duration,
    event: &'static str,
) -> (
    tokio::task::JoinHandle<Exit>,
    tokio::sync::oneshot::Receiver<()>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let wait = tokio::spawn(wait_child_watching(child, timeout, Some((event, tx))));
    (wait, rx)
}

async fn wait_child_watching(
    mut child: tokio::process::Child,
    timeout: Duration,
    mut watch: Option<(&'static str, tokio::sync::oneshot::Sender<()>)>,
) -> Exit {
    use std::os::unix::process::ExitStatusExt;
    use tokio::io::AsyncBufReadExt;
    let started = Instant::now();
    let mut out = child.stdout.take().expect("stdout piped");
    let err = child.stderr.take().expect("stderr piped");
    let read_out = tokio::spawn(async move {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s).await;
        s
    });
    let read_err = tokio::spawn(async move {
        let mut s = String::new();
        let mut lines = tokio::io::BufReader::new(err).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if watch.as_ref().is_some_and(|(event, _)| {
                serde_json::from_str::<serde_json::Value>(&line).is_ok_and(|v| v["event"] == *event)
            }) {
                if let Some((_, tx)) = watch.take() {
                    let _ = tx.send(());
                }
            }
            s.push_str(&line);
            s.push('\n');
        }
        s
    });
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(s) => s.expect("wait"),
        Err(_) => {
            let _ = child.kill().await;
            child.wait().await.expect("wait")
        }
    };
    Exit {
        code: status.code(),
        signal: status.signal(),
        stdout: read_out.await.unwrap_or_default(),
        stderr: read_err.await.unwrap_or_default(),
        elapsed: started.elapsed(),
    }
}

/// Fails unless the binary under test reads FAILPOINTS (built with `--features
/// failpoints`): such a binary refuses a malformed FAILPOINTS at start-up. (Another
/// `cargo build` without the feature in the same target dir replaces the binary.)
pub fn require_failpoints_binary() {
    let out = std::process::Command::new(BIN)
        .arg("--version")
        .env("FAILPOINTS", "not-a-failpoint-spec")
        .output()
        .expect("run keyrotd --version");
    assert!(
        !out.status.success(),
        "{BIN} ignores FAILPOINTS: it was built without `--features failpoints` \
         (run `cargo test --features failpoints`; a concurrent plain `cargo build` in the \
         same target dir replaces the binary)"
    );
}

/// Sends a signal to a process by pid (`kill -STOP 1234`).
pub fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill -{sig} {pid}");
}

/// Readable names for keys in reports: seeded keys by their name, keys minted through
/// the API as K1, K2, ... in the order the harness first sees them (label each run's
/// story as it ends, and that is creation order).
#[derive(Default)]
pub struct Labels {
    minted: Mutex<Vec<String>>,
}

impl Labels {
    pub fn label(&self, sim: &Sim, id: &str) -> String {
        let Some(k) = sim.key(id) else {
            return id.to_string();
        };
        if !k.minted {
            return k.name;
        }
        let mut m = self.minted.lock().unwrap();
        let n = match m.iter().position(|x| x == id) {
            Some(i) => i + 1,
            None => {
                m.push(id.to_string());
                m.len()
            }
        };
        format!("K{n}")
    }
}

// ----- invariants -----

/// Context the checks need.
pub struct Ctx<'a> {
    pub bench: &'a Bench,
    pub grace: Duration,
    pub max_age: Duration,
}

/// I1: every store's `api_key` is a live key the API accepts.
pub fn check_i1(bench: &Bench, snap: &Snapshot) -> Result<(), String> {
    for ((store, path), st) in snap {
        if let Some(cur) = &st.current {
            if !bench.sim.use_key(cur.api_key.expose_secret()) {
                return Err(format!(
                    "I1: {store} at {path} serves {} which the API rejects",
                    cur.key_id
                ));
            }
        }
    }
    Ok(())
}

/// I2: every live key keyrotd minted is current, pending or previous in some store, or
/// on a slot's retiring service account. With `allow_intents` (after a crash or a
/// failed cycle), a key named by a recorded intent, or the key of a service account
/// created under a `new` intent, also counts: the next cycle must clean those up.
/// `preexisting` keys were already unaccounted for before the run (seeded garbage or a
/// crash's leftovers), allowed only when the run crashed.
pub fn check_i2(
    bench: &Bench,
    snap: &Snapshot,
    allow_intents: bool,
    preexisting: &BTreeSet<String>,
) -> Result<(), String> {
    let referenced = referenced(snap);
    let currents: BTreeSet<String> = snap
        .values()
        .filter_map(|s| s.current.as_ref().map(|c| c.service_account_id.clone()))
        .collect();
    let retiring: BTreeSet<String> = snap
        .values()
        .filter_map(|s| s.book.previous_service_account_id.clone())
        .filter(|sa| !currents.contains(sa))
        .collect();
    let intents: Vec<&keyrotd::store::Intent> = snap
        .values()
        .filter_map(|s| s.book.intent.as_ref())
        .collect();
    for id in bench.own_live_keys() {
        let k = bench.sim.key(&id).unwrap();
        let sa = match &k.owner {
            OwnerRef::ServiceAccount(sa) => sa.clone(),
            OwnerRef::User(_) => String::new(),
        };
        if referenced.contains(&id) || retiring.contains(&sa) || preexisting.contains(&id) {
            continue;
        }
        if allow_intents {
            if intents.iter().any(|i| i.key_name == k.name) {
                continue;
            }
            // strategy new_service_account: a fresh account's first key is "Secret Key".
            let new_account = intents.iter().any(|i| i.service_account_id == "new")
                && !snap.values().any(|s| {
                    s.current
                        .iter()
                        .chain(s.pending.iter())
                        .any(|r| r.service_account_id == sa)
                });
            if new_account {
                continue;
            }
        }
        return Err(format!(
            "I2: key {id} ({:?}) is live but no store accounts for it",
            k.name
        ));
    }
    Ok(())
}

/// Why a key was allowed to be revoked.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Revoked {
    Previous,
    Own,
    StaleExtra,
    OldAccount,
}

/// I3: each key deleted during a run was one keyrotd may revoke, and no store served it
/// before or after the run.
pub fn check_i3(
    ctx: &Ctx<'_>,
    before: &Snapshot,
    after: &Snapshot,
    deleted: &[String],
) -> Result<Vec<(String, Revoked)>, String> {
    let sim = &ctx.bench.sim;
    let mut out = Vec::new();
    for id in deleted {
        let k = sim
            .key(id)
            .ok_or_else(|| format!("I3: unknown key {id} deleted"))?;
        for (snap, when) in [(before, "before"), (after, "after")] {
            for ((store, path), st) in snap {
                if st.current.as_ref().is_some_and(|c| &c.key_id == id) {
                    return Err(format!(
                        "I3: revoked {id} ({:?}) which {store} at {path} served {when} the run",
                        k.name
                    ));
                }
            }
        }
        let sa = match &k.owner {
            OwnerRef::ServiceAccount(sa) => sa.clone(),
            OwnerRef::User(u) => {
                return Err(format!(
                    "I3: revoked user key {id} of {u} (user_keys = report)"
                ))
            }
        };
        if !ctx.bench.managed(&k.project_id, &k.owner_name) {
            return Err(format!(
                "I3: revoked {id} ({:?}) of service account {:?} in {}, which no rule manages",
                k.name, k.owner_name, k.project_id
            ));
        }
        let deleted_at = k.deleted_at.unwrap_or_else(|| sim.now());
        let grace = ctx.grace.as_secs() as i64;
        let previous = before.values().any(|s| {
            s.book.previous_key_id.as_deref() == Some(id.as_str())
                && s.book
                    .promoted_at
                    .is_some_and(|t| deleted_at >= t.timestamp() + grace)
        });
        let why = if previous {
            Revoked::Previous
        } else if k.minted || k.name.starts_with("keyrotd-") {
            Revoked::Own
        } else if deleted_at - k.created_at > ctx.max_age.as_secs() as i64 {
            Revoked::StaleExtra
        } else if before
            .values()
            .any(|s| s.book.previous_service_account_id.as_deref() == Some(sa.as_str()))
            && !sim
                .service_accounts(&k.project_id)
                .iter()
                .any(|s| s.id == sa)
        {
            Revoked::OldAccount
        } else {
            return Err(format!(
                "I3: revoked {id} ({:?}), a fresh key keyrotd had no reason to touch",
                k.name
            ));
        };
        out.push((id.clone(), why));
    }
    Ok(out)
}

/// I4: no secret value in `text`.
pub fn check_i4(what: &str, text: &str, secrets: &[String]) -> Result<(), String> {
    for s in secrets {
        if !s.is_empty() && text.contains(s.as_str()) {
            let tail: String = s.chars().rev().take(4).collect::<String>();
            return Err(format!(
                "I4: a secret (…{}) appears in {what}",
                tail.chars().rev().collect::<String>()
            ));
        }
    }
    Ok(())
}

/// Nothing left to do: every slot's stores agree on one current key, nothing pending,
/// no intent, no previous key; the only live keys keyrotd minted are the current ones;
/// no stale key left on a managed service account.
pub fn converged(ctx: &Ctx<'_>, snap: &Snapshot) -> Result<(), String> {
    let bench = ctx.bench;
    let mut currents = BTreeSet::new();
    for slot in &bench.slots {
        let mut ids = BTreeSet::new();
        for name in bench.stores.keys() {
            let st = &snap[&(name.clone(), slot.path.clone())];
            let cur = st
                .current
                .as_ref()
                .ok_or_else(|| format!("{name} at {} holds no key", slot.path))?;
            ids.insert(cur.key_id.clone());
            if st.pending.is_some() || st.book.intent.is_some() {
                return Err(format!("{name} at {} has a rotation in flight", slot.path));
            }
            if st.book.previous_key_id.is_some() {
                return Err(format!("{name} at {} has a previous key", slot.path));
            }
        }
        if ids.len() != 1 {
            return Err(format!("stores of {} disagree: {ids:?}", slot.path));
        }
        currents.extend(ids);
    }
    let own = bench.own_live_keys();
    let extra: Vec<&String> = own.difference(&currents).collect();
    if !extra.is_empty() {
        return Err(format!("keys minted but not served still live: {extra:?}"));
    }
    let now = bench.sim.now();
    for k in bench.sim.all_keys() {
        if let OwnerRef::ServiceAccount(_) = &k.owner {
            if bench.managed(&k.project_id, &k.owner_name)
                && !currents.contains(&k.id)
                && now - k.created_at > ctx.max_age.as_secs() as i64
            {
                return Err(format!("stale key {} ({:?}) still live", k.id, k.name));
            }
        }
    }
    Ok(())
}

/// Polls every store while a process runs: I1 continuously (each `api_key` a store
/// serves is live at the moment it is read).
pub struct Watcher {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

impl Watcher {
    pub fn start(bench: &Bench) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let stores: Vec<(String, DynStore)> = bench
            .stores
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        let paths: Vec<String> = bench.slots.iter().map(|s| s.path.clone()).collect();
        let sim = bench.sim.clone();
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut polls = 0usize;
            let mut violations = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                for (name, store) in &stores {
                    for path in &paths {
                        // What a consumer reads at the path.
                        let served = match store.layout() {
                            Layout::Separate => store.read_consumer(path).await.map(|d| d.record),
                            Layout::WithConsumer => store.read(path).await.map(|s| s.current),
                        };
                        if let Ok(Some(cur)) = &served {
                            if !sim.is_live(&cur.key_id) {
                                violations.push(format!(
                                    "I1 (during the run): {name} at {path} served revoked key {}",
                                    cur.key_id
                                ));
                            }
                        }
                    }
                }
                polls += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (polls, violations)
        });
        Watcher { stop, task }
    }

    /// Stops polling; the number of polls and any violations.
    pub async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task
            .await
            .unwrap_or((0, vec!["watcher panicked".into()]))
    }
}

/// One process run with every check applied.
pub struct Step {
    pub exit: Exit,
    pub before: Snapshot,
    pub after: Snapshot,
    pub revoked: Vec<(String, Revoked)>,
    pub polls: usize,
}

/// Runs `keyrotd once` (with `failpoints`), checking I1 during and after, I2 (right
/// after a crash or a failed cycle, a key named by a recorded intent counts as
/// accounted: the next cycle must clean it up), I3 for every key deleted meanwhile, and
/// I4 over its output.
pub async fn step(ctx: &Ctx<'_>, failpoints: Option<&str>) -> Result<Step, String> {
    step_with(ctx, &["once"], failpoints, |_| async { Ok(()) }).await
}

/// Like [`step`] for `keyrotd <args>`; `during` runs while the process does (it gets
/// the pid: to cut a store off, pause or kill the process).
pub async fn step_with<F, Fut>(
    ctx: &Ctx<'_>,
    args: &[&str],
    failpoints: Option<&str>,
    during: F,
) -> Result<Step, String>
where
    F: FnOnce(u32) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let bench = ctx.bench;
    let before = bench.snapshot().await?;
    let deleted_before: BTreeSet<String> = bench.sim.deleted_keys().into_iter().collect();
    let watcher = Watcher::start(bench);
    let child = bench
        .command(args, failpoints)
        .spawn()
        .expect("spawn keyrotd");
    let pid = child.id().expect("pid");
    let waiter = tokio::spawn(wait_child(child, Duration::from_secs(60)));
    let hooked = during(pid).await;
    let exit = waiter.await.expect("waiter");
    let (polls, violations) = watcher.finish().await;
    hooked?;
    let after = bench.snapshot().await?;
    check_after(
        ctx,
        &exit,
        &before,
        &after,
        &deleted_before,
        polls,
        violations,
    )
}

/// The checks of [`step`] for a process that has ended.
pub fn check_after(
    ctx: &Ctx<'_>,
    exit: &Exit,
    before: &Snapshot,
    after: &Snapshot,
    deleted_before: &BTreeSet<String>,
    polls: usize,
    violations: Vec<String>,
) -> Result<Step, String> {
    let bench = ctx.bench;
    let ctx_err = |e: String| {
        format!(
            "{e}\n  after {} ; log tail:\n{}",
            exit.describe(),
            exit.tail()
        )
    };
    if let Some(v) = violations.into_iter().next() {
        return Err(ctx_err(v));
    }
    if exit.code == Some(2) {
        return Err(ctx_err("keyrotd refused its config (exit 2)".into()));
    }
    let deleted: Vec<String> = bench
        .sim
        .deleted_keys()
        .into_iter()
        .filter(|d| !deleted_before.contains(d))
        .collect();
    check_i1(bench, after).map_err(ctx_err)?;
    let (allow_intents, preexisting) = if exit.crashed() {
        (true, unaccounted(bench, before))
    } else {
        (exit.code != Some(0), BTreeSet::new())
    };
    check_i2(bench, after, allow_intents, &preexisting).map_err(ctx_err)?;
    let revoked = check_i3(ctx, before, after, &deleted).map_err(ctx_err)?;
    let secrets = bench.secrets();
    check_i4("the logs", &exit.stderr, &secrets).map_err(ctx_err)?;
    check_i4("stdout", &exit.stdout, &secrets).map_err(ctx_err)?;
    Ok(Step {
        exit: exit.clone(),
        before: before.clone(),
        after: after.clone(),
        revoked,
        polls,
    })
}

/// Runs `keyrotd once` until nothing is left to do (at most `max_runs`, `pause`
/// apart), checking every run. Returns the runs.
pub async fn converge(
    ctx: &Ctx<'_>,
    max_runs: usize,
    pause: Duration,
) -> Result<Vec<Step>, String> {
    let mut steps: Vec<Step> = Vec::new();
    for _ in 0..max_runs {
        tokio::time::sleep(pause).await;
        let s = step(ctx, None).await?;
        let done = s.exit.code == Some(0) && converged(ctx, &s.after).is_ok();
        steps.push(s);
        if done {
            return Ok(steps);
        }
    }
    let last = steps.last().unwrap();
    Err(format!(
        "not converged after {max_runs} runs: {}; last run {}:\n{}",
        converged(ctx, &last.after).err().unwrap_or_default(),
        last.exit.describe(),
        last.exit.tail()
    ))
}

/// The audit events of a run that tell what it did, with key labels, consecutive
/// repeats collapsed ("secret.promoted K2 ×3").
pub fn story(bench: &Bench, labels: &Labels, exit: &Exit) -> Vec<String> {
    const INTERESTING: [&str; 15] = [
        "rotation.resumed",
        "rotation.abandoned",
        "key.unrecorded",
        "service_account.unrecorded",
        "key.mint_failed",
        "key.minted",
        "service_account.created",
        "key.verify_failed",
        "secret.promoted",
        "key.revoked",
        "key.revoke_failed",
        "service_account.deleted",
        "rotation.strategy_fallback",
        "rotation.failed",
        "rotation.conflict",
    ];
    let mut out: Vec<(String, usize)> = Vec::new();
    for l in exit.log_lines() {
        let ev = l["event"].as_str().unwrap_or_default();
        if !INTERESTING.contains(&ev) {
            continue;
        }
        let mut tok = ev.to_string();
        if let Some(id) = l["key_id"].as_str() {
            tok.push(' ');
            tok.push_str(&labels.label(&bench.sim, id));
        }
        if ev == "key.revoked" {
            let reason = l["reason"].as_str().unwrap_or("?");
            let outcome = l["outcome"].as_str().unwrap_or("?");
            if outcome == "revoked" {
                tok.push_str(&format!(" ({reason})"));
            } else {
                tok.push_str(&format!(" ({reason}, {outcome})"));
            }
        }
        if ev == "service_account.deleted" || ev == "key.revoke_failed" {
            if let Some(r) = l["reason"].as_str() {
                tok.push_str(&format!(" ({r})"));
            }
        }
        match out.last_mut() {
            Some((last, n)) if *last == tok => *n += 1,
            _ => out.push((tok, 1)),
        }
    }
    out.into_iter()
        .map(|(t, n)| if n > 1 { format!("{t} ×{n}") } else { t })
        .collect()
}

/// A store-by-store description of one slot's state, keys by label.
pub fn describe_slot(bench: &Bench, labels: &Labels, snap: &Snapshot, path: &str) -> String {
    let mut parts = Vec::new();
    for name in bench.store_order() {
        let Some(st) = snap.get(&(name.clone(), path.to_string())) else {
            continue;
        };
        let mut s = Vec::new();
        match &st.current {
            Some(c) => s.push(format!("cur {}", labels.label(&bench.sim, &c.key_id))),
            None => s.push("empty".into()),
        }
        if let Some(p) = &st.pending {
            s.push(format!("pending {}", labels.label(&bench.sim, &p.key_id)));
        }
        if let Some(p) = &st.book.previous_key_id {
            s.push(format!("prev {}", labels.label(&bench.sim, p)));
        }
        if st.book.intent.is_some() {
            s.push("intent".into());
        }
        parts.push(format!("{name}: {}", s.join(", ")));
    }
    parts.join("; ")
}

/// Every key id some store references (current, pending or previous).
fn referenced(snap: &Snapshot) -> BTreeSet<String> {
    snap.values()
        .flat_map(|s| s.referenced_key_ids().map(str::to_string))
        .collect()
}

/// Ids of live keys keyrotd minted that no store references.
pub fn unaccounted(bench: &Bench, snap: &Snapshot) -> BTreeSet<String> {
    let referenced = referenced(snap);
    bench
        .own_live_keys()
        .into_iter()
        .filter(|k| !referenced.contains(k))
        .collect()
}

/// Live keys keyrotd minted that no store references (labels).
pub fn unrecorded(bench: &Bench, labels: &Labels, snap: &Snapshot) -> Vec<String> {
    unaccounted(bench, snap)
        .into_iter()
        .map(|k| labels.label(&bench.sim, &k))
        .collect()
}

// ----- a proxy that can cut a store off -----

/// A TCP forwarder in front of a server; [`Cutoff::cut`] refuses new connections and
/// breaks open ones (the store becomes unreachable), [`Cutoff::restore`] undoes it.
pub struct Cutoff {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    /// Milliseconds each chunk from the client waits before it is forwarded (a slow
    /// store: every request arrives late).
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Cutoff {
    pub async fn start(target: SocketAddr) -> Cutoff {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let (tx, _) = tokio::sync::watch::channel(0u64);
        let generation = Arc::new(tx);
        let up2 = up.clone();
        let gen2 = generation.clone();
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let delay2 = delay_ms.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut cut = gen2.subscribe();
                let delay = delay2.clone();
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut in_r, mut in_w) = inbound.split();
                    let (mut out_r, mut out_w) = tokio::io::split(outbound);
                    let up = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match in_r.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            let d = delay.load(Ordering::SeqCst);
                            if d > 0 {
                                tokio::time::sleep(Duration::from_millis(d)).await;
                            }
                            if out_w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    let down = tokio::io::copy(&mut out_r, &mut in_w);
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Cutoff {
            addr,
            up,
            delay_ms,
            generation,
            task,
        }
    }
    /// Delays every chunk the client sends by `d`.
    pub fn slow_down(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Cutoff {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The socket address of an `http://host:port` URL.
pub fn socket_of(url: &str) -> SocketAddr {
    let u = reqwest::Url::parse(url).expect("url");
    let host = u.host_str().expect("host");
    let port = u.port_or_known_default().expect("port");
    use std::net::ToSocketAddrs;
    (host, port)
        .to_socket_addrs()
        .expect("resolve")
        .next()
        .expect("an address")
}

/// A loopback port nothing listens on (bound, then released).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    l.local_addr().unwrap().port()
}
