//! End-to-end: the admin key kept in a store (OpenBao, file) and its self-rotation,
//! against the simulator.

use crate::e2e;

use std::collections::BTreeSet;
use std::time::Duration;

use crate::e2e::{captured_logs, Stores, World, ADMIN_KEY};
use keyrotd::config::{AdminKeySource, Config};
use keyrotd::openai::models::CreateAdminKeyRequest;
use keyrotd::rotation::admin_key::{AdminKeyReport, ADMIN_KEY_NAME_PREFIX, RECORD_OWNER_ID};
use keyrotd::rotation::{CycleReport, Engine};
use keyrotd::sim::{FailNext, LostResponse, RejectVerification, Route, Scenario, SimAdminKey};
use keyrotd::store::{Intent, SlotState, Transition};
use secrecy::{ExposeSecret, SecretString};

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86400);

fn scenario(seed: u64) -> Scenario {
    Scenario::new(seed)
        .projects(3)
        .service_accounts_per_project(1)
        .keys_per_service_account(1)
        .user_keys_per_project(0)
        .stale_fraction(0.5)
}

/// A world whose admin key is kept in `admin_store` ("file" or "vault") and rotated
/// after `max_age`; project keys go to the file store as usual. The seed is the
/// harness's `admin_key_env`.
async fn world(seed: u64, admin_store: &str, max_age: &str) -> (World, String) {
    let mut w = World::new(scenario(seed), Stores::File, "").await;
    let path = format!("{}/admin-key", w.prefix);
    let openai = format!(
        "max_retries = 3\nadmin_key_store = \"{admin_store}\"\nadmin_key_path = \"{path}\"\n\
         rotate_admin_key = true\nadmin_key_max_age = \"{max_age}\"\n"
    );
    w.toml = w.toml.replacen("max_retries = 3\n", &openai, 1);
    if admin_store == "vault" {
        w.toml.push_str(&format!(
            "\n[stores.vault]\ntype = \"vault\"\naddress = \"{}\"\n\
             auth = {{ method = \"token\", token_env = \"KEYROTD_TEST_VAULT_TOKEN\" }}\n",
            e2e::env("KEYROTD_TEST_VAULT_ADDR")
        ));
        let _ = e2e::env("KEYROTD_TEST_VAULT_TOKEN");
    }
    (w, path)
}

async fn admin_state(engine: &Engine, store: &str, path: &str) -> SlotState {
    engine.stores[store]
        .read(path)
        .await
        .expect("admin key store readable")
}

fn admin_report(r: &CycleReport) -> AdminKeyReport {
    match &r.admin_key {
        Some(a) => a.clone(),
        None => panic!("admin key maintenance failed: {:?}", r.other_failures),
    }
}

/// The project-key work of a cycle went through.
fn assert_slots_ok(r: &CycleReport) {
    assert!(r.scan_error.is_none(), "scan failed: {:?}", r.scan_error);
    assert_eq!(r.failed_slots(), 0, "{:?}", r.slots);
}

fn admin_key(w: &World, id: &str) -> SimAdminKey {
    w.sim
        .admin_keys()
        .into_iter()
        .find(|k| k.id == id)
        .unwrap_or_else(|| panic!("admin key {id} unknown to the simulator"))
}

fn initial_admin_key(w: &World) -> SimAdminKey {
    let keys = w.sim.admin_keys();
    assert_eq!(keys[0].value, ADMIN_KEY);
    keys[0].clone()
}

fn uses(engine: &Engine, value: &str) -> bool {
    engine
        .client
        .uses_admin_key(&SecretString::from(value.to_string()))
}

/// I2 for admin keys: every live `keyrotd-admin-*` key is the record's current,
/// pending or previous key.
fn assert_admin_i2(w: &World, st: &SlotState) {
    let referenced: BTreeSet<&str> = st.referenced_key_ids().collect();
    for k in w.sim.admin_keys() {
        if !k.deleted && k.name.starts_with(ADMIN_KEY_NAME_PREFIX) {
            assert!(
                referenced.contains(k.id.as_str()),
                "admin key {} ({}) is live but the store does not reference it",
                k.id,
                k.name
            );
        }
    }
}

/// Seeding, rotation after max age, pick-up by another replica, retirement after grace.
async fn rotation_flow(admin_store: &str, seed: u64) {
    let (w, path) = world(seed, admin_store, "30d").await;
    let initial = initial_admin_key(&w);

    // A dry run changes nothing, but says it would seed the store.
    let dry = w.engine(true).await;
    let r = dry.cycle().await;
    assert!(!admin_report(&r).planned.is_empty());
    assert!(admin_state(&dry, admin_store, &path)
        .await
        .current
        .is_none());

    // Bootstrap: the store is empty, so the seed (admin_key_env) is stored, with the
    // id the organization's listing gives it.
    let a = w.engine(false).await;
    let r = a.cycle().await;
    assert_slots_ok(&r);
    assert_eq!(
        admin_report(&r).seeded.as_deref(),
        Some(initial.id.as_str())
    );
    let st = admin_state(&a, admin_store, &path).await;
    let cur = st.current.clone().expect("seeded");
    assert_eq!(cur.key_id, initial.id);
    assert_eq!(cur.api_key.expose_secret(), ADMIN_KEY);
    assert_eq!(cur.created_at.timestamp(), initial.created_at);
    assert_eq!(cur.managed_by, "keyrotd");

    // Fresh: nothing to do.
    let r = a.cycle().await;
    assert_slots_ok(&r);
    assert_eq!(admin_report(&r), AdminKeyReport::default());

    // A second replica, started now, reads the key from the store.
    let b = w.engine(false).await;
    assert!(uses(&b, ADMIN_KEY));

    // Older than admin_key_max_age: replica A rotates.
    w.advance(31 * DAY);
    let r = a.cycle().await;
    assert_slots_ok(&r);
    assert!(r.other_failures.is_empty(), "{:?}", r.other_failures);
    let new_id = admin_report(&r).rotated.expect("admin key rotated");
    let new = admin_key(&w, &new_id);
    assert!(new.name.starts_with(ADMIN_KEY_NAME_PREFIX), "{}", new.name);
    let st = admin_state(&a, admin_store, &path).await;
    let cur = st.current.clone().expect("current");
    assert_eq!(cur.key_id, new_id);
    assert_eq!(cur.api_key.expose_secret(), new.value);
    assert_eq!(
        st.book.previous_key_id.as_deref(),
        Some(initial.id.as_str())
    );
    assert!(st.pending.is_none() && st.book.intent.is_none());
    assert!(w.sim.admin_key_works(&new.value), "the new key works");
    assert!(uses(&a, &new.value), "replica A switched to the new key");
    assert!(
        w.sim.admin_key_works(ADMIN_KEY),
        "the old key still works within the grace period"
    );
    assert_admin_i2(&w, &st);

    // Replica B picks the rotation up at the start of its next cycle.
    assert!(uses(&b, ADMIN_KEY));
    let r = b.cycle().await;
    assert_slots_ok(&r);
    let rep = admin_report(&r);
    assert!(rep.reloaded, "{rep:?}");
    assert!(rep.rotated.is_none() && rep.retired.is_none(), "{rep:?}");
    assert!(uses(&b, &new.value));

    // A restarted process takes the stored key, not the (now outdated) seed.
    let c = w.engine(false).await;
    assert!(uses(&c, &new.value));

    // Within grace nothing is deleted; after it, the old key goes.
    w.advance(HOUR / 2);
    let r = a.cycle().await;
    assert!(admin_report(&r).retired.is_none());
    assert!(w.sim.admin_key_works(ADMIN_KEY));
    w.advance(HOUR);
    let r = a.cycle().await;
    assert_slots_ok(&r);
    assert_eq!(
        admin_report(&r).retired.as_deref(),
        Some(initial.id.as_str())
    );
    assert!(!w.sim.admin_key_works(ADMIN_KEY), "old admin key deleted");
    assert!(w.sim.admin_key_works(&new.value));
    let st = admin_state(&a, admin_store, &path).await;
    assert!(st.book.previous_key_id.is_none());
    assert_admin_i2(&w, &st);

    // Everyone keeps working on the new key.
    for e in [&a, &b, &c] {
        let r = e.cycle().await;
        assert!(!r.any_failed(), "{:?} {:?}", r.other_failures, r.slots);
        assert_eq!(admin_report(&r).rotated, None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_key_in_openbao_rotates_after_max_age_and_old_key_retires_after_grace() {
    rotation_flow("vault", 31).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_key_in_file_store_rotates_after_max_age_and_old_key_retires_after_grace() {
    rotation_flow("file", 32).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_create_response_keeps_the_old_key_and_the_orphan_is_deleted() {
    let (w, path) = world(33, "file", "30d").await;
    let e = w.engine(false).await;
    assert!(admin_report(&e.cycle().await).seeded.is_some());
    let initial = initial_admin_key(&w);
    w.advance(31 * DAY);

    // The create happens but its response is lost: the same cycle finds the key by the
    // intent's name and deletes it.
    w.sim.update_faults(|f| {
        f.lose_create_responses = 1;
        f.lost_response = LostResponse::Dropped;
    });
    let r = e.cycle().await;
    assert_slots_ok(&r);
    assert_eq!(r.other_failures.len(), 1, "{:?}", r.other_failures);
    let orphan = w.sim.admin_keys().pop().unwrap();
    assert!(orphan.name.starts_with(ADMIN_KEY_NAME_PREFIX));
    assert!(orphan.deleted, "the unrecorded admin key was deleted");
    let st = admin_state(&e, "file", &path).await;
    assert_eq!(st.current.as_ref().unwrap().key_id, initial.id);
    assert!(st.book.intent.is_none() && st.pending.is_none());
    assert!(uses(&e, ADMIN_KEY) && w.sim.admin_key_works(ADMIN_KEY));

    // Lost again, and the cleanup's listing fails too: the intent stays, the daemon
    // still holds the old (working) key, the orphan is live for now.
    w.sim.update_faults(|f| {
        f.lose_create_responses = 1;
        f.lost_response = LostResponse::ServerError;
        f.fail_next.push(FailNext {
            route: Some(Route::ListAdminKeys),
            status: 400,
            remaining: 1,
        });
    });
    let r = e.cycle().await;
    assert_slots_ok(&r);
    assert_eq!(r.other_failures.len(), 1, "{:?}", r.other_failures);
    let orphan = w.sim.admin_keys().pop().unwrap();
    assert!(!orphan.deleted && orphan.name.starts_with(ADMIN_KEY_NAME_PREFIX));
    let st = admin_state(&e, "file", &path).await;
    assert_eq!(st.current.as_ref().unwrap().key_id, initial.id);
    assert_eq!(
        st.book.intent.as_ref().map(|i| i.key_name.as_str()),
        Some(orphan.name.as_str())
    );
    assert!(uses(&e, ADMIN_KEY) && w.sim.admin_key_works(ADMIN_KEY));

    // Next cycle: the orphan is found by the intent's name and deleted; the rotation
    // then goes through.
    let r = e.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.other_failures);
    let rep = admin_report(&r);
    assert_eq!(rep.cleaned_up, vec![orphan.id.clone()]);
    assert!(admin_key(&w, &orphan.id).deleted);
    let new_id = rep.rotated.expect("rotated after the cleanup");
    assert_ne!(new_id, orphan.id);
    let st = admin_state(&e, "file", &path).await;
    assert_eq!(st.current.as_ref().unwrap().key_id, new_id);
    assert_admin_i2(&w, &st);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn process_killed_between_create_and_store_leaves_a_working_key_and_a_found_orphan() {
    let (w, path) = world(34, "vault", "30d").await;
    let dead = w.engine(false).await;
    assert!(admin_report(&dead.cycle().await).seeded.is_some());
    let initial = initial_admin_key(&w);
    w.advance(31 * DAY);

    // What a process killed right after the create leaves: its intent in the store and
    // a live admin key of that name whose value nobody knows.
    let st = admin_state(&dead, "vault", &path).await;
    let now = w.clock_now();
    let intent = Intent {
        key_name: format!(
            "{ADMIN_KEY_NAME_PREFIX}{}-dead",
            now.format("%Y%m%dT%H%M%SZ")
        ),
        owner: "dead-host:1:00000000".into(),
        lease_until: now + chrono::Duration::minutes(10),
        attempt: 1,
        service_account_id: RECORD_OWNER_ID.into(),
        revoke_old: None,
    };
    dead.stores["vault"]
        .apply(&path, &st.version, &Transition::Intent(intent.clone()))
        .await
        .unwrap();
    let orphan = dead
        .client
        .create_admin_api_key(&CreateAdminKeyRequest {
            name: intent.key_name.clone(),
            expires_in_seconds: None,
        })
        .await
        .unwrap();
    drop(dead);

    // A new process: it holds the stored (old, working) key; the dead process's lease
    // still protects the record.
    let e = w.engine(false).await;
    assert!(uses(&e, ADMIN_KEY));
    let r = e.cycle().await;
    assert_slots_ok(&r);
    assert!(admin_report(&r).busy);
    assert!(!admin_key(&w, &orphan.id).deleted);
    assert!(w.sim.admin_key_works(ADMIN_KEY));

    // Once the lease is over, the next cycle deletes the orphan by name, then rotates.
    w.advance(Duration::from_secs(11 * 60));
    let r = e.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.other_failures);
    let rep = admin_report(&r);
    assert_eq!(rep.cleaned_up, vec![orphan.id.clone()]);
    assert!(admin_key(&w, &orphan.id).deleted);
    let new_id = rep.rotated.expect("rotated");
    let st = admin_state(&e, "vault", &path).await;
    assert_eq!(st.current.as_ref().unwrap().key_id, new_id);
    assert_eq!(
        st.book.previous_key_id.as_deref(),
        Some(initial.id.as_str())
    );
    assert!(
        w.sim.admin_key_works(ADMIN_KEY),
        "old key kept until grace is over"
    );
    assert_admin_i2(&w, &st);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_admin_key_failing_verification_is_deleted_and_never_promoted() {
    let logs = captured_logs();
    let (w, path) = world(35, "file", "30d").await;
    let e = w.engine(false).await;
    assert!(admin_report(&e.cycle().await).seeded.is_some());
    let initial = initial_admin_key(&w);
    w.advance(31 * DAY);

    w.sim
        .update_faults(|f| f.reject_admin_keys = RejectVerification::Minted);
    let r = e.cycle().await;
    assert_slots_ok(&r);
    assert_eq!(r.other_failures.len(), 1, "{:?}", r.other_failures);
    assert!(
        r.other_failures[0].contains("failed verification"),
        "{:?}",
        r.other_failures
    );
    let rejected = w.sim.admin_keys().pop().unwrap();
    assert!(rejected.name.starts_with(ADMIN_KEY_NAME_PREFIX));
    assert!(rejected.deleted, "the unverified key was deleted");
    let st = admin_state(&e, "file", &path).await;
    assert_eq!(
        st.current.as_ref().unwrap().key_id,
        initial.id,
        "old key untouched"
    );
    assert!(st.pending.is_none() && st.book.intent.is_none());
    assert!(st.book.previous_key_id.is_none());
    assert!(uses(&e, ADMIN_KEY) && w.sim.admin_key_works(ADMIN_KEY));
    let failed_report = format!("{r:?}");

    // Without the fault the next cycle rotates.
    w.sim
        .update_faults(|f| f.reject_admin_keys = RejectVerification::None);
    let r = e.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.other_failures);
    let new_id = admin_report(&r).rotated.expect("rotated");
    let st = admin_state(&e, "file", &path).await;
    assert_eq!(st.current.as_ref().unwrap().key_id, new_id);

    // I4: no admin key value in logs, reports, errors or Debug output.
    let logs = match logs {
        Some(l) => l.text(),
        None => {
            eprintln!("logs not captured (another subscriber is installed); checking the rest");
            String::new()
        }
    };
    if captured_logs().is_some() {
        assert!(logs.contains("admin_key.verify_failed"), "logs captured");
        assert!(logs.contains("admin_key.promoted"), "logs captured");
    }
    let outputs = [
        ("logs", logs),
        ("failed report", failed_report),
        ("report", format!("{r:?}")),
        ("engine", format!("{e:?} {:?}", e.client)),
        ("store state", format!("{st:?}")),
    ];
    for k in w.sim.admin_keys() {
        for (what, text) in &outputs {
            assert!(
                !text.contains(&k.value),
                "{what} contain the value of admin key {}",
                k.id
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_without_record_and_without_seed_is_refused_at_start() {
    let (mut w, _path) = world(36, "file", "30d").await;
    w.toml = w
        .toml
        .replace(&format!("admin_key_env = \"{}\"\n", e2e::ADMIN_KEY_ENV), "");
    let err = keyrotd::app::build_engine(&w.config(), false)
        .await
        .expect_err("nothing to start with");
    assert!(err.to_string().contains("holds no admin key"), "{err}");
}

const BASE: &str = r#"
[openai]
admin_key_env = "KEYROTD_ADMIN_KEY_TEST_UNUSED"
[stores.local]
type = "file"
dir = "/tmp/keyrotd-admin-key-test"
[[rotate]]
name = "all"
project = "*"
stores = ["local"]
path = "openai/{project_name}/{service_account_name}"
"#;

fn with_openai(lines: &str) -> Result<Config, String> {
    Config::from_toml(&BASE.replace("[openai]\n", &format!("[openai]\n{lines}\n")))
        .map_err(|e| e.to_string())
}

#[test]
fn admin_key_config_is_validated() {
    let e = with_openai("admin_key_store = \"vualt\"").unwrap_err();
    assert!(
        e.contains("openai.admin_key_store") && e.contains("vualt"),
        "{e}"
    );
    let e = with_openai("rotate_admin_key = true").unwrap_err();
    assert!(e.contains("openai.rotate_admin_key"), "{e}");
    let e = with_openai("admin_key_path = \"x/y\"").unwrap_err();
    assert!(e.contains("openai.admin_key_path"), "{e}");
    let e = with_openai("admin_key_store = \"local\"\nadmin_key_max_age = \"30d\"").unwrap_err();
    assert!(e.contains("openai.admin_key_max_age"), "{e}");
    let e = with_openai("admin_key_store = \"local\"\nadmin_key_path = \"../x\"").unwrap_err();
    assert!(e.contains("openai.admin_key_path"), "{e}");
    let e = with_openai("admin_key_file = \"/run/key\"").unwrap_err();
    assert!(
        e.contains("only one of admin_key_env and admin_key_file"),
        "{e}"
    );

    // Store with the env seed; rotation defaults to policy.max_age.
    let c = with_openai(
        "admin_key_store = \"local\"\nadmin_key_path = \"keyrotd/admin\"\nrotate_admin_key = true",
    )
    .unwrap();
    let s = c.admin_key_store().unwrap();
    assert_eq!(
        (s.store.as_str(), s.path.as_str()),
        ("local", "keyrotd/admin")
    );
    assert!(s.rotate);
    assert_eq!(s.max_age, c.policy.max_age);
    assert!(matches!(
        c.admin_key_source().unwrap(),
        AdminKeySource::Store { seed: Some(_), .. }
    ));

    // Store alone: valid, read when connecting.
    let text = BASE.replace(
        "admin_key_env = \"KEYROTD_ADMIN_KEY_TEST_UNUSED\"",
        "admin_key_store = \"local\"",
    );
    let c = Config::from_toml(&text).unwrap();
    assert_eq!(
        c.admin_key_source().unwrap(),
        AdminKeySource::Store {
            store: "local".into(),
            path: keyrotd::config::DEFAULT_ADMIN_KEY_PATH.into(),
            seed: None
        }
    );
    c.check_admin_key().unwrap();
    assert!(c.admin_key().is_err());
    assert!(c.admin_key_seed().unwrap().is_none());

    // The admin key's record cannot be a rule's path in the same store.
    let text = BASE
        .replace(
            "admin_key_env = \"KEYROTD_ADMIN_KEY_TEST_UNUSED\"",
            "admin_key_store = \"local\"\nadmin_key_path = \"fixed/path\"",
        )
        .replace(
            "path = \"openai/{project_name}/{service_account_name}\"",
            "path = \"fixed/path\"",
        );
    let e = Config::from_toml(&text).unwrap_err().to_string();
    assert!(e.contains("rotate[0].path"), "{e}");

    // Shipped example still loads with the new keys commented out.
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/keyrotd.example.toml");
    let text = std::fs::read_to_string(example).unwrap();
    assert!(
        text.contains("# admin_key_store"),
        "example documents admin_key_store"
    );
}

/// The real thing: `keyrotd once` aborted by a failpoint right after the create.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn binary_killed_after_creating_the_admin_key() {
    let (w, path) = world(37, "file", "1s").await;
    let cfg_path = w.dir.path().join("keyrotd.toml");
    std::fs::write(&cfg_path, &w.toml).unwrap();
    let run = |failpoints: Option<&str>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_keyrotd"));
        c.args(["once", "--config"]).arg(&cfg_path);
        c.env_remove("FAILPOINTS").env_remove("RUST_LOG");
        if let Some(fp) = failpoints {
            c.env("FAILPOINTS", fp);
        }
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    };
    // Seeds the store (the initial key is not a second old yet on this clock).
    let status = tokio::task::spawn_blocking({
        let mut c = run(None);
        move || c.status().unwrap()
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = tokio::task::spawn_blocking({
        let mut c = run(Some("admin_key_after_create=return"));
        move || c.status().unwrap()
    })
    .await
    .unwrap();
    assert!(!status.success(), "the failpoint aborts the process");

    let orphan = w.sim.admin_keys().pop().unwrap();
    assert!(!orphan.deleted && orphan.name.starts_with(ADMIN_KEY_NAME_PREFIX));
    // The tests' clock starts when the world was made; move past the dead lease.
    w.advance(Duration::from_secs(15 * 60));
    let e = w.engine(false).await;
    assert!(uses(&e, ADMIN_KEY), "still on the stored old key");
    let st = admin_state(&e, "file", &path).await;
    assert_eq!(
        st.book.intent.as_ref().map(|i| i.key_name.as_str()),
        Some(orphan.name.as_str())
    );
    let r = e.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.other_failures);
    let rep = admin_report(&r);
    assert_eq!(rep.cleaned_up, vec![orphan.id.clone()]);
    assert!(admin_key(&w, &orphan.id).deleted);
    let st = admin_state(&e, "file", &path).await;
    assert_admin_i2(&w, &st);
}
