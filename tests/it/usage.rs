//! Usage-aware revocation (`policy.revoke_when = "unused"`) against the simulator.

use std::time::Duration;

use crate::e2e::{Stores, World};
use keyrotd::metrics::RevocationOutcome;
use keyrotd::policy::{Reason, Verdict};
use keyrotd::sim::Scenario;
use secrecy::ExposeSecret;

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86400);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_previous_key_is_kept_until_max_grace_an_unused_one_goes_after_min_grace() {
    let w = World::new(
        Scenario::new(51).projects(3).service_accounts_per_project(2).user_keys_per_project(0),
        Stores::File,
        "revoke_when = \"unused\"\nmin_grace = \"30m\"\nmax_grace = \"3d\"\nusage_report_delay = \"5m\"",
    )
    .await;
    let engine = w.engine(false).await;
    assert!(!engine.cycle().await.any_failed());
    w.advance(91 * DAY);
    let r = engine.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.slots);
    let states = w.store_states(&engine).await;
    assert!(states.len() >= 2);
    let mut previous: Vec<(String, String)> = states
        .values()
        .map(|s| {
            let id = s.book.previous_key_id.clone().expect("rotated");
            let value = w.sim.key_value(&id).expect("value");
            (id, value)
        })
        .collect();
    previous.sort();
    let (kept_id, kept_value) = previous[0].clone();

    // A consumer that never switched keeps calling with the old key.
    w.advance(2 * HOUR);
    assert!(w.sim.use_key(&kept_value));
    let r = engine.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.slots);
    assert!(
        w.sim.is_live(&kept_id),
        "a key in use is kept past the grace period"
    );
    for (id, _) in &previous[1..] {
        assert!(
            !w.sim.is_live(id),
            "an unused previous key {id} is revoked after min_grace"
        );
    }
    let metrics = engine.metrics.render(None);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("keyrotd_key_still_in_use_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    // The plan says why it is still alive.
    let survey = engine.survey().await.unwrap();
    let plan = engine.plan(&survey);
    let k = plan.keys.iter().find(|k| k.key_id() == kept_id).unwrap();
    assert_eq!(k.verdict, Verdict::Revoke);
    assert!(k.reasons.contains(&Reason::InUse), "{:?}", k.reasons);

    // Still used a day later: still kept. At max_grace it goes regardless.
    w.advance(DAY);
    assert!(w.sim.use_key(&kept_value));
    assert!(!engine.cycle().await.any_failed());
    assert!(w.sim.is_live(&kept_id));
    w.advance(2 * DAY);
    let revoked_before = engine.metrics.revocations(RevocationOutcome::Revoked);
    assert!(!engine.cycle().await.any_failed());
    assert!(!w.sim.is_live(&kept_id), "revoked at max_grace");
    assert!(engine.metrics.revocations(RevocationOutcome::Revoked) > revoked_before);
    // Every store still serves a live key.
    for st in w.store_states(&engine).await.values() {
        assert!(w
            .sim
            .use_key(st.current.as_ref().unwrap().api_key.expose_secret()));
    }
}
