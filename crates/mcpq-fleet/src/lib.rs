//! The actor fleet: Supervisor, ClientActor per MCP server, HealthMonitor and WorkQueue, which
//! turn queued tasks into MCP calls. So far: routing, the choice of a server for a task.

pub mod routing;
