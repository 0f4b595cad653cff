//! The HTTP listener against a real engine: `/metrics` values after real cycles, the
//! exposition format checked by a strict parser (and by `promtool check metrics`), the
//! per-slot series and their budget, `/healthz` and `/readyz`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use crate::e2e::{free_port, Stores, World};
use keyrotd::daemon::{serve_http, HttpState};
use keyrotd::rotation::SlotOutcome;
use keyrotd::sim::{Route, Scenario};
use tokio_util::sync::CancellationToken;

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed exposition: the TYPE of each family and every sample.
#[derive(Debug, Default)]
struct Exposition {
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    /// The value of the one series `name{labels}`; panics when absent.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .unwrap_or_else(|| panic!("no series {name}{labels:?} in {:#?}", self.samples))
            .value
    }

    fn family(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with("__")
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse::<f64>().map_err(|e| format!("value {s:?}: {e}")),
    }
}

/// `{a="x",b="y"}` (the braces included) → labels, and the rest of the line.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s
        .strip_prefix('{')
        .ok_or_else(|| format!("expected '{{' in {s:?}"))?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest
            .find('=')
            .ok_or_else(|| format!("label without '=': {rest:?}"))?;
        let name = &rest[..eq];
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        let mut chars = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or_else(|| format!("label {name} value not quoted"))?
            .char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?} in label {name}")),
                },
                Some((i, '"')) => break i,
                Some((_, '\n')) | None => return Err(format!("unterminated label {name}")),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} repeated"));
        }
        rest = &rest[eq + 1..][1 + end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err(format!("expected ',' or '}}' after label {name}: {rest:?}"));
        }
    }
}

/// A strict parser of the Prometheus text format 0.0.4: HELP/TYPE comments, each
/// family's TYPE before its samples and at most once, a family's lines contiguous,
/// valid names, quoted and escaped label values, float values, no duplicate series.
fn parse_exposition(text: &str) -> Result<Exposition, String> {
    if !text.ends_with('\n') {
        return Err("the exposition must end with a newline".into());
    }
    let mut exp = Exposition::default();
    let mut helps = BTreeSet::new();
    let mut series = BTreeSet::new();
    let mut closed = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut switch_to = |family: &str, current: &mut Option<String>| -> Result<(), String> {
        if current.as_deref() != Some(family) {
            if let Some(prev) = current.take() {
                closed.insert(prev);
            }
            if closed.contains(family) {
                return Err(format!("lines of family {family} are not contiguous"));
            }
            *current = Some(family.to_string());
        }
        Ok(())
    };
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut parts = comment.trim_start().splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(name), _) => {
                    if !is_metric_name(name) {
                        return Err(at(format!("bad metric name {name:?}")));
                    }
                    switch_to(name, &mut current).map_err(at)?;
                    if !helps.insert(name.to_string()) {
                        return Err(at(format!("second HELP for {name}")));
                    }
                }
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !is_metric_name(name) {
                        return Err(at(format!("bad metric name {name:?}")));
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(at(format!("unknown type {kind:?}")));
                    }
                    switch_to(name, &mut current).map_err(at)?;
                    if exp.samples.iter().any(|s| s.name == name) {
                        return Err(at(format!("TYPE of {name} after its samples")));
                    }
                    if exp
                        .types
                        .insert(name.to_string(), kind.to_string())
                        .is_some()
                    {
                        return Err(at(format!("second TYPE for {name}")));
                    }
                }
                (Some("HELP" | "TYPE"), _, _) => return Err(at("malformed HELP/TYPE".into())),
                _ => {} // a plain comment
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("expected one space before the value".into()))?
            .split(' ');
        let value = parse_value(fields.next().unwrap_or_default()).map_err(at)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|e| at(format!("timestamp {ts:?}: {e}")))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing fields".into()));
        }
        let family = exp
            .types
            .keys()
            .find(|f| {
                name == f.as_str()
                    || (["histogram", "summary"].contains(&exp.types[*f].as_str())
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|sfx| name.strip_suffix(sfx) == Some(f.as_str())))
            })
            .cloned()
            .ok_or_else(|| at(format!("sample of {name} without a TYPE before it")))?;
        switch_to(&family, &mut current).map_err(at)?;
        let key = format!("{name}{labels:?}");
        if !series.insert(key) {
            return Err(at("duplicate series".into()));
        }
        exp.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(exp)
}

#[test]
fn the_parser_rejects_what_prometheus_rejects() {
    let ok =
        "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 2\na_total{x=\"q\\\"\"} 3\n";
    let e = parse_exposition(ok).unwrap();
    assert_eq!(e.get("a_total", &[("x", "q\"")]), 3.0);
    for (bad, why) in [
        ("a 1\n", "no TYPE"),
        ("# TYPE a gauge\na 1\na 2\n", "duplicate"),
        ("# TYPE a gauge\na{x=1} 1\n", "unquoted"),
        ("# TYPE a gauge\na  1\n", "two spaces"),
        ("# TYPE 1a gauge\n", "bad name"),
        ("# TYPE a gauge\na one\n", "bad value"),
        ("# TYPE a gauge\n# TYPE a gauge\n", "second TYPE"),
        (
            "# TYPE a gauge\n# TYPE b gauge\nb 1\na 1\n",
            "not contiguous",
        ),
        ("# TYPE a gauge\na 1", "no final newline"),
        ("# TYPE a wobbly\n", "unknown type"),
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted ({why}): {bad:?}");
    }
}

async fn get(client: &reqwest::Client, addr: SocketAddr, path: &str) -> (u16, String) {
    let r = client
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = r.status().as_u16();
    (status, r.text().await.expect("body"))
}

async fn scrape(client: &reqwest::Client, addr: SocketAddr) -> Exposition {
    let r = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(r.status().as_u16(), 200);
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        ct.starts_with("text/plain; version=0.0.4"),
        "content-type {ct}"
    );
    let text = r.text().await.expect("body");
    parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness_follow_the_cycles() {
    let scenario = Scenario::new(31)
        .projects(6)
        .service_accounts_per_project(2)
        .user_keys_per_project(1)
        .stale_fraction(0.5);
    let w = World::new(scenario, Stores::File, "").await;
    let engine = w.engine(false).await;
    let state = HttpState::for_engine(&engine);
    let token = CancellationToken::new();
    let addr = serve_http("127.0.0.1:0".parse().unwrap(), state.clone(), token.clone())
        .await
        .expect("listener starts");
    let client = reqwest::Client::new();

    // Before any cycle: alive, ready (config loaded), every family present.
    assert_eq!(get(&client, addr, "/healthz").await.0, 200);
    assert_eq!(get(&client, addr, "/readyz").await.0, 200);
    let m = scrape(&client, addr).await;
    for family in [
        "keyrotd_keys",
        "keyrotd_rotations_total",
        "keyrotd_revocations_total",
        "keyrotd_cycle_duration_seconds",
        "keyrotd_last_success_timestamp_seconds",
        "keyrotd_oldest_key_age_seconds",
        "keyrotd_api_requests_total",
        "keyrotd_slots",
    ] {
        assert!(m.types.contains_key(family), "family {family} declared");
    }
    assert_eq!(m.get("keyrotd_last_success_timestamp_seconds", &[]), 0.0);

    // A good cycle.
    let before = chrono::Utc::now().timestamp() as f64;
    let report = engine.cycle().await;
    state.record_cycle(&report);
    assert!(!report.any_failed(), "{:?}", report.slots);
    let rotated = report
        .slots
        .iter()
        .filter(|s| matches!(s.outcome, Ok(SlotOutcome::Rotated { .. })))
        .count();
    assert!(rotated >= 2, "prod slots rotate: {rotated}");

    let m = scrape(&client, addr).await;
    assert_eq!(
        m.get("keyrotd_rotations_total", &[("outcome", "completed")]),
        rotated as f64
    );
    assert_eq!(
        m.get("keyrotd_rotations_total", &[("outcome", "failed")]),
        0.0
    );
    let by_verdict = m.family("keyrotd_keys");
    assert_eq!(
        by_verdict.len(),
        5,
        "one series per verdict: {by_verdict:?}"
    );
    let keys: f64 = by_verdict.iter().map(|s| s.value).sum();
    assert_eq!(
        keys,
        w.truth.keys.len() as f64,
        "keys by verdict sum to the keys scanned"
    );
    assert_eq!(
        m.get("keyrotd_keys", &[("verdict", "rotate")]),
        w.stale_prod_sa_keys().len() as f64,
        "the stale prod service-account keys are the ones to rotate"
    );
    assert!(
        m.get(
            "keyrotd_api_requests_total",
            &[("endpoint", "list_projects"), ("status", "200")]
        ) >= 1.0
    );
    assert_eq!(
        m.get(
            "keyrotd_api_requests_total",
            &[
                ("endpoint", "create_service_account_key"),
                ("status", "200")
            ]
        ),
        rotated as f64,
        "one mint per rotated slot"
    );
    let last_success = m.get("keyrotd_last_success_timestamp_seconds", &[]);
    assert!(last_success >= before - 1.0, "{last_success} vs {before}");
    assert!(m.get("keyrotd_cycle_duration_seconds", &[]) > 0.0);
    let oldest = w
        .truth
        .keys
        .iter()
        .map(|k| w.truth.now - k.created_at)
        .max()
        .unwrap() as f64;
    let reported = m.get("keyrotd_oldest_key_age_seconds", &[]);
    assert!(
        (reported - oldest).abs() < 120.0,
        "oldest key age {reported} vs ground truth {oldest}"
    );
    assert_eq!(get(&client, addr, "/readyz").await.0, 200);

    // After the grace period the replaced stale keys are revoked and counted.
    w.advance(Duration::from_secs(2 * 3600));
    let report = engine.cycle().await;
    state.record_cycle(&report);
    assert!(!report.any_failed(), "{:?}", report.slots);
    let m = scrape(&client, addr).await;
    assert_eq!(
        m.get("keyrotd_revocations_total", &[("outcome", "revoked")]),
        w.stale_prod_sa_keys().len() as f64
    );
    assert_eq!(
        m.get(
            "keyrotd_api_requests_total",
            &[("endpoint", "delete_api_key"), ("status", "200")]
        ),
        w.stale_prod_sa_keys().len() as f64
    );

    // A cycle whose scan fails (the admin key is refused): not ready, still alive, the
    // failure counted and the last-success time unchanged.
    let last_success = m.get("keyrotd_last_success_timestamp_seconds", &[]);
    w.sim
        .update_faults(|f| *f = f.clone().fail_next(Route::ListProjects, 401, 1));
    let report = engine.cycle().await;
    state.record_cycle(&report);
    assert!(report.scan_error.is_some(), "the scan failed");
    let (status, body) = get(&client, addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(get(&client, addr, "/healthz").await.0, 200);
    let m = scrape(&client, addr).await;
    assert_eq!(
        m.get(
            "keyrotd_api_requests_total",
            &[("endpoint", "list_projects"), ("status", "401")]
        ),
        1.0
    );
    assert_eq!(
        m.get("keyrotd_last_success_timestamp_seconds", &[]),
        last_success
    );
    assert_eq!(m.get("keyrotd_cycles_total", &[("result", "failed")]), 1.0);

    // The next good cycle makes it ready again.
    let report = engine.cycle().await;
    state.record_cycle(&report);
    assert!(!report.any_failed());
    assert_eq!(get(&client, addr, "/readyz").await.0, 200);
    token.cancel();
}

/// `keyrotd_slots` describes the last finished cycle: every slot `ok` after a good
/// cycle, every slot `failed` while the store is unreachable (what the store-outage
/// alerts in deploy/prometheus watch), all zero after a cycle whose scan failed (no
/// slot ran), and `ok` again once the store is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_gauge_follows_the_last_cycle() {
    let scenario = Scenario::new(32)
        .projects(4)
        .service_accounts_per_project(2)
        .stale_fraction(0.5);
    let w = World::new(scenario, Stores::File, "").await;
    let engine = w.engine(false).await;
    let state = HttpState::for_engine(&engine);
    let token = CancellationToken::new();
    let addr = serve_http("127.0.0.1:0".parse().unwrap(), state.clone(), token.clone())
        .await
        .expect("listener starts");
    let client = reqwest::Client::new();
    let slots = |m: &Exposition| -> BTreeMap<String, f64> {
        m.family("keyrotd_slots")
            .iter()
            .map(|s| (s.labels["state"].clone(), s.value))
            .collect()
    };
    let expect = |ok: usize, failed: usize| -> BTreeMap<String, f64> {
        [("ok", ok), ("busy", 0), ("planned", 0), ("failed", failed)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v as f64))
            .collect()
    };

    let m = scrape(&client, addr).await;
    assert_eq!(
        m.types.get("keyrotd_slots").map(String::as_str),
        Some("gauge")
    );
    assert_eq!(
        slots(&m),
        expect(0, 0),
        "every state present, 0 before a cycle"
    );

    let report = engine.cycle().await;
    assert!(!report.any_failed(), "{:?}", report.slots);
    let n = report.slots.len();
    assert!(n >= 2, "prod slots: {n}");
    assert_eq!(slots(&scrape(&client, addr).await), expect(n, 0));

    // The file store's directory replaced by a file: every slot fails reading its
    // state, as with Vault or AWS unreachable.
    let secrets = w.dir.path().join("secrets");
    let aside = w.dir.path().join("secrets.aside");
    std::fs::rename(&secrets, &aside).unwrap();
    std::fs::write(&secrets, b"not a directory").unwrap();
    for cycle in 1..=2 {
        let report = engine.cycle().await;
        assert_eq!(
            report.failed_slots(),
            n,
            "cycle {cycle}: {:?}",
            report.slots
        );
        let m = scrape(&client, addr).await;
        assert_eq!(slots(&m), expect(0, n), "cycle {cycle}");
        assert_eq!(
            m.get("keyrotd_slot_failures_total", &[("kind", "store")]),
            (cycle * n) as f64,
            "cycle {cycle}: an unreadable store is a store failure"
        );
        let all: f64 = m
            .family("keyrotd_slot_failures_total")
            .iter()
            .map(|s| s.value)
            .sum();
        assert_eq!(
            all,
            (cycle * n) as f64,
            "cycle {cycle}: the kinds sum to the total"
        );
        assert_eq!(
            m.get("keyrotd_cycles_total", &[("result", "failed")]),
            cycle as f64
        );
    }

    // A scan that fails runs no slot: nothing to report for any of them.
    w.sim
        .update_faults(|f| *f = f.clone().fail_next(Route::ListProjects, 401, 1));
    let report = engine.cycle().await;
    assert!(report.scan_error.is_some(), "the scan failed");
    assert_eq!(slots(&scrape(&client, addr).await), expect(0, 0));

    std::fs::remove_file(&secrets).unwrap();
    std::fs::rename(&aside, &secrets).unwrap();
    let report = engine.cycle().await;
    assert!(!report.any_failed(), "{:?}", report.slots);
    assert_eq!(slots(&scrape(&client, addr).await), expect(n, 0));
    token.cancel();
}

/// The labels of a per-slot series, as a comparable tuple.
type SlotKey = (String, String, String, String, String);

fn slot_key(labels: &BTreeMap<String, String>) -> SlotKey {
    let l = |k: &str| labels.get(k).cloned().unwrap_or_default();
    (
        l("rule"),
        l("project_id"),
        l("project_name"),
        l("service_account_id"),
        l("service_account_name"),
    )
}

/// The slots of a per-slot family, by their labels.
fn per_slot(m: &Exposition, family: &str) -> BTreeMap<SlotKey, f64> {
    m.family(family)
        .iter()
        .map(|s| {
            assert_eq!(s.labels.len(), 5, "{family}: {:?}", s.labels);
            (slot_key(&s.labels), s.value)
        })
        .collect()
}

const PER_SLOT: [&str; 4] = [
    "keyrotd_slot_ready",
    "keyrotd_slot_key_age_seconds",
    "keyrotd_slot_last_rotation_timestamp_seconds",
    "keyrotd_slot_next_rotation_timestamp_seconds",
];

/// Every slot of a cycle gets its series, labelled by names (a project name with `"`,
/// `\` and a newline comes back intact through the escaping); the first cycle sees the
/// slots before it bootstraps them (not ready, no key), the second serves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_slot_has_its_series_with_escaped_labels() {
    let scenario = Scenario::new(33)
        .projects(6)
        .service_accounts_per_project(1)
        .stale_fraction(0.5);
    let mut w = World::new(scenario, Stores::File, "").await;
    let odd_name = "odd \"quoted\" back\\slash\nsecond line";
    let odd = w.sim.add_project(odd_name);
    w.sim
        .add_service_account(&odd, "backend")
        .expect("service account");
    w.toml.push_str(&format!(
        r#"
[[rotate]]
name = "odd"
project = "odd *"
service_account = "*"
stores = ["file"]
path = "{}/odd/{{project_id}}/{{service_account_name}}"
max_age = "30d"
"#,
        w.prefix
    ));
    let engine = w.engine(false).await;
    let state = HttpState::for_engine(&engine);
    let token = CancellationToken::new();
    let addr = serve_http("127.0.0.1:0".parse().unwrap(), state.clone(), token.clone())
        .await
        .expect("listener starts");
    let client = reqwest::Client::new();

    let m = scrape(&client, addr).await;
    for family in PER_SLOT {
        assert_eq!(
            m.types.get(family).map(String::as_str),
            Some("gauge"),
            "{family}"
        );
        assert!(
            m.family(family).is_empty(),
            "{family}: no series before a cycle"
        );
    }
    let info = m.family("keyrotd_build_info");
    assert_eq!(info.len(), 1, "{info:?}");
    assert_eq!(info[0].value, 1.0);
    assert_eq!(info[0].labels["version"], env!("CARGO_PKG_VERSION"));
    assert!(!info[0].labels["commit"].is_empty());

    let report = engine.cycle().await;
    assert!(!report.any_failed(), "{:?}", report.slots);
    let slots: BTreeSet<SlotKey> = report
        .slots
        .iter()
        .map(|r| {
            let s = &r.slot;
            (
                s.rule_name.clone(),
                s.project_id.clone(),
                s.project_name.clone(),
                s.service_account_id.clone(),
                s.service_account_name.clone(),
            )
        })
        .collect();
    assert!(slots.len() >= 3, "prod slots and the odd one: {slots:?}");
    assert!(
        slots.iter().any(|k| k.0 == "odd" && k.2 == odd_name),
        "{slots:?}"
    );
    let m = scrape(&client, addr).await;
    let ready = per_slot(&m, "keyrotd_slot_ready");
    assert_eq!(ready.keys().cloned().collect::<BTreeSet<_>>(), slots);
    assert!(
        ready.values().all(|v| *v == 0.0),
        "surveyed before their first key: {ready:?}"
    );
    assert!(m.family("keyrotd_slot_key_age_seconds").is_empty());

    // The second cycle surveys what the first promoted.
    let report = engine.cycle().await;
    assert!(!report.any_failed(), "{:?}", report.slots);
    let now = keyrotd::rotation::Clock::now(&w.clock).timestamp() as f64;
    let m = scrape(&client, addr).await;
    for family in PER_SLOT {
        let got = per_slot(&m, family);
        assert_eq!(
            got.keys().cloned().collect::<BTreeSet<_>>(),
            slots,
            "{family}"
        );
    }
    assert!(per_slot(&m, "keyrotd_slot_ready")
        .values()
        .all(|v| *v == 1.0));
    let age = per_slot(&m, "keyrotd_slot_key_age_seconds");
    let promoted = per_slot(&m, "keyrotd_slot_last_rotation_timestamp_seconds");
    let due = per_slot(&m, "keyrotd_slot_next_rotation_timestamp_seconds");
    for k in &slots {
        assert!((0.0..120.0).contains(&age[k]), "{k:?}: age {}", age[k]);
        assert!(
            (promoted[k] - now).abs() < 120.0,
            "{k:?}: promoted {}",
            promoted[k]
        );
        let max_age = if k.0 == "odd" { 30.0 } else { 90.0 } * 86400.0;
        let expected = now - age[k] + max_age;
        assert!(
            (due[k] - expected).abs() < 5.0,
            "{k:?}: due {} vs {expected}",
            due[k]
        );
    }
    // Names only: no key id, path or secret in any label.
    let text = get(&client, addr, "/metrics").await.1;
    for r in &report.slots {
        assert!(!text.contains(&r.slot.path), "{}", r.slot.path);
    }
    assert!(!text.contains("sk-"), "no key material");
    token.cancel();
}

/// A slot that is no longer surveyed (its project archived, then every slot once the
/// rule stops matching) loses every per-slot series at the next cycle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_of_slots_that_disappear_are_dropped() {
    let scenario = Scenario::new(34)
        .projects(6)
        .service_accounts_per_project(1);
    let w = World::new(scenario, Stores::File, "").await;
    let engine = w.engine(false).await;
    for _ in 0..2 {
        let report = engine.cycle().await;
        assert!(!report.any_failed(), "{:?}", report.slots);
    }
    let m = parse_exposition(&engine.metrics.render(None)).expect("exposition");
    let before = per_slot(&m, "keyrotd_slot_ready");
    assert!(before.len() >= 2, "{before:?}");
    let gone = before.keys().next().unwrap().1.clone();
    assert!(w.sim.archive_project(&gone));

    let report = engine.cycle().await;
    assert!(!report.any_failed(), "{:?}", report.slots);
    let m = parse_exposition(&engine.metrics.render(None)).expect("exposition");
    for family in PER_SLOT {
        let now = per_slot(&m, family);
        assert_eq!(now.len(), before.len() - 1, "{family}: {now:?}");
        assert!(now.keys().all(|k| k.1 != gone), "{family}: {gone} dropped");
    }

    // The rule changed so that it matches nothing: a new engine on the same metrics.
    let cfg = keyrotd::config::Config::from_toml(
        &w.toml
            .replace("project = \"prod-*\"", "project = \"nothing-*\""),
    )
    .expect("config");
    let mut changed = keyrotd::app::build_engine(&cfg, false)
        .await
        .expect("engine builds");
    changed.metrics = engine.metrics.clone();
    let report = changed.cycle().await;
    assert!(report.slots.is_empty(), "{:?}", report.slots);
    let m = parse_exposition(&changed.metrics.render(None)).expect("exposition");
    for family in PER_SLOT {
        assert!(
            m.family(family).is_empty(),
            "{family}: {:?}",
            m.family(family)
        );
    }
}

/// `promtool check metrics` on `text`: `None` when promtool is not installed (outside
/// CI only; under CI its absence fails the test).
fn promtool_check(text: &str) -> Option<String> {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!(
                "SKIPPED promtool check metrics: promtool not runnable ({e}); \
                 apt-get install prometheus (scripts/test installs it)"
            );
            return None;
        }
        Err(e) => panic!("promtool not runnable under CI ({e}): scripts/test installs it"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{said}"
    );
    Some(said)
}

/// The series budget (README, "Metrics"): a 2,000-project organization, one managed
/// service account per project, stays at 4 series per slot plus a fixed few dozen, and
/// its scrape passes `promtool check metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_projects_stay_within_the_series_budget() {
    let scenario = Scenario::new(35)
        .projects(2000)
        .service_accounts_per_project(1)
        .keys_per_service_account(1)
        .user_keys_per_project(1)
        .stale_fraction(0.1);
    let mut w = World::new(scenario, Stores::File, "").await;
    w.toml = w
        .toml
        .replace("project = \"prod-*\"", "project = \"*\"")
        .replace("concurrency = 4", "concurrency = 16");
    let engine = w.engine(false).await;
    let started = std::time::Instant::now();
    for cycle in 1..=2 {
        let report = engine.cycle().await;
        assert!(
            !report.any_failed(),
            "cycle {cycle}: {:?}",
            report.scan_error
        );
        assert_eq!(report.slots.len(), 2000, "cycle {cycle}");
    }
    let text = engine.metrics.render(Some(engine.client.stats()));
    let m = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}"));
    let per_slot_series: usize = PER_SLOT.iter().map(|f| m.family(f).len()).sum();
    let total = m.samples.len();
    eprintln!(
        "2,000 projects, 2,000 slots: {total} series ({per_slot_series} per-slot, {} other), \
         {} KiB, two cycles in {:?}",
        total - per_slot_series,
        text.len() / 1024,
        started.elapsed()
    );
    assert_eq!(per_slot_series, 4 * 2000, "four series per managed slot");
    assert!(
        total - per_slot_series <= 150,
        "fixed and API series: {}",
        total - per_slot_series
    );
    assert_eq!(m.get("keyrotd_slot_series_omitted", &[]), 0.0);
    assert!(
        m.samples.iter().all(|s| !s.labels.contains_key("key_id")),
        "no per-key series"
    );
    promtool_check(&text);
}

/// `keyrotd once --metrics-textfile` (the systemd timer's metrics, for node_exporter's
/// textfile collector): a good run, a failed one and an unwritable path, through the
/// binary. The file is replaced whole each run (no temporary file left beside it),
/// passes the exposition checks, says how the run went, and holds no secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_writes_its_metrics_for_the_textfile_collector() {
    use crate::daemon::{keyrotd, output_within, secrets, write_config};
    use std::os::unix::fs::PermissionsExt;
    let w = World::new(
        Scenario::new(64)
            .projects(3)
            .service_accounts_per_project(2)
            .stale_fraction(0.5),
        Stores::File,
        "",
    )
    .await;
    let config = write_config(&w, "", "");
    let dir = w.dir.path().join("textfile");
    std::fs::create_dir(&dir).unwrap();
    let file = dir.join("keyrotd.prom");
    let run = |config: &std::path::Path, extra: &[(&str, &str)], path: &std::path::Path| {
        let mut cmd = keyrotd(
            config,
            &[
                "--log-format",
                "json",
                "once",
                "--metrics-textfile",
                path.to_str().unwrap(),
            ],
        );
        for (k, v) in extra {
            cmd.env(k, v);
        }
        // The umask of the systemd unit (UMask=0077).
        // SAFETY: umask(2) is async-signal-safe and touches only the child.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::umask(0o077);
                Ok(())
            });
        }
        output_within(cmd, Duration::from_secs(60))
    };
    let check = |text: &str| -> Exposition {
        let m = parse_exposition(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        promtool_check(text);
        for s in secrets(&w) {
            assert!(!text.contains(&s), "a secret value in the metrics file");
        }
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(left, ["keyrotd.prom"], "only the metrics file is left");
        m
    };

    // A good run: one ok cycle, its rotations, a last success of now.
    let before = chrono::Utc::now().timestamp() as f64;
    let (c, f) = (config.clone(), file.clone());
    let out = tokio::task::spawn_blocking(move || run(&c, &[], &f))
        .await
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "{log}");
    let text = std::fs::read_to_string(&file).unwrap();
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o644,
        "node_exporter (another user) reads it, umask 077 or not"
    );
    let m = check(&text);
    assert_eq!(m.get("keyrotd_cycles_total", &[("result", "ok")]), 1.0);
    assert_eq!(m.get("keyrotd_cycles_total", &[("result", "failed")]), 0.0);
    let minted = w.sim.all_keys().iter().filter(|k| k.minted).count();
    assert!(minted >= 1);
    assert_eq!(
        m.get("keyrotd_rotations_total", &[("outcome", "completed")]),
        minted as f64
    );
    let last = m.get("keyrotd_last_success_timestamp_seconds", &[]);
    assert!(
        last >= before - 1.0 && last <= chrono::Utc::now().timestamp() as f64 + 1.0,
        "{last}"
    );
    assert!(!m.family("keyrotd_api_requests_total").is_empty(), "{text}");

    // A failed run (the admin key refused: the scan fails) replaces it: a failed cycle,
    // no success in this run (alerts carry the last one with max_over_time).
    let (c, f) = (config.clone(), file.clone());
    let out = tokio::task::spawn_blocking(move || {
        run(
            &c,
            &[(crate::e2e::ADMIN_KEY_ENV, "sk-admin-wrong-0000000000000000")],
            &f,
        )
    })
    .await
    .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{log}");
    let m = check(&std::fs::read_to_string(&file).unwrap());
    assert_eq!(m.get("keyrotd_cycles_total", &[("result", "failed")]), 1.0);
    assert_eq!(m.get("keyrotd_cycles_total", &[("result", "ok")]), 0.0);
    assert_eq!(m.get("keyrotd_last_success_timestamp_seconds", &[]), 0.0);
    assert!(
        m.family("keyrotd_api_requests_total").iter().any(|s| s
            .labels
            .get("status")
            .map(String::as_str)
            == Some("401")),
        "the refused requests are counted"
    );

    // A path that cannot be written: the cycle still runs, the run exits 1 and says
    // which file and why.
    let missing = w.dir.path().join("no-such-dir").join("keyrotd.prom");
    let (c, f) = (config.clone(), missing.clone());
    let out = tokio::task::spawn_blocking(move || run(&c, &[], &f))
        .await
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{log}");
    let line = event_line(&log, "metrics.textfile_failed");
    assert!(line.contains("\"level\":\"ERROR\""), "{line}");
    assert!(line.contains(&missing.display().to_string()), "{line}");
    assert!(line.contains("No such file or directory"), "{line}");
    assert!(log.contains("\"cycle.finished\""), "{log}");
    assert!(!missing.parent().unwrap().exists());

    // It describes a cycle that ran: a dry run, which performs nothing, refuses it.
    let out = tokio::task::spawn_blocking(move || {
        output_within(
            keyrotd(
                &config,
                &["once", "--dry-run", "--metrics-textfile", "/tmp/x.prom"],
            ),
            Duration::from_secs(30),
        )
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--metrics-textfile"), "{err}");
}

/// `keyrotd once --metrics-push` (the CronJob's metrics, for a Pushgateway): the run's
/// metrics arrive as one PUT to the grouping key's URL, credentials in the URL as basic
/// auth; a refused push (HTTP 400 with the gateway's reason) and an unreachable gateway
/// fail the run (exit 1) naming the URL without its password; a URL without a grouping
/// key is a usage error (exit 2) before anything runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_pushes_its_metrics_to_a_pushgateway() {
    use crate::daemon::{keyrotd, output_within, secrets, write_config};
    use std::sync::{Arc, Mutex};
    type Got = Arc<Mutex<Vec<(String, String, Option<String>, Option<String>, String)>>>;
    let got: Got = Arc::default();
    let refuse = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (sink, no) = (got.clone(), refuse.clone());
    let app = axum::Router::new().fallback(
        move |method: axum::http::Method,
              uri: axum::http::Uri,
              headers: axum::http::HeaderMap,
              body: String| {
            let (sink, no) = (sink.clone(), no.clone());
            async move {
                let h = |n: &str| {
                    headers
                        .get(n)
                        .map(|v| v.to_str().unwrap_or_default().to_string())
                };
                sink.lock().unwrap().push((
                    method.to_string(),
                    uri.path().to_string(),
                    h("authorization"),
                    h("content-type"),
                    body,
                ));
                if no.load(std::sync::atomic::Ordering::SeqCst) {
                    (
                        axum::http::StatusCode::BAD_REQUEST,
                        "pushed metrics are invalid or inconsistent with existing metrics",
                    )
                } else {
                    (axum::http::StatusCode::OK, "")
                }
            }
        },
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let w = World::new(
        Scenario::new(65)
            .projects(2)
            .service_accounts_per_project(2)
            .stale_fraction(0.5),
        Stores::File,
        "",
    )
    .await;
    let config = write_config(&w, "", "");
    let run = |url: String| {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            output_within(
                keyrotd(
                    &config,
                    &["--log-format", "json", "once", "--metrics-push", &url],
                ),
                Duration::from_secs(60),
            )
        })
    };
    let url = format!("http://ops:pg-s3cret@{addr}/metrics/job/keyrotd-cron/org/acme");

    let out = run(url.clone()).await.unwrap();
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "{log}");
    let pushes = got.lock().unwrap().clone();
    assert_eq!(pushes.len(), 1, "one push per run");
    let (method, path, auth, ctype, body) = &pushes[0];
    assert_eq!(method, "PUT", "PUT replaces the group");
    assert_eq!(path, "/metrics/job/keyrotd-cron/org/acme");
    // base64("ops:pg-s3cret")
    assert_eq!(auth.as_deref(), Some("Basic b3BzOnBnLXMzY3JldA=="));
    assert!(
        ctype
            .as_deref()
            .unwrap_or_default()
            .starts_with("text/plain; version=0.0.4"),
        "{ctype:?}"
    );
    let m = parse_exposition(body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    promtool_check(body);
    assert_eq!(m.get("keyrotd_cycles_total", &[("result", "ok")]), 1.0);
    for s in secrets(&w) {
        assert!(!body.contains(&s), "a secret value in the pushed metrics");
    }
    assert!(
        !log.contains("pg-s3cret"),
        "the gateway's password in the log"
    );

    // Refused: exit 1, the gateway's reason and status, the URL without the password.
    refuse.store(true, std::sync::atomic::Ordering::SeqCst);
    let out = run(url.clone()).await.unwrap();
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{log}");
    let line = event_line(&log, "metrics.push_failed");
    assert!(line.contains("HTTP 400"), "{line}");
    assert!(
        line.contains("inconsistent with existing metrics"),
        "{line}"
    );
    assert!(
        line.contains(&format!("{addr}/metrics/job/keyrotd-cron")),
        "{line}"
    );
    assert!(!log.contains("pg-s3cret"), "{line}");
    assert!(log.contains("\"cycle.finished\""), "the cycle ran first");

    // Unreachable: exit 1 within the push timeout, saying so.
    let closed = free_port();
    let out = run(format!(
        "http://ops:pg-s3cret@127.0.0.1:{closed}/metrics/job/keyrotd"
    ))
    .await
    .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{log}");
    let line = event_line(&log, "metrics.push_failed");
    assert!(line.contains(&format!("127.0.0.1:{closed}")), "{line}");
    assert!(!log.contains("pg-s3cret"), "{line}");

    // No grouping key: a usage error naming the flag, nothing run, nothing pushed.
    let before = got.lock().unwrap().len();
    let out = run(format!("http://ops:pg-s3cret@{addr}/metrics"))
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--metrics-push"), "{err}");
    assert!(err.contains("/metrics/job/<job>"), "{err}");
    assert!(!err.contains("pg-s3cret"), "{err}");
    assert_eq!(got.lock().unwrap().len(), before);
}

/// The one JSON log line of `log` whose event is `event`; panics, showing the log, when
/// there is none.
fn event_line<'a>(log: &'a str, event: &str) -> &'a str {
    let needle = format!("\"event\":\"{event}\"");
    log.lines()
        .find(|l| l.contains(&needle))
        .unwrap_or_else(|| panic!("no {event} in\n{log}"))
}
