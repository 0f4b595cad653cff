//! `keyrotd check-config --connect` through the binary: one line per check, and what
//! to do when one fails.

use std::process::Command;

use crate::e2e::{Stores, World, ADMIN_KEY, ADMIN_KEY_ENV};
use keyrotd::sim::Scenario;

fn check(w: &World, toml: &str, admin_key: &str, vault_token: Option<&str>) -> (i32, String) {
    let path = w
        .dir
        .path()
        .join(format!("check-{:x}.toml", rand::random::<u32>()));
    std::fs::write(&path, toml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyrotd"));
    cmd.args([
        "--config",
        path.to_str().unwrap(),
        "check-config",
        "--connect",
    ])
    .env(ADMIN_KEY_ENV, admin_key);
    if let Some(t) = vault_token {
        cmd.env("KEYROTD_TEST_VAULT_TOKEN", t);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_check_passes_against_working_services() {
    let w = World::new(Scenario::new(41).projects(2), Stores::All, "").await;
    let (code, out) = check(&w, &w.toml, ADMIN_KEY, None);
    assert_eq!(code, 0, "{out}");
    for want in [
        "[ OK ] OpenAI Admin API: admin key accepted",
        "[ OK ] store file:",
        "[ OK ] store vault:",
        "[ OK ] store aws:",
        "[ OK ] store file write (prod)",
        "[ OK ] store vault write (prod)",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert!(!out.contains("[FAIL]"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_name_the_problem_and_the_remedy() {
    let w = World::new(Scenario::new(42).projects(2), Stores::All, "").await;

    let (code, out) = check(&w, &w.toml, "sk-admin-not-the-right-one", None);
    assert_eq!(code, 2);
    assert!(
        out.contains("[FAIL] OpenAI Admin API: admin key rejected"),
        "{out}"
    );
    assert!(!out.contains("sk-admin-not-the-right-one"), "{out}");

    // A project key is not an admin key: 403.
    let project_key = w.truth.keys[0].value.clone();
    let (code, out) = check(&w, &w.toml, &project_key, None);
    assert_eq!(code, 2);
    assert!(
        out.contains("not an admin key or missing permission"),
        "{out}"
    );
    assert!(!out.contains(&project_key), "{out}");

    // Nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let toml = w
        .toml
        .replace(&w.server.base_url, &format!("http://{closed}/v1"));
    let (code, out) = check(&w, &toml, ADMIN_KEY, None);
    assert_eq!(code, 2);
    assert!(
        out.contains("[FAIL] OpenAI Admin API: network error"),
        "{out}"
    );

    // A Vault token that does not exist: the vault line fails, the others still pass.
    let (code, out) = check(&w, &w.toml, ADMIN_KEY, Some("hvs.not-a-real-token"));
    assert_eq!(code, 2);
    assert!(out.contains("[FAIL] store vault"), "{out}");
    assert!(out.contains("[ OK ] store file:"), "{out}");
    assert!(out.contains("[ OK ] OpenAI Admin API"), "{out}");
    assert!(!out.contains("hvs.not-a-real-token"), "{out}");
}
