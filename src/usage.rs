//! Usage and cost per key (`[usage]`): each survey reads the Usage API
//! (`GET /organization/usage/completions`) grouped by `project_id` and `api_key_id`
//! across every key of the organization, and the Costs API (`GET /organization/costs`)
//! grouped the same way, in as few paginated requests as the API allows:
//!
//! - 1 h buckets over the lookback (`ceil(lookback / 168 h)` pages, one for 7 days),
//! - 1 m buckets over the last hour (one page),
//! - 1 d cost buckets from the start of the lookback's first day (one page up to 180 days),
//! - 1 m buckets since promotion for the slots' replaced keys, filtered by
//!   `api_key_ids` (only when there are any; `ceil(minutes / 1440)` pages per 100 keys).
//!
//! A failure degrades to [`UsageState::Unknown`] (a 403 names the missing permission);
//! it never fails a rotation. Everything here that decides is pure: the fetch gathers,
//! [`anomalies`] judges.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use crate::config::UsageConfig;
use crate::openai::models::UsageQuery;
use crate::openai::{ApiError, Client};

/// Buckets per page of 1 h usage buckets (the API's maximum).
const HOUR_PAGE: u32 = 168;
/// Buckets per page of 1 m usage buckets (the API's maximum).
const MINUTE_PAGE: u32 = 1440;
/// Buckets per page of 1 d cost buckets (the API's maximum).
const DAY_PAGE: u32 = 180;
/// Key ids per `api_key_ids` filter (keeps URLs short).
const KEYS_PER_QUERY: usize = 100;
/// The permission a 403 from the usage endpoints says is missing.
pub const PERMISSION: &str = "api.usage.read";
/// Hours of history a key needs before its last hour is compared with its baseline
/// (a key just promoted takes over its predecessor's traffic: not a spike).
pub const MIN_BASELINE_HOURS: i64 = 24;

/// What the survey knows of usage.
#[derive(Clone, Debug, Default)]
pub enum UsageState {
    /// `usage.enabled = false`.
    #[default]
    Off,
    /// The fetch failed: usage is unknown this cycle.
    Unknown {
        reason: String,
    },
    Known(Arc<UsageView>),
}

impl UsageState {
    pub fn known(&self) -> Option<&UsageView> {
        match self {
            UsageState::Known(v) => Some(v),
            _ => None,
        }
    }
    /// `off`, `unknown` or `known`.
    pub fn status(&self) -> &'static str {
        match self {
            UsageState::Off => "off",
            UsageState::Unknown { .. } => "unknown",
            UsageState::Known(_) => "known",
        }
    }
}

/// The window the figures cover (Unix seconds; every range is `[start, end)`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Window {
    /// Start of the lookback (1 h buckets): the `*_window` figures.
    pub start: i64,
    /// Start of the last 24 h (1 h buckets): the `*_24h` figures.
    pub start_24h: i64,
    /// Start of the last hour (1 m buckets): `last_hour_requests`.
    pub start_last_hour: i64,
    /// Start of the first cost day (costs come in 1 d buckets): `cost`.
    pub cost_start: i64,
    /// When the figures end (the survey's time).
    pub end: i64,
}

/// One key's usage.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct KeyUsage {
    pub requests_24h: u64,
    pub input_tokens_24h: u64,
    pub output_tokens_24h: u64,
    pub requests_window: u64,
    pub input_tokens_window: u64,
    pub output_tokens_window: u64,
    /// Cost since [`Window::cost_start`], in [`UsageView::currency`].
    pub cost: f64,
    pub last_hour_requests: u64,
    /// Requests in the window's 1 h buckets that end before the last hour.
    #[serde(skip)]
    pub before_last_hour: u64,
    /// Start of the last 1 h or 1 m bucket with requests.
    #[serde(skip)]
    pub last_request_bucket: Option<i64>,
}

/// One project's usage and cost.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProjectUsage {
    pub requests_24h: u64,
    pub requests_window: u64,
    /// Every cost of the project since [`Window::cost_start`] (also what no key made).
    pub cost: f64,
}

/// What the Usage API says of a replaced key since a time (1 m buckets).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SinceUsage {
    /// The first minute read (the first whole minute after the promotion).
    pub since: i64,
    /// The last moment of the last minute with a request, if any.
    pub last_request: Option<i64>,
}

/// Usage and cost of every key and project with any in the window.
#[derive(Clone, Debug, Default)]
pub struct UsageView {
    pub window: Window,
    pub keys: BTreeMap<String, KeyUsage>,
    pub projects: BTreeMap<String, ProjectUsage>,
    /// Lowercase ISO 4217 (`usd`).
    pub currency: String,
    /// Replaced keys asked about, by id.
    pub replaced: BTreeMap<String, SinceUsage>,
    /// How many requests each endpoint took (usage, costs).
    pub requests: (usize, usize),
}

impl UsageView {
    /// The last request of `key_id` per the Usage API's 1 m buckets, when it was read:
    /// `Some(None)` = no request since the promotion; `None` = not read.
    pub fn last_request_since_promotion(&self, key_id: &str) -> Option<Option<i64>> {
        self.replaced.get(key_id).map(|s| s.last_request)
    }
}

fn floor(t: i64, w: i64) -> i64 {
    t.div_euclid(w) * w
}

fn ceil(t: i64, w: i64) -> i64 {
    -floor(-t, w)
}

/// The window of a fetch at `now` with `lookback` (whole hours).
pub fn window(lookback_secs: i64, now: i64) -> Window {
    let start = ceil(now, 3600) - lookback_secs;
    Window {
        start,
        start_24h: ceil(now, 3600) - 86_400,
        start_last_hour: ceil(now, 60) - 3600,
        cost_start: floor(start, 86_400),
        end: now,
    }
}

/// Reads usage and cost for `now` (Unix seconds). `replaced`: replaced keys to read
/// 1 m buckets for, with when their replacement was promoted; the organization-wide
/// requests do not wait for it (the survey starts them with the scan).
pub async fn fetch(
    client: &Client,
    cfg: &UsageConfig,
    now: i64,
    replaced: impl std::future::Future<Output = Vec<(String, i64)>>,
) -> Result<UsageView, ApiError> {
    let w = window(cfg.lookback.as_secs() as i64, now);
    let group = vec!["project_id".to_string(), "api_key_id".to_string()];
    let hourly = UsageQuery {
        start_time: w.start,
        end_time: Some(now),
        bucket_width: Some("1h".into()),
        group_by: group.clone(),
        limit: Some(HOUR_PAGE),
        ..UsageQuery::default()
    };
    let minutes = UsageQuery {
        start_time: w.start_last_hour,
        end_time: Some(now),
        bucket_width: Some("1m".into()),
        group_by: group.clone(),
        limit: Some(60),
        ..UsageQuery::default()
    };
    let costs = UsageQuery {
        start_time: w.cost_start,
        end_time: Some(now),
        bucket_width: Some("1d".into()),
        group_by: group.clone(),
        limit: Some(DAY_PAGE),
        ..UsageQuery::default()
    };
    let replaced = async {
        // Replaced keys, by the first whole minute after their promotion (within the
        // lookback).
        let mut since: BTreeMap<String, i64> = BTreeMap::new();
        for (k, promoted) in replaced.await {
            let s = ceil(promoted, 60).max(w.start);
            let e = since.entry(k).or_insert(s);
            *e = (*e).min(s);
        }
        let ids: Vec<&String> = since.keys().collect();
        let queries: Vec<UsageQuery> = ids
            .chunks(KEYS_PER_QUERY)
            .map(|chunk| UsageQuery {
                start_time: chunk.iter().map(|k| since[*k]).min().unwrap_or(now),
                end_time: Some(now),
                bucket_width: Some("1m".into()),
                api_key_ids: chunk.iter().map(|k| (*k).clone()).collect(),
                group_by: vec!["api_key_id".into()],
                limit: Some(MINUTE_PAGE),
                ..UsageQuery::default()
            })
            .collect();
        let buckets =
            futures::future::join_all(queries.iter().map(|q| client.usage_completions(q))).await;
        (since, queries, buckets)
    };
    let before = client.stats().snapshot();
    let (hourly, minutes, costs, (since, replaced_queries, replaced_buckets)) = tokio::join!(
        client.usage_completions(&hourly),
        client.usage_completions(&minutes),
        client.costs(&costs),
        replaced
    );
    let after = client.stats().snapshot();
    let count = |e: crate::openai::Endpoint| -> usize {
        let n = |s: &[(crate::openai::Endpoint, u16, u64)]| -> u64 {
            s.iter()
                .filter(|(x, _, _)| *x == e)
                .map(|(_, _, n)| n)
                .sum()
        };
        n(&after).saturating_sub(n(&before)) as usize
    };
    let (hourly, minutes, costs) = (hourly?, minutes?, costs?);
    let mut v = UsageView {
        window: w,
        currency: "usd".into(),
        requests: (
            count(crate::openai::Endpoint::UsageCompletions),
            count(crate::openai::Endpoint::Costs),
        ),
        ..UsageView::default()
    };
    for b in &hourly {
        for r in &b.results {
            let Some(key) = &r.api_key_id else { continue };
            let k = v.keys.entry(key.clone()).or_default();
            k.requests_window += r.num_model_requests;
            k.input_tokens_window += r.input_tokens;
            k.output_tokens_window += r.output_tokens;
            if b.start_time >= w.start_24h {
                k.requests_24h += r.num_model_requests;
                k.input_tokens_24h += r.input_tokens;
                k.output_tokens_24h += r.output_tokens;
            }
            if b.end_time <= w.start_last_hour {
                k.before_last_hour += r.num_model_requests;
            }
            if r.num_model_requests > 0 {
                k.last_request_bucket = k.last_request_bucket.max(Some(b.start_time));
            }
            if let Some(p) = &r.project_id {
                let p = v.projects.entry(p.clone()).or_default();
                p.requests_window += r.num_model_requests;
                if b.start_time >= w.start_24h {
                    p.requests_24h += r.num_model_requests;
                }
            }
        }
    }
    for b in &minutes {
        for r in &b.results {
            let Some(key) = &r.api_key_id else { continue };
            let k = v.keys.entry(key.clone()).or_default();
            k.last_hour_requests += r.num_model_requests;
            if r.num_model_requests > 0 {
                k.last_request_bucket = k.last_request_bucket.max(Some(b.start_time));
            }
        }
    }
    for b in &costs {
        for r in &b.results {
            let Some(amount) = &r.amount else { continue };
            if let Some(c) = &amount.currency {
                v.currency = c.to_ascii_lowercase();
            }
            if let Some(p) = &r.project_id {
                v.projects.entry(p.clone()).or_default().cost += amount.value;
            }
            if let Some(key) = &r.api_key_id {
                v.keys.entry(key.clone()).or_default().cost += amount.value;
            }
        }
    }
    // Replaced keys: a failure here falls back to `last_used_at` for them.
    for (q, r) in replaced_queries.iter().zip(replaced_buckets) {
        let Ok(buckets) = r else { continue };
        for id in &q.api_key_ids {
            v.replaced.insert(
                id.clone(),
                SinceUsage {
                    since: since[id],
                    last_request: None,
                },
            );
        }
        for b in &buckets {
            for r in &b.results {
                let Some(id) = &r.api_key_id else { continue };
                let Some(s) = v.replaced.get_mut(id) else {
                    continue;
                };
                if r.num_model_requests > 0 && b.start_time >= s.since {
                    s.last_request = s.last_request.max(Some(b.end_time - 1));
                }
            }
        }
    }
    Ok(v)
}

/// Why a key's traffic is anomalous.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    /// Last-hour requests above `spike_factor` × the key's hourly baseline.
    Spike,
    /// Traffic on a replaced key after its grace period.
    ReplacedAfterGrace,
    /// Traffic on a stale user key the listing says is unused.
    StaleUserKeyActive,
    /// Traffic on a key `keyrotd revoke` is about to revoke.
    AboutToBeRevoked,
}

impl AnomalyKind {
    pub const ALL: [AnomalyKind; 4] = [
        AnomalyKind::Spike,
        AnomalyKind::ReplacedAfterGrace,
        AnomalyKind::StaleUserKeyActive,
        AnomalyKind::AboutToBeRevoked,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            AnomalyKind::Spike => "spike",
            AnomalyKind::ReplacedAfterGrace => "replaced_after_grace",
            AnomalyKind::StaleUserKeyActive => "stale_user_key_active",
            AnomalyKind::AboutToBeRevoked => "about_to_be_revoked",
        }
    }
}

/// One `key.usage_anomaly`.
#[derive(Clone, Debug, PartialEq)]
pub struct Anomaly {
    pub kind: AnomalyKind,
    pub project_id: String,
    pub key_id: String,
    pub owner_type: &'static str,
    pub last_hour_requests: u64,
    /// Mean requests per hour before the last hour (spikes).
    pub baseline: Option<f64>,
    /// The slot serving the key ([`crate::plan::Slot::id`]), if one does.
    pub slot: Option<String>,
}

/// Every anomalous key of a plan. Pure: the plan's keys with their usage, the slots'
/// stores as read (which key each serves, which it replaced and when), the rules'
/// grace periods.
///
/// - `spike`: last-hour requests ≥ `spike_min_requests` and above `spike_factor` × the
///   key's hourly baseline (keys with at least [`MIN_BASELINE_HOURS`] of history). A
///   slot's key younger than that, whose predecessor (the key its promotion replaced)
///   is still listed, is judged by the slot's traffic instead: the two keys' requests
///   together against the predecessor's history ([`slot_spike`]);
/// - `replaced_after_grace`: a request on a slot's replaced key in a bucket that
///   starts after its grace period ended;
/// - `stale_user_key_active`: last-hour requests on a stale user key the listing says
///   is unused (or never used).
pub fn anomalies(
    cfg: &UsageConfig,
    plan: &crate::plan::Plan,
    views: &[crate::plan::SlotView],
    rules: &[crate::config::Rule],
) -> Vec<Anomaly> {
    use crate::policy::Reason;
    let Some(w) = plan.usage.window else {
        return Vec::new();
    };
    let by_id: BTreeMap<&str, &crate::plan::PlanKey> =
        plan.keys.iter().map(|k| (k.key_id(), k)).collect();
    let mut served: BTreeMap<&str, String> = BTreeMap::new();
    let mut grace_end: BTreeMap<&str, i64> = BTreeMap::new();
    // The key each slot's current one replaced, while it is still listed.
    let mut predecessor: BTreeMap<&str, &crate::plan::PlanKey> = BTreeMap::new();
    for v in views {
        let current = v.agreed_current();
        if let Some(k) = current {
            served.insert(k, v.slot.id());
        }
        let grace = rules
            .get(v.slot.rule)
            .map_or(0, |r| r.grace_period.as_secs() as i64);
        for (_, s) in v.ok_states() {
            let Some(k) = s.book.previous_key_id.as_deref() else {
                continue;
            };
            if let Some(p) = s.book.promoted_at {
                let end = p.timestamp().saturating_add(grace);
                let e = grace_end.entry(k).or_insert(end);
                *e = (*e).max(end);
            }
            if let (Some(c), Some(p)) = (current.filter(|c| *c != k), by_id.get(k)) {
                predecessor.entry(c).or_insert(p);
            }
        }
    }
    let mut out = Vec::new();
    for k in &plan.keys {
        let Some(u) = k.usage else { continue };
        let judged = spike(cfg, &w, u, k.api.created_at).or_else(|| {
            let p = predecessor.get(k.key_id())?;
            slot_spike(cfg, &w, (u, k.api.created_at), (p.usage?, p.api.created_at))
        });
        let mut found = |kind, baseline| {
            out.push(Anomaly {
                kind,
                project_id: k.project_id().to_string(),
                key_id: k.key_id().to_string(),
                owner_type: k.owner_type(),
                last_hour_requests: u.last_hour_requests,
                baseline,
                slot: served.get(k.key_id()).cloned(),
            })
        };
        if let Some(end) = grace_end.get(k.key_id()) {
            if !served.contains_key(k.key_id()) && u.last_request_bucket.is_some_and(|b| b >= *end)
            {
                found(AnomalyKind::ReplacedAfterGrace, None);
                continue;
            }
        }
        if k.owner_type() == "user"
            && k.reasons.contains(&Reason::Stale)
            && (k.reasons.contains(&Reason::Unused) || k.reasons.contains(&Reason::NeverUsed))
            && u.last_hour_requests > 0
        {
            found(AnomalyKind::StaleUserKeyActive, None);
            continue;
        }
        if let Some((baseline, true)) = judged {
            found(AnomalyKind::Spike, Some(baseline));
        }
    }
    out
}

/// `about_to_be_revoked` for every key of `key_ids` with requests in the last hour
/// (only reported: `keyrotd revoke` goes on).
pub fn about_to_revoke(inv: &crate::plan::Inventory, key_ids: &[String]) -> Vec<Anomaly> {
    let Some(u) = inv.usage.known() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for p in &inv.projects {
        for k in p.keys.iter().filter(|k| key_ids.contains(&k.id)) {
            let n = u.keys.get(&k.id).map_or(0, |x| x.last_hour_requests);
            if n > 0 {
                out.push(Anomaly {
                    kind: AnomalyKind::AboutToBeRevoked,
                    project_id: p.project.id.clone(),
                    key_id: k.id.clone(),
                    owner_type: k.owner.kind.as_str(),
                    last_hour_requests: n,
                    baseline: None,
                    slot: None,
                });
            }
        }
    }
    out
}

/// The hourly baseline of a key and whether its last hour is a spike. Pure.
/// `created_at`: the key's creation (Unix seconds). `None`: too little history.
pub fn spike(cfg: &UsageConfig, w: &Window, k: &KeyUsage, created_at: i64) -> Option<(f64, bool)> {
    let from = w.start.max(floor(created_at, 3600));
    let hours = (floor(w.start_last_hour, 3600) - from) / 3600;
    if hours < MIN_BASELINE_HOURS {
        return None;
    }
    let baseline = k.before_last_hour as f64 / hours as f64;
    let spiking = k.last_hour_requests >= cfg.spike_min_requests
        && k.last_hour_requests as f64 > cfg.spike_factor * baseline;
    Some((baseline, spiking))
}

/// [`spike`] for a slot's key too young for a baseline of its own: the slot's traffic,
/// the key's requests and its predecessor's (`(usage, created_at)` each) together,
/// against the history since the predecessor's creation. A promotion moves consumers
/// from one key to the other without changing the sum, so only traffic the slot's
/// consumers did not send before counts. `None`: too little history for both. Pure.
pub fn slot_spike(
    cfg: &UsageConfig,
    w: &Window,
    key: (&KeyUsage, i64),
    predecessor: (&KeyUsage, i64),
) -> Option<(f64, bool)> {
    let both = KeyUsage {
        last_hour_requests: key.0.last_hour_requests + predecessor.0.last_hour_requests,
        before_last_hour: key.0.before_last_hour + predecessor.0.before_last_hour,
        ..KeyUsage::default()
    };
    spike(cfg, w, &both, key.1.min(predecessor.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_is_whole_buckets() {
        let now = 1_800_000_123;
        let w = window(7 * 86_400, now);
        assert_eq!((ceil(now, 3600) - w.start) / 3600, 168);
        assert_eq!(w.start % 3600, 0);
        assert_eq!(w.start_last_hour % 60, 0);
        assert_eq!(w.cost_start % 86_400, 0);
        assert!(w.cost_start <= w.start);
    }

    #[test]
    fn a_spike_needs_history_and_the_minimum() {
        let cfg = UsageConfig::default();
        let w = window(7 * 86_400, 1_800_000_000);
        let k = KeyUsage {
            before_last_hour: 167 * 10,
            last_hour_requests: 1000,
            ..KeyUsage::default()
        };
        let (b, s) = spike(&cfg, &w, &k, 0).unwrap();
        assert!(s, "{b}");
        assert!(spike(&cfg, &w, &k, w.end - 3600).is_none());
        let quiet = KeyUsage {
            last_hour_requests: 50,
            ..k
        };
        assert!(!spike(&cfg, &w, &quiet, 0).unwrap().1);
    }

    #[test]
    fn a_young_key_is_judged_by_its_slot_traffic() {
        let cfg = UsageConfig::default();
        let w = window(7 * 86_400, 1_800_000_000);
        let young = w.end - 5 * 3600;
        // The predecessor sent 10 an hour for the week until the promotion 5 h ago;
        // since then the new key does (and the old one still a little).
        let old = KeyUsage {
            before_last_hour: 162 * 10 + 4 * 2,
            last_hour_requests: 2,
            ..KeyUsage::default()
        };
        let steady = KeyUsage {
            before_last_hour: 4 * 8,
            last_hour_requests: 8,
            ..KeyUsage::default()
        };
        assert!(
            spike(&cfg, &w, &steady, young).is_none(),
            "no baseline of its own"
        );
        let (b, s) = slot_spike(&cfg, &w, (&steady, young), (&old, 0)).unwrap();
        assert!(!s, "the slot's traffic moved, it did not grow: {b}");
        let leaked = KeyUsage {
            last_hour_requests: 1000,
            ..steady.clone()
        };
        let (b, s) = slot_spike(&cfg, &w, (&leaked, young), (&old, 0)).unwrap();
        assert!(s, "{b}");
        assert!(
            (b - 10.0).abs() < 0.5,
            "the slot's baseline, about 10 an hour: {b}"
        );
        // A predecessor as young has no history to judge by either.
        assert!(slot_spike(&cfg, &w, (&leaked, young), (&old, young - 3600)).is_none());
    }
}
