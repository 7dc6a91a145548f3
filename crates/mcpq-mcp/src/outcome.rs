//! What became of a request: the three classes the dispatcher branches on. A retry after an
//! ambiguous outcome may run a tool twice; after `NotDelivered` it cannot.

use std::time::Duration;

use serde_json::Value;

/// The outcome of one request to an MCP server.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome<T> {
    /// The server answered: a result (for tools, possibly one with `isError: true`) or a
    /// JSON-RPC error.
    Executed(Result<T, RpcError>),
    /// The request certainly did not run (connect refused, rejected before execution, expired
    /// session, overload). Safe to send again, anywhere.
    NotDelivered {
        /// What happened.
        reason: String,
        /// How long the server asked us to wait (`Retry-After`).
        retry_after: Option<Duration>,
    },
    /// The request may or may not have run (timeout, reset or stream cut after it was
    /// accepted, unreadable answer). Repeat only what is safe to repeat.
    Ambiguous {
        /// What happened.
        reason: String,
    },
}

impl<T> Outcome<T> {
    pub(crate) fn not_delivered(reason: impl Into<String>) -> Self {
        Self::NotDelivered { reason: reason.into(), retry_after: None }
    }

    pub(crate) fn ambiguous(reason: impl Into<String>) -> Self {
        Self::Ambiguous { reason: reason.into() }
    }

    /// Maps an executed result, keeping the class.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Outcome<U> {
        match self {
            Self::Executed(r) => Outcome::Executed(r.map(f)),
            Self::NotDelivered { reason, retry_after } => {
                Outcome::NotDelivered { reason, retry_after }
            }
            Self::Ambiguous { reason } => Outcome::Ambiguous { reason },
        }
    }

    /// The executed value, if any.
    pub fn ok(self) -> Option<T> {
        match self {
            Self::Executed(Ok(v)) => Some(v),
            _ => None,
        }
    }
}

/// A JSON-RPC error answer.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct RpcError {
    /// The error code.
    pub code: i64,
    /// The message.
    pub message: String,
    /// Extra data, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl RpcError {
    /// JSON-RPC "method not found".
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// mcpq's own code, never a server's: the server kept answering with an
    /// `InputRequiredResult` that mcpq could not satisfy (no user, no model); `data` is the last
    /// one. Outside the range JSON-RPC reserves.
    pub const INPUT_REQUIRED: i64 = -32800;
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}
