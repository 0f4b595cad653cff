//! The organization inventory and the read-only plan (`keyrotd plan`).
//!
//! [`scan`] reads every project, key and (for projects a rule covers) service account
//! with bounded concurrency. [`slots`] turns rules into (project, service account)
//! slots. [`Plan::build`] combines the pure [`policy`] verdicts with
//! what the stores hold, and renders as a table or DESIGN.md §1 JSON.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;

use chrono::{DateTime, SecondsFormat, Utc};
use futures::stream::{StreamExt, TryStreamExt};
use futures::FutureExt;
use rustc_hash::FxHashMap as HashMap;
use serde::Serialize;

use crate::config::{PathVars, PolicyConfig, Rule};
use crate::openai::models::{
    AuditActorType, AuditEvent, AuditLog, AuditLogQuery, OwnerType, Project, ProjectApiKey,
    ServiceAccount,
};
use crate::openai::{ApiResult, Client};
use crate::policy::{self, Evaluation, Reason, Reasons, Verdict};
use crate::rotation::decide::{self, Action, ActionKind, Why};
use crate::store::{SecretRecord, SlotState, StoreError};

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
    /// Who created each key (by key id), as the audit log says: an e-mail, or
    /// [`CREATOR_KEYROTD`]. `None` when the audit log could not be read; a key the
    /// audit log says nothing of is absent.
    pub creators: Option<BTreeMap<String, String>>,
    /// Usage and cost per key and project (`[usage]`), read with the survey.
    pub usage: crate::usage::UsageState,
}

/// The creator of a key keyrotd minted with the admin key.
pub const CREATOR_KEYROTD: &str = "keyrotd";

/// Who created each listed key, from `api_key.created` entries of the audit log: a
/// `keyrotd-*` key created with an admin key is keyrotd's, any other key the acting
/// person's (a dashboard session's user, or the user owning the admin key used).
pub fn creators(inv: &Inventory, created: &[AuditLog]) -> BTreeMap<String, String> {
    let by_key: HashMap<&str, &AuditLog> = created
        .iter()
        .filter_map(|e| match &e.event {
            AuditEvent::ApiKeyCreated { id: Some(id), .. } => Some((id.as_str(), e)),
            _ => None,
        })
        .collect();
    let mut out = BTreeMap::new();
    for k in inv.projects.iter().flat_map(|p| p.keys.iter()) {
        let Some(actor) = by_key.get(k.id.as_str()).and_then(|e| e.actor.as_ref()) else {
            continue;
        };
        let who = match actor.kind {
            AuditActorType::ApiKey if policy::is_keyrotd_key(k) => Some(CREATOR_KEYROTD),
            _ => actor.email().filter(|e| !e.is_empty()),
        };
        if let Some(who) = who {
            out.insert(k.id.clone(), who.to_string());
        }
    }
    out
}

/// What a key's `expires_at` means (`expiry` of `plan` and `report`; the `state` of
/// `keyrotd_keys_expiring`). A key that never expires, or not soon, has none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpiryState {
    /// `expires_at` has passed: the key no longer authenticates.
    Expired,
    /// Expires within `policy.expiry_warning`.
    Expiring,
    /// A replaced key with an expiry: the end of its grace period, set by keyrotd
    /// (`policy.expire_replaced`), protects against a keyrotd that never runs again.
    Protected,
}

impl ExpiryState {
    pub const ALL: [ExpiryState; 3] = [
        ExpiryState::Expired,
        ExpiryState::Expiring,
        ExpiryState::Protected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExpiryState::Expired => "expired",
            ExpiryState::Expiring => "expiring",
            ExpiryState::Protected => "protected",
        }
    }

    /// The state of a key expiring at `expires_at`, replaced (a slot's previous key)
    /// or not, at `now`.
    pub fn of(
        expires_at: Option<i64>,
        replaced: bool,
        warning: std::time::Duration,
        now: DateTime<Utc>,
    ) -> Option<ExpiryState> {
        let at = policy::ts(expires_at?);
        if at <= now {
            Some(ExpiryState::Expired)
        } else if replaced {
            Some(ExpiryState::Protected)
        } else if at - now <= chrono::Duration::from_std(warning).unwrap_or(chrono::Duration::MAX) {
            Some(ExpiryState::Expiring)
        } else {
            None
        }
    }
}

impl fmt::Display for ExpiryState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Inventory {
    pub fn key_count(&self) -> usize {
        self.projects.iter().map(|p| p.keys.len()).sum()
    }
}

fn rule_covers_project(rules: &[Rule], p: &Project) -> bool {
    rules
        .iter()
        .any(|r| r.covers_project(&p.id, p.display_name()))
}

/// Lists the organization: projects page by page, and, as soon as each page arrives,
/// each of its projects' keys (and service accounts where a rule covers it),
/// `concurrency` projects at a time (plus the one project page being fetched). Fails
/// as a whole on the first API error: a partial inventory would invent verdicts
/// (e.g. orphans). Each listing is bounded by the client (no cursor followed twice, at
/// most `openai.max_pages` pages); the deadline is the caller's ([`Engine::survey`]).
///
/// [`Engine::survey`]: crate::rotation::Engine::survey
pub async fn scan(
    client: &Client,
    rules: &[Rule],
    include_archived: bool,
    concurrency: usize,
) -> ApiResult<Inventory> {
    scan_with_creations(client, rules, include_archived, concurrency, None)
        .await
        .map(|(inv, _)| inv)
}

/// Listed keys per audit-log request for their creations: one page of entries (a key
/// has one `api_key.created` entry), and a URL of about 5 KB.
pub const CREATIONS_PER_REQUEST: usize = 100;

/// [`scan`], and with `creations` the audit log's `api_key.created` entries of every
/// listed key it does not say to skip (`Some(skip)`: `skip(key)` true for a key whose
/// entry the caller has already), read while the listing goes on: each time [`CREATIONS_PER_REQUEST`]
/// listed keys are waiting, one request asks for theirs (`resource_ids[]`), under the
/// same `concurrency` limit as the listings. None of these requests waits for another,
/// and the log's entries for keys deleted long ago are never read. An audit-log
/// failure (e.g. 403 for an admin key without the permission) fails only the entries
/// (`Some(Err)`; no request is made after it), not the scan.
pub async fn scan_with_creations(
    client: &Client,
    rules: &[Rule],
    include_archived: bool,
    concurrency: usize,
    creations: Option<&(dyn Fn(&ProjectApiKey) -> bool + Sync)>,
) -> ApiResult<(Inventory, Option<ApiResult<Vec<AuditLog>>>)> {
    let concurrency = concurrency.max(1);
    // The project pages are sequential (each needs the previous cursor); listing keys
    // only after the last of them would add pages × latency to every scan.
    let (tx, rx) = futures::channel::mpsc::unbounded::<Project>();
    let pages = async move {
        let mut pages = client.project_pages(include_archived);
        while let Some(projects) = pages.next_page().await? {
            for p in projects {
                // The receiver lives until the listings fail, which ends this future too.
                let _ = tx.unbounded_send(p);
            }
        }
        Ok::<_, crate::openai::ApiError>(())
    };
    // A project's two listings go out together; at most `concurrency` requests are in
    // flight across projects (and the audit log).
    let permits = tokio::sync::Semaphore::new(concurrency);
    let permits = &permits;
    let permit = || async move {
        permits
            .acquire()
            .await
            .map_err(|_| crate::openai::ApiError::Cancelled)
    };
    // Listed key ids waiting for their audit-log request, and the requests' queue.
    let (ids_tx, ids_rx) = futures::channel::mpsc::unbounded::<Vec<String>>();
    let waiting = std::sync::Mutex::new(Vec::<String>::new());
    let (ids_tx, waiting) = (&ids_tx, &waiting);
    let queue = move |ids: &[ProjectApiKey], flush: bool| {
        let Some(skip) = creations else {
            return;
        };
        let mut w = waiting.lock().unwrap_or_else(|p| p.into_inner());
        w.extend(ids.iter().filter(|k| !skip(k)).map(|k| k.id.clone()));
        while w.len() >= CREATIONS_PER_REQUEST || (flush && !w.is_empty()) {
            let n = w.len().min(CREATIONS_PER_REQUEST);
            let _ = ids_tx.unbounded_send(w.drain(..n).collect());
        }
    };
    let listings = rx
        .map(|project| {
            let wants_sas = !project.is_archived() && rule_covers_project(rules, &project);
            async move {
                let keys = async {
                    let _p = permit().await?;
                    let keys = client.list_api_keys(&project.id).await?;
                    queue(&keys, false);
                    Ok(keys)
                };
                let service_accounts = async {
                    if !wants_sas {
                        return Ok(None);
                    }
                    let _p = permit().await?;
                    client.list_service_accounts(&project.id).await.map(Some)
                };
                let (keys, service_accounts) = futures::try_join!(keys, service_accounts)?;
                Ok::<_, crate::openai::ApiError>(ProjectInventory {
                    project,
                    keys,
                    service_accounts,
                })
            }
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<ProjectInventory>>()
        .inspect(|_| {
            queue(&[], true);
            ids_tx.close_channel();
        });
    let failed = std::sync::atomic::AtomicBool::new(false);
    let failed = &failed;
    let entries = ids_rx
        .map(|ids| async move {
            use std::sync::atomic::Ordering::Relaxed;
            if failed.load(Relaxed) {
                return None;
            }
            let q = AuditLogQuery {
                event_types: vec!["api_key.created".into()],
                resource_ids: ids,
                ..AuditLogQuery::default()
            };
            let r = match permit().await {
                Ok(_p) => client.audit_logs(&q).await,
                Err(e) => Err(e),
            };
            failed.fetch_or(r.is_err(), Relaxed);
            Some(r)
        })
        .buffer_unordered(concurrency)
        .filter_map(futures::future::ready)
        .collect::<Vec<ApiResult<Vec<AuditLog>>>>()
        .map(Ok::<_, crate::openai::ApiError>);
    let ((), mut out, read) = futures::try_join!(pages, listings, entries)?;
    out.sort_by(|a, b| {
        a.project
            .display_name()
            .cmp(b.project.display_name())
            .then(a.project.id.cmp(&b.project.id))
    });
    let creations = creations.map(|_| {
        let mut all = Vec::new();
        for r in read {
            all.extend(r?);
        }
        Ok(all)
    });
    Ok((
        Inventory {
            scanned_at: Utc::now(),
            projects: out,
            creators: None,
            usage: crate::usage::UsageState::Off,
        },
        creations,
    ))
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
    /// Other slots that render the same path in a store this slot shares with them.
    /// A slot with any is refused every cycle (nothing read is trusted, nothing is
    /// written) until the configuration or the names change.
    pub collisions: Vec<Collision>,
}

/// Another slot claiming one of this slot's store paths.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Collision {
    pub store: String,
    pub path: String,
    pub rule: String,
    pub project_id: String,
    pub service_account_id: String,
}

impl std::fmt::Display for Collision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "path {:?} in store {:?} is also rendered for project {} / service account {} (rule {:?})",
            self.path, self.store, self.project_id, self.service_account_id, self.rule
        )
    }
}

impl Slot {
    /// A stable identifier for logs: `<project_id>/<service_account_id>`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.project_id, self.service_account_id)
    }

    /// Where stores with a separate state record keep this slot's state: addressed by
    /// the project and the slot's oldest service account, which renames, rule edits
    /// and store moves leave alone (strategy `new_service_account` re-keys it when the
    /// old account is deleted).
    pub fn state_key(&self) -> String {
        let anchor = self
            .service_accounts
            .first()
            .map_or(self.service_account_id.as_str(), |(id, _)| id.as_str());
        crate::store::state_key(&self.project_id, anchor)
    }

    /// The key at which `store` keeps this slot's state.
    pub fn state_key_in(&self, store: &dyn crate::store::SecretStore) -> String {
        match store.layout() {
            crate::store::Layout::Separate => self.state_key(),
            crate::store::Layout::WithConsumer => self.path.clone(),
        }
    }
}

/// The slots the rules define: every service account (listed, or seen as a key owner)
/// of every active project, matched by the first rule that covers it. Service
/// accounts of one project with the same name under the same rule form one slot (the
/// accounts strategy `new_service_account` moves a slot through); the newest of them
/// is the slot's default account. Any other two slots rendering one path in a store
/// they share collide: both carry a [`Collision`] naming the other, and neither is
/// rotated (a second project with a victim's name must never take over its secret).
pub fn slots(inv: &Inventory, rules: &[Rule]) -> Vec<Slot> {
    let mut out = Vec::new();
    let mut sa_rule = SaRuleCache::default();
    for p in &inv.projects {
        // Most projects no rule covers: skip them before looking at their accounts.
        if p.project.is_archived() {
            continue;
        }
        let covering = ProjectRules::new(rules, &p.project);
        if covering.is_empty() {
            continue;
        }
        // (id, name, created_at): listed accounts first, so their names win over the
        // names keys carry; then the stable sort + dedup keeps the first of each id.
        let mut accounts: Vec<(&str, &str, i64)> = p
            .service_accounts
            .iter()
            .flatten()
            .map(|sa| (sa.id.as_str(), sa.name.as_str(), sa.created_at))
            .collect();
        for k in &p.keys {
            if let (OwnerType::ServiceAccount, Some(sa)) = (k.owner.kind, &k.owner.service_account)
            {
                accounts.push((
                    sa.id.as_str(),
                    sa.name.as_deref().unwrap_or_default(),
                    sa.created_at.unwrap_or(0),
                ));
            }
        }
        accounts.sort_by(|a, b| a.0.cmp(b.0));
        accounts.dedup_by(|b, a| a.0 == b.0);
        accounts.sort_by(|a, b| a.2.cmp(&b.2).then(a.0.cmp(b.0)));
        let first_of_project = out.len();
        for (sa_id, sa_name, _) in accounts {
            let Some(ri) = sa_rule.get(rules, &covering, sa_name) else {
                continue;
            };
            let rule = &rules[ri];
            let path = rule.render_path(&PathVars {
                project_id: &p.project.id,
                project_name: p.project.display_name(),
                service_account_id: sa_id,
                service_account_name: sa_name,
            });
            // A project has a handful of slots: a linear search beats a map.
            if let Some(slot) = out[first_of_project..].iter_mut().find(|s: &&mut Slot| {
                s.path == path && s.rule == ri && s.service_account_name == sa_name
            }) {
                slot.service_accounts
                    .push((sa_id.to_string(), sa_name.to_string()));
                slot.service_account_id = sa_id.to_string();
                slot.service_account_name = sa_name.to_string();
                continue;
            }
            out.push(Slot {
                rule: ri,
                rule_name: rule.name.clone(),
                project_id: p.project.id.clone(),
                project_name: p.project.display_name().to_string(),
                service_account_id: sa_id.to_string(),
                service_account_name: sa_name.to_string(),
                service_accounts: vec![(sa_id.to_string(), sa_name.to_string())],
                stores: rule.stores.clone(),
                path,
                collisions: Vec::new(),
            });
        }
    }
    mark_collisions(&mut out);
    out
}

/// Fills in [`Slot::collisions`]: every (store, path) that more than one slot claims.
fn mark_collisions(slots: &mut [Slot]) {
    let mut claims: HashMap<(&str, &str), Vec<usize>> = HashMap::default();
    for (i, s) in slots.iter().enumerate() {
        for store in &s.stores {
            claims
                .entry((store.as_str(), s.path.as_str()))
                .or_default()
                .push(i);
        }
    }
    let mut found: Vec<(usize, Collision)> = Vec::new();
    for ((store, path), idx) in &claims {
        if idx.len() < 2 {
            continue;
        }
        for &i in idx {
            for &j in idx.iter().filter(|&&j| j != i) {
                let o = &slots[j];
                found.push((
                    i,
                    Collision {
                        store: store.to_string(),
                        path: path.to_string(),
                        rule: o.rule_name.clone(),
                        project_id: o.project_id.clone(),
                        service_account_id: o.service_account_id.clone(),
                    },
                ));
            }
        }
    }
    for (i, c) in found {
        slots[i].collisions.push(c);
    }
    for s in slots.iter_mut() {
        s.collisions.sort_by(|a, b| {
            (&a.store, &a.project_id, &a.service_account_id).cmp(&(
                &b.store,
                &b.project_id,
                &b.service_account_id,
            ))
        });
    }
}

/// The rules whose `project` glob covers one project (by id or name), in rule order:
/// matched once per project instead of once per key.
struct ProjectRules(Vec<usize>);

impl ProjectRules {
    fn new(rules: &[Rule], p: &Project) -> ProjectRules {
        ProjectRules(
            rules
                .iter()
                .enumerate()
                .filter(|(_, r)| r.covers_project(&p.id, p.display_name()))
                .map(|(i, _)| i)
                .collect(),
        )
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Service-account names repeat across projects (`backend`, `worker`, ...): each
/// rule's `service_account` glob is matched once per distinct name.
#[derive(Default)]
struct SaRuleCache<'a> {
    by_name: HashMap<&'a str, Vec<bool>>,
}

impl<'a> SaRuleCache<'a> {
    /// The first covering rule whose `service_account` glob matches `sa_name`.
    fn get(&mut self, rules: &[Rule], covering: &ProjectRules, sa_name: &'a str) -> Option<usize> {
        let matches = self.by_name.entry(sa_name).or_insert_with(|| {
            rules
                .iter()
                .map(|r| r.service_account.is_match(sa_name))
                .collect()
        });
        covering.0.iter().copied().find(|&i| matches[i])
    }
}

/// A slot's state in the DESIGN.md §1 vocabulary.
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
    /// Another slot renders the same path in a shared store, or a store's document at
    /// the path names another project: refused until the configuration or names change.
    Collision,
}

impl SlotStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SlotStatus::Bootstrap => "bootstrap",
            SlotStatus::Current => "current",
            SlotStatus::Rotate => "rotate",
            SlotStatus::InGrace => "in_grace",
            SlotStatus::Failed => "failed",
            SlotStatus::Collision => "collision",
        }
    }
}

/// What the stores of one slot hold, as read (or the error per store).
#[derive(Debug)]
pub struct SlotView {
    pub slot: Slot,
    pub states: Vec<(String, Result<SlotState, StoreError>)>,
    /// Beside each of `states`: where it was read, when it is the store's state
    /// record for the slot's path (`slot::view`), which the slot's run may start from.
    pub record_keys: Vec<Option<String>>,
}

impl SlotView {
    pub(crate) fn ok_states(&self) -> impl Iterator<Item = (&str, &SlotState)> {
        self.states
            .iter()
            .filter_map(|(n, s)| s.as_ref().ok().map(|s| (n.as_str(), s)))
    }

    fn failed(&self) -> bool {
        self.states.iter().any(|(_, s)| s.is_err())
    }

    /// The first record (current or pending) a store holds at this slot's path that
    /// names another project: someone else's secret, never to be overwritten.
    pub fn foreign_record(&self) -> Option<(&str, &SecretRecord)> {
        self.ok_states().find_map(|(store, s)| {
            s.current
                .iter()
                .chain(s.pending.iter())
                .find(|r| r.project_id != self.slot.project_id)
                .map(|r| (store, r))
        })
    }

    /// Every store agrees on a current key, promoted at least `grace` ago: what the
    /// engine waits for before it sweeps the slot's account (orphans, stale extras).
    pub fn settled(&self, grace: std::time::Duration, now: DateTime<Utc>) -> bool {
        let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
        self.agreed_current().is_some()
            && !self.failed()
            && self
                .ok_states()
                .all(|(_, s)| s.book.promoted_at.is_some_and(|t| now - t >= grace))
    }

    /// The decision for this slot as read (none for a slot refused or unreadable):
    /// `project` is the slot's project as scanned; `forced`, a rotation asked for.
    pub fn decide(
        &self,
        project: Option<&ProjectInventory>,
        rules: &[Rule],
        cx: &decide::Context,
        forced: Option<Why>,
        usage: Option<&crate::usage::UsageView>,
    ) -> Vec<Action> {
        if self.collides() || self.failed() {
            return Vec::new();
        }
        let accounts = &self.slot.service_accounts;
        let keys = project
            .map(|p| {
                p.keys
                    .iter()
                    .filter(|k| {
                        k.owner.kind == OwnerType::ServiceAccount
                            && k.owner
                                .service_account
                                .as_ref()
                                .is_some_and(|sa| accounts.iter().any(|(id, _)| *id == sa.id))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let states: Vec<&SlotState> = self.ok_states().map(|(_, s)| s).collect();
        let owner_gone = states
            .iter()
            .find_map(|s| s.book.intent.as_ref())
            .is_some_and(|i| crate::rotation::owner_is_gone(&i.owner));
        let facts = decide::SlotFacts {
            slot: &self.slot,
            rule: &rules[self.slot.rule],
            states,
            keys,
            also_served: Vec::new(),
            also_referenced: Vec::new(),
            owner_gone,
            forced,
            usage: project.and(usage),
        };
        decide::decide(&facts, cx)
    }

    /// Refused this cycle: a colliding path, or a foreign record at the path.
    pub fn collides(&self) -> bool {
        !self.slot.collisions.is_empty() || self.foreign_record().is_some()
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

/// A unix timestamp that serializes and prints as RFC 3339 (whole seconds, `Z`): the
/// plan keeps the API's integers and formats them only when rendered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn to_datetime(self) -> DateTime<Utc> {
        policy::ts(self.0)
    }
}

impl From<DateTime<Utc>> for Timestamp {
    fn from(t: DateTime<Utc>) -> Self {
        Timestamp(t.timestamp())
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use chrono::{Datelike, Timelike};
        let t = self.to_datetime();
        if !(0..=9999).contains(&t.year()) {
            return f.write_str(&t.to_rfc3339_opts(SecondsFormat::Secs, true));
        }
        // `YYYY-MM-DDTHH:MM:SSZ` without an allocation: plans print two per key.
        let mut b = *b"0000-00-00T00:00:00Z";
        let mut put = |at: usize, width: usize, mut v: u32| {
            for i in (at..at + width).rev() {
                b[i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, 4, t.year() as u32);
        put(5, 2, t.month());
        put(8, 2, t.day());
        put(11, 2, t.hour());
        put(14, 2, t.minute());
        put(17, 2, t.second());
        f.write_str(std::str::from_utf8(&b).map_err(|_| std::fmt::Error)?)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One key of the plan: the key and its project as listed (borrowed from the
/// [`Inventory`]), and what the plan says of it. Serializes as the DESIGN.md §1 key object.
#[derive(Clone, Debug)]
pub struct PlanKey<'a> {
    pub project: &'a Project,
    /// The key as the API listed it.
    pub api: &'a ProjectApiKey,
    pub verdict: Verdict,
    pub reasons: Reasons,
    pub age_days: u64,
    /// The rule managing the key's service account.
    pub rule: Option<&'a str>,
    /// Stores that reference the key (current, pending or previous), sorted.
    pub stores: Vec<&'a str>,
    /// Who created it, where the audit log says ([`creators`]).
    pub creator: Option<&'a str>,
    /// What its `expires_at` means, if anything.
    pub expiry: Option<ExpiryState>,
    /// Its usage and cost (`None`: usage is off or unknown; zeros when the key had none).
    pub usage: Option<&'a crate::usage::KeyUsage>,
}

/// The usage of a key with none in the window.
static NO_USAGE: crate::usage::KeyUsage = crate::usage::KeyUsage {
    requests_24h: 0,
    input_tokens_24h: 0,
    output_tokens_24h: 0,
    requests_window: 0,
    input_tokens_window: 0,
    output_tokens_window: 0,
    cost: 0.0,
    last_hour_requests: 0,
    before_last_hour: 0,
    last_request_bucket: None,
};

/// The plan's usage section: whether usage is known, the window its figures cover,
/// and every project's cost.
#[derive(Clone, Debug, Serialize)]
pub struct PlanUsage<'a> {
    /// `known`, `unknown` (the fetch failed: see `reason`) or `off`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<crate::usage::Window>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<&'a str>,
    /// Projects of the inventory, most expensive first.
    pub projects: Vec<PlanProjectUsage<'a>>,
}

/// One project's usage and cost.
#[derive(Clone, Debug, Serialize)]
pub struct PlanProjectUsage<'a> {
    pub project_id: &'a str,
    pub project_name: &'a str,
    pub requests_24h: u64,
    pub requests_window: u64,
    pub cost: f64,
}

impl<'a> PlanUsage<'a> {
    fn of(inv: &'a Inventory) -> PlanUsage<'a> {
        use crate::usage::UsageState;
        let mut u = PlanUsage {
            status: inv.usage.status(),
            reason: match &inv.usage {
                UsageState::Unknown { reason } => Some(reason.as_str()),
                _ => None,
            },
            window: None,
            currency: None,
            projects: Vec::new(),
        };
        if let UsageState::Known(v) = &inv.usage {
            u.window = Some(v.window);
            u.currency = Some(v.currency.as_str());
            for p in &inv.projects {
                let pu = v.projects.get(&p.project.id);
                u.projects.push(PlanProjectUsage {
                    project_id: &p.project.id,
                    project_name: p.project.display_name(),
                    requests_24h: pu.map_or(0, |x| x.requests_24h),
                    requests_window: pu.map_or(0, |x| x.requests_window),
                    cost: pu.map_or(0.0, |x| x.cost),
                });
            }
            u.projects.sort_by(|a, b| {
                b.cost
                    .total_cmp(&a.cost)
                    .then(a.project_id.cmp(b.project_id))
            });
        }
        u
    }
}

impl<'a> PlanKey<'a> {
    pub fn project_id(&self) -> &'a str {
        &self.project.id
    }
    pub fn project_name(&self) -> &'a str {
        self.project.display_name()
    }
    pub fn key_id(&self) -> &'a str {
        &self.api.id
    }
    pub fn key_name(&self) -> Option<&'a str> {
        self.api.name.as_deref()
    }
    pub fn owner_type(&self) -> &'static str {
        self.api.owner.kind.as_str()
    }
    pub fn owner_id(&self) -> Option<&'a str> {
        self.api.owner.id()
    }
    pub fn owner_name(&self) -> Option<&'a str> {
        self.api.owner.name()
    }
    pub fn created_at(&self) -> Timestamp {
        Timestamp(self.api.created_at)
    }
    pub fn last_used_at(&self) -> Option<Timestamp> {
        self.api.last_used_at.map(Timestamp)
    }
}

impl Serialize for PlanKey<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        /// The DESIGN.md §1 key object, field by field.
        #[derive(Serialize)]
        struct Doc<'b> {
            project_id: &'b str,
            project_name: &'b str,
            key_id: &'b str,
            key_name: Option<&'b str>,
            owner_type: &'static str,
            owner_id: Option<&'b str>,
            owner_name: Option<&'b str>,
            created_at: Timestamp,
            last_used_at: Option<Timestamp>,
            age_days: u64,
            verdict: Verdict,
            reasons: Reasons,
            rule: Option<&'b str>,
            stores: &'b [&'b str],
            creator: Option<&'b str>,
            expiry: Option<ExpiryState>,
            usage: Option<&'b crate::usage::KeyUsage>,
        }
        Doc {
            project_id: self.project_id(),
            project_name: self.project_name(),
            key_id: self.key_id(),
            key_name: self.key_name(),
            owner_type: self.owner_type(),
            owner_id: self.owner_id(),
            owner_name: self.owner_name(),
            created_at: self.created_at(),
            last_used_at: self.last_used_at(),
            age_days: self.age_days,
            verdict: self.verdict,
            reasons: self.reasons,
            rule: self.rule,
            stores: &self.stores,
            creator: self.creator,
            expiry: self.expiry,
            usage: self.usage,
        }
        .serialize(s)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct PlanSlot<'a> {
    pub rule: &'a str,
    pub project_id: &'a str,
    pub service_account_id: &'a str,
    pub stores: &'a [String],
    pub paths: Vec<&'a str>,
    pub state: SlotStatus,
    pub current_key_id: Option<&'a str>,
    /// The other slots claiming this slot's paths (state `collision`).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub collisions: &'a [Collision],
    /// What the decision has for this slot after the next cycle, with when.
    pub later: Vec<PlannedAction>,
    /// When the decision mints for this slot next (now, for a rotation due), if it
    /// knows (not for a slot refused, unreadable, or held by another process).
    #[serde(skip)]
    pub next_rotation: Option<DateTime<Utc>>,
}

/// One action the decision returned, with the slot (or user key) it is for: what
/// `once --dry-run` lists and `plan` counts. Serializes as
/// `{"action", "rule", "project_id", "project_name", "service_account_id",
/// "service_account_name", "key_id", "reason", "due_at"}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedAction {
    pub action: Action,
    /// `None` for a user key's revocation.
    pub rule: Option<String>,
    pub project_id: String,
    pub project_name: String,
    pub service_account_id: Option<String>,
    pub service_account_name: Option<String>,
}

impl PlannedAction {
    pub fn of_slot(slot: &Slot, action: Action) -> PlannedAction {
        let sa = action
            .service_account_id
            .clone()
            .filter(|sa| sa != crate::rotation::decide::NEW_ACCOUNT)
            .unwrap_or_else(|| slot.service_account_id.clone());
        PlannedAction {
            rule: Some(slot.rule_name.clone()),
            project_id: slot.project_id.clone(),
            project_name: slot.project_name.clone(),
            service_account_name: slot
                .service_accounts
                .iter()
                .find(|(id, _)| *id == sa)
                .map(|(_, n)| n.clone())
                .or_else(|| Some(slot.service_account_name.clone())),
            service_account_id: Some(sa),
            action,
        }
    }

    /// One line for people: `mint  prod-payments/backend  (stale)`.
    pub fn describe(&self) -> String {
        let a = &self.action;
        let mut out = format!(
            "{:<22} {} ({})",
            a.kind.as_str(),
            self.project_name,
            self.project_id
        );
        if let Some(n) = &self.service_account_name {
            out.push_str(&format!(" / {n}"));
        }
        if let Some(k) = &a.key_id {
            out.push_str(&format!(" key {k}"));
        }
        out.push_str(&format!(" [{}]", a.why));
        out
    }
}

impl Serialize for PlannedAction {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Doc<'b> {
            action: &'static str,
            rule: Option<&'b str>,
            project_id: &'b str,
            project_name: &'b str,
            service_account_id: Option<&'b str>,
            service_account_name: Option<&'b str>,
            key_id: Option<&'b str>,
            reason: &'static str,
            due_at: Timestamp,
        }
        Doc {
            action: self.action.kind.as_str(),
            rule: self.rule.as_deref(),
            project_id: &self.project_id,
            project_name: &self.project_name,
            service_account_id: self.service_account_id.as_deref(),
            service_account_name: self.service_account_name.as_deref(),
            key_id: self.action.key_id.as_deref(),
            reason: self.action.why.as_str(),
            due_at: Timestamp::from(self.action.due_at),
        }
        .serialize(s)
    }
}

/// The actions document of `once --dry-run --format json`.
#[derive(Clone, Debug, Serialize)]
pub struct ActionsDoc<'a> {
    pub generated_at: Timestamp,
    pub actions: &'a [PlannedAction],
}

impl ActionsDoc<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

/// Prints actions as a table (`once --dry-run` on a TTY).
pub fn render_actions(out: &mut dyn Write, actions: &[PlannedAction]) -> std::io::Result<()> {
    if actions.is_empty() {
        return writeln!(out, "nothing to do");
    }
    writeln!(
        out,
        "{:<22} {:<28} {:<22} {:<34} {:<26} DUE",
        "ACTION", "PROJECT", "SERVICE ACCOUNT", "KEY", "REASON"
    )?;
    for a in actions {
        writeln!(
            out,
            "{:<22} {:<28} {:<22} {:<34} {:<26} {}",
            a.action.kind.as_str(),
            truncate(&a.project_name, 28),
            truncate(a.service_account_name.as_deref().unwrap_or("-"), 22),
            a.action.key_id.as_deref().unwrap_or("-"),
            a.action.why.as_str(),
            Timestamp::from(a.action.due_at),
        )?;
    }
    Ok(())
}

/// The DESIGN.md §1 plan document, borrowing from the inventory, slot views and rules it
/// was built from.
#[derive(Clone, Debug, Serialize)]
pub struct Plan<'a> {
    pub generated_at: Timestamp,
    pub keys: Vec<PlanKey<'a>>,
    pub slots: Vec<PlanSlot<'a>>,
    /// What the next cycle does, in the order it does it: every action due now.
    pub actions: Vec<PlannedAction>,
    /// Usage and cost per project, and whether usage is known.
    pub usage: PlanUsage<'a>,
}

/// Counts for the summary line: keys as scanned, and what the next cycle will do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub keys: usize,
    pub stale: usize,
    /// Rotations the next cycle performs (bootstrap mints included).
    pub rotate: usize,
    /// Keys (or service accounts) the next cycle revokes, orphans aside.
    pub revoke: usize,
    pub report: usize,
    /// Orphaned `keyrotd-*` keys the next cycle revokes.
    pub orphan: usize,
    /// Actions due after the next cycle.
    pub later: usize,
}

/// Where a key id is referenced by the stores of a slot: the stores, and its most
/// senior role there.
struct Ref<'a> {
    stores: Vec<&'a str>,
    role: Role,
}

/// What the slots of one project say: the service accounts they manage, and the key
/// ids their stores reference. A project has a handful of each: linear searches.
#[derive(Default)]
struct ProjectSlots<'a> {
    managed: Vec<(&'a str, &'a SlotView)>,
    refs: Vec<(&'a str, Ref<'a>)>,
}

impl<'a> ProjectSlots<'a> {
    fn add_ref(&mut self, key_id: &'a str, store: &'a str, role: Role) {
        let at = match self.refs.iter().position(|(id, _)| *id == key_id) {
            Some(at) => at,
            None => {
                self.refs.push((
                    key_id,
                    Ref {
                        stores: Vec::new(),
                        role,
                    },
                ));
                self.refs.len() - 1
            }
        };
        let r = &mut self.refs[at].1;
        if let Err(i) = r.stores.binary_search(&store) {
            r.stores.insert(i, store);
        }
        r.role = r.role.min(role);
    }

    fn referenced(&self, key_id: &str) -> Option<&Ref<'a>> {
        self.refs
            .iter()
            .find(|(id, _)| *id == key_id)
            .map(|(_, r)| r)
    }

    fn managing(&self, service_account_id: &str) -> Option<&'a SlotView> {
        self.managed
            .iter()
            .rev()
            .find(|(sa, _)| *sa == service_account_id)
            .map(|(_, v)| *v)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Current,
    Pending,
    Previous,
}

impl<'a> Plan<'a> {
    /// Verdicts for every key and every slot's actions, from the one decision
    /// ([`decide::decide`]) the cycle performs: a slot's replaced key is `revoke` (in
    /// grace, in use, or due), keys the stores serve are never revoked, `keyrotd-*`
    /// keys the decision sweeps are orphans, and other stale keys of a managed account
    /// it retires are `revoke`. The summary counts what the next cycle does.
    ///
    /// Rules are matched once per project and service account, not once per key, and
    /// the plan borrows its strings: 100k keys plan in a few tens of milliseconds.
    pub fn build(
        inv: &'a Inventory,
        views: &'a [SlotView],
        rules: &'a [Rule],
        policy: &PolicyConfig,
        now: DateTime<Utc>,
    ) -> Plan<'a> {
        let cx = decide::Context {
            policy,
            now,
            me: None,
        };
        let projects: HashMap<&str, &ProjectInventory> = inv
            .projects
            .iter()
            .map(|p| (p.project.id.as_str(), p))
            .collect();
        // Each slot's decision; what it says of a key refines that key's verdict.
        let decisions: Vec<Vec<Action>> = views
            .iter()
            .map(|v| {
                v.decide(
                    projects.get(v.slot.project_id.as_str()).copied(),
                    rules,
                    &cx,
                    None,
                    inv.usage.known(),
                )
            })
            .collect();
        let mut key_actions: HashMap<&str, &Action> = HashMap::default();
        for a in decisions.iter().flatten() {
            if let (
                Some(k),
                ActionKind::Revoke | ActionKind::Keep | ActionKind::DeleteServiceAccount,
            ) = (&a.key_id, a.kind)
            {
                key_actions.entry(k.as_str()).or_insert(a);
            }
        }
        // Grouped by project: a key is looked up among its own project's few slots.
        let mut by_project: HashMap<&'a str, ProjectSlots<'a>> = HashMap::default();
        for v in views {
            let ps = by_project.entry(v.slot.project_id.as_str()).or_default();
            for (sa, _) in &v.slot.service_accounts {
                ps.managed.push((sa.as_str(), v));
            }
            for (store, s) in v.ok_states() {
                // A document naming another project says nothing about this one's keys.
                let own = |r: &&SecretRecord| r.project_id == v.slot.project_id;
                if s.current.iter().chain(s.pending.iter()).any(|r| !own(&r)) {
                    continue;
                }
                if let Some(c) = &s.current {
                    ps.add_ref(&c.key_id, store, Role::Current);
                }
                if let Some(p) = &s.pending {
                    ps.add_ref(&p.key_id, store, Role::Pending);
                }
                if let Some(p) = &s.book.previous_key_id {
                    ps.add_ref(p, store, Role::Previous);
                }
            }
        }
        let no_slots = ProjectSlots::default();

        let mut user_actions: Vec<PlannedAction> = Vec::new();
        let mut sa_rule = SaRuleCache::default();
        let mut keys = Vec::with_capacity(inv.key_count());
        for p in &inv.projects {
            let covering = ProjectRules::new(rules, &p.project);
            let project_id = p.project.id.as_str();
            let ps = by_project.get(project_id).unwrap_or(&no_slots);
            for k in &p.keys {
                let sa = match (k.owner.kind, &k.owner.service_account) {
                    (OwnerType::ServiceAccount, Some(sa)) => Some(sa),
                    _ => None,
                };
                let rule = match sa.and_then(|sa| sa.name.as_deref()) {
                    Some(name) if !covering.is_empty() => sa_rule.get(rules, &covering, name),
                    _ => None,
                };
                let Evaluation {
                    mut verdict,
                    mut reasons,
                    ..
                } = policy::evaluate_with_rule(k, rule, rules, policy, now);
                let referenced = ps.referenced(&k.id);
                let slot = sa.and_then(|sa| ps.managing(&sa.id));
                if let Some(view) = slot {
                    let slot_serves = view.agreed_current().is_some();
                    let due = |a: &Action| a.is_due(now);
                    match (referenced.map(|r| r.role), key_actions.get(k.id.as_str())) {
                        (Some(Role::Current) | Some(Role::Pending), _) => {
                            // Served (or about to be): rotate when due, never revoke.
                        }
                        (Some(Role::Previous), a) => {
                            // Why it is still alive (or that it is due).
                            verdict = Verdict::Revoke;
                            reasons.push(match a {
                                Some(a) if a.kind == ActionKind::Keep => Reason::InUse,
                                Some(a) if due(a) && a.why == Why::UnusedSincePromotion => {
                                    Reason::Drained
                                }
                                Some(a) if due(a) => Reason::GraceOver,
                                _ => Reason::InGrace,
                            });
                        }
                        (None, Some(a)) if a.why == Why::Orphan => {
                            verdict = Verdict::Orphan;
                            reasons.push(Reason::Unreferenced);
                        }
                        (None, Some(a)) if slot_serves => {
                            // The slot serves another key: this one is an extra.
                            verdict = Verdict::Revoke;
                            if a.kind == ActionKind::Keep {
                                reasons.push(Reason::InUse);
                            }
                        }
                        (None, _) => {
                            // Nothing served yet (a bootstrap): the mint replaces it.
                        }
                    }
                }
                if let Some(a) = decide::user_key_action(k, &p.project, rules, policy, now) {
                    user_actions.push(PlannedAction {
                        action: a,
                        rule: None,
                        project_id: p.project.id.clone(),
                        project_name: p.project.display_name().to_string(),
                        service_account_id: None,
                        service_account_name: None,
                    });
                }
                keys.push(PlanKey {
                    project: &p.project,
                    api: k,
                    verdict,
                    reasons,
                    age_days: policy::age(k, now).as_secs() / 86400,
                    rule: rule.map(|i| rules[i].name.as_str()),
                    stores: referenced.map(|r| r.stores.clone()).unwrap_or_default(),
                    creator: inv
                        .creators
                        .as_ref()
                        .and_then(|c| c.get(&k.id))
                        .map(String::as_str),
                    expiry: ExpiryState::of(
                        k.expires_at,
                        referenced.is_some_and(|r| r.role == Role::Previous),
                        policy.expiry_warning,
                        now,
                    ),
                    usage: inv
                        .usage
                        .known()
                        .map(|u| u.keys.get(&k.id).unwrap_or(&NO_USAGE)),
                });
            }
        }

        let mut actions = Vec::new();
        let slots = views
            .iter()
            .zip(decisions)
            .map(|(v, decision)| {
                let current = v.agreed_current();
                let any_current = v.ok_states().any(|(_, s)| s.current.is_some());
                let in_flight = v
                    .ok_states()
                    .any(|(_, s)| s.pending.is_some() || s.book.intent.is_some());
                let previous = v.ok_states().any(|(_, s)| s.book.previous_key_id.is_some());
                let mint_now = decision
                    .iter()
                    .any(|a| a.kind == ActionKind::Mint && a.is_due(now));
                let state = if v.collides() {
                    SlotStatus::Collision
                } else if v.failed() {
                    SlotStatus::Failed
                } else if !any_current && !in_flight {
                    SlotStatus::Bootstrap
                } else if in_flight || mint_now {
                    SlotStatus::Rotate
                } else if previous {
                    SlotStatus::InGrace
                } else {
                    SlotStatus::Current
                };
                let next_rotation = decision
                    .iter()
                    .find(|a| a.kind == ActionKind::Mint)
                    .map(|a| a.due_at.max(now));
                let mut later = Vec::new();
                for a in decision {
                    let pa = PlannedAction::of_slot(&v.slot, a);
                    if pa.action.is_due(now) && pa.action.kind != ActionKind::Keep {
                        actions.push(pa);
                    } else {
                        later.push(pa);
                    }
                }
                PlanSlot {
                    rule: &v.slot.rule_name,
                    project_id: &v.slot.project_id,
                    service_account_id: &v.slot.service_account_id,
                    stores: &v.slot.stores,
                    paths: v.slot.stores.iter().map(|_| v.slot.path.as_str()).collect(),
                    state,
                    current_key_id: current,
                    collisions: &v.slot.collisions,
                    later,
                    next_rotation,
                }
            })
            .collect();
        // User keys go after the slots, as the cycle revokes them.
        actions.extend(user_actions.into_iter().filter(|a| a.action.is_due(now)));

        Plan {
            generated_at: Timestamp::from(now),
            keys,
            slots,
            actions,
            usage: PlanUsage::of(inv),
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
            if k.verdict == Verdict::Report {
                s.report += 1;
            }
        }
        for a in &self.actions {
            match a.action.kind {
                ActionKind::Mint => s.rotate += 1,
                _ if a.action.why == Why::Orphan => s.orphan += 1,
                _ if a.action.revokes() => s.revoke += 1,
                _ => {}
            }
        }
        s.later = self.slots.iter().map(|sl| sl.later.len()).sum();
        s
    }

    /// The DESIGN.md §1 JSON document.
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
            .map(|k| k.key_id().len())
            .max()
            .unwrap_or(3)
            .max(3);
        let mut by_project: BTreeMap<(&str, &str), Vec<&PlanKey>> = BTreeMap::new();
        for k in &self.keys {
            by_project
                .entry((k.project_name(), k.project_id()))
                .or_default()
                .push(k);
        }
        let costs: HashMap<&str, f64> = self
            .usage
            .projects
            .iter()
            .map(|p| (p.project_id, p.cost))
            .collect();
        let currency = self.usage.currency.unwrap_or("usd");
        match self.usage.status {
            "unknown" => writeln!(
                out,
                "usage: unknown ({})",
                self.usage.reason.unwrap_or("could not be read")
            )?,
            "off" => writeln!(out, "usage: off")?,
            _ => {}
        }
        for ((name, id), keys) in by_project {
            match costs.get(id) {
                Some(c) => writeln!(out, "{} ({id}) cost {c:.2} {currency}", paint("1", name))?,
                None => writeln!(out, "{} ({id})", paint("1", name))?,
            }
            writeln!(
                out,
                "  {:<kw$} {:<26} {:<16} {:<22} {:>5}  {:<8} {:<9} {:<24} {:>9} {:>9} {:>11} {:>11} {:>9} REASONS",
                "KEY", "NAME", "OWNER", "OWNER NAME", "AGE", "VERDICT", "EXPIRY", "CREATOR",
                "REQ 24H", "REQ WIN", "TOKENS 24H", "TOKENS WIN", "COST"
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
                let (r24, rw, t24, tw, cost) = match k.usage {
                    Some(u) => (
                        u.requests_24h.to_string(),
                        u.requests_window.to_string(),
                        (u.input_tokens_24h + u.output_tokens_24h).to_string(),
                        (u.input_tokens_window + u.output_tokens_window).to_string(),
                        format!("{:.2}", u.cost),
                    ),
                    None => ("?".into(), "?".into(), "?".into(), "?".into(), "?".into()),
                };
                writeln!(
                    out,
                    "  {:<kw$} {:<26} {:<16} {:<22} {:>4}d  {} {:<9} {:<24} {r24:>9} {rw:>9} {t24:>11} {tw:>11} {cost:>9} {}",
                    k.key_id(),
                    truncate(k.key_name().unwrap_or("-"), 26),
                    k.owner_type(),
                    truncate(k.owner_name().unwrap_or("-"), 22),
                    k.age_days,
                    verdict,
                    k.expiry.map_or("-", ExpiryState::as_str),
                    truncate(k.creator.unwrap_or("-"), 24),
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
                    truncate(s.rule, 12),
                    s.project_id,
                    s.service_account_id,
                    s.paths.first().copied().unwrap_or("-"),
                    s.stores.join(","),
                    s.state.as_str(),
                    s.current_key_id.unwrap_or("-"),
                )?;
                for c in s.collisions {
                    writeln!(out, "    collision: {c}")?;
                }
                for a in &s.later {
                    writeln!(
                        out,
                        "    later: {} {} at {} ({})",
                        a.action.kind.as_str(),
                        a.action.key_id.as_deref().unwrap_or(""),
                        Timestamp::from(a.action.due_at),
                        a.action.why
                    )?;
                }
            }
        }
        if !self.actions.is_empty() {
            writeln!(out, "{}", paint("1", "next cycle"))?;
            for a in &self.actions {
                writeln!(out, "  {}", a.describe())?;
            }
        }
        let sm = self.summary();
        writeln!(
            out,
            "{} keys, {} stale, {} to rotate, {} to revoke, {} report-only, {} orphaned, {} later",
            sm.keys, sm.stale, sm.rotate, sm.revoke, sm.report, sm.orphan, sm.later
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_print_like_chrono() {
        for secs in [
            0,
            1,
            951_782_400, // 2000-02-29
            1_800_000_000,
            253_402_300_799, // 9999-12-31T23:59:59Z
            253_402_300_800,
            -1,
            -62_135_596_800, // 0001-01-01
        ] {
            let chrono = policy::ts(secs).to_rfc3339_opts(SecondsFormat::Secs, true);
            assert_eq!(Timestamp(secs).to_string(), chrono, "{secs}");
        }
        assert_eq!(
            serde_json::to_string(&Timestamp(1_800_000_000)).unwrap(),
            "\"2027-01-15T08:00:00Z\""
        );
    }
}
