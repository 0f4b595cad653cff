//! Shared fixtures for the store tests: backends against the real OpenBao and moto
//! servers that `scripts/test-servers.sh` starts, records, and small helpers.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use keyrotd::config::{AwsConfig, FileConfig, VaultAuth, VaultConfig};
use keyrotd::store::aws::AwsStore;
use keyrotd::store::file::FileStore;
use keyrotd::store::vault::VaultStore;
use keyrotd::store::{
    DynStore, Intent, SecretRecord, SlotState, StoreErrorKind, Transition, Version, MANAGED_BY,
};
use secrecy::SecretString;

pub const NEEDS_SERVERS: &str = "run scripts/test (needs OpenBao and moto)";

/// An environment variable the test servers export; a missing one fails the test.
pub fn env(var: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!("{var} is not set: {NEEDS_SERVERS}"),
    }
}

/// A path no other test uses.
pub fn unique(prefix: &str) -> String {
    format!("keyrotd-test/{prefix}-{:016x}", rand::random::<u64>())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    File,
    Vault,
    Aws,
}

/// A store plus what keeps it alive (the file store's temp dir).
pub struct Fixture {
    pub backend: Backend,
    pub store: DynStore,
    pub dir: Option<Arc<tempfile::TempDir>>,
}

impl Fixture {
    pub async fn new(backend: Backend) -> Fixture {
        match backend {
            Backend::File => {
                let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
                let store = file_store(dir.path().join("secrets"));
                Fixture {
                    backend,
                    store,
                    dir: Some(dir),
                }
            }
            Backend::Vault => Fixture {
                backend,
                store: vault_store("secret").await,
                dir: None,
            },
            Backend::Aws => Fixture {
                backend,
                store: aws_store().await,
                dir: None,
            },
        }
    }

    /// A second, independent store object on the same backing store (a restarted or a
    /// second keyrotd process).
    pub async fn reopen(&self) -> DynStore {
        match self.backend {
            Backend::File => file_store(
                self.dir
                    .as_ref()
                    .expect("file fixture")
                    .path()
                    .join("secrets"),
            ),
            Backend::Vault => vault_store("secret").await,
            Backend::Aws => aws_store().await,
        }
    }
}

pub fn file_store(dir: std::path::PathBuf) -> DynStore {
    Arc::new(FileStore::new("local", &FileConfig { dir }).expect("file store"))
}

pub fn vault_config(mount: &str, auth: VaultAuth) -> VaultConfig {
    VaultConfig {
        address: env("KEYROTD_TEST_VAULT_ADDR"),
        mount: mount.to_string(),
        namespace: String::new(),
        ca_cert: String::new(),
        auth,
        max_retries: 2,
        request_timeout: Duration::from_secs(10),
    }
}

pub fn root_token_auth() -> VaultAuth {
    env("KEYROTD_TEST_VAULT_TOKEN");
    VaultAuth::Token {
        token_env: Some("KEYROTD_TEST_VAULT_TOKEN".into()),
        token_file: None,
    }
}

pub async fn vault_store(mount: &str) -> DynStore {
    Arc::new(
        VaultStore::connect("vault", &vault_config(mount, root_token_auth()))
            .await
            .expect("connect to OpenBao"),
    )
}

pub fn aws_config() -> AwsConfig {
    env("AWS_ACCESS_KEY_ID");
    AwsConfig {
        region: "us-east-1".into(),
        endpoint_url: env("KEYROTD_TEST_AWS_ENDPOINT"),
        kms_key_id: String::new(),
        profile: String::new(),
        max_retries: 2,
    }
}

pub async fn aws_store() -> DynStore {
    Arc::new(
        AwsStore::connect("aws", &aws_config())
            .await
            .expect("aws store"),
    )
}

/// An SDK client on moto, for looking behind the store's back.
pub async fn aws_sdk() -> aws_sdk_secretsmanager::Client {
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(env("KEYROTD_TEST_AWS_ENDPOINT"))
        .load()
        .await;
    aws_sdk_secretsmanager::Client::new(&conf)
}

/// Raw HTTP to OpenBao with the root token (setup the store API does not offer).
pub async fn bao(
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    bao_as(&env("KEYROTD_TEST_VAULT_TOKEN"), None, method, path, body).await
}

/// Raw HTTP to OpenBao with `token`, in namespace `ns` when given; panics unless 2xx.
pub async fn bao_as(
    token: &str,
    ns: Option<&str>,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let url = format!("{}/v1/{path}", env("KEYROTD_TEST_VAULT_ADDR"));
    let mut req = reqwest::Client::new()
        .request(method.clone(), &url)
        .header("X-Vault-Token", token);
    if let Some(ns) = ns {
        req = req.header("X-Vault-Namespace", ns);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert!(status.is_success(), "{method} {url}: {status}: {text}");
    if text.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text).expect("JSON from OpenBao")
    }
}

pub fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_790_000_000 + secs, 0)
        .single()
        .expect("time")
}

pub fn record(key_id: &str) -> SecretRecord {
    SecretRecord {
        api_key: SecretString::from(format!(
            "sk-proj-test-{key_id}-{:08x}",
            rand::random::<u32>()
        )),
        key_id: key_id.to_string(),
        project_id: "proj_test".into(),
        service_account_id: format!("svc_acct_{key_id}"),
        created_at: at(0),
        managed_by: MANAGED_BY.into(),
    }
}

pub fn intent(n: u32) -> Intent {
    Intent {
        key_name: format!("keyrotd-20261127T020000Z-{n}"),
        owner: format!("testhost:{}:abc", std::process::id()),
        lease_until: at(600),
        attempt: n,
        service_account_id: "svc_acct_1".into(),
        revoke_old: None,
    }
}

/// Applies `t` to the state just read and returns the new state.
pub async fn step(store: &DynStore, path: &str, t: Transition) -> SlotState {
    let s = store
        .read(path)
        .await
        .unwrap_or_else(|e| panic!("read {path}: {e}"));
    store
        .apply(path, &s.version, &t)
        .await
        .unwrap_or_else(|e| panic!("apply {t:?} to {path}: {e}"))
}

/// Intent, stage, promote: one full rotation to `rec`.
pub async fn rotate(
    store: &DynStore,
    path: &str,
    rec: &SecretRecord,
    n: u32,
    when: DateTime<Utc>,
) -> SlotState {
    step(store, path, Transition::Intent(intent(n))).await;
    step(store, path, Transition::Stage(rec.clone())).await;
    step(
        store,
        path,
        Transition::Promote {
            key_id: rec.key_id.clone(),
            at: when,
            previous_until: None,
        },
    )
    .await
}

pub fn assert_conflict<T: std::fmt::Debug>(r: Result<T, keyrotd::store::StoreError>, what: &str) {
    match r {
        Err(e) => assert_eq!(e.kind, StoreErrorKind::Conflict, "{what}: {e}"),
        Ok(v) => panic!("{what}: expected a conflict, got {v:?}"),
    }
}

pub fn absent() -> Version {
    Version::absent()
}
