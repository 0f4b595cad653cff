//! Bad configuration through the binary: every class exits 2 with a message naming the
//! offending key (DESIGN.md §2).

use std::process::Command;

const BASE: &str = r#"
[openai]
admin_key_env = "CONFIG_ERRORS_ADMIN_KEY"
[stores.local]
type = "file"
dir = "/tmp/keyrotd-config-errors"
[[rotate]]
name = "all"
project = "*"
stores = ["local"]
path = "openai/{project_name}/{service_account_name}"
"#;

fn run(toml: &str, command: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyrotd.toml");
    std::fs::write(&path, toml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyrotd"));
    cmd.args(["--config", path.to_str().unwrap(), command])
        .env("CONFIG_ERRORS_ADMIN_KEY", "sk-admin-config-errors");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn each_class_of_bad_config_exits_2_naming_the_key() {
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "unknown key",
            format!("{BASE}[policy]\nmax_agee = \"3d\"\n"),
            "check-config",
            "max_agee",
        ),
        (
            "bad duration",
            format!("{BASE}[policy]\ngrace_period = \"24 parsecs\"\n"),
            "check-config",
            "policy.grace_period",
        ),
        (
            "bad cron",
            format!("{BASE}[daemon]\nschedule = \"61 * * * *\"\n"),
            "check-config",
            "daemon.schedule",
        ),
        (
            "bad glob",
            BASE.replace("project = \"*\"", "project = \"prod-[\""),
            "check-config",
            "rotate[0].project",
        ),
        (
            "inline admin key",
            BASE.replace(
                "admin_key_env = \"CONFIG_ERRORS_ADMIN_KEY\"",
                "admin_key = \"sk-admin-inline\"",
            ),
            "check-config",
            "openai.admin_key",
        ),
        (
            "missing env var",
            BASE.replace("CONFIG_ERRORS_ADMIN_KEY", "CONFIG_ERRORS_UNSET_VARIABLE"),
            "check-config",
            "openai.admin_key_env",
        ),
        (
            "unreadable key file",
            BASE.replace(
                "admin_key_env = \"CONFIG_ERRORS_ADMIN_KEY\"",
                "admin_key_file = \"/nonexistent/keyrotd/admin-key\"",
            ),
            "check-config",
            "openai.admin_key_file",
        ),
        (
            "unknown store",
            BASE.replace("stores = [\"local\"]", "stores = [\"vualt\"]"),
            "check-config",
            "rotate[0].stores",
        ),
        (
            "no rules with rotation",
            BASE.split("[[rotate]]").next().unwrap().to_string(),
            "once",
            "`rotate`",
        ),
    ];
    for (class, toml, command, key) in cases {
        let (code, err) = run(&toml, command, &[]);
        assert_eq!(code, Some(2), "{class}: exit code; stderr: {err}");
        assert!(err.contains(key), "{class}: message names {key:?}: {err}");
        assert!(
            !err.contains("sk-admin-"),
            "{class}: no secret in the message: {err}"
        );
    }
    // An environment override is validated like the file.
    let (code, err) = run(
        BASE,
        "check-config",
        &[("KEYROTD__DAEMON__CONCURRENCY", "lots")],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("daemon.concurrency"), "{err}");
}
