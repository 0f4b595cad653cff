//! Secret hygiene (DESIGN.md §5 I4): no key value, admin key or store token in logs (at
//! trace level, JSON), metrics, error messages or `Debug` output.
//!
//! Full cycles through the binary against every store (file, OpenBao, moto), with
//! `--log-level trace`; the daemon's `/metrics`, `/healthz` and `/readyz`; runs that
//! fail on purpose (a create response cut in half — it carries the new key —, a key that
//! never verifies, a Vault token that is refused, a wrong admin key, an admin key put
//! inline in the config); and `{:?}` of the config, engine, client, stores and store
//! records. Every text is searched for every secret and for every 16-character piece of
//! one, so a truncated value counts as a leak too.

use rustc_hash::FxHashMap;
use std::time::{Duration, Instant};

use crate::harness::*;
use keyrotd::sim::{Malformation, OwnerRef, RejectVerification, Route};
use StoreKind::{Aws, File, Vault};

const TOKEN_ENV: &str = "KEYROTD_HYGIENE_VAULT_TOKEN";

/// Where in `text` a secret, or a 16-character piece of one, appears.
fn leaks(what: &str, text: &str, secrets: &[String]) -> Vec<String> {
    const W: usize = 16;
    let mut pieces: FxHashMap<&[u8], usize> = FxHashMap::default();
    let mut out = Vec::new();
    for (i, s) in secrets.iter().enumerate() {
        let b = s.as_bytes();
        if b.len() < W {
            if !s.is_empty() && text.contains(s.as_str()) {
                out.push(format!("{what}: secret #{i} whole"));
            }
            continue;
        }
        for w in b.windows(W) {
            pieces.insert(w, i);
        }
    }
    let t = text.as_bytes();
    let mut i = 0;
    while i + W <= t.len() {
        if let Some(n) = pieces.get(&t[i..i + W]) {
            let line_start = text[..i].rfind('\n').map(|p| p + 1).unwrap_or(0);
            let line_end = text[i..].find('\n').map(|p| i + p).unwrap_or(text.len());
            let line: String = text[line_start..line_end].chars().take(300).collect();
            out.push(format!("{what}: (part of) secret #{n} in: {line}"));
            i += W;
        } else {
            i += 1;
        }
    }
    out
}

/// A Vault token that is not the dev server's trivially short `root`.
async fn child_token() -> String {
    let addr = env("KEYROTD_TEST_VAULT_ADDR");
    let root = env("KEYROTD_TEST_VAULT_TOKEN");
    let v: serde_json::Value = reqwest::Client::new()
        .post(format!("{addr}/v1/auth/token/create"))
        .header("X-Vault-Token", root)
        .json(&serde_json::json!({"policies": ["root"], "ttl": "1h"}))
        .send()
        .await
        .expect("token create")
        .json()
        .await
        .expect("token json");
    v["auth"]["client_token"]
        .as_str()
        .expect("client_token")
        .to_string()
}

/// `keyrotd --log-level trace <cmd>`.
async fn run_trace(b: &Bench, cmd: &str) -> Exit {
    b.run(&["--log-level", "trace", cmd], None).await
}

fn random_tail() -> String {
    format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_in_logs_metrics_errors_or_debug() {
    let started = Instant::now();
    let token = child_token().await;
    std::env::set_var(TOKEN_ENV, &token);
    let port = closed_port();
    let mut spec = Spec::new(&[File, Vault, Aws])
        .sa_glob("*")
        .daemon("listen", &format!("\"127.0.0.1:{port}\""))
        .daemon("schedule", "\"*/2 * * * * *\"");
    spec.vault_token_env = TOKEN_ENV.into();
    let mut b = Bench::new(spec).await;
    let sim = &b.sim;
    let now = sim.now();
    let p = sim.add_project("prod-hygiene");
    let mut legacy = Vec::new();
    for sa in ["backend", "worker"] {
        let id = sim.add_service_account(&p, sa).unwrap();
        legacy.push(
            sim.add_key_at(
                &p,
                OwnerRef::ServiceAccount(id),
                "legacy",
                now - 200 * DAY,
                Some(now),
            )
            .unwrap()
            .id,
        );
    }
    let u = sim.add_user("Alice Anders", "alice@example.com");
    sim.add_key_at(&p, OwnerRef::User(u), "laptop", now - 200 * DAY, None)
        .unwrap();
    b.register_slots();
    let slot0 = b.slots[0].clone();
    b.seed_current(&slot0, &legacy[0], Duration::from_secs(30 * 86400))
        .await;

    let mut texts: Vec<(String, String)> = Vec::new();
    let record = |texts: &mut Vec<(String, String)>, what: &str, e: &Exit| {
        texts.push((format!("{what} stderr"), e.stderr.clone()));
        texts.push((format!("{what} stdout"), e.stdout.clone()));
    };

    // 1. A full cycle (one rotation, one bootstrap) into every store; then, after the
    //    grace period, the retirement of the previous key and the sweep.
    let e = run_trace(&b, "once").await;
    assert_eq!(e.code, Some(0), "first cycle:\n{}", e.tail());
    assert!(!e.events("key.minted").is_empty(), "keys were minted");
    assert!(e.stderr.lines().count() > 100, "trace level logs plenty");
    record(&mut texts, "once #1", &e);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let e = run_trace(&b, "once").await;
    assert_eq!(e.code, Some(0), "second cycle:\n{}", e.tail());
    assert!(
        !e.events("key.revoked").is_empty(),
        "the previous key was revoked"
    );
    record(&mut texts, "once #2", &e);

    // 2. Failures whose messages pass near secret values.
    //    a. The create response is cut in half: the client holds half a key value.
    let late = b.sim.add_project("prod-late");
    b.sim.add_service_account(&late, "backend").unwrap();
    b.register_slots();
    b.sim.update_faults(|f| {
        *f = std::mem::take(f).malformed_next(
            Route::CreateServiceAccountKey,
            Malformation::Truncated,
            1,
        )
    });
    let e = run_trace(&b, "once").await;
    assert_eq!(e.code, Some(1), "truncated create:\n{}", e.tail());
    assert!(e.stderr.contains("malformed response"), "{}", e.tail());
    record(&mut texts, "once (truncated create)", &e);
    //    b. Every new key is refused on verification.
    let late2 = b.sim.add_project("prod-late-2");
    b.sim.add_service_account(&late2, "backend").unwrap();
    b.register_slots();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    b.sim
        .update_faults(|f| f.reject_verification = RejectVerification::Minted);
    let e = run_trace(&b, "once").await;
    b.sim
        .update_faults(|f| f.reject_verification = RejectVerification::None);
    assert_eq!(e.code, Some(1), "verification refused:\n{}", e.tail());
    assert!(!e.events("key.verify_failed").is_empty(), "{}", e.tail());
    record(&mut texts, "once (verification refused)", &e);
    //    c. Vault refuses the token.
    let bad_token = format!("hvs.CAES{}", random_tail());
    b.extra_secrets.lock().unwrap().push(bad_token.clone());
    let mut cmd = b.command(&["--log-level", "trace", "once"], None);
    cmd.env(TOKEN_ENV, &bad_token);
    let e = wait_child(cmd.spawn().unwrap(), Duration::from_secs(60)).await;
    assert_eq!(e.code, Some(1), "vault token refused:\n{}", e.tail());
    record(&mut texts, "once (bad Vault token)", &e);
    //    d. A wrong admin key.
    let wrong_admin = format!("sk-admin-{}", random_tail());
    b.extra_secrets.lock().unwrap().push(wrong_admin.clone());
    let mut cmd = b.command(&["--log-level", "trace", "plan"], None);
    cmd.env(ADMIN_KEY_ENV, &wrong_admin);
    let e = wait_child(cmd.spawn().unwrap(), Duration::from_secs(60)).await;
    assert_eq!(e.code, Some(1), "wrong admin key:\n{}", e.tail());
    assert!(e.stderr.contains("401"), "{}", e.tail());
    record(&mut texts, "plan (wrong admin key)", &e);
    //    e. An admin key inline in the config.
    let inline = format!("sk-admin-{}", random_tail());
    b.extra_secrets.lock().unwrap().push(inline.clone());
    let cfg = b.config_text().replace(
        &format!("admin_key_env = \"{ADMIN_KEY_ENV}\""),
        &format!("admin_key = \"{inline}\""),
    );
    let inline_path = b.dir.path().join("inline.toml");
    std::fs::write(&inline_path, cfg).unwrap();
    for cmdline in [&["check-config"][..], &["once"][..]] {
        let out = tokio::process::Command::new(BIN)
            .arg("--config")
            .arg(&inline_path)
            .args(cmdline)
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "inline admin key refused");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(err.contains("openai.admin_key"), "{err}");
        texts.push(("inline admin key".into(), err));
    }

    // 3. The daemon: /metrics, /healthz, /readyz after a cycle; then SIGTERM.
    let child = b
        .command(&["--log-level", "trace", "run"], None)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let waiter = tokio::spawn(wait_child(child, Duration::from_secs(60)));
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut metrics = String::new();
    while Instant::now() < deadline {
        if let Ok(r) = http.get(format!("{base}/metrics")).send().await {
            let body = r.text().await.unwrap_or_default();
            let cycles: f64 = body
                .lines()
                .filter(|l| l.starts_with("keyrotd_cycles_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            if cycles > 0.0 {
                metrics = body;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !metrics.is_empty(),
        "the daemon served metrics after a cycle"
    );
    texts.push(("/metrics".into(), metrics));
    for path in ["/healthz", "/readyz"] {
        let body = http
            .get(format!("{base}{path}"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        texts.push((path.into(), body));
    }
    signal(pid, "TERM");
    let e = waiter.await.unwrap();
    assert_eq!(e.code, Some(0), "clean shutdown:\n{}", e.tail());
    record(&mut texts, "run", &e);

    // 4. Debug of what holds secrets, in process.
    let cfg = keyrotd::config::Config::from_toml(&b.observer_toml).unwrap();
    texts.push(("Debug Config".into(), format!("{cfg:?} {cfg:#?}")));
    let admin = cfg.admin_key().unwrap();
    texts.push(("Debug admin key".into(), format!("{admin:?}")));
    let engine = keyrotd::app::build_engine(&cfg, false).await.unwrap();
    texts.push(("Debug Engine".into(), format!("{engine:?} {engine:#?}")));
    texts.push(("Debug Client".into(), format!("{:?}", engine.client)));
    for (name, s) in &engine.stores {
        texts.push((format!("Debug store {name}"), format!("{s:?} {s:#?}")));
    }
    let snap = b.snapshot().await.unwrap();
    texts.push((
        "Debug SlotState/SecretRecord".into(),
        format!("{snap:?} {snap:#?}"),
    ));
    let key = b.sim.all_keys().into_iter().next().unwrap();
    texts.push(("Debug SimKey".into(), format!("{key:?}")));
    let survey = engine.survey().await.unwrap();
    let plan = engine.plan(&survey);
    texts.push(("Debug plan views".into(), format!("{:?}", survey.views)));
    texts.push(("Debug plan".into(), format!("{plan:?}")));
    texts.push(("plan JSON".into(), plan.to_json()));

    // Every store record must hold a real value, or the search proves nothing.
    let served: Vec<String> = snap
        .values()
        .filter_map(|s| s.current.as_ref())
        .map(|c| secrecy::ExposeSecret::expose_secret(&c.api_key).to_string())
        .collect();
    assert!(served.len() >= 6, "keys served by every store");

    let secrets = b.secrets();
    for s in &served {
        assert!(
            secrets.contains(s),
            "served values are among the searched secrets"
        );
    }
    assert!(secrets.contains(&token), "the Vault token is searched for");
    let mut found = Vec::new();
    let mut bytes = 0;
    for (what, text) in &texts {
        bytes += text.len();
        found.extend(leaks(what, text, &secrets));
    }
    println!(
        "searched {} texts ({} KiB) for {} secrets in {:.1}s: {} hits",
        texts.len(),
        bytes / 1024,
        secrets.len(),
        started.elapsed().as_secs_f64(),
        found.len()
    );
    assert!(found.is_empty(), "secrets leaked:\n{}", found.join("\n"));
}

/// The search itself finds whole and partial values (a test that cannot fail is worse
/// than none).
#[test]
fn the_leak_search_finds_whole_and_partial_values() {
    let s = vec!["sk-proj-ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789".to_string()];
    assert!(!leaks("t", "x sk-proj-ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 y", &s).is_empty());
    assert!(!leaks("t", "cut: \"sk-proj-ABCDEFGHIJKLMNO", &s).is_empty());
    assert!(!leaks("t", "...KLMNOPQRSTUVWXYZ012", &s).is_empty());
    assert!(leaks("t", "sk-...6789 redacted", &s).is_empty());
}
