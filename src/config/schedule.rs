//! The `daemon.schedule` cron expression.

/// Parses a 5- or 6-field cron expression into the 6-field form the scheduler takes.
pub fn parse_schedule(expr: &str) -> Result<String, String> {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let six = match fields.len() {
        5 => format!("0 {}", fields.join(" ")),
        6 => fields.join(" "),
        n => {
            return Err(format!(
                "{expr:?} has {n} fields; use 5 (crontab: min hour dom mon dow) or 6 (with seconds first)"
            ))
        }
    };
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .build()
        .parse(&six)
        .map_err(|e| format!("{expr:?} is not a valid cron expression: {e}"))?;
    Ok(six)
}
