//! `keyrotd demo` through the built binary: exit code, what it shows, what it must never
//! show (a full key value), and that it is quick.

use std::process::Command;
use std::time::{Duration, Instant};

/// Tokens shaped like a full key: `sk-` followed by 20 or more key characters.
fn full_keys(text: &str) -> Vec<String> {
    let is_key_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("sk-") {
        let after = &rest[i + 3..];
        let run = after
            .char_indices()
            .find(|&(_, c)| !is_key_char(c))
            .map_or(after.len(), |(j, _)| j);
        if run >= 20 {
            found.push(rest[i..i + 3 + run].to_string());
        }
        rest = &after[run..];
    }
    found
}

#[test]
fn full_keys_detector_works() {
    assert_eq!(
        full_keys("x sk-svcacct-0123456789abcdefghij y sk-svca…3f9a"),
        vec!["sk-svcacct-0123456789abcdefghij".to_string()]
    );
    assert!(full_keys("sk-[REDACTED] sk-svca…3f9a").is_empty());
}

#[test]
fn demo_rotates_revokes_and_never_prints_a_key() {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_keyrotd"))
        .arg("demo")
        .env_remove("RUST_LOG")
        .output()
        .expect("run keyrotd demo");
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "exit code\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // Debug builds are slower; the release binary takes about 2.1 s (README).
    assert!(
        elapsed < Duration::from_secs(15),
        "demo took {elapsed:?}\n{stdout}"
    );

    // The plan summary line.
    let summary = stdout
        .lines()
        .find(|l| l.contains(" keys, ") && l.contains(" stale, ") && l.contains(" to rotate"))
        .unwrap_or_else(|| panic!("no plan summary line:\n{stdout}"));
    assert!(summary.starts_with("12 keys, "), "{summary}");

    // Every managed slot (prod-* and staging-*: 3 projects x 2 accounts) rotated.
    let rotated: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("rotated "))
        .collect();
    assert_eq!(rotated.len(), 6, "rotated lines:\n{stdout}");
    // The plan counted exactly the rotations the cycle then performed.
    let to_rotate: usize = summary
        .split(", ")
        .find_map(|part| part.strip_suffix(" to rotate"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no rotate count in {summary}"));
    assert_eq!(
        to_rotate,
        rotated.len(),
        "the plan and the cycle agree: {summary}"
    );
    for l in &rotated {
        assert!(
            l.contains("new key key_") && l.contains("sk-svca…"),
            "rotated line shows key id and redacted value: {l}"
        );
        assert!(
            l.contains("prod-") || l.contains("staging-"),
            "only managed projects rotate: {l}"
        );
    }
    assert!(
        stdout.contains(".json (mode 0600)"),
        "store path -> file path:\n{stdout}"
    );

    // The second cycle revoked the stale keys the first one replaced, and only those.
    let revoked: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("revoked "))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert!(!revoked.is_empty(), "no revoked keys:\n{stdout}");
    for id in &revoked {
        assert!(id.starts_with("key_"), "{id}");
        let announced = stdout
            .lines()
            .any(|l| l.contains(&format!("old key {id} (")) && l.contains("stale"));
        assert!(
            announced,
            "revoked {id} was not announced as a stale old key:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("6/6 slots serve a live key"),
        "closing line:\n{stdout}"
    );

    // Never a full key value, on either stream; logs stay quiet.
    let leaked = full_keys(&format!("{stdout}\n{stderr}"));
    assert!(leaked.is_empty(), "full key values printed: {leaked:?}");
    assert!(stderr.trim().is_empty(), "demo logs: {stderr}");
    assert!(
        !stdout.contains('\x1b'),
        "no colour when stdout is not a TTY"
    );

    // The temporary directory is gone.
    let dir = stdout
        .lines()
        .next()
        .and_then(|l| l.split(" file store in ").nth(1))
        .map(str::trim)
        .unwrap_or_else(|| panic!("first line names the temp dir:\n{stdout}"));
    assert!(!std::path::Path::new(dir).exists(), "{dir} left behind");
}
