//! Webhook notifications end to end: a real receiver on loopback gets the payloads for
//! completed and failed rotations and stale user keys, filtered and deduplicated, with
//! retries on 5xx/429, and never a secret value.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::e2e::{Stores, World, ADMIN_KEY};
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use keyrotd::config::{NotifyConfig, NotifyEvent, WebhookConfig, WebhookFormat};
use keyrotd::notify::{Notice, Notifier};
use keyrotd::openai::models::OwnerType;
use keyrotd::rotation::SlotOutcome;
use keyrotd::sim::{RejectVerification, Scenario};
use serde_json::Value;

const FLUSH: Duration = Duration::from_secs(20);

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Received {
    path: String,
    body: String,
    /// The status the receiver answered.
    status: u16,
}

/// A webhook receiver that answers `fail_status` to the first `fail_first` requests.
#[derive(Clone)]
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    fail_first: Arc<AtomicUsize>,
    fail_status: u16,
    addr: SocketAddr,
}

impl Receiver {
    async fn start(fail_first: usize, fail_status: u16) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let r = Receiver {
            got: Arc::default(),
            fail_first: Arc::new(AtomicUsize::new(fail_first)),
            fail_status,
            addr: listener.local_addr().expect("addr"),
        };
        let app = axum::Router::new().fallback(receive).with_state(r.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        r
    }

    /// A URL with a secret-looking path, like a Slack incoming webhook.
    fn url(&self, name: &str) -> String {
        format!(
            "http://{}/services/T0SECRET/{name}/XyZsecretTOKEN",
            self.addr
        )
    }

    /// Successfully received bodies sent to `name`'s URL, parsed.
    fn delivered(&self, name: &str) -> Vec<Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.status == 200 && r.path.contains(&format!("/{name}/")))
            .map(|r| serde_json::from_str(&r.body).expect("payload is JSON"))
            .collect()
    }

    fn all(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

async fn receive(State(r): State<Receiver>, uri: Uri, body: String) -> StatusCode {
    let fail = r
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let status = if fail { r.fail_status } else { 200 };
    r.got.lock().unwrap().push(Received {
        path: uri.path().to_string(),
        body,
        status,
    });
    StatusCode::from_u16(status).unwrap()
}

fn hook(env: &str, url: &str, format: &str, events: &[&str]) -> String {
    std::env::set_var(env, url);
    let events: Vec<String> = events.iter().map(|e| format!("{e:?}")).collect();
    format!(
        "\n[[notify.webhooks]]\nurl_env = \"{env}\"\nformat = \"{format}\"\nevents = [{}]\n",
        events.join(", ")
    )
}

/// Every secret the simulator knows (live keys, deleted keys, the admin key).
fn secrets(w: &World) -> Vec<String> {
    let mut out: Vec<String> = w.sim.all_keys().into_iter().map(|k| k.value).collect();
    out.extend(
        w.sim
            .deleted_keys()
            .iter()
            .filter_map(|id| w.sim.key_value(id)),
    );
    out.push(ADMIN_KEY.to_string());
    out
}

/// Whether `text` holds `sk-` followed by 8 or more key characters (`sk-...uEV0`, the
/// API's own redaction, is fine).
fn has_key_shaped_token(text: &str) -> bool {
    text.match_indices("sk-").any(|(i, _)| {
        text[i + 3..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
            .count()
            >= 8
    })
}

fn assert_no_secrets(w: &World, r: &Receiver) {
    let secrets = secrets(w);
    assert!(secrets.len() > 5);
    for got in r.all() {
        for s in &secrets {
            assert!(
                !got.body.contains(s.as_str()),
                "a secret value reached the webhook: {}",
                got.path
            );
        }
        assert!(
            !has_key_shaped_token(&got.body),
            "nothing key-shaped in a payload: {}",
            got.body
        );
    }
}

fn scenario(seed: u64) -> Scenario {
    Scenario::new(seed)
        .projects(6)
        .service_accounts_per_project(2)
        .user_keys_per_project(1)
        .stale_fraction(0.5)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_rotations_and_stale_user_keys_are_announced_once() {
    let receiver = Receiver::start(0, 500).await;
    let mut w = World::new(scenario(51), Stores::File, "").await;
    w.toml.push_str(&hook(
        "KEYROTD_TEST_HOOK_ALL",
        &receiver.url("all"),
        "json",
        &[],
    ));
    w.toml.push_str(&hook(
        "KEYROTD_TEST_HOOK_SLACK",
        &receiver.url("slack"),
        "slack",
        &["key.stale_user"],
    ));
    let engine = w.engine(false).await;
    assert!(
        !format!("{:?}", engine.notifier).contains("SECRET"),
        "Debug shows scheme and host only: {:?}",
        engine.notifier
    );

    let report = engine.cycle().await;
    assert!(!report.any_failed(), "{:?}", report.slots);
    engine.notifier.flush(FLUSH).await;

    let stale_user: BTreeSet<String> = w
        .truth
        .keys
        .iter()
        .filter(|k| k.stale && k.owner_type == OwnerType::User && !k.project_archived)
        .map(|k| k.key_id.clone())
        .collect();
    assert!(!stale_user.is_empty(), "the scenario has stale user keys");
    let rotated: Vec<(String, String, String)> = report
        .slots
        .iter()
        .filter_map(|s| match &s.outcome {
            Ok(SlotOutcome::Rotated { key_id }) => Some((
                s.slot.project_id.clone(),
                s.slot.service_account_id.clone(),
                key_id.clone(),
            )),
            _ => None,
        })
        .collect();
    assert!(rotated.len() >= 2);

    // The generic JSON hook: every completed rotation and every stale user key.
    let all = receiver.delivered("all");
    let completed: BTreeSet<(String, String, String)> = all
        .iter()
        .filter(|v| v["event"] == "rotation.completed")
        .map(|v| {
            assert_eq!(v["rule"], "prod");
            assert_eq!(v["stores"], serde_json::json!(["file"]));
            assert_eq!(v["source"], "keyrotd");
            let ts = v["timestamp"].as_str().expect("timestamp");
            chrono::DateTime::parse_from_rfc3339(ts).expect("RFC 3339 timestamp");
            (
                v["project_id"].as_str().unwrap().to_string(),
                v["service_account_id"].as_str().unwrap().to_string(),
                v["key_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(completed, rotated.iter().cloned().collect());
    // The key ids announced are the ones the stores now serve.
    let served: BTreeSet<String> = w
        .store_states(&engine)
        .await
        .values()
        .filter_map(|s| s.current.as_ref().map(|c| c.key_id.clone()))
        .collect();
    assert!(completed.iter().all(|(_, _, k)| served.contains(k)));
    let announced: BTreeSet<String> = all
        .iter()
        .filter(|v| v["event"] == "key.stale_user")
        .map(|v| {
            assert_eq!(v["owner_type"], "user");
            assert!(v["owner_id"].as_str().unwrap().starts_with("user"));
            assert!(v["age_days"].as_u64().unwrap() > 90);
            v["key_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(announced, stale_user);
    assert_eq!(
        all.len(),
        rotated.len() + stale_user.len(),
        "nothing else was sent"
    );

    // The Slack hook: only stale user keys, as {"text": ...}.
    let slack = receiver.delivered("slack");
    assert_eq!(slack.len(), stale_user.len());
    for v in &slack {
        let obj = v.as_object().expect("object");
        assert_eq!(obj.len(), 1, "slack payload is just text: {v}");
        let text = v["text"].as_str().unwrap();
        assert!(
            text.contains("user-owned key") && stale_user.iter().any(|k| text.contains(k)),
            "{text}"
        );
    }

    // Next cycle: the same stale user keys are not announced again.
    let before = receiver.all().len();
    let report = engine.cycle().await;
    assert!(!report.any_failed());
    engine.notifier.flush(FLUSH).await;
    assert_eq!(receiver.all().len(), before, "stale user keys deduplicated");
    assert_no_secrets(&w, &receiver);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_rotations_are_announced_without_secrets() {
    let receiver = Receiver::start(0, 500).await;
    let mut w = World::new(scenario(52), Stores::File, "").await;
    // Rejected keys fail verification sooner (harmless if the harness changes).
    w.toml = w
        .toml
        .replace("verify_timeout = \"2s\"", "verify_timeout = \"300ms\"");
    w.toml.push_str(&hook(
        "KEYROTD_TEST_HOOK_FAILED",
        &receiver.url("failed"),
        "json",
        &["rotation.failed"],
    ));
    w.sim
        .update_faults(|f| f.reject_verification = RejectVerification::Minted);
    let engine = w.engine(false).await;
    let report = engine.cycle().await;
    assert!(report.failed_slots() >= 2, "{:?}", report.slots);
    engine.notifier.flush(FLUSH).await;

    let failed = receiver.delivered("failed");
    assert_eq!(
        failed.len(),
        report.failed_slots(),
        "one notice per failed slot"
    );
    let expected: BTreeSet<(String, String)> = report
        .slots
        .iter()
        .filter(|s| s.outcome.is_err())
        .map(|s| (s.slot.project_id.clone(), s.slot.service_account_id.clone()))
        .collect();
    let got: BTreeSet<(String, String)> = failed
        .iter()
        .map(|v| {
            assert_eq!(v["event"], "rotation.failed");
            assert_eq!(v["rule"], "prod");
            let error = v["error"].as_str().expect("error");
            assert!(error.contains("verification"), "{error}");
            (
                v["project_id"].as_str().unwrap().to_string(),
                v["service_account_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(got, expected);
    assert_no_secrets(&w, &receiver);
}

fn notifier_for(url: &str, env: &str, format: WebhookFormat) -> Notifier {
    std::env::set_var(env, url);
    Notifier::from_config(&NotifyConfig {
        webhooks: vec![WebhookConfig {
            url_env: Some(env.into()),
            url_file: None,
            format,
            events: vec![NotifyEvent::RotationCompleted],
        }],
    })
    .expect("notifier builds")
}

fn completed() -> Notice {
    Notice::RotationCompleted {
        project_id: "proj_retry".into(),
        service_account_id: "svc_acct_retry".into(),
        rule: "prod".into(),
        key_id: "key_retry".into(),
        stores: vec!["vault".into(), "aws".into()],
    }
}

#[tokio::test]
async fn server_errors_and_rate_limits_are_retried_until_delivered() {
    for status in [500, 429] {
        let receiver = Receiver::start(2, status).await;
        let n = notifier_for(
            &receiver.url("retry"),
            "KEYROTD_TEST_HOOK_RETRY",
            WebhookFormat::Json,
        );
        n.send(completed());
        // Filtered out: this hook only wants rotation.completed.
        n.send(Notice::RotationFailed {
            project_id: "p".into(),
            service_account_id: "s".into(),
            rule: "r".into(),
            error: "e".into(),
        });
        n.flush(FLUSH).await;
        let all = receiver.all();
        let statuses: Vec<u16> = all.iter().map(|r| r.status).collect();
        assert_eq!(statuses, vec![status, status, 200], "{status}");
        assert!(
            all.iter().all(|r| r.body == all[0].body),
            "same payload each time"
        );
        let got = receiver.delivered("retry");
        assert_eq!(got[0]["event"], "rotation.completed");
        assert_eq!(got[0]["key_id"], "key_retry");
        assert_eq!(got[0]["stores"], serde_json::json!(["vault", "aws"]));
    }
}

#[tokio::test]
async fn client_errors_are_not_retried_and_a_dead_hook_gives_up() {
    let receiver = Receiver::start(usize::MAX, 400).await;
    let n = notifier_for(
        &receiver.url("reject"),
        "KEYROTD_TEST_HOOK_REJECT",
        WebhookFormat::Slack,
    );
    n.send(completed());
    n.flush(FLUSH).await;
    let all = receiver.all();
    assert_eq!(all.len(), 1, "a 400 is final");
    let v: Value = serde_json::from_str(&all[0].body).unwrap();
    assert!(v["text"].as_str().unwrap().contains("key_retry"));

    // Nothing listens: all attempts fail, flush returns once it gave up.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let n = notifier_for(
        &format!("http://{dead}/hook"),
        "KEYROTD_TEST_HOOK_DEAD",
        WebhookFormat::Json,
    );
    let started = std::time::Instant::now();
    n.send(completed());
    n.flush(FLUSH).await;
    assert!(
        started.elapsed() < FLUSH,
        "gave up after its attempts, not at the flush timeout"
    );
}

#[test]
fn webhook_urls_come_only_from_env_or_file_and_never_show_in_errors() {
    let cfg = |url_env: Option<&str>, url_file: Option<&str>| NotifyConfig {
        webhooks: vec![WebhookConfig {
            url_env: url_env.map(Into::into),
            url_file: url_file.map(Into::into),
            format: WebhookFormat::Json,
            events: vec![],
        }],
    };
    let e = Notifier::from_config(&cfg(None, None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("notify.webhooks[0].url_env"), "{e}");
    let e = Notifier::from_config(&cfg(Some("A"), Some("/x")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("exactly one"), "{e}");
    let e = Notifier::from_config(&cfg(Some("KEYROTD_TEST_HOOK_SURELY_UNSET"), None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("KEYROTD_TEST_HOOK_SURELY_UNSET"), "{e}");
    std::env::set_var("KEYROTD_TEST_HOOK_NOT_URL", "ftp://files.example/T0SECRET");
    let e = Notifier::from_config(&cfg(Some("KEYROTD_TEST_HOOK_NOT_URL"), None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("url_env") && !e.contains("T0SECRET"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hook");
    std::fs::write(&file, "https://hooks.example.com/services/T0SECRET\n").unwrap();
    let n = Notifier::from_config(&cfg(None, Some(file.to_str().unwrap()))).unwrap();
    let debug = format!("{n:?}");
    assert!(
        debug.contains("https://hooks.example.com") && !debug.contains("T0SECRET"),
        "{debug}"
    );

    // Unknown event names are refused by the config loader, naming the value.
    let e = keyrotd::config::Config::from_toml(
        "[openai]\nadmin_key_env = \"X\"\n[[notify.webhooks]]\nurl_env = \"Y\"\nevents = [\"rotation.done\"]\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("rotation.done"), "{e}");
}

#[tokio::test]
async fn a_redirecting_receiver_gets_no_second_request_and_no_referer() {
    // The hook answers 307 towards another receiver: the webhook URL (a credential)
    // must not travel there, neither as a Referer nor with the payload.
    let target = Receiver::start(0, 200).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let to = format!("http://{}/elsewhere", target.addr);
    let app = axum::Router::new().fallback({
        let hits = hits.clone();
        move || {
            let (hits, to) = (hits.clone(), to.clone());
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                (
                    StatusCode::TEMPORARY_REDIRECT,
                    [(axum::http::header::LOCATION, to)],
                )
            }
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let n = notifier_for(
        &format!("http://{addr}/services/T0SECRET/redirect/XyZsecretTOKEN"),
        "KEYROTD_TEST_HOOK_REDIRECT",
        WebhookFormat::Json,
    );
    n.send(completed());
    n.flush(FLUSH).await;
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "a 3xx is final, not retried"
    );
    assert!(
        target.all().is_empty(),
        "the redirect target was never contacted"
    );
}
