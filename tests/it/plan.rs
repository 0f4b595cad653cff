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
