//! DESIGN.md §5 I4 for the stores: a known secret value pushed through every failure path of
//! every backend never appears in an error's Display or Debug output, nor in anything
//! logged meanwhile (all targets, including vaultrs and the AWS SDK, at TRACE).

use std::io::Write;
use std::sync::{Arc, Mutex};

use crate::store_support::*;
use keyrotd::config::VaultAuth;
use keyrotd::store::aws::AwsStore;
use keyrotd::store::vault::VaultStore;
use keyrotd::store::{DynStore, SecretRecord, StoreError, Transition, Version};
use reqwest::Method;
use secrecy::SecretString;
use serde_json::json;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn canary() -> String {
    format!("sk-proj-CANARY{:016x}", rand::random::<u64>())
}

fn canary_record(key_id: &str, canary: &str) -> SecretRecord {
    SecretRecord {
        api_key: SecretString::from(canary.to_string()),
        ..record(key_id)
    }
}

/// A document whose fields are wrong in ways serde likes to quote.
fn poisoned(canary: &str) -> serde_json::Value {
    json!({
        "api_key": canary, "key_id": "key_p", "project_id": "proj", "service_account_id": "sa",
        "created_at": canary, "managed_by": "keyrotd",
        "rotation": {"intent": {"key_name": "k", "owner": "o", "lease_until": "2026-01-01T00:00:00Z",
                                "attempt": canary, "service_account_id": "sa"}}
    })
}

struct Check {
    canary: String,
    errors: Vec<String>,
}

impl Check {
    fn err<T: std::fmt::Debug>(&mut self, what: &str, r: Result<T, StoreError>) {
        match r {
            Err(e) => {
                self.errors.push(format!("{what}: {e}"));
                self.errors.push(format!("{what}: {e:?}"));
            }
            Ok(v) => panic!("{what}: expected a failure, got {v:?}"),
        }
    }

    fn done(&self, logs: &Captured) {
        assert!(
            self.errors.len() >= 30,
            "every path failed as intended ({})",
            self.errors.len()
        );
        for e in &self.errors {
            assert!(!e.contains(&self.canary), "secret in an error: {e}");
        }
        let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
        assert!(logs.len() > 1000, "the log capture works");
        assert!(!logs.contains(&self.canary), "secret in the logs");
    }
}

#[tokio::test]
async fn no_secret_in_errors_debug_or_logs() {
    let logs = Captured::default();
    let writer = logs.clone();
    // This thread's default (the test runs on a current-thread runtime, so every task
    // the stores spawn logs here too): other tests in this binary keep their own.
    let _logs = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .finish(),
    );
    let canary = canary();
    let mut c = Check {
        canary: canary.clone(),
        errors: Vec::new(),
    };

    // Debug of the values that carry it.
    let rec = canary_record("key_c", &canary);
    c.errors
        .push(format!("{rec:?} {:?}", Transition::Stage(rec.clone())));

    // --- file ---
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    let file = file_store(root.clone());
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("poisoned.json"), poisoned(&canary).to_string()).unwrap();
    c.err("file: poisoned read", file.read("poisoned").await);
    let st = step(&file, "slot", Transition::Intent(intent(1))).await;
    c.err(
        "file: stale stage",
        file.apply("slot", &Version::absent(), &Transition::Stage(rec.clone()))
            .await,
    );
    c.err(
        "file: poisoned stage",
        file.apply("poisoned", &st.version, &Transition::Stage(rec.clone()))
            .await,
    );
    std::fs::write(root.join("blocker"), "").unwrap();
    c.err(
        "file: parent is a file",
        file.apply(
            "blocker/x",
            &Version::absent(),
            &Transition::Stage(rec.clone()),
        )
        .await,
    );

    // --- vault ---
    let vault = vault_store("secret").await;
    let vpath = unique("leak");
    bao(
        Method::POST,
        &format!("secret/data/{vpath}-poisoned"),
        Some(json!({"data": poisoned(&canary)})),
    )
    .await;
    c.err(
        "vault: poisoned read",
        vault.read(&format!("{vpath}-poisoned")).await,
    );
    c.err(
        "vault: poisoned stage",
        vault
            .apply(
                &format!("{vpath}-poisoned"),
                &Version("1".into()),
                &Transition::Stage(rec.clone()),
            )
            .await,
    );
    let vst = step(&vault, &vpath, Transition::Intent(intent(1))).await;
    c.err(
        "vault: stale stage",
        vault
            .apply(&vpath, &Version::absent(), &Transition::Stage(rec.clone()))
            .await,
    );
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("token");
    std::fs::write(&tok, &canary).unwrap();
    let token_auth = VaultAuth::Token {
        token_env: None,
        token_file: Some(tok.clone()),
    };
    c.err(
        "vault: canary token",
        VaultStore::connect("vault", &vault_config("secret", token_auth.clone())).await,
    );
    let mut unreachable = vault_config("secret", token_auth);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    unreachable.address = format!("http://127.0.0.1:{port}");
    unreachable.max_retries = 0;
    c.err(
        "vault: canary token, no server",
        VaultStore::connect("vault", &unreachable).await,
    );
    let secret_id = dir.path().join("secret-id");
    std::fs::write(&secret_id, &canary).unwrap();
    // A role id of its own: failed logins count towards OpenBao's user lockout of that
    // role, which must not be the role other tests log in with.
    let role_id = dir.path().join("role-id");
    std::fs::write(&role_id, format!("{:016x}", rand::random::<u64>())).unwrap();
    let approle = VaultAuth::Approle {
        mount: "approle".into(),
        role_id_env: None,
        role_id_file: Some(role_id),
        secret_id_env: None,
        secret_id_file: Some(secret_id),
    };
    c.err(
        "vault: canary secret id",
        VaultStore::connect("vault", &vault_config("secret", approle)).await,
    );
    // A token that may only read: the staged write is refused.
    let ro = bao(
        Method::POST,
        "auth/token/create",
        Some(json!({"policies": ["default"], "ttl": "1h"})),
    )
    .await["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::write(&tok, ro).unwrap();
    let limited: DynStore = Arc::new(
        VaultStore::connect(
            "vault",
            &vault_config(
                "secret",
                VaultAuth::Token {
                    token_env: None,
                    token_file: Some(tok),
                },
            ),
        )
        .await
        .expect("limited token"),
    );
    c.err(
        "vault: denied stage",
        limited
            .apply(&vpath, &vst.version, &Transition::Stage(rec.clone()))
            .await,
    );
    c.err("vault: denied probe", limited.probe_write(&vpath).await);

    // --- aws ---
    let aws = aws_store().await;
    let sdk = aws_sdk().await;
    let apath = unique("leak");
    sdk.create_secret()
        .name(format!("{apath}-poisoned"))
        .secret_string(poisoned(&canary).to_string())
        .send()
        .await
        .unwrap();
    c.err(
        "aws: poisoned read",
        aws.read(&format!("{apath}-poisoned")).await,
    );
    sdk.create_secret()
        .name(format!("{apath}-foreign"))
        .secret_string(json!({"password": canary}).to_string())
        .send()
        .await
        .unwrap();
    c.err(
        "aws: foreign read",
        aws.read(&format!("{apath}-foreign")).await,
    );
    sdk.create_secret()
        .name(format!("{apath}-garbage"))
        .secret_string(format!("not json {canary}"))
        .send()
        .await
        .unwrap();
    c.err(
        "aws: garbage read",
        aws.read(&format!("{apath}-garbage")).await,
    );
    step(&aws, &apath, Transition::Intent(intent(1))).await;
    c.err(
        "aws: stale stage",
        aws.apply(&apath, &Version::absent(), &Transition::Stage(rec.clone()))
            .await,
    );
    // Same key id, different value: the derived ClientRequestToken is already used.
    let honest = record("key_c");
    let staged = step(&aws, &apath, Transition::Stage(honest)).await;
    let abandoned = aws
        .apply(&apath, &staged.version, &Transition::Abandon)
        .await
        .unwrap();
    c.err(
        "aws: token reuse",
        aws.apply(&apath, &abandoned.version, &Transition::Stage(rec.clone()))
            .await,
    );
    let gone = unique("leak-gone");
    step(&aws, &gone, Transition::Intent(intent(1))).await;
    let gst = aws.read(&gone).await.unwrap();
    sdk.delete_secret().secret_id(&gone).send().await.unwrap();
    c.err(
        "aws: stage on deleted",
        aws.apply(&gone, &gst.version, &Transition::Stage(rec.clone()))
            .await,
    );
    let mut cfg = aws_config();
    cfg.endpoint_url = format!("http://127.0.0.1:{port}");
    cfg.max_retries = 0;
    let down = AwsStore::connect("aws", &cfg).await.unwrap();
    use keyrotd::store::SecretStore;
    c.err(
        "aws: no server",
        down.apply(&apath, &Version::absent(), &Transition::Stage(rec.clone()))
            .await,
    );

    for store in [&file, &vault, &aws] {
        c.errors.push(format!("{store:?}"));
    }
    c.done(&logs);
}
