//! `keyrotd completions <shell>` and `keyrotd man [SUBCOMMAND]` through the binary: the
//! output is there, names every subcommand, and the bash script parses.

use std::process::Command;

use crate::harness::BIN;

/// The subcommands a user can type; completions and the man page must offer each.
const SUBCOMMANDS: &[&str] = &[
    "run",
    "once",
    "plan",
    "report",
    "check-config",
    "demo",
    "sim",
    "completions",
    "man",
];

/// Runs `keyrotd ARGS` with no config around; returns stdout, asserting exit 0 and an
/// empty stderr.
fn stdout_of(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("KEYROTD_CONFIG")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "keyrotd {args:?}: {:?}\n{stderr}",
        out.status
    );
    assert!(
        stderr.is_empty(),
        "keyrotd {args:?} wrote to stderr:\n{stderr}"
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn assert_names_subcommands(what: &str, text: &str) {
    assert!(!text.trim().is_empty(), "{what}: empty output");
    let words: std::collections::HashSet<&str> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .collect();
    let missing: Vec<_> = SUBCOMMANDS
        .iter()
        .filter(|s| !words.contains(**s))
        .collect();
    assert!(missing.is_empty(), "{what}: no {missing:?} in\n{text}");
}

#[test]
fn completions_name_every_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let text = stdout_of(&["completions", shell]);
        assert!(
            text.contains("keyrotd"),
            "{shell}: the script does not name keyrotd"
        );
        assert_names_subcommands(shell, &text);
    }
}

#[test]
fn bash_completions_parse() {
    let text = stdout_of(&["completions", "bash"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keyrotd.bash");
    std::fs::write(&file, &text).unwrap();
    let out = Command::new("bash").arg("-n").arg(&file).output().unwrap();
    assert!(
        out.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn completions_refuse_an_unknown_shell() {
    let out = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bash"));
}

#[test]
fn man_page_is_roff_and_names_every_subcommand() {
    let text = stdout_of(&["man"]);
    assert!(text.contains(".TH keyrotd 1"), "no .TH header:\n{text}");
    assert!(text.contains(".SH NAME"), "no NAME section:\n{text}");
    assert!(
        text.contains(".SH SUBCOMMANDS"),
        "no SUBCOMMANDS section:\n{text}"
    );
    // roff escapes the hyphen; the section refers to keyrotd-<subcommand>(1).
    let text = text.replace("\\-", "-");
    let missing: Vec<_> = SUBCOMMANDS
        .iter()
        .filter(|s| !text.contains(&format!("keyrotd-{s}(1)")))
        .collect();
    assert!(
        missing.is_empty(),
        "man: no page reference for {missing:?} in\n{text}"
    );
}

#[test]
fn every_subcommand_has_the_page_keyrotd_1_refers_to() {
    for sub in SUBCOMMANDS {
        let text = stdout_of(&["man", sub]);
        assert!(
            text.contains(&format!(".TH keyrotd-{sub} 1")),
            "keyrotd man {sub}: no .TH header:\n{text}"
        );
        assert!(
            text.replace("\\-", "-").contains(&format!("keyrotd {sub}")),
            "keyrotd man {sub}: the synopsis does not name `keyrotd {sub}`:\n{text}"
        );
    }
    let out = Command::new(BIN).args(["man", "nope"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty());
}
