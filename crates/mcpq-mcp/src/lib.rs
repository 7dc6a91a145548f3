//! The MCP client mcpq dispatches through: wire-era detection, Streamable HTTP and legacy
//! HTTP+SSE transports, auth, and the classification of every call's outcome
//! (executed, not delivered, ambiguous). Empty until the client lands.
