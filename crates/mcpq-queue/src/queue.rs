//! [`Queue`]: the producer's handle on one queue of a store — enqueue, inspect, wait, cancel,
//! retry, pause, and subscribe to the queue's events as a resumable stream.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::Stream;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::event::{Event, EventId, StartAt};
use crate::store::redis::RedisStore;
use crate::store::{CancelOutcome, Enqueued, Page, QueueStats, Store};
use crate::task::{NewTask, QueueName, Task, TaskId, TaskState};

/// How long one blocking event read waits before checking again.
const EVENT_POLL: Duration = Duration::from_secs(5);
/// Pause after a failed event read before the next, so an outage is not a hot loop.
const EVENT_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// A handle on one queue. Cheap to clone; clones share the store's connections.
#[derive(Clone, Debug)]
pub struct Queue<S: Store = RedisStore> {
    store: S,
    name: QueueName,
}

impl Queue<RedisStore> {
    /// Connects to Redis at `url` and opens the `default` queue.
    pub async fn connect(url: &str) -> Result<Self> {
        Ok(Self::new(RedisStore::connect(url).await?, QueueName::default()))
    }
}

impl<S: Store> Queue<S> {
    /// A handle on `name` in `store`.
    pub fn new(store: S, name: QueueName) -> Self {
        Self { store, name }
    }

    /// A handle on another queue of the same store.
    pub fn named(&self, name: QueueName) -> Self {
        Self { store: self.store.clone(), name }
    }

    /// The queue's name.
    pub fn name(&self) -> &QueueName {
        &self.name
    }

    /// The store underneath.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Enqueues one task and answers its id (the existing task's id when its idempotency key
    /// was seen with the same body). A key held by a different body is [`Error::Conflict`].
    pub async fn enqueue(&self, task: NewTask) -> Result<TaskId> {
        let outcome = self.store.enqueue(&self.name, std::slice::from_ref(&task)).await?;
        match outcome.first() {
            Some(Enqueued::Created(id) | Enqueued::Existing(id)) => Ok(*id),
            Some(Enqueued::Conflict(existing)) => Err(Error::Conflict { existing: *existing }),
            None => Err(Error::Corrupt("enqueue answered nothing".into())),
        }
    }

    /// Enqueues a batch: all tasks are checked first, then stored in order, a thousand per
    /// round trip. Answers per task.
    pub async fn enqueue_many(&self, tasks: &[NewTask]) -> Result<Vec<Enqueued>> {
        self.store.enqueue(&self.name, tasks).await
    }

    /// One task.
    pub async fn get(&self, id: TaskId) -> Result<Task> {
        self.store.get(&self.name, id).await?.ok_or(Error::NotFound(id))
    }

    /// Waits until the task is terminal (succeeded, failed, dead, review or cancelled), for at
    /// most `timeout`; answers the task as it then is, or [`Error::Timeout`].
    pub async fn wait(&self, id: TaskId, timeout: Duration) -> Result<Task> {
        let deadline = Instant::now() + timeout;
        // mark the stream before reading the task, so no transition falls between the two
        let mut after = self.store.last_event_id(&self.name).await?;
        let mut task = self.get(id).await?;
        while !task.state.is_terminal() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout);
            }
            let events =
                self.store.read_events(&self.name, after, 512, Some(left.min(EVENT_POLL))).await?;
            let touched = events.iter().any(|e| e.task == Some(id));
            if let Some(last) = events.last() {
                after = Some(last.id);
            }
            // an empty read re-checks too, in case events were trimmed away meanwhile
            if touched || events.is_empty() {
                task = self.get(id).await?;
            }
        }
        Ok(task)
    }

    /// Cancels a task that has not finished.
    pub async fn cancel(&self, id: TaskId) -> Result<CancelOutcome> {
        self.store.cancel(&self.name, id).await
    }

    /// Sends a task in review, dead, failed or cancelled back to the queue with fresh attempts.
    pub async fn retry(&self, id: TaskId) -> Result<TaskState> {
        self.store.retry(&self.name, id).await
    }

    /// Tasks in `state`, `limit` at a time from `cursor` (0 for the first page).
    pub async fn list(&self, state: TaskState, cursor: u64, limit: usize) -> Result<Page> {
        self.store.list(&self.name, state, cursor, limit).await
    }

    /// Counts per state.
    pub async fn stats(&self) -> Result<QueueStats> {
        self.store.stats(&self.name).await
    }

    /// Stops dispatchers from claiming from this queue.
    pub async fn pause(&self) -> Result<()> {
        self.store.set_paused(&self.name, true).await
    }

    /// Lets dispatchers claim again.
    pub async fn resume(&self) -> Result<()> {
        self.store.set_paused(&self.name, false).await
    }

    /// The queue's events from `from` on, as an endless stream. A failed read yields the error
    /// and the stream carries on from the same place, so a subscriber sees every retained event
    /// once, in order. [`StartAt::Now`] means the newest event when the stream is first polled.
    pub fn subscribe(&self, from: StartAt) -> impl Stream<Item = Result<Event>> + Send + use<S> {
        struct State<S: Store> {
            queue: Queue<S>,
            after: Option<EventId>,
            unresolved_now: bool,
            buf: VecDeque<Event>,
            failed: bool,
        }
        let (after, unresolved_now) = match from {
            StartAt::Beginning => (None, false),
            StartAt::Now => (None, true),
            StartAt::After(id) => (Some(id), false),
        };
        let state = State {
            queue: self.clone(),
            after,
            unresolved_now,
            buf: VecDeque::new(),
            failed: false,
        };
        futures_util::stream::unfold(state, |mut st| async move {
            loop {
                if let Some(e) = st.buf.pop_front() {
                    return Some((Ok(e), st));
                }
                if st.failed {
                    tokio::time::sleep(EVENT_RETRY_PAUSE).await;
                    st.failed = false;
                }
                let q = &st.queue;
                if st.unresolved_now {
                    match q.store.last_event_id(&q.name).await {
                        Ok(last) => {
                            st.after = last;
                            st.unresolved_now = false;
                        }
                        Err(e) => {
                            st.failed = true;
                            return Some((Err(e), st));
                        }
                    }
                }
                match q.store.read_events(&q.name, st.after, 512, Some(EVENT_POLL)).await {
                    Ok(events) => {
                        if let Some(last) = events.last() {
                            st.after = Some(last.id);
                        }
                        st.buf.extend(events);
                    }
                    Err(e) => {
                        st.failed = true;
                        return Some((Err(e), st));
                    }
                }
            }
        })
    }
}
