//! mcpq's end-to-end tests: one binary, real processes.

mod mcp_client;
mod mcp_server;
mod store_conformance;
mod store_input;
mod store_model;
