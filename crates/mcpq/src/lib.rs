//! mcpq: a prioritized, durable work queue over a fleet of MCP servers. This crate holds the
//! pieces people touch: the configuration loader, `mcpq serve` with its HTTP API, the command
//! line, `mcpq demo` and `mcpq bench`.

pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod demo;
mod local_server;
pub mod serve;
