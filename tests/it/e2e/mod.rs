//! Shared harness for end-to-end tests: the in-process simulator, the real stores
//! (file, OpenBao, moto via `scripts/test-servers.sh`), and an engine built from TOML
//! the way the binary builds it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use keyrotd::config::Config;
use keyrotd::rotation::{Clock, Engine};
use keyrotd::sim::{GroundTruth, OwnerRef, Scenario, Sim, SimServer};
use keyrotd::store::SlotState;
use secrecy::ExposeSecret;

pub const ADMIN_KEY: &str = "sk-admin-e2e-0123456789";
pub const ADMIN_KEY_ENV: &str = "KEYROTD_E2E_ADMIN_KEY";
pub const NEEDS_SERVERS: &str = "run scripts/test (needs OpenBao and moto)";

/// An environment variable the test servers export; a missing one fails the test.
pub fn env(var: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!("{var} is not set: {NEEDS_SERVERS}"),
    }
}

/// Which real stores a world's first rule writes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stores {
    File,
    All,
}

pub struct World {
    pub sim: Sim,
    pub server: SimServer,
    pub truth: GroundTruth,
    pub dir: tempfile::TempDir,
    pub prefix: String,
    pub toml: String,
    pub clock: WorldClock,
}

impl World {
    /// A simulator populated by `scenario`, and a config whose first rule (`prod-*`,
    /// every service account) writes to `stores`; `extra` is appended to `[policy]`.
    pub async fn new(scenario: Scenario, stores: Stores, extra_policy: &str) -> World {
        if std::env::var_os("RUST_LOG").is_some() {
            keyrotd::telemetry::init(keyrotd::telemetry::LogFormat::Pretty, "info");
        }
        std::env::set_var(ADMIN_KEY_ENV, ADMIN_KEY);
        let sim = Sim::new(ADMIN_KEY);
        let truth = scenario.populate(&sim);
        let server = sim.start().await.expect("simulator starts");
        let dir = tempfile::tempdir().expect("temp dir");
        let prefix = format!("e2e-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
        let mut toml = format!(
            r#"
[daemon]
concurrency = 4
[openai]
base_url = "{base}"
admin_key_env = "{ADMIN_KEY_ENV}"
max_retries = 3
[policy]
max_age = "90d"
grace_period = "1h"
verify_timeout = "2s"
{extra_policy}
[stores.file]
type = "file"
dir = "{dir}"
"#,
            base = server.base_url,
            dir = dir.path().join("secrets").display(),
        );
        let first_stores = match stores {
            Stores::File => r#"["file"]"#,
            Stores::All => {
                toml.push_str(&format!(
                    r#"
[stores.vault]
type = "vault"
address = "{}"
auth = {{ method = "token", token_env = "KEYROTD_TEST_VAULT_TOKEN" }}
[stores.aws]
type = "aws_secrets_manager"
region = "us-east-1"
endpoint_url = "{}"
"#,
                    env("KEYROTD_TEST_VAULT_ADDR"),
                    env("KEYROTD_TEST_AWS_ENDPOINT")
                ));
                let _ = env("KEYROTD_TEST_VAULT_TOKEN");
                r#"["file", "vault", "aws"]"#
            }
        };
        toml.push_str(&format!(
            r#"
[[rotate]]
name = "prod"
project = "prod-*"
service_account = "*"
stores = {first_stores}
path = "{prefix}/{{project_name}}/{{service_account_name}}"
"#
        ));
        World {
            sim,
            server,
            truth,
            dir,
            prefix,
            toml,
            clock: WorldClock::default(),
        }
    }

    pub fn config(&self) -> Config {
        Config::from_toml(&self.toml).expect("test config is valid")
    }

    /// An engine as the binary builds it, on this world's clock.
    pub async fn engine(&self, dry_run: bool) -> Engine {
        let mut e = keyrotd::app::build_engine(&self.config(), dry_run)
            .await
            .expect("engine builds");
        e.clock = Arc::new(self.clock.clone());
        e.settings.verify_backoff = Duration::from_millis(50);
        e
    }

    /// Moves the simulator's and the engine's clocks together.
    /// The engine's clock, to the second (what stores record).
    pub fn clock_now(&self) -> chrono::DateTime<Utc> {
        use chrono::SubsecRound;
        self.clock.now().trunc_subsecs(0)
    }

    pub fn advance(&self, d: Duration) {
        self.sim.advance(d);
        self.clock.advance(d);
    }

    /// Every (store, path) → state the engine's stores hold for the slots of rule 0.
    pub async fn store_states(&self, engine: &Engine) -> BTreeMap<(String, String), SlotState> {
        let views = engine.survey().await.expect("plan").views;
        let mut out = BTreeMap::new();
        for v in views {
            for (store, st) in v.states {
                out.insert((store, v.slot.path.clone()), st.expect("store readable"));
            }
        }
        out
    }

    /// Stale service-account keys of `prod-*` projects (what rule 0 must rotate).
    pub fn stale_prod_sa_keys(&self) -> Vec<String> {
        self.truth
            .keys
            .iter()
            .filter(|k| k.project_name.starts_with("prod-") && !k.project_archived)
            .filter(|k| {
                k.stale && k.owner_type == keyrotd::openai::models::OwnerType::ServiceAccount
            })
            .map(|k| k.key_id.clone())
            .collect()
    }

    /// Live keys whose name starts with `keyrotd-`.
    pub fn minted_live(&self) -> BTreeSet<String> {
        self.sim
            .all_keys()
            .into_iter()
            .filter(|k| k.deleted_at.is_none() && k.name.starts_with("keyrotd-"))
            .map(|k| k.id)
            .collect()
    }

    /// The service-account id owning a key.
    pub fn owner_sa(&self, key_id: &str) -> Option<String> {
        match self.sim.key(key_id)?.owner {
            OwnerRef::ServiceAccount(sa) => Some(sa),
            OwnerRef::User(_) => None,
        }
    }
}

/// I1: every store's `api_key` is a live key the simulator accepts on `GET /models`.
pub fn assert_i1(world: &World, states: &BTreeMap<(String, String), SlotState>) {
    for ((store, path), st) in states {
        if let Some(cur) = &st.current {
            assert!(
                world.sim.use_key(cur.api_key.expose_secret()),
                "I1: store {store} at {path} serves key {} which the API rejects",
                cur.key_id
            );
        }
    }
}

/// I2: every live `keyrotd-*` key is current, pending or previous somewhere, or
/// belongs to a slot's previous service account (deleted whole after its grace).
pub fn assert_i2(world: &World, states: &BTreeMap<(String, String), SlotState>) {
    let referenced: BTreeSet<String> = states
        .values()
        .flat_map(|s| {
            s.referenced_key_ids()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    let retiring_accounts: BTreeSet<String> = states
        .values()
        .filter_map(|s| s.book.previous_service_account_id.clone())
        .filter(|sa| {
            !states.values().any(|s| {
                s.current
                    .as_ref()
                    .is_some_and(|c| &c.service_account_id == sa)
            })
        })
        .collect();
    for id in world.minted_live() {
        let on_retiring = world
            .owner_sa(&id)
            .is_some_and(|sa| retiring_accounts.contains(&sa));
        assert!(
            referenced.contains(&id) || on_retiring,
            "I2: minted key {id} is live but no store references it"
        );
    }
}

/// Captured log output (every level) of the whole test binary.
#[derive(Clone, Default)]
pub struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    /// The lines logged so far that contain every one of `needles`.
    pub fn lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_string)
            .collect()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

/// Every log line of this test binary, captured by a global subscriber (a thread-local
/// one misses events whose callsites other tests registered first). `None` when
/// another subscriber was installed first (`RUST_LOG` set).
pub fn captured_logs() -> Option<Logs> {
    static LOGS: std::sync::OnceLock<Option<Logs>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .ok()
            .map(|()| logs)
    })
    .clone()
}

/// A world's clock for the engine: the simulator's, wall time plus what the test
/// advanced both by. (A clock frozen between advances lagged the simulator by the
/// test's real running time, seconds on a loaded machine, so a request the simulator
/// counted "now" could fall in a usage bucket after the engine's now, outside the
/// window the engine read.)
#[derive(Debug, Clone, Default)]
pub struct WorldClock(Arc<std::sync::Mutex<chrono::Duration>>);

impl WorldClock {
    pub fn advance(&self, d: Duration) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *g += chrono::Duration::from_std(d).expect("a test's advance");
    }
}

impl Clock for WorldClock {
    fn now(&self) -> chrono::DateTime<Utc> {
        Utc::now() + *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A loopback port free a moment ago (for a server a test starts, or a closed port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}
