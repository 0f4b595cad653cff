//! Usage-aware revocation (`policy.revoke_when = "unused"`) against the simulator.

use std::time::Duration;

use crate::e2e::{Stores, World};
use keyrotd::metrics::RevocationOutcome;
use keyrotd::policy::{Reason, Verdict};
use keyrotd::sim::Scenario;
use secrecy::ExposeSecret;

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86400);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_previous_key_is_kept_until_max_grace_an_unused_one_goes_after_min_grace() {
    let w = World::new(
        Scenario::new(51).projects(3).service_accounts_per_project(2).user_keys_per_project(0),
        Stores::File,
        "revoke_when = \"unused\"\nmin_grace = \"30m\"\nmax_grace = \"3d\"\nusage_report_delay = \"5m\"",
    )
    .await;
    let engine = w.engine(false).await;
    assert!(!engine.cycle().await.any_failed());
    w.advance(91 * DAY);
    let r = engine.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.slots);
    let states = w.store_states(&engine).await;
    assert!(states.len() >= 2);
    let mut previous: Vec<(String, String)> = states
        .values()
        .map(|s| {
            let id = s.book.previous_key_id.clone().expect("rotated");
            let value = w.sim.key_value(&id).expect("value");
            (id, value)
        })
        .collect();
    previous.sort();
    let (kept_id, kept_value) = previous[0].clone();

    // A consumer that never switched keeps calling with the old key.
    w.advance(2 * HOUR);
    assert!(w.sim.use_key(&kept_value));
    let r = engine.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.slots);
    assert!(
        w.sim.is_live(&kept_id),
        "a key in use is kept past the grace period"
    );
    for (id, _) in &previous[1..] {
        assert!(
            !w.sim.is_live(id),
            "an unused previous key {id} is revoked after min_grace"
        );
    }
    let metrics = engine.metrics.render(None);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("keyrotd_key_still_in_use_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    // The plan says why it is still alive.
    let survey = engine.survey().await.unwrap();
    let plan = engine.plan(&survey);
    let k = plan.keys.iter().find(|k| k.key_id() == kept_id).unwrap();
    assert_eq!(k.verdict, Verdict::Revoke);
    assert!(k.reasons.contains(&Reason::InUse), "{:?}", k.reasons);

    // Still used a day later: still kept. At max_grace it goes regardless.
    w.advance(DAY);
    assert!(w.sim.use_key(&kept_value));
    assert!(!engine.cycle().await.any_failed());
    assert!(w.sim.is_live(&kept_id));
    w.advance(2 * DAY);
    let revoked_before = engine.metrics.revocations(RevocationOutcome::Revoked);
    assert!(!engine.cycle().await.any_failed());
    assert!(!w.sim.is_live(&kept_id), "revoked at max_grace");
    assert!(engine.metrics.revocations(RevocationOutcome::Revoked) > revoked_before);
    // Every store still serves a live key.
    for st in w.store_states(&engine).await.values() {
        assert!(w
            .sim
            .use_key(st.current.as_ref().unwrap().api_key.expose_secret()));
    }
}

/// Issue 16's acceptance: usage, costs and audit logs of an organization of 2,000 keys
/// with a week of usage, read through the client, equal the simulator's ground truth
/// per key, in the fewest requests the pagination allows (counted by the simulator).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_costs_and_audit_logs_of_2000_keys_over_a_week_match_the_simulator() {
    use std::collections::BTreeMap;

    use keyrotd::openai::models::{
        AuditActorType, AuditLogQuery, EffectiveAt, UpdateKeyRequest, UsageQuery,
    };
    use keyrotd::openai::{Client, ClientConfig, Endpoint};
    use keyrotd::sim::{OwnerRef, Route, Sim, SimActor, PRICES};
    use secrecy::SecretString;

    const ADMIN: &str = "sk-admin-usage-acceptance-0123456789";
    let sim = Sim::with_seed(ADMIN, 16);
    let server = sim.start().await.expect("start sim");
    let client = Client::new(
        ClientConfig {
            base_url: server.base_url.clone(),
            request_timeout: Duration::from_secs(10),
            max_retries: 3,
            max_retry_after: Duration::from_secs(5),
            backoff_base: Duration::from_millis(5),
            max_pages: keyrotd::openai::DEFAULT_MAX_PAGES,
            max_response_bytes: keyrotd::openai::DEFAULT_MAX_RESPONSE_BYTES,
        },
        SecretString::from(ADMIN),
    )
    .unwrap();
    let week = 7 * 86_400;
    let start = sim.now() - week;

    // 20 projects of 100 keys: 90 of a service account's, created over the week (the
    // organization owner, in the dashboard), and 10 made by hand by a developer.
    let mut keys: Vec<(String, String)> = Vec::new(); // (project, key)
    let mut n = 0u64;
    let mut next = || {
        n = n
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        n >> 33
    };
    for p in 0..20 {
        let project = sim.add_project(&format!("prod-{p}"));
        let sa = sim.add_service_account(&project, "backend").unwrap();
        for i in 0..100 {
            let key = if i % 10 == 0 {
                sim.create_key_by_hand(&project, &format!("dev{p}@example.com"), &format!("h{i}"))
            } else {
                let at = start + (next() % (week as u64 / 2)) as i64;
                sim.add_key_at(
                    &project,
                    OwnerRef::ServiceAccount(sa.clone()),
                    &format!("k{i}"),
                    at,
                    None,
                )
            };
            keys.push((project.clone(), key.unwrap().id));
        }
    }
    assert_eq!(keys.len(), 2000);
    // A week of usage: injected requests and tokens, plus real calls with some keys.
    for (_, key) in &keys {
        for _ in 0..(next() % 6) {
            let at = start + (next() % week as u64) as i64;
            let (requests, input) = (1 + next() % 20, next() % 50_000);
            assert!(sim.record_usage(key, at, requests, input, input / 7));
        }
        // Before the window: never counted.
        sim.record_usage(key, start - 1, 5, 5, 5);
    }
    for (i, (_, key)) in keys.iter().enumerate().filter(|(i, _)| i % 97 == 0) {
        let value = SecretString::from(sim.key_value(key).unwrap());
        for _ in 0..(1 + i % 3) {
            client.verify_key(&value).await.unwrap();
        }
    }
    // Changes through the API, with the admin key: 100 updates, 50 deletions.
    for (project, key) in keys.iter().skip(1).step_by(20) {
        let req = UpdateKeyRequest {
            scopes: Some(vec!["api.all.read".into()]),
            ..UpdateKeyRequest::default()
        };
        client.update_api_key(project, key, &req).await.unwrap();
    }
    for (project, key) in keys.iter().skip(3).step_by(40) {
        client.delete_api_key(project, key).await.unwrap();
    }
    let end = sim.now() + 60;
    sim.clear_requests();

    // Usage: 8 or 9 daily buckets, 31 a page at most: one request.
    let usage = client
        .usage_completions(&UsageQuery {
            start_time: start,
            end_time: Some(end),
            bucket_width: Some("1d".into()),
            group_by: vec!["api_key_id".into()],
            limit: Some(31),
            ..UsageQuery::default()
        })
        .await
        .unwrap();
    let truth = sim.usage_totals(start, end);
    assert!(truth.len() > 1500, "{} keys with usage", truth.len());
    let mut got: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for r in usage.iter().flat_map(|b| &b.results) {
        let t = got.entry(r.api_key_id.clone().unwrap()).or_default();
        t.0 += r.num_model_requests;
        t.1 += r.input_tokens;
        t.2 += r.output_tokens;
    }
    let want: BTreeMap<String, (u64, u64, u64)> = truth
        .iter()
        .map(|(k, t)| (k.clone(), (t.requests, t.input_tokens, t.output_tokens)))
        .collect();
    assert_eq!(got, want);
    let verified = &keys[97].1;
    assert!(truth[verified].requests >= 2, "verify calls count");

    // Costs: daily buckets, 180 a page at most: one request.
    let costs = client
        .costs(&UsageQuery {
            start_time: start,
            end_time: Some(end),
            group_by: vec!["api_key_id".into()],
            limit: Some(180),
            ..UsageQuery::default()
        })
        .await
        .unwrap();
    let [(_, input_price), (_, output_price)] = PRICES;
    let mut cost: BTreeMap<String, f64> = BTreeMap::new();
    for r in costs.iter().flat_map(|b| &b.results) {
        *cost.entry(r.api_key_id.clone().unwrap()).or_default() += r.amount.as_ref().unwrap().value;
    }
    assert_eq!(cost.len(), truth.len());
    for (k, t) in &truth {
        let want =
            (t.input_tokens as f64 * input_price + t.output_tokens as f64 * output_price) / 1e6;
        assert!(
            (cost[k] - want).abs() <= 1e-9 * want.max(1.0),
            "{k}: {} vs {want}",
            cost[k]
        );
    }

    // Audit logs of the week: every entry, 100 a page.
    let audit = client
        .audit_logs(&AuditLogQuery {
            effective_at: EffectiveAt {
                gte: Some(start),
                ..EffectiveAt::default()
            },
            ..AuditLogQuery::default()
        })
        .await
        .unwrap();
    let ground = sim.audit_log();
    assert_eq!(
        ground.len(),
        20 + 2000 + 100 + 50,
        "accounts, keys, updates, deletions"
    );
    let count = |entries: Vec<(String, String)>| {
        let mut per: BTreeMap<(String, String), u32> = BTreeMap::new();
        for e in entries {
            *per.entry(e).or_default() += 1;
        }
        per
    };
    assert_eq!(
        count(
            audit
                .iter()
                .map(|e| (e.resource_id().unwrap().to_owned(), e.kind.clone()))
                .collect()
        ),
        count(
            ground
                .iter()
                .map(|e| (e.resource_id.clone(), e.kind.clone()))
                .collect()
        )
    );
    let admin_id = sim.admin_keys()[0].id.clone();
    for (e, g) in audit.iter().zip(&ground) {
        assert_eq!(e.id, g.id, "in the simulator's order");
        let actor = e.actor.as_ref().unwrap();
        match &g.actor {
            SimActor::AdminKey(id) => {
                assert_eq!(id, &admin_id);
                assert_eq!(actor.kind, AuditActorType::ApiKey);
                assert_eq!(
                    actor.api_key.as_ref().unwrap().id.as_deref(),
                    Some(id.as_str())
                );
            }
            SimActor::Session(_) => assert_eq!(actor.kind, AuditActorType::Session),
        }
    }
    let by_hand = audit
        .iter()
        .filter(|e| {
            e.actor
                .as_ref()
                .unwrap()
                .email()
                .is_some_and(|m| m.starts_with("dev"))
        })
        .count();
    assert_eq!(by_hand, 200);

    // The fewest requests: 1 + 1 + ceil(2170 / 100), each once, each a 200.
    let pages = ground.len().div_ceil(100);
    for (route, want) in [
        (Route::UsageCompletions, 1),
        (Route::Costs, 1),
        (Route::ListAuditLogs, pages),
    ] {
        let reqs = sim.requests_to(route);
        assert_eq!(reqs.len(), want, "{route}");
        assert!(reqs.iter().all(|r| r.status == 200), "{route}: {reqs:?}");
    }
    assert_eq!(sim.requests().len(), 2 + pages);
    let stats = client.stats().snapshot();
    assert!(
        stats.contains(&(Endpoint::ListAuditLogs, 200, pages as u64)),
        "{stats:?}"
    );
}

/// A page of hourly buckets grows with the organization (one result per key and
/// bucket): one larger than `openai.max_response_bytes` is asked for again with fewer
/// buckets until it fits, and the totals still equal the simulator's; only a single
/// bucket over the cap is an error, naming the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_page_over_max_response_bytes_is_read_again_in_smaller_pages() {
    use std::collections::BTreeMap;

    use keyrotd::openai::models::UsageQuery;
    use keyrotd::openai::{ApiError, Client, ClientConfig};
    use keyrotd::sim::{OwnerRef, Route, Sim};
    use secrecy::SecretString;

    const ADMIN: &str = "sk-admin-usage-pages-0123456789";
    const CAP: u64 = 64 << 10;
    let sim = Sim::with_seed(ADMIN, 17);
    let server = sim.start().await.expect("start sim");
    let client = Client::new(
        ClientConfig {
            base_url: server.base_url.clone(),
            request_timeout: Duration::from_secs(10),
            max_retries: 0,
            max_retry_after: Duration::from_secs(5),
            backoff_base: Duration::from_millis(5),
            max_pages: keyrotd::openai::DEFAULT_MAX_PAGES,
            max_response_bytes: CAP,
        },
        SecretString::from(ADMIN),
    )
    .unwrap();
    // 120 keys used in every one of 48 hours: about 30 KB a bucket, 1.5 MB in all.
    let project = sim.add_project("prod-usage");
    let sa = sim.add_service_account(&project, "backend").unwrap();
    let now = sim.now();
    let start = (now / 3600 - 48) * 3600;
    let mut keys = Vec::new();
    for i in 0..120 {
        let k = sim.add_key(
            &project,
            OwnerRef::ServiceAccount(sa.clone()),
            &format!("k{i}"),
        );
        keys.push(k.unwrap().id);
    }
    for h in 0..48 {
        for (i, k) in keys.iter().enumerate() {
            let n = 1 + (h * 7 + i as i64) as u64 % 13;
            assert!(sim.record_usage(k, start + h * 3600 + 60, n, 100 * n, 10 * n));
        }
    }
    let hourly = |limit| UsageQuery {
        start_time: start,
        end_time: Some(now),
        bucket_width: Some("1h".into()),
        group_by: vec!["project_id".into(), "api_key_id".into()],
        limit,
        ..UsageQuery::default()
    };
    for limit in [Some(168), None] {
        sim.clear_requests();
        let buckets = client.usage_completions(&hourly(limit)).await.unwrap();
        let mut got: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
        for r in buckets.iter().flat_map(|b| &b.results) {
            let t = got.entry(r.api_key_id.clone().unwrap()).or_default();
            t.0 += r.num_model_requests;
            t.1 += r.input_tokens;
            t.2 += r.output_tokens;
        }
        let want: BTreeMap<String, (u64, u64, u64)> = sim
            .usage_totals(start, now)
            .iter()
            .map(|(k, t)| (k.clone(), (t.requests, t.input_tokens, t.output_tokens)))
            .collect();
        assert_eq!(got.len(), 120, "limit {limit:?}");
        assert_eq!(got, want, "limit {limit:?}");
        let sent: Vec<String> = sim
            .requests()
            .iter()
            .filter(|r| r.route == Some(Route::UsageCompletions))
            .map(|r| r.query.clone())
            .collect();
        // Halving from 168 (or the default 24) to 1: a few refused pages, then the
        // buckets one page at a time; nothing asked for twice once it fitted.
        let fitted = sent
            .iter()
            .filter(|q| q.split('&').any(|p| p == "limit=1"))
            .count();
        assert!(fitted >= 48, "limit {limit:?}: {sent:?}");
        assert!(sent.len() <= fitted + 8, "limit {limit:?}: {sent:?}");
    }

    // A single bucket over the cap: 400 more keys in the last hour.
    for i in 0..400 {
        let k = sim.add_key(
            &project,
            OwnerRef::ServiceAccount(sa.clone()),
            &format!("m{i}"),
        );
        assert!(sim.record_usage(&k.unwrap().id, now - 60, 1, 1, 1));
    }
    let err = client
        .usage_completions(&hourly(Some(168)))
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::ResponseTooLarge { .. }), "{err:?}");
    assert!(
        err.to_string().contains("openai.max_response_bytes"),
        "{err}"
    );
}

/// A manual rotation within the previous rotation's grace period replaces the slot's
/// previous key in its state record; the key it forgets (minted by keyrotd, served by
/// no store) is an orphan to the sweep, and an orphan still in use since the latest
/// promotion is kept as a replaced key in use is: until `max_grace`, not only for the
/// grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_previous_key_forgotten_by_a_manual_rotation_in_use_is_kept_until_max_grace() {
    use keyrotd::rotation::RevokeOld;

    let w = World::new(
        Scenario::new(52).projects(1).service_accounts_per_project(1).user_keys_per_project(0),
        Stores::File,
        "revoke_when = \"unused\"\nmin_grace = \"30m\"\nmax_grace = \"3d\"\nusage_report_delay = \"5m\"",
    )
    .await;
    let engine = w.engine(false).await;
    assert!(!engine.cycle().await.any_failed());
    let served =
        |states: &std::collections::BTreeMap<(String, String), keyrotd::store::SlotState>| {
            assert_eq!(states.len(), 1, "{:?}", states.keys());
            let st = states.values().next().unwrap();
            let cur = st.current.as_ref().expect("served");
            (cur.key_id.clone(), cur.api_key.expose_secret().to_string())
        };
    // The first key keyrotd served, two hours old.
    w.advance(2 * HOUR);
    let (k0, k0_value) = served(&w.store_states(&engine).await);

    // Two manual rotations, the second within the first one's grace period.
    for _ in 0..2 {
        let survey = engine.survey().await.unwrap();
        let picked: Vec<_> = survey.views.iter().collect();
        let asked = w.clock_now();
        let r = engine
            .rotate_now(&picked, &survey, RevokeOld::Grace, asked)
            .await;
        assert!(!r.any_failed(), "{:?}", r.slots);
        w.advance(Duration::from_secs(60));
    }
    let states = w.store_states(&engine).await;
    let (k2, _) = served(&states);
    let st = states.values().next().unwrap();
    let k1 = st.book.previous_key_id.clone().expect("previous");
    assert!(k0 != k1 && k1 != k2 && k0 != k2);
    assert!(w.sim.is_live(&k0), "forgotten, not revoked at once");

    // A consumer that never switched keeps calling with the first key, past the grace
    // period (24 h) but within max_grace.
    w.advance(HOUR);
    assert!(w.sim.use_key(&k0_value));
    w.advance(DAY);
    assert!(w.sim.use_key(&k0_value));
    let r = engine.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.slots);
    assert!(
        w.sim.is_live(&k0),
        "an orphan in use is kept until max_grace"
    );
    assert!(
        !w.sim.is_live(&k1),
        "the unused previous key goes after min_grace"
    );
    assert!(w.sim.is_live(&k2));

    // At max_grace it goes, in use or not.
    w.advance(2 * DAY);
    let r = engine.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.slots);
    assert!(!w.sim.is_live(&k0), "revoked at max_grace");
    assert!(w
        .sim
        .use_key(served(&w.store_states(&engine).await).1.as_str()));
}
