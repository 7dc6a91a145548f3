//! The HTTP API over real TCP, in front of a whole replica (`mcpq::serve::run_on`: fleet +
//! API) on a real store and rmcp servers: the happy path, SSE resume with `Last-Event-ID`,
//! bearer tokens, idempotency keys, the body limit, and servers added and removed at run time.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use futures_util::StreamExt;
use mcpq::config::Config;
use mcpq_tests::mcp::{McpServer, Mode};
use mcpq_tests::{RedisServer, eventually};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A replica serving its API on 127.0.0.1:0, stopped on drop.
pub(crate) struct Replica {
    pub(crate) base: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<mcpq_fleet::DrainReport>>>,
    pub(crate) _redis: RedisServer,
}

impl Replica {
    pub(crate) async fn start(extra_toml: &str, servers: &[(&str, &McpServer)]) -> Result<Self> {
        let redis = RedisServer::start()?;
        let mut toml = format!(
            "node = \"api-test\"\n[store]\nredis_url = \"{}\"\n\
             [health]\ninterval_ms = 100\n[dispatch]\npoll_ms = 50\nreap_interval_ms = 100\n{extra_toml}\n",
            redis.url()
        );
        for (name, s) in servers {
            toml.push_str(&format!("[[servers]]\nname = \"{name}\"\nurl = \"{}\"\n", s.url()));
        }
        let cfg = Config::from_toml(&toml)?;
        let store = mcpq_queue::RedisStore::open(&cfg.store, cfg.queue_configs()).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(mcpq::serve::run_on(store, "redis".into(), cfg, listener, async {
            let _ = stopped.await;
        }));
        let r = Self { base, stop: Some(stop), task: Some(task), _redis: redis };
        let http = reqwest::Client::new();
        eventually(Duration::from_secs(10), "the API answers /readyz", || async {
            let ok = http
                .get(format!("{}/readyz", r.base))
                .send()
                .await
                .is_ok_and(|x| x.status() == 200);
            Ok(ok.then_some(()))
        })
        .await?;
        Ok(r)
    }

    /// Stops the replica and answers its drain report.
    pub(crate) async fn shutdown(mut self) -> Result<mcpq_fleet::DrainReport> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let task = self.task.take().context("already stopped")?;
        tokio::time::timeout(Duration::from_secs(20), task).await.context("shutdown hung")??
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// One parsed SSE event.
#[derive(Debug, Clone)]
struct Sse {
    id: String,
    event: String,
    data: Value,
}

/// Reads `n` task events from `resp` (an open SSE response), within `limit`; the opening
/// message and server health events are skipped.
async fn read_events(resp: reqwest::Response, n: usize, limit: Duration) -> Result<Vec<Sse>> {
    let mut out = Vec::new();
    let mut buf = String::new();
    let mut body = resp.bytes_stream();
    let deadline = tokio::time::Instant::now() + limit;
    while out.len() < n {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .with_context(|| format!("only {} of {n} events within {limit:?}", out.len()))?;
        let Some(chunk) = chunk else { bail!("stream ended after {} events", out.len()) };
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let (mut id, mut event, mut data) = (String::new(), String::new(), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            if event.starts_with("task.") {
                out.push(Sse { id, event, data: serde_json::from_str(&data)? });
            }
        }
    }
    Ok(out)
}

#[tokio::test]
async fn tasks_run_end_to_end_and_events_resume_from_last_event_id() -> Result<()> {
    let mcp = McpServer::start(Mode::Stateless).await?;
    let r = Replica::start("", &[("a", &mcp)]).await?;
    let http = reqwest::Client::new();
    let events = http.get(format!("{}/v1/events?from=beginning", r.base)).send().await?;
    ensure!(events.status() == 200, "events: {}", events.status());
    ensure!(
        events
            .headers()
            .get("content-type")
            .is_some_and(|c| c.as_bytes().starts_with(b"text/event-stream")),
        "not an event stream"
    );
    let resp = http
        .post(format!("{}/v1/tasks", r.base))
        .json(&json!({"call": {"tool": "echo", "arguments": {"text": "hi"}}, "priority": 3}))
        .send()
        .await?;
    ensure!(resp.status() == 201, "create: {}", resp.status());
    let task: Value = resp.json().await?;
    let id = task["id"].as_str().context("id")?.to_owned();
    let done: Value = http
        .get(format!("{}/v1/tasks/{id}/wait?timeout_ms=10000", r.base))
        .send()
        .await?
        .json()
        .await?;
    ensure!(done["state"] == "succeeded", "{done}");
    ensure!(done["server"] == "a" && done["attempt"] == 1, "{done}");
    ensure!(done["result"]["content"][0]["text"] == "hi", "{done}");
    ensure!(done["finished_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{done}");
    // enqueued, started, succeeded: read them, then drop the connection
    let first = read_events(events, 3, Duration::from_secs(10)).await?;
    let kinds: Vec<&str> = first.iter().map(|e| e.event.as_str()).collect();
    ensure!(kinds == ["task.enqueued", "task.started", "task.succeeded"], "{kinds:?}");
    ensure!(first.iter().all(|e| e.data["task"] == id.as_str()), "{first:?}");
    let last = first[2].id.clone();
    // more work while nobody listens
    let mut ids = Vec::new();
    for n in 0..3 {
        let t: Value = http
            .post(format!("{}/v1/tasks", r.base))
            .json(&json!({"call": {"tool": "echo", "arguments": {"text": format!("t{n}")}}}))
            .send()
            .await?
            .json()
            .await?;
        ids.push(t["id"].as_str().context("id")?.to_owned());
    }
    for id in &ids {
        let t: Value = http
            .get(format!("{}/v1/tasks/{id}/wait?timeout_ms=10000", r.base))
            .send()
            .await?
            .json()
            .await?;
        ensure!(t["state"] == "succeeded", "{t}");
    }
    let resumed =
        http.get(format!("{}/v1/events", r.base)).header("Last-Event-ID", &last).send().await?;
    let after = read_events(resumed, 9, Duration::from_secs(10)).await?;
    let everything = http.get(format!("{}/v1/events?from=beginning", r.base)).send().await?;
    let all = read_events(everything, 12, Duration::from_secs(10)).await?;
    let expected: Vec<&str> = all[3..].iter().map(|e| e.id.as_str()).collect();
    let got: Vec<&str> = after.iter().map(|e| e.id.as_str()).collect();
    ensure!(got == expected, "resume skipped or repeated events: {got:?} vs {expected:?}");
    let per_task = ids.iter().all(|id| {
        after
            .iter()
            .filter(|e| e.data["task"] == id.as_str())
            .map(|e| e.event.as_str())
            .collect::<Vec<_>>()
            == ["task.enqueued", "task.started", "task.succeeded"]
    });
    ensure!(per_task, "{after:?}");
    // the listing and the counts agree
    let page: Value =
        http.get(format!("{}/v1/tasks?state=succeeded", r.base)).send().await?.json().await?;
    ensure!(page["tasks"].as_array().map(Vec::len) == Some(4), "{page}");
    // the fleet counts an outcome just after the store has it: poll
    let want = [
        "mcpq_tasks{queue=\"default\",state=\"succeeded\"} 4",
        "mcpq_succeeded_total{node=\"api-test\"} 4",
        "mcpq_task_latency_seconds_count{node=\"api-test\"} 4",
        "mcpq_server_health{server=\"a\",state=\"online\"} 1",
    ];
    eventually(Duration::from_secs(10), "metrics count the four tasks", || async {
        let text = http.get(format!("{}/metrics", r.base)).send().await?.text().await?;
        Ok(want.iter().all(|w| text.contains(w)).then_some(()))
    })
    .await?;
    // shutdown ends open event streams instead of waiting for them (waits: api_router)
    let open = http.get(format!("{}/v1/events", r.base)).send().await?;
    let mut body = open.bytes_stream();
    // the stream is live (its opening message came) before the shutdown begins
    tokio::time::timeout(Duration::from_secs(10), body.next()).await?.context("no opening")??;
    let report = r.shutdown().await?;
    ensure!(report.handed_back == 0, "{report:?}");
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(chunk) = body.next().await {
            if chunk.is_err() {
                break;
            }
        }
    })
    .await;
    ensure!(ended.is_ok(), "the event stream stayed open after shutdown");
    Ok(())
}

#[tokio::test]
async fn tokens_idempotency_and_the_body_limit_hold_over_tcp() -> Result<()> {
    let r =
        Replica::start("[api]\ntokens = [\"tcp-token-123\"]\nmax_body_bytes = 2048\n", &[]).await?;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/tasks", r.base);
    let body = json!({"call": {"tool": "echo", "arguments": {"text": "x"}}});
    let resp = http.post(&url).json(&body).send().await?;
    ensure!(resp.status() == 401, "no token: {}", resp.status());
    ensure!(resp.headers().get("www-authenticate").is_some_and(|v| v == "Bearer"), "challenge");
    let err: Value = resp.json().await?;
    ensure!(err["error"]["field"] == "Authorization", "{err}");
    ensure!(
        http.get(format!("{}/healthz", r.base)).send().await?.status() == 200,
        "healthz is open"
    );
    let post = |key: &str, body: &Value| {
        http.post(&url)
            .bearer_auth("tcp-token-123")
            .header("Idempotency-Key", key)
            .json(body)
            .send()
    };
    let a = post("k-1", &body).await?;
    ensure!(a.status() == 201, "first: {}", a.status());
    let a: Value = a.json().await?;
    let b = post("k-1", &body).await?;
    ensure!(b.status() == 200, "repeat: {}", b.status());
    let b: Value = b.json().await?;
    ensure!(a["id"] == b["id"], "{a} {b}");
    let other = json!({"call": {"tool": "echo", "arguments": {"text": "y"}}});
    let c = post("k-1", &other).await?;
    ensure!(c.status() == 422, "other body: {}", c.status());
    // over the limit: refused with a JSON body, declared length or not
    let big =
        json!({"call": {"tool": "echo", "arguments": {"text": "z".repeat(4096)}}}).to_string();
    let resp = http
        .post(&url)
        .bearer_auth("tcp-token-123")
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await?;
    ensure!(resp.status() == 413, "declared: {}", resp.status());
    let err: Value = resp.json().await?;
    ensure!(err["error"]["code"] == "body_too_large", "{err}");
    let chunks = futures_util::stream::iter(
        big.into_bytes()
            .chunks(512)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let resp = http
        .post(&url)
        .bearer_auth("tcp-token-123")
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await?;
    ensure!(resp.status() == 413, "streamed: {}", resp.status());
    let stats: Value = http
        .get(format!("{}/v1/queues/default", r.base))
        .bearer_auth("tcp-token-123")
        .send()
        .await?
        .json()
        .await?;
    ensure!(stats["counts"]["queued"] == 1, "one task stored: {stats}");
    r.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn servers_can_be_added_listed_and_removed_over_http() -> Result<()> {
    let a = McpServer::start(Mode::Stateless).await?;
    let b = McpServer::start(Mode::SessionJson).await?;
    let r = Replica::start("", &[("a", &a)]).await?;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/servers", r.base);
    let bad = http.post(&url).json(&json!({"name": "b", "url": "ftp://x"})).send().await?;
    ensure!(bad.status() == 422, "bad url: {}", bad.status());
    let err: Value = bad.json().await?;
    ensure!(err["error"]["field"] == "url", "{err}");
    let dup = http.post(&url).json(&json!({"name": "a", "url": b.url()})).send().await?;
    ensure!(dup.status() == 409, "duplicate: {}", dup.status());
    let added = http
        .post(&url)
        .json(&json!({"name": "b", "url": b.url(), "tags": ["json"]}))
        .send()
        .await?;
    ensure!(added.status() == 201, "add: {}", added.status());
    let tools = eventually(Duration::from_secs(10), "b lists its tools", || async {
        let list: Value = http.get(&url).send().await?.json().await?;
        let b = list.as_array().and_then(|l| l.iter().find(|s| s["name"] == "b").cloned());
        Ok(b.filter(|b| b["tools"].is_array() && b["health"] == "online"))
    })
    .await?;
    ensure!(tools["tools"].as_array().is_some_and(|t| t.iter().any(|x| x == "echo")), "{tools}");
    let pinned: Value = http
        .post(format!("{}/v1/tasks", r.base))
        .json(&json!({"call": {"tool": "echo", "arguments": {"text": "on b"}}, "server": "b"}))
        .send()
        .await?
        .json()
        .await?;
    let id = pinned["id"].as_str().context("id")?;
    let done: Value = http
        .get(format!("{}/v1/tasks/{id}/wait?timeout_ms=10000", r.base))
        .send()
        .await?
        .json()
        .await?;
    ensure!(done["state"] == "succeeded" && done["server"] == "b", "{done}");
    ensure!(b.executions().len() == 1, "b ran it once");
    let gone = http.delete(format!("{url}/b")).send().await?;
    ensure!(gone.status() == 204, "remove: {}", gone.status());
    let again = http.delete(format!("{url}/b")).send().await?;
    ensure!(again.status() == 404, "remove twice: {}", again.status());
    let list: Value = http.get(&url).send().await?.json().await?;
    ensure!(list.as_array().map(Vec::len) == Some(1), "{list}");
    r.shutdown().await?;
    Ok(())
}
