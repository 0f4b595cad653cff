//! The admin key kept in a secret store, and its self-rotation.
//!
//! With `openai.admin_key_store` the admin key lives in one store record (the DESIGN.md §3
//! document at `openai.admin_key_path`, `api_key` holding the key, `key_id` its admin
//! key id, `project_id = "organization"`, `service_account_id = "admin_api_key"`). It
//! changes only through the same check-and-set [`Transition`]s as a project-key slot,
//! so the crash-safety argument of [`crate::rotation`] carries over unchanged.
//!
//! # Every cycle ([`maybe_rotate`], before the scan)
//!
//! 1. **Reload**: read the record; when its `api_key` differs from the one the client
//!    holds (another replica rotated it), prove it with one cheap call and switch the
//!    client to it. A stored key that does not work is refused (the client keeps the
//!    key it has) and reported.
//! 2. **Seed** (bootstrap), when the store holds nothing: see below.
//! 3. **Resume** what a process left behind: a *pending* admin key is verified and
//!    promoted, or deleted (with the current key) when it fails; an *intent* with
//!    nothing staged means a process died around the create: the key named in the
//!    intent is looked up by that exact name, deleted, and the intent dropped. An
//!    intent of another live process (lease not expired) leaves the key alone.
//! 4. **Retire**: once `policy.grace_period` has passed since promotion, DELETE the
//!    previous admin key (404 = done), with the current key, and forget it. Other
//!    replicas switch to the new key at their next cycle's reload, so the grace period
//!    must be longer than the schedule's interval.
//! 5. **Rotate** when `openai.rotate_admin_key` is set, the stored key (its record's
//!    `created_at`) is older than `openai.admin_key_max_age`, and no previous key is
//!    still in its grace period: intent (exact name `keyrotd-admin-<UTC ts>-<nonce>`)
//!    → `POST /organization/admin_api_keys` → stage (CAS) → verify (list one project
//!    with the new key) → promote (CAS) → read back → switch the client. A new key
//!    that never verifies is deleted with the old key and never promoted; the old key
//!    is deleted only by step 4 of a later cycle. So the store always holds a working
//!    admin key and the client always runs on the stored one or its predecessor.
//!
//! # Bootstrap: seeding the store
//!
//! The store is the source of truth. To start, keep `admin_key_env` (or
//! `admin_key_file`) pointing at the current admin key beside `admin_key_store`: while
//! the store holds no record at the path, keyrotd runs on that *seed* key, and the first
//! (non-dry-run) cycle writes it into the store. The record needs the key's admin key
//! id (to delete it after its successor is promoted), which the API does not return
//! for a value: keyrotd lists the organization's admin keys and takes the single one
//! whose `redacted_value` (`sk-admin...xyz`) is consistent with the seed. When none or
//! several match, nothing is written and the cycle reports it; write the record by hand
//! instead (e.g. `bao kv put secret/keyrotd/admin-key api_key=@key key_id=key_...
//! project_id=organization service_account_id=admin_api_key
//! created_at=2026-01-01T00:00:00Z managed_by=keyrotd`). Once the store holds a record
//! the seed is never read again (it may be removed, and will stop working once rotated
//! away).

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use tracing::{debug, info, warn};

use crate::config::AdminKeyStore;
use crate::metrics::{RevocationOutcome, RotationOutcome};
use crate::openai::models::CreateAdminKeyRequest;
use crate::openai::ApiError;
use crate::policy;
use crate::rotation::Engine;
use crate::store::{
    DynStore, Intent, SecretRecord, SecretStore, SlotState, StoreError, StoreErrorKind, Transition,
    MANAGED_BY,
};

/// Names of admin keys keyrotd creates start with this.
pub const ADMIN_KEY_NAME_PREFIX: &str = "keyrotd-admin-";
/// `project_id` of the admin key's record: the key belongs to the organization.
pub const RECORD_PROJECT_ID: &str = "organization";
/// `service_account_id` of the admin key's record (and of its intents).
pub const RECORD_OWNER_ID: &str = "admin_api_key";

/// Why admin-key maintenance failed this cycle. Never carries a secret value.
#[derive(Debug, thiserror::Error)]
pub enum AdminKeyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("OpenAI API: {0}")]
    Api(#[from] ApiError),
    #[error("the new admin key {key_id} failed verification and was deleted: {reason}")]
    VerifyFailed { key_id: String, reason: String },
    #[error("the stored admin key {key_id} does not work; still using the previous one: {reason}")]
    StoredKeyRejected { key_id: String, reason: String },
    #[error("cannot seed the admin key store: {0}")]
    Seed(String),
    #[error("{0}")]
    Other(String),
}

type AdminResult<T> = Result<T, AdminKeyError>;

/// What admin-key maintenance did in one cycle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminKeyReport {
    /// The client switched to the stored key (another process rotated it).
    pub reloaded: bool,
    /// The seed key was written into the empty store (its admin key id).
    pub seeded: Option<String>,
    /// Admin keys created by an interrupted run and deleted now.
    pub cleaned_up: Vec<String>,
    /// A new admin key was promoted (its id).
    pub rotated: Option<String>,
    /// The previous admin key was deleted after its grace period (its id).
    pub retired: Option<String>,
    /// Another process holds the admin key's record.
    pub busy: bool,
    /// `--dry-run`: what would have been done.
    pub planned: Vec<String>,
}

/// The admin key a process starts with when it is kept in `store` at `path`: the
/// record's `api_key`; while the store holds no record, the seed (or a seed staged by
/// an interrupted bootstrap).
pub async fn initial_key(
    store: &dyn SecretStore,
    path: &str,
    seed: Option<SecretString>,
) -> AdminResult<SecretString> {
    let state = store.read(path).await?;
    if let Some(cur) = state.current {
        return Ok(cur.api_key);
    }
    if let Some(seed) = seed {
        return Ok(seed);
    }
    if let Some(pending) = state.pending {
        return Ok(pending.api_key);
    }
    Err(AdminKeyError::Seed(format!(
        "store {:?} holds no admin key at {path:?}; set openai.admin_key_env or \
         openai.admin_key_file to the current admin key once, to seed it",
        store.name()
    )))
}

/// Admin-key maintenance for one cycle: reload, seed, resume, retire, rotate (see the
/// module docs). Does nothing unless `openai.admin_key_store` is set.
pub async fn maybe_rotate(eng: &Engine) -> AdminResult<AdminKeyReport> {
    let Some(cfg) = eng.settings.admin_key.clone() else {
        return Ok(AdminKeyReport::default());
    };
    let store = eng.stores.get(&cfg.store).cloned().ok_or_else(|| {
        StoreError::new(
            cfg.store.clone(),
            StoreErrorKind::InvalidConfig,
            "store is not configured",
        )
    })?;
    let state = store.read(&cfg.path).await?;
    let mut run = Run {
        eng,
        cfg,
        store,
        state,
        report: AdminKeyReport::default(),
    };
    run.reload().await?;
    let empty = run.state.current.is_none()
        && run.state.pending.is_none()
        && run.state.book.intent.is_none();
    if empty {
        run.seed().await?;
        return Ok(run.report);
    }
    if run.resume().await? {
        return Ok(run.report);
    }
    run.retire().await?;
    if let Some(reason) = run.due() {
        if eng.settings.dry_run {
            run.report
                .planned
                .push(format!("rotate the admin key ({reason})"));
        } else if !eng.shutdown.is_cancelled() {
            run.rotate(reason).await?;
        }
    }
    Ok(run.report)
}

struct Run<'a> {
    eng: &'a Engine,
    cfg: AdminKeyStore,
    store: DynStore,
    /// The record as last read or written.
    state: SlotState,
    report: AdminKeyReport,
}

impl Run<'_> {
    /// Now, to the second (what stores record must read back equal).
    fn now(&self) -> DateTime<Utc> {
        use chrono::SubsecRound;
        self.eng.clock.now().trunc_subsecs(0)
    }

    fn my_id(&self) -> &str {
        &self.eng.settings.instance_id
    }

    fn dry_run(&self) -> bool {
        self.eng.settings.dry_run
    }

    async fn apply(&mut self, t: &Transition) -> Result<(), StoreError> {
        let next = self.store.apply_to(&self.cfg.path, &self.state, t).await?;
        self.state = next;
        Ok(())
    }

    async fn reread(&mut self) -> Result<(), StoreError> {
        self.state = self.store.read(&self.cfg.path).await?;
        Ok(())
    }

    /// Switches the client to the stored key when it holds another one, after proving
    /// the stored key works.
    async fn reload(&mut self) -> AdminResult<()> {
        let Some(cur) = self.state.current.clone() else {
            return Ok(());
        };
        if self.eng.client.uses_admin_key(&cur.api_key) {
            return Ok(());
        }
        match self.eng.client.ping_with(&cur.api_key).await {
            Ok(()) => {}
            Err(e @ (ApiError::Unauthorized { .. } | ApiError::Forbidden { .. })) => {
                warn!(event = "admin_key.reload_refused", key_id = %cur.key_id, store = %self.cfg.store, outcome = "rejected", error = %e, "the stored admin key does not work; keeping the one in use");
                return Err(AdminKeyError::StoredKeyRejected {
                    key_id: cur.key_id,
                    reason: e.to_string(),
                });
            }
            Err(e) => return Err(e.into()),
        }
        self.eng.client.set_admin_key(cur.api_key);
        self.report.reloaded = true;
        info!(event = "admin_key.reloaded", key_id = %cur.key_id, store = %self.cfg.store, outcome = "ok", "switched to the admin key in the store");
        Ok(())
    }

    /// Writes the key the client runs on (the seed) into the empty store.
    async fn seed(&mut self) -> AdminResult<()> {
        if self.dry_run() {
            self.report
                .planned
                .push("seed the admin key store with the configured admin key".into());
            return Ok(());
        }
        let seed = self.eng.client.admin_key();
        // Proves the seed first: an unusable seed must never become the stored key.
        self.eng.client.ping().await?;
        let keys = self.eng.client.list_admin_api_keys().await?;
        let matching: Vec<_> = keys
            .iter()
            .filter(|k| k.redaction_matches(seed.expose_secret()))
            .collect();
        let listed = match matching.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(AdminKeyError::Seed(
                    "no admin key of the organization has a redacted value matching the \
                     configured admin key; write the record by hand (see the admin_key docs)"
                        .into(),
                ))
            }
            many => {
                let ids: Vec<&str> = many.iter().map(|k| k.id.as_str()).collect();
                return Err(AdminKeyError::Seed(format!(
                    "{} admin keys ({}) have a redacted value matching the configured admin \
                     key; write the record with its key_id by hand (see the admin_key docs)",
                    ids.len(),
                    ids.join(", ")
                )));
            }
        };
        let record = SecretRecord {
            api_key: seed,
            key_id: listed.id.clone(),
            project_id: RECORD_PROJECT_ID.to_string(),
            service_account_id: RECORD_OWNER_ID.to_string(),
            created_at: policy::ts(listed.created_at),
            managed_by: MANAGED_BY.to_string(),
        };
        match self.apply(&Transition::Stage(record)).await {
            Ok(()) => {}
            Err(e) if e.kind == StoreErrorKind::Conflict => {
                // Another process seeded (or rotated) first: use its record next cycle.
                self.reread().await?;
                self.report.busy = true;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        let at = self.now();
        self.apply(&Transition::promote(listed.id.clone(), at))
            .await?;
        info!(event = "admin_key.seeded", key_id = %listed.id, store = %self.cfg.store, outcome = "ok", "stored the configured admin key; the store is its source from now on");
        self.report.seeded = Some(listed.id);
        Ok(())
    }

    /// Finishes or cleans up what an earlier run left. `true` ends this cycle's
    /// admin-key work (another process holds the record, or dry run).
    async fn resume(&mut self) -> AdminResult<bool> {
        let now = self.now();
        let intent = self.state.book.intent.clone();
        if let Some(i) = &intent {
            if i.owner != self.my_id() && i.lease_until > now {
                debug!(owner = %i.owner, key_name = %i.key_name, "admin key record held by another process");
                self.report.busy = true;
                return Ok(true);
            }
        }
        if let Some(pending) = self.state.pending.clone() {
            if self
                .state
                .current
                .as_ref()
                .is_some_and(|c| c.key_id == pending.key_id)
            {
                if !self.dry_run() {
                    let t = Transition::promote(pending.key_id, now);
                    self.apply(&t).await?;
                }
                return Ok(self.dry_run());
            }
            if self.dry_run() {
                self.report.planned.push(format!(
                    "resume the admin key rotation to {}",
                    pending.key_id
                ));
                return Ok(true);
            }
            match self.eng.client.get_admin_api_key(&pending.key_id).await {
                Ok(_) => {
                    info!(event = "admin_key.resumed", key_id = %pending.key_id, "resuming an interrupted admin key rotation");
                    self.finish(pending).await?;
                }
                Err(ApiError::NotFound { .. }) => {
                    info!(event = "admin_key.abandoned", key_id = %pending.key_id, outcome = "key_gone", "the pending admin key no longer exists; dropping it");
                    self.apply(&Transition::Abandon).await?;
                }
                Err(e) => return Err(e.into()),
            }
            return Ok(false);
        }
        if let Some(intent) = intent {
            if self.dry_run() {
                self.report
                    .planned
                    .push(format!("clean up admin key intent {}", intent.key_name));
                return Ok(true);
            }
            self.cleanup_intent(&intent).await?;
        }
        Ok(false)
    }

    /// Deletes the admin key created under `intent` whose value was never stored (found
    /// by its exact name), then drops the intent.
    async fn cleanup_intent(&mut self, intent: &Intent) -> AdminResult<()> {
        let keys = self.eng.client.list_admin_api_keys().await?;
        for k in keys
            .iter()
            .filter(|k| k.name.as_deref() == Some(intent.key_name.as_str()))
        {
            // Re-read right before deleting: never a key the record references.
            self.reread().await?;
            if self.state.referenced_key_ids().any(|r| r == k.id) {
                continue;
            }
            info!(event = "admin_key.unrecorded", key_id = %k.id, key_name = %intent.key_name, "found an admin key created by an interrupted run; deleting it");
            self.delete(&k.id, "unrecorded").await?;
            self.report.cleaned_up.push(k.id.clone());
        }
        if self.state.book.intent.as_ref() == Some(intent) {
            self.apply(&Transition::Abandon).await?;
        }
        Ok(())
    }

    /// Deletes an admin key with the client's current key; 404 counts as done.
    async fn delete(&self, key_id: &str, reason: &str) -> AdminResult<()> {
        failpoint!("admin_key_before_delete");
        match self.eng.client.delete_admin_api_key(key_id).await {
            Ok(_) => {
                self.eng.metrics.revocation(RevocationOutcome::Revoked);
                info!(
                    event = "admin_key.deleted",
                    key_id,
                    reason,
                    outcome = "revoked",
                    "deleted admin key"
                );
                Ok(())
            }
            Err(ApiError::NotFound { .. }) => {
                self.eng.metrics.revocation(RevocationOutcome::AlreadyGone);
                info!(
                    event = "admin_key.deleted",
                    key_id,
                    reason,
                    outcome = "already_gone",
                    "admin key was already gone"
                );
                Ok(())
            }
            Err(e) => {
                self.eng.metrics.revocation(RevocationOutcome::Failed);
                warn!(event = "admin_key.delete_failed", key_id, reason, outcome = "failed", error = %e, "could not delete admin key");
                Err(e.into())
            }
        }
    }

    /// Deletes the previous admin key once its grace period is over, then forgets it.
    async fn retire(&mut self) -> AdminResult<()> {
        let Some(prev) = self.state.book.previous_key_id.clone() else {
            return Ok(());
        };
        let Some(cur) = self.state.current.clone() else {
            return Ok(());
        };
        if cur.key_id == prev {
            return Ok(());
        }
        let Some(promoted_at) = self.state.book.promoted_at else {
            // Promotion landed without its clock (a crash): start it now.
            if !self.dry_run() {
                let at = self.now();
                self.apply(&Transition::promote(cur.key_id, at)).await?;
            }
            return Ok(());
        };
        let grace = chrono::Duration::from_std(self.eng.policy.grace_period)
            .unwrap_or(chrono::Duration::MAX);
        if self.now() - promoted_at < grace {
            debug!(key_id = %prev, "previous admin key in grace");
            return Ok(());
        }
        if self.dry_run() {
            self.report
                .planned
                .push(format!("delete the previous admin key {prev}"));
            return Ok(());
        }
        if !self.eng.client.uses_admin_key(&cur.api_key) {
            // Never delete the predecessor of a key this process does not run on.
            return Err(AdminKeyError::Other(format!(
                "not deleting the previous admin key {prev}: this process does not use the \
                 stored key {} yet",
                cur.key_id
            )));
        }
        self.delete(&prev, "grace_over").await?;
        self.apply(&Transition::Retired {
            key_id: prev.clone(),
        })
        .await?;
        self.report.retired = Some(prev);
        Ok(())
    }

    /// Why the stored admin key should be rotated now, if it should.
    fn due(&self) -> Option<&'static str> {
        if !self.cfg.rotate {
            return None;
        }
        let cur = self.state.current.as_ref()?;
        if self.state.pending.is_some() || self.state.book.intent.is_some() {
            return None;
        }
        let max_age = chrono::Duration::from_std(self.cfg.max_age).unwrap_or(chrono::Duration::MAX);
        if self.now() - cur.created_at < max_age {
            return None;
        }
        if let Some(prev) = &self.state.book.previous_key_id {
            info!(event = "admin_key.rotation_deferred", key_id = %cur.key_id, previous_key_id = %prev, "the admin key is due, but its predecessor is still in its grace period");
            return None;
        }
        Some("stale")
    }

    /// intent → create → stage → [`finish`](Self::finish).
    async fn rotate(&mut self, reason: &str) -> AdminResult<()> {
        let now = self.now();
        let intent = crate::rotation::new_intent(
            ADMIN_KEY_NAME_PREFIX,
            self.my_id(),
            now,
            self.eng.policy.lease,
            RECORD_OWNER_ID.to_string(),
        );
        let key_name = intent.key_name.clone();
        let old_id = self
            .state
            .current
            .as_ref()
            .map(|c| c.key_id.clone())
            .unwrap_or_default();
        info!(event = "admin_key.rotation_started", key_id = %old_id, key_name = %key_name, reason, "rotating the admin key");
        match self.apply(&Transition::Intent(intent.clone())).await {
            Ok(()) => {}
            Err(e) if e.kind == StoreErrorKind::Conflict => {
                self.eng.metrics.rotation(RotationOutcome::Conflict);
                info!(event = "admin_key.conflict", store = %e.store, outcome = "conflict", "another process is rotating the admin key");
                self.report.busy = true;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        failpoint!("admin_key_after_intent");
        let req = CreateAdminKeyRequest {
            name: key_name.clone(),
            expires_in_seconds: None,
        };
        let created = match self.eng.client.create_admin_api_key(&req).await {
            Ok(k) => k,
            Err(e) => {
                // No idempotency key: an ambiguous failure may have created the key.
                warn!(event = "admin_key.create_failed", key_name = %key_name, error = %e, "creating the admin key failed");
                if let Err(ce) = self.cleanup_intent(&intent).await {
                    warn!(event = "admin_key.cleanup_failed", key_name = %key_name, error = %ce, "cleanup after a failed create did not finish; the intent stays for the next cycle");
                }
                self.eng.metrics.rotation(RotationOutcome::Failed);
                return Err(e.into());
            }
        };
        failpoint!("admin_key_after_create");
        info!(event = "admin_key.created", key_id = %created.id, key_name = %key_name, outcome = "ok", "created a new admin key");
        let record = SecretRecord {
            api_key: created.value.clone(),
            key_id: created.id.clone(),
            project_id: RECORD_PROJECT_ID.to_string(),
            service_account_id: RECORD_OWNER_ID.to_string(),
            created_at: policy::ts(created.created_at),
            managed_by: MANAGED_BY.to_string(),
        };
        match self.apply(&Transition::Stage(record.clone())).await {
            Ok(()) => {}
            Err(e) => {
                // Stored nowhere: delete it now (with the old key, which still works).
                let conflict = e.kind == StoreErrorKind::Conflict;
                if self.delete(&record.key_id, "stage_failed").await.is_ok() && !conflict {
                    if let Ok(()) = self.reread().await {
                        if self.state.book.intent.as_ref() == Some(&intent) {
                            let _ = self.apply(&Transition::Abandon).await;
                        }
                    }
                }
                if conflict {
                    self.eng.metrics.rotation(RotationOutcome::Conflict);
                    info!(event = "admin_key.conflict", key_id = %record.key_id, store = %e.store, outcome = "conflict", "lost check-and-set while staging; deleted the new admin key");
                    self.report.busy = true;
                    return Ok(());
                }
                self.eng.metrics.rotation(RotationOutcome::Failed);
                return Err(e.into());
            }
        }
        info!(event = "admin_key.staged", key_id = %record.key_id, store = %self.cfg.store, outcome = "ok", "staged the new admin key");
        failpoint!("admin_key_after_stage");
        self.finish(record).await
    }

    /// Verifies the staged key, promotes it, reads it back and switches the client.
    async fn finish(&mut self, record: SecretRecord) -> AdminResult<()> {
        let key_id = record.key_id.clone();
        if let Err(reason) = self.verify(&record.api_key).await? {
            warn!(event = "admin_key.verify_failed", key_id = %key_id, outcome = "failed", reason = %reason, "the new admin key never verified; deleting it");
            // Delete first: a pending record that outlives a failed delete is retried
            // next cycle, an unreferenced admin key would not be.
            self.delete(&key_id, "verify_failed").await?;
            self.apply(&Transition::Abandon).await?;
            self.eng.metrics.rotation(RotationOutcome::VerifyFailed);
            return Err(AdminKeyError::VerifyFailed { key_id, reason });
        }
        info!(event = "admin_key.verified", key_id = %key_id, outcome = "ok", "the new admin key works");
        failpoint!("admin_key_after_verify");
        let at = self.now();
        let t = Transition::promote(key_id.clone(), at);
        match self.apply(&t).await {
            Ok(()) => {}
            Err(e) if e.kind == StoreErrorKind::Conflict => self.reread().await?,
            Err(e) => {
                self.eng.metrics.rotation(RotationOutcome::Failed);
                return Err(e.into());
            }
        }
        self.reread().await?;
        let found = self.state.current.as_ref().map(|c| c.key_id.clone());
        if found.as_deref() != Some(key_id.as_str()) {
            self.eng.metrics.rotation(RotationOutcome::Failed);
            return Err(AdminKeyError::Other(format!(
                "store {:?} read back admin key {found:?} after promoting {key_id}",
                self.cfg.store
            )));
        }
        self.eng.client.set_admin_key(record.api_key);
        self.eng.metrics.rotation(RotationOutcome::Completed);
        info!(event = "admin_key.promoted", key_id = %key_id, store = %self.cfg.store, outcome = "completed", "the store serves the new admin key; this process uses it");
        self.report.rotated = Some(key_id);
        Ok(())
    }

    /// `Ok(Ok(()))` verified; `Ok(Err(reason))` rejected for good; `Err` could not tell.
    async fn verify(&self, key: &SecretString) -> AdminResult<Result<(), String>> {
        let eng = self.eng;
        Ok(crate::rotation::verify_with_retries(
            eng.policy.verify_timeout,
            eng.settings.verify_backoff,
            || eng.client.ping_with(key),
        )
        .await?)
    }
}
