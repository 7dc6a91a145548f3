//! The single writer: one thread owns every write transaction. Callers send operations over a
//! channel; the thread takes whatever is queued (up to [`MAX_OPS`]), applies all of it in one
//! transaction with a durable commit, and only then answers each caller, so an acknowledged
//! operation survives a crash while the cost of the sync is shared by the whole batch.
//!
//! A claim is answered as soon as its batch has been applied, before the commit: what it
//! changes (a task running under a new token) needs no sync to be safe, because a claim lost to
//! a crash leaves its task queued, to run again after the restart just as a task whose call was
//! cut by the crash does, and the sync then no longer delays the call. Nothing else sees the
//! claim before the commit: wake-ups follow commits, and a read that starts after an early answer
//! waits for that answer's commit ([`Writer::caught_up`]), so whoever learnt of the claim reads
//! it back. Should that commit fail, the writer stops (every later operation fails until the
//! store is reopened), so a token handed out early is never handed out twice by one process.
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

/// An operation waiting for the writer: it runs against the transaction (again, if the batch
/// is redone) and keeps its answer until the commit decides it.
pub(super) trait Op: Send {
    /// Runs the operation; on success keeps the answer for [`Op::answer`].
    fn apply(&mut self, tx: &mut Tx<'_>) -> Result<()>;
    /// Keeps an error as the answer.
    fn refuse(&mut self, e: Error);
    /// Whether it is answered once applied, before its batch's commit.
    fn early(&self) -> bool;
    /// Sends the kept answer, or `failed` (the commit's error) in place of a success; a second
    /// call sends nothing.
    fn answer(&mut self, failed: Option<&Error>);
}

struct Pending<T, F> {
    run: F,
    answer: Option<Result<T>>,
    reply: Option<oneshot::Sender<Result<T>>>,
    early: bool,
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

    fn early(&self) -> bool {
        self.early
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
/// with writes, and the last one whose commit ended (committed or failed).
struct Progress {
    early: AtomicU64,
    settled: watch::Sender<u64>,
}

impl Default for Progress {
    fn default() -> Self {
        Self { early: AtomicU64::new(0), settled: watch::Sender::new(0) }
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
    ops: mpsc::Sender<Box<dyn Op>>,
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

impl Writer {
    /// Starts the writer thread on `db`.
    pub(super) fn start(db: Arc<Database>, wakers: Arc<Wakers>) -> Result<Self> {
        let (ops, rx) = mpsc::channel(QUEUE_DEPTH);
        let progress = Arc::new(Progress::default());
        let shared = progress.clone();
        let thread = std::thread::Builder::new()
            .name("mcpq-store-writer".into())
            .spawn(move || run(&db, rx, &wakers, &shared, sync))
            .map_err(|e| Error::Unavailable(Box::new(e)))?;
        Ok(Self { ops, progress, _thread: Joiner(Some(thread)) })
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
        self.send(op, false).await
    }

    /// Runs `op` in the next batch and answers once the batch is applied, before its commit:
    /// for claims only (see the module's comment).
    pub(super) async fn write_early<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut Tx<'_>) -> Result<T> + Send + 'static,
    {
        self.send(op, true).await
    }

    async fn send<T, F>(&self, op: F, early: bool) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut Tx<'_>) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let pending = Box::new(Pending { run: op, answer: None, reply: Some(reply), early });
        self.ops.send(pending).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// Commits a write transaction durably.
fn sync(txn: WriteTransaction) -> Result<()> {
    txn.commit().map_err(storage)
}

/// The writer's loop; `sync` commits each batch's transaction (a test makes it fail).
fn run(
    db: &Database,
    mut rx: mpsc::Receiver<Box<dyn Op>>,
    wakers: &Wakers,
    progress: &Progress,
    sync: fn(WriteTransaction) -> Result<()>,
) {
    let _ended = Ended(progress);
    // set once a commit fails after early answers: every later operation is refused
    let mut halted: Option<Error> = None;
    let mut batch = 0u64;
    while let Some(first) = rx.blocking_recv() {
        let mut ops = vec![first];
        while ops.len() < MAX_OPS {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        if let Some(e) = &halted {
            for mut op in ops {
                op.answer(Some(e));
            }
            continue;
        }
        batch += 1;
        let done = commit(db, &mut ops, || progress.early.store(batch, Ordering::Release), sync);
        progress.settled.send_replace(batch);
        // whether this batch answered early with writes
        let early = progress.early.load(Ordering::Relaxed) == batch;
        match done {
            Ok(woken) => {
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
                    tracing::error!(
                        "claims were answered before this failed commit: the embedded store \
                         refuses every write until it is reopened"
                    );
                    let why = format!(
                        "the embedded store stopped after a failed commit ({}); restart to \
                         reopen it",
                        text(&e)
                    );
                    halted = Some(Error::Unavailable(why.into()));
                }
            }
        }
    }
}

/// Applies `ops` in one durable transaction; answers the queues with new events. An operation
/// that fails after writing is answered at once and taken out, and the batch is redone. Early
/// operations are answered between the last pass and the commit, after `announce` when any of
/// them wrote.
fn commit(
    db: &Database,
    ops: &mut Vec<Box<dyn Op>>,
    announce: impl FnOnce(),
    sync: fn(WriteTransaction) -> Result<()>,
) -> Result<Vec<QueueName>> {
    // each pass either commits or takes one operation out
    for _ in 0..=ops.len() {
        let mut txn = db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate).map_err(storage)?;
        let mut tx = Tx::open(&txn)?;
        let mut broken = None;
        let mut wrote_early = false;
        for (i, op) in ops.iter_mut().enumerate() {
            tx.begin_op();
            if let Err(e) = op.apply(&mut tx) {
                if tx.dirty() {
                    broken = Some((i, e));
                    break;
                }
                op.refuse(e);
            }
            wrote_early |= op.early() && tx.dirty();
        }
        if let Some((i, e)) = broken {
            drop(tx);
            txn.abort().map_err(storage)?;
            tracing::warn!(error = %e, "a store operation failed halfway; batch redone without it");
            let mut op = ops.remove(i);
            op.refuse(e);
            op.answer(None);
            continue;
        }
        let woken = tx.finish()?;
        if wrote_early {
            announce();
        }
        for op in ops.iter_mut().filter(|op| op.early()) {
            op.answer(None);
        }
        sync(txn)?;
        return Ok(woken);
    }
    Err(Error::Corrupt("a batch kept failing halfway".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn with_failing_writer(test: impl FnOnce(&mpsc::Sender<Box<dyn Op>>)) {
        let dir = tempfile::tempdir().unwrap();
        let db = fresh(&dir);
        let (ops, rx) = mpsc::channel(16);
        let thread = std::thread::spawn(move || {
            run(&db, rx, &Wakers::default(), &Progress::default(), failing)
        });
        test(&ops);
        drop(ops);
        thread.join().unwrap();
    }

    /// Sends an operation to the writer; answers its reply.
    fn submit<T, F>(
        ops: &mpsc::Sender<Box<dyn Op>>,
        run: F,
        early: bool,
    ) -> oneshot::Receiver<Result<T>>
    where
        T: Send + 'static,
        F: FnMut(&mut Tx<'_>) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let op = Pending { run, answer: None, reply: Some(reply), early };
        ops.blocking_send(Box::new(op)).unwrap();
        answer
    }

    /// Sends an operation that pauses queue `q` (a write); answers its reply.
    fn pause(
        ops: &mpsc::Sender<Box<dyn Op>>,
        q: &str,
        early: bool,
    ) -> oneshot::Receiver<Result<()>> {
        let queue = QueueName::new(q).unwrap();
        submit(ops, move |tx: &mut Tx<'_>| tx.set_paused(&queue, true), early)
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
            assert!(!submit(ops, read, true).blocking_recv().unwrap().unwrap());
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
        let thread = std::thread::spawn(move || run(&db, rx, &Wakers::default(), &shared, dies));
        pause(&ops, "a", true).blocking_recv().unwrap().unwrap();
        assert!(thread.join().is_err(), "the writer panicked");
        assert!(progress.early.load(Ordering::Acquire) > 0, "the answer was early");
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let wait = std::time::Duration::from_secs(10);
        let waited = rt.block_on(async { tokio::time::timeout(wait, progress.caught_up()).await });
        assert!(waited.is_ok(), "a reader would wait forever");
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
}
