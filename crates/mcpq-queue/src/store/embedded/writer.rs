//! The single writer: one thread owns every write transaction. Callers send operations over a
//! channel; the thread takes whatever is queued (up to [`MAX_OPS`]) and applies all of it in one
//! transaction, along with whatever comes while it does, then commits it durably and only then
//! answers each caller, so an acknowledged operation survives a crash while the cost of the sync
//! is shared by the whole batch.
//!
//! A claim is answered as soon as its batch has been applied, before the commit: what it
//! changes (a task running under a new token) needs no sync to be safe, because a claim lost to
//! a crash leaves its task queued, to run again after the restart just as a task whose call was
//! cut by the crash does, and the sync then no longer delays the call. Nothing else sees the
//! claim before the commit: wake-ups follow commits, and a read that starts after an early answer
//! waits for that answer's commit ([`Writer::caught_up`]), so whoever learnt of the claim reads
//! it back. Should that commit fail, the writer stops (every later operation fails until the
//! store is reopened), so a token handed out early is never handed out twice by one process.
//! For the same reason a batch of claims alone is not synced on its own commit: it reaches the
//! disk with the next commit an answer waits for, or [`CLAIM_SYNC`] after it at the latest, so
//! claims cost no sync of their own and do not hold up the syncs behind them.
//!
//! A claim may also wait for tasks ([`Writer::write_waiting`]): applied when it comes, it is
//! kept while it takes nothing and applied again in each transaction that may give its queue
//! tasks to claim (an enqueue, a release, a resume, …), after that transaction's operations,
//! so it takes what they bring before their commit and sync and the call can start while the
//! sync runs. It answers as a claim does, early; or with nothing once its time is over; and a
//! caller that cancels it gets what it took before the cancel, so nothing it took is lost.
//!
//! With `store.sync_ms` set, commits are answered before their sync and synced in the background
//! at most that long after the oldest one not yet synced (by the next batch, or by an empty
//! commit when none comes): a crash then loses at most that window of acknowledged writes, the
//! trade Redis makes with `appendfsync everysec`. Any failed commit stops the writer in that
//! mode, as answers went out for commits whose sync it can no longer vouch for.
//!
//! The thread runs under Linux's batch policy (`SCHED_BATCH`, its nice value kept): woken while
//! the CPUs are busy, it waits for the running thread's slice to end rather than preempting it
//! (most often a thread whose calls feed it), and meanwhile more operations join its batch, so
//! each costs less; on an idle CPU it runs at once.
//!
//! Each operation is all-or-nothing on its own. One that fails before writing anything is
//! answered with its error and the batch carries on. One that fails after writing (corrupt
//! data met halfway, a storage error) would leave half a transition in the shared transaction,
//! so the transaction is dropped and the batch redone without it; that happens at most once per
//! operation in the batch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, Durability, WriteTransaction};
use tokio::sync::{mpsc, oneshot, watch};

use super::storage;
use super::tables::Tx;
use crate::error::{Error, Result};
use crate::task::QueueName;

/// Most operations one transaction carries.
const MAX_OPS: usize = 256;
/// Operations waiting for the writer before senders wait too.
const QUEUE_DEPTH: usize = 4096;
/// How long a commit of claims alone waits at most for its sync when every other commit is
/// synced before its answer: a task claimed longer ago than that keeps its attempt through a
/// crash, so a task that brings the process down still runs out of attempts.
pub(super) const CLAIM_SYNC: Duration = Duration::from_millis(5);

/// An operation waiting for the writer: it runs against the transaction (again, if the batch
/// is redone) and keeps its answer until the commit decides it.
pub(super) trait Op: Send {
    /// Runs the operation; on success keeps the answer for [`Op::answer`].
    fn apply(&mut self, tx: &mut Tx<'_>) -> Result<()>;
    /// Keeps an error as the answer.
    fn refuse(&mut self, e: Error);
    /// When it is answered.
    fn when(&self) -> When;
    /// Sends the kept answer, or `failed` (the commit's error) in place of a success; a second
    /// call sends nothing.
    fn answer(&mut self, failed: Option<&Error>);
}

/// When an operation is answered; ordered from the earliest.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(super) enum When {
    /// Once applied, before its batch's commit (claims).
    Applied,
    /// After its batch's commit, synced or not as the mode says.
    Committed,
    /// After its batch's commit, synced.
    Synced,
}

struct Pending<T, F> {
    run: F,
    answer: Option<Result<T>>,
    reply: Option<oneshot::Sender<Result<T>>>,
    when: When,
}

impl<T, F> Op for Pending<T, F>
where
    T: Send,
    F: FnMut(&mut Tx<'_>) -> Result<T> + Send,
{
    fn apply(&mut self, tx: &mut Tx<'_>) -> Result<()> {
        self.answer = Some(Ok((self.run)(tx)?));
        Ok(())
    }

    fn refuse(&mut self, e: Error) {
        self.answer = Some(Err(e));
    }

    fn when(&self) -> When {
        self.when
    }

    fn answer(&mut self, failed: Option<&Error>) {
        let Some(reply) = self.reply.take() else { return };
        let answer = match (self.answer.take(), failed) {
            // an operation refused on its own keeps its own reason
            (Some(Err(e)), _) => Err(e),
            (_, Some(e)) => Err(copy(e)),
            (Some(ok), None) => ok,
            (None, None) => Err(Error::Corrupt("the operation never ran".into())),
        };
        // the caller may have stopped waiting; the operation stands either way
        let _ = reply.send(answer);
    }
}

/// What goes to the writer: an operation, or a claim that waits for tasks.
pub(super) enum Job {
    Op(Box<dyn Op>),
    Wait(Box<dyn Wait>),
}

/// A claim that waits for tasks ([`Writer::write_waiting`]): applied in the batch it comes
/// in, then, while it has taken nothing, in each batch that may give its queue tasks to
/// claim (in the same transaction, so it takes them before that batch's commit and sync),
/// until its time runs out or its caller stops waiting. What it takes is answered before the
/// commit, as an early operation's answer is.
pub(super) trait Wait: Send {
    /// The queue it waits on.
    fn queue(&self) -> &QueueName;
    /// When it answers that it took nothing.
    fn until(&self) -> Instant;
    /// Whether its caller stopped waiting: nothing is taken for it any more.
    fn gone(&self) -> bool;
    /// Runs it; answers whether it took something (kept for [`Wait::send`]).
    fn apply(&mut self, tx: &mut Tx<'_>) -> Result<bool>;
    /// Sends what it took, or `failed` in its place; with neither, answers that it took
    /// nothing. A second call sends nothing.
    fn send(&mut self, failed: Option<&Error>);
}

struct Waiting<T, F> {
    queue: QueueName,
    until: Instant,
    run: F,
    took: Option<T>,
    reply: Option<oneshot::Sender<Result<T>>>,
}

impl<T, F> Wait for Waiting<T, F>
where
    T: Default + Send,
    F: FnMut(&mut Tx<'_>) -> Result<Option<T>> + Send,
{
    fn queue(&self) -> &QueueName {
        &self.queue
    }

    fn until(&self) -> Instant {
        self.until
    }

    fn gone(&self) -> bool {
        self.reply.as_ref().is_none_or(oneshot::Sender::is_closed)
    }

    fn apply(&mut self, tx: &mut Tx<'_>) -> Result<bool> {
        self.took = (self.run)(tx)?;
        Ok(self.took.is_some())
    }

    fn send(&mut self, failed: Option<&Error>) {
        let Some(reply) = self.reply.take() else { return };
        let answer = match failed {
            Some(e) => Err(copy(e)),
            None => Ok(self.took.take().unwrap_or_default()),
        };
        // a caller that went away without cancelling leaves what it took running until its
        // lease runs out, as a claim whose caller is lost does
        let _ = reply.send(answer);
    }
}

/// A waiting claim as the writer keeps it: `fresh` until its first batch is committed.
struct Parked {
    wait: Box<dyn Wait>,
    fresh: bool,
}

/// The same error again, for every caller of a failed batch.
fn copy(e: &Error) -> Error {
    match e {
        Error::Corrupt(m) => Error::Corrupt(m.clone()),
        other => Error::Unavailable(text(other).into()),
    }
}

/// An error with its sources, as one line.
fn text(e: &Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

fn stopped() -> Error {
    Error::Unavailable("the embedded store's writer has stopped".into())
}

/// Wakes readers waiting for a queue's next event.
#[derive(Default)]
pub(super) struct Wakers {
    queues: Mutex<HashMap<QueueName, watch::Sender<u64>>>,
}

impl Wakers {
    /// A receiver that changes after each commit that appends to `queue`'s events.
    pub(super) fn subscribe(&self, queue: &QueueName) -> watch::Receiver<u64> {
        // a poisoned lock only means a thread panicked around a plain map insert
        let mut map = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        // any queue name may be read from, so queues nobody waits on any more are forgotten
        map.retain(|_, tx| tx.receiver_count() > 0);
        map.entry(queue.clone()).or_insert_with(|| watch::channel(0).0).subscribe()
    }

    fn wake(&self, queues: &[QueueName]) {
        let map = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        for q in queues {
            if let Some(tx) = map.get(q) {
                tx.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }
}

/// How far the writer has got, in batches counted from 1: the last one that answered early
/// with writes, the last one whose commit ended (committed or failed), and the last one known
/// to be on disk (synced, or followed by a synced commit).
struct Progress {
    early: AtomicU64,
    settled: watch::Sender<u64>,
    synced: watch::Sender<u64>,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            early: AtomicU64::new(0),
            settled: watch::Sender::new(0),
            synced: watch::Sender::new(0),
        }
    }
}

impl Progress {
    /// Waits until every early answer given so far has its batch's commit behind it.
    async fn caught_up(&self) {
        let want = self.early.load(Ordering::Acquire);
        if *self.settled.borrow() >= want {
            return;
        }
        // the sender lives as long as the store; the writer's end lets every waiter go
        let _ = self.settled.subscribe().wait_for(|s| *s >= want).await;
    }
}

/// Lets every reader waiting on the writer go once its thread ends, even by a panic between an
/// early answer and its commit: they read whatever the database holds.
struct Ended<'a>(&'a Progress);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.0.settled.send_replace(u64::MAX);
    }
}

/// The writer's handle: where operations go, and the thread, joined once the last handle is
/// gone (so the database is closed when the store is dropped).
pub(super) struct Writer {
    // declared before `thread`: fields drop in order, and the thread ends when this closes
    ops: mpsc::Sender<Job>,
    progress: Arc<Progress>,
    _thread: Joiner,
}

struct Joiner(Option<JoinHandle<()>>);

impl Drop for Joiner {
    fn drop(&mut self) {
        // the writer finishes the batch in hand and whatever is queued, then ends
        if let Some(handle) = self.0.take()
            && handle.join().is_err()
        {
            tracing::error!("the embedded store's writer panicked");
        }
    }
}

/// Which commits are synced before their answers, and how soon the others are synced.
pub(super) struct Syncs {
    /// A batch with an operation answered this late or later is synced on its commit.
    before: When,
    /// The longest a commit waits for its sync otherwise, from the oldest one not yet synced.
    within: Duration,
    // the clock that ends a wait for the next operation when a sync is due
    clock: tokio::runtime::Runtime,
}

impl Syncs {
    /// Every commit an answer waits for synced first (the default); commits of claims alone
    /// synced within `claims`.
    pub(super) fn every_commit(claims: Duration) -> Result<Self> {
        Self::new(When::Committed, claims)
    }

    /// Every commit answered before its sync, and synced at most `within` after the oldest
    /// one not yet synced (`store.sync_ms`).
    pub(super) fn lazy(within: Duration) -> Result<Self> {
        Self::new(When::Synced, within)
    }

    fn new(before: When, within: Duration) -> Result<Self> {
        let clock = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| Error::Unavailable(Box::new(e)))?;
        Ok(Self { before, within, clock })
    }
}

/// What waiting for the writer's next operation gave.
enum Next {
    Job(Job),
    /// A sync is due first.
    Due,
    Closed,
}

fn next(rx: &mut mpsc::Receiver<Job>, syncs: &Syncs, due: Option<Instant>) -> Next {
    let got = match due {
        Some(due) => {
            // the timer needs the clock's context: made inside `block_on`
            let wait = async { tokio::time::timeout_at(due.into(), rx.recv()).await };
            match syncs.clock.block_on(wait) {
                Ok(got) => got,
                Err(_) => return Next::Due,
            }
        }
        None => rx.blocking_recv(),
    };
    got.map_or(Next::Closed, Next::Job)
}

impl Writer {
    /// Starts the writer thread on `db`, syncing as `syncs` says.
    pub(super) fn start(db: Arc<Database>, wakers: Arc<Wakers>, syncs: Syncs) -> Result<Self> {
        let (ops, rx) = mpsc::channel(QUEUE_DEPTH);
        let progress = Arc::new(Progress::default());
        let shared = progress.clone();
        let thread = std::thread::Builder::new()
            .name(super::WRITER_THREAD.into())
            .spawn(move || {
                // a batch thread: woken while the CPUs are busy, it waits for a slice instead of
                // preempting the running thread, and takes a larger batch (module comment)
                if let Err(e) = mcpq_os::batch_current_thread() {
                    tracing::warn!(error = %e, "the store's writer keeps the default policy");
                }
                run(&db, rx, &wakers, &shared, commit_txn, &syncs)
            })
            .map_err(|e| Error::Unavailable(Box::new(e)))?;
        Ok(Self { ops, progress, _thread: Joiner(Some(thread)) })
    }

    /// Syncs every write answered so far to disk, then answers.
    pub(super) async fn sync(&self) -> Result<()> {
        self.send(|_: &mut Tx<'_>| Ok(()), When::Synced).await
    }

    /// Waits until every early answer given so far has its batch's commit behind it (at once
    /// when none is pending), so a read that follows sees what those answers said.
    pub(super) async fn caught_up(&self) {
        self.progress.caught_up().await;
    }

    /// Runs `op` in the next batch and answers once its batch is committed.
    pub(super) async fn write<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut Tx<'_>) -> Result<T> + Send + 'static,
    {
        self.send(op, When::Committed).await
    }

    /// Runs `op` in the next batch and answers once the batch is applied, before its commit:
    /// for claims only (see the module's comment).
    pub(super) async fn write_early<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut Tx<'_>) -> Result<T> + Send + 'static,
    {
        self.send(op, When::Applied).await
    }

    async fn send<T, F>(&self, op: F, when: When) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut Tx<'_>) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let pending = Box::new(Pending { run: op, answer: None, reply: Some(reply), when });
        self.ops.send(Job::Op(pending)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Runs `op`, a claim on `queue`, in the next batch and, while it takes nothing (`None`),
    /// again in each batch that may give `queue` tasks to claim, until `until`; answers what
    /// it took (before that batch's commit, as [`Writer::write_early`] does), or `T::default()`
    /// once `until` has passed. Once `cancel` completes it answers at once: what it took before,
    /// if anything, so that nothing it took is lost with the caller.
    pub(super) async fn write_waiting<T, F>(
        &self,
        queue: QueueName,
        until: Instant,
        op: F,
        cancel: impl Future<Output = ()>,
    ) -> Result<T>
    where
        T: Default + Send + 'static,
        F: FnMut(&mut Tx<'_>) -> Result<Option<T>> + Send + 'static,
    {
        let (reply, mut answer) = oneshot::channel();
        let wait = Box::new(Waiting { queue, until, run: op, took: None, reply: Some(reply) });
        self.ops.send(Job::Wait(wait)).await.map_err(|_| stopped())?;
        tokio::select! {
            biased;
            got = &mut answer => got.map_err(|_| stopped())?,
            () = cancel => {
                // once closed the writer can send nothing more: what it sent before is here
                answer.close();
                answer.try_recv().unwrap_or_else(|_| Ok(T::default()))
            }
        }
    }
}

/// Commits a write transaction (synced or not, as set on it).
fn commit_txn(txn: WriteTransaction) -> Result<()> {
    txn.commit().map_err(storage)
}

/// The writer's loop; `finish` commits each transaction (a test makes it fail); `syncs` says
/// which commits are synced before their answers.
fn run(
    db: &Database,
    mut rx: mpsc::Receiver<Job>,
    wakers: &Wakers,
    progress: &Progress,
    finish: fn(WriteTransaction) -> Result<()>,
    syncs: &Syncs,
) {
    let _ended = Ended(progress);
    // set once a commit fails after answers that relied on it: every later operation is refused
    let mut halted: Option<Error> = None;
    let mut batch = 0u64;
    // when the oldest answered commit not yet synced was made
    let mut unsynced: Option<Instant> = None;
    // claims waiting for tasks
    let mut waits: Vec<Parked> = Vec::new();
    loop {
        let sync_due = unsynced.map(|since| since + syncs.within);
        let due = sync_due.into_iter().chain(waits.iter().map(|p| p.wait.until())).min();
        let first = match next(&mut rx, syncs, due) {
            Next::Job(job) => job,
            Next::Closed => break,
            Next::Due => {
                let now = Instant::now();
                // a wait whose time ran out answers that it took nothing
                waits.retain_mut(|p| {
                    let over = p.wait.until() <= now;
                    if over {
                        p.wait.send(None);
                    }
                    !over && !p.wait.gone()
                });
                if sync_due.is_some_and(|due| due <= now) {
                    match sync_empty(db, finish) {
                        Ok(()) => drop(progress.synced.send_replace(batch)),
                        Err(e) => halted = Some(halt(&e, "the commits since the last sync")),
                    }
                    unsynced = None;
                }
                continue;
            }
        };
        let mut ops = Vec::new();
        route(first, &mut ops, &mut waits);
        for _ in 1..MAX_OPS {
            match rx.try_recv() {
                Ok(job) => route(job, &mut ops, &mut waits),
                Err(_) => break,
            }
        }
        if let Some(e) = &halted {
            for mut op in ops {
                op.answer(Some(e));
            }
            for mut p in waits.drain(..) {
                p.wait.send(Some(e));
            }
            continue;
        }
        batch += 1;
        let durable = |ops: &[Box<dyn Op>]| {
            ops.iter().any(|op| op.when() >= syncs.before)
                || unsynced.is_some_and(|since| since.elapsed() >= syncs.within)
        };
        let announce = || progress.early.store(batch, Ordering::Release);
        let more = || rx.try_recv().ok();
        let done = commit(db, &mut ops, &mut waits, more, durable, announce, finish);
        progress.settled.send_replace(batch);
        for p in &mut waits {
            p.fresh = false;
        }
        // whether this batch answered early with writes
        let early = progress.early.load(Ordering::Relaxed) == batch;
        match done {
            Ok(Committed { woken, wrote, durable }) => {
                if durable {
                    unsynced = None;
                    progress.synced.send_replace(batch);
                } else if wrote && unsynced.is_none() {
                    unsynced = Some(Instant::now());
                }
                for mut op in ops {
                    op.answer(None);
                }
                wakers.wake(&woken);
            }
            Err(e) => {
                tracing::error!(error = %e, ops = ops.len(), "embedded store commit failed");
                for op in &mut ops {
                    op.answer(Some(&e));
                }
                if early {
                    halted = Some(halt(&e, "claims answered before this commit"));
                } else if unsynced.is_some() {
                    halted = Some(halt(&e, "the commits since the last sync"));
                }
                if halted.is_some() {
                    // nothing more reaches the disk
                    unsynced = None;
                }
            }
        }
    }
    // the last commits synced here rather than left to redb's close, so a failure is logged
    // and the writer's progress says so
    if unsynced.is_some() && halted.is_none() {
        match sync_empty(db, finish) {
            Ok(()) => drop(progress.synced.send_replace(batch)),
            Err(e) => tracing::error!(
                error = %e,
                "the embedded store's last sync failed: its latest writes may be lost"
            ),
        }
    }
}

/// Puts a job with the operations of the next batch, or with the waiting claims.
fn route(job: Job, ops: &mut Vec<Box<dyn Op>>, waits: &mut Vec<Parked>) {
    match job {
        Job::Op(op) => ops.push(op),
        Job::Wait(wait) => waits.push(Parked { wait, fresh: true }),
    }
}

/// The error every operation gets once a failed commit `e` stopped the writer; logs why:
/// `lost` names what was answered but may not be on disk.
fn halt(e: &Error, lost: &str) -> Error {
    tracing::error!(
        error = %e,
        "{lost} were answered already: the embedded store refuses every write until it is reopened"
    );
    let why = format!(
        "the embedded store stopped after a failed commit ({}); restart to reopen it",
        text(e)
    );
    Error::Unavailable(why.into())
}

/// Syncs every commit so far with an empty synced commit.
fn sync_empty(db: &Database, finish: fn(WriteTransaction) -> Result<()>) -> Result<()> {
    let mut txn = db.begin_write().map_err(storage)?;
    txn.set_durability(Durability::Immediate).map_err(storage)?;
    finish(txn)
}

/// What a batch's commit did: the queues with new events, whether it wrote anything, and
/// whether it was synced.
struct Committed {
    woken: Vec<QueueName>,
    wrote: bool,
    durable: bool,
}

/// Applies `ops` in one transaction, then the jobs that came (`more`) while it was applying
/// them, then the waiting claims that may take something (new ones, and those whose queue
/// the batch may have given tasks), and commits it, synced when `durable` says so of the
/// operations. An operation or claim that fails after writing is answered at once and taken
/// out, and the batch is redone. Early operations and the claims that took something are
/// answered between the last pass and the commit, after `announce` when any of them wrote.
///
/// Operations that come while a batch is applied join it rather than wait for its commit to
/// start a batch of their own: they are answered sooner, and a round of the WorkQueue (its
/// writes, then its claim) usually makes one commit rather than two.
fn commit(
    db: &Database,
    ops: &mut Vec<Box<dyn Op>>,
    waits: &mut Vec<Parked>,
    mut more: impl FnMut() -> Option<Job>,
    durable: impl Fn(&[Box<dyn Op>]) -> bool,
    announce: impl FnOnce(),
    finish: fn(WriteTransaction) -> Result<()>,
) -> Result<Committed> {
    enum Broken {
        Op(usize, Error),
        Wait(usize, Error),
    }
    // each pass either commits or takes one job out; only the first takes more in
    for pass in 0..=MAX_OPS * 2 {
        let mut txn = db.begin_write().map_err(storage)?;
        let mut tx = Tx::open(&txn)?;
        let mut broken = None;
        let (mut wrote, mut wrote_early) = (false, false);
        let (mut i, mut pulled) = (0, 0);
        loop {
            if i == ops.len() {
                // the first pass takes in what came meanwhile, until nothing more comes
                let job = if pass == 0 && pulled < MAX_OPS { more() } else { None };
                let Some(job) = job else { break };
                route(job, ops, waits);
                pulled += 1;
                continue;
            }
            let op = &mut ops[i];
            tx.begin_op();
            if let Err(e) = op.apply(&mut tx) {
                if tx.dirty() {
                    broken = Some(Broken::Op(i, e));
                    break;
                }
                op.refuse(e);
            }
            wrote |= tx.dirty();
            wrote_early |= op.when() == When::Applied && tx.dirty();
            i += 1;
        }
        let mut took = Vec::new();
        if broken.is_none() {
            for (k, p) in waits.iter_mut().enumerate() {
                if !(p.fresh || tx.readied(p.wait.queue())) || p.wait.gone() {
                    continue;
                }
                tx.begin_op();
                match p.wait.apply(&mut tx) {
                    Ok(true) => took.push(k),
                    Ok(false) => {}
                    Err(e) if tx.dirty() => {
                        broken = Some(Broken::Wait(k, e));
                        break;
                    }
                    // answered now, so gone from the waits below
                    Err(e) => p.wait.send(Some(&e)),
                }
                wrote |= tx.dirty();
                wrote_early |= tx.dirty();
            }
        }
        if let Some(broken) = broken {
            drop(tx);
            txn.abort().map_err(storage)?;
            match broken {
                Broken::Op(i, e) => {
                    tracing::warn!(error = %e, "a store operation failed halfway; batch redone without it");
                    let mut op = ops.remove(i);
                    op.refuse(e);
                    op.answer(None);
                }
                Broken::Wait(k, e) => {
                    tracing::warn!(error = %e, "a waiting claim failed halfway; batch redone without it");
                    waits.remove(k).wait.send(Some(&e));
                }
            }
            continue;
        }
        let woken = tx.finish()?;
        let durable = durable(ops);
        let durability = if durable { Durability::Immediate } else { Durability::None };
        txn.set_durability(durability).map_err(storage)?;
        if wrote_early {
            announce();
        }
        for op in ops.iter_mut().filter(|op| op.when() == When::Applied) {
            op.answer(None);
        }
        for k in took {
            waits[k].wait.send(None);
        }
        // answered, or their callers stopped waiting
        waits.retain(|p| !p.wait.gone());
        if wrote || durable {
            finish(txn)?;
        } else {
            // nothing to commit (claims that found nothing, a slow poll): no commit to wait for
            txn.abort().map_err(storage)?;
        }
        return Ok(Committed { woken, wrote, durable });
    }
    Err(Error::Corrupt("a batch kept failing halfway".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    /// A database with every table, in `dir`.
    fn fresh(dir: &tempfile::TempDir) -> Database {
        let db = Database::create(dir.path().join("w.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        super::super::tables::create(&txn).unwrap();
        txn.commit().unwrap();
        db
    }

    /// Runs `test` against a writer thread on a fresh database whose every commit fails, then
    /// stops the thread.
    fn with_failing_writer(test: impl FnOnce(&mpsc::Sender<Job>)) {
        let dir = tempfile::tempdir().unwrap();
        let db = fresh(&dir);
        let (ops, rx) = mpsc::channel(16);
        let syncs = Syncs::every_commit(CLAIM_SYNC).unwrap();
        let thread = std::thread::spawn(move || {
            run(&db, rx, &Wakers::default(), &Progress::default(), failing, &syncs)
        });
        test(&ops);
        drop(ops);
        thread.join().unwrap();
    }

    /// Sends an operation to the writer; answers its reply.
    fn submit<T, F>(ops: &mpsc::Sender<Job>, run: F, when: When) -> oneshot::Receiver<Result<T>>
    where
        T: Send + 'static,
        F: FnMut(&mut Tx<'_>) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let op = Pending { run, answer: None, reply: Some(reply), when };
        ops.blocking_send(Job::Op(Box::new(op))).unwrap();
        answer
    }

    /// Sends an operation that pauses queue `q` (a write); answers its reply.
    fn pause(ops: &mpsc::Sender<Job>, q: &str, early: bool) -> oneshot::Receiver<Result<()>> {
        let queue = QueueName::new(q).unwrap();
        let when = if early { When::Applied } else { When::Committed };
        submit(ops, move |tx: &mut Tx<'_>| tx.set_paused(&queue, true), when)
    }

    fn failing(txn: WriteTransaction) -> Result<()> {
        txn.abort().map_err(storage)?;
        Err(Error::Unavailable("the disk said no".into()))
    }

    #[test]
    fn an_early_answer_comes_before_the_commit_and_a_failed_commit_then_stops_the_writer() {
        with_failing_writer(|ops| {
            // answered from the applied batch: the commit that fails comes after
            pause(ops, "a", true).blocking_recv().unwrap().unwrap();
            let later = pause(ops, "b", false).blocking_recv().unwrap().unwrap_err();
            assert!(text(&later).contains("stopped after a failed commit"), "{later}");
            let early_again = pause(ops, "c", true).blocking_recv().unwrap().unwrap_err();
            let early_again = text(&early_again);
            assert!(early_again.contains("stopped after a failed commit"), "{early_again}");
            assert!(early_again.contains("the disk said no"), "{early_again}");
        });
    }

    #[test]
    fn a_failed_commit_without_early_answers_fails_its_batch_only() {
        with_failing_writer(|ops| {
            for q in ["a", "b"] {
                let e = text(&pause(ops, q, false).blocking_recv().unwrap().unwrap_err());
                assert!(e.contains("the disk said no") && !e.contains("stopped"), "{e}");
            }
        });
    }

    #[test]
    fn an_early_operation_that_writes_nothing_keeps_the_writer_going_after_a_failed_commit() {
        with_failing_writer(|ops| {
            let read = |tx: &mut Tx<'_>| tx.paused(&QueueName::new("a").unwrap());
            assert!(!submit(ops, read, When::Applied).blocking_recv().unwrap().unwrap());
            let e = text(&pause(ops, "a", false).blocking_recv().unwrap().unwrap_err());
            assert!(e.contains("the disk said no") && !e.contains("stopped"), "{e}");
        });
    }

    #[test]
    fn readers_waiting_for_an_early_answers_commit_are_let_go_when_the_writer_dies() {
        fn dies(_: WriteTransaction) -> Result<()> {
            panic!("the writer died between an early answer and its commit")
        }
        let dir = tempfile::tempdir().unwrap();
        let db = fresh(&dir);
        let progress = Arc::new(Progress::default());
        let (ops, rx) = mpsc::channel(16);
        let shared = progress.clone();
        let syncs = Syncs::every_commit(CLAIM_SYNC).unwrap();
        let thread =
            std::thread::spawn(move || run(&db, rx, &Wakers::default(), &shared, dies, &syncs));
        pause(&ops, "a", true).blocking_recv().unwrap().unwrap();
        assert!(thread.join().is_err(), "the writer panicked");
        assert!(progress.early.load(Ordering::Acquire) > 0, "the answer was early");
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let wait = std::time::Duration::from_secs(10);
        let waited = rt.block_on(async { tokio::time::timeout(wait, progress.caught_up()).await });
        assert!(waited.is_ok(), "a reader would wait forever");
    }

    /// A writer thread syncing as `syncs` says on a fresh database in `dir`.
    fn writer(
        dir: &tempfile::TempDir,
        syncs: Syncs,
    ) -> (mpsc::Sender<Job>, Arc<Progress>, JoinHandle<()>) {
        let db = fresh(dir);
        let progress = Arc::new(Progress::default());
        let (ops, rx) = mpsc::channel(16);
        let shared = progress.clone();
        let thread = std::thread::spawn(move || {
            run(&db, rx, &Wakers::default(), &shared, commit_txn, &syncs)
        });
        (ops, progress, thread)
    }

    /// A writer thread answering every commit before its sync, which comes at most `within`
    /// after the oldest commit not yet synced.
    fn lazy_writer(
        dir: &tempfile::TempDir,
        within: Duration,
    ) -> (mpsc::Sender<Job>, Arc<Progress>, JoinHandle<()>) {
        writer(dir, Syncs::lazy(within).unwrap())
    }

    /// Waits (at most 10 s, so that a missing sync fails instead of hanging) until every batch
    /// committed so far is synced; answers whether it came.
    fn synced_in_time(progress: &Progress) -> bool {
        let written = *progress.settled.borrow();
        let mut synced = progress.synced.subscribe();
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let ten_s = Duration::from_secs(10);
        let wait = async { tokio::time::timeout(ten_s, synced.wait_for(|s| *s >= written)).await };
        rt.block_on(wait).is_ok()
    }

    /// Whether queue `q` is paused in a copy of the database file as the disk holds it now,
    /// which is what a crash at this moment would leave (the writer is idle while it is copied).
    fn paused_after_a_crash(dir: &tempfile::TempDir, q: &str) -> bool {
        let copy = dir.path().join("crashed.redb");
        std::fs::copy(dir.path().join("w.redb"), &copy).unwrap();
        let db = Database::open(&copy).unwrap();
        let read = redb::ReadableDatabase::begin_read(&db).unwrap();
        let snapshot = super::super::tables::Snapshot::open(&read).unwrap();
        let paused = snapshot.stats(&QueueName::new(q).unwrap()).unwrap().paused;
        drop((snapshot, read, db));
        std::fs::remove_file(copy).unwrap();
        paused
    }

    #[test]
    fn lazy_commits_are_answered_before_their_sync_and_reach_the_disk_when_synced() {
        let dir = tempfile::tempdir().unwrap();
        // a window no test outlasts: nothing is synced unless asked for
        let (ops, progress, thread) = lazy_writer(&dir, Duration::from_secs(3600));
        pause(&ops, "a", false).blocking_recv().unwrap().unwrap();
        assert_eq!(*progress.synced.borrow(), 0, "answered before any sync");
        assert!(!paused_after_a_crash(&dir, "a"), "an unsynced commit is lost to a crash");
        submit(&ops, |_: &mut Tx<'_>| Ok(()), When::Synced).blocking_recv().unwrap().unwrap();
        assert!(paused_after_a_crash(&dir, "a"), "a sync keeps every commit before it");
        // the writer's end syncs what is left
        pause(&ops, "b", false).blocking_recv().unwrap().unwrap();
        assert!(!paused_after_a_crash(&dir, "b"));
        drop(ops);
        thread.join().unwrap();
        assert!(paused_after_a_crash(&dir, "b"), "synced when the store closed");
        assert_eq!(*progress.synced.borrow(), 3, "each of the three batches counted as synced");
    }

    /// Writes once (answered early or not) with `syncs` and no other write after it: the
    /// commit reaches the disk by the window's timer.
    fn synced_by_the_timer(syncs: Syncs, early: bool) {
        let dir = tempfile::tempdir().unwrap();
        let (ops, progress, thread) = writer(&dir, syncs);
        pause(&ops, "a", early).blocking_recv().unwrap().unwrap();
        caught_up(&progress);
        assert!(synced_in_time(&progress), "no sync followed the commit");
        assert!(paused_after_a_crash(&dir, "a"));
        drop(ops);
        thread.join().unwrap();
    }

    #[test]
    fn lazy_commits_are_synced_within_the_window_without_another_write() {
        synced_by_the_timer(Syncs::lazy(Duration::from_millis(20)).unwrap(), false);
    }

    /// Waits until the commit after an early answer has ended.
    fn caught_up(progress: &Progress) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(progress.caught_up());
    }

    #[test]
    fn a_batch_of_claims_alone_is_synced_by_the_next_answered_commit_not_its_own() {
        let dir = tempfile::tempdir().unwrap();
        // a claim window no test outlasts
        let syncs = Syncs::every_commit(Duration::from_secs(3600)).unwrap();
        let (ops, progress, thread) = writer(&dir, syncs);
        pause(&ops, "a", true).blocking_recv().unwrap().unwrap();
        caught_up(&progress);
        assert!(!paused_after_a_crash(&dir, "a"), "an early answer's commit waits for its sync");
        pause(&ops, "b", false).blocking_recv().unwrap().unwrap();
        assert!(paused_after_a_crash(&dir, "b"), "a commit answered after it is synced");
        assert!(paused_after_a_crash(&dir, "a"), "and the early commit before it with it");
        drop(ops);
        thread.join().unwrap();
    }

    #[test]
    fn a_batch_of_claims_alone_is_synced_within_its_window_without_another_write() {
        synced_by_the_timer(Syncs::every_commit(Duration::from_millis(20)).unwrap(), true);
    }

    #[test]
    fn an_operation_that_comes_while_a_batch_is_applied_joins_its_commit_and_sync() {
        let dir = tempfile::tempdir().unwrap();
        // a claim window no test outlasts: only an answered operation syncs the batch
        let syncs = Syncs::every_commit(Duration::from_secs(3600)).unwrap();
        let (ops, progress, thread) = writer(&dir, syncs);
        // sent by the claim-like early operation while it is applied, as a round's claim
        // comes while its writes are applied
        let (reply, joined) = oneshot::channel();
        let b = QueueName::new("b").unwrap();
        let pause_b = move |tx: &mut Tx<'_>| tx.set_paused(&b, true);
        let mut late = Some(Job::Op(Box::new(Pending {
            run: pause_b,
            answer: None,
            reply: Some(reply),
            when: When::Committed,
        })));
        let sender = ops.clone();
        let a = QueueName::new("a").unwrap();
        let early = move |tx: &mut Tx<'_>| {
            if let Some(op) = late.take() {
                sender.try_send(op).map_err(|_| Error::Corrupt("channel full".into()))?;
            }
            tx.set_paused(&a, true)
        };
        submit(&ops, early, When::Applied).blocking_recv().unwrap().unwrap();
        joined.blocking_recv().unwrap().unwrap();
        assert_eq!(*progress.settled.borrow(), 1, "both in one batch");
        assert_eq!(*progress.synced.borrow(), 1, "synced for the operation that joined");
        assert!(paused_after_a_crash(&dir, "b"), "the one that joined is on disk");
        assert!(paused_after_a_crash(&dir, "a"), "with the early one");
        drop(ops);
        thread.join().unwrap();
    }

    /// Runs of a waiting claim, and whether its next run takes something.
    #[derive(Clone, Default)]
    struct Claim {
        runs: Arc<AtomicU64>,
        take: Arc<std::sync::atomic::AtomicBool>,
    }

    /// Sends a claim waiting on queue `q` until `until`: each run counts in `claim`; a run
    /// that may take writes (pauses queue "taken") and answers 7. Answers its reply.
    fn wait_on(
        ops: &mpsc::Sender<Job>,
        q: &str,
        until: Instant,
        claim: &Claim,
    ) -> oneshot::Receiver<Result<u32>> {
        let (reply, answer) = oneshot::channel();
        let (c, taken) = (claim.clone(), QueueName::new("taken").unwrap());
        let run = move |tx: &mut Tx<'_>| {
            c.runs.fetch_add(1, Ordering::SeqCst);
            if !c.take.load(Ordering::SeqCst) {
                return Ok(None);
            }
            tx.set_paused(&taken, true)?;
            Ok(Some(7))
        };
        let queue = QueueName::new(q).unwrap();
        let wait = Waiting { queue, until, run, took: None, reply: Some(reply) };
        ops.blocking_send(Job::Wait(Box::new(wait))).unwrap();
        answer
    }

    /// Sends an operation that resumes queue `q` (which may give it tasks to claim).
    fn resume(ops: &mpsc::Sender<Job>, q: &str) -> oneshot::Receiver<Result<()>> {
        let queue = QueueName::new(q).unwrap();
        submit(ops, move |tx: &mut Tx<'_>| tx.set_paused(&queue, false), When::Committed)
    }

    /// A commit that waits while [`HELD`] is set (at most a minute).
    fn held(txn: WriteTransaction) -> Result<()> {
        let t0 = Instant::now();
        while HELD.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(60) {
            std::thread::yield_now();
        }
        commit_txn(txn)
    }

    static HELD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    #[test]
    fn a_waiting_claim_takes_in_the_batch_that_readies_its_queue_and_answers_before_its_commit() {
        let dir = tempfile::tempdir().unwrap();
        let db = fresh(&dir);
        let (ops, rx) = mpsc::channel(16);
        let syncs = Syncs::every_commit(CLAIM_SYNC).unwrap();
        let thread = std::thread::spawn(move || {
            run(&db, rx, &Wakers::default(), &Progress::default(), held, &syncs)
        });
        let claim = Claim::default();
        let mut got = wait_on(&ops, "q", Instant::now() + HOUR, &claim);
        pause(&ops, "other", false).blocking_recv().unwrap().unwrap();
        assert_eq!(
            claim.runs.load(Ordering::SeqCst),
            1,
            "not run for a batch that gave it nothing"
        );
        assert!(got.try_recv().is_err(), "still waiting");
        HELD.store(true, Ordering::SeqCst);
        claim.take.store(true, Ordering::SeqCst);
        let readied = resume(&ops, "q");
        // the commit of the batch that readied its queue waits until the claim's answer came
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let answer =
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), got).await });
        HELD.store(false, Ordering::SeqCst);
        assert_eq!(answer.expect("answered before the commit").unwrap().unwrap(), 7);
        assert_eq!(claim.runs.load(Ordering::SeqCst), 2);
        readied.blocking_recv().unwrap().unwrap();
        drop(ops);
        thread.join().unwrap();
        assert!(paused_after_a_crash(&dir, "taken"), "what it took was committed and synced");
    }

    #[test]
    fn a_waiting_claim_answers_nothing_when_its_time_runs_out_and_takes_nothing_once_its_caller_is_gone()
     {
        let dir = tempfile::tempdir().unwrap();
        let (ops, _progress, thread) = writer(&dir, Syncs::every_commit(CLAIM_SYNC).unwrap());
        let short = Claim::default();
        let got = wait_on(&ops, "q", Instant::now() + Duration::from_millis(20), &short);
        assert_eq!(got.blocking_recv().unwrap().unwrap(), 0, "nothing taken in time");
        let gone = Claim::default();
        drop(wait_on(&ops, "q", Instant::now() + HOUR, &gone));
        gone.take.store(true, Ordering::SeqCst);
        short.take.store(true, Ordering::SeqCst);
        resume(&ops, "q").blocking_recv().unwrap().unwrap();
        assert_eq!(short.runs.load(Ordering::SeqCst), 1, "a claim that answered is not run again");
        assert!(!paused_after_a_crash(&dir, "taken"), "nothing taken for either");
        drop(ops);
        thread.join().unwrap();
    }

    /// Commits counted per test, for [`first_only`].
    static COMMITS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

    /// Lets the first commit through and fails every later one, counting in `COMMITS[I]`.
    fn first_only<const I: usize>(txn: WriteTransaction) -> Result<()> {
        if COMMITS[I].fetch_add(1, Ordering::SeqCst) == 0 { commit_txn(txn) } else { failing(txn) }
    }

    /// With `syncs`, a first write (answered early or not) whose commit goes through unsynced,
    /// then a write whose commit fails (test `I`'s commits let only the first through): the
    /// failure stops the writer, and no sync is tried after.
    fn a_failed_commit_after_an_unsynced_one_stops_the_writer<const I: usize>(
        syncs: Syncs,
        early: bool,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let db = fresh(&dir);
        let (ops, rx) = mpsc::channel(16);
        let thread = std::thread::spawn(move || {
            run(&db, rx, &Wakers::default(), &Progress::default(), first_only::<I>, &syncs)
        });
        pause(&ops, "a", early).blocking_recv().unwrap().unwrap();
        let failed = text(&pause(&ops, "b", false).blocking_recv().unwrap().unwrap_err());
        assert!(failed.contains("the disk said no") && !failed.contains("stopped"), "{failed}");
        let later = text(&pause(&ops, "c", false).blocking_recv().unwrap().unwrap_err());
        assert!(later.contains("stopped after a failed commit"), "{later}");
        drop(ops);
        thread.join().unwrap();
        assert_eq!(COMMITS[I].load(Ordering::SeqCst), 2, "no sync tried once stopped");
    }

    #[test]
    fn a_failed_commit_after_unsynced_answers_stops_the_lazy_writer() {
        let syncs = Syncs::lazy(Duration::from_secs(3600)).unwrap();
        a_failed_commit_after_an_unsynced_one_stops_the_writer::<0>(syncs, false);
    }

    #[test]
    fn a_failed_commit_after_an_unsynced_batch_of_claims_stops_the_writer() {
        // the claim's commit is still unsynced when the next one fails
        let syncs = Syncs::every_commit(Duration::from_secs(3600)).unwrap();
        a_failed_commit_after_an_unsynced_one_stops_the_writer::<1>(syncs, true);
    }

    #[test]
    fn wakers_forget_queues_nobody_waits_on() {
        let wakers = Wakers::default();
        let names: Vec<QueueName> =
            (0..100).map(|i| QueueName::new(format!("q{i}")).unwrap()).collect();
        for q in &names {
            drop(wakers.subscribe(q));
        }
        let mut kept = wakers.subscribe(&names[0]);
        let _other = wakers.subscribe(&names[1]);
        assert_eq!(wakers.queues.lock().unwrap().len(), 2);
        wakers.wake(std::slice::from_ref(&names[0]));
        assert!(kept.has_changed().unwrap());
        kept.mark_unchanged();
        let _again = wakers.subscribe(&names[2]);
        wakers.wake(std::slice::from_ref(&names[0]));
        assert!(kept.has_changed().unwrap(), "a queue still waited on keeps its channel");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_writer_thread_runs_as_a_batch_thread() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(fresh(&dir));
        let syncs = Syncs::every_commit(CLAIM_SYNC).unwrap();
        let own = || mcpq_os::Stat::read("/proc/thread-self/stat").unwrap().policy;
        let here = own();
        let writer = Writer::start(db, Arc::new(Wakers::default()), syncs).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        // the operation runs on the writer's own thread, and reads that thread's policy
        let policy = rt
            .block_on(writer.write(|_: &mut Tx<'_>| {
                mcpq_os::Stat::read("/proc/thread-self/stat")
                    .map(|s| s.policy)
                    .map_err(|e| Error::Unavailable(Box::new(e)))
            }))
            .unwrap();
        assert_eq!(policy, Some(mcpq_os::SCHED_BATCH));
        assert_eq!(own(), here, "the opener's thread keeps its own policy");
    }
}
