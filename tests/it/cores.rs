//! Secrets stay out of core dumps: the binary marks itself non-dumpable at start, so a
//! SIGABRT (what the systemd watchdog sends) leaves no core even with `ulimit -c
//! unlimited`. A control process in the same directory shows that this machine does
//! write cores there, so the check cannot pass by accident.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_keyrotd");

fn spawn_with_cores(dir: &Path, cmd: &str) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -c unlimited && exec {cmd}"))
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn")
}

fn abort_and_wait(mut child: Child) {
    std::thread::sleep(Duration::from_millis(500));
    let pid = child.id().to_string();
    let ok = Command::new("kill").args(["-ABRT", &pid]).status().unwrap();
    assert!(ok.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the process did not die");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The kernel writes the core before the parent sees the exit; give slow disks a
    // moment anyway.
    std::thread::sleep(Duration::from_millis(200));
}

fn cores(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("core"))
        .collect()
}

#[test]
fn sigabrt_leaves_no_core_dump() {
    let pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap_or_default();
    assert!(
        !pattern.starts_with('|'),
        "core_pattern {pattern:?} pipes cores to a helper; this test needs cores as files"
    );
    let control_dir = tempfile::tempdir().unwrap();
    abort_and_wait(spawn_with_cores(control_dir.path(), "sleep 30"));
    assert!(
        !cores(control_dir.path()).is_empty(),
        "control: an aborted `sleep` left no core in its directory (core_pattern {pattern:?}), \
         so the check below would prove nothing"
    );

    let dir = tempfile::tempdir().unwrap();
    abort_and_wait(spawn_with_cores(
        dir.path(),
        &format!("{BIN} sim --listen 127.0.0.1:0"),
    ));
    assert_eq!(
        cores(dir.path()),
        Vec::<String>::new(),
        "keyrotd left a core"
    );
}
