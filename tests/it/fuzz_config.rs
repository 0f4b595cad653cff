//! Fuzzing the configuration parser: `Config::from_toml` on arbitrary text, on mutated
//! valid configs and on generated documents made of real keys with wild values never
//! panics; it returns a config that validates, or an error that names a key or the file.
//!
//! CI runs 256 cases per property; a longer run:
//! `PROPTEST_CASES=100000 cargo test --release --test fuzz_config`.

use keyrotd::config::{Config, ConfigError};
use proptest::prelude::*;

const EXAMPLE: &str = include_str!("../../config/keyrotd.example.toml");

const MINIMAL: &str = r#"
[daemon]
schedule = "*/5 * * * *"
listen = "127.0.0.1:9477"
[openai]
admin_key_env = "FUZZ_ADMIN_KEY"
max_retry_after = "10s"
[policy]
max_age = "30d"
grace_period = "1h"
key_expiry = "90d"
[stores.local]
type = "file"
dir = "/tmp/keyrotd-fuzz"
[stores.vault]
type = "vault"
address = "http://127.0.0.1:8200"
auth = { method = "approle", role_id_env = "R", secret_id_file = "/dev/null" }
[[rotate]]
name = "prod"
project = "prod-{a,b}*"
service_account = "back?nd"
stores = ["local", "vault"]
path = "openai/{project_name}/{service_account_name}"
max_age = "7d"
strategy = "auto"
"#;

/// Parses and, on success, checks the config is one `validate` accepts (parsing must
/// not hand out a config that fails its own checks).
fn parse(text: &str) -> Result<(), String> {
    let outcome = std::panic::catch_unwind(|| Config::from_toml(text));
    match outcome {
        Err(_) => Err(format!("Config::from_toml panicked on:\n{text}")),
        Ok(Ok(cfg)) => {
            cfg.validate()
                .map_err(|e| format!("accepted a config its validate() refuses: {e}"))?;
            let _ = cfg.rules();
            Ok(())
        }
        Ok(Err(e)) => {
            let msg = e.to_string();
            match &e {
                ConfigError::Invalid { key, .. } if key.is_empty() => {
                    Err(format!("an error that names no key: {msg}"))
                }
                _ if msg.is_empty() => Err("an empty error message".into()),
                _ => Ok(()),
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Mutation {
    Delete { at: usize, len: usize },
    Insert { at: usize, text: String },
    Replace { at: usize, len: usize, text: String },
    DuplicateLine { at: usize },
    DropLine { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let snippet = prop_oneof![
        "[ -~]{0,12}",
        Just("\"".to_string()),
        Just("[[".to_string()),
        Just("]".to_string()),
        Just("=".to_string()),
        Just("\n[stores.x]\n".to_string()),
        Just("\"0s\"".to_string()),
        Just("\"-1d\"".to_string()),
        Just("\"18446744073709551615s\"".to_string()),
        Just("99999999999999999999".to_string()),
        Just("{".to_string()),
        Just("* * * * * * *".to_string()),
        Just("[!".to_string()),
        Just("\u{0}".to_string()),
        Just("é".to_string()),
        Just("{project_id}".to_string()),
        Just("../".to_string()),
    ];
    prop_oneof![
        (any::<usize>(), 0usize..40).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), snippet.clone()).prop_map(|(at, text)| Mutation::Insert { at, text }),
        (any::<usize>(), 0usize..20, snippet).prop_map(|(at, len, text)| Mutation::Replace {
            at,
            len,
            text
        }),
        any::<usize>().prop_map(|at| Mutation::DuplicateLine { at }),
        any::<usize>().prop_map(|at| Mutation::DropLine { at }),
    ]
}

/// Applies mutations on char boundaries.
fn mutate(base: &str, muts: &[Mutation]) -> String {
    let mut s: Vec<char> = base.chars().collect();
    for m in muts {
        let n = s.len().max(1);
        match m {
            Mutation::Delete { at, len } => {
                let a = at % n;
                let b = (a + len).min(s.len());
                if a < b {
                    s.drain(a..b);
                }
            }
            Mutation::Insert { at, text } => {
                let a = (at % (s.len() + 1)).min(s.len());
                s.splice(a..a, text.chars());
            }
            Mutation::Replace { at, len, text } => {
                let a = at % n;
                let b = (a + len).min(s.len());
                if a <= b && a <= s.len() {
                    s.splice(a..b, text.chars());
                }
            }
            Mutation::DuplicateLine { at } | Mutation::DropLine { at } => {
                let text: String = s.iter().collect();
                let mut lines: Vec<&str> = text.lines().collect();
                if lines.is_empty() {
                    continue;
                }
                let i = at % lines.len();
                if matches!(m, Mutation::DropLine { .. }) {
                    lines.remove(i);
                } else {
                    lines.insert(i, lines[i]);
                }
                s = lines.join("\n").chars().collect();
            }
        }
    }
    s.into_iter().collect()
}

/// A TOML value of any type, leaning on the shapes the config uses.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,25}[smhdwy]?".prop_map(|d| format!("\"{d}\"")),
        "[ -~]{0,20}".prop_map(|s| format!("{s:?}")),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        "[a-z*?\\[\\]{},!-]{0,10}".prop_map(|s| format!("{s:?}")),
        "([0-9*/,-]{1,4} ){4,6}".prop_map(|s| format!("{:?}", s.trim())),
        prop::collection::vec("[a-z]{0,6}", 0..4).prop_map(|v| format!("{v:?}")),
        Just("{ method = \"token\" }".to_string()),
        Just("{ method = \"kubernetes\", role = \"\" }".to_string()),
        Just("\"file\"".to_string()),
        Just("\"vault\"".to_string()),
        Just("\"aws_secrets_manager\"".to_string()),
    ]
}

const SECTIONS: &[(&str, &[&str])] = &[
    (
        "daemon",
        &[
            "schedule",
            "run_on_start",
            "concurrency",
            "listen",
            "shutdown_timeout",
            "instance_id",
        ],
    ),
    (
        "openai",
        &[
            "base_url",
            "admin_key_env",
            "admin_key_file",
            "admin_key",
            "request_timeout",
            "max_retries",
            "max_retry_after",
            "max_pages",
            "max_response_bytes",
            "scan_timeout",
            "include_archived",
        ],
    ),
    (
        "policy",
        &[
            "max_age",
            "grace_period",
            "verify",
            "user_keys",
            "key_expiry",
            "expiry_warning",
            "orphan_min_age",
            "lease",
            "verify_timeout",
        ],
    ),
    (
        "stores.s",
        &[
            "type",
            "dir",
            "address",
            "mount",
            "namespace",
            "ca_cert",
            "auth",
            "region",
            "endpoint_url",
            "kms_key_id",
            "profile",
            "max_retries",
            "request_timeout",
        ],
    ),
    (
        "[rotate]",
        &[
            "name",
            "project",
            "service_account",
            "stores",
            "path",
            "max_age",
            "grace_period",
            "verify",
            "scopes",
            "strategy",
        ],
    ),
];

/// A document of real section and key names with arbitrary values.
fn document() -> impl Strategy<Value = String> {
    let entry = (0..SECTIONS.len(), any::<usize>(), value());
    prop::collection::vec(entry, 0..24).prop_map(|entries| {
        let mut by_section: Vec<Vec<(String, String)>> = vec![Vec::new(); SECTIONS.len()];
        for (s, k, v) in entries {
            let keys = SECTIONS[s].1;
            let key = keys[k % keys.len()].to_string();
            if !by_section[s].iter().any(|(k2, _)| *k2 == key) {
                by_section[s].push((key, v));
            }
        }
        let mut out = String::new();
        for (i, entries) in by_section.iter().enumerate() {
            if entries.is_empty() {
                continue;
            }
            out.push_str(&format!("[{}]\n", SECTIONS[i].0));
            for (k, v) in entries {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
        failure_persistence: None,
        .. ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_text_never_panics(text in "(?s).{0,400}") {
        prop_assert!(parse(&text).is_ok(), "{}", parse(&text).unwrap_err());
    }

    #[test]
    fn mutated_example_config_never_panics(muts in prop::collection::vec(mutation(), 1..6)) {
        let text = mutate(EXAMPLE, &muts);
        let r = parse(&text);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }

    #[test]
    fn mutated_minimal_config_never_panics(muts in prop::collection::vec(mutation(), 1..6)) {
        let text = mutate(MINIMAL, &muts);
        let r = parse(&text);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }

    #[test]
    fn documents_of_real_keys_with_wild_values_never_panic(doc in document()) {
        let r = parse(&doc);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}

#[test]
fn the_seeds_are_valid() {
    std::env::set_var("FUZZ_ADMIN_KEY", "sk-admin-fuzz");
    Config::from_toml(MINIMAL).expect("minimal config");
    // The example config names stores and env vars that need not exist; it must parse.
    Config::from_toml(EXAMPLE).expect("example config");
}

/// Durations that parse but would overflow the engine's date arithmetic (`now + lease`
/// panicked with "`DateTime + TimeDelta` overflowed") are refused, naming the key.
#[test]
fn durations_beyond_a_century_are_refused() {
    for key in [
        "max_age",
        "grace_period",
        "lease",
        "orphan_min_age",
        "expiry_warning",
        "verify_timeout",
        "key_expiry",
    ] {
        let text = MINIMAL.replace("[policy]\n", &format!("[policy]\n{key} = \"1000000y\"\n"));
        let text = if key == "max_age" || key == "grace_period" || key == "key_expiry" {
            text.replacen(&format!("{key} = \"30d\"\n"), "", 1)
                .replacen(&format!("{key} = \"1h\"\n"), "", 1)
                .replacen(&format!("{key} = \"90d\"\n"), "", 1)
        } else {
            text
        };
        let err = Config::from_toml(&text).expect_err(key).to_string();
        assert!(
            err.contains(&format!("policy.{key}")) && err.contains("100 years"),
            "{key}: {err}"
        );
    }
    let rule = MINIMAL.replace("max_age = \"7d\"", "max_age = \"1000000y\"");
    let err = Config::from_toml(&rule).expect_err("rule").to_string();
    assert!(err.contains("rotate[0].max_age"), "{err}");
}
