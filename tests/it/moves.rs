//! The world changes under a slot (DESIGN.md I7): a project or service account is
//! renamed, a rule's `path` or `stores` is edited, a 0.1-layout store is upgraded. The
//! slot's state is keyed by identity, so its key moves instead of being re-minted or
//! revoked: the new location serves the same key after one cycle, the old one keeps it
//! through the grace period and is removed after. And consumers see one change per
//! rotation: the consumer document holds the six fields, written at promotion only.

use std::sync::Arc;
use std::time::Duration;

use crate::e2e::{env, Stores, World, ADMIN_KEY};
use keyrotd::config::Config;
use keyrotd::rotation::{Engine, SlotOutcome};
use keyrotd::sim::{OwnerRef, Scenario};
use keyrotd::store::SecretRecord;
use serde_json::Value;

const HOUR: Duration = Duration::from_secs(3600);

/// A world with one project of our own, `prod-orders`, service account `api` with a
/// fresh key; the rule writes to `stores` (a TOML list).
async fn world(stores: &str) -> (World, String, String) {
    let mut w = World::new(Scenario::new(3).projects(0), Stores::All, "").await;
    w.toml = w.toml.replace(
        r#"stores = ["file", "vault", "aws"]"#,
        &format!("stores = {stores}"),
    );
    let p = w.sim.add_project("prod-orders");
    let sa = w.sim.add_service_account(&p, "api").expect("account");
    w.sim
        .add_key(&p, OwnerRef::ServiceAccount(sa.clone()), "api-key")
        .expect("key");
    (w, p, sa)
}

async fn engine_for(w: &World, toml: &str) -> Engine {
    let cfg = Config::from_toml(toml).expect("valid config");
    let mut e = keyrotd::app::build_engine(&cfg, false)
        .await
        .expect("engine builds");
    e.clock = Arc::new(w.clock.clone());
    e.settings.verify_backoff = Duration::from_millis(50);
    e
}

/// What consumers read at `path` in `store` (the consumer document).
async fn served(e: &Engine, store: &str, path: &str) -> Option<SecretRecord> {
    let s = &e.stores[store];
    match s.layout() {
        keyrotd::store::Layout::Separate => s.read_consumer(path).await.expect("read").record,
        keyrotd::store::Layout::WithConsumer => s.read(path).await.expect("read").current,
    }
}

/// Whether the AWS secret at `path` is gone: scheduled for deletion, or never there.
async fn aws_deleted(path: &str) -> bool {
    let sdk = crate::store_support::aws_sdk().await;
    match sdk.describe_secret().secret_id(path).send().await {
        Ok(d) => d.deleted_date().is_some(),
        Err(_) => true,
    }
}

fn key_of(r: &Option<SecretRecord>) -> Option<String> {
    r.as_ref().map(|r| r.key_id.clone())
}

async fn sim_post(w: &World, path: &str, body: Value) {
    let r = reqwest::Client::new()
        .post(format!("{}{path}", w.server.base_url))
        .bearer_auth(ADMIN_KEY)
        .json(&body)
        .send()
        .await
        .expect("simulator answers");
    assert!(r.status().is_success(), "POST {path}: {}", r.status());
}

fn ok(r: &keyrotd::rotation::CycleReport) {
    assert!(!r.any_failed(), "{:?}", r.slots);
}

/// One rename end to end: the new path serves the same key after one cycle, the old
/// path serves it until the grace period ends, then its document is gone; nothing is
/// minted or revoked.
async fn rename_keeps_the_key(
    rename: impl std::future::Future<Output = ()>,
    w: &World,
    e: &Engine,
    old: &str,
    new: &str,
) {
    let first = e.cycle().await;
    ok(&first);
    let k1 = key_of(&served(e, "file", old).await).expect("bootstrapped");
    let minted = w.minted_live();
    let deleted = w.sim.deleted_keys();

    rename.await;
    let r = e.cycle().await;
    ok(&r);
    assert_eq!(r.slots.len(), 1);
    assert_eq!(r.slots[0].slot.path, new);
    assert!(
        !matches!(r.slots[0].outcome, Ok(SlotOutcome::Rotated { .. })),
        "no rotation: {:?}",
        r.slots[0].outcome
    );
    for store in ["file", "vault", "aws"] {
        assert_eq!(
            key_of(&served(e, store, new).await).as_deref(),
            Some(k1.as_str()),
            "{store} serves the same key at the new path"
        );
    }
    for store in ["file", "vault", "aws"] {
        assert_eq!(
            key_of(&served(e, store, old).await).as_deref(),
            Some(k1.as_str()),
            "{store} still serves it at the old path"
        );
    }
    assert_eq!(w.minted_live(), minted, "nothing minted");
    assert_eq!(w.sim.deleted_keys(), deleted, "nothing revoked");

    // Inside the grace period the old path keeps serving; after it, it is removed.
    w.advance(HOUR / 2);
    ok(&e.cycle().await);
    assert!(
        served(e, "file", old).await.is_some(),
        "old path inside the grace period"
    );
    assert!(
        !aws_deleted(old).await,
        "old AWS secret inside the grace period"
    );
    w.advance(HOUR);
    ok(&e.cycle().await);
    assert!(
        aws_deleted(old).await,
        "aws: the old secret is deleted after the grace period"
    );
    assert_eq!(
        key_of(&served(e, "aws", new).await).as_deref(),
        Some(k1.as_str())
    );
    for store in ["file", "vault"] {
        assert!(
            served(e, store, old).await.is_none(),
            "{store}: old document removed"
        );
        assert_eq!(
            key_of(&served(e, store, new).await).as_deref(),
            Some(k1.as_str())
        );
    }
    assert!(w.sim.is_live(&k1), "the served key is never revoked");
    assert_eq!(w.minted_live(), minted, "nothing minted");
    assert_eq!(w.sim.deleted_keys(), deleted, "nothing revoked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renamed_project_keeps_its_key() {
    let (w, p, _) = world(r#"["file", "vault", "aws"]"#).await;
    let e = w.engine(false).await;
    let old = format!("{}/prod-orders/api", w.prefix);
    let new = format!("{}/prod-orders-eu/api", w.prefix);
    let url = format!("/organization/projects/{p}");
    let rename = sim_post(&w, &url, serde_json::json!({"name": "prod-orders-eu"}));
    rename_keeps_the_key(rename, &w, &e, &old, &new).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renamed_service_account_keeps_its_key() {
    let (w, p, sa) = world(r#"["file", "vault", "aws"]"#).await;
    let e = w.engine(false).await;
    let old = format!("{}/prod-orders/api", w.prefix);
    let new = format!("{}/prod-orders/api-v2", w.prefix);
    let url = format!("/organization/projects/{p}/service_accounts/{sa}");
    let rename = sim_post(&w, &url, serde_json::json!({"name": "api-v2"}));
    rename_keeps_the_key(rename, &w, &e, &old, &new).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edited_rule_path_keeps_the_key() {
    let (mut w, _, _) = world(r#"["file", "vault", "aws"]"#).await;
    let e = w.engine(false).await;
    let old = format!("{}/prod-orders/api", w.prefix);
    let new = format!("{}/v2/prod-orders/api", w.prefix);
    let toml = w.toml.replace(
        &format!("path = \"{}/{{project_name}}", w.prefix),
        &format!("path = \"{}/v2/{{project_name}}", w.prefix),
    );
    assert_ne!(toml, w.toml);
    // The same engine cannot change its rules: cycle once on the old config, then on
    // the new one (as a restarted or reloaded daemon would).
    ok(&e.cycle().await);
    let k1 = key_of(&served(&e, "file", &old).await).expect("bootstrapped");
    let minted = w.minted_live();
    w.toml = toml;
    let e2 = w.engine(false).await;
    ok(&e2.cycle().await);
    for store in ["file", "vault", "aws"] {
        assert_eq!(
            key_of(&served(&e2, store, &new).await),
            Some(k1.clone()),
            "{store}"
        );
    }
    assert_eq!(key_of(&served(&e2, "file", &old).await), Some(k1.clone()));
    w.advance(2 * HOUR);
    ok(&e2.cycle().await);
    assert!(
        served(&e2, "vault", &old).await.is_none(),
        "old vault document removed"
    );
    assert!(
        served(&e2, "file", &old).await.is_none(),
        "old file removed"
    );
    assert_eq!(w.minted_live(), minted, "nothing minted");
    assert!(w.sim.is_live(&k1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rule_moved_to_another_store_keeps_the_key() {
    let (w, _, _) = world(r#"["file"]"#).await;
    let e = w.engine(false).await;
    let path = format!("{}/prod-orders/api", w.prefix);
    ok(&e.cycle().await);
    let k1 = key_of(&served(&e, "file", &path).await).expect("bootstrapped");
    let minted = w.minted_live();
    let deleted = w.sim.deleted_keys();

    let moved = w
        .toml
        .replace(r#"stores = ["file"]"#, r#"stores = ["vault"]"#);
    let e2 = engine_for(&w, &moved).await;
    ok(&e2.cycle().await);
    assert_eq!(
        key_of(&served(&e2, "vault", &path).await),
        Some(k1.clone()),
        "vault adopts the key"
    );
    assert_eq!(
        key_of(&served(&e2, "file", &path).await),
        Some(k1.clone()),
        "file keeps serving"
    );
    assert_eq!(w.minted_live(), minted, "nothing minted");
    w.advance(2 * HOUR);
    ok(&e2.cycle().await);
    assert!(
        served(&e2, "file", &path).await.is_none(),
        "the former store's document is removed"
    );
    let key = e2.survey().await.expect("survey").views[0].slot.state_key();
    let state = e2.stores["file"].read(&key).await.expect("read");
    assert!(state.is_empty(), "and its state record: {state:?}");
    assert_eq!(key_of(&served(&e2, "vault", &path).await), Some(k1.clone()));
    assert!(w.sim.is_live(&k1));
    assert_eq!(w.minted_live(), minted, "nothing minted");
    assert_eq!(w.sim.deleted_keys(), deleted, "nothing revoked");
}

/// KV v2 versions of the secret at `path`, read through Vault's metadata endpoint.
async fn vault_versions(path: &str) -> u64 {
    let v: Value = reqwest::Client::new()
        .get(format!(
            "{}/v1/secret/metadata/{path}",
            env("KEYROTD_TEST_VAULT_ADDR")
        ))
        .header("X-Vault-Token", env("KEYROTD_TEST_VAULT_TOKEN"))
        .send()
        .await
        .expect("vault answers")
        .json()
        .await
        .expect("json");
    v["data"]["current_version"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumers_see_one_change_per_rotation() {
    let (w, _, _) = world(r#"["file", "vault", "aws"]"#).await;
    let e = w.engine(false).await;
    let path = format!("{}/prod-orders/api", w.prefix);
    ok(&e.cycle().await);
    assert_eq!(vault_versions(&path).await, 1, "bootstrap: one version");
    let k1 = key_of(&served(&e, "file", &path).await).unwrap();

    // Stale: one rotation, then its retirement after the grace period.
    w.advance(Duration::from_secs(91 * 86400));
    let r = e.cycle().await;
    ok(&r);
    assert!(matches!(
        r.slots[0].outcome,
        Ok(SlotOutcome::Rotated { .. })
    ));
    let k2 = key_of(&served(&e, "file", &path).await).unwrap();
    assert_ne!(k1, k2);
    w.advance(2 * HOUR);
    ok(&e.cycle().await);
    assert!(!w.sim.is_live(&k1), "the replaced key is retired");
    assert_eq!(
        vault_versions(&path).await,
        2,
        "the rotation and its retirement added exactly one KV version"
    );

    // The consumer documents hold the six fields and nothing else.
    let file = e.stores["file"].clone();
    let dir = w.dir.path().join("secrets");
    let doc: Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{path}.json"))).unwrap()).unwrap();
    let mut keys: Vec<&str> = doc
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "api_key",
            "created_at",
            "key_id",
            "managed_by",
            "project_id",
            "service_account_id"
        ]
    );
    assert_eq!(
        key_of(&file.read_consumer(&path).await.unwrap().record),
        Some(k2)
    );
    let v: Value = reqwest::Client::new()
        .get(format!(
            "{}/v1/secret/data/{path}",
            env("KEYROTD_TEST_VAULT_ADDR")
        ))
        .header("X-Vault-Token", env("KEYROTD_TEST_VAULT_TOKEN"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"]["data"].as_object().unwrap().len(), 6, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_0_1_layout_store_converts_in_one_cycle_with_no_mint_and_no_revoke() {
    let (w, p, sa) = world(r#"["file", "vault"]"#).await;
    let e = w.engine(false).await;
    let path = format!("{}/prod-orders/api", w.prefix);
    // What 0.1 wrote: the current key with the bookkeeping inside the consumer
    // document, here a previous key still in its grace period.
    let cur = w
        .sim
        .add_key(
            &p,
            OwnerRef::ServiceAccount(sa.clone()),
            "keyrotd-20261101T000000Z-aaaa",
        )
        .unwrap();
    let prev = w
        .sim
        .add_key(
            &p,
            OwnerRef::ServiceAccount(sa.clone()),
            "keyrotd-20261001T000000Z-bbbb",
        )
        .unwrap();
    let promoted = chrono::Utc::now() - chrono::Duration::minutes(10);
    let doc = serde_json::json!({
        "api_key": cur.value, "key_id": cur.id, "project_id": p, "service_account_id": sa,
        "created_at": "2026-11-01T00:00:00Z", "managed_by": "keyrotd",
        "rotation": {"previous_key_id": prev.id, "previous_service_account_id": sa,
                     "promoted_at": promoted.to_rfc3339()}
    });
    let file = w.dir.path().join("secrets").join(format!("{path}.json"));
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, serde_json::to_vec(&doc).unwrap()).unwrap();
    let r = reqwest::Client::new()
        .post(format!(
            "{}/v1/secret/data/{path}",
            env("KEYROTD_TEST_VAULT_ADDR")
        ))
        .header("X-Vault-Token", env("KEYROTD_TEST_VAULT_TOKEN"))
        .json(&serde_json::json!({"data": doc}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let minted = w.minted_live();
    let deleted = w.sim.deleted_keys();

    let r = e.cycle().await;
    ok(&r);
    assert_eq!(w.minted_live(), minted, "no mint");
    assert_eq!(w.sim.deleted_keys(), deleted, "no revoke");
    for store in ["file", "vault"] {
        let d = e.stores[store].read_consumer(&path).await.unwrap();
        assert_eq!(
            key_of(&d.record).as_deref(),
            Some(cur.id.as_str()),
            "{store}"
        );
        assert!(d.legacy.is_none(), "{store}: the `rotation` object is gone");
    }
    assert_eq!(vault_versions(&path).await, 2, "one cleaning write");
    // The bookkeeping moved with it: the previous key is retired after its grace.
    w.advance(HOUR);
    ok(&e.cycle().await);
    assert!(
        !w.sim.is_live(&prev.id),
        "the migrated previous key is retired on time"
    );
    assert!(w.sim.is_live(&cur.id));
    assert_eq!(w.minted_live().len(), minted.len() - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_aws_only_slot_renamed_keeps_its_key_and_retires_the_old_secret() {
    // AWS keeps its state with the consumer secret; the renamed slot finds its former
    // secret by the project tag, serves the same key under the new name (no mint), and
    // deletes the former secret once the grace period is over.
    let (w, p, _) = world(r#"["aws"]"#).await;
    let e = w.engine(false).await;
    let old = format!("{}/prod-orders/api", w.prefix);
    let new = format!("{}/prod-orders-us/api", w.prefix);
    ok(&e.cycle().await);
    let k1 = key_of(&served(&e, "aws", &old).await).expect("bootstrapped");
    let minted = w.minted_live();
    let deleted = w.sim.deleted_keys();
    w.advance(2 * HOUR); // older than orphan_min_age (1 h)
    sim_post(
        &w,
        &format!("/organization/projects/{p}"),
        serde_json::json!({"name": "prod-orders-us"}),
    )
    .await;
    let r = e.cycle().await;
    ok(&r);
    assert!(
        !matches!(r.slots[0].outcome, Ok(SlotOutcome::Rotated { .. })),
        "no rotation: {:?}",
        r.slots[0].outcome
    );
    assert_eq!(key_of(&served(&e, "aws", &new).await), Some(k1.clone()));
    assert_eq!(key_of(&served(&e, "aws", &old).await), Some(k1.clone()));
    w.advance(HOUR / 2);
    ok(&e.cycle().await);
    assert_eq!(
        key_of(&served(&e, "aws", &old).await),
        Some(k1.clone()),
        "inside the grace period"
    );
    w.advance(HOUR);
    ok(&e.cycle().await);
    assert!(
        aws_deleted(&old).await,
        "the old secret is deleted after the grace period"
    );
    assert_eq!(key_of(&served(&e, "aws", &new).await), Some(k1.clone()));
    ok(&e.cycle().await);
    assert!(w.sim.is_live(&k1), "the served key is never revoked");
    assert_eq!(w.minted_live(), minted, "nothing minted");
    assert_eq!(w.sim.deleted_keys(), deleted, "nothing revoked");
}
