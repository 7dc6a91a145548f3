//! `GET /metrics`: Prometheus text exposition (format 0.0.4). Task counts come from the store
//! at scrape time (so every replica reports the shared queue); counters, histograms and server
//! health are this replica's own, labelled by the fleet's node name.

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use mcpq_fleet::{HistogramSnapshot, LATENCY_BUCKETS};
use mcpq_queue::{Store, TaskState};

use super::tasks::{Params, QueryResult};
use super::wire::health_name;
use super::{ApiError, ApiState};

pub(super) async fn render<S: Store>(
    State(st): State<ApiState<S>>,
    q: QueryResult,
) -> Result<impl IntoResponse, ApiError> {
    Params::parse(q, &[])?;
    let mut out = String::with_capacity(4096);
    family(&mut out, "mcpq_tasks", "gauge", "Tasks by queue and state.");
    let mut paused = Vec::new();
    for q in st.queues.iter() {
        let s = st.store.stats(q).await?;
        for state in TaskState::ALL {
            let labels = [("queue", q.as_str()), ("state", state.as_str())];
            sample(&mut out, "mcpq_tasks", &labels, s.count(state) as f64);
        }
        paused.push((q.as_str(), s.paused));
    }
    family(&mut out, "mcpq_queue_paused", "gauge", "1 while claims from the queue are paused.");
    for (q, p) in paused {
        sample(&mut out, "mcpq_queue_paused", &[("queue", q)], f64::from(u8::from(p)));
    }
    if let Some(fleet) = &st.fleet {
        let node = fleet.node();
        let servers = fleet.servers();
        family(&mut out, "mcpq_server_health", "gauge", "1 for the server's current health state.");
        for s in &servers {
            for h in ["online", "degraded", "offline"] {
                let v = f64::from(u8::from(health_name(s.health) == h));
                sample(&mut out, "mcpq_server_health", &[("server", &s.name), ("state", h)], v);
            }
        }
        family(
            &mut out,
            "mcpq_server_available",
            "gauge",
            "0 while the breaker is open or the server asked to wait.",
        );
        for s in &servers {
            let v = f64::from(u8::from(s.available && s.client_running));
            sample(&mut out, "mcpq_server_available", &[("server", &s.name)], v);
        }
        family(&mut out, "mcpq_server_in_flight", "gauge", "Calls in flight from this replica.");
        for s in &servers {
            sample(
                &mut out,
                "mcpq_server_in_flight",
                &[("server", &s.name)],
                f64::from(s.in_flight),
            );
        }
        let c = fleet.stats();
        for (name, help, v) in [
            ("mcpq_claimed_total", "Tasks claimed.", c.claimed),
            ("mcpq_dispatched_total", "Tasks handed to a server.", c.dispatched),
            ("mcpq_succeeded_total", "Tasks that succeeded.", c.succeeded),
            ("mcpq_failed_total", "Tasks failed for good.", c.failed),
            ("mcpq_retries_total", "Failed attempts that will be retried.", c.retried),
            ("mcpq_released_total", "Tasks handed back without spending an attempt.", c.released),
            ("mcpq_review_total", "Tasks parked for a person (outcome unknown).", c.review),
            ("mcpq_dead_total", "Tasks dead after their last attempt.", c.dead),
            (
                "mcpq_duplicates_total",
                "Results refused because another claim held the task (the attempt ran twice).",
                c.fenced,
            ),
            (
                "mcpq_redistributed_total",
                "In-flight tasks handed back when their server went offline.",
                c.redistributed,
            ),
            (
                "mcpq_expired_total",
                "Tasks failed because no attempt could start before they expired.",
                c.expired,
            ),
            ("mcpq_restarts_total", "Actor restarts.", c.restarts),
        ] {
            family(&mut out, name, "counter", help);
            sample(&mut out, name, &[("node", node)], v as f64);
        }
        let (latency, attempt) = fleet.latencies();
        histogram(
            &mut out,
            "mcpq_task_latency_seconds",
            "Creation to finish of the tasks this replica finished.",
            node,
            &latency,
        );
        histogram(
            &mut out,
            "mcpq_attempt_seconds",
            "Claim to recorded outcome of each attempt.",
            node,
            &attempt,
        );
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out))
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    // writing to a String cannot fail
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], v: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, val)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape(val));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {v}");
}

fn histogram(out: &mut String, name: &str, help: &str, node: &str, h: &HistogramSnapshot) {
    family(out, name, "histogram", help);
    let bucket = format!("{name}_bucket");
    for (i, n) in h.cumulative.iter().enumerate() {
        let le = LATENCY_BUCKETS.get(i).map_or("+Inf".to_owned(), |b| b.to_string());
        sample(out, &bucket, &[("node", node), ("le", &le)], *n as f64);
    }
    sample(out, &format!("{name}_sum"), &[("node", node)], h.sum_seconds);
    sample(out, &format!("{name}_count"), &[("node", node)], h.count as f64);
}

/// Escapes a label value: backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_escape_label_values() {
        let mut out = String::new();
        sample(&mut out, "m", &[("a", "x\"y\\z\nw")], 1.5);
        assert_eq!(out, "m{a=\"x\\\"y\\\\z\\nw\"} 1.5\n");
    }
}
