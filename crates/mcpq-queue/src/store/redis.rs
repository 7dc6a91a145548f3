//! The Redis backend. Every key of a queue shares the hash tag `{<queue>}`, so a queue lives in
//! one Cluster slot and each Lua script touches one slot. Task records live in one hash per
//! queue (a key per task costs ~100 more bytes of Redis memory each); ready tasks in one list
//! per priority, which costs ~18 bytes per task where a zset member costs ~110.

mod scripts;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::streams::{StreamId, StreamRangeReply, StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, AsyncConnectionConfig, RedisError, Value};

use crate::config::{QueueConfig, QueueConfigs, StoreConfig};
use crate::error::{Error, Result};
use crate::event::{Event, EventId, EventKind, RawEntry};
use crate::record;
use crate::store::{
    CancelOutcome, ClaimToken, Claimed, Completion, Enqueued, Failure, MAX_BATCH, Page, QueueStats,
    Release, Settled, Store, check_publishable,
};
use crate::task::{NewTask, QueueName, Task, TaskId, TaskState};

/// Blocking connections kept for event reads.
const MAX_IDLE_READERS: usize = 8;

/// The Redis keys of one queue.
#[derive(Debug)]
pub(crate) struct Keys {
    prefix: String,
    tasks: String,
    ready: String,
    prios: String,
    scheduled: String,
    leases: String,
    review: String,
    succeeded: String,
    failed: String,
    dead: String,
    cancelled: String,
    events: String,
    meta: String,
}

impl Keys {
    fn new(queue: &QueueName) -> Self {
        let prefix = format!("mcpq:{{{queue}}}:");
        let k = |s: &str| format!("{prefix}{s}");
        Self {
            tasks: k("tasks"),
            ready: k("ready:"),
            prios: k("prios"),
            scheduled: k("scheduled"),
            leases: k("leases"),
            review: k("review"),
            succeeded: k("succeeded"),
            failed: k("failed"),
            dead: k("dead"),
            cancelled: k("cancelled"),
            events: k("events"),
            meta: k("meta"),
            prefix,
        }
    }

    fn idempotency(&self, key: &str) -> String {
        format!("{}idem:{key}", self.prefix)
    }

    /// Where tasks of a state are kept.
    fn holder(&self, state: TaskState) -> Holder<'_> {
        match state {
            TaskState::Queued => Holder::Ready,
            TaskState::Scheduled => Holder::Zset(&self.scheduled),
            TaskState::Running => Holder::Zset(&self.leases),
            TaskState::Review => Holder::Zset(&self.review),
            TaskState::Succeeded => Holder::List(&self.succeeded),
            TaskState::Failed => Holder::List(&self.failed),
            TaskState::Dead => Holder::List(&self.dead),
            TaskState::Cancelled => Holder::List(&self.cancelled),
        }
    }
}

/// The structure holding the tasks of one state.
enum Holder<'a> {
    /// The per-priority ready lists.
    Ready,
    /// A zset ordered by time (due, lease deadline, arrival in review).
    Zset(&'a str),
    /// A list in finish order, oldest first.
    List(&'a str),
}

/// A [`Store`] on Redis (or anything speaking its protocol with Lua and streams).
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    conn: ConnectionManager,
    queues: QueueConfigs,
    keys: RwLock<HashMap<QueueName, Arc<Keys>>>,
    readers: Mutex<Vec<MultiplexedConnection>>,
    cfg: StoreConfig,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // the URL may carry a password: show only the address
        f.debug_struct("RedisStore")
            .field("addr", &self.inner.client.get_connection_info().addr())
            .finish()
    }
}

impl RedisStore {
    /// Connects with default settings and queue configuration.
    pub async fn connect(url: &str) -> Result<Self> {
        let cfg = StoreConfig { redis_url: Some(url.to_owned()), ..Default::default() };
        Self::open(&cfg, QueueConfigs::default()).await
    }

    /// Connects as `[store]` says, with the given `[queues]` configuration.
    pub async fn open(cfg: &StoreConfig, queues: QueueConfigs) -> Result<Self> {
        cfg.validate()?;
        queues.validate()?;
        let url = cfg.redis_url.as_deref().ok_or_else(|| {
            Error::Invalid(crate::InvalidInput::new("store.redis_url", "is not set"))
        })?;
        let client = redis::Client::open(url)?;
        let manager_cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.connect_timeout()))
            .set_response_timeout(Some(cfg.response_timeout()));
        let conn = ConnectionManager::new_with_config(client.clone(), manager_cfg).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                conn,
                queues,
                keys: RwLock::new(HashMap::new()),
                readers: Mutex::new(Vec::new()),
                cfg: cfg.clone(),
            }),
        })
    }

    fn keys(&self, queue: &QueueName) -> Arc<Keys> {
        // a poisoned lock only means another thread panicked mid-insert of a pure value
        if let Some(k) = self.inner.keys.read().unwrap_or_else(|e| e.into_inner()).get(queue) {
            return k.clone();
        }
        let k = Arc::new(Keys::new(queue));
        self.inner.keys.write().unwrap_or_else(|e| e.into_inner()).insert(queue.clone(), k.clone());
        k
    }

    fn cfg(&self, queue: &QueueName) -> &QueueConfig {
        self.inner.queues.get(queue)
    }

    fn conn(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }

    /// Runs `op`, once more after a dropped connection: the manager reconnects meanwhile.
    /// Only for operations that are safe to repeat (fenced, or keyed by task id).
    async fn retrying<T, F, Fut>(&self, mut op: F) -> Result<T>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        match op(self.conn()).await {
            Err(Error::Unavailable(e)) if e.downcast_ref().is_some_and(transient) => {
                tracing::debug!(error = %e, "redis connection dropped; retrying once");
                op(self.conn()).await
            }
            other => other,
        }
    }

    /// Runs a batch script over `items`, [`MAX_BATCH`] at a time, each call retried as above.
    async fn batched<'a, I, T, F, Fut>(&self, items: &'a [I], op: F) -> Result<Vec<T>>
    where
        F: Fn(ConnectionManager, &'a [I]) -> Fut,
        Fut: Future<Output = Result<Vec<T>>>,
    {
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(MAX_BATCH) {
            out.extend(self.retrying(|c| op(c, chunk)).await?);
        }
        Ok(out)
    }

    async fn reader(&self) -> Result<MultiplexedConnection> {
        let idle = self.inner.readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
        if let Some(c) = idle {
            return Ok(c);
        }
        // blocking reads get their own connection: on the shared one they would stall every
        // command queued behind them; their time limit is applied around each call instead
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.inner.cfg.connect_timeout()))
            .set_response_timeout(None);
        Ok(self.inner.client.get_multiplexed_async_connection_with_config(&cfg).await?)
    }

    fn return_reader(&self, c: MultiplexedConnection) {
        let mut idle = self.inner.readers.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE_READERS {
            idle.push(c);
        }
    }

    fn decode_all(
        &self,
        queue: &QueueName,
        ids: &[TaskId],
        recs: Vec<Option<Vec<u8>>>,
    ) -> Result<Vec<Task>> {
        // a task trimmed between listing its id and reading its record is left out
        ids.iter()
            .zip(recs)
            .filter_map(|(id, rec)| rec.map(|r| record::decode(queue, *id, &r).map(|r| r.task)))
            .collect()
    }

    async fn records(&self, k: &Keys, ids: &[TaskId]) -> Result<Vec<Option<Vec<u8>>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let fields: Vec<&[u8]> = ids.iter().map(|id| id.as_bytes().as_slice()).collect();
        let mut conn = self.conn();
        Ok(redis::cmd("HMGET").arg(&k.tasks).arg(fields).query_async(&mut conn).await?)
    }

    /// The events of `entries` after `after`, at most `max`.
    fn expand(
        &self,
        queue: &QueueName,
        entries: &[StreamId],
        after: Option<EventId>,
        max: usize,
    ) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        for entry in entries {
            for e in parse_entry(queue, entry)? {
                if after.is_none_or(|a| e.id > a) {
                    out.push(e);
                    if out.len() == max {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    async fn list_queued(&self, k: &Keys, mut skip: u64, limit: usize) -> Result<Vec<TaskId>> {
        let mut conn = self.conn();
        let levels: Vec<String> = conn.zrange(&k.prios, 0, -1).await?;
        let mut ids = Vec::new();
        for level in levels {
            let key = format!("{}{level}", k.ready);
            let len: u64 = conn.llen(&key).await?;
            if skip >= len {
                skip -= len;
                continue;
            }
            let want = (limit - ids.len()) as isize;
            let got: Vec<Vec<u8>> =
                conn.lrange(&key, skip as isize, skip as isize + want - 1).await?;
            skip = 0;
            ids.extend(got.iter().filter_map(|b| TaskId::from_slice(b)));
            if ids.len() >= limit {
                break;
            }
        }
        Ok(ids)
    }
}

fn transient(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal()
}

/// Expands one stream entry into its events, one per task it names.
fn parse_entry(queue: &QueueName, entry: &StreamId) -> Result<Vec<Event>> {
    let (ms, seq) = entry
        .id
        .split_once('-')
        .and_then(|(ms, seq)| Some((ms.parse().ok()?, seq.parse().ok()?)))
        .ok_or_else(|| Error::Corrupt(format!("event entry {}: bad id", entry.id)))?;
    let field = |name: &str| match entry.map.get(name) {
        Some(Value::BulkString(b)) => Some(b.as_slice()),
        _ => None,
    };
    RawEntry {
        ms,
        seq,
        kind: field("k").unwrap_or_default(),
        tasks: field("t"),
        attempts: field("a"),
        servers: field("s"),
        errors: field("e"),
    }
    .events(queue)
}

impl Store for RedisStore {
    async fn enqueue(&self, queue: &QueueName, tasks: &[NewTask]) -> Result<Vec<Enqueued>> {
        // every task is checked before any is written
        let (k, cfg) = (&self.keys(queue), self.cfg(queue));
        let encoded = NewTask::encode_all(tasks, cfg.max_attempts)?;
        // re-sending the same ids is harmless: existing ids are answered, not re-created
        self.batched(&encoded, |mut c, chunk| async move {
            scripts::enqueue(&mut c, k, cfg, chunk).await
        })
        .await
    }

    async fn claim(&self, queue: &QueueName, max: usize, lease: Duration) -> Result<Vec<Claimed>> {
        let k = &self.keys(queue);
        // not retried: a claim whose reply was lost is recovered by the reaper, and a blind
        // retry would claim a second batch
        let reply =
            scripts::claim(&mut self.conn(), k, self.cfg(queue), max.clamp(1, MAX_BATCH), lease)
                .await?;
        // sized up front: collecting results grows the vector from empty, copying the claimed
        // tasks (a few hundred bytes each) at every doubling, 60 copies for a batch of 50
        let mut out = Vec::with_capacity(reply.tasks.len());
        for (id, raw) in &reply.tasks {
            out.push(Claimed::decode(queue, *id, raw, reply.deadline_ms)?);
        }
        Ok(out)
    }

    async fn renew(
        &self,
        queue: &QueueName,
        leases: &[(TaskId, ClaimToken)],
        lease: Duration,
    ) -> Result<Vec<bool>> {
        let k = &self.keys(queue);
        self.batched(
            leases,
            |mut c, chunk| async move { scripts::renew(&mut c, k, chunk, lease).await },
        )
        .await
    }

    async fn complete(&self, queue: &QueueName, items: &[Completion]) -> Result<Vec<Settled>> {
        let (k, cfg) = (&self.keys(queue), self.cfg(queue));
        self.batched(
            items,
            |mut c, chunk| async move { scripts::complete(&mut c, k, cfg, chunk).await },
        )
        .await
    }

    async fn fail(&self, queue: &QueueName, items: &[Failure]) -> Result<Vec<Settled>> {
        let (k, cfg) = (&self.keys(queue), self.cfg(queue));
        self.batched(
            items,
            |mut c, chunk| async move { scripts::fail(&mut c, k, cfg, chunk).await },
        )
        .await
    }

    async fn release(&self, queue: &QueueName, items: &[Release]) -> Result<Vec<Settled>> {
        let (k, cfg) = (&self.keys(queue), self.cfg(queue));
        self.batched(
            items,
            |mut c, chunk| async move { scripts::release(&mut c, k, cfg, chunk).await },
        )
        .await
    }

    async fn cancel(&self, queue: &QueueName, id: TaskId) -> Result<CancelOutcome> {
        let k = &self.keys(queue);
        let (code, state) = scripts::cancel(&mut self.conn(), k, self.cfg(queue), id).await?;
        match (code, state) {
            (1, Some(was)) => Ok(CancelOutcome::Cancelled { was }),
            (0, Some(st)) => Ok(CancelOutcome::AlreadyFinished(st)),
            _ => Err(Error::NotFound(id)),
        }
    }

    async fn retry(&self, queue: &QueueName, id: TaskId) -> Result<TaskState> {
        let k = &self.keys(queue);
        match scripts::retry(&mut self.conn(), k, self.cfg(queue), id).await? {
            (1, Some(was)) => Ok(was),
            (0, Some(state)) => Err(Error::InvalidState { state }),
            _ => Err(Error::NotFound(id)),
        }
    }

    async fn promote_due(&self, queue: &QueueName, max: usize) -> Result<u64> {
        let k = &self.keys(queue);
        let cfg = self.cfg(queue);
        let max = max.clamp(1, MAX_BATCH);
        self.retrying(|mut c| async move { scripts::promote_due(&mut c, k, cfg, max).await }).await
    }

    async fn reap_expired(&self, queue: &QueueName, max: usize) -> Result<u64> {
        let k = &self.keys(queue);
        let cfg = self.cfg(queue);
        let max = max.clamp(1, MAX_BATCH);
        self.retrying(|mut c| async move { scripts::reap_expired(&mut c, k, cfg, max).await }).await
    }

    async fn trim(&self, queue: &QueueName) -> Result<u64> {
        let k = &self.keys(queue);
        let cfg = self.cfg(queue);
        self.retrying(|mut c| async move { scripts::trim(&mut c, k, cfg).await }).await
    }

    async fn get(&self, queue: &QueueName, id: TaskId) -> Result<Option<Task>> {
        let k = &self.keys(queue);
        let raw: Option<Vec<u8>> = self
            .retrying(|mut c| async move { Ok(c.hget(&k.tasks, id.as_bytes().as_slice()).await?) })
            .await?;
        raw.map(|r| record::decode(queue, id, &r).map(|r| r.task)).transpose()
    }

    async fn list(
        &self,
        queue: &QueueName,
        state: TaskState,
        cursor: u64,
        limit: usize,
    ) -> Result<Page> {
        let k = &self.keys(queue);
        let limit = limit.clamp(1, MAX_BATCH);
        let (start, stop) = (cursor as isize, cursor as isize + limit as isize - 1);
        let ids: Vec<TaskId> = match k.holder(state) {
            Holder::Ready => self.list_queued(k, cursor, limit).await?,
            Holder::Zset(zset) => {
                let raw: Vec<Vec<u8>> = self.conn().zrange(zset, start, stop).await?;
                raw.iter().filter_map(|b| TaskId::from_slice(b)).collect()
            }
            Holder::List(list) => {
                // newest first: count from the tail
                let raw: Vec<Vec<u8>> = self.conn().lrange(list, -stop - 1, -start - 1).await?;
                raw.iter().rev().filter_map(|b| TaskId::from_slice(b)).collect()
            }
        };
        let next_cursor = (ids.len() == limit).then(|| cursor + limit as u64);
        let recs = self.records(k, &ids).await?;
        Ok(Page { tasks: self.decode_all(queue, &ids, recs)?, next_cursor })
    }

    async fn stats(&self, queue: &QueueName) -> Result<QueueStats> {
        let k = &self.keys(queue);
        self.retrying(|mut c| async move { scripts::stats(&mut c, k).await }).await
    }

    async fn set_paused(&self, queue: &QueueName, paused: bool) -> Result<()> {
        let k = &self.keys(queue);
        self.retrying(|mut c| async move {
            if paused {
                let _: () = c.hset(&k.meta, "paused", 1).await?;
            } else {
                let _: () = c.hdel(&k.meta, "paused").await?;
            }
            Ok(())
        })
        .await
    }

    async fn read_events(
        &self,
        queue: &QueueName,
        after: Option<EventId>,
        max: usize,
        block: Option<Duration>,
    ) -> Result<Vec<Event>> {
        let k = &self.keys(queue);
        let max = max.clamp(1, MAX_BATCH);
        // the entry holding `after` may have events past it: read from it, inclusively, and one
        // entry more, since that entry may have none past it and every later one has at least one
        let start = &after.map_or_else(|| "-".to_owned(), |id| id.entry());
        let count = max + usize::from(after.is_some());
        let reply: StreamRangeReply = self
            .retrying(
                |mut c| async move { Ok(c.xrange_count(&k.events, start, "+", count).await?) },
            )
            .await?;
        let mut out = self.expand(queue, &reply.ids, after, max)?;
        if let (true, Some(block)) = (out.is_empty(), block) {
            let from = after.map_or_else(|| "0-0".to_owned(), |id| id.entry());
            let mut conn = self.reader().await?;
            let block_ms = block.as_millis().clamp(1, 60_000) as usize;
            let opts = StreamReadOptions::default().count(max).block(block_ms);
            let limit = block + self.inner.cfg.response_timeout();
            let reply: Option<StreamReadReply> =
                tokio::time::timeout(limit, conn.xread_options(&[&k.events], &[&from], &opts))
                    .await
                    .map_err(|_| Error::Timeout)??;
            self.return_reader(conn);
            let entries: Vec<StreamId> =
                reply.map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect()).unwrap_or_default();
            out = self.expand(queue, &entries, after, max)?;
        }
        Ok(out)
    }

    async fn publish(
        &self,
        queue: &QueueName,
        kind: EventKind,
        server: &str,
        detail: &str,
    ) -> Result<EventId> {
        check_publishable(kind)?;
        let k = &self.keys(queue);
        let max = self.cfg(queue).events_max;
        let pack = |s: &str| {
            // a one-element array of a string cannot fail to encode
            rmp_serde::to_vec(&[s]).unwrap_or_default()
        };
        let (s, e) = (pack(server), pack(detail));
        // an XADD alone: not safe to repeat on a dropped connection (it would add a second entry)
        let id: String = redis::cmd("XADD")
            .arg(&k.events)
            .arg("MAXLEN")
            .arg("~")
            .arg(max)
            .arg("*")
            .arg("k")
            .arg(kind.code())
            .arg("s")
            .arg(s)
            .arg("e")
            .arg(e)
            .query_async(&mut self.conn())
            .await?;
        let entry: EventId = id.parse().map_err(|_| Error::Corrupt(format!("stream id {id}")))?;
        Ok(EventId { index: 0, ..entry })
    }

    async fn last_event_id(&self, queue: &QueueName) -> Result<Option<EventId>> {
        let k = &self.keys(queue);
        let reply: StreamRangeReply = self
            .retrying(|mut c| async move { Ok(c.xrevrange_count(&k.events, "+", "-", 1).await?) })
            .await?;
        Ok(match reply.ids.first() {
            Some(entry) => parse_entry(queue, entry)?.last().map(|e| e.id),
            None => None,
        })
    }
}
