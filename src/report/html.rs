//! The report as one self-contained HTML page: inline CSS and SVG, no scripts, no
//! external resources; summary cards, a verdict bar, a per-project age chart and a
//! table of every key. Every user-controlled text is escaped.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;

use crate::openai::models::OwnerType;
use crate::policy::{Reason, Verdict};

use super::{Report, ReportKey, Summary, CHART_PROJECTS};

/// Escapes text for HTML element content and quoted attribute values (and SVG).
fn esc(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

fn escaped(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    esc(&mut out, s);
    out
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

fn color(v: Verdict) -> &'static str {
    match v {
        Verdict::Ok => "#2f9e44",
        Verdict::Rotate => "#f08c00",
        Verdict::Revoke => "#e03131",
        Verdict::Report => "#7048e8",
        Verdict::Orphan => "#c2255c",
    }
}

fn verdict_label(v: Verdict) -> &'static str {
    match v {
        Verdict::Ok => "ok",
        Verdict::Rotate => "rotate",
        Verdict::Revoke => "revoke",
        Verdict::Report => "report (needs a human)",
        Verdict::Orphan => "orphan",
    }
}

/// `YYYY-MM-DD` of an RFC 3339 timestamp.
fn date(ts: &str) -> &str {
    ts.get(..10).unwrap_or(ts)
}

const CSS: &str = "\
:root{--fg:#1f2328;--muted:#656d76;--line:#d0d7de;--bg:#fff;--panel:#f6f8fa}
*{box-sizing:border-box}
body{margin:0;padding:28px 36px 48px;font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;color:var(--fg);background:var(--bg)}
h1{font-size:24px;margin:0 0 2px}
h2{font-size:17px;margin:32px 0 6px}
.meta,.note{color:var(--muted);margin:0 0 12px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:18px 0 10px}
.card{flex:1 1 150px;min-width:150px;border:1px solid var(--line);border-radius:8px;padding:10px 14px;background:var(--panel);border-top:4px solid var(--c,#8c959f)}
.card .n{font-size:26px;font-weight:650;line-height:1.2}
.card .l{color:var(--muted);font-size:12.5px}
svg{display:block;width:100%;max-width:1400px;height:auto}
svg text{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif}
.bar{display:flex;height:26px;border-radius:6px;overflow:hidden;background:#eaeef2;margin-top:6px}
.bar div{color:#fff;font-size:12.5px;font-weight:600;line-height:26px;text-align:center;overflow:hidden;white-space:nowrap}
.legend{display:flex;flex-wrap:wrap;gap:16px;margin:8px 0 4px;color:var(--muted);font-size:12.5px}
.legend span{display:inline-flex;align-items:center;gap:6px}
.sw{display:inline-block;width:11px;height:11px;border-radius:50%}
.ln{display:inline-block;width:18px;border-top:2px dashed #e03131}
.tk{display:inline-block;width:2px;height:12px;background:#e03131}
table{border-collapse:collapse;width:100%;font-size:13px}
thead th{position:sticky;top:0;background:var(--panel);text-align:left;font-weight:600;padding:7px 8px;border-bottom:2px solid var(--line);white-space:nowrap}
th.sorted{color:#0969da}
td{padding:6px 8px;border-bottom:1px solid #eaeef2;vertical-align:top}
tbody tr:nth-child(even){background:#fafbfc}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.d{white-space:nowrap;font-variant-numeric:tabular-nums}
.id{display:block;color:var(--muted);font:11.5px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;word-break:break-all}
.pill{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-size:12px;font-weight:600;white-space:nowrap}
.tag{display:inline-block;padding:0 6px;margin:1px 2px 1px 0;border:1px solid var(--line);border-radius:4px;font-size:11.5px;color:var(--muted);white-space:nowrap}
.stale{color:#e03131;font-weight:600}
.never{color:var(--muted);font-style:italic}
footer{margin-top:28px;color:var(--muted);font-size:12px}
.cost{display:grid;grid-template-columns:minmax(120px,240px) 1fr minmax(80px,auto);gap:4px 12px;align-items:center;font-size:13px}
.cost .cb{height:14px;border-radius:3px;background:#1971c2}
.cost .ck{grid-column:2 / 4;color:var(--muted);font-size:11.5px;margin:-2px 0 6px}
";

/// Per-project cost bars, most expensive first, each with the keys that drive it.
fn cost_view(out: &mut String, r: &Report, top: usize) {
    let u = &r.usage;
    out.push_str("<h2>Cost by project</h2>\n");
    if u.status != "known" {
        let _ = writeln!(
            out,
            "<p class=\"note\">Usage is {}{}.</p>",
            u.status,
            u.reason
                .as_deref()
                .map(|m| format!(": {}", escaped(m)))
                .unwrap_or_default()
        );
        return;
    }
    let currency = escaped(&u.currency.clone().unwrap_or_default().to_ascii_uppercase());
    let shown: Vec<_> = u
        .projects
        .iter()
        .filter(|p| p.cost > 0.0)
        .take(top)
        .collect();
    if shown.is_empty() {
        out.push_str("<p class=\"note\">No cost in the window.</p>\n");
        return;
    }
    let since = u
        .window
        .map(|w| crate::plan::Timestamp(w.cost_start).to_string())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "<p class=\"note\">Cost since {} ({currency}), the {} most expensive projects; under each bar, the keys that drive it.</p>",
        escaped(&since),
        shown.len()
    );
    let max = shown.iter().map(|p| p.cost).fold(0.0_f64, f64::max);
    out.push_str("<div class=\"cost\">\n");
    for p in shown {
        let pct = if max > 0.0 { p.cost / max * 100.0 } else { 0.0 };
        let _ = writeln!(
            out,
            "<div>{}<span class=\"id\">{}</span></div><div><div class=\"cb\" style=\"width:{pct:.1}%\"></div></div><div class=\"num\">{:.2} {currency}</div>",
            escaped(&truncate(&p.project_name, 40)),
            escaped(&p.project_id),
            p.cost
        );
        let keys: Vec<String> = p
            .top_keys
            .iter()
            .map(|(k, c)| format!("{} {c:.2}", escaped(k)))
            .collect();
        let _ = writeln!(out, "<div class=\"ck\">{}</div>", keys.join(" · "));
    }
    out.push_str("</div>\n");
}

/// The report as one self-contained HTML page.
pub(super) fn render(r: &Report) -> String {
    let mut out = String::with_capacity(2048 + 1200 * r.keys.len());
    let s = &r.summary;
    out.push_str(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\n\
         <title>OpenAI API key inventory — ",
    );
    esc(&mut out, &r.generated_at);
    out.push_str("</title>\n<style>\n");
    out.push_str(CSS);
    out.push_str("</style>\n</head>\n<body>\n<header>\n<h1>OpenAI API key inventory</h1>\n");
    let _ = writeln!(
        out,
        "<p class=\"meta\">Generated {} by keyrotd · {} keys in {} projects · policy max_age {} days</p>\n</header>",
        escaped(&r.generated_at),
        s.keys,
        s.projects,
        s.max_age_days
    );

    summary_cards(&mut out, r);
    verdict_bar(&mut out, s);
    age_chart(&mut out, r, CHART_PROJECTS);
    cost_view(&mut out, r, CHART_PROJECTS);
    key_table(&mut out, r);

    out.push_str(
        "<footer>keyrotd report · verdicts are those of <code>keyrotd plan</code> at the time above · \
         hover a dot for the key</footer>\n</body>\n</html>\n",
    );
    out
}

fn card(out: &mut String, color: &str, n: &str, label: &str) {
    let _ = writeln!(
        out,
        "<div class=\"card\" style=\"--c:{color}\"><div class=\"n\">{n}</div><div class=\"l\">{label}</div></div>"
    );
}

fn summary_cards(out: &mut String, r: &Report) {
    let s = &r.summary;
    let pct = |n: usize| {
        if s.keys == 0 {
            String::new()
        } else {
            format!(" ({:.0}%)", 100.0 * n as f64 / s.keys as f64)
        }
    };
    out.push_str("<section class=\"cards\">\n");
    card(
        out,
        "#0969da",
        &s.keys.to_string(),
        &format!(
            "keys · {} service-account, {} user",
            s.by_owner_type.service_account, s.by_owner_type.user
        ),
    );
    card(
        out,
        "#e03131",
        &s.stale.to_string(),
        &format!("stale{} · older than their max_age", pct(s.stale)),
    );
    for v in [
        Verdict::Rotate,
        Verdict::Revoke,
        Verdict::Report,
        Verdict::Orphan,
    ] {
        let n = s.by_verdict.get(v);
        card(
            out,
            color(v),
            &n.to_string(),
            &format!("{}{}", verdict_label(v), pct(n)),
        );
    }
    let oldest = r
        .keys
        .iter()
        .find(|k| Some(&k.key_id) == s.oldest_key_id.as_ref());
    let (n, label) = match (s.oldest_key_age_days, oldest) {
        (Some(d), Some(k)) => (
            format!("{d} d"),
            format!(
                "oldest key · {} in {}",
                escaped(&truncate(k.key_name.as_deref().unwrap_or(&k.key_id), 28)),
                escaped(&truncate(&k.project_name, 28))
            ),
        ),
        _ => ("–".to_string(), "oldest key".to_string()),
    };
    card(out, "#57606a", &n, &label);
    out.push_str("</section>\n");
}

/// One full-width bar split by verdict (plain HTML, so it stretches crisply), with a
/// legend.
fn verdict_bar(out: &mut String, s: &Summary) {
    out.push_str("<div class=\"bar\" role=\"img\" aria-label=\"keys by verdict\">");
    for v in Verdict::ALL {
        let n = s.by_verdict.get(v);
        if n == 0 {
            continue;
        }
        let pct = 100.0 * n as f64 / s.keys.max(1) as f64;
        let _ = write!(
            out,
            "<div style=\"flex:{n} 1 0;background:{}\" title=\"{}: {n}\">{}</div>",
            color(v),
            v.as_str(),
            if pct >= 3.0 {
                n.to_string()
            } else {
                String::new()
            }
        );
    }
    out.push_str("</div>\n<div class=\"legend\">");
    for v in Verdict::ALL {
        let _ = write!(
            out,
            "<span><i class=\"sw\" style=\"background:{}\"></i>{} {}</span>",
            color(v),
            verdict_label(v),
            s.by_verdict.get(v)
        );
    }
    out.push_str("</div>\n");
}

/// A tick step (days) giving at most ~10 ticks up to `max`.
fn tick_step(max: u64) -> u64 {
    [7, 14, 30, 60, 90, 180, 365, 730, 1825]
        .into_iter()
        .find(|s| max / s <= 10)
        .unwrap_or(max.div_ceil(10).max(1))
}

/// Horizontal lanes, one per project (the `top` with the oldest keys): each key a dot
/// at its age, coloured by verdict; a dashed line at `policy.max_age`.
fn age_chart(out: &mut String, r: &Report, top: usize) {
    struct Lane<'a> {
        id: &'a str,
        name: &'a str,
        oldest: u64,
        keys: Vec<&'a ReportKey>,
    }
    let mut lanes: Vec<Lane<'_>> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for k in &r.keys {
        let i = *index.entry(k.project_id.as_str()).or_insert_with(|| {
            lanes.push(Lane {
                id: &k.project_id,
                name: &k.project_name,
                oldest: 0,
                keys: Vec::new(),
            });
            lanes.len() - 1
        });
        let lane = &mut lanes[i];
        lane.oldest = lane.oldest.max(k.age_days);
        lane.keys.push(k);
    }
    let total = lanes.len();
    lanes.sort_by(|a, b| b.oldest.cmp(&a.oldest).then(a.name.cmp(b.name)));
    lanes.truncate(top);

    out.push_str("<h2>Key age by project</h2>\n");
    if total > lanes.len() {
        let _ = writeln!(
            out,
            "<p class=\"note\">The {} projects with the oldest keys (of {total} with keys); the table below lists every key.</p>",
            lanes.len()
        );
    } else {
        out.push_str("<p class=\"note\">Every project with keys, oldest first. Each dot is a key at its age.</p>\n");
    }
    if lanes.is_empty() {
        out.push_str("<p class=\"note\">No keys.</p>\n");
        return;
    }

    let max_age = r.summary.max_age_days;
    let oldest = lanes.iter().map(|l| l.oldest).max().unwrap_or(0);
    let step = tick_step(oldest.max(max_age).max(1) * 21 / 20);
    let domain = (oldest.max(max_age).max(1) * 21 / 20).div_ceil(step) * step;
    const LEFT: f64 = 250.0;
    const RIGHT: f64 = 70.0;
    const WIDTH: f64 = 1100.0;
    const ROW: f64 = 24.0;
    const TOP: f64 = 26.0;
    let plot = WIDTH - LEFT - RIGHT;
    let x = |d: u64| LEFT + plot * d as f64 / domain as f64;
    let height = TOP + ROW * lanes.len() as f64 + 40.0;
    let bottom = TOP + ROW * lanes.len() as f64;

    let _ = writeln!(
        out,
        "<svg viewBox=\"0 0 {WIDTH} {height}\" width=\"{WIDTH}\" height=\"{height}\" role=\"img\" aria-label=\"key age by project\" xmlns=\"http://www.w3.org/2000/svg\">"
    );
    // Zebra rows and grid.
    for (i, _) in lanes.iter().enumerate() {
        if i % 2 == 0 {
            let _ = writeln!(
                out,
                "<rect x=\"0\" y=\"{:.1}\" width=\"{WIDTH}\" height=\"{ROW}\" fill=\"#f6f8fa\"></rect>",
                TOP + ROW * i as f64
            );
        }
    }
    let mut t = 0;
    while t <= domain {
        let _ = writeln!(
            out,
            "<line x1=\"{0:.1}\" y1=\"{TOP}\" x2=\"{0:.1}\" y2=\"{bottom:.1}\" stroke=\"#d0d7de\" stroke-width=\"1\"></line>\
             <text x=\"{0:.1}\" y=\"{1:.1}\" text-anchor=\"middle\" font-size=\"11\" fill=\"#656d76\">{t}</text>",
            x(t),
            bottom + 16.0
        );
        t += step;
    }
    let _ = writeln!(
        out,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11.5\" fill=\"#656d76\">key age (days)</text>",
        LEFT + plot / 2.0,
        bottom + 32.0
    );
    // max_age line.
    let mx = x(max_age);
    let _ = writeln!(
        out,
        "<line x1=\"{mx:.1}\" y1=\"{:.1}\" x2=\"{mx:.1}\" y2=\"{bottom:.1}\" stroke=\"#e03131\" stroke-width=\"1.5\" stroke-dasharray=\"5 4\"></line>\
         <text x=\"{mx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11.5\" font-weight=\"600\" fill=\"#e03131\">max_age {max_age} d</text>",
        TOP - 6.0,
        TOP - 10.0
    );
    let mut rule_ticks = false;
    for (i, lane) in lanes.iter().enumerate() {
        let y0 = TOP + ROW * i as f64;
        let cy = y0 + ROW / 2.0;
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"12.5\" fill=\"#1f2328\">{}<title>{} ({})</title></text>",
            LEFT - 10.0,
            cy + 4.0,
            escaped(&truncate(lane.name, 34)),
            escaped(lane.name),
            escaped(lane.id)
        );
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" y1=\"{cy:.1}\" x2=\"{:.1}\" y2=\"{cy:.1}\" stroke=\"#afb8c1\" stroke-width=\"2\" stroke-linecap=\"round\"></line>",
            x(lane.oldest)
        );
        // Rule-specific max_age ticks when they differ from the policy's.
        let own: BTreeSet<u64> = lane.keys.iter().map(|k| k.max_age_days).collect();
        for m in own.into_iter().filter(|&m| m != max_age && m <= domain) {
            rule_ticks = true;
            let _ = writeln!(
                out,
                "<line x1=\"{0:.1}\" y1=\"{1:.1}\" x2=\"{0:.1}\" y2=\"{2:.1}\" stroke=\"#e03131\" stroke-width=\"2\"><title>rule max_age {m} d</title></line>",
                x(m),
                y0 + 3.0,
                y0 + ROW - 3.0
            );
        }
        // Dots, oldest last so the most urgent are on top; nearby dots spread out.
        let mut keys = lane.keys.clone();
        keys.sort_by_key(|k| (k.age_days, k.verdict != Verdict::Ok));
        let mut last = [f64::NEG_INFINITY; 3];
        for k in keys {
            let kx = x(k.age_days);
            let slot = (0..3).find(|&s| kx - last[s] >= 9.0).unwrap_or_else(|| {
                (0..3)
                    .min_by(|&a, &b| last[a].total_cmp(&last[b]))
                    .unwrap_or(0)
            });
            last[slot] = kx;
            let dy = [0.0, -5.0, 5.0][slot];
            let _ = writeln!(
                out,
                "<circle cx=\"{kx:.1}\" cy=\"{:.1}\" r=\"5\" fill=\"{}\" stroke=\"#fff\" stroke-width=\"1.2\"><title>{} · {} · {} d · {}</title></circle>",
                cy + dy,
                color(k.verdict),
                escaped(k.key_name.as_deref().unwrap_or("-")),
                escaped(&k.key_id),
                k.age_days,
                k.verdict.as_str()
            );
        }
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" font-weight=\"600\" fill=\"{}\">{} d</text>",
            WIDTH - RIGHT + 10.0,
            cy + 4.0,
            if lane.oldest > max_age { "#e03131" } else { "#656d76" },
            lane.oldest
        );
    }
    out.push_str("</svg>\n<div class=\"legend\">");
    for v in Verdict::ALL {
        let _ = write!(
            out,
            "<span><i class=\"sw\" style=\"background:{}\"></i>{}</span>",
            color(v),
            v.as_str()
        );
    }
    let _ = write!(
        out,
        "<span><i class=\"ln\"></i>policy max_age ({max_age} d)</span>"
    );
    if rule_ticks {
        out.push_str("<span><i class=\"tk\"></i>a rule's own max_age</span>");
    }
    out.push_str("<span>right: the project's oldest key</span></div>\n");
}

fn key_table(out: &mut String, r: &Report) {
    let mut keys: Vec<&ReportKey> = r.keys.iter().collect();
    keys.sort_by(|a, b| {
        b.age_days
            .cmp(&a.age_days)
            .then(a.project_name.cmp(&b.project_name))
            .then(a.key_id.cmp(&b.key_id))
    });
    let _ = writeln!(
        out,
        "<h2>All keys</h2>\n<p class=\"note\">{} keys, oldest first.</p>",
        keys.len()
    );
    out.push_str(
        "<table>\n<thead><tr><th>Project</th><th>Key</th><th>Owner</th><th>Created</th>\
         <th class=\"sorted\">Age ▼</th><th>Last used</th><th>Expires</th><th>Verdict</th>\
         <th>Reasons</th><th>Rule</th><th>Created by</th></tr></thead>\n<tbody>\n",
    );
    for k in keys {
        out.push_str("<tr><td>");
        esc(out, &k.project_name);
        out.push_str("<span class=\"id\">");
        esc(out, &k.project_id);
        out.push_str("</span></td><td>");
        esc(out, k.key_name.as_deref().unwrap_or("—"));
        out.push_str("<span class=\"id\">");
        esc(out, &k.key_id);
        out.push_str("</span></td><td>");
        esc(out, k.owner_name.as_deref().unwrap_or("—"));
        if let Some(e) = &k.owner_email {
            if k.owner_name.as_deref() != Some(e) {
                out.push_str(" &lt;");
                esc(out, e);
                out.push_str("&gt;");
            }
        }
        let _ = write!(
            out,
            "<span class=\"id\">{} {}</span></td>",
            if k.owner_type == OwnerType::User.as_str() {
                "user"
            } else {
                "service account"
            },
            escaped(k.owner_id.as_deref().unwrap_or(""))
        );
        let _ = write!(
            out,
            "<td class=\"d\" title=\"{0}\">{1}</td>",
            escaped(&k.created_at),
            escaped(date(&k.created_at))
        );
        let stale = k.reasons.contains(&Reason::Stale);
        let _ = write!(
            out,
            "<td class=\"num{}\">{} d</td>",
            if stale { " stale" } else { "" },
            k.age_days
        );
        match &k.last_used_at {
            Some(t) => {
                let _ = write!(
                    out,
                    "<td class=\"d\" title=\"{}\">{}</td>",
                    escaped(t),
                    escaped(date(t))
                );
            }
            None => out.push_str("<td class=\"never\">never</td>"),
        }
        match &k.expires_at {
            Some(t) => {
                let _ = write!(
                    out,
                    "<td class=\"d\" title=\"{}\">{}",
                    escaped(t),
                    escaped(date(t))
                );
                if let Some(e) = k.expiry {
                    let _ = write!(out, " <span class=\"tag\">{}</span>", e.as_str());
                }
                out.push_str("</td>");
            }
            None => out.push_str("<td class=\"never\">never</td>"),
        }
        let _ = write!(
            out,
            "<td><span class=\"pill\" style=\"background:{}\">{}</span></td><td>",
            color(k.verdict),
            k.verdict.as_str()
        );
        for reason in &k.reasons {
            let _ = write!(out, "<span class=\"tag\">{}</span>", reason.as_str());
        }
        out.push_str("</td><td>");
        esc(out, k.rule.as_deref().unwrap_or("—"));
        out.push_str("</td><td>");
        esc(out, k.creator.as_deref().unwrap_or("—"));
        out.push_str("</td></tr>\n");
    }
    out.push_str("</tbody>\n</table>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_escaping_covers_attributes_and_text() {
        assert_eq!(
            escaped("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }

    #[test]
    fn ticks_are_few_and_round() {
        assert_eq!(tick_step(60), 7);
        assert_eq!(tick_step(94), 14);
        assert_eq!(tick_step(400), 60);
        assert_eq!(tick_step(3000), 365);
        assert!(tick_step(100_000) * 10 >= 100_000);
    }

    #[test]
    fn truncation_counts_chars_not_bytes() {
        assert_eq!(truncate("ééééé", 3), "éé…");
        assert_eq!(truncate("abc", 3), "abc");
    }
}
