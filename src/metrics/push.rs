//! `keyrotd once --metrics-push URL`: the run's metrics, PUT to a Prometheus
//! Pushgateway (the CronJob variant, which nobody can scrape). PUT replaces every
//! metric of the URL's grouping key, so the group holds the last run alone, as the
//! textfile does for the systemd timer.

use std::time::Duration;

use reqwest::Url;

/// How long a push may take, connection included.
pub const PUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// A Pushgateway URL as `--metrics-push` takes it: `http(s)://host[:port]/…/metrics/job/<job>`
/// with optional further `/<label>/<value>` pairs of the grouping key, no query or
/// fragment. Credentials in it (`https://user:password@…`) are sent as basic auth and
/// never printed.
pub fn parse_push_url(s: &str) -> Result<Url, String> {
    // url's errors never repeat the input.
    let url = Url::parse(s).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("scheme {:?}: use http or https", url.scheme()));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("a Pushgateway URL takes no query or fragment".into());
    }
    let segments: Vec<&str> = url.path_segments().map_or(Vec::new(), |s| s.collect());
    let job = segments
        .windows(2)
        .position(|w| w == ["metrics", "job"])
        .map(|i| &segments[i + 2..]);
    match job {
        Some([job, pairs @ ..]) if !job.is_empty() && pairs.len() % 2 == 0 => Ok(url),
        _ => Err(format!(
            "{}: the path must end in /metrics/job/<job> (then /<label>/<value> pairs), \
             the Pushgateway's grouping key",
            shown(&url)
        )),
    }
}

/// `url` without its credentials, for logs and errors.
pub fn shown(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.to_string()
}

/// PUTs `text` (a [`super::Metrics::render`]) to `url`. The error names the URL
/// without its credentials and the HTTP status, or why no answer came.
pub async fn push(url: &Url, text: String) -> Result<(), String> {
    let target = shown(url);
    let http = reqwest::Client::builder()
        .user_agent(concat!("keyrotd/", env!("CARGO_PKG_VERSION")))
        .timeout(PUSH_TIMEOUT)
        .connect_timeout(PUSH_TIMEOUT)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {}", e.without_url()))?;
    // reqwest moves credentials in the URL into an Authorization: Basic header.
    let req = http
        .put(url.clone())
        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
        .body(text);
    let resp = req
        .send()
        .await
        .map_err(|e| format!("PUT {target}: {:#}", e.without_url()))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    // The Pushgateway says why in a short plain-text body (an inconsistent metric, a
    // bad grouping key); it holds nothing of ours beyond metric names.
    let why: String = resp
        .text()
        .await
        .unwrap_or_default()
        .chars()
        .take(300)
        .collect();
    let why = why.trim();
    Err(format!(
        "PUT {target}: HTTP {}{}{why}",
        status.as_u16(),
        if why.is_empty() { "" } else { ": " }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_url_names_a_grouping_key() {
        for ok in [
            "http://pushgateway:9091/metrics/job/keyrotd",
            "https://u:p@pg.example/prefix/metrics/job/keyrotd/org/acme",
        ] {
            assert!(parse_push_url(ok).is_ok(), "{ok}");
        }
        for (bad, says) in [
            ("pushgateway:9091", "scheme"),
            ("ftp://pg/metrics/job/k", "scheme"),
            ("http://pg:9091/", "/metrics/job/<job>"),
            ("http://pg:9091/metrics/job/", "/metrics/job/<job>"),
            ("http://pg:9091/metrics/job/k/org", "/metrics/job/<job>"),
            ("http://pg:9091/metrics/job/k?x=1", "no query"),
        ] {
            let e = parse_push_url(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let e = parse_push_url("http://user:hunter2@pg:9091/nope").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
