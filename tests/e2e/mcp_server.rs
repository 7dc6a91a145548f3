//! The in-process MCP test servers, driven with plain JSON-RPC POSTs: each mode serves tools,
//! resources and prompts and records tool calls; each fault knob has the effect it promises.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use mcpq_tests::eventually;
use mcpq_tests::mcp::{Execution, McpServer, Mode};
use reqwest::StatusCode;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);
const VERSION: &str = "2025-11-25";

/// A bare JSON-RPC-over-HTTP caller: no MCP client library, just reqwest.
struct Rpc {
    http: reqwest::Client,
    url: String,
    session: Option<String>,
    next_id: u64,
}

impl Rpc {
    fn new(url: &str) -> Self {
        Self { http: reqwest::Client::new(), url: url.to_owned(), session: None, next_id: 1 }
    }

    fn post(&self, body: &Value) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .post(&self.url)
            .header("Accept", "application/json, text/event-stream")
            .json(body);
        if let Some(session) = &self.session {
            req = req.header("Mcp-Session-Id", session).header("MCP-Protocol-Version", VERSION);
        }
        req
    }

    fn request_body(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
    }

    /// Sends a request and returns the JSON-RPC reply's `result`.
    async fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        let body = self.request_body(method, params);
        let response = self.post(&body).send().await?;
        let reply = reply(response).await?;
        ensure!(reply["id"] == body["id"], "reply to another request: {reply}");
        reply.get("result").cloned().with_context(|| format!("not a result: {reply}"))
    }

    async fn notify(&self, method: &str) -> Result<StatusCode> {
        let body = json!({"jsonrpc": "2.0", "method": method});
        Ok(self.post(&body).send().await?.status())
    }

    /// `initialize` then `notifications/initialized`, keeping the session id if one is given.
    async fn initialize(&mut self) -> Result<Value> {
        let body = self.request_body(
            "initialize",
            json!({
                "protocolVersion": VERSION,
                "capabilities": {},
                "clientInfo": {"name": "mcp-server-smoke", "version": "0"},
            }),
        );
        let response = self.post(&body).send().await?;
        self.session = response
            .headers()
            .get("Mcp-Session-Id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let result = reply(response).await?["result"].clone();
        ensure!(result.is_object(), "initialize failed");
        ensure!(self.notify("notifications/initialized").await? == StatusCode::ACCEPTED);
        Ok(result)
    }

    async fn echo(&mut self, text: &str) -> Result<String> {
        let result = self.call("tools/call", json!({"name": "echo", "arguments": {"text": text}}));
        text_of(&result.await?)
    }
}

/// The JSON-RPC reply in a 200 response: the body itself, or the SSE event that carries it.
async fn reply(response: reqwest::Response) -> Result<Value> {
    let status = response.status();
    let sse = content_type(&response).starts_with("text/event-stream");
    let body = response.text().await?;
    ensure!(status == StatusCode::OK, "HTTP {status}: {body}");
    if !sse {
        return Ok(serde_json::from_str(&body)?);
    }
    for event in body.replace("\r\n", "\n").split("\n\n") {
        let data: Vec<&str> = event.lines().filter_map(|l| l.strip_prefix("data:")).collect();
        if let Ok(message) = serde_json::from_str::<Value>(data.join("\n").trim())
            && (message.get("result").is_some() || message.get("error").is_some())
        {
            return Ok(message);
        }
    }
    bail!("no reply in the event stream: {body:?}")
}

fn content_type(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

fn text_of(result: &Value) -> Result<String> {
    result["content"][0]["text"].as_str().map(str::to_owned).with_context(|| format!("{result}"))
}

async fn serves_tools_resources_and_prompts(mode: Mode) -> Result<()> {
    let server = McpServer::start(mode).await?;
    let mut rpc = Rpc::new(&server.url());
    let init = rpc.initialize().await?;
    assert_eq!(init["serverInfo"]["name"], "mcpq-test-server");
    assert_eq!(rpc.session.is_some(), mode != Mode::Stateless, "session id in {mode:?}");

    // the reply format is the mode's
    let body = rpc.request_body("tools/list", json!({}));
    let response = rpc.post(&body).send().await?;
    let want = if mode == Mode::SessionSse { "text/event-stream" } else { "application/json" };
    assert!(content_type(&response).starts_with(want), "{mode:?}: {}", content_type(&response));
    let tools = reply(response).await?["result"]["tools"].clone();
    let names: Vec<&str> =
        tools.as_array().into_iter().flatten().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(names, ["echo", "slow", "fail", "add"]);
    let add = &tools[3];
    assert_eq!(add["annotations"]["readOnlyHint"], true);
    assert_eq!(add["annotations"]["idempotentHint"], true);

    let meta = json!({"mcpq/task": "t-1", "mcpq/attempt": 1});
    let echoed = rpc
        .call("tools/call", json!({"name": "echo", "arguments": {"text": "hi"}, "_meta": meta}))
        .await?;
    assert_eq!(text_of(&echoed)?, "hi");
    assert_eq!(
        server.executions(),
        [Execution { tool: "echo".into(), arguments: json!({"text": "hi"}), meta }]
    );

    let sum = rpc.call("tools/call", json!({"name": "add", "arguments": {"a": 2, "b": 3}})).await?;
    assert_eq!(text_of(&sum)?, "5");
    let failed = rpc.call("tools/call", json!({"name": "fail", "arguments": {}})).await?;
    assert_eq!(failed["isError"], true);

    let resources = rpc.call("resources/list", json!({})).await?;
    assert_eq!(resources["resources"][0]["uri"], "mem://greeting");
    let read = rpc.call("resources/read", json!({"uri": "mem://greeting"})).await?;
    assert_eq!(read["contents"][0]["text"], "hello");

    let prompts = rpc.call("prompts/list", json!({})).await?;
    assert_eq!(prompts["prompts"][0]["name"], "greet");
    assert_eq!(prompts["prompts"][0]["arguments"][0]["name"], "name");
    let prompt =
        rpc.call("prompts/get", json!({"name": "greet", "arguments": {"name": "Ada"}})).await?;
    assert_eq!(prompt["messages"][0]["content"]["text"], "Say hello to Ada.");

    assert_eq!(server.executions().len(), 3);
    assert_eq!(server.posts(), 10);
    Ok(())
}

#[tokio::test]
async fn session_sse_server_serves_tools_resources_and_prompts_and_records_calls() -> Result<()> {
    serves_tools_resources_and_prompts(Mode::SessionSse).await
}

#[tokio::test]
async fn session_json_server_serves_tools_resources_and_prompts_and_records_calls() -> Result<()> {
    serves_tools_resources_and_prompts(Mode::SessionJson).await
}

#[tokio::test]
async fn stateless_server_serves_tools_resources_and_prompts_and_records_calls() -> Result<()> {
    serves_tools_resources_and_prompts(Mode::Stateless).await
}

async fn speaks_the_2026_07_28_revision(mode: Mode) -> Result<()> {
    let server = McpServer::start(mode).await?;
    let http = reqwest::Client::new();
    let protocol = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "mcp-server-smoke", "version": "0"},
        "io.modelcontextprotocol/clientCapabilities": {},
    });
    let post = |method: &str, name: Option<&str>, params: Value| {
        let mut req = http
            .post(server.url())
            .header("Accept", "application/json, text/event-stream")
            .header("MCP-Protocol-Version", "2026-07-28")
            .header("Mcp-Method", method)
            .json(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}));
        if let Some(name) = name {
            req = req.header("Mcp-Name", name);
        }
        req.send()
    };

    let discovered = post("server/discover", None, json!({"_meta": protocol})).await?;
    assert!(discovered.headers().get("Mcp-Session-Id").is_none(), "{mode:?}");
    let discovered = reply(discovered).await?;
    let versions = &discovered["result"]["supportedVersions"];
    assert!(versions.as_array().is_some_and(|v| v.contains(&json!("2026-07-28"))), "{discovered}");

    let mut meta = protocol.clone();
    meta["mcpq/task"] = json!("t-2");
    let params = json!({"name": "echo", "arguments": {"text": "new era"}, "_meta": meta});
    let called = reply(post("tools/call", Some("echo"), params).await?).await?;
    assert_eq!(text_of(&called["result"])?, "new era", "{mode:?}");
    assert_eq!(server.executions()[0].meta, meta, "{mode:?}");
    Ok(())
}

#[tokio::test]
async fn every_mode_speaks_the_2026_07_28_revision_without_initialize_or_session() -> Result<()> {
    for mode in [Mode::SessionSse, Mode::SessionJson, Mode::Stateless] {
        speaks_the_2026_07_28_revision(mode).await?;
    }
    Ok(())
}

#[tokio::test]
async fn rejected_posts_get_the_status_and_retry_after_and_reach_no_tool() -> Result<()> {
    let server = McpServer::start(Mode::SessionSse).await?;
    let mut rpc = Rpc::new(&server.url());
    rpc.initialize().await?;
    server.faults().reject_next(2, 429, Some(7));
    for _ in 0..2 {
        let body =
            rpc.request_body("tools/call", json!({"name": "echo", "arguments": {"text": "x"}}));
        let response = rpc.post(&body).send().await?;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()["retry-after"], "7");
    }
    server.faults().reject_next(1, 503, None);
    let body = rpc.request_body("tools/call", json!({"name": "echo", "arguments": {"text": "x"}}));
    let response = rpc.post(&body).send().await?;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().get("retry-after").is_none());
    assert!(server.executions().is_empty(), "a rejected call ran");

    assert_eq!(rpc.echo("through").await?, "through");
    assert_eq!(server.executions().len(), 1);
    assert_eq!(server.posts(), 2 + 3 + 1);
    Ok(())
}

#[tokio::test]
async fn stalled_post_times_out_on_the_client_and_reaches_no_tool() -> Result<()> {
    let server = McpServer::start(Mode::SessionJson).await?;
    let mut rpc = Rpc::new(&server.url());
    rpc.initialize().await?;
    server.faults().stall_next(1);
    let body = rpc.request_body("tools/call", json!({"name": "echo", "arguments": {"text": "x"}}));
    let err = rpc.post(&body).timeout(Duration::from_millis(300)).send().await.err();
    assert!(err.is_some_and(|e| e.is_timeout()), "the stalled POST was answered");
    assert!(server.executions().is_empty());
    assert_eq!(rpc.echo("after").await?, "after");
    Ok(())
}

#[tokio::test]
async fn stop_drops_a_stalled_post() -> Result<()> {
    let server = McpServer::start(Mode::Stateless).await?;
    server.faults().stall_next(1);
    let mut rpc = Rpc::new(&server.url());
    let body = rpc.request_body("tools/list", json!({}));
    let pending = tokio::spawn(rpc.post(&body).send());
    eventually(WAIT, "the stalled POST arrives", || async {
        Ok((server.posts() == 1).then_some(()))
    })
    .await?;
    server.stop().await;
    let outcome = tokio::time::timeout(WAIT, pending).await??;
    assert!(outcome.is_err(), "a stalled POST was answered");
    Ok(())
}

async fn cut_response_fails_the_client_after_the_tool_ran(mode: Mode) -> Result<()> {
    let server = McpServer::start(mode).await?;
    let mut rpc = Rpc::new(&server.url());
    rpc.initialize().await?;
    server.faults().cut_after_accept_next(1);
    let meta = json!({"mcpq/task": "t-3", "mcpq/attempt": 2});
    let body = rpc.request_body(
        "tools/call",
        json!({"name": "echo", "arguments": {"text": "lost"}, "_meta": meta}),
    );
    let outcome = rpc.post(&body).send().await;
    let err = outcome.err().with_context(|| format!("{mode:?}: the cut POST was answered"))?;
    assert!(!err.is_timeout() && !err.is_connect(), "{mode:?}: {err:?}");
    assert_eq!(
        server.executions(),
        [Execution { tool: "echo".into(), arguments: json!({"text": "lost"}), meta }],
        "{mode:?}"
    );
    assert_eq!(rpc.echo("next").await?, "next", "{mode:?}");
    Ok(())
}

#[tokio::test]
async fn cut_response_fails_the_client_but_the_tool_ran_once_in_every_mode() -> Result<()> {
    for mode in [Mode::SessionSse, Mode::SessionJson, Mode::Stateless] {
        cut_response_fails_the_client_after_the_tool_ran(mode).await?;
    }
    Ok(())
}

#[tokio::test]
async fn expired_session_gets_404_and_a_new_session_works() -> Result<()> {
    for mode in [Mode::SessionSse, Mode::SessionJson] {
        let server = McpServer::start(mode).await?;
        let mut rpc = Rpc::new(&server.url());
        rpc.initialize().await?;
        server.faults().expire_sessions().await;
        let body = rpc.request_body("tools/list", json!({}));
        assert_eq!(rpc.post(&body).send().await?.status(), StatusCode::NOT_FOUND, "{mode:?}");
        rpc.session = None;
        rpc.initialize().await?;
        assert_eq!(rpc.echo("again").await?, "again", "{mode:?}");
    }
    Ok(())
}

#[tokio::test]
async fn malformed_reply_is_200_with_a_body_that_is_not_json() -> Result<()> {
    let server = McpServer::start(Mode::SessionSse).await?;
    let mut rpc = Rpc::new(&server.url());
    rpc.initialize().await?;
    server.faults().malformed_next(1);
    let body = rpc.request_body("tools/call", json!({"name": "echo", "arguments": {"text": "x"}}));
    let response = rpc.post(&body).send().await?;
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await?;
    assert!(serde_json::from_str::<Value>(&text).is_err(), "valid JSON: {text}");
    assert!(server.executions().is_empty());
    Ok(())
}

#[tokio::test]
async fn oversize_reply_is_a_json_rpc_result_of_at_least_the_given_size() -> Result<()> {
    let server = McpServer::start(Mode::Stateless).await?;
    let mut rpc = Rpc::new(&server.url());
    server.faults().oversize_next(1, 1 << 20);
    let body = rpc.request_body("tools/call", json!({"name": "echo", "arguments": {"text": "x"}}));
    let response = rpc.post(&body).send().await?;
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = response.bytes().await?;
    assert!(bytes.len() >= 1 << 20, "only {} bytes", bytes.len());
    let reply: Value = serde_json::from_slice(&bytes)?;
    assert_eq!(reply["id"], body["id"]);
    assert!(server.executions().is_empty());
    assert_eq!(rpc.echo("small").await?, "small");
    Ok(())
}

#[tokio::test]
async fn stopped_server_refuses_connections_and_answers_again_on_the_same_url_after_restart()
-> Result<()> {
    let server = McpServer::start(Mode::SessionSse).await?;
    let url = server.url();
    let mut rpc = Rpc::new(&url);
    rpc.initialize().await?;
    server.stop().await;
    let body = rpc.request_body("tools/list", json!({}));
    let err = rpc.post(&body).send().await.err();
    assert!(err.is_some_and(|e| e.is_connect()), "a stopped server answered");

    server.restart().await?;
    assert_eq!(server.url(), url);
    let body = rpc.request_body("tools/list", json!({}));
    let status = rpc.post(&body).send().await?.status();
    assert_eq!(status, StatusCode::NOT_FOUND, "a session survived the restart");
    rpc.session = None;
    rpc.initialize().await?;
    assert_eq!(rpc.echo("back").await?, "back");
    Ok(())
}

#[tokio::test]
async fn slow_call_abandoned_by_the_client_is_cancelled_and_the_server_keeps_answering()
-> Result<()> {
    let server = McpServer::start(Mode::Stateless).await?;
    let mut rpc = Rpc::new(&server.url());
    let body =
        rpc.request_body("tools/call", json!({"name": "slow", "arguments": {"ms": 600_000}}));
    let err = rpc.post(&body).timeout(Duration::from_millis(300)).send().await.err();
    assert!(err.is_some_and(|e| e.is_timeout()), "slow answered early");
    assert_eq!(rpc.echo("still here").await?, "still here");
    eventually(WAIT, "the abandoned slow call stops", || async {
        Ok((server.in_flight() == 0).then_some(()))
    })
    .await?;
    assert_eq!(server.executions()[0].tool, "slow");
    Ok(())
}

#[tokio::test]
async fn slow_call_in_a_session_stops_on_notifications_cancelled() -> Result<()> {
    let server = McpServer::start(Mode::SessionSse).await?;
    let mut rpc = Rpc::new(&server.url());
    rpc.initialize().await?;
    let body =
        rpc.request_body("tools/call", json!({"name": "slow", "arguments": {"ms": 600_000}}));
    let call = tokio::spawn(rpc.post(&body).send());
    eventually(WAIT, "slow starts", || async { Ok((server.in_flight() == 1).then_some(())) })
        .await?;
    let cancel = json!({
        "jsonrpc": "2.0",
        "method": "notifications/cancelled",
        "params": {"requestId": body["id"], "reason": "test"},
    });
    assert_eq!(rpc.post(&cancel).send().await?.status(), StatusCode::ACCEPTED);
    eventually(WAIT, "slow stops", || async { Ok((server.in_flight() == 0).then_some(())) })
        .await?;
    // the call's stream ends without a reply instead of running for ten minutes
    let response = tokio::time::timeout(WAIT, call).await???;
    assert!(reply(response).await.is_err(), "a cancelled call got a reply");
    assert_eq!(rpc.echo("next").await?, "next");
    Ok(())
}
