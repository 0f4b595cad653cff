//! The simulated organization and the spec's operations on it. No HTTP here: the
//! server in `http.rs` authenticates, injects faults and calls [`State::execute`].
//!
//! Lists keep a stable order by creation sequence (a `BTreeMap<seq, id>` per parent);
//! deleted records stay in the id maps as tombstones, so an `after` cursor naming a
//! deleted item still resolves to its position. A page costs O(log n + page size).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::distributions::Alphanumeric;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use super::faults::{Faults, RejectVerification};
use super::route::{Ids, Route};
use super::{OwnerRef, RequestRecord, SimActor, SimAuditEntry};

/// Longest `expires_in_seconds` accepted (one year, as for admin keys).
const MAX_EXPIRES_IN: i64 = 31_536_000;
/// Request-log entries kept (oldest dropped first).
pub(crate) const LOG_CAPACITY: usize = 200_000;

/// An error in the spec's `ErrorResponse` shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SimError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl SimError {
    pub fn new(status: u16, message: impl Into<String>) -> SimError {
        SimError {
            status,
            message: message.into(),
            kind: if status >= 500 {
                "server_error"
            } else {
                "invalid_request_error"
            },
            param: None,
            code: None,
        }
    }
    pub fn invalid(
        param: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> SimError {
        SimError {
            param: Some(param),
            code: Some(code),
            ..SimError::new(400, message)
        }
    }
    pub fn not_found(what: &str, id: &str) -> SimError {
        SimError {
            code: Some("not_found"),
            ..SimError::new(404, format!("No such {what}: '{id}'."))
        }
    }
    pub fn with_code(mut self, kind: &'static str, code: Option<&'static str>) -> SimError {
        self.kind = kind;
        self.code = code;
        self
    }
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

pub(crate) type SimResult<T> = Result<T, SimError>;

pub(crate) struct ProjectRec {
    pub id: String,
    pub name: String,
    pub created_at: i64,
    pub archived_at: Option<i64>,
    /// Live keys by creation sequence.
    pub keys: BTreeMap<u64, String>,
    /// Live service accounts by creation sequence.
    pub sas: BTreeMap<u64, String>,
    /// Owner ids (users or service accounts) without effective access to the project.
    pub inactive_owners: HashSet<String>,
}

pub(crate) struct KeyRec {
    pub id: String,
    pub seq: u64,
    pub project_id: String,
    pub name: String,
    pub value: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub owner: OwnerRef,
    pub scopes: Vec<String>,
    /// Created through the HTTP API (as opposed to seeded by a test or scenario).
    pub minted: bool,
    pub created_instant: Instant,
    pub deleted_at: Option<i64>,
}

/// Usage one key made at one time (`Sim::record_usage`).
pub(crate) struct UsageRec {
    pub at: i64,
    pub project_id: String,
    pub key_id: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// One audit-log entry (`GET /organization/audit_logs`). Holds ids, scopes and roles,
/// never a key value.
pub(crate) struct AuditRec {
    pub id: String,
    pub kind: &'static str,
    pub effective_at: i64,
    pub project_id: Option<String>,
    /// The key or service account acted on.
    pub resource_id: String,
    pub actor: SimActor,
    /// The object under the event's type name (`{"id": ..., "data": {...}}`).
    pub details: Value,
}

/// The IP address audit-log sessions come from (a documentation address).
pub(crate) const SESSION_IP: &str = "198.51.100.7";

/// The model every simulated usage record is for.
pub(crate) const USAGE_MODEL: &str = "gpt-4o-mini";

/// The simulator's fixed price list, USD per million tokens of `gpt-4o-mini` (`USAGE_MODEL`): the
/// `/organization/costs` line items (input, then output).
pub const PRICES: [(&str, f64); 2] = [("gpt-4o-mini, input", 0.15), ("gpt-4o-mini, output", 0.60)];

pub(crate) struct SaRec {
    pub id: String,
    pub seq: u64,
    pub project_id: String,
    pub name: String,
    pub role: String,
    pub created_at: i64,
    pub deleted_at: Option<i64>,
}

pub(crate) struct UserRec {
    pub id: String,
    pub name: String,
    pub email: String,
    pub role: String,
    pub created_at: i64,
}

pub(crate) struct AdminKeyRec {
    pub id: String,
    pub seq: u64,
    pub name: String,
    pub value: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub last_used_at: Option<i64>,
    pub deleted: bool,
    /// Created through `POST /organization/admin_api_keys` rather than seeded.
    pub minted: bool,
}

/// A parsed query string (the last value of a repeated parameter wins).
#[derive(Debug, Default)]
pub(crate) struct Query(pub Vec<(String, String)>);

impl Query {
    /// Every value of an array parameter, as `name=a&name=b` or `name[]=a&name[]=b`.
    pub fn all(&self, name: &str) -> Vec<&str> {
        let bracketed = format!("{name}[]");
        self.0
            .iter()
            .filter(|(k, _)| *k == name || *k == bracketed)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

pub(crate) struct State {
    pub rng: StdRng,
    pub clock_offset: i64,
    pub faults: Faults,
    seq: u64,
    pub projects: Vec<ProjectRec>,
    pub project_idx: HashMap<String, usize>,
    pub keys: HashMap<String, KeyRec>,
    key_by_value: HashMap<String, String>,
    pub sas: HashMap<String, SaRec>,
    pub users: HashMap<String, UserRec>,
    admin_order: BTreeMap<u64, String>,
    pub admin_keys: HashMap<String, AdminKeyRec>,
    admin_by_value: HashMap<String, String>,
    org_owner: String,
    pub log: VecDeque<RequestRecord>,
    pub log_seq: u64,
    pub usage: Vec<UsageRec>,
    /// Usage recorded from calls with a project key: (key id, minute start) -> index
    /// into `usage`, so calls in one minute add up in one record.
    call_usage: HashMap<(String, i64), usize>,
    /// The audit log by (effective_at, creation sequence); listed newest first.
    pub audit: BTreeMap<(i64, u64), AuditRec>,
    audit_idx: HashMap<String, (i64, u64)>,
    /// The audit log's keys by resource acted on (for `resource_ids[]`).
    audit_by_resource: HashMap<String, Vec<(i64, u64)>>,
}

impl State {
    pub fn new(admin_key: &str, seed: u64) -> State {
        let mut st = State {
            rng: StdRng::seed_from_u64(seed),
            clock_offset: 0,
            faults: Faults::default(),
            seq: 0,
            projects: Vec::new(),
            project_idx: HashMap::new(),
            keys: HashMap::new(),
            key_by_value: HashMap::new(),
            sas: HashMap::new(),
            users: HashMap::new(),
            admin_order: BTreeMap::new(),
            admin_keys: HashMap::new(),
            admin_by_value: HashMap::new(),
            org_owner: String::new(),
            log: VecDeque::new(),
            log_seq: 0,
            usage: Vec::new(),
            call_usage: HashMap::new(),
            audit: BTreeMap::new(),
            audit_idx: HashMap::new(),
            audit_by_resource: HashMap::new(),
        };
        let now = st.now();
        st.org_owner = st.new_user("Org Owner", "owner@example.com", "owner", now);
        st.insert_admin_key("Initial Admin Key", admin_key.to_owned(), now, None, false);
        st
    }

    /// The simulator's clock: wall time shifted by [`Sim::advance`](super::Sim::advance).
    pub fn now(&self) -> i64 {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        wall + self.clock_offset
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// `prefix` + 24 random hex digits, unique among ids in use.
    fn new_id(&mut self, prefix: &str) -> String {
        loop {
            let id = format!("{prefix}{:024x}", self.rng.gen::<u128>() >> 32);
            let taken = self.project_idx.contains_key(&id)
                || self.keys.contains_key(&id)
                || self.sas.contains_key(&id)
                || self.users.contains_key(&id)
                || self.admin_keys.contains_key(&id);
            if !taken {
                return id;
            }
        }
    }

    fn random_chars(&mut self, n: usize) -> String {
        (&mut self.rng)
            .sample_iter(&Alphanumeric)
            .take(n)
            .map(char::from)
            .collect()
    }

    // ----- the audit log -----

    /// The actor of a change made outside the API (seeding, tests): the owning user's
    /// dashboard session for a user's key, the organization owner's otherwise.
    pub fn seed_actor(&self, owner: Option<&OwnerRef>) -> SimActor {
        match owner {
            Some(OwnerRef::User(uid)) => SimActor::Session(uid.clone()),
            _ => SimActor::Session(self.org_owner.clone()),
        }
    }

    /// Appends an audit-log entry about `resource_id` in `project_id`.
    fn audit(
        &mut self,
        kind: &'static str,
        at: i64,
        project_id: &str,
        resource_id: &str,
        by: &SimActor,
        details: Value,
    ) {
        let seq = self.next_seq();
        let id = format!("audit_log-{seq:012}");
        self.audit_idx.insert(id.clone(), (at, seq));
        self.audit_by_resource
            .entry(resource_id.to_owned())
            .or_default()
            .push((at, seq));
        self.audit.insert(
            (at, seq),
            AuditRec {
                id,
                kind,
                effective_at: at,
                project_id: Some(project_id.to_owned()),
                resource_id: resource_id.to_owned(),
                actor: by.clone(),
                details,
            },
        );
    }

    /// `api_key.created` for a key just made.
    fn audit_key_created(&mut self, key_id: &str, by: &SimActor) {
        let Some(k) = self.keys.get(key_id) else {
            return;
        };
        let (at, project, details) = (
            k.created_at,
            k.project_id.clone(),
            json!({"id": k.id, "data": {"scopes": k.scopes}}),
        );
        self.audit("api_key.created", at, &project, key_id, by, details);
    }

    /// The audit log, newest first, as the simulator's ground truth.
    pub fn audit_entries(&self) -> Vec<SimAuditEntry> {
        self.audit
            .values()
            .rev()
            .map(|a| SimAuditEntry {
                id: a.id.clone(),
                kind: a.kind.to_owned(),
                effective_at: a.effective_at,
                project_id: a.project_id.clone(),
                resource_id: a.resource_id.clone(),
                actor: a.actor.clone(),
            })
            .collect()
    }

    // ----- seeding (also used by the HTTP operations) -----

    pub fn new_project(&mut self, name: &str, created_at: i64) -> String {
        let id = self.new_id("proj_");
        self.project_idx.insert(id.clone(), self.projects.len());
        self.projects.push(ProjectRec {
            id: id.clone(),
            name: name.to_owned(),
            created_at,
            archived_at: None,
            keys: BTreeMap::new(),
            sas: BTreeMap::new(),
            inactive_owners: HashSet::new(),
        });
        id
    }

    pub fn project(&self, id: &str) -> SimResult<&ProjectRec> {
        self.project_idx
            .get(id)
            .map(|&i| &self.projects[i])
            .ok_or_else(|| SimError::not_found("project", id))
    }

    fn project_mut(&mut self, id: &str) -> SimResult<&mut ProjectRec> {
        match self.project_idx.get(id) {
            Some(&i) => Ok(&mut self.projects[i]),
            None => Err(SimError::not_found("project", id)),
        }
    }

    fn live_project(&self, id: &str) -> SimResult<&ProjectRec> {
        let p = self.project(id)?;
        if p.archived_at.is_some() {
            return Err(SimError::new(400, format!("Project '{id}' is archived.")));
        }
        Ok(p)
    }

    pub fn archive(&mut self, id: &str, at: i64) -> SimResult<()> {
        let p = self.project_mut(id)?;
        p.archived_at.get_or_insert(at);
        Ok(())
    }

    pub fn new_user(&mut self, name: &str, email: &str, role: &str, created_at: i64) -> String {
        let id = self.new_id("user_");
        self.users.insert(
            id.clone(),
            UserRec {
                id: id.clone(),
                name: name.to_owned(),
                email: email.to_owned(),
                role: role.to_owned(),
                created_at,
            },
        );
        id
    }

    pub fn new_sa(
        &mut self,
        project_id: &str,
        name: &str,
        role: &str,
        created_at: i64,
        by: &SimActor,
    ) -> SimResult<String> {
        self.project(project_id)?;
        let id = self.new_id("svc_acct_");
        let seq = self.next_seq();
        self.sas.insert(
            id.clone(),
            SaRec {
                id: id.clone(),
                seq,
                project_id: project_id.to_owned(),
                name: name.to_owned(),
                role: role.to_owned(),
                created_at,
                deleted_at: None,
            },
        );
        self.project_mut(project_id)?.sas.insert(seq, id.clone());
        let details = json!({"id": id, "data": {"role": role}});
        self.audit(
            "service_account.created",
            created_at,
            project_id,
            &id,
            by,
            details,
        );
        Ok(id)
    }

    fn live_sa(&self, project_id: &str, sa_id: &str) -> SimResult<&SaRec> {
        match self.sas.get(sa_id) {
            Some(sa) if sa.project_id == project_id && sa.deleted_at.is_none() => Ok(sa),
            _ => Err(SimError::not_found("service account", sa_id)),
        }
    }

    /// Creates a project key (logged as `api_key.created` by `by`); the value's prefix
    /// follows the owner type.
    #[allow(clippy::too_many_arguments)]
    pub fn new_key(
        &mut self,
        project_id: &str,
        owner: OwnerRef,
        name: &str,
        created_at: i64,
        last_used_at: Option<i64>,
        expires_at: Option<i64>,
        scopes: Vec<String>,
        minted: bool,
        by: &SimActor,
    ) -> SimResult<String> {
        self.project(project_id)?;
        let prefix = match &owner {
            OwnerRef::User(uid) => {
                if !self.users.contains_key(uid) {
                    return Err(SimError::not_found("user", uid));
                }
                "sk-proj-"
            }
            OwnerRef::ServiceAccount(sa) => {
                self.live_sa(project_id, sa)?;
                "sk-svcacct-"
            }
        };
        let id = self.new_id("key_");
        let value = format!("{prefix}{}", self.random_chars(48));
        let seq = self.next_seq();
        self.key_by_value.insert(value.clone(), id.clone());
        self.keys.insert(
            id.clone(),
            KeyRec {
                id: id.clone(),
                seq,
                project_id: project_id.to_owned(),
                name: name.to_owned(),
                value,
                created_at,
                last_used_at,
                expires_at,
                owner,
                scopes,
                minted,
                created_instant: Instant::now(),
                deleted_at: None,
            },
        );
        self.project_mut(project_id)?.keys.insert(seq, id.clone());
        self.audit_key_created(&id, by);
        Ok(id)
    }

    /// Deletes a live key of `project_id` (the project's archived state does not
    /// matter), logged as `api_key.deleted` by `by`.
    pub fn remove_key(
        &mut self,
        project_id: &str,
        key_id: &str,
        now: i64,
        by: &SimActor,
    ) -> SimResult<()> {
        let seq = match self.keys.get_mut(key_id) {
            Some(k) if k.project_id == project_id && k.deleted_at.is_none() => {
                k.deleted_at = Some(now);
                k.seq
            }
            _ => return Err(SimError::not_found("API key", key_id)),
        };
        self.project_mut(project_id)?.keys.remove(&seq);
        let details = json!({"id": key_id});
        self.audit("api_key.deleted", now, project_id, key_id, by, details);
        Ok(())
    }

    fn insert_admin_key(
        &mut self,
        name: &str,
        value: String,
        now: i64,
        expires_at: Option<i64>,
        minted: bool,
    ) -> String {
        let id = self.new_id("key_");
        let seq = self.next_seq();
        self.admin_by_value.insert(value.clone(), id.clone());
        self.admin_order.insert(seq, id.clone());
        self.admin_keys.insert(
            id.clone(),
            AdminKeyRec {
                id: id.clone(),
                seq,
                name: name.to_owned(),
                value,
                created_at: now,
                expires_at,
                last_used_at: None,
                deleted: false,
                minted,
            },
        );
        id
    }

    pub fn set_owner_active(
        &mut self,
        project_id: &str,
        owner_id: &str,
        active: bool,
    ) -> SimResult<()> {
        let p = self.project_mut(project_id)?;
        if active {
            p.inactive_owners.remove(owner_id);
        } else {
            p.inactive_owners.insert(owner_id.to_owned());
        }
        Ok(())
    }

    pub fn owner_active(&self, key: &KeyRec) -> bool {
        self.project(&key.project_id)
            .map(|p| !p.inactive_owners.contains(key.owner.id()))
            .unwrap_or(false)
    }

    /// Not deleted, not expired, in a project that is not archived.
    pub fn key_is_live(&self, key: &KeyRec, now: i64) -> bool {
        key.deleted_at.is_none()
            && key.expires_at.is_none_or(|e| e > now)
            && self
                .project(&key.project_id)
                .is_ok_and(|p| p.archived_at.is_none())
    }

    pub fn key_by_value(&self, value: &str) -> Option<&KeyRec> {
        self.key_by_value
            .get(value)
            .and_then(|id| self.keys.get(id))
    }

    /// `GET /models` for a project key: true when the key is live, not disabled
    /// ([`Faults::disabled_keys`]) and no fault rejects it; then its `last_used_at`
    /// moves to now and the call counts as one request of its usage (this minute).
    pub fn use_key(&mut self, value: &str) -> bool {
        let now = self.now();
        let Some(key) = self.key_by_value(value) else {
            return false;
        };
        let rejected = match &self.faults.reject_verification {
            RejectVerification::None => false,
            RejectVerification::Minted => key.minted,
            RejectVerification::All => true,
            RejectVerification::Keys(ids) => ids.contains(&key.id),
        };
        let propagating =
            key.minted && key.created_instant.elapsed() < self.faults.propagation_delay;
        let disabled = self.faults.disabled_keys.contains(&key.id);
        if rejected || propagating || disabled || !self.key_is_live(key, now) {
            return false;
        }
        let (id, project_id) = (key.id.clone(), key.project_id.clone());
        if let Some(k) = self.keys.get_mut(&id) {
            k.last_used_at = Some(now);
        }
        self.count_call(&id, &project_id, now);
        true
    }

    /// One request of `key_id` at `at`, added to that key's record for the minute.
    fn count_call(&mut self, key_id: &str, project_id: &str, at: i64) {
        let minute = at.div_euclid(60) * 60;
        let slot = (key_id.to_owned(), minute);
        if let Some(&i) = self.call_usage.get(&slot) {
            self.usage[i].requests += 1;
            return;
        }
        self.call_usage.insert(slot, self.usage.len());
        self.usage.push(UsageRec {
            at: minute,
            project_id: project_id.to_owned(),
            key_id: key_id.to_owned(),
            requests: 1,
            input_tokens: 0,
            output_tokens: 0,
        });
    }

    /// Admin authentication: the admin key's id for a live admin key (and its
    /// `last_used_at` moves); 403 for a live, enabled project key; 401 otherwise.
    pub fn authenticate_admin(&mut self, bearer: Option<&str>) -> SimResult<String> {
        let now = self.now();
        let Some(token) = bearer else {
            return Err(SimError::new(
                401,
                "You didn't provide an API key. You need to provide your API key in an \
                 Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
            .with_code("invalid_request_error", Some("invalid_api_key")));
        };
        if let Some(id) = self.admin_by_value.get(token).cloned() {
            let rejected =
                self.admin_keys
                    .get(&id)
                    .is_some_and(|k| match &self.faults.reject_admin_keys {
                        RejectVerification::None => false,
                        RejectVerification::Minted => k.minted,
                        RejectVerification::All => true,
                        RejectVerification::Keys(ids) => ids.contains(&k.id),
                    });
            if let Some(k) = self.admin_keys.get_mut(&id) {
                if !rejected && !k.deleted && k.expires_at.is_none_or(|e| e > now) {
                    k.last_used_at = Some(now);
                    return Ok(id);
                }
            }
        }
        if self
            .key_by_value(token)
            .is_some_and(|k| self.key_is_live(k, now) && !self.faults.disabled_keys.contains(&k.id))
        {
            return Err(SimError::new(
                403,
                "You have insufficient permissions for this operation. Missing scopes: \
                 api.management.read. Check that you are using an admin API key.",
            )
            .with_code("invalid_request_error", Some("insufficient_permissions")));
        }
        Err(unauthorized(token))
    }

    // ----- the operations -----

    /// Runs an operation for an authenticated caller. `bearer` is only read by `/models`;
    /// `by` (the admin key that authenticated) is who the audit log says made a change.
    pub fn execute(
        &mut self,
        route: Route,
        ids: &Ids,
        q: &Query,
        body: &[u8],
        bearer: Option<&str>,
        by: Option<&SimActor>,
    ) -> SimResult<Value> {
        let now = self.now();
        let by = by.cloned().unwrap_or_else(|| self.seed_actor(None));
        let by = &by;
        let p = ids.get(0);
        let x = ids.get(1);
        match route {
            Route::ListModels => {
                let token = bearer.unwrap_or("");
                if self.use_key(token) {
                    Ok(models_json())
                } else {
                    Err(unauthorized(token))
                }
            }
            Route::ListProjects => self.list_projects(q),
            Route::CreateProject => {
                let b = parse_body(body, true)?;
                let name = required_str(&b, "name")?;
                let id = self.new_project(&name, now);
                Ok(self.project_json(self.project(&id)?))
            }
            Route::GetProject => Ok(self.project_json(self.project(p)?)),
            Route::ModifyProject => {
                let b = parse_body(body, true)?;
                let name = optional_str(&b, "name")?;
                let proj = self.project_mut(p)?;
                if let Some(name) = name {
                    proj.name = name;
                }
                Ok(self.project_json(self.project(p)?))
            }
            Route::ArchiveProject => {
                self.archive(p, now)?;
                Ok(self.project_json(self.project(p)?))
            }
            Route::ListApiKeys => self.list_keys(p, q),
            Route::GetApiKey => {
                self.project(p)?;
                match self.keys.get(x) {
                    Some(k) if k.project_id == p && k.deleted_at.is_none() => Ok(self.key_json(k)),
                    _ => Err(SimError::not_found("API key", x)),
                }
            }
            Route::DeleteApiKey => {
                self.project(p)?;
                let is_sa_key = match self.keys.get(x) {
                    Some(k) if k.project_id == p && k.deleted_at.is_none() => {
                        matches!(k.owner, OwnerRef::ServiceAccount(_))
                    }
                    _ => return Err(SimError::not_found("API key", x)),
                };
                if is_sa_key && self.faults.refuse_sa_key_delete {
                    return Err(SimError::new(
                        400,
                        "Cannot delete an API key that belongs to a service account. Delete the \
                         service account instead.",
                    ));
                }
                self.remove_key(p, x, now, by)?;
                Ok(
                    json!({"object": "organization.project.api_key.deleted", "id": x, "deleted": true}),
                )
            }
            Route::UpdateApiKey => self.update_key(p, x, body, now, by),
            Route::UsageCompletions => self.usage_buckets(q, now, false),
            Route::Costs => self.usage_buckets(q, now, true),
            Route::ListAuditLogs => self.list_audit_logs(q),
            Route::ListServiceAccounts => self.list_sas(p, q),
            Route::CreateServiceAccount => self.create_sa(p, body, now, by),
            Route::GetServiceAccount => {
                self.project(p)?;
                Ok(sa_json(self.live_sa(p, x)?))
            }
            Route::UpdateServiceAccount => {
                self.live_project(p)?;
                self.live_sa(p, x)?;
                let b = parse_body(body, true)?;
                let name = optional_str(&b, "name")?;
                let role = optional_str(&b, "role")?;
                if let Some(r) = &role {
                    if r != "member" && r != "owner" {
                        return Err(SimError::invalid(
                            "role",
                            "invalid_value",
                            format!("Invalid 'role': expected 'member' or 'owner', got '{r}'."),
                        ));
                    }
                }
                let mut changes = Map::new();
                if let Some(name) = &name {
                    changes.insert("name".into(), json!(name));
                }
                if let Some(role) = &role {
                    changes.insert("role".into(), json!(role));
                }
                let sa = self
                    .sas
                    .get_mut(x)
                    .ok_or_else(|| SimError::not_found("service account", x))?;
                if let Some(name) = name {
                    sa.name = name;
                }
                if let Some(role) = role {
                    sa.role = role;
                }
                let out = sa_json(sa);
                let details = json!({"id": x, "changes_requested": changes});
                self.audit("service_account.updated", now, p, x, by, details);
                Ok(out)
            }
            Route::DeleteServiceAccount => {
                self.live_project(p)?;
                let seq = self.live_sa(p, x)?.seq;
                let owned: Vec<String> = self
                    .project(p)?
                    .keys
                    .values()
                    .filter(|id| {
                        self.keys.get(*id).is_some_and(
                            |k| matches!(&k.owner, OwnerRef::ServiceAccount(s) if s == x),
                        )
                    })
                    .cloned()
                    .collect();
                for id in owned {
                    self.remove_key(p, &id, now, by)?;
                }
                if let Some(sa) = self.sas.get_mut(x) {
                    sa.deleted_at = Some(now);
                }
                self.project_mut(p)?.sas.remove(&seq);
                self.audit("service_account.deleted", now, p, x, by, json!({"id": x}));
                Ok(
                    json!({"object": "organization.project.service_account.deleted", "id": x, "deleted": true}),
                )
            }
            Route::CreateServiceAccountKey => self.create_sa_key(p, x, body, now, by),
            Route::ListAdminKeys => self.list_admin_keys(q),
            Route::CreateAdminKey => {
                let b = parse_body(body, true)?;
                let name = required_str(&b, "name")?;
                let expires_at = expires_in(&b)?.map(|s| now + s);
                let value = format!("sk-admin-{}", self.random_chars(48));
                let id = self.insert_admin_key(&name, value.clone(), now, expires_at, true);
                let mut v = self.admin_key_json(&self.admin_keys[&id]);
                v["value"] = Value::String(value);
                Ok(v)
            }
            Route::GetAdminKey => match self.admin_keys.get(p) {
                Some(k) if !k.deleted => Ok(self.admin_key_json(k)),
                _ => Err(SimError::not_found("admin API key", p)),
            },
            Route::DeleteAdminKey => match self.admin_keys.get_mut(p) {
                Some(k) if !k.deleted => {
                    k.deleted = true;
                    let seq = k.seq;
                    self.admin_order.remove(&seq);
                    Ok(
                        json!({"id": p, "object": "organization.admin_api_key.deleted", "deleted": true}),
                    )
                }
                _ => Err(SimError::not_found("admin API key", p)),
            },
        }
    }

    fn create_sa(&mut self, p: &str, body: &[u8], now: i64, by: &SimActor) -> SimResult<Value> {
        self.live_project(p)?;
        let b = parse_body(body, true)?;
        let name = required_str(&b, "name")?;
        let only = match b.get("create_service_account_only") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(v)) => *v,
            Some(_) => {
                return Err(SimError::invalid(
                    "create_service_account_only",
                    "invalid_type",
                    "Invalid 'create_service_account_only': expected a boolean.",
                ))
            }
        };
        // SDK 3.57: the initial key's lifetime; meaningless without an initial key.
        let expires_at = expires_in(&b)?.map(|s| now + s);
        if only && expires_at.is_some() {
            return Err(SimError::invalid(
                "expires_in_seconds",
                "invalid_value",
                "'expires_in_seconds' is not allowed with 'create_service_account_only': true.",
            ));
        }
        let role = if only { "none" } else { "member" };
        let sa_id = self.new_sa(p, &name, role, now, by)?;
        let api_key = if only {
            Value::Null
        } else {
            let owner = OwnerRef::ServiceAccount(sa_id.clone());
            let key_id = self.new_key(
                p,
                owner,
                "Secret Key",
                now,
                None,
                expires_at,
                Vec::new(),
                true,
                by,
            )?;
            created_key_json(&self.keys[&key_id])
        };
        let mut v = sa_json(&self.sas[&sa_id]);
        v["api_key"] = api_key;
        Ok(v)
    }

    fn create_sa_key(
        &mut self,
        p: &str,
        sa: &str,
        body: &[u8],
        now: i64,
        by: &SimActor,
    ) -> SimResult<Value> {
        self.live_project(p)?;
        self.live_sa(p, sa)?;
        let b = parse_body(body, false)?;
        let name = optional_str(&b, "name")?.unwrap_or_else(|| "Secret Key".to_owned());
        let scopes = scopes(&b)?.unwrap_or_default();
        let expires_at = expires_in(&b)?.map(|s| now + s);
        let owner = OwnerRef::ServiceAccount(sa.to_owned());
        let id = self.new_key(p, owner, &name, now, None, expires_at, scopes, true, by)?;
        Ok(created_key_json(&self.keys[&id]))
    }

    /// `POST .../api_keys/{id}` (SDK 3.57): a new expiry from now and/or new scopes, on
    /// a live, unexpired key of the project; answers the key's listing object.
    fn update_key(
        &mut self,
        p: &str,
        id: &str,
        body: &[u8],
        now: i64,
        by: &SimActor,
    ) -> SimResult<Value> {
        self.project(p)?;
        let expired = match self.keys.get(id) {
            Some(k) if k.project_id == p && k.deleted_at.is_none() => {
                k.expires_at.is_some_and(|e| e <= now)
            }
            _ => return Err(SimError::not_found("API key", id)),
        };
        let b = parse_body(body, true)?;
        for field in ["expires_in_seconds", "scopes"] {
            if b.get(field) == Some(&Value::Null) {
                return Err(SimError::invalid(
                    field,
                    "invalid_type",
                    format!("Invalid '{field}': may not be null."),
                ));
            }
        }
        let expires_in = expires_in(&b)?;
        let scopes = scopes(&b)?;
        if expires_in.is_none() && scopes.is_none() {
            return Err(SimError::invalid(
                "expires_in_seconds",
                "missing_required_parameter",
                "At least one of 'expires_in_seconds' or 'scopes' is required.",
            ));
        }
        if expired {
            return Err(SimError::invalid(
                "api_key_id",
                "api_key_expired",
                format!("API key '{id}' has expired and cannot be updated."),
            ));
        }
        let k = self
            .keys
            .get_mut(id)
            .ok_or_else(|| SimError::not_found("API key", id))?;
        let mut changes = Map::new();
        if let Some(secs) = expires_in {
            k.expires_at = Some(now + secs);
            changes.insert("expires_in_seconds".into(), json!(secs));
        }
        if let Some(scopes) = scopes {
            changes.insert("scopes".into(), json!(scopes));
            k.scopes = scopes;
        }
        let out = self.key_json(&self.keys[id]);
        let details = json!({"id": id, "changes_requested": changes});
        self.audit("api_key.updated", now, p, id, by, details);
        Ok(out)
    }

    /// `GET /organization/usage/completions` and `GET /organization/costs`: buckets
    /// of `bucket_width` from `start_time` (rounded down to the width) to `end_time`
    /// (default now), `limit` buckets a page, `next_page` = `page_<start of the next
    /// bucket>`. Usage groups by `project_id`, `api_key_id`, `model` (other `group_by`
    /// fields accepted and left null); costs by `project_id`, `api_key_id`,
    /// `line_item`, priced by [`PRICES`]. Empty buckets have no results.
    fn usage_buckets(&self, q: &Query, now: i64, costs: bool) -> SimResult<Value> {
        let int = |name: &'static str| -> SimResult<Option<i64>> {
            q.get(name)
                .map(|raw| {
                    raw.parse::<i64>().map_err(|_| {
                        SimError::invalid(
                            name,
                            "invalid_type",
                            format!(
                                "Invalid '{name}': expected an integer, but got '{raw}' instead."
                            ),
                        )
                    })
                })
                .transpose()
        };
        let start = int("start_time")?.ok_or_else(|| {
            SimError::invalid(
                "start_time",
                "missing_required_parameter",
                "Missing required parameter: 'start_time'.",
            )
        })?;
        let end = int("end_time")?.unwrap_or(now);
        let (width, default_limit, max_limit) = match (q.get("bucket_width").unwrap_or("1d"), costs)
        {
            ("1d", true) => (86_400, 7, 180),
            ("1m", false) => (60, 60, 1440),
            ("1h", false) => (3600, 24, 168),
            ("1d", false) => (86_400, 7, 31),
            (other, _) => {
                return Err(SimError::invalid(
                    "bucket_width",
                    "invalid_value",
                    format!("Invalid 'bucket_width': '{other}' is not supported here."),
                ))
            }
        };
        let limit = match int("limit")? {
            None => default_limit,
            Some(n) if (1..=max_limit).contains(&n) => n,
            Some(n) => {
                return Err(SimError::invalid(
                    "limit",
                    "invalid_value",
                    format!(
                    "Invalid 'limit': expected 1 to {max_limit} for this bucket_width, got {n}."
                ),
                ))
            }
        };
        let known: &[&str] = if costs {
            &["project_id", "line_item", "api_key_id"]
        } else {
            &[
                "project_id",
                "user_id",
                "api_key_id",
                "model",
                "batch",
                "service_tier",
            ]
        };
        let group_by = q.all("group_by");
        if let Some(bad) = group_by.iter().find(|g| !known.contains(g)) {
            return Err(SimError::invalid(
                "group_by",
                "invalid_value",
                format!("Invalid 'group_by': unknown field '{bad}'."),
            ));
        }
        let by = |f: &str| group_by.contains(&f);
        let keys = q.all("api_key_ids");
        let projects = q.all("project_ids");
        let mut cur = match q.get("page") {
            None => start.div_euclid(width) * width,
            Some(p) => p
                .strip_prefix("page_")
                .and_then(|n| n.parse::<i64>().ok())
                .ok_or_else(|| {
                    SimError::invalid("page", "invalid_value", format!("Invalid 'page': '{p}'."))
                })?,
        };
        let mut data = Vec::new();
        // The page's records, by bucket, in one pass over the usage (a page of many
        // buckets over much usage stays linear).
        let (first, page_end) = (
            cur,
            end.min(cur.saturating_add(limit.saturating_mul(width))),
        );
        let mut by_bucket: BTreeMap<i64, Vec<&UsageRec>> = BTreeMap::new();
        for u in self.usage.iter().filter(|u| {
            (start.max(first)..page_end).contains(&u.at)
                && (keys.is_empty() || keys.contains(&u.key_id.as_str()))
                && (projects.is_empty() || projects.contains(&u.project_id.as_str()))
        }) {
            by_bucket
                .entry(first + (u.at - first).div_euclid(width) * width)
                .or_default()
                .push(u);
        }
        while cur < end && (data.len() as i64) < limit {
            // (project, key, model or line item) -> requests, input, output.
            type Group<'a> = (Option<&'a str>, Option<&'a str>, Option<&'a str>);
            let mut groups: BTreeMap<Group<'_>, [u64; 3]> = BTreeMap::new();
            for u in by_bucket.get(&cur).into_iter().flatten() {
                let project = by("project_id").then_some(u.project_id.as_str());
                let key = by("api_key_id").then_some(u.key_id.as_str());
                if costs && by("line_item") {
                    let [(input_item, _), (output_item, _)] = PRICES;
                    groups.entry((project, key, Some(input_item))).or_default()[1] +=
                        u.input_tokens;
                    groups.entry((project, key, Some(output_item))).or_default()[2] +=
                        u.output_tokens;
                    continue;
                }
                let t = groups
                    .entry((project, key, (!costs && by("model")).then_some(USAGE_MODEL)))
                    .or_default();
                t[0] += u.requests;
                t[1] += u.input_tokens;
                t[2] += u.output_tokens;
            }
            let results: Vec<Value> = groups
                .into_iter()
                .map(
                    |((project_id, api_key_id, third), [requests, input, output])| {
                        if costs {
                            let [(_, input_price), (_, output_price)] = PRICES;
                            let value = (input as f64 * input_price + output as f64 * output_price)
                                / 1_000_000.0;
                            json!({
                                "object": "organization.costs.result",
                                "amount": {"value": value, "currency": "usd"},
                                "line_item": third,
                                "project_id": project_id,
                                "api_key_id": api_key_id,
                                "quantity": third.map(|_| input + output),
                                "quantity_unit": third.map(|_| "tokens"),
                            })
                        } else {
                            json!({
                                "object": "organization.usage.completions.result",
                                "input_tokens": input,
                                "input_cached_tokens": 0,
                                "output_tokens": output,
                                "input_audio_tokens": 0,
                                "output_audio_tokens": 0,
                                "num_model_requests": requests,
                                "project_id": project_id,
                                "user_id": null,
                                "api_key_id": api_key_id,
                                "model": third,
                                "batch": null,
                                "service_tier": null,
                            })
                        }
                    },
                )
                .collect();
            data.push(json!({
                "object": "bucket",
                "start_time": cur,
                "end_time": cur + width,
                "results": results,
            }));
            cur += width;
        }
        let has_more = cur < end;
        Ok(json!({
            "object": "page",
            "data": data,
            "has_more": has_more,
            "next_page": if has_more { Value::String(format!("page_{cur}")) } else { Value::Null },
        }))
    }

    fn list_projects(&self, q: &Query) -> SimResult<Value> {
        let limit = limit(q)?;
        let include_archived = match q.get("include_archived") {
            None => false,
            Some("true") => true,
            Some("false") => false,
            Some(other) => {
                return Err(SimError::invalid(
                    "include_archived",
                    "invalid_type",
                    format!("Invalid 'include_archived': expected a boolean, got '{other}'."),
                ))
            }
        };
        let start = match q.get("after") {
            None => 0,
            Some(after) => match self.project_idx.get(after) {
                Some(&i) => i + 1,
                None => return Err(bad_cursor(after)),
            },
        };
        let items = self.projects[start.min(self.projects.len())..]
            .iter()
            .filter(|p| include_archived || p.archived_at.is_none())
            .map(|p| self.project_json(p));
        Ok(page(items, limit))
    }

    fn list_keys(&self, p: &str, q: &Query) -> SimResult<Value> {
        let proj = self.project(p)?;
        let limit = limit(q)?;
        let access = match q.get("owner_project_access") {
            None | Some("active") => Some(true),
            Some("inactive") => Some(false),
            Some("any") => None,
            Some(other) => {
                return Err(SimError::invalid(
                    "owner_project_access",
                    "invalid_value",
                    format!(
                        "Invalid 'owner_project_access': expected one of 'active', 'inactive', \
                         'any', but got '{other}' instead."
                    ),
                ))
            }
        };
        let after = match q.get("after") {
            None => 0,
            Some(after) => match self.keys.get(after) {
                Some(k) if k.project_id == p => k.seq,
                _ => return Err(bad_cursor(after)),
            },
        };
        let items = proj
            .keys
            .range(after + 1..)
            .filter_map(|(_, id)| self.keys.get(id))
            .filter(|k| access.is_none_or(|want| self.owner_active(k) == want))
            .map(|k| self.key_json(k));
        Ok(page(items, limit))
    }

    fn list_sas(&self, p: &str, q: &Query) -> SimResult<Value> {
        let proj = self.live_project(p)?;
        let limit = limit(q)?;
        let after = match q.get("after") {
            None => 0,
            Some(after) => match self.sas.get(after) {
                Some(s) if s.project_id == p => s.seq,
                _ => return Err(bad_cursor(after)),
            },
        };
        let items = proj
            .sas
            .range(after + 1..)
            .filter_map(|(_, id)| self.sas.get(id))
            .map(sa_json);
        Ok(page(items, limit))
    }

    fn list_admin_keys(&self, q: &Query) -> SimResult<Value> {
        let limit = limit(q)?;
        let desc = match q.get("order") {
            None | Some("asc") => false,
            Some("desc") => true,
            Some(other) => {
                return Err(SimError::invalid(
                    "order",
                    "invalid_value",
                    format!(
                        "Invalid 'order': expected 'asc' or 'desc', but got '{other}' instead."
                    ),
                ))
            }
        };
        let cursor = match q.get("after") {
            None => None,
            Some(after) => match self.admin_keys.get(after) {
                Some(k) => Some(k.seq),
                None => return Err(bad_cursor(after)),
            },
        };
        let render =
            |(_, id): (&u64, &String)| self.admin_keys.get(id).map(|k| self.admin_key_json(k));
        Ok(match (desc, cursor) {
            (false, c) => page(
                self.admin_order
                    .range(c.map_or(0, |s| s + 1)..)
                    .filter_map(render),
                limit,
            ),
            (true, None) => page(self.admin_order.iter().rev().filter_map(render), limit),
            (true, Some(s)) => page(self.admin_order.range(..s).rev().filter_map(render), limit),
        })
    }

    /// `GET /organization/audit_logs`: newest first (by `effective_at`, then by when
    /// recorded), filtered by `event_types[]`, `effective_at[gt|gte|lt|lte]`,
    /// `project_ids[]`, `resource_ids[]`, `actor_ids[]` (a user, or an admin key's id)
    /// and `actor_emails[]`; `limit` 1..=100 (default 20). `after=X`: the entries after
    /// X; `before=X`: the `limit` entries just before X, `has_more` when there are
    /// earlier ones still; both: the entries between them, from `after` on. An unknown
    /// cursor is a 400.
    fn list_audit_logs(&self, q: &Query) -> SimResult<Value> {
        use std::ops::Bound::{Excluded, Unbounded};
        let limit = limit(q)?;
        let bound = |name: &'static str| -> SimResult<Option<i64>> {
            q.get(name)
                .map(|raw| {
                    raw.parse::<i64>().map_err(|_| {
                        SimError::invalid(
                            name,
                            "invalid_type",
                            format!(
                                "Invalid '{name}': expected an integer, but got '{raw}' instead."
                            ),
                        )
                    })
                })
                .transpose()
        };
        let (gt, gte) = (bound("effective_at[gt]")?, bound("effective_at[gte]")?);
        let (lt, lte) = (bound("effective_at[lt]")?, bound("effective_at[lte]")?);
        if let Some(raw) = q.get("tenant_only") {
            if raw != "true" && raw != "false" {
                return Err(SimError::invalid(
                    "tenant_only",
                    "invalid_type",
                    format!("Invalid 'tenant_only': expected a boolean, got '{raw}'."),
                ));
            }
        }
        let types = q.all("event_types");
        let projects = q.all("project_ids");
        let resources = q.all("resource_ids");
        let actors = q.all("actor_ids");
        let emails = q.all("actor_emails");
        let cursor = |name: &'static str| -> SimResult<Option<(i64, u64)>> {
            q.get(name)
                .map(|id| {
                    self.audit_idx.get(id).copied().ok_or_else(|| {
                        SimError::invalid(
                            name,
                            "invalid_value",
                            format!("Invalid '{name}': no such object '{id}'."),
                        )
                    })
                })
                .transpose()
        };
        let (after, before) = (cursor("after")?, cursor("before")?);
        let keep = |a: &&AuditRec| {
            let t = a.effective_at;
            let (actor_id, email) = self.actor_user(&a.actor);
            (types.is_empty() || types.contains(&a.kind))
                && gt.is_none_or(|b| t > b)
                && gte.is_none_or(|b| t >= b)
                && lt.is_none_or(|b| t < b)
                && lte.is_none_or(|b| t <= b)
                && (projects.is_empty()
                    || a.project_id
                        .as_deref()
                        .is_some_and(|p| projects.contains(&p)))
                && (resources.is_empty() || resources.contains(&a.resource_id.as_str()))
                && (actors.is_empty()
                    || actors.contains(&actor_id)
                    || matches!(&a.actor, SimActor::AdminKey(k) if actors.contains(&k.as_str())))
                && (emails.is_empty() || email.is_some_and(|e| emails.contains(&e)))
        };
        // Listing order is descending: "after X" are the smaller keys, "before X" the
        // larger ones.
        if let (Some(b), Some(a)) = (before, after) {
            if b >= a {
                return Ok(list_json(Vec::new(), false));
            }
        }
        let bounds = (
            before.map_or(Unbounded, Excluded),
            after.map_or(Unbounded, Excluded),
        );
        // With `resource_ids[]`, only those resources' entries are looked at.
        let subset: Option<BTreeMap<(i64, u64), &AuditRec>> = (!resources.is_empty()).then(|| {
            resources
                .iter()
                .filter_map(|r| self.audit_by_resource.get(*r))
                .flatten()
                .filter_map(|k| self.audit.get_key_value(k))
                .map(|(k, a)| (*k, a))
                .collect()
        });
        let range: Box<dyn DoubleEndedIterator<Item = &AuditRec>> = match &subset {
            Some(sub) => Box::new(sub.range(bounds).map(|(_, a)| *a)),
            None => Box::new(self.audit.range(bounds).map(|(_, a)| a)),
        };
        if before.is_some() && after.is_none() {
            let mut items: Vec<&AuditRec> = range.filter(keep).take(limit + 1).collect();
            let has_more = items.len() > limit;
            items.truncate(limit);
            let data = items.iter().rev().map(|a| self.audit_json(a)).collect();
            return Ok(list_json(data, has_more));
        }
        Ok(page(
            range.rev().filter(keep).map(|a| self.audit_json(a)),
            limit,
        ))
    }

    /// The user behind an actor (an admin key's owner) and that user's email.
    fn actor_user<'a>(&'a self, actor: &'a SimActor) -> (&'a str, Option<&'a str>) {
        let uid = match actor {
            SimActor::AdminKey(_) => self.org_owner.as_str(),
            SimActor::Session(uid) => uid.as_str(),
        };
        (uid, self.users.get(uid).map(|u| u.email.as_str()))
    }

    // ----- JSON shapes (as in the spec's schemas) -----

    /// `AuditLog`: the event's details under its type name.
    fn audit_json(&self, a: &AuditRec) -> Value {
        let (uid, email) = self.actor_user(&a.actor);
        let user = json!({"id": uid, "email": email.unwrap_or_default()});
        let actor = match &a.actor {
            SimActor::AdminKey(key_id) => json!({"type": "api_key", "api_key": {
                "id": key_id, "type": "user", "user": user,
            }}),
            SimActor::Session(_) => json!({"type": "session", "session": {
                "user": user, "ip_address": SESSION_IP,
            }}),
        };
        let mut v = json!({
            "id": a.id,
            "type": a.kind,
            "effective_at": a.effective_at,
            "actor": actor,
        });
        if let Some(p) = &a.project_id {
            let name = self.project(p).map(|p| p.name.as_str()).unwrap_or_default();
            v["project"] = json!({"id": p, "name": name});
        }
        v[a.kind] = a.details.clone();
        v
    }

    pub fn project_json(&self, p: &ProjectRec) -> Value {
        json!({
            "id": p.id,
            "object": "organization.project",
            "name": p.name,
            "created_at": p.created_at,
            "archived_at": p.archived_at,
            "status": if p.archived_at.is_some() { "archived" } else { "active" },
            "external_key_id": null,
        })
    }

    pub fn key_json(&self, k: &KeyRec) -> Value {
        let owner = match &k.owner {
            OwnerRef::User(uid) => match self.users.get(uid) {
                Some(u) => json!({"type": "user", "user": {
                    "id": u.id, "email": u.email, "name": u.name,
                    "created_at": u.created_at, "role": u.role,
                }}),
                None => json!({"type": "user"}),
            },
            OwnerRef::ServiceAccount(sid) => match self.sas.get(sid) {
                Some(s) => json!({"type": "service_account", "service_account": {
                    "id": s.id, "name": s.name, "created_at": s.created_at, "role": s.role,
                }}),
                None => json!({"type": "service_account"}),
            },
        };
        let owner = if self.faults.bare_owners.contains(&k.id) {
            json!({})
        } else if self.faults.omit_owner_type {
            let mut owner = owner;
            if let Some(o) = owner.as_object_mut() {
                o.remove("type");
            }
            owner
        } else {
            owner
        };
        let mut v = json!({
            "object": "organization.project.api_key",
            "redacted_value": redact(&k.value),
            "name": k.name,
            "created_at": k.created_at,
            "last_used_at": k.last_used_at,
            "id": k.id,
            "owner_project_access": if self.owner_active(k) { "active" } else { "inactive" },
            "owner": owner,
        });
        if let Some(e) = k.expires_at {
            v["expires_at"] = json!(e);
        }
        v
    }

    fn admin_key_json(&self, k: &AdminKeyRec) -> Value {
        let owner = self.users.get(&self.org_owner);
        json!({
            "object": "organization.admin_api_key",
            "id": k.id,
            "name": k.name,
            "redacted_value": format!("sk-admin...{}", tail(&k.value)),
            "created_at": k.created_at,
            "expires_at": k.expires_at,
            "last_used_at": k.last_used_at,
            "owner": {
                "type": "user",
                "object": "organization.user",
                "id": self.org_owner,
                "name": owner.map(|u| u.name.as_str()).unwrap_or("Org Owner"),
                "created_at": owner.map(|u| u.created_at).unwrap_or(k.created_at),
                "role": "owner",
            },
        })
    }

    /// Appends to the request log, dropping the oldest entries beyond capacity.
    pub fn record(&mut self, mut rec: RequestRecord) {
        self.log_seq += 1;
        rec.seq = self.log_seq;
        if self.log.len() >= LOG_CAPACITY {
            self.log.pop_front();
        }
        self.log.push_back(rec);
    }

    /// Moves the clock.
    pub fn advance(&mut self, by: Duration) {
        self.clock_offset += by.as_secs() as i64;
    }
}

impl OwnerRef {
    pub(crate) fn id(&self) -> &str {
        match self {
            OwnerRef::User(id) | OwnerRef::ServiceAccount(id) => id,
        }
    }
}

fn sa_json(s: &SaRec) -> Value {
    json!({
        "object": "organization.project.service_account",
        "id": s.id,
        "name": s.name,
        "role": s.role,
        "created_at": s.created_at,
    })
}

fn created_key_json(k: &KeyRec) -> Value {
    let mut v = json!({
        "object": "organization.project.service_account.api_key",
        "value": k.value,
        "name": k.name,
        "created_at": k.created_at,
        "id": k.id,
    });
    if let Some(e) = k.expires_at {
        v["expires_at"] = json!(e);
    }
    v
}

fn models_json() -> Value {
    json!({"object": "list", "data": [
        {"id": "gpt-4o", "object": "model", "created": 1_715_367_049, "owned_by": "system", "shutdown_date": null},
        {"id": "gpt-4o-mini", "object": "model", "created": 1_721_172_741, "owned_by": "system", "shutdown_date": null},
        {"id": "text-embedding-3-small", "object": "model", "created": 1_705_948_997, "owned_by": "system", "shutdown_date": null},
    ]})
}

/// The last four characters of a value (all of it if shorter).
fn tail(value: &str) -> &str {
    let start = value.char_indices().rev().nth(3).map_or(0, |(i, _)| i);
    &value[start..]
}

/// `sk-...abcd`.
pub(crate) fn redact(value: &str) -> String {
    format!("sk-...{}", tail(value))
}

fn unauthorized(token: &str) -> SimError {
    let shown = if token.is_empty() {
        "(empty)".to_owned()
    } else {
        redact(token)
    };
    SimError::new(
        401,
        format!(
            "Incorrect API key provided: {shown}. You can find your API key at \
             https://platform.openai.com/account/api-keys."
        ),
    )
    .with_code("invalid_request_error", Some("invalid_api_key"))
}

fn bad_cursor(after: &str) -> SimError {
    SimError::invalid(
        "after",
        "invalid_value",
        format!("Invalid 'after': no such object '{after}'."),
    )
}

/// `limit`: default 20, 1..=100.
fn limit(q: &Query) -> SimResult<usize> {
    let Some(raw) = q.get("limit") else {
        return Ok(20);
    };
    let n: i64 = raw.parse().map_err(|_| {
        SimError::invalid(
            "limit",
            "invalid_type",
            format!("Invalid 'limit': expected an integer, but got '{raw}' instead."),
        )
    })?;
    if n < 1 {
        return Err(SimError::invalid(
            "limit",
            "integer_below_min_value",
            format!("Invalid 'limit': integer below minimum value. Expected a value >= 1, but got {n} instead."),
        ));
    }
    if n > 100 {
        return Err(SimError::invalid(
            "limit",
            "integer_above_max_value",
            format!("Invalid 'limit': integer above maximum value. Expected a value <= 100, but got {n} instead."),
        ));
    }
    Ok(n as usize)
}

/// A list page: up to `limit` items, `has_more` when one more exists.
fn page(items: impl Iterator<Item = Value>, limit: usize) -> Value {
    let mut data: Vec<Value> = Vec::with_capacity(limit.min(100));
    let mut has_more = false;
    for item in items {
        if data.len() == limit {
            has_more = true;
            break;
        }
        data.push(item);
    }
    list_json(data, has_more)
}

/// `{"object": "list", data, first_id, last_id, has_more}`.
fn list_json(data: Vec<Value>, has_more: bool) -> Value {
    let first_id = data.first().map(|v| v["id"].clone()).unwrap_or(Value::Null);
    let last_id = data.last().map(|v| v["id"].clone()).unwrap_or(Value::Null);
    json!({"object": "list", "data": data, "first_id": first_id, "last_id": last_id, "has_more": has_more})
}

/// A JSON object body; an absent body is `{}` unless `required`.
fn parse_body(body: &[u8], required: bool) -> SimResult<Map<String, Value>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        if required {
            return Err(SimError::new(
                400,
                "We could not parse the JSON body of your request. (HINT: This likely means you \
                 aren't using your HTTP library correctly.)",
            ));
        }
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(SimError::new(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you \
             aren't using your HTTP library correctly.)",
        )),
    }
}

fn optional_str(b: &Map<String, Value>, field: &'static str) -> SimResult<Option<String>> {
    match b.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(SimError::invalid(
            field,
            "invalid_type",
            format!("Invalid '{field}': expected a string."),
        )),
    }
}

fn required_str(b: &Map<String, Value>, field: &'static str) -> SimResult<String> {
    match optional_str(b, field)? {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(SimError::invalid(
            field,
            "missing_required_parameter",
            format!("Missing required parameter: '{field}'."),
        )),
    }
}

/// `scopes`: absent (or null), or an array of strings.
fn scopes(b: &Map<String, Value>) -> SimResult<Option<Vec<String>>> {
    let invalid = || {
        SimError::invalid(
            "scopes",
            "invalid_type",
            "Invalid 'scopes': expected an array of strings.",
        )
    };
    match b.get("scopes") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| s.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .map(Some)
            .ok_or_else(invalid),
        Some(_) => Err(invalid()),
    }
}

/// `expires_in_seconds`: absent, or an integer in 1..=31536000.
fn expires_in(b: &Map<String, Value>) -> SimResult<Option<i64>> {
    match b.get("expires_in_seconds") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_i64() {
            Some(n) if (1..=MAX_EXPIRES_IN).contains(&n) => Ok(Some(n)),
            _ => Err(SimError::invalid(
                "expires_in_seconds",
                "invalid_value",
                format!("Invalid 'expires_in_seconds': expected an integer between 1 and {MAX_EXPIRES_IN}."),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_keeps_only_the_tail() {
        assert_eq!(redact("sk-svcacct-abcdefgh1234"), "sk-...1234");
        assert_eq!(redact("ab"), "sk-...ab");
    }

    #[test]
    fn limit_bounds() {
        let q = |v: &str| Query(vec![("limit".into(), v.into())]);
        assert_eq!(limit(&Query::default()), Ok(20));
        assert_eq!(limit(&q("1")), Ok(1));
        assert_eq!(limit(&q("100")), Ok(100));
        for bad in ["0", "101", "-1", "ten", ""] {
            let e = limit(&q(bad)).unwrap_err();
            assert_eq!((e.status, e.param), (400, Some("limit")), "{bad}");
        }
    }
}
