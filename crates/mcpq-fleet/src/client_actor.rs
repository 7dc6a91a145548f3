//! The ClientActor of one MCP server: owns its [`McpClient`] (era, session, auth, pool), its
//! circuit breaker and its `Retry-After` pause, and keeps its tool list. It shares a
//! [`Caller`] (the client, the rate limit) through which the WorkQueue starts calls itself, as
//! spawned tasks that write their outcome into the ledger and wake the WorkQueue: a call costs
//! this actor no message unless the breaker must hear of it, and a crash of this actor loses
//! no answer, since calls already started finish without it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mcpq_mcp::{
    CallMeta, Era, LEGACY_VERSION, McpClient, Outcome, STATELESS_VERSION, ServerConfig,
};
use mcpq_queue::{Call, ClaimToken, Task, TaskId};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use rustc_hash::FxHashSet;
use serde_json::Value;
use tokio::task::{AbortHandle, JoinHandle};

use crate::config::BreakerConfig;
use crate::limits::{Breaker, TokenBucket};
use crate::shared::{Settle, Shared, Tools};

/// Messages of a ClientActor.
#[derive(Debug)]
pub(crate) enum ClientMsg {
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
    caller: Arc<Caller>,
    shared: Arc<Shared>,
    breaker: Breaker,
    paused_until: Option<Instant>,
    probe_timeout: Duration,
    timers: Vec<JoinHandle<()>>,
}

/// What starting a call on one server takes, shared by its ClientActor with the WorkQueue.
/// The WorkQueue only starts calls on a server that is available, which the actor clears
/// (under the server table's lock) when its breaker opens or `Retry-After` pauses it.
pub(crate) struct Caller {
    client: Arc<McpClient>,
    /// The server's name, shared by the ledger entries of its calls instead of copied into each.
    name: Arc<str>,
    /// Mirrors [`Breaker::is_quiet`]: a plain success need not be reported to the actor.
    quiet: AtomicBool,
    bucket: Option<Mutex<TokenBucket>>,
    default_timeout: Duration,
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
        let caller = Arc::new(Caller {
            client: Arc::new(client),
            name: Arc::from(args.cfg.name.as_str()),
            quiet: AtomicBool::new(false),
            bucket: bucket.map(Mutex::new),
            default_timeout: args.default_timeout,
        });
        args.shared.set_caller(&args.cfg.name, caller.clone());
        Ok(ClientState {
            name: args.cfg.name.clone(),
            caller,
            shared: args.shared,
            breaker: Breaker::new(args.breaker),
            paused_until: None,
            probe_timeout: args.probe_timeout,
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
            ClientMsg::Probe => {
                let (client, shared, name, limit) = (
                    st.caller.client.clone(),
                    st.shared.clone(),
                    st.name.clone(),
                    st.probe_timeout,
                );
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
                st.caller.quiet.store(st.breaker.is_quiet(), Ordering::Release);
            }
            ClientMsg::HalfOpen => {
                if st.breaker.try_half_open(Instant::now()) {
                    let (client, limit, me) =
                        (st.caller.client.clone(), st.probe_timeout, myself.clone());
                    tokio::spawn(async move {
                        let (ok, _) = probe(&client, limit).await;
                        let _ = me.send_message(ClientMsg::Probed(ok));
                    });
                }
            }
            ClientMsg::Probed(ok) => {
                st.breaker.probed(ok, Instant::now());
                st.caller.quiet.store(st.breaker.is_quiet(), Ordering::Release);
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
                    (st.caller.client.clone(), st.shared.clone(), st.name.clone());
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
}

impl Caller {
    /// The name of the server it calls.
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Spawns the call of a task to this caller's server; answers the handle that aborts it.
    /// The call waits for the rate limit, then goes out only if the ledger still holds the task
    /// as sent under this claim, and records its outcome in the ledger.
    pub(crate) fn start(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        task: Arc<Task>,
        token: ClaimToken,
    ) -> AbortHandle {
        let wait = self.bucket.as_ref().map_or(Duration::ZERO, |b| {
            b.lock().unwrap_or_else(|e| e.into_inner()).take(Instant::now())
        });
        let limit = task.timeout.unwrap_or(self.default_timeout);
        let (caller, shared, name) = (self.clone(), shared.clone(), self.name.clone());
        let run = tokio::spawn(async move {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            // the task stays `Sent` (not delivered if taken away) until the request goes out
            if !shared.ledger().start(task.id, token) {
                return;
            }
            let mut guard = Unfinished {
                shared: shared.clone(),
                id: task.id,
                server: name.clone(),
                armed: true,
            };
            // boxed: the call's future is large, and tokio copies a spawned future whole
            // each time it moves or replaces the task's stage
            let call = Box::pin(execute(&caller.client, &task));
            let outcome = match tokio::time::timeout(limit, call).await {
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
            // a success the breaker would not notice is not reported: no message at all
            let report =
                ok != Some(true) || retry_after.is_some() || !caller.quiet.load(Ordering::Acquire);
            shared.ledger().finish(task.id, Settle::Attempt { server: name.clone(), outcome });
            shared.pump();
            // the actor running now (perhaps a restarted one) hears of it
            if report && let Some(actor) = shared.client(&name) {
                let _ = actor.send_message(ClientMsg::Finished { ok, retry_after });
            }
        });
        run.abort_handle()
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
    server: Arc<str>,
    armed: bool,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let outcome = Outcome::Ambiguous { reason: "the call ended abnormally".to_owned() };
        let server = self.server.clone();
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
    let mut names = FxHashSet::default();
    let mut safe = FxHashSet::default();
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
