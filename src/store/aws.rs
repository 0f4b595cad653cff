//! AWS Secrets Manager store (`aws-sdk-secretsmanager`), mapped onto version stages.
//!
//! The secret named like the slot path holds one version per key, each with the DESIGN.md §3
//! record as its `SecretString` (the six fields only, so re-staging a key sends exactly
//! the same bytes). Of a [`SlotState`]:
//!
//! - `current` is the `AWSCURRENT` version's record. Before the first key is staged the
//!   store puts a placeholder `{"managed_by":"keyrotd"}` as `AWSCURRENT`, because AWS
//!   makes the first version of a secret `AWSCURRENT` whatever stages the call names:
//!   an unverified key must never be what consumers read.
//! - `pending` is the `AWSPENDING` version's record when that label is on a version
//!   other than `AWSCURRENT`; a leftover `AWSPENDING` on the current version is a
//!   finished rotation and reads as no pending.
//! - `book.previous_key_id` / `previous_service_account_id` come from the
//!   `AWSPREVIOUS` version's record (AWS moves that label itself when `AWSCURRENT`
//!   moves, so a crash right after promotion cannot lose them), unless the tag
//!   `keyrotd:retired-key-id` names that key (written by `Retired`).
//! - `book.promoted_at` is the tag `keyrotd:promoted-at`, honoured only while the tag
//!   `keyrotd:promoted-key-id` names the current key (a crash between the label move
//!   and the tag write reads as "promoted, clock not started" and the engine's repeated
//!   `Promote` fills it in).
//! - `book.previous_until` (an operator's deadline for the previous key) is the tag
//!   `keyrotd:previous-until`, written with `keyrotd:promoted-at` and honoured under
//!   the same condition, while there is a previous key.
//! - `book.intent` is the tags `keyrotd:intent-{key-name,owner,lease-until,attempt,
//!   service-account-id}` and, when an operator set it, `keyrotd:intent-revoke-old`;
//!   an empty value means unset, so every bookkeeping change is a
//!   single `TagResource` call. Values outside the tag alphabet are stored as `hex:...`.
//! - Every secret keyrotd creates or writes is tagged `managed-by = keyrotd`.
//!
//! The [`Version`] is `<current id>|<pending id>|<previous id>|<hash of keyrotd: tags>`
//! (`-` for none); [`Version::absent`] when the secret does not exist. `apply` re-reads
//! and compares it first (mismatch → `Conflict`), then acts: `Intent` creates the
//! secret (`CreateSecret`, no value) or tags it; `Stage` is `PutSecretValue` with
//! `VersionStages = [AWSPENDING]` and a `ClientRequestToken` derived from (path, key
//! id), so re-staging a key is a no-op; `Promote` moves `AWSCURRENT` with
//! `RemoveFromVersionId` = the current version, which AWS refuses when another writer
//! moved it first — the real compare-and-set — then removes `AWSPENDING` and writes
//! the bookkeeping tags; `Abandon` removes `AWSPENDING` and clears the intent;
//! `Retired` tags the retired key. The comparison before tag-only changes (`Intent`,
//! `Retired`) is not atomic with the write; `Intent` therefore reads back and reports
//! `Conflict` when another writer's intent replaced its own.
//!
//! Transient failures are retried by the SDK's standard retry mode (`max_retries`
//! retries, with throttling backoff). `health` is one unretried `ListSecrets` with one
//! result, bounded: 3 s for the credential chain, 5 s for the request.
//! `probe_write` is read-only: it proves the credentials reach Secrets Manager and may
//! describe the secret (or that it does not exist yet); creating and deleting probe
//! secrets would leave secrets scheduled for deletion behind, so write permission is
//! proven by the first rotation, which stages before it promotes.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_secretsmanager::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_secretsmanager::types::Tag;
use aws_sdk_secretsmanager::Client;
use chrono::{DateTime, SecondsFormat, Utc};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use super::*;
use serde::{Deserialize, Serialize};

// ----- configuration: `[stores.<name>]` with `type = "..."` -----

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    pub region: String,
    #[serde(default)]
    pub endpoint_url: String,
    #[serde(default)]
    pub kms_key_id: String,
    /// Optional named profile of the shared config files.
    #[serde(default)]
    pub profile: String,
    #[serde(default = "super::default_store_retries")]
    pub max_retries: u32,
}

impl AwsConfig {
    /// Checks the section without I/O (see [`super::vault::VaultConfig::validate`]).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.region.trim().is_empty() {
            return Err(("region", "must not be empty".into()));
        }
        if !self.endpoint_url.is_empty() {
            reqwest::Url::parse(&self.endpoint_url)
                .map_err(|e| ("endpoint_url", format!("{:?}: {e}", self.endpoint_url)))?;
        }
        Ok(())
    }
}

const CURRENT: &str = "AWSCURRENT";
const PENDING: &str = "AWSPENDING";
const PREVIOUS: &str = "AWSPREVIOUS";

const TAG_MANAGED_BY: &str = "managed-by";
const TAG_PREFIX: &str = "keyrotd:";
const TAG_INTENT_KEY_NAME: &str = "keyrotd:intent-key-name";
const TAG_INTENT_OWNER: &str = "keyrotd:intent-owner";
const TAG_INTENT_LEASE_UNTIL: &str = "keyrotd:intent-lease-until";
const TAG_INTENT_ATTEMPT: &str = "keyrotd:intent-attempt";
const TAG_INTENT_SA: &str = "keyrotd:intent-service-account-id";
/// Optional beside the other intent tags: an operator's `--revoke-old`.
const TAG_INTENT_REVOKE_OLD: &str = "keyrotd:intent-revoke-old";
const TAG_PROMOTED_KEY_ID: &str = "keyrotd:promoted-key-id";
const TAG_PROMOTED_AT: &str = "keyrotd:promoted-at";
const TAG_PREVIOUS_UNTIL: &str = "keyrotd:previous-until";
const TAG_RETIRED_KEY_ID: &str = "keyrotd:retired-key-id";
/// The project of the keys the secret serves: how a renamed slot finds the secret it
/// was served from ([`SecretStore::find_by_project`]).
const TAG_PROJECT_ID: &str = "keyrotd:project-id";
/// A former path of the slot (a rename), still serving the slot's key to consumers
/// until `keyrotd:former-retire-after`, then deleted (`book.locations`).
const TAG_FORMER_PATH: &str = "keyrotd:former-path";
const TAG_FORMER_RETIRE_AFTER: &str = "keyrotd:former-retire-after";
/// How long a deleted former secret can still be restored (`RestoreSecret`).
const FORMER_RECOVERY_DAYS: i64 = 7;
const INTENT_TAGS: [&str; 5] = [
    TAG_INTENT_KEY_NAME,
    TAG_INTENT_OWNER,
    TAG_INTENT_LEASE_UNTIL,
    TAG_INTENT_ATTEMPT,
    TAG_INTENT_SA,
];

/// Time allowed for one HTTP attempt; the SDK retries after it.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

/// The AWS Secrets Manager backend.
pub struct AwsStore {
    name: String,
    client: Client,
    kms_key_id: Option<String>,
}

impl fmt::Debug for AwsStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsStore")
            .field("name", &self.name)
            .field("kms_key_id", &self.kms_key_id)
            .finish_non_exhaustive()
    }
}

/// What `DescribeSecret` said about a slot's secret.
#[derive(Debug, Default)]
struct Described {
    exists: bool,
    current: Option<String>,
    /// Only when on a version other than `current`.
    pending: Option<String>,
    /// `AWSPENDING` left on the current version by a finished promotion.
    stale_pending_on_current: bool,
    previous: Option<String>,
    tags: BTreeMap<String, String>,
}

impl Described {
    fn tag(&self, key: &str) -> Option<&str> {
        self.tags
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// The version `AWSPENDING` is attached to, wherever that is.
    fn pending_holder(&self) -> Option<&str> {
        self.pending
            .as_deref()
            .or(if self.stale_pending_on_current {
                self.current.as_deref()
            } else {
                None
            })
    }

    fn version(&self) -> Version {
        if !self.exists {
            return Version::absent();
        }
        let mut h = Sha256::new();
        for (k, v) in &self.tags {
            if k.starts_with(TAG_PREFIX) && !v.is_empty() {
                h.update(k.as_bytes());
                h.update(b"=");
                h.update(v.as_bytes());
                h.update(b"\n");
            }
        }
        let hash: String = h
            .finalize()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect();
        let id = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        Version(format!(
            "{}|{}|{}|{hash}",
            id(&self.current),
            id(&self.pending),
            id(&self.previous)
        ))
    }
}

impl AwsStore {
    /// Builds the client from the standard credential chain (env, profile, web
    /// identity/IRSA, IMDS). Makes no request: credentials are resolved on first use.
    pub async fn connect(name: &str, cfg: &AwsConfig) -> StoreResult<Self> {
        let invalid = |m: String| StoreError::new(name, StoreErrorKind::InvalidConfig, m);
        if cfg.region.trim().is_empty() {
            return Err(invalid("region must not be empty".into()));
        }
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(cfg.region.trim().to_string()))
            .retry_config(
                RetryConfig::standard().with_max_attempts(cfg.max_retries.saturating_add(1)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .build(),
            );
        if !cfg.endpoint_url.is_empty() {
            reqwest::Url::parse(&cfg.endpoint_url)
                .map_err(|e| invalid(format!("endpoint_url {:?}: {e}", cfg.endpoint_url)))?;
            loader = loader.endpoint_url(cfg.endpoint_url.clone());
        }
        if !cfg.profile.is_empty() {
            loader = loader.profile_name(cfg.profile.clone());
        }
        let sdk = loader.load().await;
        Ok(AwsStore {
            name: name.to_string(),
            client: Client::new(&sdk),
            kms_key_id: (!cfg.kms_key_id.is_empty()).then(|| cfg.kms_key_id.clone()),
        })
    }

    fn err(&self, kind: StoreErrorKind, message: impl Into<String>) -> StoreError {
        StoreError::new(&self.name, kind, message)
    }

    /// Maps an SDK error. Only the error code, AWS's message and the transport error
    /// chain are used; requests (which may carry a `SecretString`) never are.
    fn classify<E>(&self, what: &str, e: &SdkError<E>) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        match e {
            SdkError::TimeoutError(_) => {
                self.err(StoreErrorKind::Unavailable, format!("{what}: timed out"))
            }
            SdkError::DispatchFailure(_) => self.err(
                StoreErrorKind::Unavailable,
                format!("{what}: {}", error_chain(e)),
            ),
            SdkError::ResponseError(_) => self.err(
                StoreErrorKind::Unavailable,
                format!("{what}: unusable response"),
            ),
            SdkError::ConstructionFailure(_) => self.err(
                StoreErrorKind::InvalidConfig,
                format!("{what}: cannot build the request: {}", error_chain(e)),
            ),
            _ => {
                let code = e.code().unwrap_or("Unknown");
                let status = e.raw_response().map(|r| r.status().as_u16()).unwrap_or(0);
                let kind = match code {
                    "ResourceNotFoundException" => StoreErrorKind::NotFound,
                    "AccessDeniedException"
                    | "AccessDenied"
                    | "UnrecognizedClientException"
                    | "InvalidSignatureException"
                    | "ExpiredTokenException"
                    | "InvalidClientTokenId"
                    | "MissingAuthenticationToken" => StoreErrorKind::PermissionDenied,
                    "ThrottlingException"
                    | "TooManyRequestsException"
                    | "RequestLimitExceeded"
                    | "Throttling" => StoreErrorKind::Throttled,
                    "ResourceExistsException" => StoreErrorKind::Conflict,
                    "InternalServiceError" | "InternalFailure" | "ServiceUnavailable" => {
                        StoreErrorKind::Unavailable
                    }
                    _ if status >= 500 => StoreErrorKind::Unavailable,
                    _ if status == 403 => StoreErrorKind::PermissionDenied,
                    _ => StoreErrorKind::Other,
                };
                let msg = e.message().unwrap_or("");
                self.err(kind, format!("{what}: {code}: {msg}"))
            }
        }
    }

    /// Like [`classify`](Self::classify), but an invalid request or parameter (a stale
    /// `RemoveFromVersionId`) means another writer moved the label: `Conflict`.
    fn classify_label_move<E>(&self, what: &str, e: &SdkError<E>) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let mut err = self.classify(what, e);
        if matches!(
            e.code(),
            Some("InvalidParameterException" | "InvalidRequestException")
        ) {
            err.kind = StoreErrorKind::Conflict;
        }
        err
    }

    fn check_name(&self, path: &str) -> StoreResult<()> {
        check_path(&self.name, path)?;
        let ok = path.len() <= 512
            && path
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/_+=.@-".contains(c));
        if ok {
            Ok(())
        } else {
            Err(self.err(
                StoreErrorKind::InvalidConfig,
                format!("path {path:?} is not a valid secret name (at most 512 of A-Z a-z 0-9 / _ + = . @ -)"),
            ))
        }
    }

    async fn describe(&self, path: &str) -> StoreResult<Described> {
        let what = format!("describe secret {path:?}");
        let out = match self.client.describe_secret().secret_id(path).send().await {
            Ok(o) => o,
            Err(e) => {
                let e = self.classify(&what, &e);
                if e.kind == StoreErrorKind::NotFound {
                    return Ok(Described::default());
                }
                return Err(e);
            }
        };
        if out.deleted_date().is_some() {
            return Err(self.err(
                StoreErrorKind::InvalidData,
                format!("secret {path:?} is scheduled for deletion; restore it (RestoreSecret) or use another path"),
            ));
        }
        let mut d = Described {
            exists: true,
            ..Described::default()
        };
        let mut pending = None;
        if let Some(map) = out.version_ids_to_stages() {
            for (id, stages) in map {
                for s in stages {
                    match s.as_str() {
                        CURRENT => d.current = Some(id.clone()),
                        PENDING => pending = Some(id.clone()),
                        PREVIOUS => d.previous = Some(id.clone()),
                        _ => {}
                    }
                }
            }
        }
        match pending {
            Some(p) if Some(&p) == d.current.as_ref() => d.stale_pending_on_current = true,
            other => d.pending = other,
        }
        for t in out.tags() {
            if let (Some(k), Some(v)) = (t.key(), t.value()) {
                d.tags.insert(k.to_string(), v.to_string());
            }
        }
        Ok(d)
    }

    /// The JSON of one version's `SecretString`.
    async fn value(&self, path: &str, version_id: &str) -> StoreResult<serde_json::Value> {
        let what = format!("read secret {path:?} version {version_id}");
        let out = self
            .client
            .get_secret_value()
            .secret_id(path)
            .version_id(version_id)
            .send()
            .await
            .map_err(|e| self.classify(&what, &e))?;
        let s = out.secret_string().ok_or_else(|| {
            self.err(
                StoreErrorKind::InvalidData,
                format!("{what}: no SecretString (binary secret?)"),
            )
        })?;
        serde_json::from_str(s).map_err(|e| {
            self.err(
                StoreErrorKind::InvalidData,
                format!("{what}: not JSON: {}", json_error_summary(&e)),
            )
        })
    }

    /// A version's record; `None` for the placeholder (no `api_key`, nothing but
    /// `managed_by` / `rotation`). Anything else without `api_key` is someone else's
    /// secret, which keyrotd refuses to take over.
    async fn record(&self, path: &str, version_id: &str) -> StoreResult<Option<SecretRecord>> {
        let v = self.value(path, version_id).await?;
        let Some(obj) = v.as_object() else {
            return Err(self.err(
                StoreErrorKind::InvalidData,
                format!("secret {path:?} version {version_id} is not a JSON object"),
            ));
        };
        if !obj.contains_key("api_key") {
            if obj.keys().all(|k| k == "managed_by" || k == "rotation") {
                return Ok(None);
            }
            return Err(self.err(
                StoreErrorKind::InvalidData,
                format!(
                    "secret {path:?} version {version_id} holds data keyrotd did not write (no `api_key`)"
                ),
            ));
        }
        serde_json::from_value(v).map(Some).map_err(|e| {
            self.err(
                StoreErrorKind::InvalidData,
                format!(
                    "secret {path:?} version {version_id} is not a keyrotd record: {}",
                    json_error_summary(&e)
                ),
            )
        })
    }

    /// Reads the slot: describe, then the current, pending and previous versions.
    async fn read_described(&self, path: &str) -> StoreResult<(SlotState, Described)> {
        self.check_name(path)?;
        let d = self.describe(path).await?;
        if !d.exists {
            return Ok((SlotState::default(), d));
        }
        let current = match &d.current {
            Some(id) => self.record(path, id).await?,
            None => None,
        };
        let pending = match &d.pending {
            Some(id) => self.record(path, id).await?,
            None => None,
        };
        let mut book = Bookkeeping {
            intent: self.intent_from_tags(path, &d)?,
            ..Bookkeeping::default()
        };
        if let Some(id) = &d.previous {
            if let Some(prev) = self.record(path, id).await? {
                if d.tag(TAG_RETIRED_KEY_ID) != Some(prev.key_id.as_str()) {
                    book.previous_key_id = Some(prev.key_id.clone());
                    book.previous_service_account_id = Some(prev.service_account_id.clone());
                }
            }
        }
        if let (Some(cur), Some(key), Some(at)) =
            (&current, d.tag(TAG_PROMOTED_KEY_ID), d.tag(TAG_PROMOTED_AT))
        {
            if cur.key_id == decode_tag(key) {
                book.promoted_at = Some(parse_time(&decode_tag(at)).ok_or_else(|| {
                    self.err(
                        StoreErrorKind::InvalidData,
                        format!("secret {path:?}: bad tag {TAG_PROMOTED_AT}"),
                    )
                })?);
                if let Some(until) = d
                    .tag(TAG_PREVIOUS_UNTIL)
                    .filter(|_| book.previous_key_id.is_some())
                {
                    book.previous_until =
                        Some(parse_time(&decode_tag(until)).ok_or_else(|| {
                            self.err(
                                StoreErrorKind::InvalidData,
                                format!("secret {path:?}: bad tag {TAG_PREVIOUS_UNTIL}"),
                            )
                        })?);
                }
            }
        }
        if let Some(former) = d.tag(TAG_FORMER_PATH) {
            let at = d.tag(TAG_FORMER_RETIRE_AFTER).map(decode_tag);
            let retire_after = at.as_deref().and_then(parse_time).ok_or_else(|| {
                self.err(
                    StoreErrorKind::InvalidData,
                    format!("secret {path:?}: bad or missing tag {TAG_FORMER_RETIRE_AFTER}"),
                )
            })?;
            book.locations.push(Location {
                path: decode_tag(former),
                retire_after: Some(retire_after),
            });
        }
        let state = SlotState {
            current,
            pending,
            book,
            version: d.version(),
        };
        Ok((state, d))
    }

    fn intent_from_tags(&self, path: &str, d: &Described) -> StoreResult<Option<Intent>> {
        let vals: Vec<Option<String>> = INTENT_TAGS
            .iter()
            .map(|k| d.tag(k).map(decode_tag))
            .collect();
        if vals.iter().all(Option::is_none) {
            return Ok(None);
        }
        let bad = || {
            self.err(
                StoreErrorKind::InvalidData,
                format!("secret {path:?}: incomplete or malformed keyrotd:intent-* tags"),
            )
        };
        let get = |i: usize| vals[i].clone().ok_or_else(bad);
        Ok(Some(Intent {
            key_name: get(0)?,
            owner: get(1)?,
            lease_until: parse_time(&get(2)?).ok_or_else(bad)?,
            attempt: get(3)?.parse().map_err(|_| bad())?,
            service_account_id: get(4)?,
            revoke_old: d.tag(TAG_INTENT_REVOKE_OLD).map(decode_tag),
        }))
    }

    fn intent_tags(&self, i: Option<&Intent>) -> StoreResult<Vec<Tag>> {
        let vals = match i {
            Some(i) => vec![
                i.key_name.clone(),
                i.owner.clone(),
                i.lease_until.to_rfc3339_opts(SecondsFormat::Secs, true),
                i.attempt.to_string(),
                i.service_account_id.clone(),
            ],
            None => vec![String::new(); INTENT_TAGS.len()],
        };
        let revoke_old = i.and_then(|i| i.revoke_old.clone()).unwrap_or_default();
        INTENT_TAGS
            .iter()
            .zip(vals)
            .chain(std::iter::once((&TAG_INTENT_REVOKE_OLD, revoke_old)))
            .map(|(k, v)| self.tag(k, &v))
            .collect()
    }

    fn tag(&self, key: &str, value: &str) -> StoreResult<Tag> {
        let v = encode_tag(value).ok_or_else(|| {
            self.err(
                StoreErrorKind::InvalidData,
                format!("value for tag {key} is too long"),
            )
        })?;
        Ok(Tag::builder().key(key).value(v).build())
    }

    fn managed_tag(&self) -> Tag {
        Tag::builder().key(TAG_MANAGED_BY).value(MANAGED_BY).build()
    }

    async fn put_tags(&self, path: &str, tags: Vec<Tag>) -> StoreResult<()> {
        let what = format!("tag secret {path:?}");
        self.client
            .tag_resource()
            .secret_id(path)
            .set_tags(Some(tags))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.classify(&what, &e))
    }

    async fn create(&self, path: &str, tags: Vec<Tag>) -> StoreResult<()> {
        let what = format!("create secret {path:?}");
        self.client
            .create_secret()
            .name(path)
            .set_tags(Some(tags))
            .set_kms_key_id(self.kms_key_id.clone())
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.classify(&what, &e))
    }

    async fn put_value(
        &self,
        path: &str,
        token: &str,
        value: &str,
        stage: &str,
    ) -> StoreResult<()> {
        let what = format!("put a value into secret {path:?} as {stage}");
        self.client
            .put_secret_value()
            .secret_id(path)
            .client_request_token(token)
            .secret_string(value)
            .version_stages(stage)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.classify_label_move(&what, &e))
    }

    /// Moves `stage` onto `to` (off `from`), or only removes it from `from`.
    async fn move_stage(
        &self,
        path: &str,
        stage: &str,
        from: Option<&str>,
        to: Option<&str>,
    ) -> StoreResult<()> {
        let what = format!("move {stage} of secret {path:?}");
        self.client
            .update_secret_version_stage()
            .secret_id(path)
            .version_stage(stage)
            .set_remove_from_version_id(from.map(str::to_string))
            .set_move_to_version_id(to.map(str::to_string))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.classify_label_move(&what, &e))
    }

    async fn stage(&self, path: &str, d: &Described, rec: &SecretRecord) -> StoreResult<()> {
        let token = request_token("stage", path, &rec.key_id);
        if d.pending.as_deref() == Some(token.as_str())
            || d.current.as_deref() == Some(token.as_str())
        {
            return Ok(()); // already staged (or already current)
        }
        if !d.exists {
            self.create(
                path,
                vec![
                    self.managed_tag(),
                    self.tag(TAG_PROJECT_ID, &rec.project_id)?,
                ],
            )
            .await?;
        }
        if d.current.is_none() {
            // The first version of a secret always becomes AWSCURRENT: make that a
            // placeholder, so the unverified key is never what consumers read.
            let placeholder = serde_json::json!({ "managed_by": MANAGED_BY }).to_string();
            self.put_value(
                path,
                &request_token("placeholder", path, ""),
                &placeholder,
                CURRENT,
            )
            .await?;
        }
        let value = serde_json::to_string(rec).map_err(|e| {
            self.err(
                StoreErrorKind::Other,
                format!("cannot encode the record: {}", json_error_summary(&e)),
            )
        })?;
        self.put_value(path, &token, &value, PENDING)
            .await
            .map_err(|e| scrub_err(e, &rec.api_key))?;
        // A version with this token that had lost its labels (an abandoned stage of the
        // same key) is left as it was by PutSecretValue: attach AWSPENDING explicitly.
        let after = self.describe(path).await?;
        if after.pending.as_deref() != Some(token.as_str())
            && after.current.as_deref() != Some(token.as_str())
        {
            self.move_stage(path, PENDING, after.pending_holder(), Some(&token))
                .await?;
        }
        if !d.tags.contains_key(TAG_MANAGED_BY) || d.tag(TAG_PROJECT_ID).is_none() {
            let tags = vec![
                self.managed_tag(),
                self.tag(TAG_PROJECT_ID, &rec.project_id)?,
            ];
            self.put_tags(path, tags).await?;
        }
        Ok(())
    }

    async fn promote(
        &self,
        path: &str,
        state: &SlotState,
        d: &Described,
        key_id: &str,
        at: DateTime<Utc>,
        previous_until: Option<DateTime<Utc>>,
    ) -> StoreResult<()> {
        let pending_is_key = state.pending.as_ref().is_some_and(|p| p.key_id == key_id);
        let until = |t: Option<DateTime<Utc>>| {
            t.map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
                .unwrap_or_default()
        };
        let mut tags = self.intent_tags(None)?;
        if pending_is_key {
            let to = d.pending.as_deref();
            self.move_stage(path, CURRENT, d.current.as_deref(), to)
                .await?;
            // Feature `failpoints` (tests): a crash between the two label moves.
            fail::fail_point!("aws_between_label_moves", |_| std::process::abort());
            if let Err(e) = self.move_stage(path, PENDING, to, None).await {
                // Harmless: AWSPENDING on the current version reads as "no pending".
                tracing::warn!(event = "aws.pending_label_left", store = %self.name, path, error = %e);
            }
            tags.push(self.tag(TAG_PROMOTED_KEY_ID, key_id)?);
            tags.push(self.tag(
                TAG_PROMOTED_AT,
                &at.to_rfc3339_opts(SecondsFormat::Secs, true),
            )?);
            tags.push(self.tag(TAG_PREVIOUS_UNTIL, &until(previous_until))?);
        } else {
            // Already current: finish what a crashed promotion left undone.
            if d.stale_pending_on_current {
                self.move_stage(path, PENDING, d.current.as_deref(), None)
                    .await?;
            }
            if state.book.promoted_at.is_none() {
                tags.push(self.tag(TAG_PROMOTED_KEY_ID, key_id)?);
                tags.push(self.tag(
                    TAG_PROMOTED_AT,
                    &at.to_rfc3339_opts(SecondsFormat::Secs, true),
                )?);
                tags.push(self.tag(TAG_PREVIOUS_UNTIL, &until(previous_until))?);
            } else if state.book.previous_until.is_none() && previous_until.is_some() {
                tags.push(self.tag(TAG_PREVIOUS_UNTIL, &until(previous_until))?);
            }
        }
        tags.push(self.managed_tag());
        self.put_tags(path, tags).await
    }

    /// `Import` into a secret that serves nothing yet (a renamed slot adopting the key
    /// its former secret serves): the former location's tags first (so a crash leaves
    /// the former path known), then the key staged and promoted with the state's grace
    /// clock. Only the current key and one former location are carried over.
    async fn import(
        &self,
        path: &str,
        state: &SlotState,
        d: &Described,
        st: &SlotState,
    ) -> StoreResult<()> {
        if state.current.is_some() {
            return Err(self.err(
                StoreErrorKind::Conflict,
                format!("secret {path:?} already serves a key; nothing imported"),
            ));
        }
        let Some(rec) = &st.current else {
            return Ok(());
        };
        let mut tags = vec![
            self.managed_tag(),
            self.tag(TAG_PROJECT_ID, &rec.project_id)?,
        ];
        if let Some(l) = st.book.locations.iter().find(|l| l.path != path) {
            let at = l.retire_after.unwrap_or_else(Utc::now);
            tags.push(self.tag(TAG_FORMER_PATH, &l.path)?);
            tags.push(self.tag(
                TAG_FORMER_RETIRE_AFTER,
                &at.to_rfc3339_opts(SecondsFormat::Secs, true),
            )?);
        }
        if d.exists {
            self.put_tags(path, tags).await?;
        } else {
            self.create(path, tags).await?;
        }
        let (_, d) = self.read_described(path).await?;
        self.stage(path, &d, rec).await?;
        let (staged, d) = self.read_described(path).await?;
        let at = st.book.promoted_at.unwrap_or_else(Utc::now);
        self.promote(path, &staged, &d, &rec.key_id, at, None).await
    }

    async fn abandon(&self, path: &str, d: &Described) -> StoreResult<()> {
        if !d.exists {
            return Ok(());
        }
        if let Some(p) = d.pending.as_deref() {
            self.move_stage(path, PENDING, Some(p), None).await?;
        }
        if d.stale_pending_on_current {
            self.move_stage(path, PENDING, d.current.as_deref(), None)
                .await?;
        }
        if INTENT_TAGS.iter().any(|k| d.tag(k).is_some()) {
            self.put_tags(path, self.intent_tags(None)?).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl SecretStore for AwsStore {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "aws_secrets_manager"
    }

    /// The consumer-visible value is the `AWSCURRENT` version; pending versions and
    /// bookkeeping tags beside it are invisible to consumers reading `AWSCURRENT`.
    fn layout(&self) -> Layout {
        Layout::WithConsumer
    }

    /// Tag writes are not compare-and-set (only the label move at promotion is).
    fn state_is_compare_and_set(&self) -> bool {
        false
    }

    async fn read(&self, path: &str) -> StoreResult<SlotState> {
        Ok(self.read_described(path).await?.0)
    }

    async fn apply(
        &self,
        path: &str,
        expected: &Version,
        t: &Transition,
    ) -> StoreResult<SlotState> {
        let (state, d) = self.read_described(path).await?;
        if &state.version != expected {
            return Err(self.err(
                StoreErrorKind::Conflict,
                format!(
                    "secret {path:?} changed since it was read (expected version {:?}, found {:?})",
                    expected.0, state.version.0
                ),
            ));
        }
        state
            .apply(t)
            .map_err(|e| self.err(StoreErrorKind::Conflict, format!("secret {path:?}: {e}")))?;
        if matches!(t, Transition::Relocate { .. } | Transition::Release { .. }) {
            // Only stores with a separate state record track moves this way; here a
            // move is an `Import` into the new secret naming the former one.
            return Err(self.err(
                StoreErrorKind::InvalidConfig,
                format!("secret {path:?}: {t:?} needs a separate state record"),
            ));
        }
        match t {
            Transition::Intent(i) => {
                let mut tags = self.intent_tags(Some(i))?;
                tags.push(self.managed_tag());
                if d.exists {
                    self.put_tags(path, tags).await?;
                } else {
                    self.create(path, tags).await?;
                }
            }
            Transition::Stage(rec) => self.stage(path, &d, rec).await?,
            Transition::Promote {
                key_id,
                at,
                previous_until,
            } => {
                self.promote(path, &state, &d, key_id, *at, *previous_until)
                    .await?
            }
            Transition::Abandon => self.abandon(path, &d).await?,
            Transition::Retired { key_id } => {
                self.put_tags(path, vec![self.tag(TAG_RETIRED_KEY_ID, key_id)?])
                    .await?
            }
            Transition::Import(st) => self.import(path, &state, &d, st).await?,
            Transition::DropLocation { .. } => {
                let tags = vec![
                    self.tag(TAG_FORMER_PATH, "")?,
                    self.tag(TAG_FORMER_RETIRE_AFTER, "")?,
                ];
                self.put_tags(path, tags).await?
            }
            Transition::Relocate { .. } | Transition::Release { .. } => {}
        }
        let (after, _) = self.read_described(path).await?;
        // Tag-only writes are not compare-and-set: detect a concurrent writer after the fact.
        let lost = match t {
            Transition::Intent(i) => after.book.intent.as_ref() != Some(i),
            Transition::Stage(rec) => {
                after.pending.as_ref().map(|p| &p.key_id) != Some(&rec.key_id)
                    && after.current.as_ref().map(|c| &c.key_id) != Some(&rec.key_id)
            }
            Transition::Promote { key_id, .. } => {
                after.current.as_ref().map(|c| &c.key_id) != Some(key_id)
            }
            Transition::Import(st) => {
                after.current.as_ref().map(|c| &c.key_id) != st.current.as_ref().map(|c| &c.key_id)
            }
            _ => false,
        };
        if lost {
            return Err(self.err(
                StoreErrorKind::Conflict,
                format!("secret {path:?} was changed by another writer at the same time"),
            ));
        }
        Ok(after)
    }

    async fn health(&self) -> StoreResult<()> {
        let resolved = Arc::new(AtomicBool::new(false));
        let call = self
            .client
            .list_secrets()
            .max_results(1)
            .customize()
            .config_override(
                aws_sdk_secretsmanager::config::Builder::default()
                    .retry_config(RetryConfig::disabled()),
            )
            .interceptor(CredentialsResolved(resolved.clone()))
            .send();
        tokio::pin!(call);
        let secs = |d: Duration| d.as_secs();
        let result = tokio::select! {
            r = &mut call => r,
            () = tokio::time::sleep(HEALTH_CREDENTIALS_BOUND) => {
                if !resolved.load(Ordering::SeqCst) {
                    return Err(self.err(
                        StoreErrorKind::InvalidConfig,
                        format!(
                            "no AWS credentials within {}s (the health check's bound on \
                             the credential chain: environment, profile, web identity, \
                             container, instance metadata, which off EC2 may never answer)",
                            secs(HEALTH_CREDENTIALS_BOUND)
                        ),
                    ));
                }
                match tokio::time::timeout(HEALTH_REQUEST_BOUND, &mut call).await {
                    Ok(r) => r,
                    Err(_) => {
                        return Err(self.err(
                            StoreErrorKind::Unavailable,
                            format!(
                                "list secrets: no answer within {}s (the bound on the request)",
                                secs(HEALTH_REQUEST_BOUND)
                            ),
                        ))
                    }
                }
            }
        };
        match result {
            Ok(_) => Ok(()),
            // Failed before the request was signed: the credential chain gave nothing.
            Err(e @ SdkError::DispatchFailure(_)) if !resolved.load(Ordering::SeqCst) => {
                let cause = std::error::Error::source(&e)
                    .and_then(|connector| connector.source())
                    .map(error_chain)
                    .unwrap_or_else(|| error_chain(&e));
                Err(self.err(
                    StoreErrorKind::InvalidConfig,
                    format!("no AWS credentials: {cause}"),
                ))
            }
            Err(e) => Err(self.classify("list secrets", &e)),
        }
    }

    async fn probe_write(&self, path: &str) -> StoreResult<()> {
        self.check_name(path)?;
        self.describe(path).await.map(|_| ())
    }

    /// `ListSecrets` filtered by the `keyrotd:project-id` tag, to the last page; secrets
    /// scheduled for deletion are left out.
    async fn find_by_project(&self, project_id: &str) -> StoreResult<Vec<String>> {
        use aws_sdk_secretsmanager::types::{Filter, FilterNameStringType};
        let Some(value) = encode_tag(project_id) else {
            return Ok(Vec::new());
        };
        let filters = vec![
            Filter::builder()
                .key(FilterNameStringType::TagKey)
                .values(TAG_PROJECT_ID)
                .build(),
            Filter::builder()
                .key(FilterNameStringType::TagValue)
                .values(value.clone())
                .build(),
        ];
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for _page in 0..100 {
            let r = self
                .client
                .list_secrets()
                .set_filters(Some(filters.clone()))
                .set_next_token(token.clone())
                .max_results(100)
                .send()
                .await
                .map_err(|e| self.classify("list secrets by project", &e))?;
            for s in r.secret_list() {
                let tagged = s
                    .tags()
                    .iter()
                    .any(|t| t.key() == Some(TAG_PROJECT_ID) && t.value() == Some(&value));
                if tagged && s.deleted_date().is_none() {
                    if let Some(name) = s.name() {
                        out.push(name.to_string());
                    }
                }
            }
            token = r.next_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        Ok(out)
    }

    /// `DeleteSecret` with a recovery window of 7 days, if the secret is still at
    /// `expected`; one already gone (or already scheduled for deletion) is done.
    async fn remove(&self, path: &str, expected: &Version) -> StoreResult<()> {
        self.check_name(path)?;
        let d = match self.describe(path).await {
            Ok(d) => d,
            Err(e) if e.kind == StoreErrorKind::InvalidData => return Ok(()),
            Err(e) => return Err(e),
        };
        if !d.exists {
            return Ok(());
        }
        if &d.version() != expected {
            return Err(self.err(
                StoreErrorKind::Conflict,
                format!("secret {path:?} changed since it was read; not deleted"),
            ));
        }
        let what = format!("delete secret {path:?}");
        match self
            .client
            .delete_secret()
            .secret_id(path)
            .recovery_window_in_days(FORMER_RECOVERY_DAYS)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = self.classify(&what, &e);
                if e.kind == StoreErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }
}

/// `health`'s bound on the credential chain: on a host that is not EC2 the chain
/// otherwise waits ~20 s for the instance metadata service.
const HEALTH_CREDENTIALS_BOUND: Duration = Duration::from_secs(3);
/// `health`'s bound on its one `ListSecrets` attempt once credentials are there.
const HEALTH_REQUEST_BOUND: Duration = Duration::from_secs(5);

/// Records that a request got as far as being signed, i.e. that the credential chain
/// produced credentials (`health` tells "no credentials" from "unreachable" by it).
#[derive(Debug)]
struct CredentialsResolved(Arc<AtomicBool>);

impl aws_sdk_secretsmanager::config::Intercept for CredentialsResolved {
    fn name(&self) -> &'static str {
        "keyrotd.credentials_resolved"
    }

    fn read_after_signing(
        &self,
        _: &aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef<'_>,
        _: &aws_sdk_secretsmanager::config::RuntimeComponents,
        _: &mut aws_sdk_secretsmanager::config::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// Replaces the secret in an error's message (defence in depth: AWS does not echo
/// values, but an emulator or proxy might).
fn scrub_err(mut e: StoreError, secret: &secrecy::SecretString) -> StoreError {
    if !secret.expose_secret().is_empty() {
        e.message = scrub(&e.message, secret);
    }
    e
}

/// A UUID-shaped `ClientRequestToken` derived from (purpose, path, key id): the same
/// key staged again under the same path yields the same version id.
fn request_token(purpose: &str, path: &str, key_id: &str) -> String {
    let mut h = Sha256::new();
    for part in ["keyrotd", purpose, path, key_id] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    let mut b: [u8; 16] = [0; 16];
    b.copy_from_slice(&h.finalize()[..16]);
    b[6] = (b[6] & 0x0f) | 0x50; // version 5 (name-based, SHA)
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Characters AWS allows in tag values everywhere (ASCII subset).
fn tag_safe(c: char) -> bool {
    c.is_ascii_alphanumeric() || " _.:/=+-@".contains(c)
}

/// A tag value: as is when it fits AWS's alphabet, else `hex:<bytes>`; `None` when
/// longer than 256 characters.
fn encode_tag(v: &str) -> Option<String> {
    let out = if v.chars().all(tag_safe) && !v.starts_with("hex:") {
        v.to_string()
    } else {
        format!(
            "hex:{}",
            v.bytes().map(|b| format!("{b:02x}")).collect::<String>()
        )
    };
    (out.len() <= 256).then_some(out)
}

fn decode_tag(v: &str) -> String {
    let Some(hex) = v.strip_prefix("hex:") else {
        return v.to_string();
    };
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    bytes
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_else(|| v.to_string())
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_tokens_are_uuid_shaped_and_deterministic() {
        let a = request_token("stage", "openai/p/sa", "key_1");
        assert_eq!(a.len(), 36);
        assert_eq!(a, request_token("stage", "openai/p/sa", "key_1"));
        assert_ne!(a, request_token("stage", "openai/p/sa", "key_2"));
        assert_ne!(a, request_token("stage", "openai/p/sb", "key_1"));
        assert_eq!(&a[14..15], "5");
    }

    #[test]
    fn tag_values_round_trip() {
        for v in [
            "keyrotd-20261127T020000Z-1",
            "host:123:abc",
            "weird\"value{}",
            "hex:abc",
            "",
        ] {
            let e = encode_tag(v).unwrap();
            assert!(e.chars().all(tag_safe), "{e}");
            assert_eq!(decode_tag(&e), v);
        }
        assert!(encode_tag(&"x".repeat(257)).is_none());
    }
}
