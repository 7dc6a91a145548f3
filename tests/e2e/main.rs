//! mcpq's end-to-end tests: one binary, real processes.

mod store_conformance;
mod store_input;
mod store_model;
