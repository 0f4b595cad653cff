//! Vault-specific store behaviour against a real OpenBao dev server: AppRole login,
//! token renewal and re-login, clear auth errors, `cas_required` mounts, namespaces,
//! capability probes, deleted versions, `managed-by` marking.
//!
//! Needs `scripts/test-servers.sh` (fails with "run scripts/test (needs OpenBao and
//! moto)" otherwise).

use crate::store_support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::store_support::*;
use keyrotd::config::VaultAuth;
use keyrotd::store::vault::VaultStore;
use keyrotd::store::{DynStore, SecretStore, StoreErrorKind, Transition};
use reqwest::Method;
use serde_json::json;

async fn connect(
    cfg: keyrotd::config::VaultConfig,
) -> Result<VaultStore, keyrotd::store::StoreError> {
    VaultStore::connect("vault", &cfg).await
}

fn write_file(dir: &tempfile::TempDir, name: &str, content: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, content).expect("write credential file");
    p
}

/// A fresh AppRole auth mount with one role; returns (mount, role_id, secret_id).
async fn approle(ttl: &str, max_ttl: &str, policy: &str) -> (String, String, String) {
    let mount = format!("approle-{:08x}", rand::random::<u32>());
    bao(
        Method::POST,
        &format!("sys/auth/{mount}"),
        Some(json!({"type": "approle"})),
    )
    .await;
    bao(
        Method::PUT,
        &format!("sys/policies/acl/{mount}"),
        Some(json!({"policy": policy})),
    )
    .await;
    bao(
        Method::POST,
        &format!("auth/{mount}/role/r"),
        Some(
            json!({"token_policies": [mount.clone()], "token_ttl": ttl, "token_max_ttl": max_ttl}),
        ),
    )
    .await;
    let role_id = bao(Method::GET, &format!("auth/{mount}/role/r/role-id"), None).await["data"]
        ["role_id"]
        .as_str()
        .expect("role_id")
        .to_string();
    let secret_id = bao(
        Method::POST,
        &format!("auth/{mount}/role/r/secret-id"),
        Some(json!({})),
    )
    .await["data"]["secret_id"]
        .as_str()
        .expect("secret_id")
        .to_string();
    (mount, role_id, secret_id)
}

const MANAGE_SECRET: &str = r#"
path "secret/data/*" { capabilities = ["create", "read", "update"] }
path "secret/metadata/*" { capabilities = ["read", "update"] }
"#;

async fn approle_store(ttl: &str, max_ttl: &str) -> (DynStore, String, tempfile::TempDir) {
    let (mount, role_id, secret_id) = approle(ttl, max_ttl, MANAGE_SECRET).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let auth = VaultAuth::Approle {
        mount: mount.clone(),
        role_id_env: None,
        role_id_file: Some(write_file(&dir, "role-id", &role_id)),
        secret_id_env: None,
        secret_id_file: Some(write_file(&dir, "secret-id", &secret_id)),
    };
    let store = connect(vault_config("secret", auth))
        .await
        .expect("AppRole login");
    (Arc::new(store), mount, dir)
}

#[tokio::test]
async fn approle_login_from_env_rotates() {
    env("KEYROTD_TEST_VAULT_ROLE_ID");
    let auth = VaultAuth::Approle {
        mount: "approle".into(),
        role_id_env: Some("KEYROTD_TEST_VAULT_ROLE_ID".into()),
        role_id_file: None,
        secret_id_env: Some("KEYROTD_TEST_VAULT_SECRET_ID".into()),
        secret_id_file: None,
    };
    let store: DynStore = Arc::new(
        connect(vault_config("secret", auth))
            .await
            .expect("AppRole login"),
    );
    let path = unique("approle");
    rotate(&store, &path, &record("key_a"), 1, at(1)).await;
    let st = rotate(&store, &path, &record("key_b"), 2, at(2)).await;
    assert_eq!(st.book.previous_key_id.as_deref(), Some("key_a"));
    store.health().await.expect("health");
    store.probe_write(&path).await.expect("probe_write");
}

#[tokio::test]
async fn missing_token_is_a_clear_config_error() {
    let auth = VaultAuth::Token {
        token_env: Some("KEYROTD_TEST_NO_SUCH_TOKEN_VAR".into()),
        token_file: None,
    };
    let e = connect(vault_config("secret", auth))
        .await
        .expect_err("no token");
    assert_eq!(e.kind, StoreErrorKind::InvalidConfig, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("store \"vault\""), "{msg}");
    assert!(msg.contains("KEYROTD_TEST_NO_SUCH_TOKEN_VAR"), "{msg}");

    let auth = VaultAuth::Token {
        token_env: None,
        token_file: Some("/nonexistent/keyrotd/token".into()),
    };
    let e = connect(vault_config("secret", auth))
        .await
        .expect_err("no token file");
    assert_eq!(e.kind, StoreErrorKind::InvalidConfig, "{e}");
    assert!(e.to_string().contains("/nonexistent/keyrotd/token"), "{e}");
}

#[tokio::test]
async fn invalid_token_is_permission_denied() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(&dir, "token", "s.not-a-real-token-5f3a\n");
    let auth = VaultAuth::Token {
        token_env: None,
        token_file: Some(file),
    };
    let e = connect(vault_config("secret", auth))
        .await
        .expect_err("bad token");
    assert_eq!(e.kind, StoreErrorKind::PermissionDenied, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("store \"vault\"") && msg.contains("lookup-self"),
        "{msg}"
    );
    assert!(!msg.contains("not-a-real-token") && !format!("{e:?}").contains("not-a-real-token"));
}

#[tokio::test]
async fn unreachable_server_is_temporary() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = vault_config("secret", root_token_auth());
    cfg.address = format!("http://127.0.0.1:{port}");
    cfg.max_retries = 0;
    let e = connect(cfg).await.expect_err("nothing listens");
    assert_eq!(e.kind, StoreErrorKind::Unavailable, "{e}");
    assert!(e.is_temporary());
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
}

#[tokio::test]
async fn cas_required_mount_works() {
    let mount = format!("kv-cas-{:08x}", rand::random::<u32>());
    bao(
        Method::POST,
        &format!("sys/mounts/{mount}"),
        Some(json!({"type": "kv", "options": {"version": "2"}})),
    )
    .await;
    bao(
        Method::POST,
        &format!("{mount}/config"),
        Some(json!({"cas_required": true})),
    )
    .await;
    let cfg = bao(Method::GET, &format!("{mount}/config"), None).await;
    assert_eq!(cfg["data"]["cas_required"], true);

    let store = vault_store(&mount).await;
    let path = unique("casreq");
    rotate(&store, &path, &record("key_1"), 1, at(1)).await;
    let st = rotate(&store, &path, &record("key_2"), 2, at(2)).await;
    assert_eq!(st.current.map(|c| c.key_id).as_deref(), Some("key_2"));
    assert_eq!(st.book.previous_key_id.as_deref(), Some("key_1"));
    let stale = keyrotd::store::Version("1".into());
    assert_conflict(
        store.apply(&path, &stale, &Transition::Abandon).await,
        "stale cas",
    );
}

#[tokio::test]
async fn namespace_is_sent() {
    let ns = format!("ns{:08x}", rand::random::<u32>());
    bao(
        Method::POST,
        &format!("sys/namespaces/{ns}"),
        Some(json!({})),
    )
    .await;
    let root = env("KEYROTD_TEST_VAULT_TOKEN");
    bao_as(
        &root,
        Some(&ns),
        Method::POST,
        "sys/mounts/secret",
        Some(json!({"type": "kv", "options": {"version": "2"}})),
    )
    .await;
    let mut cfg = vault_config("secret", root_token_auth());
    cfg.namespace = ns.clone();
    let store: DynStore = Arc::new(connect(cfg).await.expect("connect in namespace"));
    let path = unique("ns");
    rotate(&store, &path, &record("key_ns"), 1, at(1)).await;
    let v = bao_as(
        &root,
        Some(&ns),
        Method::GET,
        &format!("secret/data/{path}"),
        None,
    )
    .await;
    assert_eq!(v["data"]["data"]["key_id"], "key_ns");
    let outside = vault_store("secret")
        .await
        .read(&path)
        .await
        .expect("read root namespace");
    assert!(
        outside.version.is_absent(),
        "nothing was written outside the namespace"
    );
}

/// With a 2 s TTL and a 5 s max TTL, a store used for 7 s must renew and then log in again.
#[tokio::test]
async fn short_lived_approle_tokens_are_renewed_and_replaced() {
    let (store, _mount, _dir) = approle_store("2s", "5s").await;
    let path = unique("ttl");
    rotate(&store, &path, &record("key_1"), 1, at(1)).await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(7) {
        let st = store
            .read(&path)
            .await
            .unwrap_or_else(|e| panic!("read after {:?}: {e}", start.elapsed()));
        assert_eq!(st.current.map(|c| c.key_id).as_deref(), Some("key_1"));
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    step(&store, &path, Transition::Intent(intent(2))).await;
}

#[tokio::test]
async fn revoked_approle_token_triggers_one_relogin() {
    let (store, mount, _dir) = approle_store("1h", "4h").await;
    let path = unique("revoked");
    rotate(&store, &path, &record("key_1"), 1, at(1)).await;
    bao(
        Method::PUT,
        &format!("sys/leases/revoke-prefix/auth/{mount}/login"),
        None,
    )
    .await;
    let st = store
        .read(&path)
        .await
        .expect("read after the token was revoked");
    assert_eq!(st.current.map(|c| c.key_id).as_deref(), Some("key_1"));
    step(&store, &path, Transition::Intent(intent(2))).await;
}

async fn child_token(ttl: &str) -> String {
    let r = bao(
        Method::POST,
        "auth/token/create",
        Some(
            json!({"ttl": ttl, "explicit_max_ttl": "1h", "renewable": true, "policies": ["root"]}),
        ),
    )
    .await;
    r["auth"]["client_token"]
        .as_str()
        .expect("client_token")
        .to_string()
}

/// A given renewable token with a 3 s TTL keeps working for 5 s: renew-self.
#[tokio::test]
async fn given_token_is_renewed() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(&dir, "token", &child_token("3s").await);
    let auth = VaultAuth::Token {
        token_env: None,
        token_file: Some(file),
    };
    let store: DynStore = Arc::new(
        connect(vault_config("secret", auth))
            .await
            .expect("connect"),
    );
    let path = unique("renew");
    rotate(&store, &path, &record("key_1"), 1, at(1)).await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        store
            .read(&path)
            .await
            .unwrap_or_else(|e| panic!("read after {:?}: {e}", start.elapsed()));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A token file rewritten by an agent after the old token was revoked is picked up.
#[tokio::test]
async fn token_file_is_reread_after_denial() {
    let dir = tempfile::tempdir().unwrap();
    let old = child_token("1h").await;
    let file = write_file(&dir, "token", &old);
    let auth = VaultAuth::Token {
        token_env: None,
        token_file: Some(file.clone()),
    };
    let store: DynStore = Arc::new(
        connect(vault_config("secret", auth))
            .await
            .expect("connect"),
    );
    let path = unique("tokfile");
    rotate(&store, &path, &record("key_1"), 1, at(1)).await;
    bao(
        Method::POST,
        "auth/token/revoke",
        Some(json!({"token": old})),
    )
    .await;
    let e = store
        .read(&path)
        .await
        .expect_err("revoked, file unchanged");
    assert_eq!(e.kind, StoreErrorKind::PermissionDenied, "{e}");
    std::fs::write(&file, child_token("1h").await).unwrap();
    store
        .read(&path)
        .await
        .expect("read with the new token from the file");
}

#[tokio::test]
async fn probe_write_checks_capabilities() {
    let prefix = format!("probe{:08x}", rand::random::<u32>());
    let policy = format!(
        r#"path "secret/data/{prefix}/*" {{ capabilities = ["create", "update", "read"] }}
path "secret/metadata/{prefix}/*" {{ capabilities = ["read"] }}
path "secret/data/readonly/*" {{ capabilities = ["read"] }}"#
    );
    let (mount, role_id, secret_id) = approle("1h", "4h", &policy).await;
    let dir = tempfile::tempdir().unwrap();
    let auth = VaultAuth::Approle {
        mount,
        role_id_env: None,
        role_id_file: Some(write_file(&dir, "r", &role_id)),
        secret_id_env: None,
        secret_id_file: Some(write_file(&dir, "s", &secret_id)),
    };
    let store = connect(vault_config("secret", auth)).await.expect("login");
    store
        .probe_write(&format!("{prefix}/slot"))
        .await
        .expect("allowed path");
    let e = store
        .probe_write("readonly/slot")
        .await
        .expect_err("read-only path");
    assert_eq!(e.kind, StoreErrorKind::PermissionDenied, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("create on secret/data/readonly/slot"), "{msg}");
    assert!(
        msg.contains("read on secret/metadata/readonly/slot"),
        "{msg}"
    );
    assert!(!msg.contains("read on secret/data/readonly/slot"), "{msg}");
}

#[tokio::test]
async fn deleted_current_version_reads_empty_but_keeps_cas() {
    let store = vault_store("secret").await;
    let path = unique("deleted");
    let st = rotate(&store, &path, &record("key_1"), 1, at(1)).await;
    bao(Method::DELETE, &format!("secret/data/{path}"), None).await;
    let read = store.read(&path).await.expect("read deleted");
    assert_eq!(read.current, None);
    assert_eq!(
        read.version, st.version,
        "the version stays for check-and-set"
    );
    let again = store
        .apply(&path, &read.version, &Transition::Intent(intent(2)))
        .await
        .expect("write over a deleted version");
    assert_eq!(again.book.intent, Some(intent(2)));

    let v = again.version.0.clone();
    bao(
        Method::POST,
        &format!("secret/destroy/{path}"),
        Some(json!({"versions": [v.parse::<u64>().unwrap()]})),
    )
    .await;
    let read = store.read(&path).await.expect("read destroyed");
    assert_eq!((read.current, read.version), (None, again.version));
}

#[tokio::test]
async fn marking_managed_keeps_other_custom_metadata() {
    let path = unique("marked");
    let store = vault_store("secret").await;
    rotate(&store, &path, &record("key_1"), 1, at(1)).await;
    // An operator replaces the custom metadata (dropping `managed-by`).
    bao(
        Method::POST,
        &format!("secret/metadata/{path}"),
        Some(json!({"custom_metadata": {"team": "platform"}})),
    )
    .await;
    let custom = || async {
        bao(Method::GET, &format!("secret/metadata/{path}"), None).await["data"]["custom_metadata"]
            .clone()
    };
    // A fresh store (a restarted daemon) reads the slot and writes through `apply_to`:
    // the write marks the secret again and keeps the operator's entry.
    let fresh = vault_store("secret").await;
    let st = fresh.read(&path).await.expect("read");
    let st = fresh
        .apply_to(&path, &st, &Transition::Intent(intent(2)))
        .await
        .expect("intent");
    assert_eq!(
        custom().await,
        json!({"team": "platform", "managed-by": "keyrotd"})
    );
    // Marked now: later writes leave the metadata alone.
    bao(
        Method::POST,
        &format!("secret/metadata/{path}"),
        Some(json!({"custom_metadata": {"team": "platform", "managed-by": "keyrotd", "x": "1"}})),
    )
    .await;
    fresh
        .apply_to(&path, &st, &Transition::Abandon)
        .await
        .expect("abandon");
    assert_eq!(
        custom().await,
        json!({"team": "platform", "managed-by": "keyrotd", "x": "1"})
    );
}

/// A pass-through HTTP proxy in front of OpenBao that records every request's method
/// and path: the Vault store's round trips, counted on the wire.
struct Recorder {
    addr: String,
    seen: Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

impl Recorder {
    async fn start() -> Recorder {
        let upstream = store_support::env("KEYROTD_TEST_VAULT_ADDR");
        let seen: Arc<std::sync::Mutex<Vec<(String, String)>>> = Arc::default();
        let client = reqwest::Client::new();
        let log = seen.clone();
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let (client, upstream, log) = (client.clone(), upstream.clone(), log.clone());
            async move {
                let (parts, body) = req.into_parts();
                let body = axum::body::to_bytes(body, usize::MAX).await.expect("body");
                log.lock()
                    .unwrap()
                    .push((parts.method.to_string(), parts.uri.path().to_string()));
                let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                let mut forward = client
                    .request(parts.method.clone(), format!("{upstream}{target}"))
                    .body(body);
                for (k, v) in &parts.headers {
                    if k != "host" && k != "content-length" {
                        forward = forward.header(k, v);
                    }
                }
                let resp = forward.send().await.expect("OpenBao answers");
                let mut out = axum::response::Response::builder().status(resp.status());
                for (k, v) in resp.headers() {
                    if k != "transfer-encoding" && k != "content-length" {
                        out = out.header(k, v);
                    }
                }
                let bytes = resp.bytes().await.expect("response body");
                out.body(axum::body::Body::from(bytes)).expect("response")
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Recorder { addr, seen }
    }

    /// The requests about `path` since the last call, as (method, kind) with kind
    /// `data` or `metadata`.
    fn take(&self, path: &str) -> Vec<(String, &'static str)> {
        let mut seen = self.seen.lock().unwrap();
        let out = seen
            .iter()
            .filter(|(_, p)| p.ends_with(&format!("/{path}")))
            .map(|(m, p)| {
                let kind = if p.starts_with("/v1/secret/data/") {
                    "data"
                } else if p.starts_with("/v1/secret/metadata/") {
                    "metadata"
                } else {
                    "other"
                };
                (m.clone(), kind)
            })
            .collect();
        seen.clear();
        out
    }
}

fn trips(list: &[(&str, &'static str)]) -> Vec<(String, &'static str)> {
    list.iter().map(|(m, k)| (m.to_string(), *k)).collect()
}

#[tokio::test]
async fn a_read_is_one_request_and_a_write_one_more() {
    let rec = Recorder::start().await;
    let mut cfg = vault_config("secret", root_token_auth());
    cfg.address = rec.addr.clone();
    let store = VaultStore::connect("vault", &cfg)
        .await
        .expect("connect through the recorder");
    let path = unique("trips");

    // A path that holds nothing: the data read's 404 sends the store to the metadata
    // (which tells "absent" from "current version deleted").
    let st = store.read(&path).await.expect("read");
    assert_eq!(
        rec.take(&path),
        trips(&[("GET", "data"), ("GET", "metadata")])
    );
    // Creating the secret: the cas write, then the `managed-by` mark.
    let st = store
        .apply_to(&path, &st, &Transition::Intent(intent(1)))
        .await
        .expect("intent");
    assert_eq!(
        rec.take(&path),
        trips(&[("POST", "data"), ("POST", "metadata")])
    );
    // From then on: one request per write, none to re-read, one per read.
    let st = store
        .apply_to(&path, &st, &Transition::Stage(record("key_1")))
        .await
        .expect("stage");
    assert_eq!(rec.take(&path), trips(&[("POST", "data")]));
    let read = store.read(&path).await.expect("read");
    assert_eq!(rec.take(&path), trips(&[("GET", "data")]));
    assert_eq!(read, st);
    store
        .apply_to(
            &path,
            &read,
            &Transition::Promote {
                key_id: "key_1".into(),
                at: at(5),
                previous_until: None,
            },
        )
        .await
        .expect("promote");
    assert_eq!(rec.take(&path), trips(&[("POST", "data")]));
    // `apply` (expected version only) reads first.
    let v = store.read(&path).await.expect("read").version;
    rec.take(&path);
    store
        .apply(&path, &v, &Transition::Intent(intent(2)))
        .await
        .expect("apply");
    assert_eq!(rec.take(&path), trips(&[("GET", "data"), ("POST", "data")]));
}

#[tokio::test]
async fn foreign_secret_is_refused() {
    let store = vault_store("secret").await;
    let path = unique("foreign");
    bao(
        Method::POST,
        &format!("secret/data/{path}"),
        Some(json!({"data": {"password": "hunter2"}})),
    )
    .await;
    let e = store.read(&path).await.expect_err("not a keyrotd document");
    assert_eq!(e.kind, StoreErrorKind::InvalidData, "{e}");
    assert!(e.to_string().contains("did not write"), "{e}");
    assert!(!format!("{e} {e:?}").contains("hunter2"));
}

#[tokio::test]
async fn debug_output_redacts_the_token() {
    let store = vault_store("secret").await;
    let dbg = format!("{store:?}");
    assert!(
        dbg.contains("VaultStore") && dbg.contains("[REDACTED]"),
        "{dbg}"
    );
    assert!(
        !dbg.contains(&format!("\"{}\"", env("KEYROTD_TEST_VAULT_TOKEN"))),
        "{dbg}"
    );
    assert_eq!(store.kind(), "vault");
}
