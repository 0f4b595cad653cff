//! Secret stores: where consumers read the slot's key, and where the engine keeps a
//! slot's rotation state.
//!
//! The store layer knows nothing of OpenAI. A slot's state (an intent recorded before
//! minting, a staged *pending* record, the previous key id and when it was promoted,
//! the paths the key is served at) is a [`SlotState`], read with
//! [`SecretStore::read`] and changed only through [`Transition`]s, whose meaning is
//! fixed once, in [`SlotState::apply`]; every write is compare-and-set on a
//! [`Version`]. Where it lives is the backend's [`Layout`]: Vault and the file store
//! keep it in a state record at [`state_key`] (the slot's identity) and write consumer
//! documents, the six DESIGN.md §3 fields and nothing else, with
//! [`SecretStore::write_consumer`]; AWS Secrets Manager maps it onto the version
//! stages and tags of the consumer secret itself.
//!
//! Adding a backend: one file with its `[stores.<name>]` config struct (and its pure
//! `validate`) and an implementation of [`SecretStore`], one arm in
//! [`crate::config::StoreConfig`] and one in [`build`].

pub mod aws;
pub mod file;
pub mod vault;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::config::StoreConfig;

/// Value of the `managed_by` field and of the `managed-by` tag/metadata.
pub const MANAGED_BY: &str = "keyrotd";

/// The six fields of DESIGN.md §3: what consumers read.
#[derive(Clone, Serialize, Deserialize)]
pub struct SecretRecord {
    #[serde(with = "secret_string")]
    pub api_key: SecretString,
    pub key_id: String,
    pub project_id: String,
    pub service_account_id: String,
    pub created_at: DateTime<Utc>,
    pub managed_by: String,
}

impl fmt::Debug for SecretRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretRecord")
            .field("api_key", &"[REDACTED]")
            .field("key_id", &self.key_id)
            .field("project_id", &self.project_id)
            .field("service_account_id", &self.service_account_id)
            .field("created_at", &self.created_at)
            .field("managed_by", &self.managed_by)
            .finish()
    }
}

impl PartialEq for SecretRecord {
    fn eq(&self, other: &Self) -> bool {
        self.api_key.expose_secret() == other.api_key.expose_secret()
            && self.key_id == other.key_id
            && self.project_id == other.project_id
            && self.service_account_id == other.service_account_id
            && self.created_at == other.created_at
            && self.managed_by == other.managed_by
    }
}

/// Serde for `SecretString` that writes the value (stores must hold it) but is only
/// used inside store documents.
pub mod secret_string {
    use secrecy::{ExposeSecret, SecretString};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &SecretString, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.expose_secret())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
        Ok(SecretString::from(String::deserialize(d)?))
    }
}

/// Recorded before minting so that a key created by a process that then died can be
/// found again by its exact name (the create endpoint has no idempotency key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// Exact name the key is (about to be) created with: `keyrotd-<UTC timestamp>-<attempt>`.
    pub key_name: String,
    /// Identifies the process that recorded the intent (hostname:pid:random).
    pub owner: String,
    /// Until then the owner is presumed alive and working on the slot.
    pub lease_until: DateTime<Utc>,
    pub attempt: u32,
    /// The service account the key is minted on (differs from the current record's
    /// with strategy `new_service_account`).
    pub service_account_id: String,
    /// An operator's `--revoke-old` for the key this rotation replaces (`now`, `15m`),
    /// so that whichever process finishes the rotation keeps it; `None`: the rule's
    /// grace period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke_old: Option<String>,
}

/// Rotation bookkeeping kept beside the six fields (`rotation` in the JSON document).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Bookkeeping {
    pub intent: Option<Intent>,
    /// The key the current one replaced; revoked after the grace period.
    pub previous_key_id: Option<String>,
    /// Service account of the previous key (strategy `new_service_account` deletes it).
    pub previous_service_account_id: Option<String>,
    /// When the current key was promoted: the grace clock.
    pub promoted_at: Option<DateTime<Utc>>,
    /// An operator's deadline for the previous key (`keyrotd rotate --revoke-old
    /// DURATION`): revoked then, instead of by the rule's grace period and use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_until: Option<DateTime<Utc>>,
    /// Where this store serves the slot's current key (stores whose state record is
    /// separate from the consumer documents, [`Layout::Separate`]): the path the rule
    /// renders now, and paths it rendered before (a renamed project or account, an
    /// edited `path`) that keep serving until their `retire_after`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub locations: Vec<Location>,
    /// Set when the slot's rule no longer names this store: its documents keep serving
    /// until then, and are removed after.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub released_until: Option<DateTime<Utc>>,
}

/// One path at which a store serves a slot's key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    pub path: String,
    /// `None` while the rule renders this path; else when its document is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_after: Option<DateTime<Utc>>,
}

/// How a backend keeps a slot's rotation state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// A state record addressed by the slot's identity ([`state_key`]), apart from
    /// the consumer documents at rendered paths, which hold the six fields only and
    /// change once per rotation (Vault, file).
    Separate,
    /// The state lives with the consumer-visible value at the rendered path, in
    /// metadata consumers do not read (AWS: version stages and tags).
    WithConsumer,
}

/// Where stores with [`Layout::Separate`] keep slot state records. Rule paths may not
/// start with it.
pub const STATE_PREFIX: &str = "_keyrotd/slots";

/// The state record's path for the slot identity (project id, service account id).
pub fn state_key(project_id: &str, service_account_id: &str) -> String {
    format!("{STATE_PREFIX}/{project_id}/{service_account_id}")
}

/// A consumer document as read: the record consumers see, and, for a document of the
/// 0.1 layout (bookkeeping inside the consumer document), the state it carried.
#[derive(Clone, Debug, Default)]
pub struct ConsumerDoc {
    pub record: Option<SecretRecord>,
    /// The `rotation` bookkeeping of a 0.1-layout document, to migrate.
    pub legacy: Option<SlotState>,
    pub version: Version,
}

/// Opaque compare-and-set token: Vault's metadata version, a hash of the file's
/// content, AWS's current/pending version ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Version(pub String);

impl Version {
    /// The version of a path that holds nothing yet (Vault `cas = 0`).
    pub fn absent() -> Self {
        Version(String::new())
    }
    pub fn is_absent(&self) -> bool {
        self.0.is_empty()
    }
}

/// One store's view of one slot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlotState {
    /// What consumers read now.
    pub current: Option<SecretRecord>,
    /// Staged, not yet promoted (AWS: the `AWSPENDING` version).
    pub pending: Option<SecretRecord>,
    pub book: Bookkeeping,
    /// Compare-and-set token for the next write; [`Version::absent`] when nothing is stored.
    pub version: Version,
}

/// The only ways the engine changes a slot's state in a store.
#[derive(Clone, Debug)]
pub enum Transition {
    /// Record an intent before minting.
    Intent(Intent),
    /// Stage the new record as pending (the intent stays until promotion).
    Stage(SecretRecord),
    /// Make the pending record with this key id current; the old current becomes the
    /// previous key; intent and pending are cleared; `promoted_at` is set, and the
    /// previous key's deadline (`previous_until`, `None` for the rule's grace).
    /// Idempotent: when the key is already current it only sets a missing
    /// `promoted_at` and deadline.
    Promote {
        key_id: String,
        at: DateTime<Utc>,
        previous_until: Option<DateTime<Utc>>,
    },
    /// Drop the intent and any pending record (verification failed, race lost, orphan
    /// cleaned up). The current record is untouched.
    Abandon,
    /// The previous key (this id) has been revoked: forget it.
    Retired { key_id: String },
    /// Replace the whole state (migrating a 0.1 document, adopting a slot's key from
    /// the store it moved away from, re-keying the record to another account).
    Import(Box<SlotState>),
    /// The rule renders `to` now: add it as a location, and retire every other
    /// location after `retire_after`.
    Relocate {
        to: String,
        retire_after: DateTime<Utc>,
    },
    /// The document at `path` has been removed: forget the location.
    DropLocation { path: String },
    /// The slot's rule no longer names this store: retire its locations after
    /// `until`.
    Release { until: DateTime<Utc> },
}

impl Transition {
    /// The promotion of `key_id` at `at` with no deadline for the previous key (its
    /// grace period and use decide): every promotion but an operator's
    /// `--revoke-old DURATION`.
    pub fn promote(key_id: impl Into<String>, at: DateTime<Utc>) -> Transition {
        Transition::Promote {
            key_id: key_id.into(),
            at,
            previous_until: None,
        }
    }
}

/// Why a transition cannot be applied to a state; a bug or a concurrent writer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("nothing is pending with key id {0}")]
    NotPending(String),
    #[error("the previous key is not {0}")]
    NotPrevious(String),
}

impl SlotState {
    /// The pure meaning of a transition. Document stores (Vault, file) persist the
    /// result; it is also the reference the AWS backend's stage moves are tested against.
    pub fn apply(&self, t: &Transition) -> Result<SlotState, TransitionError> {
        let mut next = self.clone();
        match t {
            Transition::Intent(intent) => next.book.intent = Some(intent.clone()),
            Transition::Stage(rec) => next.pending = Some(rec.clone()),
            Transition::Promote {
                key_id,
                at,
                previous_until,
            } => {
                let pending = match (&self.pending, &self.current) {
                    (Some(p), _) if &p.key_id == key_id => p.clone(),
                    // Already promoted (a retry after a crash, or AWS's label moved but
                    // the grace clock was not written): only fill in what is missing.
                    (_, Some(c)) if &c.key_id == key_id => {
                        if next.pending.as_ref().is_some_and(|p| &p.key_id == key_id) {
                            next.pending = None;
                        }
                        next.book.intent = None;
                        next.book.promoted_at.get_or_insert(*at);
                        if next.book.previous_key_id.is_some() {
                            next.book.previous_until = next.book.previous_until.or(*previous_until);
                        }
                        return Ok(next);
                    }
                    _ => return Err(TransitionError::NotPending(key_id.clone())),
                };
                if let Some(cur) = &self.current {
                    if cur.key_id != pending.key_id {
                        next.book.previous_key_id = Some(cur.key_id.clone());
                        next.book.previous_service_account_id =
                            Some(cur.service_account_id.clone());
                    }
                }
                next.current = Some(pending);
                next.pending = None;
                next.book.intent = None;
                next.book.promoted_at = Some(*at);
                next.book.previous_until = next
                    .book
                    .previous_key_id
                    .is_some()
                    .then_some(*previous_until)
                    .flatten();
            }
            Transition::Abandon => {
                next.pending = None;
                next.book.intent = None;
            }
            Transition::Retired { key_id } => {
                if self.book.previous_key_id.as_deref() != Some(key_id.as_str()) {
                    return Err(TransitionError::NotPrevious(key_id.clone()));
                }
                next.book.previous_key_id = None;
                next.book.previous_service_account_id = None;
                next.book.previous_until = None;
            }
            Transition::Import(state) => {
                next = SlotState {
                    version: self.version.clone(),
                    ..(**state).clone()
                };
            }
            Transition::Relocate { to, retire_after } => {
                for l in &mut next.book.locations {
                    if &l.path == to {
                        l.retire_after = None;
                    } else if l.retire_after.is_none() {
                        l.retire_after = Some(*retire_after);
                    }
                }
                if !next.book.locations.iter().any(|l| &l.path == to) {
                    next.book.locations.push(Location {
                        path: to.clone(),
                        retire_after: None,
                    });
                }
            }
            Transition::DropLocation { path } => next.book.locations.retain(|l| &l.path != path),
            Transition::Release { until } => {
                next.book.released_until.get_or_insert(*until);
                for l in &mut next.book.locations {
                    l.retire_after.get_or_insert(*until);
                }
            }
        }
        Ok(next)
    }

    /// Nothing recorded: no record, no intent, no pending key, no previous key, no
    /// location (a state record that does not exist reads like this).
    pub fn is_empty(&self) -> bool {
        self.current.is_none()
            && self.pending.is_none()
            && self.book.intent.is_none()
            && self.book.previous_key_id.is_none()
            && self.book.locations.is_empty()
    }

    /// Every key id this state references (current, pending, previous).
    pub fn referenced_key_ids(&self) -> impl Iterator<Item = &str> {
        self.current
            .iter()
            .chain(self.pending.iter())
            .map(|r| r.key_id.as_str())
            .chain(self.book.previous_key_id.as_deref())
    }
}

/// The JSON document Vault and the file store keep: the six fields flattened at the
/// top (absent before the first promotion) and the bookkeeping under `rotation`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Document {
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub current: Option<SecretRecord>,
    #[serde(default)]
    pub rotation: DocRotation,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DocRotation {
    #[serde(flatten)]
    pub book: Bookkeeping,
    pub pending: Option<SecretRecord>,
}

impl Document {
    pub fn from_state(s: &SlotState) -> Self {
        Document {
            current: s.current.clone(),
            rotation: DocRotation {
                book: s.book.clone(),
                pending: s.pending.clone(),
            },
        }
    }

    pub fn into_state(self, version: Version) -> SlotState {
        SlotState {
            current: self.current,
            pending: self.rotation.pending,
            book: self.rotation.book,
            version,
        }
    }
}

/// What kind of failure a store reported; retry logic reads [`StoreError::is_temporary`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    NotFound,
    PermissionDenied,
    /// Check-and-set mismatch: another writer changed the slot.
    Conflict,
    Throttled,
    Unavailable,
    InvalidConfig,
    /// The stored document is not what keyrotd writes.
    InvalidData,
    Other,
}

impl fmt::Display for StoreErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StoreErrorKind::NotFound => "not found",
            StoreErrorKind::PermissionDenied => "permission denied",
            StoreErrorKind::Conflict => "check-and-set conflict",
            StoreErrorKind::Throttled => "throttled",
            StoreErrorKind::Unavailable => "unavailable",
            StoreErrorKind::InvalidConfig => "invalid config",
            StoreErrorKind::InvalidData => "invalid data",
            StoreErrorKind::Other => "error",
        })
    }
}

/// A store failure. The message never contains a secret value.
#[derive(Debug, Clone, thiserror::Error)]
#[error("store {store:?}: {kind}: {message}")]
pub struct StoreError {
    pub store: String,
    pub kind: StoreErrorKind,
    pub message: String,
}

impl StoreError {
    pub fn new(store: impl Into<String>, kind: StoreErrorKind, message: impl Into<String>) -> Self {
        StoreError {
            store: store.into(),
            kind,
            message: message.into(),
        }
    }

    /// Worth retrying: throttling and unavailability.
    pub fn is_temporary(&self) -> bool {
        matches!(
            self.kind,
            StoreErrorKind::Throttled | StoreErrorKind::Unavailable
        )
    }
}

pub type StoreResult<T> = std::result::Result<T, StoreError>;

/// A secret-store backend.
#[async_trait]
pub trait SecretStore: Send + Sync + fmt::Debug {
    /// The name the config gives this store (`[stores.<name>]`).
    fn name(&self) -> &str;

    /// The backend type (`vault`, `aws_secrets_manager`, `file`).
    fn kind(&self) -> &'static str;

    /// How this backend keeps rotation state; see [`Layout`].
    fn layout(&self) -> Layout {
        Layout::Separate
    }

    /// Whether every state write is compare-and-set (AWS's tag writes are not): such a
    /// store decides a race between two processes, so the engine writes it first.
    fn state_is_compare_and_set(&self) -> bool {
        true
    }

    /// Reads the consumer document at `path` ([`Layout::Separate`] backends).
    async fn read_consumer(&self, path: &str) -> StoreResult<ConsumerDoc> {
        let _ = path;
        Err(StoreError::new(
            self.name(),
            StoreErrorKind::InvalidConfig,
            "this backend keeps no separate consumer documents",
        ))
    }

    /// Writes the consumer document at `path` (the six fields of `record`; `None`
    /// removes it) if it is still at `expected`; returns the new version.
    async fn write_consumer(
        &self,
        path: &str,
        record: Option<&SecretRecord>,
        expected: &Version,
    ) -> StoreResult<Version> {
        let _ = (path, record, expected);
        Err(StoreError::new(
            self.name(),
            StoreErrorKind::InvalidConfig,
            "this backend keeps no separate consumer documents",
        ))
    }

    /// Reads the slot at `path`. A path that holds nothing yields a default state with
    /// [`Version::absent`].
    async fn read(&self, path: &str) -> StoreResult<SlotState>;

    /// Applies `t` if the slot is still at `expected` (else `Conflict`), and returns the
    /// new state as stored.
    async fn apply(&self, path: &str, expected: &Version, t: &Transition)
        -> StoreResult<SlotState>;

    /// Applies `t` to `current`, a state this store returned for `path` (from `read` or
    /// `apply`), if the slot is still at `current.version` (else `Conflict`). Backends
    /// whose writes compare-and-set on the version skip the re-read `apply` needs; the
    /// default is `apply`.
    async fn apply_to(
        &self,
        path: &str,
        current: &SlotState,
        t: &Transition,
    ) -> StoreResult<SlotState> {
        self.apply(path, &current.version, t).await
    }

    /// Proves the store is reachable and the credentials work.
    async fn health(&self) -> StoreResult<()>;

    /// Proves keyrotd may write under `path` without disturbing a slot (writes and
    /// removes a probe next to it, or checks capabilities).
    async fn probe_write(&self, path: &str) -> StoreResult<()>;

    /// Paths of the slots this store holds for `project_id` ([`Layout::WithConsumer`]
    /// backends, which tag each slot's secret with its project): how a slot whose path
    /// changed finds where it was served. Others keep their state by identity and
    /// return nothing.
    async fn find_by_project(&self, _project_id: &str) -> StoreResult<Vec<String>> {
        Ok(Vec::new())
    }

    /// Removes the slot at `path` (value and state) if it is still at `expected`
    /// ([`Layout::WithConsumer`] backends: a former path whose grace period is over).
    async fn remove(&self, path: &str, _expected: &Version) -> StoreResult<()> {
        Err(StoreError::new(
            self.name(),
            StoreErrorKind::InvalidConfig,
            format!("{path:?}: this backend removes consumer documents with write_consumer"),
        ))
    }
}

pub type DynStore = Arc<dyn SecretStore>;

/// Store-call retries on 5xx / connection errors, unless a section says otherwise.
fn default_store_retries() -> u32 {
    4
}

/// Builds the backend a `[stores.<name>]` section describes. Connects (logs in) but
/// writes nothing.
pub async fn build(name: &str, cfg: &StoreConfig) -> StoreResult<DynStore> {
    Ok(match cfg {
        StoreConfig::File(c) => Arc::new(file::FileStore::new(name, c)?),
        StoreConfig::Vault(c) => Arc::new(vault::VaultStore::connect(name, c).await?),
        StoreConfig::AwsSecretsManager(c) => Arc::new(aws::AwsStore::connect(name, c).await?),
    })
}

/// Checks a slot path every backend accepts: relative, `/`-separated, no empty, `.` or
/// `..` segment, no control character. Backends add their own limits on top.
pub fn check_path(store: &str, path: &str) -> StoreResult<()> {
    let refuse = |why: &str| {
        Err(StoreError::new(
            store,
            StoreErrorKind::InvalidConfig,
            format!("path {path:?} {why}"),
        ))
    };
    if path.is_empty() {
        return refuse("is empty");
    }
    if path.starts_with('/') {
        return refuse("is absolute; paths are relative to the store");
    }
    if path.chars().any(char::is_control) {
        return refuse("contains a control character");
    }
    if path
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return refuse("has an empty, '.' or '..' segment");
    }
    Ok(())
}

/// Describes a JSON (de)serialisation error without quoting the offending value, which
/// may be a secret: serde's "invalid type: string \"sk-...\"" messages echo input.
pub fn json_error_summary(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    if msg.starts_with("missing field") || msg.starts_with("unknown field") {
        return msg;
    }
    let what = match e.classify() {
        serde_json::error::Category::Io => "I/O error".to_string(),
        serde_json::error::Category::Syntax => "malformed JSON".to_string(),
        // "invalid type: string \"<value>\", expected u32": keep only what was expected,
        // which serde derives from the type, never from the input.
        serde_json::error::Category::Data => match msg.rsplit_once(", expected ") {
            Some((_, expected)) if !expected.contains('"') => {
                format!("unexpected JSON value (expected {expected})")
            }
            _ => "unexpected JSON value".to_string(),
        },
        serde_json::error::Category::Eof => "truncated JSON".to_string(),
    };
    if e.line() == 0 {
        what
    } else {
        format!("{what} at line {} column {}", e.line(), e.column())
    }
}

/// An error and its sources, `: `-separated, each level's `Display` only.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.ends_with(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}

/// Replaces every occurrence of `secret` in `message`, and whatever else looks like a
/// secret (for messages built from server responses that could conceivably echo a
/// value keyrotd sent): [`crate::redact::known`].
pub fn scrub(message: &str, secret: &SecretString) -> String {
    crate::redact::known(message, secret)
}

/// Waits between store retries: 200 ms doubling, at most 10 s, jittered.
pub const STORE_BACKOFF: crate::backoff::Backoff = crate::backoff::Backoff::new(
    std::time::Duration::from_millis(200),
    std::time::Duration::from_secs(10),
);

/// Runs `op` again while it fails with a temporary error ([`StoreError::is_temporary`]),
/// at most `max_retries` more times, waiting [`STORE_BACKOFF`] between attempts.
pub async fn retry_temporary<T, F, Fut>(max_retries: u32, mut op: F) -> StoreResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = StoreResult<T>>,
{
    let mut attempt = 0u32;
    loop {
        match op().await {
            Err(e) if e.is_temporary() && attempt < max_retries => {
                let wait = STORE_BACKOFF.wait(attempt);
                tracing::debug!(
                    event = "store.retry",
                    store = %e.store,
                    attempt = attempt + 1,
                    wait_ms = wait.as_millis() as u64,
                    kind = %e.kind,
                    "retrying a temporary store failure"
                );
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Parses a stored [`Document`] strictly: a record that is present must be complete
/// (a half-written or hand-edited record is an error, not an empty slot), and an
/// object holding neither the six fields nor `rotation` is someone else's secret,
/// which keyrotd refuses to overwrite. `{}` is an empty slot.
pub fn parse_document(v: serde_json::Value) -> Result<Document, String> {
    const FIELDS: [&str; 6] = [
        "api_key",
        "key_id",
        "project_id",
        "service_account_id",
        "created_at",
        "managed_by",
    ];
    let serde_json::Value::Object(mut map) = v else {
        return Err("not a JSON object".into());
    };
    let rotation = match map.remove("rotation") {
        Some(r) => Some(
            serde_json::from_value::<DocRotation>(r)
                .map_err(|e| format!("bad `rotation`: {}", json_error_summary(&e)))?,
        ),
        None => None,
    };
    let has_record = FIELDS.iter().any(|f| map.contains_key(*f));
    if !has_record && rotation.is_none() && !map.is_empty() {
        return Err("holds data keyrotd did not write (neither `api_key` nor `rotation`)".into());
    }
    let current = if has_record {
        Some(
            serde_json::from_value::<SecretRecord>(serde_json::Value::Object(map))
                .map_err(|e| format!("bad record: {}", json_error_summary(&e)))?,
        )
    } else {
        None
    };
    Ok(Document {
        current,
        rotation: rotation.unwrap_or_default(),
    })
}

/// Parses a consumer document ([`parse_document`]'s rules): the record, and the
/// bookkeeping of a 0.1-layout document (any `rotation` object) as `legacy`.
pub fn parse_consumer(v: serde_json::Value, version: Version) -> Result<ConsumerDoc, String> {
    let had_rotation = v.get("rotation").is_some();
    let doc = parse_document(v)?;
    let record = doc.current.clone();
    let legacy = had_rotation.then(|| doc.into_state(version.clone()));
    Ok(ConsumerDoc {
        record,
        legacy,
        version,
    })
}

#[cfg(test)]
mod document_tests {
    use super::*;

    #[test]
    fn strict_documents() {
        let empty = parse_document(serde_json::json!({})).unwrap();
        assert!(empty.current.is_none());
        let book_only =
            parse_document(serde_json::json!({"rotation": {"previous_key_id": "k0"}})).unwrap();
        assert_eq!(
            book_only.rotation.book.previous_key_id.as_deref(),
            Some("k0")
        );
        let full = parse_document(serde_json::json!({
            "api_key": "sk-x", "key_id": "k1", "project_id": "p", "service_account_id": "s",
            "created_at": "2026-11-27T02:00:00Z", "managed_by": "keyrotd", "rotation": {}
        }))
        .unwrap();
        assert_eq!(full.current.unwrap().key_id, "k1");
        let half =
            parse_document(serde_json::json!({"api_key": "sk-secret-value", "key_id": "k1"}));
        assert!(half.unwrap_err().contains("missing field"));
        let foreign = parse_document(serde_json::json!({"password": "hunter2"}));
        assert!(foreign.unwrap_err().contains("did not write"));
        let leaky = parse_document(serde_json::json!({"rotation": {"intent": "sk-secret-value"}}));
        assert!(!leaky.unwrap_err().contains("sk-secret-value"));
    }
}
