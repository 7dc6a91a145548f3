//! The single writer: one thread owns every write transaction. Callers send operations over a
//! channel; the thread takes whatever is queued (up to [`MAX_OPS`]), applies all of it in one
//! transaction with a durable commit, and only then answers each caller, so an acknowledged
//! operation survives a crash while the cost of the sync is shared by the whole batch.
//!
//! Each operation is all-or-nothing on its own. One that fails before writing anything is
//! answered with its error and the batch carries on. One that fails after writing (corrupt
//! data met halfway, a storage error) would leave half a transition in the shared transaction,
//! so the transaction is dropped and the batch redone without it; that happens at most once per
//! operation in the batch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use redb::{Database, Durability};
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
    /// Sends the kept answer, or `failed` (the commit's error) in place of a success.
    fn answer(self: Box<Self>, failed: Option<&Error>);
}

struct Pending<T, F> {
    run: F,
    answer: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
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

    fn answer(self: Box<Self>, failed: Option<&Error>) {
        let answer = match (self.answer, failed) {
            // an operation refused on its own keeps its own reason
            (Some(Err(e)), _) => Err(e),
            (_, Some(e)) => Err(copy(e)),
            (Some(ok), None) => ok,
            (None, None) => Err(Error::Corrupt("the operation never ran".into())),
        };
        // the caller may have stopped waiting; the operation stands either way
        let _ = self.reply.send(answer);
    }
}

/// The same error again, for every caller of a failed batch.
fn copy(e: &Error) -> Error {
    match e {
        Error::Corrupt(m) => Error::Corrupt(m.clone()),
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(s) = source {
                text = format!("{text}: {s}");
                source = s.source();
            }
            Error::Unavailable(text.into())
        }
    }
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

/// The writer's handle: where operations go, and the thread, joined once the last handle is
/// gone (so the database is closed when the store is dropped).
pub(super) struct Writer {
    // declared before `thread`: fields drop in order, and the thread ends when this closes
    ops: mpsc::Sender<Box<dyn Op>>,
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
        let thread = std::thread::Builder::new()
            .name("mcpq-store-writer".into())
            .spawn(move || run(&db, rx, &wakers))
            .map_err(|e| Error::Unavailable(Box::new(e)))?;
        Ok(Self { ops, _thread: Joiner(Some(thread)) })
    }

    /// Runs `op` in the next batch and answers once its batch is committed.
    pub(super) async fn write<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut Tx<'_>) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let pending = Box::new(Pending { run: op, answer: None, reply });
        self.ops.send(pending).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn run(db: &Database, mut rx: mpsc::Receiver<Box<dyn Op>>, wakers: &Wakers) {
    while let Some(first) = rx.blocking_recv() {
        let mut ops = vec![first];
        while ops.len() < MAX_OPS {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        match commit(db, &mut ops) {
            Ok(woken) => {
                for op in ops {
                    op.answer(None);
                }
                wakers.wake(&woken);
            }
            Err(e) => {
                tracing::error!(error = %e, ops = ops.len(), "embedded store commit failed");
                for op in ops {
                    op.answer(Some(&e));
                }
            }
        }
    }
}

/// Applies `ops` in one durable transaction; answers the queues with new events. An operation
/// that fails after writing is answered at once and taken out, and the batch is redone.
fn commit(db: &Database, ops: &mut Vec<Box<dyn Op>>) -> Result<Vec<QueueName>> {
    // each pass either commits or takes one operation out
    for _ in 0..=ops.len() {
        let mut txn = db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate).map_err(storage)?;
        let mut tx = Tx::open(&txn)?;
        let mut broken = None;
        for (i, op) in ops.iter_mut().enumerate() {
            tx.begin_op();
            if let Err(e) = op.apply(&mut tx) {
                if tx.dirty() {
                    broken = Some((i, e));
                    break;
                }
                op.refuse(e);
            }
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
        txn.commit().map_err(storage)?;
        return Ok(woken);
    }
    Err(Error::Corrupt("a batch kept failing halfway".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
