//! File-store specifics: modes, atomic replacement, path escapes, locking across store
//! objects and across processes, refusal of foreign or corrupt documents.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::store_support::*;
use keyrotd::store::{StoreErrorKind, Transition};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn files_are_0600_and_created_dirs_0700() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("secrets");
    let store = file_store(root.clone());
    rotate(&store, "openai/prod/backend", &record("key_1"), 1, at(1)).await;
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(&root.join("openai")), 0o700);
    assert_eq!(mode(&root.join("openai/prod")), 0o700);
    assert_eq!(mode(&root.join("openai/prod/backend.json")), 0o600);
    assert_eq!(mode(&root.join("openai/prod/.backend.lock")), 0o600);
    let names: Vec<String> = std::fs::read_dir(root.join("openai/prod"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| n == "backend.json" || n == ".backend.lock"),
        "no temp files left behind: {names:?}"
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("openai/prod/backend.json")).unwrap())
            .unwrap();
    assert_eq!(doc["key_id"], "key_1");
    assert_eq!(doc["rotation"]["promoted_at"], "2026-09-21T14:13:21Z");
}

#[tokio::test]
async fn escapes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("secrets");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    symlink(&outside, root.join("link")).unwrap();
    std::fs::write(outside.join("target.json"), "{}").unwrap();
    symlink(outside.join("target.json"), root.join("evil.json")).unwrap();
    let store = file_store(root.clone());
    for path in [
        "../outside/x",
        "a/../../x",
        "/etc/passwd",
        "link/x",
        "link/deeper/x",
        "evil",
        ".hidden",
    ] {
        let e = store.read(path).await.expect_err(path);
        assert_eq!(e.kind, StoreErrorKind::InvalidConfig, "{path}: {e}");
        assert!(
            e.to_string().contains(&format!("{path:?}")),
            "the error names the path: {e}"
        );
        let e = store
            .apply(path, &absent(), &Transition::Intent(intent(1)))
            .await
            .expect_err(path);
        assert_eq!(e.kind, StoreErrorKind::InvalidConfig, "{path}: {e}");
    }
    assert!(!outside.join("x.json").exists() && !outside.join("deeper").exists());
    assert_eq!(
        std::fs::read_to_string(outside.join("target.json")).unwrap(),
        "{}"
    );
}

#[tokio::test]
async fn racing_writers_in_one_process_one_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("secrets");
    let stores: Vec<_> = (0..8).map(|_| file_store(root.clone())).collect();
    let path = "race/slot";
    let tasks: Vec<_> = stores
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            tokio::spawn(async move {
                s.apply(path, &absent(), &Transition::Intent(intent(i as u32)))
                    .await
            })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => wins += 1,
            Err(e) => assert_eq!(e.kind, StoreErrorKind::Conflict, "{e}"),
        }
    }
    assert_eq!(wins, 1);
}

/// Another process holding the slot's lock makes a writer wait: `flock` is honoured
/// across processes.
#[tokio::test]
async fn lock_is_shared_with_other_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("secrets");
    let store = file_store(root.clone());
    let st = step(&store, "slot", Transition::Intent(intent(1))).await;
    let lock = root.join(".slot.lock");
    let mut child = std::process::Command::new("python3")
        .arg("-c")
        .arg("import fcntl, sys, time\nf = open(sys.argv[1], 'a')\nfcntl.flock(f, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(1.5)\n")
        .arg(&lock)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked");
    let start = Instant::now();
    store
        .apply("slot", &st.version, &Transition::Abandon)
        .await
        .expect("apply after the other process lets go");
    assert!(
        start.elapsed() >= Duration::from_millis(1000),
        "waited {:?}",
        start.elapsed()
    );
    child.wait().unwrap();
}

#[tokio::test]
async fn corrupt_and_foreign_documents_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("secrets");
    std::fs::create_dir_all(&root).unwrap();
    let store = file_store(root.clone());
    for (name, content) in [
        ("truncated", "{\"api_key\": \"sk-"),
        ("foreign", "{\"password\": \"hunter2\"}"),
        (
            "partial",
            "{\"api_key\": \"sk-partial\", \"key_id\": \"k\"}",
        ),
    ] {
        std::fs::write(root.join(format!("{name}.json")), content).unwrap();
        let e = store.read(name).await.expect_err(name);
        assert_eq!(e.kind, StoreErrorKind::InvalidData, "{name}: {e}");
        assert!(e.to_string().contains(&format!("{name}.json")), "{e}");
        let e = store
            .apply(name, &absent(), &Transition::Abandon)
            .await
            .expect_err(name);
        assert_eq!(
            e.kind,
            StoreErrorKind::Conflict,
            "absent is stale for an existing file: {e}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(root.join("foreign.json")).unwrap(),
        "{\"password\": \"hunter2\"}",
        "untouched"
    );
}

#[tokio::test]
async fn health_and_probe_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("a/b/secrets");
    let store = file_store(root.clone());
    store.health().await.expect("health");
    store.probe_write("x/y").await.expect("probe");
    // Neither the store's dir nor its missing parents outlive the probes.
    assert!(!tmp.path().join("a").exists());
    assert!(store.read("x/y").await.unwrap().version.is_absent());
    // In an existing dir the probes leave what is there as it was, and add nothing.
    step(&store, "x/z", Transition::Intent(intent(1))).await;
    let before = tree(&root);
    store.health().await.expect("health");
    store.probe_write("x/y").await.expect("probe");
    store.probe_write("x/new/deeper/y").await.expect("probe");
    assert_eq!(tree(&root), before);
    assert_eq!(mode(&root), 0o700);
    // A dir that is a file is refused, and nothing is created beside it.
    let file = tmp.path().join("plain");
    std::fs::write(&file, "").unwrap();
    let e = file_store(file.join("below"))
        .health()
        .await
        .expect_err("not a dir");
    assert_eq!(e.kind, StoreErrorKind::InvalidConfig, "{e}");
    assert!(e.to_string().contains("is not a directory"), "{e}");

    let ro = tmp.path().join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o500)).unwrap();
    let store = file_store(ro.clone());
    // root ignores directory modes; only assert when the mode is enforced.
    if std::fs::write(ro.join("t"), "").is_err() {
        let e = store.health().await.expect_err("read-only dir");
        assert_eq!(e.kind, StoreErrorKind::PermissionDenied, "{e}");
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o700)).unwrap();
}

/// Every path below `root`, sorted.
fn tree(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
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

#[tokio::test]
async fn versions_follow_content() {
    let tmp = tempfile::tempdir().unwrap();
    let store = file_store(tmp.path().join("s"));
    let st = step(&store, "v", Transition::Intent(intent(1))).await;
    assert_eq!(store.read("v").await.unwrap().version, st.version);
    // An edit by hand is a new version: the next write with the old one conflicts.
    let f = tmp.path().join("s/v.json");
    let mut text = std::fs::read_to_string(&f).unwrap();
    text.push(' ');
    std::fs::write(&f, text).unwrap();
    assert_conflict(
        store.apply("v", &st.version, &Transition::Abandon).await,
        "hand edit",
    );
    assert_eq!(store.kind(), "file");
}
