//! mcpq's end-to-end tests: one binary, real processes.

mod api_router;
mod api_tcp;
mod cli;
mod fleet;
mod mcp_auth;
mod mcp_client;
mod mcp_everything;
mod mcp_server;
mod store_conformance;
mod store_embedded;
mod store_input;
mod store_model;
mod store_twins;
