//! The actor fleet: Supervisor, ClientActor per MCP server, HealthMonitor and WorkQueue, which
//! turn queued tasks into MCP calls. Empty until the fleet lands.
