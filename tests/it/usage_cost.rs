//! Usage and cost per key (`[usage]`, issue 18) against the simulator: per-key usage
//! and per-project cost equal the simulator's ground truth in the fewest requests the
//! pagination allows, `key.usage_anomaly` (spike, replaced key after grace, with
//! `on_anomaly = "rotate"`), and a usage fetch that fails degrades to "usage unknown".

use std::collections::BTreeMap;
use std::time::Duration;

use crate::e2e::{captured_logs, Stores, World};
use keyrotd::rotation::SlotOutcome;
use keyrotd::sim::{Faults, Route, Scenario, PRICES};
use secrecy::ExposeSecret;

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86400);

fn price(input: u64, output: u64) -> f64 {
    let [(_, i), (_, o)] = PRICES;
    (input as f64 * i + output as f64 * o) / 1_000_000.0
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn anomalies(engine: &keyrotd::rotation::Engine, kind: &str) -> f64 {
    let m = engine.metrics.render(None);
    m.lines()
        .find(|l| {
            l.starts_with("keyrotd_key_usage_anomalies_total{")
                && l.contains(&format!("kind=\"{kind}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0)
}

/// Acceptance: `report --format json` per-key usage and per-project cost equal the
/// simulator's ground truth for 2,000 keys with a week of usage, and the usage and
/// costs requests of a survey are the pagination minimum (one page of 168 hourly
/// buckets, one page of the last hour's minutes, one page of daily costs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_usage_and_cost_of_2000_keys_over_a_week_equal_the_simulator() {
    let w = World::new(
        Scenario::new(181)
            .projects(200)
            .service_accounts_per_project(5)
            .user_keys_per_project(5),
        Stores::File,
        "",
    )
    .await;
    let now = w.sim.now();
    let keys: Vec<String> = w.truth.keys.iter().map(|k| k.key_id.clone()).collect();
    assert_eq!(keys.len(), 2000);
    // A week and a day of usage: some before the window, most in it.
    let mut n = 7u64;
    let mut next = || {
        n = n
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        n >> 33
    };
    for k in &keys {
        for _ in 0..4 {
            let at = now - 120 - (next() % (8 * 86_400)) as i64;
            let req = 1 + next() % 50;
            assert!(w.sim.record_usage(k, at, req, req * 300, req * 120));
        }
    }
    let engine = w.engine(false).await;
    let (usage_before, costs_before) = (
        w.sim.requests_to(Route::UsageCompletions).len(),
        w.sim.requests_to(Route::Costs).len(),
    );
    let survey = engine.survey().await.expect("survey");
    assert_eq!(
        w.sim.requests_to(Route::UsageCompletions).len() - usage_before,
        2,
        "one page of 168 hourly buckets and one of the last hour's minutes"
    );
    assert_eq!(
        w.sim.requests_to(Route::Costs).len() - costs_before,
        1,
        "one page of daily costs"
    );
    let plan = engine.plan(&survey);
    let config = w.config();
    let report =
        keyrotd::report::Report::build(&survey.inventory, &plan, &config.rules(), &config.policy);
    let json: serde_json::Value = serde_json::from_str(&keyrotd::report::render(
        &report,
        keyrotd::report::Format::Json,
    ))
    .unwrap();
    assert_eq!(json["usage"]["status"], "known", "{}", json["usage"]);
    let win = &json["usage"]["window"];
    let (start, start_24h, cost_start, end) = (
        win["start"].as_i64().unwrap(),
        win["start_24h"].as_i64().unwrap(),
        win["cost_start"].as_i64().unwrap(),
        win["end"].as_i64().unwrap(),
    );
    let window = w.sim.usage_totals(start, end);
    let day = w.sim.usage_totals(start_24h, end);
    let costed = w.sim.usage_totals(cost_start, end);
    let rkeys = json["keys"].as_array().unwrap();
    assert_eq!(rkeys.len(), 2000);
    let mut project_cost: BTreeMap<String, f64> = BTreeMap::new();
    let mut with_usage = 0;
    for k in rkeys {
        let id = k["key_id"].as_str().unwrap();
        let u = &k["usage"];
        let t = window.get(id).copied().unwrap_or_default();
        let d = day.get(id).copied().unwrap_or_default();
        let c = costed.get(id).copied().unwrap_or_default();
        with_usage += usize::from(t.requests > 0);
        assert_eq!(u["requests_window"], t.requests, "{id}");
        assert_eq!(u["input_tokens_window"], t.input_tokens, "{id}");
        assert_eq!(u["output_tokens_window"], t.output_tokens, "{id}");
        assert_eq!(u["requests_24h"], d.requests, "{id}");
        assert_eq!(u["input_tokens_24h"], d.input_tokens, "{id}");
        assert_eq!(u["output_tokens_24h"], d.output_tokens, "{id}");
        let cost = price(c.input_tokens, c.output_tokens);
        assert!(
            close(u["cost"].as_f64().unwrap(), cost),
            "{id}: {u} vs {cost}"
        );
        *project_cost
            .entry(k["project_id"].as_str().unwrap().to_string())
            .or_default() += cost;
    }
    assert!(with_usage > 1500, "most keys have usage in the window");
    let projects = json["usage"]["projects"].as_array().unwrap();
    assert_eq!(projects.len(), 200);
    for p in projects {
        let id = p["project_id"].as_str().unwrap();
        let want = project_cost.get(id).copied().unwrap_or(0.0);
        assert!(
            close(p["cost"].as_f64().unwrap(), want),
            "{id}: {p} vs {want}"
        );
    }
    // Most expensive first, and the HTML has its cost view.
    let costs: Vec<f64> = projects
        .iter()
        .map(|p| p["cost"].as_f64().unwrap())
        .collect();
    assert!(costs.windows(2).all(|c| c[0] >= c[1]));
    let html = keyrotd::report::render(&report, keyrotd::report::Format::Html);
    assert!(html.contains("Cost by project"), "cost view");
    let csv = keyrotd::report::render(&report, keyrotd::report::Format::Csv);
    assert!(csv.lines().next().unwrap().contains(",requests_24h,"));
}

/// A world whose slots have two days of steady traffic (10 requests an hour on every
/// served key), then a spike of 1,000 requests on one served key in the last minutes.
async fn spiking_world(on_anomaly: &str) -> (World, keyrotd::rotation::Engine, String, String) {
    let mut w = World::new(
        Scenario::new(1801)
            .projects(3)
            .service_accounts_per_project(2)
            .user_keys_per_project(0),
        Stores::File,
        "",
    )
    .await;
    w.toml
        .push_str(&format!("\n[usage]\non_anomaly = \"{on_anomaly}\"\n"));
    let engine = w.engine(false).await;
    assert!(!engine.cycle().await.any_failed());
    let t0 = w.sim.now();
    w.advance(2 * DAY + HOUR);
    let states = w.store_states(&engine).await;
    assert!(states.len() >= 2, "{states:?}");
    let served: Vec<String> = states
        .values()
        .map(|s| s.current.as_ref().unwrap().key_id.clone())
        .collect();
    for k in &served {
        let mut at = t0 + 60;
        while at < w.sim.now() - 2 * 3600 {
            assert!(w.sim.record_usage(k, at, 10, 1000, 400));
            at += 3600;
        }
    }
    let spiking = served[0].clone();
    let value = states
        .values()
        .find(|s| s.current.as_ref().unwrap().key_id == spiking)
        .map(|s| {
            s.current
                .as_ref()
                .unwrap()
                .api_key
                .expose_secret()
                .to_string()
        })
        .unwrap();
    assert!(w
        .sim
        .record_usage(&spiking, w.sim.now() - 300, 1000, 100_000, 40_000));
    (w, engine, spiking, value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spike_on_one_key_is_an_anomaly_for_that_key_only() {
    let logs = captured_logs();
    let (w, engine, spiking, _) = spiking_world("report").await;
    let r = engine.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.slots);
    assert_eq!(anomalies(&engine, "spike"), 1.0, "one spike");
    assert!(
        r.slots
            .iter()
            .all(|s| !matches!(s.outcome, Ok(SlotOutcome::Rotated { .. }))),
        "on_anomaly = report rotates nothing"
    );
    assert!(w.sim.is_live(&spiking));
    if let Some(logs) = logs {
        let lines = logs.lines_with(&["key.usage_anomaly", &spiking]);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("spike"), "{}", lines[0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_on_anomaly_rotate_the_spiking_key_is_replaced_and_revoked_within_the_cycle() {
    let (w, engine, spiking, value) = spiking_world("rotate").await;
    let r = engine.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.slots);
    assert_eq!(anomalies(&engine, "spike"), 1.0);
    let rotated: Vec<_> = r
        .slots
        .iter()
        .filter(|s| matches!(s.outcome, Ok(SlotOutcome::Rotated { .. })))
        .collect();
    assert_eq!(
        rotated.len(),
        1,
        "only the spiking key's slot: {:?}",
        r.slots
    );
    assert!(!w.sim.is_live(&spiking), "the anomalous key is revoked");
    assert!(!w.sim.use_key(&value));
    for st in w.store_states(&engine).await.values() {
        let cur = st.current.as_ref().unwrap();
        assert_ne!(cur.key_id, spiking);
        assert!(w.sim.use_key(cur.api_key.expose_secret()));
    }
}

/// A key keyrotd promoted hours ago has no day of history of its own: its slot's
/// traffic (it and the key it replaced, still listed in the grace period) is judged
/// against the replaced key's history. The traffic that moved to it at the promotion
/// is no spike; 1,000 requests more in the last minutes are, on the new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_key_is_judged_by_its_slot_traffic() {
    let logs = captured_logs();
    let mut w = World::new(
        Scenario::new(1803)
            .projects(1)
            .service_accounts_per_project(1)
            .user_keys_per_project(0),
        Stores::File,
        "",
    )
    .await;
    // The default grace period: the replaced key stays listed for the fresh key's
    // first day.
    w.toml = w
        .toml
        .replace("grace_period = \"1h\"", "grace_period = \"24h\"");
    w.toml.push_str("\n[usage]\non_anomaly = \"report\"\n");
    let engine = w.engine(false).await;
    assert!(!engine.cycle().await.any_failed());
    let served = |states: &BTreeMap<(String, String), keyrotd::store::SlotState>| {
        assert_eq!(states.len(), 1, "{:?}", states.keys());
        let st = states.values().next().unwrap();
        st.current.as_ref().expect("served").key_id.clone()
    };
    let old = served(&w.store_states(&engine).await);
    // Two days of 10 requests an hour on the served key, then a manual rotation.
    let t0 = w.sim.now();
    w.advance(2 * DAY);
    let mut at = t0 + 60;
    while at < w.sim.now() {
        assert!(w.sim.record_usage(&old, at, 10, 1000, 400));
        at += 3600;
    }
    let survey = engine.survey().await.unwrap();
    let picked: Vec<_> = survey.views.iter().collect();
    let r = engine
        .rotate_now(
            &picked,
            &survey,
            keyrotd::rotation::RevokeOld::Grace,
            w.clock_now(),
        )
        .await;
    assert!(!r.any_failed(), "{:?}", r.slots);
    let fresh = served(&w.store_states(&engine).await);
    assert_ne!(fresh, old);
    // The consumers move to the new key: 10 an hour on it for four hours.
    let promoted = w.sim.now();
    w.advance(4 * HOUR);
    let mut at = promoted + 60;
    while at < w.sim.now() {
        assert!(w.sim.record_usage(&fresh, at, 10, 1000, 400));
        at += 3600;
    }
    let r = engine.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.slots);
    assert_eq!(
        anomalies(&engine, "spike"),
        0.0,
        "moved traffic is no spike"
    );

    assert!(w
        .sim
        .record_usage(&fresh, w.sim.now() - 300, 1000, 100_000, 40_000));
    let r = engine.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.slots);
    assert_eq!(anomalies(&engine, "spike"), 1.0, "a spike on the fresh key");
    assert!(w.sim.is_live(&fresh) && w.sim.is_live(&old), "report only");
    if let Some(logs) = logs {
        let lines = logs.lines_with(&["key.usage_anomaly", &fresh]);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("spike"), "{}", lines[0]);
        assert!(logs.lines_with(&["key.usage_anomaly", &old]).is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_on_a_replaced_key_after_its_grace_period_is_an_anomaly() {
    let w = World::new(
        Scenario::new(1802)
            .projects(3)
            .service_accounts_per_project(1)
            .user_keys_per_project(0),
        Stores::File,
        "",
    )
    .await;
    let engine = w.engine(false).await;
    assert!(!engine.cycle().await.any_failed());
    w.advance(91 * DAY);
    assert!(!engine.cycle().await.any_failed(), "rotates the stale keys");
    let states = w.store_states(&engine).await;
    let replaced = states
        .values()
        .find_map(|s| s.book.previous_key_id.clone())
        .expect("a replaced key");
    assert_eq!(anomalies(&engine, "replaced_after_grace"), 0.0);
    // The grace period (1 h) is over; someone still calls with the replaced key.
    w.advance(2 * HOUR);
    assert!(w.sim.record_usage(&replaced, w.sim.now() - 60, 5, 500, 200));
    let r = engine.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.slots);
    assert_eq!(anomalies(&engine, "replaced_after_grace"), 1.0);
    assert!(
        !w.sim.is_live(&replaced),
        "revoked after its grace period as usual"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_failing_beyond_retries_leaves_rotations_alone_and_the_plan_says_unknown() {
    let w = World::new(
        Scenario::new(1803)
            .projects(3)
            .service_accounts_per_project(2)
            .user_keys_per_project(1),
        Stores::File,
        "",
    )
    .await;
    let engine = w.engine(false).await;
    assert!(!engine.cycle().await.any_failed());
    w.advance(91 * DAY);
    w.sim.set_faults(
        Faults::default()
            .fail_next(Route::UsageCompletions, 503, 1000)
            .fail_next(Route::Costs, 503, 1000),
    );
    let r = engine.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.slots);
    assert!(
        r.slots
            .iter()
            .any(|s| matches!(s.outcome, Ok(SlotOutcome::Rotated { .. }))),
        "the stale keys are rotated: {:?}",
        r.slots
    );
    let survey = engine.survey().await.unwrap();
    let plan = engine.plan(&survey);
    let doc: serde_json::Value = serde_json::from_str(&plan.to_json()).unwrap();
    assert_eq!(doc["usage"]["status"], "unknown", "{}", doc["usage"]);
    assert!(doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["usage"].is_null()));
    let mut table = Vec::new();
    plan.render_table(&mut table, false).unwrap();
    let table = String::from_utf8(table).unwrap();
    assert!(table.contains("usage: unknown"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_on_usage_is_one_warning_naming_the_permission_and_everything_else_works() {
    let logs = captured_logs();
    let w = World::new(
        Scenario::new(1804)
            .projects(3)
            .service_accounts_per_project(2)
            .user_keys_per_project(1),
        Stores::File,
        "",
    )
    .await;
    w.sim.set_faults(
        Faults::default()
            .fail_next(Route::UsageCompletions, 403, 1000)
            .fail_next(Route::Costs, 403, 1000),
    );
    let engine = w.engine(false).await;
    let before = logs
        .as_ref()
        .map(|l| l.lines_with(&["usage.forbidden"]).len());
    let r = engine.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.slots);
    assert!(r
        .slots
        .iter()
        .all(|s| matches!(s.outcome, Ok(SlotOutcome::Rotated { .. }))));
    if let (Some(logs), Some(before)) = (logs, before) {
        let lines = logs.lines_with(&["usage.forbidden"]);
        assert_eq!(lines.len() - before, 1, "one warning per cycle: {lines:?}");
        assert!(lines.last().unwrap().contains("api.usage.read"));
    }
    let survey = engine.survey().await.unwrap();
    let plan = engine.plan(&survey);
    assert_eq!(plan.usage.status, "unknown");
    assert!(plan.usage.reason.unwrap().contains("api.usage.read"));
}

/// Usage-aware revocation reads the Usage API's 1 m buckets of the replaced key since
/// its promotion: traffic there keeps the key although `last_used_at` says nothing
/// (the simulator's injected usage does not move it); with `[usage]` off, the
/// decision falls back to `last_used_at` and the key goes after `min_grace`.
async fn replaced_key_with_usage_only_in_the_usage_api(usage_on: bool) -> bool {
    let mut w = World::new(
        Scenario::new(1805)
            .projects(3)
            .service_accounts_per_project(2)
            .user_keys_per_project(0),
        Stores::File,
        "revoke_when = \"unused\"\nmin_grace = \"30m\"\nmax_grace = \"3d\"\nusage_report_delay = \"5m\"",
    )
    .await;
    if !usage_on {
        w.toml.push_str("\n[usage]\nenabled = false\n");
    }
    let engine = w.engine(false).await;
    assert!(!engine.cycle().await.any_failed());
    w.advance(91 * DAY);
    assert!(!engine.cycle().await.any_failed());
    let mut previous: Vec<String> = w
        .store_states(&engine)
        .await
        .values()
        .filter_map(|s| s.book.previous_key_id.clone())
        .collect();
    previous.sort();
    assert!(previous.len() >= 2);
    w.advance(Duration::from_secs(600));
    assert!(w
        .sim
        .record_usage(&previous[0], w.sim.now() - 60, 3, 300, 100));
    w.advance(HOUR);
    let r = engine.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.slots);
    for id in &previous[1..] {
        assert!(!w.sim.is_live(id), "{id} drained: revoked after min_grace");
    }
    w.sim.is_live(&previous[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_aware_revocation_reads_the_usage_api_and_falls_back_to_last_used_at() {
    assert!(
        replaced_key_with_usage_only_in_the_usage_api(true).await,
        "used per the Usage API: kept"
    );
    assert!(
        !replaced_key_with_usage_only_in_the_usage_api(false).await,
        "usage off: last_used_at shows no use, revoked"
    );
}

#[test]
fn usage_config_is_validated_naming_the_key() {
    use keyrotd::config::Config;
    for (toml, key) in [
        ("[usage]\nlookback = \"2h\"\n", "usage.lookback"),
        ("[usage]\nlookback = \"40d\"\n", "usage.lookback"),
        ("[usage]\nlookback = \"36h 30m\"\n", "usage.lookback"),
        ("[usage]\nspike_factor = 0.5\n", "usage.spike_factor"),
        (
            "[usage]\nspike_min_requests = 0\n",
            "usage.spike_min_requests",
        ),
    ] {
        let err = Config::from_toml(toml).expect_err(toml).to_string();
        assert!(err.contains(key), "{toml}: {err}");
    }
    let cfg = keyrotd::config::UsageConfig::default();
    assert!(cfg.enabled, "on by default");
    assert_eq!(cfg.lookback, 7 * DAY);
    assert!(cfg.validate().is_ok());
    let err = Config::from_toml("[usage]\non_anomaly = \"panic\"\n")
        .expect_err("unknown variant")
        .to_string();
    assert!(err.contains("usage"), "{err}");
}
