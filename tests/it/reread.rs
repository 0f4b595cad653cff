//! A slot's run starts from the survey's read of its state record when that state is at
//! rest and its consumer document agrees (DESIGN.md §4, `slot::Seen`): a rotation costs
//! one store read fewer. What another process changes between the survey and the run
//! must still be seen: a document that moved on makes the run read the state again, a
//! state that moved on fails the intent's compare-and-set, and anything the run would
//! do besides a rotation is decided again on states read then. Two engines share the
//! simulator, the file store and OpenBao; engine A's stores hold its run at the first
//! consumer-document read (which only a slot's run makes) while engine B acts.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Semaphore;

use crate::e2e::{Stores, World};
use keyrotd::rotation::{CycleReport, Engine, SlotOutcome};
use keyrotd::sim::{Route, Scenario};
use keyrotd::store::{
    ConsumerDoc, DynStore, Layout, SecretRecord, SecretStore, SlotState, StoreResult, Transition,
    Version,
};

const DAY: Duration = Duration::from_secs(86400);
const HOUR: Duration = Duration::from_secs(3600);

/// Holds every wrapped store's first consumer-document read after `arm` until
/// `release`, and counts state and document reads.
#[derive(Debug)]
struct Gate {
    armed: AtomicBool,
    holding: AtomicU64,
    reached: Semaphore,
    release: Semaphore,
    state_reads: AtomicU64,
    doc_reads: AtomicU64,
}

impl Default for Gate {
    fn default() -> Gate {
        Gate {
            armed: AtomicBool::new(false),
            holding: AtomicU64::new(0),
            reached: Semaphore::new(0),
            release: Semaphore::new(0),
            state_reads: AtomicU64::new(0),
            doc_reads: AtomicU64::new(0),
        }
    }
}

impl Gate {
    fn arm(&self, stores: u64) {
        self.holding.store(stores, SeqCst);
        self.armed.store(true, SeqCst);
    }

    /// Waits until `n` stores are held.
    async fn reached(&self, n: u32) {
        let held = tokio::time::timeout(Duration::from_secs(60), self.reached.acquire_many(n))
            .await
            .expect("engine A's run reaches its stores' documents");
        held.expect("open").forget();
    }

    fn release(&self, n: usize) {
        self.release.add_permits(n);
    }

    fn counts(&self) -> (u64, u64) {
        (self.state_reads.load(SeqCst), self.doc_reads.load(SeqCst))
    }

    fn reset(&self) {
        self.state_reads.store(0, SeqCst);
        self.doc_reads.store(0, SeqCst);
    }
}

#[derive(Debug)]
struct Gated {
    inner: DynStore,
    gate: Arc<Gate>,
}

#[async_trait]
impl SecretStore for Gated {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn layout(&self) -> Layout {
        self.inner.layout()
    }
    fn state_is_compare_and_set(&self) -> bool {
        self.inner.state_is_compare_and_set()
    }
    async fn read(&self, path: &str) -> StoreResult<SlotState> {
        self.gate.state_reads.fetch_add(1, SeqCst);
        self.inner.read(path).await
    }
    async fn apply(
        &self,
        path: &str,
        expected: &Version,
        t: &Transition,
    ) -> StoreResult<SlotState> {
        self.inner.apply(path, expected, t).await
    }
    async fn apply_to(
        &self,
        path: &str,
        current: &SlotState,
        t: &Transition,
    ) -> StoreResult<SlotState> {
        self.inner.apply_to(path, current, t).await
    }
    async fn read_consumer(&self, path: &str) -> StoreResult<ConsumerDoc> {
        self.gate.doc_reads.fetch_add(1, SeqCst);
        let hold = self.gate.armed.load(SeqCst)
            && self
                .gate
                .holding
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok();
        if hold {
            self.gate.reached.add_permits(1);
            self.gate.release.acquire().await.expect("open").forget();
        }
        self.inner.read_consumer(path).await
    }
    async fn write_consumer(
        &self,
        path: &str,
        record: Option<&SecretRecord>,
        expected: &Version,
    ) -> StoreResult<Version> {
        self.inner.write_consumer(path, record, expected).await
    }
    async fn health(&self) -> StoreResult<()> {
        self.inner.health().await
    }
    async fn probe_write(&self, path: &str) -> StoreResult<()> {
        self.inner.probe_write(path).await
    }
    async fn find_by_project(&self, project_id: &str) -> StoreResult<Vec<String>> {
        self.inner.find_by_project(project_id).await
    }
    async fn remove(&self, path: &str, expected: &Version) -> StoreResult<()> {
        self.inner.remove(path, expected).await
    }
}

const STORES: [&str; 2] = ["file", "vault"];

/// One project `prod-orders` with service account `api` (no key yet), the rule writing
/// to the file store and OpenBao; engine B bootstraps it. Returns the world, engine A
/// (its stores gated), its gate, engine B, the slot's path and the first key.
async fn bootstrapped() -> (World, Arc<Engine>, Arc<Gate>, Engine, String, String) {
    let mut w = World::new(Scenario::new(5).projects(0), Stores::All, "").await;
    w.toml = w.toml.replace(
        r#"stores = ["file", "vault", "aws"]"#,
        r#"stores = ["file", "vault"]"#,
    );
    let p = w.sim.add_project("prod-orders");
    w.sim.add_service_account(&p, "api").expect("account");
    let path = format!("{}/prod-orders/api", w.prefix);
    let b = w.engine(false).await;
    done(&b.cycle().await);
    let k1 = served(&b, &path).await;
    let gate = Arc::new(Gate::default());
    let mut a = w.engine(false).await;
    for name in STORES {
        let inner = a.stores[name].clone();
        let gated: DynStore = Arc::new(Gated {
            inner,
            gate: gate.clone(),
        });
        a.stores.insert(name.to_string(), gated);
    }
    (w, Arc::new(a), gate, b, path, k1)
}

fn done(r: &CycleReport) {
    assert!(!r.any_failed(), "{:?}", r.slots);
}

/// The key every store's consumer document serves at `path` (they must agree).
async fn served(e: &Engine, path: &str) -> String {
    let mut keys = Vec::new();
    for name in STORES {
        let doc = e.stores[name].read_consumer(path).await.expect("readable");
        keys.push(doc.record.expect("a document").key_id);
    }
    assert!(keys.windows(2).all(|k| k[0] == k[1]), "{keys:?}");
    keys.remove(0)
}

/// Runs engine A's cycle until both its stores are held at their documents, runs
/// `meanwhile`, then lets A go on; A's report.
async fn a_with_b_between(
    a: &Arc<Engine>,
    gate: &Arc<Gate>,
    meanwhile: impl std::future::Future<Output = ()>,
) -> CycleReport {
    gate.arm(STORES.len() as u64);
    let run = {
        let a = a.clone();
        tokio::spawn(async move { a.cycle().await })
    };
    gate.reached(STORES.len() as u32).await;
    meanwhile.await;
    gate.release(STORES.len());
    tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("engine A finishes")
        .expect("no panic")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotation_starts_from_the_surveys_read_of_a_state_at_rest() {
    let (w, a, gate, _b, path, k1) = bootstrapped().await;
    w.advance(91 * DAY);
    gate.reset();
    let r = a.cycle().await;
    done(&r);
    assert!(
        matches!(&r.slots[0].outcome, Ok(SlotOutcome::Rotated { .. })),
        "{:?}",
        r.slots[0].outcome
    );
    let k2 = served(&a, &path).await;
    assert_ne!(k1, k2);
    let (states, docs) = gate.counts();
    // The survey's read of each state record, the document before the rotation and its
    // read back after (the `served` check above adds one more per store).
    assert_eq!(states, 2, "one state read per store: the survey's");
    assert_eq!(
        docs,
        2 * 2 + 2,
        "documents: before, read back, and the check"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_another_process_rotated_after_the_survey_is_read_again() {
    let (w, a, gate, b, path, k1) = bootstrapped().await;
    w.advance(91 * DAY);
    let minted_before = w.sim.requests_to(Route::CreateServiceAccountKey).len();
    let mut by_b = None;
    let r = a_with_b_between(&a, &gate, async {
        let rb = b.cycle().await;
        done(&rb);
        by_b = Some(rb);
    })
    .await;
    let rb = by_b.unwrap();
    assert!(
        matches!(&rb.slots[0].outcome, Ok(SlotOutcome::Rotated { .. })),
        "B rotated: {:?}",
        rb.slots[0].outcome
    );
    done(&r);
    assert!(
        !matches!(&r.slots[0].outcome, Ok(SlotOutcome::Rotated { .. })),
        "A saw B's rotation and did not rotate again: {:?}",
        r.slots[0].outcome
    );
    let k2 = served(&b, &path).await;
    assert_ne!(k2, k1);
    // A did not write the key its survey saw back over B's.
    assert_eq!(served(&a, &path).await, k2, "consumers keep B's new key");
    for name in STORES {
        let st = b.stores[name]
            .read(&r.slots[0].slot.state_key())
            .await
            .unwrap();
        assert_eq!(st.current.map(|c| c.key_id).as_deref(), Some(k2.as_str()));
        assert_eq!(st.book.previous_key_id.as_deref(), Some(k1.as_str()));
        assert!(st.book.intent.is_none() && st.pending.is_none(), "{name}");
    }
    assert_eq!(
        w.sim.requests_to(Route::CreateServiceAccountKey).len(),
        minted_before + 1,
        "one mint in all: B's"
    );
    assert!(
        w.sim.is_live(&k1),
        "the replaced key is in its grace period"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_previous_key_another_process_retired_after_the_survey_is_revoked_once() {
    let (w, a, gate, b, path, k1) = bootstrapped().await;
    w.advance(91 * DAY);
    done(&b.cycle().await);
    let k2 = served(&b, &path).await;
    w.advance(2 * HOUR);
    // A's survey sees k1 due for retirement; B retires it before A's run goes on.
    let r = a_with_b_between(&a, &gate, async {
        done(&b.cycle().await);
        assert!(!w.sim.is_live(&k1), "B retired the replaced key");
    })
    .await;
    done(&r);
    // A's listing predates B's retirement, so A may ask to delete k1 again (its
    // orphan sweep) and hear 404; only one deletion found the key.
    let deleted: Vec<u16> = w
        .sim
        .requests_to(Route::DeleteApiKey)
        .into_iter()
        .filter(|q| q.path.ends_with(&format!("/{k1}")))
        .map(|q| q.status)
        .collect();
    assert_eq!(
        deleted.iter().filter(|s| **s < 300).count(),
        1,
        "k1 was deleted once, by B: {deleted:?}"
    );
    assert!(deleted.iter().all(|s| *s < 300 || *s == 404), "{deleted:?}");
    assert_eq!(served(&a, &path).await, k2);
    for name in STORES {
        let st = a.stores[name]
            .read(&r.slots[0].slot.state_key())
            .await
            .unwrap();
        assert_eq!(st.current.map(|c| c.key_id).as_deref(), Some(k2.as_str()));
        assert!(st.book.previous_key_id.is_none(), "{name}: k1 forgotten");
    }
}
