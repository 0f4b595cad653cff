//! SIGTERM handling of `keyrotd once` and `keyrotd run` (the real binary).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::e2e::{assert_i1, assert_i2, Stores, World, ADMIN_KEY, ADMIN_KEY_ENV};
use keyrotd::sim::Scenario;

fn sigterm(pid: u32) {
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok);
}

fn write_config(w: &World, extra: &str) -> std::path::PathBuf {
    let path = w.dir.path().join("keyrotd.toml");
    let toml = w
        .toml
        .replacen("[daemon]\n", &format!("[daemon]\n{extra}\n"), 1);
    std::fs::write(&path, toml).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_once_exits_cleanly_and_leaves_no_orphan() {
    let w = World::new(
        Scenario::new(31)
            .projects(12)
            .service_accounts_per_project(2),
        Stores::File,
        "",
    )
    .await;
    // Slow API: the cycle takes seconds, so the signal lands mid-cycle.
    w.sim
        .update_faults(|f| f.latency = Duration::from_millis(60));
    let config = write_config(&w, "");
    let child = Command::new(env!("CARGO_BIN_EXE_keyrotd"))
        .args([
            "--config",
            config.to_str().unwrap(),
            "--log-format",
            "json",
            "once",
        ])
        .env(ADMIN_KEY_ENV, ADMIN_KEY)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the first key is minted, then stop it.
    let started = Instant::now();
    while !w.sim.all_keys().iter().any(|k| k.minted) {
        assert!(started.elapsed() < Duration::from_secs(30), "no key minted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sigterm(child.id());
    let t = Instant::now();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "exits within shutdown_timeout"
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "clean exit:\n{log}");
    assert!(log.contains("\"event\":\"daemon.stopping\""), "{log}");

    // No half-done slot: every minted key is in a store, and a store never serves a
    // dead key.
    w.sim.update_faults(|f| f.latency = Duration::ZERO);
    let engine = w.engine(false).await;
    let states = w.store_states(&engine).await;
    assert_i1(&w, &states);
    assert_i2(&w, &states);
    // The next run finishes the work and finds no orphan.
    let report = engine.cycle().await;
    assert!(!report.any_failed(), "{:?}", report.slots);
    let plan = report.plan.expect("the scan succeeded");
    assert_eq!(plan.orphan, 0, "{plan:?}");
    let states = w.store_states(&engine).await;
    assert_i1(&w, &states);
    assert_i2(&w, &states);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_starts_a_cycle_and_stops_on_sigterm() {
    let w = World::new(Scenario::new(32).projects(3), Stores::File, "").await;
    let config = write_config(
        &w,
        "schedule = \"0 0 1 1 *\"\nrun_on_start = true\nshutdown_timeout = \"5s\"",
    );
    let child = Command::new(env!("CARGO_BIN_EXE_keyrotd"))
        .args([
            "--config",
            config.to_str().unwrap(),
            "--log-format",
            "json",
            "run",
        ])
        .env(ADMIN_KEY_ENV, ADMIN_KEY)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let engine = w.engine(true).await;
    loop {
        let states = w.store_states(&engine).await;
        if !states.is_empty() && states.values().all(|s| s.current.is_some()) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "run_on_start cycle did not happen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sigterm(child.id());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("\"event\":\"daemon.stopped\""), "{log}");
    assert!(log.contains("\"outcome\":\"clean\""), "{log}");
}
