//! Incident response: `keyrotd rotate` (rotate chosen slots now, whatever their age)
//! and `keyrotd revoke` (revoke keys now), through the same decision and the same
//! crash-safe steps as a cycle. Safe beside a running daemon: the stores'
//! check-and-set decides, and the loser says `rotation.busy`.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};

use tracing::{error, info};

use super::decide::{self, ActionKind, Why};
use super::{slot, CycleReport, Engine, SlotReport, Survey};
use crate::openai::models::OwnerType;
use crate::openai::ApiError;
use crate::plan::{PlannedAction, SlotView};

/// Who asked: `$SUDO_USER`, else `$USER`, else `unknown` (on every line of a manual
/// run, as `operator`).
pub fn operator() -> String {
    ["SUDO_USER", "USER"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown".into())
}

/// Which slots `keyrotd rotate` rotates: every selector given must match (`--all`:
/// every slot).
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub rule: Option<String>,
    /// A project id or name.
    pub project: Option<String>,
    /// A service-account id or name.
    pub service_account: Option<String>,
    /// A key id: the slot that serves it, or whose account owns it.
    pub key: Option<String>,
    pub all: bool,
}

/// Why a selection cannot be acted on (exit code 2).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectError {
    #[error("say which slots to rotate: --rule, --project, --service-account, --key, or --all")]
    Nothing,
    #[error("{0} matches no slot")]
    NoMatch(String),
    #[error("the selectors together match no slot ({0})")]
    NoneTogether(String),
    #[error("key {0} is owned by a user, not by a service account keyrotd manages: user keys cannot be re-issued; revoke it with `keyrotd revoke {0}`")]
    UserKey(String),
}

/// One selector: how it is named in messages, and whether a slot matches it.
type Selector<'a> = (String, Box<dyn Fn(&SlotView, &Survey) -> bool + 'a>);

impl Selection {
    fn selectors(&self) -> Vec<Selector<'_>> {
        let mut out: Vec<Selector<'_>> = Vec::new();
        if let Some(r) = &self.rule {
            out.push((
                format!("--rule {r:?}"),
                Box::new(move |v, _| v.slot.rule_name == *r),
            ));
        }
        if let Some(p) = &self.project {
            out.push((
                format!("--project {p:?}"),
                Box::new(move |v, _| v.slot.project_id == *p || v.slot.project_name == *p),
            ));
        }
        if let Some(sa) = &self.service_account {
            out.push((
                format!("--service-account {sa:?}"),
                Box::new(move |v, _| {
                    v.slot.service_account_name == *sa
                        || v.slot
                            .service_accounts
                            .iter()
                            .any(|(id, n)| id == sa || n == sa)
                }),
            ));
        }
        if let Some(k) = &self.key {
            out.push((
                format!("--key {k:?}"),
                Box::new(move |v, s| slot_has_key(v, s, k)),
            ));
        }
        out
    }

    /// The slots of `survey` this selection names.
    pub fn pick<'a>(&self, survey: &'a Survey) -> Result<Vec<&'a SlotView>, SelectError> {
        if let Some(k) = &self.key {
            let user_owned = survey
                .inventory
                .projects
                .iter()
                .flat_map(|p| p.keys.iter())
                .any(|key| key.id == *k && key.owner.kind == OwnerType::User);
            if user_owned {
                return Err(SelectError::UserKey(k.clone()));
            }
        }
        let selectors = self.selectors();
        if selectors.is_empty() {
            return if self.all {
                Ok(survey.views.iter().collect())
            } else {
                Err(SelectError::Nothing)
            };
        }
        for (name, f) in &selectors {
            if !survey.views.iter().any(|v| f(v, survey)) {
                return Err(SelectError::NoMatch(name.clone()));
            }
        }
        let picked: Vec<&SlotView> = survey
            .views
            .iter()
            .filter(|v| selectors.iter().all(|(_, f)| f(v, survey)))
            .collect();
        if picked.is_empty() {
            let names: Vec<&str> = selectors.iter().map(|(n, _)| n.as_str()).collect();
            return Err(SelectError::NoneTogether(names.join(" ")));
        }
        Ok(picked)
    }
}

/// Whether `key_id` is the slot's: served by one of its stores, or owned by one of its
/// service accounts.
fn slot_has_key(v: &SlotView, survey: &Survey, key_id: &str) -> bool {
    let served = v
        .states
        .iter()
        .filter_map(|(_, s)| s.as_ref().ok())
        .any(|s| {
            s.current.as_ref().is_some_and(|c| c.key_id == key_id)
                || s.pending.as_ref().is_some_and(|p| p.key_id == key_id)
        });
    served
        || survey
            .inventory
            .projects
            .iter()
            .filter(|p| p.project.id == v.slot.project_id)
            .flat_map(|p| p.keys.iter())
            .filter(|k| k.id == key_id)
            .any(|k| {
                k.owner
                    .service_account
                    .as_ref()
                    .is_some_and(|sa| v.slot.service_accounts.iter().any(|(id, _)| *id == sa.id))
            })
}

impl Engine {
    /// What `keyrotd rotate --dry-run` prints: each picked slot's decision with a
    /// manual rotation forced (and the revocation of the key it replaces: now, or at
    /// the deadline `revoke_old` sets).
    pub fn plan_rotation(
        &self,
        survey: &Survey,
        picked: &[&SlotView],
        revoke_old: slot::RevokeOld,
    ) -> Vec<PlannedAction> {
        let cx = decide::Context {
            policy: &self.policy,
            now: survey.now,
            me: None,
        };
        let mut out = Vec::new();
        for v in picked {
            let project = survey
                .inventory
                .projects
                .iter()
                .find(|p| p.project.id == v.slot.project_id);
            for a in v.decide(project, &self.rules, &cx, Some(Why::Manual), None) {
                if !a.is_due(survey.now) {
                    continue;
                }
                let mint = a.kind == ActionKind::Mint;
                out.push(PlannedAction::of_slot(&v.slot, a.clone()));
                let at = match revoke_old {
                    slot::RevokeOld::Now => Some(a.due_at),
                    _ => revoke_old.deadline(a.due_at),
                };
                if let (true, Some(at), Some(old)) = (mint, at, v.agreed_current()) {
                    let mut r = a;
                    r.kind = ActionKind::Revoke;
                    r.key_id = Some(old.to_string());
                    r.due_at = at;
                    out.push(PlannedAction::of_slot(&v.slot, r));
                }
            }
        }
        out
    }

    /// Rotates the picked slots now (`keyrotd rotate`), `concurrency` at a time, each
    /// through the slot's state machine with a manual rotation forced. `asked_at`
    /// (taken before the survey): a slot another process rotated since then (every
    /// store promoted a key at or after it, or the key seen is no longer served) is
    /// not rotated a second time.
    pub async fn rotate_now(
        &self,
        picked: &[&SlotView],
        survey: &Survey,
        revoke_old: slot::RevokeOld,
        asked_at: DateTime<Utc>,
    ) -> CycleReport {
        let started = std::time::Instant::now();
        let mut report = CycleReport::default();
        let by_sa = super::keys_by_service_account(&survey.inventory);
        // A promotion at or after the request answered it.
        let forced = slot::Forced::manual(revoke_old, asked_at);
        info!(event = "rotate.started", slots = picked.len(), trigger = "manual", operator = %operator(), revoke_old = %revoke_old, "rotating the chosen slots now");
        let runs = picked.iter().map(|v| {
            let slot = v.slot.clone();
            let replacing = v.agreed_current().map(str::to_string);
            let keys = super::slot_keys(&by_sa, &slot);
            self.run_slot(slot, keys, Some((forced, replacing)), Vec::new())
        });
        use futures::stream::StreamExt;
        let done: Vec<SlotReport> = futures::stream::iter(runs)
            .buffer_unordered(self.settings.concurrency.max(1))
            .collect()
            .await;
        report.slots = done;
        report.slots.sort_by(|a, b| a.slot.path.cmp(&b.slot.path));
        report.duration = started.elapsed();
        report
    }

    /// `keyrotd revoke`: refuses (changing nothing) when a store serves or stages one
    /// of `key_ids`, naming the slot and its stores; revokes each of them otherwise.
    /// With `rotate_first`, a served key's slot is rotated first with its replaced key
    /// revoked as soon as every store serves the new one (which revokes the key).
    pub async fn revoke_now(
        &self,
        survey: &Survey,
        key_ids: &[String],
        rotate_first: bool,
        asked_at: DateTime<Utc>,
    ) -> Result<CycleReport, String> {
        let mut report = CycleReport::default();
        let mut to_rotate: Vec<&SlotView> = Vec::new();
        let mut plain: Vec<(String, String)> = Vec::new();
        let mut refused = Vec::new();
        // Traffic on a key about to be revoked: its consumers are about to break.
        self.raise_anomalies(&crate::usage::about_to_revoke(&survey.inventory, key_ids));
        for k in key_ids {
            let Some(p) = survey
                .inventory
                .projects
                .iter()
                .find(|p| p.keys.iter().any(|key| key.id == *k))
            else {
                return Err(format!("key {k} is not listed in any project"));
            };
            let serving: Vec<&SlotView> = survey
                .views
                .iter()
                .filter(|v| v.slot.project_id == p.project.id)
                .filter(|v| {
                    v.states
                        .iter()
                        .filter_map(|(_, s)| s.as_ref().ok())
                        .any(|s| {
                            s.current.as_ref().is_some_and(|c| c.key_id == *k)
                                || s.pending.as_ref().is_some_and(|c| c.key_id == *k)
                        })
                })
                .collect();
            if serving.is_empty() {
                plain.push((p.project.id.clone(), k.clone()));
                continue;
            }
            for v in serving {
                if rotate_first {
                    if !to_rotate.iter().any(|s| s.slot.id() == v.slot.id()) {
                        to_rotate.push(v);
                    }
                } else {
                    refused.push(format!(
                        "key {k} is served by slot {} ({} / {}, rule {:?}) in store(s) {}; rotate it first (--rotate-first)",
                        v.slot.id(),
                        v.slot.project_name,
                        v.slot.service_account_name,
                        v.slot.rule_name,
                        v.slot.stores.join(", ")
                    ));
                }
            }
        }
        if !refused.is_empty() {
            return Err(refused.join("\n"));
        }
        if !to_rotate.is_empty() {
            report = self
                .rotate_now(&to_rotate, survey, slot::RevokeOld::Now, asked_at)
                .await;
        }
        let who = operator();
        let done: BTreeSet<String> = report
            .slots
            .iter()
            .flat_map(|s| s.performed.iter())
            .filter(|p| p.kind == ActionKind::Revoke)
            .map(|p| p.id.clone())
            .collect();
        for (project, k) in plain {
            if done.contains(&k) {
                continue;
            }
            match self.client.delete_api_key(&project, &k).await {
                Ok(_) | Err(ApiError::NotFound { .. }) => {
                    self.metrics
                        .revocation(crate::metrics::RevocationOutcome::Revoked);
                    info!(event = "key.revoked", project_id = %project, key_id = %k, reason = "manual", trigger = "manual", operator = %who, outcome = "revoked", "revoked key");
                    report.user_keys_revoked.push(k);
                }
                Err(e) => {
                    error!(event = "key.revoke_failed", project_id = %project, key_id = %k, reason = "manual", trigger = "manual", operator = %who, outcome = "failed", error = %e, "could not revoke key");
                    report.other_failures.push(format!("revoke {k}: {e}"));
                }
            }
        }
        Ok(report)
    }
}
