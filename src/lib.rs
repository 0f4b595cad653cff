//! keyrotd rotates OpenAI project API keys into the secret stores their consumers read,
//! crash-safely: a new key is minted, stored everywhere, verified and promoted before the
//! old one is revoked after a grace period.
//!
//! # Layout
//!
//! - [`config`]: the TOML configuration, `KEYROTD__*` overrides, pure validation.
//! - [`openai`]: the Admin API client (pagination, retries) and its models.
//! - [`store`]: the secret-store trait and its backends (Vault/OpenBao KV v2, AWS
//!   Secrets Manager, file). Knows nothing of OpenAI.
//! - [`policy`]: pure verdicts for one key (ok, rotate, revoke, report, orphan).
//! - [`plan`]: the organization inventory and the read-only plan.
//! - [`report`]: the org-wide inventory report (HTML, JSON, CSV) built from the plan.
//! - [`rotation`]: the one decision (`rotation::decide`), the slot state machine that
//!   performs it, the only place that orders mint → stage → verify → promote →
//!   retire, and beside it the admin key's own crash-safe rotation
//!   (`rotation::admin_key`: the admin key kept in a store, re-read every cycle), and
//!   `rotation::outside` (keys made by hand on managed accounts, from the audit log).
//! - [`sim`]: the Admin API simulator used by `keyrotd demo`, `keyrotd sim` and tests.
//! - [`app`]: wiring from a validated config to an [`rotation::Engine`].
//! - [`daemon`]: `keyrotd run`: the schedule, signals, sd_notify, the HTTP listener.
//! - [`metrics`], [`notify`], [`telemetry`]: Prometheus metrics, webhooks, logging.
//! - [`redact`], [`backoff`]: the one rule that masks secret-shaped values in outgoing
//!   text; the one exponential backoff with jitter every retry loop waits by.
//! - [`check`], [`demo`]: `check-config --connect` and `keyrotd demo`.
//! - [`files`]: the one way a file others read is replaced (reports, metrics).

pub mod app;
pub mod backoff;
pub mod check;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod files;
pub mod metrics;
pub mod notify;
pub mod openai;
pub mod plan;
pub mod policy;
pub mod redact;
pub mod report;
pub mod rotation;
pub mod sim;
pub mod store;
pub mod telemetry;
pub mod usage;

/// `<crate version> (commit <git commit>)`, as `keyrotd --version` prints it.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("KEYROTD_GIT_COMMIT"),
    ")"
);

/// Exit code for a bad configuration (DESIGN.md §1).
pub const EXIT_BAD_CONFIG: i32 = 2;
/// Exit code when some action failed (DESIGN.md §1).
pub const EXIT_FAILED: i32 = 1;
