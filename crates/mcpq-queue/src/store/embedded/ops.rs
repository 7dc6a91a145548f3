//! The transitions of the embedded store, one function per Lua script of the Redis store and
//! with the same semantics: the same checks, state changes, orders and events. Each runs inside
//! the writer's transaction; the writer makes each one all-or-nothing (see `writer`).

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use super::tables::{Events, Held, MAX_PRIORITY_LEVELS, Tx};
use crate::config::QueueConfig;
use crate::error::{Error, Result};
use crate::event::{EventId, EventKind};
use crate::record::{Head, Tail};
use crate::store::{CancelOutcome, Claimed, Disposition, Enqueued, Settled};
use crate::task::{QueueName, TaskId, TaskState};

/// The store's clock: system time in ms.
pub(super) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, crate::store::millis)
}

/// A task checked and encoded by the caller, ready to store.
pub(super) struct Staged {
    pub(super) id: TaskId,
    pub(super) priority: i32,
    pub(super) max_attempts: u16,
    pub(super) flags: u8,
    pub(super) delay_ms: u64,
    pub(super) spec: Vec<u8>,
    /// The idempotency key and the digest of everything that makes the body.
    pub(super) key: Option<(String, Vec<u8>)>,
}

/// A settle of one task, as the caller sends it.
pub(super) struct Settle {
    pub(super) id: TaskId,
    pub(super) token: u32,
    pub(super) server: String,
    /// The result (complete), the error (fail) or the reason (release).
    pub(super) text: Vec<u8>,
    pub(super) disposition: Option<Disposition>,
    pub(super) delay_ms: u64,
}

/// A claimed batch: the lease deadline and each task's rewritten record.
#[derive(Default)]
pub(super) struct ClaimOut {
    pub(super) deadline_ms: u64,
    pub(super) tasks: Vec<(TaskId, Vec<u8>)>,
}

impl ClaimOut {
    /// The claimed tasks of `queue`, decoded.
    pub(super) fn claimed(self, queue: &QueueName) -> Result<Vec<Claimed>> {
        let deadline_ms = self.deadline_ms;
        self.tasks
            .into_iter()
            .map(|(id, raw)| Claimed::decode(queue, id, &raw, deadline_ms))
            .collect()
    }
}

/// enqueue.lua: stores new tasks as queued (scheduled when delayed) with their events. A task
/// whose id exists, or whose idempotency key is held by the same body, is answered `Existing`;
/// a key held by another body is a conflict.
pub(super) fn enqueue(
    tx: &mut Tx<'_>,
    queue: &QueueName,
    cfg: &QueueConfig,
    tasks: &[Staged],
) -> Result<Vec<Enqueued>> {
    let now = now_ms();
    let mut ev = Events::default();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        if tx.exists(queue, t.id)? {
            out.push(Enqueued::Existing(t.id));
            continue;
        }
        if let Some((k, digest)) = &t.key {
            // an expired key is gone, as the Redis key's TTL would have removed it
            match tx.idempotency(queue, k)?.filter(|h| h.expires_ms > now) {
                Some(held) if held.digest == *digest => {
                    out.push(Enqueued::Existing(held.holder));
                    continue;
                }
                Some(held) => {
                    out.push(Enqueued::Conflict(held.holder));
                    continue;
                }
                None => {
                    let expires_ms = now.saturating_add(cfg.idempotency_ttl_ms);
                    let held = Held { holder: t.id, digest: digest.clone(), expires_ms };
                    tx.set_idempotency(queue, k, &held)?;
                }
            }
        }
        let state = if t.delay_ms > 0 { TaskState::Scheduled } else { TaskState::Queued };
        let raw = Head::new(state, t.flags, t.priority, t.max_attempts, &t.spec)?.encode(&t.spec);
        let slot = match state {
            TaskState::Scheduled => {
                tx.index_timed(queue, t.id, state, now.saturating_add(t.delay_ms))?
            }
            _ => tx.push_tail(queue, t.id, t.priority)?,
        };
        tx.put(queue, t.id, slot, &raw)?;
        ev.add(EventKind::TaskEnqueued, Some(t.id), None, None, None);
        out.push(Enqueued::Created(t.id));
    }
    // expired keys go a few at a time, so their cost stays with the enqueues that add keys
    tx.sweep_idempotency(queue, now, 2 * tasks.len() + 16)?;
    ev.flush(tx, queue, now, cfg.events_max)?;
    Ok(out)
}

/// The rank of a queued task under aging: its creation time (the first 48 bits of its id, as
/// the Lua script reads them) less a step per priority level.
fn aged_rank(id: TaskId, priority: i32, aging_ms: u64) -> i128 {
    let b = id.as_bytes();
    let created = u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]]);
    i128::from(created) - i128::from(priority) * i128::from(aging_ms)
}

/// claim.lua: moves up to `max` ready tasks to running under a lease, highest priority first,
/// FIFO within a priority; with aging, a merge of the list heads by [`aged_rank`].
pub(super) fn claim(
    tx: &mut Tx<'_>,
    queue: &QueueName,
    cfg: &QueueConfig,
    max: usize,
    lease_ms: u64,
) -> Result<ClaimOut> {
    let empty = ClaimOut { deadline_ms: 0, tasks: Vec::new() };
    if tx.paused(queue)? {
        return Ok(empty);
    }
    let levels = tx.ready_levels(queue, MAX_PRIORITY_LEVELS)?;
    let mut picked: Vec<(i32, u64, TaskId)> = Vec::new();
    // strict priority takes each list's head off as it reads it; aging reads the heads first
    let taken = cfg.aging_ms == 0;
    if taken {
        for &p in &levels {
            let ask = max - picked.len();
            let head = tx.take_ready_head(queue, p, ask)?;
            picked.extend(head.into_iter().map(|(pos, id)| (p, pos, id)));
            if picked.len() >= max {
                break;
            }
        }
    } else {
        let heads =
            levels.iter().map(|&p| tx.ready_head(queue, p, max)).collect::<Result<Vec<_>>>()?;
        let mut next = vec![0usize; levels.len()];
        // each round takes one task, so at most `max` rounds
        while picked.len() < max {
            let mut best: Option<(usize, i128)> = None;
            for (li, &p) in levels.iter().enumerate() {
                if let Some(&(_, id)) = heads[li].get(next[li]) {
                    let rank = aged_rank(id, p, cfg.aging_ms);
                    // strictly better only: a tie goes to the higher priority
                    if best.is_none_or(|(_, r)| rank < r) {
                        best = Some((li, rank));
                    }
                }
            }
            let Some((li, _)) = best else { break };
            let (pos, id) = heads[li][next[li]];
            picked.push((levels[li], pos, id));
            next[li] += 1;
        }
    }
    if picked.is_empty() {
        return Ok(empty);
    }
    let now = now_ms();
    let deadline_ms = now.saturating_add(lease_ms);
    let mut ev = Events::default();
    let mut tasks = Vec::with_capacity(picked.len());
    for (priority, pos, id) in picked {
        if !taken {
            tx.unindex(queue, id, TaskState::Queued, priority, pos)?;
        }
        let mut attempt = 0;
        // the running index's slot is the lease deadline
        let rec = tx.rewrite(queue, id, deadline_ms, |raw| {
            let mut h = Head::read(id, raw)?;
            h.state = TaskState::Running;
            h.attempt = h.attempt.saturating_add(1);
            // the token is the claim count; 2^32 claims of one task do not happen
            h.claims = h.claims.wrapping_add(1);
            h.started = now;
            attempt = h.attempt;
            Ok(h.rewrite(raw))
        })?;
        // a listed id always has a record; skipping a missing one keeps the batch going
        let Some(rec) = rec else { continue };
        tx.index_timed(queue, id, TaskState::Running, deadline_ms)?;
        ev.add(EventKind::TaskStarted, Some(id), Some(attempt), None, None);
        tasks.push((id, rec));
    }
    ev.flush(tx, queue, now, cfg.events_max)?;
    Ok(ClaimOut { deadline_ms, tasks })
}

/// Settle-batch fencing (the Lua prelude's `fencer`): a task is held by `token` while it runs
/// under that claim; a task settled earlier in the same batch is answered with its new state.
#[derive(Default)]
struct Fence {
    settled: HashMap<TaskId, TaskState>,
}

/// A task its token holds: its slot, record and header.
struct Fenced {
    slot: u64,
    raw: Vec<u8>,
    head: Head,
}

impl Fence {
    fn check(
        &self,
        tx: &Tx<'_>,
        queue: &QueueName,
        id: TaskId,
        token: u32,
    ) -> Result<Result<Fenced, Settled>> {
        if let Some(&state) = self.settled.get(&id) {
            return Ok(Err(Settled::Rejected(Some(state))));
        }
        let Some((slot, raw)) = tx.record(queue, id)? else {
            return Ok(Err(Settled::Rejected(None)));
        };
        let head = Head::read(id, &raw)?;
        if head.state != TaskState::Running || head.claims != token {
            return Ok(Err(Settled::Rejected(Some(head.state))));
        }
        Ok(Ok(Fenced { slot, raw, head }))
    }

    fn settle(&mut self, id: TaskId, state: TaskState) {
        self.settled.insert(id, state);
    }
}

/// renew.lua: moves the lease deadlines of tasks still held under the given tokens.
pub(super) fn renew(
    tx: &mut Tx<'_>,
    queue: &QueueName,
    items: &[(TaskId, u32)],
    lease_ms: u64,
) -> Result<Vec<bool>> {
    let deadline = now_ms().saturating_add(lease_ms);
    let fence = Fence::default();
    let mut out = Vec::with_capacity(items.len());
    for &(id, token) in items {
        let ok = match fence.check(tx, queue, id, token)? {
            Ok(held) => {
                tx.unindex(queue, id, TaskState::Running, held.head.priority, held.slot)?;
                let slot = tx.index_timed(queue, id, TaskState::Running, deadline)?;
                tx.put(queue, id, slot, &held.raw)?;
                true
            }
            Err(_) => false,
        };
        out.push(ok);
    }
    Ok(out)
}

/// A settle batch (complete.lua, fail.lua, release.lua): fences each item, takes the task off
/// its lease and lets `apply` move it on, answering the state it reached; one event flush.
fn settle_each(
    tx: &mut Tx<'_>,
    queue: &QueueName,
    cfg: &QueueConfig,
    items: &[Settle],
    mut apply: impl FnMut(&mut Tx<'_>, &Settle, Fenced, u64, &mut Events) -> Result<TaskState>,
) -> Result<Vec<Settled>> {
    let now = now_ms();
    let mut fence = Fence::default();
    let mut ev = Events::default();
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        match fence.check(tx, queue, item.id, item.token)? {
            Ok(held) => {
                tx.unindex(queue, item.id, TaskState::Running, held.head.priority, held.slot)?;
                let state = apply(tx, item, held, now, &mut ev)?;
                fence.settle(item.id, state);
                out.push(Settled::Applied(state));
            }
            Err(rejected) => out.push(rejected),
        }
    }
    ev.flush(tx, queue, now, cfg.events_max)?;
    Ok(out)
}

/// complete.lua: records the results of running tasks as succeeded.
pub(super) fn complete(
    tx: &mut Tx<'_>,
    queue: &QueueName,
    cfg: &QueueConfig,
    items: &[Settle],
) -> Result<Vec<Settled>> {
    settle_each(tx, queue, cfg, items, |tx, c, held, now, ev| {
        let mut h = held.head;
        (h.state, h.finished) = (TaskState::Succeeded, now);
        let tail = Tail { server: c.server.as_bytes(), error: b"", result: &c.text };
        let slot = tx.index_finished(queue, c.id, h.state)?;
        tx.put(queue, c.id, slot, &h.rewrite_tail(&held.raw, tail))?;
        ev.add(EventKind::TaskSucceeded, Some(c.id), Some(h.attempt), Some(&c.server), None);
        Ok(h.state)
    })
}

/// fail.lua: records failed attempts: a retry is scheduled after its delay (queued at once
/// without one) while attempts remain, else the task is dead; fatal fails it; review parks it.
pub(super) fn fail(
    tx: &mut Tx<'_>,
    queue: &QueueName,
    cfg: &QueueConfig,
    items: &[Settle],
) -> Result<Vec<Settled>> {
    settle_each(tx, queue, cfg, items, |tx, f, held, now, ev| {
        let mut h = held.head;
        let retry = matches!(f.disposition, Some(Disposition::Retry { .. }));
        let (kind, slot) = if retry && h.attempt < h.max_attempts {
            if f.delay_ms > 0 {
                h.state = TaskState::Scheduled;
                let due = now.saturating_add(f.delay_ms);
                (EventKind::TaskRetrying, tx.index_timed(queue, f.id, h.state, due)?)
            } else {
                h.state = TaskState::Queued;
                (EventKind::TaskRetrying, tx.push_tail(queue, f.id, h.priority)?)
            }
        } else if matches!(f.disposition, Some(Disposition::Review)) {
            h.state = TaskState::Review;
            (EventKind::TaskReview, tx.index_timed(queue, f.id, h.state, now)?)
        } else {
            let (state, kind) = if retry {
                (TaskState::Dead, EventKind::TaskDead)
            } else {
                (TaskState::Failed, EventKind::TaskFailed)
            };
            (h.state, h.finished) = (state, now);
            (kind, tx.index_finished(queue, f.id, h.state)?)
        };
        let result = h.tail(f.id, &held.raw)?.result;
        let tail = Tail { server: f.server.as_bytes(), error: &f.text, result };
        tx.put(queue, f.id, slot, &h.rewrite_tail(&held.raw, tail))?;
        let error = String::from_utf8_lossy(&f.text);
        ev.add(kind, Some(f.id), Some(h.attempt), Some(&f.server), Some(&error));
        Ok(h.state)
    })
}

/// Tasks bound for the head of their ready lists, grouped by priority in order of first
/// appearance (the Lua prelude's `by_priority` with `front`): each group goes on as one block,
/// keeping its order.
#[derive(Default)]
struct FrontBlocks {
    groups: Vec<(i32, Block)>,
}

/// Tasks with their rewritten records.
type Block = Vec<(TaskId, Vec<u8>)>;

impl FrontBlocks {
    fn add(&mut self, priority: i32, id: TaskId, rec: Vec<u8>) {
        match self.groups.iter_mut().find(|(p, _)| *p == priority) {
            Some((_, g)) => g.push((id, rec)),
            None => self.groups.push((priority, vec![(id, rec)])),
        }
    }

    fn flush(self, tx: &mut Tx<'_>, queue: &QueueName) -> Result<()> {
        for (priority, block) in self.groups {
            tx.push_front(queue, priority, &block)?;
        }
        Ok(())
    }
}

/// release.lua: hands running tasks back without spending an attempt: to the head of their
/// ready list in the order given, or scheduled after a delay.
pub(super) fn release(
    tx: &mut Tx<'_>,
    queue: &QueueName,
    cfg: &QueueConfig,
    items: &[Settle],
) -> Result<Vec<Settled>> {
    let mut front = FrontBlocks::default();
    let out = settle_each(tx, queue, cfg, items, |tx, r, held, now, ev| {
        let mut h = held.head;
        h.attempt = h.attempt.saturating_sub(1);
        let old = h.tail(r.id, &held.raw)?;
        let tail = Tail { server: old.server, error: &r.text, result: old.result };
        if r.delay_ms > 0 {
            h.state = TaskState::Scheduled;
            let slot = tx.index_timed(queue, r.id, h.state, now.saturating_add(r.delay_ms))?;
            tx.put(queue, r.id, slot, &h.rewrite_tail(&held.raw, tail))?;
        } else {
            h.state = TaskState::Queued;
            front.add(h.priority, r.id, h.rewrite_tail(&held.raw, tail));
        }
        let reason = String::from_utf8_lossy(&r.text);
        ev.add(EventKind::TaskReleased, Some(r.id), None, None, Some(&reason));
        Ok(h.state)
    })?;
    front.flush(tx, queue)?;
    Ok(out)
}

/// cancel.lua: cancels a task that has not finished; a running task's holder is fenced off.
pub(super) fn cancel(
    tx: &mut Tx<'_>,
    queue: &QueueName,
    cfg: &QueueConfig,
    id: TaskId,
) -> Result<CancelOutcome> {
    let Some((slot, raw)) = tx.record(queue, id)? else { return Err(Error::NotFound(id)) };
    let mut h = Head::read(id, &raw)?;
    let was = h.state;
    match was {
        TaskState::Queued | TaskState::Scheduled | TaskState::Running | TaskState::Review => {
            tx.unindex(queue, id, was, h.priority, slot)?;
        }
        _ => return Ok(CancelOutcome::AlreadyFinished(was)),
    }
    let now = now_ms();
    h.state = TaskState::Cancelled;
    h.finished = now;
    let slot = tx.index_finished(queue, id, h.state)?;
    tx.put(queue, id, slot, &h.rewrite(&raw))?;
    let mut ev = Events::default();
    ev.add(EventKind::TaskCancelled, Some(id), None, None, None);
    ev.flush(tx, queue, now, cfg.events_max)?;
    Ok(CancelOutcome::Cancelled { was })
}

/// retry.lua: puts a task in review, dead, failed or cancelled back at the tail of its ready
/// list with a fresh attempt budget; answers the state it left.
pub(super) fn retry(
    tx: &mut Tx<'_>,
    queue: &QueueName,
    cfg: &QueueConfig,
    id: TaskId,
) -> Result<TaskState> {
    let Some((slot, raw)) = tx.record(queue, id)? else { return Err(Error::NotFound(id)) };
    let mut h = Head::read(id, &raw)?;
    let was = h.state;
    if !matches!(
        was,
        TaskState::Review | TaskState::Dead | TaskState::Failed | TaskState::Cancelled
    ) {
        return Err(Error::InvalidState { state: was });
    }
    tx.unindex(queue, id, was, h.priority, slot)?;
    (h.state, h.attempt, h.finished) = (TaskState::Queued, 0, 0);
    let slot = tx.push_tail(queue, id, h.priority)?;
    tx.put(queue, id, slot, &h.rewrite(&raw))?;
    let mut ev = Events::default();
    ev.add(EventKind::TaskRetried, Some(id), None, None, None);
    ev.flush(tx, queue, now_ms(), cfg.events_max)?;
    Ok(was)
}

/// promote_due.lua: moves up to `max` scheduled tasks whose time has come to the tail of their
/// ready list; answers how many.
pub(super) fn promote_due(
    tx: &mut Tx<'_>,
    queue: &QueueName,
    cfg: &QueueConfig,
    max: usize,
) -> Result<u64> {
    let now = now_ms();
    let mut ev = Events::default();
    let mut n = 0;
    for (due, id) in tx.timed_due(queue, TaskState::Scheduled, now, max)? {
        tx.unindex(queue, id, TaskState::Scheduled, 0, due)?;
        let Some((_, raw)) = tx.record(queue, id)? else { continue };
        let mut h = Head::read(id, &raw)?;
        h.state = TaskState::Queued;
        let slot = tx.push_tail(queue, id, h.priority)?;
        tx.put(queue, id, slot, &h.rewrite(&raw))?;
        ev.add(EventKind::TaskPromoted, Some(id), None, None, None);
        n += 1;
    }
    ev.flush(tx, queue, now, cfg.events_max)?;
    Ok(n)
}

/// reap_expired.lua: takes back up to `max` running tasks whose lease ran out: idempotent ones
/// to the head of their ready list (dead when no attempt is left), the others to review.
pub(super) fn reap_expired(
    tx: &mut Tx<'_>,
    queue: &QueueName,
    cfg: &QueueConfig,
    max: usize,
) -> Result<u64> {
    const REASON: &str = "lease expired";
    let now = now_ms();
    let mut front = FrontBlocks::default();
    let mut ev = Events::default();
    let mut n = 0;
    for (deadline, id) in tx.timed_due(queue, TaskState::Running, now, max)? {
        tx.unindex(queue, id, TaskState::Running, 0, deadline)?;
        let Some((_, raw)) = tx.record(queue, id)? else { continue };
        let mut h = Head::read(id, &raw)?;
        if h.state != TaskState::Running {
            continue;
        }
        let old = h.tail(id, &raw)?;
        let tail = Tail { server: old.server, error: REASON.as_bytes(), result: old.result };
        let kind = if !h.idempotent() {
            h.state = TaskState::Review;
            let slot = tx.index_timed(queue, id, h.state, now)?;
            tx.put(queue, id, slot, &h.rewrite_tail(&raw, tail))?;
            EventKind::TaskReview
        } else if h.attempt >= h.max_attempts {
            (h.state, h.finished) = (TaskState::Dead, now);
            let slot = tx.index_finished(queue, id, h.state)?;
            tx.put(queue, id, slot, &h.rewrite_tail(&raw, tail))?;
            EventKind::TaskDead
        } else {
            h.state = TaskState::Queued;
            front.add(h.priority, id, h.rewrite_tail(&raw, tail));
            EventKind::TaskRetrying
        };
        ev.add(kind, Some(id), Some(h.attempt), None, Some(REASON));
        n += 1;
    }
    front.flush(tx, queue)?;
    ev.flush(tx, queue, now, cfg.events_max)?;
    Ok(n)
}

/// Most finished tasks one trim forgets per state, as in the Redis store.
const TRIM_BATCH: usize = 1000;

/// trim.lua: forgets finished tasks (succeeded, failed, cancelled, dead) past the retention
/// count, then those that finished before the age limit, oldest first; review is kept.
pub(super) fn trim(tx: &mut Tx<'_>, queue: &QueueName, cfg: &QueueConfig) -> Result<u64> {
    let cutoff = now_ms().saturating_sub(cfg.finished_ttl_ms);
    let mut removed = 0;
    for state in [TaskState::Succeeded, TaskState::Failed, TaskState::Cancelled, TaskState::Dead] {
        let len = tx.count(queue, state)?;
        let over = usize::try_from(len.saturating_sub(cfg.keep_finished)).unwrap_or(usize::MAX);
        let mut n = over.min(TRIM_BATCH);
        let by_age = cfg.finished_ttl_ms > 0 && n < TRIM_BATCH;
        let oldest = tx.finished_head(queue, state, if by_age { TRIM_BATCH } else { n })?;
        if by_age {
            // past the count limit, the oldest that finished before the cutoff
            for &(_, id) in &oldest[n.min(oldest.len())..] {
                let finished = match tx.record(queue, id)? {
                    Some((_, raw)) => Some(Head::read(id, &raw)?.finished),
                    None => None,
                };
                if finished.is_some_and(|f| f > cutoff) {
                    break;
                }
                n += 1;
            }
        }
        for &(seq, id) in oldest.iter().take(n) {
            tx.unindex(queue, id, state, 0, seq)?;
            tx.forget(queue, id)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Appends a server event (no task); answers its id.
pub(super) fn publish(
    tx: &mut Tx<'_>,
    queue: &QueueName,
    cfg: &QueueConfig,
    kind: EventKind,
    server: &str,
    detail: &str,
) -> Result<EventId> {
    let mut ev = Events::default();
    ev.add(kind, None, None, Some(server), Some(detail));
    ev.flush(tx, queue, now_ms(), cfg.events_max)?
        .ok_or_else(|| Error::Corrupt("publish appended no entry".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aged_rank_reads_the_creation_time_from_the_id() {
        let id = TaskId::new();
        let created = id.created_at_ms();
        assert_eq!(aged_rank(id, 0, 1000), i128::from(created));
        assert_eq!(aged_rank(id, 3, 1000), i128::from(created) - 3000);
        assert_eq!(aged_rank(id, -2, 500), i128::from(created) + 1000);
    }
}
