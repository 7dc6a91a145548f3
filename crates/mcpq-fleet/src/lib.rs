//! The actor fleet that turns queued tasks into MCP calls: a Supervisor owns a ClientActor per
//! server, the HealthMonitor and the WorkQueue (DESIGN §5). The facts they share — claimed
//! tasks, server health, tools — live in one shared table, so an actor that crashes and is
//! restarted loses nothing. [`Fleet`] is the handle: start, add and remove servers, status,
//! health events, shutdown with drain.

mod client_actor;
pub mod config;
mod health;
mod limits;
pub mod routing;
mod shared;
mod supervisor;
mod work_queue;

pub use config::{
    BreakerConfig, ConfigError, DispatchConfig, FleetConfig, HealthConfig, RestartConfig,
};
pub use shared::{Health, HistogramSnapshot, LATENCY_BUCKETS, ServerEvent};
pub use supervisor::{Fleet, FleetError, FleetHandle, FleetStats, Part, ServerStatus};
pub use work_queue::DrainReport;
