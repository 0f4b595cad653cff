//! OpenAI Admin API client: the endpoints keyrotd uses, pagination, retries.
//!
//! Knows nothing of stores. Every request is counted by endpoint and status in
//! [`ApiStats`] (for metrics and the benchmarks).

pub mod models;
mod retry;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use reqwest::{Method, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::Serialize;

use self::models::*;
use self::retry::Retry;

/// An Admin API failure. Carries the HTTP status and the API's own `error.message`;
/// never a key value.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// 401: the admin key is wrong, revoked or expired (on `list_models`: the project
    /// key being verified was rejected).
    #[error("{} rejected (HTTP 401) on {endpoint}: {message}", rejected_key(.endpoint))]
    Unauthorized { endpoint: String, message: String },
    /// 403: not an admin key, or missing permission.
    #[error("not an admin key or missing permission (HTTP 403) on {endpoint}: {message}")]
    Forbidden { endpoint: String, message: String },
    /// 404: the project, key or service account does not exist (any more).
    #[error("not found (HTTP 404) on {endpoint}: {message}")]
    NotFound { endpoint: String, message: String },
    /// Any other non-success status, after retries where retryable.
    #[error("HTTP {status} on {endpoint}: {message}")]
    Status {
        endpoint: String,
        status: u16,
        message: String,
        code: Option<String>,
    },
    /// Timeout, connection refused, DNS, TLS ... after retries.
    #[error("network error on {endpoint}: {message}")]
    Network { endpoint: String, message: String },
    /// The response was not the JSON the spec describes.
    #[error("malformed response from {endpoint} (HTTP {status}): {message}")]
    Decode {
        endpoint: String,
        status: u16,
        message: String,
    },
    /// A listing's `has_more` cursor came back to one it had already followed (a loop of
    /// any length): following it would never end.
    #[error(
        "pagination loop on {endpoint}: page {pages} returned the same cursor as page \
         {first_seen}; the listing would never end, stopped"
    )]
    CursorLoop {
        endpoint: String,
        /// Pages read, the one that repeated included.
        pages: u32,
        /// The page that first returned the repeated cursor.
        first_seen: u32,
    },
    /// A listing still had more after `openai.max_pages` pages.
    #[error(
        "{endpoint} still had more after {pages} pages (openai.max_pages); the listing was \
         stopped"
    )]
    TooManyPages { endpoint: String, pages: u32 },
    /// A response body larger than `openai.max_response_bytes`; reading stopped at the cap.
    #[error(
        "response from {endpoint} (HTTP {status}) is larger than {limit} bytes \
         (openai.max_response_bytes); not read further"
    )]
    ResponseTooLarge {
        endpoint: String,
        status: u16,
        limit: u64,
    },
    /// A scan of the organization outlasted `openai.scan_timeout`; `progress` says what
    /// it had requested by then (requests per endpoint).
    #[error(
        "the scan of the organization did not finish within {} (openai.scan_timeout); \
         requests so far: {progress}",
        humantime::format_duration(*.timeout)
    )]
    ScanTimeout { timeout: Duration, progress: String },
    /// The scan was abandoned because shutdown was requested.
    #[error("the scan of the organization was stopped: shutdown requested")]
    Cancelled,
}

/// The API's default buckets per page of `q` on `endpoint` when it sends no `limit`:
/// 7 daily buckets (usage and costs), 24 hourly, 60 one-minute ones.
fn default_buckets(endpoint: Endpoint, q: &UsageQuery) -> u32 {
    match (endpoint, q.bucket_width.as_deref()) {
        (Endpoint::UsageCompletions, Some("1h")) => 24,
        (Endpoint::UsageCompletions, Some("1m")) => 60,
        _ => 7,
    }
}

/// Which key a 401 on `endpoint` refers to.
fn rejected_key(endpoint: &str) -> &'static str {
    if endpoint == Endpoint::ListModels.as_str() {
        "project key"
    } else {
        "admin key"
    }
}

impl ApiError {
    /// The HTTP status behind the error; `None` for network failures and for errors of
    /// a whole listing or scan (pagination, deadline, shutdown).
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Unauthorized { .. } => Some(401),
            ApiError::Forbidden { .. } => Some(403),
            ApiError::NotFound { .. } => Some(404),
            ApiError::Status { status, .. }
            | ApiError::Decode { status, .. }
            | ApiError::ResponseTooLarge { status, .. } => Some(*status),
            ApiError::Network { .. }
            | ApiError::CursorLoop { .. }
            | ApiError::TooManyPages { .. }
            | ApiError::ScanTimeout { .. }
            | ApiError::Cancelled => None,
        }
    }
    /// Worth retrying in a later cycle (429, 5xx, network, a scan that ran out of time).
    pub fn is_temporary(&self) -> bool {
        match self {
            ApiError::Status { status, .. } => *status == 429 || *status >= 500,
            ApiError::Network { .. } | ApiError::ScanTimeout { .. } => true,
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
    /// Most pages one listing may take (`openai.max_pages`); a listing with more is
    /// [`ApiError::TooManyPages`].
    pub max_pages: u32,
    /// Largest response body read (`openai.max_response_bytes`); a larger one is
    /// [`ApiError::ResponseTooLarge`], and no more of it than the cap is buffered.
    pub max_response_bytes: u64,
}

/// Default `openai.max_pages`: 1000 pages of 100, i.e. 100,000 projects (or keys of one
/// project, or service accounts of one project).
pub const DEFAULT_MAX_PAGES: u32 = 1000;

/// Default `openai.max_response_bytes`: 8 MiB. A full page of 100 objects is a few
/// tens of KB.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 8 << 20;

/// Which endpoint a request hit, for metrics (`keyrotd_api_requests_total{endpoint}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    ListProjects,
    GetProject,
    ListApiKeys,
    GetApiKey,
    DeleteApiKey,
    UpdateApiKey,
    ListServiceAccounts,
    CreateServiceAccount,
    DeleteServiceAccount,
    CreateServiceAccountKey,
    ListModels,
    UsageCompletions,
    Costs,
    ListAuditLogs,
    ListAdminApiKeys,
    GetAdminApiKey,
    CreateAdminApiKey,
    DeleteAdminApiKey,
}

impl Endpoint {
    /// The metric label (`keyrotd_api_requests_total{endpoint}`).
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ListProjects => "list_projects",
            Endpoint::GetProject => "get_project",
            Endpoint::ListApiKeys => "list_api_keys",
            Endpoint::GetApiKey => "get_api_key",
            Endpoint::DeleteApiKey => "delete_api_key",
            Endpoint::UpdateApiKey => "update_api_key",
            Endpoint::ListServiceAccounts => "list_service_accounts",
            Endpoint::CreateServiceAccount => "create_service_account",
            Endpoint::DeleteServiceAccount => "delete_service_account",
            Endpoint::CreateServiceAccountKey => "create_service_account_key",
            Endpoint::ListModels => "list_models",
            Endpoint::UsageCompletions => "usage_completions",
            Endpoint::Costs => "costs",
            Endpoint::ListAuditLogs => "list_audit_logs",
            Endpoint::ListAdminApiKeys => "list_admin_api_keys",
            Endpoint::GetAdminApiKey => "get_admin_api_key",
            Endpoint::CreateAdminApiKey => "create_admin_api_key",
            Endpoint::DeleteAdminApiKey => "delete_admin_api_key",
        }
    }
}

/// Request counters, shared by clones of a [`Client`].
///
/// One count per HTTP exchange, retries included, keyed by endpoint and status
/// (0 when no complete response arrived: timeout, refused connection, cut body).
#[derive(Debug, Default)]
pub struct ApiStats {
    counts: Mutex<BTreeMap<(Endpoint, u16), u64>>,
    total: AtomicU64,
}

impl ApiStats {
    /// (endpoint, status or 0 for network errors, count), sorted.
    pub fn snapshot(&self) -> Vec<(Endpoint, u16, u64)> {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.iter().map(|(&(e, s), &n)| (e, s, n)).collect()
    }
    /// Total requests sent (including retries).
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
    fn record(&self, endpoint: Endpoint, status: u16) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        *counts.entry((endpoint, status)).or_insert(0) += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
    }
}

/// The Admin API client. Cheap to clone.
///
/// Every call retries by itself where that is safe (see [`ClientConfig`]): 429s after
/// the server's `retry-after`, 5xx and network failures with jittered exponential
/// backoff. Creates are only retried when the server certainly did not act.
///
/// Clones share the admin key: [`Client::set_admin_key`] (after a rotation of the admin
/// key itself) switches every clone at once; requests already sent keep the old one.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    cfg: ClientConfig,
    admin_key: Arc<RwLock<SecretString>>,
    stats: Arc<ApiStats>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.base.as_str())
            .field("admin_key", &"[REDACTED]")
            .finish_non_exhaustive()
    }
}

/// The body of a failed exchange, turned into an [`ApiError`] once retries are over.
enum Failure {
    Status {
        status: StatusCode,
        headers: reqwest::header::HeaderMap,
        body: Vec<u8>,
    },
    /// No complete response; `before_send` when the connection was never established.
    Network {
        error: reqwest::Error,
        before_send: bool,
    },
}

/// Why [`Client::exchange`] returned no body.
enum ExchangeError {
    /// No complete response; `before_send` when the connection was never established.
    Network {
        error: reqwest::Error,
        before_send: bool,
    },
    /// The body is larger than `max_response_bytes` (announced or read so far).
    TooLarge { status: StatusCode },
}

/// Items of one page, plus what is needed to ask for the next one.
struct Page<T> {
    data: Vec<T>,
    next: Option<String>,
}

/// The cursors one listing has followed. Refuses a cursor it has followed before (a
/// loop of any length: `A, A` as well as `A, B, A`) and a listing longer than
/// `max_pages`, so a server that keeps answering `has_more` cannot keep a scan going.
/// Holds one entry per page, at most `max_pages`.
#[derive(Debug)]
struct Cursors {
    endpoint: Endpoint,
    max_pages: u32,
    pages: u32,
    /// Each cursor followed, and the page that returned it.
    seen: std::collections::HashMap<String, u32>,
}

impl Cursors {
    fn new(endpoint: Endpoint, max_pages: u32) -> Cursors {
        Cursors {
            endpoint,
            max_pages: max_pages.max(1),
            pages: 0,
            seen: std::collections::HashMap::new(),
        }
    }

    /// Counts one more page, whose next cursor is `next` (`None` on the last page), and
    /// returns the cursor to follow, or why it must not be followed.
    fn advance(&mut self, next: Option<String>) -> ApiResult<Option<String>> {
        self.pages += 1;
        let Some(next) = next else {
            return Ok(None);
        };
        if let Some(&first_seen) = self.seen.get(&next) {
            return Err(ApiError::CursorLoop {
                endpoint: self.endpoint.as_str().into(),
                pages: self.pages,
                first_seen,
            });
        }
        if self.pages >= self.max_pages {
            return Err(ApiError::TooManyPages {
                endpoint: self.endpoint.as_str().into(),
                pages: self.pages,
            });
        }
        self.seen.insert(next.clone(), self.pages);
        Ok(Some(next))
    }
}

/// A listing read one page at a time ([`Client::project_pages`]), with the bounds of
/// every listing: no cursor followed twice, at most `openai.max_pages` pages.
pub struct Pages<'c, T> {
    client: &'c Client,
    endpoint: Endpoint,
    path: Vec<String>,
    extra: Vec<(&'static str, &'static str)>,
    id_of: fn(&T) -> String,
    after: Option<String>,
    cursors: Cursors,
    done: bool,
}

impl<T: DeserializeOwned> Pages<'_, T> {
    /// The next page's items; `None` after the last page.
    pub async fn next_page(&mut self) -> ApiResult<Option<Vec<T>>> {
        if self.done {
            return Ok(None);
        }
        let path: Vec<&str> = self.path.iter().map(String::as_str).collect();
        let page = self
            .client
            .list_page(
                self.endpoint,
                &path,
                &self.extra,
                self.after.as_deref(),
                self.id_of,
            )
            .await?;
        match self.cursors.advance(page.next) {
            Ok(next) => {
                self.done = next.is_none();
                self.after = next;
                Ok(Some(page.data))
            }
            Err(e) => {
                self.done = true;
                Err(e)
            }
        }
    }
}

impl Client {
    /// Builds a client with its own connection pool; `request_timeout` bounds each
    /// HTTP exchange (not the retries around it).
    pub fn new(cfg: ClientConfig, admin_key: SecretString) -> ApiResult<Client> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("keyrotd/", env!("CARGO_PKG_VERSION")))
            .timeout(cfg.request_timeout)
            .connect_timeout(cfg.request_timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|e| ApiError::Network {
                endpoint: "client".into(),
                message: format!("cannot build the HTTP client: {e}"),
            })?;
        Client::with_http(cfg, admin_key, http)
    }

    /// Like [`Client::new`] but on a caller-supplied `reqwest::Client` (shared pool,
    /// custom TLS roots, proxies). `request_timeout` still bounds each exchange.
    pub fn with_http(
        cfg: ClientConfig,
        admin_key: SecretString,
        http: reqwest::Client,
    ) -> ApiResult<Client> {
        let base = parse_base_url(&cfg.base_url)?;
        Ok(Client {
            http,
            base,
            cfg,
            admin_key: Arc::new(RwLock::new(admin_key)),
            stats: Arc::new(ApiStats::default()),
        })
    }

    /// The request counters of this client and its clones.
    pub fn stats(&self) -> &Arc<ApiStats> {
        &self.stats
    }

    /// This client counting its requests into `stats` (a daemon keeps one set of
    /// counters across the engines a reload or a reconnect builds).
    pub fn with_stats(mut self, stats: Arc<ApiStats>) -> Client {
        self.stats = stats;
        self
    }

    /// Replaces the admin key of this client and all its clones, for every request
    /// sent from now on.
    pub fn set_admin_key(&self, key: SecretString) {
        *self.admin_key.write().unwrap_or_else(|p| p.into_inner()) = key;
    }

    /// Whether `key` is the admin key requests are sent with now (compared without
    /// exposing either value outside this call).
    pub fn uses_admin_key(&self, key: &SecretString) -> bool {
        self.admin_key
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .expose_secret()
            == key.expose_secret()
    }

    /// The admin key requests are sent with now.
    pub fn admin_key(&self) -> SecretString {
        self.admin_key
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every project (all pages); archived ones only when asked.
    pub async fn list_projects(&self, include_archived: bool) -> ApiResult<Vec<Project>> {
        collect(self.project_pages(include_archived)).await
    }

    /// The projects a page (`limit = 100`) at a time: lets a scan start on the first
    /// projects while the next page is still being fetched; [`Client::list_projects`]
    /// reads them all.
    pub fn project_pages(&self, include_archived: bool) -> Pages<'_, Project> {
        let mut extra = Vec::new();
        if include_archived {
            extra.push(("include_archived", "true"));
        }
        self.pages(
            Endpoint::ListProjects,
            &["organization", "projects"],
            extra,
            |p: &Project| p.id.clone(),
        )
    }

    /// Proves the admin key with the cheapest admin call: one project, one page.
    pub async fn ping(&self) -> ApiResult<()> {
        let url = self.url(&["organization", "projects"], &[("limit", "1")]);
        let _: ListResponse<Project> = self.get(Endpoint::ListProjects, url).await?;
        Ok(())
    }

    /// [`Client::ping`] with `key` instead of the client's admin key: proves a new admin
    /// key before anything relies on it. A rejected key is `ApiError::Unauthorized`
    /// (or `Forbidden` for a key that is not an admin key).
    pub async fn ping_with(&self, key: &SecretString) -> ApiResult<()> {
        let url = self.url(&["organization", "projects"], &[("limit", "1")]);
        let _: ListResponse<Project> = self
            .call(
                Endpoint::ListProjects,
                Method::GET,
                url,
                None::<&()>,
                Retry::Idempotent,
                Some(key),
            )
            .await?;
        Ok(())
    }

    /// Every admin API key of the organization (all pages; listing objects, no values).
    pub async fn list_admin_api_keys(&self) -> ApiResult<Vec<AdminApiKey>> {
        collect(self.pages(
            Endpoint::ListAdminApiKeys,
            &["organization", "admin_api_keys"],
            Vec::new(),
            |k: &AdminApiKey| k.id.clone(),
        ))
        .await
    }

    /// One admin API key by id (listing object, no value).
    pub async fn get_admin_api_key(&self, key_id: &str) -> ApiResult<AdminApiKey> {
        let url = self.url(&["organization", "admin_api_keys", key_id], &[]);
        self.get(Endpoint::GetAdminApiKey, url).await
    }

    /// Creates an admin API key; the only response that carries an admin key's value.
    /// Never retried automatically on an ambiguous failure (no idempotency key).
    pub async fn create_admin_api_key(
        &self,
        req: &CreateAdminKeyRequest,
    ) -> ApiResult<CreatedAdminKey> {
        let url = self.url(&["organization", "admin_api_keys"], &[]);
        self.call(
            Endpoint::CreateAdminApiKey,
            Method::POST,
            url,
            Some(req),
            Retry::Unambiguous,
            None,
        )
        .await
    }

    /// DELETE an admin API key (with the client's current admin key). 404 is returned
    /// as `ApiError::NotFound`; callers treat it as done.
    pub async fn delete_admin_api_key(&self, key_id: &str) -> ApiResult<Deleted> {
        let url = self.url(&["organization", "admin_api_keys", key_id], &[]);
        self.call(
            Endpoint::DeleteAdminApiKey,
            Method::DELETE,
            url,
            None::<&()>,
            Retry::Idempotent,
            None,
        )
        .await
    }

    /// One project by id.
    pub async fn get_project(&self, project_id: &str) -> ApiResult<Project> {
        let url = self.url(&["organization", "projects", project_id], &[]);
        self.get(Endpoint::GetProject, url).await
    }

    /// Every key of a project (all pages), with `owner_project_access=any`. A key whose
    /// owner is neither typed nor present is kept as [`OwnerType::Unknown`] and logged
    /// (`api.key_owner_unknown`).
    pub async fn list_api_keys(&self, project_id: &str) -> ApiResult<Vec<ProjectApiKey>> {
        let keys = collect(self.pages(
            Endpoint::ListApiKeys,
            &["organization", "projects", project_id, "api_keys"],
            vec![("owner_project_access", "any")],
            |k: &ProjectApiKey| k.id.clone(),
        ))
        .await?;
        for k in keys.iter().filter(|k| k.owner.kind == OwnerType::Unknown) {
            tracing::warn!(
                event = "api.key_owner_unknown",
                project_id,
                key_id = %k.id,
                "listed key has no owner type and no owner object; reported, not managed"
            );
        }
        Ok(keys)
    }

    /// One key of a project (listing object, no value).
    pub async fn get_api_key(&self, project_id: &str, key_id: &str) -> ApiResult<ProjectApiKey> {
        let url = self.url(
            &["organization", "projects", project_id, "api_keys", key_id],
            &[],
        );
        self.get(Endpoint::GetApiKey, url).await
    }

    /// DELETE a project key. 404 is returned as `ApiError::NotFound`; callers treat it as done.
    pub async fn delete_api_key(&self, project_id: &str, key_id: &str) -> ApiResult<Deleted> {
        let url = self.url(
            &["organization", "projects", project_id, "api_keys", key_id],
            &[],
        );
        self.call(
            Endpoint::DeleteApiKey,
            Method::DELETE,
            url,
            None::<&()>,
            Retry::Idempotent,
            None,
        )
        .await
    }

    /// Updates a project key (`POST .../api_keys/{key_id}`, SDK 3.57): a new expiry
    /// counted from this request and/or new scopes; returns the key's listing object.
    /// Retried like a read: repeating it only restarts the expiry from the retry. An
    /// API without the endpoint answers 404 (`ApiError::NotFound`), as does a gone key;
    /// an expired key cannot be updated (HTTP 400).
    pub async fn update_api_key(
        &self,
        project_id: &str,
        key_id: &str,
        req: &UpdateKeyRequest,
    ) -> ApiResult<ProjectApiKey> {
        let url = self.url(
            &["organization", "projects", project_id, "api_keys", key_id],
            &[],
        );
        self.call(
            Endpoint::UpdateApiKey,
            Method::POST,
            url,
            Some(req),
            Retry::Idempotent,
            None,
        )
        .await
    }

    /// Every service account of a project (all pages).
    pub async fn list_service_accounts(&self, project_id: &str) -> ApiResult<Vec<ServiceAccount>> {
        collect(self.pages(
            Endpoint::ListServiceAccounts,
            &["organization", "projects", project_id, "service_accounts"],
            Vec::new(),
            |s: &ServiceAccount| s.id.clone(),
        ))
        .await
    }

    /// Creates a service account and its first key, which expires `expires_in_seconds`
    /// from now when given (required by organizations whose policy caps key lifetimes).
    /// Never retried automatically on an ambiguous failure (no idempotency key).
    pub async fn create_service_account(
        &self,
        project_id: &str,
        name: &str,
        expires_in_seconds: Option<u64>,
    ) -> ApiResult<CreatedServiceAccount> {
        let url = self.url(
            &["organization", "projects", project_id, "service_accounts"],
            &[],
        );
        let body = CreateServiceAccountRequest {
            name: name.to_owned(),
            create_service_account_only: None,
            expires_in_seconds,
        };
        self.call(
            Endpoint::CreateServiceAccount,
            Method::POST,
            url,
            Some(&body),
            Retry::Unambiguous,
            None,
        )
        .await
    }

    /// Deletes a service account and, with it, all of its keys.
    pub async fn delete_service_account(
        &self,
        project_id: &str,
        sa_id: &str,
    ) -> ApiResult<Deleted> {
        let url = self.url(
            &[
                "organization",
                "projects",
                project_id,
                "service_accounts",
                sa_id,
            ],
            &[],
        );
        self.call(
            Endpoint::DeleteServiceAccount,
            Method::DELETE,
            url,
            None::<&()>,
            Retry::Idempotent,
            None,
        )
        .await
    }

    /// Mints a key on a service account; the only response that carries a key value.
    /// Never retried automatically on an ambiguous failure (no idempotency key).
    pub async fn create_service_account_key(
        &self,
        project_id: &str,
        sa_id: &str,
        req: &CreateKeyRequest,
    ) -> ApiResult<CreatedKey> {
        let url = self.url(
            &[
                "organization",
                "projects",
                project_id,
                "service_accounts",
                sa_id,
                "api_keys",
            ],
            &[],
        );
        self.call(
            Endpoint::CreateServiceAccountKey,
            Method::POST,
            url,
            Some(req),
            Retry::Unambiguous,
            None,
        )
        .await
    }

    /// Every bucket of `GET /organization/usage/completions` for `q`, following
    /// `next_page` to the last page, one request per page, with the bounds of every
    /// listing (no cursor followed twice, at most `openai.max_pages` pages). Arrays go
    /// as repeated parameters (`api_key_ids=a&api_key_ids=b`).
    pub async fn usage_completions(
        &self,
        q: &UsageQuery,
    ) -> ApiResult<Vec<UsageBucket<UsageCompletionsResult>>> {
        self.bucket_pages(
            Endpoint::UsageCompletions,
            &["organization", "usage", "completions"],
            q,
        )
        .await
    }

    /// Every bucket of `GET /organization/costs` for `q`, read like
    /// [`Client::usage_completions`].
    pub async fn costs(&self, q: &UsageQuery) -> ApiResult<Vec<UsageBucket<CostsResult>>> {
        self.bucket_pages(Endpoint::Costs, &["organization", "costs"], q)
            .await
    }

    /// The buckets of a `page` / `next_page` listing (usage, costs), to the last page.
    ///
    /// A page's size grows with the organization (every bucket holds a result per
    /// group: per key, with `group_by = api_key_id`), so a page larger than
    /// `openai.max_response_bytes` is asked for again with half as many buckets, down
    /// to one (`api.page_shrunk`, INFO); the rest of the listing keeps the smaller
    /// size. Only a single bucket over the cap is [`ApiError::ResponseTooLarge`].
    async fn bucket_pages<T: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        path: &[&str],
        q: &UsageQuery,
    ) -> ApiResult<Vec<UsageBucket<T>>> {
        let mut base: Vec<(&str, String)> = vec![("start_time", q.start_time.to_string())];
        if let Some(end) = q.end_time {
            base.push(("end_time", end.to_string()));
        }
        if let Some(width) = &q.bucket_width {
            base.push(("bucket_width", width.clone()));
        }
        let mut limit = q.limit;
        for (name, values) in [
            ("api_key_ids", &q.api_key_ids),
            ("project_ids", &q.project_ids),
            ("group_by", &q.group_by),
        ] {
            base.extend(values.iter().map(|v| (name, v.clone())));
        }
        let mut cursors = Cursors::new(endpoint, self.cfg.max_pages);
        let mut page: Option<String> = None;
        let mut buckets = Vec::new();
        loop {
            let shown = limit.map(|n| n.to_string());
            let mut query: Vec<(&str, &str)> = base.iter().map(|(k, v)| (*k, v.as_str())).collect();
            if let Some(n) = &shown {
                query.push(("limit", n));
            }
            if let Some(p) = &page {
                query.push(("page", p));
            }
            let url = self.url(path, &query);
            let got = self.get(endpoint, url).await;
            if let Err(ApiError::ResponseTooLarge { .. }) = &got {
                let current = limit.unwrap_or_else(|| default_buckets(endpoint, q));
                if current > 1 {
                    limit = Some(current / 2);
                    tracing::info!(
                        event = "api.page_shrunk",
                        endpoint = endpoint.as_str(),
                        limit = current / 2,
                        max_response_bytes = self.cfg.max_response_bytes,
                        "a page of buckets was larger than openai.max_response_bytes; \
                         asking again for fewer buckets a page"
                    );
                    continue;
                }
            }
            let got: UsagePage<T> = got?;
            buckets.extend(got.data);
            let next = match (got.has_more, got.next_page) {
                (false, _) => None,
                (true, Some(next)) => Some(next),
                (true, None) => {
                    return Err(ApiError::Decode {
                        endpoint: endpoint.as_str().into(),
                        status: 200,
                        message: "has_more is true but next_page is null".into(),
                    })
                }
            };
            match cursors.advance(next)? {
                Some(next) => page = Some(next),
                None => return Ok(buckets),
            }
        }
    }

    /// Every entry of `GET /organization/audit_logs` for `q`, newest first as the API
    /// lists them, page after page to the end: forward by `after` = each page's
    /// `last_id` (or its last entry's id), or, for a `before` without `after`, backward
    /// by `before` = each page's `first_id`. One request per page, with the bounds,
    /// retries and body cap of every listing. Arrays go as `event_types[]=...`.
    pub async fn audit_logs(&self, q: &AuditLogQuery) -> ApiResult<Vec<AuditLog>> {
        let endpoint = Endpoint::ListAuditLogs;
        let mut base: Vec<(&str, String)> = vec![("limit", q.limit.unwrap_or(100).to_string())];
        for (name, bound) in [
            ("effective_at[gt]", q.effective_at.gt),
            ("effective_at[gte]", q.effective_at.gte),
            ("effective_at[lt]", q.effective_at.lt),
            ("effective_at[lte]", q.effective_at.lte),
        ] {
            if let Some(bound) = bound {
                base.push((name, bound.to_string()));
            }
        }
        for (name, values) in [
            ("event_types[]", &q.event_types),
            ("project_ids[]", &q.project_ids),
            ("resource_ids[]", &q.resource_ids),
            ("actor_ids[]", &q.actor_ids),
            ("actor_emails[]", &q.actor_emails),
        ] {
            base.extend(values.iter().map(|v| (name, v.clone())));
        }
        // Backward from `before` alone; otherwise forward, `before` (if any) a fixed bound.
        let backward = q.before.is_some() && q.after.is_none();
        if let (false, Some(before)) = (backward, &q.before) {
            base.push(("before", before.clone()));
        }
        let (cursor_name, mut cursor) = if backward {
            ("before", q.before.clone())
        } else {
            ("after", q.after.clone())
        };
        let mut cursors = Cursors::new(endpoint, self.cfg.max_pages);
        let mut pages: Vec<Vec<AuditLog>> = Vec::new();
        loop {
            let mut query: Vec<(&str, &str)> = base.iter().map(|(k, v)| (*k, v.as_str())).collect();
            if let Some(c) = &cursor {
                query.push((cursor_name, c));
            }
            let url = self.url(&["organization", "audit_logs"], &query);
            let list: ListResponse<AuditLog> = self.get(endpoint, url).await?;
            let next = match (list.has_more, backward) {
                (false, _) => None,
                (true, false) => list
                    .last_id
                    .clone()
                    .or_else(|| list.data.last().map(|e| e.id.clone())),
                (true, true) => list
                    .first_id
                    .clone()
                    .or_else(|| list.data.first().map(|e| e.id.clone())),
            };
            if list.has_more && next.is_none() {
                return Err(ApiError::Decode {
                    endpoint: endpoint.as_str().into(),
                    status: 200,
                    message: "has_more is true but the page has neither a cursor id nor entries"
                        .into(),
                });
            }
            pages.push(list.data);
            match cursors.advance(next)? {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        if backward {
            pages.reverse();
        }
        Ok(pages.into_iter().flatten().collect())
    }

    /// `GET /models` with a project key: Ok(()) when the key works.
    /// A rejected key is `ApiError::Unauthorized` on `list_models`.
    pub async fn verify_key(&self, key: &SecretString) -> ApiResult<()> {
        let url = self.url(&["models"], &[]);
        let _: serde::de::IgnoredAny = self
            .call(
                Endpoint::ListModels,
                Method::GET,
                url,
                None::<&()>,
                Retry::Idempotent,
                Some(key),
            )
            .await?;
        Ok(())
    }

    /// `{base}/{segments...}?{query}`, each segment percent-encoded.
    fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    /// A listing that follows `has_more`/`last_id` from the first page to the last,
    /// asking for each page exactly once. `id_of` supplies the cursor when a page omits
    /// `last_id`.
    fn pages<T>(
        &self,
        endpoint: Endpoint,
        path: &[&str],
        extra: Vec<(&'static str, &'static str)>,
        id_of: fn(&T) -> String,
    ) -> Pages<'_, T> {
        Pages {
            client: self,
            endpoint,
            path: path.iter().map(|s| s.to_string()).collect(),
            extra,
            id_of,
            after: None,
            cursors: Cursors::new(endpoint, self.cfg.max_pages),
            done: false,
        }
    }

    async fn list_page<T: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        path: &[&str],
        extra: &[(&str, &str)],
        after: Option<&str>,
        id_of: fn(&T) -> String,
    ) -> ApiResult<Page<T>> {
        let mut query = vec![("limit", "100")];
        if let Some(after) = after {
            query.push(("after", after));
        }
        query.extend_from_slice(extra);
        let url = self.url(path, &query);
        let list: ListResponse<T> = self.get(endpoint, url).await?;
        if !list.has_more {
            return Ok(Page {
                data: list.data,
                next: None,
            });
        }
        let next = list.last_id.clone().or_else(|| list.data.last().map(id_of));
        match next {
            Some(next) => Ok(Page {
                data: list.data,
                next: Some(next),
            }),
            None => Err(ApiError::Decode {
                endpoint: endpoint.as_str().into(),
                status: 200,
                message: "has_more is true but the page has neither last_id nor items".into(),
            }),
        }
    }

    /// One API call with the retry policy `retry`; `key` overrides the admin key.
    /// A read: `GET url` with the admin key, retried as idempotent.
    async fn get<T: DeserializeOwned>(&self, endpoint: Endpoint, url: Url) -> ApiResult<T> {
        self.call(
            endpoint,
            Method::GET,
            url,
            None::<&()>,
            Retry::Idempotent,
            None,
        )
        .await
    }

    async fn call<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        endpoint: Endpoint,
        method: Method,
        url: Url,
        body: Option<&B>,
        retry: Retry,
        key: Option<&SecretString>,
    ) -> ApiResult<T> {
        let mut attempt: u32 = 0;
        loop {
            let started = Instant::now();
            let failure = match self.exchange(method.clone(), url.clone(), body, key).await {
                Ok((status, headers, bytes)) => {
                    let code = status.as_u16();
                    self.log_exchange(endpoint, code, attempt, started);
                    if status.is_success() {
                        return decode(endpoint, code, &bytes);
                    }
                    Failure::Status {
                        status,
                        headers,
                        body: bytes,
                    }
                }
                // Not retried: the server answered, and asking again costs as much.
                Err(ExchangeError::TooLarge { status }) => {
                    self.log_exchange(endpoint, status.as_u16(), attempt, started);
                    return Err(ApiError::ResponseTooLarge {
                        endpoint: endpoint.as_str().into(),
                        status: status.as_u16(),
                        limit: self.cfg.max_response_bytes,
                    });
                }
                Err(ExchangeError::Network { error, before_send }) => {
                    self.log_exchange(endpoint, 0, attempt, started);
                    Failure::Network { error, before_send }
                }
            };
            let wait = match &failure {
                Failure::Status {
                    status, headers, ..
                } if *status == StatusCode::TOO_MANY_REQUESTS => Some(
                    retry::retry_after(headers, SystemTime::now())
                        .map(|d| d.min(self.cfg.max_retry_after))
                        .unwrap_or_else(|| retry::backoff(self.cfg.backoff_base, attempt)),
                ),
                Failure::Status { status, .. }
                    if status.is_server_error() && retry == Retry::Idempotent =>
                {
                    Some(retry::backoff(self.cfg.backoff_base, attempt))
                }
                Failure::Network { before_send, .. }
                    if *before_send || retry == Retry::Idempotent =>
                {
                    Some(retry::backoff(self.cfg.backoff_base, attempt))
                }
                _ => None,
            };
            match wait {
                Some(wait) if attempt < self.cfg.max_retries => {
                    tracing::debug!(
                        event = "api.retry",
                        endpoint = endpoint.as_str(),
                        attempt,
                        retry_in_ms = wait.as_millis() as u64,
                        "retrying API request"
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                _ => return Err(into_error(endpoint, failure)),
            }
        }
    }

    /// Sends one request and reads the whole response, chunk by chunk, up to
    /// `max_response_bytes`: a larger body is abandoned (the connection with it) as soon
    /// as the cap is passed, never buffered whole. On a network failure, also says
    /// whether the request certainly never reached the server (a connect error).
    async fn exchange<B: Serialize + ?Sized>(
        &self,
        method: Method,
        url: Url,
        body: Option<&B>,
        key: Option<&SecretString>,
    ) -> Result<(StatusCode, reqwest::header::HeaderMap, Vec<u8>), ExchangeError> {
        let token = match key {
            Some(k) => k.clone(),
            None => self.admin_key(),
        };
        let mut req = self
            .http
            .request(method, url)
            .timeout(self.cfg.request_timeout)
            .bearer_auth(token.expose_secret())
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(body) = body {
            req = req.json(body);
        }
        let mut resp = req.send().await.map_err(|error| ExchangeError::Network {
            before_send: error.is_connect(),
            error,
        })?;
        let status = resp.status();
        let limit = self.cfg.max_response_bytes;
        let announced = resp.content_length();
        if announced.is_some_and(|n| n > limit) {
            return Err(ExchangeError::TooLarge { status });
        }
        let headers = resp.headers().clone();
        let capacity = usize::try_from(announced.unwrap_or(0).min(limit)).unwrap_or(0);
        let mut bytes = Vec::with_capacity(capacity);
        while let Some(chunk) = resp.chunk().await.map_err(|error| ExchangeError::Network {
            error,
            before_send: false,
        })? {
            if (bytes.len() + chunk.len()) as u64 > limit {
                return Err(ExchangeError::TooLarge { status });
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok((status, headers, bytes))
    }

    fn log_exchange(&self, endpoint: Endpoint, status: u16, attempt: u32, started: Instant) {
        self.stats.record(endpoint, status);
        tracing::debug!(
            event = "api.request",
            endpoint = endpoint.as_str(),
            status,
            attempt,
            duration_ms = started.elapsed().as_millis() as u64,
            "API request"
        );
    }
}

/// Parses `base_url`, accepting it with or without a trailing slash.
fn parse_base_url(base_url: &str) -> ApiResult<Url> {
    let invalid = |message: String| ApiError::Network {
        endpoint: "client".into(),
        message,
    };
    let url = Url::parse(base_url.trim())
        .map_err(|e| invalid(format!("invalid base_url {base_url:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
        return Err(invalid(format!(
            "base_url {base_url:?} is not an http(s) URL"
        )));
    }
    Ok(url)
}

/// Decodes a 2xx body whole; a truncated or mis-shaped body is an error, never a
/// partial result.
fn decode<T: DeserializeOwned>(endpoint: Endpoint, status: u16, body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| {
        let kind = match e.classify() {
            serde_json::error::Category::Eof => "truncated JSON",
            serde_json::error::Category::Syntax => "invalid JSON",
            serde_json::error::Category::Data => "unexpected JSON shape",
            serde_json::error::Category::Io => "unreadable body",
        };
        ApiError::Decode {
            endpoint: endpoint.as_str().into(),
            status,
            message: crate::redact::secrets(&format!("{kind}: {e}")),
        }
    })
}

/// The final error for a failure no (more) retries will fix.
fn into_error(endpoint: Endpoint, failure: Failure) -> ApiError {
    let endpoint_name = endpoint.as_str().to_owned();
    match failure {
        Failure::Network { error, .. } => {
            let error = error.without_url();
            let kind = if error.is_timeout() {
                "timed out"
            } else if error.is_connect() {
                "connection failed"
            } else if error.is_body() || error.is_decode() {
                "response body interrupted"
            } else {
                "request failed"
            };
            ApiError::Network {
                endpoint: endpoint_name,
                message: crate::redact::secrets(&format!("{kind}: {}", error_chain(&error))),
            }
        }
        Failure::Status { status, body, .. } => {
            let (message, code) = match serde_json::from_slice::<ErrorResponse>(&body) {
                Ok(ErrorResponse { error }) if !error.message.is_empty() => {
                    (crate::redact::secrets(&error.message), error.code)
                }
                _ => (retry::excerpt(&body), None),
            };
            match status.as_u16() {
                401 => ApiError::Unauthorized {
                    endpoint: endpoint_name,
                    message,
                },
                403 => ApiError::Forbidden {
                    endpoint: endpoint_name,
                    message,
                },
                404 => ApiError::NotFound {
                    endpoint: endpoint_name,
                    message,
                },
                status => ApiError::Status {
                    endpoint: endpoint_name,
                    status,
                    message,
                    code,
                },
            }
        }
    }
}

/// `error: cause: cause` — reqwest's top-level message alone rarely says what broke.
fn error_chain(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Every item of a listing, page after page.
async fn collect<T: DeserializeOwned>(mut pages: Pages<'_, T>) -> ApiResult<Vec<T>> {
    let mut all = Vec::new();
    while let Some(page) = pages.next_page().await? {
        all.extend(page);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `cursors` (one per page, `None` = last page) and returns the pages read
    /// and the outcome.
    fn follow(max_pages: u32, cursors: &[Option<&str>]) -> (u32, ApiResult<()>) {
        let mut c = Cursors::new(Endpoint::ListProjects, max_pages);
        for next in cursors {
            match c.advance(next.map(str::to_string)) {
                Ok(Some(_)) => {}
                Ok(None) => return (c.pages, Ok(())),
                Err(e) => return (c.pages, Err(e)),
            }
        }
        (c.pages, Ok(()))
    }

    #[test]
    fn distinct_cursors_are_followed_to_the_last_page() {
        let (pages, r) = follow(10, &[Some("a"), Some("b"), Some("c"), None]);
        assert_eq!(pages, 4);
        assert!(r.is_ok(), "{r:?}");
    }

    #[test]
    fn an_immediately_repeated_cursor_is_a_loop() {
        let (pages, r) = follow(1000, &[Some("a"), Some("a")]);
        assert_eq!(pages, 2);
        match r {
            Err(ApiError::CursorLoop {
                endpoint,
                pages,
                first_seen,
            }) => assert_eq!(
                (endpoint.as_str(), pages, first_seen),
                ("list_projects", 2, 1)
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cycles_of_any_length_are_loops_at_the_first_repeat() {
        // A, B, A and A, B, C, D, B: caught on the page that repeats, naming the first.
        let (_, r) = follow(1000, &[Some("A"), Some("B"), Some("A"), Some("B")]);
        let e = r.expect_err("A, B, A loops");
        assert!(
            matches!(
                e,
                ApiError::CursorLoop {
                    pages: 3,
                    first_seen: 1,
                    ..
                }
            ),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(text.contains("list_projects"), "{text}");
        assert!(text.contains("page 3") && text.contains("page 1"), "{text}");
        let (pages, r) = follow(
            1000,
            &[Some("A"), Some("B"), Some("C"), Some("D"), Some("B"), None],
        );
        assert_eq!(pages, 5);
        assert!(
            matches!(
                r,
                Err(ApiError::CursorLoop {
                    pages: 5,
                    first_seen: 2,
                    ..
                })
            ),
            "{r:?}"
        );
    }

    #[test]
    fn the_page_cap_ends_a_listing_that_never_ends() {
        let fresh: Vec<String> = (0..100).map(|i| format!("cursor_{i}")).collect();
        let cursors: Vec<Option<&str>> = fresh.iter().map(|c| Some(c.as_str())).collect();
        let (pages, r) = follow(5, &cursors);
        assert_eq!(pages, 5, "stops on the cap, not later");
        let e = r.expect_err("capped");
        assert!(
            matches!(&e, ApiError::TooManyPages { pages: 5, endpoint } if endpoint == "list_projects"),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.contains("list_projects") && text.contains("5 pages"),
            "{text}"
        );
        assert!(!e.is_temporary());
    }

    #[test]
    fn a_listing_of_exactly_max_pages_is_fine() {
        let (pages, r) = follow(3, &[Some("a"), Some("b"), None]);
        assert_eq!(pages, 3);
        assert!(r.is_ok(), "{r:?}");
        // max_pages = 1: a single page is fine, a second one is refused.
        assert!(follow(1, &[None]).1.is_ok());
        assert!(matches!(
            follow(1, &[Some("a")]).1,
            Err(ApiError::TooManyPages { pages: 1, .. })
        ));
    }
}
