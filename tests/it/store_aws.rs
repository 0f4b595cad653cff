//! AWS Secrets Manager specifics against moto: version stages, the placeholder that
//! keeps an unverified key out of `AWSCURRENT`, bookkeeping tags, the label move as
//! compare-and-set, resuming a promotion cut short, secrets created by others.

use std::collections::HashMap;

use crate::store_support::*;
use aws_sdk_secretsmanager::types::Tag;
use keyrotd::store::{StoreErrorKind, Transition};

async fn stages(path: &str) -> HashMap<String, Vec<String>> {
    aws_sdk()
        .await
        .describe_secret()
        .secret_id(path)
        .send()
        .await
        .expect("describe")
        .version_ids_to_stages()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, s)| !s.is_empty())
        .collect()
}

async fn tags(path: &str) -> HashMap<String, String> {
    aws_sdk()
        .await
        .describe_secret()
        .secret_id(path)
        .send()
        .await
        .expect("describe")
        .tags()
        .iter()
        .map(|t| {
            (
                t.key().unwrap_or("").to_string(),
                t.value().unwrap_or("").to_string(),
            )
        })
        .collect()
}

async fn stage_value(path: &str, stage: &str) -> serde_json::Value {
    let out = aws_sdk()
        .await
        .get_secret_value()
        .secret_id(path)
        .version_stage(stage)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{stage}: {e:?}"));
    serde_json::from_str(out.secret_string().expect("string")).expect("JSON")
}

fn holder<'a>(s: &'a HashMap<String, Vec<String>>, stage: &str) -> Option<&'a str> {
    s.iter()
        .find(|(_, v)| v.iter().any(|x| x == stage))
        .map(|(k, _)| k.as_str())
}

#[tokio::test]
async fn bootstrap_never_exposes_the_unverified_key() {
    let store = aws_store().await;
    let path = unique("placeholder");
    step(&store, &path, Transition::Intent(intent(1))).await;
    let t = tags(&path).await;
    assert_eq!(t.get("managed-by").map(String::as_str), Some("keyrotd"));
    assert_eq!(
        t.get("keyrotd:intent-key-name").map(String::as_str),
        Some("keyrotd-20261127T020000Z-1")
    );
    assert_eq!(
        t.get("keyrotd:intent-lease-until").map(String::as_str),
        Some("2026-09-21T14:23:20Z")
    );

    let rec = record("key_new");
    step(&store, &path, Transition::Stage(rec.clone())).await;
    let current = stage_value(&path, "AWSCURRENT").await;
    assert!(
        current.get("api_key").is_none(),
        "AWSCURRENT is the placeholder: {current}"
    );
    assert_eq!(stage_value(&path, "AWSPENDING").await["key_id"], "key_new");

    step(
        &store,
        &path,
        Transition::Promote {
            key_id: "key_new".into(),
            at: at(5),
            previous_until: None,
        },
    )
    .await;
    assert_eq!(stage_value(&path, "AWSCURRENT").await["key_id"], "key_new");
    let s = stages(&path).await;
    assert_eq!(
        holder(&s, "AWSPENDING"),
        None,
        "AWSPENDING removed after promotion: {s:?}"
    );
    let t = tags(&path).await;
    assert_eq!(
        t.get("keyrotd:intent-key-name").map(String::as_str),
        Some(""),
        "intent cleared"
    );
    assert_eq!(
        t.get("keyrotd:promoted-key-id").map(String::as_str),
        Some("key_new")
    );
    assert_eq!(
        t.get("keyrotd:promoted-at").map(String::as_str),
        Some("2026-09-21T14:13:25Z")
    );
    // The placeholder is AWSPREVIOUS now, and it is no key.
    let st = store.read(&path).await.unwrap();
    assert_eq!(st.book.previous_key_id, None);
}

#[tokio::test]
async fn second_rotation_moves_the_standard_labels() {
    let store = aws_store().await;
    let path = unique("labels");
    rotate(&store, &path, &record("key_1"), 1, at(1)).await;
    let v1 = holder(&stages(&path).await, "AWSCURRENT")
        .unwrap()
        .to_string();
    step(&store, &path, Transition::Intent(intent(2))).await;
    step(&store, &path, Transition::Stage(record("key_2"))).await;
    let s = stages(&path).await;
    assert_eq!(holder(&s, "AWSCURRENT"), Some(v1.as_str()));
    let v2 = holder(&s, "AWSPENDING").unwrap().to_string();
    step(
        &store,
        &path,
        Transition::Promote {
            key_id: "key_2".into(),
            at: at(2),
            previous_until: None,
        },
    )
    .await;
    let s = stages(&path).await;
    assert_eq!(holder(&s, "AWSCURRENT"), Some(v2.as_str()));
    assert_eq!(holder(&s, "AWSPREVIOUS"), Some(v1.as_str()));
    assert_eq!(holder(&s, "AWSPENDING"), None);
    let st = store.read(&path).await.unwrap();
    assert_eq!(st.book.previous_key_id.as_deref(), Some("key_1"));
    assert_eq!(st.version.0.split('|').next(), Some(v2.as_str()));
}

/// Two writers pass the version check together; the label move lets only one through.
#[tokio::test]
async fn stale_remove_from_version_id_is_a_conflict() {
    let path = unique("labelrace");
    let (a, b) = (aws_store().await, aws_store().await);
    rotate(&a, &path, &record("key_1"), 1, at(1)).await;
    let mut label_move_conflicts = 0;
    for n in 2..6u32 {
        let key = format!("key_{n}");
        step(&a, &path, Transition::Intent(intent(n))).await;
        let st = step(&a, &path, Transition::Stage(record(&key))).await;
        let t = Transition::Promote {
            key_id: key.clone(),
            at: at(n as i64),
            previous_until: None,
        };
        let (ra, rb) = tokio::join!(
            a.apply(&path, &st.version, &t),
            b.apply(&path, &st.version, &t)
        );
        assert_eq!(
            [&ra, &rb].iter().filter(|r| r.is_ok()).count(),
            1,
            "{ra:?} / {rb:?}"
        );
        let e = ra.err().or(rb.err()).unwrap();
        assert_eq!(e.kind, StoreErrorKind::Conflict, "{e}");
        if e.message.contains("move AWSCURRENT") {
            label_move_conflicts += 1;
        }
        assert_eq!(a.read(&path).await.unwrap().current.unwrap().key_id, key);
    }
    assert!(
        label_move_conflicts > 0,
        "the race never reached the label move"
    );
}

/// A process killed after moving AWSCURRENT but before writing the tags: the next read
/// shows the new key current with its grace clock unset, and Promote finishes the job.
#[tokio::test]
async fn promotion_cut_short_is_resumed() {
    let store = aws_store().await;
    let path = unique("cutshort");
    rotate(&store, &path, &record("key_1"), 1, at(1)).await;
    step(&store, &path, Transition::Intent(intent(2))).await;
    step(&store, &path, Transition::Stage(record("key_2"))).await;
    let s = stages(&path).await;
    let (cur, pend) = (
        holder(&s, "AWSCURRENT").unwrap(),
        holder(&s, "AWSPENDING").unwrap(),
    );
    aws_sdk()
        .await
        .update_secret_version_stage()
        .secret_id(&path)
        .version_stage("AWSCURRENT")
        .move_to_version_id(pend)
        .remove_from_version_id(cur)
        .send()
        .await
        .expect("label move behind the store's back");

    let st = store.read(&path).await.unwrap();
    assert_eq!(
        st.current.as_ref().map(|c| c.key_id.as_str()),
        Some("key_2")
    );
    assert_eq!(
        st.pending, None,
        "AWSPENDING on AWSCURRENT is a finished rotation"
    );
    assert_eq!(
        st.book.previous_key_id.as_deref(),
        Some("key_1"),
        "from AWSPREVIOUS"
    );
    assert_eq!(
        st.book.promoted_at, None,
        "the old promoted-at belongs to key_1"
    );
    assert_eq!(st.book.intent, Some(intent(2)));

    let done = store
        .apply(
            &path,
            &st.version,
            &Transition::Promote {
                key_id: "key_2".into(),
                at: at(9),
                previous_until: None,
            },
        )
        .await
        .expect("resume");
    assert_eq!(done.book.promoted_at, Some(at(9)));
    assert_eq!(done.book.intent, None);
    assert_eq!(holder(&stages(&path).await, "AWSPENDING"), None);
}

#[tokio::test]
async fn secret_created_by_someone_else_is_adopted() {
    let path = unique("terraform");
    aws_sdk()
        .await
        .create_secret()
        .name(&path)
        .tags(Tag::builder().key("team").value("platform").build())
        .send()
        .await
        .expect("create without a value");
    let store = aws_store().await;
    let st = store.read(&path).await.unwrap();
    assert!(!st.version.is_absent() && st.current.is_none());
    rotate(&store, &path, &record("key_1"), 1, at(1)).await;
    let t = tags(&path).await;
    assert_eq!(t.get("team").map(String::as_str), Some("platform"));
    assert_eq!(t.get("managed-by").map(String::as_str), Some("keyrotd"));
    assert_eq!(stage_value(&path, "AWSCURRENT").await["key_id"], "key_1");
}

#[tokio::test]
async fn foreign_and_deleted_secrets_are_refused() {
    let sdk = aws_sdk().await;
    let store = aws_store().await;
    let foreign = unique("foreign");
    sdk.create_secret()
        .name(&foreign)
        .secret_string(r#"{"password":"hunter2"}"#)
        .send()
        .await
        .unwrap();
    let e = store.read(&foreign).await.expect_err("foreign");
    assert_eq!(e.kind, StoreErrorKind::InvalidData, "{e}");
    assert!(!format!("{e} {e:?}").contains("hunter2"));

    let path = unique("deleted");
    rotate(&store, &path, &record("key_1"), 1, at(1)).await;
    sdk.delete_secret()
        .secret_id(&path)
        .recovery_window_in_days(7)
        .send()
        .await
        .unwrap();
    let e = store.read(&path).await.expect_err("scheduled for deletion");
    assert_eq!(e.kind, StoreErrorKind::InvalidData, "{e}");
    assert!(e.to_string().contains("scheduled for deletion"), "{e}");
}

#[tokio::test]
async fn unreachable_endpoint_is_temporary_and_bad_names_are_refused() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = aws_config();
    cfg.endpoint_url = format!("http://127.0.0.1:{port}");
    cfg.max_retries = 0;
    let store = keyrotd::store::aws::AwsStore::connect("aws", &cfg)
        .await
        .unwrap();
    use keyrotd::store::SecretStore;
    let e = store.health().await.expect_err("nothing listens");
    assert_eq!(e.kind, StoreErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains("store \"aws\""), "{e}");
    let e = store.read("has space/x").await.expect_err("bad name");
    assert_eq!(e.kind, StoreErrorKind::InvalidConfig, "{e}");
}
