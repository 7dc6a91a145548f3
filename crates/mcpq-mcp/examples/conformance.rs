//! A client for the official MCP conformance suite (client mode), built on [`McpClient`]:
//! `conformance <server-url>` with `MCP_CONFORMANCE_SCENARIO`, `MCP_CONFORMANCE_PROTOCOL_VERSION`
//! and, for some scenarios, `MCP_CONFORMANCE_CONTEXT` set by the suite. It pins the revision,
//! exercises what the scenario serves and exits non-zero on anything but executed answers.
//! Protocol behaviour lives in the library; only the choice of calls is per scenario here.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use mcpq_mcp::{CallMeta, McpClient, Outcome, ServerConfig, TransportChoice};
use serde_json::{Map, Value, json};

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("conformance client: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    let url = std::env::args().nth(1).context("usage: conformance <server-url>")?;
    let scenario = std::env::var("MCP_CONFORMANCE_SCENARIO").unwrap_or_default();
    let version = std::env::var("MCP_CONFORMANCE_PROTOCOL_VERSION").ok();
    let context: Value = match std::env::var("MCP_CONFORMANCE_CONTEXT") {
        Ok(text) => serde_json::from_str(&text).context("MCP_CONFORMANCE_CONTEXT is not JSON")?,
        Err(_) => Value::Null,
    };
    let mut cfg = ServerConfig::new("conformance", url);
    cfg.transport = TransportChoice::StreamableHttp;
    // 2026-07-28 pins the stateless era; a dated revision opens a session with `initialize`
    cfg.protocol_version = version;
    cfg.timeouts.request_ms = 20_000;
    cfg.validate("server")?;
    let client = McpClient::new(cfg)?;
    eprintln!("scenario {scenario:?}, era pinned to {:?}", client.config().protocol_version);

    let tools = executed("tools/list", client.list_tools().await)?;
    eprintln!("{} usable tools", tools.len());
    match scenario.as_str() {
        // listing is the whole exercise: the handshake, or a schema with a network $ref
        "initialize" | "json-schema-ref-no-deref" => {}
        // the suite names the calls and their arguments
        "http-custom-headers" => {
            let calls = context["toolCalls"].as_array().context("no toolCalls in the context")?;
            for call in calls {
                let name = call["name"].as_str().context("a toolCall without a name")?;
                call_tool(&client, name, call["arguments"].clone()).await?;
            }
        }
        "http-standard-headers" => {
            call_every_tool(&client, &tools).await?;
            for resource in executed("resources/list", client.list_resources().await)? {
                let uri = resource["uri"].as_str().context("a resource without a uri")?;
                executed("resources/read", client.read_resource(uri, &CallMeta::default()).await)?;
            }
            for prompt in executed("prompts/list", client.list_prompts().await)? {
                let name = prompt["name"].as_str().context("a prompt without a name")?;
                let args = prompt_arguments(&prompt);
                let got = client.get_prompt(name, args, &CallMeta::default()).await;
                executed("prompts/get", got)?;
            }
        }
        _ => call_every_tool(&client, &tools).await?,
    }
    Ok(())
}

async fn call_every_tool(client: &McpClient, tools: &[Value]) -> Result<()> {
    for tool in tools {
        let name = tool["name"].as_str().context("a tool without a name")?;
        let schema = &tool["inputSchema"];
        call_tool(client, name, arguments_for(schema, schema, 0)).await?;
    }
    Ok(())
}

async fn call_tool(client: &McpClient, name: &str, arguments: Value) -> Result<()> {
    eprintln!("calling {name} with {arguments}");
    let result =
        executed("tools/call", client.call_tool(name, arguments, &CallMeta::default()).await)?;
    eprintln!("{name} answered {result}");
    if result["isError"] == true {
        bail!("tool {name} answered with an error: {result}");
    }
    Ok(())
}

fn executed<T>(what: &str, outcome: Outcome<T>) -> Result<T>
where
    T: std::fmt::Debug,
{
    match outcome {
        Outcome::Executed(Ok(v)) => Ok(v),
        Outcome::Executed(Err(e)) => bail!("{what} answered a JSON-RPC error: {e}"),
        other => bail!("{what}: {other:?}"),
    }
}

/// Arguments that satisfy `schema` as far as a test needs: every required property, from its
/// `const`, `default`, first `enum` member or type. Only same-document `$ref`s are followed.
fn arguments_for(schema: &Value, root: &Value, depth: usize) -> Value {
    if depth > 16 {
        return Value::Null;
    }
    if let Some(pointer) = schema["$ref"].as_str() {
        return match pointer.strip_prefix('#').and_then(|p| root.pointer(p)) {
            Some(target) => arguments_for(target, root, depth + 1),
            None => json!("test"),
        };
    }
    for keyword in ["const", "default"] {
        if let Some(v) = schema.get(keyword) {
            return v.clone();
        }
    }
    if let Some(first) = schema["enum"].as_array().and_then(|e| e.first()) {
        return first.clone();
    }
    let ty = match &schema["type"] {
        Value::String(t) => t.as_str(),
        Value::Array(ts) => {
            ts.iter().filter_map(Value::as_str).find(|t| *t != "null").unwrap_or("null")
        }
        _ if schema.get("properties").is_some() => "object",
        _ => "string",
    };
    match ty {
        "object" => {
            let mut args = Map::new();
            for name in
                schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str)
            {
                let property = &schema["properties"][name];
                args.insert(name.to_owned(), arguments_for(property, root, depth + 1));
            }
            Value::Object(args)
        }
        "integer" | "number" => json!(1),
        "boolean" => json!(true),
        "array" => json!([]),
        "null" => Value::Null,
        _ => json!("test"),
    }
}

/// A value for every required argument of a `prompts/list` entry.
fn prompt_arguments(prompt: &Value) -> Value {
    let args: Map<String, Value> = prompt["arguments"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["required"] == true)
        .filter_map(|a| a["name"].as_str().map(|n| (n.to_owned(), json!("test"))))
        .collect();
    Value::Object(args)
}
