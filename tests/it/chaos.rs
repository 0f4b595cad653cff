//! Kills at moments nobody chose: `keyrotd once` SIGKILLed at random times, twenty
//! times in a row, while the Admin API answers 10% of requests with 429 and 5% with
//! 5xx and every key goes stale within seconds (so every run is mid-rotation
//! somewhere); then one clean run on the same host must leave every slot serving one
//! live key and no minted key unreferenced. And across hosts (different instance ids,
//! so a dead owner cannot be proven dead): convergence within one lease.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::harness::*;
use keyrotd::sim::{OwnerRef, RetryAfter};
use StoreKind::{File, Vault};

/// `prod-a` (backend, worker) and `prod-b` (backend), each account with one stale key.
fn org(b: &mut Bench) {
    let sim = &b.sim;
    let now = sim.now();
    for (project, sas) in [
        ("prod-a", &["backend", "worker"][..]),
        ("prod-b", &["backend"][..]),
    ] {
        let p = sim.add_project(project);
        for sa in sas {
            let id = sim.add_service_account(&p, sa).unwrap();
            sim.add_key_at(
                &p,
                OwnerRef::ServiceAccount(id),
                "legacy",
                now - 200 * DAY,
                None,
            )
            .unwrap();
        }
    }
    b.register_slots();
}

/// One `keyrotd once`, when (after its spawn) it logged its first `rotation.started`,
/// and whether it did at all (a scan the faults failed rotates nothing).
async fn run_watched(b: &Bench, failpoints: Option<&str>) -> (Exit, Duration, bool) {
    let started = Instant::now();
    let child = b.command(&["once"], failpoints).spawn().expect("spawn");
    let (wait, rotating) = spawn_watching(child, Duration::from_secs(60), "rotation.started");
    let rotated = rotating.await.is_ok();
    let since = started.elapsed();
    (wait.await.expect("wait"), since, rotated)
}

/// How long (ms, at least 20) a run went on after its first `rotation.started`.
fn after_start(exit: &Exit, since: Duration) -> u64 {
    (exit.elapsed.saturating_sub(since).as_millis() as u64).max(20)
}

fn ctx(b: &Bench) -> Ctx<'_> {
    Ctx {
        bench: b,
        grace: b.spec.policy_duration("grace_period"),
        max_age: Duration::from_secs(90 * 86400),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_random_sigkills_under_api_faults_then_one_clean_run() {
    let seed: u64 = std::env::var("KEYROTD_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("KEYROTD_CHAOS_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let spec = Spec::new(&[File, Vault])
        .policy("max_age", "\"1s\"")
        .policy("grace_period", "\"1s\"");
    let mut b = Bench::new(spec).await;
    org(&mut b);
    b.sim.update_faults(|f| {
        f.rate_limit_rate = 0.10;
        f.server_error_rate = 0.05;
        f.retry_after = RetryAfter::Millis(20);
        f.latency = Duration::from_millis(15);
    });
    // How long an uninterrupted run goes on after its first `rotation.started`: the
    // kills land inside that stretch (not in the scan before it, whose length varies
    // with the faults and the machine's load).
    // A run the faults stopped before any rotation says nothing: up to five tries.
    let mut rest = 20;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (calibration, since, rotated) = run_watched(&b, None).await;
        rest = after_start(&calibration, since);
        if rotated {
            break;
        }
    }
    println!("an uninterrupted run takes {rest} ms after its first rotation.started");
    // Keys minted, as the API saw them: a killed process's last log lines may be lost.
    let creates = |b: &Bench| {
        b.sim
            .requests_to(keyrotd::sim::Route::CreateServiceAccountKey)
            .iter()
            .filter(|r| (200..300).contains(&r.status))
            .count()
    };
    let creates_before = creates(&b);
    let (mut killed, mut minted, mut revoked) = (0, 0, 0);
    for run in 0..20 {
        let started = Instant::now();
        let child = b.command(&["once"], None).spawn().expect("spawn");
        let pid = child.id().expect("pid");
        let (wait, rotating) = spawn_watching(child, Duration::from_secs(60), "rotation.started");
        let _ = tokio::time::timeout(Duration::from_secs(10), rotating).await;
        let since = started.elapsed();
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..rest))).await;
        // Not once it has been reaped (its pid could be reused); it may still end by
        // itself just before the signal, so kill finding no one is fine.
        if !wait.is_finished() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(std::process::Stdio::null())
                .status();
        }
        let exit = wait.await.expect("wait");
        if exit.crashed() {
            killed += 1;
        } else {
            // It ended before the kill: later runs (no bootstrap, a loaded machine)
            // differ from the calibration; aim the next kills at what this one took.
            rest = (rest + after_start(&exit, since)) / 2;
        }
        revoked += exit.events("key.revoked").len();
        // I1 holds at every moment, not only after the clean run.
        let snap = b.snapshot().await.expect("snapshot");
        check_i1(&b, &snap).unwrap_or_else(|e| panic!("seed {seed}, run {run}: {e}"));
        // Long enough for every key to go stale again (max_age 1 s): each run has
        // rotations to be killed in.
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1100..1800))).await;
    }
    minted += creates(&b).saturating_sub(creates_before);
    assert!(
        killed >= 10,
        "seed {seed}: only {killed} of 20 runs were killed"
    );
    assert!(
        minted >= 3,
        "seed {seed}: the runs minted only {minted} keys: the kills did not land mid-rotation"
    );

    // The world settles: no faults, keys no longer go stale, grace periods end.
    b.sim.update_faults(|f| {
        f.rate_limit_rate = 0.0;
        f.server_error_rate = 0.0;
        f.latency = Duration::ZERO;
    });
    b.rewrite_config(|s| s.policy.retain(|(k, _)| *k != "max_age"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let c = ctx(&b);
    let s = step(&c, None)
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    assert_eq!(s.exit.code, Some(0), "seed {seed}:\n{}", s.exit.tail());
    // Every slot serves one live key everywhere, nothing in flight. (A rotation the
    // clean run finished for a killed one keeps its previous key for its grace.)
    check_i1(&b, &s.after).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    for slot in &b.slots {
        let mut served = std::collections::BTreeSet::new();
        for store in b.stores.keys() {
            let st = &s.after[&(store.clone(), slot.path.clone())];
            let cur = st
                .current
                .as_ref()
                .unwrap_or_else(|| panic!("seed {seed}: {store} at {} serves nothing", slot.path));
            assert!(
                st.pending.is_none() && st.book.intent.is_none(),
                "seed {seed}: {store} at {} has a rotation in flight after the clean run:\n{}",
                slot.path,
                s.exit.tail()
            );
            served.insert(cur.key_id.clone());
        }
        assert_eq!(
            served.len(),
            1,
            "seed {seed}: stores of {} disagree",
            slot.path
        );
    }
    let left = unaccounted(&b, &s.after);
    assert!(
        left.is_empty(),
        "seed {seed}: minted keys left unreferenced: {left:?}"
    );
    println!(
        "seed {seed}: {killed} of 20 runs killed; they minted {minted} keys and revoked {revoked}; one clean run converged"
    );
}

/// A process of host A dies mid-rotation (after staging in the first store only);
/// host B cannot prove it dead, so it waits for A's lease, then takes over: converged
/// within one lease of the crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_on_another_host_converges_within_one_lease() {
    let lease = Duration::from_secs(4);
    let spec = Spec::new(&[File, Vault])
        .policy("lease", "\"4s\"")
        .policy("grace_period", "\"1s\"");
    let mut b = Bench::new(spec).await;
    org(&mut b);
    let mut a = b.command(&["once"], Some("after_stage_one=1*return"));
    a.env("KEYROTD__DAEMON__INSTANCE_ID", "host-a:keyrotd");
    let ea = wait_child(a.spawn().expect("spawn"), Duration::from_secs(60)).await;
    let crashed_at = Instant::now();
    assert!(ea.crashed(), "A did not crash:\n{}", ea.tail());
    let c = ctx(&b);
    let mut runs = 0;
    loop {
        let mut cmd = b.command(&["once"], None);
        cmd.env("KEYROTD__DAEMON__INSTANCE_ID", "host-b:keyrotd");
        let e = wait_child(cmd.spawn().expect("spawn"), Duration::from_secs(60)).await;
        runs += 1;
        assert_eq!(e.code, Some(0), "B run {runs}:\n{}", e.tail());
        let snap = b.snapshot().await.expect("snapshot");
        check_i1(&b, &snap).unwrap_or_else(|err| panic!("B run {runs}: {err}"));
        if converged(&c, &snap).is_ok() {
            break;
        }
        if crashed_at.elapsed() < lease {
            // Inside A's lease B must leave A's slot alone, and say so.
            assert!(
                !e.events("rotation.busy").is_empty() || runs > 1,
                "B run {runs} neither busy nor converged:\n{}",
                e.tail()
            );
        }
        assert!(
            crashed_at.elapsed() < lease + Duration::from_secs(6),
            "not converged within one lease ({lease:?}) of the crash: {}\n{}",
            converged(&c, &snap).unwrap_err(),
            e.tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "converged {:?} after the crash, in {runs} runs of host B",
        crashed_at.elapsed()
    );
}
