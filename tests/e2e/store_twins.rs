//! The two stores side by side: the model test's random operations, applied to a Redis store and
//! to an embedded store alike, on a queue with aging and tasks created over the last 20 seconds.
//! After every step both must have given the same answer and agree on every task's state,
//! attempt, server and error, on the counts, on the queued order and on the events (kind, task,
//! details and place in their entry). This reaches what the model leaves out: aging's merge of
//! the lists, releases and reaps onto the heads under it, and the events themselves.

use std::collections::HashMap;
use std::fmt::Debug;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mcpq_queue::{
    ClaimToken, Completion, EmbeddedStore, Failure, QueueConfig, QueueConfigs, QueueName,
    RedisStore, Release, Store, StoreConfig, TaskId, TaskState,
};
use mcpq_tests::RedisServer;
use proptest::test_runner::{TestCaseError, TestRunner};
use serde_json::json;

use crate::store_conformance::id_created_ago;
use crate::store_model::{
    Body, HOUR, Op, Pick, SHORT_LEASE, Submit, broke, config, name, ops, refused, relabel,
};

#[test]
fn redis_and_embedded_stores_agree_after_every_step() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // every queue ages: the default configuration is the fallback of unnamed queues
    let aged = QueueConfig { aging_ms: 1000, ..Default::default() };
    let server = RedisServer::start()?;
    let redis = rt.block_on(server.store(&[("default", aged.clone())]))?;
    let dir = tempfile::tempdir()?;
    let cfg = StoreConfig { path: dir.path().join("store"), ..Default::default() };
    let local = EmbeddedStore::open(
        &cfg,
        QueueConfigs::new(HashMap::from([(QueueName::default(), aged)])),
    )?;
    // a queue of its own per case, on both: a queue shares nothing with another
    let case = std::cell::Cell::new(0u64);
    let outcome = TestRunner::new(config()).run(&ops(), |ops| {
        case.set(case.get() + 1);
        let q = QueueName::new(format!("case-{}", case.get())).map_err(broke)?;
        rt.block_on(Twins::new(&redis, &local, q).all(ops))
    });
    outcome.map_err(|e| anyhow::anyhow!("{e}"))
}

/// One case: both stores, what the test has handed out, and a trace of the steps.
struct Twins<'a> {
    redis: &'a RedisStore,
    local: &'a EmbeddedStore,
    q: QueueName,
    sent: Vec<(TaskId, Body)>,
    ids: Vec<TaskId>,
    claims: Vec<(TaskId, ClaimToken)>,
    running: Vec<(TaskId, ClaimToken)>,
    short_claimed_at: Option<Instant>,
    events_seen: usize,
    trace: Vec<String>,
}

/// An event as both stores should tell it: all but the entry's time.
type Told =
    (mcpq_queue::EventKind, Option<TaskId>, Option<u16>, Option<String>, Option<String>, u32);

impl<'a> Twins<'a> {
    fn new(redis: &'a RedisStore, local: &'a EmbeddedStore, q: QueueName) -> Self {
        Self {
            redis,
            local,
            q,
            sent: Vec::new(),
            ids: Vec::new(),
            claims: Vec::new(),
            running: Vec::new(),
            short_claimed_at: None,
            events_seen: 0,
            trace: Vec::new(),
        }
    }

    async fn all(mut self, ops: Vec<Op>) -> Result<(), TestCaseError> {
        for op in ops {
            self.step(op).await?;
            self.compare_state().await?;
        }
        Ok(())
    }

    fn name(&self, id: TaskId) -> String {
        name(&self.ids, id)
    }

    fn relabel(&self, text: String) -> String {
        relabel(&self.ids, text)
    }

    fn same<T: PartialEq + Debug>(
        &self,
        what: &str,
        redis: T,
        local: T,
    ) -> Result<(), TestCaseError> {
        if redis == local {
            return Ok(());
        }
        Err(TestCaseError::fail(self.relabel(format!(
            "{what}: Redis answered {redis:?}, the embedded store {local:?}\nsteps:\n  {}",
            self.trace.join("\n  ")
        ))))
    }

    fn pick(&self, p: Pick) -> Option<(TaskId, ClaimToken)> {
        let pool = if p.running && !self.running.is_empty() { &self.running } else { &self.claims };
        (!pool.is_empty()).then(|| pool[p.index.index(pool.len())])
    }

    fn target(&mut self, target: Option<proptest::sample::Index>) -> TaskId {
        match target {
            Some(i) if !self.ids.is_empty() => self.ids[i.index(self.ids.len())],
            _ => TaskId::new(),
        }
    }

    async fn step(&mut self, op: Op) -> Result<(), TestCaseError> {
        let (r, l, q) = (self.redis, self.local, &self.q.clone());
        self.trace.push(self.relabel(format!("{op:?}")));
        match op {
            Op::Enqueue(submits) => {
                let mut batch: Vec<(TaskId, Body)> = Vec::new();
                for sub in submits {
                    let pool: Vec<(TaskId, Body)> =
                        self.sent.iter().chain(&batch).copied().collect();
                    // ages spread over 20 s, deterministic per submission
                    let ago = Duration::from_millis(
                        (self.sent.len() + batch.len()) as u64 * 7919 % 20_000,
                    );
                    let item = match sub {
                        Submit::New(body) => (id_created_ago(ago), body),
                        Submit::SameBodyAs(i) if !pool.is_empty() => {
                            (id_created_ago(ago), pool[i.index(pool.len())].1)
                        }
                        Submit::Resend(i) if !pool.is_empty() => pool[i.index(pool.len())],
                        Submit::SameBodyAs(_) | Submit::Resend(_) => continue,
                    };
                    if !self.ids.contains(&item.0) {
                        self.ids.push(item.0);
                    }
                    batch.push(item);
                }
                if batch.is_empty() {
                    return Ok(());
                }
                self.sent.extend(batch.iter().copied());
                let tasks: Vec<_> = batch.iter().map(|(id, b)| b.task(*id)).collect();
                let a = r.enqueue(q, &tasks).await.map_err(broke)?;
                let b = l.enqueue(q, &tasks).await.map_err(broke)?;
                self.same("enqueue", a, b)
            }
            Op::Claim { max, short } => {
                let lease = if short { SHORT_LEASE } else { HOUR };
                if short {
                    self.next_millisecond().await?;
                }
                let a = r.claim(q, max, lease).await.map_err(broke)?;
                let b = l.claim(q, max, lease).await.map_err(broke)?;
                let seen = |c: &Vec<mcpq_queue::Claimed>| {
                    c.iter()
                        .map(|c| (c.task.id, c.task.state, c.task.attempt, c.token))
                        .collect::<Vec<_>>()
                };
                self.same("claim (id, state, attempt, token)", seen(&a), seen(&b))?;
                if short && !a.is_empty() {
                    self.short_claimed_at = Some(Instant::now());
                    // distinct deadlines per claim call in both stores, so reaps agree on order
                    self.next_millisecond().await?;
                }
                self.claims.extend(a.iter().map(|c| (c.task.id, c.token)));
                Ok(())
            }
            Op::Complete(picks) => {
                let items: Vec<_> = picks.iter().filter_map(|p| self.pick(*p)).collect();
                let done: Vec<Completion> = items
                    .iter()
                    .map(|&(id, token)| Completion {
                        id,
                        token,
                        server: "s1".into(),
                        result: json!({"ok": id.to_string()}),
                    })
                    .collect();
                let a = r.complete(q, &done).await.map_err(broke)?;
                let b = l.complete(q, &done).await.map_err(broke)?;
                self.same("complete", a, b)
            }
            Op::Fail(picks) => {
                let failures: Vec<Failure> = picks
                    .iter()
                    .filter_map(|(p, d)| self.pick(*p).map(|(id, token)| (id, token, *d)))
                    .enumerate()
                    .map(|(i, (id, token, d))| Failure {
                        id,
                        token,
                        server: format!("s{i}"),
                        error: format!("boom {i}"),
                        disposition: d.disposition(),
                    })
                    .collect();
                let a = r.fail(q, &failures).await.map_err(broke)?;
                let b = l.fail(q, &failures).await.map_err(broke)?;
                self.same("fail", a, b)
            }
            Op::Release(picks) => {
                let releases: Vec<Release> = picks
                    .iter()
                    .filter_map(|(p, d)| self.pick(*p).map(|(id, token)| (id, token, *d)))
                    .map(|(id, token, delayed)| Release {
                        id,
                        token,
                        delay: if delayed { HOUR } else { Duration::ZERO },
                        reason: "busy".into(),
                    })
                    .collect();
                let a = r.release(q, &releases).await.map_err(broke)?;
                let b = l.release(q, &releases).await.map_err(broke)?;
                self.same("release", a, b)
            }
            Op::Renew(picks) => {
                let items: Vec<_> = picks.iter().filter_map(|p| self.pick(*p)).collect();
                let a = r.renew(q, &items, HOUR).await.map_err(broke)?;
                let b = l.renew(q, &items, HOUR).await.map_err(broke)?;
                self.same("renew", a, b)
            }
            Op::Cancel(target) => {
                let id = self.target(target);
                let a = r.cancel(q, id).await.map_err(refused);
                let b = l.cancel(q, id).await.map_err(refused);
                self.same("cancel", a, b)
            }
            Op::Retry(target) => {
                let id = self.target(target);
                let a = r.retry(q, id).await.map_err(refused);
                let b = l.retry(q, id).await.map_err(refused);
                self.same("retry", a, b)
            }
            Op::Reap { max } => {
                self.wait_out_short_leases().await?;
                let a = r.reap_expired(q, max).await.map_err(broke)?;
                let b = l.reap_expired(q, max).await.map_err(broke)?;
                self.same("reap_expired", a, b)
            }
            Op::Promote { max } => {
                let a = r.promote_due(q, max).await.map_err(broke)?;
                let b = l.promote_due(q, max).await.map_err(broke)?;
                self.same("promote_due", a, b)
            }
            Op::Pause(paused) => {
                r.set_paused(q, paused).await.map_err(broke)?;
                l.set_paused(q, paused).await.map_err(broke)?;
                Ok(())
            }
        }
    }

    /// Waits (polling the clock, at most a second) until the millisecond has turned.
    async fn next_millisecond(&self) -> Result<(), TestCaseError> {
        let ms = || SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let (start, give_up) = (ms(), Instant::now() + Duration::from_secs(1));
        while ms() <= start {
            if Instant::now() > give_up {
                return Err(TestCaseError::fail("the clock stood still for a second"));
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        Ok(())
    }

    /// Waits until every 1 ms lease has run out by both stores' clock (this host's).
    async fn wait_out_short_leases(&self) -> Result<(), TestCaseError> {
        let Some(at) = self.short_claimed_at else { return Ok(()) };
        let give_up = Instant::now() + Duration::from_secs(5);
        while at.elapsed() < Duration::from_millis(3) {
            if Instant::now() > give_up {
                return Err(TestCaseError::fail("the clock did not move"));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    async fn compare_state(&mut self) -> Result<(), TestCaseError> {
        let (r, l, q) = (self.redis, self.local, &self.q);
        let mut running = Vec::new();
        for &id in &self.ids {
            let view = |t: Option<mcpq_queue::Task>| {
                t.map(|t| {
                    (t.state, t.attempt, t.server, t.error, t.result, t.finished_at_ms.is_some())
                })
            };
            let a = view(r.get(q, id).await.map_err(broke)?);
            let b = view(l.get(q, id).await.map_err(broke)?);
            self.same(
                &format!("get {} (state, attempt, server, error, result, finished)", self.name(id)),
                &a,
                &b,
            )?;
            if a.as_ref().is_some_and(|t| t.0 == TaskState::Running)
                && let Some(&(_, token)) = self.claims.iter().rev().find(|(c, _)| *c == id)
            {
                running.push((id, token));
            }
        }
        self.running = running;
        let (a, b) = (r.stats(q).await.map_err(broke)?, l.stats(q).await.map_err(broke)?);
        self.same("stats", a, b)?;
        let order = |p: mcpq_queue::Page| p.tasks.iter().map(|t| t.id).collect::<Vec<_>>();
        let a = order(r.list(q, TaskState::Queued, 0, 1000).await.map_err(broke)?);
        let b = order(l.list(q, TaskState::Queued, 0, 1000).await.map_err(broke)?);
        self.same("queued in claim order", a, b)?;
        let a = told(r, q).await?;
        let b = told(l, q).await?;
        self.same("events", &a[self.events_seen..], &b[self.events_seen.min(b.len())..])?;
        self.events_seen = a.len();
        Ok(())
    }
}

/// Every event of a queue, as told.
async fn told<S: Store>(s: &S, q: &QueueName) -> Result<Vec<Told>, TestCaseError> {
    let mut out = Vec::new();
    let mut after = None;
    // bounded: a case appends a few hundred events at most
    for _ in 0..1000 {
        let batch = s.read_events(q, after, 1000, None).await.map_err(broke)?;
        let Some(last) = batch.last() else { break };
        after = Some(last.id);
        out.extend(
            batch.into_iter().map(|e| (e.kind, e.task, e.attempt, e.server, e.error, e.id.index)),
        );
    }
    Ok(out)
}
