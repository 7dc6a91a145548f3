//! mcpq's durable queue: the task model, events, the [`Store`] trait with its Redis and
//! embedded backends, and [`Queue`], the handle producers enqueue through.
//!
//! ```no_run
//! # async fn demo() -> Result<(), mcpq_queue::Error> {
//! use mcpq_queue::{NewTask, Queue};
//! let queue = Queue::connect("redis://127.0.0.1:6379").await?;
//! let id = queue.enqueue(NewTask::tool("echo", serde_json::json!({"text": "hi"})).priority(5)).await?;
//! let done = queue.wait(id, std::time::Duration::from_secs(30)).await?;
//! println!("{}: {:?}", done.state, done.result);
//! # Ok(()) }
//! ```

pub mod config;
mod error;
mod event;
mod queue;
mod record;
pub mod store;
mod task;

pub use config::{QueueConfig, QueueConfigs, StoreConfig};
pub use error::{Error, InvalidInput, Result};
pub use event::{Event, EventId, EventKind, StartAt};
pub use queue::Queue;
pub use store::embedded::EmbeddedStore;
pub use store::redis::RedisStore;
pub use store::{
    CancelOutcome, ClaimToken, Claimed, Completion, Disposition, Enqueued, Failure, Page,
    QueueStats, Release, Settled, Store,
};
pub use task::{
    Backoff, Call, MAX_ATTEMPTS, MAX_DELAY, MAX_JSON_DEPTH, MAX_NAME_LEN, MAX_TASK_BYTES,
    MAX_TIMEOUT, NewTask, QueueName, Route, Strategy, Task, TaskId, TaskState,
};
