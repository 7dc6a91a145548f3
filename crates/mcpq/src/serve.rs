//! `mcpq serve`: one replica. Opens the store (Redis when `store.redis_url` is set, else the
//! embedded store), starts the actors and the HTTP API, prints one ready line on stdout, and on
//! the shutdown signal stops the API (event streams end) and drains (running calls may finish
//! within `dispatch.drain_timeout_ms`; the rest is handed back at once rather than left to
//! leases).

use std::future::Future;
use std::io::Write;

use anyhow::{Context, Result, bail};
use mcpq_fleet::{DrainReport, Fleet, FleetConfig};
use mcpq_queue::{EmbeddedStore, RedisStore, Store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{ApiState, router};
use crate::config::Config;

/// Runs a replica until `shutdown` resolves, serving the API on `listener`; answers what the
/// drain achieved.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<DrainReport> {
    match cfg.store.redis_url.clone() {
        Some(url) => {
            let store = RedisStore::open(&cfg.store, cfg.queue_configs())
                .await
                .with_context(|| format!("cannot connect to the store at {}", redacted(&url)))?;
            for w in redis_warnings(&url).await {
                tracing::warn!("{w}");
            }
            run_on(store, format!("redis {}", redacted(&url)), cfg, listener, shutdown).await
        }
        None => {
            let path = cfg.store.path.clone();
            let (store_cfg, queues) = (cfg.store.clone(), cfg.queue_configs());
            // opening checks the file after a crash: blocking work
            let store =
                tokio::task::spawn_blocking(move || EmbeddedStore::open(&store_cfg, queues))
                    .await?
                    .with_context(|| {
                        format!("cannot open the embedded store in {}", path.display())
                    })?;
            let name = format!("embedded {}", path.display());
            let report = run_on(store.clone(), name, cfg, listener, shutdown).await;
            // with store.sync_ms set, a clean stop leaves nothing acknowledged unsynced (the
            // store's last handle syncs too, but a straggling task may hold one past exit)
            let why = "the embedded store's last sync failed: writes acknowledged since its \
                       previous sync may be lost";
            match (report, store.sync().await) {
                (report, Ok(())) => report,
                (Ok(_), Err(e)) => Err(anyhow::Error::new(e).context(why)),
                (Err(first), Err(e)) => {
                    tracing::error!(error = %e, "{why}");
                    Err(first)
                }
            }
        }
    }
}

/// Runs the fleet and the API on an open store.
pub async fn run_on<S: Store>(
    store: S,
    store_name: String,
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<DrainReport> {
    let node = if cfg.node.is_empty() { default_node() } else { cfg.node.clone() };
    let queues = cfg.served_queues();
    let fleet_cfg = FleetConfig {
        node: node.clone(),
        queues: queues.clone(),
        health: cfg.health.clone(),
        dispatch: cfg.dispatch.clone(),
        servers: cfg.servers.clone(),
    };
    let mut fleet = Fleet::start(store.clone(), fleet_cfg).await?;
    let closing = CancellationToken::new();
    let state = ApiState::new(
        store,
        queues.clone(),
        cfg.queue_configs(),
        Some(fleet.handle()),
        cfg.api.clone(),
        closing.clone(),
    );
    let addr = listener.local_addr().context("the API listener has no address")?;
    let mut api = {
        let closing = closing.clone();
        tokio::spawn(async move {
            axum::serve(listener, router(state))
                .with_graceful_shutdown(async move { closing.cancelled().await })
                .await
        })
    };
    let names: Vec<&str> = queues.iter().map(|q| q.as_str()).collect();
    // the ready line: scripts and tests wait for it
    let ready = format!(
        "mcpq serving node={node} queues={} servers={} api=http://{addr} store={store_name}",
        names.join(","),
        cfg.servers.len()
    );
    {
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, "{ready}").and_then(|()| out.flush()) {
            tracing::warn!(error = %e, "cannot print the ready line; serving anyway");
        }
    }
    tracing::info!("{ready}");
    let why = tokio::select! {
        _ = shutdown => None,
        _ = fleet.stopped() => Some("the fleet stopped: an essential actor kept failing (see the log)"),
        r = &mut api => {
            tracing::error!(result = ?r, "the API server stopped");
            Some("the API server stopped (see the log)")
        }
    };
    closing.cancel();
    if !api.is_finished() {
        match api.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "the API server ended with an error"),
            Err(e) => tracing::warn!(error = %e, "the API server task failed"),
            Ok(Ok(())) => {}
        }
    }
    if let Some(why) = why {
        // hand back what this replica holds before giving up
        let report = fleet.shutdown().await;
        tracing::info!(?report, "drained after a failure");
        bail!("{why}");
    }
    tracing::info!(%node, "shutting down");
    let report = fleet.shutdown().await?;
    tracing::info!(%node, finished = report.finished, handed_back = report.handed_back, "stopped");
    Ok(report)
}

/// What an operator should change on the Redis server: tasks must not be evicted, and
/// acknowledged enqueues should survive a Redis restart.
async fn redis_warnings(url: &str) -> Vec<String> {
    let mut out = Vec::new();
    let conn = async {
        let client = redis::Client::open(url)?;
        client.get_multiplexed_async_connection().await
    };
    let conn = match conn.await {
        Ok(c) => c,
        Err(e) => return vec![format!("cannot check the Redis settings: {e}")],
    };
    let get = |key: &'static str| {
        let mut c = conn.clone();
        async move {
            redis::cmd("CONFIG")
                .arg("GET")
                .arg(key)
                .query_async::<Vec<String>>(&mut c)
                .await
                .map(|v| v.get(1).cloned().unwrap_or_default())
        }
    };
    match get("maxmemory-policy").await {
        Ok(p) if p == "noeviction" => {}
        Ok(p) => out.push(format!(
            "Redis maxmemory-policy is {p:?}: Redis may evict tasks under memory pressure; \
             set `maxmemory-policy noeviction`"
        )),
        Err(e) => {
            out.push(format!("cannot read Redis maxmemory-policy (CONFIG GET refused?): {e}"))
        }
    }
    match get("appendonly").await {
        Ok(a) if a == "yes" => {}
        Ok(_) => out.push(
            "Redis has no AOF (appendonly no): tasks enqueued since the last snapshot are lost \
             if Redis restarts; set `appendonly yes` with `appendfsync everysec`"
                .to_owned(),
        ),
        Err(e) => out.push(format!("cannot read Redis appendonly: {e}")),
    }
    out
}

/// A URL without its password, for logs.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_owned(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_password_in_logs() {
        assert_eq!(redacted("redis://:pw@127.0.0.1:6379/0"), "redis://***@127.0.0.1:6379/0");
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
