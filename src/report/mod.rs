//! The organization-wide inventory report (`keyrotd report`).
//!
//! [`Report::build`] takes the [`Plan`] — so every verdict, reason and count is the
//! plan's — and joins it with the [`Inventory`] for what the plan leaves out (the
//! owner's e-mail, `expires_at`) and with the rules for the `max_age` each key is held
//! to. [`render`] turns it into one JSON document, RFC 4180 CSV, or a single
//! self-contained HTML page (inline CSS and SVG, no scripts, no external resources).
//!
//! Names are user-controlled: every text that reaches HTML is escaped, and CSV cells a
//! spreadsheet would evaluate as a formula are neutralised.
//!
//! This module holds the model ([`Report`], built from the plan), JSON (its `Serialize`)
//! and [`emit`]; `csv.rs` and `html.rs` render it.

use std::io::{self, Write as _};
use std::path::Path;

use serde::Serialize;

use crate::config::{PolicyConfig, Rule};
use crate::openai::models::OwnerType;
use crate::plan::{Inventory, Plan, Timestamp};
use crate::policy::{Reason, Verdict};

mod csv;
mod html;

const DAY_SECS: u64 = 86_400;
/// Projects shown in the HTML chart (those with the oldest keys); the table lists all.
pub const CHART_PROJECTS: usize = 30;

/// Output format of `keyrotd report`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One self-contained page: summary, per-project age chart, table of every key.
    Html,
    /// One document: `{"generated_at", "summary", "keys", "usage"}`.
    Json,
    /// RFC 4180: a header row, then one row per key.
    Csv,
}

/// Keys per verdict; every verdict is present, zero or not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ByVerdict {
    pub ok: usize,
    pub rotate: usize,
    pub revoke: usize,
    pub report: usize,
    pub orphan: usize,
}

impl ByVerdict {
    fn add(&mut self, v: Verdict) {
        *self.get_mut(v) += 1;
    }
    fn get_mut(&mut self, v: Verdict) -> &mut usize {
        match v {
            Verdict::Ok => &mut self.ok,
            Verdict::Rotate => &mut self.rotate,
            Verdict::Revoke => &mut self.revoke,
            Verdict::Report => &mut self.report,
            Verdict::Orphan => &mut self.orphan,
        }
    }
    pub fn get(&self, v: Verdict) -> usize {
        match v {
            Verdict::Ok => self.ok,
            Verdict::Rotate => self.rotate,
            Verdict::Revoke => self.revoke,
            Verdict::Report => self.report,
            Verdict::Orphan => self.orphan,
        }
    }
}

/// Keys per owner type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ByOwnerType {
    pub service_account: usize,
    pub user: usize,
}

/// The counts at the top of the report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub keys: usize,
    /// Projects scanned (including those without keys).
    pub projects: usize,
    pub by_verdict: ByVerdict,
    /// Keys older than the `max_age` that applies to them (reason `stale`).
    pub stale: usize,
    pub by_owner_type: ByOwnerType,
    pub oldest_key_age_days: Option<u64>,
    pub oldest_key_id: Option<String>,
    /// `policy.max_age` in days (rules may override it per key: see `max_age_days`).
    pub max_age_days: u64,
}

/// One key of the report: the plan's key plus owner e-mail, expiry and max age.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReportKey {
    pub project_id: String,
    pub project_name: String,
    pub key_id: String,
    pub key_name: Option<String>,
    pub owner_type: &'static str,
    pub owner_id: Option<String>,
    /// The service account's name, or the user's name (else e-mail).
    pub owner_name: Option<String>,
    /// Users only.
    pub owner_email: Option<String>,
    pub created_at: String,
    pub age_days: u64,
    pub last_used_at: Option<String>,
    /// As the API gave it; `null` for keys that never expire.
    pub expires_at: Option<String>,
    pub verdict: Verdict,
    pub reasons: Vec<Reason>,
    pub rule: Option<String>,
    /// The `max_age` this key is held to (its rule's, else the policy's), in days.
    pub max_age_days: u64,
    /// Stores that reference this key (current, pending or previous).
    pub stores: Vec<String>,
    /// Who created it (an e-mail, or `keyrotd`), where the audit log says.
    pub creator: Option<String>,
    /// `expired`, `expiring` (within `policy.expiry_warning`), `protected` (a replaced
    /// key expiring at the end of its grace period); `null` otherwise.
    pub expiry: Option<crate::plan::ExpiryState>,
    /// Requests and tokens over the last 24 h and the window, cost over the window;
    /// `null` when usage is off or unknown (see the document's `usage.status`).
    pub usage: Option<crate::usage::KeyUsage>,
}

/// One project's cost and the keys that drive it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReportProjectUsage {
    pub project_id: String,
    pub project_name: String,
    pub requests_24h: u64,
    pub requests_window: u64,
    pub cost: f64,
    /// The project's keys with a cost, most expensive first (at most [`TOP_KEYS`]).
    pub top_keys: Vec<(String, f64)>,
}

/// Keys listed per project in the cost view.
pub const TOP_KEYS: usize = 5;

/// The report's usage section.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReportUsage {
    /// `known`, `unknown` or `off`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<crate::usage::Window>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// Every project, most expensive first.
    pub projects: Vec<ReportProjectUsage>,
}

/// The report document.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub generated_at: String,
    pub summary: Summary,
    pub keys: Vec<ReportKey>,
    pub usage: ReportUsage,
}

fn days(d: std::time::Duration) -> u64 {
    d.as_secs() / DAY_SECS
}

impl Report {
    /// The plan's keys, in the plan's order, with what the inventory adds.
    pub fn build(inv: &Inventory, plan: &Plan, rules: &[Rule], policy: &PolicyConfig) -> Report {
        let keys: Vec<ReportKey> = plan
            .keys
            .iter()
            .map(|k| {
                let owner_email = Some(k.api)
                    .filter(|a| a.owner.kind == OwnerType::User)
                    .and_then(|a| a.owner.user.as_ref())
                    .and_then(|u| u.email.clone());
                let max_age = k
                    .rule
                    .and_then(|name| rules.iter().find(|r| r.name == name))
                    .map_or(policy.max_age, |r| r.max_age);
                ReportKey {
                    project_id: k.project_id().to_string(),
                    project_name: k.project_name().to_string(),
                    key_id: k.key_id().to_string(),
                    key_name: k.key_name().map(str::to_string),
                    owner_type: k.owner_type(),
                    owner_id: k.owner_id().map(str::to_string),
                    owner_name: k.owner_name().map(str::to_string),
                    owner_email,
                    created_at: k.created_at().to_string(),
                    age_days: k.age_days,
                    last_used_at: k.last_used_at().map(|t| t.to_string()),
                    expires_at: k.api.expires_at.map(|t| Timestamp(t).to_string()),
                    verdict: k.verdict,
                    reasons: k.reasons.to_vec(),
                    rule: k.rule.map(str::to_string),
                    max_age_days: days(max_age),
                    stores: k.stores.iter().map(|s| s.to_string()).collect(),
                    creator: k.creator.map(str::to_string),
                    expiry: k.expiry,
                    usage: k.usage.cloned(),
                }
            })
            .collect();

        let mut summary = Summary {
            keys: keys.len(),
            projects: inv.projects.len(),
            max_age_days: days(policy.max_age),
            ..Summary::default()
        };
        for k in &keys {
            summary.by_verdict.add(k.verdict);
            if k.reasons.contains(&Reason::Stale) {
                summary.stale += 1;
            }
            if k.owner_type == OwnerType::User.as_str() {
                summary.by_owner_type.user += 1;
            } else {
                summary.by_owner_type.service_account += 1;
            }
            if summary.oldest_key_age_days.is_none_or(|d| k.age_days > d) {
                summary.oldest_key_age_days = Some(k.age_days);
                summary.oldest_key_id = Some(k.key_id.clone());
            }
        }
        let mut top: std::collections::HashMap<&str, Vec<(String, f64)>> = Default::default();
        for k in &keys {
            if let Some(u) = k.usage.as_ref().filter(|u| u.cost > 0.0) {
                top.entry(k.project_id.as_str())
                    .or_default()
                    .push((k.key_id.clone(), u.cost));
            }
        }
        let usage = ReportUsage {
            status: plan.usage.status,
            reason: plan.usage.reason.map(str::to_string),
            window: plan.usage.window,
            currency: plan.usage.currency.map(str::to_string),
            projects: plan
                .usage
                .projects
                .iter()
                .map(|p| {
                    let mut keys = top.remove(p.project_id).unwrap_or_default();
                    keys.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                    keys.truncate(TOP_KEYS);
                    ReportProjectUsage {
                        project_id: p.project_id.to_string(),
                        project_name: p.project_name.to_string(),
                        requests_24h: p.requests_24h,
                        requests_window: p.requests_window,
                        cost: p.cost,
                        top_keys: keys,
                    }
                })
                .collect(),
        };
        Report {
            generated_at: plan.generated_at.to_string(),
            summary,
            keys,
            usage,
        }
    }
}

/// Renders the report in `format`.
pub fn render(report: &Report, format: Format) -> String {
    match format {
        Format::Json => serde_json::to_string_pretty(report)
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")),
        Format::Csv => csv::render(report),
        Format::Html => html::render(report),
    }
}

/// Writes the rendered report to `output` (atomically: a temp file in the same
/// directory, then a rename, so a reader never sees half a report), else to stdout.
pub fn emit(text: &str, output: Option<&Path>) -> io::Result<()> {
    let Some(path) = output else {
        let mut out = io::stdout().lock();
        out.write_all(text.as_bytes())?;
        if !text.ends_with('\n') {
            out.write_all(b"\n")?;
        }
        return out.flush();
    };
    // 0600: a report lists every key and who made it.
    crate::files::replace(path, text.as_bytes(), 0o600)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::models::{
        ApiKeyOwner, OwnerServiceAccount, OwnerUser, Project, ProjectApiKey,
    };
    use crate::plan::ProjectInventory;
    use crate::policy;

    const NOW: i64 = 1_800_000_000;
    const DAY: i64 = 86_400;

    fn key(id: &str, age_days: i64, owner: ApiKeyOwner) -> ProjectApiKey {
        ProjectApiKey {
            id: id.to_string(),
            object: None,
            redacted_value: None,
            name: Some(format!("{id}-name")),
            created_at: NOW - age_days * DAY,
            last_used_at: Some(NOW - DAY),
            expires_at: None,
            owner_project_access: None,
            owner,
        }
    }

    fn user(email: &str) -> ApiKeyOwner {
        ApiKeyOwner {
            kind: OwnerType::User,
            user: Some(OwnerUser {
                id: "user_1".into(),
                email: Some(email.into()),
                name: Some("Pat".into()),
                created_at: None,
                role: None,
            }),
            service_account: None,
        }
    }

    fn sa() -> ApiKeyOwner {
        ApiKeyOwner {
            kind: OwnerType::ServiceAccount,
            user: None,
            service_account: Some(OwnerServiceAccount {
                id: "svc_acct_1".into(),
                name: Some("deploy".into()),
                created_at: None,
                role: None,
            }),
        }
    }

    fn sample() -> Report {
        let mut expiring = key("key_exp", 10, sa());
        expiring.expires_at = Some(NOW + 30 * DAY);
        let inv = Inventory {
            scanned_at: policy::ts(NOW),
            projects: vec![
                ProjectInventory {
                    project: Project {
                        id: "proj_a".into(),
                        object: None,
                        name: Some("<a> & \"b\"".into()),
                        created_at: 0,
                        archived_at: None,
                        status: None,
                    },
                    keys: vec![key("key_old", 200, user("pat@example.com")), expiring],
                    service_accounts: None,
                },
                ProjectInventory {
                    project: Project {
                        id: "proj_empty".into(),
                        object: None,
                        name: None,
                        created_at: 0,
                        archived_at: None,
                        status: None,
                    },
                    keys: vec![],
                    service_accounts: None,
                },
            ],
            creators: Some(
                [("key_old".to_string(), "pat@example.com".to_string())]
                    .into_iter()
                    .collect(),
            ),
            usage: Default::default(),
        };
        let policy = PolicyConfig::default();
        let plan = Plan::build(&inv, &[], &[], &policy, policy::ts(NOW));
        Report::build(&inv, &plan, &[], &policy)
    }

    #[test]
    fn build_adds_email_expiry_and_counts_like_the_plan() {
        let r = sample();
        assert_eq!(r.keys.len(), 2);
        let old = &r.keys[0];
        assert_eq!(old.key_id, "key_old");
        assert_eq!(old.owner_email.as_deref(), Some("pat@example.com"));
        assert_eq!(old.owner_name.as_deref(), Some("Pat"));
        assert_eq!(old.expires_at, None);
        assert_eq!(old.verdict, Verdict::Report);
        assert_eq!(old.max_age_days, 90);
        let exp = &r.keys[1];
        assert_eq!(exp.owner_email, None, "service accounts have no e-mail");
        assert_eq!(
            exp.expires_at.as_deref(),
            Some(
                policy::ts(NOW + 30 * DAY)
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                    .as_str()
            )
        );
        let s = &r.summary;
        assert_eq!((s.keys, s.projects, s.stale), (2, 2, 1));
        assert_eq!(s.by_verdict.report, 1);
        assert_eq!(s.by_verdict.ok + s.by_verdict.rotate, 1);
        assert_eq!(
            (s.by_owner_type.user, s.by_owner_type.service_account),
            (1, 1)
        );
        assert_eq!(s.oldest_key_age_days, Some(200));
        assert_eq!(s.oldest_key_id.as_deref(), Some("key_old"));
    }

    #[test]
    fn html_escapes_names_everywhere_and_json_has_four_parts() {
        let r = sample();
        let html = render(&r, Format::Html);
        assert!(!html.contains("<a>"));
        assert!(html.contains("&lt;a&gt; &amp; &quot;b&quot;"));
        let json: serde_json::Value = serde_json::from_str(&render(&r, Format::Json)).unwrap();
        let mut fields: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        fields.sort_unstable();
        assert_eq!(fields, ["generated_at", "keys", "summary", "usage"]);
        let csv = render(&r, Format::Csv);
        assert_eq!(csv.matches("\r\n").count(), 3, "header + two rows");
        assert!(csv.contains("\"<a> & \"\"b\"\"\""));
    }

    #[test]
    fn an_empty_org_renders() {
        let inv = Inventory {
            scanned_at: policy::ts(NOW),
            projects: vec![],
            creators: None,
            usage: Default::default(),
        };
        let policy = PolicyConfig::default();
        let plan = Plan::build(&inv, &[], &[], &policy, policy::ts(NOW));
        let r = Report::build(&inv, &plan, &[], &policy);
        assert_eq!(r.summary.oldest_key_age_days, None);
        assert!(render(&r, Format::Html).contains("No keys."));
        assert_eq!(render(&r, Format::Csv).lines().count(), 1);
    }
}
