//! Model-based test of both stores: random operation sequences run against a store (a real
//! redis-server, or the embedded store in a temporary directory) and against an in-memory model
//! of the Lua transitions; after every step both must agree on the answer, on every task's state
//! and attempt, on the counts and on the queue.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::{Debug, Display};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;
use mcpq_queue::{
    CancelOutcome, ClaimToken, Completion, Disposition, EmbeddedStore, Enqueued, Error, Failure,
    NewTask, QueueName, QueueStats, Release, Settled, Store, StoreConfig, TaskId, TaskState,
};
use mcpq_tests::RedisServer;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::json;

// Delays and long leases of an hour never come due within a test, and short leases of 1 ms are
// waited out before every reap: that keeps the model free of clocks.
pub(crate) const HOUR: Duration = Duration::from_secs(3600);
pub(crate) const SHORT_LEASE: Duration = Duration::from_millis(1);
const IDEMPOTENCY_KEYS: [&str; 2] = ["k0", "k1"];

pub(crate) fn config() -> Config {
    Config { cases: 64, failure_persistence: None, max_shrink_iters: 4096, ..Config::default() }
}

pub(crate) fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 1..60)
}

#[test]
fn redis_store_agrees_with_the_model_after_every_step() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let server = RedisServer::start()?;
    let store = rt.block_on(server.store(&[]))?;
    let outcome = TestRunner::new(config()).run(&ops(), |ops| {
        let mut raw = server.raw().map_err(broke)?;
        redis::cmd("FLUSHALL").query::<()>(&mut raw).map_err(broke)?;
        rt.block_on(Run::new(&store, QueueName::default()).all(ops))
    });
    outcome.map_err(|e| anyhow::anyhow!("{e}"))
}

#[test]
fn embedded_store_agrees_with_the_model_after_every_step() -> anyhow::Result<()> {
    embedded_agrees_with_the_model(0)
}

#[test]
fn embedded_store_with_sync_ms_agrees_with_the_model_after_every_step() -> anyhow::Result<()> {
    // commits answered before their sync
    embedded_agrees_with_the_model(1000)
}

fn embedded_agrees_with_the_model(sync_ms: u64) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let dir = tempfile::tempdir()?;
    let cfg = StoreConfig { path: dir.path().join("store"), sync_ms, ..Default::default() };
    let store = EmbeddedStore::open(&cfg, Default::default())?;
    // a queue of its own per case: a queue shares nothing with another
    let case = std::cell::Cell::new(0u64);
    let outcome = TestRunner::new(config()).run(&ops(), |ops| {
        case.set(case.get() + 1);
        let q = QueueName::new(format!("case-{}", case.get())).map_err(broke)?;
        rt.block_on(Run::new(&store, q).all(ops))
    });
    outcome.map_err(|e| anyhow::anyhow!("{e}"))
}

/// What a submission is made of: everything enqueue.lua digests for an idempotency key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Body {
    priority: i32,
    max_attempts: u16,
    idempotent: bool,
    delayed: bool,
    payload: u8,
    key: Option<usize>,
}

impl Body {
    pub(crate) fn task(self, id: TaskId) -> NewTask {
        let mut t = NewTask::tool("echo", json!({ "n": self.payload }))
            .priority(self.priority)
            .max_attempts(self.max_attempts)
            .idempotent(self.idempotent);
        t.id = id;
        if self.delayed {
            t = t.delay(HOUR);
        }
        if let Some(k) = self.key {
            t = t.idempotency_key(IDEMPOTENCY_KEYS[k]);
        }
        t
    }
}

impl Display for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "p{} max{} n{}", self.priority, self.max_attempts, self.payload)?;
        if self.idempotent {
            f.write_str(" idem")?;
        }
        if self.delayed {
            f.write_str(" in-1h")?;
        }
        if let Some(k) = self.key {
            write!(f, " key={}", IDEMPOTENCY_KEYS[k])?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Submit {
    New(Body),
    /// A fresh id with the body of an earlier submission (of this batch or before).
    SameBodyAs(Index),
    /// An earlier submission again, id and all.
    Resend(Index),
}

/// A (task, token) to settle: a running task's current claim, or any claim ever handed out
/// (most of those are stale).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pick {
    pub(crate) running: bool,
    pub(crate) index: Index,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Disp {
    RetryNow,
    RetryLater,
    Fatal,
    Review,
}

impl Disp {
    pub(crate) fn disposition(self) -> Disposition {
        match self {
            Self::RetryNow => Disposition::Retry { delay: Duration::ZERO },
            Self::RetryLater => Disposition::Retry { delay: HOUR },
            Self::Fatal => Disposition::Fatal,
            Self::Review => Disposition::Review,
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Op {
    Enqueue(Vec<Submit>),
    /// `short`: under a 1 ms lease, else an hour.
    Claim {
        max: usize,
        short: bool,
    },
    Complete(Vec<Pick>),
    Fail(Vec<(Pick, Disp)>),
    /// With a delay of an hour when true.
    Release(Vec<(Pick, bool)>),
    Renew(Vec<Pick>),
    /// A task the store holds; `None`: an id it never saw.
    Cancel(Option<Index>),
    Retry(Option<Index>),
    Reap {
        max: usize,
    },
    Promote {
        max: usize,
    },
    Pause(bool),
}

fn body() -> impl Strategy<Value = Body> {
    (
        -2i32..=2,
        1u16..=3,
        any::<bool>(),
        prop::bool::weighted(0.2),
        0u8..2,
        prop::option::weighted(0.4, 0..IDEMPOTENCY_KEYS.len()),
    )
        .prop_map(|(priority, max_attempts, idempotent, delayed, payload, key)| Body {
            priority,
            max_attempts,
            idempotent,
            delayed,
            payload,
            key,
        })
}

fn submit() -> impl Strategy<Value = Submit> {
    prop_oneof![
        6 => body().prop_map(Submit::New),
        2 => any::<Index>().prop_map(Submit::SameBodyAs),
        1 => any::<Index>().prop_map(Submit::Resend),
    ]
}

fn pick() -> impl Strategy<Value = Pick> {
    (prop::bool::weighted(0.7), any::<Index>()).prop_map(|(running, index)| Pick { running, index })
}

fn disp() -> impl Strategy<Value = Disp> {
    prop_oneof![Just(Disp::RetryNow), Just(Disp::RetryLater), Just(Disp::Fatal), Just(Disp::Review)]
}

fn batch<S: Strategy>(item: S) -> impl Strategy<Value = Vec<S::Value>> {
    prop::collection::vec(item, 1..=3)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(submit(), 1..=4).prop_map(Op::Enqueue),
        4 => (1usize..=5, prop::bool::weighted(0.4))
            .prop_map(|(max, short)| Op::Claim { max, short }),
        2 => batch(pick()).prop_map(Op::Complete),
        3 => batch((pick(), disp())).prop_map(Op::Fail),
        2 => batch((pick(), any::<bool>())).prop_map(Op::Release),
        1 => batch(pick()).prop_map(Op::Renew),
        1 => prop::option::weighted(0.9, any::<Index>()).prop_map(Op::Cancel),
        2 => prop::option::weighted(0.9, any::<Index>()).prop_map(Op::Retry),
        2 => (1usize..=4).prop_map(|max| Op::Reap { max }),
        1 => (1usize..=4).prop_map(|max| Op::Promote { max }),
        // resumes outnumber pauses, so most claims meet a running queue
        2 => prop::bool::weighted(0.25).prop_map(Op::Pause),
    ]
}

/// An error answer, comparable.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    NotFound(TaskId),
    InvalidState(TaskState),
    Other(String),
}

pub(crate) fn refused(e: Error) -> Refused {
    match e {
        Error::NotFound(id) => Refused::NotFound(id),
        Error::InvalidState { state } => Refused::InvalidState(state),
        other => Refused::Other(other.to_string()),
    }
}

pub(crate) fn broke(e: impl Into<anyhow::Error>) -> TestCaseError {
    TestCaseError::fail(format!("store error: {:#}", e.into()))
}

/// `t<i>` for the i-th id a test used, for readable traces.
pub(crate) fn name(ids: &[TaskId], id: TaskId) -> String {
    ids.iter().position(|x| *x == id).map_or_else(|| id.to_string(), |i| format!("t{i}"))
}

/// `text` with every known id written as its `t<i>` name.
pub(crate) fn relabel(ids: &[TaskId], text: String) -> String {
    ids.iter().enumerate().fold(text, |s, (i, id)| s.replace(&id.to_string(), &format!("t{i}")))
}

#[derive(Debug)]
struct ModelTask {
    priority: i32,
    max_attempts: u16,
    idempotent: bool,
    state: TaskState,
    attempt: u16,
    claims: u32,
    token: Option<ClaimToken>,
    /// The lease deadline (store clock) while running under a 1 ms lease.
    short_deadline: Option<u64>,
}

/// The queue as the Lua scripts define it, with strict priority (no aging).
#[derive(Default)]
struct Model {
    tasks: HashMap<TaskId, ModelTask>,
    ready: BTreeMap<i32, VecDeque<TaskId>>,
    keys: HashMap<usize, (TaskId, Body)>,
    sent: Vec<(TaskId, Body)>,
    /// Every id the test has used, created or not; `t<index>` in traces.
    ids: Vec<TaskId>,
    claims: Vec<(TaskId, ClaimToken)>,
    paused: bool,
}

impl Model {
    fn learn(&mut self, id: TaskId) {
        if !self.ids.contains(&id) {
            self.ids.push(id);
        }
    }

    fn name(&self, id: TaskId) -> String {
        name(&self.ids, id)
    }

    fn relabel(&self, text: String) -> String {
        relabel(&self.ids, text)
    }

    fn task(&mut self, id: TaskId) -> &mut ModelTask {
        self.tasks.get_mut(&id).expect("the model holds every task it hands out")
    }

    fn enqueue(&mut self, batch: &[(TaskId, Body)]) -> Vec<Enqueued> {
        let mut out = Vec::new();
        for &(id, body) in batch {
            self.sent.push((id, body));
            if self.tasks.contains_key(&id) {
                out.push(Enqueued::Existing(id));
                continue;
            }
            if let Some(k) = body.key {
                if let Some(&(holder, held)) = self.keys.get(&k) {
                    out.push(if held == body {
                        Enqueued::Existing(holder)
                    } else {
                        Enqueued::Conflict(holder)
                    });
                    continue;
                }
                self.keys.insert(k, (id, body));
            }
            let state = if body.delayed {
                TaskState::Scheduled
            } else {
                self.ready.entry(body.priority).or_default().push_back(id);
                TaskState::Queued
            };
            self.tasks.insert(
                id,
                ModelTask {
                    priority: body.priority,
                    max_attempts: body.max_attempts,
                    idempotent: body.idempotent,
                    state,
                    attempt: 0,
                    claims: 0,
                    token: None,
                    short_deadline: None,
                },
            );
            out.push(Enqueued::Created(id));
        }
        out
    }

    /// Claimed ids in order, each with its state, attempt and expected token.
    fn claim(&mut self, max: usize) -> Vec<(TaskId, TaskState, u16, u32)> {
        if self.paused {
            return Vec::new();
        }
        let mut ids = Vec::new();
        for list in self.ready.values_mut().rev() {
            while ids.len() < max
                && let Some(id) = list.pop_front()
            {
                ids.push(id);
            }
        }
        ids.into_iter()
            .map(|id| {
                let t = self.task(id);
                t.state = TaskState::Running;
                t.attempt += 1;
                t.claims += 1;
                (id, t.state, t.attempt, t.claims)
            })
            .collect()
    }

    /// Records what only the store knows: the token it issued and a short lease's deadline.
    fn claimed(&mut self, id: TaskId, token: ClaimToken, short_deadline: Option<u64>) {
        let t = self.task(id);
        t.token = Some(token);
        t.short_deadline = short_deadline;
        self.claims.push((id, token));
    }

    fn pick(&self, p: Pick) -> Option<(TaskId, ClaimToken)> {
        let running: Vec<(TaskId, ClaimToken)> = self
            .ids
            .iter()
            .filter_map(|id| {
                let t = self.tasks.get(id)?;
                Some((*id, t.token?)).filter(|_| t.state == TaskState::Running)
            })
            .collect();
        let pool = if p.running && !running.is_empty() { &running } else { &self.claims };
        (!pool.is_empty()).then(|| pool[p.index.index(pool.len())])
    }

    fn fenced(&self, id: TaskId, token: ClaimToken) -> bool {
        self.tasks
            .get(&id)
            .is_some_and(|t| t.state == TaskState::Running && t.claims == token.get())
    }

    fn rejected(&self, id: TaskId) -> Settled {
        Settled::Rejected(self.tasks.get(&id).map(|t| t.state))
    }

    // Batch items apply in order: each sees what the ones before it did.
    fn complete(&mut self, items: &[(TaskId, ClaimToken)]) -> Vec<Settled> {
        let mut out = Vec::new();
        for &(id, token) in items {
            if !self.fenced(id, token) {
                out.push(self.rejected(id));
                continue;
            }
            let t = self.task(id);
            t.state = TaskState::Succeeded;
            t.short_deadline = None;
            out.push(Settled::Applied(t.state));
        }
        out
    }

    fn fail(&mut self, items: &[(TaskId, ClaimToken, Disp)]) -> Vec<Settled> {
        let mut out = Vec::new();
        for &(id, token, disp) in items {
            if !self.fenced(id, token) {
                out.push(self.rejected(id));
                continue;
            }
            let t = self.task(id);
            let spent = t.attempt >= t.max_attempts;
            let next = match disp {
                Disp::RetryNow | Disp::RetryLater if spent => TaskState::Dead,
                Disp::RetryNow => TaskState::Queued,
                Disp::RetryLater => TaskState::Scheduled,
                Disp::Fatal => TaskState::Failed,
                Disp::Review => TaskState::Review,
            };
            t.state = next;
            t.short_deadline = None;
            let priority = t.priority;
            if next == TaskState::Queued {
                self.ready.entry(priority).or_default().push_back(id);
            }
            out.push(Settled::Applied(next));
        }
        out
    }

    fn release(&mut self, items: &[(TaskId, ClaimToken, bool)]) -> Vec<Settled> {
        let mut out = Vec::new();
        let mut front = Vec::new();
        for &(id, token, delayed) in items {
            if !self.fenced(id, token) {
                out.push(self.rejected(id));
                continue;
            }
            let t = self.task(id);
            t.attempt -= 1;
            t.short_deadline = None;
            t.state = if delayed { TaskState::Scheduled } else { TaskState::Queued };
            if !delayed {
                front.push((t.priority, id));
            }
            out.push(Settled::Applied(t.state));
        }
        self.push_front_block(&front);
        out
    }

    /// Puts tasks at the head of their lists as one block, in the given order (push_ready with
    /// `front`), as release and reap do with a batch.
    fn push_front_block(&mut self, tasks: &[(i32, TaskId)]) {
        for &(priority, id) in tasks.iter().rev() {
            self.ready.entry(priority).or_default().push_front(id);
        }
    }

    fn renew(&mut self, items: &[(TaskId, ClaimToken)]) -> Vec<bool> {
        let mut out = Vec::new();
        for &(id, token) in items {
            let ok = self.fenced(id, token);
            if ok {
                self.task(id).short_deadline = None;
            }
            out.push(ok);
        }
        out
    }

    fn cancel(&mut self, id: TaskId) -> Result<CancelOutcome, Refused> {
        let t = self.tasks.get_mut(&id).ok_or(Refused::NotFound(id))?;
        let was = t.state;
        match was {
            TaskState::Queued | TaskState::Scheduled | TaskState::Running | TaskState::Review => {
                t.state = TaskState::Cancelled;
                t.short_deadline = None;
                if was == TaskState::Queued
                    && let Some(list) = self.ready.get_mut(&t.priority)
                {
                    list.retain(|x| *x != id);
                }
                Ok(CancelOutcome::Cancelled { was })
            }
            _ => Ok(CancelOutcome::AlreadyFinished(was)),
        }
    }

    fn retry(&mut self, id: TaskId) -> Result<TaskState, Refused> {
        let t = self.tasks.get_mut(&id).ok_or(Refused::NotFound(id))?;
        let was = t.state;
        match was {
            TaskState::Review | TaskState::Dead | TaskState::Failed | TaskState::Cancelled => {
                t.state = TaskState::Queued;
                t.attempt = 0;
                self.ready.entry(t.priority).or_default().push_back(id);
                Ok(was)
            }
            state => Err(Refused::InvalidState(state)),
        }
    }

    /// The latest deadline of a running short lease: every reap waits until it has passed.
    fn latest_short_deadline(&self) -> Option<u64> {
        self.tasks
            .values()
            .filter(|t| t.state == TaskState::Running)
            .filter_map(|t| t.short_deadline)
            .max()
    }

    fn reap(&mut self, max: usize) -> u64 {
        // the leases zset's order: deadline, then id bytes
        let mut due: Vec<(u64, TaskId)> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.state == TaskState::Running)
            .filter_map(|(id, t)| Some((t.short_deadline?, *id)))
            .collect();
        due.sort();
        due.truncate(max);
        let mut front = Vec::new();
        for &(_, id) in &due {
            let t = self.task(id);
            t.short_deadline = None;
            t.state = if !t.idempotent {
                TaskState::Review
            } else if t.attempt >= t.max_attempts {
                TaskState::Dead
            } else {
                front.push((t.priority, id));
                TaskState::Queued
            };
        }
        self.push_front_block(&front);
        due.len() as u64
    }

    fn stats(&self) -> QueueStats {
        let mut s = QueueStats { paused: self.paused, ..QueueStats::default() };
        for t in self.tasks.values() {
            *match t.state {
                TaskState::Queued => &mut s.queued,
                TaskState::Scheduled => &mut s.scheduled,
                TaskState::Running => &mut s.running,
                TaskState::Review => &mut s.review,
                TaskState::Succeeded => &mut s.succeeded,
                TaskState::Failed => &mut s.failed,
                TaskState::Dead => &mut s.dead,
                TaskState::Cancelled => &mut s.cancelled,
            } += 1;
        }
        s
    }

    fn queued_order(&self) -> Vec<TaskId> {
        self.ready.values().rev().flatten().copied().collect()
    }
}

/// One test case: the store, the model and a readable trace of the steps so far.
struct Run<'a, S: Store> {
    store: &'a S,
    q: QueueName,
    m: Model,
    trace: Vec<String>,
    last_short_claim: Option<Instant>,
}

impl<'a, S: Store> Run<'a, S> {
    fn new(store: &'a S, q: QueueName) -> Self {
        Self { store, q, m: Model::default(), trace: Vec::new(), last_short_claim: None }
    }

    async fn all(mut self, ops: Vec<Op>) -> Result<(), TestCaseError> {
        for op in ops {
            self.step(op).await?;
            self.check_state().await?;
        }
        Ok(())
    }

    fn agree<T: PartialEq + Debug>(
        &self,
        what: &str,
        store: T,
        model: T,
    ) -> Result<(), TestCaseError> {
        if store == model {
            return Ok(());
        }
        Err(TestCaseError::fail(self.m.relabel(format!(
            "{what}: the store answered {store:?}, the model {model:?}\nsteps:\n  {}",
            self.trace.join("\n  ")
        ))))
    }

    fn note(&mut self, line: String) {
        let line = self.m.relabel(line);
        self.trace.push(line);
    }

    fn token_names(&self, items: impl Iterator<Item = (TaskId, ClaimToken)>) -> String {
        items
            .map(|(id, t)| format!("{}#{}", self.m.name(id), t.get()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    async fn step(&mut self, op: Op) -> Result<(), TestCaseError> {
        let (s, q) = (self.store, &self.q.clone());
        match op {
            Op::Enqueue(submits) => {
                let mut batch: Vec<(TaskId, Body)> = Vec::new();
                for sub in submits {
                    let pool: Vec<(TaskId, Body)> =
                        self.m.sent.iter().chain(&batch).copied().collect();
                    let item = match sub {
                        Submit::New(body) => (TaskId::new(), body),
                        Submit::SameBodyAs(i) if !pool.is_empty() => {
                            (TaskId::new(), pool[i.index(pool.len())].1)
                        }
                        Submit::Resend(i) if !pool.is_empty() => pool[i.index(pool.len())],
                        Submit::SameBodyAs(_) | Submit::Resend(_) => continue,
                    };
                    self.m.learn(item.0);
                    batch.push(item);
                }
                if batch.is_empty() {
                    return Ok(());
                }
                let tasks: Vec<NewTask> = batch.iter().map(|(id, b)| b.task(*id)).collect();
                let desc: Vec<String> =
                    batch.iter().map(|(id, b)| format!("{} {b}", self.m.name(*id))).collect();
                let got = s.enqueue(q, &tasks).await.map_err(broke)?;
                let want = self.m.enqueue(&batch);
                self.note(format!("enqueue [{}] -> {want:?}", desc.join(", ")));
                self.agree("enqueue", got, want)
            }
            Op::Claim { max, short } => {
                let lease = if short { SHORT_LEASE } else { HOUR };
                let got = s.claim(q, max, lease).await.map_err(broke)?;
                if short && !got.is_empty() {
                    self.last_short_claim = Some(Instant::now());
                }
                let want = self.m.claim(max);
                let ids: Vec<TaskId> = want.iter().map(|w| w.0).collect();
                self.note(format!("claim {max} lease {lease:?} -> {ids:?}"));
                let seen: Vec<_> = got
                    .iter()
                    .map(|c| (c.task.id, c.task.state, c.task.attempt, c.token.get()))
                    .collect();
                self.agree("claim (id, state, attempt, token)", seen, want)?;
                for c in &got {
                    self.m.claimed(c.task.id, c.token, short.then_some(c.lease_deadline_ms));
                }
                Ok(())
            }
            Op::Complete(picks) => {
                let items: Vec<_> = picks.iter().filter_map(|p| self.m.pick(*p)).collect();
                if items.is_empty() {
                    return Ok(());
                }
                let done: Vec<Completion> = items
                    .iter()
                    .map(|&(id, token)| Completion {
                        id,
                        token,
                        server: "s1".into(),
                        result: json!({ "ok": true }),
                    })
                    .collect();
                let got = s.complete(q, &done).await.map_err(broke)?;
                let desc = self.token_names(items.iter().copied());
                let want = self.m.complete(&items);
                self.note(format!("complete [{desc}] -> {want:?}"));
                self.agree("complete", got, want)
            }
            Op::Fail(picks) => {
                let items: Vec<_> = picks
                    .iter()
                    .filter_map(|(p, d)| self.m.pick(*p).map(|(id, token)| (id, token, *d)))
                    .collect();
                if items.is_empty() {
                    return Ok(());
                }
                let failures: Vec<Failure> = items
                    .iter()
                    .map(|&(id, token, d)| Failure {
                        id,
                        token,
                        server: "s1".into(),
                        error: "boom".into(),
                        disposition: d.disposition(),
                    })
                    .collect();
                let got = s.fail(q, &failures).await.map_err(broke)?;
                let desc: Vec<String> = items
                    .iter()
                    .map(|&(id, t, d)| format!("{} {d:?}", self.token_names([(id, t)].into_iter())))
                    .collect();
                let want = self.m.fail(&items);
                self.note(format!("fail [{}] -> {want:?}", desc.join(", ")));
                self.agree("fail", got, want)
            }
            Op::Release(picks) => {
                let items: Vec<_> = picks
                    .iter()
                    .filter_map(|(p, d)| self.m.pick(*p).map(|(id, token)| (id, token, *d)))
                    .collect();
                if items.is_empty() {
                    return Ok(());
                }
                let releases: Vec<Release> = items
                    .iter()
                    .map(|&(id, token, delayed)| Release {
                        id,
                        token,
                        delay: if delayed { HOUR } else { Duration::ZERO },
                        reason: "busy".into(),
                    })
                    .collect();
                let got = s.release(q, &releases).await.map_err(broke)?;
                let desc: Vec<String> = items
                    .iter()
                    .map(|&(id, t, delayed)| {
                        let when = if delayed { "in 1h" } else { "now" };
                        format!("{} {when}", self.token_names([(id, t)].into_iter()))
                    })
                    .collect();
                let want = self.m.release(&items);
                self.note(format!("release [{}] -> {want:?}", desc.join(", ")));
                self.agree("release", got, want)
            }
            Op::Renew(picks) => {
                let items: Vec<_> = picks.iter().filter_map(|p| self.m.pick(*p)).collect();
                if items.is_empty() {
                    return Ok(());
                }
                let got = s.renew(q, &items, HOUR).await.map_err(broke)?;
                let desc = self.token_names(items.iter().copied());
                let want = self.m.renew(&items);
                self.note(format!("renew [{desc}] 1h -> {want:?}"));
                self.agree("renew", got, want)
            }
            Op::Cancel(target) => {
                let id = self.target(target);
                let got = s.cancel(q, id).await.map_err(refused);
                let want = self.m.cancel(id);
                self.note(format!("cancel {} -> {want:?}", self.m.name(id)));
                self.agree("cancel", got, want)
            }
            Op::Retry(target) => {
                let id = self.target(target);
                let got = s.retry(q, id).await.map_err(refused);
                let want = self.m.retry(id);
                self.note(format!("retry {} -> {want:?}", self.m.name(id)));
                self.agree("retry", got, want)
            }
            Op::Reap { max } => {
                self.wait_out_short_leases().await?;
                let got = s.reap_expired(q, max).await.map_err(broke)?;
                let want = self.m.reap(max);
                self.note(format!("reap_expired {max} -> {want}"));
                self.agree("reap_expired", got, want)
            }
            Op::Promote { max } => {
                let got = s.promote_due(q, max).await.map_err(broke)?;
                self.note(format!("promote_due {max} -> 0"));
                self.agree("promote_due", got, 0)
            }
            Op::Pause(paused) => {
                s.set_paused(q, paused).await.map_err(broke)?;
                self.m.paused = paused;
                self.note(format!("set_paused {paused}"));
                Ok(())
            }
        }
    }

    fn target(&mut self, target: Option<Index>) -> TaskId {
        let created: Vec<TaskId> =
            self.m.ids.iter().filter(|id| self.m.tasks.contains_key(id)).copied().collect();
        match target {
            Some(i) if !created.is_empty() => created[i.index(created.len())],
            _ => {
                let id = TaskId::new();
                self.m.learn(id);
                id
            }
        }
    }

    /// Waits until every 1 ms lease has certainly ended by the store's clock (the same host's).
    async fn wait_out_short_leases(&self) -> Result<(), TestCaseError> {
        let Some(deadline) = self.m.latest_short_deadline() else { return Ok(()) };
        let give_up = Instant::now() + Duration::from_secs(5);
        loop {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            let settled =
                self.last_short_claim.is_none_or(|at| at.elapsed() >= Duration::from_millis(2));
            if now_ms > deadline && settled {
                return Ok(());
            }
            if Instant::now() > give_up {
                return Err(TestCaseError::fail(format!(
                    "the clock did not pass lease deadline {deadline} (now {now_ms})"
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn check_state(&self) -> Result<(), TestCaseError> {
        let (s, q) = (self.store, &self.q);
        let got = join_all(self.m.ids.iter().map(|id| s.get(q, *id))).await;
        for (id, got) in self.m.ids.iter().zip(got) {
            let got = got.map_err(broke)?.map(|t| (t.state, t.attempt));
            let want = self.m.tasks.get(id).map(|t| (t.state, t.attempt));
            self.agree(&format!("get {} (state, attempt)", self.m.name(*id)), got, want)?;
        }
        let stats = s.stats(q).await.map_err(broke)?;
        self.agree("stats", stats, self.m.stats())?;
        let page = s.list(q, TaskState::Queued, 0, 1000).await.map_err(broke)?;
        let queued: Vec<TaskId> = page.tasks.iter().map(|t| t.id).collect();
        self.agree("queued in claim order", queued, self.m.queued_order())
    }
}
