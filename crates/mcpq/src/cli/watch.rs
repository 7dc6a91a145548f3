//! `mcpq watch`: a queue's events, live, over the API's SSE endpoint. eventsource-client
//! reconnects with backoff and sends `Last-Event-ID`, so a dropped connection or a restarted
//! replica costs no event that is still retained.

use std::time::Duration;

use anyhow::{Result, anyhow};
use eventsource_client::{Client as _, ClientBuilder, ReconnectOptions, SSE};
use futures_util::StreamExt;
use mcpq_mcp::ReqwestTransport;
use serde_json::Value;

use super::client::{Api, enc};
use super::out;
use crate::api::OPEN_EVENT;
use crate::api::wire::ErrorBody;

pub(super) async fn run(
    api: &Api,
    queue: &str,
    from_beginning: bool,
    after: Option<String>,
    count: Option<u64>,
    json: bool,
) -> Result<()> {
    let mut url = format!("{}/v1/events?queue={}", api.base(), enc(queue));
    if from_beginning {
        url.push_str("&from=beginning");
    }
    let mut builder =
        ClientBuilder::for_url(&url).map_err(|e| anyhow!("--api: cannot watch {url}: {e}"))?;
    if let Some(t) = api.token() {
        builder = builder
            .header("Authorization", &format!("Bearer {t}"))
            .map_err(|e| anyhow!("--token: {e}"))?;
    }
    if let Some(id) = after {
        builder = builder.last_event_id(id);
    }
    let reconnect = ReconnectOptions::reconnect(true)
        .retry_initial(true)
        .delay(Duration::from_millis(250))
        .backoff_factor(2)
        .delay_max(Duration::from_secs(10))
        .build();
    let client = builder
        .reconnect(reconnect)
        .build_with_transport(ReqwestTransport::new(api.http().clone()));
    let mut stream = client.stream();
    let mut seen = 0u64;
    let mut warned = false;
    while let Some(item) = stream.next().await {
        match item {
            // where the stream starts: it gives the client an id to resume from, nothing to show
            Ok(SSE::Event(ev)) if ev.event_type == OPEN_EVENT => warned = false,
            Ok(SSE::Event(ev)) => {
                warned = false;
                if json {
                    out(&ev.data);
                } else {
                    out(line(&ev.event_type, ev.id.as_deref(), &ev.data));
                }
                seen += 1;
                if count.is_some_and(|c| seen >= c) {
                    return Ok(());
                }
            }
            Ok(SSE::Connected(_)) => {
                if warned {
                    eprintln!("mcpq: reconnected to {}", api.base());
                    warned = false;
                }
            }
            Ok(SSE::Comment(_)) => {}
            Err(eventsource_client::Error::UnexpectedResponse(resp, body))
                if (400..500).contains(&resp.status()) =>
            {
                let status = resp.status();
                // the API names the field at fault; main maps it to the flag that set it
                let mut bytes = Vec::new();
                let mut body = body.into_stream();
                while let Some(Ok(chunk)) = body.next().await {
                    bytes.extend_from_slice(&chunk);
                    if bytes.len() > 64 * 1024 {
                        break;
                    }
                }
                return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                    Ok(ErrorBody { error }) => match error.field {
                        Some(f) => anyhow!("{f}: {} (HTTP {status})", error.message),
                        None => anyhow!("{} (HTTP {status})", error.message),
                    },
                    Err(_) => anyhow!("{url} answered HTTP {status}"),
                });
            }
            Err(e) => {
                if !warned {
                    eprintln!("mcpq: event stream interrupted ({e}); reconnecting…");
                    warned = true;
                }
            }
        }
    }
    Ok(())
}

/// One event for people: `time kind task server attempt error`.
fn line(kind: &str, id: Option<&str>, data: &str) -> String {
    let v: Value = serde_json::from_str(data).unwrap_or(Value::Null);
    let field = |k: &str| v.get(k).map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned));
    let mut out = format!("{:<17} {kind:<17}", id.unwrap_or("-"));
    for (k, label) in
        [("task", ""), ("server", "server="), ("attempt", "attempt="), ("error", "error=")]
    {
        if let Some(x) = field(k) {
            out.push_str(&format!(" {label}{x}"));
        }
    }
    out
}
