//! Seeded organizations for tests, benchmarks, `keyrotd demo` and `keyrotd sim`,
//! with the ground truth a test compares keyrotd's view against.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::{OwnerRef, Sim};
use crate::openai::models::OwnerType;

const DAY: i64 = 86_400;
const ENVS: [&str; 3] = ["prod", "staging", "dev"];
const WORDS: [&str; 12] = [
    "payments",
    "search",
    "billing",
    "chat",
    "analytics",
    "support",
    "ingest",
    "reports",
    "assistant",
    "mobile",
    "web",
    "ml",
];
const SA_NAMES: [&str; 8] = [
    "backend", "worker", "batch", "ingest", "api", "cron", "etl", "webhooks",
];
const USERS: [(&str, &str); 8] = [
    ("Alice Anders", "alice"),
    ("Bob Brown", "bob"),
    ("Carol Chen", "carol"),
    ("Dan Diaz", "dan"),
    ("Eve Evans", "eve"),
    ("Frank Fox", "frank"),
    ("Grace Gill", "grace"),
    ("Heidi Hart", "heidi"),
];
const USER_KEY_NAMES: [&str; 5] = ["laptop", "notebook", "local-dev", "ci", "scratch"];

/// A recipe for a simulated organization. Builder methods share the fields' names.
///
/// Projects are named `prod-*`, `staging-*`, `dev-*` in turn (`prod-payments`,
/// `staging-payments`, `dev-payments`, `prod-search`, ...; a numeric suffix once the
/// words run out); service accounts `backend`, `worker`, `batch`, ... Fractions are
/// exact counts (rounded) over the keys they apply to, not probabilities:
/// `stale_fraction` over all keys, `never_used_fraction` over all keys,
/// `inactive_owner_fraction` over user keys (each user key in a project has its own
/// user, whose project access is then inactive).
///
/// Stale keys are created `max_age + 1..=300 days` ago, fresh ones at most
/// `min(0.9 * max_age, max_age - 1 day)` ago (half of `max_age` when it is under two
/// days), so no key sits near the boundary.
///
/// Parses from `key=value` pairs separated by commas, e.g.
/// `projects=50,archived=2,service_accounts=2,keys_per_sa=1,user_keys=1,stale=0.3,
/// inactive=0.1,never_used=0.1,max_age=90d,seed=7`.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    pub seed: u64,
    /// Active projects.
    pub projects: usize,
    /// Archived projects, on top of `projects`, populated the same way.
    pub archived_projects: usize,
    pub service_accounts_per_project: usize,
    pub keys_per_service_account: usize,
    pub user_keys_per_project: usize,
    pub stale_fraction: f64,
    pub inactive_owner_fraction: f64,
    pub never_used_fraction: f64,
    pub max_age: Duration,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario::new(0)
    }
}

impl Scenario {
    /// Three projects, two service accounts with one key each and one user key per
    /// project; a quarter of the keys stale, a tenth never used; `max_age` 90 days.
    pub fn new(seed: u64) -> Scenario {
        Scenario {
            seed,
            projects: 3,
            archived_projects: 0,
            service_accounts_per_project: 2,
            keys_per_service_account: 1,
            user_keys_per_project: 1,
            stale_fraction: 0.25,
            inactive_owner_fraction: 0.0,
            never_used_fraction: 0.1,
            max_age: Duration::from_secs(90 * DAY as u64),
        }
    }
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    pub fn projects(mut self, n: usize) -> Self {
        self.projects = n;
        self
    }
    pub fn archived_projects(mut self, n: usize) -> Self {
        self.archived_projects = n;
        self
    }
    pub fn service_accounts_per_project(mut self, n: usize) -> Self {
        self.service_accounts_per_project = n;
        self
    }
    pub fn keys_per_service_account(mut self, n: usize) -> Self {
        self.keys_per_service_account = n;
        self
    }
    pub fn user_keys_per_project(mut self, n: usize) -> Self {
        self.user_keys_per_project = n;
        self
    }
    pub fn stale_fraction(mut self, f: f64) -> Self {
        self.stale_fraction = f;
        self
    }
    pub fn inactive_owner_fraction(mut self, f: f64) -> Self {
        self.inactive_owner_fraction = f;
        self
    }
    pub fn never_used_fraction(mut self, f: f64) -> Self {
        self.never_used_fraction = f;
        self
    }
    pub fn max_age(mut self, d: Duration) -> Self {
        self.max_age = d;
        self
    }

    /// A new simulator with admin key `admin_key`, populated.
    pub fn build(&self, admin_key: &str) -> (Sim, GroundTruth) {
        let sim = Sim::with_seed(admin_key, self.seed);
        let truth = self.populate(&sim);
        (sim, truth)
    }

    /// Adds this scenario's projects, accounts and keys to `sim` (timestamps relative
    /// to the simulator's now) and returns what was created.
    pub fn populate(&self, sim: &Sim) -> GroundTruth {
        let mut rng = StdRng::seed_from_u64(self.seed ^ 0x5eed_5eed);
        let mut st = sim.lock();
        let now = st.now();
        let max_age = self.max_age.as_secs() as i64;
        let long_ago = now - max_age - 400 * DAY;

        let n_projects = self.projects + self.archived_projects;
        let pool = USERS.len().max(self.user_keys_per_project);
        let users: Vec<(String, String)> = (0..pool.min(n_projects * self.user_keys_per_project))
            .map(|j| {
                let (name, handle) = match USERS.get(j) {
                    Some(&(name, handle)) => (name.to_owned(), handle.to_owned()),
                    None => (format!("User {j}"), format!("user{j}")),
                };
                let id = st.new_user(&name, &format!("{handle}@example.com"), "member", long_ago);
                (id, name)
            })
            .collect();

        // Per-key draws, made up front so that fractions are exact.
        let per_project = self.service_accounts_per_project * self.keys_per_service_account
            + self.user_keys_per_project;
        let total = n_projects * per_project;
        let stale = exact_subset(&mut rng, total, self.stale_fraction);
        let never_used = exact_subset(&mut rng, total, self.never_used_fraction);
        let user_total = n_projects * self.user_keys_per_project;
        let inactive = exact_subset(&mut rng, user_total, self.inactive_owner_fraction);

        let fresh_max = if max_age >= 2 * DAY {
            (max_age * 9 / 10).min(max_age - DAY)
        } else {
            max_age / 2
        };
        let times = |rng: &mut StdRng, k: usize| -> (i64, Option<i64>, bool) {
            let created_at = if stale[k] {
                now - max_age - rng.gen_range(DAY..=300 * DAY)
            } else {
                now - rng.gen_range(0..=fresh_max.max(0))
            };
            let last_used = (!never_used[k]).then(|| rng.gen_range(created_at..=now));
            (created_at, last_used, stale[k])
        };

        let mut truth = GroundTruth {
            now,
            max_age: self.max_age,
            projects: Vec::with_capacity(n_projects),
            keys: Vec::with_capacity(total),
        };
        let mut k = 0usize;
        let mut u = 0usize;
        for i in 0..n_projects {
            let archived = i >= self.projects;
            let name = project_name(i);
            let pid = st.new_project(&name, long_ago + i as i64);
            let mut project = TruthProject {
                id: pid.clone(),
                name: name.clone(),
                archived,
                service_accounts: Vec::new(),
            };
            for s in 0..self.service_accounts_per_project {
                let sa_name = indexed(&SA_NAMES, s);
                let by = st.seed_actor(None);
                let Ok(sa_id) = st.new_sa(&pid, &sa_name, "member", long_ago, &by) else {
                    continue;
                };
                project
                    .service_accounts
                    .push((sa_id.clone(), sa_name.clone()));
                for n in 0..self.keys_per_service_account {
                    let (created_at, last_used_at, is_stale) = times(&mut rng, k);
                    k += 1;
                    let key_name = format!("{sa_name}-key-{}", n + 1);
                    let owner = OwnerRef::ServiceAccount(sa_id.clone());
                    let Ok(key_id) = st.new_key(
                        &pid,
                        owner,
                        &key_name,
                        created_at,
                        last_used_at,
                        None,
                        Vec::new(),
                        false,
                        &by,
                    ) else {
                        continue;
                    };
                    truth.keys.push(TruthKey {
                        project_id: pid.clone(),
                        project_name: name.clone(),
                        project_archived: archived,
                        key_id: key_id.clone(),
                        name: key_name,
                        owner_type: OwnerType::ServiceAccount,
                        owner_id: sa_id.clone(),
                        owner_name: sa_name.clone(),
                        created_at,
                        last_used_at,
                        owner_inactive: false,
                        stale: is_stale,
                        value: st.keys[&key_id].value.clone(),
                    });
                }
            }
            for j in 0..self.user_keys_per_project {
                let (created_at, last_used_at, is_stale) = times(&mut rng, k);
                k += 1;
                let (user_id, user_name) = users[(i + j) % users.len()].clone();
                let owner_inactive = inactive[u];
                u += 1;
                if owner_inactive {
                    let _ = st.set_owner_active(&pid, &user_id, false);
                }
                let handle = user_name.split(' ').next().unwrap_or("user").to_lowercase();
                let key_name = format!("{handle}-{}", indexed(&USER_KEY_NAMES, j));
                let owner = OwnerRef::User(user_id.clone());
                let by = st.seed_actor(Some(&owner));
                let Ok(key_id) = st.new_key(
                    &pid,
                    owner,
                    &key_name,
                    created_at,
                    last_used_at,
                    None,
                    Vec::new(),
                    false,
                    &by,
                ) else {
                    continue;
                };
                truth.keys.push(TruthKey {
                    project_id: pid.clone(),
                    project_name: name.clone(),
                    project_archived: archived,
                    key_id: key_id.clone(),
                    name: key_name,
                    owner_type: OwnerType::User,
                    owner_id: user_id,
                    owner_name: user_name,
                    created_at,
                    last_used_at,
                    owner_inactive,
                    stale: is_stale,
                    value: st.keys[&key_id].value.clone(),
                });
            }
            if archived {
                let _ = st.archive(&pid, now - rng.gen_range(DAY..=30 * DAY));
            }
            truth.projects.push(project);
        }
        truth
    }
}

/// `prod-payments`, `staging-payments`, `dev-payments`, `prod-search`, ...
fn project_name(i: usize) -> String {
    let env = ENVS[i % ENVS.len()];
    let word = WORDS[(i / ENVS.len()) % WORDS.len()];
    match i / (ENVS.len() * WORDS.len()) {
        0 => format!("{env}-{word}"),
        round => format!("{env}-{word}-{}", round + 1),
    }
}

/// `names[i]`, with a numeric suffix once the list runs out.
fn indexed(names: &[&str], i: usize) -> String {
    match i / names.len() {
        0 => names[i].to_owned(),
        round => format!("{}-{}", names[i % names.len()], round + 1),
    }
}

/// `round(n * fraction)` of `n` positions, chosen at random.
fn exact_subset(rng: &mut StdRng, n: usize, fraction: f64) -> Vec<bool> {
    let take = ((n as f64) * fraction.clamp(0.0, 1.0)).round() as usize;
    let mut marks: Vec<bool> = (0..n).map(|i| i < take).collect();
    marks.shuffle(rng);
    marks
}

impl FromStr for Scenario {
    type Err = String;

    /// `key=value[,key=value...]`; keys: `seed`, `projects`, `archived`,
    /// `service_accounts`, `keys_per_sa`, `user_keys`, `stale`, `inactive`,
    /// `never_used`, `max_age` (humantime, e.g. `90d`). Unset keys keep the defaults of
    /// [`Scenario::new`].
    fn from_str(s: &str) -> Result<Scenario, String> {
        let mut sc = Scenario::new(0);
        for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("scenario: expected key=value, got {pair:?}"))?;
            let (key, value) = (key.trim(), value.trim());
            let bad = |e: &dyn fmt::Display| format!("scenario: {key}={value:?}: {e}");
            let count = || value.parse::<usize>().map_err(|e| bad(&e));
            let fraction = || {
                let f = value.parse::<f64>().map_err(|e| bad(&e))?;
                if (0.0..=1.0).contains(&f) {
                    Ok(f)
                } else {
                    Err(bad(&"must be between 0 and 1"))
                }
            };
            match key {
                "seed" => sc.seed = value.parse().map_err(|e| bad(&e))?,
                "projects" => sc.projects = count()?,
                "archived" | "archived_projects" => sc.archived_projects = count()?,
                "service_accounts" | "sa" => sc.service_accounts_per_project = count()?,
                "keys_per_sa" | "keys" => sc.keys_per_service_account = count()?,
                "user_keys" => sc.user_keys_per_project = count()?,
                "stale" => sc.stale_fraction = fraction()?,
                "inactive" => sc.inactive_owner_fraction = fraction()?,
                "never_used" => sc.never_used_fraction = fraction()?,
                "max_age" => sc.max_age = humantime::parse_duration(value).map_err(|e| bad(&e))?,
                _ => return Err(format!("scenario: unknown key {key:?}")),
            }
        }
        Ok(sc)
    }
}

/// What a [`Scenario`] created.
#[derive(Clone, Debug)]
pub struct GroundTruth {
    /// The simulator's now when it was populated.
    pub now: i64,
    pub max_age: Duration,
    pub projects: Vec<TruthProject>,
    /// Every key, in creation order.
    pub keys: Vec<TruthKey>,
}

impl GroundTruth {
    /// One key by id.
    pub fn key(&self, key_id: &str) -> Option<&TruthKey> {
        self.keys.iter().find(|k| k.key_id == key_id)
    }
    /// The keys of one project.
    pub fn keys_in<'a>(&'a self, project_id: &'a str) -> impl Iterator<Item = &'a TruthKey> + 'a {
        self.keys.iter().filter(move |k| k.project_id == project_id)
    }
    /// The stale keys.
    pub fn stale(&self) -> impl Iterator<Item = &TruthKey> + '_ {
        self.keys.iter().filter(|k| k.stale)
    }
}

/// A project a [`Scenario`] created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TruthProject {
    pub id: String,
    pub name: String,
    pub archived: bool,
    /// (id, name) of each service account.
    pub service_accounts: Vec<(String, String)>,
}

/// A key a [`Scenario`] created. `Debug` redacts the value.
#[derive(Clone, PartialEq, Eq)]
pub struct TruthKey {
    pub project_id: String,
    pub project_name: String,
    pub project_archived: bool,
    pub key_id: String,
    pub name: String,
    pub owner_type: OwnerType,
    pub owner_id: String,
    pub owner_name: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    /// The owner lacks effective access (`owner_project_access: inactive`).
    pub owner_inactive: bool,
    /// Created more than `max_age` before `now`.
    pub stale: bool,
    pub value: String,
}

impl fmt::Debug for TruthKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TruthKey")
            .field("project_id", &self.project_id)
            .field("project_name", &self.project_name)
            .field("project_archived", &self.project_archived)
            .field("key_id", &self.key_id)
            .field("name", &self.name)
            .field("owner_type", &self.owner_type)
            .field("owner_id", &self.owner_id)
            .field("owner_name", &self.owner_name)
            .field("created_at", &self.created_at)
            .field("last_used_at", &self.last_used_at)
            .field("owner_inactive", &self.owner_inactive)
            .field("stale", &self.stale)
            .field("value", &"[REDACTED]")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_patterned() {
        let names: Vec<String> = (0..200).map(project_name).collect();
        let unique: std::collections::HashSet<&String> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
        assert_eq!(
            &names[..4],
            [
                "prod-payments",
                "staging-payments",
                "dev-payments",
                "prod-search"
            ]
        );
        assert_eq!(indexed(&SA_NAMES, 9), "worker-2");
    }

    #[test]
    fn parses_cli_form() {
        let sc: Scenario = "projects=5, archived=1,stale=0.5,max_age=30d,seed=9"
            .parse()
            .unwrap();
        assert_eq!(
            sc,
            Scenario::new(9)
                .projects(5)
                .archived_projects(1)
                .stale_fraction(0.5)
                .max_age(Duration::from_secs(30 * DAY as u64))
        );
        assert!("stale=2".parse::<Scenario>().unwrap_err().contains("stale"));
        assert!("colour=blue"
            .parse::<Scenario>()
            .unwrap_err()
            .contains("colour"));
    }

    #[test]
    fn fractions_are_exact_and_ages_clear_of_the_boundary() {
        let sc = Scenario::new(3)
            .projects(10)
            .archived_projects(2)
            .user_keys_per_project(2)
            .stale_fraction(0.25)
            .inactive_owner_fraction(0.5)
            .never_used_fraction(0.2);
        let (_sim, t) = sc.build("sk-admin-x");
        assert_eq!(t.keys.len(), 12 * 4);
        assert_eq!(t.stale().count(), 12);
        assert_eq!(
            t.keys.iter().filter(|k| k.last_used_at.is_none()).count(),
            10
        );
        assert_eq!(t.keys.iter().filter(|k| k.owner_inactive).count(), 12);
        assert!(t
            .keys
            .iter()
            .all(|k| k.owner_type == OwnerType::User || !k.owner_inactive));
        let max_age = t.max_age.as_secs() as i64;
        for k in &t.keys {
            let age = t.now - k.created_at;
            if k.stale {
                assert!(age > max_age + DAY - 1, "{k:?}");
            } else {
                assert!(age <= max_age - DAY, "{k:?}");
            }
        }
        assert_eq!(t.projects.iter().filter(|p| p.archived).count(), 2);
    }
}
