//! Planning cost without HTTP: policy evaluation, slot derivation and `Plan::build`
//! over inventories of 1k, 10k and 100k keys built in memory.
//!
//! Run with `cargo bench --bench plan` (add `-- --quick` for a fast pass). Target:
//! 100k keys planned in under 50 ms (`plan/slots+build/100000`).
//!
//! The organization mirrors `bench_scan`'s: 10 keys per project (4 service accounts
//! with 2 keys each, 2 user keys), projects named `prod-*`, `staging-*`, `dev-*` in
//! turn, one rule covering `prod-*` (a third of the projects), so about 13% of the keys
//! fall under a rule. A third of the keys are stale. Every slot's one store holds a
//! current key; half the slots also hold a previous key in its grace period.

use std::time::Duration;

use chrono::{DateTime, Utc};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use secrecy::SecretString;

use keyrotd::config::{Config, PolicyConfig, Rule};
use keyrotd::openai::models::{
    ApiKeyOwner, OwnerAccess, OwnerServiceAccount, OwnerType, OwnerUser, Project, ProjectApiKey,
    ServiceAccount,
};
use keyrotd::plan::{self, Inventory, Plan, ProjectInventory, SlotView};
use keyrotd::policy;
use keyrotd::store::{SecretRecord, SlotState, Version};

const DAY: i64 = 86_400;
const SAS_PER_PROJECT: usize = 4;
const KEYS_PER_SA: usize = 2;
const USER_KEYS: usize = 2;
const KEYS_PER_PROJECT: usize = SAS_PER_PROJECT * KEYS_PER_SA + USER_KEYS;
const ENVS: [&str; 3] = ["prod", "staging", "dev"];

const CONFIG: &str = r#"
[openai]
admin_key_env = "KEYROTD_BENCH_ADMIN_KEY"
[policy]
max_age = "90d"
grace_period = "24h"
[stores.file]
type = "file"
dir = "/nonexistent/keyrotd-bench"
[[rotate]]
name = "prod"
project = "prod-*"
service_account = "*"
stores = ["file"]
path = "openai/{project_name}/{service_account_name}"
"#;

fn now() -> DateTime<Utc> {
    policy::ts(1_800_000_000)
}

/// A deterministic spread of ages: a third of the keys older than 90 days.
fn created_at(n: usize) -> i64 {
    let days = (n * 37 % 135) as i64; // 0..=134 days, 1/3 above 90
    now().timestamp() - days * DAY - (n % 3600) as i64
}

fn sa_key(n: usize, sa_id: &str, sa_name: &str, p: usize) -> ProjectApiKey {
    ProjectApiKey {
        id: format!("key_{n:08}"),
        object: Some("organization.project.api_key".into()),
        redacted_value: Some("sk-...abcd".into()),
        name: Some(format!("{sa_name}-key-{}", n % KEYS_PER_SA + 1)),
        created_at: created_at(n),
        last_used_at: (n % 10 != 0).then(|| now().timestamp() - (n % 40) as i64 * DAY),
        expires_at: None,
        owner_project_access: Some(OwnerAccess::Active),
        owner: ApiKeyOwner {
            kind: OwnerType::ServiceAccount,
            user: None,
            service_account: Some(OwnerServiceAccount {
                id: sa_id.to_string(),
                name: Some(sa_name.to_string()),
                created_at: Some(now().timestamp() - 400 * DAY + p as i64),
                role: Some("member".into()),
            }),
        },
    }
}

fn user_key(n: usize, u: usize) -> ProjectApiKey {
    ProjectApiKey {
        id: format!("key_{n:08}"),
        object: Some("organization.project.api_key".into()),
        redacted_value: Some("sk-...abcd".into()),
        name: Some(format!("user{u}-laptop")),
        created_at: created_at(n),
        last_used_at: (n % 10 != 0).then(|| now().timestamp() - (n % 120) as i64 * DAY),
        expires_at: None,
        owner_project_access: Some(if n % 7 == 0 {
            OwnerAccess::Inactive
        } else {
            OwnerAccess::Active
        }),
        owner: ApiKeyOwner {
            kind: OwnerType::User,
            user: Some(OwnerUser {
                id: format!("user_{u:04}"),
                email: Some(format!("user{u}@example.com")),
                name: Some(format!("User {u}")),
                created_at: None,
                role: Some("member".into()),
            }),
            service_account: None,
        },
    }
}

/// `keys` keys in `keys / 10` projects, service accounts listed where the rule covers.
fn inventory(keys: usize, rules: &[Rule]) -> Inventory {
    let projects = keys / KEYS_PER_PROJECT;
    let mut n = 0;
    let mut out = Vec::with_capacity(projects);
    for p in 0..projects {
        let name = format!("{}-app{:05}", ENVS[p % ENVS.len()], p / ENVS.len());
        let project = Project {
            id: format!("proj_{p:06}"),
            object: Some("organization.project".into()),
            name: Some(name.clone()),
            created_at: now().timestamp() - 500 * DAY,
            archived_at: None,
            status: Some("active".into()),
        };
        let mut pkeys = Vec::with_capacity(KEYS_PER_PROJECT);
        let mut sas = Vec::with_capacity(SAS_PER_PROJECT);
        for s in 0..SAS_PER_PROJECT {
            let sa_id = format!("svc_acct_{p:06}_{s}");
            let sa_name = ["backend", "worker", "batch", "ingest"][s];
            sas.push(ServiceAccount {
                id: sa_id.clone(),
                object: Some("organization.project.service_account".into()),
                name: sa_name.into(),
                role: Some("member".into()),
                created_at: now().timestamp() - 400 * DAY + p as i64,
            });
            for _ in 0..KEYS_PER_SA {
                pkeys.push(sa_key(n, &sa_id, sa_name, p));
                n += 1;
            }
        }
        for u in 0..USER_KEYS {
            pkeys.push(user_key(n, (p + u) % 50));
            n += 1;
        }
        let covered = rules
            .iter()
            .any(|r| r.project.is_match(&project.id) || r.project.is_match(&name));
        out.push(ProjectInventory {
            project,
            keys: pkeys,
            service_accounts: covered.then_some(sas),
        });
    }
    Inventory {
        scanned_at: now(),
        projects: out,
        creators: None,
        usage: Default::default(),
    }
}

/// One store per slot holding the account's first key as current; every other slot
/// also holds its second key as the previous one, promoted an hour ago.
fn views(inv: &Inventory, rules: &[Rule]) -> Vec<SlotView> {
    plan::slots(inv, rules)
        .into_iter()
        .enumerate()
        .map(|(i, slot)| {
            let p = inv
                .projects
                .iter()
                .find(|p| p.project.id == slot.project_id)
                .expect("slot project");
            let mut own = p.keys.iter().filter(|k| {
                k.owner
                    .service_account
                    .as_ref()
                    .is_some_and(|sa| sa.id == slot.service_account_id)
            });
            let current = own.next().expect("a key per account");
            let previous = own.next();
            let mut state = SlotState {
                current: Some(SecretRecord {
                    api_key: SecretString::from("sk-proj-bench"),
                    key_id: current.id.clone(),
                    project_id: slot.project_id.clone(),
                    service_account_id: slot.service_account_id.clone(),
                    created_at: policy::ts(current.created_at),
                    managed_by: "keyrotd".into(),
                }),
                version: Version(format!("{i:064x}")),
                ..SlotState::default()
            };
            if i % 2 == 0 {
                state.book.previous_key_id = previous.map(|k| k.id.clone());
                state.book.promoted_at = Some(now() - chrono::Duration::hours(1));
            }
            SlotView {
                slot,
                states: vec![("file".to_string(), Ok(state))],
                record_keys: vec![None],
            }
        })
        .collect()
}

fn setup() -> (Vec<Rule>, PolicyConfig) {
    std::env::set_var("KEYROTD_BENCH_ADMIN_KEY", "sk-admin-bench");
    let cfg = Config::from_toml(CONFIG).expect("bench config is valid");
    (cfg.rules(), cfg.policy.clone())
}

fn bench_plan(c: &mut Criterion) {
    let (rules, policy) = setup();
    let mut group = c.benchmark_group("plan");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    for keys in [1_000usize, 10_000, 100_000] {
        let inv = inventory(keys, &rules);
        assert_eq!(inv.key_count(), keys);
        let views = views(&inv, &rules);
        group.throughput(Throughput::Elements(keys as u64));
        if keys >= 100_000 {
            group.sample_size(20);
        }

        // Policy alone: the pure verdict of every key.
        group.bench_with_input(BenchmarkId::new("evaluate", keys), &inv, |b, inv| {
            b.iter(|| {
                let mut rotate = 0usize;
                for p in &inv.projects {
                    for k in &p.keys {
                        let e = policy::evaluate(k, &p.project, &rules, &policy, now());
                        rotate += (e.verdict == policy::Verdict::Rotate) as usize;
                    }
                }
                black_box(rotate)
            })
        });

        // Slots from the inventory (what a cycle derives before reading the stores).
        group.bench_with_input(BenchmarkId::new("slots", keys), &inv, |b, inv| {
            b.iter(|| black_box(plan::slots(inv, &rules)).len())
        });

        // Plan::build given the slot views (policy + store overlay + slot states).
        group.bench_with_input(BenchmarkId::new("build", keys), &inv, |b, inv| {
            b.iter(|| {
                black_box(Plan::build(inv, &views, &rules, &policy, now()))
                    .keys
                    .len()
            })
        });

        // What `keyrotd plan` / a cycle does in memory: slots, then Plan::build. The
        // views are rebuilt outside the timing, since reading them is store I/O.
        group.bench_with_input(BenchmarkId::new("slots+build", keys), &inv, |b, inv| {
            b.iter(|| {
                let slots = plan::slots(inv, &rules);
                let plan = Plan::build(inv, &views, &rules, &policy, now());
                black_box((slots.len(), plan.keys.len()))
            })
        });

        // `keyrotd plan --format json` on top of it.
        let built = Plan::build(&inv, &views, &rules, &policy, now());
        group.bench_with_input(BenchmarkId::new("to_json", keys), &built, |b, plan| {
            b.iter(|| black_box(plan.to_json()).len())
        });
    }
    group.finish();
}

criterion_group!(benches, bench_plan);
criterion_main!(benches);
