//! The rotation engine: one cycle over every slot, the only place that orders
//! mint → stage → verify → promote → retire (DESIGN.md §4) and keeps the invariants (§5).
//!
//! A cycle scans the organization, derives the slots from the rules, and runs each
//! slot's state machine (`slot`) with bounded concurrency. A failing slot is logged,
//! counted and retried next cycle; it never stops the others (I6). All state that must
//! survive a restart lives in the stores, so a process on another machine picks up
//! where a dead one stopped.

/// A crash point at a step boundary of the slot's and the admin key's state
/// machines (feature `failpoints`): the process aborts, and the crash harness checks
/// what the next process makes of the state it left.
macro_rules! failpoint {
    ($name:literal) => {
        fail::fail_point!($name, |_| {
            // A crash, not an error: the harness checks what the next process makes of it.
            std::process::abort()
        });
    };
}

pub mod admin_key;
pub mod decide;
pub mod manual;
mod outside;
mod slot;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

use crate::backoff::Backoff;
use crate::config::{PolicyConfig, Rule, UserKeys};
use crate::metrics::{Metrics, RevocationOutcome, SlotStatus};
use crate::notify::{Notice, Notifier};
use crate::openai::models::{AuditLog, OwnerType, ProjectApiKey};
use crate::openai::{ApiError, Client};
use crate::plan::{self, Inventory, Plan, Slot, SlotView, Summary};
use crate::policy::{self, Verdict};
use crate::store::DynStore;

pub use crate::metrics::FailureKind;
pub use slot::{Forced, Performed, RevokeOld, SlotError, SlotFailure, SlotOutcome};

/// The engine's notion of now; tests substitute a manual clock.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// Wall-clock time.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock tests move by hand.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<std::sync::Mutex<DateTime<Utc>>>);

impl ManualClock {
    pub fn new(t: DateTime<Utc>) -> Self {
        ManualClock(Arc::new(std::sync::Mutex::new(t)))
    }
    pub fn advance(&self, d: Duration) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *g += chrono::Duration::from_std(d).unwrap_or_default();
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Engine settings that are not rules or policy.
#[derive(Debug, Clone)]
pub struct Settings {
    pub concurrency: usize,
    pub include_archived: bool,
    /// Written into intents: who is working on a slot.
    pub instance_id: String,
    /// Decide and log, change nothing anywhere.
    pub dry_run: bool,
    /// First wait between verification attempts (doubles up to 5 s).
    pub verify_backoff: Duration,
    /// Deadline of the scan in [`Engine::survey`] (`openai.scan_timeout`).
    pub scan_timeout: Duration,
    /// The admin key's store record and rotation (`openai.admin_key_store`), if any.
    pub admin_key: Option<crate::config::AdminKeyStore>,
    /// `openai.admin_key_file`, re-read at the start of every cycle (a rotated
    /// Kubernetes Secret or systemd credential is picked up without a restart).
    pub admin_key_file: Option<std::path::PathBuf>,
}

/// One slot's result in a cycle.
#[derive(Debug, Clone)]
pub struct SlotReport {
    pub slot: Slot,
    pub outcome: Result<SlotOutcome, SlotFailure>,
    /// What the slot's run did (mints, revocations), also when it failed later.
    pub performed: Vec<Performed>,
}

impl SlotReport {
    /// The state label of `keyrotd_slots` for this run.
    pub fn status(&self) -> SlotStatus {
        match &self.outcome {
            Ok(SlotOutcome::Fresh | SlotOutcome::Rotated { .. }) => SlotStatus::Ok,
            Ok(SlotOutcome::Busy) => SlotStatus::Busy,
            Err(_) => SlotStatus::Failed,
        }
    }
}

/// What one read-only pass saw: the inventory, what every slot's stores hold, and
/// when the scan ended. [`Engine::plan`] turns it into the plan, which borrows from it.
#[derive(Debug)]
pub struct Survey {
    pub inventory: Inventory,
    pub views: Vec<SlotView>,
    pub now: DateTime<Utc>,
    /// The audit log's `api_key.created` entries of the listed keys, or why they
    /// could not be read; `None`: not read (`keyrotd rotate` and `revoke`).
    /// The key creators of the inventory come from them.
    pub key_creations: Option<Result<Vec<AuditLog>, ApiError>>,
}

/// What a cycle did.
#[derive(Debug, Default)]
pub struct CycleReport {
    pub slots: Vec<SlotReport>,
    /// Revocations of user keys (`user_keys = "revoke"`).
    pub user_keys_revoked: Vec<String>,
    /// Failures outside slots (admin key maintenance, user-key revocations).
    pub other_failures: Vec<String>,
    /// Set when the scan itself failed: nothing was done.
    pub scan_error: Option<String>,
    /// `--dry-run`: the actions the cycle would have performed (nothing was done);
    /// without it, the actions the plan had due as scanned.
    pub planned: Vec<plan::PlannedAction>,
    /// The actions the slots' decisions left for later (a deferred rotation, a key in
    /// grace or in use), as scanned.
    pub later: Vec<plan::PlannedAction>,
    /// The plan's counts as scanned, before this cycle acted (`None` when the scan
    /// failed).
    pub plan: Option<Summary>,
    pub duration: Duration,
    /// Slots skipped because shutdown was requested.
    pub skipped: usize,
    /// When the daemon's schedule runs the next cycle (`None` for `once`).
    pub next_cycle: Option<String>,
    /// What admin-key maintenance did (`None` when it failed: see `other_failures`).
    pub admin_key: Option<admin_key::AdminKeyReport>,
}

impl CycleReport {
    pub fn failed_slots(&self) -> usize {
        self.slots.iter().filter(|s| s.outcome.is_err()).count()
    }
    /// True when anything failed (the exit code of `once`).
    pub fn any_failed(&self) -> bool {
        self.scan_error.is_some() || self.failed_slots() > 0 || !self.other_failures.is_empty()
    }
}

/// What the engines of one process remember between cycles (the daemon hands the
/// same one to every engine it builds).
#[derive(Debug, Default)]
pub struct Memory {
    /// `key.expiry_unsupported` was logged.
    pub(crate) expiry_unsupported: std::sync::atomic::AtomicBool,
    /// How far the audit log was read for keys created outside.
    pub(crate) outside: std::sync::Mutex<outside::Seen>,
    /// The keys' creations read so far (each cycle asks only for keys not seen).
    pub(crate) creations: std::sync::Mutex<outside::Creations>,
    /// The usage the last survey read (`None`: off or unknown).
    pub(crate) usage: std::sync::Mutex<Option<Arc<crate::usage::UsageView>>>,
}

/// The rotation engine.
pub struct Engine {
    pub client: Client,
    pub stores: BTreeMap<String, DynStore>,
    /// Stores that could not be connected when the engine was built: their slots fail
    /// until the daemon builds an engine that reaches them (at the next cycle).
    pub unavailable: Vec<String>,
    pub rules: Vec<Rule>,
    pub policy: PolicyConfig,
    /// `[usage]`.
    pub usage: crate::config::UsageConfig,
    pub settings: Settings,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub notifier: Notifier,
    pub shutdown: CancellationToken,
    /// What this process's engines remember between cycles.
    pub memory: Arc<Memory>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("stores", &self.stores.keys().collect::<Vec<_>>())
            .field("rules", &self.rules.len())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Scans the organization and reads every slot's stores, changing nothing.
    ///
    /// The scan ends with [`ApiError::ScanTimeout`] once `settings.scan_timeout` has
    /// passed, and with [`ApiError::Cancelled`] as soon as shutdown is requested;
    /// either way its requests in flight are dropped.
    pub async fn survey(&self) -> Result<Survey, ApiError> {
        self.survey_with(true).await
    }

    /// A survey for `keyrotd rotate` and `revoke`: without the audit log (the key
    /// creators stay unknown, `key.created_outside` waits for the next cycle), which
    /// would be one more round trip before the first rotation.
    pub async fn survey_for_incident(&self) -> Result<Survey, ApiError> {
        self.survey_with(false).await
    }

    async fn survey_with(&self, audit: bool) -> Result<Survey, ApiError> {
        // Usage is read from the start, beside the scan: only the replaced keys' 1 m
        // buckets wait for the stores (sent once the views are read).
        let (replaced_tx, replaced_rx) = tokio::sync::oneshot::channel::<Vec<(String, i64)>>();
        let usage = self.read_usage(self.clock.now(), async move {
            replaced_rx.await.unwrap_or_default()
        });
        let rest = async move {
            // The listed keys' creations come from the audit log during the listing,
            // for the keys this process has not seen yet.
            let lock = || {
                self.memory
                    .creations
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
            };
            let known = |k: &ProjectApiKey| lock().known(k);
            let asked_at = self.clock.now().timestamp();
            let scan = plan::scan_with_creations(
                &self.client,
                &self.rules,
                self.settings.include_archived,
                self.settings.concurrency,
                audit.then_some(&known as &(dyn Fn(&ProjectApiKey) -> bool + Sync)),
            );
            let before = self.client.stats().snapshot();
            let (mut inventory, key_creations) = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => Err(ApiError::Cancelled),
                r = tokio::time::timeout(self.settings.scan_timeout, scan) => match r {
                    Ok(r) => r,
                    Err(_) => Err(ApiError::ScanTimeout {
                        timeout: self.settings.scan_timeout,
                        progress: requests_since(&before, &self.client.stats().snapshot()),
                    }),
                },
            }?;
            let key_creations =
                key_creations.map(|r| r.map(|read| lock().update(&inventory, read, asked_at)));
            match &key_creations {
                None | Some(Ok(_)) => {}
                Some(Err(e @ ApiError::Forbidden { .. })) => {
                    warn!(event = "audit_log.forbidden", status = 403, error = %e, "the admin key may not read the audit log: key creators are unknown and keys created by hand go unnoticed");
                }
                Some(Err(e)) => {
                    warn!(event = "audit_log.failed", status = e.status().unwrap_or(0), error = %e, "could not read the audit log: key creators are unknown this time");
                }
            }
            let now = self.clock.now();
            let slots = plan::slots(&inventory, &self.rules);
            let views = self.read_views(slots).await;
            let _ = replaced_tx.send(self.replaced_keys(&views));
            inventory.creators = match &key_creations {
                Some(Ok(c)) => Some(plan::creators(&inventory, c)),
                _ => None,
            };
            Ok((inventory, views, now, key_creations))
        };
        let (rest, usage) = tokio::join!(rest, usage);
        let (mut inventory, views, now, key_creations) = rest?;
        *self.memory.usage.lock().unwrap_or_else(|p| p.into_inner()) = match &usage {
            crate::usage::UsageState::Known(v) => Some(v.clone()),
            _ => None,
        };
        inventory.usage = usage;
        Ok(Survey {
            inventory,
            views,
            now,
            key_creations,
        })
    }

    /// The slots' replaced keys with their promotion, whose 1 m buckets usage-aware
    /// revocation reads (only `revoke_when = "unused"` asks).
    fn replaced_keys(&self, views: &[SlotView]) -> Vec<(String, i64)> {
        if self.policy.revoke_when != crate::config::RevokeWhen::Unused {
            return Vec::new();
        }
        views
            .iter()
            .flat_map(|v| v.ok_states())
            .filter_map(|(_, s)| {
                Some((
                    s.book.previous_key_id.clone()?,
                    s.book.promoted_at?.timestamp(),
                ))
            })
            .collect()
    }

    /// The usage the last survey read, for the slots' decisions.
    pub(crate) fn usage_seen(&self) -> Option<Arc<crate::usage::UsageView>> {
        self.memory
            .usage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Usage and cost for the survey (`[usage]`), with the 1 m buckets of every
    /// replaced key the stores name. A 403 is one WARN naming the missing permission;
    /// any other failure one WARN: usage is unknown this time, nothing else changes.
    async fn read_usage(
        &self,
        now: DateTime<Utc>,
        replaced: impl std::future::Future<Output = Vec<(String, i64)>>,
    ) -> crate::usage::UsageState {
        use crate::usage::UsageState;
        if !self.usage.enabled {
            return UsageState::Off;
        }
        let fetch = crate::usage::fetch(&self.client, &self.usage, now.timestamp(), replaced);
        let r = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => Err(ApiError::Cancelled),
            r = tokio::time::timeout(self.settings.scan_timeout, fetch) => {
                r.unwrap_or_else(|_| Err(ApiError::Network {
                    endpoint: crate::openai::Endpoint::UsageCompletions.as_str().into(),
                    message: format!(
                        "no answer within {} (openai.scan_timeout)",
                        humantime::format_duration(self.settings.scan_timeout)
                    ),
                }))
            }
        };
        match r {
            Ok(v) => UsageState::Known(Arc::new(v)),
            Err(e @ ApiError::Forbidden { .. }) => {
                warn!(event = "usage.forbidden", status = 403, permission = crate::usage::PERMISSION, error = %e, "the admin key may not read usage (it lacks the {} permission): usage and cost are unknown and usage anomalies go unnoticed", crate::usage::PERMISSION);
                UsageState::Unknown {
                    reason: format!(
                        "forbidden: the admin key lacks {}",
                        crate::usage::PERMISSION
                    ),
                }
            }
            Err(e) => {
                if !matches!(e, ApiError::Cancelled) {
                    warn!(event = "usage.failed", status = e.status().unwrap_or(0), error = %e, "could not read usage: usage and cost are unknown this time");
                }
                UsageState::Unknown {
                    reason: e.to_string(),
                }
            }
        }
    }

    /// The plan of a [`Survey`] under this engine's rules and policy.
    pub fn plan<'a>(&'a self, survey: &'a Survey) -> Plan<'a> {
        Plan::build(
            &survey.inventory,
            &survey.views,
            &self.rules,
            &self.policy,
            survey.now,
        )
    }

    async fn read_views(&self, slots: Vec<Slot>) -> Vec<SlotView> {
        stream::iter(slots.into_iter().map(|slot| async move {
            let mut states = Vec::new();
            let mut record_keys = Vec::new();
            for name in &slot.stores {
                let r = match self.stores.get(name) {
                    Some(s) => slot::view(s, &slot).await,
                    None => Err(crate::store::StoreError::new(
                        name.clone(),
                        crate::store::StoreErrorKind::InvalidConfig,
                        "store is not configured",
                    )),
                };
                let (r, key) = match r {
                    Ok((state, key)) => (Ok(state), key),
                    Err(e) => (Err(e), None),
                };
                states.push((name.clone(), r));
                record_keys.push(key);
            }
            SlotView {
                slot,
                states,
                record_keys,
            }
        }))
        .buffered(self.settings.concurrency.max(1))
        .collect()
        .await
    }

    /// Runs one full cycle. Never panics on API or store errors: they are in the report.
    pub async fn cycle(&self) -> CycleReport {
        self.run_cycle(None).await
    }

    /// A cycle the daemon's schedule runs: `next_cycle` (when the schedule runs the one
    /// after it) goes into its `cycle.finished` (or `cycle.failed`) line.
    pub async fn scheduled_cycle(&self, next_cycle: String) -> CycleReport {
        self.run_cycle(Some(next_cycle)).await
    }

    async fn run_cycle(&self, next_cycle: Option<String>) -> CycleReport {
        let started = Instant::now();
        let mut report = CycleReport {
            next_cycle,
            ..CycleReport::default()
        };
        info!(
            event = "cycle.started",
            dry_run = self.settings.dry_run,
            "rotation cycle started"
        );
        self.reread_admin_key_file();
        // Before the scan, so the scan already runs on a key another replica rotated.
        match admin_key::maybe_rotate(self).await {
            Ok(r) => report.admin_key = Some(r),
            Err(e) => {
                error!(event = "admin_key.failed", outcome = "failed", error = %e, "admin key maintenance failed; carrying on with the admin key in use");
                report.other_failures.push(format!("admin key: {e}"));
            }
        }
        let survey = match self.survey().await {
            Ok(survey) => survey,
            Err(e) => {
                error!(event = "cycle.failed", outcome = "scan_failed", error = %e, next_cycle = report.next_cycle.as_deref(), "could not list the organization");
                report.scan_error = Some(e.to_string());
                report.duration = started.elapsed();
                self.metrics.cycle_finished(
                    report.duration.as_secs_f64(),
                    false,
                    unix(self.clock.now()),
                );
                return report;
            }
        };
        // Key gauges and stale-key audit events come from the plan as scanned.
        let plan = self.plan(&survey);
        self.record_key_metrics(&survey.inventory, &plan, survey.now);
        self.metrics.set_slots(&survey, &plan);
        self.metrics.set_usage(&survey, &plan);
        for k in &plan.keys {
            if k.reasons.contains(&policy::Reason::Stale)
                && k.owner_type() == "user"
                && !self.settings.dry_run
            {
                self.notifier.send(Notice::StaleUserKey {
                    project_id: k.project_id().to_string(),
                    key_id: k.key_id().to_string(),
                    owner_id: k.owner_id().unwrap_or_default().to_string(),
                    owner_name: k.owner_name().unwrap_or_default().to_string(),
                    age_days: k.age_days,
                });
            }
            if k.reasons.contains(&policy::Reason::Stale) {
                info!(
                    event = "key.stale",
                    project_id = %k.project_id(),
                    key_id = %k.key_id(),
                    owner_type = k.owner_type(),
                    owner_id = k.owner_id().unwrap_or(""),
                    age_days = k.age_days,
                    verdict = k.verdict.as_str(),
                    "stale key"
                );
            }
        }
        let anomalies = crate::usage::anomalies(&self.usage, &plan, &survey.views, &self.rules);
        let incidents = self.raise_anomalies(&anomalies);
        let incidents = &incidents;
        report.plan = Some(plan.summary());
        report.planned = plan.actions.clone();
        report.later = plan
            .slots
            .iter()
            .flat_map(|s| s.later.iter().cloned())
            .collect();
        if self.settings.dry_run {
            // The decision is the whole of a dry run: nothing is read again, nothing
            // is written.
            for a in &plan.actions {
                info!(event = "action.planned", action = a.action.kind.as_str(), rule = a.rule.as_deref().unwrap_or(""), project_id = %a.project_id, project_name = %a.project_name, service_account_id = a.service_account_id.as_deref().unwrap_or(""), service_account_name = a.service_account_name.as_deref().unwrap_or(""), key_id = a.action.key_id.as_deref().unwrap_or(""), reason = a.action.why.as_str(), outcome = "dry_run", "would do");
            }
            drop(plan);
            return self.finish_cycle(report, started);
        }
        outside::check(self, &survey);
        drop(plan);
        // The slots go on. Each slot's run reads its stores again, but for a state
        // record at rest that its consumer document agrees with (`slot::Seen`): a
        // rotation starts from the survey's read of it.
        let Survey {
            inventory: inv,
            views,
            ..
        } = survey;
        let slots: Vec<(Slot, Vec<slot::Seen>)> = views.into_iter().map(slot::Seen::of).collect();

        let by_sa = keys_by_service_account(&inv);
        let results: Vec<Option<SlotReport>> =
            stream::iter(slots.into_iter().map(|(slot, seen)| {
                let keys = slot_keys(&by_sa, &slot);
                async move {
                    if self.shutdown.is_cancelled() {
                        return None;
                    }
                    let forced = incidents.get(&slot.id()).map(|k| {
                        (
                            slot::Forced::incident(decide::Why::UsageAnomaly),
                            Some(k.clone()),
                        )
                    });
                    // An incident's rotation reads everything afresh.
                    let seen = if forced.is_some() { Vec::new() } else { seen };
                    Some(self.run_slot(slot, keys, forced, seen).await)
                }
            }))
            .buffer_unordered(self.settings.concurrency.max(1))
            .collect()
            .await;
        for r in results {
            match r {
                Some(r) => report.slots.push(r),
                None => report.skipped += 1,
            }
        }
        self.metrics
            .slots_finished(report.slots.iter().map(SlotReport::status));
        report.slots.sort_by(|a, b| {
            a.slot
                .path
                .cmp(&b.slot.path)
                .then(a.slot.project_id.cmp(&b.slot.project_id))
        });

        if self.policy.user_keys == UserKeys::Revoke && !self.shutdown.is_cancelled() {
            self.revoke_user_keys(&inv, &mut report).await;
        }
        self.finish_cycle(report, started)
    }

    /// Runs one slot's state machine in a span carrying its ids and names, and tells
    /// the webhooks and the logs how it went. `forced`: a rotation asked for (an
    /// operator's, with `trigger = "manual"` and the operator on every line).
    async fn run_slot(
        &self,
        slot: Slot,
        keys: Vec<ProjectApiKey>,
        forced: Option<(slot::Forced, Option<String>)>,
        seen: Vec<slot::Seen>,
    ) -> SlotReport {
        // Every line of the slot's run carries its ids and names. At ERROR so that no
        // level filter drops it while it would keep the events inside.
        let manual = forced
            .as_ref()
            .is_some_and(|(f, _)| f.why == decide::Why::Manual);
        let span = tracing::error_span!(
            "slot",
            rule = %slot.rule_name,
            project_id = %slot.project_id,
            project_name = %slot.project_name,
            service_account_id = %slot.service_account_id,
            service_account_name = %slot.service_account_name,
            trigger = if manual { "manual" } else { "schedule" },
            operator = manual.then(manual::operator),
        );
        let slot::RunResult { outcome, performed } = slot::run(self, &slot, keys, forced, seen)
            .instrument(span)
            .await;
        match &outcome {
            Ok(SlotOutcome::Rotated { key_id }) => self.notifier.send(Notice::RotationCompleted {
                project_id: slot.project_id.clone(),
                service_account_id: slot.service_account_id.clone(),
                rule: slot.rule_name.clone(),
                key_id: key_id.clone(),
                stores: slot.stores.clone(),
            }),
            Err(e) => self.notifier.send(Notice::RotationFailed {
                project_id: slot.project_id.clone(),
                service_account_id: slot.service_account_id.clone(),
                rule: slot.rule_name.clone(),
                error: e.to_string(),
            }),
            Ok(_) => {}
        }
        if let Err(e) = &outcome {
            self.metrics.slot_failed(e.kind());
            error!(
                event = "rotation.failed",
                kind = e.kind().as_str(),
                project_id = %slot.project_id,
                project_name = %slot.project_name,
                service_account_name = %slot.service_account_name,
                service_account_id = %slot.service_account_id,
                rule = %slot.rule_name,
                outcome = "failed",
                error = %e,
                "slot failed; it will be retried next cycle"
            );
        }
        SlotReport {
            slot,
            outcome: outcome.map_err(SlotFailure::from),
            performed,
        }
    }

    /// Logs every `key.usage_anomaly` (WARN) and, unless a dry run, counts it and
    /// sends its notice. Under `usage.on_anomaly = "rotate"` (not in a dry run), the
    /// slots to rotate at once: slot id → the anomalous key it serves. User keys and
    /// keys no slot serves are only reported.
    fn raise_anomalies(&self, anomalies: &[crate::usage::Anomaly]) -> BTreeMap<String, String> {
        let mut rotate = BTreeMap::new();
        for a in anomalies {
            let rotating = self.usage.on_anomaly == crate::config::OnAnomaly::Rotate
                && a.slot.is_some()
                && !self.settings.dry_run;
            let action = if rotating { "rotating" } else { "reported" };
            warn!(
                event = "key.usage_anomaly",
                kind = a.kind.as_str(),
                project_id = %a.project_id,
                key_id = %a.key_id,
                owner_type = a.owner_type,
                last_hour_requests = a.last_hour_requests,
                baseline_per_hour = a.baseline,
                slot = a.slot.as_deref().unwrap_or(""),
                outcome = action,
                "anomalous traffic on a key"
            );
            if self.settings.dry_run {
                continue;
            }
            self.metrics.usage_anomaly(a.kind);
            self.notifier.send(Notice::KeyUsageAnomaly {
                project_id: a.project_id.clone(),
                key_id: a.key_id.clone(),
                owner_type: a.owner_type.to_string(),
                kind: a.kind.as_str().to_string(),
                last_hour_requests: a.last_hour_requests,
                baseline_per_hour: a.baseline,
                action: action.to_string(),
            });
            if let (true, Some(slot)) = (rotating, &a.slot) {
                rotate.insert(slot.clone(), a.key_id.clone());
            }
        }
        rotate
    }

    /// Records the cycle's end (metrics, `cycle.finished`).
    fn finish_cycle(&self, mut report: CycleReport, started: Instant) -> CycleReport {
        report.duration = started.elapsed();
        let ok = !report.any_failed();
        self.metrics
            .cycle_finished(report.duration.as_secs_f64(), ok, unix(self.clock.now()));
        info!(
            event = "cycle.finished",
            outcome = if ok { "ok" } else { "failed" },
            slots = report.slots.len(),
            failed = report.failed_slots(),
            skipped = report.skipped,
            duration_ms = report.duration.as_millis() as u64,
            next_cycle = report.next_cycle.as_deref(),
            "rotation cycle finished"
        );
        report
    }

    /// Switches the client to the key now in `openai.admin_key_file` when it changed.
    /// A file that cannot be read keeps the key in use (a Secret being swapped, a
    /// credential not mounted yet) and says so.
    fn reread_admin_key_file(&self) {
        let Some(path) = &self.settings.admin_key_file else {
            return;
        };
        match crate::config::read_secret_file(path) {
            Ok(key) if !self.client.uses_admin_key(&key) => {
                self.client.set_admin_key(key);
                info!(event = "admin_key.reloaded", source = "file", path = %path.display(), "openai.admin_key_file changed; using the new admin key");
            }
            Ok(_) => {}
            Err(e) => {
                warn!(event = "admin_key.reload_failed", source = "file", error = %e, "cannot re-read openai.admin_key_file; carrying on with the admin key in use");
            }
        }
    }

    fn record_key_metrics(&self, inv: &Inventory, plan: &Plan, now: DateTime<Utc>) {
        let mut counts: BTreeMap<Verdict, u64> = BTreeMap::new();
        for k in &plan.keys {
            *counts.entry(k.verdict).or_default() += 1;
        }
        let oldest = inv
            .projects
            .iter()
            .flat_map(|p| p.keys.iter())
            .map(|k| policy::age(k, now).as_secs_f64())
            .fold(None, |m: Option<f64>, a| Some(m.map_or(a, |m| m.max(a))));
        self.metrics.set_keys(&counts, oldest);
        let mut expiring: BTreeMap<plan::ExpiryState, u64> = BTreeMap::new();
        for e in plan.keys.iter().filter_map(|k| k.expiry) {
            *expiring.entry(e).or_default() += 1;
        }
        self.metrics.set_expiring(&expiring);
    }

    /// Stale user keys under `user_keys = "revoke"` whose revocation
    /// [`decide::user_key_action`] has due.
    async fn revoke_user_keys(&self, inv: &Inventory, report: &mut CycleReport) {
        let now = self.clock.now();
        for p in &inv.projects {
            for k in &p.keys {
                let due = decide::user_key_action(k, &p.project, &self.rules, &self.policy, now)
                    .is_some_and(|a| a.is_due(now));
                if !due {
                    continue;
                }
                match self.client.delete_api_key(&p.project.id, &k.id).await {
                    Ok(_) => {
                        self.metrics.revocation(RevocationOutcome::Revoked);
                        info!(event = "key.revoked", project_id = %p.project.id, project_name = %p.project.display_name(), key_id = %k.id, owner_type = "user", reason = decide::Why::StaleUserKey.as_str(), outcome = "revoked", "revoked stale user key");
                        report.user_keys_revoked.push(k.id.clone());
                    }
                    Err(ApiError::NotFound { .. }) => {
                        self.metrics.revocation(RevocationOutcome::AlreadyGone);
                    }
                    Err(err) => {
                        self.metrics.revocation(RevocationOutcome::Failed);
                        error!(event = "key.revoke_failed", project_id = %p.project.id, project_name = %p.project.display_name(), key_id = %k.id, owner_type = "user", outcome = "failed", error = %err, "could not revoke stale user key");
                        report
                            .other_failures
                            .push(format!("revoke user key {}: {err}", k.id));
                    }
                }
            }
        }
    }
}

/// The one-screen summary `once` prints on a TTY: what was minted and revoked, what
/// waits and until when, and what failed.
pub fn render_summary(out: &mut dyn std::io::Write, r: &CycleReport) -> std::io::Result<()> {
    if let Some(e) = &r.scan_error {
        return writeln!(out, "the scan failed, nothing was done: {e}");
    }
    let name = |s: &Slot| format!("{} / {}", s.project_name, s.service_account_name);
    let (mut minted, mut revoked) = (0, 0);
    for s in &r.slots {
        for p in &s.performed {
            let what = match p.kind {
                decide::ActionKind::Mint => {
                    minted += 1;
                    "minted"
                }
                decide::ActionKind::DeleteServiceAccount => {
                    revoked += 1;
                    "deleted service account"
                }
                _ => {
                    revoked += 1;
                    "revoked"
                }
            };
            writeln!(
                out,
                "{what:<24} {:<36} {} ({})",
                name(&s.slot),
                p.id,
                p.reason
            )?;
        }
    }
    for k in &r.user_keys_revoked {
        revoked += 1;
        writeln!(
            out,
            "{:<24} {:<36} {k} (stale_user_key)",
            "revoked", "user key"
        )?;
    }
    for a in &r.later {
        writeln!(
            out,
            "{:<24} {:<36} {} at {} ({})",
            format!("later: {}", a.action.kind.as_str()),
            format!(
                "{} / {}",
                a.project_name,
                a.service_account_name.as_deref().unwrap_or("-")
            ),
            a.action.key_id.as_deref().unwrap_or("-"),
            plan::Timestamp::from(a.action.due_at),
            a.action.why
        )?;
    }
    let mut failed = 0;
    for s in &r.slots {
        if let Err(e) = &s.outcome {
            failed += 1;
            writeln!(
                out,
                "{:<24} {:<36} [{}] {e}",
                "FAILED",
                name(&s.slot),
                e.kind.as_str()
            )?;
        }
    }
    for f in &r.other_failures {
        failed += 1;
        writeln!(out, "{:<24} {f}", "FAILED")?;
    }
    let busy = r
        .slots
        .iter()
        .filter(|s| matches!(s.outcome, Ok(SlotOutcome::Busy)))
        .count();
    writeln!(
        out,
        "{} slots: {minted} minted, {revoked} revoked, {} later, {busy} busy, {failed} failed{} in {:.1} s",
        r.slots.len(),
        r.later.len(),
        if r.skipped > 0 { format!(", {} skipped (shutdown)", r.skipped) } else { String::new() },
        r.duration.as_secs_f64()
    )
}

fn unix(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

/// The keys of a slot's service accounts, from [`keys_by_service_account`].
fn slot_keys(
    by_sa: &BTreeMap<(&str, &str), Vec<&ProjectApiKey>>,
    slot: &Slot,
) -> Vec<ProjectApiKey> {
    slot.service_accounts
        .iter()
        .filter_map(|(sa, _)| by_sa.get(&(slot.project_id.as_str(), sa.as_str())))
        .flatten()
        .map(|k| (*k).clone())
        .collect()
}

/// Service-account keys grouped by (project id, service account id).
/// Borrowed from the inventory: a slot clones only its own accounts' keys.
fn keys_by_service_account(inv: &Inventory) -> BTreeMap<(&str, &str), Vec<&ProjectApiKey>> {
    let mut out: BTreeMap<(&str, &str), Vec<&ProjectApiKey>> = BTreeMap::new();
    for p in &inv.projects {
        for k in &p.keys {
            if let Some(sa) = &k.owner.service_account {
                if k.owner.kind == OwnerType::ServiceAccount {
                    out.entry((p.project.id.as_str(), sa.id.as_str()))
                        .or_default()
                        .push(k);
                }
            }
        }
    }
    out
}

/// Retries `attempt` — a call made with a freshly minted key — with doubling waits
/// (from `first_wait`, at most 5 s) until it succeeds or `timeout` has passed: new keys
/// take seconds to propagate. `Ok(Ok(()))` verified; `Ok(Err(reason))` rejected for
/// good (401/403 to the end); `Err` could not tell (network, 5xx).
pub(crate) async fn verify_with_retries<F, Fut>(
    timeout: Duration,
    first_wait: Duration,
    mut attempt: F,
) -> Result<Result<(), String>, ApiError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), ApiError>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let backoff = Backoff::new(first_wait, Duration::from_secs(5)).without_jitter();
    let mut retry = 0;
    loop {
        let wait = backoff.wait(retry);
        let last = match attempt().await {
            Ok(()) => return Ok(Ok(())),
            Err(e) => e,
        };
        if tokio::time::Instant::now() + wait > deadline {
            return match last {
                ApiError::Unauthorized { .. } | ApiError::Forbidden { .. } => {
                    Ok(Err(last.to_string()))
                }
                other => Err(other),
            };
        }
        tracing::debug!(error = %last, "new key not accepted yet; retrying");
        tokio::time::sleep(wait).await;
        retry += 1;
    }
}

/// An intent to mint a key named `<prefix><UTC timestamp>-<nonce>` (the nonce keeps two
/// processes minting in the same second apart), held by `owner` for `lease`.
pub(crate) fn new_intent(
    prefix: &str,
    owner: &str,
    now: DateTime<Utc>,
    lease: Duration,
    service_account_id: String,
) -> crate::store::Intent {
    crate::store::Intent {
        key_name: format!(
            "{prefix}{}-{:04x}",
            now.format("%Y%m%dT%H%M%SZ"),
            rand::random::<u16>()
        ),
        owner: owner.to_string(),
        lease_until: now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX),
        attempt: 1,
        service_account_id,
        revoke_old: None,
    }
}

/// A default instance id: `hostname:pid:random`.
pub fn default_instance_id() -> String {
    format!(
        "{}:{}:{:08x}",
        hostname(),
        std::process::id(),
        rand::random::<u32>()
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "host".into())
}

/// Whether the owner of an intent provably died: an owner in the
/// [`default_instance_id`] form (`host:pid:nonce`) on this host whose process id no
/// longer exists. Anything else (another host, a custom `daemon.instance_id`, a reused
/// pid, another engine in this process) is presumed alive until its lease ends; taking
/// over a live owner would cost only work, since every write is compare-and-set.
pub fn owner_is_gone(owner: &str) -> bool {
    let mut parts = owner.rsplitn(3, ':');
    let (Some(nonce), Some(pid), Some(host)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    if nonce.len() != 8 || !nonce.chars().all(|c| c.is_ascii_hexdigit()) || host != hostname() {
        return false;
    }
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The requests made between two [`crate::openai::ApiStats`] snapshots, per endpoint,
/// most first: `list_api_keys 4569, list_projects 1523` (what a scan was busy with).
fn requests_since(
    before: &[(crate::openai::Endpoint, u16, u64)],
    after: &[(crate::openai::Endpoint, u16, u64)],
) -> String {
    let mut per: BTreeMap<&'static str, i64> = BTreeMap::new();
    for (e, _, n) in after {
        *per.entry(e.as_str()).or_default() += *n as i64;
    }
    for (e, _, n) in before {
        *per.entry(e.as_str()).or_default() -= *n as i64;
    }
    let mut per: Vec<(&str, i64)> = per.into_iter().filter(|(_, n)| *n > 0).collect();
    per.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    if per.is_empty() {
        return "none".into();
    }
    per.iter()
        .map(|(e, n)| format!("{e} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod owner_tests {
    use super::*;

    #[test]
    fn only_a_vanished_process_on_this_host_is_gone() {
        let me = default_instance_id();
        assert!(!owner_is_gone(&me), "this process is alive");
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        child.wait().expect("wait");
        let dead = format!("{}:{pid}:0123abcd", hostname());
        assert!(owner_is_gone(&dead), "{dead}");
        assert!(
            !owner_is_gone(&format!("elsewhere:{pid}:0123abcd")),
            "another host"
        );
        assert!(!owner_is_gone("replica-a"), "a custom instance id");
        assert!(
            !owner_is_gone(&format!("{}:{pid}:nonce", hostname())),
            "not our form"
        );
    }
}
