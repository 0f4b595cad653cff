//! Keys made by hand on a managed service account: a person who adds a key to an
//! account keyrotd rotates in the dashboard creates a credential no store serves and
//! no rotation replaces. Each cycle reads the survey's `api_key.created` entries since
//! the last look (the first look of a process: [`LOOKBACK_SECS`] back) and raises
//! `key.created_outside` (WARN, `keyrotd_keys_created_outside_total`, a webhook notice)
//! for every key a dashboard session created on an account a slot manages. keyrotd's
//! own mints are made with the admin key (actor `api_key`) and never raise it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tracing::warn;

use super::{Engine, Survey};
use crate::notify::Notice;
use crate::openai::models::{AuditActorType, AuditEvent, AuditLog, OwnerType, ProjectApiKey};
use crate::plan::Inventory;

/// How far back the first look of a process reads (seconds).
pub(crate) const LOOKBACK_SECS: i64 = 86_400;
/// Every later look starts this long before the previous one ended (seconds): an
/// entry the API shows late, or whose key the scan had not listed yet, is looked at
/// again; entries already examined are skipped by id.
const OVERLAP_SECS: i64 = 3_600;

/// What the previous looks saw.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    /// When the last look ended (the survey's time, Unix seconds).
    until: Option<i64>,
    /// Audit-log entries examined, by id, with their `effective_at` (pruned once
    /// older than the window).
    examined: BTreeMap<String, i64>,
}

/// The `api_key.created` entries this process has read, by key id: a daemon asks the
/// audit log only for keys it has not seen yet (one request per 100 new keys a cycle,
/// not per 100 keys), and remembers them only while the keys are listed.
#[derive(Debug, Default)]
pub(crate) struct Creations {
    /// Entries read, by the created key's id.
    found: HashMap<String, AuditLog>,
    /// Keys asked for whose entry the log did not hold, with when they were last asked
    /// for (Unix seconds). An entry may show late: a key is asked for again until it
    /// was already [`OVERLAP_SECS`] old when last asked for.
    missing: HashMap<String, i64>,
}

impl Creations {
    /// Whether the audit log need not be asked about `k` again.
    pub(crate) fn known(&self, k: &ProjectApiKey) -> bool {
        self.found.contains_key(&k.id)
            || self
                .missing
                .get(&k.id)
                .is_some_and(|asked| k.created_at < asked - OVERLAP_SECS)
    }

    /// Takes in what a survey read at `asked_at` (the entries of the listed keys that
    /// were not [`known`](Self::known) before it) and returns the entries of every
    /// listed key.
    pub(crate) fn update(
        &mut self,
        inv: &Inventory,
        read: Vec<AuditLog>,
        asked_at: i64,
    ) -> Vec<AuditLog> {
        let listed: Vec<&ProjectApiKey> = inv.projects.iter().flat_map(|p| p.keys.iter()).collect();
        let asked: Vec<&str> = listed
            .iter()
            .filter(|k| !self.known(k))
            .map(|k| k.id.as_str())
            .collect();
        for e in read {
            if let AuditEvent::ApiKeyCreated { id: Some(id), .. } = &e.event {
                self.missing.remove(id);
                self.found.insert(id.clone(), e);
            }
        }
        for id in asked {
            if !self.found.contains_key(id) {
                self.missing.insert(id.to_string(), asked_at);
            }
        }
        let ids: BTreeSet<&str> = listed.iter().map(|k| k.id.as_str()).collect();
        self.found.retain(|id, _| ids.contains(id.as_str()));
        self.missing.retain(|id, _| ids.contains(id.as_str()));
        listed
            .iter()
            .filter_map(|k| self.found.get(&k.id).cloned())
            .collect()
    }
}

/// Raises `key.created_outside` for every key created by a person on a service
/// account one of the survey's slots manages, since the last look. Reads nothing: the
/// entries are the survey's ([`Survey::key_creations`]); when those were not read, or
/// could not be (the survey said so), nothing happens.
pub(super) fn check(eng: &Engine, survey: &Survey) {
    let Some(Ok(entries)) = &survey.key_creations else {
        return;
    };
    let managed: BTreeSet<(&str, &str)> = survey
        .views
        .iter()
        .flat_map(|v| {
            v.slot
                .service_accounts
                .iter()
                .map(|(sa, _)| (v.slot.project_id.as_str(), sa.as_str()))
        })
        .collect();
    if managed.is_empty() {
        return;
    }
    let keys: BTreeMap<&str, (&crate::openai::models::Project, &ProjectApiKey)> = survey
        .inventory
        .projects
        .iter()
        .flat_map(|p| p.keys.iter().map(move |k| (k.id.as_str(), (&p.project, k))))
        .collect();
    let now = survey.now.timestamp();
    let mut seen = eng.memory.outside.lock().unwrap_or_else(|p| p.into_inner());
    let since = seen
        .until
        .map_or(now - LOOKBACK_SECS, |u| u.min(now) - OVERLAP_SECS);
    seen.examined.retain(|_, at| *at >= since);
    for e in entries.iter().filter(|e| e.effective_at >= since) {
        if seen.examined.contains_key(&e.id) {
            continue;
        }
        let AuditEvent::ApiKeyCreated {
            id: Some(key_id), ..
        } = &e.event
        else {
            seen.examined.insert(e.id.clone(), e.effective_at);
            continue;
        };
        let Some((project, key)) = keys.get(key_id.as_str()) else {
            // Not listed: gone already, or created after the scan listed its project
            // (looked at again next cycle, within the overlap).
            continue;
        };
        seen.examined.insert(e.id.clone(), e.effective_at);
        let Some(actor) = e
            .actor
            .as_ref()
            .filter(|a| a.kind == AuditActorType::Session)
        else {
            continue;
        };
        let sa = match (key.owner.kind, &key.owner.service_account) {
            (OwnerType::ServiceAccount, Some(sa)) => sa,
            _ => continue,
        };
        if !managed.contains(&(project.id.as_str(), sa.id.as_str())) {
            continue;
        }
        let created_by = actor.email().unwrap_or_default();
        eng.metrics.created_outside();
        warn!(
            event = "key.created_outside",
            project_id = %project.id,
            project_name = %project.display_name(),
            service_account_id = %sa.id,
            service_account_name = sa.name.as_deref().unwrap_or(""),
            key_id = %key.id,
            created_by,
            created_at = %crate::policy::ts(e.effective_at).to_rfc3339(),
            "a person created a key on a service account keyrotd manages; no store serves it and keyrotd does not rotate it"
        );
        eng.notifier.send(Notice::KeyCreatedOutside {
            project_id: project.id.clone(),
            service_account_id: sa.id.clone(),
            key_id: key.id.clone(),
            created_by: created_by.to_string(),
        });
    }
    seen.until = Some(now);
}
