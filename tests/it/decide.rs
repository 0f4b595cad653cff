//! The one decision (`keyrotd::rotation::decide`) seen from outside: what
//! `once --dry-run` lists is exactly what a real `once` then does to the simulated
//! organization, and the plan counts the same.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::Utc;
use rand::{Rng, SeedableRng};

use crate::e2e::{Stores, World};
use keyrotd::plan::PlannedAction;
use keyrotd::rotation::decide::{ActionKind, Why};
use keyrotd::sim::{OwnerRef, Scenario};
use keyrotd::store::{Intent, SecretRecord, Transition};

const MIN: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86400);

/// (key id, deleted) for every key the simulator ever held.
fn keys(w: &World) -> BTreeMap<String, bool> {
    w.sim
        .all_keys()
        .into_iter()
        .map(|k| (k.id, k.deleted_at.is_some()))
        .collect()
}

/// One change of the world between cycles, drawn at random.
async fn perturb(w: &World, rng: &mut rand::rngs::StdRng, engine: &keyrotd::rotation::Engine) {
    let projects: Vec<_> = w
        .sim
        .projects()
        .into_iter()
        .filter(|p| p.name.starts_with("prod-"))
        .collect();
    let Some(p) = projects.get(rng.gen_range(0..projects.len().max(1))) else {
        return;
    };
    let sas = w.sim.service_accounts(&p.id);
    let Some(sa) = sas.get(rng.gen_range(0..sas.len().max(1))) else {
        return;
    };
    let store = engine.stores.get("file").expect("file store").clone();
    let key = keyrotd::store::state_key(&p.id, &sa.id);
    let stamp = format!(
        "keyrotd-{}-{:04x}",
        Utc::now().format("%Y%m%dT%H%M%SZ"),
        rng.gen::<u16>()
    );
    match rng.gen_range(0..7) {
        // A consumer still calling with every key of the account (in use).
        0 => {
            for k in w.sim.keys(&p.id) {
                if matches!(&k.owner, OwnerRef::ServiceAccount(id) if *id == sa.id) {
                    w.sim.use_key(&k.value);
                }
            }
        }
        // Someone deleted a key by hand.
        1 => {
            if let Some(k) = w.sim.keys(&p.id).first() {
                w.sim.delete_key(&k.id);
            }
        }
        // An orphan: a keyrotd-named key no store knows.
        2 => {
            let old = w.sim.now() - 3 * 86400;
            w.sim.add_key_at(
                &p.id,
                OwnerRef::ServiceAccount(sa.id.clone()),
                &stamp,
                old,
                None,
            );
        }
        // A run died after minting, before staging (its key exists, unrecorded).
        3 | 4 => {
            let state = store.read(&key).await.expect("read");
            let dead = rng.gen_bool(0.5);
            let minted = w
                .sim
                .add_key(&p.id, OwnerRef::ServiceAccount(sa.id.clone()), &stamp)
                .expect("mint by hand");
            let intent = Intent {
                key_name: stamp.clone(),
                owner: "elsewhere:1:deadbeef".into(),
                lease_until: if dead {
                    w.clock_now() - chrono::Duration::minutes(5)
                } else {
                    w.clock_now() + chrono::Duration::minutes(5)
                },
                attempt: 1,
                service_account_id: sa.id.clone(),
            };
            let state = store
                .apply_to(&key, &state, &Transition::Intent(intent))
                .await
                .expect("intent");
            // ... or after staging it.
            if rng.gen_range(0..7) == 4 {
                let rec = SecretRecord {
                    api_key: minted.value.clone().into(),
                    key_id: minted.id.clone(),
                    project_id: p.id.clone(),
                    service_account_id: sa.id.clone(),
                    created_at: keyrotd::policy::ts(minted.created_at),
                    managed_by: keyrotd::store::MANAGED_BY.into(),
                };
                store
                    .apply_to(&key, &state, &Transition::Stage(rec))
                    .await
                    .expect("stage");
            }
        }
        // Nothing changed.
        _ => {}
    }
}

fn describe(actions: &[PlannedAction]) -> String {
    actions
        .iter()
        .map(|a| a.describe())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dry_run_lists_exactly_what_the_cycle_then_does() {
    let seed: u64 = std::env::var("KEYROTD_DECIDE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("KEYROTD_DECIDE_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut compared = (0, 0, 0);
    for case in 0..12 {
        let unused = rng.gen_bool(0.5);
        let policy = if unused {
            "revoke_when = \"unused\"\nmin_grace = \"0s\"\nusage_report_delay = \"0s\"\nmax_grace = \"3d\"\norphan_min_age = \"1h\""
        } else {
            "orphan_min_age = \"1h\""
        };
        let w = World::new(
            Scenario::new(rng.gen())
                .projects(rng.gen_range(1..4))
                .service_accounts_per_project(rng.gen_range(1..3))
                .keys_per_service_account(rng.gen_range(1..3))
                .user_keys_per_project(1)
                .stale_fraction(rng.gen_range(0.0..1.0)),
            Stores::File,
            policy,
        )
        .await;
        let engine = w.engine(false).await;
        let dry = w.engine(true).await;
        for step in 0..4 {
            // The world changes, time passes: fresh, in grace, past grace, stale again.
            perturb(&w, &mut rng, &engine).await;
            let step_by = [Duration::ZERO, 10 * MIN, 2 * HOUR, 100 * DAY][rng.gen_range(0..4)];
            w.advance(step_by);

            let planned = dry.cycle().await;
            assert!(planned.scan_error.is_none());
            let survey = engine.survey().await.expect("survey");
            let summary = engine.plan(&survey).summary();
            drop(survey);
            let before = keys(&w);
            let report = engine.cycle().await;
            let ctx = format!(
                "seed {seed}, case {case}, step {step} (+{step_by:?}, unused={unused})\nplanned:\n{}\nreport: {:?}",
                describe(&planned.planned),
                report.slots.iter().map(|s| (&s.outcome, &s.performed)).collect::<Vec<_>>()
            );
            assert!(!report.any_failed(), "{ctx}");
            let after = keys(&w);

            // Mints: one new key per planned mint (verification never fails here).
            let minted = after.keys().filter(|k| !before.contains_key(*k)).count();
            let mints = planned
                .planned
                .iter()
                .filter(|a| a.action.kind == ActionKind::Mint)
                .count();
            assert_eq!(minted, mints, "mints\n{ctx}");
            // Revocations: exactly the keys the planned actions name (those still live).
            let revoked: BTreeSet<&String> = before
                .iter()
                .filter(|(k, gone)| !**gone && after.get(*k).is_none_or(|g| *g))
                .map(|(k, _)| k)
                .collect();
            let expected: BTreeSet<&String> = planned
                .planned
                .iter()
                .filter(|a| a.action.revokes())
                .filter_map(|a| a.action.key_id.as_ref())
                .filter(|k| before.get(*k) == Some(&false))
                .collect();
            assert_eq!(revoked, expected, "revocations\n{ctx}");
            // The plan counts the same.
            assert_eq!(summary.rotate, mints, "plan's rotate count\n{ctx}");
            let revokes = planned
                .planned
                .iter()
                .filter(|a| a.action.revokes())
                .count();
            assert_eq!(
                summary.revoke + summary.orphan,
                revokes,
                "plan's revoke count\n{ctx}"
            );
            compared.0 += 1;
            compared.1 += mints;
            compared.2 += revokes;
        }
    }
    println!(
        "compared {} cycles: {} mints, {} revocations",
        compared.0, compared.1, compared.2
    );
    assert!(
        compared.1 > 0 && compared.2 > 0,
        "the cases mint and revoke"
    );
}

/// `revoke_when = "unused"` with no minimum grace: the cycle after a bootstrap revokes
/// the account's idle old keys, keeps the one a consumer still uses, and says so once
/// the grace period is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_old_keys_go_in_the_second_cycle_a_busy_one_is_kept() {
    let w = World::new(
        Scenario::new(77)
            .projects(1)
            .service_accounts_per_project(1)
            .keys_per_service_account(3)
            .user_keys_per_project(0)
            .stale_fraction(1.0),
        Stores::File,
        "revoke_when = \"unused\"\nmin_grace = \"0s\"\nusage_report_delay = \"0s\"\nmax_grace = \"7d\"",
    )
    .await;
    let prod = w
        .sim
        .projects()
        .into_iter()
        .find(|p| p.name.starts_with("prod-"))
        .expect("a prod project");
    let old: Vec<_> = w.sim.keys(&prod.id);
    assert_eq!(old.len(), 3);
    let engine = w.engine(false).await;

    // First cycle: the slot bootstraps; nothing is revoked yet.
    let r = engine.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.slots);
    assert!(
        old.iter().all(|k| w.sim.is_live(&k.id)),
        "nothing revoked in the bootstrap cycle"
    );

    // A consumer still on the first old key.
    w.advance(10 * MIN);
    assert!(w.sim.use_key(&old[0].value));
    let survey = engine.survey().await.unwrap();
    let plan = engine.plan(&survey);
    let due: Vec<_> = plan
        .actions
        .iter()
        .filter(|a| a.action.kind == ActionKind::Revoke)
        .filter_map(|a| a.action.key_id.clone())
        .collect();
    let expected: BTreeSet<String> = old[1..].iter().map(|k| k.id.clone()).collect();
    assert_eq!(
        due.iter().cloned().collect::<BTreeSet<_>>(),
        expected,
        "the plan says so"
    );
    drop(plan);
    drop(survey);
    let r = engine.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.slots);
    assert!(w.sim.is_live(&old[0].id), "the busy key is kept");
    for k in &old[1..] {
        assert!(
            !w.sim.is_live(&k.id),
            "idle old key {} revoked in the second cycle",
            k.id
        );
    }
    let why: Vec<_> = r
        .slots
        .iter()
        .flat_map(|s| s.performed.iter())
        .filter(|p| p.kind == ActionKind::Revoke)
        .map(|p| p.reason.clone())
        .collect();
    assert!(
        why.iter().all(|w| w == Why::UnusedSincePromotion.as_str()),
        "{why:?}"
    );

    // Past the grace period and still used: kept, with key.still_in_use.
    w.advance(2 * HOUR);
    assert!(w.sim.use_key(&old[0].value));
    let r = engine.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.slots);
    assert!(w.sim.is_live(&old[0].id));
    assert!(engine
        .metrics
        .render(None)
        .lines()
        .any(|l| l.starts_with("keyrotd_key_still_in_use_total ") && !l.ends_with(" 0")));
    let kept = r
        .later
        .iter()
        .find(|a| a.action.key_id.as_deref() == Some(old[0].id.as_str()));
    assert!(
        kept.is_some_and(|a| a.action.kind == ActionKind::Keep && a.action.why == Why::StillInUse),
        "{kept:?}"
    );
}
