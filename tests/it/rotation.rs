//! End-to-end rotation against the simulator and the real stores (DESIGN.md §4, §5).

use std::collections::BTreeSet;
use std::time::Duration;

use crate::e2e::{assert_i1, assert_i2, Stores, World};
use keyrotd::rotation::SlotOutcome;
use keyrotd::sim::{RejectVerification, Scenario};
use secrecy::ExposeSecret;

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86400);

fn scenario(seed: u64) -> Scenario {
    Scenario::new(seed)
        .projects(6)
        .service_accounts_per_project(2)
        .keys_per_service_account(1)
        .user_keys_per_project(1)
        .stale_fraction(0.5)
}

fn rotated(report: &keyrotd::rotation::CycleReport) -> usize {
    report
        .slots
        .iter()
        .filter(|s| matches!(s.outcome, Ok(SlotOutcome::Rotated { .. })))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_keys_rotate_into_every_store_and_retire_after_grace() {
    let w = World::new(scenario(11), Stores::All, "").await;
    let engine = w.engine(false).await;
    let stale = w.stale_prod_sa_keys();
    assert!(
        !stale.is_empty(),
        "scenario has stale prod service-account keys"
    );

    let report = engine.cycle().await;
    assert!(!report.any_failed(), "first cycle: {:?}", report.slots);
    let prod_slots = report.slots.len();
    assert!(prod_slots >= 2, "prod slots: {prod_slots}");
    assert_eq!(
        rotated(&report),
        prod_slots,
        "every slot bootstrapped: {:?}",
        report.slots.iter().map(|s| &s.outcome).collect::<Vec<_>>()
    );

    let states = w.store_states(&engine).await;
    assert_eq!(states.len(), prod_slots * 3, "three stores per slot");
    // Every store of a slot holds the same, new, live key.
    for ((store, path), st) in &states {
        let cur = st
            .current
            .as_ref()
            .unwrap_or_else(|| panic!("{store} {path} has a key"));
        assert!(cur.key_id.starts_with("key_"));
        let minted = w.sim.key(&cur.key_id).expect("key exists");
        assert!(
            minted.name.starts_with("keyrotd-"),
            "{store} {path} holds a minted key"
        );
        assert_eq!(cur.managed_by, "keyrotd");
        assert!(st.pending.is_none() && st.book.intent.is_none());
        let same: BTreeSet<&str> = states
            .iter()
            .filter(|((_, p), _)| p == path)
            .map(|(_, s)| s.current.as_ref().unwrap().key_id.as_str())
            .collect();
        assert_eq!(same.len(), 1, "stores of {path} agree");
    }
    assert_i1(&w, &states);
    assert_i2(&w, &states);
    // Inside the grace period the old stale keys are still live.
    for k in &stale {
        assert!(
            w.sim.is_live(k),
            "stale key {k} revoked before the grace period"
        );
    }

    // Right after: nothing to do, nothing minted.
    let minted_before = w.minted_live();
    let again = engine.cycle().await;
    assert!(!again.any_failed());
    assert_eq!(rotated(&again), 0);
    assert_eq!(w.minted_live(), minted_before, "a second run mints nothing");

    // After the grace period the stale keys of managed accounts are revoked; fresh
    // pre-existing keys stay; every store still serves a live key.
    w.advance(2 * HOUR);
    let after = engine.cycle().await;
    assert!(!after.any_failed(), "{:?}", after.slots);
    for k in &stale {
        assert!(!w.sim.is_live(k), "stale key {k} still live after grace");
    }
    let fresh_prod_sa: Vec<_> = w
        .truth
        .keys
        .iter()
        .filter(|k| k.project_name.starts_with("prod-") && !k.stale)
        .filter(|k| k.owner_type == keyrotd::openai::models::OwnerType::ServiceAccount)
        .collect();
    for k in fresh_prod_sa {
        assert!(
            w.sim.is_live(&k.key_id),
            "fresh key {} was revoked",
            k.key_id
        );
    }
    // Keys outside the rule (staging, dev, user keys) are never touched.
    for k in w
        .truth
        .keys
        .iter()
        .filter(|k| !k.project_name.starts_with("prod-"))
    {
        assert!(
            w.sim.is_live(&k.key_id),
            "unmanaged key {} was revoked",
            k.key_id
        );
    }
    let states = w.store_states(&engine).await;
    assert_i1(&w, &states);
    assert_i2(&w, &states);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_current_key_is_replaced_and_previous_retired_after_grace() {
    let w = World::new(scenario(12), Stores::File, "").await;
    let engine = w.engine(false).await;
    assert!(!engine.cycle().await.any_failed());
    let first = w.store_states(&engine).await;

    // The keys keyrotd minted age past max_age: a regular rotation.
    w.advance(91 * DAY);
    let report = engine.cycle().await;
    assert!(!report.any_failed(), "{:?}", report.slots);
    assert_eq!(rotated(&report), first.len());
    let second = w.store_states(&engine).await;
    for (k, st) in &second {
        let old = first[k].current.as_ref().unwrap();
        let cur = st.current.as_ref().unwrap();
        assert_ne!(cur.key_id, old.key_id);
        assert_ne!(cur.api_key.expose_secret(), old.api_key.expose_secret());
        assert_eq!(
            st.book.previous_key_id.as_deref(),
            Some(old.key_id.as_str())
        );
        assert!(st.book.promoted_at.is_some());
        assert!(
            w.sim.is_live(&old.key_id),
            "previous key alive during grace"
        );
    }
    assert_i1(&w, &second);

    w.advance(HOUR - Duration::from_secs(60));
    assert!(!engine.cycle().await.any_failed());
    for k in second.keys() {
        assert!(
            w.sim.is_live(&first[k].current.as_ref().unwrap().key_id),
            "revoked inside grace"
        );
    }
    w.advance(2 * Duration::from_secs(60));
    assert!(!engine.cycle().await.any_failed());
    let third = w.store_states(&engine).await;
    for (k, st) in &third {
        assert!(
            !w.sim.is_live(&first[k].current.as_ref().unwrap().key_id),
            "previous key revoked after grace"
        );
        assert_eq!(st.book.previous_key_id, None, "retirement recorded");
        assert_eq!(
            st.current.as_ref().unwrap().key_id,
            second[k].current.as_ref().unwrap().key_id
        );
    }
    assert_i1(&w, &third);
    assert_i2(&w, &third);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejected_verification_promotes_nothing_and_revokes_the_new_key() {
    let w = World::new(scenario(13), Stores::File, "").await;
    let engine = w.engine(false).await;
    assert!(!engine.cycle().await.any_failed());
    let before = w.store_states(&engine).await;
    w.advance(91 * DAY);
    let minted_before = w.minted_live();
    w.sim
        .update_faults(|f| f.reject_verification = RejectVerification::Minted);

    let report = engine.cycle().await;
    assert!(report.any_failed());
    assert_eq!(report.failed_slots(), before.len());
    for s in &report.slots {
        let err = s.outcome.as_ref().unwrap_err();
        assert!(err.contains("failed verification"), "{err}");
    }
    let after = w.store_states(&engine).await;
    for (k, st) in &after {
        assert_eq!(
            st.current.as_ref().unwrap().key_id,
            before[k].current.as_ref().unwrap().key_id,
            "nothing promoted"
        );
        assert!(
            st.pending.is_none() && st.book.intent.is_none(),
            "rotation abandoned cleanly"
        );
    }
    assert_eq!(
        w.minted_live(),
        minted_before,
        "every key minted this cycle was revoked"
    );
    w.sim
        .update_faults(|f| f.reject_verification = RejectVerification::None);
    assert_i1(&w, &after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_store_stops_only_its_slots() {
    let mut w = World::new(scenario(14), Stores::File, "").await;
    let blocked = w.dir.path().join("blocked");
    std::fs::write(&blocked, b"not a directory").unwrap();
    w.toml.push_str(&format!(
        r#"
[stores.flaky]
type = "file"
dir = "{}"
[[rotate]]
name = "staging"
project = "staging-*"
service_account = "*"
stores = ["flaky"]
path = "{}/{{project_name}}/{{service_account_name}}"
"#,
        blocked.display(),
        w.prefix
    ));
    let engine = w.engine(false).await;
    let report = engine.cycle().await;
    assert!(report.any_failed());
    let (ok, failed): (Vec<_>, Vec<_>) = report.slots.iter().partition(|s| s.outcome.is_ok());
    assert!(!ok.is_empty() && !failed.is_empty());
    assert!(ok.iter().all(|s| s.slot.rule_name == "prod"));
    assert!(failed.iter().all(|s| s.slot.rule_name == "staging"));
    // Nothing was minted for the failing slots.
    let staging: BTreeSet<String> = failed.iter().map(|s| s.slot.project_id.clone()).collect();
    for k in w.sim.all_keys() {
        if staging.contains(&k.project_id) {
            assert!(
                !k.name.starts_with("keyrotd-"),
                "minted {} for a slot whose store is down",
                k.id
            );
            assert!(k.deleted_at.is_none(), "revoked {} in a failing slot", k.id);
        }
    }
    // The store comes back: the next cycle completes those slots.
    std::fs::remove_file(&blocked).unwrap();
    let next = engine.cycle().await;
    assert!(!next.any_failed(), "{:?}", next.slots);
    assert_eq!(rotated(&next), failed.len());
    let states = w.store_states(&engine).await;
    assert_i1(&w, &states);
    assert_i2(&w, &states);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dry_run_changes_nothing_anywhere() {
    let w = World::new(scenario(15), Stores::File, "user_keys = \"revoke\"").await;
    let engine = w.engine(false).await;
    assert!(!engine.cycle().await.any_failed());
    // Make everything due: rotations, retirements, user-key revocations.
    w.advance(200 * DAY);
    let snapshot = |w: &World| {
        let keys: Vec<_> = w
            .sim
            .all_keys()
            .into_iter()
            .map(|k| (k.id, k.deleted_at, k.name))
            .collect();
        let mut files = Vec::new();
        for e in walk(w.dir.path()) {
            files.push((e.clone(), std::fs::read(&e).unwrap()));
        }
        (keys, files)
    };
    let before = snapshot(&w);
    let dry = w.engine(true).await;
    let report = dry.cycle().await;
    assert!(!report.any_failed(), "{:?}", report.slots);
    assert!(
        !report.planned.is_empty(),
        "the dry run reports what it would do"
    );
    assert!(report.slots.is_empty(), "a dry run runs no slot");
    assert_eq!(
        snapshot(&w),
        before,
        "dry run changed the simulator or the stores"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_key_deletion_moves_the_slot_to_a_new_service_account() {
    let w = World::new(
        Scenario::new(16)
            .projects(3)
            .service_accounts_per_project(1)
            .user_keys_per_project(0)
            .stale_fraction(0.0),
        Stores::File,
        "",
    )
    .await;
    w.sim.update_faults(|f| f.refuse_sa_key_delete = true);
    let engine = w.engine(false).await;
    assert!(!engine.cycle().await.any_failed());
    let boot = w.store_states(&engine).await;
    let old_accounts: BTreeSet<String> = boot
        .values()
        .map(|s| s.current.as_ref().unwrap().service_account_id.clone())
        .collect();

    // Everything ages; the rotation mints on the same account, and the retirement of
    // the previous key is refused, so the slot moves to a new account.
    for _ in 0..2 {
        w.advance(91 * DAY);
        let r = engine.cycle().await;
        assert!(!r.any_failed(), "{:?}", r.slots);
        let states = w.store_states(&engine).await;
        assert_i1(&w, &states);
        assert_i2(&w, &states);
        w.advance(2 * HOUR);
        let r = engine.cycle().await;
        assert!(!r.any_failed(), "{:?}", r.slots);
    }
    w.advance(2 * HOUR);
    let r = engine.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.slots);
    let states = w.store_states(&engine).await;
    assert_i1(&w, &states);
    assert_i2(&w, &states);
    for st in states.values() {
        let cur = st.current.as_ref().unwrap();
        assert!(
            !old_accounts.contains(&cur.service_account_id),
            "slot moved to a new account"
        );
    }
    // The old accounts are gone with every key they had.
    for k in w.sim.all_keys() {
        if let keyrotd::sim::OwnerRef::ServiceAccount(sa) = &k.owner {
            if old_accounts.contains(sa) {
                assert!(
                    k.deleted_at.is_some(),
                    "key {} of a retired account is live",
                    k.id
                );
            }
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
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
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_moved_slot_keeps_its_old_account_while_it_has_fresh_foreign_keys() {
    let w = World::new(
        Scenario::new(17)
            .projects(1)
            .service_accounts_per_project(1)
            .user_keys_per_project(0)
            .stale_fraction(0.0),
        Stores::File,
        "",
    )
    .await;
    w.sim.update_faults(|f| f.refuse_sa_key_delete = true);
    let engine = w.engine(false).await;
    assert!(!engine.cycle().await.any_failed());
    w.advance(91 * DAY);
    assert!(!engine.cycle().await.any_failed());
    w.advance(2 * HOUR);
    // The retirement is refused: the slot moves to a new account.
    assert!(!engine.cycle().await.any_failed());
    let states = w.store_states(&engine).await;
    let st = states.values().next().unwrap();
    let old_sa = st.book.previous_service_account_id.clone().expect("moved");
    assert_ne!(st.current.as_ref().unwrap().service_account_id, old_sa);
    let project = st.current.as_ref().unwrap().project_id.clone();
    // Someone makes a fresh key on the old account: deleting the account would take it.
    let manual = w
        .sim
        .add_key(
            &project,
            keyrotd::sim::OwnerRef::ServiceAccount(old_sa.clone()),
            "manual",
        )
        .expect("key added");
    w.advance(2 * HOUR);
    assert!(!engine.cycle().await.any_failed());
    assert!(
        w.sim.is_live(&manual.id),
        "I3: a fresh key keyrotd did not mint is never revoked"
    );
    // Once it is stale too, the old account goes, whole.
    w.advance(91 * DAY);
    let r = engine.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.slots);
    assert!(!w.sim.is_live(&manual.id));
    let states = w.store_states(&engine).await;
    assert_i1(&w, &states);
    assert_i2(&w, &states);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_service_account_keys_carry_the_policy_expiry() {
    let mut w = World::new(
        Scenario::new(17)
            .projects(2)
            .service_accounts_per_project(1)
            .user_keys_per_project(0)
            .stale_fraction(1.0),
        Stores::File,
        "key_expiry = \"30d\"",
    )
    .await;
    w.toml.push_str("strategy = \"new_service_account\"\n");
    let engine = w.engine(false).await;
    let report = engine.cycle().await;
    assert!(!report.any_failed(), "{:?}", report.slots);
    assert!(rotated(&report) > 0, "{:?}", report.slots);

    let creations = w.sim.requests_to(keyrotd::sim::Route::CreateServiceAccount);
    assert_eq!(creations.len(), rotated(&report), "{creations:#?}");
    for r in &creations {
        assert_eq!(r.status, 200);
        let body = r.body.as_ref().expect("creation body logged");
        assert_eq!(body["expires_in_seconds"], 2_592_000, "{body}");
    }
    assert!(
        w.sim
            .requests_to(keyrotd::sim::Route::CreateServiceAccountKey)
            .is_empty(),
        "new_service_account mints through the account's creation only"
    );
    let states = w.store_states(&engine).await;
    assert!(!states.is_empty());
    for ((store, path), st) in &states {
        let cur = st
            .current
            .as_ref()
            .unwrap_or_else(|| panic!("{store} {path}"));
        let key = w.sim.key(&cur.key_id).expect("minted key exists");
        assert_eq!(
            key.expires_at,
            Some(key.created_at + 2_592_000),
            "{store} {path}: {key:?}"
        );
    }
    assert_i1(&w, &states);
}
