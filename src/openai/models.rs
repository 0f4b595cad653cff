//! Admin API objects, typed from the OpenAI OpenAPI spec (openai/openai-openapi at
//! commit f85dbe2) and the `openai` Python SDK 3.57.0 (DESIGN.md §8).
//!
//! Deserialisation is tolerant: unknown fields are ignored and every field the spec
//! marks nullable (or that a real server might omit) is an `Option`.

use std::fmt;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// `{"object": "list", "data": [...], "first_id", "last_id", "has_more"}`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ListResponse<T> {
    #[serde(default)]
    pub object: Option<String>,
    pub data: Vec<T>,
    #[serde(default)]
    pub first_id: Option<String>,
    #[serde(default)]
    pub last_id: Option<String>,
    pub has_more: bool,
}

/// `Project`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct Project {
    pub id: String,
    #[serde(default)]
    pub object: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    pub created_at: i64,
    #[serde(default)]
    pub archived_at: Option<i64>,
    #[serde(default)]
    pub status: Option<String>,
}

impl Project {
    /// The name, or the id when the project has none.
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.id)
    }
    pub fn is_archived(&self) -> bool {
        self.archived_at.is_some() || self.status.as_deref() == Some("archived")
    }
}

/// `ProjectApiKey` (the listing object; never carries the value).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct ProjectApiKey {
    pub id: String,
    #[serde(default)]
    pub object: Option<String>,
    #[serde(default)]
    pub redacted_value: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    pub created_at: i64,
    #[serde(default)]
    pub last_used_at: Option<i64>,
    /// Not in the spec excerpt; read when a server sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    #[serde(default)]
    pub owner_project_access: Option<OwnerAccess>,
    /// An absent `owner` reads as an owner of unknown type.
    #[serde(default)]
    pub owner: ApiKeyOwner,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnerAccess {
    Active,
    Inactive,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnerType {
    User,
    ServiceAccount,
    /// Neither `type` nor an owner object says who owns the key, or a `type` this
    /// client does not know. Such a key is listed and reported, never managed.
    #[default]
    #[serde(other)]
    Unknown,
}

impl OwnerType {
    pub fn as_str(self) -> &'static str {
        match self {
            OwnerType::User => "user",
            OwnerType::ServiceAccount => "service_account",
            OwnerType::Unknown => "unknown",
        }
    }
}

/// `owner` of a `ProjectApiKey`: `type` plus the matching object.
///
/// `type` is optional in the spec and the SDK: without it (or with one this client
/// does not know) the type is inferred from which of `service_account` / `user` is
/// present, and is [`OwnerType::Unknown`] when neither is.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(from = "RawOwner")]
pub struct ApiKeyOwner {
    #[serde(rename = "type")]
    pub kind: OwnerType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<OwnerUser>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<OwnerServiceAccount>,
}

/// `owner` as sent, before its type is settled.
#[derive(Deserialize)]
struct RawOwner {
    #[serde(default, rename = "type")]
    kind: Option<OwnerType>,
    #[serde(default)]
    user: Option<OwnerUser>,
    #[serde(default)]
    service_account: Option<OwnerServiceAccount>,
}

impl From<RawOwner> for ApiKeyOwner {
    fn from(raw: RawOwner) -> ApiKeyOwner {
        let kind = match raw.kind {
            Some(k @ (OwnerType::User | OwnerType::ServiceAccount)) => k,
            _ if raw.service_account.is_some() => OwnerType::ServiceAccount,
            _ if raw.user.is_some() => OwnerType::User,
            _ => OwnerType::Unknown,
        };
        ApiKeyOwner {
            kind,
            user: raw.user,
            service_account: raw.service_account,
        }
    }
}

impl ApiKeyOwner {
    pub fn id(&self) -> Option<&str> {
        match self.kind {
            OwnerType::User => self.user.as_ref().map(|u| u.id.as_str()),
            OwnerType::ServiceAccount => self.service_account.as_ref().map(|s| s.id.as_str()),
            OwnerType::Unknown => None,
        }
    }
    pub fn name(&self) -> Option<&str> {
        match self.kind {
            OwnerType::User => self
                .user
                .as_ref()
                .and_then(|u| u.name.as_deref().or(u.email.as_deref())),
            OwnerType::ServiceAccount => self
                .service_account
                .as_ref()
                .and_then(|s| s.name.as_deref()),
            OwnerType::Unknown => None,
        }
    }
}

/// `ProjectApiKeyOwnerUser`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct OwnerUser {
    pub id: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub created_at: Option<i64>,
    #[serde(default)]
    pub role: Option<String>,
}

/// `ProjectApiKeyOwnerServiceAccount`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct OwnerServiceAccount {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub created_at: Option<i64>,
    #[serde(default)]
    pub role: Option<String>,
}

/// `ProjectServiceAccount`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct ServiceAccount {
    pub id: String,
    #[serde(default)]
    pub object: Option<String>,
    pub name: String,
    #[serde(default)]
    pub role: Option<String>,
    pub created_at: i64,
}

/// `CreateProjectServiceAccountApiKeyBody` (+ `expires_in_seconds`, which the spec
/// excerpt does not list; sent only when `policy.key_expiry` is set).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CreateKeyRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<u64>,
}

/// Body of `POST /organization/projects/{p}/api_keys/{k}` (key update, SDK 3.57; not
/// in the GitHub spec). At least one field must be set; neither may be null.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateKeyRequest {
    /// Seconds from this request (a retry restarts the count); must satisfy the
    /// organization's or project's expiry policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<u64>,
    /// Replaces the key's scopes: `[]` = all permissions, `["api.all.read"]` = read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
}

/// `ServiceAccountApiKeyBody` / `ProjectServiceAccountApiKey`: the only place a key's
/// value appears. `Debug` redacts it.
#[derive(Clone, Deserialize)]
pub struct CreatedKey {
    pub id: String,
    #[serde(default)]
    pub object: Option<String>,
    #[serde(deserialize_with = "de_secret")]
    pub value: SecretString,
    #[serde(default)]
    pub name: Option<String>,
    pub created_at: i64,
    /// Unix seconds; `None` = never expires (SDK 3.57; absent from the GitHub spec).
    #[serde(default)]
    pub expires_at: Option<i64>,
}

impl fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedKey")
            .field("id", &self.id)
            .field("value", &"[REDACTED]")
            .field("name", &self.name)
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

fn de_secret<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
    Ok(SecretString::from(String::deserialize(d)?))
}

/// `ProjectServiceAccountCreateRequest` (+ `expires_in_seconds` for the initial key,
/// from the SDK 3.57; sent only when `policy.key_expiry` is set, and never together with
/// `create_service_account_only = true`, which the SDK forbids).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateServiceAccountRequest {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_service_account_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<u64>,
}

/// `ProjectServiceAccountCreateResponse`.
#[derive(Clone, Debug, Deserialize)]
pub struct CreatedServiceAccount {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub role: Option<String>,
    pub created_at: i64,
    #[serde(default)]
    pub api_key: Option<CreatedKey>,
}

/// `ProjectApiKeyDeleteResponse` / `ProjectServiceAccountDeleteResponse`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Deleted {
    pub id: String,
    #[serde(default)]
    pub object: Option<String>,
    pub deleted: bool,
}

/// `UsageResponse`: a page of time buckets; `next_page` is the next page's `page`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct UsagePage<T> {
    #[serde(default)]
    pub object: Option<String>,
    pub data: Vec<UsageBucket<T>>,
    pub has_more: bool,
    #[serde(default)]
    pub next_page: Option<String>,
}

/// `UsageTimeBucket`: `[start_time, end_time)` and its results.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct UsageBucket<T> {
    #[serde(default)]
    pub object: Option<String>,
    pub start_time: i64,
    pub end_time: i64,
    pub results: Vec<T>,
}

/// `UsageCompletionsResult`: one group's totals in a bucket. The grouping fields are
/// set only for the `group_by` asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct UsageCompletionsResult {
    #[serde(default)]
    pub object: Option<String>,
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub input_cached_tokens: Option<u64>,
    #[serde(default)]
    pub output_tokens: u64,
    #[serde(default)]
    pub input_audio_tokens: Option<u64>,
    #[serde(default)]
    pub output_audio_tokens: Option<u64>,
    #[serde(default)]
    pub num_model_requests: u64,
    #[serde(default)]
    pub project_id: Option<String>,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub api_key_id: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub batch: Option<bool>,
    #[serde(default)]
    pub service_tier: Option<String>,
}

/// `CostsResult`: one group's cost in a bucket of `GET /organization/costs`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct CostsResult {
    #[serde(default)]
    pub object: Option<String>,
    #[serde(default)]
    pub amount: Option<CostAmount>,
    #[serde(default)]
    pub line_item: Option<String>,
    #[serde(default)]
    pub project_id: Option<String>,
    #[serde(default)]
    pub api_key_id: Option<String>,
    #[serde(default)]
    pub quantity: Option<f64>,
    #[serde(default)]
    pub quantity_unit: Option<String>,
}

/// `amount` of a `CostsResult`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct CostAmount {
    #[serde(default)]
    pub value: f64,
    /// Lowercase ISO 4217 (`usd`).
    #[serde(default)]
    pub currency: Option<String>,
}

/// The query of `GET /organization/usage/completions` and `GET /organization/costs`
/// (the subset keyrotd uses; costs take only `bucket_width = 1d` and `group_by`
/// `project_id`, `line_item`, `api_key_id`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageQuery {
    /// Unix seconds, inclusive.
    pub start_time: i64,
    /// Unix seconds, exclusive; `None` = now.
    pub end_time: Option<i64>,
    /// `1m`, `1h` or `1d` (the API's default when `None`).
    pub bucket_width: Option<String>,
    pub api_key_ids: Vec<String>,
    pub project_ids: Vec<String>,
    /// `project_id`, `user_id`, `api_key_id`, `model`, `batch`, `service_tier`.
    pub group_by: Vec<String>,
    /// Buckets per page (the API caps it by `bucket_width`); `None` = the API's default.
    pub limit: Option<u32>,
}

/// The query of `GET /organization/audit_logs` (arrays go as `name[]=v`, the range
/// as `effective_at[gt]=...`). `limit` defaults to 100 here (the API's default is 20),
/// so a listing takes as few requests as the API allows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditLogQuery {
    /// `event_types[]`: e.g. `api_key.created`; empty = every type.
    pub event_types: Vec<String>,
    /// `effective_at[gt|gte|lt|lte]`, Unix seconds.
    pub effective_at: EffectiveAt,
    /// `project_ids[]`.
    pub project_ids: Vec<String>,
    /// `resource_ids[]`: the objects acted on (a key id, a service account id ...).
    pub resource_ids: Vec<String>,
    /// `actor_ids[]`: user ids, service account ids or API key tracking ids.
    pub actor_ids: Vec<String>,
    /// `actor_emails[]`.
    pub actor_emails: Vec<String>,
    /// Start after this entry (listing order) and read on to the end.
    pub after: Option<String>,
    /// Only entries before this one (listing order). Without `after` the listing is
    /// read backwards from it, page by page (`before` = each page's first id), and
    /// returned in listing order; with `after` it bounds the forward listing.
    pub before: Option<String>,
    /// Entries per page, 1..=100; `None` = 100.
    pub limit: Option<u32>,
}

/// `effective_at` of [`AuditLogQuery`]: each bound optional.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EffectiveAt {
    pub gt: Option<i64>,
    pub gte: Option<i64>,
    pub lt: Option<i64>,
    pub lte: Option<i64>,
}

/// `AuditLog`: one user action or configuration change.
///
/// The event's details sit in the object under the event's own type name
/// (`"api_key.created": {...}`); [`AuditLog::event`] holds them typed for the key and
/// service-account events, and keeps any other type (and its details, raw) as
/// [`AuditEvent::Other`]: a type this client does not know is read, never an error.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditLog {
    pub id: String,
    /// The event type as sent (`api_key.created`, `project.archived`, ...).
    pub kind: String,
    /// Unix seconds.
    pub effective_at: i64,
    pub project: Option<AuditLogProject>,
    /// `null` or absent when the API does not say who acted.
    pub actor: Option<AuditLogActor>,
    pub event: AuditEvent,
}

impl AuditLog {
    /// The id of the object acted on (key or service account id), when the details
    /// name one.
    pub fn resource_id(&self) -> Option<&str> {
        match &self.event {
            AuditEvent::ApiKeyCreated { id, .. }
            | AuditEvent::ApiKeyUpdated { id, .. }
            | AuditEvent::ApiKeyDeleted { id }
            | AuditEvent::ServiceAccountCreated { id, .. }
            | AuditEvent::ServiceAccountUpdated { id, .. }
            | AuditEvent::ServiceAccountDeleted { id } => id.as_deref(),
            AuditEvent::Other { details } => details.as_ref()?.get("id")?.as_str(),
        }
    }
}

/// The typed details of an [`AuditLog`], by event type.
#[derive(Clone, Debug, PartialEq)]
pub enum AuditEvent {
    /// `api_key.created`: `id` (tracking id) and `data.scopes`.
    ApiKeyCreated {
        id: Option<String>,
        scopes: Option<Vec<String>>,
    },
    /// `api_key.updated`: `id` and `changes_requested.scopes`.
    ApiKeyUpdated {
        id: Option<String>,
        scopes: Option<Vec<String>>,
    },
    /// `api_key.deleted`.
    ApiKeyDeleted { id: Option<String> },
    /// `service_account.created`: `id` and `data.role`.
    ServiceAccountCreated {
        id: Option<String>,
        role: Option<String>,
    },
    /// `service_account.updated`: `id` and `changes_requested.role`.
    ServiceAccountUpdated {
        id: Option<String>,
        role: Option<String>,
    },
    /// `service_account.deleted`.
    ServiceAccountDeleted { id: Option<String> },
    /// Any other type: its details object as sent (`None` when absent).
    Other { details: Option<serde_json::Value> },
}

/// `project` of an [`AuditLog`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct AuditLogProject {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

/// `AuditLogActor`: a dashboard session or an API key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct AuditLogActor {
    #[serde(default, rename = "type")]
    pub kind: AuditActorType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<AuditLogActorSession>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<AuditLogActorApiKey>,
}

impl AuditLogActor {
    /// The acting user's email (a session's user, or the user owning the API key).
    pub fn email(&self) -> Option<&str> {
        match self.kind {
            AuditActorType::Session => self.session.as_ref()?.user.as_ref()?.email.as_deref(),
            AuditActorType::ApiKey => self.api_key.as_ref()?.user.as_ref()?.email.as_deref(),
            AuditActorType::Unknown => None,
        }
    }
}

/// `AuditLogActor.type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditActorType {
    Session,
    ApiKey,
    /// Absent, or a type this client does not know.
    #[default]
    #[serde(other)]
    Unknown,
}

/// `AuditLogActorSession`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct AuditLogActorSession {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<AuditLogActorUser>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
}

/// `AuditLogActorApiKey`: `id` is the key's tracking id (never its value); `type`
/// `user` or `service_account` says who owns it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct AuditLogActorApiKey {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<AuditLogActorUser>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<AuditLogActorServiceAccount>,
}

/// `AuditLogActorUser`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct AuditLogActorUser {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

/// `AuditLogActorServiceAccount`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct AuditLogActorServiceAccount {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl<'de> Deserialize<'de> for AuditLog {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<AuditLog, D::Error> {
        use serde::de::Error;
        use serde_json::Value;
        #[derive(Deserialize)]
        struct Head {
            id: String,
            #[serde(rename = "type")]
            kind: String,
            effective_at: i64,
            #[serde(default)]
            project: Option<AuditLogProject>,
            #[serde(default)]
            actor: Option<AuditLogActor>,
        }
        let mut map = serde_json::Map::<String, Value>::deserialize(d)?;
        let details = map
            .get(map.get("type").and_then(Value::as_str).unwrap_or(""))
            .cloned();
        let head: Head = serde_json::from_value(Value::Object(std::mem::take(&mut map)))
            .map_err(D::Error::custom)?;
        let field = |v: &Option<Value>, path: &[&str]| -> Option<Value> {
            let mut cur = v.as_ref()?;
            for p in path {
                cur = cur.get(p)?;
            }
            (!cur.is_null()).then(|| cur.clone())
        };
        let text = |v: &Option<Value>, path: &[&str]| -> Result<Option<String>, D::Error> {
            field(v, path)
                .map(serde_json::from_value::<String>)
                .transpose()
                .map_err(|e| D::Error::custom(format!("{}.{}: {e}", head.kind, path.join("."))))
        };
        let list = |v: &Option<Value>, path: &[&str]| -> Result<Option<Vec<String>>, D::Error> {
            field(v, path)
                .map(serde_json::from_value::<Vec<String>>)
                .transpose()
                .map_err(|e| D::Error::custom(format!("{}.{}: {e}", head.kind, path.join("."))))
        };
        let event = match head.kind.as_str() {
            "api_key.created" => AuditEvent::ApiKeyCreated {
                id: text(&details, &["id"])?,
                scopes: list(&details, &["data", "scopes"])?,
            },
            "api_key.updated" => AuditEvent::ApiKeyUpdated {
                id: text(&details, &["id"])?,
                scopes: list(&details, &["changes_requested", "scopes"])?,
            },
            "api_key.deleted" => AuditEvent::ApiKeyDeleted {
                id: text(&details, &["id"])?,
            },
            "service_account.created" => AuditEvent::ServiceAccountCreated {
                id: text(&details, &["id"])?,
                role: text(&details, &["data", "role"])?,
            },
            "service_account.updated" => AuditEvent::ServiceAccountUpdated {
                id: text(&details, &["id"])?,
                role: text(&details, &["changes_requested", "role"])?,
            },
            "service_account.deleted" => AuditEvent::ServiceAccountDeleted {
                id: text(&details, &["id"])?,
            },
            _ => AuditEvent::Other { details },
        };
        Ok(AuditLog {
            id: head.id,
            kind: head.kind,
            effective_at: head.effective_at,
            project: head.project,
            actor: head.actor,
            event,
        })
    }
}

/// `Error` inside `ErrorResponse`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct ApiErrorBody {
    #[serde(default)]
    pub message: String,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub param: Option<String>,
    #[serde(default)]
    pub code: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ErrorResponse {
    pub error: ApiErrorBody,
}

/// `AdminApiKey` (the listing object; never carries the value).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct AdminApiKey {
    pub id: String,
    #[serde(default)]
    pub object: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// `sk-admin...xyz`: a prefix and a suffix of the value.
    #[serde(default)]
    pub redacted_value: Option<String>,
    pub created_at: i64,
    #[serde(default)]
    pub expires_at: Option<i64>,
    #[serde(default)]
    pub last_used_at: Option<i64>,
    #[serde(default)]
    pub owner: Option<AdminApiKeyOwner>,
}

impl AdminApiKey {
    /// Whether `value` is consistent with `redacted_value` (`<prefix>...<suffix>`, the
    /// ellipsis as `...` or `…`). False when the listing has no redacted value.
    pub fn redaction_matches(&self, value: &str) -> bool {
        let Some(redacted) = self.redacted_value.as_deref() else {
            return false;
        };
        let split = redacted
            .split_once("...")
            .or_else(|| redacted.split_once('\u{2026}'));
        match split {
            Some((prefix, suffix)) => {
                prefix.len() + suffix.len() <= value.len()
                    && value.starts_with(prefix)
                    && value.ends_with(suffix)
                    && !(prefix.is_empty() && suffix.is_empty())
            }
            None => false,
        }
    }
}

/// `owner` of an `AdminApiKey`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct AdminApiKeyOwner {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub role: Option<String>,
}

/// Body of `POST /organization/admin_api_keys`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CreateAdminKeyRequest {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<u64>,
}

/// `AdminApiKeyCreateResponse`: the only place an admin key's value appears. `Debug`
/// redacts it.
#[derive(Clone, Deserialize)]
pub struct CreatedAdminKey {
    pub id: String,
    #[serde(default)]
    pub object: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub redacted_value: Option<String>,
    pub created_at: i64,
    #[serde(default)]
    pub expires_at: Option<i64>,
    #[serde(deserialize_with = "de_secret")]
    pub value: SecretString,
}

impl fmt::Debug for CreatedAdminKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedAdminKey")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("value", &"[REDACTED]")
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

#[cfg(test)]
mod owner_tests {
    use super::*;

    fn owner(json: &str) -> ApiKeyOwner {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn owner_type_is_inferred_when_absent() {
        let sa = owner(r#"{"service_account": {"id": "svc_1", "name": "backend"}}"#);
        assert_eq!(sa.kind, OwnerType::ServiceAccount);
        assert_eq!((sa.id(), sa.name()), (Some("svc_1"), Some("backend")));
        let user = owner(r#"{"type": null, "user": {"id": "user_1", "email": "a@b.c"}}"#);
        assert_eq!(user.kind, OwnerType::User);
        assert_eq!((user.id(), user.name()), (Some("user_1"), Some("a@b.c")));
        let bare = owner("{}");
        assert_eq!(bare.kind, OwnerType::Unknown);
        assert_eq!((bare.id(), bare.name()), (None, None));
        // A type given wins; an unknown one falls back to the objects present.
        assert_eq!(
            owner(r#"{"type": "user", "user": {"id": "user_1"}}"#).kind,
            OwnerType::User
        );
        assert_eq!(
            owner(r#"{"type": "project_bot", "service_account": {"id": "svc_2"}}"#).kind,
            OwnerType::ServiceAccount
        );
        assert_eq!(owner(r#"{"type": "project_bot"}"#).kind, OwnerType::Unknown);
    }

    #[test]
    fn a_key_without_owner_has_an_unknown_owner() {
        let k: ProjectApiKey = serde_json::from_str(r#"{"id": "key_1", "created_at": 1}"#).unwrap();
        assert_eq!(k.owner.kind, OwnerType::Unknown);
    }
}

#[cfg(test)]
mod admin_key_tests {
    use super::*;

    fn listed(redacted: Option<&str>) -> AdminApiKey {
        AdminApiKey {
            id: "key_1".into(),
            object: None,
            name: None,
            redacted_value: redacted.map(str::to_string),
            created_at: 0,
            expires_at: None,
            last_used_at: None,
            owner: None,
        }
    }

    #[test]
    fn redaction_matching() {
        let k = listed(Some("sk-admin...wxyz"));
        assert!(k.redaction_matches("sk-admin-abcdefwxyz"));
        assert!(!k.redaction_matches("sk-admin-abcdefwxyq"));
        assert!(!k.redaction_matches("sk-proj-abcdefwxyz"));
        assert!(!k.redaction_matches("sk-adminwxyz"[..7].as_ref()));
        assert!(listed(Some("sk-ad\u{2026}xyz")).redaction_matches("sk-admin-xyz"));
        assert!(!listed(Some("...")).redaction_matches("anything"));
        assert!(!listed(Some("sk-admin-full")).redaction_matches("sk-admin-full"));
        assert!(!listed(None).redaction_matches("sk-admin-abc"));
    }
}

#[cfg(test)]
mod audit_log_tests {
    use super::*;

    /// The two entries of the spec's `list-audit-logs` example (its trailing commas
    /// removed), plus an entry of a type this client has no variant for.
    const EXAMPLE: &str = r#"{
        "object": "list",
        "data": [
            {
                "id": "audit_log-xxx_yyyymmdd",
                "type": "project.archived",
                "effective_at": 1722461446,
                "actor": {
                    "type": "api_key",
                    "api_key": {"type": "user", "user": {"id": "user-xxx", "email": "user@example.com"}}
                },
                "project.archived": {"id": "proj_abc"}
            },
            {
                "id": "audit_log-yyy__20240101",
                "type": "api_key.updated",
                "effective_at": 1720804190,
                "actor": {
                    "type": "session",
                    "session": {
                        "user": {"id": "user-xxx", "email": "user@example.com"},
                        "ip_address": "127.0.0.1",
                        "user_agent": "Mozilla/5.0",
                        "ip_address_details": {"country": "US"}
                    }
                },
                "api_key.updated": {"id": "key_xxxx", "data": {"scopes": ["resource_2.operation_2"]}}
            },
            {"id": "audit_log-zzz", "type": "tenant.sso.migrated", "effective_at": 1, "actor": null}
        ],
        "first_id": "audit_log-xxx__20240101",
        "last_id": "audit_log_yyy__20240101",
        "has_more": true
    }"#;

    #[test]
    fn the_official_example_decodes_and_unknown_types_are_kept() {
        let list: ListResponse<AuditLog> = serde_json::from_str(EXAMPLE).unwrap();
        assert!(list.has_more);
        let [archived, updated, unknown] = &list.data[..] else {
            panic!("{:?}", list.data)
        };
        assert_eq!(archived.kind, "project.archived");
        assert_eq!(
            archived.event,
            AuditEvent::Other {
                details: Some(serde_json::json!({"id": "proj_abc"}))
            }
        );
        assert_eq!(archived.resource_id(), Some("proj_abc"));
        let actor = archived.actor.as_ref().unwrap();
        assert_eq!(actor.kind, AuditActorType::ApiKey);
        assert_eq!(actor.email(), Some("user@example.com"));
        assert_eq!(
            actor.api_key.as_ref().unwrap().kind.as_deref(),
            Some("user")
        );

        // The example puts the scopes under `data`; the schema under
        // `changes_requested`: the schema wins, the rest is ignored.
        assert_eq!(
            updated.event,
            AuditEvent::ApiKeyUpdated {
                id: Some("key_xxxx".into()),
                scopes: None
            }
        );
        let session = updated.actor.as_ref().unwrap();
        assert_eq!(session.kind, AuditActorType::Session);
        assert_eq!(
            session.session.as_ref().unwrap().ip_address.as_deref(),
            Some("127.0.0.1")
        );

        assert_eq!(unknown.kind, "tenant.sso.migrated");
        assert_eq!(unknown.event, AuditEvent::Other { details: None });
        assert_eq!(
            (unknown.actor.as_ref(), unknown.resource_id()),
            (None, None)
        );
    }

    #[test]
    fn key_and_service_account_events_are_typed() {
        let entry = |json: serde_json::Value| -> AuditLog { serde_json::from_value(json).unwrap() };
        let e = entry(serde_json::json!({
            "id": "a1", "type": "api_key.created", "effective_at": 5,
            "project": {"id": "proj_1", "name": "prod"},
            "api_key.created": {"id": "key_1", "data": {"scopes": ["api.model.read"]}},
        }));
        assert_eq!(
            e.event,
            AuditEvent::ApiKeyCreated {
                id: Some("key_1".into()),
                scopes: Some(vec!["api.model.read".into()])
            }
        );
        assert_eq!(e.project.unwrap().name.as_deref(), Some("prod"));
        let e = entry(serde_json::json!({
            "id": "a2", "type": "service_account.updated", "effective_at": 5,
            "actor": {"type": "api_key", "api_key": {"id": "key_admin", "type": "service_account",
                      "service_account": {"id": "svc_acct_1"}}},
            "service_account.updated": {"id": "svc_acct_2", "changes_requested": {"role": "owner"}},
        }));
        assert_eq!(
            e.event,
            AuditEvent::ServiceAccountUpdated {
                id: Some("svc_acct_2".into()),
                role: Some("owner".into())
            }
        );
        let key = e.actor.unwrap().api_key.unwrap();
        assert_eq!(
            key.service_account.unwrap().id.as_deref(),
            Some("svc_acct_1")
        );
        for (kind, want) in [
            (
                "api_key.deleted",
                AuditEvent::ApiKeyDeleted {
                    id: Some("x".into()),
                },
            ),
            (
                "service_account.deleted",
                AuditEvent::ServiceAccountDeleted {
                    id: Some("x".into()),
                },
            ),
            (
                "service_account.created",
                AuditEvent::ServiceAccountCreated {
                    id: Some("x".into()),
                    role: None,
                },
            ),
        ] {
            let e = entry(
                serde_json::json!({"id": "a", "type": kind, "effective_at": 1, kind: {"id": "x"}}),
            );
            assert_eq!(e.event, want, "{kind}");
            assert_eq!(e.resource_id(), Some("x"));
        }
        // Details of the wrong shape are an error, not a silent miss.
        let bad: Result<AuditLog, _> = serde_json::from_value(serde_json::json!({
            "id": "a", "type": "api_key.created", "effective_at": 1,
            "api_key.created": {"id": 7},
        }));
        let e = bad.unwrap_err().to_string();
        assert!(e.contains("api_key.created.id"), "{e}");
        // So is an entry without its required fields.
        assert!(serde_json::from_value::<AuditLog>(serde_json::json!({"id": "a"})).is_err());
    }
}
