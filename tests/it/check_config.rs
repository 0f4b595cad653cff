//! `keyrotd check-config --connect` through the binary: one line per check, and what
//! to do when one fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

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

/// Runs `check-config --connect` on `toml` with `env` set (`None`: removed) and, for a
/// hermetic AWS credential chain, no AWS variable of the caller's; returns the exit
/// code, stdout, stderr and how long it took.
fn check_env(
    w: &World,
    toml: &str,
    env: &[(&str, Option<&str>)],
) -> (i32, String, String, Duration) {
    let path = w
        .dir
        .path()
        .join(format!("check-{:x}.toml", rand::random::<u32>()));
    std::fs::write(&path, toml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyrotd"));
    cmd.args(["--config", path.to_str().unwrap(), "--log-format", "json"])
        .args(["check-config", "--connect"])
        .env(ADMIN_KEY_ENV, ADMIN_KEY)
        .env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    let aws_dir = tempfile::tempdir().unwrap();
    let empty = aws_dir.path().join("empty");
    std::fs::write(&empty, "").unwrap();
    cmd.env("AWS_CONFIG_FILE", &empty)
        .env("AWS_SHARED_CREDENTIALS_FILE", &empty);
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let start = Instant::now();
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        start.elapsed(),
    )
}

/// The output lines that start with `prefix`.
fn lines_with<'a>(out: &'a str, prefix: &str) -> Vec<&'a str> {
    out.lines().filter(|l| l.starts_with(prefix)).collect()
}

/// Every path below `root`, sorted (empty when `root` does not exist).
fn tree(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_probes_leave_nothing_behind() {
    let w = World::new(Scenario::new(43).projects(2), Stores::File, "").await;
    // The world's store dir does not exist yet; one nested three levels deeper neither.
    let secrets = w.dir.path().join("secrets");
    let deep = w.dir.path().join("a/b/c/secrets");
    let toml = format!(
        "{}\n[stores.deep]\ntype = \"file\"\ndir = \"{}\"\n\n[[rotate]]\nname = \"deep\"\n\
         project = \"*\"\nservice_account = \"*\"\nstores = [\"deep\"]\npath = \"x/{{project_id}}/y\"\n",
        w.toml,
        deep.display()
    );
    let before = tree(w.dir.path());
    let (code, out, err, _) = check_env(&w, &toml, &[]);
    assert_eq!(code, 0, "{out}{err}");
    for want in [
        "[ OK ] store file: file: dir writable",
        "[ OK ] store file write (prod)",
        "[ OK ] store deep write (deep)",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert!(!secrets.exists() && !w.dir.path().join("a").exists());
    let config_files = |t: Vec<PathBuf>| -> Vec<PathBuf> {
        t.into_iter()
            .filter(|p| !p.to_string_lossy().ends_with(".toml"))
            .collect()
    };
    assert_eq!(config_files(tree(w.dir.path())), config_files(before));

    // An existing store dir with a slot in it is left exactly as it was.
    std::fs::create_dir_all(secrets.join(&w.prefix)).unwrap();
    std::fs::write(secrets.join(&w.prefix).join("other.json"), "{}").unwrap();
    let before = tree(&secrets);
    let (code, out, err, _) = check_env(&w, &w.toml, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(tree(&secrets), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dir_that_is_a_file_is_named_and_nothing_is_created() {
    let w = World::new(Scenario::new(44).projects(1), Stores::File, "").await;
    let plain = w.dir.path().join("plain");
    std::fs::write(&plain, "not a directory").unwrap();
    let dir = w.dir.path().join("secrets").display().to_string();
    let toml = w
        .toml
        .replace(&dir, &plain.join("secrets").display().to_string());
    let (code, out, err, _) = check_env(&w, &toml, &[]);
    assert_eq!(code, 2, "{out}{err}");
    let fail = lines_with(&out, "[FAIL] store file:");
    assert_eq!(fail.len(), 1, "{out}");
    assert!(fail[0].contains("is not a directory"), "{out}");
    assert!(
        fail[0].contains("point `dir` in [stores.file] at a directory"),
        "{out}"
    );
    assert_eq!(std::fs::read_to_string(&plain).unwrap(), "not a directory");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_without_credentials_answers_within_a_bound_in_one_line() {
    let w = World::new(Scenario::new(45).projects(1), Stores::File, "").await;
    let toml = format!(
        "{}\n[stores.aws]\ntype = \"aws_secrets_manager\"\nregion = \"us-east-1\"\n",
        w.toml
    );
    // An instance metadata service that accepts connections and never answers (the
    // listener is never accepted from: the kernel completes the handshakes).
    let imds = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let imds_url = format!("http://{}", imds.local_addr().unwrap());
    // ... and, separately, a credential process that takes longer than the bound.
    let slow_profile = w.dir.path().join("aws-config");
    std::fs::write(
        &slow_profile,
        "[profile slow]\ncredential_process = sleep 6\n",
    )
    .unwrap();
    let slow_profile = slow_profile.display().to_string();
    type Env<'a> = Vec<(&'a str, Option<&'a str>)>;
    let cases: [(&str, Env, &str); 2] = [
        (
            "silent IMDS",
            vec![("AWS_EC2_METADATA_SERVICE_ENDPOINT", Some(imds_url.as_str()))],
            "no AWS credentials",
        ),
        (
            "slow credential process",
            vec![
                ("AWS_EC2_METADATA_SERVICE_ENDPOINT", Some(imds_url.as_str())),
                ("AWS_CONFIG_FILE", Some(slow_profile.as_str())),
                ("AWS_PROFILE", Some("slow")),
            ],
            "no AWS credentials within 3s (the health check's bound",
        ),
    ];
    for (case, env, want) in cases {
        let (code, out, err, took) = check_env(&w, &toml, &env);
        assert_eq!(code, 2, "{case}: {out}{err}");
        assert!(
            took < Duration::from_secs(8),
            "{case}: took {took:?}:\n{out}{err}"
        );
        let fail = lines_with(&out, "[FAIL] store aws:");
        assert_eq!(fail.len(), 1, "{case}: {out}");
        assert!(fail[0].contains(want), "{case}: {out}");
        assert!(
            fail[0].contains("— set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
            "{case}: {out}"
        );
        // The SDK's debug dump of the credential chain is neither on stdout nor logged.
        for dump in ["ProviderError(", "SdkBody", "extensions"] {
            assert!(
                !out.contains(dump) && !err.contains(dump),
                "{case}: {out}{err}"
            );
        }
        assert!(!err.contains("\"WARN\""), "{case}: {err}");
        // The other checks are unaffected.
        assert!(out.contains("[ OK ] OpenAI Admin API"), "{case}: {out}");
        assert!(out.contains("[ OK ] store file:"), "{case}: {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_failures_have_their_own_hints() {
    let w = World::new(Scenario::new(46).projects(1), Stores::File, "").await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let vault = |addr: &str| {
        format!(
            "{}\n[stores.vault]\ntype = \"vault\"\naddress = \"http://{addr}\"\nmax_retries = 1\n\
             auth = {{ method = \"token\", token_env = \"KEYROTD_CHECK_VAULT_TOKEN\" }}\n",
            w.toml
        )
    };
    let var = "KEYROTD_CHECK_VAULT_TOKEN";

    // The token variable is not set: said before anything connects, with its remedy.
    let (code, out, err, _) = check_env(&w, &vault(&closed.to_string()), &[(var, None)]);
    assert_eq!(code, 2, "{out}{err}");
    let fail = lines_with(&out, "[FAIL] store vault:");
    assert_eq!(fail.len(), 1, "{out}");
    assert!(
        fail[0].contains("environment variable KEYROTD_CHECK_VAULT_TOKEN is not set"),
        "{out}"
    );
    assert!(
        fail[0].contains("— set KEYROTD_CHECK_VAULT_TOKEN in keyrotd's environment"),
        "{out}"
    );
    assert!(out.contains("[ OK ] store file:"), "{out}");

    // Set, but nothing listens: unreachable.
    let (code, out, err, _) = check_env(&w, &vault(&closed.to_string()), &[(var, Some("t"))]);
    assert_eq!(code, 2, "{out}{err}");
    let fail = lines_with(&out, "[FAIL] store vault:");
    assert!(
        fail.len() == 1 && fail[0].contains("— the store is unreachable: check `address`"),
        "{out}"
    );

    // A server that accepts and never answers: the check's bound, named.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let (code, out, err, took) = check_env(&w, &vault(&addr), &[(var, Some("t"))]);
    assert_eq!(code, 2, "{out}{err}");
    let bound = keyrotd::check::SERVICE_BOUND;
    assert!(
        took < bound + Duration::from_secs(3),
        "took {took:?}: {out}{err}"
    );
    let fail = lines_with(&out, "[FAIL] store vault:");
    assert!(
        fail.len() == 1
            && fail[0].contains(&format!(
                "no answer within {}s (check-config's bound per service)",
                bound.as_secs()
            )),
        "{out}"
    );
    assert!(out.contains("[ OK ] OpenAI Admin API"), "{out}");
}
