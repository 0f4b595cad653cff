//! Vault / OpenBao KV v2 store, with `vaultrs`.
//!
//! Each slot is one KV v2 secret whose data map is [`Document::from_state`] (the six
//! DESIGN.md §3 fields at the top, bookkeeping under `rotation`). The [`Version`] is the
//! secret's `current_version` in decimal; every write is a check-and-set write with
//! `cas` = that version (0 while the secret is absent), so it also works on mounts with
//! `cas_required = true`. A deleted or destroyed current version reads as an empty slot
//! that keeps its version for the next write. The secret's custom metadata gets
//! `managed-by = keyrotd` (metadata writes take no cas; only the data is compare-and-set).
//!
//! Round trips: a read is one `GET <mount>/data/<path>` (its response carries the
//! version and the custom metadata; the metadata endpoint is asked only after a 404).
//! [`SecretStore::apply_to`] writes without reading first: the `cas` makes Vault do
//! the "still at the version I read" check atomically. The only thing remembered
//! between calls is which paths still lack the `managed-by` mark (metadata, never
//! secret data), so a rotation costs one read, three writes and the read-back.
//!
//! Auth: a token (env or file), AppRole or Kubernetes. The token's TTL and renewability
//! are tracked from the login (or `lookup-self` for a given token); before a call past
//! two thirds of the TTL the token is renewed (`renew-self`), or, when renewal is not
//! possible or no longer extends it, the store logs in again (AppRole, Kubernetes). A
//! 403 triggers one fresh login (or, for a token file, one re-read of the file) and one
//! retry, so a daemon survives expired or revoked tokens. Temporary failures (5xx,
//! sealed, 429, connection errors) are retried with backoff up to `max_retries`.
//!
//! `probe_write` asks `sys/capabilities-self` whether the token may create, update and
//! read `<mount>/data/<path>` and read `<mount>/metadata/<path>`: exact for the path,
//! read-only, and leaves no probe secrets behind (KV v2 keeps metadata of deleted
//! secrets unless its metadata is deleted too, which least-privilege policies forbid).

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::RwLock;
use vaultrs::api::kv2::requests::{
    ReadSecretRequest, SetSecretMetadataRequest, SetSecretRequestOptions,
};
use vaultrs::api::AuthInfo;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;
use vaultrs::{auth, kv2, token};

use super::*;
use crate::config::{read_secret, read_secret_file};
use serde::{Deserialize, Serialize};

// ----- configuration: `[stores.<name>]` with `type = "..."` -----

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    pub address: String,
    #[serde(default = "default_mount")]
    pub mount: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub ca_cert: String,
    pub auth: VaultAuth,
    /// Store-call retries on 5xx / connection errors.
    #[serde(default = "super::default_store_retries")]
    pub max_retries: u32,
    #[serde(default = "default_store_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
}

fn default_mount() -> String {
    "secret".into()
}
fn default_store_timeout() -> Duration {
    Duration::from_secs(15)
}

/// Vault auth; credentials only by env var or file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum VaultAuth {
    Token {
        token_env: Option<String>,
        token_file: Option<PathBuf>,
    },
    Approle {
        #[serde(default = "default_approle_mount")]
        mount: String,
        role_id_env: Option<String>,
        role_id_file: Option<PathBuf>,
        secret_id_env: Option<String>,
        secret_id_file: Option<PathBuf>,
    },
    Kubernetes {
        #[serde(default = "default_k8s_mount")]
        mount: String,
        role: String,
        #[serde(default = "default_jwt_file")]
        jwt_file: PathBuf,
    },
}

fn default_approle_mount() -> String {
    "approle".into()
}
fn default_k8s_mount() -> String {
    "kubernetes".into()
}
fn default_jwt_file() -> PathBuf {
    "/var/run/secrets/kubernetes.io/serviceaccount/token".into()
}

impl VaultConfig {
    /// Checks the section without I/O; an error names the key (below
    /// `stores.<name>.`) and what is wrong.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let url = reqwest::Url::parse(&self.address)
            .map_err(|e| ("address", format!("{:?}: {e}", self.address)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(("address", "scheme must be http or https".into()));
        }
        if self.mount.trim_matches('/').is_empty() {
            return Err(("mount", "must not be empty".into()));
        }
        let exactly_one = |a: bool, b: bool, what: &str| {
            if a == b {
                Err(("auth", what.to_string()))
            } else {
                Ok(())
            }
        };
        match &self.auth {
            VaultAuth::Token {
                token_env,
                token_file,
            } => exactly_one(
                token_env.is_some(),
                token_file.is_some(),
                "token auth needs exactly one of token_env and token_file",
            ),
            VaultAuth::Approle {
                role_id_env,
                role_id_file,
                secret_id_env,
                secret_id_file,
                ..
            } => {
                exactly_one(
                    role_id_env.is_some(),
                    role_id_file.is_some(),
                    "approle auth needs exactly one of role_id_env and role_id_file",
                )?;
                exactly_one(
                    secret_id_env.is_some(),
                    secret_id_file.is_some(),
                    "approle auth needs exactly one of secret_id_env and secret_id_file",
                )
            }
            VaultAuth::Kubernetes { role, .. } if role.trim().is_empty() => {
                Err(("auth.role", "must not be empty".into()))
            }
            VaultAuth::Kubernetes { .. } => Ok(()),
        }
    }
}

/// Key of the custom metadata entry marking secrets keyrotd manages.
const MANAGED_BY_KEY: &str = "managed-by";

/// The Vault KV v2 backend.
pub struct VaultStore {
    name: String,
    address: String,
    mount: String,
    max_retries: u32,
    auth: AuthMethod,
    settings: Settings,
    /// Client without a token, for logins.
    login_client: Arc<VaultClient>,
    session: RwLock<Session>,
    /// Paths this store has seen without `managed-by = keyrotd`, with their custom
    /// metadata when the read showed it: the next write marks them. Metadata only,
    /// never secret data.
    unmarked: std::sync::Mutex<HashMap<String, Option<HashMap<String, String>>>>,
}

impl fmt::Debug for VaultStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultStore")
            .field("name", &self.name)
            .field("address", &self.address)
            .field("mount", &self.mount)
            .field("auth", &self.auth)
            .field("token", &"[REDACTED]")
            .finish()
    }
}

/// What a client is built from, minus the token.
#[derive(Clone)]
struct Settings {
    address: String,
    namespace: Option<String>,
    ca_cert: Option<String>,
    timeout: Duration,
}

/// How the store obtains its token. Credentials are re-read from their env var or file
/// at each login, so rotated files (a new AppRole secret id, a refreshed projected
/// service-account token, a token rewritten by an agent) are picked up.
#[derive(Clone)]
enum AuthMethod {
    Token {
        env: Option<String>,
        file: Option<PathBuf>,
    },
    Approle {
        mount: String,
        role_id_env: Option<String>,
        role_id_file: Option<PathBuf>,
        secret_id_env: Option<String>,
        secret_id_file: Option<PathBuf>,
    },
    Kubernetes {
        mount: String,
        role: String,
        jwt_file: PathBuf,
    },
}

impl fmt::Debug for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only where credentials come from; never their values.
        match self {
            AuthMethod::Token { env, file } => f
                .debug_struct("Token")
                .field("env", env)
                .field("file", file)
                .finish(),
            AuthMethod::Approle { mount, .. } => f
                .debug_struct("Approle")
                .field("mount", mount)
                .finish_non_exhaustive(),
            AuthMethod::Kubernetes {
                mount,
                role,
                jwt_file,
            } => f
                .debug_struct("Kubernetes")
                .field("mount", mount)
                .field("role", role)
                .field("jwt_file", jwt_file)
                .finish(),
        }
    }
}

impl AuthMethod {
    fn can_login(&self) -> bool {
        !matches!(self, AuthMethod::Token { .. })
    }
}

/// The client carrying the current token, and what is known about the token.
struct Session {
    client: Arc<VaultClient>,
    token: SecretString,
    lease: Lease,
    /// Bumped at every token change, so concurrent callers refresh only once.
    generation: u64,
}

/// A token's lifetime as last reported by Vault.
#[derive(Clone, Copy, Debug)]
struct Lease {
    obtained: Instant,
    /// `None`: the token does not expire (e.g. a root token).
    ttl: Option<Duration>,
    renewable: bool,
    /// TTL at creation; a renewal that yields much less means the max TTL is near.
    creation_ttl: Option<Duration>,
}

impl Lease {
    fn from_auth(a: &AuthInfo) -> Self {
        let ttl = (a.lease_duration > 0).then(|| Duration::from_secs(a.lease_duration));
        Lease {
            obtained: Instant::now(),
            ttl,
            renewable: a.renewable,
            creation_ttl: ttl,
        }
    }

    /// Past two thirds of its TTL: time to renew or log in again.
    fn needs_refresh(&self) -> bool {
        self.ttl
            .is_some_and(|ttl| self.obtained.elapsed() >= ttl.mul_f64(2.0 / 3.0))
    }
}

impl VaultStore {
    /// Builds the client and logs in (or looks the given token up); writes nothing.
    pub async fn connect(name: &str, cfg: &VaultConfig) -> StoreResult<Self> {
        let invalid = |m: String| StoreError::new(name, StoreErrorKind::InvalidConfig, m);
        let url = reqwest::Url::parse(&cfg.address)
            .map_err(|e| invalid(format!("address {:?}: {e}", cfg.address)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid(format!(
                "address {:?}: scheme must be http or https",
                cfg.address
            )));
        }
        let mount = cfg.mount.trim_matches('/').to_string();
        if mount.is_empty() {
            return Err(invalid("mount must not be empty".into()));
        }
        let namespace = cfg.namespace.trim_matches('/');
        if !header_safe(namespace) {
            return Err(invalid(
                "namespace contains characters not allowed in an HTTP header".into(),
            ));
        }
        let settings = Settings {
            address: cfg.address.clone(),
            namespace: (!namespace.is_empty()).then(|| namespace.to_string()),
            ca_cert: (!cfg.ca_cert.is_empty()).then(|| cfg.ca_cert.clone()),
            timeout: cfg.request_timeout,
        };
        let auth = match &cfg.auth {
            VaultAuth::Token {
                token_env,
                token_file,
            } => AuthMethod::Token {
                env: token_env.clone(),
                file: token_file.clone(),
            },
            VaultAuth::Approle {
                mount,
                role_id_env,
                role_id_file,
                secret_id_env,
                secret_id_file,
            } => AuthMethod::Approle {
                mount: mount.trim_matches('/').to_string(),
                role_id_env: role_id_env.clone(),
                role_id_file: role_id_file.clone(),
                secret_id_env: secret_id_env.clone(),
                secret_id_file: secret_id_file.clone(),
            },
            VaultAuth::Kubernetes {
                mount,
                role,
                jwt_file,
            } => AuthMethod::Kubernetes {
                mount: mount.trim_matches('/').to_string(),
                role: role.clone(),
                jwt_file: jwt_file.clone(),
            },
        };
        let empty = SecretString::from(String::new());
        let login_client = Arc::new(build_client(name, &settings, &empty)?);
        let mut store = VaultStore {
            name: name.to_string(),
            address: cfg.address.clone(),
            mount,
            max_retries: cfg.max_retries,
            auth,
            settings,
            login_client: login_client.clone(),
            unmarked: std::sync::Mutex::new(HashMap::new()),
            session: RwLock::new(Session {
                client: login_client,
                token: empty,
                lease: Lease {
                    obtained: Instant::now(),
                    ttl: None,
                    renewable: false,
                    creation_ttl: None,
                },
                generation: 0,
            }),
        };
        let (token, lease) = retry_temporary(store.max_retries, || store.obtain_token()).await?;
        let client = Arc::new(build_client(name, &store.settings, &token)?);
        *store.session.get_mut() = Session {
            client,
            token,
            lease,
            generation: 1,
        };
        Ok(store)
    }

    fn err(&self, kind: StoreErrorKind, message: impl Into<String>) -> StoreError {
        StoreError::new(&self.name, kind, message)
    }

    /// Gets a token the way the config says: reads it (and looks it up) or logs in.
    async fn obtain_token(&self) -> StoreResult<(SecretString, Lease)> {
        let key = |k: &str| format!("stores.{}.auth.{k}", self.name);
        let cfg_err =
            |e: crate::config::ConfigError| self.err(StoreErrorKind::InvalidConfig, e.to_string());
        match &self.auth {
            AuthMethod::Token { env, file } => {
                let token =
                    read_secret(&key("token"), env.as_deref(), file.as_deref()).map_err(cfg_err)?;
                self.check_token_chars(&token)?;
                let client = build_client(&self.name, &self.settings, &token)?;
                let info = token::lookup_self(&client)
                    .await
                    .map_err(|e| self.classify("look up the token (auth/token/lookup-self)", &e))?;
                let ttl = (info.ttl > 0).then(|| Duration::from_secs(info.ttl));
                let lease = Lease {
                    obtained: Instant::now(),
                    ttl,
                    renewable: info.renewable.unwrap_or(false),
                    creation_ttl: (info.creation_ttl > 0)
                        .then(|| Duration::from_secs(info.creation_ttl))
                        .or(ttl),
                };
                Ok((token, lease))
            }
            AuthMethod::Approle {
                mount,
                role_id_env,
                role_id_file,
                secret_id_env,
                secret_id_file,
            } => {
                let role_id = read_secret(
                    &key("role_id"),
                    role_id_env.as_deref(),
                    role_id_file.as_deref(),
                )
                .map_err(cfg_err)?;
                let secret_id = read_secret(
                    &key("secret_id"),
                    secret_id_env.as_deref(),
                    secret_id_file.as_deref(),
                )
                .map_err(cfg_err)?;
                let a = auth::approle::login(
                    &*self.login_client,
                    mount,
                    role_id.expose_secret(),
                    secret_id.expose_secret(),
                )
                .await
                .map_err(|e| {
                    login_refused(self.classify(&format!("log in with AppRole (auth/{mount})"), &e))
                })?;
                self.token_from_auth(a)
            }
            AuthMethod::Kubernetes {
                mount,
                role,
                jwt_file,
            } => {
                let jwt = read_secret_file(jwt_file).map_err(|m| {
                    self.err(
                        StoreErrorKind::InvalidConfig,
                        format!("{}: {m}", key("jwt_file")),
                    )
                })?;
                let a =
                    auth::kubernetes::login(&*self.login_client, mount, role, jwt.expose_secret())
                        .await
                        .map_err(|e| {
                            login_refused(self.classify(
                                &format!("log in with Kubernetes (auth/{mount}, role {role:?})"),
                                &e,
                            ))
                        })?;
                self.token_from_auth(a)
            }
        }
    }

    fn token_from_auth(&self, a: AuthInfo) -> StoreResult<(SecretString, Lease)> {
        let lease = Lease::from_auth(&a);
        let token = SecretString::from(a.client_token);
        self.check_token_chars(&token)?;
        Ok((token, lease))
    }

    fn check_token_chars(&self, token: &SecretString) -> StoreResult<()> {
        if header_safe(token.expose_secret()) {
            Ok(())
        } else {
            Err(self.err(
                StoreErrorKind::InvalidConfig,
                "the Vault token contains characters not allowed in an HTTP header",
            ))
        }
    }

    /// Installs a new token in the session.
    fn install(&self, s: &mut Session, token: SecretString, lease: Lease) -> StoreResult<()> {
        s.client = Arc::new(build_client(&self.name, &self.settings, &token)?);
        s.token = token;
        s.lease = lease;
        s.generation += 1;
        Ok(())
    }

    /// The client to use now, renewing or replacing the token first when it is past two
    /// thirds of its TTL.
    async fn client(&self) -> StoreResult<(Arc<VaultClient>, u64)> {
        {
            let s = self.session.read().await;
            if !s.lease.needs_refresh() {
                return Ok((s.client.clone(), s.generation));
            }
        }
        let mut s = self.session.write().await;
        if s.lease.needs_refresh() {
            self.refresh(&mut s).await?;
        }
        Ok((s.client.clone(), s.generation))
    }

    /// Renews the token when it is renewable and renewal still buys a useful TTL;
    /// otherwise logs in again when the method allows it.
    async fn refresh(&self, s: &mut Session) -> StoreResult<()> {
        if s.lease.renewable {
            match token::renew_self(&*s.client, None).await {
                Ok(a) => {
                    let new_ttl = Duration::from_secs(a.lease_duration);
                    let remaining = s
                        .lease
                        .ttl
                        .unwrap_or_default()
                        .saturating_sub(s.lease.obtained.elapsed());
                    let useful = s.lease.creation_ttl.is_none_or(|c| new_ttl >= c / 3);
                    if useful || !self.auth.can_login() {
                        tracing::debug!(event = "vault.token_renewed", store = %self.name, ttl_s = a.lease_duration);
                        s.lease = Lease {
                            obtained: Instant::now(),
                            ttl: (a.lease_duration > 0).then_some(new_ttl),
                            // Renewal that no longer extends the token is not worth repeating.
                            renewable: a.renewable && new_ttl > remaining,
                            creation_ttl: s.lease.creation_ttl,
                        };
                        return Ok(());
                    }
                }
                Err(e) => {
                    let e = self.classify("renew the token (auth/token/renew-self)", &e);
                    tracing::warn!(event = "vault.token_renew_failed", store = %self.name, error = %e);
                    if e.is_temporary() {
                        return Ok(()); // keep the token; the call itself will tell.
                    }
                }
            }
        }
        if self.auth.can_login() {
            let (token, lease) = self.obtain_token().await?;
            tracing::info!(event = "vault.login", store = %self.name, ttl_s = lease.ttl.map(|t| t.as_secs()));
            self.install(s, token, lease)?;
        } else {
            // A given token that can no longer be renewed: nothing to do but use it.
            s.lease.renewable = false;
            s.lease.ttl = None;
        }
        Ok(())
    }

    /// After a 403 with the token of `generation`: logs in again (or re-reads a token
    /// file). True when there is a different token to retry with.
    async fn recover_from_denied(&self, generation: u64) -> StoreResult<bool> {
        let mut s = self.session.write().await;
        if s.generation != generation {
            return Ok(true); // someone else already replaced the token
        }
        if self.auth.can_login() {
            let (token, lease) = self.obtain_token().await?;
            tracing::info!(event = "vault.login", store = %self.name, reason = "permission denied");
            self.install(&mut s, token, lease)?;
            return Ok(true);
        }
        if let AuthMethod::Token { file: Some(_), .. } = &self.auth {
            let (token, lease) = self.obtain_token().await?;
            if token.expose_secret() != s.token.expose_secret() {
                self.install(&mut s, token, lease)?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// One call with the current token; on 403, one retry with a fresh token.
    async fn call_once<T, F, Fut>(&self, what: &str, f: &F) -> StoreResult<T>
    where
        F: Fn(Arc<VaultClient>) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let (client, generation) = self.client().await?;
        match f(client).await {
            Ok(v) => Ok(v),
            Err(e) => {
                let err = self.classify(what, &e);
                if err.kind == StoreErrorKind::PermissionDenied
                    && self.recover_from_denied(generation).await?
                {
                    let (client, _) = self.client().await?;
                    return f(client).await.map_err(|e| self.classify(what, &e));
                }
                Err(err)
            }
        }
    }

    /// A call with token handling and retries of temporary failures.
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> StoreResult<T>
    where
        F: Fn(Arc<VaultClient>) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        retry_temporary(self.max_retries, || self.call_once(what, &f)).await
    }

    /// Maps a vaultrs error to a store error. Never formats response bodies (a failed
    /// parse of a read carries the secret) nor request data.
    fn classify(&self, what: &str, e: &ClientError) -> StoreError {
        use rustify::errors::ClientError as Rest;
        let by_status = |code: u16, detail: &str| -> StoreError {
            let kind = match code {
                400 if detail.contains("check-and-set") => StoreErrorKind::Conflict,
                403 => StoreErrorKind::PermissionDenied,
                404 => StoreErrorKind::NotFound,
                429 => StoreErrorKind::Throttled,
                412 | 500..=599 => StoreErrorKind::Unavailable,
                _ => StoreErrorKind::Other,
            };
            let detail = if detail.is_empty() {
                String::new()
            } else {
                format!(": {detail}")
            };
            self.err(
                kind,
                format!("{what} at {}: HTTP {code}{detail}", self.address),
            )
        };
        match e {
            ClientError::APIError { code, errors } => {
                // Vault wraps multierrors as "1 error occurred:\n\t* permission denied\n\n".
                let detail = errors
                    .iter()
                    .map(|e| e.split_whitespace().collect::<Vec<_>>().join(" "))
                    .collect::<Vec<_>>()
                    .join("; ");
                by_status(*code, &detail)
            }
            ClientError::RestClientError { source } => match source {
                Rest::ServerResponseError { code, .. } => by_status(*code, ""),
                Rest::RequestError { source, .. } => self.err(
                    StoreErrorKind::Unavailable,
                    format!("{what}: cannot reach {}: {source:#}", self.address),
                ),
                Rest::ResponseError { .. } => self.err(
                    StoreErrorKind::Unavailable,
                    format!("{what} at {}: no usable response", self.address),
                ),
                Rest::ResponseParseError { .. } | Rest::ResponseConversionError { .. } => self.err(
                    StoreErrorKind::InvalidData,
                    format!(
                        "{what} at {}: the response is not what Vault's API returns",
                        self.address
                    ),
                ),
                other => self.err(StoreErrorKind::Other, format!("{what}: {other}")),
            },
            ClientError::FileReadError { path, source } => self.err(
                StoreErrorKind::InvalidConfig,
                format!("cannot read ca_cert {path}: {source}"),
            ),
            ClientError::ParseCertificateError { path, .. } => self.err(
                StoreErrorKind::InvalidConfig,
                format!("ca_cert {path} is not a PEM certificate bundle"),
            ),
            ClientError::JsonParseError { .. } => self.err(
                StoreErrorKind::InvalidData,
                format!(
                    "{what} at {}: the response is not what Vault's API returns",
                    self.address
                ),
            ),
            other => self.err(
                StoreErrorKind::Other,
                format!("{what} at {}: {other}", self.address),
            ),
        }
    }

    /// Reads the document at `path` (its data, `None` when there is none or the
    /// current version is deleted, and the version the next write must name) and,
    /// when the answer carried it, the secret's custom metadata. One `GET
    /// <mount>/data/<path>` while the current version is readable (its response
    /// carries the version and the custom metadata); the metadata (and the version's
    /// data) only when that answers 404: no secret yet, or a deleted or destroyed
    /// current version.
    async fn read_raw(
        &self,
        path: &str,
    ) -> StoreResult<(
        Version,
        Option<serde_json::Value>,
        Option<HashMap<String, String>>,
    )> {
        check_path(&self.name, path)?;
        let (mount, p) = (self.mount.clone(), path.to_string());
        let r = self
            .call(&format!("read {path:?}"), move |c| {
                let endpoint = ReadSecretRequest {
                    mount: mount.clone(),
                    path: p.clone(),
                    version: None,
                };
                async move { vaultrs::api::exec_with_result(&*c, endpoint).await }
            })
            .await;
        let resp = match r {
            Ok(resp) => resp,
            Err(e) if e.kind == StoreErrorKind::NotFound => {
                let (version, data, custom) = self.read_via_metadata(path).await?;
                return Ok((version, data, Some(custom)));
            }
            Err(e) => return Err(e),
        };
        let version = Version(resp.metadata.version.to_string());
        let data = (!resp.data.is_null()).then_some(resp.data);
        Ok((version, data, resp.metadata.custom_metadata))
    }

    fn not_ours(&self, path: &str, version: &Version, why: String) -> StoreError {
        self.err(
            StoreErrorKind::InvalidData,
            format!(
                "{}/{path} version {} is not a keyrotd document: {why}",
                self.mount, version.0
            ),
        )
    }

    /// [`Self::read_raw`] through the secret's metadata: the current version number
    /// even when that version is deleted or destroyed.
    async fn read_via_metadata(
        &self,
        path: &str,
    ) -> StoreResult<(Version, Option<serde_json::Value>, HashMap<String, String>)> {
        let (mount, p) = (self.mount.clone(), path.to_string());
        let meta = self
            .call(&format!("read metadata of {path:?}"), move |c| {
                let (mount, p) = (mount.clone(), p.clone());
                async move { kv2::read_metadata(&*c, &mount, &p).await }
            })
            .await;
        let meta = match meta {
            Ok(m) => m,
            Err(e) if e.kind == StoreErrorKind::NotFound => {
                return Ok((Version::absent(), None, HashMap::new()))
            }
            Err(e) => return Err(e),
        };
        let custom = meta.custom_metadata.clone().unwrap_or_default();
        let cv = meta.current_version;
        if cv == 0 {
            return Ok((Version::absent(), None, custom));
        }
        let destroyed = meta
            .versions
            .get(&cv.to_string())
            .is_some_and(|v| v.destroyed);
        // Deleted or destroyed: nothing to read, but the next write must name `cv`.
        let data = if destroyed {
            None
        } else {
            self.read_data(path, cv).await?
        };
        Ok((Version(cv.to_string()), data, custom))
    }

    /// The `cas` a write expecting `v` sends (0: the path holds nothing).
    fn cas_of(&self, path: &str, v: &Version) -> StoreResult<u64> {
        if v.is_absent() {
            return Ok(0);
        }
        v.0.parse::<u64>().map_err(|_| {
            self.err(
                StoreErrorKind::InvalidData,
                format!("{path:?}: bad version {:?}", v.0),
            )
        })
    }

    /// Marks `path` managed after a write when it was seen unmarked, or created by
    /// this write without having been read first.
    async fn mark_after_write(&self, path: &str, cas: u64) {
        let unmarked = self
            .unmarked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(path);
        match unmarked {
            Some(custom) => self.mark_managed(path, custom).await,
            None if cas == 0 => self.mark_managed(path, None).await,
            None => {}
        }
    }

    /// Remembers whether `path` still needs `managed-by = keyrotd`.
    fn note_marking(&self, path: &str, custom: Option<HashMap<String, String>>) {
        let marked = custom
            .as_ref()
            .and_then(|c| c.get(MANAGED_BY_KEY))
            .is_some_and(|v| v == MANAGED_BY);
        let mut unmarked = self.unmarked.lock().unwrap_or_else(|e| e.into_inner());
        if marked {
            unmarked.remove(path);
        } else {
            unmarked.insert(path.to_string(), custom);
        }
    }

    /// The data map of one version; `None` when that version is deleted.
    async fn read_data(&self, path: &str, version: u64) -> StoreResult<Option<serde_json::Value>> {
        let (mount, p) = (self.mount.clone(), path.to_string());
        let r = self
            .call(&format!("read {path:?} version {version}"), move |c| {
                let (mount, p) = (mount.clone(), p.clone());
                async move { kv2::read_version::<serde_json::Value>(&*c, &mount, &p, version).await }
            })
            .await;
        match r {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind == StoreErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Check-and-set write of `data`; returns the new version. When a retried attempt
    /// meets a cas mismatch, an earlier attempt may have landed before its response was
    /// lost: if the version after `cas` holds exactly `data`, that is our write.
    async fn write_cas(&self, path: &str, data: &serde_json::Value, cas: u64) -> StoreResult<u64> {
        let cas32 = u32::try_from(cas).map_err(|_| {
            self.err(
                StoreErrorKind::InvalidData,
                format!("{path:?}: version {cas} is out of range"),
            )
        })?;
        let attempts = AtomicU32::new(0);
        let (attempts, this) = (&attempts, self);
        let what = format!("write {path:?} (cas {cas})");
        let (mount, p, body) = (self.mount.clone(), path.to_string(), data.clone());
        let write = move |c: Arc<VaultClient>| {
            let (mount, p, body) = (mount.clone(), p.clone(), body.clone());
            async move {
                kv2::set_with_options(
                    &*c,
                    &mount,
                    &p,
                    &body,
                    SetSecretRequestOptions { cas: cas32 },
                )
                .await
            }
        };
        let write = &write;
        let what = &what;
        retry_temporary(self.max_retries, move || async move {
            let n = attempts.fetch_add(1, Ordering::Relaxed);
            match this.call_once(what, write).await {
                Ok(m) => Ok(m.version),
                Err(e) if e.kind == StoreErrorKind::Conflict && n > 0 => {
                    match this.read_data(path, cas + 1).await {
                        Ok(Some(stored)) if &stored == data => Ok(cas + 1),
                        _ => Err(e),
                    }
                }
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// Adds `managed-by = keyrotd` to the secret's custom metadata, keeping other entries
    /// (read first when the data read did not show them). Best effort: the data is
    /// already written, so a refusal is only logged.
    async fn mark_managed(&self, path: &str, custom: Option<HashMap<String, String>>) {
        let custom = match custom {
            Some(c) => Ok(c),
            None => self.read_via_metadata(path).await.map(|(_, _, c)| c),
        };
        let r = match custom {
            Ok(mut custom) => {
                custom.insert(MANAGED_BY_KEY.to_string(), MANAGED_BY.to_string());
                let (mount, p) = (self.mount.clone(), path.to_string());
                self.call(&format!("write metadata of {path:?}"), move |c| {
                    let (mount, p, custom) = (mount.clone(), p.clone(), custom.clone());
                    async move {
                        let mut req = SetSecretMetadataRequest::builder();
                        req.custom_metadata(custom);
                        kv2::set_metadata(&*c, &mount, &p, Some(&mut req)).await
                    }
                })
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            tracing::warn!(event = "vault.metadata_failed", store = %self.name, path, error = %e);
        }
    }
}

/// Builds a vaultrs client with `token` (empty for logins). Settings are explicit so
/// VAULT_* environment variables of the process do not leak in.
fn build_client(store: &str, s: &Settings, token: &SecretString) -> StoreResult<VaultClient> {
    let mut b = VaultClientSettingsBuilder::default();
    b.address(&s.address)
        .token(token.expose_secret())
        .namespace(s.namespace.clone())
        .ca_certs(s.ca_cert.iter().cloned().collect())
        .identity(None)
        .verify(true)
        .timeout(Some(s.timeout));
    let settings = b.build().map_err(|e| {
        StoreError::new(
            store,
            StoreErrorKind::InvalidConfig,
            format!("Vault client settings: {e}"),
        )
    })?;
    VaultClient::new(settings).map_err(|e| match e {
        ClientError::FileReadError { path, source } => StoreError::new(
            store,
            StoreErrorKind::InvalidConfig,
            format!("cannot read ca_cert {path}: {source}"),
        ),
        ClientError::ParseCertificateError { path, .. } => StoreError::new(
            store,
            StoreErrorKind::InvalidConfig,
            format!("ca_cert {path} is not a PEM certificate bundle"),
        ),
        other => StoreError::new(
            store,
            StoreErrorKind::InvalidConfig,
            format!("Vault client: {other}"),
        ),
    })
}

/// Vault answers bad login credentials with 400 ("invalid role or secret ID"): for a
/// login, any non-temporary refusal is a permission problem.
fn login_refused(mut e: StoreError) -> StoreError {
    if e.kind == StoreErrorKind::Other {
        e.kind = StoreErrorKind::PermissionDenied;
    }
    e
}

/// Whether `s` can be sent as an HTTP header value (vaultrs panics otherwise).
fn header_safe(s: &str) -> bool {
    s.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// `POST sys/capabilities-self`: the token's capabilities on each path (not in vaultrs).
struct CapabilitiesSelf {
    paths: Vec<String>,
}

impl rustify::endpoint::Endpoint for CapabilitiesSelf {
    type Response = HashMap<String, serde_json::Value>;
    const REQUEST_BODY_TYPE: rustify::enums::RequestType = rustify::enums::RequestType::JSON;
    const RESPONSE_BODY_TYPE: rustify::enums::ResponseType = rustify::enums::ResponseType::JSON;

    fn path(&self) -> String {
        "sys/capabilities-self".into()
    }

    fn method(&self) -> rustify::enums::RequestMethod {
        rustify::enums::RequestMethod::POST
    }

    fn body(&self) -> Result<Option<Vec<u8>>, rustify::errors::ClientError> {
        serde_json::to_vec(&serde_json::json!({ "paths": self.paths }))
            .map(Some)
            .map_err(|e| rustify::errors::ClientError::DataParseError { source: e.into() })
    }
}

#[async_trait]
impl SecretStore for VaultStore {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "vault"
    }

    async fn read(&self, path: &str) -> StoreResult<SlotState> {
        let (version, data, custom) = self.read_raw(path).await?;
        self.note_marking(path, custom);
        let Some(data) = data else {
            return Ok(SlotState {
                version,
                ..SlotState::default()
            });
        };
        let doc = parse_document(data).map_err(|why| self.not_ours(path, &version, why))?;
        Ok(doc.into_state(version))
    }

    async fn read_consumer(&self, path: &str) -> StoreResult<ConsumerDoc> {
        let (version, data, custom) = self.read_raw(path).await?;
        self.note_marking(path, custom);
        let Some(data) = data else {
            return Ok(ConsumerDoc {
                version,
                ..ConsumerDoc::default()
            });
        };
        parse_consumer(data, version.clone()).map_err(|why| self.not_ours(path, &version, why))
    }

    /// One `cas` write of the six fields (a new KV version consumers see); `None`
    /// deletes the secret's metadata and every version (no `cas` exists for that:
    /// the version is compared first).
    async fn write_consumer(
        &self,
        path: &str,
        record: Option<&SecretRecord>,
        expected: &Version,
    ) -> StoreResult<Version> {
        check_path(&self.name, path)?;
        let cas = self.cas_of(path, expected)?;
        let Some(record) = record else {
            if expected.is_absent() {
                return Ok(Version::absent());
            }
            let (found, _, _) = self.read_raw(path).await?;
            if &found != expected {
                return Err(self.err(
                    StoreErrorKind::Conflict,
                    format!(
                        "{}/{path} changed since it was read (expected version {}, found {})",
                        self.mount,
                        version_label(expected),
                        version_label(&found)
                    ),
                ));
            }
            let (mount, p) = (self.mount.clone(), path.to_string());
            self.call(&format!("delete {path:?}"), move |c| {
                let (mount, p) = (mount.clone(), p.clone());
                async move { kv2::delete_metadata(&*c, &mount, &p).await }
            })
            .await?;
            return Ok(Version::absent());
        };
        let data = serde_json::to_value(record).map_err(|e| {
            self.err(
                StoreErrorKind::Other,
                format!("cannot encode {path:?}: {}", json_error_summary(&e)),
            )
        })?;
        let written = self.write_cas(path, &data, cas).await?;
        self.mark_after_write(path, cas).await;
        Ok(Version(written.to_string()))
    }

    async fn apply(
        &self,
        path: &str,
        expected: &Version,
        t: &Transition,
    ) -> StoreResult<SlotState> {
        let state = self.read(path).await?;
        if &state.version != expected {
            return Err(self.err(
                StoreErrorKind::Conflict,
                format!(
                    "{}/{path} changed since it was read (expected version {}, found {})",
                    self.mount,
                    version_label(expected),
                    version_label(&state.version)
                ),
            ));
        }
        self.apply_to(path, &state, t).await
    }

    /// No re-read: the write's `cas` = `current.version` fails if anything was written
    /// since, which is the check `apply`'s read makes, done by Vault atomically.
    async fn apply_to(
        &self,
        path: &str,
        current: &SlotState,
        t: &Transition,
    ) -> StoreResult<SlotState> {
        check_path(&self.name, path)?;
        let mut next = current.apply(t).map_err(|e| {
            self.err(
                StoreErrorKind::Conflict,
                format!("{}/{path}: {e}", self.mount),
            )
        })?;
        let cas = self.cas_of(path, &current.version)?;
        let data = serde_json::to_value(Document::from_state(&next)).map_err(|e| {
            self.err(
                StoreErrorKind::Other,
                format!("cannot encode {path:?}: {}", json_error_summary(&e)),
            )
        })?;
        let written = self.write_cas(path, &data, cas).await?;
        next.version = Version(written.to_string());
        self.mark_after_write(path, cas).await;
        Ok(next)
    }

    async fn health(&self) -> StoreResult<()> {
        self.call(
            "look up the token (auth/token/lookup-self)",
            |c| async move { token::lookup_self(&*c).await.map(|_| ()) },
        )
        .await
    }

    async fn probe_write(&self, path: &str) -> StoreResult<()> {
        check_path(&self.name, path)?;
        let data = format!("{}/data/{path}", self.mount);
        let meta = format!("{}/metadata/{path}", self.mount);
        let paths = vec![data.clone(), meta.clone()];
        let caps = self
            .call("check capabilities (sys/capabilities-self)", move |c| {
                let paths = paths.clone();
                async move { vaultrs::api::exec_with_result(&*c, CapabilitiesSelf { paths }).await }
            })
            .await?;
        let has = |p: &str, cap: &str| {
            caps.get(p).and_then(|v| v.as_array()).is_some_and(|a| {
                a.iter()
                    .filter_map(|c| c.as_str())
                    .any(|c| c == cap || c == "root")
            })
        };
        let mut missing = Vec::new();
        for cap in ["create", "update", "read"] {
            if !has(&data, cap) {
                missing.push(format!("{cap} on {data}"));
            }
        }
        if !has(&meta, "read") {
            missing.push(format!("read on {meta}"));
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(self.err(
                StoreErrorKind::PermissionDenied,
                format!("the token lacks {}", missing.join(", ")),
            ))
        }
    }
}

/// A version for messages.
fn version_label(v: &Version) -> &str {
    if v.is_absent() {
        "absent"
    } else {
        &v.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_refreshes_after_two_thirds() {
        let mut l = Lease {
            obtained: Instant::now(),
            ttl: Some(Duration::from_secs(3)),
            renewable: true,
            creation_ttl: Some(Duration::from_secs(3)),
        };
        assert!(!l.needs_refresh());
        l.obtained -= Duration::from_millis(2100);
        assert!(l.needs_refresh());
        l.ttl = None;
        assert!(!l.needs_refresh());
    }

    #[test]
    fn header_safety() {
        assert!(header_safe("hvs.CAES-abc_def"));
        assert!(!header_safe("tok\nen"));
    }
}
