//! The HealthMonitor: probes every server each `health.interval_ms` (through its ClientActor)
//! and counts consecutive failures of probes and calls. `online → degraded` after
//! `degraded_after`, `→ offline` after `offline_after`, back to online (`recovered`) on the
//! first success. Going offline hands the server's in-flight tasks back at once. Each change is
//! published to subscribers and, as a `server.*` event, to every queue's stream.

use std::marker::PhantomData;
use std::sync::Arc;

use mcpq_queue::{EventKind, QueueName, Store};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;

use crate::client_actor::ClientMsg;
use crate::config::HealthConfig;
use crate::shared::{Counters, Health, ServerEvent, Shared};

/// Messages of the HealthMonitor.
#[derive(Debug)]
pub(crate) enum HealthMsg {
    /// Probe every server.
    Tick,
    /// A probe or a call showed whether the server works.
    Observed { server: String, ok: bool, reason: String },
    /// Test hook: fail as if a bug struck.
    Crash,
}

pub(crate) struct HealthArgs<S> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) cfg: HealthConfig,
    pub(crate) store: S,
    pub(crate) queues: Vec<QueueName>,
}

pub(crate) struct HealthState<S> {
    args: HealthArgs<S>,
    timer: JoinHandle<()>,
}

pub(crate) struct HealthMonitor<S>(PhantomData<fn() -> S>);

impl<S> HealthMonitor<S> {
    pub(crate) fn new() -> Self {
        Self(PhantomData)
    }
}

impl<S: Store> Actor for HealthMonitor<S> {
    type Msg = HealthMsg;
    type State = HealthState<S>;
    type Arguments = HealthArgs<S>;

    async fn pre_start(
        &self,
        myself: ActorRef<HealthMsg>,
        args: HealthArgs<S>,
    ) -> Result<Self::State, ActorProcessingErr> {
        args.shared.set_health(Some(myself.clone()));
        let timer = myself.send_interval(args.cfg.interval(), || HealthMsg::Tick);
        Ok(HealthState { args, timer })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<HealthMsg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.timer.abort();
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<HealthMsg>,
        msg: HealthMsg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            HealthMsg::Tick => {
                let names: Vec<String> =
                    state.args.shared.servers().iter().map(|s| s.cfg.name.clone()).collect();
                for name in names {
                    if let Some(client) = state.args.shared.client(&name) {
                        // a client actor being restarted misses this round
                        let _ = client.send_message(ClientMsg::Probe);
                    }
                }
            }
            HealthMsg::Observed { server, ok, reason } => {
                observe(&state.args, &server, ok, reason);
            }
            HealthMsg::Crash => return Err("injected crash (test hook)".into()),
        }
        Ok(())
    }
}

/// The next health after an observation, given the consecutive failures so far (updated).
pub(crate) fn next(health: Health, failures: &mut u32, ok: bool, cfg: &HealthConfig) -> Health {
    if ok {
        *failures = 0;
        return Health::Online;
    }
    *failures = failures.saturating_add(1);
    if *failures >= cfg.offline_after {
        Health::Offline
    } else if *failures >= cfg.degraded_after && health == Health::Online {
        Health::Degraded
    } else {
        health
    }
}

fn observe<S: Store>(args: &HealthArgs<S>, server: &str, ok: bool, reason: String) {
    let shared = &args.shared;
    let change = shared.with_server(server, |s| {
        let was = s.health;
        s.health = next(was, &mut s.failures, ok, &args.cfg);
        (was, s.health)
    });
    let Some((was, now)) = change else { return };
    if was == now {
        return;
    }
    let kind = match now {
        Health::Online => EventKind::ServerRecovered,
        Health::Degraded => EventKind::ServerDegraded,
        Health::Offline => EventKind::ServerOffline,
    };
    tracing::warn!(server, from = was.as_str(), to = now.as_str(), %reason, "server health changed");
    if now == Health::Offline {
        let n = shared.ledger().redistribute(server, &format!("server {server} went offline"));
        Counters::add(&shared.counters.redistributed, n as u64);
        tracing::warn!(server, tasks = n, "in-flight tasks handed back");
    }
    let event = ServerEvent { server: server.to_owned(), health: now, was, reason };
    let _ = shared.events.send(event.clone());
    // the store write must not hold up the monitor while Redis is slow or away
    let (store, queues, node) = (args.store.clone(), args.queues.clone(), shared.node.clone());
    tokio::spawn(async move {
        let detail = format!("{} (node {node})", event.reason);
        for q in &queues {
            if let Err(e) = store.publish(q, kind, &event.server, &detail).await {
                tracing::warn!(queue = %q, error = %e, "server event not stored");
            }
        }
    });
    shared.pump();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_degrades_goes_offline_and_recovers_by_thresholds() {
        let cfg = HealthConfig { degraded_after: 2, offline_after: 4, ..Default::default() };
        let mut f = 0;
        let mut h = Health::Online;
        let seen: Vec<Health> = [false, false, false, false, false, true, false]
            .into_iter()
            .map(|ok| {
                h = next(h, &mut f, ok, &cfg);
                h
            })
            .collect();
        use Health::*;
        assert_eq!(seen, [Online, Degraded, Degraded, Offline, Offline, Online, Online]);
    }
}
