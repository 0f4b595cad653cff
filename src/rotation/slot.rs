//! One slot's state machine (DESIGN.md §4): settle the stores, ask
//! [`decide`](super::decide::decide) what is due, and perform it: resume or clean up an
//! interrupted rotation, retire replaced keys, rotate (intent, mint, stage, verify,
//! promote), sweep the slot's account.
//!
//! Every step is idempotent and every write is check-and-set against the version just
//! read, so a crash at any point, or a second process, leaves a state the next run
//! finishes. Failpoints (feature `failpoints`) sit at each step boundary.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use tracing::{debug, error, info, warn};

use super::decide::{self, Action, ActionKind, SlotFacts, Why, NEW_ACCOUNT};
use super::Engine;
use crate::config::{Rule, Strategy};
use crate::metrics::{FailureKind, RevocationOutcome, RotationOutcome};
use crate::openai::models::{CreateKeyRequest, ProjectApiKey};
use crate::openai::ApiError;
use crate::plan::{Slot, SlotView};
use crate::policy;
use crate::store::{
    ConsumerDoc, DynStore, Intent, Layout, Location, SecretRecord, SlotState, StoreError,
    StoreErrorKind, Transition, MANAGED_BY,
};

/// What happened to a slot in one cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotOutcome {
    /// Nothing to do (the key is fresh; maybe a previous key is still in grace).
    Fresh,
    /// A new key was promoted in every store.
    Rotated { key_id: String },
    /// Another process holds the slot (live intent, or it won check-and-set).
    Busy,
}

/// Why a slot failed this cycle. Never carries a secret value.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("OpenAI API: {0}")]
    Api(#[from] ApiError),
    #[error("the new key {key_id} failed verification and was revoked: {reason}")]
    VerifyFailed { key_id: String, reason: String },
    #[error("store {store:?} read back key {found:?} after promoting {expected}")]
    ReadBack {
        store: String,
        expected: String,
        found: Option<String>,
    },
    /// The slot's path is claimed by another slot, or a store's document there names
    /// another project or another slot's account: nothing of the slot is touched.
    #[error("collision: {0}")]
    Collision(String),
    #[error("{0}")]
    Other(String),
}

impl SlotError {
    /// The `kind` label of the failure metrics and the `kind` field of
    /// `rotation.failed`: the one place an error is classified for them.
    pub fn kind(&self) -> FailureKind {
        match self {
            SlotError::Store(_) => FailureKind::Store,
            SlotError::Api(_) => FailureKind::Api,
            SlotError::VerifyFailed { .. } => FailureKind::Verify,
            SlotError::ReadBack { .. } => FailureKind::ReadBack,
            SlotError::Collision(_) => FailureKind::Collision,
            SlotError::Other(_) => FailureKind::Other,
        }
    }
}

type SlotResult<T> = Result<T, SlotError>;

/// A slot's failure as the cycle reports it: its kind and the error's message (which
/// names the store, the HTTP status or the API's message; never a secret).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SlotFailure {
    pub kind: FailureKind,
    pub message: String,
}

impl SlotFailure {
    pub fn contains(&self, s: &str) -> bool {
        self.message.contains(s)
    }
}

impl From<SlotError> for SlotFailure {
    fn from(e: SlotError) -> Self {
        SlotFailure {
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

/// Something a slot's run did to the organization: a mint (the new key's id), or a
/// revocation of a key or a service account, with why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Performed {
    pub kind: ActionKind,
    /// The key minted or revoked, or the service account deleted.
    pub id: String,
    pub reason: String,
}

/// One slot's run: what came of it, and what it did on the way (also when it failed
/// after some steps).
#[derive(Debug)]
pub struct RunResult {
    pub outcome: SlotResult<SlotOutcome>,
    pub performed: Vec<Performed>,
}

/// Runs the state machine for one slot. `keys` are the service account's keys as
/// scanned at the start of the cycle; `seen`, what the cycle's survey read of its
/// stores' states (empty: the run reads them all).
pub async fn run(
    eng: &Engine,
    slot: &Slot,
    keys: Vec<ProjectApiKey>,
    forced: Option<(Forced, Option<String>)>,
    seen: Vec<Seen>,
) -> RunResult {
    let mut performed = Vec::new();
    let outcome = run_slot(eng, slot, keys, forced, seen, &mut performed).await;
    RunResult { outcome, performed }
}

/// A rotation asked for whatever the key's age.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forced {
    /// `Why::Manual` (an operator) or `Why::KeyInvalid` (the served key is dead).
    pub why: Why,
    /// When the replaced key is revoked.
    pub revoke_old: RevokeOld,
    /// When it was asked for (to the second): a slot every store promoted a key in
    /// since, in a later second, has been rotated already (`promoted_after`).
    pub asked_at: Option<DateTime<Utc>>,
}

impl Forced {
    /// A rotation an operator asked for at `asked_at`.
    pub fn manual(revoke_old: RevokeOld, asked_at: DateTime<Utc>) -> Forced {
        use chrono::SubsecRound;
        Forced {
            why: Why::Manual,
            revoke_old,
            asked_at: Some(asked_at.trunc_subsecs(0)),
        }
    }

    /// A rotation the slot's own evidence asks for (`why`: the served key is dead, or
    /// its traffic is anomalous): now, with the replaced key revoked once every store
    /// serves the new one.
    pub fn incident(why: Why) -> Forced {
        Forced {
            why,
            revoke_old: RevokeOld::Now,
            asked_at: None,
        }
    }
}

/// Whether a promotion recorded at `promoted_at` came after a rotation asked for at
/// `asked_at`, both kept to the second (AWS tags hold whole seconds): only a later
/// second is sure to be after. A promotion in the second of the ask may have come
/// before it, so it does not answer the ask and the slot is rotated again (a second
/// new key, never a missed incident rotation).
fn promoted_after(promoted_at: DateTime<Utc>, asked_at: DateTime<Utc>) -> bool {
    promoted_at.timestamp() > asked_at.timestamp()
}

/// When a forced rotation's replaced key is revoked (`keyrotd rotate --revoke-old`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevokeOld {
    /// By the rule's grace period and `policy.revoke_when`, as a routine rotation.
    Grace,
    /// As soon as every store serves and has read back the new key.
    Now,
    /// This long after the promotion, whatever the grace period and its use: the
    /// deadline is recorded in every store (`previous_until`), so the daemon or the
    /// next `once` keeps it if this process is gone.
    After(std::time::Duration),
}

impl RevokeOld {
    /// Parses `now`, `grace` or a duration (`15m`, `2h`; `0s` is `now`).
    pub fn parse(s: &str) -> Result<RevokeOld, String> {
        match s {
            "now" => Ok(RevokeOld::Now),
            "grace" => Ok(RevokeOld::Grace),
            _ => match humantime::parse_duration(s) {
                Ok(d) if d.is_zero() => Ok(RevokeOld::Now),
                Ok(d) => Ok(RevokeOld::After(d)),
                Err(e) => Err(format!(
                    "expected now, grace or a duration such as 15m or 2h ({e})"
                )),
            },
        }
    }

    /// The replaced key's deadline for a promotion at `at`, if this sets one.
    pub fn deadline(self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            RevokeOld::After(d) => Some(at + chrono::Duration::from_std(d).ok()?),
            RevokeOld::Grace | RevokeOld::Now => None,
        }
    }
}

impl std::fmt::Display for RevokeOld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RevokeOld::Grace => f.write_str("grace"),
            RevokeOld::Now => f.write_str("now"),
            RevokeOld::After(d) => write!(f, "{}", humantime::format_duration(*d)),
        }
    }
}

async fn run_slot(
    eng: &Engine,
    slot: &Slot,
    keys: Vec<ProjectApiKey>,
    forced: Option<(Forced, Option<String>)>,
    seen: Vec<Seen>,
    performed: &mut Vec<Performed>,
) -> SlotResult<SlotOutcome> {
    // With the key the asker saw served: a rotation asked for replaces that key, and
    // is done already when another process replaced it meanwhile.
    let (forced, replacing) = match forced {
        Some((f, k)) => (Some(f), k),
        None => (None, None),
    };
    if !slot.collisions.is_empty() {
        for c in &slot.collisions {
            error!(event = "slot.collision", store = %c.store, path = %c.path, other_project_id = %c.project_id, other_service_account_id = %c.service_account_id, other_rule = %c.rule, outcome = "collision", "two slots render the same store path; neither is rotated until the configuration or the names change");
        }
        eng.metrics.slot_collision();
        let all: Vec<String> = slot.collisions.iter().map(|c| c.to_string()).collect();
        return Err(SlotError::Collision(format!(
            "slot {} (rule {:?}): {}",
            slot.id(),
            slot.rule_name,
            all.join("; ")
        )));
    }
    let mut stores: Vec<(String, DynStore)> = Vec::new();
    for name in &slot.stores {
        let s = eng.stores.get(name).ok_or_else(|| {
            SlotError::Store(StoreError::new(
                name.clone(),
                StoreErrorKind::InvalidConfig,
                "store is not configured",
            ))
        })?;
        stores.push((name.clone(), s.clone()));
    }
    // Check-and-set stores first: the first store's intent acts as the slot's lock,
    // and a store whose state writes are not compare-and-set (AWS tags) should never
    // be the one deciding a race.
    stores.sort_by_key(|(_, s)| !s.state_is_compare_and_set());
    let state_keys = stores
        .iter()
        .map(|(_, s)| slot.state_key_in(s.as_ref()))
        .collect();
    let rule = eng.rules[slot.rule].clone();
    let mut run = SlotRun {
        eng,
        slot,
        rule,
        keys,
        stores,
        states: Vec::new(),
        new_account: false,
        mint_on: slot.service_account_id.clone(),
        forced,
        performed,
        accounts: slot
            .service_accounts
            .iter()
            .map(|(id, _)| id.clone())
            .collect(),
        state_keys,
        docs: Vec::new(),
        others: Vec::new(),
        usage: eng.usage_seen(),
        reused: false,
    };
    run.new_account = run.rule.strategy == Strategy::NewServiceAccount;
    run.prepare(seen).await?;
    if let (Some(f), Some(k)) = (run.forced, &replacing) {
        // Another process rotated the slot since the operator asked: the key they
        // wanted replaced is no longer served (or every store promoted a key since).
        let states: Vec<&SlotState> = run.states.iter().collect();
        let moved_on = decide::agreed_current(&states) != Some(k.as_str());
        let promoted_since = f.asked_at.is_some_and(|at| {
            run.states.iter().all(|s| {
                s.current.is_some() && s.book.promoted_at.is_some_and(|p| promoted_after(p, at))
            })
        });
        if moved_on || promoted_since {
            info!(event = "rotation.already_replaced", key_id = %k, "another process rotated the slot since this rotation was asked for");
            run.forced = None;
            if f.revoke_old == RevokeOld::Now && moved_on {
                run.retire_key(k, f.why).await?;
            }
        }
    }
    let mut actions = decide::decide(&run.facts(), &run.context());
    if !run.fresh(&actions) {
        debug!(
            event = "slot.reread",
            "acting on more than a rotation: reading the stores again"
        );
        run.prepare(Vec::new()).await?;
        actions = decide::decide(&run.facts(), &run.context());
    }
    // A slot about to rotate anyway is not checked: the check is a call with the key,
    // which the API counts as a use, and the key it replaces must not look in use.
    let now = run.now();
    let minting = actions
        .iter()
        .any(|a| a.kind == ActionKind::Mint && a.is_due(now));
    if run.forced.is_none() && eng.policy.verify_served && !minting {
        run.forced = run.check_served().await;
        if run.forced.is_some() {
            actions = decide::decide(&run.facts(), &run.context());
        }
    }
    run.perform(actions).await
}

struct SlotRun<'a> {
    eng: &'a Engine,
    /// What the survey read of usage (the replaced keys' 1 m buckets), if anything.
    usage: Option<std::sync::Arc<crate::usage::UsageView>>,
    slot: &'a Slot,
    rule: Rule,
    keys: Vec<ProjectApiKey>,
    stores: Vec<(String, DynStore)>,
    /// Latest known state per store, same order as `stores`.
    states: Vec<SlotState>,
    /// Mint by creating a fresh service account (strategy `new_service_account`, or
    /// `auto` after the API refused to delete a service account's key).
    new_account: bool,
    /// The account a same-account rotation mints on (the decision's `mint` says).
    mint_on: String,
    /// What this run did to the organization, for the cycle's report.
    performed: &'a mut Vec<Performed>,
    /// A rotation asked for (by an operator, or because the served key is dead).
    forced: Option<Forced>,
    /// Service accounts known to be the slot's: the scanned ones, the ones created by
    /// this run, and same-named ones of the project found by a fresh listing.
    accounts: BTreeSet<String>,
    /// Where each store keeps the slot's state (same order as `stores`): the slot's
    /// identity key for [`Layout::Separate`] stores, the rendered path otherwise.
    state_keys: Vec<String>,
    /// The consumer documents of each [`Layout::Separate`] store: the rendered path
    /// first, then the state's other locations (empty for other layouts).
    docs: Vec<Vec<(String, ConsumerDoc)>>,
    /// Configured stores the rule no longer names that still hold state for this
    /// identity (the rule moved to other stores): they keep serving through a grace
    /// period, then their documents are removed.
    others: Vec<Other>,
    /// Some store's state is the survey's read of it ([`Seen`]), not read by this run.
    reused: bool,
}

/// What `store` holds for `slot`, as the plan shows it: the state record, or, before
/// one exists, what the consumer document at the rendered path holds (a 0.1-layout
/// document's bookkeeping, or a record of someone else, which the plan shows as a
/// collision). One read of the state, and of the consumer document unless the state
/// records the path. With the state, where it was read when it is the state record of
/// a [`Layout::Separate`] store serving the slot's path (what [`Seen`] can carry to the
/// slot's run).
pub async fn view(
    store: &DynStore,
    slot: &Slot,
) -> Result<(SlotState, Option<String>), StoreError> {
    let (key, state) = read_state(store, slot).await?;
    let serving_here = state
        .book
        .locations
        .iter()
        .any(|l| l.path == slot.path && l.retire_after.is_none());
    if store.layout() != Layout::Separate {
        return Ok((state, None));
    }
    if serving_here {
        // The document at a path the state records is the slot's own (the slot's run
        // reads and checks it before acting); the plan needs only the state.
        return Ok((state, Some(key)));
    }
    let doc = store.read_consumer(&slot.path).await?;
    let foreign = doc
        .record
        .as_ref()
        .is_some_and(|r| r.project_id != slot.project_id);
    if foreign || state.is_empty() {
        return Ok((
            match doc.legacy {
                Some(legacy) if !foreign => legacy,
                _ => SlotState {
                    current: doc.record,
                    version: doc.version,
                    ..SlotState::default()
                },
            },
            None,
        ));
    }
    Ok((state, None))
}

/// A state record the cycle's survey read for a slot (`key` in store `store`), which
/// the slot's run starts from instead of reading it again, when it is quiet and the
/// consumer document agrees ([`at_rest`], [`agrees`]): one store request fewer per
/// rotation.
#[derive(Debug)]
pub struct Seen {
    pub store: String,
    pub key: String,
    pub state: SlotState,
}

impl Seen {
    /// A survey's view of a slot: the slot, and the state records its run may start
    /// from.
    pub(crate) fn of(view: SlotView) -> (Slot, Vec<Seen>) {
        let seen = view
            .states
            .into_iter()
            .zip(view.record_keys)
            .filter_map(|((store, state), key)| {
                Some(Seen {
                    store,
                    key: key?,
                    state: state.ok()?,
                })
            })
            .collect();
        (view.slot, seen)
    }
}

/// Whether the survey's read of `state` may stand for the slot's own: a state at rest
/// (a promoted key with its clock, no intent, nothing staged, served at the slot's
/// path only, the rule still naming the store, one account), whose consumer document,
/// read now, serves its current key ([`agrees`]). Any other state is read again, since
/// settling it or resuming from it acts on what it says. A state that changed since
/// the survey still cannot be overwritten (every write is compare-and-set on the
/// version read), and a run whose actions are anything but a rotation reads again
/// before acting ([`SlotRun::fresh`]).
fn at_rest(state: &SlotState, slot: &Slot) -> bool {
    state.current.is_some()
        && state.pending.is_none()
        && state.book.intent.is_none()
        && state.book.promoted_at.is_some()
        && state.book.released_until.is_none()
        && slot.service_accounts.len() == 1
        && matches!(state.book.locations.as_slice(),
            [l] if l.path == slot.path && l.retire_after.is_none())
}

/// Whether the consumer document `doc` serves `state`'s current key (and carries no
/// 0.1 bookkeeping): what lets a survey's read of a state at rest stand.
fn agrees(state: &SlotState, doc: &ConsumerDoc) -> bool {
    doc.legacy.is_none()
        && matches!((&state.current, &doc.record), (Some(c), Some(r)) if r.key_id == c.key_id)
}

/// Reads the slot's state record in `store`, and where it is (the key). A slot with
/// more than one account (strategy `new_service_account` moving it) is addressed by
/// its oldest; while a newer account's record is the one that exists (accounts
/// created in the same second sort by id), that one is read.
pub async fn read_state(store: &DynStore, slot: &Slot) -> Result<(String, SlotState), StoreError> {
    let key = slot.state_key_in(store.as_ref());
    let state = store.read(&key).await?;
    if store.layout() != Layout::Separate || slot.service_accounts.len() < 2 || !state.is_empty() {
        return Ok((key, state));
    }
    for (sa, _) in &slot.service_accounts {
        let other = crate::store::state_key(&slot.project_id, sa);
        if other == key {
            continue;
        }
        let st = store.read(&other).await?;
        if !st.is_empty() {
            return Ok((other, st));
        }
    }
    Ok((key, state))
}

/// A store outside the slot's rule holding the slot's state.
struct Other {
    name: String,
    store: DynStore,
    state: SlotState,
    docs: Vec<(String, ConsumerDoc)>,
}

/// The consumer documents a [`Layout::Separate`] store holds for a state: at `path`
/// first (`first`, already read; `None`: none), then at the state's other locations.
async fn read_docs(
    store: &DynStore,
    path: &str,
    first: Option<ConsumerDoc>,
    state: &SlotState,
) -> Result<Vec<(String, ConsumerDoc)>, StoreError> {
    let mut out = Vec::new();
    if store.layout() != Layout::Separate {
        return Ok(out);
    }
    if let Some(doc) = first {
        out.push((path.to_string(), doc));
    }
    for l in &state.book.locations {
        if l.path != path && !out.iter().any(|(p, _)| *p == l.path) {
            out.push((l.path.clone(), store.read_consumer(&l.path).await?));
        }
    }
    Ok(out)
}

/// What [`SlotRun::read_all`] reads of one store: where the state is, the state, and
/// the consumer documents. The state and the document at the rendered path are read
/// together (neither needs the other); documents at the state's other locations once
/// the state names them.
async fn read_store(
    store: &DynStore,
    slot: &Slot,
    seen: Option<Seen>,
) -> Result<(String, SlotState, Vec<(String, ConsumerDoc)>, bool), StoreError> {
    let separate = store.layout() == Layout::Separate;
    // A state that is not at rest is read again at once, beside the document.
    if let Some(seen) = seen.filter(|s| separate && at_rest(&s.state, slot)) {
        let doc = store.read_consumer(&slot.path).await?;
        if agrees(&seen.state, &doc) {
            return Ok((seen.key, seen.state, vec![(slot.path.clone(), doc)], true));
        }
        let (key, state) = read_state(store, slot).await?;
        let docs = read_docs(store, &slot.path, Some(doc), &state).await?;
        return Ok((key, state, docs, false));
    }
    let (state, first) = tokio::join!(read_state(store, slot), async {
        match separate {
            true => store.read_consumer(&slot.path).await.map(Some),
            false => Ok(None),
        }
    });
    let (key, state) = state?;
    let docs = read_docs(store, &slot.path, first?, &state).await?;
    Ok((key, state, docs, false))
}

impl SlotRun<'_> {
    /// Now, to the second: what stores record must read back equal (AWS tags keep
    /// whole seconds).
    fn now(&self) -> DateTime<Utc> {
        use chrono::SubsecRound;
        self.eng.clock.now().trunc_subsecs(0)
    }

    /// Counts `e` as a failed rotation (by its kind) and hands it back.
    fn rotation_failed(&self, e: SlotError) -> SlotError {
        self.eng.metrics.rotation_failed(e.kind());
        e
    }

    /// Reads every store of the slot (all at once: they are independent), starting
    /// from what the survey read of a store's state where that may stand (`seen`).
    async fn read_all(&mut self, mut seen: Vec<Seen>) -> SlotResult<()> {
        let slot = self.slot;
        let read = futures::future::try_join_all(self.stores.iter().map(|(name, s)| {
            let seen = seen
                .iter()
                .position(|v| v.store == *name)
                .map(|j| seen.swap_remove(j));
            read_store(s, slot, seen)
        }))
        .await?;
        self.states = Vec::with_capacity(read.len());
        self.docs = Vec::with_capacity(read.len());
        self.reused = false;
        for (i, (key, state, docs, reused)) in read.into_iter().enumerate() {
            self.state_keys[i] = key;
            self.states.push(state);
            self.docs.push(docs);
            self.reused |= reused;
        }
        self.check_owned().await
    }

    /// Reads the slot's stores and brings them in line: everything the decision reads.
    async fn prepare(&mut self, seen: Vec<Seen>) -> SlotResult<()> {
        self.read_all(seen).await?;
        self.read_others().await?;
        self.settle().await?;
        self.refresh_keys().await
    }

    /// Whether `actions` may run on states the survey read: only a rotation may, whose
    /// first write (the intent) is compare-and-set on the version the survey saw.
    /// Anything else due (a revocation, a resume, a clean-up) is decided again on
    /// states read now.
    fn fresh(&self, actions: &[Action]) -> bool {
        let now = self.now();
        !self.reused
            || actions
                .iter()
                .all(|a| a.kind == ActionKind::Mint || !a.is_due(now))
    }

    /// Reads this identity's state in every configured store the rule does not name
    /// (one read each; stores the slot uses are read by `read_all`).
    async fn read_others(&mut self) -> SlotResult<()> {
        let key = self.slot.state_key();
        let mut others = Vec::new();
        for (name, store) in &self.eng.stores {
            if self.slot.stores.contains(name) || store.layout() != Layout::Separate {
                continue;
            }
            let state = match store.read(&key).await {
                Ok(s) => s,
                // A store that cannot be read now is looked at again next cycle; it
                // cannot be what keeps this slot from rotating.
                Err(e) => {
                    debug!(store = %name, error = %e, "cannot read a store outside the slot's rule");
                    continue;
                }
            };
            if state.is_empty() {
                continue;
            }
            let docs = read_docs(store, "", None, &state).await?;
            others.push(Other {
                name: name.clone(),
                store: store.clone(),
                state,
                docs,
            });
        }
        self.others = others;
        Ok(())
    }

    /// Whether a record belongs to this slot (its project, one of its accounts).
    fn ours(&self, r: &SecretRecord) -> bool {
        r.project_id == self.slot.project_id && self.accounts.contains(&r.service_account_id)
    }

    /// Brings each store's state record and consumer documents in line before the
    /// state machine runs: migrates 0.1-layout documents, adopts the key of a store the
    /// rule moved away from, follows a changed path (renamed project or account, edited
    /// `path`), republishes a consumer document that lost the current key, and removes
    /// documents at locations whose grace period is over. Mints nothing, revokes
    /// nothing.
    async fn settle(&mut self) -> SlotResult<()> {
        let now = self.now();
        let grace = chrono::Duration::from_std(self.rule.grace_period).unwrap_or_default();
        for i in 0..self.stores.len() {
            if self.stores[i].1.layout() != Layout::Separate {
                if !self.adopt_former_secret(i, now, grace).await? {
                    self.copy_sibling_key(i, now).await?;
                }
                self.retire_former_secret(i, now).await?;
                continue;
            }
            let store = self.stores[i].0.clone();
            let here = self.docs[i][0].1.clone();
            if self.states[i].is_empty() {
                // No state record: a 0.1-layout document to migrate, the key of the
                // store the rule moved away from to adopt, or a bootstrap.
                let imported = if let Some(legacy) = here.legacy.clone() {
                    Some((legacy, "migrated"))
                } else if let Some(rec) = here.record.clone() {
                    let mut st = SlotState {
                        current: Some(rec),
                        ..SlotState::default()
                    };
                    st.book.promoted_at = Some(now);
                    Some((st, "migrated"))
                } else {
                    self.adoptable().map(|st| (st, "adopted"))
                };
                let Some((mut st, how)) = imported else {
                    continue;
                };
                st.book.locations = vec![Location {
                    path: self.slot.path.clone(),
                    retire_after: None,
                }];
                st.book.released_until = None;
                info!(event = "slot.state_imported", store = %store, path = %self.slot.path, how, key_id = %st.current.as_ref().map(|c| c.key_id.as_str()).unwrap_or("-"), "state record created from what the store or a former store held; nothing minted");
                let current = st.current.clone();
                self.apply(i, &Transition::Import(Box::new(st))).await?;
                let clean = here.legacy.is_none()
                    && here.record.as_ref().map(|r| &r.key_id)
                        == current.as_ref().map(|r| &r.key_id);
                if !clean {
                    // The 0.1 document loses its `rotation` object (or the adopted key
                    // appears): the consumer document holds the six fields only.
                    self.write_doc(i, 0, current.as_ref()).await?;
                }
                continue;
            }
            let Some(current) = self.states[i].current.clone() else {
                continue;
            };
            let active = self.states[i]
                .book
                .locations
                .iter()
                .any(|l| l.path == self.slot.path && l.retire_after.is_none());
            if !active {
                let from: Vec<String> = self.states[i]
                    .book
                    .locations
                    .iter()
                    .filter(|l| l.path != self.slot.path)
                    .map(|l| l.path.clone())
                    .collect();
                if !from.is_empty() {
                    info!(event = "slot.moved", store = %store, from = ?from, to = %self.slot.path, key_id = %current.key_id, "the slot's path changed: serving the same key at the new path; the old paths keep it until the grace period ends");
                }
                self.apply(
                    i,
                    &Transition::Relocate {
                        to: self.slot.path.clone(),
                        retire_after: now + grace,
                    },
                )
                .await?;
            }
            // Every location serves the current key (or the pending one a promotion
            // already published).
            let pending = self.states[i].pending.as_ref().map(|p| p.key_id.clone());
            for d in 0..self.docs[i].len() {
                let served = self.docs[i][d].1.record.as_ref().map(|r| r.key_id.clone());
                let fine = served.as_deref() == Some(current.key_id.as_str())
                    || (served.is_some() && served == pending);
                let retiring = self.location_due(i, d, now);
                if fine || retiring {
                    continue;
                }
                info!(event = "secret.republished", store = %store, path = %self.docs[i][d].0, key_id = %current.key_id, found = ?served, "the consumer document does not serve the current key; writing it again");
                self.write_doc(i, d, Some(&current)).await?;
            }
            self.retire_locations(i, now).await?;
        }
        self.finish_bookkeeping(now).await?;
        self.release_others(now, grace).await
    }

    /// Two repairs of what a crash left between writes, both without deciding
    /// anything: a key promoted everywhere whose pending marker is left (AWS label)
    /// loses the marker, and a promotion that landed without its grace clock starts it.
    async fn finish_bookkeeping(&mut self, now: DateTime<Utc>) -> SlotResult<()> {
        let promoted_everywhere = |key_id: &str, states: &[SlotState]| {
            states
                .iter()
                .all(|s| s.current.as_ref().is_some_and(|c| c.key_id == key_id))
        };
        for i in 0..self.stores.len() {
            let marker = self.states[i]
                .pending
                .as_ref()
                .map(|p| p.key_id.clone())
                .filter(|k| promoted_everywhere(k, &self.states));
            let clockless = self.states[i]
                .current
                .as_ref()
                .map(|c| c.key_id.clone())
                .filter(|_| {
                    let b = &self.states[i].book;
                    b.previous_key_id.is_some() && b.promoted_at.is_none()
                });
            if let Some(key_id) = marker.or(clockless) {
                self.apply(i, &Transition::promote(key_id, now)).await?;
            }
        }
        Ok(())
    }

    /// A store keeping its state beside the consumer value (AWS) that holds nothing at
    /// the slot's path, while another store of the slot serves a live key: the path
    /// changed (a rename) or the store was added; it gets that key (staged, then
    /// promoted) instead of a new mint. Its former path is not tracked.
    async fn copy_sibling_key(&mut self, i: usize, now: DateTime<Utc>) -> SlotResult<()> {
        if !self.states[i].is_empty() {
            return Ok(());
        }
        let Some(rec) = self
            .states
            .iter()
            .enumerate()
            .filter(|(j, _)| self.stores[*j].1.layout() == Layout::Separate)
            .filter_map(|(_, s)| s.current.clone())
            .find(|c| self.live(&c.key_id) && self.ours(c))
        else {
            return Ok(());
        };
        info!(event = "slot.moved", store = %self.stores[i].0, to = %self.slot.path, key_id = %rec.key_id, "serving the slot's current key at a path that held nothing; nothing minted");
        let key_id = rec.key_id.clone();
        self.apply(i, &Transition::Stage(rec)).await?;
        self.apply(i, &Transition::promote(key_id, now)).await?;
        Ok(())
    }

    /// A store keeping its state beside the consumer value (AWS) that holds nothing at
    /// the slot's path, while a secret of the same project under another name serves
    /// the slot's live key: the slot was renamed (project, account, or the rule's
    /// `path`). The new secret gets that key (no mint) and records the former one,
    /// which keeps serving it until the grace period ends ([`Self::retire_former_secret`]).
    /// `Ok(true)` when adopted.
    async fn adopt_former_secret(
        &mut self,
        i: usize,
        now: DateTime<Utc>,
        grace: chrono::Duration,
    ) -> SlotResult<bool> {
        if !self.states[i].is_empty() {
            return Ok(false);
        }
        let (name, store) = (self.stores[i].0.clone(), self.stores[i].1.clone());
        let mut found = None;
        for path in store.find_by_project(&self.slot.project_id).await? {
            if path == self.slot.path {
                continue;
            }
            let st = store.read(&path).await?;
            let Some(cur) = st.current else { continue };
            if self.ours(&cur) && self.live(&cur.key_id) && st.book.intent.is_none() {
                found = Some((path, cur));
                break;
            }
        }
        let Some((from, rec)) = found else {
            return Ok(false);
        };
        info!(event = "slot.moved", store = %name, from = %from, to = %self.slot.path, key_id = %rec.key_id, "the slot's secret was renamed: serving the same key under the new name; the former secret keeps it until the grace period ends");
        let mut st = SlotState {
            current: Some(rec),
            ..SlotState::default()
        };
        // A fresh grace clock: whatever the former secret was retiring gets a full
        // grace period from the move before the orphan sweep may take it.
        st.book.promoted_at = Some(now);
        st.book.locations = vec![Location {
            path: from,
            retire_after: Some(now + grace),
        }];
        self.apply(i, &Transition::Import(Box::new(st))).await?;
        Ok(true)
    }

    /// Deletes the former secret of a renamed AWS slot once its grace period is over
    /// (only if it still serves this slot's key, or nothing), then forgets it.
    async fn retire_former_secret(&mut self, i: usize, now: DateTime<Utc>) -> SlotResult<()> {
        let due: Vec<String> = self.states[i]
            .book
            .locations
            .iter()
            .filter(|l| l.path != self.slot.path && l.retire_after.is_some_and(|t| t <= now))
            .map(|l| l.path.clone())
            .collect();
        for path in due {
            let (name, store) = (self.stores[i].0.clone(), self.stores[i].1.clone());
            let former = store.read(&path).await?;
            let mine = former.current.as_ref().is_none_or(|r| self.ours(r))
                && former.book.intent.is_none();
            if mine {
                store.remove(&path, &former.version).await?;
            }
            info!(event = "location.retired", store = %name, path = %path, removed = mine, "the grace period of a former secret is over");
            self.apply(i, &Transition::DropLocation { path }).await?;
        }
        Ok(())
    }

    /// The state of a store the rule moved away from, to serve its key here without
    /// minting: its current key, if still live, with its previous key and grace clock.
    fn adoptable(&self) -> Option<SlotState> {
        let o = self.others.iter().find(|o| {
            o.state
                .current
                .as_ref()
                .is_some_and(|c| self.live(&c.key_id) && self.ours(c))
        })?;
        let mut st = o.state.clone();
        st.pending = None;
        st.book.intent = None;
        st.book.promoted_at.get_or_insert(self.now());
        Some(st)
    }

    /// Whether location `d` of store `i` is past its grace period (never the path the
    /// rule renders).
    fn location_due(&self, i: usize, d: usize, now: DateTime<Utc>) -> bool {
        let path = &self.docs[i][d].0;
        path != &self.slot.path
            && self.states[i]
                .book
                .locations
                .iter()
                .any(|l| &l.path == path && l.retire_after.is_some_and(|t| t <= now))
    }

    /// Removes the documents of locations whose grace period is over (only documents
    /// that are still this slot's), then forgets the locations.
    async fn retire_locations(&mut self, i: usize, now: DateTime<Utc>) -> SlotResult<()> {
        let mut d = 0;
        while d < self.docs[i].len() {
            if !self.location_due(i, d, now) {
                d += 1;
                continue;
            }
            let path = self.docs[i][d].0.clone();
            let mine = self.docs[i][d]
                .1
                .record
                .as_ref()
                .is_none_or(|r| self.ours(r));
            if mine {
                self.write_doc(i, d, None).await?;
            }
            info!(event = "location.retired", store = %self.stores[i].0, path = %path, removed = mine, "the grace period of a former path is over");
            self.apply(i, &Transition::DropLocation { path }).await?;
            self.docs[i].remove(d);
        }
        Ok(())
    }

    /// Marks the state in stores the rule no longer names as released (their documents
    /// keep serving for a grace period), and removes it once that is over.
    async fn release_others(
        &mut self,
        now: DateTime<Utc>,
        grace: chrono::Duration,
    ) -> SlotResult<()> {
        let key = self.slot.state_key();
        let (project, accounts) = (&self.slot.project_id, &self.accounts);
        for o in &mut self.others {
            match o.state.book.released_until {
                None => {
                    info!(event = "store.released", store = %o.name, "the rule no longer names this store: its documents keep serving until the grace period ends");
                    o.state = o
                        .store
                        .apply_to(&key, &o.state, &Transition::Release { until: now + grace })
                        .await?;
                }
                Some(t)
                    if t <= now && o.state.pending.is_none() && o.state.book.intent.is_none() =>
                {
                    for (path, doc) in &o.docs {
                        let mine = doc.record.as_ref().is_none_or(|r| {
                            &r.project_id == project && accounts.contains(&r.service_account_id)
                        });
                        if mine {
                            o.store.write_consumer(path, None, &doc.version).await?;
                        }
                    }
                    o.store.write_consumer(&key, None, &o.state.version).await?;
                    info!(event = "store.cleaned", store = %o.name, "removed the documents and the state a former store of the slot held");
                    o.docs.clear();
                    o.state = SlotState::default();
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Writes document `d` of store `i` (`None` removes it) against the version read.
    async fn write_doc(
        &mut self,
        i: usize,
        d: usize,
        rec: Option<&SecretRecord>,
    ) -> SlotResult<()> {
        let (path, doc) = &self.docs[i][d];
        let version = self.stores[i]
            .1
            .write_consumer(path, rec, &doc.version)
            .await?;
        self.docs[i][d].1 = ConsumerDoc {
            record: rec.cloned(),
            legacy: None,
            version,
        };
        Ok(())
    }

    /// Refuses the slot when a store's document at its path holds a record (current or
    /// pending) of another project, or of an account of this project that is not the
    /// slot's: that document belongs to someone else and keyrotd must neither overwrite
    /// it nor act on the keys it names (revoke, delete an account) in this project.
    async fn check_owned(&mut self) -> SlotResult<()> {
        let mut unknown = false;
        for i in 0..self.states.len() {
            for r in self.records(i) {
                if r.project_id != self.slot.project_id {
                    return Err(self.foreign(i, r));
                }
                unknown |= !self.accounts.contains(&r.service_account_id);
            }
        }
        if !unknown {
            return Ok(());
        }
        // An account the scan did not see: created since (a replica moved the slot to a
        // fresh account of the same name), or another slot's account.
        let listed = self
            .eng
            .client
            .list_service_accounts(&self.slot.project_id)
            .await?;
        for sa in &listed {
            if sa.name == self.slot.service_account_name {
                self.accounts.insert(sa.id.clone());
            }
        }
        let known = |id: &str| self.accounts.contains(id) || !listed.iter().any(|sa| sa.id == id);
        for j in 0..self.states.len() {
            for r in self.records(j) {
                if !known(&r.service_account_id) {
                    return Err(self.foreign(j, r));
                }
            }
        }
        Ok(())
    }

    /// Every record store `i` holds for the slot: the state's current and pending,
    /// and what its consumer documents (and a 0.1 document's bookkeeping) hold.
    fn records(&self, i: usize) -> impl Iterator<Item = &SecretRecord> {
        let st = &self.states[i];
        st.current
            .iter()
            .chain(st.pending.iter())
            .chain(self.docs[i].iter().flat_map(|(_, d)| {
                d.record.iter().chain(
                    d.legacy
                        .iter()
                        .flat_map(|l| l.current.iter().chain(l.pending.iter())),
                )
            }))
    }

    fn foreign(&self, i: usize, r: &SecretRecord) -> SlotError {
        let store = &self.stores[i].0;
        error!(event = "slot.collision", rule = %self.slot.rule_name, store = %store, path = %self.slot.path, other_project_id = %r.project_id, other_service_account_id = %r.service_account_id, outcome = "collision", "the document at the slot's path belongs to another project or service account; not touching it");
        self.eng.metrics.slot_collision();
        SlotError::Collision(format!(
            "path {:?} in store {store:?} holds the key of project {} / service account {}, not of slot {}; keyrotd will not overwrite it",
            self.slot.path,
            r.project_id,
            r.service_account_id,
            self.slot.id()
        ))
    }

    /// Applies `t` to store `i` against its last known version.
    async fn apply(&mut self, i: usize, t: &Transition) -> Result<(), StoreError> {
        let (_, store) = &self.stores[i];
        let next = store
            .apply_to(&self.state_keys[i], &self.states[i], t)
            .await?;
        self.states[i] = next;
        Ok(())
    }

    fn live(&self, key_id: &str) -> bool {
        self.keys.iter().any(|k| k.id == key_id)
    }

    fn my_id(&self) -> &str {
        &self.eng.settings.instance_id
    }

    /// The decision's view of this run: the slot's stores as read, its keys, and what
    /// consumer documents and stores outside the rule serve.
    fn facts(&self) -> SlotFacts<'_> {
        let mut also_served: Vec<&str> = Vec::new();
        let mut also_referenced: Vec<&str> = Vec::new();
        let docs = self
            .docs
            .iter()
            .flatten()
            .chain(self.others.iter().flat_map(|o| o.docs.iter()));
        for (_, d) in docs {
            also_served.extend(d.record.iter().map(|r| r.key_id.as_str()));
            if let Some(l) = &d.legacy {
                also_served.extend(
                    l.current
                        .iter()
                        .chain(l.pending.iter())
                        .map(|r| r.key_id.as_str()),
                );
            }
        }
        for o in &self.others {
            let st = &o.state;
            also_served.extend(
                st.current
                    .iter()
                    .chain(st.pending.iter())
                    .map(|r| r.key_id.as_str()),
            );
            also_referenced.extend(st.book.previous_key_id.as_deref());
        }
        let owner_gone = self
            .states
            .iter()
            .find_map(|s| s.book.intent.as_ref())
            .is_some_and(|i| super::owner_is_gone(&i.owner));
        SlotFacts {
            slot: self.slot,
            rule: &self.rule,
            states: self.states.iter().collect(),
            keys: self.keys.iter().collect(),
            also_served,
            also_referenced,
            owner_gone,
            forced: self.forced.map(|f| f.why),
            usage: self.usage.as_deref(),
        }
    }

    fn context(&self) -> decide::Context<'_> {
        decide::Context {
            policy: &self.eng.policy,
            now: self.now(),
            me: Some(self.my_id()),
        }
    }

    /// Performs the decision's actions that are due, in order, and reports on the
    /// ones that wait. Decides nothing: what each step re-checks (a key against the
    /// stores right before its revocation, a staged key against a fresh listing) only
    /// keeps it safe.
    async fn perform(&mut self, actions: Vec<Action>) -> SlotResult<SlotOutcome> {
        let now = self.now();
        let mut outcome = SlotOutcome::Fresh;
        for a in actions {
            if a.kind == ActionKind::Keep {
                // Kept until `due_at`: said every cycle it lasts.
                self.keep(a.key_id.as_deref().unwrap_or_default(), a.why, &a)
                    .await;
                continue;
            }
            if !a.is_due(now) {
                if a.why == Why::HeldByAnother {
                    return Ok(self.busy());
                }
                if a.kind == ActionKind::Mint && a.deferred {
                    info!(event = "rotation.deferred", reason = %a.why, due_at = %a.due_at.to_rfc3339(), "due, but the previous key is still in its grace period");
                }
                continue;
            }
            let key_id = a.key_id.clone().unwrap_or_default();
            match a.kind {
                ActionKind::Resume => return self.resume(&key_id, a.why).await,
                ActionKind::CleanupIntent if a.why == Why::PendingKeyGone => {
                    if let Some(out) = self.drop_pending(&key_id).await? {
                        return Ok(out);
                    }
                }
                ActionKind::CleanupIntent => {
                    if let Some(intent) = self.states.iter().find_map(|s| s.book.intent.clone()) {
                        self.cleanup_intent(&intent).await?;
                    }
                }
                // Settling the stores served the key at the new path already.
                ActionKind::Move => {}
                ActionKind::Keep => {}
                ActionKind::Revoke => {
                    let out = match a.why {
                        Why::Orphan | Why::StaleOnManagedAccount => {
                            self.sweep_key(&key_id, a.why).await?
                        }
                        _ => self.retire_key(&key_id, a.why).await?,
                    };
                    if let Some(out) = out {
                        return Ok(out);
                    }
                }
                ActionKind::DeleteServiceAccount => {
                    let sa = a.service_account_id.clone().unwrap_or_default();
                    self.retire_account(&sa, &key_id).await?;
                }
                ActionKind::Mint => {
                    if self.eng.shutdown.is_cancelled() {
                        return Ok(outcome);
                    }
                    if let Some(sa) = &a.service_account_id {
                        self.mint_on = sa.clone();
                    }
                    outcome = self.rotate(a.why.as_str()).await?;
                    if outcome == SlotOutcome::Busy {
                        return Ok(outcome);
                    }
                    if self.forced.is_some_and(|f| f.revoke_old == RevokeOld::Now) {
                        self.revoke_replaced_now(a.why).await?;
                    }
                }
            }
        }
        Ok(outcome)
    }

    /// Whether the key every store serves still authenticates (`GET /models` with it,
    /// once: it verified at its promotion). A 401 means it is dead (OpenAI disabled
    /// it, or it was deleted): `key.invalid` (ERROR, metric, webhook), and the slot is
    /// rotated now with the dead key revoked as soon as the new one is served. Any
    /// other answer (a network error, a 5xx) says nothing and changes nothing.
    async fn check_served(&mut self) -> Option<Forced> {
        let states: Vec<&SlotState> = self.states.iter().collect();
        let id = decide::agreed_current(&states)?.to_string();
        let busy = self
            .states
            .iter()
            .any(|s| s.pending.is_some() || s.book.intent.is_some());
        if busy {
            return None;
        }
        let key = self.states[0].current.as_ref()?.api_key.clone();
        match self.eng.client.verify_key(&key).await {
            Err(ApiError::Unauthorized { message, .. }) => {
                self.eng.metrics.key_invalid();
                error!(event = "key.invalid", key_id = %id, status = 401, api_message = %message, outcome = "rotating", "the served key no longer authenticates; replacing it now and revoking it once every store serves the new one");
                self.eng.notifier.send(crate::notify::Notice::KeyInvalid {
                    project_id: self.slot.project_id.clone(),
                    service_account_id: self.slot.service_account_id.clone(),
                    key_id: id,
                });
                Some(Forced::incident(Why::KeyInvalid))
            }
            Err(e) => {
                debug!(key_id = %id, error = %e, "could not check the served key; checked again next cycle");
                None
            }
            Ok(()) => None,
        }
    }

    /// After a forced rotation with [`RevokeOld::Now`]: the key it replaced goes at once
    /// (every store serves and has read back the new one), not after the grace period.
    async fn revoke_replaced_now(&mut self, why: Why) -> SlotResult<()> {
        let replaced: BTreeSet<String> = self
            .states
            .iter()
            .filter_map(|s| s.book.previous_key_id.clone())
            .collect();
        for key_id in replaced {
            if let Some(out) = self.retire_key(&key_id, why).await? {
                // The API refused the deletion (strategy auto moved the slot): the
                // replaced account goes after its grace period instead.
                debug!(key_id = %key_id, outcome = ?out, "replaced key kept until the account is retired");
            }
        }
        Ok(())
    }

    /// Another live process holds the slot.
    fn busy(&self) -> SlotOutcome {
        if let Some(intent) = self.states.iter().find_map(|s| s.book.intent.as_ref()) {
            self.eng.metrics.slot_busy();
            info!(event = "rotation.busy", owner = %intent.owner, lease_until = %intent.lease_until.to_rfc3339(), "another live process holds the slot");
        }
        SlotOutcome::Busy
    }

    /// Finishes the rotation to the staged key `key_id` (an interrupted one, or another
    /// process's staged everywhere), unless the key turns out to be gone.
    async fn resume(&mut self, key_id: &str, why: Why) -> SlotResult<SlotOutcome> {
        if why == Why::Takeover {
            if let Some(intent) = self.states.iter().find_map(|s| s.book.intent.as_ref()) {
                info!(event = "rotation.takeover", owner = %intent.owner, lease_until = %intent.lease_until.to_rfc3339(), key_id = %key_id, "the slot's new key is staged in every store (or its owner is gone); finishing it without waiting for its owner");
            }
        }
        if let Some(out) = self.drop_pending(key_id).await? {
            return Ok(out);
        }
        Ok(SlotOutcome::Fresh)
    }

    /// The staged key `key_id`: finished when it exists (listed afresh: it may have
    /// been minted after this cycle's scan), else dropped. `Some(outcome)` when it was
    /// finished.
    async fn drop_pending(&mut self, key_id: &str) -> SlotResult<Option<SlotOutcome>> {
        let Some(p) = self
            .states
            .iter()
            .find_map(|s| s.pending.as_ref().filter(|p| p.key_id == key_id))
            .cloned()
        else {
            return Ok(None);
        };
        if !self.live(key_id) {
            self.relist().await?;
        }
        if !self.live(key_id) {
            info!(event = "rotation.abandoned", key_id = %key_id, outcome = "key_gone", "pending key no longer exists; dropping it");
            self.abandon_pending(key_id).await?;
            return Ok(None);
        }
        info!(event = "rotation.resumed", key_id = %key_id, "resuming an interrupted rotation");
        self.finish(p, None).await.map(Some)
    }

    /// Whether the slot's intent belongs to another process (this run took over a key
    /// staged everywhere).
    fn finishing_for_another(&self) -> bool {
        self.states
            .iter()
            .filter_map(|s| s.book.intent.as_ref())
            .any(|i| i.owner != self.my_id())
    }

    /// Extends this process's intent in every store that holds it when less than half
    /// its lease is left, so a slow step (a mint retried through 429s, a long
    /// verification) does not hand the slot to another process mid-rotation while the
    /// lease itself stays short (a dead owner on another host delays its slot by one
    /// lease at most).
    ///
    /// `Ok(false)`: the slot changed under us (another process finished this rotation
    /// or took the slot over); the caller stops and leaves the slot to it.
    async fn renew_lease(&mut self) -> SlotResult<bool> {
        let now = self.now();
        let lease =
            chrono::Duration::from_std(self.eng.policy.lease).unwrap_or(chrono::Duration::MAX);
        for i in 0..self.stores.len() {
            let Some(intent) = self.states[i].book.intent.clone() else {
                continue;
            };
            if intent.owner != self.my_id() || intent.lease_until - now > lease / 2 {
                continue;
            }
            let renewed = Intent {
                lease_until: now + lease,
                ..intent
            };
            match self.apply(i, &Transition::Intent(renewed.clone())).await {
                Ok(()) => {}
                Err(e) if e.kind == StoreErrorKind::Conflict => {
                    let (_, store) = &self.stores[i];
                    self.states[i] = store.read(&self.state_keys[i]).await?;
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            }
            debug!(event = "rotation.lease_renewed", store = %self.stores[i].0, lease_until = %renewed.lease_until.to_rfc3339(), "renewed the slot's lease");
        }
        Ok(true)
    }

    /// Reads every store's state record again (another process may have moved on).
    async fn reread_states(&mut self) -> SlotResult<()> {
        for i in 0..self.stores.len() {
            let (_, store) = &self.stores[i];
            self.states[i] = store.read(&self.state_keys[i]).await?;
        }
        Ok(())
    }

    /// The slot changed while this process was finishing `key_id` (its lease renewal
    /// lost the check-and-set): another process finished the rotation, which is done,
    /// or took the slot over, which is its to finish. Either way this run stops.
    async fn finished_elsewhere(&mut self, key_id: &str) -> SlotResult<SlotOutcome> {
        self.reread_states().await?;
        let landed = self
            .states
            .iter()
            .all(|s| s.current.as_ref().is_some_and(|c| c.key_id == key_id));
        if landed {
            info!(
                event = "rotation.finished_elsewhere",
                key_id,
                outcome = "completed",
                "another process finished this rotation"
            );
        } else {
            self.eng.metrics.rotation(RotationOutcome::Conflict);
            info!(
                event = "rotation.conflict",
                key_id,
                outcome = "conflict",
                "another process took the slot over; leaving the rotation to it"
            );
        }
        Ok(SlotOutcome::Busy)
    }

    /// Revokes a key minted under `intent` whose value was never recorded, then drops
    /// the intent.
    async fn cleanup_intent(&mut self, intent: &Intent) -> SlotResult<()> {
        if intent.service_account_id == NEW_ACCOUNT {
            // A service account created for the slot but never recorded: it has the
            // slot's account name, was created after the intent, and no store knows it.
            let since = intent.lease_until
                - chrono::Duration::from_std(self.eng.policy.lease).unwrap_or_default()
                - chrono::Duration::seconds(5);
            let known = self.referenced_accounts();
            let accounts = self
                .eng
                .client
                .list_service_accounts(&self.slot.project_id)
                .await?;
            for sa in accounts {
                if sa.name == self.slot.service_account_name
                    && policy::ts(sa.created_at) >= since
                    && !known.contains(&sa.id)
                {
                    info!(event = "service_account.unrecorded", service_account_id = %sa.id, "found a service account created by an interrupted run; deleting it");
                    self.delete_account(&sa.id, "unrecorded").await?;
                }
            }
        } else if let Some(key_id) = self.find_by_name(&intent.key_name).await? {
            if self.referenced(&key_id) {
                // The rotation got further than its intent says: a store already holds
                // the key (AWS keeps the intent in tags, written after the label moves,
                // so a crash in between leaves it behind). Never revoke it: finish the
                // promotion where the key is current (clears the intent, starts the
                // grace clock); stores that disagree are reconciled by a rotation.
                info!(event = "rotation.resumed", service_account_id = %intent.service_account_id, key_id = %key_id, "the interrupted rotation's key is already in the stores; finishing it");
                let t = Transition::promote(key_id.clone(), self.now());
                for i in 0..self.stores.len() {
                    let current = self.states[i]
                        .current
                        .as_ref()
                        .is_some_and(|c| c.key_id == key_id);
                    if current && self.states[i].book.intent.as_ref() == Some(intent) {
                        self.apply(i, &t).await?;
                    }
                }
            } else {
                info!(event = "key.unrecorded", service_account_id = %intent.service_account_id, key_id = %key_id, key_name = %intent.key_name, "found a key minted by an interrupted run; revoking it");
                self.revoke(&key_id, "unrecorded").await?;
            }
        }
        for i in 0..self.stores.len() {
            if self.states[i].book.intent.as_ref() == Some(intent) {
                self.apply(i, &Transition::Abandon).await?;
            }
        }
        Ok(())
    }

    /// Looks a key up by exact name on the slot's service account, listing afresh (a key
    /// minted after the cycle's scan is not in `keys`).
    async fn find_by_name(&self, name: &str) -> SlotResult<Option<String>> {
        if let Some(k) = self.keys.iter().find(|k| k.name.as_deref() == Some(name)) {
            return Ok(Some(k.id.clone()));
        }
        let keys = self.eng.client.list_api_keys(&self.slot.project_id).await?;
        Ok(keys
            .into_iter()
            .find(|k| k.name.as_deref() == Some(name))
            .map(|k| k.id))
    }

    async fn abandon_pending(&mut self, key_id: &str) -> SlotResult<()> {
        for i in 0..self.stores.len() {
            let has = self.states[i]
                .pending
                .as_ref()
                .is_some_and(|p| p.key_id == key_id);
            if has {
                self.apply(i, &Transition::Abandon).await?;
            }
        }
        Ok(())
    }

    /// Lists the project's keys afresh when a store serves a key the cycle's listing
    /// lacks: another process minted and promoted it after the scan. Without this the
    /// served key reads as missing and the slot is rotated a second time in one cycle,
    /// overwriting the previous key still in its grace period.
    async fn refresh_keys(&mut self) -> SlotResult<()> {
        let unlisted = self
            .states
            .iter()
            .filter_map(|s| s.current.as_ref())
            .any(|c| !self.live(&c.key_id));
        if !unlisted {
            return Ok(());
        }
        self.relist().await
    }

    /// Replaces the cycle's listing of the slot's keys with a fresh one.
    async fn relist(&mut self) -> SlotResult<()> {
        let mut accounts = self.referenced_accounts();
        accounts.extend(self.slot.service_accounts.iter().map(|(id, _)| id.clone()));
        let keys = self.eng.client.list_api_keys(&self.slot.project_id).await?;
        self.keys = keys
            .into_iter()
            .filter(|k| {
                k.owner.kind == crate::openai::models::OwnerType::ServiceAccount
                    && k.owner
                        .service_account
                        .as_ref()
                        .is_some_and(|sa| accounts.contains(&sa.id))
            })
            .collect();
        Ok(())
    }

    /// Records an intent in every store (the first store's check-and-set decides a
    /// race), mints, stages, then [`finish`](Self::finish)es.
    async fn rotate(&mut self, reason: &str) -> SlotResult<SlotOutcome> {
        let now = self.now();
        let account = if self.new_account {
            NEW_ACCOUNT.to_string()
        } else {
            self.mint_on.clone()
        };
        let mut intent = super::new_intent(
            policy::KEY_NAME_PREFIX,
            self.my_id(),
            now,
            self.eng.policy.lease,
            account,
        );
        // Whoever finishes the rotation keeps the operator's (or the incident's) word
        // on the replaced key.
        intent.revoke_old = self.forced_revoke_old().map(|r| r.to_string());
        let key_name = intent.key_name.clone();
        info!(event = "rotation.started", reason, "rotating slot");
        failpoint!("before_intent");
        for i in 0..self.stores.len() {
            match self.apply(i, &Transition::Intent(intent.clone())).await {
                Ok(()) => {}
                Err(e) if e.kind == StoreErrorKind::Conflict => {
                    // Another process got there first; undo what we wrote and leave.
                    self.undo_intent(i, &intent).await;
                    self.eng.metrics.rotation(RotationOutcome::Conflict);
                    info!(event = "rotation.conflict", store = %e.store, outcome = "conflict", "another process is rotating this slot");
                    return Ok(SlotOutcome::Busy);
                }
                Err(e) => {
                    self.undo_intent(i, &intent).await;
                    return Err(e.into());
                }
            }
        }
        failpoint!("after_intent");

        let minted = if self.new_account {
            self.mint_on_new_account(&intent).await
        } else {
            self.mint_on_account(&intent).await
        };
        let (created, sa_id) = match minted {
            Ok(k) => k,
            Err(e) => {
                // No idempotency key: an ambiguous failure may have created the key.
                warn!(event = "key.mint_failed", service_account_id = %intent.service_account_id, key_name = %key_name, error = %e, "minting failed");
                if let Err(ce) = self.cleanup_intent(&intent).await {
                    warn!(event = "key.mint_cleanup_failed", service_account_id = %intent.service_account_id, error = %ce, "cleanup after a failed mint did not finish; the intent stays for the next cycle");
                }
                return Err(self.rotation_failed(e.into()));
            }
        };
        failpoint!("after_mint");
        self.accounts.insert(sa_id.clone());
        self.performed.push(Performed {
            kind: ActionKind::Mint,
            id: created.id.clone(),
            reason: reason.to_string(),
        });
        info!(event = "key.minted", service_account_id = %sa_id, key_id = %created.id, key_name = %key_name, outcome = "ok", "minted a new key");
        let record = SecretRecord {
            api_key: created.value.clone(),
            key_id: created.id.clone(),
            project_id: self.slot.project_id.clone(),
            service_account_id: sa_id.clone(),
            created_at: policy::ts(created.created_at),
            managed_by: MANAGED_BY.to_string(),
        };
        // The key now exists: it is staged even if shutdown was requested meanwhile.
        if !self.renew_lease().await? {
            // Our lease ran out during the mint and another process has the slot: the
            // key was never stored anywhere, so it goes now.
            let _ = self.revoke(&created.id, "lost_lease").await;
            self.eng.metrics.rotation(RotationOutcome::Conflict);
            info!(event = "rotation.conflict", service_account_id = %sa_id, key_id = %created.id, outcome = "conflict", "lost the slot's lease while minting; revoked the unstored key");
            return Ok(SlotOutcome::Busy);
        }
        self.keys.push(listing_of(
            &created,
            &sa_id,
            &self.slot.service_account_name,
        ));
        // The new key is verified while it is staged: the two are independent, and
        // both must succeed before any consumer sees it.
        let eng = self.eng;
        let verify = self.rule.verify;
        let (staged, verified) = {
            let checking = async {
                match verify {
                    true => Some(verify_key(eng, &record.api_key).await),
                    false => None,
                }
            };
            let stage = self.stage_everywhere(&record);
            tokio::pin!(stage, checking);
            // A run that stops while staging (lost the slot, a store failed) no longer
            // waits for the verification.
            tokio::select! {
                s = &mut stage => match s {
                    Ok(None) => (Ok(None), checking.await),
                    stopped => (stopped, None),
                },
                v = &mut checking => (stage.await, v),
            }
        };
        if let Some(outcome) = staged? {
            return Ok(outcome);
        }
        failpoint!("after_stage");
        self.finish(record, verified).await
    }

    /// Stages `record` (a key this run minted) in every store. `Some(outcome)`: the run
    /// stops there (another writer owns the slot; the key was revoked).
    async fn stage_everywhere(&mut self, record: &SecretRecord) -> SlotResult<Option<SlotOutcome>> {
        let mut staged_anywhere = false;
        for i in 0..self.stores.len() {
            match self.apply(i, &Transition::Stage(record.clone())).await {
                Ok(()) => {
                    staged_anywhere = true;
                    info!(event = "secret.staged", key_id = %record.key_id, store = %self.stores[i].0, outcome = "ok", "staged the new key");
                    failpoint!("after_stage_one");
                }
                Err(e) if e.kind == StoreErrorKind::Conflict => {
                    // Lost check-and-set: another writer owns the slot. Our key was
                    // never served; take it back out and revoke it.
                    self.abandon_pending(&record.key_id).await.ok();
                    self.revoke(&record.key_id, "conflict").await.ok();
                    self.eng.metrics.rotation(RotationOutcome::Conflict);
                    info!(event = "rotation.conflict", key_id = %record.key_id, store = %e.store, outcome = "conflict", "lost check-and-set while staging; revoked our key");
                    return Ok(Some(SlotOutcome::Busy));
                }
                Err(e) => {
                    if !staged_anywhere {
                        // Recorded nowhere: revoke now rather than leave it to the
                        // intent cleanup of a later cycle.
                        if self.revoke(&record.key_id, "stage_failed").await.is_ok() {
                            for j in 0..self.stores.len() {
                                if self.states[j].book.intent.is_some() {
                                    let _ = self.apply(j, &Transition::Abandon).await;
                                }
                            }
                        }
                    }
                    return Err(self.rotation_failed(e.into()));
                }
            }
        }
        Ok(None)
    }

    async fn mint_on_account(
        &self,
        intent: &Intent,
    ) -> Result<(crate::openai::models::CreatedKey, String), ApiError> {
        let req = CreateKeyRequest {
            name: Some(intent.key_name.clone()),
            scopes: self.rule.scopes.clone(),
            expires_in_seconds: self.eng.policy.key_expiry.0.map(|d| d.as_secs()),
        };
        let k = self
            .eng
            .client
            .create_service_account_key(&self.slot.project_id, &intent.service_account_id, &req)
            .await?;
        Ok((k, intent.service_account_id.clone()))
    }

    /// Strategy `new_service_account`: a fresh account with the slot's account name
    /// (so the rule and the path still match); its creation returns its key.
    async fn mint_on_new_account(
        &self,
        _intent: &Intent,
    ) -> Result<(crate::openai::models::CreatedKey, String), ApiError> {
        let sa = self
            .eng
            .client
            .create_service_account(
                &self.slot.project_id,
                &self.slot.service_account_name,
                self.eng.policy.key_expiry.0.map(|d| d.as_secs()),
            )
            .await?;
        info!(event = "service_account.created", service_account_id = %sa.id, name = %sa.name, outcome = "ok", "created a service account for the slot");
        match sa.api_key {
            Some(k) => Ok((k, sa.id)),
            None => Err(ApiError::Decode {
                endpoint: "create_service_account".into(),
                status: 200,
                message: format!("service account {} was created without an api_key", sa.id),
            }),
        }
    }

    /// Deletes a service account (and with it all its keys); 404 counts as done.
    async fn delete_account(&mut self, sa_id: &str, reason: &str) -> SlotResult<()> {
        failpoint!("before_revoke");
        match self
            .eng
            .client
            .delete_service_account(&self.slot.project_id, sa_id)
            .await
        {
            Ok(_) => {
                self.eng.metrics.revocation(RevocationOutcome::Revoked);
                self.performed.push(Performed {
                    kind: ActionKind::DeleteServiceAccount,
                    id: sa_id.to_string(),
                    reason: reason.to_string(),
                });
                info!(
                    event = "service_account.deleted",
                    service_account_id = sa_id,
                    reason,
                    outcome = "revoked",
                    "deleted the slot's previous service account and its keys"
                );
            }
            Err(ApiError::NotFound { .. }) => {
                self.eng.metrics.revocation(RevocationOutcome::AlreadyGone);
            }
            Err(e) => {
                self.eng.metrics.revocation(RevocationOutcome::Failed);
                return Err(e.into());
            }
        }
        failpoint!("after_revoke");
        Ok(())
    }

    /// Service accounts of the slot some store references (current, pending, previous).
    fn referenced_accounts(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for s in &self.states {
            for r in s.current.iter().chain(s.pending.iter()) {
                out.insert(r.service_account_id.clone());
            }
            if let Some(p) = &s.book.previous_service_account_id {
                out.insert(p.clone());
            }
        }
        out
    }

    async fn undo_intent(&mut self, upto: usize, intent: &Intent) {
        for j in 0..upto {
            if self.states[j].book.intent.as_ref() == Some(intent) {
                let _ = self.apply(j, &Transition::Abandon).await;
            }
        }
    }

    /// Stages where missing, verifies (unless `verified` says how the verification
    /// went already), promotes everywhere and reads back.
    async fn finish(
        &mut self,
        record: SecretRecord,
        verified: Option<SlotResult<Result<(), String>>>,
    ) -> SlotResult<SlotOutcome> {
        let key_id = record.key_id.clone();
        for i in 0..self.stores.len() {
            let has = self.states[i]
                .pending
                .as_ref()
                .is_some_and(|p| p.key_id == key_id)
                || self.states[i]
                    .current
                    .as_ref()
                    .is_some_and(|c| c.key_id == key_id);
            if !has {
                self.apply(i, &Transition::Stage(record.clone())).await?;
                info!(event = "secret.staged", key_id = %key_id, store = %self.stores[i].0, outcome = "ok", "staged the new key");
            }
        }
        if !self.renew_lease().await? {
            return self.finished_elsewhere(&key_id).await;
        }
        if self.rule.verify {
            let verdict = match verified {
                Some(v) => v?,
                None => verify_key(self.eng, &record.api_key).await?,
            };
            if let Err(reason) = verdict {
                warn!(event = "key.verify_failed", key_id = %key_id, outcome = "failed", reason = %reason, "new key never verified; revoking it");
                self.abandon_pending(&key_id).await?;
                self.revoke(&key_id, "verify_failed").await?;
                return Err(self.rotation_failed(SlotError::VerifyFailed { key_id, reason }));
            }
            info!(event = "key.verified", key_id = %key_id, outcome = "ok", "new key works");
        }
        failpoint!("after_verify");
        if !self.renew_lease().await? {
            return self.finished_elsewhere(&key_id).await;
        }
        if self.finishing_for_another() {
            // Finishing another live process's key: it may have given up on the key
            // meanwhile (its verification failed) and be revoking it. Publish only
            // what is still staged.
            self.reread_states().await?;
            let states: Vec<&SlotState> = self.states.iter().collect();
            if decide::staged_everywhere(&states) != Some(key_id.as_str()) {
                return self.finished_elsewhere(&key_id).await;
            }
        }
        let at = self.now();
        // An operator's `--revoke-old DURATION` is recorded with the promotion. A run
        // finishing another's `now` cannot revoke at once (it never saw the ask): the
        // promotion itself is the deadline, which the next decision keeps.
        let previous_until = match self.revoke_old() {
            Some(RevokeOld::Now) if self.forced.is_none() => Some(at),
            Some(r) => r.deadline(at),
            None => None,
        };
        let t = Transition::Promote {
            key_id: key_id.clone(),
            at,
            previous_until,
        };
        // What each store's consumers read, read back while the state is promoted.
        let mut served_back = Vec::with_capacity(self.stores.len());
        for i in 0..self.stores.len() {
            // Consumers first, then the state: a crash in between leaves the state
            // pending with the consumer documents already serving the new key, which
            // the next run finishes (the previous key is recorded by the promotion).
            self.publish(i, &record).await?;
            failpoint!("after_publish");
            let store = self.stores[i].1.clone();
            let path = self.slot.path.clone();
            let read_back = async move {
                match store.layout() {
                    Layout::Separate => Some(store.read_consumer(&path).await),
                    _ => None,
                }
            };
            let (promoted, back) = tokio::join!(self.apply(i, &t), read_back);
            served_back.push(back);
            match promoted {
                Ok(()) => {}
                Err(e) if e.kind == StoreErrorKind::Conflict => {
                    // Someone else wrote in between: see whether the promotion landed.
                    let (name, store) = &self.stores[i];
                    let now = store.read(&self.state_keys[i]).await?;
                    let landed = now.current.as_ref().is_some_and(|c| c.key_id == key_id);
                    self.states[i] = now;
                    if !landed {
                        let name = name.clone();
                        return self.lost_promotion(&name, &key_id).await;
                    }
                }
                Err(e) => {
                    return Err(self.rotation_failed(e.into()));
                }
            }
            info!(event = "secret.promoted", key_id = %key_id, store = %self.stores[i].0, outcome = "ok", "promoted the new key");
            failpoint!("after_promote_one");
        }
        // Every store read back: what consumers will read must be the new key.
        for (i, back) in served_back.into_iter().enumerate() {
            let (name, store) = &self.stores[i];
            let found = if let Some(doc) = back {
                let doc = doc?;
                let found = doc.record.as_ref().map(|c| c.key_id.clone());
                self.docs[i][0].1 = doc;
                found
            } else {
                let back = store.read(&self.state_keys[i]).await?;
                let found = back.current.as_ref().map(|c| c.key_id.clone());
                self.states[i] = back;
                found
            };
            if found.as_deref() != Some(key_id.as_str()) {
                return Err(self.rotation_failed(SlotError::ReadBack {
                    store: name.clone(),
                    expected: key_id,
                    found,
                }));
            }
        }
        self.eng.metrics.rotation(RotationOutcome::Completed);
        info!(event = "rotation.completed", key_id = %key_id, outcome = "completed", stores = self.stores.len(), "every store serves the new key");
        // A replaced key about to be revoked needs no expiry.
        let revoking_now = self.forced.is_some_and(|f| f.revoke_old == RevokeOld::Now);
        if let Some(previous) = self.replaced_key(&key_id).filter(|_| !revoking_now) {
            // Under `revoke_when = "unused"` a key in use is kept until `max_grace`: it
            // must not expire under a consumer before keyrotd would revoke it.
            // An operator's deadline is kept to the second, counted from the promotion.
            let grace = match self.eng.policy.revoke_when {
                crate::config::RevokeWhen::Grace => self.rule.grace_period,
                crate::config::RevokeWhen::Unused => {
                    self.rule.grace_period.max(self.eng.policy.max_grace)
                }
            };
            let chrono = |d| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
            let until = previous_until
                .or_else(|| at.checked_add_signed(chrono(grace)))
                .unwrap_or(at);
            let lifetime = until - self.now() + chrono(crate::config::EXPIRY_MARGIN);
            self.set_expiry(&previous, lifetime.num_seconds().max(1) as u64)
                .await;
        }
        Ok(SlotOutcome::Rotated { key_id })
    }

    /// This run's own forced `--revoke-old`, unless it is the rule's grace period.
    fn forced_revoke_old(&self) -> Option<RevokeOld> {
        self.forced
            .map(|f| f.revoke_old)
            .filter(|r| *r != RevokeOld::Grace)
    }

    /// The `--revoke-old` this rotation carries: this run's own forced one, else the one
    /// recorded in the intent of the run it finishes (a crash, a takeover); `None`: the
    /// rule's grace period.
    fn revoke_old(&self) -> Option<RevokeOld> {
        if self.forced.is_some() {
            return self.forced_revoke_old();
        }
        let recorded = self
            .states
            .iter()
            .find_map(|s| s.book.intent.as_ref()?.revoke_old.as_deref())?;
        match RevokeOld::parse(recorded) {
            Ok(r) => (r != RevokeOld::Grace).then_some(r),
            Err(e) => {
                warn!(event = "rotation.revoke_old_unreadable", recorded, error = %e, "the intent's revoke_old is not understood; the rule's grace period applies");
                None
            }
        }
    }

    /// Another process promoted its own key in store `name` while this run promoted
    /// `key_id` (a store whose intents are not compare-and-set, AWS, lets two replicas
    /// both mint). When no store or consumer document serves `key_id`, it was never
    /// served: it is dropped and revoked, as a lost stage is. Otherwise the slot fails
    /// and the next cycle reconciles the stores.
    async fn lost_promotion(&mut self, name: &str, key_id: &str) -> SlotResult<SlotOutcome> {
        self.reread_states().await?;
        let consumers_have_it = self
            .docs
            .iter()
            .flatten()
            .any(|(_, d)| d.record.as_ref().is_some_and(|r| r.key_id == key_id));
        let current = self
            .states
            .iter()
            .any(|s| s.current.as_ref().is_some_and(|c| c.key_id == key_id));
        if current || consumers_have_it {
            return Err(self.rotation_failed(SlotError::Other(format!(
                "store {name:?} changed while promoting {key_id}; the stores will be reconciled next cycle"
            ))));
        }
        self.abandon_pending(key_id).await.ok();
        self.revoke(key_id, "conflict").await.ok();
        self.eng.metrics.rotation(RotationOutcome::Conflict);
        info!(event = "rotation.conflict", key_id, store = %name, outcome = "conflict", "another process promoted its key first; revoked ours, which was never served");
        Ok(SlotOutcome::Busy)
    }

    /// Writes `record` into every consumer document of store `i` that does not serve it
    /// yet (the rendered path, and former paths still in their grace period), each
    /// compare-and-set on the version read. A document changed meanwhile is read again:
    /// another process publishing the same key is fine, anything else fails the slot.
    async fn publish(&mut self, i: usize, record: &SecretRecord) -> SlotResult<()> {
        if self.stores[i].1.layout() != Layout::Separate {
            return Ok(());
        }
        let recorded = self.states[i]
            .book
            .locations
            .iter()
            .any(|l| l.path == self.slot.path && l.retire_after.is_none());
        if !recorded {
            // A first promotion (bootstrap): record where the key is served before it
            // is, so a later rename or store move knows the path to keep and retire.
            let retire_after =
                self.now() + chrono::Duration::from_std(self.rule.grace_period).unwrap_or_default();
            let t = Transition::Relocate {
                to: self.slot.path.clone(),
                retire_after,
            };
            match self.apply(i, &t).await {
                Ok(()) => {}
                Err(e) if e.kind == StoreErrorKind::Conflict => {
                    // Another process finishing the same key recorded it first.
                    let (name, store) = &self.stores[i];
                    let now = store.read(&self.state_keys[i]).await?;
                    let landed = now
                        .book
                        .locations
                        .iter()
                        .any(|l| l.path == self.slot.path && l.retire_after.is_none());
                    self.states[i] = now;
                    if !landed {
                        return Err(self.rotation_failed(SlotError::Other(format!(
                            "store {name:?} changed while recording {:?}; the stores will be reconciled next cycle",
                            self.slot.path
                        ))));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        for d in 0..self.docs[i].len() {
            let has = self.docs[i][d]
                .1
                .record
                .as_ref()
                .is_some_and(|r| r.key_id == record.key_id);
            if has {
                continue;
            }
            match self.write_doc(i, d, Some(record)).await {
                Ok(()) => {}
                Err(SlotError::Store(e)) if e.kind == StoreErrorKind::Conflict => {
                    let (name, store) = &self.stores[i];
                    let doc = store.read_consumer(&self.docs[i][d].0).await?;
                    let landed = doc
                        .record
                        .as_ref()
                        .is_some_and(|r| r.key_id == record.key_id);
                    self.docs[i][d].1 = doc;
                    if !landed {
                        return Err(self.rotation_failed(SlotError::Other(format!(
                            "store {name:?} changed while promoting {}; the stores will be reconciled next cycle",
                            record.key_id
                        ))));
                    }
                }
                Err(e) => {
                    return Err(self.rotation_failed(e));
                }
            }
        }
        Ok(())
    }

    /// DELETEs a key; 404 counts as done. A revoked key leaves `keys`, so a later step
    /// of the same run (the sweep) does not delete it a second time.
    async fn revoke(&mut self, key_id: &str, reason: &str) -> SlotResult<()> {
        failpoint!("before_revoke");
        match self
            .eng
            .client
            .delete_api_key(&self.slot.project_id, key_id)
            .await
        {
            Ok(_) => {
                self.eng.metrics.revocation(RevocationOutcome::Revoked);
                self.performed.push(Performed {
                    kind: ActionKind::Revoke,
                    id: key_id.to_string(),
                    reason: reason.to_string(),
                });
                info!(
                    event = "key.revoked",
                    key_id,
                    reason,
                    outcome = "revoked",
                    "revoked key"
                );
            }
            Err(ApiError::NotFound { .. }) => {
                self.eng.metrics.revocation(RevocationOutcome::AlreadyGone);
                info!(
                    event = "key.revoked",
                    key_id,
                    reason,
                    outcome = "already_gone",
                    "key was already gone"
                );
            }
            Err(e) => {
                self.eng.metrics.revocation(RevocationOutcome::Failed);
                error!(event = "key.revoke_failed", key_id, reason, outcome = "failed", error = %e, "could not revoke key");
                return Err(e.into());
            }
        }
        self.keys.retain(|k| k.id != key_id);
        failpoint!("after_revoke");
        Ok(())
    }

    /// Whether any store holds the key: current, pending or previous, in a state
    /// record of the slot's stores or of a store the rule moved away from, or in a
    /// consumer document at any of the slot's locations.
    fn referenced(&self, key_id: &str) -> bool {
        self.served(key_id)
            || self
                .states
                .iter()
                .chain(self.others.iter().map(|o| &o.state))
                .any(|s| s.referenced_key_ids().any(|r| r == key_id))
    }

    /// Whether any store serves the key (or has it staged): I1 and I3 never let such
    /// a key be revoked.
    fn served(&self, key_id: &str) -> bool {
        let in_state = |s: &SlotState| {
            s.current.as_ref().is_some_and(|c| c.key_id == key_id)
                || s.pending.as_ref().is_some_and(|p| p.key_id == key_id)
        };
        let in_docs = |docs: &[(String, ConsumerDoc)]| {
            docs.iter().any(|(_, d)| {
                d.record.as_ref().is_some_and(|r| r.key_id == key_id)
                    || d.legacy.as_ref().is_some_and(&in_state)
            })
        };
        self.states.iter().any(in_state)
            || self.docs.iter().any(|d| in_docs(d))
            || self
                .others
                .iter()
                .any(|o| in_state(&o.state) || in_docs(&o.docs))
    }

    /// Logs a replaced key kept because it is still in use; past the grace period
    /// that is `key.still_in_use` (WARN, metric, webhook): someone should switch its
    /// consumers over before `max_grace`.
    async fn keep(&self, key_id: &str, why: Why, a: &Action) {
        self.extend_expiry(key_id, a.due_at).await;
        let last_used = self
            .keys
            .iter()
            .find(|k| k.id == key_id)
            .and_then(|k| k.last_used_at)
            .map(|t| policy::ts(t).to_rfc3339())
            .unwrap_or_default();
        if why != Why::StillInUse {
            debug!(key_id = %key_id, "replaced key in use within its grace period");
            return;
        }
        self.eng.metrics.still_in_use();
        warn!(
            event = "key.still_in_use",
            key_id = %key_id,
            last_used_at = %last_used,
            revoke_at = %a.due_at.to_rfc3339(),
            "the replaced key is still in use after the grace period; kept until max_grace"
        );
        self.eng
            .notifier
            .send(crate::notify::Notice::KeyStillInUse {
                project_id: self.slot.project_id.clone(),
                service_account_id: self.slot.service_account_id.clone(),
                key_id: key_id.to_string(),
                last_used_at: last_used,
            });
    }

    /// The stores that record `key_id` as their previous key.
    fn holders(&self, key_id: &str) -> Vec<usize> {
        (0..self.stores.len())
            .filter(|&i| self.states[i].book.previous_key_id.as_deref() == Some(key_id))
            .collect()
    }

    /// Revokes a replaced key whose retirement is due (I3: never a key any store of
    /// the slot serves), then forgets it. `Some(outcome)` when the API refused the
    /// deletion and strategy `auto` rotated the slot to a new service account.
    async fn retire_key(&mut self, key_id: &str, why: Why) -> SlotResult<Option<SlotOutcome>> {
        if self.served(key_id) {
            warn!(key_id = %key_id, "previous key is still served by a store; not revoking");
            return Ok(None);
        }
        match self.revoke(key_id, why.as_str()).await {
            Ok(()) => {}
            Err(SlotError::Api(ApiError::Status {
                status: 400,
                message,
                ..
            })) if self.rule.strategy == Strategy::Auto && !self.new_account => {
                return self.fall_back(key_id, &message).await.map(Some);
            }
            Err(e) => return Err(e),
        }
        for i in self.holders(key_id) {
            self.record_retired(i, key_id).await?;
        }
        Ok(None)
    }

    /// The API's older behaviour: a service account's key cannot be deleted. Moves the
    /// slot to a fresh account (strategy `auto`); the old account, with the key, is
    /// deleted after the next grace period.
    async fn fall_back(&mut self, key_id: &str, message: &str) -> SlotResult<SlotOutcome> {
        warn!(event = "rotation.strategy_fallback", key_id = %key_id, api_message = %message, "deleting a service-account key was refused; moving the slot to a new service account");
        self.new_account = true;
        self.rotate(Why::StrategyFallback.as_str()).await
    }

    /// The slot moved to a new service account: deletes the old account, which takes
    /// all its keys with it (the decision waits until none of them is a fresh key
    /// someone else made), then forgets the replaced key and re-keys the state.
    async fn retire_account(&mut self, sa: &str, key_id: &str) -> SlotResult<()> {
        if self.served(key_id) {
            warn!(service_account_id = %sa, key_id = %key_id, "previous key is still served by a store; not deleting its service account");
            return Ok(());
        }
        self.delete_account(sa, Why::GraceOver.as_str()).await?;
        for i in self.holders(key_id) {
            self.record_retired(i, key_id).await?;
            self.rekey(i).await?;
        }
        Ok(())
    }

    /// Records in store `i` that the previous key `key_id` is gone. Losing the
    /// check-and-set to another process that recorded the same thing (two replicas
    /// retiring one key) is success: the state is read again, and written again only
    /// if it still names the key.
    async fn record_retired(&mut self, i: usize, key_id: &str) -> SlotResult<()> {
        let t = Transition::Retired {
            key_id: key_id.to_string(),
        };
        match self.apply(i, &t).await {
            Err(e) if e.kind == StoreErrorKind::Conflict => {
                let (_, state) = read_state(&self.stores[i].1, self.slot).await?;
                let done = state.book.previous_key_id.as_deref() != Some(key_id);
                self.states[i] = state;
                if done {
                    debug!(key_id, store = %self.stores[i].0, "another process recorded the retirement first");
                    return Ok(());
                }
                Ok(self.apply(i, &t).await?)
            }
            r => Ok(r?),
        }
    }

    /// Moves store `i`'s state record to the key of the account the slot serves now,
    /// once the account it was addressed by is deleted (strategy
    /// `new_service_account`): the next scan knows the slot by its remaining account.
    /// A crash in between leaves the consumer document, which the next run imports.
    async fn rekey(&mut self, i: usize) -> SlotResult<()> {
        let (_, store) = &self.stores[i];
        if store.layout() != Layout::Separate {
            return Ok(());
        }
        let Some(sa) = self.states[i]
            .current
            .as_ref()
            .map(|c| c.service_account_id.clone())
        else {
            return Ok(());
        };
        let key = crate::store::state_key(&self.slot.project_id, &sa);
        if key == self.state_keys[i] {
            return Ok(());
        }
        let target = store.read(&key).await?;
        let moved = store
            .apply_to(
                &key,
                &target,
                &Transition::Import(Box::new(self.states[i].clone())),
            )
            .await?;
        store
            .write_consumer(&self.state_keys[i], None, &self.states[i].version)
            .await?;
        self.states[i] = moved;
        self.state_keys[i] = key;
        Ok(())
    }

    /// Revokes a key of the slot's account no store references (an orphan, or another
    /// stale key), re-checked against every store right before: a concurrent process
    /// may have recorded it since this run's read. `Some(outcome)` when the API refused
    /// the deletion and strategy `auto` rotated the slot to a new service account.
    async fn sweep_key(&mut self, key_id: &str, why: Why) -> SlotResult<Option<SlotOutcome>> {
        self.read_all(Vec::new()).await?;
        self.read_others().await?;
        if self.referenced(key_id) {
            return Ok(None);
        }
        match self.revoke(key_id, why.as_str()).await {
            Ok(()) => Ok(None),
            Err(SlotError::Api(ApiError::Status {
                status: 400,
                message,
                ..
            })) if self.rule.strategy == Strategy::Auto && !self.new_account => {
                self.fall_back(key_id, &message).await.map(Some)
            }
            Err(e) => Err(e),
        }
    }

    /// The key the promotion of `new_key` replaced (the stores' previous key), when
    /// `policy.expire_replaced` asks for its expiry and it is still listed.
    fn replaced_key(&self, new_key: &str) -> Option<String> {
        if !self.eng.policy.expire_replaced {
            return None;
        }
        self.states
            .iter()
            .filter_map(|s| s.book.previous_key_id.as_deref())
            .find(|k| *k != new_key && self.live(k))
            .map(str::to_string)
    }

    /// A replaced key kept because it is in use (`revoke_when = "unused"`) must not
    /// expire before `until` (the decision's `max_grace`): its expiry moves to `until`
    /// plus the margin when the listing shows an earlier one.
    async fn extend_expiry(&self, key_id: &str, until: DateTime<Utc>) {
        if !self.eng.policy.expire_replaced
            || self.eng.policy.revoke_when != crate::config::RevokeWhen::Unused
        {
            return;
        }
        let needed =
            until + chrono::Duration::from_std(crate::config::EXPIRY_MARGIN).unwrap_or_default();
        let Some(current) = self
            .keys
            .iter()
            .find(|k| k.id == key_id)
            .and_then(|k| k.expires_at)
        else {
            // Never expires (keyrotd did not set an expiry): nothing to extend.
            return;
        };
        if policy::ts(current) >= needed {
            return;
        }
        let secs = (needed - self.now()).num_seconds();
        if let Ok(secs) = u64::try_from(secs) {
            if secs > 0 {
                self.set_expiry(key_id, secs).await;
            }
        }
    }

    /// Asks OpenAI to expire `key_id` `seconds` from now (the key update call). Never
    /// fails the slot: an API without the call (404/405) or refusing it is said once
    /// per process (`key.expiry_unsupported`); keyrotd's own revocation still applies.
    async fn set_expiry(&self, key_id: &str, seconds: u64) {
        use std::sync::atomic::Ordering;
        let req = crate::openai::models::UpdateKeyRequest {
            expires_in_seconds: Some(seconds),
            scopes: None,
        };
        let asked_at = self.now();
        match self
            .eng
            .client
            .update_api_key(&self.slot.project_id, key_id, &req)
            .await
        {
            Ok(k) => {
                let at = k.expires_at.map(policy::ts).unwrap_or_else(|| {
                    asked_at
                        + chrono::Duration::seconds(i64::try_from(seconds).unwrap_or(i64::MAX / 2))
                });
                info!(event = "key.expiry_set", key_id, expires_at = %at.to_rfc3339(), outcome = "ok", "the replaced key expires at the end of its grace period");
            }
            Err(e) if e.is_temporary() => {
                warn!(event = "key.expiry_failed", key_id, outcome = "failed", error = %e, "could not set the replaced key's expiry; keyrotd revokes it itself");
            }
            Err(e) => {
                if !self
                    .eng
                    .memory
                    .expiry_unsupported
                    .swap(true, Ordering::Relaxed)
                {
                    warn!(event = "key.expiry_unsupported", key_id, status = e.status().unwrap_or(0), outcome = "unsupported", error = %e, "the API does not set key expiries; replaced keys are revoked by keyrotd alone");
                } else {
                    debug!(key_id, error = %e, "key expiry not set");
                }
            }
        }
    }
}

/// Checks that a new key works: `Ok(Ok(()))` verified; `Ok(Err(reason))` rejected for
/// good; `Err` could not tell.
async fn verify_key(eng: &Engine, key: &SecretString) -> SlotResult<Result<(), String>> {
    Ok(super::verify_with_retries(
        eng.policy.verify_timeout,
        eng.settings.verify_backoff,
        || eng.client.verify_key(key),
    )
    .await?)
}

/// A listing object for a key minted in this run, so later steps of the same run see it.
fn listing_of(
    created: &crate::openai::models::CreatedKey,
    sa_id: &str,
    sa_name: &str,
) -> ProjectApiKey {
    use crate::openai::models::{ApiKeyOwner, OwnerServiceAccount, OwnerType};
    ProjectApiKey {
        id: created.id.clone(),
        object: None,
        redacted_value: None,
        name: created.name.clone(),
        created_at: created.created_at,
        last_used_at: None,
        expires_at: created.expires_at,
        owner_project_access: None,
        owner: ApiKeyOwner {
            kind: OwnerType::ServiceAccount,
            user: None,
            service_account: Some(OwnerServiceAccount {
                id: sa_id.to_string(),
                name: Some(sa_name.to_string()),
                created_at: None,
                role: None,
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::{promoted_after, DateTime, Forced, RevokeOld, Utc};
    use std::time::Duration;

    #[test]
    fn only_a_promotion_in_a_later_second_answers_a_rotation_asked_for() {
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let asked = at("2026-12-02T10:00:00.700Z");
        // The second of the ask: maybe before it (10:00:00.2), so not an answer.
        assert!(!promoted_after(at("2026-12-02T10:00:00Z"), asked));
        assert!(!promoted_after(at("2026-12-02T09:59:59Z"), asked));
        assert!(promoted_after(at("2026-12-02T10:00:01Z"), asked));
        // Forced::manual keeps the ask to the second; the same holds.
        let f = Forced::manual(RevokeOld::Now, asked);
        assert!(!promoted_after(
            at("2026-12-02T10:00:00Z"),
            f.asked_at.unwrap()
        ));
    }

    #[test]
    fn revoke_old_reads_now_grace_and_durations() {
        assert_eq!(RevokeOld::parse("now"), Ok(RevokeOld::Now));
        assert_eq!(RevokeOld::parse("grace"), Ok(RevokeOld::Grace));
        assert_eq!(RevokeOld::parse("0s"), Ok(RevokeOld::Now));
        assert_eq!(
            RevokeOld::parse("1h 30m"),
            Ok(RevokeOld::After(Duration::from_secs(5400)))
        );
        assert_eq!(
            RevokeOld::After(Duration::from_secs(900)).to_string(),
            "15m"
        );
        let e = RevokeOld::parse("soon").unwrap_err();
        assert!(e.contains("now, grace or a duration"), "{e}");
        let at = chrono::Utc::now();
        assert_eq!(RevokeOld::Now.deadline(at), None);
        assert_eq!(
            RevokeOld::After(Duration::from_secs(60)).deadline(at),
            Some(at + chrono::Duration::seconds(60))
        );
    }
}
