//! The organization inventory and the read-only plan (`keyrotd plan`).
//!
//! [`scan`] reads every project, key and (for projects a rule covers) service account
//! with bounded concurrency. [`slots`] turns rules into (project, service account)
//! slots. [`Plan::build`] combines the pure [`policy`](crate::policy) verdicts with
//! what the stores hold, and renders as a table or SPEC §1 JSON.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use chrono::{DateTime, SecondsFormat, Utc};
use futures::stream::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::config::{PathVars, PolicyConfig, Rule};
use crate::openai::models::{OwnerType, Project, ProjectApiKey, ServiceAccount};
use crate::openai::{ApiResult, Client};
use crate::policy::{self, Evaluation, Reason, Verdict};
use crate::store::{SlotState, StoreError};

/// One project with its keys and, where a rule covers the project, its service accounts.
#[derive(Clone, Debug)]
pub struct ProjectInventory {
    pub project: Project,
    pub keys: Vec<ProjectApiKey>,
    /// Listed only for projects some rule's `project` glob matches.
    pub service_accounts: Option<Vec<ServiceAccount>>,
}

/// Everything the Admin API said about the organization in one scan.
#[derive(Clone, Debug)]
pub struct Inventory {
    pub scanned_at: DateTime<Utc>,
    pub projects: Vec<ProjectInventory>,
}

impl Inventory {
    pub fn key_count(&self) -> usize {
        self.projects.iter().map(|p| p.keys.len()).sum()
    }
}

fn rule_covers_project(rules: &[Rule], p: &Project) -> bool {
    rules
        .iter()
        .any(|r| r.project.is_match(&p.id) || r.project.is_match(p.display_name()))
}

/// Lists the organization: projects page by page, and, as soon as each page arrives,
/// each of its projects' keys (and service accounts where a rule covers it),
/// `concurrency` projects at a time (plus the one project page being fetched). Fails
/// as a whole on the first API error: a partial inventory would invent verdicts
/// (e.g. orphans).
pub async fn scan(
    client: &Client,
    rules: &[Rule],
    include_archived: bool,
    concurrency: usize,
) -> ApiResult<Inventory> {
    // The project pages are sequential (each needs the previous cursor); listing keys
    // only after the last of them would add pages × latency to every scan.
    let (tx, rx) = futures::channel::mpsc::unbounded::<Project>();
    let pages = async move {
        let mut after: Option<String> = None;
        loop {
            let (projects, next) = client
                .list_projects_page(include_archived, after.as_deref())
                .await?;
            for p in projects {
                // The receiver lives until the listings fail, which ends this future too.
                let _ = tx.unbounded_send(p);
            }
            match next {
                Some(next) => after = Some(next),
                None => return Ok::<_, crate::openai::ApiError>(()),
            }
        }
    };
    let listings = rx
        .map(|project| {
            let wants_sas = !project.is_archived() && rule_covers_project(rules, &project);
            async move {
                let keys = client.list_api_keys(&project.id).await?;
                let service_accounts = if wants_sas {
                    Some(client.list_service_accounts(&project.id).await?)
                } else {
                    None
                };
                Ok::<_, crate::openai::ApiError>(ProjectInventory {
                    project,
                    keys,
                    service_accounts,
                })
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect::<Vec<ProjectInventory>>();
    let ((), mut out) = futures::try_join!(pages, listings)?;
    out.sort_by(|a, b| {
        a.project
            .display_name()
            .cmp(b.project.display_name())
            .then(a.project.id.cmp(&b.project.id))
    });
    Ok(Inventory {
        scanned_at: Utc::now(),
        projects: out,
    })
}

/// A (project, service account) pair a rule manages, bound to one path in each store.
#[derive(Clone, Debug)]
pub struct Slot {
    pub rule: usize,
    pub rule_name: String,
    pub project_id: String,
    pub project_name: String,
    /// The newest service account of the slot: where a fresh key goes when the stores
    /// hold none yet.
    pub service_account_id: String,
    pub service_account_name: String,
    /// Every service account whose path renders to this slot's path, oldest first
    /// (more than one while strategy `new_service_account` moves the slot).
    pub service_accounts: Vec<(String, String)>,
    pub stores: Vec<String>,
    pub path: String,
}

impl Slot {
    /// A stable identifier for logs: `<project_id>/<service_account_id>`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.project_id, self.service_account_id)
    }
}

/// The slots the rules define: every service account (listed, or seen as a key owner)
/// of every active project, matched by the first rule that covers it. Service
/// accounts whose paths render the same in one project form one slot (so two slots
/// never write the same secret); the newest of them is the slot's default account.
pub fn slots(inv: &Inventory, rules: &[Rule]) -> Vec<Slot> {
    let mut out = Vec::new();
    for p in &inv.projects {
        // Most projects no rule covers: skip them before looking at their accounts.
        if p.project.is_archived() || !rule_covers_project(rules, &p.project) {
            continue;
        }
        let mut accounts: BTreeMap<String, (String, i64)> = BTreeMap::new();
        for sa in p.service_accounts.iter().flatten() {
            accounts.insert(sa.id.clone(), (sa.name.clone(), sa.created_at));
        }
        for k in &p.keys {
            if let (OwnerType::ServiceAccount, Some(sa)) = (k.owner.kind, &k.owner.service_account)
            {
                accounts.entry(sa.id.clone()).or_insert_with(|| {
                    (
                        sa.name.clone().unwrap_or_default(),
                        sa.created_at.unwrap_or(0),
                    )
                });
            }
        }
        let mut ordered: Vec<(String, String, i64)> = accounts
            .into_iter()
            .map(|(id, (name, at))| (id, name, at))
            .collect();
        ordered.sort_by(|a, b| a.2.cmp(&b.2).then(a.0.cmp(&b.0)));
        let mut by_path: BTreeMap<String, usize> = BTreeMap::new();
        for (sa_id, sa_name, _) in ordered {
            let Some(ri) = rules
                .iter()
                .position(|r| r.matches(&p.project.id, p.project.display_name(), &sa_name))
            else {
                continue;
            };
            let rule = &rules[ri];
            let path = rule.render_path(&PathVars {
                project_id: &p.project.id,
                project_name: p.project.display_name(),
                service_account_id: &sa_id,
                service_account_name: &sa_name,
            });
            if let Some(&i) = by_path.get(&path) {
                let slot: &mut Slot = &mut out[i];
                slot.service_accounts.push((sa_id.clone(), sa_name.clone()));
                slot.service_account_id = sa_id;
                slot.service_account_name = sa_name;
                continue;
            }
            by_path.insert(path.clone(), out.len());
            out.push(Slot {
                rule: ri,
                rule_name: rule.name.clone(),
                project_id: p.project.id.clone(),
                project_name: p.project.display_name().to_string(),
                service_account_id: sa_id.clone(),
                service_account_name: sa_name.clone(),
                service_accounts: vec![(sa_id, sa_name)],
                stores: rule.stores.clone(),
                path,
            });
        }
        // Paths are unique per project only: a rule without {project_*} in its path
        // would make projects share a secret. Keep the first, drop the rest.
    }
    let mut seen = BTreeSet::new();
    out.retain(|s| {
        seen.insert(
            s.stores
                .iter()
                .map(|st| format!("{st}:{}", s.path))
                .collect::<Vec<_>>()
                .join("|"),
        )
    });
    out
}

/// A slot's state in the SPEC §1 vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotStatus {
    /// No store holds a key yet.
    Bootstrap,
    Current,
    /// Due for rotation (stale, expiring, stores disagree, or a rotation in flight).
    Rotate,
    /// A previous key awaits retirement.
    InGrace,
    /// A store could not be read.
    Failed,
}

impl SlotStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SlotStatus::Bootstrap => "bootstrap",
            SlotStatus::Current => "current",
            SlotStatus::Rotate => "rotate",
            SlotStatus::InGrace => "in_grace",
            SlotStatus::Failed => "failed",
        }
    }
}

/// What the stores of one slot hold, as read (or the error per store).
#[derive(Debug)]
pub struct SlotView {
    pub slot: Slot,
    pub states: Vec<(String, Result<SlotState, StoreError>)>,
}

impl SlotView {
    fn ok_states(&self) -> impl Iterator<Item = (&str, &SlotState)> {
        self.states
            .iter()
            .filter_map(|(n, s)| s.as_ref().ok().map(|s| (n.as_str(), s)))
    }

    fn failed(&self) -> bool {
        self.states.iter().any(|(_, s)| s.is_err())
    }

    /// The current key id if every store agrees on one.
    pub fn agreed_current(&self) -> Option<&str> {
        let mut ids = self
            .ok_states()
            .map(|(_, s)| s.current.as_ref().map(|c| c.key_id.as_str()));
        let first = ids.next()??;
        ids.all(|i| i == Some(first)).then_some(first)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct PlanKey {
    pub project_id: String,
    pub project_name: String,
    pub key_id: String,
    pub key_name: Option<String>,
    pub owner_type: &'static str,
    pub owner_id: Option<String>,
    pub owner_name: Option<String>,
    pub created_at: String,
    pub last_used_at: Option<String>,
    pub age_days: u64,
    pub verdict: Verdict,
    pub reasons: Vec<Reason>,
    pub rule: Option<String>,
    pub stores: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PlanSlot {
    pub rule: String,
    pub project_id: String,
    pub service_account_id: String,
    pub stores: Vec<String>,
    pub paths: Vec<String>,
    pub state: SlotStatus,
    pub current_key_id: Option<String>,
}

/// The SPEC §1 plan document.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub generated_at: String,
    pub keys: Vec<PlanKey>,
    pub slots: Vec<PlanSlot>,
}

/// Counts for the summary line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub keys: usize,
    pub stale: usize,
    pub rotate: usize,
    pub revoke: usize,
    pub report: usize,
    pub orphan: usize,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Where each key id is referenced by the stores of a slot.
#[derive(Default)]
struct Refs {
    /// key id -> (store names, role)
    by_key: BTreeMap<String, (BTreeSet<String>, Role)>,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Current,
    Pending,
    Previous,
}

/// Slot-level facts the overlay needs for one managed service account.
struct Managed<'a> {
    view: &'a SlotView,
    rule: &'a Rule,
}

impl Plan {
    /// Verdicts for every key, refined by what the stores hold: a slot's previous key
    /// is `revoke` (in grace or grace over), keys the stores serve are never revoked,
    /// unreferenced `keyrotd-*` keys older than `orphan_min_age` are orphans, and other
    /// stale keys of a managed account whose slot has a current key are `revoke`.
    pub fn build(
        inv: &Inventory,
        views: &[SlotView],
        rules: &[Rule],
        policy: &PolicyConfig,
        now: DateTime<Utc>,
    ) -> Plan {
        let mut refs = Refs::default();
        let mut managed: BTreeMap<(&str, &str), Managed<'_>> = BTreeMap::new();
        for v in views {
            for (sa, _) in &v.slot.service_accounts {
                managed.insert(
                    (v.slot.project_id.as_str(), sa.as_str()),
                    Managed {
                        view: v,
                        rule: &rules[v.slot.rule],
                    },
                );
            }
            for (store, s) in v.ok_states() {
                let mut add = |id: &str, role: Role| {
                    let e = refs
                        .by_key
                        .entry(id.to_string())
                        .or_insert_with(|| (BTreeSet::new(), role));
                    e.0.insert(store.to_string());
                    e.1 = e.1.min(role);
                };
                if let Some(c) = &s.current {
                    add(&c.key_id, Role::Current);
                }
                if let Some(p) = &s.pending {
                    add(&p.key_id, Role::Pending);
                }
                if let Some(p) = &s.book.previous_key_id {
                    add(p, Role::Previous);
                }
            }
        }

        let mut keys = Vec::with_capacity(inv.key_count());
        for p in &inv.projects {
            for k in &p.keys {
                let Evaluation {
                    mut verdict,
                    mut reasons,
                    rule,
                    ..
                } = policy::evaluate(k, &p.project, rules, policy, now);
                let referenced = refs.by_key.get(&k.id);
                let sa_id = k.owner.service_account.as_ref().map(|s| s.id.as_str());
                let slot = sa_id.and_then(|sa| managed.get(&(p.project.id.as_str(), sa)));
                if let Some(m) = slot {
                    let has_current = m.view.agreed_current().is_some();
                    match referenced.map(|r| r.1) {
                        Some(Role::Current) | Some(Role::Pending) => {
                            // Served (or about to be): rotate when due, never revoke.
                        }
                        Some(Role::Previous) => {
                            // Why it is still alive (or that it is due).
                            let promoted = m
                                .view
                                .ok_states()
                                .filter_map(|(_, s)| s.book.promoted_at)
                                .max();
                            let reason = promoted.map_or(Reason::InGrace, |t| {
                                policy::retirement(
                                    policy,
                                    m.rule.grace_period,
                                    t,
                                    k.last_used_at,
                                    now,
                                )
                                .reason
                            });
                            verdict = Verdict::Revoke;
                            reasons.push(reason);
                        }
                        None if policy::is_keyrotd_key(k)
                            && policy::age(k, now) >= policy.orphan_min_age =>
                        {
                            verdict = Verdict::Orphan;
                            reasons.push(Reason::Unreferenced);
                        }
                        None if verdict == Verdict::Rotate && has_current => {
                            // The slot already serves another key: this one is an extra.
                            verdict = Verdict::Revoke;
                        }
                        None => {}
                    }
                }
                let age = policy::age(k, now);
                keys.push(PlanKey {
                    project_id: p.project.id.clone(),
                    project_name: p.project.display_name().to_string(),
                    key_id: k.id.clone(),
                    key_name: k.name.clone(),
                    owner_type: k.owner.kind.as_str(),
                    owner_id: k.owner.id().map(str::to_string),
                    owner_name: k.owner.name().map(str::to_string),
                    created_at: rfc3339(policy::ts(k.created_at)),
                    last_used_at: k.last_used_at.map(|t| rfc3339(policy::ts(t))),
                    age_days: age.as_secs() / 86400,
                    verdict,
                    reasons,
                    rule: rule.map(|i| rules[i].name.clone()),
                    stores: referenced
                        .map(|r| r.0.iter().cloned().collect())
                        .unwrap_or_default(),
                });
            }
        }

        // Verdicts of the keys some store serves as current: what the slot states need.
        let by_id: BTreeMap<&str, &PlanKey> = keys
            .iter()
            .filter(|k| {
                refs.by_key
                    .get(&k.key_id)
                    .is_some_and(|r| r.1 == Role::Current)
            })
            .map(|k| (k.key_id.as_str(), k))
            .collect();
        let slots = views
            .iter()
            .map(|v| {
                let current = v.agreed_current().map(str::to_string);
                let any_current = v.ok_states().any(|(_, s)| s.current.is_some());
                let in_flight = v
                    .ok_states()
                    .any(|(_, s)| s.pending.is_some() || s.book.intent.is_some());
                let previous = v.ok_states().any(|(_, s)| s.book.previous_key_id.is_some());
                let state = if v.failed() {
                    SlotStatus::Failed
                } else if !any_current && !in_flight {
                    SlotStatus::Bootstrap
                } else if in_flight
                    || current.is_none()
                    || current
                        .as_deref()
                        .and_then(|c| by_id.get(c))
                        .is_none_or(|k| k.verdict == Verdict::Rotate)
                {
                    SlotStatus::Rotate
                } else if previous {
                    SlotStatus::InGrace
                } else {
                    SlotStatus::Current
                };
                PlanSlot {
                    rule: v.slot.rule_name.clone(),
                    project_id: v.slot.project_id.clone(),
                    service_account_id: v.slot.service_account_id.clone(),
                    stores: v.slot.stores.clone(),
                    paths: v.slot.stores.iter().map(|_| v.slot.path.clone()).collect(),
                    state,
                    current_key_id: current,
                }
            })
            .collect();

        Plan {
            generated_at: rfc3339(now),
            keys,
            slots,
        }
    }

    pub fn summary(&self) -> Summary {
        let mut s = Summary {
            keys: self.keys.len(),
            ..Summary::default()
        };
        for k in &self.keys {
            if k.reasons.contains(&Reason::Stale) {
                s.stale += 1;
            }
            match k.verdict {
                Verdict::Rotate => s.rotate += 1,
                Verdict::Revoke => s.revoke += 1,
                Verdict::Report => s.report += 1,
                Verdict::Orphan => s.orphan += 1,
                Verdict::Ok => {}
            }
        }
        s
    }

    /// The SPEC §1 JSON document.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// A table grouped by project, coloured when `color`.
    pub fn render_table(&self, out: &mut dyn Write, color: bool) -> std::io::Result<()> {
        let paint = |code: &str, text: &str| -> String {
            if color {
                format!("\x1b[{code}m{text}\x1b[0m")
            } else {
                text.to_string()
            }
        };
        // Key ids are what people copy into other commands: never truncated.
        let kw = self
            .keys
            .iter()
            .map(|k| k.key_id.len())
            .max()
            .unwrap_or(3)
            .max(3);
        let mut by_project: BTreeMap<(&str, &str), Vec<&PlanKey>> = BTreeMap::new();
        for k in &self.keys {
            by_project
                .entry((k.project_name.as_str(), k.project_id.as_str()))
                .or_default()
                .push(k);
        }
        for ((name, id), keys) in by_project {
            writeln!(out, "{} ({id})", paint("1", name))?;
            writeln!(
                out,
                "  {:<kw$} {:<26} {:<16} {:<22} {:>5}  {:<8} REASONS",
                "KEY", "NAME", "OWNER", "OWNER NAME", "AGE", "VERDICT"
            )?;
            for k in keys {
                let verdict = format!("{:<8}", k.verdict.as_str());
                let verdict = match k.verdict {
                    Verdict::Ok => paint("32", &verdict),
                    Verdict::Rotate => paint("33", &verdict),
                    Verdict::Revoke | Verdict::Orphan => paint("31", &verdict),
                    Verdict::Report => paint("35", &verdict),
                };
                let reasons: Vec<&str> = k.reasons.iter().map(|r| r.as_str()).collect();
                writeln!(
                    out,
                    "  {:<kw$} {:<26} {:<16} {:<22} {:>4}d  {} {}",
                    k.key_id,
                    truncate(k.key_name.as_deref().unwrap_or("-"), 26),
                    k.owner_type,
                    truncate(k.owner_name.as_deref().unwrap_or("-"), 22),
                    k.age_days,
                    verdict,
                    if reasons.is_empty() {
                        "-".to_string()
                    } else {
                        reasons.join(",")
                    },
                )?;
            }
        }
        if !self.slots.is_empty() {
            writeln!(out, "{}", paint("1", "slots"))?;
            for s in &self.slots {
                writeln!(
                    out,
                    "  {:<12} {}/{} -> {} [{}] state={} current={}",
                    truncate(&s.rule, 12),
                    s.project_id,
                    s.service_account_id,
                    s.paths.first().map(String::as_str).unwrap_or("-"),
                    s.stores.join(","),
                    s.state.as_str(),
                    s.current_key_id.as_deref().unwrap_or("-"),
                )?;
            }
        }
        let sm = self.summary();
        writeln!(
            out,
            "{} keys, {} stale, {} to rotate, {} to revoke, {} report-only, {} orphaned",
            sm.keys, sm.stale, sm.rotate, sm.revoke, sm.report, sm.orphan
        )
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}
