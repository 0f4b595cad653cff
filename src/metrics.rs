//! Prometheus metrics (DESIGN.md §6), encoded by `prometheus-client` in the text
//! exposition format 0.0.4 (label values escaped by the encoder).
//!
//! One registry shared by the engine and the listener: aggregate counters and gauges,
//! `keyrotd_build_info`, and per-slot gauges ([`Metrics::set_slots`], see [`SlotRow`])
//! for the managed slots only, at most [`SLOT_SERIES_LIMIT`] slots' worth. The Admin
//! API request counters live in the client's [`ApiStats`] and are encoded with the rest
//! at each scrape.

pub mod push;
mod slots;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tracing::warn;

use crate::openai::ApiStats;
use crate::plan::ExpiryState;
use crate::policy::Verdict;
use crate::rotation::Survey;

pub use slots::{SlotLabels, SlotRow};

/// Projects (and slots) with usage series: the most expensive (busiest) this many; the
/// rest of the projects add up in `project_id = "other"`. Keeps a large organization
/// within the series budget.
pub const USAGE_SERIES_LIMIT: usize = 20;

/// The labels of a project's usage series.
#[derive(
    Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, prometheus_client::encoding::EncodeLabelSet,
)]
pub struct ProjectLabels {
    pub project_id: String,
    pub project_name: String,
}

/// At most this many slots get per-slot series (4 each): beyond it the rest are counted
/// in `keyrotd_slot_series_omitted` and not exported, so a scrape stays a few thousand
/// series (README, "Metrics").
pub const SLOT_SERIES_LIMIT: usize = 2_500;

/// Outcome label of `keyrotd_rotations_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RotationOutcome {
    Completed,
    Failed,
    /// The new key never verified; it was revoked and never promoted.
    VerifyFailed,
    /// Another process owns the slot (check-and-set lost); our key was revoked.
    Conflict,
}

impl RotationOutcome {
    pub const ALL: [RotationOutcome; 4] = [
        RotationOutcome::Completed,
        RotationOutcome::Failed,
        RotationOutcome::VerifyFailed,
        RotationOutcome::Conflict,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RotationOutcome::Completed => "completed",
            RotationOutcome::Failed => "failed",
            RotationOutcome::VerifyFailed => "verify_failed",
            RotationOutcome::Conflict => "conflict",
        }
    }
}

/// Outcome label of `keyrotd_revocations_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RevocationOutcome {
    Revoked,
    AlreadyGone,
    Failed,
}

impl RevocationOutcome {
    pub const ALL: [RevocationOutcome; 3] = [
        RevocationOutcome::Revoked,
        RevocationOutcome::AlreadyGone,
        RevocationOutcome::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RevocationOutcome::Revoked => "revoked",
            RevocationOutcome::AlreadyGone => "already_gone",
            RevocationOutcome::Failed => "failed",
        }
    }
}

/// What a slot or rotation failure was about: the `kind` label of
/// `keyrotd_slot_failures_total` and `keyrotd_rotation_failures_total`, and the `kind`
/// field of `rotation.failed` events (the rotation engine derives it from its error).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FailureKind {
    /// A store could not be read or written (or is not configured).
    Store,
    /// The OpenAI Admin API failed.
    Api,
    /// A new key never verified.
    Verify,
    /// A store read back another key than the one just promoted.
    ReadBack,
    /// Another slot claims the slot's path, or a document there names another project.
    Collision,
    Other,
}

impl FailureKind {
    pub const ALL: [FailureKind; 6] = [
        FailureKind::Store,
        FailureKind::Api,
        FailureKind::Verify,
        FailureKind::ReadBack,
        FailureKind::Collision,
        FailureKind::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Store => "store",
            FailureKind::Api => "api",
            FailureKind::Verify => "verify",
            FailureKind::ReadBack => "read_back",
            FailureKind::Collision => "collision",
            FailureKind::Other => "other",
        }
    }
}

/// State label of `keyrotd_slots`: how a slot's run ended in the last cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SlotStatus {
    /// The run completed: the key was fresh, or a new key was verified (unless the
    /// rule sets `verify = false`) and promoted.
    Ok,
    /// Another process holds the slot (a live intent, or it won check-and-set).
    Busy,
    /// `--dry-run`: the run only planned.
    Planned,
    /// The run ended in an error (a store or the API failing, a new key that failed
    /// verification, a collision): keyrotd could not confirm this cycle that the
    /// slot's stores serve a current, verified key. They keep what they served before.
    Failed,
}

impl SlotStatus {
    pub const ALL: [SlotStatus; 4] = [
        SlotStatus::Ok,
        SlotStatus::Busy,
        SlotStatus::Planned,
        SlotStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SlotStatus::Ok => "ok",
            SlotStatus::Busy => "busy",
            SlotStatus::Planned => "planned",
            SlotStatus::Failed => "failed",
        }
    }
}

/// The label set of a family with one label.
type One = [(&'static str, &'static str); 1];
type FloatGauge = Gauge<f64, AtomicU64>;

/// What is not a metric: the running cycle's slot counts and the per-slot series
/// exported now.
#[derive(Debug, Default)]
struct State {
    /// The running cycle's slot counts, published by `cycle_finished`.
    slots_pending: Option<BTreeMap<SlotStatus, u64>>,
    /// The label sets of the per-slot series exported now.
    exported: BTreeSet<SlotLabels>,
    /// The last `set_slots` had more slots than the limit (logged once per crossing).
    over_limit: bool,
}

/// The metrics registry.
pub struct Metrics {
    registry: Registry,
    keys: Family<One, Gauge>,
    rotations: Family<One, Counter>,
    rotation_failures: Family<One, Counter>,
    revocations: Family<One, Counter>,
    cycles: Family<One, Counter>,
    slot_failures: Family<One, Counter>,
    slots: Family<One, Gauge>,
    slot_collisions: Counter,
    slot_busy: Counter,
    still_in_use: Counter,
    key_invalid: Counter,
    created_outside: Counter,
    usage_anomalies: Family<One, Counter>,
    project_requests: Family<ProjectLabels, Gauge>,
    project_cost: Family<ProjectLabels, FloatGauge>,
    slot_requests: Family<SlotLabels, Gauge>,
    keys_expiring: Family<One, Gauge>,
    cycle_duration_seconds: FloatGauge,
    last_success_timestamp_seconds: FloatGauge,
    oldest_key_age_seconds: FloatGauge,
    slot_key_age: Family<SlotLabels, FloatGauge>,
    slot_last_rotation: Family<SlotLabels, FloatGauge>,
    slot_next_due: Family<SlotLabels, FloatGauge>,
    slot_ready: Family<SlotLabels, Gauge>,
    slot_series_omitted: Gauge,
    slot_limit: usize,
    state: Mutex<State>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("slot_limit", &self.slot_limit)
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::with_slot_limit(SLOT_SERIES_LIMIT)
    }
}

/// One family, declared (HELP and TYPE) at every scrape even while it has no series:
/// the registry alone leaves empty families out, and the rules and dashboards expect
/// every family from the start. The encoder adds `_total` to a counter's name.
#[derive(Debug)]
struct Declared<M> {
    name: &'static str,
    help: String,
    metric: M,
}

impl<M: EncodeMetric + std::fmt::Debug + Send + Sync + 'static> Collector for Declared<M> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e =
            encoder.encode_descriptor(self.name, &self.help, None, self.metric.metric_type())?;
        self.metric.encode(e)
    }
}

/// Adds `metric` to `r` as `name`, in registration order.
fn register<M: EncodeMetric + std::fmt::Debug + Send + Sync + 'static>(
    r: &mut Registry,
    name: &'static str,
    help: &str,
    metric: M,
) {
    r.register_collector(Box::new(Declared {
        name,
        help: format!("{help}."),
        metric,
    }));
}

/// A family with a series (at 0) for every label value: the rules expect each one.
fn preset<M: Default>(
    label: &'static str,
    values: impl IntoIterator<Item = &'static str>,
) -> Family<One, M> {
    let f = Family::<One, M>::default();
    for v in values {
        let _ = f.get_or_create(&[(label, v)]);
    }
    f
}

impl Metrics {
    /// A registry that exports per-slot series for at most `slot_limit` slots.
    pub fn with_slot_limit(slot_limit: usize) -> Metrics {
        let m = Metrics {
            registry: Registry::default(),
            keys: preset("verdict", Verdict::ALL.map(Verdict::as_str)),
            rotations: preset("outcome", RotationOutcome::ALL.map(RotationOutcome::as_str)),
            rotation_failures: preset("kind", FailureKind::ALL.map(FailureKind::as_str)),
            revocations: preset(
                "outcome",
                RevocationOutcome::ALL.map(RevocationOutcome::as_str),
            ),
            cycles: preset("result", ["ok", "failed"]),
            slot_failures: preset("kind", FailureKind::ALL.map(FailureKind::as_str)),
            slots: preset("state", SlotStatus::ALL.map(SlotStatus::as_str)),
            slot_collisions: Counter::default(),
            slot_busy: Counter::default(),
            still_in_use: Counter::default(),
            key_invalid: Counter::default(),
            created_outside: Counter::default(),
            project_requests: Family::default(),
            project_cost: Family::default(),
            slot_requests: Family::default(),
            usage_anomalies: preset(
                "kind",
                crate::usage::AnomalyKind::ALL.map(crate::usage::AnomalyKind::as_str),
            ),
            keys_expiring: preset("state", ExpiryState::ALL.map(ExpiryState::as_str)),
            cycle_duration_seconds: FloatGauge::default(),
            last_success_timestamp_seconds: FloatGauge::default(),
            oldest_key_age_seconds: FloatGauge::default(),
            slot_key_age: Family::default(),
            slot_last_rotation: Family::default(),
            slot_next_due: Family::default(),
            slot_ready: Family::default(),
            slot_series_omitted: Gauge::default(),
            slot_limit,
            state: Mutex::new(State::default()),
        };
        let mut registry = Registry::default();
        let r = &mut registry;
        register(
            r,
            "keyrotd_build",
            "The keyrotd version and git commit serving these metrics",
            Info::new([
                ("version", env!("CARGO_PKG_VERSION")),
                ("commit", env!("KEYROTD_GIT_COMMIT")),
            ]),
        );
        register(
            r,
            "keyrotd_keys",
            "Project API keys by verdict at the last scan",
            m.keys.clone(),
        );
        register(
            r,
            "keyrotd_rotations",
            "Slot rotations by outcome",
            m.rotations.clone(),
        );
        register(
            r,
            "keyrotd_rotation_failures",
            "Rotations that failed (outcome failed or verify_failed) by kind: store, api, verify, read_back, collision, other",
            m.rotation_failures.clone(),
        );
        register(
            r,
            "keyrotd_revocations",
            "Key revocations by outcome",
            m.revocations.clone(),
        );
        register(
            r,
            "keyrotd_cycles",
            "Rotation cycles by result",
            m.cycles.clone(),
        );
        register(
            r,
            "keyrotd_slot_failures",
            "Slots that failed a cycle, by kind: store, api, verify, read_back, collision, other (sum them for the total)",
            m.slot_failures.clone(),
        );
        register(
            r,
            "keyrotd_slots",
            "Slots of the last finished cycle by how their run ended (failed: an error, so no key was verified for the slot)",
            m.slots.clone(),
        );
        register(
            r,
            "keyrotd_slot_collisions",
            "Slot runs refused: another slot renders the same store path, or the document there names another project",
            m.slot_collisions.clone(),
        );
        register(
            r,
            "keyrotd_slot_busy",
            "Slot runs skipped because another live process holds the slot's lease",
            m.slot_busy.clone(),
        );
        register(
            r,
            "keyrotd_key_still_in_use",
            "Checks that found a previous key still in use after its grace period",
            m.still_in_use.clone(),
        );
        register(
            r,
            "keyrotd_key_invalid",
            "Served keys found dead (HTTP 401) and replaced at once",
            m.key_invalid.clone(),
        );
        register(
            r,
            "keyrotd_keys_created_outside",
            "Keys created by a person (audit log: a dashboard session) on a service account a slot manages",
            m.created_outside.clone(),
        );
        register(
            r,
            "keyrotd_key_usage_anomalies",
            "key.usage_anomaly events, by kind: spike (last-hour requests above usage.spike_factor x the key's hourly baseline), replaced_after_grace, stale_user_key_active, about_to_be_revoked",
            m.usage_anomalies.clone(),
        );
        register(
            r,
            "keyrotd_project_requests",
            "Model requests in the last 24 h per project (Usage API), the most expensive projects and project_id=\"other\" for the rest",
            m.project_requests.clone(),
        );
        register(
            r,
            "keyrotd_project_cost",
            "Cost per project over the usage window (Costs API, in its currency, usually USD), the most expensive projects and project_id=\"other\" for the rest",
            m.project_cost.clone(),
        );
        register(
            r,
            "keyrotd_slot_requests",
            "Model requests in the last 24 h with the key a slot serves (Usage API), for the busiest slots",
            m.slot_requests.clone(),
        );
        register(
            r,
            "keyrotd_keys_expiring",
            "Project API keys with an expiry at the last scan, by state: expired, expiring (within policy.expiry_warning), protected (a replaced key expiring at the end of its grace period)",
            m.keys_expiring.clone(),
        );
        // 0 until the first cycle sets them (the alert rules expect the series).
        register(
            r,
            "keyrotd_cycle_duration_seconds",
            "Duration of the last cycle",
            m.cycle_duration_seconds.clone(),
        );
        register(
            r,
            "keyrotd_last_success_timestamp_seconds",
            "Unix time of the last cycle in which nothing failed",
            m.last_success_timestamp_seconds.clone(),
        );
        register(
            r,
            "keyrotd_oldest_key_age_seconds",
            "Age of the oldest project API key at the last scan",
            m.oldest_key_age_seconds.clone(),
        );
        register(
            r,
            "keyrotd_slot_key_age_seconds",
            "Per managed slot, as surveyed at the start of the last cycle: age of the key its stores serve (the oldest one while they disagree)",
            m.slot_key_age.clone(),
        );
        register(
            r,
            "keyrotd_slot_last_rotation_timestamp_seconds",
            "Per managed slot, as surveyed at the start of the last cycle: unix time its served key was promoted",
            m.slot_last_rotation.clone(),
        );
        register(
            r,
            "keyrotd_slot_next_rotation_timestamp_seconds",
            "Per managed slot, as surveyed at the start of the last cycle: unix time its served key is due for rotation (created_at + max_age, or expires_at - policy.expiry_warning if earlier)",
            m.slot_next_due.clone(),
        );
        register(
            r,
            "keyrotd_slot_ready",
            "Per managed slot, as surveyed at the start of the last cycle: 1 when every store serves the same live, promoted key and no rotation is in flight; 0 otherwise (store unreadable, collision, no key yet, stores disagree, rotation in flight, key gone or expired)",
            m.slot_ready.clone(),
        );
        register(
            r,
            "keyrotd_slot_series_omitted",
            "Managed slots of the last cycle without per-slot series: more than the limit of slots exported",
            m.slot_series_omitted.clone(),
        );
        Metrics { registry, ..m }
    }

    fn state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    pub fn rotation(&self, o: RotationOutcome) {
        self.rotations
            .get_or_create(&[("outcome", o.as_str())])
            .inc();
    }

    /// A rotation that failed: `keyrotd_rotations_total` (`verify_failed` for a key
    /// that never verified, `failed` otherwise) and `keyrotd_rotation_failures_total`.
    pub fn rotation_failed(&self, kind: FailureKind) {
        self.rotation(if kind == FailureKind::Verify {
            RotationOutcome::VerifyFailed
        } else {
            RotationOutcome::Failed
        });
        self.rotation_failures
            .get_or_create(&[("kind", kind.as_str())])
            .inc();
    }

    pub fn rotation_failures(&self, kind: FailureKind) -> u64 {
        self.rotation_failures
            .get_or_create(&[("kind", kind.as_str())])
            .get()
    }

    pub fn revocation(&self, o: RevocationOutcome) {
        self.revocations
            .get_or_create(&[("outcome", o.as_str())])
            .inc();
    }

    /// A previous key still in use after its grace period (`key.still_in_use`).
    pub fn still_in_use(&self) {
        self.still_in_use.inc();
    }

    /// A served key answered 401 (`key.invalid`).
    pub fn key_invalid(&self) {
        self.key_invalid.inc();
    }

    pub fn key_invalid_total(&self) -> u64 {
        self.key_invalid.get()
    }

    /// A key created outside keyrotd on a managed account (`key.created_outside`).
    pub fn created_outside(&self) {
        self.created_outside.inc();
    }

    /// The usage series of a survey's plan: per project (the [`USAGE_SERIES_LIMIT`]
    /// most expensive, the rest as `other`) and per slot (the busiest served keys).
    /// Cleared when usage is off or unknown.
    pub fn set_usage(&self, survey: &Survey, plan: &crate::plan::Plan) {
        self.project_requests.clear();
        self.project_cost.clear();
        self.slot_requests.clear();
        if plan.usage.status != "known" {
            return;
        }
        let (mut other_req, mut other_cost) = (0u64, 0.0f64);
        for (i, p) in plan.usage.projects.iter().enumerate() {
            if i < USAGE_SERIES_LIMIT {
                let l = ProjectLabels {
                    project_id: p.project_id.to_string(),
                    project_name: p.project_name.to_string(),
                };
                self.project_requests
                    .get_or_create(&l)
                    .set(p.requests_24h as i64);
                self.project_cost.get_or_create(&l).set(p.cost);
            } else {
                other_req += p.requests_24h;
                other_cost += p.cost;
            }
        }
        if plan.usage.projects.len() > USAGE_SERIES_LIMIT {
            let l = ProjectLabels {
                project_id: "other".into(),
                project_name: "other".into(),
            };
            self.project_requests
                .get_or_create(&l)
                .set(other_req as i64);
            self.project_cost.get_or_create(&l).set(other_cost);
        }
        let Some(u) = survey.inventory.usage.known() else {
            return;
        };
        let mut busiest: Vec<(u64, SlotLabels)> = survey
            .views
            .iter()
            .filter_map(|v| {
                let k = v.agreed_current()?;
                let s = &v.slot;
                Some((
                    u.keys.get(k).map_or(0, |k| k.requests_24h),
                    SlotLabels {
                        rule: s.rule_name.clone(),
                        project_id: s.project_id.clone(),
                        project_name: s.project_name.clone(),
                        service_account_id: s.service_account_id.clone(),
                        service_account_name: s.service_account_name.clone(),
                    },
                ))
            })
            .collect();
        busiest.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        for (n, l) in busiest.into_iter().take(USAGE_SERIES_LIMIT) {
            self.slot_requests.get_or_create(&l).set(n as i64);
        }
    }

    /// A `key.usage_anomaly`.
    pub fn usage_anomaly(&self, kind: crate::usage::AnomalyKind) {
        self.usage_anomalies
            .get_or_create(&[("kind", kind.as_str())])
            .inc();
    }

    /// Keys created outside keyrotd counted so far.
    pub fn keys_created_outside(&self) -> u64 {
        self.created_outside.get()
    }

    /// Sets `keyrotd_keys_expiring` from the plan's counts per expiry state.
    pub fn set_expiring(&self, counts: &BTreeMap<ExpiryState, u64>) {
        for s in ExpiryState::ALL {
            let n = counts.get(&s).copied().unwrap_or(0);
            self.keys_expiring
                .get_or_create(&[("state", s.as_str())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn slot_failed(&self, kind: FailureKind) {
        self.slot_failures
            .get_or_create(&[("kind", kind.as_str())])
            .inc();
    }

    /// Slot failures of `kind` so far.
    pub fn slot_failures(&self, kind: FailureKind) -> u64 {
        self.slot_failures
            .get_or_create(&[("kind", kind.as_str())])
            .get()
    }

    /// A slot refused because its path collides with another slot's (`slot.collision`).
    pub fn slot_collision(&self) {
        self.slot_collisions.inc();
    }

    pub fn slot_collisions(&self) -> u64 {
        self.slot_collisions.get()
    }

    /// A slot skipped because another live process holds its lease (`rotation.busy`).
    pub fn slot_busy(&self) {
        self.slot_busy.inc();
    }

    pub fn slots_busy(&self) -> u64 {
        self.slot_busy.get()
    }

    /// Replaces the per-verdict key counts and the oldest key age after a scan.
    pub fn set_keys(&self, counts: &BTreeMap<Verdict, u64>, oldest_age_seconds: Option<f64>) {
        for v in Verdict::ALL {
            let n = counts.get(&v).copied().unwrap_or(0);
            self.keys
                .get_or_create(&[("verdict", v.as_str())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.oldest_key_age_seconds
            .set(oldest_age_seconds.unwrap_or(0.0));
    }

    /// Replaces the per-slot series with the slots of `survey`: a slot no longer
    /// surveyed (project gone or archived, rule changed) loses its series. Beyond
    /// [`Metrics::slot_limit`] slots, the not-ready slots are kept first and the rest
    /// are counted in `keyrotd_slot_series_omitted` (and logged once) instead.
    pub fn set_slots(&self, survey: &Survey, plan: &crate::plan::Plan) {
        self.set_slot_rows(slots::rows(survey, plan));
    }

    /// [`Metrics::set_slots`] from rows already derived.
    pub fn set_slot_rows(&self, mut rows: Vec<SlotRow>) {
        let total = rows.len();
        let omitted = total.saturating_sub(self.slot_limit);
        if omitted > 0 {
            rows.sort_by(|a, b| a.ready.cmp(&b.ready).then_with(|| a.labels.cmp(&b.labels)));
            rows.truncate(self.slot_limit);
        }
        self.state(|st| {
            if omitted > 0 && !st.over_limit {
                warn!(
                    event = "metrics.slot_limit",
                    slots = total,
                    limit = self.slot_limit,
                    omitted,
                    "more managed slots than the per-slot metrics limit; the rest are counted in keyrotd_slot_series_omitted"
                );
            }
            st.over_limit = omitted > 0;
            let now: BTreeSet<SlotLabels> = rows.iter().map(|r| r.labels.clone()).collect();
            for gone in st.exported.difference(&now) {
                self.slot_key_age.remove(gone);
                self.slot_last_rotation.remove(gone);
                self.slot_next_due.remove(gone);
                self.slot_ready.remove(gone);
            }
            for r in &rows {
                let set = |f: &Family<SlotLabels, FloatGauge>, v: Option<f64>| match v {
                    Some(v) => {
                        f.get_or_create(&r.labels).set(v);
                    }
                    None => {
                        f.remove(&r.labels);
                    }
                };
                set(&self.slot_key_age, r.key_age_seconds);
                set(&self.slot_last_rotation, r.last_rotation);
                set(&self.slot_next_due, r.next_due);
                self.slot_ready
                    .get_or_create(&r.labels)
                    .set(i64::from(r.ready));
            }
            st.exported = now;
            self.slot_series_omitted
                .set(i64::try_from(omitted).unwrap_or(i64::MAX));
        });
    }

    /// How many slots may have per-slot series.
    pub fn slot_limit(&self) -> usize {
        self.slot_limit
    }

    /// The running cycle's slots by how their runs ended; `keyrotd_slots` shows them
    /// once [`Metrics::cycle_finished`] records the cycle.
    pub fn slots_finished(&self, statuses: impl IntoIterator<Item = SlotStatus>) {
        let mut counts = BTreeMap::new();
        for s in statuses {
            *counts.entry(s).or_default() += 1;
        }
        self.state(|st| st.slots_pending = Some(counts));
    }

    /// Slots of the last finished cycle whose run ended in `status`.
    pub fn slots(&self, status: SlotStatus) -> u64 {
        let n = self
            .slots
            .get_or_create(&[("state", status.as_str())])
            .get();
        u64::try_from(n).unwrap_or(0)
    }

    /// Records a finished cycle; `ok` cycles move the last-success timestamp. The slot
    /// counts reported by [`Metrics::slots_finished`] during the cycle become
    /// `keyrotd_slots`; a cycle that ran no slots (its scan failed) sets them all to 0.
    pub fn cycle_finished(&self, duration_seconds: f64, ok: bool, now_unix: f64) {
        let counts = self.state(|st| st.slots_pending.take().unwrap_or_default());
        for s in SlotStatus::ALL {
            let n = counts.get(&s).copied().unwrap_or(0);
            self.slots
                .get_or_create(&[("state", s.as_str())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.cycle_duration_seconds.set(duration_seconds);
        self.cycles
            .get_or_create(&[("result", if ok { "ok" } else { "failed" })])
            .inc();
        if ok {
            self.last_success_timestamp_seconds.set(now_unix);
        }
    }

    /// Cycles finished so far, `ok` or failed.
    pub fn cycles(&self, ok: bool) -> u64 {
        self.cycles
            .get_or_create(&[("result", if ok { "ok" } else { "failed" })])
            .get()
    }

    pub fn rotations(&self, o: RotationOutcome) -> u64 {
        self.rotations
            .get_or_create(&[("outcome", o.as_str())])
            .get()
    }

    pub fn revocations(&self, o: RevocationOutcome) -> u64 {
        self.revocations
            .get_or_create(&[("outcome", o.as_str())])
            .get()
    }

    /// Prometheus text format 0.0.4, including the API request counters.
    pub fn render(&self, api: Option<&ApiStats>) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        if let Some(api) = api {
            let requests = Family::<[(&'static str, String); 2], Counter>::default();
            for (ep, status, n) in api.snapshot() {
                requests
                    .get_or_create(&[
                        ("endpoint", ep.as_str().to_string()),
                        ("status", status.to_string()),
                    ])
                    .inc_by(n);
            }
            let mut r = Registry::default();
            register(
                &mut r,
                "keyrotd_api_requests",
                "Admin API requests by endpoint and HTTP status (0: no response)",
                requests,
            );
            let _ = prometheus_text::encode(&mut out, &r);
        }
        out
    }
}

#[cfg(test)]
mod tests;
