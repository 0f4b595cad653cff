//! Fault injection: what the simulator does wrong, on purpose, and when.
//!
//! Faults are plain data, changed at runtime with [`Sim::set_faults`] or
//! [`Sim::update_faults`](super::Sim::update_faults). One-shot faults (`fail_next`,
//! `malformed_next`, `lose_create_responses`) count down as requests consume them.
//!
//! Order of evaluation for each request: latency; `fail_next`; the random 429 and 5xx
//! rates; authentication; the operation itself (a listing under `bad_cursor` is read
//! from its first page and given a never-ending cursor); then, on a success,
//! `lose_create_responses`, `malformed_next` and `padding`.
//!
//! [`Sim::set_faults`]: super::Sim::set_faults

use std::collections::BTreeSet;
use std::time::Duration;

use super::Route;

/// The simulator's current misbehaviour. `Faults::default()` is a well-behaved API.
#[derive(Clone, Debug, PartialEq)]
pub struct Faults {
    /// Added to every request before it is handled.
    pub latency: Duration,
    /// Probability (0..=1) that a request is refused with 429.
    pub rate_limit_rate: f64,
    /// The headers a 429 (random or from `fail_next`) carries.
    pub retry_after: RetryAfter,
    /// Probability (0..=1) that a request fails with `server_error_status`.
    pub server_error_rate: f64,
    /// Status of the random server errors (default 500).
    pub server_error_status: u16,
    /// Deterministic failures, consumed in order of the list by matching requests.
    pub fail_next: Vec<FailNext>,
    /// The next N successful key creations (`POST .../service_accounts`,
    /// `POST .../service_accounts/{id}/api_keys` and `POST /organization/admin_api_keys`)
    /// create the key but lose the response.
    pub lose_create_responses: u32,
    /// How a lost response looks to the client.
    pub lost_response: LostResponse,
    /// Mangle the next successful response(s) of a route.
    pub malformed_next: Vec<MalformedNext>,
    /// `DELETE .../api_keys/{id}` of a service-account key answers 400, as the API once
    /// did ("an error if the key belonged to a service account").
    pub refuse_sa_key_delete: bool,
    /// Which keys `GET /models` rejects with 401 although they are live.
    pub reject_verification: RejectVerification,
    /// Which live admin keys the admin endpoints reject with 401 (`Minted`: the ones
    /// created through `POST /organization/admin_api_keys`; `Keys`: admin key ids).
    pub reject_admin_keys: RejectVerification,
    /// Keys created through the API answer 401 on `GET /models` for this long (real
    /// time) after creation, like a key that has not propagated yet.
    pub propagation_delay: Duration,
    /// A listing whose pagination never ends (stays until cleared).
    pub bad_cursor: Option<BadCursor>,
    /// Successful responses padded to a size (stays until cleared).
    pub padding: Option<Padding>,
    /// Key objects (listings and `GET .../api_keys/{id}`) come without `owner.type`,
    /// which the spec and the SDK make optional.
    pub omit_owner_type: bool,
    /// These key ids are shown with `"owner": {}`: neither a type nor an owner object.
    pub bare_owners: BTreeSet<String>,
    /// `POST .../api_keys/{id}` (key update) answers 404 `Invalid URL`, like an API
    /// that lacks the endpoint.
    pub no_key_update: bool,
    /// These project keys are disabled, as OpenAI disables a key found leaked in
    /// public: still listed as before, but every call made with one (`GET /models`, an
    /// admin endpoint) answers 401 `invalid_api_key`, and no usage is recorded. No
    /// audit-log entry says so (the real API has no event for it).
    pub disabled_keys: BTreeSet<String>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            latency: Duration::ZERO,
            rate_limit_rate: 0.0,
            retry_after: RetryAfter::Seconds(1),
            server_error_rate: 0.0,
            server_error_status: 500,
            fail_next: Vec::new(),
            lose_create_responses: 0,
            lost_response: LostResponse::ServerError,
            malformed_next: Vec::new(),
            refuse_sa_key_delete: false,
            reject_verification: RejectVerification::None,
            reject_admin_keys: RejectVerification::None,
            propagation_delay: Duration::ZERO,
            bad_cursor: None,
            padding: None,
            omit_owner_type: false,
            bare_owners: BTreeSet::new(),
            no_key_update: false,
            disabled_keys: BTreeSet::new(),
        }
    }
}

impl Faults {
    /// Adds "fail the next `count` requests to `route` (any route if `None`) with
    /// `status`".
    pub fn fail_next(mut self, route: impl Into<Option<Route>>, status: u16, count: u32) -> Self {
        self.fail_next.push(FailNext {
            route: route.into(),
            status,
            remaining: count,
        });
        self
    }

    /// Adds "mangle the next `count` successful responses of `route`".
    pub fn malformed_next(
        mut self,
        route: impl Into<Option<Route>>,
        kind: Malformation,
        count: u32,
    ) -> Self {
        self.malformed_next.push(MalformedNext {
            route: route.into(),
            kind,
            skip: 0,
            remaining: count,
        });
        self
    }

    /// Takes one matching `fail_next` entry, if any.
    pub(crate) fn take_fail_next(&mut self, route: Route) -> Option<u16> {
        take(
            &mut self.fail_next,
            |f| f.route.is_none_or(|r| r == route),
            |f| &mut f.remaining,
        )
        .map(|f| f.status)
    }

    /// Takes one matching `malformed_next` entry, if any (after its `skip`).
    pub(crate) fn take_malformed(&mut self, route: Route) -> Option<Malformation> {
        let matches = |m: &MalformedNext| m.route.is_none_or(|r| r == route) && m.remaining > 0;
        if let Some(m) = self.malformed_next.iter_mut().find(|m| matches(m)) {
            if m.skip > 0 {
                m.skip -= 1;
                return None;
            }
        }
        take(&mut self.malformed_next, matches, |m| &mut m.remaining).map(|m| m.kind)
    }
}

/// Decrements the first matching entry with something left, dropping spent entries.
fn take<T: Clone>(
    list: &mut Vec<T>,
    matches: impl Fn(&T) -> bool,
    remaining: impl Fn(&mut T) -> &mut u32,
) -> Option<T> {
    let i = list
        .iter_mut()
        .position(|e| matches(e) && *remaining(e) > 0)?;
    let taken = list[i].clone();
    *remaining(&mut list[i]) -= 1;
    if *remaining(&mut list[i]) == 0 {
        list.remove(i);
    }
    Some(taken)
}

/// The wait a 429 announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryAfter {
    /// No header at all.
    None,
    /// `retry-after: N` (seconds).
    Seconds(u64),
    /// `retry-after-ms: N`, plus `retry-after` rounded up to seconds, as OpenAI sends.
    Millis(u64),
    /// `retry-after: <HTTP date N seconds from now>`.
    HttpDate(u64),
}

/// "Fail the next `remaining` requests to `route` with `status`".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailNext {
    /// `None` matches every route.
    pub route: Option<Route>,
    pub status: u16,
    pub remaining: u32,
}

/// How a lost create response reaches the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LostResponse {
    /// A 500 with the usual error body.
    ServerError,
    /// The connection breaks before a complete response is sent.
    Dropped,
}

/// "Let `skip` successful responses of `route` through, then mangle the next
/// `remaining`" (`skip` reaches a later page of a listing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MalformedNext {
    /// `None` matches every route.
    pub route: Option<Route>,
    pub kind: Malformation,
    pub skip: u32,
    pub remaining: u32,
}

/// How a response body is mangled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformation {
    /// The JSON cut in half.
    Truncated,
    /// An HTML error page (a proxy in the way).
    NotJson,
    /// Valid JSON of the wrong shape (`{"object": "unexpected"}`).
    WrongShape,
}

/// "Every page of the listing `route` answers `has_more: true` with a `last_id` of
/// `kind`". The page's data is the listing's real first page whatever `after` says, so
/// a client that follows the cursors sees the same objects again and again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadCursor {
    /// A listing route (`Route::is_listing`); others are left alone.
    pub route: Route,
    pub kind: CursorFault,
}

/// The cursors of a [`BadCursor`] listing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CursorFault {
    /// A cursor never seen before on every page: `cursor_1`, `cursor_2`, ...
    Endless,
    /// `cycle_0` … `cycle_{n-1}`, then `cycle_0` again: with 2, `A, B, A, B`; with 1,
    /// the same cursor for ever.
    Cycle(u32),
}

impl CursorFault {
    /// The cursor the page requested with `after` announces.
    pub fn next(self, after: Option<&str>) -> String {
        match self {
            CursorFault::Endless => {
                let n = after
                    .and_then(|a| a.strip_prefix("cursor_"))
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
                format!("cursor_{}", n + 1)
            }
            CursorFault::Cycle(len) => {
                let next = after
                    .and_then(|a| a.strip_prefix("cycle_"))
                    .and_then(|n| n.parse::<u32>().ok())
                    .map_or(0, |i| (i + 1) % len.max(1));
                format!("cycle_{next}")
            }
        }
    }
}

/// "Put `bytes` bytes of whitespace before the body of each successful response of
/// `route` (every route if `None`)": still the same JSON, but as large as asked. The
/// body is streamed in chunks with no `content-length`, so only the bytes read tell the
/// client its size, and the simulator never holds the padding in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Padding {
    pub route: Option<Route>,
    pub bytes: usize,
}

/// Which live keys `GET /models` (or, for admin keys, the admin endpoints) rejects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum RejectVerification {
    /// None: every live key verifies.
    #[default]
    None,
    /// Keys created through the API (minted), not the ones seeded by a scenario or the
    /// simulator's initial admin key.
    Minted,
    /// Every key.
    All,
    /// These key ids.
    Keys(BTreeSet<String>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shot_faults_count_down() {
        let mut f = Faults::default()
            .fail_next(Route::ListApiKeys, 503, 2)
            .fail_next(None, 429, 1);
        assert_eq!(f.take_fail_next(Route::ListProjects), Some(429));
        assert_eq!(f.take_fail_next(Route::ListProjects), None);
        assert_eq!(f.take_fail_next(Route::ListApiKeys), Some(503));
        assert_eq!(f.take_fail_next(Route::ListApiKeys), Some(503));
        assert_eq!(f.take_fail_next(Route::ListApiKeys), None);
        assert!(f.fail_next.is_empty());
    }

    #[test]
    fn bad_cursors_never_end() {
        let endless = CursorFault::Endless;
        assert_eq!(endless.next(None), "cursor_1");
        assert_eq!(endless.next(Some("cursor_1")), "cursor_2");
        assert_eq!(endless.next(Some("cursor_41")), "cursor_42");
        let cycle = CursorFault::Cycle(2);
        let mut after = None;
        let mut seen = Vec::new();
        for _ in 0..4 {
            let next = cycle.next(after.as_deref());
            seen.push(next.clone());
            after = Some(next);
        }
        assert_eq!(seen, ["cycle_0", "cycle_1", "cycle_0", "cycle_1"]);
        assert_eq!(CursorFault::Cycle(1).next(Some("cycle_0")), "cycle_0");
        assert_eq!(CursorFault::Cycle(0).next(Some("cycle_0")), "cycle_0");
    }
}
