//! The [`Store`] trait: every task state transition as one atomic operation, with its event.
//! Backends: [`redis::RedisStore`] for fleets, [`embedded::EmbeddedStore`] for a single node.
//! Batch operations answer item by item, in order.
//!
//! Fencing: [`Store::claim`] hands out a [`ClaimToken`] per task; renew, complete, fail and
//! release apply only while that token is the task's latest claim and it is running, so a
//! paused or partitioned dispatcher can neither commit a stale result nor publish its event.

pub mod embedded;
pub mod redis;

use std::future::Future;
use std::time::Duration;

use serde_json::Value;

use crate::error::{Error, InvalidInput, Result};
use crate::event::{Event, EventId, EventKind};
use crate::task::{NewTask, QueueName, Task, TaskId, TaskState};

/// Most tasks one atomic step carries; larger batches are split into steps of this size (the
/// Redis store's scripts cannot take more, and both stores split alike so that event entries
/// match).
pub(crate) const MAX_BATCH: usize = 1000;

/// A duration in whole milliseconds, saturating.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Refuses to publish a task kind: those come only with their transition.
pub(crate) fn check_publishable(kind: EventKind) -> Result<()> {
    if kind.is_server() {
        return Ok(());
    }
    Err(Error::Invalid(InvalidInput::new(
        "kind",
        format!("{kind} is written by its transition, not published"),
    )))
}

/// Proof of a claim; presented to settle or renew the task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClaimToken(pub(crate) u32);

impl ClaimToken {
    /// The token's number (the task's claim count).
    pub fn get(self) -> u32 {
        self.0
    }

    /// A token of a given number, for tests of code that holds claims. A forged token
    /// gains nothing: the store compares it with the task's claim count.
    pub fn from_raw(n: u32) -> Self {
        Self(n)
    }
}

/// A task claimed for one attempt.
#[derive(Clone, Debug)]
pub struct Claimed {
    /// The task, as running.
    pub task: Task,
    /// Its fencing token.
    pub token: ClaimToken,
    /// When the lease runs out unless renewed (store clock, ms since the epoch).
    pub lease_deadline_ms: u64,
}

impl Claimed {
    /// A claimed task from its record as the claim rewrote it.
    pub(crate) fn decode(
        queue: &QueueName,
        id: TaskId,
        raw: &[u8],
        deadline_ms: u64,
    ) -> Result<Self> {
        let rec = crate::record::decode(queue, id, raw)?;
        Ok(Self { task: rec.task, token: ClaimToken(rec.claims), lease_deadline_ms: deadline_ms })
    }
}

/// What became of one submitted task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// Stored as a new task.
    Created(TaskId),
    /// Already there: the same id was sent before, or the same idempotency key with the same
    /// body. Carries the existing task's id.
    Existing(TaskId),
    /// The idempotency key is held by another task with a different body. Nothing stored.
    Conflict(TaskId),
}

impl Enqueued {
    /// The id of the task that now stands for the submission.
    pub fn id(self) -> TaskId {
        match self {
            Self::Created(id) | Self::Existing(id) | Self::Conflict(id) => id,
        }
    }
}

/// A successful attempt to record.
#[derive(Clone, Debug)]
pub struct Completion {
    /// The task.
    pub id: TaskId,
    /// The claim it ran under.
    pub token: ClaimToken,
    /// The server that ran it.
    pub server: String,
    /// The MCP result.
    pub result: Value,
}

impl Completion {
    /// The result as stored: named MessagePack.
    pub(crate) fn encoded_result(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.encode_result(&mut out)?;
        Ok(out)
    }

    /// Appends the result as stored to `out`.
    pub(crate) fn encode_result(&self, out: &mut Vec<u8>) -> Result<()> {
        rmp_serde::encode::write_named(out, &self.result)
            .map_err(|e| Error::Invalid(InvalidInput::new("result", e.to_string())))
    }
}

/// What to do with a task after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Try again after `delay` if attempts remain; dead otherwise.
    Retry {
        /// Backoff before the next attempt.
        delay: Duration,
    },
    /// Fail for good (the tool reported an error, or the error will not go away).
    Fatal,
    /// The outcome is unknown and repeating is unsafe: park for a person.
    Review,
}

/// A failed attempt to record.
#[derive(Clone, Debug)]
pub struct Failure {
    /// The task.
    pub id: TaskId,
    /// The claim it ran under.
    pub token: ClaimToken,
    /// The server it ran on.
    pub server: String,
    /// What went wrong.
    pub error: String,
    /// What happens next.
    pub disposition: Disposition,
}

/// A claimed task handed back without spending an attempt.
#[derive(Clone, Debug)]
pub struct Release {
    /// The task.
    pub id: TaskId,
    /// The claim it was held under.
    pub token: ClaimToken,
    /// Wait this long before it can be claimed again (zero: at once, at the head of its list).
    pub delay: Duration,
    /// Why (recorded as the task's latest error).
    pub reason: String,
}

/// The answer to a settle (complete, fail, release) of one task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    /// Applied; the task is now in this state.
    Applied(TaskState),
    /// The token no longer holds the task; nothing changed. Carries its current state (`None`:
    /// the task no longer exists).
    Rejected(Option<TaskState>),
}

/// The answer to a cancel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Cancelled; it was in this state.
    Cancelled {
        /// The state it left.
        was: TaskState,
    },
    /// It had already finished in this state; nothing changed.
    AlreadyFinished(TaskState),
}

/// Task counts of a queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueStats {
    /// Ready to run.
    pub queued: u64,
    /// Waiting for a delay or backoff.
    pub scheduled: u64,
    /// Claimed.
    pub running: u64,
    /// Waiting for a person.
    pub review: u64,
    /// Retained succeeded tasks.
    pub succeeded: u64,
    /// Retained failed tasks.
    pub failed: u64,
    /// Retained dead tasks.
    pub dead: u64,
    /// Retained cancelled tasks.
    pub cancelled: u64,
    /// Claims are paused.
    pub paused: bool,
}

impl QueueStats {
    /// The count for one state.
    pub fn count(&self, state: TaskState) -> u64 {
        match state {
            TaskState::Queued => self.queued,
            TaskState::Scheduled => self.scheduled,
            TaskState::Running => self.running,
            TaskState::Review => self.review,
            TaskState::Succeeded => self.succeeded,
            TaskState::Failed => self.failed,
            TaskState::Dead => self.dead,
            TaskState::Cancelled => self.cancelled,
        }
    }
}

/// One page of a listing.
#[derive(Clone, Debug)]
pub struct Page {
    /// The tasks, in the state's order (queued: claim order; scheduled: due time; running:
    /// lease deadline; review: oldest first; finished states: newest first).
    pub tasks: Vec<Task>,
    /// Where the next page starts; `None` at the end.
    pub next_cursor: Option<u64>,
}

/// A durable home for queues. Every method is one atomic step per task.
pub trait Store: Clone + Send + Sync + 'static {
    /// Stores new tasks (checked first: one bad task rejects the batch, nothing is written).
    fn enqueue(
        &self,
        queue: &QueueName,
        tasks: &[NewTask],
    ) -> impl Future<Output = Result<Vec<Enqueued>>> + Send;

    /// Claims up to `max` ready tasks under a lease of `lease`, highest priority first.
    fn claim(
        &self,
        queue: &QueueName,
        max: usize,
        lease: Duration,
    ) -> impl Future<Output = Result<Vec<Claimed>>> + Send;

    /// Whether [`Store::claim_waiting`] waits for tasks; a caller watches the queue's events
    /// for a store that does not.
    fn waits_for_claims(&self) -> bool {
        false
    }

    /// Claims as [`Store::claim`] does; when nothing can be claimed, waits up to `wait` for
    /// tasks to become claimable and claims them in the step that makes them so (before that
    /// step's sync), answering what it claimed, or nothing once `wait` is over. Once `cancel`
    /// completes it answers at once, with what it claimed before if anything: cancel through
    /// it rather than by dropping the future, whose claimed tasks would then run nowhere until
    /// their lease ran out. A store that does not wait answers as `claim` does.
    fn claim_waiting(
        &self,
        queue: &QueueName,
        max: usize,
        lease: Duration,
        wait: Duration,
        cancel: impl Future<Output = ()> + Send,
    ) -> impl Future<Output = Result<Vec<Claimed>>> + Send {
        drop((wait, cancel));
        self.claim(queue, max, lease)
    }

    /// Extends leases; answers per item whether the token still held the task.
    fn renew(
        &self,
        queue: &QueueName,
        leases: &[(TaskId, ClaimToken)],
        lease: Duration,
    ) -> impl Future<Output = Result<Vec<bool>>> + Send;

    /// Records successful attempts.
    fn complete(
        &self,
        queue: &QueueName,
        items: &[Completion],
    ) -> impl Future<Output = Result<Vec<Settled>>> + Send;

    /// Records failed attempts.
    fn fail(
        &self,
        queue: &QueueName,
        items: &[Failure],
    ) -> impl Future<Output = Result<Vec<Settled>>> + Send;

    /// Hands claimed tasks back without spending an attempt.
    fn release(
        &self,
        queue: &QueueName,
        items: &[Release],
    ) -> impl Future<Output = Result<Vec<Settled>>> + Send;

    /// Cancels a task that has not finished.
    fn cancel(
        &self,
        queue: &QueueName,
        id: TaskId,
    ) -> impl Future<Output = Result<CancelOutcome>> + Send;

    /// Sends a task in review, dead, failed or cancelled back to the queue with fresh
    /// attempts; answers the state it left.
    fn retry(
        &self,
        queue: &QueueName,
        id: TaskId,
    ) -> impl Future<Output = Result<TaskState>> + Send;

    /// Queues up to `max` scheduled tasks whose time has come; answers how many.
    fn promote_due(
        &self,
        queue: &QueueName,
        max: usize,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Takes back up to `max` running tasks whose lease ran out; answers how many.
    fn reap_expired(
        &self,
        queue: &QueueName,
        max: usize,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Forgets finished tasks past the queue's retention; answers how many.
    fn trim(&self, queue: &QueueName) -> impl Future<Output = Result<u64>> + Send;

    /// One task.
    fn get(
        &self,
        queue: &QueueName,
        id: TaskId,
    ) -> impl Future<Output = Result<Option<Task>>> + Send;

    /// Tasks in one state, a page at a time.
    fn list(
        &self,
        queue: &QueueName,
        state: TaskState,
        cursor: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Page>> + Send;

    /// Counts per state.
    fn stats(&self, queue: &QueueName) -> impl Future<Output = Result<QueueStats>> + Send;

    /// Pauses or resumes claims.
    fn set_paused(
        &self,
        queue: &QueueName,
        paused: bool,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Up to `max` events after `after` (`None`: from the oldest retained), waiting up to
    /// `block` for the first one when there are none yet.
    fn read_events(
        &self,
        queue: &QueueName,
        after: Option<EventId>,
        max: usize,
        block: Option<Duration>,
    ) -> impl Future<Output = Result<Vec<Event>>> + Send;

    /// Appends an event that no task transition writes (a server's health changed), with the
    /// server and a detail; answers its id. Task kinds are refused: those come only with
    /// their transition.
    fn publish(
        &self,
        queue: &QueueName,
        kind: EventKind,
        server: &str,
        detail: &str,
    ) -> impl Future<Output = Result<EventId>> + Send;

    /// The id of the newest retained event, if any.
    fn last_event_id(
        &self,
        queue: &QueueName,
    ) -> impl Future<Output = Result<Option<EventId>>> + Send;
}
