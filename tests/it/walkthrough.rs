//! The README's "Try it against the simulator" walkthrough, run verbatim: the shell
//! blocks marked `<!-- walkthrough: sim -->` and `<!-- walkthrough: steps -->` are
//! taken from README.md and run with bash, the built binary first on `PATH`, on a free
//! port (the walkthrough reads `PORT`). Every command must exit 0, the ones listed in
//! [`EXPECTED`] must be there, in that order, and print their key lines; so a README
//! edit that breaks the walkthrough, or drops one of its steps, fails this test.

use crate::e2e::free_port;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const README: &str = include_str!("../../README.md");

/// A command of the steps block (as written, without its trailing comment), lines its
/// output (stdout and stderr) must contain, and lines it must not.
struct Expect {
    command: &'static str,
    prints: &'static [&'static str],
    never: &'static [&'static str],
}

const EXPECTED: &[Expect] = &[
    Expect {
        command: "keyrotd check-config --connect",
        prints: &["config OK", "[ OK ] OpenAI Admin API", "[ OK ] store local"],
        never: &["[FAIL]"],
    },
    Expect {
        command: "keyrotd plan",
        prints: &[
            "9 keys, 2 stale",
            "openai/prod-payments/backend",
            "state=bootstrap",
        ],
        never: &["state=current"],
    },
    Expect {
        command: "keyrotd once --dry-run",
        prints: &["\"action\": \"mint\"", "\"reason\": \"bootstrap\""],
        never: &["minted a new key"],
    },
    Expect {
        command: "keyrotd once",
        prints: &["minted a new key", "every store serves the new key"],
        never: &["slot failed"],
    },
    Expect {
        command: "keyrotd plan",
        prints: &["state=current"],
        never: &["state=bootstrap"],
    },
    Expect {
        command: "cat secrets/openai/prod-payments/backend.json",
        prints: &["\"api_key\": \"sk-", "\"managed_by\": \"keyrotd\""],
        never: &[],
    },
    Expect {
        command: "keyrotd report --format html --output keys.html",
        prints: &[],
        never: &["keyrotd:"],
    },
];

/// The body of the ```sh block that follows `<!-- walkthrough: NAME -->`.
fn block(name: &str) -> String {
    let marker = format!("<!-- walkthrough: {name} -->");
    let after = README
        .split_once(&marker)
        .unwrap_or_else(|| panic!("README.md has no {marker}"))
        .1;
    let body = after
        .split_once("```sh\n")
        .unwrap_or_else(|| panic!("no ```sh block after {marker}"))
        .1;
    body.split_once("\n```")
        .unwrap_or_else(|| panic!("unterminated block after {marker}"))
        .0
        .to_string()
}

/// Splits a block into commands: one per line, except that a here-document runs to
/// its terminator and a line ending in `\` continues on the next. Blank and comment
/// lines are dropped.
fn commands(block: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = block.lines();
    while let Some(line) = lines.next() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let mut cmd = line.to_string();
        if let Some((_, tail)) = line.split_once("<<") {
            let word = tail
                .trim_start_matches('-')
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .trim_matches(|c| c == '\'' || c == '"')
                .to_string();
            for l in lines.by_ref() {
                cmd.push('\n');
                cmd.push_str(l);
                if l.trim() == word {
                    break;
                }
            }
        } else {
            while cmd.ends_with('\\') {
                match lines.next() {
                    Some(l) => {
                        cmd.push('\n');
                        cmd.push_str(l);
                    }
                    None => break,
                }
            }
        }
        out.push(cmd);
    }
    out
}

/// A command's first line without its trailing `# comment`.
fn bare(cmd: &str) -> &str {
    let first = cmd.lines().next().unwrap_or_default();
    first.split_once(" #").map_or(first, |(c, _)| c).trim()
}

/// A shell that keyrotd runs in; its whole process group is stopped when dropped.
struct Shell(Child);

impl Drop for Shell {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let group = format!("-{}", self.0.id());
            let _ = Command::new("kill")
                .args(["-TERM", "--", &group])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.0.wait();
    }
}

/// `bash -c SCRIPT` in `dir`, with the binary first on `PATH`, `PORT` and `TMPDIR` set
/// and no inherited keyrotd configuration, in its own process group.
fn bash(script: &str, dir: &Path, bin: &Path, port: u16) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(script).current_dir(dir);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("KEYROTD") || k == "OPENAI_ADMIN_KEY" {
            cmd.env_remove(&k);
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![bin.to_path_buf()];
    paths.extend(std::env::split_paths(&path));
    cmd.env("PATH", std::env::join_paths(paths).expect("PATH"))
        .env("PORT", port.to_string())
        .env("TMPDIR", dir.join("tmp"))
        .env_remove("RUST_LOG")
        .process_group(0);
    cmd
}

/// Files under `dir`, recursively.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn readme_walkthrough_runs_verbatim() {
    let work = tempfile::tempdir().expect("tempdir");
    let bin = work.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(work.path().join("tmp")).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_keyrotd"), bin.join("keyrotd")).unwrap();
    let port = free_port();

    // Terminal 1: the simulator, until it has printed its hint.
    let sim_block = block("sim");
    let mut sim = bash(&sim_block, work.path(), &bin, port);
    sim.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut sim = Shell(sim.spawn().expect("bash"));
    let stdout = sim.0.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut hint = Vec::new();
    while !hint.iter().any(|l: &String| l.contains("admin_key_env")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => hint.push(line),
            Err(_) => panic!(
                "`{sim_block}` printed no complete hint within 30 s:\n{}",
                hint.join("\n")
            ),
        }
    }
    let hint = hint.join("\n");
    let url = format!("http://127.0.0.1:{port}/v1");
    for line in [
        "3 projects, 9 keys (2 stale)".to_string(),
        format!("export KEYROTD__OPENAI__BASE_URL={url}"),
        "export KEYROTD__OPENAI__ADMIN_KEY_ENV=OPENAI_ADMIN_KEY".to_string(),
        "export OPENAI_ADMIN_KEY=sk-admin-walkthrough".to_string(),
        "#   [openai]".to_string(),
        format!("#   base_url = \"{url}\""),
        "#   admin_key_env = \"OPENAI_ADMIN_KEY\"".to_string(),
    ] {
        assert!(
            hint.lines().any(|l| l.contains(&line)),
            "`keyrotd sim` did not print {line:?}:\n{hint}"
        );
    }

    // Terminal 2: the steps, each followed by a marker carrying its exit status.
    let cmds = commands(&block("steps"));
    let mut script = String::from("exec 2>&1\n");
    for (i, c) in cmds.iter().enumerate() {
        script.push_str(&format!(
            "printf '\\n@@step {i} start\\n'\n{c}\nprintf '\\n@@step {i} exit %d\\n' \"$?\"\n"
        ));
    }
    let log_path = work.path().join("steps.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut steps = bash(&script, work.path(), &bin, port);
    steps.stdout(log).stdin(Stdio::null());
    let mut steps = Shell(steps.spawn().expect("bash"));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if steps.0.try_wait().expect("wait").is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the walkthrough did not finish within 120 s:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(&log_path).unwrap();

    // Each command's output and exit status.
    let mut results: Vec<String> = Vec::new();
    for (i, c) in cmds.iter().enumerate() {
        let start = format!("@@step {i} start\n");
        let end = format!("\n@@step {i} exit ");
        let out = log
            .split_once(&start)
            .and_then(|(_, rest)| rest.split_once(&end))
            .unwrap_or_else(|| panic!("`{}` did not run to its end:\n{log}", bare(c)));
        let code: i32 = out
            .1
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("exit status");
        assert_eq!(code, 0, "`{}` exited {code}:\n{}", bare(c), out.0);
        results.push(out.0.to_string());
    }

    // The expected commands, in order, with their key lines.
    let mut next = 0;
    for e in EXPECTED {
        let i = (next..cmds.len())
            .find(|&i| bare(&cmds[i]) == e.command)
            .unwrap_or_else(|| {
                panic!(
                    "the README walkthrough no longer runs `{}` (after `{}`)",
                    e.command,
                    cmds.get(next.wrapping_sub(1))
                        .map_or("the start", |c| bare(c))
                )
            });
        let out = &results[i];
        for p in e.prints {
            assert!(
                out.contains(p),
                "`{}` did not print {p:?}:\n{out}",
                e.command
            );
        }
        for n in e.never {
            assert!(!out.contains(n), "`{}` printed {n:?}:\n{out}", e.command);
        }
        next = i + 1;
    }

    // What the walkthrough leaves in its temporary directory.
    let files = walk(&work.path().join("tmp"));
    let report = files
        .iter()
        .find(|p| p.file_name().is_some_and(|n| n == "keys.html"))
        .unwrap_or_else(|| panic!("no keys.html written; files: {files:?}"));
    let html = std::fs::read_to_string(report).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"), "keys.html is not HTML");
    assert!(html.contains("prod-payments") && html.contains("staging-payments"));
    let secrets = files
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter(|p| p.to_string_lossy().contains("/secrets/openai/"))
        .count();
    assert_eq!(secrets, 6, "one secret per slot; files: {files:?}");
    drop(sim);
}

#[test]
fn commands_split_like_bash_would() {
    let block = "cd x\n# a comment\n\ncat > f <<EOF\na\n# not a comment\nEOF\nls \\\n  -l   # list\necho done";
    let cmds = commands(block);
    assert_eq!(
        cmds,
        vec![
            "cd x",
            "cat > f <<EOF\na\n# not a comment\nEOF",
            "ls \\\n  -l   # list",
            "echo done"
        ]
    );
    assert_eq!(bare(&cmds[2]), "ls \\");
    assert_eq!(bare("keyrotd plan   # 9 keys"), "keyrotd plan");
}
