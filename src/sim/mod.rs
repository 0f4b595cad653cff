//! In-process OpenAI Admin API simulator (see `keyrotd sim`, `keyrotd demo`, tests).
//!
//! An axum server faithful to the OpenAI OpenAPI spec (openai/openai-openapi at
//! commit f85dbe2, DESIGN.md §8): every endpoint of the excerpt keyrotd uses
//! (projects, project API keys, service accounts and their keys, admin API keys,
//! `GET /v1/models`, usage, costs and audit logs), the
//! `{"error": {message, type, param, code}}` error shape,
//! `limit` 1..=100 (default 20) with `after`/`has_more` pagination, `owner_project_access`,
//! `include_archived`, plus fault injection and a movable clock for tests.
//!
//! # Using it
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use keyrotd::sim::{Faults, Scenario, Sim};
//! let sim = Sim::new("sk-admin-test");
//! let truth = Scenario::new(7).projects(3).populate(&sim);   // ground truth per key
//! let server = sim.start().await?;                          // 127.0.0.1:<free port>
//! // point a client at server.base_url (ends with /v1), admin key "sk-admin-test" ...
//! sim.update_faults(|f| f.lose_create_responses = 1);       // change behaviour live
//! # let _ = truth; server.shutdown().await; Ok(()) }
//! ```
//!
//! For `keyrotd sim --listen ADDR`: build a [`Scenario`] (it parses from
//! `projects=50,stale=0.3,...`, see [`Scenario`]'s `FromStr`), then
//! [`run_standalone`] populates, prints the base URL and admin key, and serves until
//! Ctrl-C. [`serve`] serves a [`Sim`] on any listener.
//!
//! # Behaviour worth knowing
//!
//! - Lists are in creation order. An `after` cursor naming a deleted key or service
//!   account stays valid (tombstones); an id that never existed is a 400 on `after`.
//! - `GET .../api_keys` without `owner_project_access` shows only keys whose owner is
//!   active in the project ([`Sim::set_owner_active`]); `any` shows all.
//! - Archived projects keep their keys in listings, but `GET /models` rejects those
//!   keys, and listing, creating or deleting service accounts there is a 400 (the
//!   spec: "archived projects have no service accounts").
//! - A key is live when not deleted, not expired (`expires_in_seconds` on key and
//!   service-account creation, from the SDK 3.57, shown as `expires_at` in listings
//!   and creation responses) and its project is not
//!   archived. `GET /models` answers 200 only for live project keys and moves their
//!   `last_used_at` to the simulator's now. An admin key there is a 401; a project key
//!   on an admin endpoint is a 403.
//! - Admin keys created through `POST /organization/admin_api_keys` authenticate like
//!   the initial one; deleting one invalidates it. [`Sim::admin_keys`] shows them all
//!   (values included, deleted ones too); [`Faults::reject_admin_keys`] makes live ones
//!   fail authentication.
//! - `POST /organization/projects/{id}/archive` (real API, not in the excerpt) archives.
//! - The clock is wall time plus [`Sim::advance`]; it stamps `created_at`,
//!   `last_used_at` and expiry. [`Faults::propagation_delay`] uses real time.
//! - Fault order and semantics: see [`Faults`].
//! - The request log ([`Sim::requests`]) keeps each request's JSON body, so tests can
//!   check what the client sent.
//! - Usage (`GET /organization/usage/completions`, `GET /organization/costs`): every
//!   successful call with a project key (`GET /models`, [`Sim::use_key`]) counts one
//!   request (no tokens) for that key in its minute; tests and benchmarks add
//!   requests and tokens at any time with [`Sim::record_usage`]; [`Sim::usage_totals`]
//!   is the ground truth. Costs price the tokens by [`PRICES`].
//! - Audit log (`GET /organization/audit_logs`, newest first, [`Sim::audit_log`]):
//!   `api_key.created|updated|deleted` and `service_account.created|updated|deleted`
//!   for every such change, with the project and the actor: the admin key for changes
//!   made through the API, a dashboard session (user id, email, IP) for seeded
//!   objects, [`Sim::delete_key`] (the organization owner) and
//!   [`Sim::create_key_by_hand`] and [`Sim::create_service_account_key_by_hand`] (the
//!   user with that email). Deleting a service
//!   account logs `api_key.deleted` for each of its keys first. Ids, scopes and roles
//!   only: never a key value.
//! - [`Faults::disabled_keys`] ([`Sim::disable_key`]): a key disabled like a leaked
//!   one is still listed, but every call with it answers 401; an expired key
//!   (`expires_at` in the past) fails authentication the same way and cannot be
//!   updated.
//!
//! Layout: `route.rs` (endpoint table), `state.rs` (the organization and the
//! operations, no HTTP), `http.rs` (handler, faults, logging), `faults.rs`,
//! `scenario.rs` (seeded populations and their ground truth).

mod faults;
mod http;
mod route;
mod scenario;
mod state;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use self::faults::{
    BadCursor, CursorFault, FailNext, Faults, LostResponse, Malformation, MalformedNext, Padding,
    RejectVerification, RetryAfter,
};
pub use self::route::Route;
pub use self::scenario::{GroundTruth, Scenario, TruthKey, TruthProject};
pub use self::state::PRICES;
use self::state::{KeyRec, State};

/// Who owns a simulated key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum OwnerRef {
    /// A user id (`user_...`).
    User(String),
    /// A service account id (`svc_acct_...`).
    ServiceAccount(String),
}

/// Who made a change, as the audit log shows it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SimActor {
    /// An admin API key, by id (`actor.type = api_key`, owned by the organization's
    /// owner): every change made through the HTTP API.
    AdminKey(String),
    /// A person in the dashboard, by user id (`actor.type = session`, with the user's
    /// email and an IP address): seeded objects and [`Sim::create_key_by_hand`].
    Session(String),
}

/// One audit-log entry, as the simulator's ground truth ([`Sim::audit_log`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimAuditEntry {
    pub id: String,
    /// `api_key.created`, `api_key.updated`, `api_key.deleted`,
    /// `service_account.created`, `service_account.updated`, `service_account.deleted`.
    pub kind: String,
    pub effective_at: i64,
    pub project_id: Option<String>,
    /// The key or service account acted on.
    pub resource_id: String,
    pub actor: SimActor,
}

/// Usage totals of one key ([`Sim::usage_totals`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageTotals {
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// A project as the simulator holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimProject {
    pub id: String,
    pub name: String,
    pub created_at: i64,
    pub archived_at: Option<i64>,
}

/// A service account as the simulator holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimServiceAccount {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub role: String,
    pub created_at: i64,
    pub deleted_at: Option<i64>,
}

/// A project API key, value included (tests only). `Debug` redacts the value.
#[derive(Clone, PartialEq, Eq)]
pub struct SimKey {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub value: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub owner: OwnerRef,
    /// The owner's name (user name or service-account name).
    pub owner_name: String,
    /// Whether the owner has effective access (`owner_project_access: active`).
    pub owner_active: bool,
    pub scopes: Vec<String>,
    /// Created through the HTTP API rather than seeded.
    pub minted: bool,
    pub deleted_at: Option<i64>,
}

impl fmt::Debug for SimKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimKey")
            .field("id", &self.id)
            .field("project_id", &self.project_id)
            .field("name", &self.name)
            .field("value", &"[REDACTED]")
            .field("created_at", &self.created_at)
            .field("last_used_at", &self.last_used_at)
            .field("expires_at", &self.expires_at)
            .field("owner", &self.owner)
            .field("owner_active", &self.owner_active)
            .field("minted", &self.minted)
            .field("deleted_at", &self.deleted_at)
            .finish()
    }
}

/// An admin API key as the simulator holds it, value included (tests only). `Debug`
/// redacts the value.
#[derive(Clone, PartialEq, Eq)]
pub struct SimAdminKey {
    pub id: String,
    pub name: String,
    pub value: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub last_used_at: Option<i64>,
    /// Created through `POST /organization/admin_api_keys` rather than seeded.
    pub minted: bool,
    pub deleted: bool,
}

impl fmt::Debug for SimAdminKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimAdminKey")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("value", &"[REDACTED]")
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .field("last_used_at", &self.last_used_at)
            .field("minted", &self.minted)
            .field("deleted", &self.deleted)
            .finish()
    }
}

/// One request the simulator answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// Arrival order, from 1.
    pub seq: u64,
    /// When it arrived (real time).
    pub at: Instant,
    pub method: String,
    /// `None` when the path matched no route.
    pub route: Option<Route>,
    pub path: String,
    /// The raw query string (empty when none).
    pub query: String,
    /// The status sent; 0 when the connection was dropped on purpose.
    pub status: u16,
    /// The request body when it was a JSON object (`None` otherwise). No admin request
    /// body carries a key value, so the log holds no secret.
    pub body: Option<serde_json::Value>,
}

/// The simulated API: cheap to clone, all clones share one organization.
#[derive(Clone)]
pub struct Sim {
    state: Arc<Mutex<State>>,
    admin_key: Arc<str>,
}

impl fmt::Debug for Sim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sim").finish_non_exhaustive()
    }
}

impl Sim {
    /// An empty organization whose admin key is `admin_key`, with a random seed.
    pub fn new(admin_key: &str) -> Sim {
        Sim::with_seed(admin_key, rand::random())
    }

    /// Like [`Sim::new`], with a seeded RNG for ids, key values and random faults.
    pub fn with_seed(admin_key: &str, seed: u64) -> Sim {
        Sim {
            state: Arc::new(Mutex::new(State::new(admin_key, seed))),
            admin_key: Arc::from(admin_key),
        }
    }

    /// The admin key given to [`Sim::new`].
    pub fn admin_key(&self) -> &str {
        &self.admin_key
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The axum router serving the API (all under `/v1`).
    pub fn router(&self) -> axum::Router {
        axum::Router::new()
            .fallback(http::handle)
            .with_state(self.clone())
    }

    /// Serves on `127.0.0.1:<free port>` until [`SimServer::shutdown`] or drop.
    pub async fn start(&self) -> io::Result<SimServer> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let sim = self.clone();
        let task = tokio::spawn(async move {
            serve(listener, sim, async {
                let _ = rx.await;
            })
            .await
        });
        Ok(SimServer {
            base_url: format!("http://{addr}/v1"),
            addr,
            sim: self.clone(),
            stop: Some(tx),
            task: Some(task),
        })
    }

    // ----- faults and clock -----

    /// The current faults.
    pub fn faults(&self) -> Faults {
        self.lock().faults.clone()
    }

    /// Replaces the faults.
    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// Changes the faults in place.
    pub fn update_faults(&self, change: impl FnOnce(&mut Faults)) {
        change(&mut self.lock().faults);
    }

    /// The simulator's now (Unix seconds).
    pub fn now(&self) -> i64 {
        self.lock().now()
    }

    /// Moves the simulator's clock forward (whole seconds).
    pub fn advance(&self, by: Duration) {
        self.lock().advance(by);
    }

    // ----- seeding -----

    /// Creates a project; returns its id.
    pub fn add_project(&self, name: &str) -> String {
        let mut st = self.lock();
        let now = st.now();
        st.new_project(name, now)
    }

    /// Archives a project; false when unknown.
    pub fn archive_project(&self, project_id: &str) -> bool {
        let mut st = self.lock();
        let now = st.now();
        st.archive(project_id, now).is_ok()
    }

    /// Creates a service account (role `member`), logged as made by the organization
    /// owner in the dashboard; `None` when the project is unknown.
    pub fn add_service_account(&self, project_id: &str, name: &str) -> Option<String> {
        let mut st = self.lock();
        let now = st.now();
        let by = st.seed_actor(None);
        st.new_sa(project_id, name, "member", now, &by).ok()
    }

    /// Creates a user (role `member` in every project); returns its id.
    pub fn add_user(&self, name: &str, email: &str) -> String {
        let mut st = self.lock();
        let now = st.now();
        st.new_user(name, email, "member", now)
    }

    /// Creates a key created now and never used; `None` for an unknown project/owner.
    pub fn add_key(&self, project_id: &str, owner: OwnerRef, name: &str) -> Option<SimKey> {
        let now = self.now();
        self.add_key_at(project_id, owner, name, now, None)
    }

    /// Creates a key with the given timestamps (seeded, not "minted"). The audit log
    /// says a person made it in the dashboard at `created_at`: the owning user, or the
    /// organization owner for a service account's key.
    pub fn add_key_at(
        &self,
        project_id: &str,
        owner: OwnerRef,
        name: &str,
        created_at: i64,
        last_used_at: Option<i64>,
    ) -> Option<SimKey> {
        let mut st = self.lock();
        let by = st.seed_actor(Some(&owner));
        let id = st
            .new_key(
                project_id,
                owner,
                name,
                created_at,
                last_used_at,
                None,
                Vec::new(),
                false,
                &by,
            )
            .ok()?;
        st.keys.get(&id).map(|k| sim_key(&st, k))
    }

    /// A person creating a key "by hand" in the dashboard: the user with `email`
    /// (created, role `member`, when there is none) makes a key of their own in the
    /// project, now; the audit log shows `api_key.created` by that user's session.
    /// `None` when the project is unknown.
    pub fn create_key_by_hand(&self, project_id: &str, email: &str, name: &str) -> Option<SimKey> {
        self.by_hand(project_id, None, email, name)
    }

    /// Like [`Sim::create_key_by_hand`], for a key of the project's service account
    /// `service_account_id` (a person adding a key to an account in the dashboard).
    /// `None` when the project or the service account is unknown.
    pub fn create_service_account_key_by_hand(
        &self,
        project_id: &str,
        service_account_id: &str,
        email: &str,
        name: &str,
    ) -> Option<SimKey> {
        self.by_hand(project_id, Some(service_account_id), email, name)
    }

    fn by_hand(
        &self,
        project_id: &str,
        service_account_id: Option<&str>,
        email: &str,
        name: &str,
    ) -> Option<SimKey> {
        let mut st = self.lock();
        let now = st.now();
        st.project(project_id).ok()?;
        let existing = st
            .users
            .values()
            .find(|u| u.email == email)
            .map(|u| u.id.clone());
        let user = match existing {
            Some(id) => id,
            None => {
                let name = email.split('@').next().unwrap_or(email).to_owned();
                st.new_user(&name, email, "member", now)
            }
        };
        let owner = match service_account_id {
            Some(sa) => OwnerRef::ServiceAccount(sa.to_owned()),
            None => OwnerRef::User(user.clone()),
        };
        let by = SimActor::Session(user);
        let id = st
            .new_key(
                project_id,
                owner,
                name,
                now,
                None,
                None,
                Vec::new(),
                false,
                &by,
            )
            .ok()?;
        st.keys.get(&id).map(|k| sim_key(&st, k))
    }

    /// The e-mail of the user `user_id`, if there is one.
    pub fn user_email(&self, user_id: &str) -> Option<String> {
        self.lock().users.get(user_id).map(|u| u.email.clone())
    }

    /// Marks an owner (user or service account id) as having, or not having, effective
    /// access to a project; false when the project is unknown.
    pub fn set_owner_active(&self, project_id: &str, owner_id: &str, active: bool) -> bool {
        self.lock()
            .set_owner_active(project_id, owner_id, active)
            .is_ok()
    }

    /// Deletes a live key, as `DELETE .../api_keys/{id}` would (ignoring faults),
    /// logged as done by the organization owner in the dashboard; false when it is
    /// unknown or already deleted.
    pub fn delete_key(&self, key_id: &str) -> bool {
        let mut st = self.lock();
        let now = st.now();
        let Some(project) = st.keys.get(key_id).map(|k| k.project_id.clone()) else {
            return false;
        };
        let by = st.seed_actor(None);
        st.remove_key(&project, key_id, now, &by).is_ok()
    }

    /// Disables a key as OpenAI does a leaked one ([`Faults::disabled_keys`]): still
    /// listed, every call with it a 401. False when no such key exists.
    pub fn disable_key(&self, key_id: &str) -> bool {
        let mut st = self.lock();
        if !st.keys.contains_key(key_id) {
            return false;
        }
        st.faults.disabled_keys.insert(key_id.to_owned());
        true
    }

    // ----- inspection -----

    /// Every project, archived included, in creation order.
    pub fn projects(&self) -> Vec<SimProject> {
        self.lock().projects.iter().map(sim_project).collect()
    }

    /// One project.
    pub fn project(&self, project_id: &str) -> Option<SimProject> {
        self.lock().project(project_id).ok().map(sim_project)
    }

    /// The live service accounts of a project, in creation order.
    pub fn service_accounts(&self, project_id: &str) -> Vec<SimServiceAccount> {
        let st = self.lock();
        let Ok(p) = st.project(project_id) else {
            return Vec::new();
        };
        p.sas
            .values()
            .filter_map(|id| st.sas.get(id))
            .map(|s| SimServiceAccount {
                id: s.id.clone(),
                project_id: s.project_id.clone(),
                name: s.name.clone(),
                role: s.role.clone(),
                created_at: s.created_at,
                deleted_at: s.deleted_at,
            })
            .collect()
    }

    /// The keys of a project that are not deleted, in listing order (expired and
    /// archived-project keys included), with values.
    pub fn keys(&self, project_id: &str) -> Vec<SimKey> {
        let st = self.lock();
        let Ok(p) = st.project(project_id) else {
            return Vec::new();
        };
        p.keys
            .values()
            .filter_map(|id| st.keys.get(id))
            .map(|k| sim_key(&st, k))
            .collect()
    }

    /// Every not-deleted key of every project.
    pub fn all_keys(&self) -> Vec<SimKey> {
        let st = self.lock();
        st.projects
            .iter()
            .flat_map(|p| p.keys.values())
            .filter_map(|id| st.keys.get(id))
            .map(|k| sim_key(&st, k))
            .collect()
    }

    /// One key, deleted or not.
    pub fn key(&self, key_id: &str) -> Option<SimKey> {
        let st = self.lock();
        st.keys.get(key_id).map(|k| sim_key(&st, k))
    }

    /// A key's value (deleted keys too).
    pub fn key_value(&self, key_id: &str) -> Option<String> {
        self.lock().keys.get(key_id).map(|k| k.value.clone())
    }

    /// Whether a key would work now: not deleted, not expired, project not archived.
    /// Ignores `reject_verification` and `disabled_keys` (see [`Sim::use_key`] for the
    /// full check).
    pub fn is_live(&self, key_id: &str) -> bool {
        let st = self.lock();
        let now = st.now();
        st.keys.get(key_id).is_some_and(|k| st.key_is_live(k, now))
    }

    /// Ids of deleted project keys, in creation order.
    pub fn deleted_keys(&self) -> Vec<String> {
        let st = self.lock();
        let mut deleted: Vec<&KeyRec> = st
            .keys
            .values()
            .filter(|k| k.deleted_at.is_some())
            .collect();
        deleted.sort_by_key(|k| k.seq);
        deleted.into_iter().map(|k| k.id.clone()).collect()
    }

    /// Every admin key ever created (deleted ones too), in creation order.
    pub fn admin_keys(&self) -> Vec<SimAdminKey> {
        let st = self.lock();
        let mut keys: Vec<&state::AdminKeyRec> = st.admin_keys.values().collect();
        keys.sort_by_key(|k| k.seq);
        keys.into_iter()
            .map(|k| SimAdminKey {
                id: k.id.clone(),
                name: k.name.clone(),
                value: k.value.clone(),
                created_at: k.created_at,
                expires_at: k.expires_at,
                last_used_at: k.last_used_at,
                minted: k.minted,
                deleted: k.deleted,
            })
            .collect()
    }

    /// Whether an admin key value would authenticate now (not deleted, not expired;
    /// ignores [`Faults::reject_admin_keys`]). Does not move `last_used_at`.
    pub fn admin_key_works(&self, value: &str) -> bool {
        let st = self.lock();
        let now = st.now();
        st.admin_keys
            .values()
            .any(|k| k.value == value && !k.deleted && k.expires_at.is_none_or(|e| e > now))
    }

    /// A consumer using a key: exactly what `GET /v1/models` does (moves
    /// `last_used_at`, counts one request of usage), without HTTP or request faults.
    /// True when the key works.
    pub fn use_key(&self, value: &str) -> bool {
        self.lock().use_key(value)
    }

    /// Records usage by project key `key_id` at `at` (Unix seconds): `requests` model
    /// requests with these token counts, served by `GET /organization/usage/completions`
    /// and priced by `GET /organization/costs`. False when no such key exists (deleted
    /// keys count).
    pub fn record_usage(
        &self,
        key_id: &str,
        at: i64,
        requests: u64,
        input_tokens: u64,
        output_tokens: u64,
    ) -> bool {
        let mut st = self.lock();
        let Some(project_id) = st.keys.get(key_id).map(|k| k.project_id.clone()) else {
            return false;
        };
        st.usage.push(state::UsageRec {
            at,
            project_id,
            key_id: key_id.to_owned(),
            requests,
            input_tokens,
            output_tokens,
        });
        true
    }

    /// Usage per key with `start <= at < end` (Unix seconds): what the usage endpoint
    /// would total, both what [`Sim::record_usage`] injected and the calls project keys
    /// made. Keys without usage in the window are absent.
    pub fn usage_totals(&self, start: i64, end: i64) -> BTreeMap<String, UsageTotals> {
        let st = self.lock();
        let mut totals: BTreeMap<String, UsageTotals> = BTreeMap::new();
        for u in st.usage.iter().filter(|u| (start..end).contains(&u.at)) {
            let t = totals.entry(u.key_id.clone()).or_default();
            t.requests += u.requests;
            t.input_tokens += u.input_tokens;
            t.output_tokens += u.output_tokens;
        }
        totals
    }

    /// The audit log, newest first (as `GET /organization/audit_logs` lists it): every
    /// creation, update and deletion of a key or service account, with its actor. No
    /// entry holds a key value.
    pub fn audit_log(&self) -> Vec<SimAuditEntry> {
        self.lock().audit_entries()
    }

    /// The request log, oldest first (the last 200,000 requests).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.lock().log.iter().cloned().collect()
    }

    /// The logged requests that matched `route`.
    pub fn requests_to(&self, route: Route) -> Vec<RequestRecord> {
        self.lock()
            .log
            .iter()
            .filter(|r| r.route == Some(route))
            .cloned()
            .collect()
    }

    /// Requests per (method, path, query): a count above 1 for a list page means the
    /// page was fetched twice.
    pub fn request_counts(&self) -> BTreeMap<(String, String, String), u64> {
        let mut counts = BTreeMap::new();
        for r in self.lock().log.iter() {
            *counts
                .entry((r.method.clone(), r.path.clone(), r.query.clone()))
                .or_insert(0) += 1;
        }
        counts
    }

    /// Empties the request log.
    pub fn clear_requests(&self) {
        self.lock().log.clear();
    }
}

fn sim_project(p: &state::ProjectRec) -> SimProject {
    SimProject {
        id: p.id.clone(),
        name: p.name.clone(),
        created_at: p.created_at,
        archived_at: p.archived_at,
    }
}

fn sim_key(st: &State, k: &KeyRec) -> SimKey {
    let owner_name = match &k.owner {
        OwnerRef::User(id) => st.users.get(id).map(|u| u.name.clone()),
        OwnerRef::ServiceAccount(id) => st.sas.get(id).map(|s| s.name.clone()),
    };
    SimKey {
        id: k.id.clone(),
        project_id: k.project_id.clone(),
        name: k.name.clone(),
        value: k.value.clone(),
        created_at: k.created_at,
        last_used_at: k.last_used_at,
        expires_at: k.expires_at,
        owner: k.owner.clone(),
        owner_name: owner_name.unwrap_or_default(),
        owner_active: st.owner_active(k),
        scopes: k.scopes.clone(),
        minted: k.minted,
        deleted_at: k.deleted_at,
    }
}

/// A running simulator. Dropping it stops the server.
pub struct SimServer {
    /// `http://127.0.0.1:<port>/v1`.
    pub base_url: String,
    pub addr: SocketAddr,
    /// The simulator it serves (a clone sharing the state).
    pub sim: Sim,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl fmt::Debug for SimServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimServer")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl SimServer {
    /// Stops accepting connections and waits (at most 5 s) for open ones to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Serves `sim` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    sim: Sim,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    axum::serve(listener, sim.router())
        .with_graceful_shutdown(shutdown)
        .await
}

/// What `keyrotd sim` prints to point keyrotd at a simulator: the environment variables
/// keyrotd reads (`KEYROTD__OPENAI__BASE_URL`, `KEYROTD__OPENAI__ADMIN_KEY_ENV` and the
/// variable that names, holding the admin key), as `export` lines to paste into a
/// shell, then the equivalent `[openai]` config lines as comments.
pub fn connect_hint(base_url: &str, admin_key: &str) -> String {
    const ADMIN_KEY_ENV: &str = "OPENAI_ADMIN_KEY";
    format!(
        "# Point keyrotd at it: paste these into the shell that runs keyrotd,\n\
         export KEYROTD__OPENAI__BASE_URL={base_url}\n\
         export KEYROTD__OPENAI__ADMIN_KEY_ENV={ADMIN_KEY_ENV}\n\
         export {ADMIN_KEY_ENV}={admin_key}\n\
         # or put the first two in the config file instead:\n\
         #   [openai]\n\
         #   base_url = \"{base_url}\"\n\
         #   admin_key_env = \"{ADMIN_KEY_ENV}\"\n"
    )
}

/// `keyrotd sim`: populates a simulator from `scenario`, prints how to point keyrotd at
/// it (see [`connect_hint`]), and serves on `listen` until Ctrl-C. `admin_key`
/// defaults to a fresh random `sk-admin-...` value.
pub async fn run_standalone(
    listen: &str,
    admin_key: Option<String>,
    scenario: &Scenario,
) -> io::Result<()> {
    let admin_key = admin_key.unwrap_or_else(|| {
        use rand::Rng;
        let tail: String = rand::thread_rng()
            .sample_iter(&rand::distributions::Alphanumeric)
            .take(48)
            .map(char::from)
            .collect();
        format!("sk-admin-{tail}")
    });
    let sim = Sim::with_seed(&admin_key, scenario.seed);
    let truth = scenario.populate(&sim);
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    println!(
        "# keyrotd sim: {} projects, {} keys ({} stale), serving until Ctrl-C",
        truth.projects.len(),
        truth.keys.len(),
        truth.keys.iter().filter(|k| k.stale).count()
    );
    print!("{}", connect_hint(&format!("http://{addr}/v1"), &admin_key));
    serve(listener, sim, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}
