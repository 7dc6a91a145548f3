//! What the actors share and what outlives any one of them: the ledger of claimed tasks, the
//! server table (health, availability, tools) and the current actor refs. An actor that
//! crashes and is restarted finds everything here, so a crash loses no task: messages between
//! actors are only wake-ups, the facts live in these tables. Locks are plain mutexes, held
//! for a few lookups and never across an await; the lock order is servers, then ledger.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use mcpq_mcp::{Outcome, ServerConfig};
use mcpq_queue::{ClaimToken, QueueName, Task, TaskId};
use ractor::ActorRef;
use rustc_hash::{FxHashMap, FxHashSet};
use serde_json::Value;
use tokio::sync::{Notify, broadcast};
use tokio::task::AbortHandle;

use crate::client_actor::{Caller, ClientMsg};
use crate::health::HealthMsg;
use crate::work_queue::{Decision, WorkQueueMsg};

/// A server's health as the HealthMonitor sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Answering.
    Online,
    /// Failing, still used.
    Degraded,
    /// Not used; its tasks were handed to other servers.
    Offline,
}

impl Health {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Degraded => "degraded",
            Self::Offline => "offline",
        }
    }
}

/// The tools a server listed.
#[derive(Debug, Default)]
pub(crate) struct Tools {
    pub(crate) names: FxHashSet<String>,
    /// Tools whose annotations say a repeat is harmless (`idempotentHint` or `readOnlyHint`);
    /// filled only for servers marked `trusted`.
    pub(crate) safe: FxHashSet<String>,
}

/// One row of the server table.
#[derive(Debug)]
pub(crate) struct ServerInfo {
    pub(crate) cfg: Arc<ServerConfig>,
    pub(crate) health: Health,
    /// Consecutive failed probes and calls.
    pub(crate) failures: u32,
    /// False while its breaker is open or a `Retry-After` pauses it.
    pub(crate) available: bool,
    pub(crate) tools: Option<Arc<Tools>>,
    pub(crate) era: Option<String>,
}

impl ServerInfo {
    /// Not offline, breaker closed and not paused: calls may be routed here (if its
    /// ClientActor runs).
    pub(crate) fn takes_calls(&self) -> bool {
        self.health != Health::Offline && self.available
    }

    pub(crate) fn new(cfg: ServerConfig) -> Self {
        Self {
            cfg: Arc::new(cfg),
            health: Health::Online,
            failures: 0,
            available: true,
            tools: None,
            era: None,
        }
    }
}

/// What a finished entry asks the WorkQueue to record.
#[derive(Debug)]
pub(crate) enum Settle {
    /// The attempt ran (or tried to) on `server`.
    Attempt { server: Arc<str>, outcome: Outcome<Value> },
    /// Hand back without an attempt (no server can take it now, or shutting down).
    Release { delay: Duration, reason: String },
    /// Fail for good without an attempt.
    Expire { reason: String },
    /// Already classified; the store could not take it last time.
    Decided(Decision),
}

#[derive(Debug)]
pub(crate) enum Phase {
    /// Claimed, waiting for a free slot on a server that can take it.
    Parked,
    /// Its call is spawned for `server` but the request has not gone out (a rate limit may
    /// hold it): taken away now, it was not delivered.
    Sent { server: Arc<str>, abort: AbortHandle },
    /// The call runs.
    Calling { server: Arc<str>, abort: AbortHandle },
    /// Finished; waiting to be recorded in the store.
    Done(Settle),
}

/// A claimed task.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) queue: QueueName,
    pub(crate) task: Arc<Task>,
    pub(crate) token: ClaimToken,
    pub(crate) phase: Phase,
    pub(crate) claimed_at: Instant,
}

impl Entry {
    pub(crate) fn new(queue: QueueName, task: Task, token: ClaimToken) -> Self {
        let claimed_at = Instant::now();
        Self { queue, task: Arc::new(task), token, phase: Phase::Parked, claimed_at }
    }
}

/// Every task this replica holds a claim on, and calls in flight per server.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    // FxHash: looked up several times per task; the keys are ids the store made and the
    // fleet's own server names, and a ledger holds at most the fleet's concurrency
    entries: FxHashMap<TaskId, Entry>,
    load: FxHashMap<String, u32>,
    done: Vec<TaskId>,
    parked: VecDeque<TaskId>,
}

impl Ledger {
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn load(&self, server: &str) -> u32 {
        self.load.get(server).copied().unwrap_or(0)
    }

    /// Calls in flight on every server.
    pub(crate) fn sent(&self) -> u32 {
        self.load.values().sum()
    }

    pub(crate) fn parked(&self) -> usize {
        self.parked.len()
    }

    pub(crate) fn get(&self, id: &TaskId) -> Option<&Entry> {
        self.entries.get(id)
    }

    /// Adds a freshly claimed task as parked.
    pub(crate) fn insert(&mut self, id: TaskId, entry: Entry) {
        self.parked.push_back(id);
        self.entries.insert(id, entry);
    }

    /// Parked tasks, oldest claim first.
    pub(crate) fn parked_ids(&self) -> Vec<TaskId> {
        self.parked.iter().copied().collect()
    }

    /// Marks a parked task sent: its call, spawned for `server`, can be aborted with `abort`.
    /// False (and the call aborted) when the task is not parked.
    pub(crate) fn send(&mut self, id: TaskId, server: &Arc<str>, abort: AbortHandle) -> bool {
        match self.entries.get_mut(&id) {
            Some(e) if matches!(e.phase, Phase::Parked) => {
                unpark(&mut self.parked, id);
                e.phase = Phase::Sent { server: server.clone(), abort };
                match self.load.get_mut(&**server) {
                    Some(n) => *n += 1,
                    None => {
                        self.load.insert((**server).to_owned(), 1);
                    }
                }
                true
            }
            _ => {
                abort.abort();
                false
            }
        }
    }

    /// Marks a sent task's call started, as its request goes out; false when the task was
    /// taken away meanwhile (the call must then not go out).
    pub(crate) fn start(&mut self, id: TaskId, token: ClaimToken) -> bool {
        let Some(e) = self.entries.get_mut(&id).filter(|e| e.token == token) else { return false };
        match std::mem::replace(&mut e.phase, Phase::Parked) {
            Phase::Sent { server, abort } => {
                e.phase = Phase::Calling { server, abort };
                true
            }
            other => {
                e.phase = other;
                false
            }
        }
    }

    /// Finishes a task that is not finished yet; answers whether it was.
    pub(crate) fn finish(&mut self, id: TaskId, settle: Settle) -> bool {
        let Some(e) = self.entries.get_mut(&id) else { return false };
        match &e.phase {
            Phase::Done(_) => return false,
            Phase::Parked => unpark(&mut self.parked, id),
            Phase::Sent { server, .. } | Phase::Calling { server, .. } => {
                if let Some(n) = self.load.get_mut(&**server) {
                    *n = n.saturating_sub(1);
                }
            }
        }
        e.phase = Phase::Done(settle);
        self.done.push(id);
        true
    }

    /// Finishes the calls running or sent on `server` (its server went away): sent ones were
    /// never delivered, running ones are aborted and their outcome is unknown. Answers how many.
    pub(crate) fn redistribute(&mut self, server: &str, reason: &str) -> usize {
        self.finish_where(reason, |p| match p {
            Phase::Sent { server: s, .. } | Phase::Calling { server: s, .. } => **s == *server,
            _ => false,
        })
    }

    /// Hands the parked tasks back (shutdown); answers how many.
    pub(crate) fn abandon_parked(&mut self, reason: &str) -> usize {
        self.finish_where(reason, |p| matches!(p, Phase::Parked))
    }

    /// Aborts every call and hands every task back (shutdown past its drain time).
    pub(crate) fn abandon_all(&mut self, reason: &str) -> usize {
        self.finish_where(reason, |p| !matches!(p, Phase::Done(_)))
    }

    fn finish_where(&mut self, reason: &str, pick: impl Fn(&Phase) -> bool) -> usize {
        let ids: Vec<TaskId> =
            self.entries.iter().filter(|(_, e)| pick(&e.phase)).map(|(id, _)| *id).collect();
        for id in &ids {
            let Some(e) = self.entries.get(id) else { continue };
            let settle = match &e.phase {
                Phase::Sent { server, abort } => {
                    abort.abort();
                    Settle::Attempt {
                        server: server.clone(),
                        outcome: Outcome::NotDelivered {
                            reason: reason.to_owned(),
                            retry_after: None,
                        },
                    }
                }
                Phase::Calling { server, abort } => {
                    abort.abort();
                    Settle::Attempt {
                        server: server.clone(),
                        outcome: Outcome::Ambiguous { reason: reason.to_owned() },
                    }
                }
                Phase::Parked => {
                    Settle::Release { delay: Duration::ZERO, reason: reason.to_owned() }
                }
                Phase::Done(_) => continue,
            };
            self.finish(*id, settle);
        }
        ids.len()
    }

    /// Removes and answers the finished tasks.
    pub(crate) fn take_done(&mut self) -> Vec<(TaskId, Entry)> {
        let ids = std::mem::take(&mut self.done);
        ids.into_iter().filter_map(|id| self.entries.remove(&id).map(|e| (id, e))).collect()
    }

    /// Puts finished tasks back after the store could not record them.
    pub(crate) fn restore(&mut self, items: Vec<(TaskId, Entry)>) {
        for (id, e) in items {
            self.done.push(id);
            self.entries.insert(id, e);
        }
    }

    /// The claims to renew, per queue.
    pub(crate) fn leases(&self) -> HashMap<QueueName, Vec<(TaskId, ClaimToken)>> {
        let mut out: HashMap<QueueName, Vec<_>> = HashMap::new();
        for (id, e) in &self.entries {
            out.entry(e.queue.clone()).or_default().push((*id, e.token));
        }
        out
    }

    /// Forgets a task whose claim is gone (another replica took it, or it was cancelled),
    /// aborting its call. The store keeps whatever the new holder records.
    pub(crate) fn forget(&mut self, id: TaskId, token: ClaimToken) -> bool {
        if self.entries.get(&id).is_none_or(|e| e.token != token) {
            return false;
        }
        let Some(e) = self.entries.remove(&id) else { return false };
        match e.phase {
            Phase::Parked => unpark(&mut self.parked, id),
            Phase::Sent { server, abort } | Phase::Calling { server, abort } => {
                abort.abort();
                self.unload(&server);
            }
            Phase::Done(_) => self.done.retain(|d| *d != id),
        }
        true
    }

    fn unload(&mut self, server: &str) {
        if let Some(n) = self.load.get_mut(server) {
            *n = n.saturating_sub(1);
        }
    }
}

/// Takes `id` off the parked queue: usually its head, as tasks leave in claim order.
fn unpark(parked: &mut VecDeque<TaskId>, id: TaskId) {
    if parked.front() == Some(&id) {
        parked.pop_front();
    } else {
        parked.retain(|p| *p != id);
    }
}

/// Counters since the fleet started.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) claimed: AtomicU64,
    pub(crate) dispatched: AtomicU64,
    pub(crate) succeeded: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) released: AtomicU64,
    pub(crate) review: AtomicU64,
    pub(crate) dead: AtomicU64,
    pub(crate) fenced: AtomicU64,
    pub(crate) redistributed: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) restarts: AtomicU64,
    /// Creation to finish of tasks this replica finished.
    pub(crate) latency: Histogram,
    /// Claim to recorded outcome of each attempt.
    pub(crate) attempt: Histogram,
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// Upper bounds of the histogram buckets, in seconds (Prometheus `le`).
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A lock-free histogram over [`LATENCY_BUCKETS`] (plus +Inf).
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub(crate) fn record(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS.iter().position(|&le| secs <= le).unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(d.as_micros().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                total += b.load(Ordering::Relaxed);
                total
            })
            .collect();
        HistogramSnapshot {
            cumulative,
            count: total,
            sum_seconds: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// A histogram as Prometheus exposes it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct HistogramSnapshot {
    /// Observations at or below each of [`LATENCY_BUCKETS`], then the total (+Inf).
    pub cumulative: Vec<u64>,
    /// Observations.
    pub count: u64,
    /// Their sum, in seconds.
    pub sum_seconds: f64,
}

#[derive(Default)]
struct Refs {
    work_queue: Option<ActorRef<WorkQueueMsg>>,
    health: Option<ActorRef<HealthMsg>>,
    clients: HashMap<String, ActorRef<ClientMsg>>,
    callers: HashMap<String, Arc<Caller>>,
}

/// A server's health change, as subscribers see it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ServerEvent {
    /// The server.
    pub server: String,
    /// Its health now.
    pub health: Health,
    /// Its health before.
    pub was: Health,
    /// The failure that caused it, or what answered.
    pub reason: String,
}

/// The state shared by one fleet's actors.
pub(crate) struct Shared {
    pub(crate) node: String,
    ledger: Mutex<Ledger>,
    servers: RwLock<Vec<ServerInfo>>,
    refs: Mutex<Refs>,
    pump_pending: AtomicBool,
    /// Wake-ups since the WorkQueue last placed tasks; the `fill_at`th rings `woken`, and a
    /// round waiting for the store places parked tasks in the slots that freed meanwhile.
    wakes: AtomicU32,
    fill_at: AtomicU32,
    pub(crate) woken: Notify,
    pub(crate) events: broadcast::Sender<ServerEvent>,
    pub(crate) counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // a panic while holding the lock left plain data (no half-applied invariant spans an
    // unwind point in these tables); keep going rather than poison the fleet
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(crate) fn new(node: String, servers: Vec<ServerConfig>) -> Arc<Self> {
        Arc::new(Self {
            node,
            ledger: Mutex::new(Ledger::default()),
            servers: RwLock::new(servers.into_iter().map(ServerInfo::new).collect()),
            refs: Mutex::new(Refs::default()),
            pump_pending: AtomicBool::new(false),
            wakes: AtomicU32::new(0),
            fill_at: AtomicU32::new(1),
            woken: Notify::new(),
            events: broadcast::channel(1024).0,
            counters: Counters::default(),
        })
    }

    pub(crate) fn ledger(&self) -> MutexGuard<'_, Ledger> {
        lock(&self.ledger)
    }

    pub(crate) fn servers(&self) -> RwLockReadGuard<'_, Vec<ServerInfo>> {
        self.servers.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn servers_mut(&self) -> RwLockWriteGuard<'_, Vec<ServerInfo>> {
        self.servers.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the named server's row, if it exists.
    pub(crate) fn with_server<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut ServerInfo) -> T,
    ) -> Option<T> {
        self.servers_mut().iter_mut().find(|s| s.cfg.name == name).map(f)
    }

    /// Wakes the WorkQueue; many wake-ups before it runs make one. A round waiting for the
    /// store hears of them in batches, through `woken` (see [`Self::placing`]).
    pub(crate) fn pump(&self) {
        if self.wakes.fetch_add(1, Ordering::AcqRel) + 1 == self.fill_at.load(Ordering::Acquire) {
            self.woken.notify_one();
        }
        if self.pump_pending.swap(true, Ordering::AcqRel) {
            return;
        }
        let wq = lock(&self.refs).work_queue.clone();
        if wq.is_none_or(|wq| wq.send_message(WorkQueueMsg::Pump).is_err()) {
            // no WorkQueue now: the next one pumps when it starts
            self.pump_pending.store(false, Ordering::Release);
        }
    }

    /// The most wake-ups before `woken` rings: slots refill in batches of up to this many,
    /// as a wake-up for each finished call would cost the WorkQueue more than it gains.
    const FILL_BATCH: u32 = 8;

    /// Called by the WorkQueue as it places tasks, with `sent` calls in flight: the wake-ups
    /// so far are answered, and `woken` rings after an eighth of those calls (up to
    /// [`Self::FILL_BATCH`], at least one) finish, so it rings while some still run.
    pub(crate) fn placing(&self, sent: u32) {
        self.fill_at.store((sent / 8).clamp(1, Self::FILL_BATCH), Ordering::Release);
        self.wakes.store(0, Ordering::Release);
    }

    /// Called by the WorkQueue when a pump starts: later wake-ups send a new message.
    pub(crate) fn pumped(&self) {
        self.pump_pending.store(false, Ordering::Release);
    }

    pub(crate) fn set_work_queue(&self, r: Option<ActorRef<WorkQueueMsg>>) {
        lock(&self.refs).work_queue = r;
    }

    pub(crate) fn work_queue(&self) -> Option<ActorRef<WorkQueueMsg>> {
        lock(&self.refs).work_queue.clone()
    }

    pub(crate) fn set_health(&self, r: Option<ActorRef<HealthMsg>>) {
        lock(&self.refs).health = r;
    }

    pub(crate) fn health_ref(&self) -> Option<ActorRef<HealthMsg>> {
        lock(&self.refs).health.clone()
    }

    /// Sets the ClientActor of a server; none (it died or was removed) takes its caller too.
    pub(crate) fn set_client(&self, name: &str, r: Option<ActorRef<ClientMsg>>) {
        let mut refs = lock(&self.refs);
        match r {
            Some(r) => {
                refs.clients.insert(name.to_owned(), r);
            }
            None => {
                refs.clients.remove(name);
                refs.callers.remove(name);
            }
        }
    }

    /// Set by a ClientActor as it starts: what the WorkQueue needs to start calls on its server.
    pub(crate) fn set_caller(&self, name: &str, c: Arc<Caller>) {
        lock(&self.refs).callers.insert(name.to_owned(), c);
    }

    /// The caller of a server whose ClientActor runs.
    pub(crate) fn caller(&self, name: &str) -> Option<Arc<Caller>> {
        let refs = lock(&self.refs);
        refs.clients.contains_key(name).then(|| refs.callers.get(name).cloned()).flatten()
    }

    pub(crate) fn client(&self, name: &str) -> Option<ActorRef<ClientMsg>> {
        lock(&self.refs).clients.get(name).cloned()
    }

    /// Tells the HealthMonitor what a call or probe showed. An answer from a server that is
    /// online with no failure counted would change nothing: no message (one per call else).
    pub(crate) fn observe(&self, server: &str, ok: bool, reason: String) {
        if ok
            && self
                .servers()
                .iter()
                .any(|s| s.cfg.name == server && s.health == Health::Online && s.failures == 0)
        {
            return;
        }
        if let Some(h) = self.health_ref() {
            // a dead monitor misses one observation; the next probe tells again
            let _ = h.send_message(HealthMsg::Observed { server: server.to_owned(), ok, reason });
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use mcpq_queue::{Call, Route, TaskState};

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_the_total() {
        let h = Histogram::default();
        for ms in [0, 3, 3, 700, 400_000] {
            h.record(Duration::from_millis(ms));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 5);
        assert_eq!(s.cumulative.len(), LATENCY_BUCKETS.len() + 1);
        assert_eq!(s.cumulative[0], 1, "0 ms is within the first bucket");
        assert_eq!(s.cumulative[2], 3, "3 ms is within 5 ms");
        assert_eq!(s.cumulative[9], 4, "700 ms is within 1 s");
        assert_eq!(s.cumulative.last(), Some(&5), "400 s only in +Inf");
        assert!((s.sum_seconds - 400.706).abs() < 1e-6);
    }

    /// A running tool-call task, attempt 1 of 3, for tests of the fleet's pieces.
    pub(crate) fn task(idempotent: bool) -> Task {
        Task {
            id: TaskId::new(),
            queue: QueueName::default(),
            call: Call::Tool { name: "t".into(), arguments: serde_json::json!({}) },
            priority: 0,
            route: Route::default(),
            max_attempts: 3,
            backoff: mcpq_queue::Backoff { initial_ms: 100, max_ms: 1000 },
            timeout: None,
            idempotent,
            idempotency_key: None,
            expires: None,
            metadata: Default::default(),
            state: TaskState::Running,
            attempt: 1,
            server: None,
            result: None,
            error: None,
            created_at_ms: 0,
            started_at_ms: None,
            finished_at_ms: None,
        }
    }

    #[tokio::test]
    async fn ledger_counts_load_and_settles_each_task_once() {
        let mut l = Ledger::default();
        let t = task(false);
        let id = t.id;
        let token = ClaimToken::from_raw(1);
        l.insert(id, Entry::new(QueueName::default(), t, token));
        assert_eq!(l.parked(), 1);
        let call = tokio::spawn(std::future::pending::<()>());
        assert!(l.send(id, &Arc::from("a"), call.abort_handle()));
        assert_eq!((l.parked(), l.load("a")), (0, 1));
        assert!(!l.start(id, ClaimToken::from_raw(2)), "another claim's call does not start");
        assert!(l.start(id, token));
        assert_eq!(l.redistribute("a", "a went offline"), 1);
        assert_eq!(l.load("a"), 0);
        let ok = Outcome::Executed(Ok(Value::Null));
        assert!(!l.finish(id, Settle::Attempt { server: "a".into(), outcome: ok }), "late answer");
        assert!(call.await.unwrap_err().is_cancelled(), "the call was aborted");
        let done = l.take_done();
        assert_eq!(done.len(), 1);
        assert!(matches!(
            &done[0].1.phase,
            Phase::Done(Settle::Attempt { outcome: Outcome::Ambiguous { .. }, .. })
        ));
        assert_eq!(l.len(), 0);
        l.restore(done);
        assert_eq!(l.take_done().len(), 1, "a failed write keeps the task");
    }

    #[test]
    fn ledger_forgets_only_the_holder_of_the_token() {
        let mut l = Ledger::default();
        let t = task(false);
        let id = t.id;
        l.insert(id, Entry::new(QueueName::default(), t, ClaimToken::from_raw(2)));
        assert!(!l.forget(id, ClaimToken::from_raw(1)));
        assert!(l.forget(id, ClaimToken::from_raw(2)));
        assert_eq!((l.len(), l.parked()), (0, 0));
    }
}
