//! The MCP client against real in-process rmcp servers: every era it speaks, every call kind,
//! and the outcome class of every fault the servers can be told to produce.

use std::time::Duration;

use anyhow::{Result, bail};
use mcpq_mcp::{CallMeta, Era, McpClient, Outcome, ServerConfig, Timeouts, TransportChoice};
use mcpq_tests::legacy_server::LegacyServer;
use mcpq_tests::mcp::{McpServer, Mode};
use serde_json::{Value, json};

fn client(server: &McpServer, pin: Option<&str>) -> Result<McpClient> {
    let mut cfg = ServerConfig::new("s", server.url());
    cfg.protocol_version = pin.map(str::to_owned);
    cfg.validate("servers[0]")?;
    Ok(McpClient::new(cfg)?)
}

fn meta(task: &str, attempt: u32) -> CallMeta {
    CallMeta { task: Some(task.into()), attempt: Some(attempt) }
}

fn executed(o: Outcome<Value>) -> Result<Value> {
    match o {
        Outcome::Executed(Ok(v)) => Ok(v),
        other => bail!("expected an executed call, got {other:?}"),
    }
}

fn text_of(result: &Value) -> Option<&str> {
    result["content"][0]["text"].as_str()
}

/// A session-era client whose session is open (a first call went through).
async fn session_client(
    server: &McpServer,
    cfg: impl FnOnce(&mut ServerConfig),
) -> Result<McpClient> {
    let mut c = ServerConfig::new("s", server.url());
    c.protocol_version = Some(mcpq_mcp::SESSION_VERSION.into());
    cfg(&mut c);
    let client = McpClient::new(c)?;
    executed(client.call_tool("echo", json!({"text": "warm"}), &CallMeta::default()).await)?;
    Ok(client)
}

#[tokio::test]
async fn every_era_calls_tools_reads_resources_and_gets_prompts() -> Result<()> {
    let cases = [
        (
            Mode::SessionSse,
            Some(mcpq_mcp::SESSION_VERSION),
            Era::Session { version: mcpq_mcp::SESSION_VERSION.into() },
        ),
        (Mode::SessionJson, Some("2025-06-18"), Era::Session { version: "2025-06-18".into() }),
        (Mode::Stateless, None, Era::Stateless),
        // rmcp answers server/discover in every mode, so probing picks the newest era
        (Mode::SessionSse, None, Era::Stateless),
    ];
    for (mode, pin, era) in cases {
        let server = McpServer::start(mode).await?;
        let c = client(&server, pin)?;
        let r = executed(c.call_tool("echo", json!({"text": "hi"}), &meta("task-1", 2)).await)?;
        assert_eq!(text_of(&r), Some("hi"), "{mode:?} {pin:?}");
        assert_eq!(c.era().await, Some(era.clone()), "{mode:?} {pin:?}");
        let runs = server.executions();
        assert_eq!(runs.len(), 1);
        assert_eq!(
            (runs[0].meta["mcpq/task"].as_str(), runs[0].meta["mcpq/attempt"].as_u64()),
            (Some("task-1"), Some(2))
        );
        let r = executed(c.read_resource("mem://greeting", &CallMeta::default()).await)?;
        assert_eq!(r["contents"][0]["text"], "hello", "{mode:?}");
        let r =
            executed(c.get_prompt("greet", json!({"name": "Ada"}), &CallMeta::default()).await)?;
        assert!(
            r["messages"][0]["content"]["text"].as_str().is_some_and(|t| t.contains("Ada")),
            "{r}"
        );
        let tools = executed(c.list_tools().await.map(Value::from))?;
        let mut names: Vec<_> =
            tools.as_array().into_iter().flatten().filter_map(|t| t["name"].as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["add", "echo", "fail", "slow"]);
        assert_eq!(executed(c.probe().await.map(|()| Value::Null))?, Value::Null);
    }
    Ok(())
}

#[tokio::test]
async fn tool_errors_and_unknown_tools_are_executed_answers() -> Result<()> {
    let server = McpServer::start(Mode::SessionSse).await?;
    let c = client(&server, None)?;
    let r = executed(c.call_tool("fail", json!({}), &CallMeta::default()).await)?;
    assert_eq!(r["isError"], true);
    match c.call_tool("no-such-tool", json!({}), &CallMeta::default()).await {
        // rmcp answers either a JSON-RPC error or an isError result; both are final answers
        Outcome::Executed(Err(_)) => {}
        Outcome::Executed(Ok(v)) => assert_eq!(v["isError"], true, "{v}"),
        other => bail!("expected an answer, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_stopped_server_is_not_delivered_and_a_restarted_one_answers_at_once() -> Result<()> {
    let server = McpServer::start(Mode::SessionSse).await?;
    let c = session_client(&server, |_| {}).await?;
    server.stop().await;
    assert!(matches!(
        c.call_tool("echo", json!({"text": "x"}), &CallMeta::default()).await,
        Outcome::NotDelivered { .. }
    ));
    server.restart().await?;
    // the client forgot the session with the server, so it opens a new one: no refusal
    let r = executed(c.call_tool("echo", json!({"text": "back"}), &CallMeta::default()).await)?;
    assert_eq!(text_of(&r), Some("back"));
    Ok(())
}

#[tokio::test]
async fn busy_and_refusing_servers_are_not_delivered_and_the_tool_does_not_run() -> Result<()> {
    let server = McpServer::start(Mode::SessionSse).await?;
    let c = session_client(&server, |_| {}).await?;
    let before = server.executions().len();
    for (status, retry_after) in [(503, Some(7)), (429, Some(2)), (400, None), (403, None)] {
        server.faults().reject_next(1, status, retry_after);
        match c.call_tool("echo", json!({"text": "x"}), &CallMeta::default()).await {
            Outcome::NotDelivered { retry_after: got, .. } => {
                let want = if matches!(status, 429 | 503) {
                    retry_after.map(Duration::from_secs)
                } else {
                    None
                };
                assert_eq!(got, want, "{status}");
            }
            other => bail!("{status}: expected not delivered, got {other:?}"),
        }
    }
    assert_eq!(server.executions().len(), before, "a refused request ran");
    Ok(())
}

#[tokio::test]
async fn a_server_error_is_ambiguous() -> Result<()> {
    let server = McpServer::start(Mode::SessionSse).await?;
    let c = session_client(&server, |_| {}).await?;
    server.faults().reject_next(1, 500, None);
    assert!(matches!(
        c.call_tool("echo", json!({"text": "x"}), &CallMeta::default()).await,
        Outcome::Ambiguous { .. }
    ));
    Ok(())
}

#[tokio::test]
async fn an_answer_cut_after_the_tool_ran_is_ambiguous() -> Result<()> {
    for mode in [Mode::SessionSse, Mode::SessionJson, Mode::Stateless] {
        let server = McpServer::start(mode).await?;
        let c = client(&server, None)?;
        executed(c.probe().await.map(|()| Value::Null))?;
        server.faults().cut_after_accept_next(1);
        let out = c.call_tool("echo", json!({"text": "x"}), &CallMeta::default()).await;
        assert!(matches!(out, Outcome::Ambiguous { .. }), "{mode:?}: {out:?}");
        assert_eq!(server.executions().len(), 1, "{mode:?}: the tool ran once");
    }
    Ok(())
}

#[tokio::test]
async fn a_stalled_request_times_out_as_ambiguous() -> Result<()> {
    let server = McpServer::start(Mode::SessionSse).await?;
    let quick = Timeouts { request_ms: 300, ..Timeouts::default() };
    let c = session_client(&server, |c| c.timeouts = quick).await?;
    server.faults().stall_next(1);
    let started = std::time::Instant::now();
    let out = c.call_tool("echo", json!({"text": "x"}), &CallMeta::default()).await;
    assert!(matches!(out, Outcome::Ambiguous { .. }), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "the request limit was not applied");
    Ok(())
}

#[tokio::test]
async fn a_timed_out_call_is_cancelled_on_the_server() -> Result<()> {
    let quick = Timeouts { request_ms: 300, ..Timeouts::default() };
    // sessions get notifications/cancelled; on the stateless era closing the stream cancels
    for (mode, pin) in
        [(Mode::SessionSse, Some(mcpq_mcp::SESSION_VERSION)), (Mode::Stateless, None)]
    {
        let server = McpServer::start(mode).await?;
        let mut cfg = ServerConfig::new("s", server.url());
        cfg.protocol_version = pin.map(str::to_owned);
        cfg.timeouts = quick;
        let c = McpClient::new(cfg)?;
        let out = c.call_tool("slow", json!({"ms": 30_000}), &CallMeta::default()).await;
        assert!(matches!(out, Outcome::Ambiguous { .. }), "{mode:?}: {out:?}");
        mcpq_tests::eventually(Duration::from_secs(10), "the slow tool stops", || async {
            Ok((server.in_flight() == 0).then_some(()))
        })
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn progress_keeps_a_slow_call_alive_but_never_past_the_request_limit() -> Result<()> {
    let server = McpServer::start(Mode::SessionSse).await?;
    let call = |request_ms: u64, args: Value| {
        let url = server.url();
        async move {
            let mut cfg = ServerConfig::new("s", url);
            cfg.protocol_version = Some(mcpq_mcp::SESSION_VERSION.into());
            cfg.timeouts = Timeouts { idle_ms: 1000, request_ms, ..Timeouts::default() };
            anyhow::Ok(McpClient::new(cfg)?.call_tool("slow", args, &CallMeta::default()).await)
        }
    };
    // 2.5 s of silence is past the 1 s idle limit; progress every 100 ms keeps it alive (the
    // margins are wide so a busy machine cannot delay a notification past the limit)
    let silent = call(10_000, json!({"ms": 2500})).await?;
    assert!(matches!(silent, Outcome::Ambiguous { .. }), "{silent:?}");
    let chatty = call(10_000, json!({"ms": 2500, "every_ms": 100})).await?;
    assert_eq!(text_of(&executed(chatty)?), Some("slept 2500 ms"));
    // but never past the request limit
    let capped = call(1500, json!({"ms": 2500, "every_ms": 100})).await?;
    assert!(matches!(capped, Outcome::Ambiguous { .. }), "{capped:?}");
    Ok(())
}

#[tokio::test]
async fn an_expired_session_is_not_delivered_and_the_next_call_opens_a_new_one() -> Result<()> {
    let server = McpServer::start(Mode::SessionSse).await?;
    let c = session_client(&server, |_| {}).await?;
    let before = server.executions().len();
    server.faults().expire_sessions().await;
    match c.call_tool("echo", json!({"text": "x"}), &CallMeta::default()).await {
        Outcome::NotDelivered { reason, .. } => assert_eq!(reason, "session expired"),
        other => bail!("expected not delivered, got {other:?}"),
    }
    assert_eq!(server.executions().len(), before, "the rejected request ran");
    let r = executed(c.call_tool("echo", json!({"text": "again"}), &CallMeta::default()).await)?;
    assert_eq!(text_of(&r), Some("again"));
    Ok(())
}

#[tokio::test]
async fn malformed_and_oversized_answers_are_ambiguous() -> Result<()> {
    let server = McpServer::start(Mode::SessionSse).await?;
    let c = session_client(&server, |c| c.max_response_bytes = 4096).await?;
    server.faults().malformed_next(1);
    assert!(matches!(
        c.call_tool("echo", json!({"text": "x"}), &CallMeta::default()).await,
        Outcome::Ambiguous { .. }
    ));
    server.faults().oversize_next(1, 100_000);
    match c.call_tool("echo", json!({"text": "x"}), &CallMeta::default()).await {
        Outcome::Ambiguous { reason } => assert!(reason.contains("larger than 4096"), "{reason}"),
        other => bail!("expected ambiguous, got {other:?}"),
    }
    // an honest answer larger than the cap is cut off too
    let big = "y".repeat(10_000);
    assert!(matches!(
        c.call_tool("echo", json!({"text": big}), &CallMeta::default()).await,
        Outcome::Ambiguous { .. }
    ));
    Ok(())
}

#[tokio::test]
async fn many_calls_run_at_once_on_one_client() -> Result<()> {
    let server = McpServer::start(Mode::SessionSse).await?;
    let c = client(&server, Some(mcpq_mcp::SESSION_VERSION))?;
    // the first calls race to open the session; one opens it, the rest wait for it
    let calls = (0..64).map(|i| {
        let c = c.clone();
        tokio::spawn(async move {
            c.call_tool("echo", json!({"text": format!("n{i}")}), &meta(&format!("t{i}"), 1)).await
        })
    });
    let results = futures_util::future::join_all(calls).await;
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(text_of(&executed(r?)?), Some(format!("n{i}").as_str()));
    }
    assert_eq!(server.executions().len(), 64);
    Ok(())
}

fn legacy_client(server: &LegacyServer, transport: TransportChoice) -> Result<McpClient> {
    let mut cfg = ServerConfig::new("legacy", server.url());
    cfg.transport = transport;
    cfg.validate("servers[0]")?;
    Ok(McpClient::new(cfg)?)
}

#[tokio::test]
async fn legacy_sse_servers_answer_on_their_stream() -> Result<()> {
    let server = LegacyServer::start().await?;
    for transport in [TransportChoice::Sse, TransportChoice::Auto] {
        let c = legacy_client(&server, transport)?;
        let r = executed(c.call_tool("echo", json!({"text": "old"}), &meta("t-legacy", 3)).await)?;
        assert_eq!(text_of(&r), Some("old"), "{transport:?}");
        assert_eq!(
            c.era().await,
            Some(Era::Legacy),
            "{transport:?}: auto falls back to the GET stream"
        );
        let tools = executed(c.list_tools().await.map(Value::from))?;
        assert_eq!(tools[0]["name"], "echo");
        assert_eq!(executed(c.probe().await.map(|()| Value::Null))?, Value::Null);
        match c.request("no/such", json!({}), None, &CallMeta::default()).await {
            Outcome::Executed(Err(e)) => assert_eq!(e.code, -32601),
            other => bail!("expected a JSON-RPC error, got {other:?}"),
        }
    }
    let runs = server.executions();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["_meta"]["mcpq/task"], "t-legacy");
    Ok(())
}

#[tokio::test]
async fn a_lost_legacy_stream_makes_waiting_calls_ambiguous_and_the_next_session_works()
-> Result<()> {
    let server = LegacyServer::start().await?;
    let c = legacy_client(&server, TransportChoice::Sse)?;
    executed(c.call_tool("echo", json!({"text": "warm"}), &CallMeta::default()).await)?;
    server.hold_answers(true);
    let waiting = {
        let c = c.clone();
        tokio::spawn(async move {
            c.call_tool("echo", json!({"text": "lost"}), &CallMeta::default()).await
        })
    };
    mcpq_tests::eventually(Duration::from_secs(10), "the held call reaches the tool", || async {
        Ok((server.executions().len() == 2).then_some(()))
    })
    .await?;
    server.drop_streams();
    assert!(matches!(waiting.await?, Outcome::Ambiguous { .. }), "its answer can never come");
    server.hold_answers(false);
    // the stream reconnects (a new session, initialized again) and calls go through
    let r = mcpq_tests::eventually(Duration::from_secs(15), "a call on the new session", || {
        let c = c.clone();
        async move {
            match c.call_tool("echo", json!({"text": "new"}), &CallMeta::default()).await {
                Outcome::Executed(Ok(v)) => Ok(Some(v)),
                Outcome::NotDelivered { .. } => Ok(None),
                other => bail!("while reconnecting: {other:?}"),
            }
        }
    })
    .await?;
    assert_eq!(text_of(&r), Some("new"));
    assert!(server.streams_opened() >= 2);
    Ok(())
}

fn names(tools: &[Value]) -> Vec<String> {
    tools.iter().filter_map(|t| t["name"].as_str().map(str::to_owned)).collect()
}

#[tokio::test]
async fn tool_lists_are_cached_until_the_server_announces_a_change() -> Result<()> {
    let server = LegacyServer::start().await?;
    let c = legacy_client(&server, TransportChoice::Sse)?;
    let first = executed(c.tools().await.map(|t| Value::from(t.to_vec())))?;
    assert_eq!(names(first.as_array().map_or(&[][..], Vec::as_slice)), ["echo"]);
    server.add_tool("extra");
    let cached = executed(c.tools().await.map(|t| Value::from(t.to_vec())))?;
    assert_eq!(
        names(cached.as_array().map_or(&[][..], Vec::as_slice)),
        ["echo"],
        "served from cache"
    );
    assert_eq!(server.lists(), 1);
    server.announce_tools_changed();
    let fresh = mcpq_tests::eventually(
        Duration::from_secs(10),
        "the announcement refreshes the list",
        || {
            let c = c.clone();
            async move {
                let tools = executed(c.tools().await.map(|t| Value::from(t.to_vec())))?;
                let n = names(tools.as_array().map_or(&[][..], Vec::as_slice));
                Ok((n.len() == 2).then_some(n))
            }
        },
    )
    .await?;
    assert_eq!(fresh, ["echo", "extra"]);
    Ok(())
}

#[tokio::test]
async fn tool_lists_expire_after_their_ttl() -> Result<()> {
    let server = LegacyServer::start().await?;
    let mut cfg = ServerConfig::new("legacy", server.url());
    cfg.transport = TransportChoice::Sse;
    cfg.tools_ttl_ms = 1;
    let c = McpClient::new(cfg)?;
    executed(c.tools().await.map(|t| Value::from(t.to_vec())))?;
    mcpq_tests::eventually(Duration::from_secs(10), "a listing after the ttl", || {
        let c = c.clone();
        let server = &server;
        async move {
            executed(c.tools().await.map(|t| Value::from(t.to_vec())))?;
            Ok((server.lists() >= 2).then_some(()))
        }
    })
    .await
}

#[tokio::test]
async fn a_server_that_went_away_is_probed_again_when_it_returns() -> Result<()> {
    let server = McpServer::start(Mode::Stateless).await?;
    let c = client(&server, None)?;
    executed(c.call_tool("echo", json!({"text": "x"}), &CallMeta::default()).await)?;
    assert_eq!(c.era().await, Some(Era::Stateless));
    server.stop().await;
    assert!(matches!(
        c.call_tool("echo", json!({"text": "x"}), &CallMeta::default()).await,
        Outcome::NotDelivered { .. }
    ));
    assert_eq!(c.era().await, None, "the era is forgotten with the server");
    server.restart().await?;
    executed(c.call_tool("echo", json!({"text": "back"}), &CallMeta::default()).await)?;
    assert_eq!(c.era().await, Some(Era::Stateless));
    Ok(())
}
