//! Interop: the MCP client against a server nobody here wrote, the npm reference server
//! `@modelcontextprotocol/server-everything` (installed by `tests/peers/install.sh`), over
//! Streamable HTTP and, once the client speaks it, the legacy HTTP+SSE transport.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use mcpq_mcp::{CallMeta, Era, McpClient, Outcome, SESSION_VERSION, ServerConfig, TransportChoice};
use mcpq_tests::everything::{Everything, Transport};
use serde_json::{Value, json};

fn executed(o: Outcome<Value>) -> Result<Value> {
    match o {
        Outcome::Executed(Ok(v)) => Ok(v),
        other => bail!("expected an executed call, got {other:?}"),
    }
}

fn client(url: String, transport: TransportChoice, pin: Option<&str>) -> Result<McpClient> {
    let mut cfg = ServerConfig::new("everything", url);
    cfg.transport = transport;
    cfg.protocol_version = pin.map(str::to_owned);
    cfg.timeouts.request_ms = 20_000;
    cfg.validate("servers[0]")?;
    Ok(McpClient::new(cfg)?)
}

/// The `field` of every item in `list` (e.g. the `name` of every tool).
fn names<'a>(list: &'a Value, field: &str) -> Vec<&'a str> {
    list.as_array().into_iter().flatten().filter_map(|t| t[field].as_str()).collect()
}

/// Every call kind the reference server offers, through `c`, with names from its own lists.
async fn every_call_kind_works(c: &McpClient) -> Result<()> {
    let meta = CallMeta { task: Some("task-1".into()), attempt: Some(1) };

    let tools = executed(c.list_tools().await.map(Value::from))?;
    // the server sends every tool on one page; the client's paging must add nothing to it
    let page = executed(c.request("tools/list", json!({}), None, &meta).await)?;
    assert_eq!((&tools, page.get("nextCursor")), (&page["tools"], None), "{page}");
    let tool_names = names(&tools, "name");
    for want in ["echo", "get-sum", "get-tiny-image", "trigger-long-running-operation"] {
        assert!(tool_names.contains(&want), "{want} missing from tools/list: {tool_names:?}");
    }
    let echo = tools.as_array().into_iter().flatten().find(|t| t["name"] == "echo");
    let echo = echo.context("no echo tool")?;
    assert_eq!(echo["inputSchema"]["properties"]["message"]["type"], "string", "{echo}");
    assert_eq!(echo["annotations"]["idempotentHint"], true, "{echo}");

    let r = executed(c.call_tool("echo", json!({"message": "hello from mcpq"}), &meta).await)?;
    assert_eq!(r["content"][0]["text"], "Echo: hello from mcpq", "{r}");
    assert_ne!(r["isError"], true, "{r}");
    let r = executed(c.call_tool("get-sum", json!({"a": 2, "b": 3}), &meta).await)?;
    assert!(r["content"][0]["text"].as_str().is_some_and(|t| t.contains('5')), "{r}");

    let listed = executed(c.request("resources/list", json!({}), None, &meta).await)?;
    let uri = "demo://resource/static/document/features.md";
    assert!(names(&listed["resources"], "uri").contains(&uri), "{listed}");
    let r = executed(c.read_resource(uri, &meta).await)?;
    assert_eq!(
        (&r["contents"][0]["uri"], &r["contents"][0]["mimeType"]),
        (&json!(uri), &json!("text/markdown"))
    );
    assert!(r["contents"][0]["text"].as_str().is_some_and(|t| !t.is_empty()), "{r}");
    // a templated resource, which resources/list does not show
    let r = executed(c.read_resource("demo://resource/dynamic/text/7", &meta).await)?;
    assert!(
        r["contents"][0]["text"].as_str().is_some_and(|t| t.starts_with("Resource 7: ")),
        "{r}"
    );

    let listed = executed(c.request("prompts/list", json!({}), None, &meta).await)?;
    let prompt_names = names(&listed["prompts"], "name");
    assert!(prompt_names.contains(&"args-prompt"), "{listed}");
    let r = executed(
        c.get_prompt("args-prompt", json!({"city": "Paris", "state": "TX"}), &meta).await,
    )?;
    assert_eq!(r["messages"][0]["content"]["text"], "What's weather in Paris, TX?", "{r}");

    assert_eq!(executed(c.probe().await.map(|()| Value::Null))?, Value::Null);
    Ok(())
}

#[tokio::test]
async fn auto_probing_falls_back_to_a_2025_11_25_session_where_every_call_kind_works() -> Result<()>
{
    let server = Everything::start(Transport::StreamableHttp).await?;
    let c = client(server.url(), TransportChoice::Auto, None)?;
    every_call_kind_works(&c).await?;
    // the reference server answers `server/discover` with 400 (no session), so the client
    // initializes, and the server takes the newest session revision
    assert_eq!(c.era().await, Some(Era::Session { version: SESSION_VERSION.into() }));
    Ok(())
}

#[tokio::test]
async fn a_client_pinned_to_2025_11_25_gets_that_revision_and_every_call_kind_works() -> Result<()>
{
    let server = Everything::start(Transport::StreamableHttp).await?;
    let c = client(server.url(), TransportChoice::StreamableHttp, Some("2025-11-25"))?;
    every_call_kind_works(&c).await?;
    assert_eq!(c.era().await, Some(Era::Session { version: "2025-11-25".into() }));
    Ok(())
}

#[tokio::test]
async fn tool_errors_from_the_reference_server_are_executed_answers() -> Result<()> {
    let server = Everything::start(Transport::StreamableHttp).await?;
    let c = client(server.url(), TransportChoice::Auto, None)?;
    // arguments that fail the tool's schema, and a tool that does not exist: the TypeScript
    // SDK answers both with an `isError` result (not a JSON-RPC error), a final answer
    for (tool, args, says) in [
        ("echo", json!({"message": 42}), "Invalid arguments for tool echo"),
        ("no-such-tool", json!({}), "Tool no-such-tool not found"),
    ] {
        let r = executed(c.call_tool(tool, args, &CallMeta::default()).await)?;
        assert_eq!(r["isError"], true, "{tool}: {r}");
        assert!(r["content"][0]["text"].as_str().is_some_and(|t| t.contains(says)), "{r}");
    }
    Ok(())
}

/// The first server-sent event on `url`: its `event` name and its `data`.
async fn first_event(url: &str) -> Result<(String, String)> {
    let resp = reqwest::Client::new()
        .get(url)
        .header("accept", "text/event-stream")
        .timeout(Duration::from_secs(10))
        .send()
        .await?
        .error_for_status()?;
    let kind = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    assert!(kind.starts_with("text/event-stream"), "content-type {kind:?}");
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    // the stream stays open: read up to the blank line that ends the first event
    while !text.replace("\r\n", "\n").contains("\n\n") {
        let chunk = stream.next().await.context("stream ended before the first event")??;
        text.push_str(std::str::from_utf8(&chunk)?);
    }
    let text = text.replace("\r\n", "\n");
    let first = text.split("\n\n").next().unwrap_or_default();
    let (mut event, mut data) = (String::from("message"), Vec::new());
    for line in first.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            event = v.trim_start().to_owned();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    Ok((event, data.join("\n")))
}

#[tokio::test]
async fn in_sse_mode_the_server_announces_its_message_endpoint() -> Result<()> {
    let server = Everything::start(Transport::Sse).await?;
    assert!(server.url().ends_with("/sse"), "{}", server.url());
    let (event, data) = first_event(&server.url()).await?;
    assert_eq!(event, "endpoint");
    assert!(data.starts_with("/message?sessionId="), "{data:?}");
    Ok(())
}

#[tokio::test]
async fn over_legacy_sse_every_call_kind_works_in_the_2024_11_05_era() -> Result<()> {
    let server = Everything::start(Transport::Sse).await?;
    // the server side works; whatever fails below is the client's
    let (event, _) = first_event(&server.url()).await?;
    assert_eq!(event, "endpoint");
    let c = client(server.url(), TransportChoice::Sse, None)?;
    every_call_kind_works(&c).await?;
    assert_eq!(c.era().await, Some(Era::Legacy));
    Ok(())
}
