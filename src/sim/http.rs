//! The HTTP face of the simulator: one axum fallback handler that matches the route,
//! applies faults and authentication, runs the operation and logs the request.

use std::io;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Query as AxumQuery, Request, State as AxumState};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use rand::Rng;

use super::faults::{LostResponse, Malformation, RetryAfter};
use super::route::{self, Ids, Miss, Route};
use super::state::{Query, SimError, State};
use super::{RequestRecord, Sim, SimActor};

/// Largest request body read.
const MAX_BODY: usize = 1 << 20;

/// What the handler sends back.
struct Outcome {
    status: u16,
    body: Vec<u8>,
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
    /// Break the connection instead of completing the response.
    drop: bool,
    /// Bytes of whitespace streamed before `body` (`Faults::padding`).
    padding: usize,
}

impl Outcome {
    fn json(status: u16, body: Vec<u8>) -> Outcome {
        Outcome {
            status,
            body,
            content_type: "application/json",
            headers: Vec::new(),
            drop: false,
            padding: 0,
        }
    }
    fn error(e: &SimError) -> Outcome {
        Outcome::json(e.status, e.body().to_string().into_bytes())
    }
}

/// The axum handler for every path.
///
/// The work runs in its own task: a client that gives up (timeout, reset) does not
/// cancel it, so a create whose caller timed out still happens, as on a real server.
pub(crate) async fn handle(AxumState(sim): AxumState<Sim>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let started = Instant::now();
    let body = axum::body::to_bytes(body, MAX_BODY).await;
    let work = tokio::spawn(async move {
        let latency = sim.lock().faults.latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        process(&sim, &parts, body, started)
    });
    match work.await {
        Ok(out) => respond(out),
        Err(_) => respond(Outcome::error(&SimError::new(
            500,
            "Simulator task failed.",
        ))),
    }
}

/// Matches, runs and logs one request.
fn process(
    sim: &Sim,
    parts: &axum::http::request::Parts,
    body: Result<Bytes, axum::Error>,
    started: Instant,
) -> Outcome {
    let query = AxumQuery::<Vec<(String, String)>>::try_from_uri(&parts.uri)
        .map(|AxumQuery(pairs)| Query(pairs))
        .map_err(|e| SimError::new(400, format!("Invalid query string: {e}")));
    let bearer = parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let method = parts.method.as_str();
    let path = parts.uri.path();
    let logged_body = body
        .as_ref()
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
        .filter(serde_json::Value::is_object);
    let mut st = sim.lock();
    let matched = match route::match_route(method, path) {
        Ok((Route::UpdateApiKey, _)) if st.faults.no_key_update => Err(Miss::NotFound),
        other => other,
    };
    let route = matched.as_ref().ok().map(|(r, _)| *r);
    let out = match (matched, body) {
        (Err(Miss::NotFound), _) => Outcome::error(&SimError::new(
            404,
            format!("Invalid URL ({method} {path})"),
        )),
        (Err(Miss::MethodNotAllowed), _) => Outcome::error(&SimError::new(
            405,
            format!("Invalid method for URL ({method} {path})"),
        )),
        (Ok(_), Err(_)) => {
            Outcome::error(&SimError::new(400, "Request body too large or unreadable."))
        }
        (Ok((route, ids)), Ok(body)) => run(&mut st, route, &ids, query, &body, bearer),
    };
    st.record(RequestRecord {
        seq: 0,
        at: started,
        method: method.to_owned(),
        route,
        path: path.to_owned(),
        query: parts.uri.query().unwrap_or("").to_owned(),
        status: if out.drop { 0 } else { out.status },
        body: logged_body,
    });
    out
}

/// Faults, authentication and the operation, under the state lock.
fn run(
    st: &mut State,
    route: Route,
    ids: &Ids,
    query: Result<Query, SimError>,
    body: &Bytes,
    bearer: Option<&str>,
) -> Outcome {
    if let Some(status) = st.faults.take_fail_next(route) {
        return injected(st, status);
    }
    let rate = st.faults.rate_limit_rate.clamp(0.0, 1.0);
    if rate > 0.0 && st.rng.gen_bool(rate) {
        return injected(st, 429);
    }
    let rate = st.faults.server_error_rate.clamp(0.0, 1.0);
    if rate > 0.0 && st.rng.gen_bool(rate) {
        let status = st.faults.server_error_status;
        return injected(st, status);
    }
    let mut query = match query {
        Ok(q) => q,
        Err(e) => return Outcome::error(&e),
    };
    let actor = if route.is_admin() {
        match st.authenticate_admin(bearer) {
            Ok(key_id) => Some(SimActor::AdminKey(key_id)),
            Err(e) => return Outcome::error(&e),
        }
    } else {
        None
    };
    // A never-ending listing serves its first page under whatever cursor it is given.
    let bad_cursor = st
        .faults
        .bad_cursor
        .filter(|b| b.route == route && route.is_listing());
    let after = bad_cursor.and_then(|_| {
        let after = query.get("after").map(str::to_owned);
        query.0.retain(|(k, _)| k != "after");
        after
    });
    let mut value = match st.execute(route, ids, &query, body, bearer, actor.as_ref()) {
        Ok(v) => v,
        Err(e) => return Outcome::error(&e),
    };
    if let (Some(b), Some(page)) = (bad_cursor, value.as_object_mut()) {
        page.insert("has_more".into(), true.into());
        page.insert("last_id".into(), b.kind.next(after.as_deref()).into());
    }
    if route.creates_key() && st.faults.lose_create_responses > 0 {
        st.faults.lose_create_responses -= 1;
        return match st.faults.lost_response {
            LostResponse::ServerError => injected(st, 500),
            LostResponse::Dropped => Outcome {
                drop: true,
                ..Outcome::json(200, Vec::new())
            },
        };
    }
    let body = value.to_string().into_bytes();
    let padding = st
        .faults
        .padding
        .filter(|p| p.route.is_none_or(|r| r == route))
        .map_or(0, |p| p.bytes);
    match st.faults.take_malformed(route) {
        None => Outcome {
            padding,
            ..Outcome::json(200, body)
        },
        Some(Malformation::Truncated) => Outcome::json(200, body[..body.len() / 2].to_vec()),
        Some(Malformation::WrongShape) => {
            Outcome::json(200, br#"{"object":"unexpected"}"#.to_vec())
        }
        Some(Malformation::NotJson) => Outcome {
            content_type: "text/html",
            ..Outcome::json(
                200,
                b"<html><body><h1>502 Bad Gateway</h1></body></html>".to_vec(),
            )
        },
    }
}

/// An injected failure with the body (and, for 429, the headers) the API would send.
fn injected(st: &State, status: u16) -> Outcome {
    let e = match status {
        429 => SimError::new(
            429,
            "Rate limit reached for requests per min (RPM). Please try again later.",
        )
        .with_code("requests", Some("rate_limit_exceeded")),
        s if s >= 500 => SimError::new(
            s,
            "The server had an error while processing your request. Sorry about that!",
        ),
        s => SimError::new(s, format!("Simulated failure (HTTP {s}).")),
    };
    let mut out = Outcome::error(&e);
    if status == 429 {
        match st.faults.retry_after {
            RetryAfter::None => {}
            RetryAfter::Seconds(s) => out.headers.push(("retry-after", s.to_string())),
            RetryAfter::Millis(ms) => {
                out.headers.push(("retry-after-ms", ms.to_string()));
                out.headers
                    .push(("retry-after", ms.div_ceil(1000).to_string()));
            }
            RetryAfter::HttpDate(s) => {
                let at = chrono::Utc::now() + chrono::Duration::seconds(s as i64);
                out.headers.push((
                    "retry-after",
                    at.format("%a, %d %b %Y %H:%M:%S GMT").to_string(),
                ));
            }
        }
    }
    out
}

/// Whitespace the padding is streamed from, a chunk at a time.
static SPACES: [u8; 64 * 1024] = [b' '; 64 * 1024];

/// `padding` spaces, then `body`, as a chunked stream (no `content-length`).
fn padded(padding: usize, body: Vec<u8>) -> Body {
    let chunks = std::iter::repeat_n(Bytes::from_static(&SPACES), padding / SPACES.len())
        .chain(std::iter::once(Bytes::from_static(
            &SPACES[..padding % SPACES.len()],
        )))
        .chain(std::iter::once(Bytes::from(body)))
        .map(Ok::<_, io::Error>);
    Body::from_stream(futures::stream::iter(chunks))
}

fn respond(out: Outcome) -> Response {
    let status = StatusCode::from_u16(out.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = if out.drop {
        // Headers may or may not leave before the body fails; either way the client
        // never gets a complete response.
        Body::from_stream(futures::stream::once(async {
            Err::<Bytes, io::Error>(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "simulated lost response",
            ))
        }))
    } else if out.padding > 0 {
        padded(out.padding, out.body)
    } else {
        Body::from(out.body)
    };
    let mut resp = (status, body).into_response();
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(out.content_type));
    for (name, value) in out.headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
    resp
}
