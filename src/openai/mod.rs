//! OpenAI Admin API client: the endpoints keyrotd uses, pagination, retries.
//!
//! Knows nothing of stores. Every request is counted by endpoint and status in
//! [`ApiStats`] (for metrics and the benchmarks).

pub mod models;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;

use self::models::*;

/// An Admin API failure. Carries the HTTP status and the API's own `error.message`;
/// never a key value.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// 401: the admin key is wrong, revoked or expired.
    #[error("admin key rejected (HTTP 401) on {endpoint}: {message}")]
    Unauthorized { endpoint: String, message: String },
    /// 403: not an admin key, or missing permission.
    #[error("not an admin key or missing permission (HTTP 403) on {endpoint}: {message}")]
    Forbidden { endpoint: String, message: String },
    #[error("not found (HTTP 404) on {endpoint}: {message}")]
    NotFound { endpoint: String, message: String },
    /// Any other non-success status, after retries where retryable.
    #[error("HTTP {status} on {endpoint}: {message}")]
    Status { endpoint: String, status: u16, message: String, code: Option<String> },
    /// Timeout, connection refused, DNS, TLS ... after retries.
    #[error("network error on {endpoint}: {message}")]
    Network { endpoint: String, message: String },
    /// The response was not the JSON the spec describes.
    #[error("malformed response from {endpoint} (HTTP {status}): {message}")]
    Decode { endpoint: String, status: u16, message: String },
}

impl ApiError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Unauthorized { .. } => Some(401),
            ApiError::Forbidden { .. } => Some(403),
            ApiError::NotFound { .. } => Some(404),
            ApiError::Status { status, .. } | ApiError::Decode { status, .. } => Some(*status),
            ApiError::Network { .. } => None,
        }
    }
    /// Worth retrying in a later cycle (429, 5xx, network).
    pub fn is_temporary(&self) -> bool {
        match self {
            ApiError::Status { status, .. } => *status == 429 || *status >= 500,
            ApiError::Network { .. } => true,
            _ => false,
        }
    }
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;

/// Client settings (from `[openai]`).
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub base_url: String,
    pub request_timeout: Duration,
    pub max_retries: u32,
    /// Cap on honoured `retry-after` / `retry-after-ms`.
    pub max_retry_after: Duration,
    /// First backoff step for 5xx/network retries (doubles, with jitter).
    pub backoff_base: Duration,
}

/// Which endpoint a request hit, for metrics (`keyrotd_api_requests_total{endpoint}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    ListProjects,
    GetProject,
    ListApiKeys,
    GetApiKey,
    DeleteApiKey,
    ListServiceAccounts,
    CreateServiceAccount,
    DeleteServiceAccount,
    CreateServiceAccountKey,
    ListModels,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ListProjects => "list_projects",
            Endpoint::GetProject => "get_project",
            Endpoint::ListApiKeys => "list_api_keys",
            Endpoint::GetApiKey => "get_api_key",
            Endpoint::DeleteApiKey => "delete_api_key",
            Endpoint::ListServiceAccounts => "list_service_accounts",
            Endpoint::CreateServiceAccount => "create_service_account",
            Endpoint::DeleteServiceAccount => "delete_service_account",
            Endpoint::CreateServiceAccountKey => "create_service_account_key",
            Endpoint::ListModels => "list_models",
        }
    }
}

/// Request counters, shared by clones of a [`Client`].
#[derive(Debug, Default)]
pub struct ApiStats {
    // implementation detail of the client module
}

impl ApiStats {
    /// (endpoint, status or 0 for network errors, count), sorted.
    pub fn snapshot(&self) -> Vec<(Endpoint, u16, u64)> {
        todo!()
    }
    /// Total requests sent (including retries).
    pub fn total(&self) -> u64 {
        todo!()
    }
}

/// The Admin API client. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    _stats: Arc<ApiStats>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("admin_key", &"[REDACTED]").finish_non_exhaustive()
    }
}

impl Client {
    pub fn new(_cfg: ClientConfig, _admin_key: SecretString) -> ApiResult<Client> {
        todo!()
    }
    pub fn stats(&self) -> &Arc<ApiStats> {
        &self._stats
    }
    /// Every project (all pages); archived ones only when asked.
    pub async fn list_projects(&self, _include_archived: bool) -> ApiResult<Vec<Project>> {
        todo!()
    }
    pub async fn get_project(&self, _project_id: &str) -> ApiResult<Project> {
        todo!()
    }
    /// Every key of a project (all pages), with `owner_project_access=any`.
    pub async fn list_api_keys(&self, _project_id: &str) -> ApiResult<Vec<ProjectApiKey>> {
        todo!()
    }
    pub async fn get_api_key(&self, _project_id: &str, _key_id: &str) -> ApiResult<ProjectApiKey> {
        todo!()
    }
    /// DELETE a project key. 404 is returned as `ApiError::NotFound`; callers treat it as done.
    pub async fn delete_api_key(&self, _project_id: &str, _key_id: &str) -> ApiResult<Deleted> {
        todo!()
    }
    pub async fn list_service_accounts(&self, _project_id: &str) -> ApiResult<Vec<ServiceAccount>> {
        todo!()
    }
    /// Never retried automatically on an ambiguous failure (no idempotency key).
    pub async fn create_service_account(
        &self,
        _project_id: &str,
        _name: &str,
    ) -> ApiResult<CreatedServiceAccount> {
        todo!()
    }
    pub async fn delete_service_account(&self, _project_id: &str, _sa_id: &str) -> ApiResult<Deleted> {
        todo!()
    }
    /// Never retried automatically on an ambiguous failure (no idempotency key).
    pub async fn create_service_account_key(
        &self,
        _project_id: &str,
        _sa_id: &str,
        _req: &CreateKeyRequest,
    ) -> ApiResult<CreatedKey> {
        todo!()
    }
    /// `GET /models` with a project key: Ok(()) when the key works.
    pub async fn verify_key(&self, _key: &SecretString) -> ApiResult<()> {
        todo!()
    }
}
