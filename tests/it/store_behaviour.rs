//! One behaviour suite, run unchanged against the file store, OpenBao (Vault KV v2) and
//! moto (AWS Secrets Manager): bootstrap, a second rotation, check-and-set conflicts
//! (through `apply` and `apply_to`),
//! idempotent re-staging, an interrupted stage, Abandon, Retired.
//!
//! Needs the servers of `scripts/test-servers.sh`; without them every test fails with
//! "run scripts/test (needs OpenBao and moto)".

use crate::store_support::*;
use keyrotd::store::{SlotState, StoreErrorKind, Transition};

async fn bootstrap(f: Fixture) {
    let (s, path) = (&f.store, unique("bootstrap"));
    let empty = s.read(&path).await.expect("read absent");
    assert_eq!(
        empty,
        SlotState::default(),
        "an unused path reads as empty and absent"
    );

    let after_intent = step(s, &path, Transition::Intent(intent(1))).await;
    assert_eq!(after_intent.book.intent, Some(intent(1)));
    assert!(!after_intent.version.is_absent());

    let rec = record("key_boot");
    let staged = step(s, &path, Transition::Stage(rec.clone())).await;
    assert_eq!(staged.pending.as_ref(), Some(&rec));
    assert_eq!(
        staged.current, None,
        "a staged key is not what consumers read"
    );
    assert_eq!(
        staged.book.intent,
        Some(intent(1)),
        "the intent stays until promotion"
    );

    let promoted = step(
        s,
        &path,
        Transition::Promote {
            key_id: rec.key_id.clone(),
            at: at(60),
            previous_until: None,
        },
    )
    .await;
    let read = s.read(&path).await.expect("read back");
    assert_eq!(read, promoted, "apply returns the state as stored");
    assert_eq!(read.current.as_ref(), Some(&rec));
    assert_eq!(read.pending, None);
    assert_eq!(read.book.intent, None);
    assert_eq!(read.book.promoted_at, Some(at(60)));
    assert_eq!(read.book.previous_key_id, None);
}

async fn second_rotation(f: Fixture) {
    let (s, path) = (&f.store, unique("second"));
    let (r1, r2) = (record("key_one"), record("key_two"));
    rotate(s, &path, &r1, 1, at(10)).await;
    let st = rotate(s, &path, &r2, 2, at(20)).await;
    let read = s.read(&path).await.expect("read back");
    assert_eq!(read, st);
    assert_eq!(read.current.as_ref(), Some(&r2));
    assert_eq!(read.book.previous_key_id.as_deref(), Some("key_one"));
    assert_eq!(
        read.book.previous_service_account_id.as_deref(),
        Some("svc_acct_key_one")
    );
    assert_eq!(read.book.promoted_at, Some(at(20)));
    assert_eq!(read.pending, None);
    assert_eq!(read.book.intent, None);
    let mut ids: Vec<&str> = read.referenced_key_ids().collect();
    ids.sort();
    assert_eq!(ids, ["key_one", "key_two"]);
    consumer_view(&f, &path, &r2).await;
}

/// An operator's deadline for the previous key (`--revoke-old DURATION`) is kept with
/// the promotion, survives a re-read and a repeated promotion, and goes with the
/// previous key.
async fn previous_deadline(f: Fixture) {
    let (s, path) = (&f.store, unique("deadline"));
    let (r1, r2) = (record("key_one"), record("key_two"));
    rotate(s, &path, &r1, 1, at(10)).await;
    step(s, &path, Transition::Intent(intent(2))).await;
    step(s, &path, Transition::Stage(r2.clone())).await;
    let promote = |until| Transition::Promote {
        key_id: r2.key_id.clone(),
        at: at(20),
        previous_until: until,
    };
    let st = step(s, &path, promote(Some(at(80)))).await;
    assert_eq!(st.book.previous_until, Some(at(80)));
    let read = s.read(&path).await.expect("read back");
    assert_eq!(read, st);
    // A repeated promotion (a resumed run) keeps the deadline it does not know.
    let again = step(s, &path, promote(None)).await;
    assert_eq!(again.book.previous_until, Some(at(80)));
    let gone = step(
        s,
        &path,
        Transition::Retired {
            key_id: "key_one".into(),
        },
    )
    .await;
    assert_eq!(gone.book.previous_key_id, None);
    assert_eq!(
        gone.book.previous_until, None,
        "the deadline goes with the key"
    );
    assert_eq!(s.read(&path).await.expect("read"), gone);
    // A rotation without one records none.
    let third = rotate(s, &path, &record("key_three"), 3, at(90)).await;
    assert_eq!(third.book.previous_key_id.as_deref(), Some("key_two"));
    assert_eq!(third.book.previous_until, None);
}

/// What a consumer reading the store directly sees: the DESIGN.md §3 object.
async fn consumer_view(f: &Fixture, path: &str, rec: &keyrotd::store::SecretRecord) {
    use secrecy::ExposeSecret;
    let doc: serde_json::Value = match f.backend {
        Backend::File => {
            let file = f
                .dir
                .as_ref()
                .unwrap()
                .path()
                .join("secrets")
                .join(format!("{path}.json"));
            serde_json::from_slice(&std::fs::read(file).expect("document file")).expect("JSON file")
        }
        Backend::Vault => {
            let v = bao(reqwest::Method::GET, &format!("secret/data/{path}"), None).await;
            let meta = bao(
                reqwest::Method::GET,
                &format!("secret/metadata/{path}"),
                None,
            )
            .await;
            assert_eq!(meta["data"]["custom_metadata"]["managed-by"], "keyrotd");
            v["data"]["data"].clone()
        }
        Backend::Aws => {
            let sdk = aws_sdk().await;
            let d = sdk
                .describe_secret()
                .secret_id(path)
                .send()
                .await
                .expect("describe");
            let stages = d.version_ids_to_stages().expect("versions");
            let label_of = |id: &str| stages.get(id).cloned().unwrap_or_default();
            let cur = sdk
                .get_secret_value()
                .secret_id(path)
                .version_stage("AWSCURRENT")
                .send()
                .await
                .expect("AWSCURRENT");
            let prev = sdk
                .get_secret_value()
                .secret_id(path)
                .version_stage("AWSPREVIOUS")
                .send()
                .await
                .expect("AWSPREVIOUS");
            assert!(label_of(cur.version_id().unwrap()).contains(&"AWSCURRENT".to_string()));
            assert!(!label_of(cur.version_id().unwrap()).contains(&"AWSPENDING".to_string()));
            let prev_doc: serde_json::Value =
                serde_json::from_str(prev.secret_string().unwrap()).unwrap();
            assert_eq!(
                prev_doc["key_id"], "key_one",
                "AWSPREVIOUS is the key before"
            );
            let tags: Vec<(String, String)> = d
                .tags()
                .iter()
                .map(|t| (t.key().unwrap_or("").into(), t.value().unwrap_or("").into()))
                .collect();
            assert!(
                tags.contains(&("managed-by".into(), "keyrotd".into())),
                "{tags:?}"
            );
            let doc: serde_json::Value =
                serde_json::from_str(cur.secret_string().unwrap()).unwrap();
            assert_eq!(
                doc.as_object().unwrap().len(),
                6,
                "exactly the six fields: {:?}",
                doc.as_object().unwrap().keys()
            );
            doc
        }
    };
    assert_eq!(doc["api_key"], rec.api_key.expose_secret());
    assert_eq!(doc["key_id"], rec.key_id);
    assert_eq!(doc["project_id"], rec.project_id);
    assert_eq!(doc["service_account_id"], rec.service_account_id);
    assert_eq!(doc["created_at"], "2026-09-21T14:13:20Z");
    assert_eq!(doc["managed_by"], "keyrotd");
}

async fn cas_conflict(f: Fixture) {
    let (s, path) = (&f.store, unique("cas"));
    let other = f.reopen().await;
    rotate(s, &path, &record("key_a"), 1, at(10)).await;
    step(s, &path, Transition::Intent(intent(2))).await;
    let staged = step(s, &path, Transition::Stage(record("key_b"))).await;

    // Two writers promote from the same version at once: exactly one wins.
    let promote = Transition::Promote {
        key_id: "key_b".into(),
        at: at(30),
        previous_until: None,
    };
    let (a, b) = tokio::join!(
        s.apply(&path, &staged.version, &promote),
        other.apply(&path, &staged.version, &promote)
    );
    let wins = [&a, &b].iter().filter(|r| r.is_ok()).count();
    assert_eq!(
        wins, 1,
        "exactly one of two racing writers wins: {a:?} / {b:?}"
    );
    let loser = if a.is_ok() { b } else { a };
    assert_conflict(loser, "the racing loser");

    // A writer holding a stale version loses, whatever it tries.
    for t in [
        Transition::Intent(intent(3)),
        Transition::Stage(record("key_c")),
        Transition::Abandon,
        Transition::Retired {
            key_id: "key_a".into(),
        },
    ] {
        assert_conflict(
            other.apply(&path, &staged.version, &t).await,
            &format!("stale {t:?}"),
        );
    }
    let read = s.read(&path).await.expect("read");
    assert_eq!(read.current.map(|c| c.key_id).as_deref(), Some("key_b"));
    assert_eq!(read.book.previous_key_id.as_deref(), Some("key_a"));
    // Creating from "absent" when something exists is a conflict too.
    assert_conflict(
        s.apply(&path, &absent(), &Transition::Intent(intent(4)))
            .await,
        "stale absent",
    );
}

/// `apply_to` (the engine's path: no re-read where the backend can compare-and-set)
/// keeps `apply`'s contract: a state that is no longer current loses.
async fn apply_to_conflict(f: Fixture) {
    let (s, path) = (&f.store, unique("applyto"));
    let other = f.reopen().await;
    let read = s.read(&path).await.expect("read");
    let a = s
        .apply_to(&path, &read, &Transition::Intent(intent(1)))
        .await
        .expect("intent on an empty slot");
    assert_eq!(a.book.intent, Some(intent(1)));
    // The state it returned is current: the chain goes on without reads.
    let b = s
        .apply_to(&path, &a, &Transition::Stage(record("key_1")))
        .await
        .expect("stage");
    let c = s
        .apply_to(
            &path,
            &b,
            &Transition::Promote {
                key_id: "key_1".into(),
                at: at(10),
                previous_until: None,
            },
        )
        .await
        .expect("promote");
    assert_eq!(c.current.as_ref().map(|r| r.key_id.as_str()), Some("key_1"));
    assert_eq!(s.read(&path).await.expect("read back").current, c.current);

    // Another writer moves the slot on: every state before that is stale.
    other
        .apply_to(&path, &c, &Transition::Intent(intent(2)))
        .await
        .expect("the other writer");
    for stale in [&read, &a, &b, &c] {
        assert_conflict(
            s.apply_to(&path, stale, &Transition::Intent(intent(3)))
                .await,
            &format!("stale state at version {:?}", stale.version),
        );
    }
    let now = s.read(&path).await.expect("read");
    assert_eq!(now.book.intent, Some(intent(2)));
}

async fn idempotent_restage(f: Fixture) {
    let (s, path) = (&f.store, unique("restage"));
    rotate(s, &path, &record("key_1"), 1, at(10)).await;
    step(s, &path, Transition::Intent(intent(2))).await;
    let rec = record("key_2");
    let first = step(s, &path, Transition::Stage(rec.clone())).await;
    let second = step(s, &path, Transition::Stage(rec.clone())).await;
    assert_eq!(second.pending.as_ref(), Some(&rec));
    assert_eq!(second.current, first.current);
    assert_eq!(second.book, first.book);
    if f.backend == Backend::Aws {
        assert_eq!(
            second.version, first.version,
            "AWS: re-staging the same key adds no version"
        );
        let n = aws_sdk()
            .await
            .list_secret_version_ids()
            .secret_id(&path)
            .include_deprecated(true)
            .send()
            .await
            .expect("list versions")
            .versions()
            .len();
        assert_eq!(
            n, 3,
            "the placeholder, key_1 and key_2; re-staging added none"
        );
    }
    // Promoting twice is harmless: the second only confirms.
    let p = Transition::Promote {
        key_id: "key_2".into(),
        at: at(20),
        previous_until: None,
    };
    let once = step(s, &path, p.clone()).await;
    let twice = step(
        s,
        &path,
        Transition::Promote {
            key_id: "key_2".into(),
            at: at(99),
            previous_until: None,
        },
    )
    .await;
    assert_eq!(once.current, twice.current);
    assert_eq!(
        twice.book.promoted_at,
        Some(at(20)),
        "the grace clock is not restarted"
    );
    assert_eq!(twice.book.previous_key_id.as_deref(), Some("key_1"));
}

async fn interrupted_stage(f: Fixture) {
    let (s, path) = (&f.store, unique("interrupted"));
    let r1 = record("key_old");
    rotate(s, &path, &r1, 1, at(10)).await;
    step(s, &path, Transition::Intent(intent(2))).await;
    let r2 = record("key_new");
    step(s, &path, Transition::Stage(r2.clone())).await;
    // The process dies here; a new one reads the slot.
    let restarted = f.reopen().await;
    let read = restarted.read(&path).await.expect("read after restart");
    assert_eq!(
        read.current.as_ref(),
        Some(&r1),
        "consumers still read the old key"
    );
    assert_eq!(
        read.pending.as_ref(),
        Some(&r2),
        "the staged key is visible as pending"
    );
    assert_eq!(read.book.intent, Some(intent(2)));
    assert_eq!(read.book.promoted_at, Some(at(10)));
    // ...and can finish the rotation.
    let done = restarted
        .apply(
            &path,
            &read.version,
            &Transition::Promote {
                key_id: "key_new".into(),
                at: at(20),
                previous_until: None,
            },
        )
        .await
        .expect("resume promotion");
    assert_eq!(done.current.as_ref(), Some(&r2));
    assert_eq!(done.book.previous_key_id.as_deref(), Some("key_old"));
}

async fn abandon(f: Fixture) {
    let (s, path) = (&f.store, unique("abandon"));
    let r1 = record("key_keep");
    rotate(s, &path, &r1, 1, at(10)).await;
    step(s, &path, Transition::Intent(intent(2))).await;
    let dropped = record("key_drop");
    step(s, &path, Transition::Stage(dropped.clone())).await;
    let after = step(s, &path, Transition::Abandon).await;
    assert_eq!(after.pending, None);
    assert_eq!(after.book.intent, None);
    assert_eq!(
        after.current.as_ref(),
        Some(&r1),
        "the current record is untouched"
    );
    assert_eq!(after.book.promoted_at, Some(at(10)));
    assert_eq!(s.read(&path).await.expect("read"), after);
    // Abandoning a bootstrap leaves nothing for consumers either.
    let boot = unique("abandon-boot");
    step(s, &boot, Transition::Intent(intent(1))).await;
    step(s, &boot, Transition::Stage(record("key_never"))).await;
    let gone = step(s, &boot, Transition::Abandon).await;
    assert_eq!(
        (gone.current, gone.pending, gone.book.intent),
        (None, None, None)
    );
    // Re-staging an abandoned key works (AWS: the version had lost its label).
    let again = step(s, &path, Transition::Stage(dropped.clone())).await;
    assert_eq!(again.pending.as_ref(), Some(&dropped));
}

async fn retired(f: Fixture) {
    let (s, path) = (&f.store, unique("retired"));
    rotate(s, &path, &record("key_1"), 1, at(10)).await;
    let st = rotate(s, &path, &record("key_2"), 2, at(20)).await;
    assert_eq!(st.book.previous_key_id.as_deref(), Some("key_1"));
    assert_conflict(
        s.apply(
            &path,
            &st.version,
            &Transition::Retired {
                key_id: "key_x".into(),
            },
        )
        .await,
        "retiring a key that is not the previous one",
    );
    let after = step(
        s,
        &path,
        Transition::Retired {
            key_id: "key_1".into(),
        },
    )
    .await;
    assert_eq!(after.book.previous_key_id, None);
    assert_eq!(after.book.previous_service_account_id, None);
    assert_eq!(after.current.map(|c| c.key_id).as_deref(), Some("key_2"));
    assert_eq!(after.book.promoted_at, Some(at(20)));
    // The next rotation makes key_2 the previous key.
    let third = rotate(s, &path, &record("key_3"), 3, at(30)).await;
    assert_eq!(third.book.previous_key_id.as_deref(), Some("key_2"));
}

async fn bad_paths(f: Fixture) {
    for bad in ["", "/abs", "a/../b", "a//b"] {
        let e = f.store.read(bad).await.expect_err(bad);
        assert_eq!(e.kind, StoreErrorKind::InvalidConfig, "{bad:?}: {e}");
        assert!(e.to_string().contains(f.store.name()), "{e}");
    }
}

async fn health(f: Fixture) {
    f.store.health().await.expect("health");
    f.store
        .probe_write(&unique("probe"))
        .await
        .expect("probe_write");
}

/// `suite!(backend)` runs every behaviour above against one backend.
macro_rules! suite {
    ($($module:ident => $backend:expr),* $(,)?) => {$(
        mod $module {
            use super::*;
            async fn fixture() -> Fixture { Fixture::new($backend).await }
            #[tokio::test] async fn bootstrap() { super::bootstrap(fixture().await).await }
            #[tokio::test] async fn second_rotation() { super::second_rotation(fixture().await).await }
            #[tokio::test] async fn previous_deadline() { super::previous_deadline(fixture().await).await }
            #[tokio::test] async fn cas_conflict() { super::cas_conflict(fixture().await).await }
            #[tokio::test] async fn apply_to_conflict() { super::apply_to_conflict(fixture().await).await }
            #[tokio::test] async fn idempotent_restage() { super::idempotent_restage(fixture().await).await }
            #[tokio::test] async fn interrupted_stage() { super::interrupted_stage(fixture().await).await }
            #[tokio::test] async fn abandon() { super::abandon(fixture().await).await }
            #[tokio::test] async fn retired() { super::retired(fixture().await).await }
            #[tokio::test] async fn bad_paths() { super::bad_paths(fixture().await).await }
            #[tokio::test] async fn health() { super::health(fixture().await).await }
        }
    )*};
}

suite! {
    file => Backend::File,
    vault => Backend::Vault,
    aws => Backend::Aws,
}
