//! The WorkQueue: claims as many tasks as online servers have free slots, plus a few ms of work
//! ahead (credit-based, in batches), routes each one, hands it to the server's ClientActor, and
//! records every outcome in the store in batches sent together with its next claim: executed →
//! complete or fail; not delivered → released at once (that server avoided next time);
//! ambiguous → retried with backoff when repeating is safe, else parked in review. It renews its
//! leases every third of a lease, queues due tasks and takes back expired leases (any replica
//! does), and wakes on completions, on a slow poll, and when a queue it found short has work
//! again: a store that can ([`Store::waits_for_claims`], the embedded one) keeps a claim
//! waiting for that queue's tasks and hands them over in the step that makes them ready, before
//! its sync; on another, a doorbell watches the queue's event stream. All its facts live in the
//! shared ledger, so a restarted WorkQueue carries on where the crashed one stopped. The work
//! claimed ahead fills slots as calls finish, even while a round waits for the store.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt;
use mcpq_mcp::Outcome;
use mcpq_queue::{
    Call, Claimed, Completion, Disposition, EventId, EventKind, Failure, QueueName, Release,
    Settled, Store, Task, TaskId, TaskState,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::Value;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use crate::client_actor::{Caller, MAX_RETRY_AFTER};
use crate::config::DispatchConfig;
use crate::routing::{Router, ServerView, Wait, same_servers};
use crate::shared::{Counters, Entry, Phase, Settle, Shared};

/// What a drain achieved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Tasks whose calls finished and were recorded while draining.
    pub finished: usize,
    /// Tasks handed back unfinished when the drain time ran out.
    pub handed_back: usize,
}

/// Messages of the WorkQueue.
#[derive(Debug)]
pub(crate) enum WorkQueueMsg {
    /// Record what finished and claim for the free slots (both at once), then dispatch.
    Pump,
    /// Extend the leases of every held task.
    Renew,
    /// Queue due tasks, take back expired leases, trim.
    Sweep,
    /// Stop claiming; answer when every held task is recorded.
    Drain(RpcReplyPort<DrainReport>),
    /// The drain time is over: hand the rest back.
    DrainDeadline,
    /// Test hook: fail as if a bug struck.
    Crash,
}

pub(crate) struct WorkQueueArgs<S> {
    pub(crate) store: S,
    pub(crate) shared: Arc<Shared>,
    pub(crate) queues: Vec<QueueName>,
    pub(crate) cfg: DispatchConfig,
}

struct Draining {
    reply: RpcReplyPort<DrainReport>,
    report: DrainReport,
}

pub(crate) struct WorkQueueState<S: Store> {
    store: S,
    shared: Arc<Shared>,
    queues: Arc<[QueueName]>,
    cfg: DispatchConfig,
    router: Router,
    rng: StdRng,
    next_queue: usize,
    /// Tasks servers refused undelivered: the last such server (tried elsewhere first), when,
    /// and how many refusals in a row.
    avoid: HashMap<TaskId, (Arc<str>, Instant, u32)>,
    /// Per queue, with a store that cannot wait for claims: the doorbell to arm when a claim
    /// comes up short.
    bells: Vec<Arc<Notify>>,
    /// Per queue, with a store that can: what cancels the claim waiting for its tasks, while
    /// one waits.
    waiters: Vec<Option<Arc<Notify>>>,
    arrivals: Arrivals<S>,
    draining: Option<Draining>,
    /// Drained: never claims again.
    stopped: bool,
    sweeps: u64,
    tasks: Vec<JoinHandle<()>>,
    pace: Pace,
}

/// Tasks to claim: the free slots and `ahead` more, less those parked; none while the parked
/// ones cover half of `ahead`, so claims ahead come in batches of at least the other half.
fn claim_size(free: usize, parked: usize, ahead: usize) -> usize {
    let want = (free + ahead).saturating_sub(parked);
    if want < ahead / 2 { 0 } else { want }
}

/// How fast this replica's calls finish, measured over windows of at least [`Pace::WINDOW`]:
/// what `prefetch_ms` of work is in tasks.
#[derive(Debug)]
struct Pace {
    since: Instant,
    finished: u64,
    per_s: f64,
}

impl Pace {
    const WINDOW: Duration = Duration::from_millis(100);

    fn new() -> Self {
        Self { since: Instant::now(), finished: 0, per_s: 0.0 }
    }

    /// Counts `n` finished calls; past a window, the rate becomes the mean of the last one and
    /// this window's, so a fleet that slows down or stops is seen within a few windows.
    fn record(&mut self, n: usize, now: Instant) {
        self.finished += n as u64;
        let dt = now.duration_since(self.since);
        if dt >= Self::WINDOW {
            let rate = self.finished as f64 / dt.as_secs_f64();
            self.per_s = (self.per_s + rate) / 2.0;
            (self.since, self.finished) = (now, 0);
        }
    }

    /// Calls finished in `ms` at the current rate.
    fn tasks_in(&self, ms: u64) -> usize {
        (self.per_s * ms as f64 / 1000.0) as usize
    }
}

pub(crate) struct WorkQueue<S>(PhantomData<fn() -> S>);

impl<S> WorkQueue<S> {
    pub(crate) fn new() -> Self {
        Self(PhantomData)
    }
}

impl<S: Store> Actor for WorkQueue<S> {
    type Msg = WorkQueueMsg;
    type State = WorkQueueState<S>;
    type Arguments = WorkQueueArgs<S>;

    async fn pre_start(
        &self,
        myself: ActorRef<WorkQueueMsg>,
        args: WorkQueueArgs<S>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let cfg = args.cfg;
        let mut tasks = vec![
            myself.send_interval(Duration::from_millis(cfg.poll_ms), || WorkQueueMsg::Pump),
            myself.send_interval(cfg.lease() / 3, || WorkQueueMsg::Renew),
            myself
                .send_interval(Duration::from_millis(cfg.reap_interval_ms), || WorkQueueMsg::Sweep),
        ];
        let mut bells = Vec::new();
        // a store that waits for claims needs no doorbell: a claim waits in it instead
        let watched = if args.store.waits_for_claims() { &[][..] } else { &args.queues[..] };
        for q in watched {
            let bell = Arc::new(Notify::new());
            tasks.push(tokio::spawn(doorbell(
                args.store.clone(),
                q.clone(),
                bell.clone(),
                myself.clone(),
                Duration::from_millis(cfg.poll_ms),
            )));
            bells.push(bell);
        }
        let n_queues = args.queues.len();
        let arrivals = Arrivals::new(args.store.clone(), args.queues.clone());
        args.shared.set_work_queue(Some(myself.clone()));
        // a predecessor may have crashed with a wake-up in its mailbox
        args.shared.pumped();
        myself.send_message(WorkQueueMsg::Pump)?;
        // a predecessor's leases may be due for renewal now
        myself.send_message(WorkQueueMsg::Renew)?;
        Ok(WorkQueueState {
            store: args.store,
            shared: args.shared,
            queues: args.queues.into(),
            cfg,
            router: Router::default(),
            rng: StdRng::from_os_rng(),
            next_queue: 0,
            avoid: HashMap::new(),
            bells,
            waiters: vec![None; n_queues],
            arrivals,
            draining: None,
            stopped: false,
            sweeps: 0,
            tasks,
            pace: Pace::new(),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<WorkQueueMsg>,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        for t in &st.tasks {
            t.abort();
        }
        st.cancel_waits();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<WorkQueueMsg>,
        msg: WorkQueueMsg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkQueueMsg::Pump => st.pump(&myself).await,
            WorkQueueMsg::Renew => st.renew().await,
            WorkQueueMsg::Sweep => st.sweep().await,
            WorkQueueMsg::Drain(reply) => {
                let n = st.shared.ledger().abandon_parked("shutting down");
                tracing::info!(node = %st.shared.node, parked = n, "draining");
                st.draining = Some(Draining { reply, report: DrainReport::default() });
                st.cancel_waits();
                let wait = Duration::from_millis(st.cfg.drain_timeout_ms);
                myself.send_after(wait, || WorkQueueMsg::DrainDeadline);
                st.pump(&myself).await;
            }
            WorkQueueMsg::DrainDeadline => {
                if let Some(d) = st.draining.as_mut() {
                    d.report.handed_back = st.shared.ledger().abandon_all("shutting down");
                    st.pump(&myself).await;
                }
            }
            WorkQueueMsg::Crash => return Err("injected crash (test hook)".into()),
        }
        Ok(())
    }
}

/// Wakes the WorkQueue when a queue it found empty gets an event that may have made a task
/// ready (enqueued, released, promoted, …; not the starts and finishes the WorkQueue itself
/// writes). Armed by the WorkQueue after a short claim, it reads the queue's events from its
/// own cursor, so an event written between that claim and the arming is not missed; at most
/// one ring per such event. Far behind (a drain went by while it slept), it jumps to the
/// stream's end and rings once: the claim that follows sees whatever came before.
async fn doorbell<S: Store>(
    store: S,
    queue: QueueName,
    bell: Arc<Notify>,
    wq: ActorRef<WorkQueueMsg>,
    poll: Duration,
) {
    const BACKLOG: usize = 1000;
    let mut cursor: Option<Option<EventId>> = None;
    loop {
        tokio::select! {
            _ = bell.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {
                // ractor runs no post_stop after a crash: notice the WorkQueue is gone
                if wq.get_status() == ractor::ActorStatus::Stopped {
                    return;
                }
                continue;
            }
        }
        // armed: until a ring
        loop {
            if wq.get_status() == ractor::ActorStatus::Stopped {
                return;
            }
            let Some(after) = cursor else {
                match store.last_event_id(&queue).await {
                    Ok(end) => cursor = Some(end),
                    // the slow poll covers for the doorbell while the store is away
                    Err(_) => tokio::time::sleep(poll).await,
                }
                // read before the claim this ring causes: nothing falls between them
                if cursor.is_some() {
                    break;
                }
                continue;
            };
            // bounded wait: the slow poll is the backstop, so a ring after at most ~1 s is enough
            match store.read_events(&queue, after, BACKLOG, Some(Duration::from_secs(1))).await {
                Ok(events) if events.len() == BACKLOG => cursor = None,
                Ok(events) => {
                    if let Some(last) = events.last() {
                        cursor = Some(Some(last.id));
                    }
                    if events.iter().any(|e| may_make_work(e.kind)) {
                        break;
                    }
                }
                Err(_) => tokio::time::sleep(poll).await,
            }
        }
        // short claims made while it was armed are covered by the claim this ring causes: a
        // wake-up they left would arm it again at once, to read the stream of a busy queue
        // (every start and finish) until some claim fell short again
        let _ = bell.notified().now_or_never();
        if wq.send_message(WorkQueueMsg::Pump).is_err() {
            return;
        }
    }
}

/// What a claim that waited in the store answered, for the queue of that index.
type Arrival = (usize, mcpq_queue::Result<Vec<Claimed>>);

/// The answers of claims that waited in the store: read by the WorkQueue when a round starts
/// and while a round waits for its writes. What is left unread when it goes (a crash
/// included) is handed back, and a claim that answers after that hands back what it took.
struct Arrivals<S: Store> {
    tx: mpsc::UnboundedSender<Arrival>,
    rx: mpsc::UnboundedReceiver<Arrival>,
    store: S,
    queues: Vec<QueueName>,
}

impl<S: Store> Arrivals<S> {
    fn new(store: S, queues: Vec<QueueName>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self { tx, rx, store, queues }
    }
}

impl<S: Store> Drop for Arrivals<S> {
    fn drop(&mut self) {
        // closed first: an answer sent after this fails, and its sender hands back
        self.rx.close();
        while let Ok((i, got)) = self.rx.try_recv() {
            let Ok(tasks) = got else { continue };
            let (store, queue) = (self.store.clone(), self.queues[i].clone());
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn(async move { hand_back(&store, &queue, tasks).await })),
                Err(_) => tracing::warn!(queue = %queue, tasks = tasks.len(),
                    "tasks claimed for a stopped WorkQueue run again when their lease runs out"),
            }
        }
    }
}

/// How long a claim waits in the store for tasks before it answers that none came (a round
/// then sets another waiting, if its queue is still empty).
const WAIT: Duration = Duration::from_secs(1);

/// Hands back tasks a waiting claim took for a WorkQueue that is gone, without spending an
/// attempt, so they run at once elsewhere rather than when their lease runs out.
async fn hand_back<S: Store>(store: &S, queue: &QueueName, tasks: Vec<Claimed>) {
    if tasks.is_empty() {
        return;
    }
    let items: Vec<Release> = tasks
        .iter()
        .map(|c| Release {
            id: c.task.id,
            token: c.token,
            delay: Duration::ZERO,
            reason: "claimed for a WorkQueue that had stopped".to_owned(),
        })
        .collect();
    if let Err(e) = store.release(queue, &items).await {
        tracing::warn!(queue = %queue, tasks = items.len(), error = %e,
            "could not hand back tasks claimed for a stopped WorkQueue; they run again when their lease runs out");
    }
}

/// Whether an event may have made a task claimable. Starts and finishes cannot: the WorkQueue
/// writes most of them itself.
fn may_make_work(kind: EventKind) -> bool {
    !matches!(
        kind,
        EventKind::TaskStarted
            | EventKind::TaskSucceeded
            | EventKind::TaskFailed
            | EventKind::TaskDead
            | EventKind::TaskReview
            | EventKind::TaskCancelled
    )
}

/// What to write to the store for a finished task.
#[derive(Debug, PartialEq)]
pub(crate) enum Decision {
    Complete { server: String, result: Value },
    Fail { server: String, error: String, disposition: Disposition },
    Release { delay: Duration, reason: String },
}

/// Refusals in a row (not delivered) a task takes before each further one spends an attempt.
const MAX_REFUSALS: u32 = 3;

/// JSON-RPC errors that say the request itself is wrong: repeating it cannot help.
const PERMANENT_CODES: [i64; 4] = [-32600, -32601, -32602, mcpq_mcp::RpcError::INPUT_REQUIRED];

/// Refusals (not delivered) in a row of one task, this one included, and the longest pause
/// put between them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Refused {
    pub(crate) count: u32,
    pub(crate) max_delay: Duration,
}

/// Classifies a finished task. `repeatable`: the task is idempotent or a trusted server marks
/// its tool safe to repeat.
pub(crate) fn decide(
    settle: Settle,
    task: &Task,
    repeatable: bool,
    refused: Refused,
    rng: &mut StdRng,
) -> Decision {
    let retry =
        |rng: &mut StdRng| Disposition::Retry { delay: task.backoff.delay(task.attempt, rng) };
    match settle {
        Settle::Attempt { server, outcome } => {
            let server = server.to_string();
            match outcome {
                Outcome::Executed(Ok(result)) => {
                    if matches!(task.call, Call::Tool { .. })
                        && result.get("isError").and_then(Value::as_bool) == Some(true)
                    {
                        let error = format!("tool reported an error: {}", error_text(&result));
                        Decision::Fail { server, error, disposition: Disposition::Fatal }
                    } else {
                        Decision::Complete { server, result }
                    }
                }
                Outcome::Executed(Err(e)) => {
                    let disposition = if PERMANENT_CODES.contains(&e.code) || !repeatable {
                        Disposition::Fatal
                    } else {
                        retry(rng)
                    };
                    let error = format!("error {} from {server}: {}", e.code, e.message);
                    Decision::Fail { server, error, disposition }
                }
                Outcome::NotDelivered { reason, retry_after } => {
                    let reason = format!("not delivered to {server}: {reason}");
                    let asked = retry_after.unwrap_or(Duration::ZERO).min(MAX_RETRY_AFTER);
                    if refused.count > MAX_REFUSALS {
                        // refused again and again (a 4xx this request keeps getting): spend
                        // attempts, so the task ends dead with the reason instead of looping
                        Decision::Fail { server, error: reason, disposition: retry(rng) }
                    } else if refused.count > 1 {
                        let backoff = Duration::from_millis(50 << refused.count.min(10));
                        Decision::Release {
                            delay: asked.max(backoff.min(refused.max_delay)),
                            reason,
                        }
                    } else {
                        Decision::Release { delay: asked, reason }
                    }
                }
                Outcome::Ambiguous { reason } => {
                    let disposition = if repeatable { retry(rng) } else { Disposition::Review };
                    let error = format!("outcome unknown on {server}: {reason}");
                    Decision::Fail { server, error, disposition }
                }
            }
        }
        Settle::Release { delay, reason } => Decision::Release { delay, reason },
        Settle::Expire { reason } => {
            Decision::Fail { server: String::new(), error: reason, disposition: Disposition::Fatal }
        }
        Settle::Decided(d) => d,
    }
}

/// The first text block of a tool result, cut to 500 characters.
fn error_text(result: &Value) -> String {
    let text = result
        .get("content")
        .and_then(Value::as_array)
        .and_then(|c| c.iter().find_map(|b| b.get("text").and_then(Value::as_str)))
        .unwrap_or("(no text)");
    text.chars().take(500).collect()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// One queue's writes of a settle round, with the ledger entries of their tasks.
#[derive(Default)]
struct Batch {
    complete: Vec<Completion>,
    complete_of: Vec<(TaskId, Entry)>,
    fail: Vec<Failure>,
    fail_of: Vec<(TaskId, Entry)>,
    release: Vec<Release>,
    release_of: Vec<(TaskId, Entry)>,
}

impl Batch {
    /// Room for `n` completions, the usual outcome of a call: pushing them one by one onto
    /// empty vectors would copy each ledger entry several times over.
    fn with_capacity(n: usize) -> Self {
        Self {
            complete: Vec::with_capacity(n),
            complete_of: Vec::with_capacity(n),
            ..Self::default()
        }
    }

    /// One write per kind that has tasks: completions, failures, releases.
    fn into_writes(self, queue: QueueName) -> Vec<Write> {
        let kinds = [
            (Items::Complete(self.complete), self.complete_of),
            (Items::Fail(self.fail), self.fail_of),
            (Items::Release(self.release), self.release_of),
        ];
        kinds
            .into_iter()
            .filter(|(_, entries)| !entries.is_empty())
            .map(|(items, entries)| Write { queue: queue.clone(), items, entries })
            .collect()
    }
}

/// One store write of a settle round: a queue, one kind of write, and the ledger entries of
/// its tasks (put back if the write fails).
struct Write {
    queue: QueueName,
    items: Items,
    entries: Vec<(TaskId, Entry)>,
}

enum Items {
    Complete(Vec<Completion>),
    Fail(Vec<Failure>),
    Release(Vec<Release>),
}

impl Items {
    /// The decisions again, for a write the store did not take.
    fn into_decisions(self) -> Vec<Decision> {
        match self {
            Self::Complete(v) => v
                .into_iter()
                .map(|c| Decision::Complete { server: c.server, result: c.result })
                .collect(),
            Self::Fail(v) => v
                .into_iter()
                .map(|f| Decision::Fail {
                    server: f.server,
                    error: f.error,
                    disposition: f.disposition,
                })
                .collect(),
            Self::Release(v) => v
                .into_iter()
                .map(|r| Decision::Release { delay: r.delay, reason: r.reason })
                .collect(),
        }
    }
}

/// Sends the writes of a round, one after another (they are few: usually one batch of
/// completions), and answers each with what the store said.
async fn write_all<S: Store>(
    store: S,
    writes: Vec<Write>,
) -> Vec<(Write, mcpq_queue::Result<Vec<Settled>>)> {
    let mut out = Vec::with_capacity(writes.len());
    for w in writes {
        let r = match &w.items {
            Items::Complete(v) => store.complete(&w.queue, v).await,
            Items::Fail(v) => store.fail(&w.queue, v).await,
            Items::Release(v) => store.release(&w.queue, v).await,
        };
        out.push((w, r));
    }
    out
}

/// A round's claim: up to `credits` tasks, at most `max_batch` per queue, visiting the queues
/// in turn from `first`. Answers, per queue index, what it took and how many tasks it came up
/// short (a queue whose claim failed is left out), and whether a queue had more than was asked
/// of it.
async fn claim_for<S: Store>(
    store: &S,
    queues: &[QueueName],
    first: usize,
    mut credits: usize,
    max_batch: usize,
    lease: Duration,
) -> (Vec<(usize, Vec<Claimed>, usize)>, bool) {
    let mut out = Vec::new();
    let mut more = false;
    let n = queues.len();
    for k in 0..n {
        if credits == 0 {
            break;
        }
        let i = (first + k) % n;
        let want = credits.min(max_batch);
        let claimed = match store.claim(&queues[i], want, lease).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(queue = %queues[i], error = %e, "claim failed");
                continue;
            }
        };
        credits -= claimed.len().min(credits);
        let short = want - claimed.len().min(want);
        more |= short == 0;
        out.push((i, claimed, short));
    }
    (out, more)
}

impl<S: Store> WorkQueueState<S> {
    /// One round: records what finished and claims for the free slots in one go (the writes
    /// and the claim travel together, so a round waits for one round trip, not two), then
    /// places what came. The claimed tasks are placed as soon as they come, while the writes
    /// may still be on their way: the embedded store answers a claim before the commit its
    /// batch's writes wait for. Slots that free while the round waits for the store take
    /// parked tasks meanwhile, a few finished calls at a time.
    async fn pump(&mut self, myself: &ActorRef<WorkQueueMsg>) {
        self.shared.pumped();
        let stopping = self.stopping();
        let mut settled_here = false;
        while let Ok(a) = self.arrivals.rx.try_recv() {
            settled_here |= self.arrived(a);
        }
        let writes = self.decide_done();
        // tasks parked for a busy server go to the slots that freed before any waiting
        settled_here |= !stopping && self.place();
        let credits = if stopping { 0 } else { self.credits() };
        let mut writes = std::pin::pin!(write_all(self.store.clone(), writes));
        let mut recorded = None;
        let (store, queues) = (self.store.clone(), self.queues.clone());
        let (claimed, more) = {
            let (max_batch, lease) = (self.cfg.max_batch, self.cfg.lease());
            let claim = claim_for(&store, &queues, self.next_queue, credits, max_batch, lease);
            tokio::pin!(claim);
            loop {
                tokio::select! {
                    // the writes go out first, as a producer's would before a claim
                    biased;
                    r = &mut writes, if recorded.is_none() => recorded = Some(r),
                    c = &mut claim => break c,
                    // a call finished: its slot takes a parked task now, not after the claim
                    () = self.shared.woken.notified(), if !stopping => {
                        settled_here |= self.place_free();
                    }
                }
            }
        };
        for (i, tasks, short) in claimed {
            if short > 0 {
                self.watch(i, short);
            }
            settled_here |= self.admit(&queues[i], tasks);
        }
        if !stopping {
            self.next_queue = self.next_queue.wrapping_add(1);
            settled_here |= self.place();
        }
        // what claims waiting in the store take meanwhile is placed at once, not after the
        // writes' sync
        let recorded = match recorded {
            Some(r) => r,
            None => loop {
                tokio::select! {
                    biased;
                    r = &mut writes => break r,
                    // a call finished: its slot takes a parked task now, not after the sync
                    () = self.shared.woken.notified(), if !stopping => {
                        settled_here |= self.place_free();
                    }
                    Some(a) = self.arrivals.rx.recv() => {
                        settled_here |= self.arrived(a);
                        settled_here |= !stopping && self.place();
                    }
                }
            },
        };
        for w in recorded {
            self.recorded(w);
        }
        if stopping {
            if self.shared.ledger().len() == 0
                && self.waiters.iter().all(Option::is_none)
                && let Some(mut d) = self.draining.take()
            {
                self.stopped = true;
                d.report.finished = d.report.finished.saturating_sub(d.report.handed_back);
                tracing::info!(node = %self.shared.node, ?d.report, "drained");
                let _ = d.reply.send(d.report);
            }
            return;
        }
        if more {
            let _ = myself.send_message(WorkQueueMsg::Pump);
        } else if settled_here {
            // expiries and tasks no server can take are recorded by the next round, at once
            self.shared.pump();
        }
    }

    /// Watches queue `i`, whose claim came up `short` tasks short: with a store that waits for
    /// claims, a claim for them waits there (unless one does already) and its answer arrives
    /// through [`Arrivals`]; else the queue's doorbell is armed.
    fn watch(&mut self, i: usize, short: usize) {
        if !self.store.waits_for_claims() {
            self.bells[i].notify_one();
            return;
        }
        if self.waiters[i].is_some() || self.stopping() {
            return;
        }
        let cancel = Arc::new(Notify::new());
        self.waiters[i] = Some(cancel.clone());
        let (store, queue, shared) =
            (self.store.clone(), self.queues[i].clone(), self.shared.clone());
        let (lease, arrivals) = (self.cfg.lease(), self.arrivals.tx.clone());
        tokio::spawn(async move {
            let got = store.claim_waiting(&queue, short, lease, WAIT, cancel.notified()).await;
            match arrivals.send((i, got)) {
                Ok(()) => shared.pump(),
                Err(mpsc::error::SendError((_, Ok(tasks)))) => {
                    hand_back(&store, &queue, tasks).await;
                }
                Err(_) => {}
            }
        });
    }

    /// Cancels the claims waiting for tasks: each answers at once, with what it took.
    fn cancel_waits(&self) {
        for cancel in self.waiters.iter().flatten() {
            cancel.notify_one();
        }
    }

    /// Takes in what a claim that waited took: admitted to be placed (or handed back, when
    /// stopping). Answers whether it finished any (expired ones).
    fn arrived(&mut self, (i, got): Arrival) -> bool {
        self.waiters[i] = None;
        match got {
            Ok(tasks) if !tasks.is_empty() => {
                let mut finished = self.admit(&self.queues[i].clone(), tasks);
                if self.stopping() {
                    finished |= self.shared.ledger().abandon_parked("shutting down") > 0;
                }
                finished
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(queue = %self.queues[i], error = %e, "waiting claim failed");
                false
            }
        }
    }

    /// Free slots on servers that take calls, plus the work claimed ahead (`prefetch_ms`), less
    /// what is parked already; none while a batch of claimed tasks waits for slots (tasks
    /// routed to busy servers must not pile up here), and none while what is parked covers
    /// half the work claimed ahead (claims then come in batches of at least the other half).
    fn credits(&self) -> usize {
        let servers = self.shared.servers();
        let ledger = self.shared.ledger();
        if ledger.parked() >= self.cfg.max_batch {
            return 0;
        }
        let free: u32 = servers
            .iter()
            .filter(|s| s.takes_calls() && self.shared.caller(&s.cfg.name).is_some())
            .map(|s| s.cfg.max_concurrency.saturating_sub(ledger.load(&s.cfg.name)))
            .sum();
        let ahead = self.pace.tasks_in(self.cfg.prefetch_ms).min(self.cfg.max_batch);
        claim_size(free as usize, ledger.parked(), ahead)
    }

    /// Adds claimed tasks to the ledger; answers whether it finished any (expired ones).
    fn admit(&mut self, queue: &QueueName, claimed: Vec<Claimed>) -> bool {
        Counters::add(&self.shared.counters.claimed, claimed.len() as u64);
        let now = now_ms();
        let mut ledger = self.shared.ledger();
        let mut finished = false;
        for c in claimed {
            let id = c.task.id;
            let expired = c.task.is_expired(now);
            ledger.insert(id, Entry::new(queue.clone(), c.task, c.token));
            if expired {
                Counters::add(&self.shared.counters.expired, 1);
                finished |= ledger.finish(
                    id,
                    Settle::Expire { reason: "expired before an attempt could start".to_owned() },
                );
            }
        }
        finished
    }

    /// Routes parked tasks: to a server's actor, back to the store to wait, or left parked
    /// while every server that could take them is busy.
    fn place(&mut self) -> bool {
        self.place_where(false)
    }

    /// [`place`](Self::place), stopping once no server has a free slot: for the calls that
    /// finish while a round waits, each of which frees one.
    fn place_free(&mut self) -> bool {
        self.place_where(true)
    }

    fn place_where(&mut self, only_free: bool) -> bool {
        let servers = self.shared.servers();
        let mut ledger = self.shared.ledger();
        self.shared.placing(ledger.sent());
        if ledger.parked() == 0 {
            return false;
        }
        let mut finished = false;
        let callers: Vec<Option<Arc<Caller>>> =
            servers.iter().map(|s| self.shared.caller(&s.cfg.name)).collect();
        // one view of the fleet for the whole round, kept in step with each dispatch
        let mut views: Vec<ServerView<'_>> = servers
            .iter()
            .zip(&callers)
            .map(|(s, caller)| ServerView {
                name: &s.cfg.name,
                tags: &s.cfg.tags,
                weight: s.cfg.weight,
                in_flight: ledger.load(&s.cfg.name),
                max_concurrency: s.cfg.max_concurrency,
                online: s.takes_calls() && caller.is_some(),
                tools: s.tools.as_ref().map(|t| &t.names),
            })
            .collect();
        let mut free: u32 = views
            .iter()
            .filter(|v| v.online)
            .map(|v| v.max_concurrency.saturating_sub(v.in_flight))
            .sum();
        if only_free && free == 0 {
            return false;
        }
        // copied only once a slot is free: a refill that finds none skips it
        let ids = ledger.parked_ids();
        let now = Instant::now();
        self.avoid.retain(|_, (_, at, _)| now.duration_since(*at) < Duration::from_secs(60));
        let now_ms = now_ms();
        let fallback = self.cfg.strategy;
        // views only fill up as the round goes (nothing below frees a slot or takes a server
        // offline, but for the avoided server's toggle, undone at once): a task that found
        // every server it could go to busy stands for every later one with its route and
        // tool, which waits without a pick
        let mut busy: Vec<Arc<Task>> = Vec::new();
        for id in ids {
            let Some(entry) = ledger.get(&id) else { continue };
            let (task, entry_token, waited) =
                (entry.task.clone(), entry.token, now.duration_since(entry.claimed_at));
            // a server that just refused the task undelivered is tried last
            let avoided = self
                .avoid
                .get(&id)
                .and_then(|(name, _, _)| views.iter().position(|v| v.name == &**name))
                .filter(|&i| views[i].online);
            let pick = if avoided.is_none() && busy.iter().any(|b| same_servers(b, &task)) {
                Err(Wait::AllBusy)
            } else {
                let pick = self.router.pick_avoiding(
                    &task.route,
                    &task.call,
                    &mut views,
                    avoided,
                    fallback,
                    &mut self.rng,
                );
                if pick == Err(Wait::AllBusy) && avoided.is_none() {
                    busy.push(task.clone());
                }
                pick
            };
            match pick {
                Ok(i) => {
                    let Some(caller) = &callers[i] else { continue };
                    // the call waits for the ledger's lock, held here, before it goes out
                    let call = caller.start(&self.shared, task, entry_token);
                    if ledger.send(id, caller.name(), call) {
                        views[i].in_flight += 1;
                        Counters::add(&self.shared.counters.dispatched, 1);
                        free = free.saturating_sub(1);
                        if only_free && free == 0 {
                            break;
                        }
                    }
                }
                // held while a slot may free soon; past wait_ms other replicas get a chance
                Err(Wait::AllBusy) if waited < Duration::from_millis(self.cfg.wait_ms) => {}
                Err(Wait::AllBusy) => {
                    let reason = "every server that can take it stayed busy".to_owned();
                    finished |=
                        ledger.finish(id, Settle::Release { delay: Duration::ZERO, reason });
                }
                Err(why) => {
                    let reason = match (why, &task.route.server, &task.call) {
                        (Wait::PinnedUnavailable, Some(s), _) => {
                            format!("pinned server {s} is unavailable")
                        }
                        _ if !task.route.tags.is_empty() => format!(
                            "no online server with tags {} offers it",
                            task.route.tags.join(",")
                        ),
                        (_, _, Call::Tool { name, .. }) => {
                            format!("no online server offers tool {name}")
                        }
                        _ => "no server can take it".to_owned(),
                    };
                    let settle = if task.is_expired(now_ms) {
                        Counters::add(&self.shared.counters.expired, 1);
                        Settle::Expire { reason: format!("expired waiting: {reason}") }
                    } else {
                        Settle::Release { delay: Duration::from_millis(self.cfg.wait_ms), reason }
                    };
                    finished |= ledger.finish(id, settle);
                }
            }
        }
        finished
    }

    /// Classifies the finished tasks the ledger holds and takes them out of it, as store
    /// writes: one per queue and kind of write.
    fn decide_done(&mut self) -> Vec<Write> {
        let done = self.shared.ledger().take_done();
        // counted every round, so the rate falls while no call finishes
        let calls = done
            .iter()
            .filter(|(_, e)| matches!(e.phase, Phase::Done(Settle::Attempt { .. })))
            .count();
        self.pace.record(calls, Instant::now());
        if done.is_empty() {
            return Vec::new();
        }
        // one batch per queue; a fleet has few queues
        let mut batches: Vec<(QueueName, Batch)> = Vec::new();
        let servers = self.shared.servers();
        let n = done.len();
        for (k, (id, mut entry)) in done.into_iter().enumerate() {
            let Phase::Done(settle) = std::mem::replace(&mut entry.phase, Phase::Parked) else {
                continue;
            };
            let safe = |server: &str| {
                let Call::Tool { name, .. } = &entry.task.call else { return false };
                servers.iter().any(|s| {
                    s.cfg.name == server && s.tools.as_ref().is_some_and(|t| t.safe.contains(name))
                })
            };
            let repeatable = entry.task.idempotent
                || matches!(&settle, Settle::Attempt { server, .. } if safe(server));
            let mut refusals = 0;
            if let Settle::Attempt { server, outcome: Outcome::NotDelivered { .. } } = &settle {
                let e = self.avoid.entry(id).or_insert((server.clone(), Instant::now(), 0));
                e.2 += 1;
                (e.0, e.1, refusals) = (server.clone(), Instant::now(), e.2);
            }
            let token = entry.token;
            let refused =
                Refused { count: refusals, max_delay: Duration::from_millis(self.cfg.wait_ms) };
            let decision = decide(settle, &entry.task, repeatable, refused, &mut self.rng);
            if matches!(decision, Decision::Fail { .. }) {
                self.avoid.remove(&id);
            }
            let i = batches.iter().position(|(q, _)| *q == entry.queue).unwrap_or_else(|| {
                batches.push((entry.queue.clone(), Batch::with_capacity(n - k)));
                batches.len() - 1
            });
            let b = &mut batches[i].1;
            match decision {
                Decision::Complete { server, result } => {
                    b.complete.push(Completion { id, token, server, result });
                    b.complete_of.push((id, entry));
                }
                Decision::Fail { server, error, disposition } => {
                    b.fail.push(Failure { id, token, server, error, disposition });
                    b.fail_of.push((id, entry));
                }
                Decision::Release { delay, reason } => {
                    b.release.push(Release { id, token, delay, reason });
                    b.release_of.push((id, entry));
                }
            }
        }
        batches.into_iter().flat_map(|(queue, b)| b.into_writes(queue)).collect()
    }

    /// Takes in what the store answered to a write. A write that failed puts its tasks back in
    /// the ledger, decided, for the next round.
    fn recorded(&mut self, (w, result): (Write, mcpq_queue::Result<Vec<Settled>>)) {
        let c = &self.shared.counters;
        let queue = &w.queue;
        let released = matches!(w.items, Items::Release(_));
        match result {
            Ok(settled) => {
                if released {
                    Counters::add(&c.released, settled.len() as u64);
                }
                if let Some(d) = self.draining.as_mut() {
                    d.report.finished += settled.len();
                }
                let now_ms = now_ms();
                for ((id, entry), s) in w.entries.iter().zip(settled) {
                    if !matches!(s, Settled::Applied(TaskState::Queued | TaskState::Scheduled)) {
                        self.avoid.remove(id);
                    }
                    if let Settled::Applied(state) = s
                        && !released
                    {
                        c.attempt.record(entry.claimed_at.elapsed());
                        if state.is_terminal() {
                            let ms = now_ms.saturating_sub(entry.task.created_at_ms);
                            c.latency.record(Duration::from_millis(ms));
                        }
                    }
                    match s {
                        Settled::Applied(TaskState::Succeeded) => Counters::add(&c.succeeded, 1),
                        Settled::Applied(TaskState::Failed) => Counters::add(&c.failed, 1),
                        Settled::Applied(TaskState::Dead) => Counters::add(&c.dead, 1),
                        Settled::Applied(TaskState::Review) => Counters::add(&c.review, 1),
                        // a release with a delay lands in scheduled too; only failures retry
                        Settled::Applied(TaskState::Scheduled) if !released => {
                            Counters::add(&c.retried, 1)
                        }
                        Settled::Applied(_) => {}
                        Settled::Rejected(now) => {
                            Counters::add(&c.fenced, 1);
                            tracing::warn!(queue = %queue, task = %id, ?now,
                                "result rejected: the claim is no longer ours (fenced)");
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(queue = %queue, error = %e, tasks = w.entries.len(),
                    "could not record outcomes; keeping them for the next round");
                let back = w
                    .entries
                    .into_iter()
                    .zip(w.items.into_decisions())
                    .map(|((id, mut entry), d)| {
                        entry.phase = Phase::Done(Settle::Decided(d));
                        (id, entry)
                    })
                    .collect();
                self.shared.ledger().restore(back);
            }
        }
    }

    /// Draining or stopped: no more claims, and parked tasks are handed back.
    fn stopping(&self) -> bool {
        self.draining.is_some() || self.stopped
    }

    /// Awaits `call`, a call to the store, placing parked tasks in the slots that free
    /// meanwhile, as a round does while it waits.
    async fn meanwhile<T>(&mut self, call: impl Future<Output = T>) -> T {
        tokio::pin!(call);
        loop {
            tokio::select! {
                biased;
                out = &mut call => return out,
                () = self.shared.woken.notified(), if !self.stopping() => {
                    // expiries and tasks no server can take are recorded by the next round
                    if self.place_free() {
                        self.shared.pump();
                    }
                }
            }
        }
    }

    async fn renew(&mut self) {
        let leases = self.shared.ledger().leases();
        let store = self.store.clone();
        for (queue, items) in leases {
            match self.meanwhile(store.renew(&queue, &items, self.cfg.lease())).await {
                Ok(held) => {
                    let mut ledger = self.shared.ledger();
                    for ((id, token), ok) in items.iter().zip(held) {
                        if !ok && ledger.forget(*id, *token) {
                            Counters::add(&self.shared.counters.fenced, 1);
                            tracing::warn!(queue = %queue, task = %id,
                                "lease lost (another replica took the task, or it was cancelled); call dropped");
                        }
                    }
                }
                Err(e) => tracing::warn!(queue = %queue, error = %e, "renew failed"),
            }
        }
    }

    async fn sweep(&mut self) {
        self.sweeps += 1;
        let mut woke = false;
        let (store, queues) = (self.store.clone(), self.queues.clone());
        for q in queues.iter() {
            match self.meanwhile(store.promote_due(q, 1000)).await {
                Ok(n) => woke |= n > 0,
                Err(e) => tracing::warn!(queue = %q, error = %e, "promote failed"),
            }
            match self.meanwhile(store.reap_expired(q, 1000)).await {
                Ok(n) if n > 0 => {
                    woke = true;
                    tracing::info!(queue = %q, tasks = n, "expired leases taken back");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(queue = %q, error = %e, "reap failed"),
            }
            if self.sweeps.is_multiple_of(60)
                && let Err(e) = self.meanwhile(store.trim(q)).await
            {
                tracing::warn!(queue = %q, error = %e, "trim failed");
            }
        }
        if woke {
            self.shared.pump();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::tests::task;
    use mcpq_mcp::RpcError;
    use serde_json::json;

    fn attempt(outcome: Outcome<Value>) -> Settle {
        Settle::Attempt { server: "a".into(), outcome }
    }

    #[test]
    fn claims_ahead_come_in_batches_of_half_the_work_ahead() {
        // no work ahead: the free slots less what waits parked
        assert_eq!(claim_size(4, 0, 0), 4);
        assert_eq!(claim_size(2, 3, 0), 0);
        // all slots busy: claimed ahead up to the work ahead, then not until half is used
        assert_eq!(claim_size(0, 0, 100), 100);
        assert_eq!(claim_size(0, 60, 100), 0);
        assert_eq!(claim_size(0, 50, 100), 50);
        // free slots are claimed for on top of it
        assert_eq!(claim_size(8, 0, 100), 108);
        assert_eq!(claim_size(8, 50, 100), 58);
        assert_eq!(claim_size(8, 60, 100), 0);
    }

    #[test]
    fn pace_follows_the_rate_calls_finish_at() {
        let t0 = Instant::now();
        let mut p = Pace { since: t0, finished: 0, per_s: 0.0 };
        assert_eq!(p.tasks_in(10), 0);
        // within a window nothing changes yet
        p.record(50, t0 + Duration::from_millis(50));
        assert_eq!(p.tasks_in(1000), 0);
        // 100 calls in 100 ms: 1,000/s, averaged with the 0 before
        p.record(50, t0 + Duration::from_millis(100));
        assert_eq!(p.tasks_in(10), 5);
        p.record(100, t0 + Duration::from_millis(200));
        assert_eq!(p.tasks_in(10), 7);
        // nothing finishes: the rate halves each window
        p.record(0, t0 + Duration::from_millis(300));
        assert_eq!(p.tasks_in(1000), 375);
        p.record(0, t0 + Duration::from_millis(1300));
        assert_eq!(p.tasks_in(1000), 187);
    }

    #[test]
    fn outcomes_map_to_store_writes() {
        let mut rng = StdRng::seed_from_u64(1);
        let first = Refused { count: 1, max_delay: Duration::from_millis(200) };
        let mut d = |s: Settle, idem: bool| decide(s, &task(idem), idem, first, &mut rng);
        assert!(matches!(
            d(attempt(Outcome::Executed(Ok(json!({"content": []})))), false),
            Decision::Complete { .. }
        ));
        let is_error = json!({"isError": true, "content": [{"type": "text", "text": "boom"}]});
        match d(attempt(Outcome::Executed(Ok(is_error))), true) {
            Decision::Fail { error, disposition: Disposition::Fatal, .. } => {
                assert!(error.contains("boom"), "{error}")
            }
            other => panic!("{other:?}"),
        }
        let rpc = |code| Outcome::Executed(Err(RpcError { code, message: "m".into(), data: None }));
        assert!(matches!(
            d(attempt(rpc(-32602)), true),
            Decision::Fail { disposition: Disposition::Fatal, .. }
        ));
        assert!(matches!(
            d(attempt(rpc(-32603)), true),
            Decision::Fail { disposition: Disposition::Retry { .. }, .. }
        ));
        assert!(matches!(
            d(attempt(rpc(-32603)), false),
            Decision::Fail { disposition: Disposition::Fatal, .. }
        ));
        let nd = Outcome::NotDelivered {
            reason: "503".into(),
            retry_after: Some(Duration::from_secs(2)),
        };
        assert_eq!(
            d(attempt(nd), false),
            Decision::Release {
                delay: Duration::from_secs(2),
                reason: "not delivered to a: 503".into()
            }
        );
        let refused = |count| {
            let nd = Outcome::NotDelivered { reason: "400".into(), retry_after: None };
            let r = Refused { count, max_delay: Duration::from_millis(200) };
            decide(attempt(nd), &task(false), false, r, &mut StdRng::seed_from_u64(2))
        };
        assert!(
            matches!(refused(2), Decision::Release { delay, .. } if delay == Duration::from_millis(200))
        );
        assert!(matches!(
            refused(MAX_REFUSALS + 1),
            Decision::Fail { disposition: Disposition::Retry { .. }, .. }
        ));
        let cut = || Outcome::Ambiguous { reason: "cut".into() };
        match d(attempt(cut()), true) {
            Decision::Fail { disposition: Disposition::Retry { delay }, .. } => {
                assert!((50..=100).contains(&delay.as_millis()), "{delay:?}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            d(attempt(cut()), false),
            Decision::Fail { disposition: Disposition::Review, .. }
        ));
        assert!(matches!(
            d(Settle::Expire { reason: "late".into() }, false),
            Decision::Fail { disposition: Disposition::Fatal, .. }
        ));
    }
}
