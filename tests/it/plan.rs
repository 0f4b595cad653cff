//! `keyrotd plan` through the binary, compared against the simulator's ground truth.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use keyrotd::openai::models::OwnerType;
use keyrotd::sim::{Scenario, Sim, TruthKey};

const ADMIN_KEY: &str = "sk-admin-plan-test-0000";
const DAY: i64 = 86_400;

struct Setup {
    sim: Sim,
    _server: keyrotd::sim::SimServer,
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
    truth: keyrotd::sim::GroundTruth,
}

async fn setup(scenario: Scenario, extra: &str) -> Setup {
    let sim = Sim::new(ADMIN_KEY);
    let truth = scenario.populate(&sim);
    let server = sim.start().await.expect("sim");
    let sim = sim.clone();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keyrotd.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[openai]
base_url = "{}"
admin_key_env = "PLAN_TEST_ADMIN_KEY"
{extra}
[policy]
max_age = "90d"
[stores.local]
type = "file"
dir = "{}"
[[rotate]]
name = "prod"
project = "prod-*"
service_account = "*"
stores = ["local"]
path = "openai/{{project_name}}/{{service_account_name}}"
"#,
            server.base_url,
            dir.path().join("secrets").display()
        ),
    )
    .unwrap();
    Setup {
        sim,
        _server: server,
        _dir: dir,
        config,
        truth,
    }
}

fn plan_json(s: &Setup, args: &[&str]) -> (i32, serde_json::Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_keyrotd"))
        .args([
            "--config",
            s.config.to_str().unwrap(),
            "plan",
            "--format",
            "json",
        ])
        .args(args)
        .env("PLAN_TEST_ADMIN_KEY", ADMIN_KEY)
        .output()
        .expect("run keyrotd");
    let code = out.status.code().unwrap_or(-1);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let json = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (code, json, stderr)
}

/// What the policy must say about a ground-truth key (DESIGN.md §1, `policy::evaluate`).
fn expected(k: &TruthKey, now: i64) -> (&'static str, BTreeSet<String>) {
    let mut reasons = BTreeSet::new();
    if k.stale {
        reasons.insert("stale".to_string());
    }
    match k.last_used_at {
        None => {
            reasons.insert("never_used".to_string());
        }
        Some(t) if now - t > 90 * DAY => {
            reasons.insert("unused".to_string());
        }
        Some(_) => {}
    }
    if k.owner_inactive {
        reasons.insert("owner_inactive".to_string());
    }
    let managed = k.project_name.starts_with("prod-") && k.owner_type == OwnerType::ServiceAccount;
    let verdict = match k.owner_type {
        OwnerType::ServiceAccount if managed => {
            if k.stale {
                "rotate"
            } else {
                "ok"
            }
        }
        OwnerType::ServiceAccount => {
            if k.stale {
                "report"
            } else {
                "ok"
            }
        }
        OwnerType::User => {
            if k.stale || k.owner_inactive || reasons.contains("unused") {
                "report"
            } else {
                "ok"
            }
        }
        OwnerType::Unknown => "report",
    };
    (verdict, reasons)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_json_matches_the_ground_truth() {
    let s = setup(
        Scenario::new(21)
            .projects(12)
            .archived_projects(2)
            .service_accounts_per_project(2)
            .keys_per_service_account(2)
            .user_keys_per_project(2)
            .stale_fraction(0.4)
            .inactive_owner_fraction(0.3)
            .never_used_fraction(0.2),
        "",
    )
    .await;
    let (code, json, stderr) = plan_json(&s, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(json["generated_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    let keys = json["keys"].as_array().expect("keys array");
    let got: BTreeMap<&str, &serde_json::Value> = keys
        .iter()
        .map(|k| (k["key_id"].as_str().unwrap(), k))
        .collect();
    assert_eq!(got.len(), keys.len(), "no key listed twice");

    let want: Vec<&TruthKey> = s
        .truth
        .keys
        .iter()
        .filter(|k| !k.project_archived)
        .collect();
    assert!(
        want.iter().any(|k| k.owner_inactive),
        "scenario has inactive owners"
    );
    assert!(
        s.truth.keys.iter().any(|k| k.project_archived),
        "scenario has archived projects"
    );
    let want_ids: BTreeSet<&str> = want.iter().map(|k| k.key_id.as_str()).collect();
    let got_ids: BTreeSet<&str> = got.keys().copied().collect();
    assert_eq!(
        got_ids, want_ids,
        "exactly the scenario's keys (archived projects excluded)"
    );

    for k in want {
        let g = got[k.key_id.as_str()];
        let (verdict, reasons) = expected(k, s.truth.now);
        assert_eq!(
            g["verdict"], verdict,
            "verdict of {} ({:?})",
            k.key_id, k.name
        );
        let got_reasons: BTreeSet<String> = g["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect();
        assert_eq!(got_reasons, reasons, "reasons of {}", k.key_id);
        assert_eq!(g["project_id"], k.project_id.as_str());
        assert_eq!(g["project_name"], k.project_name.as_str());
        assert_eq!(g["owner_id"], k.owner_id.as_str());
        assert_eq!(g["owner_type"], k.owner_type.as_str());
        let rule = if verdict == "rotate"
            || (k.project_name.starts_with("prod-") && k.owner_type == OwnerType::ServiceAccount)
        {
            serde_json::json!("prod")
        } else {
            serde_json::Value::Null
        };
        assert_eq!(g["rule"], rule, "rule of {}", k.key_id);
        let age = (s.truth.now - k.created_at) / DAY;
        let got_age = g["age_days"].as_i64().unwrap();
        assert!(
            (got_age - age).abs() <= 1,
            "age_days of {}: {got_age} vs {age}",
            k.key_id
        );
    }
    // Slots: one per prod service account, all bootstrap (no store holds a key yet).
    let slots = json["slots"].as_array().unwrap();
    let prod_accounts: usize = s
        .truth
        .projects
        .iter()
        .filter(|p| p.name.starts_with("prod-") && !p.archived)
        .map(|p| p.service_accounts.len())
        .sum();
    assert_eq!(slots.len(), prod_accounts);
    for slot in slots {
        assert_eq!(slot["state"], "bootstrap");
        assert_eq!(slot["rule"], "prod");
        assert_eq!(slot["stores"], serde_json::json!(["local"]));
        assert!(slot["paths"][0]
            .as_str()
            .unwrap()
            .starts_with("openai/prod-"));
        assert!(slot["current_key_id"].is_null());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_includes_archived_projects_when_configured() {
    let s = setup(
        Scenario::new(22).projects(3).archived_projects(2),
        "include_archived = true",
    )
    .await;
    let (code, json, stderr) = plan_json(&s, &[]);
    assert_eq!(code, 0, "{stderr}");
    let n = json["keys"].as_array().unwrap().len();
    assert_eq!(n, s.truth.keys.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_table_has_a_summary_and_no_colour_off_a_tty() {
    let s = setup(Scenario::new(23).projects(3).stale_fraction(0.5), "").await;
    let out = Command::new(env!("CARGO_BIN_EXE_keyrotd"))
        .args(["--config", s.config.to_str().unwrap(), "plan"])
        .env("PLAN_TEST_ADMIN_KEY", ADMIN_KEY)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains('\x1b'),
        "no ANSI colour when stdout is not a TTY"
    );
    let total = s.truth.keys.len();
    let stale = s.truth.keys.iter().filter(|k| k.stale).count();
    let summary = text.lines().last().unwrap();
    assert!(
        summary.starts_with(&format!("{total} keys, {stale} stale,")),
        "{summary}"
    );
    for p in &s.truth.projects {
        assert!(
            text.contains(&format!("{} ({})", p.name, p.id)),
            "project header for {}",
            p.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_fails_with_1_on_api_errors_and_2_on_bad_config() {
    let s = setup(Scenario::new(24).projects(1), "").await;
    let out = Command::new(env!("CARGO_BIN_EXE_keyrotd"))
        .args(["--config", s.config.to_str().unwrap(), "plan"])
        .env("PLAN_TEST_ADMIN_KEY", "sk-admin-wrong")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admin key rejected"), "{err}");
    assert!(
        !err.contains("sk-admin-wrong"),
        "the key never appears: {err}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_keyrotd"))
        .args(["--config", s.config.to_str().unwrap(), "plan"])
        .env_remove("PLAN_TEST_ADMIN_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("openai.admin_key_env") && err.contains("PLAN_TEST_ADMIN_KEY"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_infers_owner_types_the_listing_omits() {
    let s = setup(
        Scenario::new(25)
            .projects(4)
            .service_accounts_per_project(2)
            .user_keys_per_project(2)
            .stale_fraction(0.5),
        "",
    )
    .await;
    let (code, typed, stderr) = plan_json(&s, &[]);
    assert_eq!(code, 0, "{stderr}");

    // The same organization listed without owner.type: the same plan.
    s.sim.update_faults(|f| f.omit_owner_type = true);
    let (code, untyped, stderr) = plan_json(&s, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(untyped["keys"], typed["keys"]);
    // `later` holds times counted from each run's now (a bootstrap's sweep waits a
    // grace period from then): compared without them.
    let without_later = |v: &serde_json::Value| {
        let mut v = v["slots"].clone();
        for s in v.as_array_mut().unwrap() {
            s.as_object_mut().unwrap().remove("later");
        }
        v
    };
    assert_eq!(without_later(&untyped), without_later(&typed));
    let keys = untyped["keys"].as_array().unwrap();
    assert_eq!(keys.len(), s.truth.keys.len());
    for k in &s.truth.keys {
        let got = keys
            .iter()
            .find(|g| g["key_id"] == k.key_id.as_str())
            .unwrap_or_else(|| panic!("{} listed", k.key_id));
        assert_eq!(got["owner_type"], k.owner_type.as_str(), "{}", k.key_id);
        assert_eq!(got["owner_id"], k.owner_id.as_str(), "{}", k.key_id);
    }
    assert!(
        keys.iter().any(|k| k["owner_type"] == "user")
            && keys.iter().any(|k| k["owner_type"] == "service_account")
    );

    // A key with neither a type nor an owner object is listed as unknown and reported,
    // with a warning naming it; the scan goes on.
    let bare = &s.truth.keys[0];
    s.sim
        .update_faults(|f| f.bare_owners = [bare.key_id.clone()].into_iter().collect());
    let (code, json, stderr) = plan_json(&s, &[]);
    assert_eq!(code, 0, "{stderr}");
    let keys = json["keys"].as_array().unwrap();
    assert_eq!(keys.len(), s.truth.keys.len());
    let got = keys
        .iter()
        .find(|g| g["key_id"] == bare.key_id.as_str())
        .unwrap();
    assert_eq!(got["owner_type"], "unknown");
    assert_eq!(got["verdict"], "report");
    assert!(got["reasons"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("owner_unknown")));
    assert!(
        stderr.contains("api.key_owner_unknown")
            && stderr.contains(&bare.key_id)
            && stderr.contains(&bare.project_id),
        "{stderr}"
    );
}

/// Who created each key, as the simulator's audit log says (every scenario key was
/// made in the dashboard, by its owner or the organization's owner).
fn creators_of(sim: &Sim) -> BTreeMap<String, String> {
    sim.audit_log()
        .into_iter()
        .filter(|e| e.kind == "api_key.created")
        .filter_map(|e| match e.actor {
            keyrotd::sim::SimActor::Session(uid) => Some((e.resource_id, sim.user_email(&uid)?)),
            keyrotd::sim::SimActor::AdminKey(_) => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_json_shows_each_keys_creator_from_the_audit_log() {
    let s = setup(
        Scenario::new(26)
            .projects(4)
            .service_accounts_per_project(2)
            .user_keys_per_project(2)
            .stale_fraction(0.5),
        "",
    )
    .await;
    let want = creators_of(&s.sim);
    assert_eq!(
        want.len(),
        s.truth.keys.len(),
        "every key's creation is logged"
    );
    let (code, json, stderr) = plan_json(&s, &[]);
    assert_eq!(code, 0, "{stderr}");
    for k in json["keys"].as_array().unwrap() {
        let id = k["key_id"].as_str().unwrap();
        assert_eq!(k["creator"], want[id].as_str(), "creator of {id}");
        assert!(k["expiry"].is_null(), "no key expires: {k}");
    }

    // Without audit-log permission the plan still works; creators are unknown.
    s.sim.update_faults(|f| {
        *f = std::mem::take(f).fail_next(keyrotd::sim::Route::ListAuditLogs, 403, 100)
    });
    let (code, json, stderr) = plan_json(&s, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("audit_log.forbidden"), "{stderr}");
    for k in json["keys"].as_array().unwrap() {
        assert!(k["creator"].is_null(), "{k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_report_and_metrics_show_expired_expiring_and_protected_keys() {
    use crate::e2e::{Stores, World};
    use keyrotd::openai::models::UpdateKeyRequest;
    use std::time::Duration;

    let w = World::new(
        Scenario::new(27)
            .projects(4)
            .service_accounts_per_project(1)
            .user_keys_per_project(2),
        Stores::File,
        "",
    )
    .await;
    let e = w.engine(false).await;
    assert!(!e.cycle().await.any_failed());
    w.advance(Duration::from_secs(91 * DAY as u64));
    assert!(!e.cycle().await.any_failed());
    let protected: BTreeSet<String> = w
        .store_states(&e)
        .await
        .values()
        .filter_map(|s| s.book.previous_key_id.clone())
        .collect();
    assert!(!protected.is_empty());
    // Two user keys: one expires in ten minutes (expired once the clock moves half an
    // hour, while the replaced keys are still in their grace period), one in three
    // days (within policy.expiry_warning, 7 days).
    let users: Vec<(String, String)> = w
        .sim
        .all_keys()
        .into_iter()
        .filter(|k| k.deleted_at.is_none())
        .filter(|k| matches!(k.owner, keyrotd::sim::OwnerRef::User(_)))
        .map(|k| (k.project_id, k.id))
        .take(2)
        .collect();
    assert_eq!(users.len(), 2);
    for ((project, id), secs) in users.iter().zip([600, 3 * 86400]) {
        let req = UpdateKeyRequest {
            expires_in_seconds: Some(secs),
            scopes: None,
        };
        e.client.update_api_key(project, id, &req).await.unwrap();
    }
    w.advance(Duration::from_secs(1800));
    let (expired, expiring) = (&users[0].1, &users[1].1);

    let survey = e.survey().await.unwrap();
    let plan = e.plan(&survey);
    let json = serde_json::to_value(&plan).unwrap();
    let expiry = |id: &str| -> serde_json::Value {
        json["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["key_id"] == id)
            .unwrap_or_else(|| panic!("{id} in the plan"))["expiry"]
            .clone()
    };
    assert_eq!(expiry(expired), "expired");
    assert_eq!(expiry(expiring), "expiring");
    for id in &protected {
        assert_eq!(expiry(id), "protected", "{id}");
    }
    let others = json["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| !k["expiry"].is_null())
        .count();
    assert_eq!(
        others,
        protected.len() + 2,
        "no other key has an expiry state"
    );
    // Minted keys were created by keyrotd.
    for k in w.minted_live() {
        let got = json["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["key_id"] == k.as_str())
            .unwrap()["creator"]
            .clone();
        assert_eq!(got, "keyrotd", "{k}");
    }
    let mut table = Vec::new();
    plan.render_table(&mut table, false).unwrap();
    let table = String::from_utf8(table).unwrap();
    assert!(
        table.contains("EXPIRY") && table.contains("CREATOR"),
        "{table}"
    );
    for (id, state) in [
        (expired.as_str(), "expired"),
        (expiring.as_str(), "expiring"),
    ] {
        let line = table.lines().find(|l| l.contains(id)).unwrap();
        assert!(line.contains(state), "{line}");
    }

    // The report carries the same states.
    let config = w.config();
    let report =
        keyrotd::report::Report::build(&survey.inventory, &plan, &config.rules(), &config.policy);
    let rk = |id: &str| report.keys.iter().find(|k| k.key_id == id).unwrap();
    assert_eq!(rk(expired).expiry.map(|s| s.as_str()), Some("expired"));
    assert_eq!(rk(expiring).expiry.map(|s| s.as_str()), Some("expiring"));
    let csv = keyrotd::report::render(&report, keyrotd::report::Format::Csv);
    assert!(
        csv.lines()
            .next()
            .unwrap()
            .contains(",creator,expiry,requests_24h,"),
        "{csv}"
    );
    let html = keyrotd::report::render(&report, keyrotd::report::Format::Html);
    assert!(html.contains("Created by") && html.contains(">protected<"));

    // The metrics count them after a cycle.
    drop(plan);
    assert!(!e.cycle().await.any_failed());
    let text = e.metrics.render(None);
    for (state, n) in [("expired", 1), ("expiring", 1)] {
        let line = format!("keyrotd_keys_expiring{{state=\"{state}\"}} {n}");
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
    assert!(
        text.lines().any(
            |l| l.starts_with("keyrotd_keys_expiring{state=\"protected\"} ") && !l.ends_with(" 0")
        ),
        "{text}"
    );
}
