//! Fuzzing Admin API response parsing: the models (`ListResponse<ProjectApiKey>` and
//! friends) on arbitrary text, on valid responses mutated as text and as JSON trees;
//! and the client itself against a tiny server answering whatever status and body the
//! case says. Nothing panics; errors never carry a key value from the body.
//!
//! Valid responses are taken from the simulator (which follows the spec excerpt).
//! CI runs 256 cases per property; a longer run:
//! `PROPTEST_CASES=100000 cargo test --release --test fuzz_api`.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use keyrotd::openai::models::{
    CreatedKey, CreatedServiceAccount, Deleted, ErrorResponse, ListResponse, Project,
    ProjectApiKey, ServiceAccount,
};
use keyrotd::openai::{Client, ClientConfig};
use keyrotd::sim::{Scenario, Sim};
use proptest::prelude::*;
use secrecy::SecretString;
use serde_json::Value;

const ADMIN: &str = "sk-admin-fuzz-0123456789abcdef";
/// A key value the fuzzed bodies carry; no error message may repeat it.
const PLANTED: &str = "sk-proj-PLANTEDsecretVALUE0123456789abcdefghij";

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(256)
}

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// Real response bodies from the simulator: project, key and service-account lists,
/// a created key, a created service account, a deletion, an error.
fn samples() -> &'static Vec<String> {
    static S: OnceLock<Vec<String>> = OnceLock::new();
    S.get_or_init(|| {
        rt().block_on(async {
            let sim = Sim::new(ADMIN);
            Scenario::new(3).projects(2).populate(&sim);
            let server = sim.start().await.unwrap();
            let http = reqwest::Client::new();
            let base = server.base_url.clone();
            let p = sim.projects()[0].id.clone();
            let sa = sim.service_accounts(&p)[0].id.clone();
            let key = sim.keys(&p)[0].id.clone();
            let get = |url: String| {
                let http = http.clone();
                async move {
                    http.get(url)
                        .bearer_auth(ADMIN)
                        .send()
                        .await
                        .unwrap()
                        .text()
                        .await
                        .unwrap()
                }
            };
            let post = |url: String, body: Value| {
                let http = http.clone();
                async move {
                    http.post(url)
                        .bearer_auth(ADMIN)
                        .json(&body)
                        .send()
                        .await
                        .unwrap()
                        .text()
                        .await
                        .unwrap()
                }
            };
            let out = vec![
                get(format!("{base}/organization/projects?limit=2")).await,
                get(format!("{base}/organization/projects/{p}/api_keys?limit=3")).await,
                get(format!("{base}/organization/projects/{p}/service_accounts")).await,
                post(
                    format!("{base}/organization/projects/{p}/service_accounts/{sa}/api_keys"),
                    serde_json::json!({"name": "keyrotd-fuzz"}),
                )
                .await,
                post(
                    format!("{base}/organization/projects/{p}/service_accounts"),
                    serde_json::json!({"name": "fuzz"}),
                )
                .await,
                http.delete(format!("{base}/organization/projects/{p}/api_keys/{key}"))
                    .bearer_auth(ADMIN)
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap(),
                get(format!("{base}/organization/projects/nope")).await,
            ];
            server.shutdown().await;
            out
        })
    })
}

/// Every model the client decodes; none may panic.
fn parse_all(text: &str) {
    let _ = serde_json::from_str::<ListResponse<ProjectApiKey>>(text);
    let _ = serde_json::from_str::<ListResponse<Project>>(text);
    let _ = serde_json::from_str::<ListResponse<ServiceAccount>>(text);
    let _ = serde_json::from_str::<CreatedKey>(text);
    let _ = serde_json::from_str::<CreatedServiceAccount>(text);
    let _ = serde_json::from_str::<Deleted>(text);
    let _ = serde_json::from_str::<ErrorResponse>(text);
    if let Ok(k) = serde_json::from_str::<ListResponse<ProjectApiKey>>(text) {
        for key in &k.data {
            let _ = (key.owner.id(), key.owner.name());
        }
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)),
        any::<u64>().prop_map(Value::from),
        "\\PC{0,16}".prop_map(Value::String),
        Just(Value::String(PLANTED.into())),
        Just(Value::String("service_account".into())),
        Just(Value::String("user".into())),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Replaces, removes or retypes the node at a pseudo-random path.
fn mutate_tree(v: &mut Value, mut pick: u64, replacement: Value, remove: bool) {
    let mut cur = v;
    loop {
        let n = match cur {
            Value::Object(m) => m.len(),
            Value::Array(a) => a.len(),
            _ => 0,
        };
        if n == 0 || pick % 3 == 0 {
            *cur = replacement;
            return;
        }
        let i = (pick as usize / 3) % n;
        pick /= 7;
        let last = pick == 0;
        match cur {
            Value::Object(m) => {
                let k = m.keys().nth(i).unwrap().clone();
                if last && remove {
                    m.remove(&k);
                    return;
                }
                cur = m.get_mut(&k).unwrap();
            }
            Value::Array(a) => {
                if last && remove {
                    a.remove(i);
                    return;
                }
                cur = &mut a[i];
            }
            _ => unreachable!(),
        }
    }
}

/// The tiny server: answers every request with the current (status, body).
struct Echo {
    reply: Arc<Mutex<(u16, Vec<u8>)>>,
    base: String,
}

fn echo() -> &'static Echo {
    static E: OnceLock<Echo> = OnceLock::new();
    E.get_or_init(|| {
        let reply = Arc::new(Mutex::new((200u16, b"{}".to_vec())));
        let r2 = reply.clone();
        let base = rt().block_on(async move {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
                .await
                .unwrap();
            let addr = listener.local_addr().unwrap();
            let app = axum::Router::new().fallback(move || {
                let r = r2.clone();
                async move {
                    let (status, body) = r.lock().unwrap().clone();
                    (
                        axum::http::StatusCode::from_u16(status)
                            .unwrap_or(axum::http::StatusCode::OK),
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        body,
                    )
                }
            });
            tokio::spawn(async move { axum::serve(listener, app).await });
            format!("http://{addr}/v1")
        });
        Echo { reply, base }
    })
}

/// Every client call against the echo server answering (status, body); returns the
/// error messages.
fn through_client(status: u16, body: Vec<u8>) -> Vec<String> {
    let e = echo();
    *e.reply.lock().unwrap() = (status, body);
    let client = Client::new(
        ClientConfig {
            base_url: e.base.clone(),
            request_timeout: Duration::from_secs(5),
            max_retries: 1,
            max_retry_after: Duration::from_millis(10),
            backoff_base: Duration::from_millis(1),
            max_pages: keyrotd::openai::DEFAULT_MAX_PAGES,
            max_response_bytes: keyrotd::openai::DEFAULT_MAX_RESPONSE_BYTES,
        },
        SecretString::from(ADMIN.to_string()),
    )
    .unwrap();
    rt().block_on(async {
        let mut errs = Vec::new();
        let mut note = |r: Result<(), keyrotd::openai::ApiError>| {
            if let Err(e) = r {
                errs.push(format!("{e} {e:?}"));
            }
        };
        note(client.list_projects(true).await.map(|_| ()));
        note(client.list_api_keys("proj_f").await.map(|_| ()));
        note(client.list_service_accounts("proj_f").await.map(|_| ()));
        let req = keyrotd::openai::models::CreateKeyRequest {
            name: Some("keyrotd-fuzz".into()),
            scopes: Vec::new(),
            expires_in_seconds: None,
        };
        note(
            client
                .create_service_account_key("proj_f", "svc_f", &req)
                .await
                .map(|_| ()),
        );
        note(
            client
                .create_service_account("proj_f", "fuzz", None)
                .await
                .map(|_| ()),
        );
        note(client.delete_api_key("proj_f", "key_f").await.map(|_| ()));
        note(
            client
                .verify_key(&SecretString::from("sk-proj-verify-me".to_string()))
                .await,
        );
        errs
    })
}

fn status() -> impl Strategy<Value = u16> {
    prop_oneof![
        6 => Just(200u16),
        1 => Just(201u16),
        1 => Just(204u16),
        1 => Just(400u16),
        1 => Just(401u16),
        1 => Just(403u16),
        1 => Just(404u16),
        1 => Just(409u16),
        1 => Just(429u16),
        1 => Just(500u16),
        1 => Just(503u16),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        .. ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_text_never_panics(text in "(?s)\\PC{0,300}") {
        parse_all(&text);
    }

    #[test]
    fn arbitrary_json_never_panics(v in json_value()) {
        parse_all(&v.to_string());
    }

    #[test]
    fn text_mutations_of_real_responses_never_panic(
        which in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        cut in 0usize..30,
        insert in "\\PC{0,8}",
    ) {
        let base = &samples()[which.index(samples().len())];
        let mut chars: Vec<char> = base.chars().collect();
        let a = at.index(chars.len().max(1)).min(chars.len());
        let b = (a + cut).min(chars.len());
        chars.splice(a..b, insert.chars());
        let text: String = chars.into_iter().collect();
        parse_all(&text);
    }

    #[test]
    fn tree_mutations_of_real_responses_never_panic(
        which in any::<prop::sample::Index>(),
        pick in any::<u64>(),
        replacement in json_value(),
        remove in any::<bool>(),
    ) {
        let base = &samples()[which.index(samples().len())];
        let mut v: Value = serde_json::from_str(base).unwrap();
        mutate_tree(&mut v, pick, replacement, remove);
        parse_all(&v.to_string());
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases().min(256).max(cases() / 20),
        failure_persistence: None,
        .. ProptestConfig::default()
    })]

    /// Whatever a server answers, every client call returns (no panic, no hang), and
    /// no error message repeats a key value the body carried.
    #[test]
    fn the_client_survives_any_answer(
        status in status(),
        which in any::<prop::sample::Index>(),
        pick in any::<u64>(),
        replacement in json_value(),
        raw in prop::option::of("(?s)\\PC{0,200}"),
    ) {
        let body = match raw {
            Some(text) => text.into_bytes(),
            None => {
                let base = &samples()[which.index(samples().len())];
                let mut v: Value = serde_json::from_str(base).unwrap();
                mutate_tree(&mut v, pick, replacement, false);
                v.to_string().into_bytes()
            }
        };
        let errors = through_client(status, body);
        for e in &errors {
            prop_assert!(!e.contains(PLANTED), "an error repeats a key value: {e}");
            prop_assert!(!e.contains(ADMIN), "an error repeats the admin key: {e}");
        }
    }
}

#[test]
fn the_samples_parse_as_what_they_are() {
    let s = samples();
    assert!(serde_json::from_str::<ListResponse<Project>>(&s[0]).is_ok());
    assert!(serde_json::from_str::<ListResponse<ProjectApiKey>>(&s[1]).is_ok());
    assert!(serde_json::from_str::<ListResponse<ServiceAccount>>(&s[2]).is_ok());
    assert!(serde_json::from_str::<CreatedKey>(&s[3]).is_ok());
    assert!(serde_json::from_str::<CreatedServiceAccount>(&s[4]).is_ok());
    assert!(serde_json::from_str::<Deleted>(&s[5]).is_ok());
    assert!(serde_json::from_str::<ErrorResponse>(&s[6]).is_ok());
    // A valid created key whose value is the planted secret, answered with a status
    // the client does not expect: the error must not quote it.
    let created = s[3].replace(
        serde_json::from_str::<Value>(&s[3]).unwrap()["value"]
            .as_str()
            .unwrap(),
        PLANTED,
    );
    for status in [400, 409, 500] {
        for e in through_client(status, created.clone().into_bytes()) {
            assert!(!e.contains(PLANTED), "{e}");
        }
    }
}
