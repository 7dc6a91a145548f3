//! The ClientActor of one MCP server: owns its [`McpClient`] (era, session, auth, pool), its
//! circuit breaker, its rate limit and its `Retry-After` pause, and keeps its tool list. Calls
//! run as spawned tasks that write their outcome into the ledger and wake the WorkQueue, so the
//! mailbox never waits on a tool and a crash of this actor loses no answer: calls already
//! running finish without it.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mcpq_mcp::{
    CallMeta, Era, LEGACY_VERSION, McpClient, Outcome, STATELESS_VERSION, ServerConfig,
};
use mcpq_queue::{Call, ClaimToken, Task, TaskId};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::Value;
use tokio::task::{AbortHandle, JoinHandle};

use crate::config::BreakerConfig;
use crate::limits::{Breaker, TokenBucket};
use crate::shared::{Phase, Settle, Shared, Tools};

/// Messages of a ClientActor.
#[derive(Debug)]
pub(crate) enum ClientMsg {
    /// Run the call of a task the ledger holds as sent to this actor.
    Call(TaskId, ClaimToken),
    /// Health probe; the result goes to the HealthMonitor.
    Probe,
    /// What a finished call showed: `Some(ok)` for the breaker, a pause for `Retry-After`.
    Finished { ok: Option<bool>, retry_after: Option<Duration> },
    /// The breaker's open time is over: probe.
    HalfOpen,
    /// The breaker's probe answered.
    Probed(bool),
    /// A `Retry-After` pause may be over.
    Resume,
    /// List the tools again.
    RefreshTools,
    /// Test hook: fail as if a bug struck.
    Crash,
}

pub(crate) struct ClientArgs {
    pub(crate) cfg: Arc<ServerConfig>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) breaker: BreakerConfig,
    pub(crate) probe_timeout: Duration,
    pub(crate) default_timeout: Duration,
}

pub(crate) struct ClientState {
    name: String,
    client: Arc<McpClient>,
    shared: Arc<Shared>,
    breaker: Breaker,
    /// Mirrors [`Breaker::is_quiet`] for the calls: a plain success need not be reported.
    quiet: Arc<AtomicBool>,
    bucket: Option<TokenBucket>,
    paused_until: Option<Instant>,
    probe_timeout: Duration,
    default_timeout: Duration,
    timers: Vec<JoinHandle<()>>,
}

pub(crate) struct ClientActor;

impl Actor for ClientActor {
    type Msg = ClientMsg;
    type State = ClientState;
    type Arguments = ClientArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ClientMsg>,
        args: ClientArgs,
    ) -> Result<ClientState, ActorProcessingErr> {
        let client = McpClient::new((*args.cfg).clone())?;
        // a predecessor may have died with its breaker open or a pause running; this actor
        // starts with neither
        args.shared.with_server(&args.cfg.name, |s| s.available = true);
        let ttl = Duration::from_millis(args.cfg.tools_ttl_ms.max(1000));
        let timers = vec![myself.send_interval(ttl, || ClientMsg::RefreshTools)];
        myself.send_message(ClientMsg::RefreshTools)?;
        let bucket = (args.cfg.rate_limit > 0)
            .then(|| TokenBucket::new(args.cfg.rate_limit, Instant::now()));
        Ok(ClientState {
            name: args.cfg.name.clone(),
            client: Arc::new(client),
            shared: args.shared,
            breaker: Breaker::new(args.breaker),
            quiet: Arc::default(),
            bucket,
            paused_until: None,
            probe_timeout: args.probe_timeout,
            default_timeout: args.default_timeout,
            timers,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<ClientMsg>,
        state: &mut ClientState,
    ) -> Result<(), ActorProcessingErr> {
        for t in &state.timers {
            t.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ClientMsg>,
        msg: ClientMsg,
        st: &mut ClientState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ClientMsg::Call(id, token) => st.call(myself, id, token),
            ClientMsg::Probe => {
                let (client, shared, name, limit) =
                    (st.client.clone(), st.shared.clone(), st.name.clone(), st.probe_timeout);
                tokio::spawn(async move {
                    let (ok, reason) = probe(&client, limit).await;
                    shared.observe(&name, ok, reason);
                    let era = client.era().await.map(|e| match e {
                        Era::Stateless => STATELESS_VERSION.to_owned(),
                        Era::Session { version } => version,
                        Era::Legacy => LEGACY_VERSION.to_owned(),
                    });
                    shared.with_server(&name, |s| s.era = era);
                });
            }
            ClientMsg::Finished { ok, retry_after } => {
                let now = Instant::now();
                if let Some(wait) = retry_after {
                    let until = now + wait.min(MAX_RETRY_AFTER);
                    if st.paused_until.is_none_or(|p| p < until) {
                        tracing::info!(server = %st.name, ?wait, "paused by Retry-After");
                        st.paused_until = Some(until);
                        st.set_available(false);
                        myself.send_after(wait, || ClientMsg::Resume);
                    }
                }
                if let Some(ok) = ok
                    && st.breaker.record(ok, now)
                {
                    tracing::warn!(server = %st.name, "circuit breaker open");
                    st.set_available(false);
                    myself.send_after(st.breaker.open_for(), || ClientMsg::HalfOpen);
                }
                st.quiet.store(st.breaker.is_quiet(), Ordering::Release);
            }
            ClientMsg::HalfOpen => {
                if st.breaker.try_half_open(Instant::now()) {
                    let (client, limit, me) = (st.client.clone(), st.probe_timeout, myself.clone());
                    tokio::spawn(async move {
                        let (ok, _) = probe(&client, limit).await;
                        let _ = me.send_message(ClientMsg::Probed(ok));
                    });
                }
            }
            ClientMsg::Probed(ok) => {
                st.breaker.probed(ok, Instant::now());
                st.quiet.store(st.breaker.is_quiet(), Ordering::Release);
                if st.breaker.allows() {
                    tracing::info!(server = %st.name, "circuit breaker closed");
                    let paused = st.paused_until.is_some_and(|p| p > Instant::now());
                    st.set_available(!paused);
                } else {
                    myself.send_after(st.breaker.open_for(), || ClientMsg::HalfOpen);
                }
            }
            ClientMsg::Resume => {
                if st.paused_until.is_some_and(|p| p <= Instant::now()) {
                    st.paused_until = None;
                    st.set_available(st.breaker.allows());
                }
            }
            ClientMsg::RefreshTools => {
                let (client, shared, name) =
                    (st.client.clone(), st.shared.clone(), st.name.clone());
                tokio::spawn(async move {
                    match client.tools().await {
                        Outcome::Executed(Ok(list)) => {
                            let tools = tool_set(&list, client.config().trusted);
                            shared.with_server(&name, |s| s.tools = Some(Arc::new(tools)));
                            shared.pump();
                        }
                        other => tracing::debug!(server = %name, ?other, "tools/list failed"),
                    }
                });
            }
            ClientMsg::Crash => return Err("injected crash (test hook)".into()),
        }
        Ok(())
    }
}

impl ClientState {
    fn set_available(&self, available: bool) {
        self.shared.with_server(&self.name, |s| s.available = available);
        if available {
            self.shared.pump();
        }
    }

    fn call(&mut self, myself: ActorRef<ClientMsg>, id: TaskId, token: ClaimToken) {
        let me = myself.get_id();
        // only the claim this actor was handed: a stale message for a task released and
        // claimed again (perhaps sent elsewhere) must not touch it
        let task = match self.shared.ledger().get(&id) {
            Some(e)
                if e.token == token && matches!(&e.phase, Phase::Sent { to, .. } if *to == me) =>
            {
                e.task.clone()
            }
            _ => return,
        };
        let refuse = if !self.breaker.allows() {
            Some("circuit breaker open")
        } else if self.paused_until.is_some_and(|p| p > Instant::now()) {
            Some("paused by Retry-After")
        } else {
            None
        };
        if let Some(reason) = refuse {
            let outcome = Outcome::NotDelivered { reason: reason.to_owned(), retry_after: None };
            self.shared.ledger().finish(id, Settle::Attempt { server: self.name.clone(), outcome });
            self.shared.pump();
            return;
        }
        let wait = self.bucket.as_mut().map_or(Duration::ZERO, |b| b.take(Instant::now()));
        let limit = task.timeout.unwrap_or(self.default_timeout);
        let (client, shared, name) = (self.client.clone(), self.shared.clone(), self.name.clone());
        let quiet = self.quiet.clone();
        let (go, ready) = tokio::sync::oneshot::channel::<AbortHandle>();
        let run = tokio::spawn(async move {
            let Ok(abort) = ready.await else { return };
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            // the task stays `Sent` (not delivered if taken away) until the request goes out
            if !shared.ledger().start(task.id, token, abort) {
                return;
            }
            let mut guard = Unfinished {
                shared: shared.clone(),
                id: task.id,
                server: name.clone(),
                armed: true,
            };
            let outcome = match tokio::time::timeout(limit, execute(&client, &task)).await {
                Ok(o) => o,
                Err(_) => Outcome::Ambiguous {
                    reason: format!("attempt timed out after {} ms", limit.as_millis()),
                },
            };
            guard.armed = false;
            let (ok, retry_after) = match &outcome {
                Outcome::Executed(_) => (Some(true), None),
                Outcome::NotDelivered { retry_after: Some(ra), .. } => {
                    (None, Some((*ra).min(MAX_RETRY_AFTER)))
                }
                Outcome::NotDelivered { reason, .. } | Outcome::Ambiguous { reason } => {
                    shared.observe(&name, false, reason.clone());
                    (Some(false), None)
                }
            };
            if ok == Some(true) {
                shared.observe(&name, true, String::new());
            }
            shared.ledger().finish(task.id, Settle::Attempt { server: name, outcome });
            shared.pump();
            // a success the breaker would not notice is not reported: one message less per call
            if ok != Some(true) || retry_after.is_some() || !quiet.load(Ordering::Acquire) {
                // a restarted actor starts with a fresh breaker; the report may be lost then
                let _ = myself.send_message(ClientMsg::Finished { ok, retry_after });
            }
        });
        // cannot fail unless the task ended already, and it waits for this
        let _ = go.send(run.abort_handle());
    }
}

/// The longest `Retry-After` honoured; a server asking for more is retried after this.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Finishes a call's task as ambiguous if the call ends without recording an outcome (a
/// panic inside the client). Disarmed on the normal path; harmless after an abort, which
/// only happens to tasks already finished or forgotten.
struct Unfinished {
    shared: Arc<Shared>,
    id: TaskId,
    server: String,
    armed: bool,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let outcome = Outcome::Ambiguous { reason: "the call ended abnormally".to_owned() };
        let server = std::mem::take(&mut self.server);
        if self.shared.ledger().finish(self.id, Settle::Attempt { server, outcome }) {
            self.shared.pump();
        }
    }
}

async fn probe(client: &McpClient, limit: Duration) -> (bool, String) {
    match tokio::time::timeout(limit, client.probe()).await {
        Ok(Outcome::Executed(Ok(()))) => (true, "probe answered".to_owned()),
        Ok(Outcome::Executed(Err(e))) => (true, format!("probe answered with error {}", e.code)),
        Ok(Outcome::NotDelivered { reason, .. } | Outcome::Ambiguous { reason }) => {
            (false, format!("probe failed: {reason}"))
        }
        Err(_) => (false, format!("probe timed out after {} ms", limit.as_millis())),
    }
}

async fn execute(client: &McpClient, task: &Task) -> Outcome<Value> {
    let meta = CallMeta { task: Some(task.id.to_string()), attempt: Some(task.attempt.into()) };
    match &task.call {
        Call::Tool { name, arguments } => client.call_tool(name, arguments.clone(), &meta).await,
        Call::Resource { uri } => client.read_resource(uri, &meta).await,
        Call::Prompt { name, arguments } => {
            // a map of strings always converts
            let args = serde_json::to_value(arguments).unwrap_or(Value::Null);
            client.get_prompt(name, args, &meta).await
        }
    }
}

/// The names of listed tools, and which of them a trusted server marks safe to repeat.
fn tool_set(list: &[Value], trusted: bool) -> Tools {
    let mut names = HashSet::new();
    let mut safe = HashSet::new();
    for t in list {
        let Some(name) = t.get("name").and_then(Value::as_str) else { continue };
        names.insert(name.to_owned());
        let hint = |k: &str| t.pointer(&format!("/annotations/{k}")).and_then(Value::as_bool);
        if trusted && (hint("idempotentHint") == Some(true) || hint("readOnlyHint") == Some(true)) {
            safe.insert(name.to_owned());
        }
    }
    Tools { names, safe }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_trusted_servers_vouch_for_repeatable_tools() {
        let list = vec![
            json!({"name": "read", "annotations": {"readOnlyHint": true}}),
            json!({"name": "put", "annotations": {"idempotentHint": true}}),
            json!({"name": "send"}),
            json!({"title": "nameless"}),
        ];
        let t = tool_set(&list, true);
        assert_eq!(t.names.len(), 3);
        assert!(t.safe.contains("read") && t.safe.contains("put") && !t.safe.contains("send"));
        assert!(tool_set(&list, false).safe.is_empty());
    }
}
