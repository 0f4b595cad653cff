//! The one decision: what a slot's next actions are, why, and when each is due.
//!
//! [`decide`] is pure: given what the slot's stores hold, the slot's keys as listed,
//! its rule, the policy and the time, it returns every action the slot needs, in the
//! order the engine performs them, each with a typed reason and the time it becomes
//! due. `keyrotd plan`, `once --dry-run` and `once` all ask it; the slot's state
//! machine (`slot.rs`) performs the actions that are due and decides nothing else
//! (it keeps only the safety re-checks of each step: a key is re-read against the
//! stores right before it is revoked, a pending key is listed afresh before it is
//! given up).
//!
//! [`user_key_action`] is the same for user-owned keys under `user_keys = "revoke"`.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::{PolicyConfig, Rule, Strategy, UserKeys};
use crate::openai::models::{OwnerType, ProjectApiKey};
use crate::plan::Slot;
use crate::policy::{self, Reason, Verdict};
use crate::store::{SecretRecord, SlotState};

/// `Intent::service_account_id` of a rotation that creates a new service account.
pub const NEW_ACCOUNT: &str = "new";

/// What to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// Mint a new key and promote it in every store (a rotation).
    Mint,
    /// Revoke (DELETE) a key.
    Revoke,
    /// Keep a key that would be revoked, because it is still in use (until `due_at`,
    /// `max_grace`, when it is revoked regardless).
    Keep,
    /// Finish a rotation a previous run left staged.
    Resume,
    /// Drop an intent whose rotation never staged a key (revoking the key it minted,
    /// when there is one).
    CleanupIntent,
    /// Delete a service account the slot moved away from, with all its keys.
    DeleteServiceAccount,
    /// Serve the current key at the path the rule renders now (a renamed project or
    /// account, an edited `path`); the former path keeps it through a grace period.
    Move,
}

impl ActionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Mint => "mint",
            ActionKind::Revoke => "revoke",
            ActionKind::Keep => "keep",
            ActionKind::Resume => "resume",
            ActionKind::CleanupIntent => "cleanup_intent",
            ActionKind::DeleteServiceAccount => "delete_service_account",
            ActionKind::Move => "move",
        }
    }
}

/// Why an action is needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Why {
    /// No store holds a key for the slot yet.
    Bootstrap,
    /// Some store holds no key while others do.
    StoreWithoutKey,
    /// The stores serve different keys.
    StoresDisagree,
    /// The key the stores serve is no longer listed.
    CurrentKeyMissing,
    /// The served key is older than `max_age`.
    Stale,
    /// The served key expires within `expiry_warning`.
    ExpiringSoon,
    /// The API refused to delete a service-account key: the slot moves to a new
    /// service account (strategy `auto`).
    StrategyFallback,
    /// An operator asked for it (`keyrotd rotate`, `keyrotd revoke --rotate-first`).
    Manual,
    /// The served key no longer authenticates (OpenAI disabled it, someone deleted it):
    /// replaced at once, and the dead key revoked as soon as every store serves the new
    /// one.
    KeyInvalid,
    /// The served key's traffic is anomalous (`key.usage_anomaly` under
    /// `usage.on_anomaly = "rotate"`): replaced at once, and the old key revoked as soon
    /// as every store serves the new one.
    UsageAnomaly,
    /// A replaced key whose grace period (or `max_grace`) is over.
    GraceOver,
    /// A replaced key not used since its replacement was promoted
    /// (`revoke_when = "unused"`, after `min_grace`).
    UnusedSincePromotion,
    /// A `keyrotd-*` key on the slot's account that no store references.
    Orphan,
    /// Another stale key on the slot's service account, now that the slot serves its
    /// own key: retired by the same policy as a replaced key.
    StaleOnManagedAccount,
    /// A stale user-owned key under `user_keys = "revoke"`, its grace period over.
    StaleUserKey,
    /// A replaced key used since its replacement was promoted, within the grace period.
    InUse,
    /// A replaced key still used after the grace period (`key.still_in_use`).
    StillInUse,
    /// A rotation was interrupted after staging its key.
    Interrupted,
    /// Another process's rotation staged its key everywhere (or that process is gone):
    /// finishing it mints nothing.
    Takeover,
    /// Another live process holds the slot until `due_at`.
    HeldByAnother,
    /// The intent's rotation never recorded its key (the process died around minting).
    Unrecorded,
    /// A staged key no longer exists.
    PendingKeyGone,
    /// The slot moved to a new service account; the old one goes after its grace.
    AccountReplaced,
    /// The path the rule renders changed.
    PathChanged,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Why::Bootstrap => "bootstrap",
            Why::StoreWithoutKey => "store_without_key",
            Why::StoresDisagree => "stores_disagree",
            Why::CurrentKeyMissing => "current_key_missing",
            Why::Stale => "stale",
            Why::ExpiringSoon => "expiring_soon",
            Why::StrategyFallback => "strategy_fallback",
            Why::Manual => "manual",
            Why::KeyInvalid => "key_invalid",
            Why::UsageAnomaly => "usage_anomaly",
            Why::GraceOver => "grace_over",
            Why::UnusedSincePromotion => "unused_since_promotion",
            Why::Orphan => "orphan",
            Why::StaleOnManagedAccount => "stale_on_managed_account",
            Why::StaleUserKey => "stale_user_key",
            Why::InUse => "in_use",
            Why::StillInUse => "still_in_use",
            Why::Interrupted => "interrupted",
            Why::Takeover => "takeover",
            Why::HeldByAnother => "held_by_another",
            Why::Unrecorded => "unrecorded",
            Why::PendingKeyGone => "pending_key_gone",
            Why::AccountReplaced => "account_replaced",
            Why::PathChanged => "path_changed",
        }
    }
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One action of a slot (or of a user key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Action {
    pub kind: ActionKind,
    pub why: Why,
    /// The key acted on (for `mint`: none; for `resume`: the staged key).
    pub key_id: Option<String>,
    /// The service account acted on (`delete_service_account`), or minted on (`mint`;
    /// none when strategy `new_service_account` creates one).
    pub service_account_id: Option<String>,
    /// When the action is due; the engine performs the ones due at its `now`.
    pub due_at: DateTime<Utc>,
    /// A mint that is due by its reason but waits for the previous rotation's grace
    /// period to end first (`rotation.deferred`).
    pub deferred: bool,
}

impl Action {
    fn new(kind: ActionKind, why: Why, due_at: DateTime<Utc>) -> Action {
        Action {
            kind,
            why,
            key_id: None,
            service_account_id: None,
            due_at,
            deferred: false,
        }
    }
    fn key(mut self, key_id: &str) -> Action {
        self.key_id = Some(key_id.to_string());
        self
    }
    fn account(mut self, sa: &str) -> Action {
        self.service_account_id = Some(sa.to_string());
        self
    }

    pub fn is_due(&self, now: DateTime<Utc>) -> bool {
        self.due_at <= now
    }

    /// Whether performing it deletes a key (or an account with its keys): what a
    /// cycle's revocation count means.
    pub fn revokes(&self) -> bool {
        match self.kind {
            ActionKind::Revoke | ActionKind::DeleteServiceAccount => true,
            ActionKind::CleanupIntent => self.why == Why::Unrecorded && self.key_id.is_some(),
            _ => false,
        }
    }
}

/// What the decision needs to know about one slot.
#[derive(Debug)]
pub struct SlotFacts<'a> {
    pub slot: &'a Slot,
    pub rule: &'a Rule,
    /// What each of the slot's stores holds (all read without error).
    pub states: Vec<&'a SlotState>,
    /// The keys of the slot's service accounts, as listed.
    pub keys: Vec<&'a ProjectApiKey>,
    /// Key ids served where no state of `states` says (consumer documents, a store
    /// the rule moved away from): never revoked.
    pub also_served: Vec<&'a str>,
    /// Key ids other records name (a previous key in a store the rule moved away
    /// from): never swept as orphans or extras.
    pub also_referenced: Vec<&'a str>,
    /// The owner of the slot's intent provably died ([`super::owner_is_gone`]).
    pub owner_gone: bool,
    /// Rotate now whatever the key's age (`Why::Manual`, `Why::KeyInvalid`,
    /// `Why::UsageAnomaly`).
    pub forced: Option<Why>,
    /// What the Usage API says of the slot's replaced keys (`[usage]` on and read):
    /// their last request since promotion per its 1 m buckets. Where it says nothing,
    /// `last_used_at` decides.
    pub usage: Option<&'a crate::usage::UsageView>,
}

/// Who is asking, and when.
#[derive(Clone, Copy, Debug)]
pub struct Context<'a> {
    pub policy: &'a PolicyConfig,
    pub now: DateTime<Utc>,
    /// The asking process's instance id (an intent of its own is not another's);
    /// `None` for read-only callers, to whom every live intent is another's.
    pub me: Option<&'a str>,
}

fn dur(d: std::time::Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// Every action the slot needs, in the order they are performed: an interrupted
/// rotation first (resume, or clean up its intent), then a path move, the replaced
/// keys' retirement (revoke, keep, or delete the old account), the rotation itself,
/// and last the sweep of the slot's account (orphans, other stale keys). Actions due
/// later carry their time; a slot another process holds gets one `resume` at the end
/// of its lease and nothing else.
pub fn decide(f: &SlotFacts, cx: &Context) -> Vec<Action> {
    let now = cx.now;
    let mut out = Vec::new();
    if !f.slot.collisions.is_empty() {
        return out;
    }
    let live = |id: &str| f.keys.iter().any(|k| k.id == id);

    // 1. What a previous run left: a live owner's slot is its own; a staged key is
    //    finished (and nothing else happens this cycle); an intent that staged nothing
    //    is cleaned up.
    let intent = f.states.iter().find_map(|s| s.book.intent.as_ref());
    let staged = staged_everywhere(&f.states);
    if let Some(i) = intent {
        let another = cx.me != Some(i.owner.as_str());
        if another && i.lease_until > now && !f.owner_gone && staged.is_none() {
            out.push(Action::new(
                ActionKind::Resume,
                Why::HeldByAnother,
                i.lease_until,
            ));
            return out;
        }
    }
    let mut pendings: Vec<&SecretRecord> = Vec::new();
    for p in f.states.iter().filter_map(|s| s.pending.as_ref()) {
        if !pendings.iter().any(|q| q.key_id == p.key_id) {
            pendings.push(p);
        }
    }
    let mut intent_left = intent;
    for p in pendings {
        let promoted_everywhere = f
            .states
            .iter()
            .all(|s| s.current.as_ref().is_some_and(|c| c.key_id == p.key_id));
        if promoted_everywhere {
            // Only a marker is left (the engine clears it in passing).
            continue;
        }
        if !live(&p.key_id) {
            // Dropping it drops the intent too.
            out.push(
                Action::new(ActionKind::CleanupIntent, Why::PendingKeyGone, now).key(&p.key_id),
            );
            intent_left = None;
            continue;
        }
        let why = match intent {
            Some(i) if cx.me != Some(i.owner.as_str()) && i.lease_until > now => Why::Takeover,
            _ => Why::Interrupted,
        };
        out.push(Action::new(ActionKind::Resume, why, now).key(&p.key_id));
        return out;
    }
    if let Some(i) = intent_left {
        let minted = f
            .keys
            .iter()
            .find(|k| k.name.as_deref() == Some(&i.key_name));
        let served = |id: &str| referenced(f, id);
        let a = Action::new(ActionKind::CleanupIntent, Why::Unrecorded, now);
        out.push(match minted {
            // Already in a store: finished, not revoked.
            Some(k) if served(&k.id) => Action {
                why: Why::Interrupted,
                ..a
            },
            Some(k) => a.key(&k.id),
            None if i.service_account_id == NEW_ACCOUNT => a.account(NEW_ACCOUNT),
            None => a,
        });
    }

    // 2. A changed path: serve the current key there too.
    let moved = f.states.iter().find_map(|s| {
        let cur = s.current.as_ref()?;
        let here = s
            .book
            .locations
            .iter()
            .any(|l| l.path == f.slot.path && l.retire_after.is_none());
        (!s.book.locations.is_empty() && !here).then_some(cur)
    });
    if let Some(cur) = moved {
        out.push(Action::new(ActionKind::Move, Why::PathChanged, now).key(&cur.key_id));
    }

    // 3. Replaced keys.
    let grace = f.rule.grace_period;
    let current_accounts: BTreeSet<&str> = f
        .states
        .iter()
        .filter_map(|s| s.current.as_ref().map(|c| c.service_account_id.as_str()))
        .collect();
    let previous: BTreeSet<&str> = f
        .states
        .iter()
        .filter_map(|s| s.book.previous_key_id.as_deref())
        .collect();
    // When the last replaced key still waiting is due (a routine rotation waits).
    let mut grace_ends: Option<DateTime<Utc>> = None;
    for key_id in previous {
        if served(f, key_id) {
            continue;
        }
        let holders: Vec<&&SlotState> = f
            .states
            .iter()
            .filter(|s| s.book.previous_key_id.as_deref() == Some(key_id))
            .collect();
        // The Usage API's 1 m buckets since promotion when read, else `last_used_at`.
        let last_used = match f.usage.and_then(|u| u.last_request_since_promotion(key_id)) {
            Some(last) => last,
            None => f
                .keys
                .iter()
                .find(|k| k.id == key_id)
                .and_then(|k| k.last_used_at),
        };
        // Every holder's clock must be over; one that lost its clock starts it now.
        let mut ret: Option<policy::Retirement> = None;
        for h in &holders {
            let promoted = h.book.promoted_at.unwrap_or(now);
            let mut r = match h.book.previous_until {
                // An operator's deadline (`keyrotd rotate --revoke-old DURATION`).
                Some(until) => policy::Retirement::deadline(until, now),
                None => policy::retirement(cx.policy, grace, promoted, last_used, now),
            };
            if h.book.promoted_at.is_none() {
                r.due = false;
            }
            ret = Some(match ret {
                None => r,
                Some(o) if o.due_at >= r.due_at => policy::Retirement {
                    due: o.due && r.due,
                    still_in_use: o.still_in_use || r.still_in_use,
                    ..o
                },
                Some(o) => policy::Retirement {
                    due: o.due && r.due,
                    still_in_use: o.still_in_use || r.still_in_use,
                    ..r
                },
            });
        }
        let Some(r) = ret else { continue };
        let at = if r.due {
            r.due_at.min(now)
        } else {
            r.due_at.max(now + chrono::Duration::seconds(1))
        };
        let prev_account = holders
            .iter()
            .find_map(|h| h.book.previous_service_account_id.as_deref());
        match prev_account {
            Some(sa) if !current_accounts.contains(sa) => {
                // The whole account goes, with every key on it: never a fresh key
                // someone else made there (it waits until that one is stale too).
                let fresh_until = f
                    .keys
                    .iter()
                    .filter(|k| k.owner.service_account.as_ref().is_some_and(|o| o.id == sa))
                    .filter(|k| k.id != key_id && !policy::is_keyrotd_key(k))
                    .filter(|k| policy::age(k, now) <= f.rule.max_age)
                    .map(|k| {
                        policy::ts(k.created_at)
                            + dur(f.rule.max_age)
                            + chrono::Duration::seconds(1)
                    })
                    .max();
                let at = match fresh_until {
                    Some(t) => at.max(t),
                    None => at,
                };
                out.push(
                    Action::new(ActionKind::DeleteServiceAccount, Why::AccountReplaced, at)
                        .key(key_id)
                        .account(sa),
                );
                if at > now {
                    grace_ends = grace_ends.max(Some(r.due_at));
                }
            }
            _ => {
                out.push(retire_action(key_id, &r, at, Why::GraceOver));
                if !r.due {
                    grace_ends = grace_ends.max(Some(r.due_at));
                }
            }
        }
    }

    // 4. The rotation.
    let mint_account = mint_account(f);
    let mut minting_now = false;
    let due = match f.forced {
        Some(why) => Some((why, now)),
        None => rotation_due(f, cx),
    };
    if let Some((why, at)) = due {
        let routine = matches!(why, Why::Stale | Why::ExpiringSoon);
        let mut a = Action::new(ActionKind::Mint, why, at);
        if f.rule.strategy != Strategy::NewServiceAccount {
            a.service_account_id = Some(mint_account.to_string());
        }
        if routine && at <= now {
            if let Some(t) = grace_ends {
                // The last rotation's grace period is still running (max_age shorter
                // than grace_period, or the daemon was down): rotate once it is over.
                a.due_at = t;
                a.deferred = true;
            }
        }
        minting_now = a.due_at <= now;
        out.push(a);
    }

    // 5. The sweep of the serving account, once the slot serves a key of its own: by
    //    the same retirement policy as a replaced key, counted from its promotion (a
    //    rotation this cycle restarts that clock).
    let agreed = agreed_current(&f.states).is_some();
    if !agreed && !minting_now {
        return out;
    }
    let promoted: Option<DateTime<Utc>> = if minting_now {
        Some(now)
    } else {
        f.states
            .iter()
            .map(|s| s.book.promoted_at)
            .collect::<Option<Vec<_>>>()
            .and_then(|v| v.into_iter().max())
    };
    // Unknown promotion time (a clock a crash lost): counted from now.
    let promoted = promoted.unwrap_or(now);
    let settled_at = promoted + dur(grace);
    let intents: BTreeSet<&str> = f
        .states
        .iter()
        .filter_map(|s| s.book.intent.as_ref().map(|i| i.key_name.as_str()))
        .collect();
    let project = slot_project(f.slot);
    for k in &f.keys {
        let on_serving = k
            .owner
            .service_account
            .as_ref()
            .is_some_and(|sa| sa.id == mint_account);
        if !on_serving || referenced(f, &k.id) {
            continue;
        }
        if policy::is_keyrotd_key(k) {
            // Only once the slot's key has been served for a full grace period: a key
            // keyrotd minted before may still be served at a place no state record
            // names (an AWS secret at a former path), or be the previous key of a
            // rotation another rotation replaced within its grace period. One still in
            // use since the promotion is kept as a replaced key in use is
            // (`revoke_when = "unused"`: until `max_grace`).
            if intents.contains(k.name.as_deref().unwrap_or_default()) {
                continue;
            }
            let old_enough = policy::ts(k.created_at) + dur(cx.policy.orphan_min_age);
            let r = policy::retirement(cx.policy, grace, promoted, k.last_used_at, now);
            let kept = if matches!(r.reason, Reason::InUse | Reason::GraceOver) {
                settled_at.max(r.due_at)
            } else {
                settled_at
            };
            let at = kept.max(old_enough);
            let at = if at <= now && !minting_now {
                at.min(now)
            } else {
                at.max(now + chrono::Duration::seconds(1))
            };
            out.push(Action::new(ActionKind::Revoke, Why::Orphan, at).key(&k.id));
            continue;
        }
        let e = policy::evaluate(k, &project, std::slice::from_ref(f.rule), cx.policy, now);
        if e.verdict != Verdict::Rotate {
            continue;
        }
        let r = policy::retirement(cx.policy, grace, promoted, k.last_used_at, now);
        let due = r.due && !minting_now;
        let at = if due {
            r.due_at.min(now)
        } else {
            r.due_at.max(now + chrono::Duration::seconds(1))
        };
        out.push(retire_action(
            &k.id,
            &policy::Retirement { due, ..r },
            at,
            Why::StaleOnManagedAccount,
        ));
    }
    out
}

/// The action for a replaced (or extra) key given its retirement: revoke it when due
/// (`over`, or unused since promotion), keep it while in use.
fn retire_action(key_id: &str, r: &policy::Retirement, at: DateTime<Utc>, over: Why) -> Action {
    match r.reason {
        Reason::InUse => {
            let why = if r.still_in_use {
                Why::StillInUse
            } else {
                Why::InUse
            };
            // Kept until max_grace, then revoked regardless.
            Action::new(ActionKind::Keep, why, at).key(key_id)
        }
        Reason::Drained => {
            Action::new(ActionKind::Revoke, Why::UnusedSincePromotion, at).key(key_id)
        }
        _ => Action::new(ActionKind::Revoke, over, at).key(key_id),
    }
}

/// Why the slot needs a new key and since when, or when it will need one.
fn rotation_due(f: &SlotFacts, cx: &Context) -> Option<(Why, DateTime<Utc>)> {
    let now = cx.now;
    let currents: Vec<Option<&SecretRecord>> =
        f.states.iter().map(|s| s.current.as_ref()).collect();
    if currents.iter().all(Option::is_none) {
        return Some((Why::Bootstrap, now));
    }
    if currents.iter().any(Option::is_none) {
        return Some((Why::StoreWithoutKey, now));
    }
    let id = agreed_current(&f.states);
    let Some(id) = id else {
        return Some((Why::StoresDisagree, now));
    };
    let Some(key) = f.keys.iter().find(|k| k.id == id) else {
        return Some((Why::CurrentKeyMissing, now));
    };
    let project = slot_project(f.slot);
    let e = policy::evaluate(key, &project, std::slice::from_ref(f.rule), cx.policy, now);
    if e.verdict == Verdict::Rotate {
        let why = if e.reasons.contains(&Reason::Stale) {
            Why::Stale
        } else {
            Why::ExpiringSoon
        };
        return Some((why, now));
    }
    // Stale once strictly older than max_age; expiring once within the warning.
    let stale_at = policy::ts(key.created_at) + dur(e.max_age) + chrono::Duration::seconds(1);
    let expiring_at = key
        .expires_at
        .map(|x| policy::ts(x) - dur(cx.policy.expiry_warning));
    Some(match expiring_at {
        Some(t) if t < stale_at => (Why::ExpiringSoon, t),
        _ => (Why::Stale, stale_at),
    })
}

/// The key every store serves, if they agree on one.
pub fn agreed_current<'a>(states: &[&'a SlotState]) -> Option<&'a str> {
    let mut ids = states
        .iter()
        .map(|s| s.current.as_ref().map(|c| c.key_id.as_str()));
    let first = ids.next()??;
    ids.all(|i| i == Some(first)).then_some(first)
}

/// The key staged in every store of the slot (or already current in some).
pub fn staged_everywhere<'a>(states: &[&'a SlotState]) -> Option<&'a str> {
    let key_id = states
        .iter()
        .find_map(|s| s.pending.as_ref())?
        .key_id
        .as_str();
    states
        .iter()
        .all(|s| {
            s.pending.as_ref().is_some_and(|p| p.key_id == key_id)
                || s.current.as_ref().is_some_and(|c| c.key_id == key_id)
        })
        .then_some(key_id)
}

/// The service account a same-account rotation mints on: the current key's account
/// when it belongs to the slot, else the slot's newest account.
pub fn mint_account<'a>(f: &SlotFacts<'a>) -> &'a str {
    f.states
        .iter()
        .filter_map(|s| s.current.as_ref())
        .map(|c| c.service_account_id.as_str())
        .find(|sa| f.slot.service_accounts.iter().any(|(id, _)| id == sa))
        .unwrap_or(f.slot.service_account_id.as_str())
}

/// Whether any store holds the key (current, pending or previous) or serves it.
fn referenced(f: &SlotFacts, key_id: &str) -> bool {
    f.also_served.contains(&key_id)
        || f.also_referenced.contains(&key_id)
        || f.states
            .iter()
            .any(|s| s.referenced_key_ids().any(|r| r == key_id))
}

/// Whether any store serves the key or has it staged: I1 and I3 never let such a key
/// be revoked.
fn served(f: &SlotFacts, key_id: &str) -> bool {
    f.also_served.contains(&key_id)
        || f.states.iter().any(|s| {
            s.current.as_ref().is_some_and(|c| c.key_id == key_id)
                || s.pending.as_ref().is_some_and(|p| p.key_id == key_id)
        })
}

/// The slot's project as the policy sees it (id and name are what rules match).
pub fn slot_project(slot: &Slot) -> crate::openai::models::Project {
    crate::openai::models::Project {
        id: slot.project_id.clone(),
        object: None,
        name: Some(slot.project_name.clone()),
        created_at: 0,
        archived_at: None,
        status: None,
    }
}

/// The revocation of a stale user-owned key under `user_keys = "revoke"`: due once
/// `grace_period` has passed since it became stale (`created_at + max_age`), so its
/// owner gets the same warning window as a rotated key's consumers. `None` for any
/// other key.
pub fn user_key_action(
    key: &ProjectApiKey,
    project: &crate::openai::models::Project,
    rules: &[Rule],
    policy: &PolicyConfig,
    now: DateTime<Utc>,
) -> Option<Action> {
    if key.owner.kind != OwnerType::User || policy.user_keys != UserKeys::Revoke {
        return None;
    }
    let e = policy::evaluate(key, project, rules, policy, now);
    if e.verdict != Verdict::Revoke {
        return None;
    }
    let at = policy::ts(key.created_at) + dur(e.max_age + policy.grace_period);
    Some(Action::new(ActionKind::Revoke, Why::StaleUserKey, at).key(&key.id))
}
