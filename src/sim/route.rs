//! The simulator's endpoints: matching a method and path to a [`Route`] and its ids.

use std::fmt;

use crate::openai::Endpoint;

/// One operation of the simulated API, named after the spec's operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Route {
    /// `GET /v1/models` (Bearer = a project key).
    ListModels,
    ListAdminKeys,
    CreateAdminKey,
    GetAdminKey,
    DeleteAdminKey,
    ListProjects,
    CreateProject,
    GetProject,
    ModifyProject,
    /// `POST /v1/organization/projects/{project_id}/archive`: in the real API, not in
    /// the spec excerpt.
    ArchiveProject,
    ListApiKeys,
    GetApiKey,
    DeleteApiKey,
    /// `POST /v1/organization/projects/{project_id}/api_keys/{api_key_id}`: in the SDK
    /// 3.57, not in the GitHub spec.
    UpdateApiKey,
    ListServiceAccounts,
    CreateServiceAccount,
    GetServiceAccount,
    UpdateServiceAccount,
    DeleteServiceAccount,
    CreateServiceAccountKey,
    /// `GET /v1/organization/usage/completions` (from the usage recorded with
    /// [`Sim::record_usage`](super::Sim::record_usage) and the calls project keys made).
    UsageCompletions,
    /// `GET /v1/organization/costs` (the same usage, priced by `sim::PRICES`).
    Costs,
    /// `GET /v1/organization/audit_logs` (the key and service-account events the
    /// simulator recorded, newest first).
    ListAuditLogs,
}

impl Route {
    /// Every route, for iteration in tests and docs.
    pub const ALL: [Route; 23] = [
        Route::ListModels,
        Route::ListAdminKeys,
        Route::CreateAdminKey,
        Route::GetAdminKey,
        Route::DeleteAdminKey,
        Route::ListProjects,
        Route::CreateProject,
        Route::GetProject,
        Route::ModifyProject,
        Route::ArchiveProject,
        Route::ListApiKeys,
        Route::GetApiKey,
        Route::DeleteApiKey,
        Route::UpdateApiKey,
        Route::ListServiceAccounts,
        Route::CreateServiceAccount,
        Route::GetServiceAccount,
        Route::UpdateServiceAccount,
        Route::DeleteServiceAccount,
        Route::CreateServiceAccountKey,
        Route::UsageCompletions,
        Route::Costs,
        Route::ListAuditLogs,
    ];

    /// The HTTP method.
    pub fn method(self) -> &'static str {
        use Route::*;
        match self {
            ListModels | ListAdminKeys | GetAdminKey | ListProjects | GetProject | ListApiKeys
            | GetApiKey | ListServiceAccounts | GetServiceAccount | UsageCompletions | Costs
            | ListAuditLogs => "GET",
            CreateAdminKey
            | CreateProject
            | ModifyProject
            | ArchiveProject
            | UpdateApiKey
            | CreateServiceAccount
            | UpdateServiceAccount
            | CreateServiceAccountKey => "POST",
            DeleteAdminKey | DeleteApiKey | DeleteServiceAccount => "DELETE",
        }
    }

    /// The path template, as in the spec (with the `/v1` prefix).
    pub fn template(self) -> &'static str {
        use Route::*;
        match self {
            ListModels => "/v1/models",
            ListAdminKeys | CreateAdminKey => "/v1/organization/admin_api_keys",
            GetAdminKey | DeleteAdminKey => "/v1/organization/admin_api_keys/{key_id}",
            ListProjects | CreateProject => "/v1/organization/projects",
            GetProject | ModifyProject => "/v1/organization/projects/{project_id}",
            ArchiveProject => "/v1/organization/projects/{project_id}/archive",
            ListApiKeys => "/v1/organization/projects/{project_id}/api_keys",
            GetApiKey | DeleteApiKey | UpdateApiKey => {
                "/v1/organization/projects/{project_id}/api_keys/{api_key_id}"
            }
            ListServiceAccounts | CreateServiceAccount => {
                "/v1/organization/projects/{project_id}/service_accounts"
            }
            GetServiceAccount | UpdateServiceAccount | DeleteServiceAccount => {
                "/v1/organization/projects/{project_id}/service_accounts/{service_account_id}"
            }
            CreateServiceAccountKey => {
                "/v1/organization/projects/{project_id}/service_accounts/{service_account_id}/api_keys"
            }
            UsageCompletions => "/v1/organization/usage/completions",
            Costs => "/v1/organization/costs",
            ListAuditLogs => "/v1/organization/audit_logs",
        }
    }

    /// Whether a success creates a project API key.
    pub fn creates_project_key(self) -> bool {
        matches!(
            self,
            Route::CreateServiceAccount | Route::CreateServiceAccountKey
        )
    }

    /// Whether a success creates a key, project or admin (the responses that
    /// [`Faults::lose_create_responses`](super::Faults::lose_create_responses) loses).
    pub fn creates_key(self) -> bool {
        self.creates_project_key() || self == Route::CreateAdminKey
    }

    /// Whether the route is a paginated listing (`limit` / `after` / `has_more`).
    pub fn is_listing(self) -> bool {
        matches!(
            self,
            Route::ListAdminKeys
                | Route::ListAuditLogs
                | Route::ListProjects
                | Route::ListApiKeys
                | Route::ListServiceAccounts
        )
    }

    /// Whether the route is authenticated with an admin key (all but `/models`).
    pub fn is_admin(self) -> bool {
        self != Route::ListModels
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method(), self.template())
    }
}

impl From<Endpoint> for Route {
    fn from(e: Endpoint) -> Route {
        match e {
            Endpoint::ListProjects => Route::ListProjects,
            Endpoint::GetProject => Route::GetProject,
            Endpoint::ListApiKeys => Route::ListApiKeys,
            Endpoint::GetApiKey => Route::GetApiKey,
            Endpoint::DeleteApiKey => Route::DeleteApiKey,
            Endpoint::UpdateApiKey => Route::UpdateApiKey,
            Endpoint::ListServiceAccounts => Route::ListServiceAccounts,
            Endpoint::CreateServiceAccount => Route::CreateServiceAccount,
            Endpoint::DeleteServiceAccount => Route::DeleteServiceAccount,
            Endpoint::CreateServiceAccountKey => Route::CreateServiceAccountKey,
            Endpoint::ListModels => Route::ListModels,
            Endpoint::UsageCompletions => Route::UsageCompletions,
            Endpoint::Costs => Route::Costs,
            Endpoint::ListAuditLogs => Route::ListAuditLogs,
            Endpoint::ListAdminApiKeys => Route::ListAdminKeys,
            Endpoint::GetAdminApiKey => Route::GetAdminKey,
            Endpoint::CreateAdminApiKey => Route::CreateAdminKey,
            Endpoint::DeleteAdminApiKey => Route::DeleteAdminKey,
        }
    }
}

/// The ids captured from a path, in template order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Ids(pub Vec<String>);

impl Ids {
    pub fn get(&self, i: usize) -> &str {
        self.0.get(i).map(String::as_str).unwrap_or("")
    }
}

/// Why a request matched no route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Miss {
    NotFound,
    MethodNotAllowed,
}

/// Matches `method path` against the spec's routes.
pub(crate) fn match_route(method: &str, path: &str) -> Result<(Route, Ids), Miss> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let Some((&"v1", segs)) = segs.split_first() else {
        return Err(Miss::NotFound);
    };
    let ids = |idx: &[usize]| Ids(idx.iter().map(|&i| segs[i].to_owned()).collect());
    use Route::*;
    let candidates: &[Route] = match segs {
        ["models"] => &[ListModels],
        ["organization", "admin_api_keys"] => &[ListAdminKeys, CreateAdminKey],
        ["organization", "admin_api_keys", _] => &[GetAdminKey, DeleteAdminKey],
        ["organization", "projects"] => &[ListProjects, CreateProject],
        ["organization", "usage", "completions"] => &[UsageCompletions],
        ["organization", "costs"] => &[Costs],
        ["organization", "audit_logs"] => &[ListAuditLogs],
        ["organization", "projects", _] => &[GetProject, ModifyProject],
        ["organization", "projects", _, "archive"] => &[ArchiveProject],
        ["organization", "projects", _, "api_keys"] => &[ListApiKeys],
        ["organization", "projects", _, "api_keys", _] => &[GetApiKey, DeleteApiKey, UpdateApiKey],
        ["organization", "projects", _, "service_accounts"] => {
            &[ListServiceAccounts, CreateServiceAccount]
        }
        ["organization", "projects", _, "service_accounts", _] => &[
            GetServiceAccount,
            UpdateServiceAccount,
            DeleteServiceAccount,
        ],
        ["organization", "projects", _, "service_accounts", _, "api_keys"] => {
            &[CreateServiceAccountKey]
        }
        _ => return Err(Miss::NotFound),
    };
    let route = candidates
        .iter()
        .copied()
        .find(|r| r.method() == method)
        .ok_or(Miss::MethodNotAllowed)?;
    let captured = match segs.len() {
        1 | 2 => ids(&[]),
        3 | 4 => ids(&[2]),
        _ => ids(&[2, 4]),
    };
    Ok((route, captured))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_every_template() {
        for route in Route::ALL {
            let path = route
                .template()
                .replace("{project_id}", "proj_1")
                .replace("{api_key_id}", "key_2")
                .replace("{service_account_id}", "svc_acct_2")
                .replace("{key_id}", "key_3");
            let (got, ids) = match_route(route.method(), &path).unwrap();
            assert_eq!(got, route, "{path}");
            if path.contains("proj_1") {
                assert_eq!(ids.get(0), "proj_1");
            }
        }
        assert_eq!(
            match_route("PUT", "/v1/models"),
            Err(Miss::MethodNotAllowed)
        );
        assert_eq!(match_route("GET", "/v2/models"), Err(Miss::NotFound));
        assert_eq!(
            match_route("GET", "/v1/organization/users"),
            Err(Miss::NotFound)
        );
    }
}
