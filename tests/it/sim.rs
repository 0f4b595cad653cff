//! Fidelity of the OpenAI Admin API simulator, over raw HTTP.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use keyrotd::openai::models::OwnerType;
use keyrotd::sim::{
    Faults, LostResponse, OwnerRef, RejectVerification, RetryAfter, Route, Scenario, Sim, SimServer,
};
use reqwest::Method;
use serde_json::{json, Value};

const ADMIN: &str = "sk-admin-sim-tests-0123456789abcdef";

struct Api {
    sim: Sim,
    server: SimServer,
    http: reqwest::Client,
}

impl Api {
    async fn new() -> Api {
        let sim = Sim::with_seed(ADMIN, 42);
        let server = sim.start().await.expect("start sim");
        Api {
            sim,
            server,
            http: reqwest::Client::new(),
        }
    }

    /// `method path` with the admin key; returns (status, JSON body).
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_as(Some(ADMIN), method, path, body).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(Method::GET, path, None).await
    }

    async fn call_as(
        &self,
        key: Option<&str>,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let resp = self.send(key, method, path, body).await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        (status, value)
    }

    async fn send(
        &self,
        key: Option<&str>,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> reqwest::Result<reqwest::Response> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.server.base_url));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        req.send().await
    }
}

/// The spec's `ErrorResponse`: exactly `message`, `type`, `param`, `code`.
fn assert_error_shape(body: &Value) -> &Value {
    let err = &body["error"];
    let keys: BTreeSet<&str> = err
        .as_object()
        .expect("error object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from(["message", "type", "param", "code"]),
        "{body}"
    );
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(err["type"].is_string(), "{body}");
    assert!(err["param"].is_string() || err["param"].is_null(), "{body}");
    assert!(err["code"].is_string() || err["code"].is_null(), "{body}");
    err
}

fn ids(list: &Value) -> Vec<String> {
    list["data"]
        .as_array()
        .expect("data array")
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect()
}

fn sa_project(sim: &Sim) -> (String, String) {
    let p = sim.add_project("prod-a");
    let sa = sim.add_service_account(&p, "backend").unwrap();
    (p, sa)
}

#[tokio::test]
async fn limit_outside_1_to_100_is_rejected_naming_limit() {
    let api = Api::new().await;
    let (p, _) = sa_project(&api.sim);
    for path in [
        "/organization/projects".to_owned(),
        format!("/organization/projects/{p}/api_keys"),
        format!("/organization/projects/{p}/service_accounts"),
        "/organization/admin_api_keys".to_owned(),
    ] {
        for bad in ["0", "101", "-5", "many"] {
            let (status, body) = api.get(&format!("{path}?limit={bad}")).await;
            assert_eq!(status, 400, "{path} limit={bad}: {body}");
            let err = assert_error_shape(&body);
            assert_eq!(err["param"], "limit", "{body}");
            assert_eq!(err["type"], "invalid_request_error");
        }
        for good in ["1", "100"] {
            let (status, body) = api.get(&format!("{path}?limit={good}")).await;
            assert_eq!(status, 200, "{path} limit={good}: {body}");
        }
    }
}

#[tokio::test]
async fn default_limit_is_20_and_pages_chain() {
    let api = Api::new().await;
    let (p, sa) = sa_project(&api.sim);
    let want: Vec<String> = (0..45)
        .map(|i| {
            api.sim
                .add_key(&p, OwnerRef::ServiceAccount(sa.clone()), &format!("k{i}"))
                .unwrap()
                .id
        })
        .collect();
    let mut got = Vec::new();
    let mut after = String::new();
    let mut pages = 0;
    loop {
        let (status, body) = api
            .get(&format!("/organization/projects/{p}/api_keys{after}"))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["object"], "list");
        let page = ids(&body);
        assert_eq!(body["first_id"], json!(page.first()));
        assert_eq!(body["last_id"], json!(page.last()));
        got.extend(page);
        pages += 1;
        if !body["has_more"].as_bool().unwrap() {
            break;
        }
        after = format!("?after={}", body["last_id"].as_str().unwrap());
    }
    assert_eq!(pages, 3);
    assert_eq!(got, want);
}

#[tokio::test]
async fn after_cursor_survives_deletion_of_the_cursor_key() {
    let api = Api::new().await;
    let (p, sa) = sa_project(&api.sim);
    let keys: Vec<String> = (0..5)
        .map(|i| {
            api.sim
                .add_key(&p, OwnerRef::ServiceAccount(sa.clone()), &format!("k{i}"))
                .unwrap()
                .id
        })
        .collect();
    let (_, first) = api
        .get(&format!("/organization/projects/{p}/api_keys?limit=2"))
        .await;
    assert_eq!(ids(&first), keys[..2]);
    assert_eq!(first["has_more"], true);
    let cursor = first["last_id"].as_str().unwrap().to_owned();

    let (status, body) = api
        .call(
            Method::DELETE,
            &format!("/organization/projects/{p}/api_keys/{cursor}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"object": "organization.project.api_key.deleted", "id": cursor, "deleted": true})
    );
    // Deleting a key from the next page too must not shift the order.
    api.sim.delete_key(&keys[3]);

    let (status, next) = api
        .get(&format!(
            "/organization/projects/{p}/api_keys?limit=2&after={cursor}"
        ))
        .await;
    assert_eq!(status, 200, "{next}");
    assert_eq!(ids(&next), vec![keys[2].clone(), keys[4].clone()]);
    assert_eq!(next["has_more"], false);

    // An id that never existed is not a cursor.
    let (status, body) = api
        .get(&format!(
            "/organization/projects/{p}/api_keys?after=key_nope"
        ))
        .await;
    assert_eq!(status, 400);
    assert_eq!(assert_error_shape(&body)["param"], "after");
}

#[tokio::test]
async fn owner_project_access_filters_keys() {
    let api = Api::new().await;
    let (p, sa) = sa_project(&api.sim);
    let alice = api.sim.add_user("Alice Anders", "alice@example.com");
    let bob = api.sim.add_user("Bob Brown", "bob@example.com");
    let k_sa = api
        .sim
        .add_key(&p, OwnerRef::ServiceAccount(sa), "svc")
        .unwrap()
        .id;
    let k_alice = api
        .sim
        .add_key(&p, OwnerRef::User(alice), "alice")
        .unwrap()
        .id;
    let k_bob = api
        .sim
        .add_key(&p, OwnerRef::User(bob.clone()), "bob")
        .unwrap()
        .id;
    api.sim.set_owner_active(&p, &bob, false);

    let base = format!("/organization/projects/{p}/api_keys");
    let (_, default) = api.get(&base).await;
    assert_eq!(ids(&default), vec![k_sa.clone(), k_alice.clone()]);
    let (_, active) = api
        .get(&format!("{base}?owner_project_access=active"))
        .await;
    assert_eq!(ids(&active), ids(&default));
    let (_, inactive) = api
        .get(&format!("{base}?owner_project_access=inactive"))
        .await;
    assert_eq!(ids(&inactive), vec![k_bob.clone()]);
    assert_eq!(inactive["data"][0]["owner_project_access"], "inactive");
    let (_, any) = api.get(&format!("{base}?owner_project_access=any")).await;
    assert_eq!(ids(&any), vec![k_sa, k_alice, k_bob]);
    let (status, body) = api.get(&format!("{base}?owner_project_access=some")).await;
    assert_eq!(status, 400);
    assert_eq!(assert_error_shape(&body)["param"], "owner_project_access");
}

#[tokio::test]
async fn object_shapes_follow_the_spec() {
    let api = Api::new().await;
    let (p, sa) = sa_project(&api.sim);
    let alice = api.sim.add_user("Alice Anders", "alice@example.com");
    let sa_key = api
        .sim
        .add_key(&p, OwnerRef::ServiceAccount(sa.clone()), "svc")
        .unwrap();
    api.sim
        .add_key(&p, OwnerRef::User(alice.clone()), "alice")
        .unwrap();

    let (_, project) = api.get(&format!("/organization/projects/{p}")).await;
    assert_eq!(project["object"], "organization.project");
    assert_eq!(project["name"], "prod-a");
    assert_eq!(project["status"], "active");
    assert!(project["archived_at"].is_null());
    assert!(p.starts_with("proj_") && p[5..].chars().all(|c| c.is_ascii_hexdigit()));

    let (_, keys) = api
        .get(&format!("/organization/projects/{p}/api_keys"))
        .await;
    let k = &keys["data"][0];
    assert_eq!(k["object"], "organization.project.api_key");
    assert_eq!(k["id"], sa_key.id.as_str());
    assert!(sa_key.id.starts_with("key_"));
    assert_eq!(
        k["redacted_value"],
        format!("sk-...{}", &sa_key.value[sa_key.value.len() - 4..])
    );
    assert!(
        sa_key.value.starts_with("sk-svcacct-") && sa_key.value.len() == "sk-svcacct-".len() + 48
    );
    assert_eq!(k["name"], "svc");
    assert!(k["created_at"].is_i64());
    assert!(k.as_object().unwrap().contains_key("last_used_at") && k["last_used_at"].is_null());
    assert!(!k.as_object().unwrap().contains_key("expires_at"));
    assert_eq!(k["owner_project_access"], "active");
    assert_eq!(k["owner"]["type"], "service_account");
    let owner: BTreeSet<&str> = k["owner"]["service_account"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(owner, BTreeSet::from(["id", "name", "created_at", "role"]));
    assert_eq!(k["owner"]["service_account"]["id"], sa.as_str());
    assert!(sa.starts_with("svc_acct_"));

    let u = &keys["data"][1];
    assert_eq!(u["owner"]["type"], "user");
    let owner: BTreeSet<&str> = u["owner"]["user"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        owner,
        BTreeSet::from(["id", "email", "name", "created_at", "role"])
    );
    assert_eq!(u["owner"]["user"]["email"], "alice@example.com");
    assert!(alice.starts_with("user_"));
    assert!(api
        .sim
        .key_value(u["id"].as_str().unwrap())
        .unwrap()
        .starts_with("sk-proj-"));

    let (_, sas) = api
        .get(&format!("/organization/projects/{p}/service_accounts"))
        .await;
    assert_eq!(
        sas["data"][0],
        json!({"object": "organization.project.service_account", "id": sa, "name": "backend",
               "role": "member", "created_at": sas["data"][0]["created_at"]})
    );
    let (_, one) = api
        .get(&format!(
            "/organization/projects/{p}/api_keys/{}",
            sa_key.id
        ))
        .await;
    assert_eq!(&one, k);
}

#[tokio::test]
async fn errors_have_the_spec_shape() {
    let api = Api::new().await;
    let (p, sa) = sa_project(&api.sim);
    let key = api
        .sim
        .add_key(&p, OwnerRef::ServiceAccount(sa), "k")
        .unwrap();

    let (status, body) = api
        .call_as(None, Method::GET, "/organization/projects", None)
        .await;
    assert_eq!(status, 401);
    assert_eq!(assert_error_shape(&body)["code"], "invalid_api_key");

    let (status, body) = api
        .call_as(
            Some("sk-admin-unknownkey0000"),
            Method::GET,
            "/organization/projects",
            None,
        )
        .await;
    assert_eq!(status, 401);
    let err = assert_error_shape(&body);
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .starts_with("Incorrect API key provided"),
        "{body}"
    );
    assert_eq!(err["code"], "invalid_api_key");
    assert_eq!(err["type"], "invalid_request_error");
    assert!(!body.to_string().contains("sk-admin-unknownkey0000"));

    let (status, body) = api
        .call_as(
            Some(&key.value),
            Method::GET,
            "/organization/projects",
            None,
        )
        .await;
    assert_eq!(status, 403);
    assert_error_shape(&body);
    // A deleted project key is not even a project key any more.
    api.sim.delete_key(&key.id);
    let (status, _) = api
        .call_as(
            Some(&key.value),
            Method::GET,
            "/organization/projects",
            None,
        )
        .await;
    assert_eq!(status, 401);

    let (status, body) = api
        .get("/organization/projects/proj_unknown/api_keys")
        .await;
    assert_eq!(status, 404);
    assert!(assert_error_shape(&body)["message"]
        .as_str()
        .unwrap()
        .contains("proj_unknown"));
    let (status, body) = api.get("/organization/nothing").await;
    assert_eq!(status, 404);
    assert_error_shape(&body);
    let (status, body) = api.call(Method::PUT, "/organization/projects", None).await;
    assert_eq!(status, 405);
    assert_error_shape(&body);
    let (status, body) = api
        .call(
            Method::POST,
            "/organization/projects",
            Some(json!({"name": 3})),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(assert_error_shape(&body)["param"], "name");
    let (status, body) = api
        .get(&format!("/organization/projects/{p}/api_keys/key_unknown"))
        .await;
    assert_eq!(status, 404);
    assert_error_shape(&body);
    let (status, body) = api
        .call(
            Method::DELETE,
            &format!("/organization/projects/{p}/api_keys/{}", key.id),
            None,
        )
        .await;
    assert_eq!(status, 404, "deleting twice: {body}");
    assert_error_shape(&body);
}

#[tokio::test]
async fn refuse_sa_key_delete_rejects_only_service_account_keys() {
    let api = Api::new().await;
    let (p, sa) = sa_project(&api.sim);
    let user = api.sim.add_user("Alice", "alice@example.com");
    let sa_key = api
        .sim
        .add_key(&p, OwnerRef::ServiceAccount(sa), "svc")
        .unwrap()
        .id;
    let user_key = api
        .sim
        .add_key(&p, OwnerRef::User(user), "alice")
        .unwrap()
        .id;
    api.sim.update_faults(|f| f.refuse_sa_key_delete = true);

    let path = |k: &str| format!("/organization/projects/{p}/api_keys/{k}");
    let (status, body) = api.call(Method::DELETE, &path(&sa_key), None).await;
    assert_eq!(status, 400, "{body}");
    assert!(assert_error_shape(&body)["message"]
        .as_str()
        .unwrap()
        .contains("service account"));
    assert!(api.sim.is_live(&sa_key));
    let (status, _) = api.call(Method::DELETE, &path(&user_key), None).await;
    assert_eq!(status, 200);
    assert!(!api.sim.is_live(&user_key));

    api.sim.update_faults(|f| f.refuse_sa_key_delete = false);
    let (status, _) = api.call(Method::DELETE, &path(&sa_key), None).await;
    assert_eq!(status, 200);
    assert_eq!(api.sim.deleted_keys(), vec![sa_key, user_key]);
}

#[tokio::test]
async fn lost_create_response_leaves_the_key_existing() {
    let api = Api::new().await;
    let (p, sa) = sa_project(&api.sim);
    let path = format!("/organization/projects/{p}/service_accounts/{sa}/api_keys");
    api.sim.set_faults(Faults {
        lose_create_responses: 1,
        ..Faults::default()
    });
    let (status, body) = api
        .call(Method::POST, &path, Some(json!({"name": "keyrotd-a"})))
        .await;
    assert_eq!(status, 500);
    assert_eq!(assert_error_shape(&body)["type"], "server_error");
    assert!(!body.to_string().contains("sk-svcacct-"));

    api.sim.set_faults(Faults {
        lose_create_responses: 1,
        lost_response: LostResponse::Dropped,
        ..Faults::default()
    });
    let outcome = match api
        .send(
            Some(ADMIN),
            Method::POST,
            &path,
            Some(json!({"name": "keyrotd-b"})),
        )
        .await
    {
        Ok(resp) => resp.bytes().await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(outcome.is_err(), "a dropped response must not arrive whole");

    // Both keys exist, minted, with the requested names; the next create works.
    let names: Vec<(String, bool)> = api
        .sim
        .keys(&p)
        .into_iter()
        .map(|k| (k.name, k.minted))
        .collect();
    assert_eq!(
        names,
        vec![
            ("keyrotd-a".to_owned(), true),
            ("keyrotd-b".to_owned(), true)
        ]
    );
    let (status, created) = api
        .call(Method::POST, &path, Some(json!({"name": "keyrotd-c"})))
        .await;
    assert_eq!(status, 200, "{created}");
    assert_eq!(
        created["object"],
        "organization.project.service_account.api_key"
    );
    assert_eq!(
        api.sim
            .key_value(created["id"].as_str().unwrap())
            .as_deref(),
        created["value"].as_str()
    );
    let statuses: Vec<u16> = api
        .sim
        .requests_to(Route::CreateServiceAccountKey)
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, vec![500, 0, 200]);
}

#[tokio::test]
async fn models_accepts_live_project_keys_and_moves_last_used_at() {
    let api = Api::new().await;
    let (p, sa) = sa_project(&api.sim);
    let key = api
        .sim
        .add_key(&p, OwnerRef::ServiceAccount(sa), "k")
        .unwrap();
    api.sim.advance(Duration::from_secs(10 * 86_400));
    let (status, models) = api
        .call_as(Some(&key.value), Method::GET, "/models", None)
        .await;
    assert_eq!(status, 200, "{models}");
    assert_eq!(models["object"], "list");
    assert!(models["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["object"] == "model"));
    let now = api.sim.now();
    let (_, listed) = api
        .get(&format!("/organization/projects/{p}/api_keys/{}", key.id))
        .await;
    assert_eq!(listed["last_used_at"], now);
    assert_eq!(listed["created_at"], key.created_at);
    assert!(now - key.created_at >= 10 * 86_400);

    // The admin key, unknown keys and deleted keys are all 401 on /models.
    for bearer in [ADMIN, "sk-proj-nothing"] {
        let (status, body) = api
            .call_as(Some(bearer), Method::GET, "/models", None)
            .await;
        assert_eq!(status, 401, "{bearer}");
        assert_error_shape(&body);
    }
    assert!(api.sim.use_key(&key.value));
    api.sim.delete_key(&key.id);
    assert!(!api.sim.use_key(&key.value));
    let (status, _) = api
        .call_as(Some(&key.value), Method::GET, "/models", None)
        .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn reject_verification_and_propagation_delay() {
    let api = Api::new().await;
    let (p, sa) = sa_project(&api.sim);
    let seeded = api
        .sim
        .add_key(&p, OwnerRef::ServiceAccount(sa.clone()), "seeded")
        .unwrap();
    let path = format!("/organization/projects/{p}/service_accounts/{sa}/api_keys");
    let (_, minted) = api
        .call(Method::POST, &path, Some(json!({"name": "new"})))
        .await;
    let minted_value = minted["value"].as_str().unwrap().to_owned();

    api.sim
        .update_faults(|f| f.reject_verification = RejectVerification::Minted);
    assert!(api.sim.use_key(&seeded.value));
    assert!(!api.sim.use_key(&minted_value));
    api.sim.update_faults(|f| {
        f.reject_verification = RejectVerification::Keys(BTreeSet::from([seeded.id.clone()]))
    });
    assert!(!api.sim.use_key(&seeded.value));
    assert!(api.sim.use_key(&minted_value));

    api.sim.set_faults(Faults {
        propagation_delay: Duration::from_millis(300),
        ..Faults::default()
    });
    let (_, fresh) = api.call(Method::POST, &path, Some(json!({}))).await;
    assert_eq!(fresh["name"], "Secret Key");
    let value = fresh["value"].as_str().unwrap();
    assert!(!api.sim.use_key(value));
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(api.sim.use_key(value));
}

#[tokio::test]
async fn expiring_keys_show_expires_at_and_stop_working() {
    let api = Api::new().await;
    let (p, sa) = sa_project(&api.sim);
    let path = format!("/organization/projects/{p}/service_accounts/{sa}/api_keys");
    let (status, created) = api
        .call(
            Method::POST,
            &path,
            Some(json!({"name": "exp", "scopes": ["api.model.read"], "expires_in_seconds": 3600})),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let id = created["id"].as_str().unwrap();
    let (_, listed) = api
        .get(&format!("/organization/projects/{p}/api_keys/{id}"))
        .await;
    assert_eq!(
        listed["expires_at"],
        created["created_at"].as_i64().unwrap() + 3600
    );
    let value = created["value"].as_str().unwrap();
    assert!(api.sim.use_key(value));
    api.sim.advance(Duration::from_secs(3601));
    assert!(!api.sim.use_key(value));
    assert!(!api.sim.is_live(id));

    let (status, body) = api
        .call(Method::POST, &path, Some(json!({"expires_in_seconds": 0})))
        .await;
    assert_eq!(status, 400);
    assert_eq!(assert_error_shape(&body)["param"], "expires_in_seconds");
}

#[tokio::test]
async fn service_account_lifecycle() {
    let api = Api::new().await;
    let p = api.sim.add_project("prod-a");
    let base = format!("/organization/projects/{p}/service_accounts");
    let (status, sa) = api
        .call(Method::POST, &base, Some(json!({"name": "backend"})))
        .await;
    assert_eq!(status, 200, "{sa}");
    assert_eq!(sa["object"], "organization.project.service_account");
    assert_eq!(sa["role"], "member");
    assert_eq!(
        sa["api_key"]["object"],
        "organization.project.service_account.api_key"
    );
    let sa_id = sa["id"].as_str().unwrap().to_owned();
    let first_key = sa["api_key"]["id"].as_str().unwrap().to_owned();

    let (_, only) = api
        .call(
            Method::POST,
            &base,
            Some(json!({"name": "bare", "create_service_account_only": true})),
        )
        .await;
    assert_eq!(only["role"], "none");
    assert!(only["api_key"].is_null());

    let (_, extra) = api
        .call(
            Method::POST,
            &format!("{base}/{sa_id}/api_keys"),
            Some(json!({"name": "x"})),
        )
        .await;
    let extra_key = extra["id"].as_str().unwrap().to_owned();
    let (status, deleted) = api
        .call(Method::DELETE, &format!("{base}/{sa_id}"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        deleted,
        json!({"object": "organization.project.service_account.deleted", "id": sa_id, "deleted": true})
    );
    assert!(!api.sim.is_live(&first_key) && !api.sim.is_live(&extra_key));
    let (status, _) = api.get(&format!("{base}/{sa_id}")).await;
    assert_eq!(status, 404);
    let (status, _) = api
        .call(Method::POST, &format!("{base}/{sa_id}/api_keys"), None)
        .await;
    assert_eq!(status, 404);

    // Archived projects: no service-account operations, keys stop working.
    let (_, keys_before) = api
        .get(&format!("/organization/projects/{p}/api_keys"))
        .await;
    assert_eq!(ids(&keys_before), Vec::<String>::new());
    let (status, archived) = api
        .call(
            Method::POST,
            &format!("/organization/projects/{p}/archive"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(archived["status"], "archived");
    let (status, body) = api
        .call(Method::POST, &base, Some(json!({"name": "late"})))
        .await;
    assert_eq!(status, 400);
    assert_error_shape(&body);
    let (status, _) = api.get(&base).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn include_archived_controls_project_listing() {
    let api = Api::new().await;
    let a = api.sim.add_project("prod-a");
    let b = api.sim.add_project("dev-b");
    let c = api.sim.add_project("staging-c");
    api.sim.archive_project(&b);
    let (_, default) = api.get("/organization/projects").await;
    assert_eq!(ids(&default), vec![a.clone(), c.clone()]);
    let (_, all) = api
        .get("/organization/projects?include_archived=true&limit=2")
        .await;
    assert_eq!(ids(&all), vec![a.clone(), b.clone()]);
    assert_eq!(all["has_more"], true);
    assert_eq!(all["data"][1]["status"], "archived");
    assert!(all["data"][1]["archived_at"].is_i64());
    let (_, rest) = api
        .get(&format!(
            "/organization/projects?include_archived=true&limit=2&after={b}"
        ))
        .await;
    assert_eq!(ids(&rest), vec![c]);
    let (_, created) = api
        .call(
            Method::POST,
            "/organization/projects",
            Some(json!({"name": "new"})),
        )
        .await;
    assert_eq!(created["status"], "active");
    assert_eq!(api.sim.projects().len(), 4);
}

#[tokio::test]
async fn admin_keys_can_be_created_used_and_revoked() {
    let api = Api::new().await;
    let (status, created) = api
        .call(
            Method::POST,
            "/organization/admin_api_keys",
            Some(json!({"name": "ci", "expires_in_seconds": 600})),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["object"], "organization.admin_api_key");
    let value = created["value"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(value.starts_with("sk-admin-"));
    assert_eq!(
        created["expires_at"],
        created["created_at"].as_i64().unwrap() + 600
    );

    let (status, list) = api
        .call_as(
            Some(&value),
            Method::GET,
            "/organization/admin_api_keys",
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    assert!(list["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k.get("value").is_none()));
    let (_, desc) = api
        .get("/organization/admin_api_keys?order=desc&limit=1")
        .await;
    assert_eq!(ids(&desc), vec![id.clone()]);

    let (status, _) = api
        .call(
            Method::DELETE,
            &format!("/organization/admin_api_keys/{id}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = api
        .call_as(Some(&value), Method::GET, "/organization/projects", None)
        .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn random_faults_are_seeded_and_carry_retry_headers() {
    let api = Api::new().await;
    api.sim.set_faults(Faults {
        rate_limit_rate: 0.5,
        retry_after: RetryAfter::Millis(1500),
        ..Faults::default()
    });
    let mut limited = 0;
    for _ in 0..40 {
        let resp = api
            .send(Some(ADMIN), Method::GET, "/organization/projects", None)
            .await
            .unwrap();
        if resp.status() == 429 {
            limited += 1;
            assert_eq!(resp.headers()["retry-after-ms"], "1500");
            assert_eq!(resp.headers()["retry-after"], "2");
            let body: Value = resp.json().await.unwrap();
            assert_eq!(assert_error_shape(&body)["code"], "rate_limit_exceeded");
        }
    }
    assert!((8..=32).contains(&limited), "{limited} of 40 rate limited");

    api.sim.set_faults(Faults {
        server_error_rate: 1.0,
        server_error_status: 503,
        ..Faults::default()
    });
    let (status, body) = api.get("/organization/projects").await;
    assert_eq!(status, 503);
    assert_eq!(assert_error_shape(&body)["type"], "server_error");

    api.sim.set_faults(Faults {
        latency: Duration::from_millis(200),
        ..Faults::default()
    });
    let started = Instant::now();
    let (status, _) = api.get("/organization/projects").await;
    assert_eq!(status, 200);
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn scenario_ground_truth_matches_the_api() {
    let api = Api::new().await;
    let truth = Scenario::new(11)
        .projects(6)
        .archived_projects(1)
        .service_accounts_per_project(2)
        .keys_per_service_account(2)
        .user_keys_per_project(2)
        .stale_fraction(0.3)
        .inactive_owner_fraction(0.5)
        .never_used_fraction(0.25)
        .populate(&api.sim);
    assert_eq!(truth.projects.len(), 7);
    assert_eq!(truth.keys.len(), 7 * 6);
    let names: Vec<&str> = truth.projects.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        &names[..3],
        ["prod-payments", "staging-payments", "dev-payments"]
    );

    let (_, projects) = api
        .get("/organization/projects?include_archived=true")
        .await;
    assert_eq!(
        ids(&projects),
        truth
            .projects
            .iter()
            .map(|p| p.id.clone())
            .collect::<Vec<_>>()
    );
    for project in &truth.projects {
        let (_, keys) = api
            .get(&format!(
                "/organization/projects/{}/api_keys?owner_project_access=any",
                project.id
            ))
            .await;
        let want: Vec<_> = truth.keys_in(&project.id).collect();
        let got = keys["data"].as_array().unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g["id"], w.key_id.as_str());
            assert_eq!(g["name"], w.name.as_str());
            assert_eq!(g["created_at"], w.created_at);
            assert_eq!(g["last_used_at"], json!(w.last_used_at));
            assert_eq!(g["owner"]["type"], w.owner_type.as_str());
            assert_eq!(
                g["owner_project_access"],
                if w.owner_inactive {
                    "inactive"
                } else {
                    "active"
                }
            );
            assert_eq!(w.project_archived, project.archived);
            assert_eq!(
                api.sim.key_value(&w.key_id).as_deref(),
                Some(w.value.as_str())
            );
            if w.owner_type == OwnerType::ServiceAccount {
                assert!(project
                    .service_accounts
                    .iter()
                    .any(|(id, name)| *id == w.owner_id && *name == w.owner_name));
            }
        }
    }
}

#[tokio::test]
async fn many_concurrent_requests_on_a_large_org() {
    let api = Api::new().await;
    let truth = Scenario::new(5)
        .projects(300)
        .service_accounts_per_project(3)
        .keys_per_service_account(3)
        .user_keys_per_project(1)
        .populate(&api.sim);
    assert_eq!(truth.keys.len(), 3000);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for project in truth.projects.iter().take(150) {
        let http = api.http.clone();
        let url = format!(
            "{}/organization/projects/{}/api_keys?limit=100&owner_project_access=any",
            api.server.base_url, project.id
        );
        tasks.spawn(async move {
            let resp = http.get(url).bearer_auth(ADMIN).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.json::<Value>().await.unwrap()["data"]
                .as_array()
                .unwrap()
                .len()
        });
    }
    let mut total = 0;
    while let Some(n) = tasks.join_next().await {
        total += n.unwrap();
    }
    assert_eq!(total, 150 * 10);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn service_account_creation_honours_expires_in_seconds() {
    let api = Api::new().await;
    let p = api.sim.add_project("prod-a");
    let base = format!("/organization/projects/{p}/service_accounts");
    let (status, sa) = api
        .call(
            Method::POST,
            &base,
            Some(json!({"name": "backend", "expires_in_seconds": 2_592_000})),
        )
        .await;
    assert_eq!(status, 200, "{sa}");
    let created_at = sa["api_key"]["created_at"].as_i64().unwrap();
    assert_eq!(sa["api_key"]["expires_at"], created_at + 2_592_000);
    let id = sa["api_key"]["id"].as_str().unwrap();
    let (_, listed) = api
        .get(&format!("/organization/projects/{p}/api_keys/{id}"))
        .await;
    assert_eq!(listed["expires_at"], created_at + 2_592_000);
    let logged = api.sim.requests_to(Route::CreateServiceAccount);
    assert_eq!(
        logged[0].body,
        Some(json!({"name": "backend", "expires_in_seconds": 2_592_000}))
    );

    // Without it the key never expires; out of range and with
    // create_service_account_only it is refused, and nothing is created.
    let (_, plain) = api
        .call(Method::POST, &base, Some(json!({"name": "plain"})))
        .await;
    assert!(plain["api_key"].get("expires_at").is_none(), "{plain}");
    for body in [
        json!({"name": "zero", "expires_in_seconds": 0}),
        json!({"name": "bare", "create_service_account_only": true, "expires_in_seconds": 60}),
    ] {
        let (status, err) = api.call(Method::POST, &base, Some(body.clone())).await;
        assert_eq!(status, 400, "{body}: {err}");
        assert_eq!(assert_error_shape(&err)["param"], "expires_in_seconds");
    }
    assert_eq!(api.sim.service_accounts(&p).len(), 2);
}

#[tokio::test]
async fn owner_faults_strip_the_type_or_the_whole_owner() {
    let api = Api::new().await;
    let (p, sa) = sa_project(&api.sim);
    let key = api
        .sim
        .add_key(&p, OwnerRef::ServiceAccount(sa.clone()), "k")
        .unwrap();
    let other = api
        .sim
        .add_key(&p, OwnerRef::ServiceAccount(sa.clone()), "bare")
        .unwrap();
    let list = format!("/organization/projects/{p}/api_keys?owner_project_access=any");
    let (_, typed) = api.get(&list).await;
    assert_eq!(typed["data"][0]["owner"]["type"], "service_account");
    api.sim.update_faults(|f| {
        f.omit_owner_type = true;
        f.bare_owners = [other.id.clone()].into_iter().collect();
    });
    let (status, untyped) = api.get(&list).await;
    assert_eq!(status, 200);
    let owner = &untyped["data"][0]["owner"];
    assert!(owner.get("type").is_none(), "{owner}");
    assert_eq!(owner["service_account"]["id"], sa.as_str());
    assert_eq!(untyped["data"][1]["owner"], json!({}));
    let (_, one) = api
        .get(&format!("/organization/projects/{p}/api_keys/{}", key.id))
        .await;
    assert!(one["owner"].get("type").is_none(), "{one}");
}

#[tokio::test]
async fn key_update_sets_expiry_and_scopes_but_not_on_expired_keys() {
    let api = Api::new().await;
    let (p, sa) = sa_project(&api.sim);
    let key = api
        .sim
        .add_key(&p, OwnerRef::ServiceAccount(sa), "k")
        .unwrap();
    let path = format!("/organization/projects/{p}/api_keys/{}", key.id);
    let (status, updated) = api
        .call(
            Method::POST,
            &path,
            Some(json!({"expires_in_seconds": 600, "scopes": ["api.all.read"]})),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["object"], "organization.project.api_key");
    assert_eq!(updated["id"], key.id.as_str());
    assert!(updated.get("value").is_none(), "redacted: {updated}");
    let now = api.sim.now();
    let at = updated["expires_at"].as_i64().unwrap();
    assert!((now + 599..=now + 600).contains(&at), "{at} vs {now}");
    let sim_key = api.sim.key(&key.id).unwrap();
    assert_eq!(sim_key.expires_at, Some(at));
    assert_eq!(sim_key.scopes, vec!["api.all.read".to_string()]);
    // Scopes alone; [] = all permissions.
    let (status, _) = api
        .call(Method::POST, &path, Some(json!({"scopes": []})))
        .await;
    assert_eq!(status, 200);
    assert!(api.sim.key(&key.id).unwrap().scopes.is_empty());

    for bad in [
        json!({}),
        json!({"expires_in_seconds": null}),
        json!({"scopes": null}),
        json!({"scopes": "api.all.read"}),
        json!({"expires_in_seconds": 0}),
    ] {
        let (status, err) = api.call(Method::POST, &path, Some(bad.clone())).await;
        assert_eq!(status, 400, "{bad}: {err}");
        assert_error_shape(&err);
    }
    let (status, _) = api
        .call(
            Method::POST,
            &format!("/organization/projects/{p}/api_keys/key_missing"),
            Some(json!({"scopes": []})),
        )
        .await;
    assert_eq!(status, 404);

    // Expired: refused, and it stays expired.
    api.sim.advance(Duration::from_secs(601));
    let (status, err) = api
        .call(
            Method::POST,
            &path,
            Some(json!({"expires_in_seconds": 3600})),
        )
        .await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(assert_error_shape(&err)["code"], "api_key_expired");
    assert!(!api.sim.is_live(&key.id));

    // An API without the endpoint.
    let fresh = api
        .sim
        .add_key(&p, OwnerRef::User(api.sim.add_user("A", "a@x.y")), "u")
        .unwrap();
    api.sim.update_faults(|f| f.no_key_update = true);
    let (status, err) = api
        .call(
            Method::POST,
            &format!("/organization/projects/{p}/api_keys/{}", fresh.id),
            Some(json!({"scopes": []})),
        )
        .await;
    assert_eq!(status, 404, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Invalid URL"),
        "{err}"
    );
}

#[tokio::test]
async fn usage_completions_has_the_official_shape_and_pages() {
    let api = Api::new().await;
    let (p, sa) = sa_project(&api.sim);
    let key = api
        .sim
        .add_key(&p, OwnerRef::ServiceAccount(sa), "k")
        .unwrap();
    let day = 86_400;
    let start = (api.sim.now() / day - 3) * day;
    assert!(api.sim.record_usage(&key.id, start + 10, 2, 300, 40));
    assert!(api.sim.record_usage(&key.id, start + day + 5, 1, 100, 10));
    assert!(!api.sim.record_usage("key_missing", start, 1, 1, 1));
    let path = format!(
        "/organization/usage/completions?start_time={start}&bucket_width=1d&limit=2\
         &group_by[]=api_key_id&group_by[]=project_id"
    );
    let (status, page) = api.get(&path).await;
    assert_eq!(status, 200, "{page}");
    // UsageResponse: object, data, has_more, next_page required.
    assert_eq!(page["object"], "page");
    assert_eq!(page["has_more"], true);
    let next = page["next_page"].as_str().expect("next_page").to_owned();
    let buckets = page["data"].as_array().unwrap();
    assert_eq!(buckets.len(), 2);
    // UsageTimeBucket: object, start_time, end_time, results.
    assert_eq!(buckets[0]["object"], "bucket");
    assert_eq!(buckets[0]["start_time"], start);
    assert_eq!(buckets[0]["end_time"], start + day);
    // UsageCompletionsResult: object, input_tokens, output_tokens, num_model_requests.
    let r = &buckets[0]["results"][0];
    assert_eq!(r["object"], "organization.usage.completions.result");
    assert_eq!(
        (
            &r["input_tokens"],
            &r["output_tokens"],
            &r["num_model_requests"]
        ),
        (&json!(300), &json!(40), &json!(2))
    );
    assert_eq!(r["api_key_id"], key.id.as_str());
    assert_eq!(r["project_id"], p.as_str());
    assert!(r["model"].is_null(), "not grouped by model: {r}");
    assert_eq!(buckets[1]["results"][0]["input_tokens"], 100);

    let (_, rest) = api.get(&format!("{path}&page={next}")).await;
    assert_eq!(rest["has_more"], false);
    assert!(rest["next_page"].is_null());
    assert_eq!(rest["data"][0]["start_time"], start + 2 * day);
    assert_eq!(rest["data"][0]["results"], json!([]));

    for bad in [
        "/organization/usage/completions",
        "/organization/usage/completions?start_time=0&bucket_width=1w",
        "/organization/usage/completions?start_time=0&bucket_width=1d&limit=32",
        "/organization/usage/completions?start_time=0&group_by=colour",
    ] {
        let (status, err) = api.get(bad).await;
        assert_eq!(status, 400, "{bad}: {err}");
        assert_error_shape(&err);
    }
}

#[tokio::test]
async fn costs_price_the_recorded_usage() {
    let api = Api::new().await;
    let (p, sa) = sa_project(&api.sim);
    let key = api
        .sim
        .add_key(&p, OwnerRef::ServiceAccount(sa), "k")
        .unwrap();
    let day = 86_400;
    let start = (api.sim.now() / day - 1) * day;
    assert!(api
        .sim
        .record_usage(&key.id, start + 10, 3, 2_000_000, 1_000_000));
    let (status, page) = api
        .get(&format!(
            "/organization/costs?start_time={start}&group_by=line_item&group_by=project_id"
        ))
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["object"], "page");
    assert_eq!(page["has_more"], false);
    let results = page["data"][0]["results"].as_array().unwrap();
    let [(input_item, input_price), (output_item, output_price)] = keyrotd::sim::PRICES;
    let by_item = |item: &str| {
        results
            .iter()
            .find(|r| r["line_item"] == item)
            .unwrap_or_else(|| panic!("{item} in {results:?}"))
            .clone()
    };
    let input = by_item(input_item);
    assert_eq!(input["object"], "organization.costs.result");
    assert_eq!(
        input["amount"],
        json!({"value": 2.0 * input_price, "currency": "usd"})
    );
    assert_eq!(input["project_id"], p.as_str());
    assert!(input["api_key_id"].is_null());
    assert_eq!(input["quantity"], 2_000_000);
    assert_eq!(by_item(output_item)["amount"]["value"], json!(output_price));
    let (status, err) = api
        .get(&format!(
            "/organization/costs?start_time={start}&group_by=model"
        ))
        .await;
    assert_eq!(status, 400, "{err}");
}

/// The admin key's id, as audit-log actors name it.
fn admin_key_id(sim: &Sim) -> String {
    sim.admin_keys()
        .into_iter()
        .find(|k| k.value == ADMIN)
        .expect("initial admin key")
        .id
}

#[tokio::test]
async fn audit_log_records_every_key_and_service_account_change_with_its_actor() {
    let api = Api::new().await;
    let p = api.sim.add_project("prod-a");
    let before = api.sim.audit_log().len();
    // Through the API, with the admin key.
    let base = format!("/organization/projects/{p}/service_accounts");
    let (status, sa) = api
        .call(Method::POST, &base, Some(json!({"name": "backend"})))
        .await;
    assert_eq!(status, 200, "{sa}");
    let sa_id = sa["id"].as_str().unwrap().to_owned();
    let first_key = sa["api_key"]["id"].as_str().unwrap().to_owned();
    let (_, second) = api
        .call(
            Method::POST,
            &format!("{base}/{sa_id}/api_keys"),
            Some(json!({"name": "second", "scopes": ["api.model.read"]})),
        )
        .await;
    let second_key = second["id"].as_str().unwrap().to_owned();
    let (status, _) = api
        .call(
            Method::POST,
            &format!("/organization/projects/{p}/api_keys/{second_key}"),
            Some(json!({"scopes": ["api.all.read"]})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = api
        .call(
            Method::POST,
            &format!("{base}/{sa_id}"),
            Some(json!({"role": "owner"})),
        )
        .await;
    assert_eq!(status, 200);
    // By hand, in the dashboard.
    let hand = api
        .sim
        .create_key_by_hand(&p, "dana@example.com", "laptop")
        .unwrap();
    assert_eq!(api.sim.key(&hand.id).unwrap().owner_name, "dana");
    let (status, _) = api
        .call(Method::DELETE, &format!("{base}/{sa_id}"), None)
        .await;
    assert_eq!(status, 200);

    let (status, page) = api.get("/organization/audit_logs?limit=100").await;
    assert_eq!(status, 200, "{page}");
    crate::spec_schema::assert_conforms("ListAuditLogsResponse", &page);
    let text = page.to_string();
    for k in [&first_key, &second_key, &hand.id] {
        let value = api.sim.key_value(k).unwrap();
        assert!(!text.contains(&value), "a key value in the audit log");
    }
    let entries: Vec<&Value> = page["data"].as_array().unwrap()[..]
        .iter()
        .take(page["data"].as_array().unwrap().len() - before)
        .collect();
    // Newest first.
    let summary: Vec<(String, String)> = entries
        .iter()
        .map(|e| {
            let kind = e["type"].as_str().unwrap().to_owned();
            (kind.clone(), e[&kind]["id"].as_str().unwrap().to_owned())
        })
        .collect();
    let s = |k: &str, id: &str| (k.to_owned(), id.to_owned());
    assert_eq!(
        summary,
        vec![
            s("service_account.deleted", &sa_id),
            s("api_key.deleted", &second_key),
            s("api_key.deleted", &first_key),
            s("api_key.created", &hand.id),
            s("service_account.updated", &sa_id),
            s("api_key.updated", &second_key),
            s("api_key.created", &second_key),
            s("api_key.created", &first_key),
            s("service_account.created", &sa_id),
        ],
        "{page:#}"
    );
    let admin_id = admin_key_id(&api.sim);
    for e in &entries {
        assert_eq!(e["project"]["id"], p.as_str(), "{e}");
        assert_eq!(e["project"]["name"], "prod-a");
        let kind = e["type"].as_str().unwrap();
        if e[kind]["id"] == hand.id.as_str() {
            assert_eq!(e["actor"]["type"], "session", "{e}");
            assert_eq!(
                e["actor"]["session"]["user"]["email"], "dana@example.com",
                "{e}"
            );
            assert!(e["actor"]["session"]["ip_address"].is_string());
        } else {
            assert_eq!(e["actor"]["type"], "api_key", "{e}");
            assert_eq!(e["actor"]["api_key"]["id"], admin_id.as_str(), "{e}");
            assert_eq!(e["actor"]["api_key"]["type"], "user");
            assert_eq!(e["actor"]["api_key"]["user"]["email"], "owner@example.com");
        }
    }
    let by_kind = |kind: &str| entries.iter().find(|e| e["type"] == kind).unwrap()[kind].clone();
    assert_eq!(
        by_kind("api_key.updated")["changes_requested"]["scopes"],
        json!(["api.all.read"])
    );
    assert_eq!(
        by_kind("service_account.updated")["changes_requested"]["role"],
        "owner"
    );
    assert_eq!(by_kind("service_account.created")["data"]["role"], "member");
    // The ground truth says the same.
    let truth = api.sim.audit_log();
    assert_eq!(truth.len(), page["data"].as_array().unwrap().len());
    for (t, e) in truth.iter().zip(page["data"].as_array().unwrap()) {
        assert_eq!(t.id, e["id"].as_str().unwrap());
        assert_eq!(t.kind, e["type"].as_str().unwrap());
        assert_eq!(t.effective_at, e["effective_at"].as_i64().unwrap());
    }
    assert!(matches!(&truth[0].actor, keyrotd::sim::SimActor::AdminKey(id) if *id == admin_id));
}

#[tokio::test]
async fn audit_log_filters_and_pages_like_the_official_schema() {
    let api = Api::new().await;
    let (p, sa) = sa_project(&api.sim);
    let other = api.sim.add_project("dev-b");
    let t0 = api.sim.now();
    let mut keys = Vec::new();
    for i in 0..25 {
        api.sim.advance(Duration::from_secs(10));
        let k = api
            .sim
            .add_key(&p, OwnerRef::ServiceAccount(sa.clone()), &format!("k{i}"))
            .unwrap();
        keys.push(k.id);
    }
    let hand = api
        .sim
        .create_key_by_hand(&other, "erin@example.com", "notebook")
        .unwrap();
    assert!(api.sim.delete_key(&keys[3]));
    let all = api.sim.audit_log();
    // service_account.created + 25 + 1 created + 1 deleted.
    assert_eq!(all.len(), 28);

    // Default limit 20; `after` walks on; first_id / last_id name the page's ends.
    let (status, page1) = api.get("/organization/audit_logs").await;
    assert_eq!(status, 200);
    crate::spec_schema::assert_conforms("ListAuditLogsResponse", &page1);
    assert_eq!(ids(&page1).len(), 20);
    assert_eq!(page1["has_more"], true);
    assert_eq!(page1["first_id"], all[0].id.as_str());
    assert_eq!(page1["last_id"], all[19].id.as_str());
    let (_, page2) = api
        .get(&format!(
            "/organization/audit_logs?after={}",
            page1["last_id"].as_str().unwrap()
        ))
        .await;
    crate::spec_schema::assert_conforms("ListAuditLogsResponse", &page2);
    assert_eq!(page2["has_more"], false);
    let walked: Vec<String> = ids(&page1).into_iter().chain(ids(&page2)).collect();
    let want: Vec<String> = all.iter().map(|e| e.id.clone()).collect();
    assert_eq!(walked, want);
    // `before`: the entries just before the cursor, in listing order.
    let (_, back) = api
        .get(&format!(
            "/organization/audit_logs?limit=5&before={}",
            all[12].id
        ))
        .await;
    assert_eq!(ids(&back), want[7..12].to_vec());
    assert_eq!(back["has_more"], true);
    let (_, back) = api
        .get(&format!(
            "/organization/audit_logs?limit=5&before={}",
            all[3].id
        ))
        .await;
    assert_eq!(ids(&back), want[..3].to_vec());
    assert_eq!(back["has_more"], false);
    let (_, between) = api
        .get(&format!(
            "/organization/audit_logs?after={}&before={}",
            all[9].id, all[2].id
        ))
        .await;
    assert_eq!(
        ids(&between),
        Vec::<String>::new(),
        "before lies above after"
    );
    let (_, between) = api
        .get(&format!(
            "/organization/audit_logs?after={}&before={}",
            all[2].id, all[9].id
        ))
        .await;
    assert_eq!(ids(&between), want[3..9].to_vec());

    // Filters.
    let only = |query: &str| {
        let query = query.to_owned();
        let api = &api;
        async move {
            let (status, page) = api
                .get(&format!("/organization/audit_logs?limit=100&{query}"))
                .await;
            assert_eq!(status, 200, "{query}: {page}");
            crate::spec_schema::assert_conforms("ListAuditLogsResponse", &page);
            ids(&page)
        }
    };
    let expect = |f: &dyn Fn(&keyrotd::sim::SimAuditEntry) -> bool| -> Vec<String> {
        all.iter().filter(|e| f(e)).map(|e| e.id.clone()).collect()
    };
    assert_eq!(
        only("event_types[]=api_key.deleted").await,
        expect(&|e| e.kind == "api_key.deleted")
    );
    assert_eq!(
        only("event_types[]=api_key.deleted&event_types[]=service_account.created").await,
        expect(&|e| e.kind == "api_key.deleted" || e.kind == "service_account.created")
    );
    assert_eq!(
        only(&format!("project_ids[]={other}")).await,
        vec![all
            .iter()
            .find(|e| e.resource_id == hand.id)
            .unwrap()
            .id
            .clone()]
    );
    assert_eq!(
        only(&format!("resource_ids[]={}", keys[3])).await,
        expect(&|e| e.resource_id == keys[3])
    );
    assert_eq!(only(&format!("resource_ids[]={}", keys[3])).await.len(), 2);
    let (lo, hi) = (t0 + 50, t0 + 100);
    assert_eq!(
        only(&format!("effective_at[gte]={lo}&effective_at[lt]={hi}")).await,
        expect(&|e| (lo..hi).contains(&e.effective_at))
    );
    assert_eq!(
        only(&format!("effective_at[gt]={lo}&effective_at[lte]={hi}")).await,
        expect(&|e| e.effective_at > lo && e.effective_at <= hi)
    );
    assert_eq!(
        only("actor_emails[]=erin@example.com").await,
        expect(&|e| e.resource_id == hand.id)
    );
    // An admin key id as actor: nothing here was made through the API.
    assert!(only(&format!("actor_ids[]={}", admin_key_id(&api.sim)))
        .await
        .is_empty());

    for bad in [
        "/organization/audit_logs?limit=0",
        "/organization/audit_logs?limit=101",
        "/organization/audit_logs?after=audit_log-nope",
        "/organization/audit_logs?before=audit_log-nope",
        "/organization/audit_logs?effective_at[gt]=yesterday",
        "/organization/audit_logs?tenant_only=maybe",
    ] {
        let (status, err) = api.get(bad).await;
        assert_eq!(status, 400, "{bad}: {err}");
        assert_error_shape(&err);
    }
    let (status, _) = api
        .call_as(None, Method::GET, "/organization/audit_logs", None)
        .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn usage_and_costs_responses_follow_the_official_schemas() {
    let api = Api::new().await;
    let (p, sa) = sa_project(&api.sim);
    let key = api
        .sim
        .add_key(&p, OwnerRef::ServiceAccount(sa), "k")
        .unwrap();
    let day = 86_400;
    let start = (api.sim.now() / day - 2) * day;
    assert!(api.sim.record_usage(&key.id, start + 10, 2, 300, 40));
    for query in [
        format!("/organization/usage/completions?start_time={start}"),
        format!("/organization/usage/completions?start_time={start}&bucket_width=1h&limit=3"),
        format!("/organization/usage/completions?start_time={start}&group_by[]=api_key_id&group_by[]=model&group_by[]=project_id"),
        format!("/organization/costs?start_time={start}"),
        format!("/organization/costs?start_time={start}&group_by=line_item&group_by=api_key_id&group_by=project_id"),
    ] {
        let (status, page) = api.get(&query).await;
        assert_eq!(status, 200, "{query}: {page}");
        crate::spec_schema::assert_conforms("UsageResponse", &page);
        assert!(
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|b| !b["results"].as_array().unwrap().is_empty()),
            "{query}: no results to check in {page}"
        );
    }
}

#[tokio::test]
async fn project_key_calls_count_as_usage_per_minute() {
    let api = Api::new().await;
    let (p, sa) = sa_project(&api.sim);
    let key = api
        .sim
        .add_key(&p, OwnerRef::ServiceAccount(sa.clone()), "k")
        .unwrap();
    let idle = api
        .sim
        .add_key(&p, OwnerRef::ServiceAccount(sa), "idle")
        .unwrap();
    let minute = (api.sim.now() / 60 + 1) * 60;
    api.sim
        .advance(Duration::from_secs((minute - api.sim.now()) as u64));
    for _ in 0..3 {
        let (status, _) = api
            .call_as(Some(&key.value), Method::GET, "/models", None)
            .await;
        assert_eq!(status, 200);
    }
    api.sim.advance(Duration::from_secs(60));
    assert!(api.sim.use_key(&key.value));
    // A rejected call is no usage.
    assert!(api.sim.delete_key(&idle.id));
    let (status, _) = api
        .call_as(Some(&idle.value), Method::GET, "/models", None)
        .await;
    assert_eq!(status, 401);

    let (status, page) = api
        .get(&format!(
            "/organization/usage/completions?start_time={minute}&end_time={}&bucket_width=1m\
             &group_by=api_key_id",
            minute + 120
        ))
        .await;
    assert_eq!(status, 200, "{page}");
    crate::spec_schema::assert_conforms("UsageResponse", &page);
    let per_minute: Vec<Vec<(String, u64)>> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            b["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r["api_key_id"].as_str().unwrap().to_owned(),
                        r["num_model_requests"].as_u64().unwrap(),
                    )
                })
                .collect()
        })
        .collect();
    assert_eq!(
        per_minute,
        vec![vec![(key.id.clone(), 3)], vec![(key.id.clone(), 1)]]
    );
    let totals = api.sim.usage_totals(minute, minute + 120);
    assert_eq!(totals.len(), 1);
    assert_eq!(totals[&key.id].requests, 4);
    assert_eq!(totals[&key.id].input_tokens, 0);
}

#[tokio::test]
async fn disabled_and_expired_keys_fail_authentication_everywhere() {
    let api = Api::new().await;
    let (p, sa) = sa_project(&api.sim);
    let leaked = api
        .sim
        .add_key(&p, OwnerRef::ServiceAccount(sa.clone()), "leaked")
        .unwrap();
    let fine = api
        .sim
        .add_key(&p, OwnerRef::ServiceAccount(sa.clone()), "fine")
        .unwrap();
    let projects = "/organization/projects";
    // Live: 200 on /models, 403 on an admin endpoint.
    let (status, _) = api
        .call_as(Some(&leaked.value), Method::GET, "/models", None)
        .await;
    assert_eq!(status, 200);
    let (status, _) = api
        .call_as(Some(&leaked.value), Method::GET, projects, None)
        .await;
    assert_eq!(status, 403);

    assert!(api.sim.disable_key(&leaked.id));
    assert!(!api.sim.disable_key("key_missing"));
    for path in ["/models", projects] {
        let (status, err) = api
            .call_as(Some(&leaked.value), Method::GET, path, None)
            .await;
        assert_eq!(status, 401, "{path}: {err}");
        assert_eq!(assert_error_shape(&err)["code"], "invalid_api_key");
        assert!(!err.to_string().contains(&leaked.value), "{err}");
    }
    assert!(!api.sim.use_key(&leaked.value));
    assert!(api.sim.use_key(&fine.value), "only the disabled key");
    // Still listed, as before.
    let (_, listed) = api
        .get(&format!("{projects}/{p}/api_keys?owner_project_access=any"))
        .await;
    assert!(ids(&listed).contains(&leaked.id));

    // An expired key: the same 401 on both, and it cannot be updated.
    let (_, created) = api
        .call(
            Method::POST,
            &format!("{projects}/{p}/service_accounts/{sa}/api_keys"),
            Some(json!({"expires_in_seconds": 60})),
        )
        .await;
    let value = created["value"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    api.sim.advance(Duration::from_secs(61));
    for path in ["/models", projects] {
        let (status, err) = api.call_as(Some(&value), Method::GET, path, None).await;
        assert_eq!(status, 401, "{path}: {err}");
    }
    let (status, err) = api
        .call(
            Method::POST,
            &format!("{projects}/{p}/api_keys/{id}"),
            Some(json!({"expires_in_seconds": 600})),
        )
        .await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(assert_error_shape(&err)["code"], "api_key_expired");
}
