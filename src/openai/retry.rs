//! Pure helpers of the client's retry layer: which failures are retried, how long to
//! wait, and how error text is made safe to log.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;

use crate::backoff::Backoff;

/// How a request may be repeated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Reads and deletes: repeating them is harmless (429, 5xx, timeouts, network).
    Idempotent,
    /// Creates without an idempotency key: repeated only when the server certainly did
    /// not act (429, or a connection that failed before the request was sent).
    Unambiguous,
}

/// The longest single backoff step, whatever `backoff_base` and the attempt number.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Backoff before retry number `attempt` (0-based): doubling from `base`, at most
/// [`MAX_BACKOFF`], jittered ([`Backoff`]).
pub(crate) fn backoff(base: Duration, attempt: u32) -> Duration {
    Backoff::new(base, MAX_BACKOFF).wait(attempt)
}

/// The wait a 429 asks for: `retry-after-ms` (milliseconds), else `retry-after`
/// (delta-seconds, possibly fractional, or an HTTP date). `None` when absent or
/// unreadable; the caller then falls back to [`backoff`].
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        if ms.is_finite() && ms >= 0.0 {
            return Some(Duration::from_secs_f64(ms / 1000.0));
        }
    }
    let value = text("retry-after")?;
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let at = SystemTime::from(at);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Longest excerpt of a non-JSON error body kept in an error message.
const EXCERPT_CHARS: usize = 200;

/// A short, single-line excerpt of an unexpected body, with anything that looks like
/// an API key masked.
pub(crate) fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let collapsed: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed.is_empty() {
        return "empty response body".to_owned();
    }
    let mut out: String = collapsed.chars().take(EXCERPT_CHARS).collect();
    if collapsed.chars().count() > EXCERPT_CHARS {
        out.push('…');
    }
    crate::redact::secrets(&out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            retry_after(&headers(&[("retry-after", "2")]), now),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "0.5")]), now),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            retry_after(
                &headers(&[("retry-after-ms", "250"), ("retry-after", "9")]),
                now
            ),
            Some(Duration::from_millis(250))
        );
        // 1_700_000_000 is Tue, 14 Nov 2023 22:13:20 GMT.
        assert_eq!(
            retry_after(
                &headers(&[("retry-after", "Tue, 14 Nov 2023 22:13:27 GMT")]),
                now
            ),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_after(
                &headers(&[("retry-after", "Tue, 14 Nov 2023 22:00:00 GMT")]),
                now
            ),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")]), now), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "-3")]), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn backoff_is_capped_at_max_backoff() {
        let base = Duration::from_millis(100);
        assert!(backoff(base, 40) >= MAX_BACKOFF / 2 && backoff(base, 40) <= MAX_BACKOFF);
        assert_eq!(backoff(Duration::ZERO, 3), Duration::ZERO);
    }

    #[test]
    fn excerpt_is_short_single_line_and_masked() {
        let body = format!("<html>\n  <body>{}</body></html>", "x".repeat(1000));
        let e = excerpt(body.as_bytes());
        assert!(e.starts_with("<html> <body>xxx"), "{e}");
        assert!(e.chars().count() <= EXCERPT_CHARS + 1);
        assert_eq!(excerpt(b"  \n"), "empty response body");
        let e = excerpt(b"bad key sk-svcacct-abcdefghijklmnopqrstuvwxyz0123 here, sk-...abcd ok");
        assert_eq!(e, "bad key sk-[REDACTED] here, sk-...abcd ok");
    }
}
