//! mcpq: a prioritized, durable work queue over a fleet of MCP servers. This crate holds the
//! pieces people touch: the configuration loader, `mcpq serve` with its HTTP API, the command
//! line and `mcpq demo`.

pub mod api;
pub mod cli;
pub mod config;
pub mod demo;
pub mod serve;
