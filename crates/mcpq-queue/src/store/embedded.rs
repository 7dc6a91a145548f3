//! The embedded backend, for a single node: one redb file in `store.path`, with the Redis
//! store's semantics and events (its Lua scripts are the spec, mirrored in `ops`). One writer
//! thread applies operations in durable group commits; reads run on snapshots off the async
//! runtime. Every index is ordered, so no operation scans a queue to find its tasks.

mod ops;
mod tables;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use redb::{Builder, Database, DatabaseError, ReadableDatabase};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use self::ops::{Settle, Staged};
use self::tables::Snapshot;
use self::writer::{CLAIM_SYNC, Syncs, Wakers, Writer};
use crate::config::{QueueConfig, QueueConfigs, StoreConfig};
use crate::error::{Error, InvalidInput, Result};
use crate::event::{Event, EventId, EventKind};
use crate::record::{self, flags};
use crate::store::{
    CancelOutcome, ClaimToken, Claimed, Completion, Disposition, Enqueued, Failure, MAX_BATCH,
    Page, QueueStats, Release, Settled, Store, check_publishable, millis,
};
use crate::task::{NewTask, QueueName, Task, TaskId, TaskState};

/// The database file inside `store.path`.
const FILE_NAME: &str = "mcpq.redb";

/// The name of the thread that applies and commits every write (Linux shows its first 15
/// bytes), for tools that measure where the store's time goes.
pub const WRITER_THREAD: &str = "mcpq-store-writer";
/// Longest a blocking event read waits, as in the Redis store.
const MAX_BLOCK: Duration = Duration::from_secs(60);

/// Maps a redb error: corruption is [`Error::Corrupt`], anything else is the storage failing.
fn storage(e: impl Into<redb::Error>) -> Error {
    match e.into() {
        redb::Error::Corrupted(m) => Error::Corrupt(m),
        other => Error::Unavailable(Box::new(other)),
    }
}

/// A [`Store`] in a local directory, for a single node (the default backend).
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    // declared first: dropping it closes the database, after the writer has finished
    writer: Writer,
    db: Arc<Database>,
    queues: QueueConfigs,
    wakers: Arc<Wakers>,
    dir: PathBuf,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").field("dir", &self.inner.dir).finish()
    }
}

impl EmbeddedStore {
    /// Opens (creating it if needed) the store in directory `dir`, with default queue settings.
    pub fn open_path(dir: impl AsRef<Path>) -> Result<Self> {
        let cfg = StoreConfig { path: dir.as_ref().to_owned(), ..Default::default() };
        Self::open(&cfg, QueueConfigs::default())
    }

    /// Opens (creating it if needed) the store in `store.path`, with the given `[queues]`
    /// configuration. Blocks: after a crash, opening checks the file, which takes a while for a
    /// large one. A directory another process has open is refused with an error naming it.
    pub fn open(cfg: &StoreConfig, queues: QueueConfigs) -> Result<Self> {
        cfg.validate()?;
        queues.validate()?;
        let dir = cfg.path.clone();
        let bad_path = |what: String| Error::Invalid(InvalidInput::new("store.path", what));
        std::fs::create_dir_all(&dir)
            .map_err(|e| bad_path(format!("cannot create directory {}: {e}", dir.display())))?;
        // redb keeps up to its cache of the file in memory (1 GiB by default): bounded here so
        // memory does not grow with the queues' depth
        let db = Builder::new().set_cache_size(cfg.cache_bytes()).create(dir.join(FILE_NAME));
        let db = db.map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => bad_path(format!(
                "{} is in use by another process (its database is locked); stop that process \
                 or choose another directory",
                dir.display()
            )),
            other => storage(other),
        })?;
        let txn = db.begin_write().map_err(storage)?;
        tables::create(&txn)?;
        txn.commit().map_err(storage)?;
        let db = Arc::new(db);
        let wakers = Arc::new(Wakers::default());
        let syncs = match cfg.sync_within() {
            Some(within) => Syncs::lazy(within)?,
            None => Syncs::every_commit(CLAIM_SYNC)?,
        };
        let writer = Writer::start(db.clone(), wakers.clone(), syncs)?;
        Ok(Self { inner: Arc::new(Inner { writer, db, queues, wakers, dir }) })
    }

    /// Syncs every write acknowledged so far to disk: with `store.sync_ms` set, writes are
    /// acknowledged before their sync; without, this costs one empty synced commit.
    pub async fn sync(&self) -> Result<()> {
        self.inner.writer.sync().await
    }

    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn cfg(&self, queue: &QueueName) -> QueueConfig {
        self.inner.queues.get(queue).clone()
    }

    /// Runs `f` on a snapshot that holds every operation answered so far, on a blocking thread.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Snapshot) -> Result<T> + Send + 'static,
    {
        // what an early-answered claim wrote is read back once its commit is done
        self.inner.writer.caught_up().await;
        self.read_committed(f).await
    }

    /// Runs `f` on a snapshot of what is committed, on a blocking thread: a claim answered
    /// early may not be in it yet.
    async fn read_committed<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Snapshot) -> Result<T> + Send + 'static,
    {
        let db = self.inner.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(storage)?;
            f(&Snapshot::open(&txn)?)
        })
        .await
        .map_err(|e| Error::Unavailable(Box::new(e)))?
    }

    /// claim.lua's step on `queue` for up to `max` tasks under a lease of `lease`.
    fn claim_op(
        &self,
        queue: &QueueName,
        max: usize,
        lease: Duration,
    ) -> impl FnMut(&mut tables::Tx<'_>) -> Result<ops::ClaimOut> + Send + 'static {
        let (q, cfg) = (queue.clone(), self.cfg(queue));
        let (max, lease_ms) = (max.clamp(1, MAX_BATCH), millis(lease));
        move |tx| ops::claim(tx, &q, &cfg, max, lease_ms)
    }

    /// Runs a batch operation over `items`, [`MAX_BATCH`] per atomic step, as the Redis store
    /// splits its script calls.
    async fn batched<I, T, F>(&self, items: Vec<I>, op: F) -> Result<Vec<T>>
    where
        I: Send + Sync + 'static,
        T: Send + 'static,
        F: Fn(&mut tables::Tx<'_>, &[I]) -> Result<Vec<T>> + Clone + Send + 'static,
    {
        let mut out = Vec::with_capacity(items.len());
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            let chunk: Vec<I> = items.by_ref().take(MAX_BATCH).collect();
            let op = op.clone();
            out.extend(self.inner.writer.write(move |tx| op(tx, &chunk)).await?);
        }
        Ok(out)
    }
}

/// What an idempotency key remembers of a body: a digest of every field that makes it (the
/// fields enqueue.lua digests).
fn body_digest(priority: i32, max_attempts: u16, flags: u8, delay_ms: u64, spec: &[u8]) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(format!("{priority}|{max_attempts}|{flags}|{delay_ms}|"));
    h.update(spec);
    h.finalize().to_vec()
}

impl Store for EmbeddedStore {
    async fn enqueue(&self, queue: &QueueName, tasks: &[NewTask]) -> Result<Vec<Enqueued>> {
        // every task is checked before any is written
        let staged: Vec<Staged> = NewTask::encode_all(tasks, self.cfg(queue).max_attempts)?
            .into_iter()
            .map(|t| {
                let flags = flags(t.task.idempotent);
                let max_attempts = t.max_attempts;
                let key = t.task.idempotency_key.clone().map(|k| {
                    (k, body_digest(t.priority, max_attempts, flags, t.delay_ms, &t.spec))
                });
                Staged {
                    id: t.id,
                    priority: t.priority,
                    max_attempts,
                    flags,
                    delay_ms: t.delay_ms,
                    spec: t.spec,
                    key,
                }
            })
            .collect();
        let (q, cfg) = (queue.clone(), self.cfg(queue));
        self.batched(staged, move |tx, chunk| ops::enqueue(tx, &q, &cfg, chunk)).await
    }

    async fn claim(&self, queue: &QueueName, max: usize, lease: Duration) -> Result<Vec<Claimed>> {
        let out = self.inner.writer.write_early(self.claim_op(queue, max, lease)).await?;
        out.claimed(queue)
    }

    fn waits_for_claims(&self) -> bool {
        true
    }

    async fn claim_waiting(
        &self,
        queue: &QueueName,
        max: usize,
        lease: Duration,
        wait: Duration,
        cancel: impl Future<Output = ()> + Send,
    ) -> Result<Vec<Claimed>> {
        let mut op = self.claim_op(queue, max, lease);
        let claim = move |tx: &mut tables::Tx<'_>| {
            let out = op(tx)?;
            Ok((!out.tasks.is_empty()).then_some(out))
        };
        let until = std::time::Instant::now() + wait.min(MAX_BLOCK);
        let out = self.inner.writer.write_waiting(queue.clone(), until, claim, cancel).await?;
        out.claimed(queue)
    }

    async fn renew(
        &self,
        queue: &QueueName,
        leases: &[(TaskId, ClaimToken)],
        lease: Duration,
    ) -> Result<Vec<bool>> {
        let q = queue.clone();
        let items: Vec<(TaskId, u32)> = leases.iter().map(|(id, t)| (*id, t.0)).collect();
        let lease_ms = millis(lease);
        self.batched(items, move |tx, chunk| ops::renew(tx, &q, chunk, lease_ms)).await
    }

    async fn complete(&self, queue: &QueueName, items: &[Completion]) -> Result<Vec<Settled>> {
        let items = items
            .iter()
            .map(|c| {
                Ok(Settle {
                    id: c.id,
                    token: c.token.0,
                    server: c.server.clone(),
                    text: c.encoded_result()?,
                    disposition: None,
                    delay_ms: 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (q, cfg) = (queue.clone(), self.cfg(queue));
        self.batched(items, move |tx, chunk| ops::complete(tx, &q, &cfg, chunk)).await
    }

    async fn fail(&self, queue: &QueueName, items: &[Failure]) -> Result<Vec<Settled>> {
        let items = items
            .iter()
            .map(|f| Settle {
                id: f.id,
                token: f.token.0,
                server: f.server.clone(),
                text: f.error.clone().into_bytes(),
                disposition: Some(f.disposition),
                delay_ms: match f.disposition {
                    Disposition::Retry { delay } => millis(delay),
                    Disposition::Fatal | Disposition::Review => 0,
                },
            })
            .collect();
        let (q, cfg) = (queue.clone(), self.cfg(queue));
        self.batched(items, move |tx, chunk| ops::fail(tx, &q, &cfg, chunk)).await
    }

    async fn release(&self, queue: &QueueName, items: &[Release]) -> Result<Vec<Settled>> {
        let items = items
            .iter()
            .map(|r| Settle {
                id: r.id,
                token: r.token.0,
                server: String::new(),
                text: r.reason.clone().into_bytes(),
                disposition: None,
                delay_ms: millis(r.delay),
            })
            .collect();
        let (q, cfg) = (queue.clone(), self.cfg(queue));
        self.batched(items, move |tx, chunk| ops::release(tx, &q, &cfg, chunk)).await
    }

    async fn cancel(&self, queue: &QueueName, id: TaskId) -> Result<CancelOutcome> {
        let (q, cfg) = (queue.clone(), self.cfg(queue));
        self.inner.writer.write(move |tx| ops::cancel(tx, &q, &cfg, id)).await
    }

    async fn retry(&self, queue: &QueueName, id: TaskId) -> Result<TaskState> {
        let (q, cfg) = (queue.clone(), self.cfg(queue));
        self.inner.writer.write(move |tx| ops::retry(tx, &q, &cfg, id)).await
    }

    async fn promote_due(&self, queue: &QueueName, max: usize) -> Result<u64> {
        let (q, cfg, max) = (queue.clone(), self.cfg(queue), max.clamp(1, MAX_BATCH));
        self.inner.writer.write(move |tx| ops::promote_due(tx, &q, &cfg, max)).await
    }

    async fn reap_expired(&self, queue: &QueueName, max: usize) -> Result<u64> {
        let (q, cfg, max) = (queue.clone(), self.cfg(queue), max.clamp(1, MAX_BATCH));
        self.inner.writer.write(move |tx| ops::reap_expired(tx, &q, &cfg, max)).await
    }

    async fn trim(&self, queue: &QueueName) -> Result<u64> {
        let (q, cfg) = (queue.clone(), self.cfg(queue));
        self.inner.writer.write(move |tx| ops::trim(tx, &q, &cfg)).await
    }

    async fn get(&self, queue: &QueueName, id: TaskId) -> Result<Option<Task>> {
        let q = queue.clone();
        self.read(move |s| {
            s.record(&q, id)?.map(|raw| record::decode(&q, id, &raw).map(|r| r.task)).transpose()
        })
        .await
    }

    async fn list(
        &self,
        queue: &QueueName,
        state: TaskState,
        cursor: u64,
        limit: usize,
    ) -> Result<Page> {
        let q = queue.clone();
        let limit = limit.clamp(1, MAX_BATCH);
        let skip = usize::try_from(cursor).unwrap_or(usize::MAX);
        self.read(move |s| {
            let ids = s.list_ids(&q, state, skip, limit)?;
            let next_cursor = (ids.len() == limit).then(|| cursor + limit as u64);
            let mut tasks = Vec::with_capacity(ids.len());
            for id in ids {
                // one snapshot: a listed task always has its record
                if let Some(raw) = s.record(&q, id)? {
                    tasks.push(record::decode(&q, id, &raw)?.task);
                }
            }
            Ok(Page { tasks, next_cursor })
        })
        .await
    }

    async fn stats(&self, queue: &QueueName) -> Result<QueueStats> {
        let q = queue.clone();
        self.read(move |s| s.stats(&q)).await
    }

    async fn set_paused(&self, queue: &QueueName, paused: bool) -> Result<()> {
        let q = queue.clone();
        self.inner.writer.write(move |tx| tx.set_paused(&q, paused)).await
    }

    async fn read_events(
        &self,
        queue: &QueueName,
        after: Option<EventId>,
        max: usize,
        block: Option<Duration>,
    ) -> Result<Vec<Event>> {
        let max = max.clamp(1, MAX_BATCH);
        // subscribed before the first read, so an event committed after it wakes us
        let mut changed = block.map(|_| self.inner.wakers.subscribe(queue));
        let deadline = block.map(|b| Instant::now() + b.clamp(Duration::from_millis(1), MAX_BLOCK));
        loop {
            let q = queue.clone();
            let read = move |s: &Snapshot| s.events(&q, after, max);
            // a waiting reader does not wait for an early claim's commit too: that commit wakes
            // it, and it reads the claim's events then
            let out = match changed {
                Some(_) => self.read_committed(read).await?,
                None => self.read(read).await?,
            };
            let (Some(rx), Some(deadline)) = (changed.as_mut(), deadline) else { return Ok(out) };
            if !out.is_empty() {
                return Ok(out);
            }
            // each pass waits for a commit with events, until the deadline
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return Ok(out),
            }
        }
    }

    async fn publish(
        &self,
        queue: &QueueName,
        kind: EventKind,
        server: &str,
        detail: &str,
    ) -> Result<EventId> {
        check_publishable(kind)?;
        let (q, cfg) = (queue.clone(), self.cfg(queue));
        let (server, detail) = (server.to_owned(), detail.to_owned());
        self.inner.writer.write(move |tx| ops::publish(tx, &q, &cfg, kind, &server, &detail)).await
    }

    async fn last_event_id(&self, queue: &QueueName) -> Result<Option<EventId>> {
        let q = queue.clone();
        self.read(move |s| s.last_event_id(&q)).await
    }
}
