//! `keyrotd check-config --connect`: one line per check, with what to do when it fails.

use crate::app;
use crate::config::Config;
use crate::openai::{ApiError, Client};

fn line(ok: bool, what: &str, detail: &str) {
    println!("{} {what}: {detail}", if ok { "[ OK ]" } else { "[FAIL]" });
}

/// Proves the admin key, reaches every store and checks it can write where the rules
/// point. Returns the exit code (0 all good, 2 otherwise).
pub async fn connect(cfg: &Config) -> i32 {
    let mut failed = false;
    let stores = app::build_stores(cfg).await;
    match app::admin_key(cfg, &stores).await {
        Err(e) => {
            line(false, "admin key", &e.to_string());
            failed = true;
        }
        Ok(key) => match Client::new(app::client_config(cfg), key) {
            Err(e) => {
                line(false, "OpenAI client", &e.to_string());
                failed = true;
            }
            Ok(client) => match client.ping().await {
                Ok(()) => line(
                    true,
                    "OpenAI Admin API",
                    &format!("admin key accepted by {}", cfg.openai.base_url),
                ),
                Err(e) => {
                    failed = true;
                    let hint = match &e {
                        ApiError::Unauthorized { .. } => {
                            "admin key rejected: check the key is an Admin key (sk-admin-...) that is not revoked"
                        }
                        ApiError::Forbidden { .. } => {
                            "not an admin key or missing permission: project keys cannot use the Admin API"
                        }
                        ApiError::Network { .. } => {
                            "network error: check openai.base_url, DNS, proxies and egress rules"
                        }
                        _ => "the API answered with an error",
                    };
                    line(false, "OpenAI Admin API", &format!("{hint} ({e})"));
                }
            },
        },
    }
    for (name, store) in &stores {
        match store.health().await {
            Ok(()) => line(
                true,
                &format!("store {name}"),
                &format!("{} reachable, credentials accepted", store.kind()),
            ),
            Err(e) => {
                failed = true;
                line(
                    false,
                    &format!("store {name}"),
                    &format!("{e} — check the address, credentials and network path to the store"),
                );
                continue;
            }
        }
        for rule in cfg.rules().iter().filter(|r| r.stores.contains(name)) {
            let probe = rule.render_path(&crate::config::PathVars {
                project_id: "proj_probe",
                project_name: "keyrotd-probe",
                service_account_id: "svc_acct_probe",
                service_account_name: "keyrotd-probe",
            });
            match store.probe_write(&probe).await {
                Ok(()) => line(
                    true,
                    &format!("store {name} write ({})", rule.name),
                    &format!("may write {probe}"),
                ),
                Err(e) => {
                    failed = true;
                    line(
                        false,
                        &format!("store {name} write ({})", rule.name),
                        &format!("{e} — grant keyrotd write access to the path (see deploy/vault, deploy/aws)"),
                    );
                }
            }
        }
    }
    if failed {
        crate::EXIT_BAD_CONFIG
    } else {
        0
    }
}
