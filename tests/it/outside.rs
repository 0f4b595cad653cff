//! Keys made by hand on a managed service account raise `key.created_outside`
//! (the audit log's `api_key.created` by a dashboard session); keyrotd's own mints never.

use std::time::Duration;

use crate::e2e::{captured_logs, Stores, World};
use keyrotd::sim::{Route, Scenario};

const DAY: Duration = Duration::from_secs(86400);

/// Two prod slots (`prod-payments`, `prod-search`), one service account each, plus
/// a staging project no rule manages.
fn scenario(seed: u64) -> Scenario {
    Scenario::new(seed)
        .projects(4)
        .service_accounts_per_project(1)
        .keys_per_service_account(1)
        .user_keys_per_project(1)
}

/// 30 projects of 9 keys each (270: three audit-log requests for their creators).
fn many_keys(seed: u64) -> Scenario {
    Scenario::new(seed)
        .projects(30)
        .service_accounts_per_project(2)
        .keys_per_service_account(4)
        .user_keys_per_project(1)
}

/// The first service account of the project named `name`: (project id, account id).
fn account_of(w: &World, name: &str) -> (String, String) {
    let p = w
        .sim
        .projects()
        .into_iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("project {name}"));
    let sa = w.sim.service_accounts(&p.id)[0].id.clone();
    (p.id, sa)
}

fn outside_lines(logs: &Option<crate::e2e::Logs>, key_id: &str) -> usize {
    logs.as_ref()
        .map_or(0, |l| l.lines_with(&["key.created_outside", key_id]).len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_made_by_hand_on_a_managed_account_is_reported_with_its_creator() {
    let logs = captured_logs();
    let w = World::new(scenario(81), Stores::File, "").await;
    let e = w.engine(false).await;
    // Two rotations of every slot: keyrotd's mints never count.
    assert!(!e.cycle().await.any_failed());
    w.advance(91 * DAY);
    assert!(!e.cycle().await.any_failed());
    w.advance(Duration::from_secs(7200));
    assert!(!e.cycle().await.any_failed());
    // (A seeded key the organization's owner made within the lookback may count.)
    let base = e.metrics.keys_created_outside();
    w.advance(Duration::from_secs(900));
    assert!(!e.cycle().await.any_failed());
    assert_eq!(e.metrics.keys_created_outside(), base, "keyrotd's mints");
    for k in w.minted_live() {
        assert_eq!(outside_lines(&logs, &k), 0, "minted {k}");
    }

    let (project, sa) = account_of(&w, "prod-payments");
    let hand = w
        .sim
        .create_service_account_key_by_hand(&project, &sa, "mallory@example.com", "laptop")
        .expect("created");
    // Not managed: a staging account, and a user's own key in a prod project.
    let (staging, staging_sa) = account_of(&w, "staging-payments");
    let unmanaged = w
        .sim
        .create_service_account_key_by_hand(&staging, &staging_sa, "eve@example.com", "x")
        .unwrap();
    let own = w
        .sim
        .create_key_by_hand(&project, "trent@example.com", "mine")
        .unwrap();

    w.advance(Duration::from_secs(60));
    let r = e.cycle().await;
    assert!(!r.any_failed(), "{:?}", r.slots);
    assert_eq!(e.metrics.keys_created_outside(), base + 1);
    let text = e.metrics.render(None);
    let want = format!("keyrotd_keys_created_outside_total {}", base + 1);
    assert!(text.lines().any(|l| l == want), "{text}");
    if let Some(l) = &logs {
        let lines = l.lines_with(&["key.created_outside", &hand.id]);
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(lines[0].contains("WARN"), "{}", lines[0]);
        assert!(lines[0].contains("mallory@example.com"), "{}", lines[0]);
        assert!(lines[0].contains(&sa), "{}", lines[0]);
        assert!(lines[0].contains(&project), "{}", lines[0]);
        assert_eq!(outside_lines(&logs, &unmanaged.id), 0);
        assert_eq!(outside_lines(&logs, &own.id), 0);
    }

    // Said once: the next cycle, whose look overlaps this one, says nothing new.
    w.advance(Duration::from_secs(900));
    assert!(!e.cycle().await.any_failed());
    assert_eq!(e.metrics.keys_created_outside(), base + 1);
    if logs.is_some() {
        assert_eq!(outside_lines(&logs, &hand.id), 1);
    }

    // The plan knows who created each key.
    let survey = e.survey().await.unwrap();
    let plan = e.plan(&survey);
    let creator = |id: &str| {
        plan.keys
            .iter()
            .find(|k| k.key_id() == id)
            .and_then(|k| k.creator)
    };
    assert_eq!(creator(&hand.id), Some("mallory@example.com"));
    assert_eq!(creator(&own.id), Some("trent@example.com"));
    for k in w.minted_live() {
        assert_eq!(creator(&k), Some("keyrotd"), "{k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_cycle_reports_a_key_made_by_hand_within_the_lookback() {
    let w = World::new(scenario(82), Stores::File, "").await;
    let (project, sa) = account_of(&w, "prod-search");
    let hand = w
        .sim
        .create_service_account_key_by_hand(&project, &sa, "bob@example.com", "ci")
        .unwrap();
    w.advance(Duration::from_secs(3600));
    let logs = captured_logs();
    let e = w.engine(false).await;
    assert!(!e.cycle().await.any_failed());
    assert!(e.metrics.keys_created_outside() >= 1);
    if logs.is_some() {
        assert_eq!(outside_lines(&logs, &hand.id), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_audit_log_permission_everything_else_works() {
    let w = World::new(scenario(83), Stores::File, "").await;
    let (project, sa) = account_of(&w, "prod-payments");
    w.sim
        .create_service_account_key_by_hand(&project, &sa, "bob@example.com", "ci")
        .unwrap();
    w.sim.update_faults(|f| {
        *f = std::mem::take(f).fail_next(Route::ListAuditLogs, 403, 1000);
    });
    let e = w.engine(false).await;
    let r = e.cycle().await;
    assert!(!r.any_failed(), "{:?} {:?}", r.slots, r.other_failures);
    assert!(r.slots.iter().all(|s| s.outcome.is_ok()));
    assert_eq!(e.metrics.keys_created_outside(), 0);
    let survey = e
        .survey()
        .await
        .expect("the survey works without the audit log");
    assert!(matches!(survey.key_creations, Some(Err(_))));
    assert!(survey.inventory.creators.is_none());
    let plan = e.plan(&survey);
    assert!(plan.keys.iter().all(|k| k.creator.is_none()));
    // A dry run reads the audit log for the plan but reports nothing.
    w.sim.update_faults(|f| f.fail_next.clear());
    let dry = w.engine(true).await;
    assert!(!dry.cycle().await.any_failed());
    assert_eq!(dry.metrics.keys_created_outside(), 0);
}

/// The creators come from the audit log while the scan lists: one request per 100
/// listed keys (`resource_ids[]`), one page each, and none for entries of keys
/// deleted since (the log keeps every creation; a scan reads only the listed keys').
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creators_are_read_for_the_listed_keys_only_one_request_per_hundred() {
    let w = World::new(many_keys(84), Stores::File, "").await;
    // A tenth of the keys deleted: their creation entries stay in the log.
    let all = w.sim.all_keys();
    let deleted: Vec<String> = all.iter().step_by(10).map(|k| k.id.clone()).collect();
    for k in &deleted {
        assert!(w.sim.delete_key(k));
    }
    let listed = all.len() - deleted.len();
    let e = w.engine(true).await;
    let before = w.sim.requests_to(Route::ListAuditLogs).len();
    let survey = e.survey().await.expect("survey");
    let audit: Vec<_> = w.sim.requests_to(Route::ListAuditLogs)[before..].to_vec();
    assert_eq!(
        audit.len(),
        listed.div_ceil(100),
        "one request per 100 listed keys"
    );
    for r in &audit {
        assert_eq!(r.status, 200);
        let ids = r.query.matches("resource_ids%5B%5D=").count();
        assert!((1..=100).contains(&ids), "{ids} ids in {}", r.query);
        assert!(!r.query.contains("after="), "one page each: {}", r.query);
    }
    let Some(Ok(entries)) = &survey.key_creations else {
        panic!(
            "creations read: {:?}",
            survey.key_creations.as_ref().map(|r| r.is_ok())
        );
    };
    assert_eq!(entries.len(), listed, "one creation per listed key");
    let read: std::collections::BTreeSet<String> = entries
        .iter()
        .filter_map(|e| match &e.event {
            keyrotd::openai::models::AuditEvent::ApiKeyCreated { id: Some(id), .. } => {
                Some(id.clone())
            }
            _ => None,
        })
        .collect();
    for k in &deleted {
        assert!(!read.contains(k), "deleted key {k} read");
    }
    let creators = survey.inventory.creators.as_ref().expect("creators");
    assert_eq!(creators.len(), listed, "every listed key's creator");
}

/// A process asks the audit log only for keys it has not seen: a daemon's second look
/// sends one request, for the one key made since, and still knows every creator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_survey_asks_only_for_keys_not_seen_yet() {
    let w = World::new(many_keys(85), Stores::File, "").await;
    let e = w.engine(true).await;
    let first = e.survey().await.expect("survey");
    let listed = first.inventory.key_count();
    assert!(listed > 200, "{listed} keys");
    let before = w.sim.requests_to(Route::ListAuditLogs).len();
    let (project, sa) = account_of(&w, "prod-payments");
    let hand = w
        .sim
        .create_service_account_key_by_hand(&project, &sa, "carol@example.com", "laptop")
        .expect("a key by hand");
    w.advance(Duration::from_secs(600));
    let second = e.survey().await.expect("survey");
    let audit: Vec<_> = w.sim.requests_to(Route::ListAuditLogs)[before..].to_vec();
    assert_eq!(audit.len(), 1, "one request for the new key");
    assert_eq!(
        audit[0].query.matches("resource_ids").count(),
        1,
        "{}",
        audit[0].query
    );
    assert!(audit[0].query.contains(&hand.id), "{}", audit[0].query);
    let creators = second.inventory.creators.as_ref().expect("creators");
    assert_eq!(
        creators.len(),
        listed + 1,
        "every creator, the cached ones too"
    );
    assert_eq!(
        creators.get(&hand.id).map(String::as_str),
        Some("carol@example.com")
    );
    // A fresh process (`keyrotd plan`, `once`) asks for every key again.
    let before = w.sim.requests_to(Route::ListAuditLogs).len();
    let fresh = w.engine(true).await;
    fresh.survey().await.expect("survey");
    let n = w.sim.requests_to(Route::ListAuditLogs).len() - before;
    assert_eq!(n, (listed + 1).div_ceil(100));
}
