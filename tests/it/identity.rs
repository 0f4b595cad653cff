//! Slots are bound to identity, not names (DESIGN.md I7): a second project with a
//! victim's name, or a rule rendering one path for two slots, is refused loudly on
//! every store type; nothing of the victim is overwritten or revoked.

use std::collections::BTreeSet;

use crate::e2e::{Stores, World};
use keyrotd::plan::SlotStatus;
use keyrotd::rotation::{CycleReport, Engine, SlotOutcome};
use keyrotd::sim::{OwnerRef, Scenario};
use keyrotd::store::SlotState;
use secrecy::ExposeSecret;

/// A world with no generated projects: every project is the test's own.
async fn empty_world() -> World {
    World::new(Scenario::new(7).projects(0), Stores::All, "").await
}

/// A `prod-payments` project with service account `backend` and one fresh key.
fn add_payments(w: &World) -> (String, String) {
    let p = w.sim.add_project("prod-payments");
    let sa = w.sim.add_service_account(&p, "backend").expect("account");
    w.sim
        .add_key(&p, OwnerRef::ServiceAccount(sa.clone()), "backend-key")
        .expect("key");
    (p, sa)
}

fn payments_path(w: &World) -> String {
    format!("{}/prod-payments/backend", w.prefix)
}

/// What each store serves at `path`, read through the engine's own backends.
async fn served(e: &Engine, path: &str) -> Vec<(String, SlotState)> {
    let mut out = Vec::new();
    for (name, store) in &e.stores {
        out.push((
            name.clone(),
            store.read(path).await.expect("store readable"),
        ));
    }
    out
}

fn errors(r: &CycleReport) -> Vec<(String, String)> {
    r.slots
        .iter()
        .filter_map(|s| {
            s.outcome
                .as_ref()
                .err()
                .map(|e| (s.slot.project_id.clone(), e.to_string()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_project_with_the_victims_name_takes_nothing_over() {
    let w = empty_world().await;
    let e = w.engine(false).await;
    let (victim, victim_sa) = add_payments(&w);
    let first = e.cycle().await;
    assert!(!first.any_failed(), "{:?}", first.slots);
    let path = payments_path(&w);
    let before = served(&e, &path).await;
    assert_eq!(before.len(), 3, "file, vault and aws");
    let k1 = before[0].1.current.as_ref().expect("bootstrapped").clone();
    assert_eq!(k1.project_id, victim);
    for (store, st) in &before {
        assert_eq!(
            st.current.as_ref().map(|c| c.key_id.as_str()),
            Some(k1.key_id.as_str()),
            "{store} serves the victim's key"
        );
    }
    let minted = w.minted_live();
    let deleted = w.sim.deleted_keys();

    // The attacker: the same name, the same account name.
    let (attacker, attacker_sa) = add_payments(&w);
    assert_ne!(victim, attacker);

    // The plan shows both slots as colliding, each naming the other.
    let survey = e.survey().await.expect("survey");
    let plan = e.plan(&survey);
    let states: Vec<(&str, SlotStatus, usize)> = plan
        .slots
        .iter()
        .map(|s| (s.project_id, s.state, s.collisions.len()))
        .collect();
    assert_eq!(states.len(), 2, "both slots are shown: {states:?}");
    for (p, state, n) in &states {
        assert_eq!(*state, SlotStatus::Collision, "{p}: {states:?}");
        assert_eq!(*n, 3, "{p} collides in each of its three stores");
    }
    let json = plan.to_json();
    assert!(json.contains("\"collision\"") && json.contains(&attacker) && json.contains(&victim));
    drop(plan);

    // Every cycle refuses both, naming the path and both identities; nothing changes.
    for _ in 0..2 {
        let r = e.cycle().await;
        let errs = errors(&r);
        assert_eq!(errs.len(), 2, "both slots fail: {:?}", r.slots);
        for (p, err) in &errs {
            let other = if p == &victim { &attacker } else { &victim };
            let other_sa = if p == &victim {
                &attacker_sa
            } else {
                &victim_sa
            };
            assert!(err.contains("collision"), "{err}");
            assert!(err.contains(&path), "names the path: {err}");
            assert!(
                err.contains(other) && err.contains(other_sa),
                "names the other slot: {err}"
            );
            assert!(err.contains(p.as_str()), "names its own slot: {err}");
        }
        assert!(r.any_failed(), "`once` exits 1");
        w.advance(std::time::Duration::from_secs(2 * 3600));
    }
    assert!(e.metrics.slot_collisions() >= 4);
    let after = served(&e, &path).await;
    for (store, st) in &after {
        let cur = st.current.as_ref().expect("still served");
        assert_eq!(
            cur.key_id, k1.key_id,
            "{store} still serves the victim's key"
        );
        assert_eq!(cur.api_key.expose_secret(), k1.api_key.expose_secret());
        assert!(
            st.pending.is_none() && st.book.intent.is_none(),
            "{store}: nothing staged"
        );
    }
    assert!(w.sim.is_live(&k1.key_id), "the victim's key is live");
    assert_eq!(w.minted_live(), minted, "nothing minted");
    assert_eq!(w.sim.deleted_keys(), deleted, "nothing revoked");
    assert!(
        w.sim
            .service_accounts(&victim)
            .iter()
            .any(|sa| sa.id == victim_sa),
        "the victim's account is not deleted"
    );

    // The duplicate goes away: the victim's slot carries on with no mint.
    assert!(w.sim.archive_project(&attacker));
    let r = e.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.slots);
    assert_eq!(r.slots.len(), 1);
    assert_eq!(r.slots[0].outcome, Ok(SlotOutcome::Fresh));
    assert_eq!(w.minted_live(), minted, "nothing minted");
    for (store, st) in served(&e, &path).await {
        assert_eq!(
            st.current.map(|c| c.key_id),
            Some(k1.key_id.clone()),
            "{store}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_document_naming_another_project_is_never_overwritten() {
    // The victim's slot goes away (archived: no rule covers it any more), then a new
    // project with its name renders its path: the document there names the victim.
    let w = empty_world().await;
    let e = w.engine(false).await;
    let (victim, _) = add_payments(&w);
    assert!(!e.cycle().await.any_failed());
    let path = payments_path(&w);
    let k1 = served(&e, &path).await[0]
        .1
        .current
        .clone()
        .expect("served");
    assert!(w.sim.archive_project(&victim));
    let (attacker, _) = add_payments(&w);
    let minted = w.minted_live();

    let survey = e.survey().await.expect("survey");
    let plan = e.plan(&survey);
    assert_eq!(plan.slots.len(), 1);
    assert_eq!(plan.slots[0].state, SlotStatus::Collision);
    drop(plan);

    let r = e.cycle().await;
    let errs = errors(&r);
    assert_eq!(errs.len(), 1, "{:?}", r.slots);
    assert_eq!(errs[0].0, attacker);
    assert!(
        errs[0].1.contains(&victim) && errs[0].1.contains(&path),
        "{}",
        errs[0].1
    );
    assert_eq!(w.minted_live(), minted, "nothing minted for the newcomer");
    for (store, st) in served(&e, &path).await {
        assert_eq!(
            st.current.map(|c| c.key_id),
            Some(k1.key_id.clone()),
            "{store}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paths_that_render_alike_for_two_slots_collide() {
    // `prod-a/b` + account `c` and `prod-a` + account `b/c` render one path.
    let w = empty_world().await;
    let e = w.engine(false).await;
    let p1 = w.sim.add_project("prod-a/b");
    w.sim.add_service_account(&p1, "c").expect("account");
    let p2 = w.sim.add_project("prod-a");
    w.sim.add_service_account(&p2, "b/c").expect("account");
    let survey = e.survey().await.expect("survey");
    let plan = e.plan(&survey);
    let ids: BTreeSet<&str> = plan.slots.iter().map(|s| s.project_id).collect();
    assert_eq!(
        ids,
        BTreeSet::from([p1.as_str(), p2.as_str()]),
        "both shown"
    );
    assert!(plan.slots.iter().all(|s| s.state == SlotStatus::Collision));
    drop(plan);
    let r = e.cycle().await;
    assert_eq!(errors(&r).len(), 2);
    assert!(w.minted_live().is_empty(), "nothing minted");
}
