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
fn keys(sim: &keyrotd::sim::Sim) -> BTreeMap<String, bool> {
    sim.all_keys()
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
                revoke_old: None,
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

/// The run's seed (`KEYROTD_DECIDE_SEED` replays one; printed) and its generator.
fn seeded() -> (u64, rand::rngs::StdRng) {
    let seed: u64 = std::env::var("KEYROTD_DECIDE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("KEYROTD_DECIDE_SEED={seed}");
    (seed, rand::rngs::StdRng::seed_from_u64(seed))
}

/// Prints what a run compared, (cycles, mints, revocations), and fails a run that
/// compared no mint or no revocation.
fn tally(compared: (usize, usize, usize), more: &str) {
    let (cycles, mints, revocations) = compared;
    println!("compared {cycles} cycles: {mints} mints, {revocations} revocations{more}");
    assert!(mints > 0 && revocations > 0, "the cases mint and revoke");
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
    let (seed, mut rng) = seeded();
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
            let before = keys(&w.sim);
            let report = engine.cycle().await;
            let ctx = format!(
                "seed {seed}, case {case}, step {step} (+{step_by:?}, unused={unused})\nplanned:\n{}\nreport: {:?}",
                describe(&planned.planned),
                report.slots.iter().map(|s| (&s.outcome, &s.performed)).collect::<Vec<_>>()
            );
            assert!(!report.any_failed(), "{ctx}");
            let after = keys(&w.sim);

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
    tally(compared, "");
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

/// One action of `once --dry-run --format json` or `plan --format json`, as compared:
/// (action, project id, service account id, key id, reason).
type Listed = (String, String, String, String, String);

fn listed(actions: &serde_json::Value) -> BTreeSet<Listed> {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    actions
        .as_array()
        .unwrap_or_else(|| panic!("an actions list: {actions}"))
        .iter()
        .map(|a| {
            (
                s(&a["action"]),
                s(&a["project_id"]),
                s(&a["service_account_id"]),
                s(&a["key_id"]),
                s(&a["reason"]),
            )
        })
        .collect()
}

/// Whether the listed action deletes a key (`PlannedAction::revokes`, from its JSON).
fn deletes(a: &Listed) -> bool {
    match a.0.as_str() {
        "revoke" | "delete_service_account" => true,
        "cleanup_intent" => a.4 == Why::Unrecorded.as_str() && !a.3.is_empty(),
        _ => false,
    }
}

/// Runs `keyrotd <args> --format json` and parses its stdout.
async fn json_of(b: &crate::harness::Bench, args: &[&str]) -> serde_json::Value {
    let exit = b.run(&[args, &["--format", "json"]].concat(), None).await;
    assert_eq!(exit.code, Some(0), "{args:?}: {}", exit.tail());
    serde_json::from_str(&exit.stdout)
        .unwrap_or_else(|e| panic!("{args:?} prints JSON ({e}): {}", exit.stdout))
}

/// The earliest `due_at` of the plan's later actions that is a fixed time: not those of
/// a slot whose mint is due now (they count from that mint, so from each run's now).
fn next_due(plan: &serde_json::Value) -> Option<chrono::DateTime<Utc>> {
    let minting: BTreeSet<(String, String)> = listed(&plan["actions"])
        .into_iter()
        .filter(|a| a.0 == "mint")
        .map(|a| (a.1, a.2))
        .collect();
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    plan["slots"]
        .as_array()?
        .iter()
        .flat_map(|s| s["later"].as_array().into_iter().flatten())
        .filter(|a| !minting.contains(&(s(&a["project_id"]), s(&a["service_account_id"]))))
        .filter_map(|a| a["due_at"].as_str()?.parse().ok())
        .min()
}

/// Through the binary, as an operator sees it: the actions `once --dry-run --format
/// json` lists are those `plan --format json` lists as due, and exactly the mints and
/// revocations the real `once` then performs on the simulated organization, while the
/// organization changes between cycles (new projects to bootstrap, keys made and
/// deleted by hand, orphans, consumers on old keys, grace periods ending, rotations
/// interrupted at a step boundary), under both
/// revocation policies and with a consumer-document store beside a separate-state one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_binary_the_dry_run_json_lists_what_once_then_does() {
    use crate::harness::{Bench, Spec, StoreKind};
    let (seed, mut rng) = seeded();
    let mut compared = (0, 0, 0);
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for unused in [false, true] {
        let mut spec = Spec::new(&[StoreKind::File, StoreKind::Vault])
            .sa_glob("backend")
            .policy("grace_period", "\"3s\"");
        if unused {
            spec = spec
                .policy("revoke_when", "\"unused\"")
                .policy("min_grace", "\"0s\"")
                .policy("usage_report_delay", "\"0s\"")
                .policy("max_grace", "\"6s\"");
        }
        let b = Bench::new(spec).await;
        let day = 86_400;
        let add_project = |name: &str| {
            let p = b.sim.add_project(name);
            for sa in ["backend", "worker"] {
                b.add_legacy_account(&p, sa);
            }
        };
        add_project("prod-payments");
        add_project("staging-web");
        let mut projects = 1;
        for step in 0..8 {
            // The world changes between cycles.
            let managed: Vec<(String, String)> = b
                .sim
                .projects()
                .into_iter()
                .filter(|p| p.name.starts_with("prod-"))
                .flat_map(|p| {
                    b.sim
                        .service_accounts(&p.id)
                        .into_iter()
                        .filter(|sa| sa.name == "backend")
                        .map(move |sa| (p.id.clone(), sa.id))
                })
                .collect();
            let (p, sa) = managed[rng.gen_range(0..managed.len())].clone();
            let change = rng.gen_range(0..7);
            match change {
                0 => {
                    projects += 1;
                    add_project(&format!("prod-new-{projects}"));
                }
                1 => {
                    b.sim.add_key_at(
                        &p,
                        OwnerRef::ServiceAccount(sa),
                        "by-hand",
                        b.sim.now() - 120 * day,
                        None,
                    );
                }
                2 => {
                    b.sim.add_key_at(
                        &p,
                        OwnerRef::ServiceAccount(sa),
                        &format!("keyrotd-20260101T000000Z-{:04x}", rng.gen::<u16>()),
                        b.sim.now() - 3 * day,
                        None,
                    );
                }
                3 => {
                    for k in b.sim.keys(&p) {
                        b.sim.use_key(&k.value);
                    }
                }
                4 => {
                    if let Some(k) = b.sim.keys(&p).first() {
                        b.sim.delete_key(&k.id);
                    }
                }
                // A rotation interrupted at a step boundary (abort, like SIGKILL).
                5 => {
                    projects += 1;
                    add_project(&format!("prod-new-{projects}"));
                    let at = ["after_intent", "after_mint", "after_stage", "after_publish"]
                        [rng.gen_range(0..4)];
                    let exit = b.run_once(Some(&format!("{at}=return"))).await;
                    assert!(exit.crashed(), "stopped {at}: {}", exit.tail());
                    // Its lease (1 s) runs out: before, the same resume is a takeover.
                    tokio::time::sleep(Duration::from_millis(1100)).await;
                }
                _ => tokio::time::sleep(Duration::from_millis(3500)).await,
            }
            // No deadline falls between the dry run and the cycle: wait past one that
            // is close (what "due" means is the clock's, not the test's, business).
            let mut tries = 0;
            let plan = loop {
                let plan = json_of(&b, &["plan"]).await;
                tries += 1;
                match next_due(&plan) {
                    Some(t) if t < Utc::now() + chrono::Duration::seconds(4) => {
                        assert!(tries < 10, "a later action stays due soon: {plan}");
                        let wait = (t - Utc::now()).to_std().unwrap_or_default();
                        tokio::time::sleep(wait + Duration::from_millis(1100)).await;
                    }
                    _ => break plan,
                }
            };
            let before = keys(&b.sim);
            let dry = json_of(&b, &["once", "--dry-run"]).await;
            assert!(dry["generated_at"].is_string(), "{dry}");
            assert_eq!(keys(&b.sim), before, "the dry run changed nothing");
            let actions = listed(&dry["actions"]);
            let ctx = format!(
                "seed {seed}, unused={unused}, step {step}, change {change}\ndry run: {dry}"
            );
            assert_eq!(listed(&plan["actions"]), actions, "plan vs dry run\n{ctx}");

            let exit = b.run_once(None).await;
            assert_eq!(exit.code, Some(0), "{ctx}\n{}", exit.tail());
            let after = keys(&b.sim);
            let minted = after.keys().filter(|k| !before.contains_key(*k)).count();
            let mints = actions.iter().filter(|a| a.0 == "mint").count();
            assert_eq!(minted, mints, "mints\n{ctx}");
            let revoked: BTreeSet<&str> = before
                .iter()
                .filter(|(k, gone)| !**gone && after.get(*k).is_none_or(|g| *g))
                .map(|(k, _)| k.as_str())
                .collect();
            let expected: BTreeSet<&str> = actions
                .iter()
                .filter(|a| deletes(a) && before.get(&a.3) == Some(&false))
                .map(|a| a.3.as_str())
                .collect();
            assert_eq!(revoked, expected, "revocations\n{ctx}");
            compared.0 += 1;
            compared.1 += mints;
            compared.2 += expected.len();
            for a in &actions {
                *kinds.entry(format!("{} ({})", a.0, a.4)).or_default() += 1;
            }
        }
    }
    tally(compared, &format!("; actions {kinds:?}"));
}

/// `keyrotd <args>` on a pseudo-terminal (util-linux `script`), as an operator types
/// it: what the terminal showed.
fn on_a_tty(b: &crate::harness::Bench, args: &str) -> String {
    use crate::harness::{ADMIN_KEY, ADMIN_KEY_ENV, BIN};
    let cmd = format!(
        "'{BIN}' --config '{}' --log-format json {args} 2>/dev/null",
        b.config_path.display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env(ADMIN_KEY_ENV, ADMIN_KEY)
        .env_remove("RUST_LOG")
        .env_remove("FAILPOINTS")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script (util-linux) runs");
    assert!(out.status.success(), "{args}: {out:?}");
    String::from_utf8_lossy(&out.stdout).replace('\r', "")
}

/// On a terminal, `once --dry-run` prints its actions as a table and `once` ends with
/// the one-screen summary: what it minted and revoked, what waits until when, what
/// failed, in the counts the dry run announced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_terminal_the_dry_run_is_a_table_and_once_ends_with_a_summary() {
    use crate::harness::{Bench, Spec, StoreKind};
    let b = Bench::new(Spec::new(&[StoreKind::File]).policy("grace_period", "\"2s\"")).await;
    let legacy_key = |project: &str| {
        let p = b.sim.add_project(project);
        let key = b.add_legacy_account(&p, "backend");
        let OwnerRef::ServiceAccount(sa) = key.owner.clone() else {
            unreachable!("a service account's key")
        };
        (p, sa, key)
    };
    let (p, sa, first) = legacy_key("prod-payments");
    let exit = b.run_once(None).await;
    assert_eq!(exit.code, Some(0), "bootstrap: {}", exit.tail());
    // Past the grace period: a new project to bootstrap, an orphan on the managed
    // account.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, _, legacy) = legacy_key("prod-search");
    let orphan = b
        .sim
        .add_key_at(
            &p,
            OwnerRef::ServiceAccount(sa),
            "keyrotd-20260101T000000Z-beef",
            b.sim.now() - 3 * 86_400,
            None,
        )
        .unwrap();

    let table = on_a_tty(&b, "once --dry-run");
    let header = table.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("ACTION") && header.contains("REASON") && header.ends_with("DUE"),
        "{table}"
    );
    let row = |kind: &str, project: &str, what: &str| {
        table
            .lines()
            .any(|l| l.starts_with(kind) && l.contains(project) && l.contains(what))
    };
    assert!(row("mint", "prod-search", "bootstrap"), "{table}");
    assert!(row("revoke", "prod-payments", &orphan.id), "{table}");
    assert!(row("revoke", "prod-payments", &first.id), "{table}");
    assert_eq!(table.lines().count(), 4, "{table}");
    assert!(b.sim.is_live(&orphan.id), "the dry run revoked nothing");

    let summary = on_a_tty(&b, "once");
    let lines: Vec<&str> = summary.lines().collect();
    assert!(
        lines.iter().any(|l| l.starts_with("minted")
            && l.contains("prod-search / backend")
            && l.contains("bootstrap")),
        "{summary}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("revoked")
            && l.contains("prod-payments / backend")
            && l.contains(&orphan.id)
            && l.contains("orphan")),
        "{summary}"
    );
    // The new project's legacy key waits the grace period, and the summary says until
    // when.
    assert!(
        lines.iter().any(|l| l.starts_with("later: revoke")
            && l.contains(&legacy.id)
            && l.contains(" at 20")),
        "{summary}"
    );
    // And when the bootstrapped slot's key is due for rotation.
    assert!(
        lines.iter().any(|l| l.starts_with("later: mint")
            && l.contains("prod-payments / backend")
            && l.contains("(stale)")),
        "{summary}"
    );
    let last = lines.last().copied().unwrap_or_default();
    assert!(
        last.starts_with("2 slots: 1 minted, 2 revoked, 2 later, 0 busy, 0 failed"),
        "{summary}"
    );
    assert!(lines.len() < 25, "one screen: {summary}");
    assert!(!b.sim.is_live(&orphan.id) && !b.sim.is_live(&first.id) && b.sim.is_live(&legacy.id));
}
