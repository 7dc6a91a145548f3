//! The Supervisor and the fleet's public handle. The Supervisor spawns a linked ClientActor
//! per server, the HealthMonitor and the WorkQueue; restarts a child that fails, after an
//! exponential backoff and within a restart budget (past it the child is reported and left
//! stopped); adds and removes servers while running; and shuts down by draining the
//! WorkQueue first. ractor's default supervision would stop the supervisor with its child:
//! `handle_supervisor_evt` is overridden.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mcpq_mcp::ServerConfig;
use mcpq_queue::Store;
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
    rpc::CallResult,
};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::client_actor::{ClientActor, ClientArgs, ClientMsg};
use crate::config::{ConfigError, FleetConfig};
use crate::health::{HealthArgs, HealthMonitor, HealthMsg};
use crate::shared::{Counters, Health, HistogramSnapshot, ServerEvent, ServerInfo, Shared};
use crate::work_queue::{DrainReport, WorkQueue, WorkQueueArgs, WorkQueueMsg};

/// Why a fleet request failed.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A server of that name exists already.
    #[error("server {0:?} exists already")]
    DuplicateServer(String),
    /// No server of that name.
    #[error("no server named {0:?}")]
    UnknownServer(String),
    /// The fleet is stopped or stopping.
    #[error("fleet unavailable: {0}")]
    Unavailable(String),
    /// The fleet did not answer in time.
    #[error("fleet did not answer in time")]
    Timeout,
}

/// An actor a test can make crash.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// The WorkQueue.
    WorkQueue,
    /// The HealthMonitor.
    HealthMonitor,
    /// The ClientActor of a server.
    Client(String),
}

/// A server as the fleet sees it now.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ServerStatus {
    /// Its name.
    pub name: String,
    /// Its endpoint.
    pub url: String,
    /// The protocol revision it speaks, once known.
    pub era: Option<String>,
    /// Its health.
    pub health: Health,
    /// False while its breaker is open or it asked to be left alone (`Retry-After`).
    pub available: bool,
    /// Calls in flight from this replica.
    pub in_flight: u32,
    /// Whether its ClientActor runs (false briefly during a restart, and for good once it
    /// spent its restart budget).
    pub client_running: bool,
    /// Its concurrency limit.
    pub max_concurrency: u32,
    /// Its tools, once listed.
    pub tools: Option<Vec<String>>,
}

/// Counters since the fleet started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FleetStats {
    /// Tasks claimed.
    pub claimed: u64,
    /// Tasks handed to a server.
    pub dispatched: u64,
    /// Attempts recorded as succeeded.
    pub succeeded: u64,
    /// Tasks failed for good.
    pub failed: u64,
    /// Attempts that will be retried after a backoff.
    pub retried: u64,
    /// Tasks handed back without spending an attempt.
    pub released: u64,
    /// Tasks parked in review.
    pub review: u64,
    /// Tasks dead after their last attempt.
    pub dead: u64,
    /// Results and leases refused because another claim holds the task.
    pub fenced: u64,
    /// In-flight tasks handed back when their server went offline.
    pub redistributed: u64,
    /// Tasks failed because no attempt could start before they expired.
    pub expired: u64,
    /// Actor restarts.
    pub restarts: u64,
}

pub(crate) enum SupervisorMsg {
    AddServer(Box<ServerConfig>, RpcReplyPort<Result<(), FleetError>>),
    RemoveServer(String, RpcReplyPort<Result<(), FleetError>>),
    Shutdown(RpcReplyPort<DrainReport>),
    Restart(Part),
    Crash(Part),
}

struct Child {
    id: Option<ActorId>,
    restarts: VecDeque<Instant>,
}

pub(crate) struct SupervisorArgs<S> {
    store: S,
    shared: Arc<Shared>,
    cfg: FleetConfig,
}

pub(crate) struct SupervisorState<S> {
    store: S,
    shared: Arc<Shared>,
    cfg: FleetConfig,
    children: HashMap<Part, Child>,
    stopping: bool,
}

pub(crate) struct Supervisor<S>(std::marker::PhantomData<fn() -> S>);

impl<S: Store> Actor for Supervisor<S> {
    type Msg = SupervisorMsg;
    type State = SupervisorState<S>;
    type Arguments = SupervisorArgs<S>;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        args: SupervisorArgs<S>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut st = SupervisorState {
            store: args.store,
            shared: args.shared,
            cfg: args.cfg,
            children: HashMap::new(),
            stopping: false,
        };
        // clients first, so the WorkQueue finds them on its first pump
        let names: Vec<String> = st.cfg.servers.iter().map(|s| s.name.clone()).collect();
        for name in names {
            st.spawn(&myself, Part::Client(name)).await?;
        }
        st.spawn(&myself, Part::HealthMonitor).await?;
        st.spawn(&myself, Part::WorkQueue).await?;
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::AddServer(cfg, reply) => {
                let r = st.add_server(&myself, *cfg).await;
                let _ = reply.send(r);
            }
            SupervisorMsg::RemoveServer(name, reply) => {
                let _ = reply.send(st.remove_server(&myself, &name));
            }
            SupervisorMsg::Shutdown(reply) => {
                st.stopping = true;
                let report = st.drain().await;
                for child in st.children.values() {
                    if let Some(id) = child.id {
                        stop_child(&myself, id);
                    }
                }
                st.shared.set_work_queue(None);
                st.shared.set_health(None);
                let _ = reply.send(report);
                myself.stop(Some("shut down".to_owned()));
            }
            SupervisorMsg::Restart(part) => {
                // only a child still missing: a server removed and added again meanwhile has
                // an actor already
                if !st.stopping
                    && st.children.get(&part).is_some_and(|c| c.id.is_none())
                    && let Err(e) = st.spawn(&myself, part.clone()).await
                {
                    tracing::error!(?part, error = %e, "restart failed");
                    st.child_died(&myself, part, format!("restart failed: {e}"));
                }
            }
            SupervisorMsg::Crash(part) => {
                let sent = match &part {
                    Part::WorkQueue => {
                        st.shared.work_queue().map(|r| r.send_message(WorkQueueMsg::Crash).is_ok())
                    }
                    Part::HealthMonitor => {
                        st.shared.health_ref().map(|r| r.send_message(HealthMsg::Crash).is_ok())
                    }
                    Part::Client(n) => {
                        st.shared.client(n).map(|r| r.send_message(ClientMsg::Crash).is_ok())
                    }
                };
                tracing::warn!(
                    ?part,
                    sent = sent.unwrap_or(false),
                    "injecting a crash (test hook)"
                );
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match evt {
            SupervisionEvent::ActorFailed(cell, e) => (cell, format!("failed: {e}")),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, format!("stopped: {}", reason.unwrap_or_default()))
            }
            _ => return Ok(()),
        };
        let id = cell.get_id();
        let Some(part) = st.children.iter().find(|(_, c)| c.id == Some(id)).map(|(p, _)| p.clone())
        else {
            return Ok(()); // a removed server's actor, or one already replaced
        };
        if st.stopping {
            return Ok(());
        }
        st.child_died(&myself, part, why);
        Ok(())
    }
}

fn stop_child(myself: &ActorRef<SupervisorMsg>, id: ActorId) {
    if let Some(cell) = myself.get_children().into_iter().find(|c| c.get_id() == id) {
        cell.stop(Some("fleet stopping".to_owned()));
    }
}

impl<S: Store> SupervisorState<S> {
    async fn spawn(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        part: Part,
    ) -> Result<(), ActorProcessingErr> {
        let sup: ActorCell = myself.get_cell();
        let shared = self.shared.clone();
        let id = match &part {
            Part::Client(name) => {
                let cfg = self
                    .shared
                    .servers()
                    .iter()
                    .find(|s| &s.cfg.name == name)
                    .map(|s| s.cfg.clone())
                    .ok_or_else(|| format!("server {name} is not configured"))?;
                let args = ClientArgs {
                    cfg,
                    shared: shared.clone(),
                    breaker: self.cfg.dispatch.breaker.clone(),
                    probe_timeout: Duration::from_millis(self.cfg.health.probe_timeout_ms),
                    default_timeout: Duration::from_millis(self.cfg.dispatch.timeout_ms),
                };
                let (r, _) = Actor::spawn_linked(None, ClientActor, args, sup).await?;
                shared.set_client(name, Some(r.clone()));
                shared.pump();
                r.get_id()
            }
            Part::HealthMonitor => {
                let args = HealthArgs {
                    shared,
                    cfg: self.cfg.health.clone(),
                    store: self.store.clone(),
                    queues: self.cfg.queues.clone(),
                };
                Actor::spawn_linked(None, HealthMonitor::new(), args, sup).await?.0.get_id()
            }
            Part::WorkQueue => {
                let args = WorkQueueArgs {
                    store: self.store.clone(),
                    shared,
                    queues: self.cfg.queues.clone(),
                    cfg: self.cfg.dispatch.clone(),
                };
                Actor::spawn_linked(None, WorkQueue::new(), args, sup).await?.0.get_id()
            }
        };
        self.children
            .entry(part)
            .or_insert_with(|| Child { id: None, restarts: VecDeque::new() })
            .id = Some(id);
        Ok(())
    }

    /// A child is gone: restart it after a backoff, unless it used up its budget.
    fn child_died(&mut self, myself: &ActorRef<SupervisorMsg>, part: Part, why: String) {
        let shared = self.shared.clone();
        let Some(child) = self.children.get_mut(&part) else { return };
        child.id = None;
        match &part {
            // calls it started run on as tasks of their own and record their outcomes
            Part::Client(name) => shared.set_client(name, None),
            Part::HealthMonitor => shared.set_health(None),
            Part::WorkQueue => shared.set_work_queue(None),
        }
        let budget = &self.cfg.dispatch.restart;
        let now = Instant::now();
        let window = Duration::from_millis(budget.window_ms);
        child.restarts.retain(|t| now.duration_since(*t) < window);
        if child.restarts.len() as u32 >= budget.max_restarts {
            if matches!(part, Part::Client(_)) {
                tracing::error!(?part, %why, restarts = child.restarts.len(),
                    "actor keeps failing; restart budget spent, left stopped");
                return;
            }
            // without its WorkQueue or HealthMonitor a replica would hold leases and do
            // nothing: stop the whole fleet so the process exits and others take over
            tracing::error!(?part, %why, restarts = child.restarts.len(),
                "actor keeps failing; restart budget spent, stopping the fleet");
            self.stopping = true;
            myself.stop(Some(format!("{part:?} keeps failing: {why}")));
            return;
        }
        child.restarts.push_back(now);
        let delay = budget.backoff(child.restarts.len() as u32);
        tracing::warn!(?part, %why, ?delay, "actor died; restarting");
        Counters::add(&shared.counters.restarts, 1);
        myself.send_after(delay, move || SupervisorMsg::Restart(part));
    }

    async fn add_server(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        cfg: ServerConfig,
    ) -> Result<(), FleetError> {
        let n = self.shared.servers().len();
        cfg.validate(&format!("servers[{n}]"))
            .map_err(|e| ConfigError { key: e.key, message: e.message })?;
        let name = cfg.name.clone();
        {
            let mut servers = self.shared.servers_mut();
            if servers.iter().any(|s| s.cfg.name == name) {
                return Err(FleetError::DuplicateServer(name));
            }
            servers.push(ServerInfo::new(cfg));
        }
        if let Err(e) = self.spawn(myself, Part::Client(name.clone())).await {
            self.shared.servers_mut().retain(|s| s.cfg.name != name);
            return Err(FleetError::Unavailable(format!("cannot start client of {name}: {e}")));
        }
        tracing::info!(server = %name, "server added");
        Ok(())
    }

    fn remove_server(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        name: &str,
    ) -> Result<(), FleetError> {
        let part = Part::Client(name.to_owned());
        let Some(child) = self.children.remove(&part) else {
            return Err(FleetError::UnknownServer(name.to_owned()));
        };
        self.shared.servers_mut().retain(|s| s.cfg.name != name);
        self.shared.set_client(name, None);
        let n = self.shared.ledger().redistribute(name, &format!("server {name} was removed"));
        if let Some(id) = child.id {
            stop_child(myself, id);
        }
        tracing::info!(server = %name, handed_back = n, "server removed");
        self.shared.pump();
        Ok(())
    }

    async fn drain(&mut self) -> DrainReport {
        let Some(wq) = self.shared.work_queue() else { return DrainReport::default() };
        // the WorkQueue answers by its drain deadline; the margin covers the last store writes
        let limit =
            Duration::from_millis(self.cfg.dispatch.drain_timeout_ms) + Duration::from_secs(10);
        match wq.call(WorkQueueMsg::Drain, Some(limit)).await {
            Ok(CallResult::Success(report)) => report,
            other => {
                tracing::warn!(?other, "drain got no answer; leases will hand the tasks back");
                DrainReport::default()
            }
        }
    }
}

/// A running fleet: the handle producers of work never see, operators and tests hold.
/// Derefs to [`FleetHandle`], the cloneable part an HTTP API shares.
pub struct Fleet {
    handle: FleetHandle,
    join: JoinHandle<()>,
}

/// What can be asked of a running fleet from anywhere: its servers, counters, health events,
/// and adding or removing servers. Cheap to clone.
#[derive(Clone)]
pub struct FleetHandle {
    sup: ActorRef<SupervisorMsg>,
    shared: Arc<Shared>,
}

impl std::ops::Deref for Fleet {
    type Target = FleetHandle;
    fn deref(&self) -> &FleetHandle {
        &self.handle
    }
}

impl Fleet {
    /// Checks `cfg` and starts the actors.
    pub async fn start<S: Store>(store: S, cfg: FleetConfig) -> Result<Self, FleetError> {
        cfg.validate()?;
        let shared = Shared::new(cfg.node.clone(), cfg.servers.clone());
        let args = SupervisorArgs { store, shared: shared.clone(), cfg };
        let (sup, join) = Actor::spawn(None, Supervisor(std::marker::PhantomData), args)
            .await
            .map_err(|e| FleetError::Unavailable(e.to_string()))?;
        Ok(Self { handle: FleetHandle { sup, shared }, join })
    }

    /// A cloneable handle for servers, counters and health events.
    pub fn handle(&self) -> FleetHandle {
        self.handle.clone()
    }

    /// Stops claiming, lets running calls finish within `dispatch.drain_timeout_ms`, hands
    /// the rest back, and stops every actor.
    pub async fn shutdown(self) -> Result<DrainReport, FleetError> {
        let report = self.handle.ask(SupervisorMsg::Shutdown).await?;
        // the supervisor stops itself after answering
        let _ = self.join.await;
        Ok(report)
    }

    /// Resolves when the fleet stopped on its own (an essential actor spent its restart
    /// budget); a replica should exit then.
    pub async fn stopped(&mut self) {
        let _ = (&mut self.join).await;
    }
}

impl FleetHandle {
    /// This replica's node name.
    pub fn node(&self) -> &str {
        &self.shared.node
    }

    /// Adds a server while running.
    pub async fn add_server(&self, cfg: ServerConfig) -> Result<(), FleetError> {
        self.ask(|r| SupervisorMsg::AddServer(Box::new(cfg), r)).await?
    }

    /// Removes a server; its in-flight tasks are handed to others as if it went offline.
    pub async fn remove_server(&self, name: &str) -> Result<(), FleetError> {
        let name = name.to_owned();
        self.ask(|r| SupervisorMsg::RemoveServer(name, r)).await?
    }

    /// Every server, in configuration order.
    pub fn servers(&self) -> Vec<ServerStatus> {
        let servers = self.shared.servers();
        let ledger = self.shared.ledger();
        servers
            .iter()
            .map(|s| ServerStatus {
                name: s.cfg.name.clone(),
                url: s.cfg.url.clone(),
                era: s.era.clone(),
                health: s.health,
                available: s.available,
                in_flight: ledger.load(&s.cfg.name),
                client_running: self.shared.client(&s.cfg.name).is_some(),
                max_concurrency: s.cfg.max_concurrency,
                tools: s.tools.as_ref().map(|t| {
                    let mut v: Vec<String> = t.names.iter().cloned().collect();
                    v.sort_unstable();
                    v
                }),
            })
            .collect()
    }

    /// Counters since start.
    pub fn stats(&self) -> FleetStats {
        let c = &self.shared.counters;
        let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        FleetStats {
            claimed: g(&c.claimed),
            dispatched: g(&c.dispatched),
            succeeded: g(&c.succeeded),
            failed: g(&c.failed),
            retried: g(&c.retried),
            released: g(&c.released),
            review: g(&c.review),
            dead: g(&c.dead),
            fenced: g(&c.fenced),
            redistributed: g(&c.redistributed),
            expired: g(&c.expired),
            restarts: g(&c.restarts),
        }
    }

    /// Latency histograms since start: `(creation → finish of finished tasks, claim → outcome
    /// of each attempt)`.
    pub fn latencies(&self) -> (HistogramSnapshot, HistogramSnapshot) {
        let c = &self.shared.counters;
        (c.latency.snapshot(), c.attempt.snapshot())
    }

    /// Tasks this replica holds claims on now.
    pub fn held(&self) -> usize {
        self.shared.ledger().len()
    }

    /// Server health changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ServerEvent> {
        self.shared.events.subscribe()
    }

    /// Test hook: makes an actor fail as a bug would, to exercise supervision.
    #[doc(hidden)]
    pub fn inject_crash(&self, part: Part) {
        let _ = self.sup.send_message(SupervisorMsg::Crash(part));
    }

    async fn ask<T: Send + 'static>(
        &self,
        msg: impl FnOnce(RpcReplyPort<T>) -> SupervisorMsg,
    ) -> Result<T, FleetError> {
        // generous: a shutdown waits for the drain, everything else for one spawn
        let limit = Duration::from_secs(3600);
        match self.sup.call(msg, Some(limit)).await {
            Ok(CallResult::Success(v)) => Ok(v),
            Ok(CallResult::Timeout) => Err(FleetError::Timeout),
            Ok(CallResult::SenderError) | Err(_) => {
                Err(FleetError::Unavailable("the supervisor has stopped".to_owned()))
            }
        }
    }
}
