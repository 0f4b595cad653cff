//! Two replicas (DESIGN.md §5 I5): two `keyrotd once` processes started together against
//! the same organization and stores keep I1–I4 and rotate each slot at most once per
//! cycle; a replica paused (SIGSTOP) in the middle of a rotation and resumed (SIGCONT)
//! after the other has moved the slot on neither overwrites nor revokes the newer key.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::harness::*;
use keyrotd::sim::OwnerRef;
use StoreKind::{Aws, File, Vault};

/// `prod-a` (backend, worker) and `prod-b` (backend), each service account with one
/// stale key; plus an unmanaged `staging-a`. The rule covers every `prod-*` account.
/// Returns the stale keys by slot path.
fn org(b: &mut Bench) -> BTreeMap<String, String> {
    let sim = &b.sim;
    let now = sim.now();
    let mut legacy = BTreeMap::new();
    for (project, sas) in [
        ("prod-a", &["backend", "worker"][..]),
        ("prod-b", &["backend"][..]),
    ] {
        let p = sim.add_project(project);
        for sa in sas {
            let id = sim.add_service_account(&p, sa).unwrap();
            let k = sim
                .add_key_at(
                    &p,
                    OwnerRef::ServiceAccount(id),
                    "legacy",
                    now - 200 * DAY,
                    Some(now),
                )
                .unwrap();
            legacy.insert(format!("{}/{project}/{sa}", b.prefix), k.id);
        }
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
    legacy
}

/// A bench over [`org`] whose rule covers only `project`'s first slot, which already
/// serves its stale key (promoted 30 days ago): the slot the replica tests race on.
async fn one_seeded_slot(
    mut spec: Spec,
    project: &str,
) -> (Bench, BTreeMap<String, String>, SlotRef) {
    spec.project_glob = project.into();
    let mut b = Bench::new(spec).await;
    let legacy = org(&mut b);
    let slot = b.slots[0].clone();
    b.seed_current(&slot, &legacy[&slot.path], Duration::from_secs(30 * 86400))
        .await;
    (b, legacy, slot)
}

fn ctx(b: &Bench) -> Ctx<'_> {
    Ctx {
        bench: b,
        grace: b.spec.policy_duration("grace_period"),
        max_age: Duration::from_secs(90 * 86400),
    }
}

/// Key ids promoted per slot (project id, service account id), from the audit events
/// of every process.
fn promoted(exits: &[&Exit]) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for e in exits {
        for l in e.events("rotation.completed") {
            let p = l["project_id"].as_str().unwrap_or_default().to_string();
            let sa = l["service_account_id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let k = l["key_id"].as_str().unwrap_or_default().to_string();
            out.entry((p, sa)).or_default().insert(k);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_started_together_rotate_each_slot_once() {
    let started = Instant::now();
    // AWS alone: its intents are tags, whose compare-and-set is read-back, not atomic.
    let store_sets: [&[StoreKind]; 4] =
        [&[File, Vault], &[Vault, Aws], &[File, Vault, Aws], &[Aws]];
    let mut exit1 = 0;
    let mut busy_or_conflict = 0;
    let mut minted_twice = 0;
    let mut both_lost = 0;
    for i in 0..20 {
        let spec = Spec::new(store_sets[i % 4])
            .sa_glob("*")
            .policy("lease", "\"30s\"")
            .policy("orphan_min_age", "\"1h\"")
            .daemon("concurrency", "4");
        let mut b = Bench::new(spec).await;
        let legacy = org(&mut b);
        // Half the slots already serve their (stale) key: a rotation race; the others
        // are empty: a bootstrap race.
        for (n, slot) in b.slots.clone().iter().enumerate() {
            if n % 2 == (i % 2) {
                b.seed_current(slot, &legacy[&slot.path], Duration::from_secs(30 * 86400))
                    .await;
            }
        }
        let c = ctx(&b);
        let before = b.snapshot().await.unwrap();
        let watcher = Watcher::start(&b);
        let pa = b.command(&["once"], None).spawn().unwrap();
        let pb = b.command(&["once"], None).spawn().unwrap();
        let (ea, eb) = tokio::join!(
            wait_child(pa, Duration::from_secs(60)),
            wait_child(pb, Duration::from_secs(60))
        );
        let (_, violations) = watcher.finish().await;
        let after = b.snapshot().await.unwrap();
        let label = format!("iteration {i} ({})", store_names(&b.spec.stores));
        let tails = || {
            format!(
                "A: {}\n{}\nB: {}\n{}",
                ea.describe(),
                ea.tail(),
                eb.describe(),
                eb.tail()
            )
        };
        assert!(
            violations.is_empty(),
            "{label}: {violations:?}\n{}",
            tails()
        );
        for e in [&ea, &eb] {
            assert!(
                matches!(e.code, Some(0) | Some(1)),
                "{label}: {}\n{}",
                e.describe(),
                tails()
            );
            if e.code == Some(1) {
                exit1 += 1;
            }
            busy_or_conflict += e.events("rotation.conflict").len();
        }
        let r = (|| -> Result<(), String> {
            check_i1(&b, &after)?;
            let both_ok = ea.code == Some(0) && eb.code == Some(0);
            check_i2(&b, &after, !both_ok, &BTreeSet::new())?;
            check_i3(&c, &before, &after, &b.sim.deleted_keys())?;
            let secrets = b.secrets();
            check_i4("replica A's logs", &ea.stderr, &secrets)?;
            check_i4("replica B's logs", &eb.stderr, &secrets)?;
            // Each slot rotated at most once, and (both processes done) exactly once,
            // every store serving that key.
            let prom = promoted(&[&ea, &eb]);
            for (slot, keys) in &prom {
                if keys.len() > 1 {
                    return Err(format!(
                        "slot {slot:?} rotated {} times: {keys:?}",
                        keys.len()
                    ));
                }
            }
            for slot in &b.slots {
                // Both replicas lost check-and-set on this slot (possible only where
                // the first store is AWS, whose intents are tags): safe, and the next
                // cycle rotates it.
                let sa_ids: BTreeSet<String> = b
                    .sim
                    .service_accounts(&slot.project_id)
                    .into_iter()
                    .filter(|s| s.name == slot.sa_name)
                    .map(|s| s.id)
                    .collect();
                let lost = |e: &Exit| {
                    e.events("rotation.conflict").iter().any(|l| {
                        l["project_id"] == slot.project_id.as_str()
                            && sa_ids.contains(l["service_account_id"].as_str().unwrap_or(""))
                    })
                };
                if lost(&ea) && lost(&eb) {
                    both_lost += 1;
                    continue;
                }
                let currents: BTreeSet<Option<String>> = b
                    .stores
                    .keys()
                    .map(|s| {
                        after[&(s.clone(), slot.path.clone())]
                            .current
                            .as_ref()
                            .map(|c| c.key_id.clone())
                    })
                    .collect();
                if currents.len() != 1 || currents.contains(&None) {
                    if both_ok {
                        return Err(format!("{}: stores do not agree: {currents:?}", slot.path));
                    }
                    continue;
                }
                let cur = currents.into_iter().next().unwrap().unwrap();
                if cur == legacy[&slot.path] {
                    return Err(format!("{} was not rotated", slot.path));
                }
                let minted: Vec<String> = b
                    .sim
                    .keys(&slot.project_id)
                    .into_iter()
                    .chain(b.sim.deleted_keys().iter().filter_map(|d| b.sim.key(d)))
                    .filter(|k| {
                        k.minted && k.owner_name == slot.sa_name && k.project_id == slot.project_id
                    })
                    .map(|k| k.id)
                    .collect();
                if minted.len() > 1 {
                    minted_twice += 1;
                }
            }
            Ok(())
        })();
        if let Err(e) = r {
            panic!("{label}: {e}\n{}", tails());
        }
    }
    println!(
        "20 iterations in {:.1}s: {exit1} process exits with 1, {busy_or_conflict} lost check-and-sets, \
         {minted_twice} slots where both replicas minted (the loser revoked its key), \
         {both_lost} slots where both lost (rotated next cycle)",
        started.elapsed().as_secs_f64()
    );
}

/// Polls `store` until `ready` holds for the slot's state, then (after `delay_ms`)
/// stops `pid`.
async fn stop_when(
    b: &Bench,
    store: &str,
    path: &str,
    pid: u32,
    ready: impl Fn(&keyrotd::store::SlotState) -> bool,
    delay_ms: u64,
) -> Result<(), String> {
    let key = (store.to_string(), path.to_string());
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(snap) = b.snapshot().await {
            if snap.get(&key).is_some_and(&ready) {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                signal(pid, "STOP");
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    Err("the moment to pause never came".into())
}

/// Replica A is paused with its key staged and being verified; its lease runs out;
/// replica B finishes A's rotation and then (after the grace period, with a short
/// max_age) rotates the slot once more. A, resumed, must not promote its key over B's
/// newer one nor revoke it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_replica_neither_overwrites_nor_revokes_the_newer_key() {
    for stores in [&[File, Vault][..], &[Vault, Aws][..]] {
        let spec = Spec::new(stores)
            .policy("lease", "\"2s\"")
            .policy("grace_period", "\"1s\"")
            .policy("verify_timeout", "\"20s\"");
        // One slot: A's only work is the rotation under test.
        let (mut b, _legacy, slot) = one_seeded_slot(spec, "prod-a").await;
        let c = ctx(&b);
        // New keys take 2.5 s to work: A keeps verifying long enough to be caught.
        b.sim
            .update_faults(|f| f.propagation_delay = Duration::from_millis(2500));
        let first = b.store_order()[0].clone();
        let before = b.snapshot().await.unwrap();
        let deleted_before: BTreeSet<String> = b.sim.deleted_keys().into_iter().collect();
        let pa = b.command(&["once"], None).spawn().unwrap();
        let pid = pa.id().unwrap();
        let wa = tokio::spawn(wait_child(pa, Duration::from_secs(120)));
        // Staged in the first store: A goes on to the others and to verifying (which
        // takes 2.5 s). Pausing it a moment later makes sure it holds no file lock (a
        // stopped process keeps its flock; a writer waiting on it gives up after 10 s).
        stop_when(&b, &first, &slot.path, pid, |st| st.pending.is_some(), 150)
            .await
            .unwrap();
        let staged = b.snapshot().await.unwrap();
        let k_a = staged[&(first.clone(), slot.path.clone())]
            .pending
            .as_ref()
            .unwrap()
            .key_id
            .clone();

        // B, after A's lease: finishes A's rotation (K_A promoted everywhere).
        tokio::time::sleep(Duration::from_millis(3000)).await;
        b.sim
            .update_faults(|f| f.propagation_delay = Duration::ZERO);
        let s1 = step(&c, None)
            .await
            .unwrap_or_else(|e| panic!("B run 1: {e}"));
        assert_eq!(s1.exit.code, Some(0), "B run 1:\n{}", s1.exit.tail());
        assert_eq!(
            s1.after[&(first.clone(), slot.path.clone())]
                .current
                .as_ref()
                .map(|c| c.key_id.clone()),
            Some(k_a.clone()),
            "B finished A's rotation"
        );
        // B again, with max_age 1s: once K_A's predecessor is retired, K_A is stale
        // and B rotates to K_B.
        b.rewrite_config(|s| {
            s.policy.push(("max_age", "\"1s\"".into()));
        });
        let c = ctx(&b);
        let mut k_b = None;
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let s = step(&c, None).await.unwrap_or_else(|e| panic!("B: {e}"));
            let cur = s.after[&(first.clone(), slot.path.clone())]
                .current
                .as_ref()
                .map(|c| c.key_id.clone())
                .unwrap();
            if cur != k_a {
                k_b = Some(cur);
                break;
            }
        }
        let k_b = k_b.expect("B rotated past K_A");

        // A resumes.
        let mid = b.snapshot().await.unwrap();
        let deleted_mid: BTreeSet<String> = b.sim.deleted_keys().into_iter().collect();
        signal(pid, "CONT");
        let ea = wa.await.unwrap();
        let after = b.snapshot().await.unwrap();
        for ((store, path), st) in &after {
            if path == &slot.path {
                assert_eq!(
                    st.current.as_ref().map(|c| c.key_id.clone()),
                    Some(k_b.clone()),
                    "{}: A overwrote B's newer key in {store}:\n{}",
                    store_names(stores),
                    ea.tail()
                );
            }
        }
        assert!(b.sim.is_live(&k_b), "A revoked B's key:\n{}", ea.tail());
        // A sees the slot moved on (its lease renewal loses check-and-set) and leaves
        // it: no failure, since the slot is in good hands, and nothing written.
        assert_eq!(ea.code, Some(0), "A:\n{}", ea.tail());
        assert_eq!(ea.events("rotation.conflict").len(), 1, "{}", ea.tail());
        assert!(ea.events("rotation.completed").is_empty(), "{}", ea.tail());
        let check = check_after(&c, &ea, &mid, &after, &deleted_mid, 0, Vec::new());
        if let Err(e) = check {
            panic!("{}: after A resumed: {e}", store_names(stores));
        }
        check_i3(&c, &before, &after, &{
            let mut d: Vec<String> = b
                .sim
                .deleted_keys()
                .into_iter()
                .filter(|x| !deleted_before.contains(x) && !deleted_mid.contains(x))
                .collect();
            d.sort();
            d
        })
        .unwrap();
        let why = ea.events("rotation.conflict");
        println!(
            "{}: A (paused with {k_a} staged) resumed after B promoted {k_b}: {} ({}); no store changed",
            store_names(stores),
            ea.describe(),
            why.first().and_then(|l| l["message"].as_str()).unwrap_or("")
        );
    }
}

/// Replica A is paused right after recording its intent (before or just after
/// minting); after its lease B cleans up and rotates. A, resumed, mints or stages
/// into a slot that moved on: it must lose check-and-set and revoke only its own key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_paused_after_its_intent_loses_cleanly() {
    let spec = Spec::new(&[File, Vault]).policy("lease", "\"1s\"");
    let (b, legacy, slot) = one_seeded_slot(spec, "prod-a").await;
    // Slow API calls: the pause lands before A's create is answered.
    b.sim
        .update_faults(|f| f.latency = Duration::from_millis(150));
    let c = ctx(&b);
    let pa = b.command(&["once"], None).spawn().unwrap();
    let pid = pa.id().unwrap();
    let wa = tokio::spawn(wait_child(pa, Duration::from_secs(120)));
    // The intent is in Vault (the second store): A holds no file lock any more and is
    // minting.
    stop_when(
        &b,
        "vault",
        &slot.path,
        pid,
        |st| st.book.intent.is_some(),
        0,
    )
    .await
    .unwrap();
    b.sim.update_faults(|f| f.latency = Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let s = step(&c, None).await.unwrap_or_else(|e| panic!("B: {e}"));
    assert_eq!(s.exit.code, Some(0), "B:\n{}", s.exit.tail());
    let k_b = s.after[&("file".to_string(), slot.path.clone())]
        .current
        .as_ref()
        .unwrap()
        .key_id
        .clone();
    assert_ne!(k_b, legacy[&slot.path], "B rotated");
    let mid = b.snapshot().await.unwrap();
    let deleted_mid: BTreeSet<String> = b.sim.deleted_keys().into_iter().collect();
    signal(pid, "CONT");
    let ea = wa.await.unwrap();
    let after = b.snapshot().await.unwrap();
    for ((store, path), st) in &after {
        if path == &slot.path {
            assert_eq!(
                st.current.as_ref().map(|c| c.key_id.clone()),
                Some(k_b.clone()),
                "A overwrote B's key in {store}:\n{}",
                ea.tail()
            );
            assert!(st.pending.is_none(), "A left a pending key in {store}");
        }
    }
    check_after(&c, &ea, &mid, &after, &deleted_mid, 0, Vec::new())
        .unwrap_or_else(|e| panic!("after A resumed: {e}"));
    // Whatever A minted is revoked (by A, or by B's clean-up); nothing else of the slot.
    let own_unserved = unaccounted(&b, &after);
    assert!(own_unserved.is_empty(), "A left {own_unserved:?} live");
    println!(
        "A paused after its intent: {}; B's key stays",
        ea.describe()
    );
}

/// Replica B lists the organization, then is slow to read its stores (its Vault answers
/// late); meanwhile replica A rotates the slot. B's listing predates A's new key: B must
/// not take the key the stores now serve for a missing one and rotate a second time
/// (which would also overwrite the previous key, still in its grace period).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_with_a_stale_listing_does_not_rotate_again() {
    let proxy = Cutoff::start(socket_of(&env("KEYROTD_TEST_VAULT_ADDR"))).await;
    let spec = Spec::new(&[File, Vault])
        .policy("lease", "\"30s\"")
        .policy("grace_period", "\"1h\"");
    let (b, legacy, slot) = one_seeded_slot(spec, "prod-a").await;
    let c = ctx(&b);
    let b_config = b.dir.path().join("replica-b.toml");
    std::fs::write(
        &b_config,
        b.config_text()
            .replace(&env("KEYROTD_TEST_VAULT_ADDR"), &proxy.url()),
    )
    .unwrap();
    let before = b.snapshot().await.unwrap();
    let projects = b.sim.projects().len();

    proxy.slow_down(Duration::from_millis(700));
    let mut cmd = b.command(&["once"], None);
    cmd.arg("--config").arg(&b_config);
    let child_b = cmd.spawn().unwrap();
    let wb = tokio::spawn(wait_child(child_b, Duration::from_secs(120)));
    // B's scan is done once it has listed every project's keys.
    let deadline = Instant::now() + Duration::from_secs(30);
    while b.sim.requests_to(keyrotd::sim::Route::ListApiKeys).len() < projects {
        assert!(Instant::now() < deadline, "B never scanned");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let ea = b.run_once(None).await;
    assert_eq!(ea.code, Some(0), "A:\n{}", ea.tail());
    let k_a = ea.events("rotation.completed")[0]["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    let eb = wb.await.unwrap();
    let after = b.snapshot().await.unwrap();
    let prom = promoted(&[&ea, &eb]);
    for (s, keys) in &prom {
        assert!(
            keys.len() <= 1,
            "slot {s:?} rotated {} times in one cycle: {keys:?}\nB: {}\n{}",
            keys.len(),
            eb.describe(),
            eb.tail()
        );
    }
    for ((store, path), st) in &after {
        if path == &slot.path {
            assert_eq!(
                st.current.as_ref().map(|c| c.key_id.as_str()),
                Some(k_a.as_str()),
                "{store} serves A's key"
            );
            assert_eq!(
                st.book.previous_key_id.as_deref(),
                Some(legacy[&slot.path].as_str()),
                "{store} still remembers the previous key"
            );
        }
    }
    check_i1(&b, &after).unwrap();
    check_i2(&b, &after, eb.code != Some(0), &BTreeSet::new()).unwrap();
    check_i3(&c, &before, &after, &b.sim.deleted_keys()).unwrap();
    println!(
        "B (stale listing): {}; A's key {k_a} stays current",
        eb.describe()
    );
}

/// Polls the slot's state in `store` until `pred` holds (at most 30 s).
async fn wait_state(
    b: &Bench,
    store: &str,
    path: &str,
    pred: impl Fn(&keyrotd::store::SlotState) -> bool,
) -> keyrotd::store::SlotState {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(snap) = b.snapshot().await {
            if let Some(st) = snap.get(&(store.to_string(), path.to_string())) {
                if pred(st) {
                    return st.clone();
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "{store} {path}: condition not reached"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A short lease is renewed while its owner works: A's mint is slow (a failpoint
/// sleeps past half the lease), so A renews before staging; B, started after A's
/// *first* lease has run out but while A is still staging, finds the slot held and
/// leaves it alone; A then finishes with the one key it minted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_lease_is_renewed_while_its_owner_works() {
    let spec = Spec::new(&[File, Vault])
        .policy("lease", "\"4s\"")
        .policy("verify_timeout", "\"2s\"");
    let (b, _legacy, slot) = one_seeded_slot(spec, "prod-b").await;
    let pa = b
        .command(
            &["once"],
            Some("after_mint=sleep(2500);after_stage_one=1*sleep(5000)"),
        )
        .spawn()
        .unwrap();
    let wa = tokio::spawn(wait_child(pa, Duration::from_secs(60)));
    let first = wait_state(&b, "file", &slot.path, |st| st.book.intent.is_some()).await;
    let first_lease = first.book.intent.unwrap().lease_until;
    // A renewed before staging: the staged state carries a later lease.
    let staged = wait_state(&b, "file", &slot.path, |st| st.pending.is_some()).await;
    let renewed = staged
        .book
        .intent
        .expect("intent kept while staging")
        .lease_until;
    assert!(
        renewed > first_lease,
        "lease not renewed: {first_lease} -> {renewed}"
    );
    // Past the first lease, inside the renewed one: B must leave the slot alone.
    while chrono::Utc::now() < first_lease + chrono::Duration::milliseconds(300) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        chrono::Utc::now() < renewed,
        "the test is too slow for its lease"
    );
    let eb = b.run_once(None).await;
    assert_eq!(eb.code, Some(0), "B:\n{}", eb.tail());
    assert_eq!(eb.events("rotation.busy").len(), 1, "B:\n{}", eb.tail());
    assert!(
        eb.events("key.minted").is_empty(),
        "B minted:\n{}",
        eb.tail()
    );
    assert!(
        eb.events("rotation.takeover").is_empty(),
        "B:\n{}",
        eb.tail()
    );
    assert!(
        eb.events("key.revoked").is_empty(),
        "B revoked:\n{}",
        eb.tail()
    );
    let ea = wa.await.unwrap();
    assert_eq!(ea.code, Some(0), "A:\n{}", ea.tail());
    let done = ea.events("rotation.completed");
    assert_eq!(done.len(), 1, "A:\n{}", ea.tail());
    let key = done[0]["key_id"].as_str().unwrap().to_string();
    let after = b.snapshot().await.unwrap();
    for store in ["file", "vault"] {
        let st = &after[&(store.to_string(), slot.path.clone())];
        assert_eq!(
            st.current.as_ref().map(|c| c.key_id.clone()),
            Some(key.clone())
        );
        assert!(
            st.pending.is_none() && st.book.intent.is_none(),
            "{store}: {st:?}"
        );
    }
    assert_eq!(b.sim.all_keys().iter().filter(|k| k.minted).count(), 1);
}

/// A key staged in every store is finished by whichever process gets to it: A stops
/// after staging (a failpoint sleeps) with most of its lease left; B verifies and
/// promotes A's key at once instead of waiting out the lease; A, resuming, finds its
/// promotion landed. One key minted, served everywhere, the old key kept for its grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_staged_key_is_finished_by_whoever_gets_there() {
    let spec = Spec::new(&[File, Vault])
        .policy("lease", "\"60s\"")
        .policy("grace_period", "\"1h\"");
    let (b, legacy, slot) = one_seeded_slot(spec, "prod-b").await;
    let pa = b
        .command(&["once"], Some("after_stage=sleep(6000)"))
        .spawn()
        .unwrap();
    let wa = tokio::spawn(wait_child(pa, Duration::from_secs(60)));
    wait_state(&b, "vault", &slot.path, |st| st.pending.is_some()).await;
    let eb = b.run_once(None).await;
    assert_eq!(eb.code, Some(0), "B:\n{}", eb.tail());
    assert_eq!(eb.events("rotation.takeover").len(), 1, "B:\n{}", eb.tail());
    assert!(
        eb.events("key.minted").is_empty(),
        "B minted:\n{}",
        eb.tail()
    );
    let done = eb.events("rotation.completed");
    assert_eq!(done.len(), 1, "B:\n{}", eb.tail());
    let key = done[0]["key_id"].as_str().unwrap().to_string();
    assert!(
        !wa.is_finished(),
        "A was still asleep while B finished its rotation"
    );
    let ea = wa.await.unwrap();
    assert_eq!(ea.code, Some(0), "A:\n{}", ea.tail());
    assert!(ea.events("rotation.failed").is_empty(), "A:\n{}", ea.tail());
    let after = b.snapshot().await.unwrap();
    for store in ["file", "vault"] {
        let st = &after[&(store.to_string(), slot.path.clone())];
        assert_eq!(
            st.current.as_ref().map(|c| c.key_id.clone()),
            Some(key.clone())
        );
        assert!(
            st.pending.is_none() && st.book.intent.is_none(),
            "{store}: {st:?}"
        );
        assert_eq!(
            st.book.previous_key_id.as_deref(),
            Some(legacy[&slot.path].as_str())
        );
    }
    assert_eq!(b.sim.all_keys().iter().filter(|k| k.minted).count(), 1);
    assert!(
        b.sim.key(&legacy[&slot.path]).is_some(),
        "the old key is kept for its grace"
    );
}
