use super::*;

fn row(project_name: &str, n: usize, ready: bool) -> SlotRow {
    SlotRow {
        labels: SlotLabels {
            rule: "prod".into(),
            project_id: format!("proj_{n:04}"),
            project_name: project_name.into(),
            service_account_id: format!("sa_{n:04}"),
            service_account_name: "backend".into(),
        },
        ready,
        key_age_seconds: Some(86400.0),
        last_rotation: Some(1_800_000_000.0),
        next_due: Some(1_807_776_000.0),
    }
}

/// The sample lines of `family` (exactly that name, not a longer one).
fn samples<'a>(text: &'a str, family: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .collect()
}

#[test]
fn label_values_are_escaped() {
    let m = Metrics::default();
    m.set_slot_rows(vec![row("quote\" back\\slash\nnewline", 1, true)]);
    let text = m.render(None);
    let ready = samples(&text, "keyrotd_slot_ready");
    assert_eq!(
        ready,
        [concat!(
            r#"keyrotd_slot_ready{rule="prod",project_id="proj_0001","#,
            r#"project_name="quote\" back\\slash\nnewline","#,
            r#"service_account_id="sa_0001",service_account_name="backend"} 1"#
        )],
        "{text}"
    );
    // The raw newline never reaches the exposition: every line is a comment or a sample.
    for l in text.lines() {
        assert!(l.starts_with('#') || l.starts_with("keyrotd_"), "{l:?}");
    }
}

#[test]
fn the_slot_limit_caps_series_keeps_not_ready_slots_and_counts_the_rest() {
    let m = Metrics::with_slot_limit(3);
    let rows: Vec<SlotRow> = (0..5).map(|n| row("p", n, n != 4)).collect();
    m.set_slot_rows(rows.clone());
    let text = m.render(None);
    let ready = samples(&text, "keyrotd_slot_ready");
    assert_eq!(ready.len(), 3, "{text}");
    assert!(
        ready
            .iter()
            .any(|l| l.contains("proj_0004") && l.ends_with(" 0")),
        "the not-ready slot is kept: {ready:?}"
    );
    for family in [
        "keyrotd_slot_key_age_seconds",
        "keyrotd_slot_last_rotation_timestamp_seconds",
        "keyrotd_slot_next_rotation_timestamp_seconds",
    ] {
        assert_eq!(samples(&text, family).len(), 3, "{family}: {text}");
    }
    assert_eq!(
        samples(&text, "keyrotd_slot_series_omitted"),
        ["keyrotd_slot_series_omitted 2"]
    );

    // Back under the limit: every slot exported, nothing omitted.
    m.set_slot_rows(rows[..2].to_vec());
    let text = m.render(None);
    assert_eq!(samples(&text, "keyrotd_slot_ready").len(), 2, "{text}");
    assert_eq!(
        samples(&text, "keyrotd_slot_series_omitted"),
        ["keyrotd_slot_series_omitted 0"]
    );
}

#[test]
fn slots_that_disappear_lose_every_series() {
    let m = Metrics::default();
    m.set_slot_rows(vec![row("a", 1, true), row("b", 2, false)]);
    let mut second = row("b", 2, true);
    second.key_age_seconds = None;
    m.set_slot_rows(vec![second]);
    let text = m.render(None);
    assert!(!text.contains("proj_0001"), "{text}");
    assert_eq!(samples(&text, "keyrotd_slot_ready").len(), 1);
    assert!(samples(&text, "keyrotd_slot_ready")[0].ends_with(" 1"));
    assert!(
        samples(&text, "keyrotd_slot_key_age_seconds").is_empty(),
        "a value no longer known is dropped: {text}"
    );
}

#[test]
fn families_keep_their_names_and_build_info_is_one() {
    let m = Metrics::default();
    m.slot_failed(FailureKind::Store);
    m.rotation_failed(FailureKind::Verify);
    m.rotation_failed(FailureKind::ReadBack);
    let text = m.render(Some(&ApiStats::default()));
    for family in [
        "keyrotd_keys",
        "keyrotd_rotations_total",
        "keyrotd_revocations_total",
        "keyrotd_cycles_total",
        "keyrotd_slot_failures_total",
        "keyrotd_slots",
        "keyrotd_slot_collisions_total",
        "keyrotd_slot_busy_total",
        "keyrotd_key_still_in_use_total",
        "keyrotd_keys_created_outside_total",
        "keyrotd_keys_expiring",
        "keyrotd_cycle_duration_seconds",
        "keyrotd_last_success_timestamp_seconds",
        "keyrotd_oldest_key_age_seconds",
        "keyrotd_rotation_failures_total",
        "keyrotd_build_info",
        // Declared while empty, as the rules expect.
        "keyrotd_slot_ready",
        "keyrotd_slot_key_age_seconds",
        "keyrotd_slot_last_rotation_timestamp_seconds",
        "keyrotd_slot_next_rotation_timestamp_seconds",
        "keyrotd_slot_series_omitted",
        "keyrotd_api_requests_total",
    ] {
        assert!(
            text.contains(&format!("\n# TYPE {family} ")),
            "{family}: {text}"
        );
    }
    assert!(
        text.contains("keyrotd_slot_failures_total{kind=\"store\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("keyrotd_rotations_total{outcome=\"verify_failed\"} 1\n"));
    assert!(text.contains("keyrotd_rotations_total{outcome=\"failed\"} 1\n"));
    assert!(text.contains("keyrotd_rotation_failures_total{kind=\"read_back\"} 1\n"));
    let info = samples(&text, "keyrotd_build_info");
    assert_eq!(info.len(), 1);
    assert!(
        info[0].starts_with(&format!(
            "keyrotd_build_info{{version=\"{}\",commit=\"",
            env!("CARGO_PKG_VERSION")
        )) && info[0].ends_with("} 1"),
        "{info:?}"
    );
}
