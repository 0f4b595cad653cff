//! Per-slot gauges derived from a cycle's [`Survey`]: what every managed slot's stores
//! serve, checked against the keys the Admin API listed.

use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use rustc_hash::FxHashMap as HashMap;

use crate::openai::models::ProjectApiKey;
use crate::plan::{Plan, SlotView};
use crate::policy;
use crate::rotation::Survey;

/// The labels of a slot's series. Names only: never a key id, a path or a secret.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct SlotLabels {
    pub rule: String,
    pub project_id: String,
    pub project_name: String,
    pub service_account_id: String,
    pub service_account_name: String,
}

/// One slot's per-slot gauges; `None` leaves the series out (no key served yet).
#[derive(Clone, Debug, PartialEq)]
pub struct SlotRow {
    pub labels: SlotLabels,
    pub ready: bool,
    pub key_age_seconds: Option<f64>,
    /// Unix seconds.
    pub last_rotation: Option<f64>,
    /// Unix seconds.
    pub next_due: Option<f64>,
}

fn unix(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

/// The rows of every slot in `survey`, in survey order; `plan` is the survey's plan
/// (its slots in the same order), whose decision says when each slot rotates next.
pub fn rows(survey: &Survey, plan: &Plan) -> Vec<SlotRow> {
    let listed: HashMap<&str, &ProjectApiKey> = survey
        .inventory
        .projects
        .iter()
        .flat_map(|p| p.keys.iter())
        .map(|k| (k.id.as_str(), k))
        .collect();
    survey
        .views
        .iter()
        .zip(&plan.slots)
        .map(|(v, p)| row(v, p.next_rotation, &listed, survey.now))
        .collect()
}

fn row(
    v: &SlotView,
    next_rotation: Option<DateTime<Utc>>,
    listed: &HashMap<&str, &ProjectApiKey>,
    now: DateTime<Utc>,
) -> SlotRow {
    let s = &v.slot;
    let labels = SlotLabels {
        rule: s.rule_name.clone(),
        project_id: s.project_id.clone(),
        project_name: s.project_name.clone(),
        service_account_id: s.service_account_id.clone(),
        service_account_name: s.service_account_name.clone(),
    };
    let read: Vec<_> = v
        .states
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .collect();
    let all_read = !v.states.is_empty() && read.len() == v.states.len();
    let in_flight = read
        .iter()
        .any(|st| st.pending.is_some() || st.book.intent.is_some());
    let collides = v.collides();
    // The served key: the one every store agrees on, else the oldest any store serves.
    let served = match v.agreed_current() {
        Some(id) => read
            .iter()
            .filter_map(|st| st.current.as_ref())
            .find(|c| c.key_id == id),
        None => read
            .iter()
            .filter_map(|st| st.current.as_ref())
            .min_by_key(|c| c.created_at),
    };
    let served = served.filter(|_| !collides);
    let api = served.and_then(|c| listed.get(c.key_id.as_str()).copied());
    let created_at = match (api, served) {
        (Some(k), _) => Some(policy::ts(k.created_at)),
        (None, Some(c)) => Some(c.created_at),
        (None, None) => None,
    };
    let expires_at = api.and_then(|k| k.expires_at).map(policy::ts);
    let live = api.is_some() && expires_at.is_none_or(|e| e > now);
    let ready = !collides && all_read && !in_flight && v.agreed_current().is_some() && live;
    SlotRow {
        labels,
        ready,
        key_age_seconds: created_at.map(|c| (now - c).num_milliseconds().max(0) as f64 / 1000.0),
        last_rotation: served
            .and(read.iter().filter_map(|st| st.book.promoted_at).max())
            .map(unix),
        next_due: next_rotation.map(unix),
    }
}
