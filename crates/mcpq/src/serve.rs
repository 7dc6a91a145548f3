//! `mcpq serve`: one replica of the fleet. Connects the store, starts the actors, prints one
//! ready line on stdout, and on the shutdown signal drains (running calls may finish within
//! `dispatch.drain_timeout_ms`; the rest is handed back at once rather than left to leases).

use std::future::Future;
use std::io::Write;

use anyhow::{Context, Result, bail};
use mcpq_fleet::{DrainReport, Fleet, FleetConfig};
use mcpq_queue::RedisStore;

use crate::config::Config;

/// Runs a replica until `shutdown` resolves; answers what the drain achieved.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<DrainReport> {
    let Some(url) = cfg.store.redis_url.clone() else {
        bail!(
            "store.redis_url: not set; this build serves from Redis only (the embedded store \
             is not available yet), so set store.redis_url or MCPQ_STORE__REDIS_URL"
        );
    };
    let store = RedisStore::open(&cfg.store, cfg.queue_configs())
        .await
        .with_context(|| format!("cannot connect to the store at {url}"))?;
    let node = if cfg.node.is_empty() { default_node() } else { cfg.node.clone() };
    let queues = cfg.served_queues();
    let fleet_cfg = FleetConfig {
        node: node.clone(),
        queues: queues.clone(),
        health: cfg.health.clone(),
        dispatch: cfg.dispatch.clone(),
        servers: cfg.servers.clone(),
    };
    let mut fleet = Fleet::start(store, fleet_cfg).await?;
    let names: Vec<&str> = queues.iter().map(|q| q.as_str()).collect();
    {
        // the ready line: scripts and tests wait for it
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "mcpq serving node={node} queues={} servers={}",
            names.join(","),
            cfg.servers.len()
        )?;
        out.flush()?;
    }
    tokio::select! {
        _ = shutdown => {}
        _ = fleet.stopped() => bail!("the fleet stopped: an essential actor kept failing (see the log)"),
    }
    tracing::info!(%node, "shutting down");
    let report = fleet.shutdown().await?;
    tracing::info!(%node, finished = report.finished, handed_back = report.handed_back, "stopped");
    Ok(report)
}

fn default_node() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "mcpq".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Resolves on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM; ctrl-c only");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
