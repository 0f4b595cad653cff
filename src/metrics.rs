//! Prometheus metrics (DESIGN.md §6), rendered in the text exposition format.
//!
//! A handful of counters and gauges do not justify a metrics framework; this registry
//! is a few atomics and maps behind one lock, shared by the engine and the listener.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use crate::openai::ApiStats;
use crate::policy::Verdict;

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
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationOutcome::Revoked => "revoked",
            RevocationOutcome::AlreadyGone => "already_gone",
            RevocationOutcome::Failed => "failed",
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

#[derive(Debug, Default)]
struct Inner {
    keys: BTreeMap<&'static str, u64>,
    rotations: BTreeMap<&'static str, u64>,
    revocations: BTreeMap<&'static str, u64>,
    cycle_duration_seconds: Option<f64>,
    last_success_timestamp_seconds: Option<f64>,
    oldest_key_age_seconds: Option<f64>,
    cycles: BTreeMap<&'static str, u64>,
    slot_failures: u64,
    slot_collisions: u64,
    slot_busy: u64,
    still_in_use: u64,
    /// `keyrotd_slots`, as of the last finished cycle.
    slots: BTreeMap<SlotStatus, u64>,
    /// The running cycle's slot counts, published by `cycle_finished`.
    slots_pending: Option<BTreeMap<SlotStatus, u64>>,
}

/// The metrics registry.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    pub fn rotation(&self, o: RotationOutcome) {
        self.with(|m| *m.rotations.entry(o.as_str()).or_default() += 1);
    }

    pub fn revocation(&self, o: RevocationOutcome) {
        self.with(|m| *m.revocations.entry(o.as_str()).or_default() += 1);
    }

    /// A previous key still in use after its grace period (`key.still_in_use`).
    pub fn still_in_use(&self) {
        self.with(|m| m.still_in_use += 1);
    }

    pub fn slot_failed(&self) {
        self.with(|m| m.slot_failures += 1);
    }

    /// A slot refused because its path collides with another slot's (`slot.collision`).
    pub fn slot_collision(&self) {
        self.with(|m| m.slot_collisions += 1);
    }

    pub fn slot_collisions(&self) -> u64 {
        self.with(|m| m.slot_collisions)
    }

    /// A slot skipped because another live process holds its lease (`rotation.busy`).
    pub fn slot_busy(&self) {
        self.with(|m| m.slot_busy += 1);
    }

    pub fn slots_busy(&self) -> u64 {
        self.with(|m| m.slot_busy)
    }

    /// Replaces the per-verdict key counts and the oldest key age after a scan.
    pub fn set_keys(&self, counts: &BTreeMap<Verdict, u64>, oldest_age_seconds: Option<f64>) {
        self.with(|m| {
            m.keys.clear();
            for v in Verdict::ALL {
                m.keys
                    .insert(v.as_str(), counts.get(&v).copied().unwrap_or(0));
            }
            m.oldest_key_age_seconds = oldest_age_seconds;
        });
    }

    /// The running cycle's slots by how their runs ended; `keyrotd_slots` shows them
    /// once [`Metrics::cycle_finished`] records the cycle.
    pub fn slots_finished(&self, statuses: impl IntoIterator<Item = SlotStatus>) {
        let mut counts = BTreeMap::new();
        for s in statuses {
            *counts.entry(s).or_default() += 1;
        }
        self.with(|m| m.slots_pending = Some(counts));
    }

    /// Slots of the last finished cycle whose run ended in `status`.
    pub fn slots(&self, status: SlotStatus) -> u64 {
        self.with(|m| m.slots.get(&status).copied().unwrap_or(0))
    }

    /// Records a finished cycle; `ok` cycles move the last-success timestamp. The slot
    /// counts reported by [`Metrics::slots_finished`] during the cycle become
    /// `keyrotd_slots`; a cycle that ran no slots (its scan failed) sets them all to 0.
    pub fn cycle_finished(&self, duration_seconds: f64, ok: bool, now_unix: f64) {
        self.with(|m| {
            m.slots = m.slots_pending.take().unwrap_or_default();
            m.cycle_duration_seconds = Some(duration_seconds);
            *m.cycles
                .entry(if ok { "ok" } else { "failed" })
                .or_default() += 1;
            if ok {
                m.last_success_timestamp_seconds = Some(now_unix);
            }
        });
    }

    /// Cycles finished so far, `ok` or failed.
    pub fn cycles(&self, ok: bool) -> u64 {
        self.with(|m| {
            let result = if ok { "ok" } else { "failed" };
            m.cycles.get(result).copied().unwrap_or(0)
        })
    }

    pub fn rotations(&self, o: RotationOutcome) -> u64 {
        self.with(|m| m.rotations.get(o.as_str()).copied().unwrap_or(0))
    }

    pub fn revocations(&self, o: RevocationOutcome) -> u64 {
        self.with(|m| m.revocations.get(o.as_str()).copied().unwrap_or(0))
    }

    /// Prometheus text format, including the API request counters.
    pub fn render(&self, api: Option<&ApiStats>) -> String {
        let mut out = String::new();
        self.with(|m| {
            family(
                &mut out,
                "keyrotd_keys",
                "gauge",
                "Project API keys by verdict at the last scan.",
            );
            for (v, n) in &m.keys {
                let _ = writeln!(out, "keyrotd_keys{{verdict=\"{v}\"}} {n}");
            }
            family(
                &mut out,
                "keyrotd_rotations_total",
                "counter",
                "Slot rotations by outcome.",
            );
            for o in [
                RotationOutcome::Completed,
                RotationOutcome::Failed,
                RotationOutcome::VerifyFailed,
                RotationOutcome::Conflict,
            ] {
                let n = m.rotations.get(o.as_str()).copied().unwrap_or(0);
                let _ = writeln!(
                    out,
                    "keyrotd_rotations_total{{outcome=\"{}\"}} {n}",
                    o.as_str()
                );
            }
            family(
                &mut out,
                "keyrotd_revocations_total",
                "counter",
                "Key revocations by outcome.",
            );
            for o in [
                RevocationOutcome::Revoked,
                RevocationOutcome::AlreadyGone,
                RevocationOutcome::Failed,
            ] {
                let n = m.revocations.get(o.as_str()).copied().unwrap_or(0);
                let _ = writeln!(
                    out,
                    "keyrotd_revocations_total{{outcome=\"{}\"}} {n}",
                    o.as_str()
                );
            }
            family(
                &mut out,
                "keyrotd_cycles_total",
                "counter",
                "Rotation cycles by result.",
            );
            for r in ["ok", "failed"] {
                let n = m.cycles.get(r).copied().unwrap_or(0);
                let _ = writeln!(out, "keyrotd_cycles_total{{result=\"{r}\"}} {n}");
            }
            family(
                &mut out,
                "keyrotd_slot_failures_total",
                "counter",
                "Slots that failed a cycle.",
            );
            let _ = writeln!(out, "keyrotd_slot_failures_total {}", m.slot_failures);
            family(
                &mut out,
                "keyrotd_slots",
                "gauge",
                "Slots of the last finished cycle by how their run ended (failed: an error, so no key was verified for the slot).",
            );
            for s in SlotStatus::ALL {
                let n = m.slots.get(&s).copied().unwrap_or(0);
                let _ = writeln!(out, "keyrotd_slots{{state=\"{}\"}} {n}", s.as_str());
            }
            family(
                &mut out,
                "keyrotd_slot_collisions_total",
                "counter",
                "Slot runs refused: another slot renders the same store path, or the document there names another project.",
            );
            let _ = writeln!(
                out,
                "keyrotd_slot_collisions_total {}",
                m.slot_collisions
            );
            family(
                &mut out,
                "keyrotd_slot_busy_total",
                "counter",
                "Slot runs skipped because another live process holds the slot's lease.",
            );
            let _ = writeln!(out, "keyrotd_slot_busy_total {}", m.slot_busy);
            family(
                &mut out,
                "keyrotd_key_still_in_use_total",
                "counter",
                "Checks that found a previous key still in use after its grace period.",
            );
            let _ = writeln!(out, "keyrotd_key_still_in_use_total {}", m.still_in_use);
            for (name, help, v) in [
                (
                    "keyrotd_cycle_duration_seconds",
                    "Duration of the last cycle.",
                    m.cycle_duration_seconds,
                ),
                (
                    "keyrotd_last_success_timestamp_seconds",
                    "Unix time of the last cycle in which nothing failed.",
                    m.last_success_timestamp_seconds,
                ),
                (
                    "keyrotd_oldest_key_age_seconds",
                    "Age of the oldest project API key at the last scan.",
                    m.oldest_key_age_seconds,
                ),
            ] {
                // 0 until the first cycle sets them (the alert rules expect the series).
                family(&mut out, name, "gauge", help);
                let _ = writeln!(out, "{name} {}", v.unwrap_or(0.0));
            }
        });
        if let Some(api) = api {
            family(
                &mut out,
                "keyrotd_api_requests_total",
                "counter",
                "Admin API requests by endpoint and HTTP status (0: no response).",
            );
            for (ep, status, n) in api.snapshot() {
                let _ = writeln!(
                    out,
                    "keyrotd_api_requests_total{{endpoint=\"{}\",status=\"{status}\"}} {n}",
                    ep.as_str()
                );
            }
        }
        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}
