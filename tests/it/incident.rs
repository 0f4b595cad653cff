//! Incident response through the binary, against the simulator and the real stores:
//! `keyrotd rotate` (selectors, `--revoke-old now`, exit codes), `keyrotd revoke`
//! (refuses a served key, `--rotate-first`), a served key OpenAI disabled replaced
//! within one cycle, and `rotate` racing a cycle on the same slots.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::harness::*;
use keyrotd::sim::OwnerRef;
use StoreKind::{Aws, File, Vault};

const DAY_SECS: i64 = 86400;
const DAY: Duration = Duration::from_secs(86400);

/// `prod-payments` (backend, worker) and `prod-search` (backend), each account with one
/// stale key, plus a user key in `prod-payments`; bootstrapped by one `once`.
async fn bench(stores: &[StoreKind]) -> (Bench, String) {
    bench_of(Spec::new(stores)).await
}

async fn bench_of(spec: Spec) -> (Bench, String) {
    let mut b = Bench::new(spec).await;
    let now = b.sim.now();
    let mut user_key = String::new();
    for (project, sas) in [
        ("prod-payments", &["backend", "worker"][..]),
        ("prod-search", &["backend"][..]),
    ] {
        let p = b.sim.add_project(project);
        for sa in sas {
            b.add_legacy_account(&p, sa);
        }
        if project == "prod-payments" {
            let u = b.sim.add_user("Dana", "dana@example.com");
            user_key = b
                .sim
                .add_key_at(&p, OwnerRef::User(u), "laptop", now - 10 * DAY_SECS, None)
                .unwrap()
                .id;
        }
    }
    b.register_slots();
    let exit = b.run_once(None).await;
    assert_eq!(exit.code, Some(0), "bootstrap: {}", exit.tail());
    // No pause: a rotation asked for in the second of the bootstrap's promotion is
    // not taken as answered by it (`slot::promoted_after`).
    (b, user_key)
}

/// The key each (store, path) serves.
async fn served(b: &Bench) -> BTreeMap<(String, String), String> {
    b.snapshot()
        .await
        .expect("snapshot")
        .into_iter()
        .filter_map(|(k, st)| st.current.map(|c| (k, c.key_id)))
        .collect()
}

/// `keyrotd rotate` of prod-payments/backend with `--revoke-old revoke_old`, then `more`.
fn rotate_payments_backend<'a>(revoke_old: &'a str, more: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "rotate",
        "--project",
        "prod-payments",
        "--service-account",
        "backend",
        "--revoke-old",
        revoke_old,
    ];
    args.extend_from_slice(more);
    args
}

fn slot_of<'a>(b: &'a Bench, project: &str, sa: &str) -> &'a SlotRef {
    b.slots
        .iter()
        .find(|s| s.project_name == project && s.sa_name == sa)
        .unwrap_or_else(|| panic!("slot {project}/{sa}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotate_now_replaces_one_slot_everywhere_and_revokes_the_old_key() {
    let (b, _) = bench(&[File, Vault, Aws]).await;
    let slot = slot_of(&b, "prod-payments", "backend").clone();
    let before = served(&b).await;
    let old: BTreeSet<&String> = before
        .iter()
        .filter(|((_, p), _)| *p == slot.path)
        .map(|(_, k)| k)
        .collect();
    assert_eq!(old.len(), 1, "one key served everywhere: {before:?}");
    let old = (*old.iter().next().unwrap()).clone();

    // The dry run says what it would do and does nothing.
    let dry = b
        .run(
            &rotate_payments_backend("now", &["--dry-run", "--format", "json"]),
            None,
        )
        .await;
    assert_eq!(dry.code, Some(0), "{}", dry.tail());
    let doc: serde_json::Value = serde_json::from_str(&dry.stdout).expect("JSON actions");
    let actions: Vec<(&str, &str)> = doc["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["action"].as_str().unwrap(), a["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(actions, [("mint", "manual"), ("revoke", "manual")], "{doc}");
    assert_eq!(served(&b).await, before, "the dry run changed nothing");

    let exit = b
        .run(&rotate_payments_backend("now", &["--format", "json"]), None)
        .await;
    assert_eq!(exit.code, Some(0), "{}", exit.tail());
    let after = served(&b).await;
    let new: BTreeSet<&String> = after
        .iter()
        .filter(|((_, p), _)| *p == slot.path)
        .map(|(_, k)| k)
        .collect();
    assert_eq!(
        new.len(),
        1,
        "every store serves the same new key: {after:?}"
    );
    let new = (*new.iter().next().unwrap()).clone();
    assert_ne!(new, old);
    let value = b.sim.key(&new).expect("new key listed").value;
    assert!(b.sim.use_key(&value), "the new key authenticates");
    assert!(!b.sim.is_live(&old), "the old key is revoked at once");
    // Only that slot changed.
    for (k, id) in &before {
        if k.1 != slot.path {
            assert_eq!(after.get(k), Some(id), "{k:?} untouched");
        }
    }
    // Every line of the manual run says who asked.
    let minted = exit.events("key.minted");
    assert_eq!(minted.len(), 1, "{}", exit.tail());
    assert_eq!(minted[0]["trigger"], "manual");
    assert!(minted[0]["operator"]
        .as_str()
        .is_some_and(|o| !o.is_empty()));
    let revoked = exit.events("key.revoked");
    assert!(
        revoked.iter().any(|r| r["key_id"] == old.as_str()),
        "{}",
        exit.tail()
    );
    for s in b.secrets() {
        assert!(
            !exit.stdout.contains(&s) && !exit.stderr.contains(&s),
            "a secret in the output"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_selections_exit_2_and_a_served_key_is_not_revoked() {
    let (b, user_key) = bench(&[File]).await;
    let before = served(&b).await;

    let none = b.run(&["rotate"], None).await;
    assert_eq!(none.code, Some(2), "{}", none.tail());
    assert!(none.stderr.contains("--all"), "{}", none.stderr);

    let nope = b
        .run(&["rotate", "--project", "no-such-project"], None)
        .await;
    assert_eq!(nope.code, Some(2));
    assert!(
        nope.stderr
            .contains("--project \\\"no-such-project\\\" matches no slot")
            || nope
                .stderr
                .contains("--project \"no-such-project\" matches no slot"),
        "{}",
        nope.stderr
    );

    let user = b.run(&["rotate", "--key", &user_key], None).await;
    assert_eq!(user.code, Some(2));
    assert!(user.stderr.contains("keyrotd revoke"), "{}", user.stderr);

    let slot = slot_of(&b, "prod-search", "backend").clone();
    let served_key = before
        .iter()
        .find(|((_, p), _)| *p == slot.path)
        .map(|(_, k)| k.clone())
        .unwrap();
    let refused = b.run(&["revoke", &served_key], None).await;
    assert_eq!(refused.code, Some(1), "{}", refused.tail());
    assert!(
        refused.stderr.contains(&slot.project_id) && refused.stderr.contains("file"),
        "{}",
        refused.stderr
    );
    assert!(b.sim.is_live(&served_key));
    assert_eq!(served(&b).await, before, "nothing changed");

    // A user key is revoked at once; a served key with --rotate-first after the slot
    // serves a new one.
    let ok = b.run(&["revoke", &user_key], None).await;
    assert_eq!(ok.code, Some(0), "{}", ok.tail());
    assert!(!b.sim.is_live(&user_key));
    let first = b
        .run(&["revoke", "--rotate-first", &served_key], None)
        .await;
    assert_eq!(first.code, Some(0), "{}", first.tail());
    assert!(!b.sim.is_live(&served_key));
    let now = served(&b).await;
    let new = now.get(&("file".to_string(), slot.path.clone())).unwrap();
    assert_ne!(new, &served_key);
    assert!(b.sim.use_key(&b.sim.key(new).unwrap().value));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_served_key_openai_disabled_is_replaced_within_one_cycle() {
    let (b, _) = bench(&[File, Vault]).await;
    let slot = slot_of(&b, "prod-search", "backend").clone();
    let before = served(&b).await;
    let dead = before
        .iter()
        .find(|((_, p), _)| *p == slot.path)
        .map(|(_, k)| k.clone())
        .unwrap();
    assert!(b.sim.disable_key(&dead));

    let exit = b.run_once(None).await;
    assert_eq!(exit.code, Some(0), "{}", exit.tail());
    let invalid = exit.events("key.invalid");
    assert_eq!(invalid.len(), 1, "{}", exit.tail());
    assert_eq!(invalid[0]["key_id"], dead.as_str());
    // No store serves a key that fails verification after that cycle.
    for ((store, path), id) in served(&b).await {
        let k = b.sim.key(&id).expect("served key listed");
        assert!(
            b.sim.use_key(&k.value),
            "{store}:{path} serves {id}, which does not authenticate"
        );
        if path == slot.path {
            assert_ne!(id, dead);
        }
    }
    assert!(
        !b.sim.is_live(&dead),
        "the dead key is revoked once the new one is served"
    );
    // Only the dead key's slot rotated.
    assert_eq!(exit.events("key.minted").len(), 1, "{}", exit.tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoke_old_after_a_duration_is_kept_by_the_next_cycle_in_every_store() {
    // The rule's grace period is an hour; the operator wants the old key gone in 15 s
    // (long enough that the cycle below starts before the deadline on a loaded
    // machine: with 24 tests at once one cycle took 5 s, and 4 s once failed here).
    let spec = Spec::new(&[File, Vault, Aws]).policy("grace_period", "\"1h\"");
    let (b, _) = bench_of(spec).await;
    let slot = slot_of(&b, "prod-payments", "backend").clone();
    let before = served(&b).await;
    let old = before
        .iter()
        .find(|((_, p), _)| *p == slot.path)
        .map(|(_, k)| k.clone())
        .unwrap();

    let bad = b
        .run(&["rotate", "--all", "--revoke-old", "soon"], None)
        .await;
    assert_eq!(bad.code, Some(2), "{}", bad.tail());
    assert!(
        bad.stderr.contains("--revoke-old") && bad.stderr.contains("soon"),
        "the error names the flag and the value: {}",
        bad.stderr
    );

    let select = rotate_payments_backend("15s", &[]);
    let dry = b
        .run(
            &[&select[..], &["--dry-run", "--format", "json"]].concat(),
            None,
        )
        .await;
    assert_eq!(dry.code, Some(0), "{}", dry.tail());
    let doc: serde_json::Value = serde_json::from_str(&dry.stdout).expect("JSON actions");
    let revoke = doc["actions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["action"] == "revoke")
        .unwrap_or_else(|| panic!("the dry run names the revocation: {doc}"));
    assert_eq!(revoke["key_id"], old.as_str(), "{doc}");

    let exit = b.run(&select, None).await;
    assert_eq!(exit.code, Some(0), "{}", exit.tail());
    let started = exit.events("rotate.started");
    assert_eq!(started[0]["revoke_old"], "15s", "{}", exit.tail());
    // Every store serves the new key and records the deadline; the old key still
    // works, and OpenAI will expire it at the deadline (plus the margin).
    let snap = b.snapshot().await.unwrap();
    let mut deadline = None;
    for ((store, path), st) in &snap {
        if *path != slot.path {
            continue;
        }
        assert_ne!(
            st.current.as_ref().map(|c| &c.key_id),
            Some(&old),
            "{store}"
        );
        assert_eq!(st.book.previous_key_id.as_ref(), Some(&old), "{store}");
        let promoted = st.book.promoted_at.expect("promoted");
        let until = st
            .book
            .previous_until
            .unwrap_or_else(|| panic!("{store} records the deadline: {st:?}"));
        assert_eq!(until, promoted + chrono::Duration::seconds(15), "{store}");
        deadline = Some(until);
    }
    let deadline = deadline.expect("the slot's states");
    assert!(b.sim.is_live(&old), "not revoked before its deadline");
    // (To the second the engine asked in: the simulator counts from its receipt.)
    let expires = b.sim.key(&old).and_then(|k| k.expires_at).unwrap_or(0);
    let margin = expires - deadline.timestamp();
    assert!(
        (600..=602).contains(&margin),
        "OpenAI expires the old key at the deadline plus the 10-minute margin: {margin} s"
    );

    // A cycle before the deadline keeps it; the plan says when it goes.
    let early = b.run_once(None).await;
    assert_eq!(early.code, Some(0), "{}", early.tail());
    assert!(
        b.sim.is_live(&old),
        "kept until the deadline: {}",
        early.tail()
    );
    let plan = b.run(&["plan", "--format", "json"], None).await;
    assert_eq!(plan.code, Some(0), "{}", plan.tail());
    assert!(
        plan.stdout.contains(&old) && plan.stdout.contains("revoke"),
        "the plan shows the revocation to come: {}",
        plan.stdout
    );

    // After the deadline (an hour before the grace period would end) the next cycle
    // revokes it.
    let wait = (deadline - chrono::Utc::now()).num_milliseconds().max(0) as u64 + 1100;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let late = b.run_once(None).await;
    assert_eq!(late.code, Some(0), "{}", late.tail());
    assert!(
        late.events("key.revoked")
            .iter()
            .any(|e| e["key_id"] == old.as_str()),
        "{}",
        late.tail()
    );
    assert!(!b.sim.is_live(&old));
    let snap = b.snapshot().await.unwrap();
    check_i1(&b, &snap).unwrap();
    for ((store, path), st) in &snap {
        if *path == slot.path {
            assert_eq!(st.book.previous_key_id, None, "{store} forgot the old key");
            assert_eq!(st.book.previous_until, None, "{store} forgot the deadline");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotate_racing_a_cycle_rotates_each_slot_once() {
    let (b, _) = bench(&[File, Vault]).await;
    // Every key stale again: the cycle wants to rotate each slot as well.
    b.sim.advance(200 * DAY);
    let before = served(&b).await;
    // The three asked at once: each rotation's first write waits long enough for the
    // other processes to have surveyed the slots (however slowly a loaded machine
    // starts them), so none of them asks to replace a key another has just promoted.
    // A rotation asked for after one completed is a new request, and rotates again.
    let hold = Some("before_intent=sleep(2500)");
    let (r1, r2, cycle) = tokio::join!(
        b.run(&["rotate", "--all"], hold),
        b.run(&["rotate", "--all"], hold),
        b.run_once(hold),
    );
    for e in [&r1, &r2, &cycle] {
        assert!(e.code.is_some(), "{}", e.tail());
    }
    let after = served(&b).await;
    for slot in &b.slots {
        let minted: usize = [&r1, &r2, &cycle]
            .iter()
            .flat_map(|e| e.events("key.minted"))
            .filter(|m| {
                m["project_id"] == slot.project_id.as_str()
                    && m["service_account_name"] == slot.sa_name.as_str()
            })
            .count();
        assert_eq!(
            minted,
            1,
            "{}: one rotation\n{}\n{}\n{}",
            slot.path,
            r1.tail(),
            r2.tail(),
            cycle.tail()
        );
        let keys: BTreeSet<&String> = after
            .iter()
            .filter(|((_, p), _)| *p == slot.path)
            .map(|(_, k)| k)
            .collect();
        assert_eq!(keys.len(), 1, "{}: the stores agree", slot.path);
        let old = before.iter().find(|((_, p), _)| *p == slot.path).unwrap().1;
        assert!(!keys.contains(old), "{}: rotated", slot.path);
    }
    // No orphan: every live key keyrotd minted is one a store accounts for.
    let snap = b.snapshot().await.unwrap();
    check_i1(&b, &snap).unwrap();
    let accounted: BTreeSet<String> = snap
        .values()
        .flat_map(|s| {
            s.referenced_key_ids()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    for k in b.own_live_keys() {
        assert!(accounted.contains(&k), "orphan {k}");
    }
}

/// An operator's `rotate --revoke-old 4s` killed after staging (SIGKILL-like abort at
/// the failpoint), then a plain `once` with no flag finishes the rotation: it keeps the
/// operator's deadline (recorded in the intent, in every store), not the rule's hour;
/// likewise `--revoke-old now`, whose deadline becomes the promotion itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_operator_rotation_keeps_its_deadline_when_another_run_finishes_it() {
    crate::harness::require_failpoints_binary();
    let spec = Spec::new(&[File, Vault, Aws]).policy("grace_period", "\"1h\"");
    let (b, _) = bench_of(spec).await;
    let slot = slot_of(&b, "prod-payments", "backend").clone();
    for (revoke_old, after) in [("10s", 10), ("now", 0)] {
        let old = served(&b)
            .await
            .into_iter()
            .find(|((_, p), _)| *p == slot.path)
            .map(|(_, k)| k)
            .unwrap();
        let select = rotate_payments_backend(revoke_old, &[]);
        let killed = b.run(&select, Some("after_stage=return")).await;
        assert!(killed.crashed(), "stopped after staging: {}", killed.tail());
        // Its lease (1 s) runs out; then a cycle that was asked for nothing finishes it.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let exit = b.run_once(None).await;
        assert_eq!(exit.code, Some(0), "{}", exit.tail());
        assert!(
            !exit.events("rotation.completed").is_empty(),
            "the cycle finished the rotation: {}",
            exit.tail()
        );
        let snap = b.snapshot().await.unwrap();
        let mut stores = 0;
        for ((store, path), st) in &snap {
            if *path != slot.path {
                continue;
            }
            stores += 1;
            assert_ne!(
                st.current.as_ref().map(|c| &c.key_id),
                Some(&old),
                "{store}"
            );
            assert!(st.book.intent.is_none(), "{store}: {st:?}");
            if after > 0 {
                assert_eq!(st.book.previous_key_id.as_ref(), Some(&old), "{store}");
                let promoted = st.book.promoted_at.expect("promoted");
                assert_eq!(
                    st.book.previous_until,
                    Some(promoted + chrono::Duration::seconds(after)),
                    "{store} keeps the operator's deadline, not the rule's hour: {st:?}"
                );
            }
        }
        assert_eq!(stores, 3, "{snap:?}");
        if after > 0 {
            assert!(b.sim.is_live(&old), "kept until the deadline");
            tokio::time::sleep(Duration::from_millis(after as u64 * 1000 + 1100)).await;
        }
        // `now`: the promotion is the deadline, so this cycle revokes the old key;
        // `10s`: the first cycle after the deadline does (10 s, so that the cycle that
        // finished the rotation, slow on a loaded machine, ends well before it).
        let late = b.run_once(None).await;
        assert_eq!(late.code, Some(0), "{}", late.tail());
        assert!(
            !b.sim.is_live(&old),
            "{revoke_old}: the old key is gone at the operator's deadline, an hour before \
             the grace period would end: {}",
            late.tail()
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
}
