//! The embedded store's tables and the two views on them: [`Tx`], the writer's, which keeps
//! every index and count in step with each record it rewrites, and [`Snapshot`], a reader's.
//! Every key starts with the queue's name, so a queue is one contiguous range of each table.
//!
//! A task sits in exactly one index, chosen by its state, at the place its `slot` (stored beside
//! the record) names: queued → `ready` (priority level, list position); scheduled, running and
//! review → `timed` (due time, lease deadline, arrival); finished → `finished` (finish order).

use std::collections::HashMap;

use redb::{
    ReadOnlyTable, ReadTransaction, ReadableTable, Table, TableDefinition, WriteTransaction,
};

use super::storage;
use crate::error::{Error, Result};
use crate::event::{Event, EventId, EventKind, RawEntry};
use crate::store::QueueStats;
use crate::task::{QueueName, TaskId, TaskState};

type Bytes = &'static [u8];
type TaskKey = (Bytes, u128);
type TaskValue = (u64, Bytes);
type ReadyKey = (Bytes, i64, u64);
type TimedKey = (Bytes, u8, u64, u128);
type FinishedKey = (Bytes, u8, u64);
type MetaKey = (Bytes, u8);
type IdemKey = (Bytes, Bytes);
type IdemValue = (u128, Bytes, u64);
type ExpiryKey = (Bytes, u64, Bytes);
type EventKey = (Bytes, u64, u64);
type EntryValue = (Bytes, Bytes, Bytes, Bytes, Bytes);

/// `(queue, id)` → `(slot, record)`; the record is [`crate::record`]'s layout.
const TASKS: TableDefinition<'_, TaskKey, TaskValue> = TableDefinition::new("tasks");
/// `(queue, -priority, position)` → id: one list per priority level, highest level first.
const READY: TableDefinition<'_, ReadyKey, u128> = TableDefinition::new("ready");
/// `(queue, state code, time, id)` → (): scheduled by due time, running by lease deadline,
/// review by arrival; ties by id bytes, as in a Redis zset.
const TIMED: TableDefinition<'_, TimedKey, ()> = TableDefinition::new("timed");
/// `(queue, state code, sequence)` → id: finished tasks of each state in finish order.
const FINISHED: TableDefinition<'_, FinishedKey, u128> = TableDefinition::new("finished");
/// `(queue, field)` → value: counts per state (fields 1..=8, the state codes) and the fields
/// below.
const META: TableDefinition<'_, MetaKey, u64> = TableDefinition::new("meta");
/// `(queue, key)` → `(holder id, body digest, expiry ms)`.
const IDEM: TableDefinition<'_, IdemKey, IdemValue> = TableDefinition::new("idempotency");
/// `(queue, expiry ms, key)` → (): idempotency keys by expiry, for sweeping.
const IDEM_EXPIRY: TableDefinition<'_, ExpiryKey, ()> = TableDefinition::new("idempotency_expiry");
/// `(queue, ms, seq)` → `(kind code, t, a, s, e)`: one stream entry, fields as in
/// [`RawEntry`], an empty field standing for an absent one.
const EVENTS: TableDefinition<'_, EventKey, EntryValue> = TableDefinition::new("events");

const PAUSED: u8 = 16;
const LAST_EVENT_MS: u8 = 17;
const LAST_EVENT_SEQ: u8 = 18;
const EVENT_ENTRIES: u8 = 19;

/// Position of the first task pushed onto an empty ready list; lists grow both ways from it.
const MIDDLE: u64 = 1 << 63;

/// Most priority levels a claim looks at, as in the Redis store.
pub(super) const MAX_PRIORITY_LEVELS: usize = 64;

fn key(id: TaskId) -> u128 {
    u128::from_be_bytes(*id.as_bytes())
}

fn id_of(k: u128) -> TaskId {
    // any 16 bytes are a UUID
    TaskId::from_slice(&k.to_be_bytes()).unwrap_or_default()
}

fn q(queue: &QueueName) -> &[u8] {
    queue.as_str().as_bytes()
}

/// Creates every table, so readers never meet a missing one.
pub(super) fn create(txn: &WriteTransaction) -> Result<()> {
    Tx::open(txn).map(drop)
}

/// An idempotency key as stored.
pub(super) struct Held {
    pub(super) holder: TaskId,
    pub(super) digest: Vec<u8>,
    pub(super) expires_ms: u64,
}

/// The event stream state of one queue while a write transaction runs.
struct Stream {
    last: (u64, u64),
    entries: u64,
    max: u64,
    appended: bool,
}

/// The writer's view of one write transaction. Every mutation goes through it and marks the
/// running operation dirty, so the writer knows whether a failed operation left writes behind.
pub(super) struct Tx<'t> {
    tasks: Table<'t, TaskKey, TaskValue>,
    ready: Table<'t, ReadyKey, u128>,
    timed: Table<'t, TimedKey, ()>,
    finished: Table<'t, FinishedKey, u128>,
    meta: Table<'t, MetaKey, u64>,
    idem: Table<'t, IdemKey, IdemValue>,
    idem_expiry: Table<'t, ExpiryKey, ()>,
    events: Table<'t, EventKey, EntryValue>,
    /// Count changes per (queue, state) not yet written to `meta`.
    counts: HashMap<(QueueName, TaskState), i64>,
    streams: HashMap<QueueName, Stream>,
    /// Queues that may have tasks to claim that they had not before: tasks made ready, or
    /// the queue resumed.
    readied: Vec<QueueName>,
    /// The next slot at the tail of each list appended to in this transaction: ready lists
    /// by (queue, level), finished lists by (queue, state code). Found once per transaction
    /// rather than by a range lookup per task; an appended slot only has to exceed those in
    /// the list. Only appends write past a list's tail, and a push to the front of an empty
    /// ready list, which forgets its cached tail.
    tails: Vec<(QueueName, Tail, u64)>,
    dirty: bool,
}

/// Which list a cached tail slot belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tail {
    Ready(i64),
    Finished(u8),
}

impl<'t> Tx<'t> {
    /// Opens the tables in `txn`.
    pub(super) fn open(txn: &'t WriteTransaction) -> Result<Self> {
        Ok(Self {
            tasks: txn.open_table(TASKS).map_err(storage)?,
            ready: txn.open_table(READY).map_err(storage)?,
            timed: txn.open_table(TIMED).map_err(storage)?,
            finished: txn.open_table(FINISHED).map_err(storage)?,
            meta: txn.open_table(META).map_err(storage)?,
            idem: txn.open_table(IDEM).map_err(storage)?,
            idem_expiry: txn.open_table(IDEM_EXPIRY).map_err(storage)?,
            events: txn.open_table(EVENTS).map_err(storage)?,
            counts: HashMap::new(),
            streams: HashMap::new(),
            readied: Vec::new(),
            tails: Vec::new(),
            dirty: false,
        })
    }

    /// Marks the start of an operation.
    pub(super) fn begin_op(&mut self) {
        self.dirty = false;
    }

    /// Whether the running operation has written anything.
    pub(super) fn dirty(&self) -> bool {
        self.dirty
    }

    /// Whether this transaction may have given `queue` tasks to claim: made some ready, or
    /// resumed it.
    pub(super) fn readied(&self, queue: &QueueName) -> bool {
        self.readied.contains(queue)
    }

    fn ready_in(&mut self, queue: &QueueName) {
        if !self.readied.contains(queue) {
            self.readied.push(queue.clone());
        }
    }

    /// The slot and record of a task.
    pub(super) fn record(&self, queue: &QueueName, id: TaskId) -> Result<Option<(u64, Vec<u8>)>> {
        let got = self.tasks.get((q(queue), key(id))).map_err(storage)?;
        Ok(got.map(|g| {
            let (slot, raw) = g.value();
            (slot, raw.to_vec())
        }))
    }

    /// Whether a task exists.
    pub(super) fn exists(&self, queue: &QueueName, id: TaskId) -> Result<bool> {
        Ok(self.tasks.get((q(queue), key(id))).map_err(storage)?.is_some())
    }

    /// Writes a task's record and slot.
    pub(super) fn put(
        &mut self,
        queue: &QueueName,
        id: TaskId,
        slot: u64,
        raw: &[u8],
    ) -> Result<()> {
        self.dirty = true;
        self.tasks.insert((q(queue), key(id)), (slot, raw)).map_err(storage)?;
        Ok(())
    }

    /// Rewrites a task's record where it lies, with one lookup when it does not grow (a
    /// claim's rewrite keeps its length): `f` gets the stored record and answers the new one,
    /// stored with `slot`. Answers the new record; `None` when the task has none.
    pub(super) fn rewrite(
        &mut self,
        queue: &QueueName,
        id: TaskId,
        slot: u64,
        f: impl FnOnce(&[u8]) -> Result<Vec<u8>>,
    ) -> Result<Option<Vec<u8>>> {
        let k = (q(queue), key(id));
        let Some(mut held) = self.tasks.get_mut(k).map_err(storage)? else {
            return Ok(None);
        };
        self.dirty = true;
        let raw = held.value().1;
        let old = raw.len();
        let rec = f(raw)?;
        if rec.len() <= old {
            held.insert((slot, rec.as_slice())).map_err(storage)?;
        } else {
            // a replace through the guard never splits its leaf: one grown by a large record
            // would stay one oversized page, copied whole by every later write to it
            drop(held);
            self.tasks.insert(k, (slot, rec.as_slice())).map_err(storage)?;
        }
        Ok(Some(rec))
    }

    /// Forgets a task's record (its index entry is the caller's to remove).
    pub(super) fn forget(&mut self, queue: &QueueName, id: TaskId) -> Result<()> {
        self.dirty = true;
        self.tasks.remove((q(queue), key(id))).map_err(storage)?;
        Ok(())
    }

    fn count_delta(&mut self, queue: &QueueName, state: TaskState, delta: i64) {
        *self.counts.entry((queue.clone(), state)).or_default() += delta;
    }

    /// The number of tasks of `queue` in `state`, this transaction's changes included.
    pub(super) fn count(&self, queue: &QueueName, state: TaskState) -> Result<u64> {
        let stored =
            self.meta.get((q(queue), state.code())).map_err(storage)?.map_or(0, |g| g.value());
        let delta = self.counts.get(&(queue.clone(), state)).copied().unwrap_or(0);
        Ok(stored.saturating_add_signed(delta))
    }

    /// Takes a task out of the index of `state` (where `slot` placed it).
    pub(super) fn unindex(
        &mut self,
        queue: &QueueName,
        id: TaskId,
        state: TaskState,
        priority: i32,
        slot: u64,
    ) -> Result<()> {
        self.dirty = true;
        let qb = q(queue);
        match state {
            TaskState::Queued => {
                self.ready.remove((qb, -i64::from(priority), slot)).map_err(storage)?;
            }
            TaskState::Scheduled | TaskState::Running | TaskState::Review => {
                self.timed.remove((qb, state.code(), slot, key(id))).map_err(storage)?;
            }
            TaskState::Succeeded | TaskState::Failed | TaskState::Dead | TaskState::Cancelled => {
                self.finished.remove((qb, state.code(), slot)).map_err(storage)?;
            }
        }
        self.count_delta(queue, state, -1);
        Ok(())
    }

    /// Puts a task in the index of a timed state (scheduled, running, review) at `time`;
    /// answers its slot.
    pub(super) fn index_timed(
        &mut self,
        queue: &QueueName,
        id: TaskId,
        state: TaskState,
        time: u64,
    ) -> Result<u64> {
        self.dirty = true;
        self.timed.insert((q(queue), state.code(), time, key(id)), ()).map_err(storage)?;
        self.count_delta(queue, state, 1);
        Ok(time)
    }

    /// The last sequence number of a finished list.
    fn finished_last(&self, qb: &[u8], code: u8) -> Result<Option<u64>> {
        let last =
            self.finished.range((qb, code, 0)..=(qb, code, u64::MAX)).map_err(storage)?.next_back();
        last.map(|e| e.map(|(k, _)| k.value().2).map_err(storage)).transpose()
    }

    /// Takes the next slot at the tail of `list` of `queue`: from the cache, or `first` (read
    /// from the table) the first time in this transaction. The cache holds while only appends
    /// write past a list's last entry: any other insert must drop it, as `push_front` does
    /// (`push_tail` and `index_finished` check their slot in debug builds).
    fn take_tail(
        &mut self,
        queue: &QueueName,
        list: Tail,
        first: impl FnOnce(&Self) -> Result<u64>,
    ) -> Result<u64> {
        if let Some((_, _, next)) = self.tails.iter_mut().find(|(q, l, _)| *l == list && q == queue)
        {
            let slot = *next;
            *next = slot.saturating_add(1);
            return Ok(slot);
        }
        let slot = first(self)?;
        self.tails.push((queue.clone(), list, slot.saturating_add(1)));
        Ok(slot)
    }

    /// The first or last position of a ready list.
    fn ready_edge(&self, qb: &[u8], level: i64, last: bool) -> Result<Option<u64>> {
        let mut range =
            self.ready.range((qb, level, 0)..=(qb, level, u64::MAX)).map_err(storage)?;
        let edge = if last { range.next_back() } else { range.next() };
        edge.map(|e| e.map(|(k, _)| k.value().2).map_err(storage)).transpose()
    }

    /// Appends a task to the finish-ordered list of a finished state; answers its slot.
    pub(super) fn index_finished(
        &mut self,
        queue: &QueueName,
        id: TaskId,
        state: TaskState,
    ) -> Result<u64> {
        self.dirty = true;
        let (qb, code) = (q(queue), state.code());
        let seq = self.take_tail(queue, Tail::Finished(code), |tx| {
            Ok(tx.finished_last(qb, code)?.map_or(0, |last| last.saturating_add(1)))
        })?;
        if cfg!(debug_assertions) {
            let last = self.finished_last(qb, code)?;
            debug_assert!(last.is_none_or(|l| l < seq), "finish slot {seq} not past {last:?}");
        }
        self.finished.insert((qb, code, seq), key(id)).map_err(storage)?;
        self.count_delta(queue, state, 1);
        Ok(seq)
    }

    /// Appends a task to the tail of its ready list; answers its slot.
    pub(super) fn push_tail(
        &mut self,
        queue: &QueueName,
        id: TaskId,
        priority: i32,
    ) -> Result<u64> {
        self.dirty = true;
        let (qb, level) = (q(queue), -i64::from(priority));
        let pos = self.take_tail(queue, Tail::Ready(level), |tx| {
            Ok(tx.ready_edge(qb, level, true)?.map_or(MIDDLE, |last| last.saturating_add(1)))
        })?;
        if cfg!(debug_assertions) {
            let last = self.ready_edge(qb, level, true)?;
            debug_assert!(last.is_none_or(|l| l < pos), "ready slot {pos} not past {last:?}");
        }
        self.ready.insert((qb, level, pos), key(id)).map_err(storage)?;
        self.count_delta(queue, TaskState::Queued, 1);
        self.ready_in(queue);
        Ok(pos)
    }

    /// Puts a block of tasks of one priority at the head of their ready list, in the block's
    /// order, and writes their records.
    pub(super) fn push_front(
        &mut self,
        queue: &QueueName,
        priority: i32,
        block: &[(TaskId, Vec<u8>)],
    ) -> Result<()> {
        self.dirty = true;
        let (qb, level) = (q(queue), -i64::from(priority));
        // a block put on an empty list sits just below MIDDLE, which may be past a tail slot
        // cached while the list held only entries below it: the next append reads it afresh
        self.tails.retain(|(q, l, _)| !(*l == Tail::Ready(level) && q == queue));
        let head = self.ready_edge(qb, level, false)?.unwrap_or(MIDDLE);
        let start = head.saturating_sub(block.len() as u64);
        for (i, (id, raw)) in block.iter().enumerate() {
            let pos = start + i as u64;
            self.ready.insert((qb, level, pos), key(*id)).map_err(storage)?;
            self.put(queue, *id, pos, raw)?;
        }
        self.count_delta(queue, TaskState::Queued, block.len() as i64);
        self.ready_in(queue);
        Ok(())
    }

    /// Takes up to `n` tasks off the head of the ready list of `priority`, in order: their
    /// positions and ids. One pass of a cursor that removes what it reads, rather than a read
    /// of the head and a removal (a descent of the tree) per task.
    pub(super) fn take_ready_head(
        &mut self,
        queue: &QueueName,
        priority: i32,
        n: usize,
    ) -> Result<Vec<(u64, TaskId)>> {
        let (qb, level) = (q(queue), -i64::from(priority));
        let mut out = Vec::with_capacity(n.min(1024));
        let mut head = self
            .ready
            .extract_from_if((qb, level, 0)..=(qb, level, u64::MAX), |_, _| true)
            .map_err(storage)?;
        let read = head.by_ref().take(n).try_for_each(|e| {
            let (k, v) = e.map_err(storage)?;
            out.push((k.value().2, id_of(v.value())));
            Ok(())
        });
        // closed only after a clean read; on a failed one it is dropped with the closure
        let taken = read.and_then(|()| head.close().map_err(storage));
        // what the cursor handed out is gone even when a later step fails, so a failure here
        // leaves writes behind too: the writer redoes the batch without this operation
        if taken.is_err() || !out.is_empty() {
            self.dirty = true;
        }
        taken?;
        if !out.is_empty() {
            self.count_delta(queue, TaskState::Queued, -(out.len() as i64));
        }
        Ok(out)
    }

    /// The highest priority levels with queued tasks, highest first, at most `max`.
    pub(super) fn ready_levels(&self, queue: &QueueName, max: usize) -> Result<Vec<i32>> {
        let qb = q(queue);
        let mut levels = Vec::new();
        let mut from = i64::MIN;
        // one seek per level: the first key at or past the next possible level
        while levels.len() < max {
            let Some(entry) =
                self.ready.range((qb, from, 0)..=(qb, i64::MAX, u64::MAX)).map_err(storage)?.next()
            else {
                break;
            };
            let level = entry.map_err(storage)?.0.value().1;
            // levels are negated i32 priorities
            levels.push(
                i32::try_from(-level)
                    .map_err(|_| Error::Corrupt(format!("ready level {level}")))?,
            );
            match level.checked_add(1) {
                Some(next) => from = next,
                None => break,
            }
        }
        Ok(levels)
    }

    /// The first `n` tasks of a ready list: (position, id).
    pub(super) fn ready_head(
        &self,
        queue: &QueueName,
        priority: i32,
        n: usize,
    ) -> Result<Vec<(u64, TaskId)>> {
        let (qb, level) = (q(queue), -i64::from(priority));
        self.ready
            .range((qb, level, 0)..=(qb, level, u64::MAX))
            .map_err(storage)?
            .take(n)
            .map(|e| {
                let (k, v) = e.map_err(storage)?;
                Ok((k.value().2, id_of(v.value())))
            })
            .collect()
    }

    /// Up to `n` tasks of a timed state whose time is at most `until`, earliest first:
    /// (time, id).
    pub(super) fn timed_due(
        &self,
        queue: &QueueName,
        state: TaskState,
        until: u64,
        n: usize,
    ) -> Result<Vec<(u64, TaskId)>> {
        let (qb, code) = (q(queue), state.code());
        self.timed
            .range((qb, code, 0, 0)..=(qb, code, until, u128::MAX))
            .map_err(storage)?
            .take(n)
            .map(|e| {
                let (k, _) = e.map_err(storage)?;
                let (_, _, time, id) = k.value();
                Ok((time, id_of(id)))
            })
            .collect()
    }

    /// The oldest `n` tasks of a finished state: (sequence, id).
    pub(super) fn finished_head(
        &self,
        queue: &QueueName,
        state: TaskState,
        n: usize,
    ) -> Result<Vec<(u64, TaskId)>> {
        let (qb, code) = (q(queue), state.code());
        self.finished
            .range((qb, code, 0)..=(qb, code, u64::MAX))
            .map_err(storage)?
            .take(n)
            .map(|e| {
                let (k, v) = e.map_err(storage)?;
                Ok((k.value().2, id_of(v.value())))
            })
            .collect()
    }

    /// Whether claims are paused.
    pub(super) fn paused(&self, queue: &QueueName) -> Result<bool> {
        Ok(self.meta.get((q(queue), PAUSED)).map_err(storage)?.is_some_and(|g| g.value() == 1))
    }

    /// Pauses or resumes claims.
    pub(super) fn set_paused(&mut self, queue: &QueueName, paused: bool) -> Result<()> {
        self.dirty = true;
        if paused {
            self.meta.insert((q(queue), PAUSED), 1).map_err(storage)?;
        } else {
            self.meta.remove((q(queue), PAUSED)).map_err(storage)?;
            self.ready_in(queue);
        }
        Ok(())
    }

    /// An idempotency key as stored (expired or not).
    pub(super) fn idempotency(&self, queue: &QueueName, k: &str) -> Result<Option<Held>> {
        let got = self.idem.get((q(queue), k.as_bytes())).map_err(storage)?;
        Ok(got.map(|g| {
            let (holder, digest, expires_ms) = g.value();
            Held { holder: id_of(holder), digest: digest.to_vec(), expires_ms }
        }))
    }

    /// Sets an idempotency key, replacing an expired one.
    pub(super) fn set_idempotency(
        &mut self,
        queue: &QueueName,
        k: &str,
        held: &Held,
    ) -> Result<()> {
        self.dirty = true;
        let qb = q(queue);
        let old = self
            .idem
            .insert((qb, k.as_bytes()), (key(held.holder), held.digest.as_slice(), held.expires_ms))
            .map_err(storage)?
            .map(|g| g.value().2);
        if let Some(expired) = old {
            self.idem_expiry.remove((qb, expired, k.as_bytes())).map_err(storage)?;
        }
        self.idem_expiry.insert((qb, held.expires_ms, k.as_bytes()), ()).map_err(storage)?;
        Ok(())
    }

    /// Forgets up to `max` idempotency keys that expired by `now`; answers how many.
    pub(super) fn sweep_idempotency(
        &mut self,
        queue: &QueueName,
        now: u64,
        max: usize,
    ) -> Result<usize> {
        let qb = q(queue);
        let expired: Vec<(u64, Vec<u8>)> = self
            .idem_expiry
            .range((qb, 0, &[][..])..(qb, now, &[][..]))
            .map_err(storage)?
            .take(max)
            .map(|e| {
                let (k, _) = e.map_err(storage)?;
                let (_, at, name) = k.value();
                Ok((at, name.to_vec()))
            })
            .collect::<Result<_>>()?;
        if !expired.is_empty() {
            self.dirty = true;
        }
        for (at, name) in &expired {
            self.idem_expiry.remove((qb, *at, name.as_slice())).map_err(storage)?;
            self.idem.remove((qb, name.as_slice())).map_err(storage)?;
        }
        Ok(expired.len())
    }

    fn stream(&mut self, queue: &QueueName, max: u64) -> Result<&mut Stream> {
        if !self.streams.contains_key(queue) {
            let get = |field| -> Result<u64> {
                Ok(self.meta.get((q(queue), field)).map_err(storage)?.map_or(0, |g| g.value()))
            };
            let stream = Stream {
                last: (get(LAST_EVENT_MS)?, get(LAST_EVENT_SEQ)?),
                entries: get(EVENT_ENTRIES)?,
                max,
                appended: false,
            };
            self.streams.insert(queue.clone(), stream);
        }
        // inserted just above when missing
        self.streams.get_mut(queue).ok_or_else(|| Error::Corrupt("stream state lost".into()))
    }

    /// Appends one stream entry at store time `now`; answers its id ([`next_entry_id`]).
    /// `events_max` bounds the entries kept.
    pub(super) fn append(
        &mut self,
        queue: &QueueName,
        now: u64,
        events_max: u64,
        entry: &EntryFields,
    ) -> Result<(u64, u64)> {
        self.dirty = true;
        let stream = self.stream(queue, events_max)?;
        let id = next_entry_id(stream.last, now);
        stream.last = id;
        stream.entries += 1;
        stream.appended = true;
        let value = (
            entry.kind,
            entry.tasks.as_slice(),
            entry.a.as_slice(),
            entry.s.as_slice(),
            entry.e.as_slice(),
        );
        self.events.insert((q(queue), id.0, id.1), value).map_err(storage)?;
        Ok(id)
    }

    /// Writes the counts and stream states and trims each stream that grew to its limit;
    /// answers the queues that have new events.
    pub(super) fn finish(mut self) -> Result<Vec<QueueName>> {
        for ((queue, state), delta) in std::mem::take(&mut self.counts) {
            if delta != 0 {
                let n = self.count(&queue, state)?.saturating_add_signed(delta);
                self.meta.insert((q(&queue), state.code()), n).map_err(storage)?;
            }
        }
        let mut woken = Vec::new();
        for (queue, mut stream) in std::mem::take(&mut self.streams) {
            if !stream.appended {
                continue;
            }
            let qb = q(&queue);
            if stream.entries > stream.max {
                let excess = stream.entries - stream.max;
                let mut gone = 0;
                for e in self
                    .events
                    .extract_from_if((qb, 0, 0)..=(qb, u64::MAX, u64::MAX), |_, _| true)
                    .map_err(storage)?
                    .take(usize::try_from(excess).unwrap_or(usize::MAX))
                {
                    e.map_err(storage)?;
                    gone += 1;
                }
                stream.entries -= gone;
            }
            self.meta.insert((qb, LAST_EVENT_MS), stream.last.0).map_err(storage)?;
            self.meta.insert((qb, LAST_EVENT_SEQ), stream.last.1).map_err(storage)?;
            self.meta.insert((qb, EVENT_ENTRIES), stream.entries).map_err(storage)?;
            woken.push(queue);
        }
        Ok(woken)
    }
}

/// The id of the entry after `last` at store time `now`, as Redis streams number them: the
/// time, or `last`'s time with the next sequence while the clock has not passed it (a clock
/// stepped back included), so ids only grow.
fn next_entry_id(last: (u64, u64), now: u64) -> (u64, u64) {
    if now > last.0 { (now, 0) } else { (last.0, last.1.saturating_add(1)) }
}

/// The fields of one stream entry, encoded (see [`RawEntry`]); empty where absent.
pub(super) struct EntryFields {
    pub(super) kind: &'static [u8],
    pub(super) tasks: Vec<u8>,
    pub(super) a: Vec<u8>,
    pub(super) s: Vec<u8>,
    pub(super) e: Vec<u8>,
}

fn some(b: &[u8]) -> Option<&[u8]> {
    (!b.is_empty()).then_some(b)
}

/// A reader's consistent view of the store.
pub(super) struct Snapshot {
    tasks: ReadOnlyTable<TaskKey, TaskValue>,
    ready: ReadOnlyTable<ReadyKey, u128>,
    timed: ReadOnlyTable<TimedKey, ()>,
    finished: ReadOnlyTable<FinishedKey, u128>,
    meta: ReadOnlyTable<MetaKey, u64>,
    events: ReadOnlyTable<EventKey, EntryValue>,
}

impl Snapshot {
    /// Opens the tables in `txn`.
    pub(super) fn open(txn: &ReadTransaction) -> Result<Self> {
        Ok(Self {
            tasks: txn.open_table(TASKS).map_err(storage)?,
            ready: txn.open_table(READY).map_err(storage)?,
            timed: txn.open_table(TIMED).map_err(storage)?,
            finished: txn.open_table(FINISHED).map_err(storage)?,
            meta: txn.open_table(META).map_err(storage)?,
            events: txn.open_table(EVENTS).map_err(storage)?,
        })
    }

    /// The record of a task.
    pub(super) fn record(&self, queue: &QueueName, id: TaskId) -> Result<Option<Vec<u8>>> {
        let got = self.tasks.get((q(queue), key(id))).map_err(storage)?;
        Ok(got.map(|g| g.value().1.to_vec()))
    }

    /// Up to `limit` ids of tasks in `state` after skipping `skip`, in the state's listing
    /// order: queued in claim order (strict priority), timed states by time, finished states
    /// newest first. Paging by offset walks the skipped entries.
    pub(super) fn list_ids(
        &self,
        queue: &QueueName,
        state: TaskState,
        skip: usize,
        limit: usize,
    ) -> Result<Vec<TaskId>> {
        let (qb, code) = (q(queue), state.code());
        let ids: Vec<u128> = match state {
            TaskState::Queued => self
                .ready
                .range((qb, i64::MIN, 0)..=(qb, i64::MAX, u64::MAX))
                .map_err(storage)?
                .skip(skip)
                .take(limit)
                .map(|e| Ok(e.map_err(storage)?.1.value()))
                .collect::<Result<_>>()?,
            TaskState::Scheduled | TaskState::Running | TaskState::Review => self
                .timed
                .range((qb, code, 0, 0)..=(qb, code, u64::MAX, u128::MAX))
                .map_err(storage)?
                .skip(skip)
                .take(limit)
                .map(|e| Ok(e.map_err(storage)?.0.value().3))
                .collect::<Result<_>>()?,
            TaskState::Succeeded | TaskState::Failed | TaskState::Dead | TaskState::Cancelled => {
                self.finished
                    .range((qb, code, 0)..=(qb, code, u64::MAX))
                    .map_err(storage)?
                    .rev()
                    .skip(skip)
                    .take(limit)
                    .map(|e| Ok(e.map_err(storage)?.1.value()))
                    .collect::<Result<_>>()?
            }
        };
        Ok(ids.into_iter().map(id_of).collect())
    }

    /// Counts per state.
    pub(super) fn stats(&self, queue: &QueueName) -> Result<QueueStats> {
        let get = |field: u8| -> Result<u64> {
            Ok(self.meta.get((q(queue), field)).map_err(storage)?.map_or(0, |g| g.value()))
        };
        Ok(QueueStats {
            queued: get(TaskState::Queued.code())?,
            scheduled: get(TaskState::Scheduled.code())?,
            running: get(TaskState::Running.code())?,
            review: get(TaskState::Review.code())?,
            succeeded: get(TaskState::Succeeded.code())?,
            failed: get(TaskState::Failed.code())?,
            dead: get(TaskState::Dead.code())?,
            cancelled: get(TaskState::Cancelled.code())?,
            paused: get(PAUSED)? == 1,
        })
    }

    /// Up to `max` events after `after` (from the oldest retained when `None`).
    pub(super) fn events(
        &self,
        queue: &QueueName,
        after: Option<EventId>,
        max: usize,
    ) -> Result<Vec<Event>> {
        let qb = q(queue);
        // the entry holding `after` may have events past it: start from it, inclusively
        let (ms, seq) = after.map_or((0, 0), |a| (a.ms, a.seq));
        let mut out = Vec::new();
        for entry in self.events.range((qb, ms, seq)..=(qb, u64::MAX, u64::MAX)).map_err(storage)? {
            let (k, v) = entry.map_err(storage)?;
            for e in expand(queue, k.value(), v.value())? {
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

    /// The id of the newest retained event.
    pub(super) fn last_event_id(&self, queue: &QueueName) -> Result<Option<EventId>> {
        let qb = q(queue);
        let last =
            self.events.range((qb, 0, 0)..=(qb, u64::MAX, u64::MAX)).map_err(storage)?.next_back();
        match last {
            Some(entry) => {
                let (k, v) = entry.map_err(storage)?;
                Ok(expand(queue, k.value(), v.value())?.last().map(|e| e.id))
            }
            None => Ok(None),
        }
    }
}

fn expand(
    queue: &QueueName,
    (_, ms, seq): (&[u8], u64, u64),
    (kind, tasks, a, s, e): <EntryValue as redb::Value>::SelfType<'_>,
) -> Result<Vec<Event>> {
    RawEntry {
        ms,
        seq,
        kind,
        tasks: some(tasks),
        attempts: some(a),
        servers: some(s),
        errors: some(e),
    }
    .events(queue)
}

/// Collects the events of one operation and appends them as one stream entry per kind, in the
/// order each kind first appears (the Lua prelude's `events`): the i-th task of an entry gets
/// index i. A field is written when any of its tasks carries it.
#[derive(Default)]
pub(super) struct Events {
    entries: Vec<Pending>,
}

struct Pending {
    kind: EventKind,
    ids: Vec<u8>,
    a: Vec<u16>,
    s: Vec<String>,
    e: Vec<String>,
    has_a: bool,
    has_s: bool,
    has_e: bool,
}

impl Events {
    /// Records one event.
    pub(super) fn add(
        &mut self,
        kind: EventKind,
        id: Option<TaskId>,
        attempt: Option<u16>,
        server: Option<&str>,
        error: Option<&str>,
    ) {
        let i = match self.entries.iter().position(|p| p.kind == kind) {
            Some(i) => i,
            None => {
                self.entries.push(Pending {
                    kind,
                    ids: Vec::new(),
                    a: Vec::new(),
                    s: Vec::new(),
                    e: Vec::new(),
                    has_a: false,
                    has_s: false,
                    has_e: false,
                });
                self.entries.len() - 1
            }
        };
        let p = &mut self.entries[i];
        if let Some(id) = id {
            p.ids.extend_from_slice(id.as_bytes());
        }
        p.a.push(attempt.unwrap_or(0));
        p.s.push(server.unwrap_or_default().to_owned());
        p.e.push(error.unwrap_or_default().to_owned());
        p.has_a |= attempt.is_some();
        p.has_s |= server.is_some();
        p.has_e |= error.is_some();
    }

    /// Appends the entries; answers the id of the first one's first event, if any.
    pub(super) fn flush(
        self,
        tx: &mut Tx<'_>,
        queue: &QueueName,
        now: u64,
        events_max: u64,
    ) -> Result<Option<EventId>> {
        let mut first = None;
        for p in self.entries {
            let fields = EntryFields {
                kind: p.kind.code().as_bytes(),
                tasks: p.ids,
                a: pack(p.has_a, &p.a)?,
                s: pack(p.has_s, &p.s)?,
                e: pack(p.has_e, &p.e)?,
            };
            let (ms, seq) = tx.append(queue, now, events_max, &fields)?;
            first.get_or_insert(EventId { ms, seq, index: 0 });
        }
        Ok(first)
    }
}

/// A per-task event field as a MessagePack array; empty when no task carries it.
fn pack<T: serde::Serialize>(has: bool, items: &[T]) -> Result<Vec<u8>> {
    if !has {
        return Ok(Vec::new());
    }
    rmp_serde::to_vec(items).map_err(|e| Error::Corrupt(format!("event field: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_grow_even_when_the_clock_steps_back() {
        assert_eq!(next_entry_id((0, 0), 1000), (1000, 0));
        assert_eq!(next_entry_id((1000, 0), 1000), (1000, 1));
        assert_eq!(next_entry_id((1000, 1), 400), (1000, 2), "the clock stepped back");
        assert_eq!(next_entry_id((1000, 2), 1001), (1001, 0));
    }

    /// A database in memory, for a transaction's worth of table work.
    fn scratch() -> redb::Database {
        redb::Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .unwrap()
    }

    #[test]
    fn a_rewritten_record_reads_back_whether_it_keeps_its_length_or_grows() {
        let db = scratch();
        let txn = db.begin_write().unwrap();
        let queue = QueueName::new("q").unwrap();
        let (a, b) = (TaskId::new(), TaskId::new());
        {
            let mut tx = Tx::open(&txn).unwrap();
            tx.put(&queue, a, 1, b"abcd").unwrap();
            tx.put(&queue, b, 2, b"wxyz").unwrap();
            // the same length: replaced in place
            let same = tx.rewrite(&queue, a, 7, |raw| Ok(raw.to_ascii_uppercase())).unwrap();
            assert_eq!(same.as_deref(), Some(&b"ABCD"[..]));
            // longer, by more than a page: inserted, so the leaf splits
            let big = vec![b'x'; 20_000];
            let grown = tx.rewrite(&queue, b, 8, |_| Ok(big.clone())).unwrap();
            assert_eq!(grown.as_deref(), Some(&big[..]));
            assert_eq!(tx.rewrite(&queue, TaskId::new(), 9, |_| Ok(Vec::new())).unwrap(), None);
            assert_eq!(tx.record(&queue, a).unwrap(), Some((7, b"ABCD".to_vec())));
            assert_eq!(tx.record(&queue, b).unwrap(), Some((8, big)));
        }
        txn.commit().unwrap();
    }

    #[test]
    fn appends_after_a_block_pushed_onto_an_emptied_list_take_fresh_slots() {
        let db = scratch();
        let txn = db.begin_write().unwrap();
        let queue = QueueName::new("q").unwrap();
        let ids: Vec<TaskId> = (0..12).map(|_| TaskId::new()).collect();
        let block = |r: std::ops::Range<usize>| -> Vec<(TaskId, Vec<u8>)> {
            ids[r].iter().map(|id| (*id, b"rec".to_vec())).collect()
        };
        {
            let mut tx = Tx::open(&txn).unwrap();
            // five at the front of an empty list: MIDDLE-5 .. MIDDLE-1
            tx.push_front(&queue, 0, &block(0..5)).unwrap();
            // the last two taken out of the middle of the line (as a cancel does)
            for (id, pos) in [(ids[3], MIDDLE - 2), (ids[4], MIDDLE - 1)] {
                tx.unindex(&queue, id, TaskState::Queued, 0, pos).unwrap();
            }
            // an append after MIDDLE-3, caching MIDDLE-1 as the next tail slot
            assert_eq!(tx.push_tail(&queue, ids[5], 0).unwrap(), MIDDLE - 2);
            let took = tx.take_ready_head(&queue, 0, 100).unwrap();
            assert_eq!(took.len(), 4, "{took:?}");
            // five more at the front of the now empty list: MIDDLE-5 .. MIDDLE-1 again
            tx.push_front(&queue, 0, &block(6..11)).unwrap();
            let pos = tx.push_tail(&queue, ids[11], 0).unwrap();
            assert_eq!(pos, MIDDLE, "past the block, not onto its last slot");
            let line: Vec<TaskId> =
                tx.ready_head(&queue, 0, 100).unwrap().into_iter().map(|(_, id)| id).collect();
            assert_eq!(line, ids[6..12].to_vec(), "every task in line, in order");
        }
        txn.commit().unwrap();
    }
}
