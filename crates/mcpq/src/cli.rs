//! The `mcpq` command line: `serve` and `demo` run mcpq here; the other commands talk to a
//! running `mcpq serve` over its HTTP API (`--api`, `--token`), printing tables for people and
//! JSON with `--json`. Errors name the flag or field at fault; exit code 1 on failure, 2 on
//! bad usage.

mod client;
mod watch;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, anyhow};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde_json::Value;

use crate::api::wire::{CallSpec, QueueView, ServerView, TaskPage, TaskRequest, TaskView};
use crate::config::Config;
use client::{Api, enc};

#[derive(Debug, Parser)]
#[command(name = "mcpq", version, about = "A prioritized, durable work queue over MCP servers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How to reach a running `mcpq serve`.
#[derive(Debug, Args)]
struct Remote {
    /// Base URL of the mcpq API.
    #[arg(long, env = "MCPQ_API", default_value = "http://127.0.0.1:7600")]
    api: String,
    /// Bearer token (one of the server's api.tokens).
    #[arg(long, env = "MCPQ_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one replica: claim tasks and dispatch them to the configured MCP servers, and serve
    /// the HTTP API.
    Serve {
        /// The configuration file (TOML); `MCPQ_*` variables override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// This replica's name (overrides `node`).
        #[arg(long)]
        node: Option<String>,
    },
    /// Run the whole system here with nothing to set up: embedded store, three MCP servers,
    /// a burst of tasks, one server killed mid-run; ends with a summary.
    Demo(crate::demo::DemoArgs),
    /// Measure mcpq end to end on this machine: drain, steady rates, the ceiling of the MCP
    /// servers, cost per task, and scale with queue depth (run a release build).
    Bench(crate::bench::BenchArgs),
    /// The echo servers `mcpq bench` runs in a child process.
    #[command(hide = true)]
    BenchEcho {
        /// How many servers.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=8))]
        servers: u8,
    },
    /// Enqueue one task.
    Enqueue {
        #[command(flatten)]
        task: EnqueueArgs,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show one task.
    Task {
        /// The task id.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// List tasks in one state.
    Tasks {
        /// queued, scheduled, running, succeeded, failed, dead, review, cancelled.
        #[arg(long, default_value = "queued")]
        state: String,
        /// The queue.
        #[arg(long, default_value = "default")]
        queue: String,
        /// Most tasks to show (1 to 1000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=1000))]
        limit: u16,
        /// Where to start (the `next` value printed by the previous page).
        #[arg(long)]
        cursor: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Cancel a task that has not finished.
    Cancel {
        /// The task id.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Send a review, dead, failed or cancelled task back to the queue.
    Retry {
        /// The task id.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Follow a queue's events live (reconnects and resumes where it left off).
    Watch {
        /// The queue.
        #[arg(long, default_value = "default")]
        queue: String,
        /// Start with the oldest retained event instead of new ones.
        #[arg(long, conflicts_with = "after")]
        from_beginning: bool,
        /// Resume after this event id.
        #[arg(long)]
        after: Option<String>,
        /// Stop after this many events.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
        #[command(flatten)]
        remote: Remote,
    },
    /// The servers of the replica behind --api, with their health.
    Servers {
        #[command(flatten)]
        remote: Remote,
    },
    /// Task counts per queue and state.
    Stats {
        /// One queue (default: every queue).
        queue: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Args)]
struct EnqueueArgs {
    /// Call this tool (tools/call).
    #[arg(long, group = "target", required_unless_present_any = ["resource", "prompt"])]
    tool: Option<String>,
    /// Read this resource URI (resources/read).
    #[arg(long, group = "target", conflicts_with = "args")]
    resource: Option<String>,
    /// Get this prompt (prompts/get).
    #[arg(long, group = "target")]
    prompt: Option<String>,
    /// Arguments as a JSON object, e.g. '{"text": "hi"}'.
    #[arg(long, value_parser = parse_json_object)]
    args: Option<Value>,
    /// Higher runs first.
    #[arg(long, allow_negative_numbers = true)]
    priority: Option<i32>,
    /// The queue.
    #[arg(long)]
    queue: Option<String>,
    /// Run only on this server.
    #[arg(long)]
    server: Option<String>,
    /// Run on a server with this tag (repeat for any of several).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Attempts before the task is dead.
    #[arg(long)]
    max_attempts: Option<u16>,
    /// Limit for one attempt, ms.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Wait this long before the first attempt, ms.
    #[arg(long)]
    delay_ms: Option<u64>,
    /// Safe to run twice.
    #[arg(long)]
    idempotent: bool,
    /// Deduplicate: the same key and body give back the first task.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Wait until the task finishes and print it.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this many seconds (the task keeps going).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    wait_timeout: u64,
}

fn parse_json_object(s: &str) -> Result<Value, String> {
    let v: Value = serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))?;
    if !v.is_object() {
        return Err("must be a JSON object, e.g. '{\"text\": \"hi\"}'".to_owned());
    }
    Ok(v)
}

/// Parses the arguments, runs the command, and maps failure to exit code 1 (2 for usage).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.command);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mcpq: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcpq: {:#}", flag_names(e));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve { config, node } => {
            let env = config_env()?;
            let mut cfg = Config::load(config.as_deref(), &env)?;
            if let Some(node) = node {
                cfg.node = node;
                cfg.validate()?;
            }
            let addr = cfg.api.addr()?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow!("api.listen: cannot listen on {addr}: {e}"))?;
            crate::serve::run(cfg, listener, crate::serve::shutdown_signal()).await?;
            Ok(())
        }
        Command::Demo(args) => crate::demo::run(args).await,
        Command::Bench(args) => crate::bench::run(args).await,
        Command::BenchEcho { servers } => crate::bench::echo_child(servers.into()).await,
        Command::Enqueue { task, remote } => enqueue(task, remote).await,
        Command::Task { id, remote } => {
            let api = Api::new(&remote.api, remote.token.clone())?;
            let t: TaskView = api.get(&format!("/v1/tasks/{}", enc(&id))).await?;
            print_task(&t, remote.json)
        }
        Command::Tasks { state, queue, limit, cursor, remote } => {
            let api = Api::new(&remote.api, remote.token.clone())?;
            let mut path =
                format!("/v1/tasks?queue={}&state={}&limit={limit}", enc(&queue), enc(&state));
            if let Some(c) = cursor {
                path.push_str(&format!("&cursor={}", enc(&c)));
            }
            let page: TaskPage = api.get(&path).await?;
            if remote.json {
                return print_json(&page);
            }
            let rows = page.tasks.iter().map(|t| {
                vec![
                    t.id.clone(),
                    t.state.clone(),
                    t.priority.to_string(),
                    format!("{}/{}", t.attempt, t.max_attempts),
                    target(&t.call),
                    t.server.clone().unwrap_or_default(),
                    t.created_at.clone(),
                ]
            });
            table(&["ID", "STATE", "PRIO", "ATTEMPT", "CALL", "SERVER", "CREATED"], rows);
            if let Some(next) = page.next_cursor {
                out(format_args!("next: --cursor {next}"));
            }
            Ok(())
        }
        Command::Cancel { id, remote } => task_action(&remote, Method::DELETE, &id, "").await,
        Command::Retry { id, remote } => task_action(&remote, Method::POST, &id, "/retry").await,
        Command::Watch { queue, from_beginning, after, count, remote } => {
            let api = Api::new(&remote.api, remote.token.clone())?;
            watch::run(&api, &queue, from_beginning, after, count, remote.json).await
        }
        Command::Servers { remote } => {
            let api = Api::new(&remote.api, remote.token.clone())?;
            let servers: Vec<ServerView> = api.get("/v1/servers").await?;
            if remote.json {
                return print_json(&servers);
            }
            let rows = servers.iter().map(|s| {
                vec![
                    s.name.clone(),
                    s.health.clone(),
                    if s.available { "yes" } else { "no" }.to_owned(),
                    format!("{}/{}", s.in_flight, s.max_concurrency),
                    s.era.clone().unwrap_or_else(|| "-".to_owned()),
                    s.tools.as_ref().map_or("-".to_owned(), |t| t.len().to_string()),
                    s.url.clone(),
                ]
            });
            table(&["NAME", "HEALTH", "AVAILABLE", "IN FLIGHT", "ERA", "TOOLS", "URL"], rows);
            Ok(())
        }
        Command::Stats { queue, remote } => {
            let api = Api::new(&remote.api, remote.token.clone())?;
            let views: Vec<QueueView> = match queue {
                Some(q) => vec![api.get(&format!("/v1/queues/{}", enc(&q))).await?],
                None => api.get("/v1/queues").await?,
            };
            if remote.json {
                return print_json(&views);
            }
            let states = [
                "queued",
                "scheduled",
                "running",
                "succeeded",
                "failed",
                "dead",
                "review",
                "cancelled",
            ];
            let rows = views.iter().map(|v| {
                let mut row = vec![v.queue.clone()];
                row.extend(
                    states.iter().map(|s| v.counts.get(*s).copied().unwrap_or(0).to_string()),
                );
                row.push(if v.paused { "paused" } else { "" }.to_owned());
                row
            });
            let upper: Vec<String> = states.iter().map(|s| s.to_uppercase()).collect();
            let mut head = vec!["QUEUE"];
            head.extend(upper.iter().map(String::as_str));
            head.push("");
            table(&head, rows);
            Ok(())
        }
    }
}

/// The `MCPQ_*` variables, as text; one that is not UTF-8 is an error naming it.
fn config_env() -> Result<HashMap<String, String>> {
    let mut env = HashMap::new();
    for (k, v) in std::env::vars_os() {
        let Some(k) = k.to_str().filter(|k| k.starts_with("MCPQ_")) else { continue };
        let v = v.into_string().map_err(|_| anyhow!("{k}: the value is not UTF-8"))?;
        env.insert(k.to_owned(), v);
    }
    Ok(env)
}

async fn enqueue(a: EnqueueArgs, remote: Remote) -> Result<()> {
    let api = Api::new(&remote.api, remote.token.clone())?;
    let req = TaskRequest {
        queue: a.queue,
        call: CallSpec { tool: a.tool, resource: a.resource, prompt: a.prompt, arguments: a.args },
        priority: a.priority,
        server: a.server,
        tags: (!a.tags.is_empty()).then_some(a.tags),
        max_attempts: a.max_attempts,
        timeout_ms: a.timeout_ms,
        idempotent: a.idempotent.then_some(true),
        delay_ms: a.delay_ms,
        ..TaskRequest::default()
    };
    let mut headers = Vec::new();
    if let Some(k) = &a.idempotency_key {
        headers.push(("Idempotency-Key", k.as_str()));
    }
    let (_, mut task): (_, TaskView) =
        api.send(Method::POST, "/v1/tasks", Some(&req), &headers).await?;
    if a.wait {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(a.wait_timeout);
        while !task.is_terminal() {
            bar.set_message(format!("task {} is {}", task.id, task.state));
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                bar.finish_and_clear();
                print_task(&task, remote.json)?;
                return Err(anyhow!(
                    "--wait-timeout: the task is still {} after {} s; it keeps going (mcpq task {})",
                    task.state,
                    a.wait_timeout,
                    task.id
                ));
            }
            let ms = left.as_millis().min(30_000);
            task = api
                .get(&format!(
                    "/v1/tasks/{}/wait?queue={}&timeout_ms={ms}",
                    task.id,
                    enc(&task.queue)
                ))
                .await?;
        }
        bar.finish_and_clear();
    }
    print_task(&task, remote.json)
}

/// Renames the API field an error starts with to the flag that set it.
fn flag_names(e: anyhow::Error) -> anyhow::Error {
    let msg = format!("{e:#}");
    for (field, flag) in [
        ("call.tool", "--tool"),
        ("call.resource", "--resource"),
        ("call.prompt", "--prompt"),
        ("call.arguments", "--args"),
        ("max_attempts", "--max-attempts"),
        ("timeout_ms", "--timeout-ms"),
        ("delay_ms", "--delay-ms"),
        ("Idempotency-Key", "--idempotency-key"),
        ("tags", "--tag"),
        ("server", "--server"),
        ("queue", "--queue"),
        ("priority", "--priority"),
        ("state", "--state"),
        ("limit", "--limit"),
        ("cursor", "--cursor"),
        ("after", "--after"),
        ("Last-Event-ID", "--after"),
        ("Authorization", "--token"),
    ] {
        if let Some(rest) = msg.strip_prefix(&format!("{field}:")) {
            return anyhow!("{flag}:{rest}");
        }
    }
    e
}

async fn task_action(remote: &Remote, method: Method, id: &str, suffix: &str) -> Result<()> {
    let api = Api::new(&remote.api, remote.token.clone())?;
    let path = format!("/v1/tasks/{}{suffix}", enc(id));
    let (_, t): (_, TaskView) = api.send::<(), _>(method, &path, None, &[]).await?;
    print_task(&t, remote.json)
}

fn target(c: &CallSpec) -> String {
    match (&c.tool, &c.resource, &c.prompt) {
        (Some(t), _, _) => format!("tool {t}"),
        (_, Some(r), _) => format!("resource {r}"),
        (_, _, Some(p)) => format!("prompt {p}"),
        _ => "-".to_owned(),
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    out(serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_task(t: &TaskView, json: bool) -> Result<()> {
    if json {
        return print_json(t);
    }
    let mut rows = vec![
        ("id", t.id.clone()),
        ("queue", t.queue.clone()),
        ("state", t.state.clone()),
        ("priority", t.priority.to_string()),
        ("attempt", format!("{}/{}", t.attempt, t.max_attempts)),
        ("call", target(&t.call)),
        ("created", t.created_at.clone()),
    ];
    if let Some(a) = &t.call.arguments {
        rows.push(("arguments", a.to_string()));
    }
    for (k, v) in [
        ("server", &t.server),
        ("started", &t.started_at),
        ("finished", &t.finished_at),
        ("error", &t.error),
    ] {
        if let Some(v) = v {
            rows.push((k, v.clone()));
        }
    }
    if let Some(r) = &t.result {
        rows.push(("result", r.to_string()));
    }
    for (k, v) in rows {
        out(format_args!("{k:<10} {v}"));
    }
    Ok(())
}

/// Prints rows under a header, columns padded to their widest cell.
fn table(head: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out(s.join("  ").trim_end());
    };
    line(head.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// Prints a line on stdout. A closed pipe (`mcpq watch | head -1`) ends the program quietly:
/// nobody reads what would come next.
pub(crate) fn out(line: impl std::fmt::Display) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{line}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("mcpq: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

fn init_tracing(cmd: &Command) {
    // serve logs at info; the demo draws progress bars that log lines would break up, and
    // its killed server makes rmcp log errors that are the point of the exercise
    let default = match cmd {
        Command::Serve { .. } => "info",
        Command::Demo(_) | Command::BenchEcho { .. } => "error,rmcp=off",
        Command::Bench(_) => "warn,rmcp=off",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MCPQ_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
