//! The Admin API client through its public API, against the in-process simulator.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use keyrotd::openai::models::{CreateKeyRequest, OwnerAccess, OwnerType, UpdateKeyRequest};
use keyrotd::openai::{ApiError, Client, ClientConfig, Endpoint};
use keyrotd::sim::{
    Faults, LostResponse, Malformation, MalformedNext, OwnerRef, RetryAfter, Route, Sim, SimServer,
};
use secrecy::{ExposeSecret, SecretString};

const ADMIN: &str = "sk-admin-client-tests-0123456789abcdef";

fn config(base_url: &str) -> ClientConfig {
    ClientConfig {
        base_url: base_url.to_owned(),
        request_timeout: Duration::from_secs(5),
        max_retries: 3,
        max_retry_after: Duration::from_secs(5),
        backoff_base: Duration::from_millis(5),
        max_pages: keyrotd::openai::DEFAULT_MAX_PAGES,
        max_response_bytes: keyrotd::openai::DEFAULT_MAX_RESPONSE_BYTES,
    }
}

async fn setup() -> (Sim, SimServer, Client) {
    let sim = Sim::with_seed(ADMIN, 1);
    let server = sim.start().await.expect("start sim");
    let client = Client::new(config(&server.base_url), SecretString::from(ADMIN)).expect("client");
    (sim, server, client)
}

/// A project with one service account; returns (project id, service account id).
fn project_with_sa(sim: &Sim, name: &str) -> (String, String) {
    let p = sim.add_project(name);
    let sa = sim.add_service_account(&p, "backend").expect("sa");
    (p, sa)
}

/// Asserts that no (path, query) of `route` was requested twice; returns the count.
fn assert_pages_once(sim: &Sim, route: Route) -> usize {
    let reqs = sim.requests_to(route);
    let distinct: HashSet<(String, String)> = reqs
        .iter()
        .map(|r| (r.path.clone(), r.query.clone()))
        .collect();
    assert_eq!(
        distinct.len(),
        reqs.len(),
        "a page was requested twice: {reqs:#?}"
    );
    reqs.len()
}

#[tokio::test]
async fn lists_every_key_of_a_large_project_each_page_once() {
    let (sim, _server, client) = setup().await;
    let (p, sa) = project_with_sa(&sim, "prod-big");
    let user = sim.add_user("Alice", "alice@example.com");
    for i in 0..255 {
        sim.add_key(&p, OwnerRef::ServiceAccount(sa.clone()), &format!("k{i}"))
            .unwrap();
    }
    for i in 0..3 {
        sim.add_key(&p, OwnerRef::User(user.clone()), &format!("u{i}"))
            .unwrap();
    }
    // Noise in another project must not leak in.
    let (other, other_sa) = project_with_sa(&sim, "dev-other");
    sim.add_key(&other, OwnerRef::ServiceAccount(other_sa), "x")
        .unwrap();

    let keys = client.list_api_keys(&p).await.unwrap();
    let want: Vec<String> = sim.keys(&p).into_iter().map(|k| k.id).collect();
    let got: Vec<String> = keys.iter().map(|k| k.id.clone()).collect();
    assert_eq!(got.len(), 258);
    assert_eq!(got, want);
    assert_eq!(
        keys.iter()
            .filter(|k| k.owner.kind == OwnerType::User)
            .count(),
        3
    );

    assert_eq!(assert_pages_once(&sim, Route::ListApiKeys), 3);
    for r in sim.requests_to(Route::ListApiKeys) {
        assert!(r.query.contains("limit=100"), "{}", r.query);
        assert!(r.query.contains("owner_project_access=any"), "{}", r.query);
        assert_eq!(r.status, 200);
    }
    assert_eq!(
        client.stats().snapshot(),
        vec![(Endpoint::ListApiKeys, 200, 3)]
    );
    assert_eq!(client.stats().total(), 3);
}

#[tokio::test]
async fn lists_every_project_of_a_large_org_each_page_once() {
    let (sim, _server, client) = setup().await;
    let mut active = Vec::new();
    for i in 0..130 {
        let id = sim.add_project(&format!("prod-{i}"));
        if i % 40 == 7 {
            assert!(sim.archive_project(&id));
        } else {
            active.push(id);
        }
    }
    let projects = client.list_projects(false).await.unwrap();
    assert_eq!(
        projects.iter().map(|p| p.id.clone()).collect::<Vec<_>>(),
        active
    );
    assert!(projects.iter().all(|p| !p.is_archived()));
    assert_eq!(assert_pages_once(&sim, Route::ListProjects), 2);

    sim.clear_requests();
    let all = client.list_projects(true).await.unwrap();
    assert_eq!(all.len(), 130);
    assert_eq!(all.iter().filter(|p| p.is_archived()).count(), 4);
    assert_eq!(assert_pages_once(&sim, Route::ListProjects), 2);
    assert!(sim
        .requests_to(Route::ListProjects)
        .iter()
        .all(|r| r.query.contains("include_archived=true")));
}

#[tokio::test]
async fn lists_service_accounts_across_pages() {
    let (sim, _server, client) = setup().await;
    let p = sim.add_project("prod-sa");
    let want: Vec<String> = (0..120)
        .map(|i| sim.add_service_account(&p, &format!("sa-{i}")).unwrap())
        .collect();
    let got: Vec<String> = client
        .list_service_accounts(&p)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(got, want);
    assert_eq!(assert_pages_once(&sim, Route::ListServiceAccounts), 2);
}

#[tokio::test]
async fn rate_limit_waits_for_retry_after_then_succeeds() {
    let (sim, _server, client) = setup().await;
    sim.add_project("prod-a");
    sim.set_faults(Faults {
        retry_after: RetryAfter::Seconds(1),
        ..Faults::default().fail_next(Route::ListProjects, 429, 1)
    });
    let started = Instant::now();
    let projects = client.list_projects(false).await.unwrap();
    assert_eq!(projects.len(), 1);
    let reqs = sim.requests_to(Route::ListProjects);
    assert_eq!(
        reqs.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![429, 200]
    );
    let gap = reqs[1].at.duration_since(reqs[0].at);
    assert!(gap >= Duration::from_secs(1), "retried after {gap:?}");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(
        client.stats().snapshot(),
        vec![
            (Endpoint::ListProjects, 200, 1),
            (Endpoint::ListProjects, 429, 1)
        ]
    );
}

#[tokio::test]
async fn rate_limit_honours_retry_after_ms_and_caps_long_waits() {
    let (sim, server, _client) = setup().await;
    sim.add_project("prod-a");
    let cfg = ClientConfig {
        max_retry_after: Duration::from_millis(300),
        ..config(&server.base_url)
    };
    let client = Client::new(cfg, SecretString::from(ADMIN)).unwrap();

    // retry-after-ms wins over the (rounded-up) retry-after it comes with.
    sim.set_faults(Faults {
        retry_after: RetryAfter::Millis(150),
        ..Faults::default().fail_next(Route::ListProjects, 429, 1)
    });
    client.list_projects(false).await.unwrap();
    let reqs = sim.requests_to(Route::ListProjects);
    let gap = reqs[1].at.duration_since(reqs[0].at);
    assert!(
        gap >= Duration::from_millis(150) && gap < Duration::from_millis(290),
        "{gap:?}"
    );

    // A 30 s retry-after is capped at max_retry_after.
    sim.clear_requests();
    sim.set_faults(Faults {
        retry_after: RetryAfter::Seconds(30),
        ..Faults::default().fail_next(Route::ListProjects, 429, 1)
    });
    let started = Instant::now();
    client.list_projects(false).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let reqs = sim.requests_to(Route::ListProjects);
    assert!(reqs[1].at.duration_since(reqs[0].at) >= Duration::from_millis(300));
}

#[tokio::test]
async fn persistent_server_error_fails_after_max_retries() {
    let (sim, _server, client) = setup().await;
    sim.set_faults(Faults::default().fail_next(Route::ListProjects, 500, 100));
    let err = client.list_projects(false).await.unwrap_err();
    assert_eq!(err.status(), Some(500));
    assert!(err.is_temporary());
    let text = err.to_string();
    assert!(text.contains("HTTP 500"), "{text}");
    assert!(
        text.contains("The server had an error while processing your request"),
        "{text}"
    );
    // max_retries = 3: one try and three retries.
    assert_eq!(sim.requests_to(Route::ListProjects).len(), 4);
    assert_eq!(client.stats().total(), 4);
}

#[tokio::test]
async fn transient_server_errors_are_retried() {
    let (sim, _server, client) = setup().await;
    let (p, sa) = project_with_sa(&sim, "prod-a");
    let key = sim.add_key(&p, OwnerRef::ServiceAccount(sa), "k").unwrap();
    sim.set_faults(Faults::default().fail_next(Route::DeleteApiKey, 503, 2));
    let deleted = client.delete_api_key(&p, &key.id).await.unwrap();
    assert!(deleted.deleted);
    assert_eq!(deleted.id, key.id);
    let statuses: Vec<u16> = sim
        .requests_to(Route::DeleteApiKey)
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, vec![503, 503, 200]);
    assert!(!sim.is_live(&key.id));
}

#[tokio::test]
async fn wrong_admin_key_fails_at_once() {
    let (sim, server, _client) = setup().await;
    let client = Client::new(
        config(&server.base_url),
        SecretString::from("sk-admin-wrong"),
    )
    .unwrap();
    let err = client.list_projects(false).await.unwrap_err();
    assert!(matches!(err, ApiError::Unauthorized { .. }), "{err:?}");
    assert!(err.to_string().contains("admin key rejected"), "{err}");
    assert!(
        err.to_string().contains("Incorrect API key provided"),
        "{err}"
    );
    assert!(!err.is_temporary());
    assert_eq!(sim.requests().len(), 1);
}

#[tokio::test]
async fn project_key_as_admin_key_is_forbidden() {
    let (sim, server, _client) = setup().await;
    let (p, sa) = project_with_sa(&sim, "prod-a");
    let key = sim.add_key(&p, OwnerRef::ServiceAccount(sa), "k").unwrap();
    let client = Client::new(
        config(&server.base_url),
        SecretString::from(key.value.clone()),
    )
    .unwrap();
    let err = client.get_project(&p).await.unwrap_err();
    assert!(matches!(err, ApiError::Forbidden { .. }), "{err:?}");
    assert_eq!(sim.requests().len(), 1);
    assert!(!format!("{err} {err:?}").contains(&key.value));
}

#[tokio::test]
async fn other_client_errors_are_not_retried_and_carry_the_api_message() {
    let (sim, _server, client) = setup().await;
    let err = client.list_api_keys("proj_doesnotexist").await.unwrap_err();
    assert!(matches!(err, ApiError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("proj_doesnotexist"), "{err}");
    sim.set_faults(Faults::default().fail_next(Route::GetProject, 409, 5));
    let err = client.get_project("proj_x").await.unwrap_err();
    match &err {
        ApiError::Status {
            status, message, ..
        } => {
            assert_eq!(*status, 409);
            assert_eq!(message, "Simulated failure (HTTP 409).");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(sim.requests().len(), 2);
}

#[tokio::test]
async fn malformed_success_bodies_are_decode_errors() {
    let (sim, _server, client) = setup().await;
    for i in 0..150 {
        sim.add_project(&format!("p{i}"));
    }
    let cases = [
        (Malformation::Truncated, "truncated JSON: EOF while parsing"),
        (Malformation::NotJson, "invalid JSON: expected value"),
        (
            Malformation::WrongShape,
            "unexpected JSON shape: missing field `data`",
        ),
    ];
    for (kind, expected) in cases {
        sim.set_faults(Faults::default().malformed_next(Route::ListProjects, kind, 1));
        let err = client.list_projects(false).await.unwrap_err();
        match &err {
            ApiError::Decode {
                endpoint,
                status,
                message,
            } => {
                assert_eq!((endpoint.as_str(), *status), ("list_projects", 200));
                assert!(message.contains(expected), "{kind:?}: {message}");
            }
            other => panic!("{kind:?}: {other:?}"),
        }
        assert!(!err.is_temporary());
    }
}

#[tokio::test]
async fn malformed_later_page_fails_the_whole_listing() {
    let (sim, _server, client) = setup().await;
    for i in 0..150 {
        sim.add_project(&format!("p{i}"));
    }
    let mut faults = Faults::default();
    faults.malformed_next.push(MalformedNext {
        route: Some(Route::ListProjects),
        kind: Malformation::Truncated,
        skip: 1,
        remaining: 1,
    });
    sim.set_faults(faults);
    let err = client.list_projects(false).await.unwrap_err();
    assert!(matches!(err, ApiError::Decode { .. }), "{err:?}");
    let reqs = sim.requests_to(Route::ListProjects);
    assert_eq!(reqs.len(), 2);
    assert!(reqs[1].query.contains("after="), "{}", reqs[1].query);
    assert!(sim.faults().malformed_next.is_empty());
}

#[tokio::test]
async fn non_json_error_bodies_are_cut_short() {
    use axum::http::StatusCode;
    let app = axum::Router::new().fallback(|| async {
        (
            StatusCode::BAD_GATEWAY,
            format!("<html><body>{}</body></html>", "gateway ".repeat(200)),
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let cfg = ClientConfig {
        max_retries: 1,
        ..config(&format!("http://{addr}/v1/"))
    };
    let client = Client::new(cfg, SecretString::from(ADMIN)).unwrap();
    let err = client.get_project("proj_1").await.unwrap_err();
    match &err {
        ApiError::Status {
            status,
            message,
            code,
            ..
        } => {
            assert_eq!(*status, 502);
            assert!(
                message.starts_with("<html><body>gateway gateway"),
                "{message}"
            );
            assert!(
                message.chars().count() <= 201,
                "{} chars",
                message.chars().count()
            );
            assert_eq!(code, &None);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        client.stats().snapshot(),
        vec![(Endpoint::GetProject, 502, 2)]
    );
}

#[tokio::test]
async fn inactive_owner_keys_are_listed() {
    let (sim, _server, client) = setup().await;
    let p = sim.add_project("prod-a");
    let active = sim.add_user("Alice", "alice@example.com");
    let gone = sim.add_user("Bob", "bob@example.com");
    let k1 = sim
        .add_key(&p, OwnerRef::User(active), "alice-laptop")
        .unwrap();
    let k2 = sim
        .add_key(&p, OwnerRef::User(gone.clone()), "bob-laptop")
        .unwrap();
    assert!(sim.set_owner_active(&p, &gone, false));
    let keys = client.list_api_keys(&p).await.unwrap();
    let access: Vec<(String, Option<OwnerAccess>)> = keys
        .iter()
        .map(|k| (k.id.clone(), k.owner_project_access))
        .collect();
    assert_eq!(
        access,
        vec![
            (k1.id, Some(OwnerAccess::Active)),
            (k2.id, Some(OwnerAccess::Inactive))
        ]
    );
    assert_eq!(keys[1].owner.id(), Some(gone.as_str()));
    assert_eq!(keys[1].owner.name(), Some("Bob"));
}

#[tokio::test]
async fn create_is_not_retried_on_server_error() {
    let (sim, _server, client) = setup().await;
    let (p, sa) = project_with_sa(&sim, "prod-a");
    sim.set_faults(Faults::default().fail_next(Route::CreateServiceAccountKey, 500, 1));
    let req = CreateKeyRequest {
        name: Some("keyrotd-20260101T000000Z".into()),
        ..Default::default()
    };
    let err = client
        .create_service_account_key(&p, &sa, &req)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(500));
    assert_eq!(sim.requests_to(Route::CreateServiceAccountKey).len(), 1);
    assert!(sim.keys(&p).is_empty());
}

#[tokio::test]
async fn create_is_retried_on_rate_limit() {
    let (sim, _server, client) = setup().await;
    let (p, sa) = project_with_sa(&sim, "prod-a");
    sim.set_faults(Faults {
        retry_after: RetryAfter::Millis(20),
        ..Faults::default().fail_next(Route::CreateServiceAccountKey, 429, 1)
    });
    let req = CreateKeyRequest {
        name: Some("keyrotd-1".into()),
        scopes: vec!["api.model.read".into()],
        expires_in_seconds: Some(3600),
    };
    let created = client
        .create_service_account_key(&p, &sa, &req)
        .await
        .unwrap();
    assert_eq!(created.name.as_deref(), Some("keyrotd-1"));
    assert!(created.value.expose_secret().starts_with("sk-svcacct-"));
    assert!(!format!("{created:?}").contains(created.value.expose_secret()));
    let keys = sim.keys(&p);
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].id, created.id);
    assert_eq!(keys[0].scopes, vec!["api.model.read".to_owned()]);
    assert_eq!(keys[0].expires_at, Some(created.created_at + 3600));
    let statuses: Vec<u16> = sim
        .requests_to(Route::CreateServiceAccountKey)
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, vec![429, 200]);
    // The listing shows the expiry (an extension to the spec excerpt).
    let listed = client.get_api_key(&p, &created.id).await.unwrap();
    assert_eq!(listed.expires_at, Some(created.created_at + 3600));
}

#[tokio::test]
async fn lost_create_response_is_an_error_and_the_key_exists() {
    let (sim, _server, client) = setup().await;
    let (p, sa) = project_with_sa(&sim, "prod-a");
    let req = CreateKeyRequest {
        name: Some("keyrotd-lost".into()),
        ..Default::default()
    };
    for mode in [LostResponse::ServerError, LostResponse::Dropped] {
        sim.clear_requests();
        sim.set_faults(Faults {
            lose_create_responses: 1,
            lost_response: mode,
            ..Faults::default()
        });
        let err = client
            .create_service_account_key(&p, &sa, &req)
            .await
            .unwrap_err();
        match mode {
            LostResponse::ServerError => assert_eq!(err.status(), Some(500), "{err:?}"),
            LostResponse::Dropped => assert!(matches!(err, ApiError::Network { .. }), "{err:?}"),
        }
        assert_eq!(
            sim.requests_to(Route::CreateServiceAccountKey).len(),
            1,
            "{mode:?}"
        );
    }
    let keys = sim.keys(&p);
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().all(|k| k.name == "keyrotd-lost" && k.minted));
    // The engine finds them by name later.
    let listed = client.list_api_keys(&p).await.unwrap();
    assert_eq!(
        listed
            .iter()
            .filter(|k| k.name.as_deref() == Some("keyrotd-lost"))
            .count(),
        2
    );
}

#[tokio::test]
async fn create_service_account_returns_its_first_key() {
    let (sim, _server, client) = setup().await;
    let p = sim.add_project("prod-a");
    let created = client
        .create_service_account(&p, "keyrotd-backend", None)
        .await
        .unwrap();
    assert_eq!(created.name, "keyrotd-backend");
    assert_eq!(created.role.as_deref(), Some("member"));
    let key = created.api_key.expect("api_key");
    assert_eq!(
        sim.key_value(&key.id).as_deref(),
        Some(key.value.expose_secret())
    );
    let sas = client.list_service_accounts(&p).await.unwrap();
    assert_eq!(
        sas.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        vec![created.id.as_str()]
    );

    sim.set_faults(Faults::default().fail_next(Route::CreateServiceAccount, 502, 1));
    let err = client
        .create_service_account(&p, "again", None)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(502));
    assert_eq!(sim.requests_to(Route::CreateServiceAccount).len(), 2);

    let deleted = client
        .delete_service_account(&p, &created.id)
        .await
        .unwrap();
    assert!(deleted.deleted);
    assert!(!sim.is_live(&key.id));
}

#[tokio::test]
async fn timeouts_retry_reads_but_not_creates() {
    let (sim, server, _client) = setup().await;
    let (p, sa) = project_with_sa(&sim, "prod-a");
    let cfg = ClientConfig {
        request_timeout: Duration::from_millis(150),
        max_retries: 2,
        ..config(&server.base_url)
    };
    let client = Client::new(cfg, SecretString::from(ADMIN)).unwrap();
    sim.set_faults(Faults {
        latency: Duration::from_millis(400),
        ..Faults::default()
    });
    let err = client.list_projects(false).await.unwrap_err();
    assert!(matches!(err, ApiError::Network { .. }), "{err:?}");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert_eq!(
        client.stats().snapshot(),
        vec![(Endpoint::ListProjects, 0, 3)]
    );

    let err = client
        .create_service_account_key(&p, &sa, &CreateKeyRequest::default())
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::Network { .. }), "{err:?}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    // One attempt only, and the server did create the key: ambiguous, left to the engine.
    assert_eq!(sim.requests_to(Route::CreateServiceAccountKey).len(), 1);
    assert_eq!(sim.keys(&p).len(), 1);
}

#[tokio::test]
async fn connect_errors_are_retried_even_for_creates() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = Client::new(
        config(&format!("http://{addr}/v1")),
        SecretString::from(ADMIN),
    )
    .unwrap();
    let err = client
        .create_service_account_key("proj_1", "svc_acct_1", &CreateKeyRequest::default())
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::Network { .. }), "{err:?}");
    assert!(err.to_string().contains("connection failed"), "{err}");
    assert_eq!(
        client.stats().snapshot(),
        vec![(Endpoint::CreateServiceAccountKey, 0, 4)]
    );
}

#[tokio::test]
async fn verify_key_accepts_live_keys_and_rejects_deleted_ones() {
    let (sim, _server, client) = setup().await;
    let (p, sa) = project_with_sa(&sim, "prod-a");
    let key = sim.add_key(&p, OwnerRef::ServiceAccount(sa), "k").unwrap();
    assert_eq!(key.last_used_at, None);
    sim.advance(Duration::from_secs(3600));
    let before = sim.now();
    client
        .verify_key(&SecretString::from(key.value.clone()))
        .await
        .unwrap();
    // (The simulator's clock ticks on meanwhile: a second may pass on a loaded machine.)
    let used = sim.key(&key.id).unwrap().last_used_at.expect("used");
    assert!((before..=sim.now()).contains(&used), "{before} <= {used}");
    // /models was called with the project key, not the admin key.
    assert_eq!(sim.requests_to(Route::ListModels).len(), 1);

    client.delete_api_key(&p, &key.id).await.unwrap();
    let err = client
        .verify_key(&SecretString::from(key.value.clone()))
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::Unauthorized { .. }), "{err:?}");
    assert!(err.to_string().contains("project key rejected"), "{err}");
    assert!(!format!("{err} {err:?}").contains(&key.value));

    let err = client.delete_api_key(&p, &key.id).await.unwrap_err();
    assert!(matches!(err, ApiError::NotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn base_url_with_trailing_slash_and_redacted_debug() {
    let (sim, server, _client) = setup().await;
    sim.add_project("prod-a");
    let client = Client::new(
        config(&format!("{}/", server.base_url)),
        SecretString::from(ADMIN),
    )
    .unwrap();
    assert_eq!(client.list_projects(false).await.unwrap().len(), 1);
    assert_eq!(
        sim.requests_to(Route::ListProjects)[0].path,
        "/v1/organization/projects"
    );
    let debug = format!("{client:?}");
    assert!(
        !debug.contains(ADMIN) && debug.contains("REDACTED"),
        "{debug}"
    );

    assert!(Client::new(config("not a url"), SecretString::from(ADMIN)).is_err());
    assert!(Client::new(config("ftp://example.com/v1"), SecretString::from(ADMIN)).is_err());
}

#[tokio::test]
async fn ids_in_paths_are_escaped() {
    let (sim, _server, client) = setup().await;
    let err = client
        .get_api_key("proj_1/../..", "key_1?x=y")
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::NotFound { .. }), "{err:?}");
    let r = &sim.requests()[0];
    assert_eq!(
        r.path,
        "/v1/organization/projects/proj_1%2F..%2F../api_keys/key_1%3Fx=y"
    );
    assert_eq!(r.query, "");
}

#[tokio::test]
async fn create_service_account_sends_the_first_keys_expiry() {
    let (sim, _server, client) = setup().await;
    let p = sim.add_project("prod-a");
    let plain = client
        .create_service_account(&p, "no-expiry", None)
        .await
        .unwrap();
    let plain_key = plain.api_key.expect("api_key");
    assert_eq!(plain_key.expires_at, None);
    assert_eq!(sim.key(&plain_key.id).unwrap().expires_at, None);

    let expiring = client
        .create_service_account(&p, "expiring", Some(3600))
        .await
        .unwrap();
    let key = expiring.api_key.expect("api_key");
    let at = key.created_at + 3600;
    assert_eq!(key.expires_at, Some(at));
    assert_eq!(sim.key(&key.id).unwrap().expires_at, Some(at));
    // Listed with it, too.
    let listed = client.get_api_key(&p, &key.id).await.unwrap();
    assert_eq!(listed.expires_at, Some(at));

    let bodies: Vec<_> = sim
        .requests_to(Route::CreateServiceAccount)
        .into_iter()
        .map(|r| r.body.expect("body logged"))
        .collect();
    assert_eq!(
        bodies,
        vec![
            serde_json::json!({"name": "no-expiry"}),
            serde_json::json!({"name": "expiring", "expires_in_seconds": 3600}),
        ]
    );
}

#[tokio::test]
async fn owner_type_is_inferred_when_the_listing_omits_it() {
    let (sim, _server, client) = setup().await;
    let (p, sa) = project_with_sa(&sim, "prod-a");
    let user = sim.add_user("Alice", "alice@example.com");
    let mut want = Vec::new();
    for i in 0..120 {
        let (owner, kind) = if i % 3 == 0 {
            (OwnerRef::User(user.clone()), OwnerType::User)
        } else {
            (
                OwnerRef::ServiceAccount(sa.clone()),
                OwnerType::ServiceAccount,
            )
        };
        let k = sim.add_key(&p, owner, &format!("k{i}")).unwrap();
        want.push((k.id, kind));
    }
    let bare = want[7].0.clone();
    sim.update_faults(|f| {
        f.omit_owner_type = true;
        f.bare_owners = [bare.clone()].into_iter().collect();
    });
    let keys = client
        .list_api_keys(&p)
        .await
        .expect("the scan is not aborted");
    let got: Vec<(String, OwnerType)> = keys.iter().map(|k| (k.id.clone(), k.owner.kind)).collect();
    let expect: Vec<(String, OwnerType)> = want
        .iter()
        .map(|(id, kind)| {
            let kind = if *id == bare {
                OwnerType::Unknown
            } else {
                *kind
            };
            (id.clone(), kind)
        })
        .collect();
    assert_eq!(got, expect);
    let sa_key = keys
        .iter()
        .find(|k| k.owner.kind == OwnerType::ServiceAccount)
        .unwrap();
    assert_eq!(sa_key.owner.id(), Some(sa.as_str()));
    let user_key = keys
        .iter()
        .find(|k| k.owner.kind == OwnerType::User)
        .unwrap();
    assert_eq!(user_key.owner.id(), Some(user.as_str()));
    let one = client.get_api_key(&p, &want[1].0).await.unwrap();
    assert_eq!(one.owner.kind, OwnerType::ServiceAccount);
    assert_eq!(assert_pages_once(&sim, Route::ListApiKeys), 2);
}

/// A project with one service-account key; returns (project id, key id).
fn project_with_key(sim: &Sim) -> (String, String) {
    let (p, sa) = project_with_sa(sim, "prod-upd");
    let key = sim.add_key(&p, OwnerRef::ServiceAccount(sa), "k").unwrap();
    (p, key.id)
}

fn expiry(secs: u64) -> UpdateKeyRequest {
    UpdateKeyRequest {
        expires_in_seconds: Some(secs),
        scopes: None,
    }
}

#[tokio::test]
async fn update_api_key_sets_expiry_and_scopes() {
    let (sim, _server, client) = setup().await;
    let (p, id) = project_with_key(&sim);
    let req = UpdateKeyRequest {
        expires_in_seconds: Some(86_400),
        scopes: Some(vec!["api.all.read".into()]),
    };
    let updated = client.update_api_key(&p, &id, &req).await.unwrap();
    assert_eq!(updated.id, id);
    assert_eq!(updated.owner.kind, OwnerType::ServiceAccount);
    let k = sim.key(&id).unwrap();
    assert_eq!(updated.expires_at, k.expires_at);
    assert!(k.expires_at.is_some_and(|e| e >= sim.now() + 86_399));
    assert_eq!(k.scopes, vec!["api.all.read".to_string()]);
    let sent = sim.requests_to(Route::UpdateApiKey);
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].body,
        Some(serde_json::json!({"expires_in_seconds": 86_400, "scopes": ["api.all.read"]}))
    );
    // Only what is set is sent.
    client.update_api_key(&p, &id, &expiry(60)).await.unwrap();
    assert_eq!(
        sim.requests_to(Route::UpdateApiKey)[1].body,
        Some(serde_json::json!({"expires_in_seconds": 60}))
    );
    assert_eq!(
        client.stats().snapshot(),
        vec![(Endpoint::UpdateApiKey, 200, 2)]
    );
}

#[tokio::test]
async fn update_api_key_failures() {
    let (sim, _server, client) = setup().await;
    let (p, id) = project_with_key(&sim);

    // An expired key cannot be updated: a 400, not retried.
    client.update_api_key(&p, &id, &expiry(10)).await.unwrap();
    sim.advance(Duration::from_secs(11));
    sim.clear_requests();
    let err = client
        .update_api_key(&p, &id, &expiry(3600))
        .await
        .unwrap_err();
    match &err {
        ApiError::Status {
            status,
            code,
            endpoint,
            ..
        } => {
            assert_eq!((*status, endpoint.as_str()), (400, "update_api_key"));
            assert_eq!(code.as_deref(), Some("api_key_expired"));
        }
        other => panic!("{other:?}"),
    }
    assert!(!err.is_temporary());
    assert_eq!(sim.requests_to(Route::UpdateApiKey).len(), 1);

    // A gone key and an API without the endpoint are both 404.
    let (p2, id2) = project_with_key(&sim);
    let err = client
        .update_api_key(&p2, "key_gone", &expiry(60))
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::NotFound { .. }), "{err:?}");
    sim.update_faults(|f| f.no_key_update = true);
    let err = client
        .update_api_key(&p2, &id2, &expiry(60))
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("Invalid URL"), "{err}");
    assert_eq!(sim.key(&id2).unwrap().expires_at, None);
}

#[tokio::test]
async fn update_api_key_retries_rate_limits_and_server_errors() {
    let (sim, _server, client) = setup().await;
    let (p, id) = project_with_key(&sim);

    // 429 with retry-after: waits that long.
    sim.set_faults(Faults {
        retry_after: RetryAfter::Seconds(1),
        ..Faults::default().fail_next(Route::UpdateApiKey, 429, 1)
    });
    client.update_api_key(&p, &id, &expiry(60)).await.unwrap();
    let reqs = sim.requests_to(Route::UpdateApiKey);
    assert_eq!(
        reqs.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![429, 200]
    );
    assert!(reqs[1].at.duration_since(reqs[0].at) >= Duration::from_secs(1));

    // 429 without retry-after: backoff, then success.
    sim.clear_requests();
    sim.set_faults(Faults {
        retry_after: RetryAfter::None,
        ..Faults::default().fail_next(Route::UpdateApiKey, 429, 2)
    });
    let started = Instant::now();
    client.update_api_key(&p, &id, &expiry(120)).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let statuses: Vec<u16> = sim
        .requests_to(Route::UpdateApiKey)
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, vec![429, 429, 200]);

    // Transient 5xx: retried; the expiry counts from the request that succeeded.
    sim.clear_requests();
    sim.set_faults(Faults::default().fail_next(Route::UpdateApiKey, 503, 2));
    let updated = client.update_api_key(&p, &id, &expiry(300)).await.unwrap();
    assert_eq!(updated.expires_at, sim.key(&id).unwrap().expires_at);
    assert_eq!(sim.requests_to(Route::UpdateApiKey).len(), 3);

    // Persistent 5xx: one try and max_retries retries, then a temporary error.
    sim.clear_requests();
    sim.set_faults(Faults::default().fail_next(Route::UpdateApiKey, 500, 100));
    let err = client
        .update_api_key(&p, &id, &expiry(300))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(500));
    assert!(err.is_temporary());
    assert_eq!(sim.requests_to(Route::UpdateApiKey).len(), 4);
}

#[tokio::test]
async fn update_api_key_bad_json_is_a_decode_error() {
    let (sim, _server, client) = setup().await;
    let (p, id) = project_with_key(&sim);
    for (kind, expected) in [
        (Malformation::Truncated, "truncated JSON"),
        (Malformation::NotJson, "invalid JSON"),
        (
            Malformation::WrongShape,
            "unexpected JSON shape: missing field `id`",
        ),
    ] {
        sim.set_faults(Faults::default().malformed_next(Route::UpdateApiKey, kind, 1));
        let err = client
            .update_api_key(&p, &id, &expiry(60))
            .await
            .unwrap_err();
        match &err {
            ApiError::Decode {
                endpoint,
                status,
                message,
            } => {
                assert_eq!((endpoint.as_str(), *status), ("update_api_key", 200));
                assert!(message.contains(expected), "{kind:?}: {message}");
            }
            other => panic!("{kind:?}: {other:?}"),
        }
        assert!(!err.is_temporary());
    }
}

#[tokio::test]
async fn usage_completions_totals_per_key_match_the_simulator_in_the_fewest_pages() {
    use keyrotd::openai::models::UsageQuery;
    use std::collections::BTreeMap;
    let (sim, _server, client) = setup().await;
    let now = sim.now();
    let start = now - 7 * 86_400;
    let mut truth: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    let mut n = 0u64;
    for p in 0..20 {
        let (project, sa) = project_with_sa(&sim, &format!("prod-{p}"));
        for i in 0..100 {
            let key = sim
                .add_key(
                    &project,
                    OwnerRef::ServiceAccount(sa.clone()),
                    &format!("k{i}"),
                )
                .unwrap();
            for j in 0..(n % 4) {
                n += 1;
                let at = start + ((n * 7919 + j * 104_729) % (7 * 86_400)) as i64;
                let (req, inp, out) = (1 + n % 5, 100 * n, 10 * n);
                assert!(sim.record_usage(&key.id, at, req, inp, out));
                let t = truth.entry(key.id.clone()).or_default();
                t.0 += req;
                t.1 += inp;
                t.2 += out;
            }
            // Before the window: never counted.
            sim.record_usage(&key.id, start - 1, 1000, 1000, 1000);
            n += 1;
        }
    }
    assert!(truth.len() > 1000, "{} keys with usage", truth.len());

    let q = UsageQuery {
        start_time: start,
        end_time: Some(now),
        bucket_width: Some("1d".into()),
        group_by: vec!["api_key_id".into()],
        ..UsageQuery::default()
    };
    let sum = |buckets: &[keyrotd::openai::models::UsageBucket<
        keyrotd::openai::models::UsageCompletionsResult,
    >]| {
        let mut got: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
        for b in buckets {
            for r in &b.results {
                let t = got
                    .entry(r.api_key_id.clone().expect("grouped"))
                    .or_default();
                t.0 += r.num_model_requests;
                t.1 += r.input_tokens;
                t.2 += r.output_tokens;
            }
        }
        got
    };
    // 8 daily buckets (the window starts mid-day): 2 pages of the default 7.
    let buckets = client.usage_completions(&q).await.unwrap();
    assert_eq!(buckets.len(), 8);
    assert!(buckets.windows(2).all(|w| w[0].end_time == w[1].start_time));
    assert_eq!(sum(&buckets), truth);
    assert_eq!(assert_pages_once(&sim, Route::UsageCompletions), 2);
    // With limit = 31: one page.
    sim.clear_requests();
    let one = client
        .usage_completions(&UsageQuery {
            limit: Some(31),
            ..q.clone()
        })
        .await
        .unwrap();
    assert_eq!(sum(&one), truth);
    assert_eq!(sim.requests_to(Route::UsageCompletions).len(), 1);
    let sent = &sim.requests_to(Route::UsageCompletions)[0].query;
    assert!(
        sent.contains(&format!("start_time={start}"))
            && sent.contains("bucket_width=1d")
            && sent.contains("group_by=api_key_id")
            && sent.contains("limit=31"),
        "{sent}"
    );

    // Filters, and a rate limit without retry-after between pages.
    sim.clear_requests();
    let two: Vec<String> = truth.keys().take(2).cloned().collect();
    sim.set_faults(Faults {
        retry_after: RetryAfter::None,
        ..Faults::default().fail_next(Route::UsageCompletions, 429, 1)
    });
    let filtered = client
        .usage_completions(&UsageQuery {
            api_key_ids: two.clone(),
            ..q.clone()
        })
        .await
        .unwrap();
    let want: BTreeMap<String, (u64, u64, u64)> =
        two.iter().map(|k| (k.clone(), truth[k])).collect();
    assert_eq!(sum(&filtered), want);
    let statuses: Vec<u16> = sim
        .requests_to(Route::UsageCompletions)
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, vec![429, 200, 200]);
    assert!(sim.requests_to(Route::UsageCompletions)[1]
        .query
        .contains(&format!("api_key_ids={}", two[1])));
}

#[tokio::test]
async fn usage_completions_failures() {
    use keyrotd::openai::models::UsageQuery;
    let (sim, _server, client) = setup().await;
    let q = UsageQuery {
        start_time: sim.now() - 30 * 86_400,
        bucket_width: Some("1d".into()),
        ..UsageQuery::default()
    };
    sim.set_faults(Faults::default().fail_next(Route::UsageCompletions, 500, 100));
    let err = client.usage_completions(&q).await.unwrap_err();
    assert!(err.is_temporary() && err.status() == Some(500), "{err:?}");
    assert_eq!(sim.requests_to(Route::UsageCompletions).len(), 4);
    // A bad second page fails the whole call.
    sim.set_faults(Faults {
        malformed_next: vec![MalformedNext {
            route: Some(Route::UsageCompletions),
            kind: Malformation::Truncated,
            skip: 1,
            remaining: 1,
        }],
        ..Faults::default()
    });
    let err = client.usage_completions(&q).await.unwrap_err();
    assert!(
        matches!(&err, ApiError::Decode { endpoint, .. } if endpoint == "usage_completions"),
        "{err:?}"
    );
    // The API's own validation comes back as a 400 with its message.
    let err = client
        .usage_completions(&UsageQuery {
            bucket_width: Some("2d".into()),
            ..q.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400));
    assert!(err.to_string().contains("bucket_width"), "{err}");
}

#[tokio::test]
async fn costs_per_key_match_the_simulators_price_list_in_the_fewest_pages() {
    use keyrotd::openai::models::{CostsResult, UsageBucket, UsageQuery};
    use std::collections::BTreeMap;
    let (sim, _server, client) = setup().await;
    let [(_, input_price), (_, output_price)] = keyrotd::sim::PRICES;
    let now = sim.now();
    let start = now - 7 * 86_400;
    let mut truth: BTreeMap<String, f64> = BTreeMap::new();
    let mut projects = Vec::new();
    let mut n = 0u64;
    for p in 0..3 {
        let (project, sa) = project_with_sa(&sim, &format!("prod-{p}"));
        for i in 0..100 {
            let key = sim
                .add_key(
                    &project,
                    OwnerRef::ServiceAccount(sa.clone()),
                    &format!("k{i}"),
                )
                .unwrap();
            for _ in 0..(1 + n % 3) {
                n += 1;
                let at = start + ((n * 7919) % (7 * 86_400)) as i64;
                let (inp, out) = (1000 * n, 100 * n);
                assert!(sim.record_usage(&key.id, at, 1, inp, out));
                *truth.entry(key.id.clone()).or_default() +=
                    (inp as f64 * input_price + out as f64 * output_price) / 1e6;
            }
        }
        projects.push(project);
    }
    let sum = |buckets: &[UsageBucket<CostsResult>]| {
        let mut got: BTreeMap<String, f64> = BTreeMap::new();
        for b in buckets {
            for r in &b.results {
                let amount = r.amount.as_ref().expect("amount");
                assert_eq!(amount.currency.as_deref(), Some("usd"));
                *got.entry(r.api_key_id.clone().expect("grouped"))
                    .or_default() += amount.value;
            }
        }
        got
    };
    let close = |got: &BTreeMap<String, f64>, want: &BTreeMap<String, f64>| {
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        for (k, v) in want {
            assert!(
                (got[k] - v).abs() < 1e-9 * v.max(1.0),
                "{k}: {} vs {v}",
                got[k]
            );
        }
    };
    let q = UsageQuery {
        start_time: start,
        end_time: Some(now),
        group_by: vec!["api_key_id".into()],
        ..UsageQuery::default()
    };
    let buckets = client.costs(&q).await.unwrap();
    assert_eq!(buckets.len(), 8);
    close(&sum(&buckets), &truth);
    assert_eq!(
        assert_pages_once(&sim, Route::Costs),
        2,
        "8 buckets, 7 a page"
    );
    assert_eq!(client.stats().snapshot(), vec![(Endpoint::Costs, 200, 2)]);

    // By line item as well: the items add up to the same; one project only.
    sim.clear_requests();
    let items = client
        .costs(&UsageQuery {
            group_by: vec!["api_key_id".into(), "line_item".into()],
            project_ids: vec![projects[1].clone()],
            limit: Some(180),
            ..q.clone()
        })
        .await
        .unwrap();
    assert_eq!(sim.requests_to(Route::Costs).len(), 1);
    assert!(items.iter().flat_map(|b| &b.results).all(|r| r
        .line_item
        .as_deref()
        .is_some_and(|l| l.starts_with("gpt-4o-mini, "))));
    let in_project: BTreeMap<String, f64> = sim
        .keys(&projects[1])
        .into_iter()
        .filter_map(|k| truth.get(&k.id).map(|v| (k.id, *v)))
        .collect();
    close(&sum(&items), &in_project);

    // Costs take only daily buckets.
    let err = client
        .costs(&UsageQuery {
            bucket_width: Some("1h".into()),
            ..q.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
}

/// A project whose service account has `n` keys: `n + 1` audit-log entries (each
/// key's creation, a second apart from `start`, an hour ago; then the account's, now).
/// Returns (project, keys, start).
fn audited_org(sim: &Sim, n: usize) -> (String, Vec<String>, i64) {
    let p = sim.add_project("prod-audit");
    let start = sim.now() - 3600;
    let sa = sim.add_service_account(&p, "backend").unwrap();
    let keys = (0..n)
        .map(|i| {
            sim.add_key_at(
                &p,
                OwnerRef::ServiceAccount(sa.clone()),
                &format!("k{i}"),
                start + i as i64,
                None,
            )
            .unwrap()
            .id
        })
        .collect();
    (p, keys, start)
}

fn audit_ids(entries: &[keyrotd::openai::models::AuditLog]) -> Vec<String> {
    entries.iter().map(|e| e.id.clone()).collect()
}

#[tokio::test]
async fn audit_logs_are_read_to_the_end_each_page_once() {
    use keyrotd::openai::models::{AuditEvent, AuditLogQuery, EffectiveAt};
    let (sim, _server, client) = setup().await;
    let (p, keys, start) = audited_org(&sim, 249);
    let truth: Vec<String> = sim.audit_log().into_iter().map(|e| e.id).collect();
    assert_eq!(truth.len(), 250);

    let all = client.audit_logs(&AuditLogQuery::default()).await.unwrap();
    assert_eq!(audit_ids(&all), truth);
    assert_eq!(
        assert_pages_once(&sim, Route::ListAuditLogs),
        3,
        "250 at 100 a page"
    );
    for r in sim.requests_to(Route::ListAuditLogs) {
        assert!(r.query.contains("limit=100"), "{}", r.query);
    }
    assert_eq!(
        client.stats().snapshot(),
        vec![(Endpoint::ListAuditLogs, 200, 3)]
    );
    // Newest first: the account, then the last key's creation, typed.
    assert_eq!(all[0].kind, "service_account.created");
    assert_eq!(
        all[1].event,
        AuditEvent::ApiKeyCreated {
            id: Some(keys[248].clone()),
            scopes: Some(Vec::new())
        }
    );
    assert_eq!(
        all[0].project.as_ref().unwrap().id.as_deref(),
        Some(p.as_str())
    );
    assert_eq!(all[249].resource_id(), Some(keys[0].as_str()));

    // Forward from `after`; backward from `before` (returned in listing order); both.
    sim.clear_requests();
    let q = |after: Option<usize>, before: Option<usize>, limit| AuditLogQuery {
        after: after.map(|i| truth[i].clone()),
        before: before.map(|i| truth[i].clone()),
        limit,
        ..AuditLogQuery::default()
    };
    let got = client.audit_logs(&q(Some(49), None, None)).await.unwrap();
    assert_eq!(audit_ids(&got), truth[50..].to_vec());
    assert_eq!(sim.requests_to(Route::ListAuditLogs).len(), 2);
    sim.clear_requests();
    let got = client
        .audit_logs(&q(None, Some(200), Some(30)))
        .await
        .unwrap();
    assert_eq!(audit_ids(&got), truth[..200].to_vec());
    assert_eq!(
        assert_pages_once(&sim, Route::ListAuditLogs),
        7,
        "200 at 30 a page"
    );
    assert!(sim.requests_to(Route::ListAuditLogs)[1]
        .query
        .contains(&format!("before={}", truth[170])));
    sim.clear_requests();
    let got = client
        .audit_logs(&q(Some(10), Some(240), Some(100)))
        .await
        .unwrap();
    assert_eq!(audit_ids(&got), truth[11..240].to_vec());
    assert_eq!(sim.requests_to(Route::ListAuditLogs).len(), 3);

    // Filters go as the schema's array and range parameters.
    sim.clear_requests();
    let from = start + 100;
    let filtered = client
        .audit_logs(&AuditLogQuery {
            event_types: vec!["api_key.created".into()],
            effective_at: EffectiveAt {
                gte: Some(from),
                lt: Some(from + 50),
                ..EffectiveAt::default()
            },
            project_ids: vec![p.clone()],
            ..AuditLogQuery::default()
        })
        .await
        .unwrap();
    let want: Vec<String> = keys[100..150].iter().rev().cloned().collect();
    let got: Vec<String> = filtered
        .iter()
        .map(|e| e.resource_id().unwrap().to_owned())
        .collect();
    assert_eq!(got, want);
    let sent = &sim.requests_to(Route::ListAuditLogs)[0].query;
    for part in [
        "event_types%5B%5D=api_key.created".to_owned(),
        format!("effective_at%5Bgte%5D={from}"),
        format!("effective_at%5Blt%5D={}", from + 50),
        format!("project_ids%5B%5D={p}"),
    ] {
        assert!(sent.contains(&part), "{part} in {sent}");
    }
    let one = client
        .audit_logs(&AuditLogQuery {
            resource_ids: vec![keys[7].clone()],
            ..AuditLogQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].resource_id(), Some(keys[7].as_str()));
}

#[tokio::test]
async fn audit_logs_failures() {
    use keyrotd::openai::models::AuditLogQuery;
    use keyrotd::sim::{BadCursor, CursorFault};
    let (sim, _server, client) = setup().await;
    audited_org(&sim, 249);
    let q = AuditLogQuery::default();
    let statuses = |sim: &Sim| -> Vec<u16> {
        sim.requests_to(Route::ListAuditLogs)
            .iter()
            .map(|r| r.status)
            .collect()
    };

    // 429 with retry-after, between pages: waited for, then the listing goes on.
    sim.set_faults(Faults {
        retry_after: RetryAfter::Seconds(1),
        malformed_next: Vec::new(),
        ..Faults::default().fail_next(Route::ListAuditLogs, 429, 1)
    });
    let started = Instant::now();
    assert_eq!(client.audit_logs(&q).await.unwrap().len(), 250);
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(statuses(&sim), vec![429, 200, 200, 200]);
    // 429 without retry-after: backoff, and no page fetched twice.
    sim.clear_requests();
    sim.set_faults(Faults {
        retry_after: RetryAfter::None,
        ..Faults::default().fail_next(Route::ListAuditLogs, 429, 2)
    });
    assert_eq!(client.audit_logs(&q).await.unwrap().len(), 250);
    assert_eq!(statuses(&sim), vec![429, 429, 200, 200, 200]);
    // Transient 5xx are retried; persistent ones fail after max_retries.
    sim.clear_requests();
    sim.set_faults(Faults::default().fail_next(Route::ListAuditLogs, 502, 2));
    assert_eq!(client.audit_logs(&q).await.unwrap().len(), 250);
    sim.clear_requests();
    sim.set_faults(Faults::default().fail_next(Route::ListAuditLogs, 500, 100));
    let err = client.audit_logs(&q).await.unwrap_err();
    assert!(err.is_temporary() && err.status() == Some(500), "{err:?}");
    assert_eq!(sim.requests_to(Route::ListAuditLogs).len(), 4);

    // Bad JSON on a later page fails the whole listing.
    for kind in [
        Malformation::Truncated,
        Malformation::NotJson,
        Malformation::WrongShape,
    ] {
        sim.set_faults(Faults {
            malformed_next: vec![MalformedNext {
                route: Some(Route::ListAuditLogs),
                kind,
                skip: 1,
                remaining: 1,
            }],
            ..Faults::default()
        });
        let err = client.audit_logs(&q).await.unwrap_err();
        assert!(
            matches!(&err, ApiError::Decode { endpoint, .. } if endpoint == "list_audit_logs"),
            "{kind:?}: {err:?}"
        );
        assert!(!err.is_temporary());
    }

    // A cursor that comes back is a loop, not an endless listing.
    sim.set_faults(Faults {
        bad_cursor: Some(BadCursor {
            route: Route::ListAuditLogs,
            kind: CursorFault::Cycle(2),
        }),
        ..Faults::default()
    });
    let err = client.audit_logs(&q).await.unwrap_err();
    assert!(
        matches!(&err, ApiError::CursorLoop { endpoint, pages: 3, .. } if endpoint == "list_audit_logs"),
        "{err:?}"
    );
    sim.set_faults(Faults::default());

    // The API's own refusals: a bad cursor (400, not retried) and a wrong admin key.
    sim.clear_requests();
    let err = client
        .audit_logs(&AuditLogQuery {
            after: Some("audit_log-gone".into()),
            ..AuditLogQuery::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    assert!(err.to_string().contains("after"), "{err}");
    assert_eq!(sim.requests_to(Route::ListAuditLogs).len(), 1);
    let wrong = Client::new(
        config(&_server.base_url),
        SecretString::from("sk-admin-wrong"),
    )
    .unwrap();
    let err = wrong.audit_logs(&q).await.unwrap_err();
    assert!(matches!(err, ApiError::Unauthorized { .. }), "{err:?}");
    assert!(!err.to_string().contains("sk-admin-wrong"), "{err}");
}
