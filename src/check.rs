//! `keyrotd check-config --connect`: one line per check, each check bounded in time,
//! and for a failure a hint that fits its kind (a variable not set, credentials
//! missing or refused, a service unreachable or silent, a path that is not a
//! directory, ...). Nothing is left behind: the file store's probe removes what it
//! created, Vault's asks for capabilities, AWS's only reads.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::app;
use crate::config::{Config, StoreConfig, VaultAuth};
use crate::openai::{ApiError, Client};
use crate::store::{self, DynStore, StoreError, StoreErrorKind};

/// How long each service may take: a store's login, health check and write probes
/// together; the admin key's check. Within it the AWS store bounds its credential
/// chain (3 s) and its request (5 s) itself.
pub const SERVICE_BOUND: Duration = Duration::from_secs(10);

/// The Admin API ping: per request, and one retry, so that an unreachable API is
/// reported within [`SERVICE_BOUND`].
const API_REQUEST_TIMEOUT: Duration = Duration::from_secs(4);

/// What went wrong, as far as the remedy differs.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Problem {
    /// A `*_env` key names a variable that is not set.
    EnvVarNotSet {
        key: String,
        var: String,
    },
    /// A `*_file` key (or `ca_cert`) names a file that cannot be read.
    FileUnreadable {
        key: String,
    },
    /// The credential chain found no credentials (AWS).
    CredentialsMissing,
    /// The credentials were refused, or may not do what keyrotd needs.
    PermissionDenied,
    /// A file store's `dir`, or a directory below it, is not a directory (or a symlink).
    NotADirectory,
    /// Connection refused, DNS, TLS, 5xx.
    Unreachable,
    /// No answer within the bound.
    TimedOut {
        step: &'static str,
    },
    Throttled,
    /// Another problem with the store's section of the config.
    InvalidConfig,
    Other,
}

impl Problem {
    /// Where a store failure belongs; `health` tells which call failed (a `health`
    /// call's `InvalidConfig` from the AWS store is its empty credential chain).
    fn of_store(backend: &str, health: bool, e: &StoreError) -> Problem {
        match e.kind {
            StoreErrorKind::PermissionDenied => Problem::PermissionDenied,
            StoreErrorKind::Unavailable => Problem::Unreachable,
            StoreErrorKind::Throttled => Problem::Throttled,
            StoreErrorKind::InvalidConfig if backend == "file" => Problem::NotADirectory,
            StoreErrorKind::InvalidConfig if backend == "aws_secrets_manager" && health => {
                Problem::CredentialsMissing
            }
            StoreErrorKind::InvalidConfig => Problem::InvalidConfig,
            _ => Problem::Other,
        }
    }

    /// What to do about it, for a store of backend `backend` named `name`.
    fn hint(&self, backend: &str, name: &str) -> String {
        let section = format!("[stores.{name}]");
        match (self, backend) {
            (Problem::EnvVarNotSet { key, var }, _) => format!(
                "set {var} in keyrotd's environment (systemd: Environment= or \
                 EnvironmentFile=; Kubernetes: env from a Secret), or replace `{key}` \
                 with its `_file` twin pointing at a credential file"
            ),
            (Problem::FileUnreadable { key }, _) => format!(
                "make the file `{key}` names exist and readable by keyrotd's user \
                 (systemd: LoadCredential=; Kubernetes: mount the Secret)"
            ),
            (Problem::CredentialsMissing, _) => "set AWS_ACCESS_KEY_ID \
                 and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or `profile`, web identity (IRSA: \
                 AWS_ROLE_ARN, AWS_WEB_IDENTITY_TOKEN_FILE), or run on EC2/ECS with a role"
                .to_string(),
            (Problem::PermissionDenied, "vault") => "the token (or login) was refused, or \
                 its policy lacks create/update/read on the data path and read on the \
                 metadata path: see deploy/vault/keyrotd-policy.hcl"
                .to_string(),
            (Problem::PermissionDenied, "aws_secrets_manager") => "the credentials were \
                 refused, or lack secretsmanager:ListSecrets/DescribeSecret (and the \
                 writes): see deploy/aws/keyrotd-iam-policy.json"
                .to_string(),
            (Problem::PermissionDenied, "file") => "keyrotd's user may not write there: \
                 give it the directory (owner, mode 0700; systemd: StateDirectory= or \
                 ReadWritePaths=)"
                .to_string(),
            (Problem::PermissionDenied, _) => "permission denied".to_string(),
            (Problem::NotADirectory, _) => format!(
                "point `dir` in {section} at a directory (a path below it must not be a \
                 file or a symlink either)"
            ),
            (Problem::Unreachable, "aws_secrets_manager") => format!(
                "Secrets Manager is unreachable: check `region`/`endpoint_url` in \
                 {section}, DNS, proxies and egress rules"
            ),
            (Problem::Unreachable, _) => format!(
                "the store is unreachable: check `address` (and `ca_cert` for TLS) in \
                 {section}, DNS, proxies and the network path"
            ),
            (Problem::TimedOut { .. }, _) => "no answer: a firewall dropping packets, or \
                 a server that accepts connections and never answers"
                .to_string(),
            (Problem::Throttled, _) => {
                "the store is throttling keyrotd: try again later".to_string()
            }
            (Problem::InvalidConfig, _) => format!("fix {section}"),
            (Problem::Other, _) => "see the error".to_string(),
        }
    }
}

/// One check's outcome, as printed.
struct Line {
    ok: bool,
    what: String,
    detail: String,
}

impl Line {
    fn ok(what: impl Into<String>, detail: impl Into<String>) -> Line {
        Line {
            ok: true,
            what: what.into(),
            detail: detail.into(),
        }
    }

    fn fail(what: impl Into<String>, error: &str, hint: &str) -> Line {
        Line {
            ok: false,
            what: what.into(),
            detail: format!("{} — {hint}", one_line(error)),
        }
    }

    fn print(&self) {
        let mark = if self.ok { "[ OK ]" } else { "[FAIL]" };
        println!("{mark} {}: {}", self.what, self.detail);
    }
}

/// Error text on one line (SDK and server messages may hold line breaks), with
/// secret-shaped values masked.
fn one_line(s: &str) -> String {
    crate::redact::secrets(&s.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// `fut`, unless `deadline` passes first.
async fn bounded<T>(deadline: Instant, fut: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout_at(deadline, fut).await.ok()
}

fn timed_out(step: &'static str) -> (String, Problem) {
    (
        format!(
            "{step}: no answer within {}s (check-config's bound per service)",
            SERVICE_BOUND.as_secs()
        ),
        Problem::TimedOut { step },
    )
}

/// Problems visible in the config and the environment alone: credential variables
/// that are not set, credential files that cannot be read.
fn preflight(name: &str, sc: &StoreConfig) -> Option<(String, Problem)> {
    let StoreConfig::Vault(v) = sc else {
        return None;
    };
    let key = |k: &str| format!("stores.{name}.auth.{k}");
    // (key, variable) and (key, file) pairs naming the credentials.
    type Envs<'a> = Vec<(&'static str, &'a Option<String>)>;
    type Files<'a> = Vec<(String, Option<&'a std::path::Path>)>;
    let (envs, files): (Envs, Files) = match &v.auth {
        VaultAuth::Token {
            token_env,
            token_file,
        } => (
            vec![("token_env", token_env)],
            vec![(key("token_file"), token_file.as_deref())],
        ),
        VaultAuth::Approle {
            role_id_env,
            role_id_file,
            secret_id_env,
            secret_id_file,
            ..
        } => (
            vec![
                ("role_id_env", role_id_env),
                ("secret_id_env", secret_id_env),
            ],
            vec![
                (key("role_id_file"), role_id_file.as_deref()),
                (key("secret_id_file"), secret_id_file.as_deref()),
            ],
        ),
        VaultAuth::Kubernetes { jwt_file, .. } => {
            (vec![], vec![(key("jwt_file"), Some(jwt_file.as_path()))])
        }
    };
    for (k, var) in envs {
        let Some(var) = var else { continue };
        if std::env::var(var).map_or(true, |v| v.trim().is_empty()) {
            let key = key(k);
            return Some((
                format!("config key `{key}`: environment variable {var} is not set or empty"),
                Problem::EnvVarNotSet {
                    key,
                    var: var.clone(),
                },
            ));
        }
    }
    let ca = (!v.ca_cert.is_empty()).then(|| std::path::Path::new(&v.ca_cert));
    for (key, path) in files
        .into_iter()
        .chain([(format!("stores.{name}.ca_cert"), ca)])
    {
        let Some(path) = path else { continue };
        if let Err(e) = std::fs::File::open(path) {
            return Some((
                format!("config key `{key}`: cannot read {}: {e}", path.display()),
                Problem::FileUnreadable { key },
            ));
        }
    }
    None
}

/// Builds one store within `deadline`; a failure comes with its [`Problem`].
async fn build_store(
    name: &str,
    sc: &StoreConfig,
    deadline: Instant,
) -> Result<DynStore, (String, Problem)> {
    if let Some(p) = preflight(name, sc) {
        return Err(p);
    }
    match bounded(deadline, store::build(name, sc)).await {
        None => Err(timed_out("connect and log in")),
        Some(Ok(s)) => Ok(s),
        Some(Err(e)) => Err((e.message.clone(), Problem::of_store(sc.kind(), false, &e))),
    }
}

/// A store's health check and one write probe per rule using it, within `deadline`.
async fn check_store(cfg: &Config, name: &str, store: &DynStore, deadline: Instant) -> Vec<Line> {
    let backend = store.kind();
    let what = format!("store {name}");
    let fail = |what: String, (error, p): (String, Problem)| {
        Line::fail(what, &error, &p.hint(backend, name))
    };
    let health = match bounded(deadline, store.health()).await {
        None => Err(timed_out("health check")),
        Some(r) => r.map_err(|e| (e.message.clone(), Problem::of_store(backend, true, &e))),
    };
    if let Err(f) = health {
        return vec![fail(what, f)];
    }
    let detail = match backend {
        "file" => "file: dir writable",
        "vault" => "vault reachable, token accepted",
        _ => "aws_secrets_manager reachable, credentials accepted",
    };
    let mut lines = vec![Line::ok(what, detail)];
    for rule in cfg
        .rules()
        .iter()
        .filter(|r| r.stores.iter().any(|s| s == name))
    {
        let probe = rule.render_path(&crate::config::PathVars {
            project_id: "proj_probe",
            project_name: "keyrotd-probe",
            service_account_id: "svc_acct_probe",
            service_account_name: "keyrotd-probe",
        });
        let what = format!("store {name} write ({})", rule.name);
        lines.push(match bounded(deadline, store.probe_write(&probe)).await {
            None => fail(what, timed_out("write probe")),
            Some(Ok(())) => Line::ok(what, format!("may write {probe}")),
            Some(Err(e)) => fail(
                what,
                (e.message.clone(), Problem::of_store(backend, false, &e)),
            ),
        });
    }
    lines
}

/// Proves the admin key against the Admin API within [`SERVICE_BOUND`].
async fn check_admin_key(cfg: &Config, stores: &BTreeMap<String, DynStore>) -> Line {
    let what = "OpenAI Admin API";
    let deadline = Instant::now() + SERVICE_BOUND;
    let key = match bounded(deadline, app::admin_key(cfg, stores)).await {
        None => {
            return Line::fail(
                "admin key",
                &timed_out("read the admin key").0,
                "see the line of the admin key's store below",
            )
        }
        Some(Err(e)) => {
            return Line::fail(
                "admin key",
                &e.to_string(),
                "fix the openai.admin_key_* settings",
            )
        }
        Some(Ok(key)) => key,
    };
    let mut client_cfg = app::client_config(cfg);
    client_cfg.request_timeout = client_cfg.request_timeout.min(API_REQUEST_TIMEOUT);
    client_cfg.max_retries = client_cfg.max_retries.min(1);
    let client = match Client::new(client_cfg, key) {
        Ok(c) => c,
        Err(e) => return Line::fail("OpenAI client", &e.to_string(), "fix openai.base_url"),
    };
    let e = match bounded(deadline, client.ping()).await {
        None => {
            return Line::fail(
                what,
                &timed_out("list one project").0,
                "check openai.base_url, DNS, proxies and egress rules",
            )
        }
        Some(Ok(())) => {
            return Line::ok(
                what,
                format!("admin key accepted by {}", cfg.openai.base_url),
            )
        }
        Some(Err(e)) => e,
    };
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
    // The hint leads: it names the failure kind.
    Line {
        ok: false,
        what: what.to_string(),
        detail: format!("{hint} ({})", one_line(&e.to_string())),
    }
}

/// Proves the admin key, reaches every store and checks it can write where the rules
/// point; every service within [`SERVICE_BOUND`], the stores side by side. Returns the
/// exit code (0 all good, 2 otherwise).
pub async fn connect(cfg: &Config) -> i32 {
    let deadline = Instant::now() + SERVICE_BOUND;
    let built = futures::future::join_all(
        cfg.stores
            .iter()
            .map(|(name, sc)| async move { (name, sc, build_store(name, sc, deadline).await) }),
    )
    .await;
    let mut stores: BTreeMap<String, DynStore> = BTreeMap::new();
    let mut broken: BTreeMap<&str, Line> = BTreeMap::new();
    for (name, sc, b) in built {
        let s: DynStore = match b {
            Ok(s) => s,
            Err((error, p)) => {
                let hint = p.hint(sc.kind(), name);
                broken.insert(name, Line::fail(format!("store {name}"), &error, &hint));
                Arc::new(app::BrokenStore::new(
                    name,
                    sc.kind(),
                    StoreError::new(name, StoreErrorKind::Unavailable, error),
                ))
            }
        };
        stores.insert(name.clone(), s);
    }
    let store_checks = futures::future::join_all(stores.iter().map(|(name, store)| {
        let done = broken.remove(name.as_str());
        async move {
            match done {
                Some(line) => vec![line],
                None => check_store(cfg, name, store, deadline).await,
            }
        }
    }));
    let (api, store_lines) = tokio::join!(check_admin_key(cfg, &stores), store_checks);
    let lines: Vec<Line> = std::iter::once(api)
        .chain(store_lines.into_iter().flatten())
        .collect();
    for l in &lines {
        l.print();
    }
    if lines.iter().all(|l| l.ok) {
        0
    } else {
        crate::EXIT_BAD_CONFIG
    }
}
