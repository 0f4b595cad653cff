//! The report as RFC 4180 CSV: a header row, then one row per key; list columns are
//! `;`-separated, and cells a spreadsheet would evaluate as a formula are neutralised.

use super::Report;

const CSV_HEADER: [&str; 27] = [
    "project_id",
    "project_name",
    "key_id",
    "key_name",
    "owner_type",
    "owner_id",
    "owner_name",
    "owner_email",
    "created_at",
    "age_days",
    "last_used_at",
    "expires_at",
    "verdict",
    "reasons",
    "rule",
    "max_age_days",
    "stores",
    "creator",
    "expiry",
    "requests_24h",
    "input_tokens_24h",
    "output_tokens_24h",
    "requests_window",
    "input_tokens_window",
    "output_tokens_window",
    "cost",
    "last_hour_requests",
];

/// One RFC 4180 field: quoted when it holds a comma, quote, CR or LF (quotes doubled).
/// A cell a spreadsheet would run as a formula (`=`, `+`, `-`, `@`, tab, CR first) gets
/// a leading `'` (OWASP "CSV injection").
fn csv_field(out: &mut String, value: &str) {
    let formula = value
        .chars()
        .next()
        .is_some_and(|c| matches!(c, '=' | '+' | '-' | '@' | '\t' | '\r'));
    let quote = value.contains([',', '"', '\r', '\n']);
    if quote {
        out.push('"');
    }
    if formula {
        out.push('\'');
    }
    for c in value.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    if quote {
        out.push('"');
    }
}

fn csv_row<'a>(out: &mut String, fields: impl IntoIterator<Item = &'a str>) {
    for (i, f) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        csv_field(out, f);
    }
    out.push_str("\r\n");
}

/// The report as RFC 4180 CSV: a header row, then one CRLF record per key.
pub(super) fn render(report: &Report) -> String {
    let mut out = String::with_capacity(256 * (report.keys.len() + 1));
    csv_row(&mut out, CSV_HEADER);
    for k in &report.keys {
        let age = k.age_days.to_string();
        let max_age = k.max_age_days.to_string();
        let reasons = join(k.reasons.iter().map(|r| r.as_str()), ";");
        let stores = k.stores.join(";");
        // Empty cells when usage is off or unknown.
        let u: Vec<String> = match &k.usage {
            Some(u) => vec![
                u.requests_24h.to_string(),
                u.input_tokens_24h.to_string(),
                u.output_tokens_24h.to_string(),
                u.requests_window.to_string(),
                u.input_tokens_window.to_string(),
                u.output_tokens_window.to_string(),
                format!("{:.6}", u.cost),
                u.last_hour_requests.to_string(),
            ],
            None => vec![String::new(); 8],
        };
        csv_row(
            &mut out,
            [
                k.project_id.as_str(),
                &k.project_name,
                &k.key_id,
                o(&k.key_name),
                k.owner_type,
                o(&k.owner_id),
                o(&k.owner_name),
                o(&k.owner_email),
                &k.created_at,
                &age,
                o(&k.last_used_at),
                o(&k.expires_at),
                k.verdict.as_str(),
                &reasons,
                o(&k.rule),
                &max_age,
                &stores,
                o(&k.creator),
                k.expiry.map_or("", |e| e.as_str()),
                &u[0],
                &u[1],
                &u[2],
                &u[3],
                &u[4],
                &u[5],
                &u[6],
                &u[7],
            ],
        );
    }
    out
}

fn o(s: &Option<String>) -> &str {
    s.as_deref().unwrap_or("")
}

fn join<'a>(items: impl Iterator<Item = &'a str>, sep: &str) -> String {
    items.collect::<Vec<_>>().join(sep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(v: &str) -> String {
        let mut s = String::new();
        csv_field(&mut s, v);
        s
    }

    #[test]
    fn csv_quotes_only_when_needed_and_doubles_quotes() {
        assert_eq!(field("plain"), "plain");
        assert_eq!(field("a,b"), "\"a,b\"");
        assert_eq!(field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(field("two\nlines"), "\"two\nlines\"");
        assert_eq!(field(""), "");
    }

    #[test]
    fn csv_neutralises_formulas() {
        assert_eq!(field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(field("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(field("-1"), "'-1");
        assert_eq!(field("key-1"), "key-1");
    }
}
