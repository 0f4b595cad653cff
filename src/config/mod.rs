//! Configuration (DESIGN.md §2): a TOML file plus `KEYROTD__SECTION__KEY` overrides.
//!
//! Loading is two steps, as in vector: [`Config::load`] parses and runs the pure
//! [`Config::validate`] (no I/O beyond reading the file and the admin key); connecting
//! to stores happens later, in [`crate::store::build`].
//!
//! This file is the schema and its loading and validation; beside it, `rules`
//! (compiled rules, the glob fast paths, the path template), `schedule` (the cron
//! expression) and `secret` (secrets from an environment variable or a file). Each
//! store backend's section is defined in the backend's own file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// A configuration problem; always names the offending key. Shown with secret-shaped
/// values masked ([`crate::redact`]): a key pasted into the wrong field is not echoed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {}", crate::redact::secrets(message))]
    File { path: String, message: String },
    #[error("config key `{key}`: {}", crate::redact::secrets(message))]
    Invalid { key: String, message: String },
    /// A `KEYROTD__*` override is what the file plus the other overrides cannot take.
    #[error("environment variable {var}: {}", crate::redact::secrets(message))]
    Env { var: String, message: String },
}

impl ConfigError {
    /// A problem with config key `key`.
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub openai: OpenAiConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub stores: BTreeMap<String, StoreConfig>,
    #[serde(default)]
    pub rotate: Vec<RuleConfig>,
    #[serde(default)]
    pub notify: NotifyConfig,
    #[serde(default)]
    pub usage: UsageConfig,
}

/// `[usage]`: usage and cost per key from the Usage and Costs APIs, and
/// `key.usage_anomaly` (on by default; `enabled = false` switches it off).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    pub enabled: bool,
    /// How far back usage and cost are read each cycle (1 h buckets; at most 31 days).
    #[serde(with = "humantime_serde")]
    pub lookback: Duration,
    /// A key whose last-hour requests exceed this multiple of its own hourly baseline
    /// (its mean over the lookback before the last hour) is anomalous.
    pub spike_factor: f64,
    /// ... and only when the last hour saw at least this many requests.
    pub spike_min_requests: u64,
    /// What an anomaly does: `report` (log, metric, webhook) or `rotate` (also rotate
    /// the slot serving the key at once, its replaced key revoked once every store
    /// has the new one; user keys are only reported).
    pub on_anomaly: OnAnomaly,
}

/// `usage.on_anomaly`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnAnomaly {
    #[default]
    Report,
    Rotate,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            enabled: true,
            lookback: Duration::from_secs(7 * 86400),
            spike_factor: 10.0,
            spike_min_requests: 100,
            on_anomaly: OnAnomaly::Report,
        }
    }
}

impl UsageConfig {
    /// Pure checks. Errors name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let d = self.lookback;
        if d < Duration::from_secs(86400) || d > Duration::from_secs(31 * 86400) {
            return Err(ConfigError::invalid(
                "usage.lookback",
                format!("{} is outside 1d..=31d", humantime::format_duration(d)),
            ));
        }
        if d.as_secs() % 3600 != 0 {
            return Err(ConfigError::invalid(
                "usage.lookback",
                format!(
                    "{} is not a whole number of hours (usage is read in 1 h buckets)",
                    humantime::format_duration(d)
                ),
            ));
        }
        if !self.spike_factor.is_finite() || self.spike_factor <= 1.0 {
            return Err(ConfigError::invalid(
                "usage.spike_factor",
                format!("{} must be a number greater than 1", self.spike_factor),
            ));
        }
        if self.spike_min_requests == 0 {
            return Err(ConfigError::invalid(
                "usage.spike_min_requests",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Cron, 5-field (crontab) or 6-field (with seconds), UTC.
    pub schedule: String,
    pub run_on_start: bool,
    /// Parallel API calls / rotations.
    pub concurrency: usize,
    /// `/metrics`, `/healthz`, `/readyz`; off when unset.
    pub listen: Option<String>,
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Identifies this process in intents (defaults to hostname:pid).
    pub instance_id: Option<String>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            schedule: "0 */15 * * * *".into(),
            run_on_start: true,
            concurrency: 8,
            listen: None,
            shutdown_timeout: Duration::from_secs(30),
            instance_id: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiConfig {
    pub base_url: String,
    pub admin_key_env: Option<String>,
    pub admin_key_file: Option<PathBuf>,
    /// Refused: secrets are never inline. Present only to say so clearly.
    #[serde(skip_serializing)]
    pub admin_key: Option<serde::de::IgnoredAny>,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    pub max_retries: u32,
    /// Cap on a server-requested `retry-after` wait.
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
    /// Most pages one listing (projects, one project's keys or service accounts, admin
    /// keys) may take before it is stopped with an error naming the endpoint.
    pub max_pages: u32,
    /// Largest response body read, a byte count or `"8MiB"`; reading stops at the cap.
    pub max_response_bytes: ByteSize,
    /// Deadline of one scan of the organization (a cycle's, `plan`'s, `report`'s).
    #[serde(with = "humantime_serde")]
    pub scan_timeout: Duration,
    pub include_archived: bool,
    /// Keep the admin key in this store (a `[stores.<name>]`): keyrotd reads it from the
    /// record's `api_key` at `admin_key_path`, re-reads it every cycle, and may rotate
    /// it. `admin_key_env`/`admin_key_file` are then optional and only seed an empty
    /// store (see [`crate::rotation::admin_key`]).
    pub admin_key_store: Option<String>,
    /// Path of the admin key's record in `admin_key_store` (default
    /// [`DEFAULT_ADMIN_KEY_PATH`]).
    pub admin_key_path: Option<String>,
    /// Rotate the admin key itself once it is older than `admin_key_max_age`; needs
    /// `admin_key_store`.
    pub rotate_admin_key: bool,
    /// Age at which the stored admin key is rotated (default: `policy.max_age`).
    #[serde(with = "humantime_serde")]
    pub admin_key_max_age: Option<Duration>,
}

/// Where the admin key's record lives in `openai.admin_key_store` by default.
pub const DEFAULT_ADMIN_KEY_PATH: &str = "keyrotd/admin-key";

/// Default `openai.scan_timeout`: well inside the default 15-minute schedule.
pub const DEFAULT_SCAN_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// Bounds of `openai.max_response_bytes`: below 64 KiB a full page of keys may not fit;
/// above 1 GiB the cap protects nothing.
const MIN_RESPONSE_BYTES: u64 = 64 << 10;
const MAX_RESPONSE_BYTES: u64 = 1 << 30;

/// A size in bytes: an integer (`8388608`) or a string with a binary unit (`"8MiB"`,
/// `"512KiB"`, `"1GiB"`, `"100B"`). Serialised as the integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `"8MiB"`-style text (units B, KiB, MiB, GiB, case-insensitive; none
    /// means bytes).
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "kib" => 10,
            "mib" => 20,
            "gib" => 30,
            _ => return Err(format!("{text:?}: unknown unit (use B, KiB, MiB or GiB)")),
        };
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("{text:?}: expected a size like 8388608 or \"8MiB\""))?;
        n.checked_mul(1 << shift)
            .map(ByteSize)
            .ok_or_else(|| format!("{text:?}: too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size in bytes, like 8388608 or \"8MiB\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("{v} is negative")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
            if n >= 1 << shift && n % (1 << shift) == 0 {
                return write!(f, "{}{unit}", n >> shift);
            }
        }
        write!(f, "{n}B")
    }
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        OpenAiConfig {
            base_url: "https://api.openai.com/v1".into(),
            admin_key_env: None,
            admin_key_file: None,
            admin_key: None,
            request_timeout: Duration::from_secs(30),
            max_retries: 6,
            max_retry_after: Duration::from_secs(60),
            max_pages: crate::openai::DEFAULT_MAX_PAGES,
            max_response_bytes: ByteSize(crate::openai::DEFAULT_MAX_RESPONSE_BYTES),
            scan_timeout: DEFAULT_SCAN_TIMEOUT,
            include_archived: false,
            admin_key_store: None,
            admin_key_path: None,
            rotate_admin_key: false,
            admin_key_max_age: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UserKeys {
    Report,
    Revoke,
}

/// `none` or a duration after which OpenAI expires newly minted keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct KeyExpiry(pub Option<Duration>);

impl<'de> Deserialize<'de> for KeyExpiry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim().eq_ignore_ascii_case("none") || s.trim().is_empty() {
            return Ok(KeyExpiry(None));
        }
        humantime::parse_duration(s.trim())
            .map(|d| KeyExpiry(Some(d)))
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "{s:?}: {e} (use \"none\" or a duration like \"90d\")"
                ))
            })
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
    pub verify: bool,
    /// Every cycle, check that the key each slot serves still authenticates
    /// (`GET /models` with it); one that answers 401 is replaced at once.
    pub verify_served: bool,
    pub user_keys: UserKeys,
    pub key_expiry: KeyExpiry,
    /// A key whose `expires_at` falls within this window is `expiring_soon` (rotated).
    #[serde(with = "humantime_serde")]
    pub expiry_warning: Duration,
    /// A `keyrotd-*` key no store references is swept only when older than this, so a
    /// concurrent process's freshly minted key is never taken for an orphan.
    #[serde(with = "humantime_serde")]
    pub orphan_min_age: Duration,
    /// How long an intent protects a slot from other processes.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How long verification retries a new key before giving up.
    #[serde(with = "humantime_serde")]
    pub verify_timeout: Duration,
    /// When a slot's previous key is revoked: `grace` (after `grace_period`) or
    /// `unused` (once `last_used_at` shows no use since promotion, between `min_grace`
    /// and `max_grace`).
    pub revoke_when: RevokeWhen,
    /// With `revoke_when = "unused"`: never revoke sooner than this after promotion.
    #[serde(with = "humantime_serde")]
    pub min_grace: Duration,
    /// With `revoke_when = "unused"`: revoke at this age even if still in use.
    #[serde(with = "humantime_serde")]
    pub max_grace: Duration,
    /// How late the Admin API may report a key's use (`last_used_at`).
    #[serde(with = "humantime_serde")]
    pub usage_report_delay: Duration,
    /// At promotion, ask OpenAI to expire the replaced key at the end of its grace
    /// period (plus [`EXPIRY_MARGIN`]), so it dies even if keyrotd never runs again;
    /// under `revoke_when = "unused"` the expiry is extended while the key is in use,
    /// up to `max_grace`.
    pub expire_replaced: bool,
}

/// How long after the end of its grace period (or `max_grace`) a replaced key expires
/// under `policy.expire_replaced`: keyrotd's own revocation comes first.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(10 * 60);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RevokeWhen {
    #[default]
    Grace,
    Unused,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            max_age: Duration::from_secs(90 * 86400),
            grace_period: Duration::from_secs(86400),
            verify: true,
            verify_served: true,
            user_keys: UserKeys::Report,
            key_expiry: KeyExpiry(None),
            expiry_warning: Duration::from_secs(7 * 86400),
            orphan_min_age: Duration::from_secs(3600),
            lease: Duration::from_secs(60),
            verify_timeout: Duration::from_secs(30),
            revoke_when: RevokeWhen::Grace,
            min_grace: Duration::from_secs(3600),
            max_grace: Duration::from_secs(7 * 86400),
            usage_report_delay: Duration::from_secs(15 * 60),
            expire_replaced: true,
        }
    }
}

/// A `[stores.<name>]` section; `type` picks the backend.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum StoreConfig {
    Vault(VaultConfig),
    AwsSecretsManager(AwsConfig),
    File(FileConfig),
}

impl StoreConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            StoreConfig::Vault(_) => "vault",
            StoreConfig::AwsSecretsManager(_) => "aws_secrets_manager",
            StoreConfig::File(_) => "file",
        }
    }
}

mod rules;
mod schedule;
mod secret;

pub(crate) use rules::{compile_glob, match_nothing, validate_path_template};
pub use rules::{PathVars, Pattern, Rule, PATH_VARS};
pub use schedule::parse_schedule;
pub use secret::{read_secret, read_secret_file};

pub use crate::store::aws::AwsConfig;
pub use crate::store::file::FileConfig;
pub use crate::store::vault::{VaultAuth, VaultConfig};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Mint on the same service account; fall back to a new service account when the
    /// API refuses to delete a service account's key.
    #[default]
    Auto,
    SameServiceAccount,
    NewServiceAccount,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    /// Project id or name, glob.
    pub project: String,
    /// Service-account name, glob.
    #[serde(default = "default_star")]
    pub service_account: String,
    pub stores: Vec<String>,
    pub path: String,
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub grace_period: Option<Duration>,
    #[serde(default)]
    pub verify: Option<bool>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub strategy: Strategy,
}

fn default_star() -> String {
    "*".into()
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    pub webhooks: Vec<WebhookConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Environment variable holding the URL (webhook URLs are credentials).
    pub url_env: Option<String>,
    pub url_file: Option<PathBuf>,
    #[serde(default)]
    pub format: WebhookFormat,
    /// Events to send; empty = all.
    #[serde(default)]
    pub events: Vec<NotifyEvent>,
}

/// What a webhook can be told about (the `event` field of its payload).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
pub enum NotifyEvent {
    /// A slot's new key was promoted in every store.
    #[serde(rename = "rotation.completed")]
    RotationCompleted,
    /// A slot failed this cycle (it is retried next cycle).
    #[serde(rename = "rotation.failed")]
    RotationFailed,
    /// A user-owned key is stale (user keys cannot be re-issued by the API).
    #[serde(rename = "key.stale_user")]
    StaleUserKey,
    /// A previous key is still used after its grace period (`revoke_when = "unused"`).
    #[serde(rename = "key.still_in_use")]
    KeyStillInUse,
    /// A served key no longer authenticates; the slot was rotated at once.
    #[serde(rename = "key.invalid")]
    KeyInvalid,
    /// A key was created by a person (not keyrotd) on a service account a slot manages.
    #[serde(rename = "key.created_outside")]
    KeyCreatedOutside,
    /// A key's traffic is anomalous (a spike, or traffic on a key that should be quiet).
    #[serde(rename = "key.usage_anomaly")]
    KeyUsageAnomaly,
}

impl NotifyEvent {
    /// The event name as sent and configured.
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyEvent::RotationCompleted => "rotation.completed",
            NotifyEvent::RotationFailed => "rotation.failed",
            NotifyEvent::StaleUserKey => "key.stale_user",
            NotifyEvent::KeyStillInUse => "key.still_in_use",
            NotifyEvent::KeyInvalid => "key.invalid",
            NotifyEvent::KeyCreatedOutside => "key.created_outside",
            NotifyEvent::KeyUsageAnomaly => "key.usage_anomaly",
        }
    }
}

impl NotifyConfig {
    /// Pure checks: each webhook names exactly one URL source.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (i, w) in self.webhooks.iter().enumerate() {
            if w.url_env.is_some() == w.url_file.is_some() {
                return Err(ConfigError::invalid(
                    format!("notify.webhooks[{i}].url_env"),
                    "set exactly one of url_env and url_file (webhook URLs are credentials: \
                     never inline)",
                ));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    #[default]
    Json,
    Slack,
}

/// Where the admin key comes from; the key itself is read by [`Config::admin_key`]
/// (environment, file) or when the stores are connected ([`crate::app::admin_key`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminKeySource {
    Env(String),
    File(PathBuf),
    /// The record at `path` in store `store`; `seed` (environment or file) is read
    /// only while that store holds no record yet.
    Store {
        store: String,
        path: String,
        seed: Option<Box<AdminKeySource>>,
    },
}

/// The admin key kept in a store (`openai.admin_key_store`), and its rotation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminKeyStore {
    pub store: String,
    pub path: String,
    pub rotate: bool,
    /// Rotate once the stored key is older than this.
    pub max_age: Duration,
}

impl Config {
    /// Reads `path` (TOML), applies `KEYROTD__*` environment overrides, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        if !path.exists() {
            return Err(ConfigError::File {
                path: path.display().to_string(),
                message: "not found (set --config or KEYROTD_CONFIG)".into(),
            });
        }
        let file = || {
            config::Config::builder()
                .add_source(config::File::from(path).format(config::FileFormat::Toml))
        };
        Self::from_sources(file, &path.display().to_string())
    }

    /// Parses TOML text (plus environment overrides) and validates it.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let file = || {
            config::Config::builder()
                .add_source(config::File::from_str(text, config::FileFormat::Toml))
        };
        Self::from_sources(file, "<inline>")
    }

    /// Parses and validates `file()` plus the `KEYROTD__*` overrides; an error an
    /// override causes names the variable ([`blame_env`]).
    fn from_sources(
        file: impl Fn() -> config::ConfigBuilder<config::builder::DefaultState>,
        origin: &str,
    ) -> Result<Config, ConfigError> {
        let parse = |env: config::Environment| -> Result<Config, ConfigError> {
            let raw = file()
                .add_source(env)
                .build()
                .map_err(|e| ConfigError::File {
                    path: origin.to_string(),
                    message: e.to_string(),
                })?;
            let cfg: Config = raw
                .try_deserialize()
                .map_err(|e| map_config_error(origin, e))?;
            cfg.validate()?;
            Ok(cfg)
        };
        parse(env_source()).map_err(|e| blame_env(&parse, env_vars(), e))
    }

    /// Pure checks that serde cannot express. Errors name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.notify.validate()?;
        self.usage.validate()?;
        parse_schedule(&self.daemon.schedule)
            .map_err(|m| ConfigError::invalid("daemon.schedule", m))?;
        if self.daemon.concurrency == 0 || self.daemon.concurrency > 256 {
            return Err(ConfigError::invalid(
                "daemon.concurrency",
                format!("{} is outside 1..=256", self.daemon.concurrency),
            ));
        }
        if let Some(listen) = &self.daemon.listen {
            listen.parse::<std::net::SocketAddr>().map_err(|e| {
                ConfigError::invalid(
                    "daemon.listen",
                    format!("{listen:?} is not host:port ({e})"),
                )
            })?;
        }
        if self.openai.admin_key.is_some() {
            return Err(ConfigError::invalid(
                "openai.admin_key",
                "inline admin keys are refused: a key in a config file leaks through backups, \
                 ConfigMaps and `ps`; use admin_key_env or admin_key_file (a systemd credential \
                 or a Kubernetes Secret mount)",
            ));
        }
        self.validate_admin_key_store()?;
        self.admin_key_source()?;
        let url = reqwest::Url::parse(&self.openai.base_url).map_err(|e| {
            ConfigError::invalid(
                "openai.base_url",
                format!("{:?}: {e}", self.openai.base_url),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ConfigError::invalid(
                "openai.base_url",
                "scheme must be http or https",
            ));
        }
        if self.openai.max_retries > 20 {
            return Err(ConfigError::invalid("openai.max_retries", "at most 20"));
        }
        if self.openai.max_pages == 0 {
            return Err(ConfigError::invalid(
                "openai.max_pages",
                "must be at least 1",
            ));
        }
        let size = self.openai.max_response_bytes;
        if !(MIN_RESPONSE_BYTES..=MAX_RESPONSE_BYTES).contains(&size.0) {
            return Err(ConfigError::invalid(
                "openai.max_response_bytes",
                format!(
                    "{size} is outside {}..={}",
                    ByteSize(MIN_RESPONSE_BYTES),
                    ByteSize(MAX_RESPONSE_BYTES)
                ),
            ));
        }
        if self.openai.scan_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "openai.scan_timeout",
                "must be greater than zero",
            ));
        }
        if self.policy.min_grace > self.policy.max_grace {
            return Err(ConfigError::invalid(
                "policy.min_grace",
                format!(
                    "{} is longer than policy.max_grace ({})",
                    humantime::format_duration(self.policy.min_grace),
                    humantime::format_duration(self.policy.max_grace)
                ),
            ));
        }
        if self.policy.max_age.is_zero() {
            return Err(ConfigError::invalid(
                "policy.max_age",
                "must be greater than zero",
            ));
        }
        self.validate_duration_bounds()?;
        for (name, store) in &self.stores {
            validate_store(name, store)?;
        }
        let mut names = std::collections::HashSet::new();
        for (i, rule) in self.rotate.iter().enumerate() {
            let key = |k: &str| format!("rotate[{i}].{k}");
            if rule.name.trim().is_empty() {
                return Err(ConfigError::invalid(key("name"), "must not be empty"));
            }
            if !names.insert(rule.name.as_str()) {
                return Err(ConfigError::invalid(
                    key("name"),
                    format!("duplicate rule name {:?}", rule.name),
                ));
            }
            compile_glob(&rule.project).map_err(|m| ConfigError::invalid(key("project"), m))?;
            compile_glob(&rule.service_account)
                .map_err(|m| ConfigError::invalid(key("service_account"), m))?;
            if rule.stores.is_empty() {
                return Err(ConfigError::invalid(
                    key("stores"),
                    "name at least one store",
                ));
            }
            for s in &rule.stores {
                if !self.stores.contains_key(s) {
                    let known: Vec<&str> = self.stores.keys().map(String::as_str).collect();
                    return Err(ConfigError::invalid(
                        key("stores"),
                        format!("unknown store {s:?} (configured: {known:?})"),
                    ));
                }
            }
            validate_path_template(&rule.path).map_err(|m| ConfigError::invalid(key("path"), m))?;
            if rule.max_age == Some(Duration::ZERO) {
                return Err(ConfigError::invalid(
                    key("max_age"),
                    "must be greater than zero",
                ));
            }
        }
        Ok(())
    }

    /// Durations take part in date arithmetic (`now + lease`, `promoted_at +
    /// grace_period`, ...): beyond chrono's range that panics at run time, and anything
    /// over a century is a typo. Refused here, naming the key.
    fn validate_duration_bounds(&self) -> Result<(), ConfigError> {
        const MAX: Duration = Duration::from_secs(100 * 365 * 86400);
        let p = &self.policy;
        let mut all: Vec<(String, Duration)> = [
            ("daemon.shutdown_timeout", self.daemon.shutdown_timeout),
            ("openai.request_timeout", self.openai.request_timeout),
            ("openai.max_retry_after", self.openai.max_retry_after),
            ("openai.scan_timeout", self.openai.scan_timeout),
            (
                "openai.admin_key_max_age",
                self.openai.admin_key_max_age.unwrap_or_default(),
            ),
            ("policy.max_age", p.max_age),
            ("policy.grace_period", p.grace_period),
            ("policy.key_expiry", p.key_expiry.0.unwrap_or_default()),
            ("policy.expiry_warning", p.expiry_warning),
            ("policy.orphan_min_age", p.orphan_min_age),
            ("policy.lease", p.lease),
            ("policy.verify_timeout", p.verify_timeout),
            ("policy.min_grace", p.min_grace),
            ("policy.max_grace", p.max_grace),
            ("policy.usage_report_delay", p.usage_report_delay),
        ]
        .into_iter()
        .map(|(k, d)| (k.to_string(), d))
        .collect();
        for (i, r) in self.rotate.iter().enumerate() {
            all.push((
                format!("rotate[{i}].max_age"),
                r.max_age.unwrap_or_default(),
            ));
            all.push((
                format!("rotate[{i}].grace_period"),
                r.grace_period.unwrap_or_default(),
            ));
        }
        for (key, d) in all {
            if d > MAX {
                return Err(ConfigError::invalid(
                    key,
                    format!("{} is more than 100 years", humantime::format_duration(d)),
                ));
            }
        }
        Ok(())
    }

    /// Rotation needs at least one rule; `plan` and `check-config` do not.
    pub fn require_rules(&self) -> Result<(), ConfigError> {
        if self.rotate.is_empty() {
            return Err(ConfigError::invalid(
                "rotate",
                "no [[rotate]] rules: nothing would ever be rotated; add a rule or use `keyrotd plan`",
            ));
        }
        Ok(())
    }

    /// Where the admin key comes from: `admin_key_store` when set (with
    /// `admin_key_env`/`admin_key_file`, if any, as its seed), else exactly one of
    /// `admin_key_env` and `admin_key_file`.
    pub fn admin_key_source(&self) -> Result<AdminKeySource, ConfigError> {
        let direct = match (&self.openai.admin_key_env, &self.openai.admin_key_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    "openai.admin_key_env",
                    "set only one of admin_key_env and admin_key_file",
                ))
            }
            (Some(env), None) if !env.trim().is_empty() => Some(AdminKeySource::Env(env.clone())),
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "openai.admin_key_env",
                    "must name an environment variable",
                ))
            }
            (None, Some(file)) => Some(AdminKeySource::File(file.clone())),
            (None, None) => None,
        };
        match (self.admin_key_store(), direct) {
            (Some(s), seed) => Ok(AdminKeySource::Store {
                store: s.store,
                path: s.path,
                seed: seed.map(Box::new),
            }),
            (None, Some(direct)) => Ok(direct),
            (None, None) => Err(ConfigError::invalid(
                "openai.admin_key_env",
                "no admin key source: set admin_key_env (an environment variable name), \
                 admin_key_file, or admin_key_store",
            )),
        }
    }

    /// The admin key's store, path and rotation settings, when it is kept in a store.
    pub fn admin_key_store(&self) -> Option<AdminKeyStore> {
        let store = self.openai.admin_key_store.clone()?;
        Some(AdminKeyStore {
            store,
            path: self
                .openai
                .admin_key_path
                .clone()
                .unwrap_or_else(|| DEFAULT_ADMIN_KEY_PATH.to_string()),
            rotate: self.openai.rotate_admin_key,
            max_age: self.openai.admin_key_max_age.unwrap_or(self.policy.max_age),
        })
    }

    /// Pure checks of `admin_key_store` and the keys that depend on it.
    fn validate_admin_key_store(&self) -> Result<(), ConfigError> {
        let o = &self.openai;
        let Some(store) = &o.admin_key_store else {
            for (set, key) in [
                (o.admin_key_path.is_some(), "openai.admin_key_path"),
                (o.rotate_admin_key, "openai.rotate_admin_key"),
                (o.admin_key_max_age.is_some(), "openai.admin_key_max_age"),
            ] {
                if set {
                    return Err(ConfigError::invalid(
                        key,
                        "needs openai.admin_key_store: only an admin key kept in a store can be \
                         rotated (the new key must be stored before the old one is deleted)",
                    ));
                }
            }
            return Ok(());
        };
        if !self.stores.contains_key(store) {
            let known: Vec<&str> = self.stores.keys().map(String::as_str).collect();
            return Err(ConfigError::invalid(
                "openai.admin_key_store",
                format!("unknown store {store:?} (configured: {known:?})"),
            ));
        }
        if let Some(path) = &o.admin_key_path {
            crate::store::check_path(store, path)
                .map_err(|e| ConfigError::invalid("openai.admin_key_path", e.message))?;
        }
        if o.admin_key_max_age.is_some() && !o.rotate_admin_key {
            return Err(ConfigError::invalid(
                "openai.admin_key_max_age",
                "has no effect without openai.rotate_admin_key = true",
            ));
        }
        if o.admin_key_max_age == Some(Duration::ZERO) {
            return Err(ConfigError::invalid(
                "openai.admin_key_max_age",
                "must be greater than zero",
            ));
        }
        let path = o
            .admin_key_path
            .as_deref()
            .unwrap_or(DEFAULT_ADMIN_KEY_PATH);
        for (i, rule) in self.rotate.iter().enumerate() {
            if rule.stores.contains(store) && !rule.path.contains('{') && rule.path == path {
                return Err(ConfigError::invalid(
                    format!("rotate[{i}].path"),
                    format!("{path:?} in store {store:?} is where the admin key is kept"),
                ));
            }
        }
        Ok(())
    }

    /// Checks that the admin key can be read without connecting anywhere: the
    /// environment variable or file (for a store source, the seed, when one is set).
    /// A key kept in a store is checked by `check-config --connect`.
    pub fn check_admin_key(&self) -> Result<(), ConfigError> {
        self.admin_key_seed().map(|_| ())
    }

    /// The key from `admin_key_env`/`admin_key_file`: the admin key itself, or, with
    /// `admin_key_store`, the seed for an empty store (`None` when none is set).
    pub fn admin_key_seed(&self) -> Result<Option<SecretString>, ConfigError> {
        match self.admin_key_source()? {
            AdminKeySource::Store { seed: None, .. } => Ok(None),
            _ => self.admin_key().map(Some),
        }
    }

    /// Reads the admin key from its environment variable or file (with
    /// `admin_key_store`: the seed; an error when there is none, since the key itself
    /// is only known once the store is read).
    pub fn admin_key(&self) -> Result<SecretString, ConfigError> {
        let source = match self.admin_key_source()? {
            AdminKeySource::Store {
                seed: Some(seed), ..
            } => *seed,
            AdminKeySource::Store {
                store,
                path,
                seed: None,
            } => {
                return Err(ConfigError::invalid(
                    "openai.admin_key_store",
                    format!(
                        "the admin key is kept in store {store:?} at {path:?} and is read \
                         when keyrotd connects to it"
                    ),
                ))
            }
            direct => direct,
        };
        match source {
            AdminKeySource::Env(var) => match std::env::var(&var) {
                Ok(v) if !v.trim().is_empty() => Ok(SecretString::from(v.trim().to_string())),
                Ok(_) => Err(ConfigError::invalid(
                    "openai.admin_key_env",
                    format!("environment variable {var} is empty"),
                )),
                Err(_) => Err(ConfigError::invalid(
                    "openai.admin_key_env",
                    format!("environment variable {var} is not set"),
                )),
            },
            AdminKeySource::File(path) => read_secret_file(&path)
                .map_err(|m| ConfigError::invalid("openai.admin_key_file", m)),
            AdminKeySource::Store { .. } => Err(ConfigError::invalid(
                "openai.admin_key_store",
                "a store cannot seed another store",
            )),
        }
    }

    /// Rules with globs compiled and per-rule overrides resolved, in order.
    pub fn rules(&self) -> Vec<Rule> {
        self.rotate
            .iter()
            .map(|r| Rule {
                name: r.name.clone(),
                // validate() compiled these already.
                project: compile_glob(&r.project).unwrap_or_else(|_| match_nothing()),
                service_account: compile_glob(&r.service_account)
                    .unwrap_or_else(|_| match_nothing()),
                stores: r.stores.clone(),
                path: r.path.clone(),
                max_age: r.max_age.unwrap_or(self.policy.max_age),
                grace_period: r.grace_period.unwrap_or(self.policy.grace_period),
                verify: r.verify.unwrap_or(self.policy.verify),
                scopes: r.scopes.clone(),
                strategy: r.strategy,
            })
            .collect()
    }
}

fn env_source() -> config::Environment {
    config::Environment::with_prefix("KEYROTD")
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
        .list_separator(",")
        .with_list_parse_key("rotate.stores")
        .with_list_parse_key("notify.webhooks.events")
}

/// The `KEYROTD__*` variables of this process, sorted by name.
fn env_vars() -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.to_ascii_uppercase().starts_with("KEYROTD__"))
        .collect();
    vars.sort();
    vars
}

/// `e` came from parsing the file plus `vars`; when one variable is its cause, the
/// error names that variable instead of the file. The cause is the variable without
/// which the rest parses and validates, or, when several are bad, the first that fails
/// alone on top of a file that is fine without them.
fn blame_env(
    parse: &dyn Fn(config::Environment) -> Result<Config, ConfigError>,
    vars: Vec<(String, String)>,
    e: ConfigError,
) -> ConfigError {
    let with = |picked: &mut dyn FnMut(&str) -> bool| {
        let map = vars
            .iter()
            .filter(|(k, _)| picked(k))
            .cloned()
            .collect::<config::Map<String, String>>();
        parse(env_source().source(Some(map)))
    };
    let named = |var: &str, e: ConfigError| ConfigError::Env {
        var: var.to_string(),
        message: match e {
            ConfigError::File { message, .. } => message,
            other => other.to_string(),
        },
    };
    if vars.is_empty() {
        return e;
    }
    for (var, _) in &vars {
        if with(&mut |k| k != var).is_ok() {
            return named(var, e);
        }
    }
    if with(&mut |_| false).is_err() {
        return e;
    }
    for (var, _) in &vars {
        if let Err(alone) = with(&mut |k| k == var) {
            return named(var, alone);
        }
    }
    e
}

fn map_config_error(origin: &str, e: config::ConfigError) -> ConfigError {
    match &e {
        config::ConfigError::Type { key: Some(k), .. } => {
            ConfigError::invalid(k.clone(), e.to_string())
        }
        config::ConfigError::Message(m) => {
            // serde messages from the `config` crate carry the key after "for key".
            ConfigError::File {
                path: origin.to_string(),
                message: m.clone(),
            }
        }
        _ => ConfigError::File {
            path: origin.to_string(),
            message: e.to_string(),
        },
    }
}

fn validate_store(name: &str, store: &StoreConfig) -> Result<(), ConfigError> {
    let key = |k: &str| format!("stores.{name}.{k}");
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(ConfigError::invalid(
            format!("stores.{name}"),
            "store names use letters, digits, '-' and '_'",
        ));
    }
    let checked = match store {
        StoreConfig::Vault(v) => v.validate(),
        StoreConfig::AwsSecretsManager(a) => a.validate(),
        StoreConfig::File(f) => f.validate(),
    };
    checked.map_err(|(k, m)| ConfigError::invalid(key(k), m))?;
    Ok(())
}

impl fmt::Display for UserKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UserKeys::Report => "report",
            UserKeys::Revoke => "revoke",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::rules::render_template;
    use super::*;
    use globset::Glob;

    #[test]
    fn patterns_answer_like_globset() {
        let patterns = [
            "*",
            "prod-*",
            "*-batch",
            "backend",
            "prod-*-eu",
            "a?c",
            "[ab]*",
            "{x,y}*",
            "**",
            "*/x",
            "x/*",
            "p\\*",
            "",
            "*a*",
        ];
        let inputs = [
            "",
            "prod-",
            "prod-app",
            "prod-a/b",
            "xprod-",
            "nightly-batch",
            "-batch",
            "batch",
            "backend",
            "backend2",
            "prod-x-eu",
            "abc",
            "aXc",
            "bz",
            "x1",
            "y",
            "a/x",
            "x/a",
            "p*",
            "pq",
            "a",
            "ba",
        ];
        for p in patterns {
            let Ok(ours) = Pattern::new(p) else {
                assert!(Glob::new(p).is_err(), "{p:?}");
                continue;
            };
            let theirs = Glob::new(p).unwrap().compile_matcher();
            assert_eq!(ours.as_str(), p);
            for i in inputs {
                assert_eq!(ours.is_match(i), theirs.is_match(i), "{p:?} on {i:?}");
            }
        }
    }

    #[test]
    fn path_templates_render_in_one_pass() {
        let v = PathVars {
            project_id: "proj_1",
            project_name: "evil-{service_account_id}",
            service_account_id: "svc_1",
            service_account_name: "backend",
        };
        assert_eq!(
            render_template("openai/{project_name}/{service_account_name}", &v),
            "openai/evil-{service_account_id}/backend"
        );
        assert_eq!(
            render_template("{project_id}-{service_account_id}{", &v),
            "proj_1-svc_1{"
        );
        assert_eq!(render_template("a/{other}/b}", &v), "a/{other}/b}");
        assert_eq!(render_template("plain/path", &v), "plain/path");
    }

    const BASE: &str = r#"
        [openai]
        admin_key_env = "CONFIG_TEST_ADMIN_KEY"
        [stores.local]
        type = "file"
        dir = "/tmp/keyrotd-test"
        [[rotate]]
        name = "all"
        project = "*"
        stores = ["local"]
        path = "openai/{project_name}/{service_account_name}"
    "#;

    fn err(text: &str) -> String {
        Config::from_toml(text)
            .expect_err("must be rejected")
            .to_string()
    }

    #[test]
    fn base_config_is_valid_and_defaults_apply() {
        let c = Config::from_toml(BASE).expect("valid");
        assert_eq!(c.daemon.concurrency, 8);
        assert_eq!(c.policy.max_age, Duration::from_secs(90 * 86400));
        assert_eq!(c.rules()[0].grace_period, Duration::from_secs(86400));
        assert_eq!(
            c.admin_key_source().unwrap(),
            AdminKeySource::Env("CONFIG_TEST_ADMIN_KEY".into())
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err(&format!("{BASE}\n[policy]\nmax_agee = \"3d\"\n"));
        assert!(e.contains("max_agee"), "{e}");
    }

    #[test]
    fn unknown_nested_store_key_is_named() {
        let e = err(&BASE.replace("dir = ", "dri = \"x\"\ndir = "));
        assert!(e.contains("dri"), "{e}");
    }

    #[test]
    fn bad_duration_is_named() {
        let e = err(&format!(
            "{BASE}\n[policy]\ngrace_period = \"24 parsecs\"\n"
        ));
        assert!(e.contains("grace_period"), "{e}");
    }

    #[test]
    fn bad_cron_is_named() {
        let e = err(&format!("{BASE}\n[daemon]\nschedule = \"61 * * * *\"\n"));
        assert!(e.contains("daemon.schedule"), "{e}");
        let e = err(&format!("{BASE}\n[daemon]\nschedule = \"* * *\"\n"));
        assert!(e.contains("3 fields"), "{e}");
    }

    #[test]
    fn five_and_six_field_cron_accepted() {
        assert_eq!(parse_schedule("*/5 * * * *").unwrap(), "0 */5 * * * *");
        assert_eq!(parse_schedule("30 0 3 * * *").unwrap(), "30 0 3 * * *");
    }

    #[test]
    fn bad_glob_is_named() {
        let e = err(&BASE.replace("project = \"*\"", "project = \"prod-[\""));
        assert!(e.contains("rotate[0].project"), "{e}");
    }

    #[test]
    fn inline_admin_key_refused_with_reason() {
        let e = err(&BASE.replace(
            "admin_key_env = \"CONFIG_TEST_ADMIN_KEY\"",
            "admin_key = \"sk-admin-inline\"",
        ));
        assert!(e.contains("openai.admin_key"), "{e}");
        assert!(e.contains("admin_key_env or admin_key_file"), "{e}");
        assert!(!e.contains("sk-admin-inline"), "{e}");
    }

    #[test]
    fn missing_env_var_and_unreadable_file_are_named() {
        let c =
            Config::from_toml(&BASE.replace("CONFIG_TEST_ADMIN_KEY", "KEYROTD_SURELY_UNSET_VAR"))
                .unwrap();
        let e = c.admin_key().unwrap_err().to_string();
        assert!(
            e.contains("openai.admin_key_env") && e.contains("KEYROTD_SURELY_UNSET_VAR"),
            "{e}"
        );
        let c = Config::from_toml(&BASE.replace(
            "admin_key_env = \"CONFIG_TEST_ADMIN_KEY\"",
            "admin_key_file = \"/nonexistent/admin-key\"",
        ))
        .unwrap();
        let e = c.admin_key().unwrap_err().to_string();
        assert!(
            e.contains("openai.admin_key_file") && e.contains("/nonexistent/admin-key"),
            "{e}"
        );
    }

    #[test]
    fn rule_naming_unknown_store_is_named() {
        let e = err(&BASE.replace("stores = [\"local\"]", "stores = [\"local\", \"vualt\"]"));
        assert!(e.contains("rotate[0].stores") && e.contains("vualt"), "{e}");
    }

    #[test]
    fn empty_rules_rejected_only_where_rotation_is_requested() {
        let text = BASE.split("[[rotate]]").next().unwrap();
        let c = Config::from_toml(text).expect("plan works without rules");
        let e = c.require_rules().unwrap_err().to_string();
        assert!(e.contains("`rotate`"), "{e}");
    }

    #[test]
    fn unknown_path_variable_rejected() {
        let e = err(&BASE.replace("{service_account_name}", "{sa}"));
        assert!(e.contains("rotate[0].path") && e.contains("{sa}"), "{e}");
    }

    #[test]
    fn unknown_store_type_rejected() {
        let e = err(&BASE.replace("type = \"file\"", "type = \"s3\""));
        assert!(e.contains("s3"), "{e}");
    }

    #[test]
    fn expire_replaced_defaults_to_true_and_must_be_a_bool() {
        let c = Config::from_toml(BASE).unwrap();
        assert!(c.policy.expire_replaced);
        let c = Config::from_toml(&format!("{BASE}\n[policy]\nexpire_replaced = false\n")).unwrap();
        assert!(!c.policy.expire_replaced);
        let e = err(&format!(
            "{BASE}\n[policy]\nexpire_replaced = \"sometimes\"\n"
        ));
        assert!(e.contains("expire_replaced"), "{e}");
    }

    #[test]
    fn key_expiry_parses() {
        let c = Config::from_toml(&format!("{BASE}\n[policy]\nkey_expiry = \"30d\"\n")).unwrap();
        assert_eq!(
            c.policy.key_expiry,
            KeyExpiry(Some(Duration::from_secs(30 * 86400)))
        );
        let e = err(&format!("{BASE}\n[policy]\nkey_expiry = \"soon\"\n"));
        assert!(e.contains("key_expiry"), "{e}");
    }

    fn with_openai(line: &str) -> String {
        BASE.replace("[openai]", &format!("[openai]\n{line}"))
    }

    #[test]
    fn scan_bounds_default_and_parse() {
        let c = Config::from_toml(BASE).unwrap();
        assert_eq!(c.openai.max_pages, 1000);
        assert_eq!(c.openai.max_response_bytes, ByteSize(8 << 20));
        assert_eq!(c.openai.scan_timeout, Duration::from_secs(600));
        let c = Config::from_toml(&with_openai(
            "max_pages = 50\nmax_response_bytes = \"512KiB\"\nscan_timeout = \"90s\"",
        ))
        .unwrap();
        assert_eq!(c.openai.max_pages, 50);
        assert_eq!(c.openai.max_response_bytes, ByteSize(512 << 10));
        assert_eq!(c.openai.scan_timeout, Duration::from_secs(90));
        let c = Config::from_toml(&with_openai("max_response_bytes = 1048576")).unwrap();
        assert_eq!(c.openai.max_response_bytes, ByteSize(1 << 20));
    }

    #[test]
    fn byte_sizes_parse_and_print() {
        for (text, n) in [
            ("100", 100),
            ("100B", 100),
            ("64KiB", 64 << 10),
            ("8 MiB", 8 << 20),
            ("8mib", 8 << 20),
            ("1GiB", 1 << 30),
        ] {
            assert_eq!(ByteSize::parse(text), Ok(ByteSize(n)), "{text}");
        }
        for bad in [
            "",
            "8MB",
            "8 megs",
            "-1",
            "1.5MiB",
            "99999999999999999999GiB",
        ] {
            assert!(ByteSize::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(ByteSize(8 << 20).to_string(), "8MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
    }

    #[test]
    fn scan_bounds_out_of_range_are_named() {
        let e = err(&with_openai("max_pages = 0"));
        assert!(e.contains("openai.max_pages"), "{e}");
        let e = err(&with_openai("max_response_bytes = \"1KiB\""));
        assert!(
            e.contains("openai.max_response_bytes") && e.contains("1KiB is outside"),
            "{e}"
        );
        let e = err(&with_openai("max_response_bytes = \"2GiB\""));
        assert!(e.contains("openai.max_response_bytes"), "{e}");
        let e = err(&with_openai("max_response_bytes = \"8 megs\""));
        assert!(e.contains("max_response_bytes"), "{e}");
        let e = err(&with_openai("scan_timeout = \"0s\""));
        assert!(
            e.contains("openai.scan_timeout") && e.contains("greater than zero"),
            "{e}"
        );
        let e = err(&with_openai("scan_timeout = \"1000000y\""));
        assert!(e.contains("openai.scan_timeout"), "{e}");
    }
}

#[cfg(test)]
mod shipped_configs {
    use super::*;

    /// The example config and the Kubernetes one are parsed by the real loader: a
    /// renamed key breaks this test, not a user's deployment.
    #[test]
    fn shipped_configs_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for rel in [
            "config/keyrotd.example.toml",
            "deploy/kubernetes/keyrotd.toml",
        ] {
            let path = root.join(rel);
            if rel.starts_with("deploy") && !path.exists() {
                continue;
            }
            let cfg = Config::load(&path).unwrap_or_else(|e| panic!("{rel}: {e}"));
            assert!(!cfg.rotate.is_empty(), "{rel} has rules");
        }
    }
}
