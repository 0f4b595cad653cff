//! The staleness policy: a pure function of (key, rules, now).
//!
//! [`evaluate`] gives each key a [`Verdict`] and the [`Reason`]s behind it. It knows
//! nothing of stores; the slot-level overlay (a key that is a slot's previous key, or a
//! `keyrotd-*` orphan) is applied by [`crate::plan`], which sees the stores.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::{PolicyConfig, Rule, UserKeys};
use crate::openai::models::{OwnerAccess, OwnerType, Project, ProjectApiKey};

/// What keyrotd will do (or would do) about a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Ok,
    /// A managed service-account key to be replaced.
    Rotate,
    /// To be deleted (a user key under `user_keys = "revoke"`, a stale extra key or the
    /// previous key of a managed service account).
    Revoke,
    /// Needs a human: keyrotd will not touch it.
    Report,
    /// A `keyrotd-*` key that no store references.
    Orphan,
}

impl Verdict {
    pub const ALL: [Verdict; 5] = [
        Verdict::Ok,
        Verdict::Rotate,
        Verdict::Revoke,
        Verdict::Report,
        Verdict::Orphan,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Rotate => "rotate",
            Verdict::Revoke => "revoke",
            Verdict::Report => "report",
            Verdict::Orphan => "orphan",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a key got its verdict. Several may apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Older than the rule's (or the policy's) `max_age`.
    Stale,
    /// `last_used_at` is null.
    NeverUsed,
    /// Last used longer ago than `max_age`.
    Unused,
    /// The owner no longer has access to the project.
    OwnerInactive,
    /// `policy.key_expiry` asks for expiring keys, and this one never expires.
    NoExpiry,
    /// Expires within `policy.expiry_warning` (or has expired).
    ExpiringSoon,
    /// The previous key of a slot, awaiting retirement after the grace period.
    InGrace,
    /// The previous key of a slot whose grace period is over.
    GraceOver,
    /// A `keyrotd-*` key that no store references.
    Unreferenced,
    /// A previous key still used since its replacement was promoted
    /// (`revoke_when = "unused"`): kept until `max_grace`.
    InUse,
    /// The listing says neither who owns the key nor what kind of owner it is.
    OwnerUnknown,
    /// Replaced, and not used since its replacement was promoted
    /// (`revoke_when = "unused"`): revoked without waiting for the grace period.
    Drained,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Stale => "stale",
            Reason::NeverUsed => "never_used",
            Reason::Unused => "unused",
            Reason::OwnerInactive => "owner_inactive",
            Reason::NoExpiry => "no_expiry",
            Reason::ExpiringSoon => "expiring_soon",
            Reason::InGrace => "in_grace",
            Reason::GraceOver => "grace_over",
            Reason::Unreferenced => "unreferenced",
            Reason::InUse => "in_use",
            Reason::OwnerUnknown => "owner_unknown",
            Reason::Drained => "drained",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of [`Reason`]s, kept in declaration order (the order `keyrotd plan` prints
/// them). A bit set: a verdict's reasons cost no allocation.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Reasons(u16);

impl Reasons {
    pub const ALL: [Reason; 12] = [
        Reason::Stale,
        Reason::NeverUsed,
        Reason::Unused,
        Reason::OwnerInactive,
        Reason::NoExpiry,
        Reason::ExpiringSoon,
        Reason::InGrace,
        Reason::GraceOver,
        Reason::Unreferenced,
        Reason::InUse,
        Reason::OwnerUnknown,
        Reason::Drained,
    ];

    fn bit(r: Reason) -> u16 {
        1 << (r as u16)
    }
    pub fn push(&mut self, r: Reason) {
        self.0 |= Self::bit(r);
    }
    /// Takes a reference so call sites read like `Vec::contains`.
    pub fn contains(&self, r: &Reason) -> bool {
        self.0 & Self::bit(*r) != 0
    }
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }
    pub fn len(&self) -> usize {
        self.0.count_ones() as usize
    }
    pub fn iter(&self) -> impl Iterator<Item = Reason> + '_ {
        let bits = self.0;
        Self::ALL
            .into_iter()
            .filter(move |r| bits & Self::bit(*r) != 0)
    }
    pub fn to_vec(&self) -> Vec<Reason> {
        self.iter().collect()
    }
}

impl FromIterator<Reason> for Reasons {
    fn from_iter<I: IntoIterator<Item = Reason>>(iter: I) -> Self {
        let mut out = Reasons::default();
        for r in iter {
            out.push(r);
        }
        out
    }
}

impl PartialEq<Vec<Reason>> for Reasons {
    fn eq(&self, other: &Vec<Reason>) -> bool {
        self.iter().eq(other.iter().copied())
    }
}

impl fmt::Debug for Reasons {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Serialize for Reasons {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

/// The outcome of [`evaluate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evaluation {
    pub verdict: Verdict,
    pub reasons: Reasons,
    /// Index into the rules of the first rule that matches the key's service account.
    pub rule: Option<usize>,
    /// The max age that applied.
    pub max_age: Duration,
}

/// Converts an API unix timestamp.
pub fn ts(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// How long ago unix second `t` was at `now`, exactly (sub-second part of `now`
/// included); `None` when `t` is later than `now`. Integer arithmetic: this runs for
/// every key of every plan.
pub fn since(t: i64, now: DateTime<Utc>) -> Option<Duration> {
    let secs = i128::from(now.timestamp()) - i128::from(t);
    let nanos = now.timestamp_subsec_nanos();
    (secs > 0 || (secs == 0 && nanos > 0))
        .then(|| Duration::new(u64::try_from(secs).unwrap_or(u64::MAX), nanos))
}

/// How old a key is at `now` (zero for keys from the future).
pub fn age(key: &ProjectApiKey, now: DateTime<Utc>) -> Duration {
    since(key.created_at, now).unwrap_or(Duration::ZERO)
}

/// The first rule matching a service-account key in this project; user keys match none.
pub fn matching_rule(key: &ProjectApiKey, project: &Project, rules: &[Rule]) -> Option<usize> {
    if key.owner.kind != OwnerType::ServiceAccount {
        return None;
    }
    let sa_name = key.owner.name()?;
    rules
        .iter()
        .position(|r| r.matches(&project.id, project.display_name(), sa_name))
}

/// Verdict and reasons for one key. Pure: same inputs, same answer.
///
/// - A key is `stale` when strictly older than `max_age` (exactly `max_age` is not).
/// - A service-account key that a rule matches is rotated when stale or expiring soon.
/// - A stale user key is revoked under `user_keys = "revoke"`, else reported; user keys
///   with other risk signals (owner inactive, unused) are reported.
/// - Any other key with a risk signal is reported; keyrotd never touches it.
pub fn evaluate(
    key: &ProjectApiKey,
    project: &Project,
    rules: &[Rule],
    policy: &PolicyConfig,
    now: DateTime<Utc>,
) -> Evaluation {
    evaluate_with_rule(key, matching_rule(key, project, rules), rules, policy, now)
}

/// [`evaluate`] given the key's [`matching_rule`], for callers that match rules once per
/// service account rather than once per key.
pub fn evaluate_with_rule(
    key: &ProjectApiKey,
    rule: Option<usize>,
    rules: &[Rule],
    policy: &PolicyConfig,
    now: DateTime<Utc>,
) -> Evaluation {
    let max_age = rule.map_or(policy.max_age, |i| rules[i].max_age);

    let mut reasons = Reasons::default();
    if age(key, now) > max_age {
        reasons.push(Reason::Stale);
    }
    match key.last_used_at {
        None => reasons.push(Reason::NeverUsed),
        Some(t) if since(t, now).is_some_and(|d| d > max_age) => reasons.push(Reason::Unused),
        Some(_) => {}
    }
    if key.owner_project_access == Some(OwnerAccess::Inactive) {
        reasons.push(Reason::OwnerInactive);
    }
    if key.owner.kind == OwnerType::Unknown {
        reasons.push(Reason::OwnerUnknown);
    }
    match key.expires_at {
        None if policy.key_expiry.0.is_some() => reasons.push(Reason::NoExpiry),
        Some(exp) => {
            let warn =
                chrono::Duration::from_std(policy.expiry_warning).unwrap_or(chrono::Duration::MAX);
            if ts(exp) - now <= warn {
                reasons.push(Reason::ExpiringSoon);
            }
        }
        None => {}
    }

    let has = |r: Reason| reasons.contains(&r);
    let verdict = match key.owner.kind {
        OwnerType::ServiceAccount if rule.is_some() => {
            if has(Reason::Stale) || has(Reason::ExpiringSoon) {
                Verdict::Rotate
            } else if has(Reason::OwnerInactive) {
                Verdict::Report
            } else {
                Verdict::Ok
            }
        }
        OwnerType::ServiceAccount => {
            if has(Reason::Stale) || has(Reason::ExpiringSoon) || has(Reason::OwnerInactive) {
                Verdict::Report
            } else {
                Verdict::Ok
            }
        }
        OwnerType::User => {
            if has(Reason::Stale) {
                match policy.user_keys {
                    UserKeys::Revoke => Verdict::Revoke,
                    UserKeys::Report => Verdict::Report,
                }
            } else if has(Reason::OwnerInactive) || has(Reason::Unused) || has(Reason::ExpiringSoon)
            {
                Verdict::Report
            } else {
                Verdict::Ok
            }
        }
        // Not keyrotd's to manage or revoke: a human should look.
        OwnerType::Unknown => Verdict::Report,
    };
    Evaluation {
        verdict,
        reasons,
        rule,
        max_age,
    }
}

/// Whether a slot's previous key may be revoked now, and why (not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retirement {
    pub due: bool,
    /// `GraceOver` (grace period, or `max_grace`, over) or `Drained` (unused since
    /// promotion) when due; `InGrace` or `InUse` while it waits.
    pub reason: Reason,
    /// Used since promotion and past `grace_period`: someone should switch consumers
    /// over (`key.still_in_use`).
    pub still_in_use: bool,
    /// When it is (or became) due if nothing changes: the end of the grace period; for
    /// `revoke_when = "unused"`, `min_grace` (and the report delay) for a key unused
    /// since promotion, `max_grace` for one in use.
    pub due_at: DateTime<Utc>,
}

impl Retirement {
    /// Revocation at a fixed time (an operator's `--revoke-old DURATION`), whatever
    /// the grace period and the key's use.
    pub fn deadline(until: DateTime<Utc>, now: DateTime<Utc>) -> Retirement {
        let due = now >= until;
        Retirement {
            due,
            reason: if due {
                Reason::GraceOver
            } else {
                Reason::InGrace
            },
            still_in_use: false,
            due_at: until,
        }
    }
}

/// Decides a replaced key's retirement. Pure.
///
/// - `revoke_when = "grace"`: due once `grace_period` has passed since promotion.
/// - `revoke_when = "unused"`: due at the first check after `min_grace` (and after the
///   API's `usage_report_delay`, so late-reported uses have shown up) at which
///   `last_used_at` shows no use since promotion; a key still in use is kept until
///   `max_grace`, and flagged `still_in_use` once `grace_period` is over.
pub fn retirement(
    policy: &PolicyConfig,
    grace_period: Duration,
    promoted_at: DateTime<Utc>,
    last_used_at: Option<i64>,
    now: DateTime<Utc>,
) -> Retirement {
    let after =
        |d: Duration| promoted_at + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
    let elapsed = (now - promoted_at).to_std().unwrap_or(Duration::ZERO);
    let r = |due, reason, due_at| Retirement {
        due,
        reason,
        still_in_use: false,
        due_at,
    };
    match policy.revoke_when {
        crate::config::RevokeWhen::Grace => {
            let at = after(grace_period);
            if elapsed >= grace_period {
                r(true, Reason::GraceOver, at)
            } else {
                r(false, Reason::InGrace, at)
            }
        }
        crate::config::RevokeWhen::Unused => {
            let used_since = last_used_at.is_some_and(|t| ts(t) > promoted_at);
            let quiet = policy
                .min_grace
                .max(policy.usage_report_delay)
                .min(policy.max_grace);
            if elapsed >= policy.max_grace {
                r(true, Reason::GraceOver, after(policy.max_grace))
            } else if used_since {
                Retirement {
                    still_in_use: elapsed >= grace_period,
                    ..r(false, Reason::InUse, after(policy.max_grace))
                }
            } else if elapsed >= quiet {
                r(true, Reason::Drained, after(quiet))
            } else {
                r(false, Reason::InGrace, after(quiet))
            }
        }
    }
}

/// Prefix of every key keyrotd mints.
pub const KEY_NAME_PREFIX: &str = "keyrotd-";

/// Whether keyrotd minted this key (by its name).
pub fn is_keyrotd_key(key: &ProjectApiKey) -> bool {
    key.name
        .as_deref()
        .is_some_and(|n| n.starts_with(KEY_NAME_PREFIX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, KeyExpiry};
    use crate::openai::models::{ApiKeyOwner, OwnerServiceAccount, OwnerUser};

    const DAY: i64 = 86400;

    #[test]
    fn since_agrees_with_chrono() {
        let now = ts(1_800_000_000) + chrono::Duration::milliseconds(250);
        for t in [0, 1_799_999_000, 1_800_000_000, 1_800_000_001] {
            let chrono = (now - ts(t)).to_std().ok().filter(|d| !d.is_zero());
            assert_eq!(since(t, now), chrono, "t = {t}");
        }
        assert_eq!(since(1_800_000_000, ts(1_800_000_000)), None);
        // Beyond chrono's range: still very old, never "from the future".
        assert!(since(i64::MIN, now).is_some_and(|d| d.as_secs() > 1 << 62));
        assert_eq!(since(i64::MAX, now), None);
    }

    #[test]
    fn reasons_keep_declaration_order_and_serialize_as_a_list() {
        for (i, r) in Reasons::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r} is out of place in Reasons::ALL");
        }
        let rs: Reasons = [Reason::InUse, Reason::Stale, Reason::NeverUsed]
            .into_iter()
            .collect();
        assert_eq!(rs, vec![Reason::Stale, Reason::NeverUsed, Reason::InUse]);
        assert_eq!(rs.len(), 3);
        assert!(rs.contains(&Reason::InUse) && !rs.contains(&Reason::Unused));
        assert_eq!(
            serde_json::to_string(&rs).unwrap(),
            r#"["stale","never_used","in_use"]"#
        );
        assert_eq!(format!("{rs:?}"), "[Stale, NeverUsed, InUse]");
        assert!(Reasons::default().is_empty());
    }

    fn now() -> DateTime<Utc> {
        ts(1_800_000_000)
    }

    /// Fixture builder in the controller-rs style: `Key::sa("backend").aged(days)`.
    struct Key(ProjectApiKey);

    impl Key {
        fn sa(name: &str) -> Key {
            Key(ProjectApiKey {
                id: "key_1".into(),
                object: None,
                redacted_value: None,
                name: Some("k".into()),
                created_at: now().timestamp() - DAY,
                last_used_at: Some(now().timestamp() - 60),
                expires_at: None,
                owner_project_access: Some(OwnerAccess::Active),
                owner: ApiKeyOwner {
                    kind: OwnerType::ServiceAccount,
                    user: None,
                    service_account: Some(OwnerServiceAccount {
                        id: "svc_acct_1".into(),
                        name: Some(name.into()),
                        created_at: None,
                        role: None,
                    }),
                },
            })
        }
        fn user() -> Key {
            let mut k = Key::sa("x");
            k.0.owner = ApiKeyOwner {
                kind: OwnerType::User,
                user: Some(OwnerUser {
                    id: "user_1".into(),
                    email: Some("a@example.com".into()),
                    name: Some("A".into()),
                    created_at: None,
                    role: None,
                }),
                service_account: None,
            };
            k
        }
        fn created_secs_ago(mut self, secs: i64) -> Key {
            self.0.created_at = now().timestamp() - secs;
            self
        }
        fn never_used(mut self) -> Key {
            self.0.last_used_at = None;
            self
        }
        fn last_used_secs_ago(mut self, secs: i64) -> Key {
            self.0.last_used_at = Some(now().timestamp() - secs);
            self
        }
        fn inactive(mut self) -> Key {
            self.0.owner_project_access = Some(OwnerAccess::Inactive);
            self
        }
        fn expires_in(mut self, secs: i64) -> Key {
            self.0.expires_at = Some(now().timestamp() + secs);
            self
        }
    }

    fn project(name: &str) -> Project {
        Project {
            id: "proj_1".into(),
            object: None,
            name: Some(name.into()),
            created_at: 0,
            archived_at: None,
            status: None,
        }
    }

    fn setup(extra: &str) -> (Vec<Rule>, PolicyConfig) {
        std::env::set_var("POLICY_TEST_KEY", "x");
        let cfg = Config::from_toml(&format!(
            r#"
            [openai]
            admin_key_env = "POLICY_TEST_KEY"
            [policy]
            max_age = "90d"
            {extra}
            [stores.local]
            type = "file"
            dir = "/tmp/x"
            [[rotate]]
            name = "prod"
            project = "prod-*"
            service_account = "backend"
            stores = ["local"]
            path = "openai/{{project_name}}"
            max_age = "30d"
            "#
        ))
        .expect("valid config");
        (cfg.rules(), cfg.policy)
    }

    fn eval(k: Key, project_name: &str, extra: &str) -> Evaluation {
        let (rules, policy) = setup(extra);
        evaluate(&k.0, &project(project_name), &rules, &policy, now())
    }

    #[test]
    fn age_exactly_max_age_is_not_stale_one_second_more_is() {
        let e = eval(Key::sa("backend").created_secs_ago(30 * DAY), "prod-a", "");
        assert_eq!(e.verdict, Verdict::Ok);
        assert!(!e.reasons.contains(&Reason::Stale));
        let e = eval(
            Key::sa("backend").created_secs_ago(30 * DAY + 1),
            "prod-a",
            "",
        );
        assert_eq!(e.verdict, Verdict::Rotate);
        assert_eq!(e.reasons, vec![Reason::Stale]);
        assert_eq!(e.rule, Some(0));
    }

    #[test]
    fn rule_max_age_overrides_policy_only_where_it_matches() {
        // 60 days: stale under the rule (30d), fresh under the policy (90d).
        let k = || Key::sa("backend").created_secs_ago(60 * DAY);
        assert_eq!(eval(k(), "prod-a", "").verdict, Verdict::Rotate);
        let e = eval(k(), "dev-a", "");
        assert_eq!(e.verdict, Verdict::Ok);
        assert_eq!(e.rule, None);
        assert_eq!(e.max_age, Duration::from_secs(90 * 86400));
    }

    #[test]
    fn unmatched_stale_service_account_key_is_reported_not_rotated() {
        let e = eval(Key::sa("worker").created_secs_ago(100 * DAY), "prod-a", "");
        assert_eq!(e.verdict, Verdict::Report);
        assert_eq!(e.reasons, vec![Reason::Stale]);
    }

    #[test]
    fn null_last_used_is_never_used_and_does_not_rotate_alone() {
        let e = eval(Key::sa("backend").never_used(), "prod-a", "");
        assert_eq!(e.verdict, Verdict::Ok);
        assert_eq!(e.reasons, vec![Reason::NeverUsed]);
    }

    #[test]
    fn unused_means_last_use_older_than_max_age() {
        let e = eval(
            Key::user()
                .created_secs_ago(10 * DAY)
                .last_used_secs_ago(91 * DAY),
            "prod-a",
            "",
        );
        assert_eq!(e.reasons, vec![Reason::Unused]);
        assert_eq!(e.verdict, Verdict::Report);
        let e = eval(Key::user().last_used_secs_ago(90 * DAY), "prod-a", "");
        assert_eq!(e.verdict, Verdict::Ok);
    }

    #[test]
    fn user_keys_are_reported_or_revoked_never_rotated() {
        let stale = || Key::user().created_secs_ago(91 * DAY);
        let e = eval(stale(), "prod-a", "");
        assert_eq!((e.verdict, e.rule), (Verdict::Report, None));
        let e = eval(stale(), "prod-a", "user_keys = \"revoke\"");
        assert_eq!(e.verdict, Verdict::Revoke);
        // Fresh but the owner left the project: a human should look.
        let e = eval(Key::user().inactive(), "prod-a", "user_keys = \"revoke\"");
        assert_eq!(
            (e.verdict, e.reasons.to_vec()),
            (Verdict::Report, vec![Reason::OwnerInactive])
        );
    }

    #[test]
    fn expiry_in_the_past_or_soon_rotates_a_managed_key() {
        let e = eval(Key::sa("backend").expires_in(-DAY), "prod-a", "");
        assert_eq!(e.verdict, Verdict::Rotate);
        assert_eq!(e.reasons, vec![Reason::ExpiringSoon]);
        let e = eval(Key::sa("backend").expires_in(7 * DAY), "prod-a", "");
        assert_eq!(e.verdict, Verdict::Rotate);
        let e = eval(Key::sa("backend").expires_in(7 * DAY + 1), "prod-a", "");
        assert_eq!(e.verdict, Verdict::Ok);
    }

    #[test]
    fn no_expiry_only_flagged_when_policy_wants_expiring_keys() {
        assert!(eval(Key::sa("backend"), "prod-a", "").reasons.is_empty());
        let e = eval(Key::sa("backend"), "prod-a", "key_expiry = \"30d\"");
        assert_eq!(e.reasons, vec![Reason::NoExpiry]);
        assert_eq!(e.verdict, Verdict::Ok);
        let (_, p) = setup("key_expiry = \"none\"");
        assert_eq!(p.key_expiry, KeyExpiry(None));
    }

    #[test]
    fn first_matching_rule_wins_and_matches_project_id_or_name() {
        let (mut rules, policy) = setup("");
        let mut second = rules[0].clone();
        second.name = "catch-all".into();
        second.project = crate::config::Pattern::new("*").unwrap();
        second.service_account = crate::config::Pattern::new("*").unwrap();
        rules.push(second);
        let k = Key::sa("backend").0;
        assert_eq!(matching_rule(&k, &project("prod-x"), &rules), Some(0));
        assert_eq!(matching_rule(&k, &project("dev-x"), &rules), Some(1));
        let mut p = project("unnamed");
        p.id = "prod-by-id".into();
        assert_eq!(matching_rule(&k, &p, &rules), Some(0));
        let _ = policy;
    }

    #[test]
    fn retirement_by_grace_and_by_use() {
        let (_, grace) = setup("");
        let (_, unused) =
            setup("revoke_when = \"unused\"\nmin_grace = \"1h\"\nmax_grace = \"7d\"\nusage_report_delay = \"15m\"");
        let promoted = now() - chrono::Duration::hours(2);
        let day = Duration::from_secs(86400);
        // Default: the grace period alone decides.
        let r = retirement(&grace, day, promoted, None, now());
        assert_eq!((r.due, r.reason), (false, Reason::InGrace));
        let r = retirement(&grace, Duration::from_secs(7200), promoted, None, now());
        assert_eq!((r.due, r.reason), (true, Reason::GraceOver));
        // Unused: nobody used it since promotion, min_grace passed: due at once.
        let before = Some(promoted.timestamp() - 60);
        let r = retirement(&unused, day, promoted, before, now());
        assert_eq!((r.due, r.reason), (true, Reason::Drained));
        assert_eq!(r.due_at, promoted + chrono::Duration::hours(1));
        // ... but never before min_grace.
        let r = retirement(
            &unused,
            day,
            now() - chrono::Duration::minutes(30),
            before,
            now(),
        );
        assert_eq!((r.due, r.reason), (false, Reason::InGrace));
        // Still used: kept, flagged once the grace period is over, revoked at max_grace.
        let used = Some(now().timestamp() - 60);
        let r = retirement(&unused, day, promoted, used, now());
        assert_eq!(
            (r.due, r.reason, r.still_in_use),
            (false, Reason::InUse, false)
        );
        let r = retirement(&unused, Duration::from_secs(3600), promoted, used, now());
        assert!(!r.due && r.still_in_use);
        let r = retirement(&unused, day, now() - chrono::Duration::days(7), used, now());
        assert!(r.due);
    }

    #[test]
    fn future_created_at_has_zero_age() {
        let k = Key::sa("backend").created_secs_ago(-100).0;
        assert_eq!(age(&k, now()), Duration::ZERO);
    }
}
