//! `policy.expire_replaced`: OpenAI enforces the grace period as well as keyrotd (the
//! key update call sets the replaced key's expiry at promotion).

use std::time::Duration;

use crate::e2e::{captured_logs, Stores, World};
use keyrotd::rotation::{Engine, SlotOutcome};
use keyrotd::sim::Scenario;

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86400);
/// `grace_period` of the e2e world.
const GRACE: i64 = 3600;
/// `keyrotd::config::EXPIRY_MARGIN`.
const MARGIN: i64 = 600;

/// Two prod slots (`prod-payments`, `prod-search`), one service account each.
fn scenario(seed: u64) -> Scenario {
    Scenario::new(seed)
        .projects(4)
        .service_accounts_per_project(1)
        .keys_per_service_account(1)
        .user_keys_per_project(0)
}

/// Bootstraps every slot, then, past `max_age`, rotates them all: the promotion
/// replaces the bootstrapped keys. Returns (replaced key id, its value) per slot and
/// the simulator's clock just before and after the rotating cycle.
async fn rotate_twice(w: &World, e: &Engine) -> (Vec<(String, String)>, i64, i64) {
    let r = e.cycle().await;
    assert!(!r.any_failed(), "bootstrap: {:?}", r.slots);
    w.advance(91 * DAY);
    let before = w.sim.now();
    let r = e.cycle().await;
    let after = w.sim.now();
    assert!(!r.any_failed(), "rotation: {:?}", r.slots);
    assert!(r.slots.len() >= 2, "two prod slots: {:?}", r.slots);
    assert!(r
        .slots
        .iter()
        .all(|s| matches!(s.outcome, Ok(SlotOutcome::Rotated { .. }))));
    let mut replaced: Vec<(String, String)> = w
        .store_states(e)
        .await
        .values()
        .map(|s| {
            let id = s.book.previous_key_id.clone().expect("a replaced key");
            let value = w.sim.key_value(&id).expect("its value");
            (id, value)
        })
        .collect();
    replaced.sort();
    replaced.dedup();
    (replaced, before, after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replaced_key_expires_at_the_end_of_its_grace_period_plus_the_margin() {
    let w = World::new(scenario(71), Stores::File, "").await;
    let e = w.engine(false).await;
    let (replaced, before, after) = rotate_twice(&w, &e).await;
    for (id, _) in &replaced {
        let k = w.sim.key(id).expect("still listed");
        let at = k.expires_at.expect("an expiry was set");
        assert!(
            (before + GRACE + MARGIN..=after + GRACE + MARGIN).contains(&at),
            "{id} expires at {at}, promotion was in {before}..={after}"
        );
    }
    // The served keys themselves never expire (policy.key_expiry = "none").
    for st in w.store_states(&e).await.values() {
        let cur = st.current.as_ref().unwrap();
        assert_eq!(w.sim.key(&cur.key_id).unwrap().expires_at, None);
    }
    // keyrotd's own revocation still comes first, before the expiry.
    w.advance(Duration::from_secs(GRACE as u64 + 60));
    let r = e.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.slots);
    for (id, _) in &replaced {
        assert!(!w.sim.is_live(id), "{id} revoked after its grace period");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_after_promotion_leaves_a_key_that_dies_at_the_end_of_its_grace() {
    let w = World::new(scenario(72), Stores::File, "").await;
    let e = w.engine(false).await;
    let (replaced, _, after) = rotate_twice(&w, &e).await;
    // No further cycle runs (the process was killed, never restarted).
    drop(e);
    let to_just_before = (after + GRACE + MARGIN - 60 - w.sim.now()).max(0) as u64;
    w.advance(Duration::from_secs(to_just_before));
    for (id, value) in &replaced {
        assert!(w.sim.use_key(value), "{id} works until its grace ends");
    }
    w.advance(Duration::from_secs(120));
    for (id, value) in &replaced {
        assert!(
            !w.sim.use_key(value),
            "{id} stops authenticating at the end of its grace period"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_without_the_key_update_call_is_said_once_and_rotations_complete() {
    let logs = captured_logs();
    let w = World::new(scenario(73), Stores::File, "").await;
    w.sim.update_faults(|f| f.no_key_update = true);
    let e = w.engine(false).await;
    let (replaced, _, _) = rotate_twice(&w, &e).await;
    assert!(replaced.len() >= 2, "two replaced keys: {replaced:?}");
    for (id, _) in &replaced {
        assert_eq!(w.sim.key(id).unwrap().expires_at, None, "{id}");
        assert!(w.sim.is_live(id), "{id} in its grace period");
    }
    // The next rotation of the same engine says nothing new.
    w.advance(91 * DAY);
    let r = e.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.slots);
    if let Some(logs) = logs {
        let projects: Vec<String> = w
            .store_states(&e)
            .await
            .values()
            .map(|s| s.current.as_ref().unwrap().project_id.clone())
            .collect();
        let warnings: Vec<String> = logs
            .lines_with(&["key.expiry_unsupported"])
            .into_iter()
            .filter(|l| projects.iter().any(|p| l.contains(p.as_str())))
            .collect();
        assert_eq!(warnings.len(), 1, "one warning per process: {warnings:#?}");
        assert!(warnings[0].contains("WARN"), "{}", warnings[0]);
    }
    // keyrotd's own revocation still applies.
    w.advance(2 * HOUR);
    assert!(!e.cycle().await.any_failed());
    for (id, _) in &replaced {
        assert!(!w.sim.is_live(id), "{id} revoked by keyrotd");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expire_replaced_false_leaves_the_replaced_key_without_an_expiry() {
    let w = World::new(scenario(74), Stores::File, "expire_replaced = false").await;
    let e = w.engine(false).await;
    let (replaced, _, _) = rotate_twice(&w, &e).await;
    for (id, _) in &replaced {
        assert_eq!(w.sim.key(id).unwrap().expires_at, None, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_revoke_when_unused_a_replaced_key_in_use_lives_until_max_grace() {
    let w = World::new(
        scenario(75),
        Stores::File,
        "revoke_when = \"unused\"\nmin_grace = \"30m\"\nmax_grace = \"3d\"\nusage_report_delay = \"5m\"",
    )
    .await;
    let e = w.engine(false).await;
    let (replaced, before, after) = rotate_twice(&w, &e).await;
    let max_grace = 3 * 86400;
    for (id, _) in &replaced {
        let at = w.sim.key(id).unwrap().expires_at.expect("an expiry");
        assert!(
            (before + max_grace + MARGIN..=after + max_grace + MARGIN).contains(&at),
            "{id} expires at {at}"
        );
    }
    // An expiry set earlier than max_grace (by hand, or an older keyrotd) is extended
    // while the key is in use.
    let (id, value) = &replaced[0];
    let project = w.sim.key(id).unwrap().project_id;
    let shorter = keyrotd::openai::models::UpdateKeyRequest {
        expires_in_seconds: Some(3 * 3600),
        scopes: None,
    };
    e.client
        .update_api_key(&project, id, &shorter)
        .await
        .unwrap();
    w.advance(2 * HOUR);
    assert!(w.sim.use_key(value));
    assert!(!e.cycle().await.any_failed());
    assert!(w.sim.is_live(id));
    assert!(w.sim.key(id).unwrap().expires_at.unwrap() >= after + max_grace + MARGIN);
}
