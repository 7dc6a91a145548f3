//! The MCP client mcpq dispatches through: one [`McpClient`] per server, speaking Streamable
//! HTTP in the stateless 2026-07-28 era or the session eras, with auth, size and time limits,
//! and an [`Outcome`] for every request that says whether the call ran, did not, or may have.

mod auth;
mod client;
pub mod config;
mod headers;
mod input;
mod legacy;
mod outcome;
mod sse;

pub use client::{
    BuildError, CallMeta, Era, LEGACY_VERSION, McpClient, SESSION_VERSION, STATELESS_VERSION,
    requests_in_flight,
};
pub use config::{Auth, ConfigError, Secret, ServerConfig, Timeouts, TransportChoice};
pub use legacy::ReqwestTransport;
pub use outcome::{Outcome, RpcError};
