//! Notifications: optional webhooks (Slack-compatible or generic JSON) on rotation
//! completed, rotation failed, stale user-owned key found, previous key still in use,
//! and key created by hand on a managed service account. Never a secret value.
//!
//! ```toml
//! [[notify.webhooks]]
//! url_env = "KEYROTD_SLACK_WEBHOOK"     # or url_file = "/run/credentials/keyrotd/slack"
//! format = "slack"                      # slack | json
//! events = ["rotation.failed", "key.stale_user"]   # empty or absent: all
//! ```
//!
//! Webhook URLs are credentials (a Slack incoming-webhook URL is its own token), so they
//! come only from an environment variable or a file, and logs show scheme and host only.
//!
//! [`Notifier::send`] renders the payload and queues it (bounded; a full queue drops the
//! notice with a warning) without waiting: a slow or dead webhook never delays a
//! rotation. A background task delivers, a few at a time, retrying network errors, 5xx,
//! 408 and 429 with exponential backoff and jitter, and gives up after
//! [`MAX_ATTEMPTS`] with a warning. [`Notifier::flush`] waits for the queue to drain
//! (`keyrotd once` and daemon shutdown call it before exiting).
//!
//! Payloads carry ids only. As a second line of defence the rendered body goes through
//! [`crate::redact::secrets`], which masks anything shaped like a key or a token.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, warn};

use crate::config::{self, ConfigError, NotifyConfig, NotifyEvent, WebhookFormat};

/// Delivery attempts per notice and webhook before giving up.
pub const MAX_ATTEMPTS: u32 = 5;
/// Notices waiting for delivery; more are dropped (with a warning).
const QUEUE_CAPACITY: usize = 256;
/// Deliveries in flight at once.
const PARALLEL_DELIVERIES: usize = 4;
/// First wait between attempts; doubles per attempt, ±50 % jitter.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest wait between attempts (also caps a server's `retry-after`).
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// One request's timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A stale user key is announced at most once per key in this window.
const STALE_USER_REPEAT: Duration = Duration::from_secs(24 * 3600);

/// An event worth telling a human about.
#[derive(Clone, Debug, PartialEq)]
pub enum Notice {
    RotationCompleted {
        project_id: String,
        service_account_id: String,
        rule: String,
        key_id: String,
        stores: Vec<String>,
    },
    RotationFailed {
        project_id: String,
        service_account_id: String,
        rule: String,
        error: String,
    },
    StaleUserKey {
        project_id: String,
        key_id: String,
        owner_id: String,
        owner_name: String,
        age_days: u64,
    },
    /// A slot's previous key is still used after its grace period
    /// (`revoke_when = "unused"`); it is kept until `max_grace`.
    KeyStillInUse {
        project_id: String,
        service_account_id: String,
        key_id: String,
        /// RFC 3339; empty when the API reported no use.
        last_used_at: String,
    },
    /// The key a slot serves answered 401 (disabled by OpenAI, or deleted): the slot
    /// is rotated at once and the dead key revoked.
    KeyInvalid {
        project_id: String,
        service_account_id: String,
        key_id: String,
    },
    /// A person created a key on a service account a slot manages (the audit log's
    /// `api_key.created` by a dashboard session): keyrotd neither stores nor rotates it.
    KeyCreatedOutside {
        project_id: String,
        service_account_id: String,
        key_id: String,
        /// The creator's e-mail as the audit log gives it; empty when it gives none.
        created_by: String,
    },
    /// A key's traffic is anomalous (`key.usage_anomaly`).
    KeyUsageAnomaly {
        project_id: String,
        key_id: String,
        /// `service_account` or `user`.
        owner_type: String,
        /// `spike`, `replaced_after_grace`, `stale_user_key_active`, `about_to_be_revoked`.
        kind: String,
        last_hour_requests: u64,
        /// Mean requests per hour before the last hour (spikes only).
        baseline_per_hour: Option<f64>,
        /// `reported` or `rotating`.
        action: String,
    },
}

impl Notice {
    /// The event this notice is (its `event` field).
    pub fn event(&self) -> NotifyEvent {
        match self {
            Notice::RotationCompleted { .. } => NotifyEvent::RotationCompleted,
            Notice::RotationFailed { .. } => NotifyEvent::RotationFailed,
            Notice::StaleUserKey { .. } => NotifyEvent::StaleUserKey,
            Notice::KeyStillInUse { .. } => NotifyEvent::KeyStillInUse,
            Notice::KeyInvalid { .. } => NotifyEvent::KeyInvalid,
            Notice::KeyCreatedOutside { .. } => NotifyEvent::KeyCreatedOutside,
            Notice::KeyUsageAnomaly { .. } => NotifyEvent::KeyUsageAnomaly,
        }
    }

    /// The generic JSON payload: `event`, `timestamp`, the ids, a readable `text`.
    pub fn to_json(&self, timestamp: &str) -> serde_json::Value {
        let mut v = match self {
            Notice::RotationCompleted {
                project_id,
                service_account_id,
                rule,
                key_id,
                stores,
            } => json!({
                "project_id": project_id,
                "service_account_id": service_account_id,
                "rule": rule,
                "key_id": key_id,
                "stores": stores,
            }),
            Notice::RotationFailed {
                project_id,
                service_account_id,
                rule,
                error,
            } => json!({
                "project_id": project_id,
                "service_account_id": service_account_id,
                "rule": rule,
                "error": error,
            }),
            Notice::StaleUserKey {
                project_id,
                key_id,
                owner_id,
                owner_name,
                age_days,
            } => json!({
                "project_id": project_id,
                "key_id": key_id,
                "owner_type": "user",
                "owner_id": owner_id,
                "owner_name": owner_name,
                "age_days": age_days,
            }),
            Notice::KeyStillInUse {
                project_id,
                service_account_id,
                key_id,
                last_used_at,
            } => json!({
                "project_id": project_id,
                "service_account_id": service_account_id,
                "key_id": key_id,
                "last_used_at": last_used_at,
            }),
            Notice::KeyInvalid {
                project_id,
                service_account_id,
                key_id,
            } => json!({
                "project_id": project_id,
                "service_account_id": service_account_id,
                "key_id": key_id,
            }),
            Notice::KeyCreatedOutside {
                project_id,
                service_account_id,
                key_id,
                created_by,
            } => json!({
                "project_id": project_id,
                "service_account_id": service_account_id,
                "key_id": key_id,
                "created_by": created_by,
            }),
            Notice::KeyUsageAnomaly {
                project_id,
                key_id,
                owner_type,
                kind,
                last_hour_requests,
                baseline_per_hour,
                action,
            } => json!({
                "project_id": project_id,
                "key_id": key_id,
                "owner_type": owner_type,
                "kind": kind,
                "last_hour_requests": last_hour_requests,
                "baseline_per_hour": baseline_per_hour,
                "action": action,
            }),
        };
        v["event"] = json!(self.event().as_str());
        v["timestamp"] = json!(timestamp);
        v["source"] = json!("keyrotd");
        v["text"] = json!(self.text());
        v
    }

    /// A one-line, human-readable summary (the Slack message).
    pub fn text(&self) -> String {
        match self {
            Notice::RotationCompleted {
                project_id,
                service_account_id,
                rule,
                key_id,
                stores,
            } => format!(
                "keyrotd: rotated the key of service account `{service_account_id}` in project \
                 `{project_id}` (rule `{rule}`): new key `{key_id}` is live in {}",
                stores.join(", ")
            ),
            Notice::RotationFailed {
                project_id,
                service_account_id,
                rule,
                error,
            } => format!(
                "keyrotd: rotation FAILED for service account `{service_account_id}` in project \
                 `{project_id}` (rule `{rule}`): {}. Nothing was promoted or revoked; it is \
                 retried next cycle.",
                error.trim_end_matches('.')
            ),
            Notice::StaleUserKey {
                project_id,
                key_id,
                owner_id,
                owner_name,
                age_days,
            } => {
                let owner = if owner_name.is_empty() {
                    format!("`{owner_id}`")
                } else {
                    format!("{owner_name} (`{owner_id}`)")
                };
                format!(
                    "keyrotd: user-owned key `{key_id}` of {owner} in project `{project_id}` is \
                     {age_days} days old; user keys cannot be re-issued automatically: ask the \
                     owner to replace it"
                )
            }
            Notice::KeyStillInUse {
                project_id,
                service_account_id,
                key_id,
                last_used_at,
            } => format!(
                "keyrotd: the previous key `{key_id}` of service account `{service_account_id}` \
                 in project `{project_id}` is still in use (last used {last_used_at}) after its \
                 grace period: switch its consumers to the stored key; it is revoked at max_grace"
            ),
            Notice::KeyInvalid {
                project_id,
                service_account_id,
                key_id,
            } => format!(
                "keyrotd: the key `{key_id}` served for service account `{service_account_id}` \
                 in project `{project_id}` no longer authenticates (HTTP 401: disabled or \
                 deleted); keyrotd is replacing it now and revoking it once every store serves \
                 the new key"
            ),
            Notice::KeyCreatedOutside {
                project_id,
                service_account_id,
                key_id,
                created_by,
            } => {
                let who = if created_by.is_empty() {
                    "someone".to_string()
                } else {
                    created_by.clone()
                };
                format!(
                    "keyrotd: {who} created key `{key_id}` by hand on service account \
                     `{service_account_id}` in project `{project_id}`, which keyrotd manages; \
                     it is not in any store and keyrotd does not rotate it"
                )
            }
            Notice::KeyUsageAnomaly {
                project_id,
                key_id,
                kind,
                last_hour_requests,
                baseline_per_hour,
                action,
                ..
            } => {
                let why = match baseline_per_hour {
                    Some(b) => format!("{kind}: {last_hour_requests} requests in the last hour against a baseline of {b:.1}/h"),
                    None => format!("{kind}: {last_hour_requests} requests in the last hour"),
                };
                let then = if action == "rotating" {
                    "keyrotd is replacing it now and revoking it once every store serves the new key"
                } else {
                    "check who uses it; revoke it if it leaked"
                };
                format!(
                    "keyrotd: key `{key_id}` in project `{project_id}` has anomalous traffic ({why}); {then}"
                )
            }
        }
    }

    /// The request body for `format`, secrets redacted.
    pub fn render(&self, format: WebhookFormat, timestamp: &str) -> String {
        let body = match format {
            WebhookFormat::Json => self.to_json(timestamp),
            WebhookFormat::Slack => json!({ "text": self.text() }),
        };
        crate::redact::secrets(&body.to_string())
    }
}

/// One configured webhook. `Debug` shows scheme and host only.
struct Hook {
    url: SecretString,
    /// `scheme://host`, the only part of the URL that is ever logged.
    label: String,
    format: WebhookFormat,
    /// Empty: every event.
    events: Vec<NotifyEvent>,
}

impl fmt::Debug for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hook")
            .field("url", &self.label)
            .field("format", &self.format)
            .field("events", &self.events)
            .finish()
    }
}

/// One queued delivery.
struct Delivery {
    hook: usize,
    event: NotifyEvent,
    body: String,
}

struct Shared {
    hooks: Vec<Hook>,
    http: reqwest::Client,
    tx: mpsc::Sender<Delivery>,
    /// Taken by whoever starts the worker (the first caller inside a runtime).
    rx: Mutex<Option<mpsc::Receiver<Delivery>>>,
    /// Deliveries queued or in flight.
    pending: watch::Sender<usize>,
    /// Stale user keys already announced, and when.
    announced: Mutex<HashMap<String, Instant>>,
}

/// Sends [`Notice`]s to the configured webhooks (none configured: does nothing).
#[derive(Clone, Default)]
pub struct Notifier {
    shared: Option<Arc<Shared>>,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hooks: &[Hook] = self.shared.as_ref().map_or(&[], |s| &s.hooks);
        f.debug_struct("Notifier")
            .field("webhooks", &hooks)
            .finish()
    }
}

impl Notifier {
    /// Reads webhook URLs from their env vars / files. Errors name the config key and
    /// never contain a URL.
    pub fn from_config(cfg: &NotifyConfig) -> Result<Notifier, ConfigError> {
        cfg.validate()?;
        if cfg.webhooks.is_empty() {
            return Ok(Notifier::default());
        }
        let mut hooks = Vec::with_capacity(cfg.webhooks.len());
        for (i, w) in cfg.webhooks.iter().enumerate() {
            let key = format!("notify.webhooks[{i}].url");
            let url = config::read_secret(&key, w.url_env.as_deref(), w.url_file.as_deref())?;
            let label = match reqwest::Url::parse(url.expose_secret()) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {
                    format!("{}://{}", u.scheme(), u.host_str().unwrap_or_default())
                }
                _ => {
                    return Err(ConfigError::Invalid {
                        key: format!(
                            "notify.webhooks[{i}].url_{}",
                            if w.url_env.is_some() { "env" } else { "file" }
                        ),
                        message: "does not hold an http(s) URL".into(),
                    })
                }
            };
            hooks.push(Hook {
                url,
                label,
                format: w.format,
                events: w.events.clone(),
            });
        }
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("keyrotd/", env!("CARGO_PKG_VERSION")))
            // A webhook URL is a credential: a redirect would hand it to another host
            // (in the Referer header) and send the payload there. Redirects are
            // answered as failures instead.
            .redirect(reqwest::redirect::Policy::none())
            .referer(false)
            .build()
            .map_err(|e| ConfigError::Invalid {
                key: "notify.webhooks".into(),
                message: format!("cannot build the HTTP client: {}", e.without_url()),
            })?;
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let notifier = Notifier {
            shared: Some(Arc::new(Shared {
                hooks,
                http,
                tx,
                rx: Mutex::new(Some(rx)),
                pending: watch::Sender::new(0),
                announced: Mutex::new(HashMap::new()),
            })),
        };
        notifier.ensure_worker();
        Ok(notifier)
    }

    /// Whether any webhook is configured.
    pub fn is_enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// Starts the delivery task, once, when called inside a tokio runtime.
    fn ensure_worker(&self) {
        let Some(shared) = &self.shared else {
            return;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let rx = shared.rx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(rx) = rx {
            handle.spawn(worker(shared.clone(), rx));
        }
    }

    /// Queues a notice; delivery (with retries) happens in the background and never
    /// blocks or fails the rotation. A stale user key is sent once per key per day.
    pub fn send(&self, notice: Notice) {
        let Some(shared) = &self.shared else {
            return;
        };
        let event = notice.event();
        let targets: Vec<usize> = (0..shared.hooks.len())
            .filter(|&i| {
                let h = &shared.hooks[i];
                h.events.is_empty() || h.events.contains(&event)
            })
            .collect();
        if targets.is_empty() {
            return;
        }
        // Both repeat every cycle while true: announce each key once a day.
        if let Notice::StaleUserKey { key_id, .. } | Notice::KeyStillInUse { key_id, .. } = &notice
        {
            let mut seen = shared.announced.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if seen
                .get(key_id)
                .is_some_and(|&t| now.duration_since(t) < STALE_USER_REPEAT)
            {
                return;
            }
            seen.insert(key_id.clone(), now);
        }
        self.ensure_worker();
        let timestamp = Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true);
        for hook in targets {
            let body = notice.render(shared.hooks[hook].format, &timestamp);
            shared.pending.send_modify(|n| *n += 1);
            if shared.tx.try_send(Delivery { hook, event, body }).is_err() {
                shared.pending.send_modify(|n| *n = n.saturating_sub(1));
                warn!(
                    event = "notify.dropped",
                    webhook = %shared.hooks[hook].label,
                    notice = event.as_str(),
                    "notification queue is full; dropping this notice"
                );
            }
        }
    }

    /// Waits until queued notices are delivered or given up (at most `timeout`).
    pub async fn flush(&self, timeout: Duration) {
        let Some(shared) = &self.shared else {
            return;
        };
        self.ensure_worker();
        let mut rx = shared.pending.subscribe();
        if tokio::time::timeout(timeout, rx.wait_for(|n| *n == 0))
            .await
            .is_err()
        {
            warn!(
                event = "notify.flush_timeout",
                pending = *shared.pending.borrow(),
                timeout_ms = timeout.as_millis() as u64,
                "notifications still undelivered; giving up on them"
            );
        }
    }
}

/// Takes deliveries off the queue and runs up to [`PARALLEL_DELIVERIES`] at once.
async fn worker(shared: Arc<Shared>, mut rx: mpsc::Receiver<Delivery>) {
    let slots = Arc::new(Semaphore::new(PARALLEL_DELIVERIES));
    while let Some(d) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            deliver(&shared, &d).await;
            drop(permit);
            shared.pending.send_modify(|n| *n = n.saturating_sub(1));
        });
    }
}

/// Posts one delivery, retrying what may succeed later.
async fn deliver(shared: &Shared, d: &Delivery) {
    let hook = &shared.hooks[d.hook];
    for attempt in 1..=MAX_ATTEMPTS {
        let sent = shared
            .http
            .post(hook.url.expose_secret())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(d.body.clone())
            .send()
            .await;
        let (retry, error, retry_after) = match sent {
            Ok(resp) if resp.status().is_success() => {
                debug!(event = "notify.sent", webhook = %hook.label, notice = d.event.as_str(), attempt, "notification delivered");
                return;
            }
            Ok(resp) => {
                let status = resp.status();
                let retry = status.is_server_error()
                    || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                    || status == reqwest::StatusCode::REQUEST_TIMEOUT;
                let after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                (retry, format!("HTTP {}", status.as_u16()), after)
            }
            // Without the URL: reqwest puts the whole URL (the credential) in messages.
            Err(e) => (
                true,
                crate::store::error_chain(&e.without_url()),
                None::<Duration>,
            ),
        };
        if !retry || attempt == MAX_ATTEMPTS {
            warn!(
                event = "notify.failed",
                webhook = %hook.label,
                notice = d.event.as_str(),
                attempts = attempt,
                error = %crate::redact::secrets(&error),
                "giving up on a notification"
            );
            return;
        }
        let wait = backoff(attempt).max(retry_after.unwrap_or_default().min(BACKOFF_CAP));
        debug!(event = "notify.retry", webhook = %hook.label, notice = d.event.as_str(), attempt, error = %crate::redact::secrets(&error), wait_ms = wait.as_millis() as u64, "notification failed; retrying");
        tokio::time::sleep(wait).await;
    }
}

/// The wait after failed attempt `attempt` (from 1): doubling from [`BACKOFF_BASE`], at
/// most [`BACKOFF_CAP`], jittered ([`crate::backoff::Backoff`]).
fn backoff(attempt: u32) -> Duration {
    crate::backoff::Backoff::new(BACKOFF_BASE, BACKOFF_CAP).wait(attempt.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_carry_ids_and_event_names() {
        let n = Notice::RotationFailed {
            project_id: "proj_1".into(),
            service_account_id: "svc_acct_1".into(),
            rule: "prod".into(),
            error: "store said sk-proj-leakedvalue123".into(),
        };
        let body = n.render(WebhookFormat::Json, "2026-01-01T00:00:00Z");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["event"], "rotation.failed");
        assert_eq!(v["project_id"], "proj_1");
        assert_eq!(v["timestamp"], "2026-01-01T00:00:00Z");
        assert!(!body.contains("leakedvalue"), "{body}");
        let slack = n.render(WebhookFormat::Slack, "t");
        let v: serde_json::Value = serde_json::from_str(&slack).unwrap();
        let text = v["text"].as_str().unwrap();
        assert!(
            text.contains("FAILED") && text.contains("svc_acct_1"),
            "{text}"
        );
        assert_eq!(v.as_object().unwrap().len(), 1);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) <= BACKOFF_BASE);
        assert!(backoff(3) >= BACKOFF_BASE * 2);
        assert!(backoff(30) >= BACKOFF_CAP / 2 && backoff(30) <= BACKOFF_CAP);
    }
}
