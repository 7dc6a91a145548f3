//! The `mcpq` command line driven as a process against a running replica: every client command,
//! tables and `--json`, and errors that name the flag, the field or the config key.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mcpq_tests::mcp::{McpServer, Mode};
use serde_json::Value;
use tokio::process::Command;

use crate::api_tcp::Replica;

const BIN: &str = env!("CARGO_BIN_EXE_mcpq-e2e-node");

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn mcpq(args: &[&str]) -> Result<Out> {
    mcpq_within(args, Duration::from_secs(60)).await
}

async fn mcpq_within(args: &[&str], limit: Duration) -> Result<Out> {
    let run = Command::new(BIN)
        .args(args)
        .env_remove("MCPQ_API")
        .env_remove("MCPQ_TOKEN")
        .env("MCPQ_LOG", "warn")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(limit, run).await.context("mcpq hung")??;
    Ok(Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn json(o: &Out) -> Result<Value> {
    serde_json::from_str(&o.stdout)
        .with_context(|| format!("not JSON: {:?} / {}", o.stdout, o.stderr))
}

#[tokio::test]
async fn client_commands_enqueue_inspect_cancel_retry_and_watch() -> Result<()> {
    let mcp = McpServer::start(Mode::Stateless).await?;
    let r = Replica::start("", &[("a", &mcp)]).await?;
    let api = r.base.as_str();
    let o = mcpq(&[
        "enqueue",
        "--api",
        api,
        "--tool",
        "echo",
        "--args",
        r#"{"text":"hello"}"#,
        "--priority",
        "-2",
        "--wait",
        "--json",
    ])
    .await?;
    ensure!(o.code == 0, "enqueue --wait: {}", o.stderr);
    let t = json(&o)?;
    ensure!(t["state"] == "succeeded" && t["priority"] == -2, "{t}");
    ensure!(t["result"]["content"][0]["text"] == "hello", "{t}");
    let id = t["id"].as_str().context("id")?.to_owned();

    let o = mcpq(&["task", &id, "--api", api]).await?;
    ensure!(
        o.code == 0 && o.stdout.contains("succeeded") && o.stdout.contains("tool echo"),
        "{}{}",
        o.stdout,
        o.stderr
    );
    let o = mcpq(&["tasks", "--api", api, "--state", "succeeded", "--json"]).await?;
    ensure!(json(&o)?["tasks"][0]["id"] == id.as_str(), "{}", o.stdout);
    let o = mcpq(&["tasks", "--api", api, "--state", "succeeded"]).await?;
    ensure!(o.stdout.starts_with("ID") && o.stdout.contains(&id), "{}", o.stdout);

    // a delayed task: cancelled, then retried
    let o = mcpq(&[
        "enqueue",
        "--api",
        api,
        "--tool",
        "echo",
        "--args",
        r#"{"text":"later"}"#,
        "--delay-ms",
        "600000",
        "--json",
    ])
    .await?;
    let later = json(&o)?;
    ensure!(later["state"] == "scheduled", "{later}");
    let lid = later["id"].as_str().context("id")?.to_owned();
    let o = mcpq(&["cancel", &lid, "--api", api, "--json"]).await?;
    ensure!(json(&o)?["state"] == "cancelled", "{}", o.stdout);
    let o = mcpq(&["cancel", &lid, "--api", api]).await?;
    ensure!(
        o.code == 1 && o.stderr.contains("cancelled") && o.stderr.contains("409"),
        "{}",
        o.stderr
    );
    let o = mcpq(&["retry", &lid, "--api", api, "--json"]).await?;
    ensure!(o.code == 0, "{}", o.stderr);
    let o = mcpq(&["enqueue", "--api", api, "--resource", "mem://greeting", "--wait", "--json"])
        .await?;
    ensure!(json(&o)?["state"] == "succeeded", "{}{}", o.stdout, o.stderr);

    let o = mcpq(&["stats", "--api", api]).await?;
    ensure!(o.stdout.starts_with("QUEUE") && o.stdout.contains("default"), "{}", o.stdout);
    let o = mcpq(&["stats", "default", "--api", api, "--json"]).await?;
    let s = json(&o)?;
    ensure!(s[0]["counts"]["succeeded"].as_u64().is_some_and(|n| n >= 2), "{s}");
    let o = mcpq(&["servers", "--api", api]).await?;
    ensure!(o.stdout.contains("NAME") && o.stdout.contains("online"), "{}", o.stdout);
    let o = mcpq(&["servers", "--api", api, "--json"]).await?;
    ensure!(json(&o)?[0]["name"] == "a", "{}", o.stdout);

    let o = mcpq(&["watch", "--api", api, "--from-beginning", "--count", "3", "--json"]).await?;
    ensure!(o.code == 0, "watch: {}", o.stderr);
    let kinds: Vec<String> = o
        .stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l)
                .map(|v| v["kind"].as_str().unwrap_or_default().to_owned())
        })
        .collect::<Result<_, _>>()?;
    ensure!(kinds == ["task.enqueued", "task.started", "task.succeeded"], "{kinds:?}");
    let o = mcpq(&["watch", "--api", api, "--from-beginning", "--count", "2"]).await?;
    ensure!(o.stdout.lines().count() == 2 && o.stdout.contains("task.enqueued"), "{}", o.stdout);
    r.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn bad_flags_fields_and_unreachable_apis_are_named() -> Result<()> {
    let r = Replica::start("[api]\ntokens = [\"cli-token-42\"]\n", &[]).await?;
    let api = r.base.as_str();
    let o = mcpq(&["enqueue", "--api", api, "--tool", "echo", "--args", "{nope"]).await?;
    ensure!(o.code == 2 && o.stderr.contains("--args"), "{}", o.stderr);
    let o = mcpq(&["enqueue", "--api", api, "--tool", "echo", "--args", "[1]"]).await?;
    ensure!(
        o.code == 2 && o.stderr.contains("--args") && o.stderr.contains("object"),
        "{}",
        o.stderr
    );
    let o = mcpq(&["enqueue", "--api", api, "--tool", "echo", "--priority", "high"]).await?;
    ensure!(o.code == 2 && o.stderr.contains("--priority"), "{}", o.stderr);
    let o = mcpq(&["enqueue", "--api", api, "--tool", "a", "--resource", "b"]).await?;
    ensure!(o.code == 2 && o.stderr.contains("--resource"), "two targets: {}", o.stderr);
    let o = mcpq(&["enqueue", "--api", api, "--tool", "echo"]).await?;
    ensure!(o.code == 1 && o.stderr.contains("--token"), "no token: {}", o.stderr);
    let tok = ["--token", "cli-token-42"];
    let o = mcpq(&[&["enqueue", "--api", api, "--tool", ""][..], &tok].concat()).await?;
    ensure!(o.code == 1 && o.stderr.contains("--tool:"), "{}", o.stderr);
    let o = mcpq(
        &[&["enqueue", "--api", api, "--tool", "x", "--max-attempts", "0"][..], &tok].concat(),
    )
    .await?;
    ensure!(o.code == 1 && o.stderr.contains("--max-attempts:"), "{}", o.stderr);
    let o =
        mcpq(&[&["enqueue", "--api", api, "--tool", "x", "--queue", "nope"][..], &tok].concat())
            .await?;
    ensure!(o.code == 1 && o.stderr.contains("--queue:"), "{}", o.stderr);
    let o = mcpq(&[&["task", "not-a-uuid", "--api", api][..], &tok].concat()).await?;
    ensure!(
        o.code == 1 && o.stderr.contains("id: \"not-a-uuid\" is not a task id"),
        "{}",
        o.stderr
    );
    let o = mcpq(&[&["watch", "--api", api, "--after", "bogus"][..], &tok].concat()).await?;
    ensure!(o.code == 1 && o.stderr.contains("--after:"), "{}", o.stderr);
    let o = mcpq(&["watch", "--api", api, "--after", "1-0", "--from-beginning"]).await?;
    ensure!(o.code == 2, "--after with --from-beginning: {}", o.stderr);
    let o = mcpq(&["enqueue", "--api", api, "--resource", "r", "--args", "{}"]).await?;
    ensure!(o.code == 2 && o.stderr.contains("--args"), "{}", o.stderr);
    let o = mcpq(&["enqueue", "--api", api]).await?;
    ensure!(o.code == 2 && o.stderr.contains("--tool"), "no target: {}", o.stderr);
    let o = mcpq(
        &[&["enqueue", "--api", api, "--tool", "x", "--wait", "--wait-timeout", "0"][..], &tok]
            .concat(),
    )
    .await?;
    ensure!(o.code == 2 && o.stderr.contains("--wait-timeout"), "{}", o.stderr);
    let o = mcpq(&[&["tasks", "--api", api, "--state", "done"][..], &tok].concat()).await?;
    ensure!(o.code == 1 && o.stderr.contains("state:"), "{}", o.stderr);
    let o = mcpq(&["stats", "--api", "http://127.0.0.1:1"]).await?;
    ensure!(o.code == 1 && o.stderr.contains("cannot reach"), "{}", o.stderr);
    let o = mcpq(&["stats", "--api", "not a url"]).await?;
    ensure!(o.code == 1 && o.stderr.contains("--api"), "{}", o.stderr);
    r.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn serve_refuses_bad_configuration_naming_the_key_or_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cases = [
        ("[api]\nlisten = \"0.0.0.0:7600\"\n", "api.listen"),
        ("[api]\nlisten = \"nowhere\"\n", "api.listen"),
        ("[dispatch]\nstrategy = \"fastest\"\n", "dispatch.strategy"),
        ("[store]\nredis_url = \"http://x\"\n", "store.redis_url"),
        ("[stor]\npath = \"x\"\n", "unknown field `stor`"),
        ("[store]\npath = \"x\"\n[queues.default\n", "line 3"),
        ("[[servers]]\nname = \"a\"\nurl = \"ftp://x\"\n", "servers[0].url"),
    ];
    for (i, (text, named)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text)?;
        let o = mcpq(&["serve", "--config", path.to_str().context("utf-8 path")?]).await?;
        ensure!(o.code == 1 && o.stderr.contains(named), "{text:?}: exit {} {}", o.code, o.stderr);
    }
    let o = mcpq(&["serve", "--config", "/nonexistent/mcpq.toml"]).await?;
    ensure!(o.code == 1 && o.stderr.contains("no such file"), "{}", o.stderr);
    Ok(())
}

/// A benchmark of a Redis store without a redis-server fails before it measures anything,
/// saying what to do.
#[tokio::test]
async fn bench_without_redis_server_fails_first_naming_the_flag() -> Result<()> {
    let missing = "/nonexistent/redis-server";
    for stores in ["redis", "embedded,redis-aof"] {
        let args = ["bench", "--stores", stores, "--redis-server", missing, "--tasks", "100"];
        let o = mcpq_within(&args, Duration::from_secs(30)).await?;
        ensure!(o.code == 1, "{stores}: exit {} {}", o.code, o.stderr);
        ensure!(o.stderr.contains(missing) && o.stderr.contains("--redis-server"), "{}", o.stderr);
        ensure!(!o.stderr.contains("bench: ceiling"), "measured before the check: {}", o.stderr);
    }
    Ok(())
}

/// The benchmark's every measure, small: its report is complete and every task of every run
/// is accounted for (figures are not checked: a debug build under test load says nothing).
#[tokio::test]
async fn bench_runs_every_measure_and_accounts_for_every_task() -> Result<()> {
    let args = [
        "bench",
        "--json",
        "--stores",
        "redis,embedded",
        "--servers",
        "1,2",
        "--tasks",
        "300",
        "--runs",
        "1",
        "--rates",
        "100",
        "--seconds",
        "1",
        "--depths",
        "10,300",
        "--depth-tasks",
        "100",
    ];
    let o = mcpq_within(&args, Duration::from_secs(240)).await?;
    ensure!(o.code == 0, "bench failed: {}\n{}", o.stdout, o.stderr);
    let r = json(&o)?;
    ensure!(r["lost"] == 0, "{r}");
    let rows = |k: &str| r[k].as_array().cloned().unwrap_or_default();
    let servers: Vec<u64> = rows("ceiling").iter().filter_map(|c| c["servers"].as_u64()).collect();
    ensure!(servers == [1, 2], "a ceiling per number of servers: {r}");
    ensure!(rows("ceiling").iter().all(|c| c["calls_per_s"].as_f64() > Some(0.0)), "{r}");
    ensure!(
        rows("ceiling").iter().all(|c| {
            let top = c["concurrency"].as_f64().unwrap_or(0.0);
            c["in_flight"].as_f64().is_some_and(|n| (0.0..=top).contains(&n))
        }),
        "the ceiling's calls in flight, at most its concurrency: {r}"
    );
    ensure!(rows("drain").len() == 4, "a drain per store and number of servers: {r}");
    for d in rows("drain") {
        let a = &d["runs"][0]["accounting"];
        ensure!(a["tasks"] == 300 && a["succeeded"] == 300 && a["lost"] == 0, "{d}");
        ensure!(a["duplicates"] == 0 && a["unfinished"] == 0, "{d}");
        ensure!(d["tasks_per_s"].as_f64() > Some(0.0) && d["of_ceiling"].as_f64() > Some(0.0));
        let run = &d["runs"][0];
        let top = run["ceiling_calls_per_s"].as_f64();
        let (before, after) = (run["ceiling_before"].as_f64(), run["ceiling_after"].as_f64());
        ensure!(before > Some(0.0) && after > Some(0.0), "ceiling runs around each drain: {d}");
        let mean = before.zip(after).map(|(b, a)| (b + a) / 2.0);
        ensure!(
            top.zip(mean).is_some_and(|(t, m)| (t - m).abs() < 1e-9),
            "its ceiling is the mean of the two: {d}"
        );
        let ratio = run["tasks_per_s"].as_f64().zip(top).map(|(rate, top)| rate / top);
        let said = run["of_ceiling"].as_f64();
        ensure!(
            ratio.zip(said).is_some_and(|(a, b)| (a - b).abs() < 1e-9),
            "a run's ratio is its rate over its own ceiling: {d}"
        );
        ensure!(d["mcpq_cpu_us_per_task"].as_f64() > Some(0.0), "{d}");
        // at most every slot of the run's servers (32 each by default) and a health ping each
        let slots = d["servers"].as_f64().map(|k| 33.0 * k);
        let in_flight = d["in_flight"].as_f64().zip(slots);
        ensure!(in_flight.is_some_and(|(n, top)| (0.0..=top).contains(&n)), "in flight: {d}");
        // one run: each ratio is that run's own figures over each other
        let over = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
        let servers = run["server_cpu_us_per_task"].as_f64();
        let mcpq_over = over(run["mcpq_cpu_us_per_task"].as_f64(), servers);
        let beside = run["ceiling_server_cpu_us_per_call"].as_f64();
        ensure!(beside > Some(0.0), "the servers' CPU in the ceilings beside it: {d}");
        for (said, want) in [
            (d["mcpq_over_servers"].as_f64(), mcpq_over),
            (d["servers_over_ceiling"].as_f64(), over(servers, beside)),
        ] {
            ensure!(
                said.zip(want).is_some_and(|(s, w)| s > 0.0 && (s - w).abs() < 1e-9),
                "CPU ratios of the run: {d}"
            );
        }
        let redis = d["store"] == "redis";
        ensure!(
            d["redis_commands_per_task"].is_f64() == redis,
            "Redis figures only for Redis: {d}"
        );
        // the embedded store's writer thread: a part of mcpq's CPU, and only there
        let writer = d["writer_cpu_us_per_task"].as_f64();
        if redis {
            ensure!(d["writer_cpu_us_per_task"].is_null(), "no writer thread on Redis: {d}");
        } else {
            ensure!(
                writer.is_some_and(|w| w >= 0.0)
                    && writer <= d["mcpq_cpu_us_per_task"].as_f64().map(|m| m + 1e-9),
                "the writer's CPU, within mcpq's: {d}"
            );
        }
    }
    ensure!(rows("steady").len() == 2, "steady with the most servers, per store: {r}");
    for s in rows("steady") {
        let a = &s["runs"][0]["accounting"];
        ensure!(s["servers"] == 2 && a["tasks"] == 100 && a["succeeded"] == 100, "{s}");
        ensure!(s["queued"]["p99_us"].as_f64() >= s["queued"]["p50_us"].as_f64(), "{s}");
    }
    let scale = rows("scale");
    ensure!(scale.len() == 4, "scale per store and depth: {r}");
    for s in scale {
        ensure!(s["serve_rss_mib"].as_f64() > Some(1.0), "serve's memory was read: {s}");
        ensure!(s["drain_tasks_per_s"].as_f64() > Some(0.0), "{s}");
    }
    Ok(())
}

#[tokio::test]
async fn demo_runs_with_no_setup_and_accounts_for_every_task() -> Result<()> {
    let o = mcpq(&["demo", "--tasks", "900", "--json"]).await?;
    ensure!(o.code == 0, "demo failed: {}\n{}", o.stdout, o.stderr);
    let s = json(&o)?;
    let n = |k: &str| s[k].as_u64().unwrap_or(u64::MAX);
    ensure!(n("tasks") == 900 && n("lost") == 0 && n("unfinished") == 0, "{s}");
    ensure!(n("succeeded") + n("failed") + n("dead") + n("review") == 900, "{s}");
    // the killed server's calls were cut: their tasks were moved, or parked for review when
    // repeating them would be unsafe
    ensure!(
        n("redistributed") > 0 || n("review") > 0,
        "nothing was in flight on the killed server: {s}"
    );
    let distinct = n("executions") - n("duplicates");
    ensure!(
        (n("succeeded")..=900).contains(&distinct),
        "every succeeded task executed, none counted twice: {s}"
    );
    ensure!(n("duplicates_non_idempotent") == 0, "a task not idempotent ran twice: {s}");
    let servers = s["per_server"].as_object().context("per_server")?;
    ensure!(servers.len() == 3 && servers.values().all(|v| v.as_u64() > Some(0)), "{s}");
    ensure!(n("p99_ms") >= n("p50_ms"), "{s}");
    Ok(())
}

#[tokio::test]
async fn serve_defaults_to_the_embedded_store_and_keeps_tasks_across_restarts() -> Result<()> {
    keeps_tasks_across_restarts("").await
}

#[tokio::test]
async fn serve_syncs_what_is_left_when_stopped_with_sync_ms_set() -> Result<()> {
    // a window no test outlasts: only the syncs of a clean stop (the replica's own, and the
    // database's close) keep the tasks
    keeps_tasks_across_restarts("sync_ms = 60000\n").await
}

/// Runs a task and schedules one on a replica with the embedded store (`store` adds keys to its
/// section), stops it with SIGTERM, and finds both as they were after a restart.
async fn keeps_tasks_across_restarts(store: &str) -> Result<()> {
    use mcpq_tests::fleet::Node;
    let mcp = McpServer::start(Mode::Stateless).await?;
    let dir = tempfile::tempdir()?;
    let toml = format!(
        "[store]\npath = \"{}\"\n{store}[[servers]]\nname = \"a\"\nurl = \"{}\"\n",
        dir.path().join("data").display(),
        mcp.url()
    );
    let mut node = Node::start(BIN, &toml)?;
    let api = node.api().to_owned();
    let o = mcpq(&[
        "enqueue",
        "--api",
        &api,
        "--tool",
        "echo",
        "--args",
        r#"{"text":"kept"}"#,
        "--wait",
        "--json",
    ])
    .await?;
    let done = json(&o)?;
    ensure!(done["state"] == "succeeded", "{done}");
    let o = mcpq(&["enqueue", "--api", &api, "--tool", "echo", "--delay-ms", "3600000", "--json"])
        .await?;
    let later = json(&o)?;
    // a second replica on the same directory is refused, naming the key
    let second = Node::start(BIN, &toml);
    let refused = match second {
        Err(e) => format!("{e:#}"),
        Ok(_) => String::new(),
    };
    ensure!(refused.contains("store.path"), "a second process opened the store: {refused}");
    ensure!(node.terminate(Duration::from_secs(20)).await?, "the replica did not stop on SIGTERM");
    let node = Node::start(BIN, &toml)?;
    for (task, state) in [(&done, "succeeded"), (&later, "scheduled")] {
        let id = task["id"].as_str().context("id")?;
        let o = mcpq(&["task", id, "--api", node.api(), "--json"]).await?;
        let t = json(&o)?;
        ensure!(t["state"] == state, "after the restart: {t}");
    }
    ensure!(node.log().contains("embedded"), "the log names the store");
    Ok(())
}
