//! The crash matrix (DESIGN.md §5 "including under kill -9"): the real binary, built with
//! `--features failpoints`, runs `keyrotd once` against the in-process simulator and
//! real stores and is stopped at a step boundary of the rotation (a failpoint calls
//! `abort()`: no destructor, no flush, like SIGKILL), or meets an API or store fault;
//! then it is started again, without failpoints, until nothing is left to do.
//!
//! After every process exit: I1 (each store's `api_key` works, checked continuously
//! during the run too), I2 (every live key keyrotd minted is accounted for: current,
//! pending or previous somewhere — right after a crash, also named by a recorded
//! intent), I3 (each key deleted during the run was a previous key past its grace, a
//! key of keyrotd's own no store served, a stale extra, or on a retired account — never
//! one a store served before or after), I4 (no secret in the output) and, for rows that
//! break a store, I6 (nothing of the slot promoted or revoked).
//!
//! Each row is its own test (`crash::matrix::row_NN_*`); `scripts/crash-matrix` runs them and
//! writes the matrix to `docs/crash-matrix.md`.

/// Without the feature the matrix cannot run: fail loudly rather than skip, like the
/// tests that need the test servers.
#[cfg(not(feature = "failpoints"))]
#[test]
fn crash_matrix() {
    panic!("the crash matrix needs the binary built with failpoints: cargo test --features failpoints (scripts/test does)");
}

#[cfg(feature = "failpoints")]
mod matrix {
    use std::future::Future;
    use std::pin::Pin;
    use std::time::{Duration, Instant};

    use keyrotd::sim::{OwnerRef, RejectVerification, Route};

    use crate::harness::*;
    use StoreKind::{Aws, File, Vault};

    /// One row's report.
    #[derive(Default)]
    struct Report {
        step: String,
        stores: String,
        left: String,
        next: Vec<String>,
        runs: usize,
        polls: usize,
    }

    struct Org {
        prod: String,
        backend: String,
        legacy: String,
    }

    /// `prod-crash` with service accounts `backend` (managed: a stale `legacy` key, a
    /// stale `old-extra`, a fresh `fresh-extra`) and `worker` (not managed, stale key);
    /// a stale user key in `prod-crash`; `staging-crash` with a stale key. Only `backend`
    /// keys may ever be revoked.
    fn standard_org(b: &Bench) -> Org {
        let sim = &b.sim;
        let now = sim.now();
        let prod = sim.add_project("prod-crash");
        let backend = sim.add_service_account(&prod, "backend").unwrap();
        let worker = sim.add_service_account(&prod, "worker").unwrap();
        let sa = |id: &str| OwnerRef::ServiceAccount(id.to_string());
        let legacy = sim
            .add_key_at(
                &prod,
                sa(&backend),
                "legacy",
                now - 200 * DAY,
                Some(now - DAY),
            )
            .unwrap()
            .id;
        sim.add_key_at(
            &prod,
            sa(&backend),
            "old-extra",
            now - 150 * DAY,
            Some(now - 3 * DAY),
        )
        .unwrap();
        sim.add_key_at(
            &prod,
            sa(&backend),
            "fresh-extra",
            now - 10 * DAY,
            Some(now - DAY),
        )
        .unwrap();
        sim.add_key_at(&prod, sa(&worker), "worker-key", now - 300 * DAY, Some(now))
            .unwrap();
        let alice = sim.add_user("Alice Anders", "alice@example.com");
        sim.add_key_at(
            &prod,
            OwnerRef::User(alice),
            "laptop",
            now - 200 * DAY,
            None,
        )
        .unwrap();
        let staging = sim.add_project("staging-crash");
        let st_sa = sim.add_service_account(&staging, "backend").unwrap();
        sim.add_key_at(&staging, sa(&st_sa), "staging-key", now - 200 * DAY, None)
            .unwrap();
        Org {
            prod,
            backend,
            legacy,
        }
    }

    /// How a row starts.
    #[derive(Clone, Copy, PartialEq)]
    enum Start {
        /// The stores already serve `legacy` (stale), promoted long ago.
        Serving,
        /// The stores are empty: the first run bootstraps.
        Empty,
    }

    struct Row {
        bench: Bench,
        org: Org,
        labels: Labels,
        report: Report,
        grace: Duration,
    }

    impl Row {
        async fn new(step: &str, spec: Spec, start: Start) -> Row {
            let grace = spec.policy_duration("grace_period");
            let stores = store_names(&spec.stores);
            let mut bench = Bench::new(spec).await;
            let org = standard_org(&bench);
            bench.register_slots();
            if start == Start::Serving {
                let slot = bench.slots[0].clone();
                bench
                    .seed_current(&slot, &org.legacy, Duration::from_secs(30 * 86400))
                    .await;
            }
            Row {
                bench,
                org,
                labels: Labels::default(),
                report: Report {
                    step: step.to_string(),
                    stores,
                    ..Report::default()
                },
                grace,
            }
        }

        fn ctx(&self) -> Ctx<'_> {
            Ctx {
                bench: &self.bench,
                grace: self.grace,
                max_age: Duration::from_secs(90 * 86400),
            }
        }

        fn path(&self) -> String {
            self.bench.slots[0].path.clone()
        }

        /// A run that sets things up (its story is not part of the report).
        async fn setup_run(&mut self) -> Result<Step, String> {
            let s = step(&self.ctx(), None).await?;
            self.count(&s);
            story(&self.bench, &self.labels, &s.exit);
            if s.exit.code != Some(0) {
                return Err(format!(
                    "set-up run: {}\n{}",
                    s.exit.describe(),
                    s.exit.tail()
                ));
            }
            Ok(s)
        }

        /// The run under test; records what it left behind.
        async fn test_run(&mut self, failpoints: Option<&str>) -> Result<Step, String> {
            let s = step(&self.ctx(), failpoints).await?;
            self.record(&s);
            Ok(s)
        }

        fn count(&mut self, s: &Step) {
            self.report.runs += 1;
            self.report.polls += s.polls;
        }

        /// Notes the state a run left and what it did.
        fn record(&mut self, s: &Step) {
            self.count(s);
            let did = story(&self.bench, &self.labels, &s.exit);
            let mut left = format!(
                "{}; {}",
                s.exit.describe(),
                describe_slot(&self.bench, &self.labels, &s.after, &self.path())
            );
            let unrec = unrecorded(&self.bench, &self.labels, &s.after);
            if !unrec.is_empty() {
                left.push_str(&format!("; live, unrecorded: {}", unrec.join(", ")));
            }
            if !did.is_empty() && !s.exit.crashed() {
                left = format!("{} — did: {}", left, did.join(", "));
            }
            self.report.left = left;
        }

        /// Runs until converged (≤ 8 runs), each checked; notes what they did.
        async fn converge(&mut self) -> Result<(), String> {
            let pause = Duration::from_millis(1100);
            let steps = converge(&self.ctx(), 8, pause).await?;
            for s in &steps {
                self.count(s);
                let did = story(&self.bench, &self.labels, &s.exit);
                self.report.next.extend(did);
            }
            Ok(())
        }

        fn legacy_live(&self) -> bool {
            self.bench.sim.is_live(&self.org.legacy)
        }

        async fn wait_grace(&self) {
            tokio::time::sleep(self.grace + Duration::from_millis(1100)).await;
        }
    }

    fn ensure(cond: bool, msg: impl Into<String>) -> Result<(), String> {
        if cond {
            Ok(())
        } else {
            Err(msg.into())
        }
    }

    fn crashed(s: &Step) -> Result<(), String> {
        ensure(
            s.exit.signal == Some(6),
            format!(
                "expected an abort at the failpoint, got {}:\n{}",
                s.exit.describe(),
                s.exit.tail()
            ),
        )
    }

    fn failed(s: &Step) -> Result<(), String> {
        ensure(
            s.exit.code == Some(1),
            format!(
                "expected exit 1, got {}:\n{}",
                s.exit.describe(),
                s.exit.tail()
            ),
        )
    }

    /// I6: nothing of the slot promoted or revoked.
    fn nothing_promoted_or_revoked(s: &Step) -> Result<(), String> {
        for (k, st) in &s.after {
            let before = s
                .before
                .get(k)
                .and_then(|b| b.current.as_ref())
                .map(|c| &c.key_id);
            ensure(
                st.current.as_ref().map(|c| &c.key_id) == before,
                format!("I6: {k:?} current changed in a failing run"),
            )?;
        }
        ensure(
            s.revoked.is_empty(),
            format!("I6: revoked {:?} in a failing run", s.revoked),
        )
    }

    /// Runs `body` on a fresh row, copying its report out even when it fails.
    async fn with_row<F>(
        out: &mut Report,
        step: &str,
        spec: Spec,
        start: Start,
        body: F,
    ) -> Result<(), String>
    where
        F: for<'a> FnOnce(
            &'a mut Row,
        ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>,
    {
        let mut row = Row::new(step, spec, start).await;
        let r = body(&mut row).await;
        *out = std::mem::take(&mut row.report);
        r
    }

    // ----- the rows -----

    async fn before_intent(out: &mut Report) -> Result<(), String> {
        with_row(
            out,
            "before the intent (`before_intent`)",
            Spec::new(&[File]),
            Start::Serving,
            |r| {
                Box::pin(async move {
                    let s = r.test_run(Some("before_intent=return")).await?;
                    crashed(&s)?;
                    ensure(s.before == s.after, "the stores changed")?;
                    ensure(r.bench.own_live_keys().is_empty(), "a key was minted")?;
                    r.converge().await
                })
            },
        )
        .await
    }

    async fn after_intent(out: &mut Report) -> Result<(), String> {
        with_row(
            out,
            "after the intent, before minting (`after_intent`)",
            Spec::new(&[File, Vault]),
            Start::Serving,
            |r| {
                Box::pin(async move {
                    let s = r.test_run(Some("after_intent=return")).await?;
                    crashed(&s)?;
                    ensure(
                        s.after.values().all(|st| st.book.intent.is_some()),
                        "intent recorded in every store",
                    )?;
                    ensure(r.bench.own_live_keys().is_empty(), "nothing minted")?;
                    r.converge().await
                })
            },
        )
        .await
    }

    async fn dead_owner_after_stage(out: &mut Report) -> Result<(), String> {
        with_row(
            out,
            "killed after staging with a 10-minute lease (`after_stage`): the next run on the same host takes over at once",
            Spec::new(&[File, Vault]).policy("lease", "\"10m\""),
            Start::Serving,
            |r| {
                Box::pin(async move {
                    let s = r.test_run(Some("after_stage=return")).await?;
                    crashed(&s)?;
                    ensure(
                        s.after.values().any(|st| st.pending.is_some()),
                        "a staged key is left behind",
                    )?;
                    // converge() allows a few runs a second apart: far less than the lease.
                    r.converge().await
                })
            },
        )
        .await
    }

    async fn create_lost(out: &mut Report) -> Result<(), String> {
        with_row(
            out,
            "create answered 500 although the key was made (`lose_create_responses`)",
            Spec::new(&[File]),
            Start::Serving,
            |r| {
                Box::pin(async move {
                    r.bench.sim.update_faults(|f| f.lose_create_responses = 1);
                    let s = r.test_run(None).await?;
                    failed(&s)?;
                    ensure(
                    s.revoked.iter().any(|(_, why)| *why == Revoked::Own),
                    "the key whose response was lost is found by name and revoked in the same run",
                )?;
                    ensure(
                        s.after.values().all(|st| st.book.intent.is_none()),
                        "intent cleared",
                    )?;
                    r.converge().await
                })
            },
        )
        .await
    }

    async fn create_lost_then_killed(out: &mut Report) -> Result<(), String> {
        with_row(out, "create response lost (connection dropped), killed before the clean-up revokes (`lose_create_responses` + `before_revoke`)", Spec::new(&[File, Vault]), Start::Serving, |r| {
            Box::pin(async move {
                r.bench.sim.update_faults(|f| {
                    f.lose_create_responses = 1;
                    f.lost_response = keyrotd::sim::LostResponse::Dropped;
                });
                let s = r.test_run(Some("before_revoke=return")).await?;
                crashed(&s)?;
                ensure(unrecorded(&r.bench, &r.labels, &s.after).len() == 1, "one live unrecorded key")?;
                r.converge().await
            })
        })
        .await
    }

    async fn after_mint(out: &mut Report) -> Result<(), String> {
        with_row(
            out,
            "right after the create response (`after_mint`)",
            Spec::new(&[File, Vault, Aws]),
            Start::Serving,
            |r| {
                Box::pin(async move {
                    let s = r.test_run(Some("after_mint=return")).await?;
                    crashed(&s)?;
                    let unrec = unrecorded(&r.bench, &r.labels, &s.after);
                    ensure(
                        unrec.len() == 1,
                        format!("one unrecorded key, found {unrec:?}"),
                    )?;
                    r.converge().await?;
                    Ok(())
                })
            },
        )
        .await
    }

    async fn bootstrap_after_mint(out: &mut Report) -> Result<(), String> {
        with_row(
            out,
            "bootstrap (empty stores), right after the create response (`after_mint`)",
            Spec::new(&[File, Vault, Aws]),
            Start::Empty,
            |r| {
                Box::pin(async move {
                    let s = r.test_run(Some("after_mint=return")).await?;
                    crashed(&s)?;
                    ensure(
                        s.after.values().all(|st| st.current.is_none()),
                        "no store serves anything",
                    )?;
                    r.converge().await
                })
            },
        )
        .await
    }

    async fn store_down_while_staging(out: &mut Report) -> Result<(), String> {
        let proxy = Cutoff::start(socket_of(&env("KEYROTD_TEST_VAULT_ADDR"))).await;
        let mut spec = Spec::new(&[File, Vault]);
        spec.vault_addr_for_binary = Some(proxy.url());
        with_row(
            out,
            "store unreachable while staging (Vault cut off after the file store staged)",
            spec,
            Start::Serving,
            |r| {
                Box::pin(async move {
                    let bench = &r.bench;
                    let key = ("file".to_string(), r.path());
                    let ctx = r.ctx();
                    let s = step_with(
                        &ctx,
                        &["once"],
                        Some("after_stage_one=sleep(3000)"),
                        |_pid| async {
                            let deadline = Instant::now() + Duration::from_secs(20);
                            loop {
                                if let Ok(snap) = bench.snapshot().await {
                                    if snap.get(&key).is_some_and(|st| st.pending.is_some()) {
                                        proxy.cut();
                                        return Ok(());
                                    }
                                }
                                if Instant::now() > deadline {
                                    return Err(
                                        "the file store never held a pending key".to_string()
                                    );
                                }
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        },
                    )
                    .await?;
                    r.record(&s);
                    failed(&s)?;
                    nothing_promoted_or_revoked(&s)?;
                    ensure(
                        s.after[&("vault".to_string(), r.path())].pending.is_none(),
                        "vault holds no pending key",
                    )?;
                    proxy.restore();
                    r.converge().await
                })
            },
        )
        .await
    }

    async fn store_down_from_start(out: &mut Report) -> Result<(), String> {
        let mut spec = Spec::new(&[File, Vault]);
        spec.vault_addr_for_binary = Some(format!("http://127.0.0.1:{}", closed_port()));
        with_row(
            out,
            "store unreachable for a whole run (Vault address on a closed port)",
            spec,
            Start::Serving,
            |r| {
                Box::pin(async move {
                    let s = r.test_run(None).await?;
                    failed(&s)?;
                    nothing_promoted_or_revoked(&s)?;
                    ensure(s.before == s.after, "no store was written")?;
                    ensure(r.bench.own_live_keys().is_empty(), "nothing minted")?;
                    r.bench.rewrite_config(|s| s.vault_addr_for_binary = None);
                    r.converge().await
                })
            },
        )
        .await
    }

    async fn after_stage_one(out: &mut Report) -> Result<(), String> {
        with_row(
            out,
            "staged in the first store only (`after_stage_one`)",
            Spec::new(&[File, Aws]),
            Start::Serving,
            |r| {
                Box::pin(async move {
                    let s = r.test_run(Some("after_stage_one=return")).await?;
                    crashed(&s)?;
                    r.converge().await
                })
            },
        )
        .await
    }

    async fn after_stage(out: &mut Report) -> Result<(), String> {
        with_row(
            out,
            "after staging everywhere, before verifying (`after_stage`)",
            Spec::new(&[File, Vault, Aws]),
            Start::Serving,
            |r| {
                Box::pin(async move {
                    let s = r.test_run(Some("after_stage=return")).await?;
                    crashed(&s)?;
                    ensure(
                        s.after.values().all(|st| st.pending.is_some()),
                        "pending in every store",
                    )?;
                    r.converge().await
                })
            },
        )
        .await
    }

    async fn verification_rejected(out: &mut Report) -> Result<(), String> {
        with_row(
            out,
            "verification rejected (`reject_verification`: every new key 401)",
            Spec::new(&[File, Vault]),
            Start::Serving,
            |r| {
                Box::pin(async move {
                    r.bench
                        .sim
                        .update_faults(|f| f.reject_verification = RejectVerification::Minted);
                    let s = r.test_run(None).await;
                    r.bench
                        .sim
                        .update_faults(|f| f.reject_verification = RejectVerification::None);
                    let s = s?;
                    failed(&s)?;
                    ensure(
                        s.revoked.len() == 1 && s.revoked[0].1 == Revoked::Own,
                        "the unverified key is revoked",
                    )?;
                    for st in s.after.values() {
                        ensure(
                            st.current.as_ref().map(|c| c.key_id.as_str())
                                == Some(r.org.legacy.as_str())
                                && st.pending.is_none()
                                && st.book.intent.is_none(),
                            "nothing promoted, rotation abandoned",
                        )?;
                    }
                    r.converge().await
                })
            },
        )
        .await
    }

    async fn after_verify(out: &mut Report) -> Result<(), String> {
        with_row(
            out,
            "after verifying, before promoting (`after_verify`)",
            Spec::new(&[File, Aws]),
            Start::Serving,
            |r| {
                Box::pin(async move {
                    let s = r.test_run(Some("after_verify=return")).await?;
                    crashed(&s)?;
                    r.converge().await
                })
            },
        )
        .await
    }

    async fn after_publish(out: &mut Report) -> Result<(), String> {
        with_row(
            out,
            "consumer document written, state record not yet (`after_publish`)",
            Spec::new(&[File, Vault]),
            Start::Serving,
            |r| {
                Box::pin(async move {
                    let s = r.test_run(Some("after_publish=return")).await?;
                    crashed(&s)?;
                    let path = r.path();
                    let served = s.after[&("file".to_string(), path.clone())]
                        .current
                        .as_ref()
                        .map(|c| c.key_id.clone());
                    let state = s.after.get(&("file".to_string(), format!("state:{path}")));
                    ensure(
                        state.is_some_and(|st| {
                            st.pending.as_ref().map(|p| p.key_id.clone()) == served
                                && st.current.as_ref().map(|c| c.key_id.clone()) != served
                        }),
                        "the file document serves the new key while the state still says pending",
                    )?;
                    r.converge().await
                })
            },
        )
        .await
    }

    async fn between_promotions(out: &mut Report) -> Result<(), String> {
        with_row(
            out,
            "promoted in Vault, not yet in AWS (`after_promote_one`)",
            Spec::new(&[Vault, Aws]),
            Start::Serving,
            |r| {
                Box::pin(async move {
                    let s = r.test_run(Some("after_promote_one=return")).await?;
                    crashed(&s)?;
                    let cur = |store: &str| {
                        s.after[&(store.to_string(), r.path())]
                            .current
                            .as_ref()
                            .map(|c| c.key_id.clone())
                    };
                    ensure(
                        cur("vault") != cur("aws"),
                        "the stores disagree right after the crash",
                    )?;
                    r.converge().await
                })
            },
        )
        .await
    }

    async fn between_aws_label_moves(out: &mut Report) -> Result<(), String> {
        with_row(out, "between the AWS label moves: AWSCURRENT moved, AWSPENDING and tags not (`aws_between_label_moves`)", Spec::new(&[File, Aws]), Start::Serving, |r| {
            Box::pin(async move {
                let s = r.test_run(Some("aws_between_label_moves=return")).await?;
                crashed(&s)?;
                r.converge().await
            })
        })
        .await
    }

    async fn during_grace(out: &mut Report) -> Result<(), String> {
        let spec = Spec::new(&[File])
            .policy("grace_period", "\"6s\"")
            .daemon("schedule", "\"* * * * * *\"");
        with_row(
            out,
            "during the grace period (`keyrotd run` killed with SIGKILL)",
            spec,
            Start::Serving,
            |r| {
                Box::pin(async move {
                    r.setup_run().await?;
                    let ctx = r.ctx();
                    let s = step_with(&ctx, &["run"], None, |pid| async move {
                        tokio::time::sleep(Duration::from_millis(2000)).await;
                        signal(pid, "KILL");
                        Ok(())
                    })
                    .await?;
                    r.record(&s);
                    ensure(s.exit.signal == Some(9), "killed")?;
                    ensure(
                        r.legacy_live(),
                        "the previous key survives the kill inside its grace period",
                    )?;
                    let s = step(&r.ctx(), None).await?;
                    r.count(&s);
                    story(&r.bench, &r.labels, &s.exit);
                    let promoted = s
                        .after
                        .values()
                        .filter_map(|st| st.book.promoted_at)
                        .max()
                        .unwrap();
                    let in_grace = chrono::Utc::now() < promoted + chrono::Duration::seconds(6);
                    if in_grace {
                        ensure(
                            r.legacy_live(),
                            "a restart inside the grace period keeps the previous key",
                        )?;
                    }
                    r.converge().await?;
                    ensure(
                        !r.legacy_live(),
                        "the previous key is revoked after its grace period",
                    )
                })
            },
        )
        .await
    }

    async fn before_revoke(out: &mut Report) -> Result<(), String> {
        with_row(
            out,
            "before the delete of the previous key (`before_revoke`)",
            Spec::new(&[File]),
            Start::Serving,
            |r| {
                Box::pin(async move {
                    r.setup_run().await?;
                    r.wait_grace().await;
                    let s = r.test_run(Some("before_revoke=return")).await?;
                    crashed(&s)?;
                    ensure(r.legacy_live(), "not deleted yet")?;
                    r.converge().await
                })
            },
        )
        .await
    }

    async fn after_revoke(out: &mut Report) -> Result<(), String> {
        with_row(
            out,
            "after the delete, before it is recorded (`after_revoke`)",
            Spec::new(&[File, Vault]),
            Start::Serving,
            |r| {
                Box::pin(async move {
                    r.setup_run().await?;
                    r.wait_grace().await;
                    let s = r.test_run(Some("after_revoke=return")).await?;
                    crashed(&s)?;
                    ensure(!r.legacy_live(), "the previous key is gone")?;
                    ensure(
                        s.after.values().all(|st| {
                            st.book.previous_key_id.as_deref() == Some(r.org.legacy.as_str())
                        }),
                        "its retirement is not recorded yet",
                    )?;
                    r.converge().await
                })
            },
        )
        .await
    }

    async fn delete_throttled(out: &mut Report, status: u16) -> Result<(), String> {
        let what = if status == 429 { "429" } else { "503" };
        with_row(
            out,
            &format!("delete of the previous key answered {what}, beyond the retries"),
            Spec::new(&[File]),
            Start::Serving,
            |r| {
                Box::pin(async move {
                    r.setup_run().await?;
                    r.wait_grace().await;
                    r.bench.sim.update_faults(|f| {
                        *f = std::mem::take(f).fail_next(Route::DeleteApiKey, status, 3);
                    });
                    let s = r.test_run(None).await?;
                    failed(&s)?;
                    ensure(r.legacy_live(), "still live")?;
                    ensure(
                        s.after.values().all(|st| {
                            st.book.previous_key_id.as_deref() == Some(r.org.legacy.as_str())
                        }),
                        "still recorded as the previous key",
                    )?;
                    r.converge().await
                })
            },
        )
        .await
    }

    async fn delete_429(out: &mut Report) -> Result<(), String> {
        delete_throttled(out, 429).await
    }

    async fn delete_503(out: &mut Report) -> Result<(), String> {
        delete_throttled(out, 503).await
    }

    /// Deleting a slot's old service account takes every key on it; keyrotd does that
    /// only once the keys it did not mint are stale (I3), so the rows that end with the
    /// deletion start without the fresh extra key (tests/rotation.rs covers the
    /// deferral).
    fn drop_fresh_extra(r: &Row) {
        for k in r.bench.sim.keys(&r.org.prod) {
            if k.name == "fresh-extra" {
                r.bench.sim.delete_key(&k.id);
            }
        }
    }

    async fn sa_key_delete_refused(out: &mut Report) -> Result<(), String> {
        with_row(out, "service-account key deletion refused (`refuse_sa_key_delete`): fallback to a new service account", Spec::new(&[File, Vault]), Start::Serving, |r| {
            Box::pin(async move {
                r.bench.sim.update_faults(|f| f.refuse_sa_key_delete = true);
                drop_fresh_extra(r);
                r.setup_run().await?;
                r.wait_grace().await;
                let s = r.test_run(None).await?;
                ensure(s.exit.code == Some(0), format!("fallback run: {}", s.exit.describe()))?;
                r.converge().await?;
                let accounts = r.bench.sim.service_accounts(&r.org.prod);
                ensure(
                    !accounts.iter().any(|a| a.id == r.org.backend),
                    "the old service account is deleted",
                )?;
                ensure(
                    accounts.iter().filter(|a| a.name == "backend").count() == 1,
                    "one `backend` account serves the slot",
                )
            })
        })
        .await
    }

    async fn new_account_after_mint(out: &mut Report) -> Result<(), String> {
        let spec = Spec::new(&[File]).strategy("new_service_account");
        with_row(
            out,
            "strategy new_service_account, killed after the account was created (`after_mint`)",
            spec,
            Start::Serving,
            |r| {
                Box::pin(async move {
                    drop_fresh_extra(r);
                    let s = r.test_run(Some("after_mint=return")).await?;
                    crashed(&s)?;
                    ensure(
                        r.bench
                            .sim
                            .service_accounts(&r.org.prod)
                            .iter()
                            .filter(|a| a.name == "backend")
                            .count()
                            == 2,
                        "a second `backend` account exists, unrecorded",
                    )?;
                    r.converge().await?;
                    let accounts = r.bench.sim.service_accounts(&r.org.prod);
                    ensure(
                        accounts.iter().filter(|a| a.name == "backend").count() == 1,
                        format!("one `backend` account left: {accounts:?}"),
                    )
                })
            },
        )
        .await
    }

    async fn orphan_on_page_two(out: &mut Report) -> Result<(), String> {
        let mut bench = Bench::new(Spec::new(&[File])).await;
        let sim = &bench.sim;
        let now = sim.now();
        let prod = sim.add_project("prod-bulk");
        let backend = sim.add_service_account(&prod, "backend").unwrap();
        let mut first = String::new();
        let mut orphan = String::new();
        for i in 0..120 {
            let (name, age) = if i == 110 {
                ("keyrotd-20250101T000000Z-dead".to_string(), 2 * DAY)
            } else {
                (format!("bulk-{i:03}"), 5 * DAY)
            };
            let k = sim
                .add_key_at(
                    &prod,
                    OwnerRef::ServiceAccount(backend.clone()),
                    &name,
                    now - age,
                    None,
                )
                .unwrap();
            if i == 0 {
                first = k.id.clone();
            }
            if i == 110 {
                orphan = k.id;
            }
        }
        bench.register_slots();
        let slot = bench.slots[0].clone();
        bench
            .seed_current(&slot, &first, Duration::from_secs(86400))
            .await;
        let mut row = Row {
            org: Org {
                prod,
                backend,
                legacy: first,
            },
            bench,
            labels: Labels::default(),
            report: Report {
                step: "an orphan `keyrotd-*` key at position 111 of 120 (page 2), killed before its delete (`before_revoke`)".into(),
                stores: "file".into(),
                ..Report::default()
            },
            grace: Duration::from_secs(2),
        };
        let r = async {
            let s = row.test_run(Some("before_revoke=return")).await?;
            crashed(&s)?;
            ensure(row.bench.sim.is_live(&orphan), "orphan not deleted yet")?;
            row.converge().await?;
            ensure(
                !row.bench.sim.is_live(&orphan),
                "the orphan on page 2 is revoked",
            )?;
            ensure(
                row.bench.sim.deleted_keys() == vec![orphan.clone()],
                "nothing but the orphan was revoked",
            )?;
            ensure(
                row.bench
                    .sim
                    .requests_to(Route::ListApiKeys)
                    .iter()
                    .any(|q| q.query.contains("after=")),
                "the key list was paged",
            )
        }
        .await;
        *out = std::mem::take(&mut row.report);
        r
    }

    /// Runs one row and prints its line of the matrix. With `KEYROTD_CRASH_MATRIX_DIR`
    /// set (`scripts/crash-matrix` sets it), a passing row also writes its line there,
    /// as `NN.md`, beside the matrix's head, for the script to assemble
    /// `docs/crash-matrix.md`; `cargo test` alone never writes into the source tree.
    async fn run_row<F>(number: usize, body: F)
    where
        F: for<'a> FnOnce(
            &'a mut Report,
        ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>,
    {
        require_failpoints_binary();
        let started = Instant::now();
        let mut report = Report::default();
        let res = body(&mut report).await;
        let line = format!(
            "| {number} | {} | {} | {} | {} | {} |\n",
            cell(&report.step),
            cell(&report.stores),
            cell(&report.left),
            cell(&report.next.join(" → ")),
            if res.is_ok() { "pass" } else { "**FAIL**" }
        );
        println!("{MATRIX_COLUMNS}{line}");
        println!(
            "row {number}: {:.1}s, {} keyrotd runs, {} store polls while running",
            started.elapsed().as_secs_f64(),
            report.runs,
            report.polls
        );
        if let Err(e) = &res {
            panic!("row {number} ({}): {e}", report.step);
        }
        if let Some(dir) = std::env::var_os("KEYROTD_CRASH_MATRIX_DIR") {
            let dir = std::path::Path::new(&dir);
            std::fs::create_dir_all(dir).expect("create KEYROTD_CRASH_MATRIX_DIR");
            std::fs::write(
                dir.join("head.md"),
                format!("{MATRIX_HEAD}{MATRIX_COLUMNS}"),
            )
            .expect("write the matrix head");
            std::fs::write(dir.join(format!("{number:02}.md")), line).expect("write the row");
        }
    }

    /// One test per row, numbered as in `docs/crash-matrix.md`: `cargo test
    /// --features failpoints --test it crash::matrix::row_07` runs one.
    macro_rules! rows {
        ($($test:ident => $number:literal $row:ident,)*) => {$(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                run_row($number, |r| Box::pin($row(r))).await;
            }
        )*};
    }

    rows! {
        row_01_before_intent => 1 before_intent,
        row_02_after_intent => 2 after_intent,
        row_03_create_lost => 3 create_lost,
        row_04_create_lost_then_killed => 4 create_lost_then_killed,
        row_05_after_mint => 5 after_mint,
        row_06_bootstrap_after_mint => 6 bootstrap_after_mint,
        row_07_store_down_from_start => 7 store_down_from_start,
        row_08_store_down_while_staging => 8 store_down_while_staging,
        row_09_after_stage_one => 9 after_stage_one,
        row_10_after_stage => 10 after_stage,
        row_11_verification_rejected => 11 verification_rejected,
        row_12_after_verify => 12 after_verify,
        row_13_between_promotions => 13 between_promotions,
        row_14_between_aws_label_moves => 14 between_aws_label_moves,
        row_15_during_grace => 15 during_grace,
        row_16_before_revoke => 16 before_revoke,
        row_17_after_revoke => 17 after_revoke,
        row_18_delete_429 => 18 delete_429,
        row_19_delete_503 => 19 delete_503,
        row_20_sa_key_delete_refused => 20 sa_key_delete_refused,
        row_21_new_account_after_mint => 21 new_account_after_mint,
        row_22_orphan_on_page_two => 22 orphan_on_page_two,
        row_23_after_publish => 23 after_publish,
        row_24_dead_owner_after_stage => 24 dead_owner_after_stage,
    }

    fn cell(s: &str) -> String {
        s.replace('|', "\\|").replace('\n', " ")
    }

    const MATRIX_HEAD: &str = "# Crash matrix

Generated by `scripts/crash-matrix` from the rows of `tests/it/crash.rs`, one test each
(`cargo test --features failpoints --test it crash::` runs them; `crash::matrix::row_07` one). Each row runs the real `keyrotd once`
(built with `--features failpoints`) against the in-process simulator and the named
real stores (file; OpenBao for `vault`; moto for `aws`), stops it where the row says
(a failpoint calls `abort()`, which skips every destructor like SIGKILL) or injects the
fault, then runs `keyrotd once` again, without failpoints, until nothing is left to do
(at most 8 runs, 1.1 s apart; lease 1 s, grace period 2 s unless the row says).

The organization: `prod-crash` with service account `backend` (managed by the rule:
keys `legacy` (stale), `old-extra` (stale), `fresh-extra`) and `worker` (not managed),
a stale user key, and `staging-crash` (not managed). Unless the row says *bootstrap*,
the stores start out serving `legacy`. K1, K2, ... are keys keyrotd minted, in order.

Checked after **every** process exit, and I1 also continuously while it runs (every
store polled every 20 ms): **I1** every `api_key` a store serves is live and accepted
by `GET /models`; **I2** every live key keyrotd minted is current, pending or previous
in a store (right after a crash: or named by a recorded intent, which the next run
cleans up); **I3** every key deleted during the run was a previous key past its grace
period, keyrotd's own key that no store served, a stale extra key on the managed
account, or a key of a retired service account, and never a key a store served before
or after the run; **I4** no key value or admin key in the output (store tokens:
`tests/it/hygiene.rs`); **I6**
for the store-failure rows: nothing promoted or revoked in the failing run.
*Converged* means: every store of the slot serves the same key, nothing pending, no
intent, no previous key, no live minted key besides it, no stale key left on `backend`.

";

    const MATRIX_COLUMNS: &str = "| # | where it stops / what fails | stores | state left behind | what the next runs did, until converged | result |
|---|---|---|---|---|---|
";
}
