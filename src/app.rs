//! Wiring: from a validated [`Config`] to a ready [`Engine`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::{AdminKeySource, Config, ConfigError};
use crate::metrics::Metrics;
use crate::openai::{ApiError, ApiStats, Client, ClientConfig};
use crate::rotation::{default_instance_id, Engine, Settings, SystemClock};
use crate::store::{
    self, DynStore, SecretStore, SlotState, StoreError, StoreResult, Transition, Version,
};

/// Why the engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("admin key: {0}")]
    AdminKey(#[from] crate::rotation::admin_key::AdminKeyError),
}

impl BuildError {
    /// Whether the configuration itself is wrong (exit 2; retrying cannot help), as
    /// opposed to a store or the API failing now (exit 1; the next attempt may work).
    pub fn is_invalid_config(&self) -> bool {
        use crate::rotation::admin_key::AdminKeyError;
        match self {
            BuildError::Config(_) => true,
            // Only building the client fails here: a base URL that does not parse.
            BuildError::Api(_) => true,
            BuildError::AdminKey(AdminKeyError::Store(e)) => {
                e.kind == crate::store::StoreErrorKind::InvalidConfig
            }
            BuildError::AdminKey(_) => false,
        }
    }
}

/// What outlives one engine in a daemon: the counters `/metrics` serves, the
/// shutdown signal in-flight work watches, and what the engines remember between
/// cycles. A reload or a reconnect builds a new
/// engine on the same [`Shared`].
#[derive(Debug, Clone, Default)]
pub struct Shared {
    pub metrics: Arc<Metrics>,
    pub api: Arc<ApiStats>,
    pub shutdown: CancellationToken,
    pub memory: Arc<crate::rotation::Memory>,
}

/// The Admin API client settings a config describes.
pub fn client_config(cfg: &Config) -> ClientConfig {
    ClientConfig {
        base_url: cfg.openai.base_url.clone(),
        request_timeout: cfg.openai.request_timeout,
        max_retries: cfg.openai.max_retries,
        max_retry_after: cfg.openai.max_retry_after,
        backoff_base: Duration::from_millis(500),
        max_pages: cfg.openai.max_pages,
        max_response_bytes: cfg.openai.max_response_bytes.0,
    }
}

/// A store whose construction failed (login refused, bad CA file, ...): every call
/// returns that error, so the slots using it fail and the others carry on (I6).
#[derive(Debug)]
pub struct BrokenStore {
    name: String,
    kind: &'static str,
    error: StoreError,
}

impl BrokenStore {
    /// A store named `name`, of backend `kind`, whose every call fails with `error`.
    pub fn new(name: &str, kind: &'static str, error: StoreError) -> Self {
        BrokenStore {
            name: name.to_string(),
            kind,
            error,
        }
    }
}

#[async_trait]
impl SecretStore for BrokenStore {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        self.kind
    }
    async fn read(&self, _path: &str) -> StoreResult<SlotState> {
        Err(self.error.clone())
    }
    async fn apply(&self, _: &str, _: &Version, _: &Transition) -> StoreResult<SlotState> {
        Err(self.error.clone())
    }
    async fn read_consumer(&self, _path: &str) -> StoreResult<crate::store::ConsumerDoc> {
        Err(self.error.clone())
    }
    async fn write_consumer(
        &self,
        _: &str,
        _: Option<&crate::store::SecretRecord>,
        _: &Version,
    ) -> StoreResult<Version> {
        Err(self.error.clone())
    }
    async fn health(&self) -> StoreResult<()> {
        Err(self.error.clone())
    }
    async fn probe_write(&self, _path: &str) -> StoreResult<()> {
        Err(self.error.clone())
    }
}

/// Connects every configured store; failures become [`BrokenStore`]s (and are logged).
pub async fn build_stores(cfg: &Config) -> BTreeMap<String, DynStore> {
    connect_stores(cfg).await.0
}

/// Connects every configured store, and names the ones that failed (they are
/// [`BrokenStore`]s in the map, retried when the daemon next rebuilds its engine).
async fn connect_stores(cfg: &Config) -> (BTreeMap<String, DynStore>, Vec<String>) {
    let mut out = BTreeMap::new();
    let mut broken = Vec::new();
    for (name, sc) in &cfg.stores {
        let s: DynStore = match store::build(name, sc).await {
            Ok(s) => s,
            Err(error) => {
                warn!(event = "store.unavailable", store = %name, error = %error, "store could not be initialised; slots using it will fail until it is reached");
                broken.push(name.clone());
                Arc::new(BrokenStore {
                    name: name.clone(),
                    kind: sc.kind(),
                    error,
                })
            }
        };
        out.insert(name.clone(), s);
    }
    (out, broken)
}

/// The admin key to start with: from its environment variable or file, or, with
/// `openai.admin_key_store`, from that store's record (the seed while it holds none).
pub async fn admin_key(
    cfg: &Config,
    stores: &BTreeMap<String, DynStore>,
) -> Result<SecretString, BuildError> {
    match cfg.admin_key_source()? {
        AdminKeySource::Store { store, path, .. } => {
            let s = stores.get(&store).ok_or_else(|| ConfigError::Invalid {
                key: "openai.admin_key_store".into(),
                message: format!("unknown store {store:?}"),
            })?;
            let seed = cfg.admin_key_seed()?;
            Ok(crate::rotation::admin_key::initial_key(s.as_ref(), &path, seed).await?)
        }
        _ => Ok(cfg.admin_key()?),
    }
}

/// Builds the engine: connects stores, reads the admin key.
pub async fn build_engine(cfg: &Config, dry_run: bool) -> Result<Engine, BuildError> {
    build_engine_in(cfg, dry_run, &Shared::default()).await
}

/// [`build_engine`] counting into, and stopping on, `shared`.
pub async fn build_engine_in(
    cfg: &Config,
    dry_run: bool,
    shared: &Shared,
) -> Result<Engine, BuildError> {
    // A key from the environment or a file is read before connecting anything.
    let direct = match cfg.admin_key_source()? {
        AdminKeySource::Store { .. } => None,
        _ => Some(cfg.admin_key()?),
    };
    let (stores, unavailable) = connect_stores(cfg).await;
    let admin_key = match direct {
        Some(key) => key,
        None => admin_key(cfg, &stores).await?,
    };
    let client = Client::new(client_config(cfg), admin_key)?.with_stats(shared.api.clone());
    let admin_key_file = match cfg.admin_key_source()? {
        AdminKeySource::File(path) => Some(path),
        _ => None,
    };
    Ok(Engine {
        client,
        stores,
        unavailable,
        rules: cfg.rules(),
        policy: cfg.policy.clone(),
        usage: cfg.usage.clone(),
        settings: Settings {
            concurrency: cfg.daemon.concurrency,
            include_archived: cfg.openai.include_archived,
            instance_id: cfg
                .daemon
                .instance_id
                .clone()
                .unwrap_or_else(default_instance_id),
            dry_run,
            verify_backoff: Duration::from_millis(500),
            scan_timeout: cfg.openai.scan_timeout,
            admin_key: cfg.admin_key_store(),
            admin_key_file,
        },
        clock: Arc::new(SystemClock),
        metrics: shared.metrics.clone(),
        notifier: crate::notify::Notifier::from_config(&cfg.notify)?,
        shutdown: shared.shutdown.clone(),
        memory: shared.memory.clone(),
    })
}
