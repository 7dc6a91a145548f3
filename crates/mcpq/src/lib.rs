//! mcpq: a prioritized, durable work queue over a fleet of MCP servers. This crate holds the
//! operator-facing pieces; today the configuration loader.

pub mod config;
