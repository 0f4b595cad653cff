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

#[test]
fn errors_from_environment_overrides_name_the_variable() {
    type Env<'a> = Vec<(&'a str, &'a str)>;
    let cases: [(&str, Env, &str, &str); 5] = [
        (
            "unknown key",
            vec![("KEYROTD__POLICY__MAX_AGEE", "1d")],
            "environment variable KEYROTD__POLICY__MAX_AGEE: unknown field `max_agee`",
            "",
        ),
        (
            "bad duration",
            vec![("KEYROTD__POLICY__MAX_AGE", "banana")],
            "environment variable KEYROTD__POLICY__MAX_AGE: invalid value",
            "policy.max_age",
        ),
        (
            "unknown section",
            vec![("KEYROTD__BOGUS__X", "1")],
            "environment variable KEYROTD__BOGUS__X: unknown field `bogus`",
            "",
        ),
        (
            "value validate() refuses",
            vec![("KEYROTD__DAEMON__CONCURRENCY", "0")],
            "environment variable KEYROTD__DAEMON__CONCURRENCY:",
            "0 is outside 1..=256",
        ),
        (
            "the bad one among good ones",
            vec![
                ("KEYROTD__DAEMON__CONCURRENCY", "4"),
                ("KEYROTD__POLICY__GRACE_PERIOD", "2h"),
                ("KEYROTD__STORES__LOCAL__DIRR", "/tmp"),
            ],
            "environment variable KEYROTD__STORES__LOCAL__DIRR: unknown field `dirr`",
            "stores.local",
        ),
    ];
    for (class, env, want, also) in cases {
        let (code, err) = run(BASE, "check-config", &env);
        assert_eq!(code, Some(2), "{class}: exit code; stderr: {err}");
        assert!(err.contains(want), "{class}: wants {want:?}: {err}");
        assert!(err.contains(also), "{class}: wants {also:?}: {err}");
        assert!(
            !err.contains("config file"),
            "{class}: blames the file: {err}"
        );
    }
    // A mistake in the file is still the file's, whatever the environment sets.
    let (code, err) = run(
        &format!("{BASE}[policy]\nmax_agee = \"3d\"\n"),
        "check-config",
        &[("KEYROTD__POLICY__MAX_AGE", "1d")],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("config file ") && err.contains("max_agee"),
        "{err}"
    );
    assert!(!err.contains("environment variable"), "{err}");
    // Good overrides pass.
    let (code, err) = run(BASE, "check-config", &[("KEYROTD__POLICY__MAX_AGE", "1d")]);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn secret_shaped_values_in_the_wrong_field_are_not_echoed() {
    for pasted in [
        "sk-admin-AbCdEf0123456789",
        "hvs.CAESIAbCdEf0123456789xyz",
        "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE",
    ] {
        let toml = BASE.replace("CONFIG_ERRORS_ADMIN_KEY", pasted);
        let (code, err) = run(&toml, "check-config", &[]);
        assert_eq!(code, Some(2), "{pasted}: {err}");
        assert!(err.contains("openai.admin_key_env"), "{pasted}: {err}");
        assert!(err.contains("[REDACTED]") && !err.contains(pasted), "{err}");
        let (code, err) = run(
            BASE,
            "check-config",
            &[("KEYROTD__POLICY__MAX_AGE", pasted)],
        );
        assert_eq!(code, Some(2), "{pasted}: {err}");
        assert!(err.contains("KEYROTD__POLICY__MAX_AGE"), "{pasted}: {err}");
        assert!(!err.contains(pasted), "{err}");
    }
}
