//! The store boundary's errors. Callers branch on the variant: bad input is the caller's to
//! fix, `Unavailable` is worth retrying, `Corrupt` is a bug or tampering.

use crate::task::{TaskId, TaskState};

/// A field the caller got wrong, named as in the HTTP API (`call.name`, `tasks[3].timeout_ms`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidInput {
    /// The offending field.
    pub field: String,
    /// What is wrong with it and what is allowed.
    pub message: String,
}

impl InvalidInput {
    /// An error for `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// Why a store operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input was rejected before anything was written.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// The idempotency key is held by a task with a different body.
    #[error("idempotency key already used by task {existing} with a different body")]
    Conflict {
        /// The task that holds the key.
        existing: TaskId,
    },
    /// No such task (never enqueued, or trimmed by retention).
    #[error("no task {0}")]
    NotFound(TaskId),
    /// The operation does not apply to a task in this state.
    #[error("task is {state}")]
    InvalidState {
        /// The task's state.
        state: TaskState,
    },
    /// The store could not be reached, refused the command or failed to read or write its
    /// storage; worth retrying. The source is the backend's own error (Redis, redb, I/O).
    #[error("store unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store answered with data that does not decode.
    #[error("corrupt data in store: {0}")]
    Corrupt(String),
    /// A wait ended before the task finished.
    #[error("timed out")]
    Timeout,
}

impl Error {
    /// True when the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Timeout)
    }
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        Self::Unavailable(Box::new(e))
    }
}

/// Result of store operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
