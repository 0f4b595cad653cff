//! API faults throughout: 20% of requests answered 429, 10% 5xx, 50 ms latency on
//! every request. `keyrotd once` runs until nothing is left to do (at most 10 runs);
//! after every run I1 holds (also continuously while it runs), every deleted key was
//! one keyrotd may revoke (I3), every key it minted is accounted for (I2), and no secret
//! is in its logs (I4).

use std::time::{Duration, Instant};

use crate::harness::*;
use keyrotd::sim::{OwnerRef, RetryAfter};
use StoreKind::{File, Vault};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_converges_under_rate_limits_server_errors_and_latency() {
    let started = Instant::now();
    let spec = Spec::new(&[File, Vault])
        .sa_glob("*")
        .openai("max_retries", "4")
        .openai("max_retry_after", "\"1s\"");
    let mut b = Bench::new(spec).await;
    let sim = &b.sim;
    let now = sim.now();
    let mut stale = Vec::new();
    for project in ["prod-a", "prod-b", "prod-c"] {
        let p = sim.add_project(project);
        for sa in ["backend", "worker"] {
            let id = sim.add_service_account(&p, sa).unwrap();
            let owner = OwnerRef::ServiceAccount(id);
            stale.push(
                sim.add_key_at(&p, owner.clone(), "legacy", now - 200 * DAY, Some(now))
                    .unwrap()
                    .id,
            );
            sim.add_key_at(&p, owner, "fresh", now - 5 * DAY, Some(now))
                .unwrap();
        }
        let u = sim.add_user(
            &format!("{project} owner"),
            &format!("{project}@example.com"),
        );
        sim.add_key_at(&p, OwnerRef::User(u), "laptop", now - 200 * DAY, None)
            .unwrap();
    }
    let st = sim.add_project("staging-a");
    let sa = sim.add_service_account(&st, "backend").unwrap();
    sim.add_key_at(
        &st,
        OwnerRef::ServiceAccount(sa),
        "staging",
        now - 200 * DAY,
        None,
    )
    .unwrap();
    b.register_slots();
    // Half the slots already serve their stale key; the others bootstrap.
    for (i, slot) in b.slots.clone().iter().enumerate() {
        if i % 2 == 0 {
            let key = b
                .sim
                .keys(&slot.project_id)
                .into_iter()
                .find(|k| k.name == "legacy" && k.owner_name == slot.sa_name)
                .unwrap();
            b.seed_current(slot, &key.id, Duration::from_secs(30 * 86400))
                .await;
        }
    }
    b.sim.update_faults(|f| {
        f.rate_limit_rate = 0.2;
        f.server_error_rate = 0.1;
        f.latency = Duration::from_millis(50);
        f.retry_after = RetryAfter::Millis(200);
    });
    let ctx = Ctx {
        bench: &b,
        grace: Duration::from_secs(2),
        max_age: Duration::from_secs(90 * 86400),
    };

    let mut runs = Vec::new();
    let mut done = false;
    for n in 0..10 {
        if n > 0 {
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let s = step(&ctx, None)
            .await
            .unwrap_or_else(|e| panic!("run {}: {e}", n + 1));
        let ok = s.exit.code == Some(0) && converged(&ctx, &s.after).is_ok();
        runs.push(format!(
            "{} in {:.1}s, {} revoked",
            s.exit.describe(),
            s.exit.elapsed.as_secs_f64(),
            s.revoked.len()
        ));
        if ok {
            done = true;
            break;
        }
    }
    let requests = b.sim.requests();
    let throttled = requests.iter().filter(|r| r.status == 429).count();
    let errors = requests.iter().filter(|r| r.status >= 500).count();
    println!(
        "{} runs ({}), {} requests, {throttled} answered 429, {errors} answered 5xx; {:.1}s",
        runs.len(),
        runs.join("; "),
        requests.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(throttled + errors > 0, "the faults were injected");
    assert!(done, "not converged after 10 runs: {runs:?}");
    for k in &stale {
        assert!(!b.sim.is_live(k), "stale key {k} still live");
    }
    // Every fresh key of a managed account, and everything unmanaged, is still live.
    let fresh_live = b
        .sim
        .all_keys()
        .into_iter()
        .filter(|k| k.name == "fresh" || k.name == "staging" || k.name == "laptop")
        .count();
    assert_eq!(
        fresh_live,
        6 + 1 + 3,
        "fresh, unmanaged and user keys untouched"
    );
}
