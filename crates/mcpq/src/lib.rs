//! mcpq: a prioritized, durable work queue over a fleet of MCP servers. This crate holds the
//! operator-facing pieces: the configuration loader, `mcpq serve` and the command line.

pub mod cli;
pub mod config;
pub mod serve;
