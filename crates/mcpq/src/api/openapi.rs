//! `GET /v1/openapi.json`: the API described as OpenAPI 3.1. Tests hold the document, the route
//! list and the router to each other.

use std::sync::LazyLock;

use axum::Json;
use serde_json::{Value, json};

/// Every path the router serves, with its methods; a test holds the document to it, another
/// sends each to the router.
pub(super) const ROUTES: &[(&str, &[&str])] = &[
    ("/v1/tasks", &["post", "get"]),
    ("/v1/tasks/batch", &["post"]),
    ("/v1/tasks/{id}", &["get", "delete"]),
    ("/v1/tasks/{id}/wait", &["get"]),
    ("/v1/tasks/{id}/retry", &["post"]),
    ("/v1/queues", &["get"]),
    ("/v1/queues/{queue}", &["get"]),
    ("/v1/queues/{queue}/pause", &["post"]),
    ("/v1/queues/{queue}/resume", &["post"]),
    ("/v1/servers", &["get", "post"]),
    ("/v1/servers/{name}", &["delete"]),
    ("/v1/events", &["get"]),
    ("/metrics", &["get"]),
    ("/healthz", &["get"]),
    ("/readyz", &["get"]),
    ("/v1/openapi.json", &["get"]),
];

static DOCUMENT: LazyLock<Value> = LazyLock::new(build);

pub(super) async fn document() -> Json<Value> {
    Json(DOCUMENT.clone())
}

fn op(summary: &str, ok: &str, schema: Value, params: Value, body: Option<&str>) -> Value {
    let mut o = json!({
        "summary": summary,
        "parameters": params,
        "responses": {
            ok: { "description": "OK", "content": { "application/json": { "schema": schema } } },
            "401": { "description": "No valid bearer token (when api.tokens is set)" },
            "4XX": { "description": "Bad input; the body names the field",
                     "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } },
            "503": { "description": "Store or fleet unavailable; retry" }
        }
    });
    if let Some(b) = body {
        o["requestBody"] = json!({ "required": true,
            "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{b}") } } } });
    }
    o
}

fn q(name: &str, desc: &str, kind: &str) -> Value {
    json!({ "name": name, "in": "query", "required": false, "description": desc, "schema": { "type": kind } })
}

fn p(name: &str, desc: &str) -> Value {
    json!({ "name": name, "in": "path", "required": true, "description": desc, "schema": { "type": "string" } })
}

fn r(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn build() -> Value {
    let queue_q =
        q("queue", "queue name (default: default; for a task: searched in every queue)", "string");
    let id = p("id", "task id (UUID v7)");
    let mut task_paths = json!({
        "/v1/tasks": {
            "post": op("Enqueue a task (Idempotency-Key header honoured: same body → 200 with the same task, different body → 422)",
                "201", r("Task"),
                json!([{ "name": "Idempotency-Key", "in": "header", "required": false, "schema": { "type": "string" } }]),
                Some("TaskRequest")),
            "get": op("List tasks in one state, a page at a time", "200", r("TaskPage"),
                json!([queue_q, q("state", "queued (default), scheduled, running, succeeded, failed, dead, review, cancelled", "string"),
                       q("limit", "1..=1000, default 50", "integer"), q("cursor", "next_cursor of the previous page", "string")]), None)
        },
        "/v1/tasks/batch": {
            "post": op("Enqueue several tasks; all are checked before any is stored, then stored queue by queue in order (after a 503 some may be stored: give each an idempotency_key to retry safely)", "201", r("Batch"), json!([]), Some("BatchRequest"))
        },
        "/v1/tasks/{id}": {
            "get": op("One task", "200", r("Task"), json!([id, queue_q]), None),
            "delete": op("Cancel a task that has not finished (409 if it has)", "200", r("Task"), json!([id, queue_q]), None)
        },
        "/v1/tasks/{id}/wait": {
            "get": op("Wait until the task is terminal, or answer it as it is at the timeout", "200", r("Task"),
                json!([id, queue_q, q("timeout_ms", "0..=600000, default 30000", "integer")]), None)
        },
        "/v1/tasks/{id}/retry": {
            "post": op("Send a review, dead, failed or cancelled task back to the queue with fresh attempts", "200", r("Task"), json!([id, queue_q]), None)
        },
        "/v1/queues": { "get": op("Every queue with its counts", "200", json!({ "type": "array", "items": r("Queue") }), json!([]), None) },
        "/v1/queues/{queue}": { "get": op("Counts per state and whether claims are paused", "200", r("Queue"), json!([p("queue", "queue name")]), None) },
        "/v1/queues/{queue}/pause": { "post": op("Pause claims", "200", r("Queue"), json!([p("queue", "queue name")]), None) },
        "/v1/queues/{queue}/resume": { "post": op("Resume claims", "200", r("Queue"), json!([p("queue", "queue name")]), None) },
        "/v1/servers": {
            "get": op("This replica's servers with their health", "200", json!({ "type": "array", "items": r("Server") }), json!([]), None),
            "post": op("Add a server to this replica (the keys of a [[servers]] entry)", "201", r("Server"), json!([]), Some("ServerConfig"))
        },
        "/v1/servers/{name}": {
            "delete": { "summary": "Remove a server; its in-flight tasks go to others", "parameters": [p("name", "server name")],
                        "responses": { "204": { "description": "Removed" }, "404": { "description": "No such server" } } }
        },
        "/v1/events": {
            "get": { "summary": "The queue's events as Server-Sent Events: event = kind (task.succeeded, server.offline, …), id = stream position; reconnect with Last-Event-ID to resume",
                     "parameters": [queue_q, q("from", "now (default) or beginning", "string"), q("after", "resume after this event id", "string"),
                                    { "name": "Last-Event-ID", "in": "header", "required": false, "schema": { "type": "string" } }],
                     "responses": { "200": { "description": "text/event-stream; data is an Event", "content": { "text/event-stream": { "schema": r("Event") } } } } }
        },
        "/metrics": { "get": { "summary": "Prometheus metrics", "responses": { "200": { "description": "text/plain; version=0.0.4" } } } },
        "/healthz": { "get": { "summary": "The process is up", "security": [], "responses": { "200": { "description": "ok" } } } },
        "/readyz": { "get": { "summary": "The store answers", "security": [], "responses": { "200": { "description": "ready" }, "503": { "description": "not ready" } } } },
        "/v1/openapi.json": { "get": { "summary": "This document", "security": [], "responses": { "200": { "description": "OpenAPI 3.1" } } } }
    });
    task_paths["/v1/tasks"]["post"]["responses"]["200"] = json!({
        "description": "The Idempotency-Key was seen with the same body: the first task",
        "content": { "application/json": { "schema": r("Task") } }
    });
    let string = json!({ "type": "string" });
    let opt_string = json!({ "type": ["string", "null"] });
    json!({
        "openapi": "3.1.0",
        "info": { "title": "mcpq", "version": env!("CARGO_PKG_VERSION"),
                  "description": "A prioritized, durable work queue over a fleet of MCP servers." },
        "security": [{ "bearer": [] }],
        "paths": task_paths,
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "Call": { "type": "object", "additionalProperties": false,
                    "description": "exactly one of tool, resource, prompt",
                    "properties": { "tool": string, "resource": string, "prompt": string,
                                    "arguments": { "type": "object" } } },
                "TaskRequest": { "type": "object", "additionalProperties": false, "required": ["call"],
                    "properties": {
                        "queue": string, "call": r("Call"), "priority": { "type": "integer", "format": "int32" },
                        "server": string, "tags": { "type": "array", "items": string },
                        "strategy": { "enum": ["round-robin", "least-loaded", "priority", "random"] },
                        "max_attempts": { "type": "integer", "minimum": 1, "maximum": 1000 },
                        "backoff": { "type": "object", "properties": { "initial_ms": { "type": "integer" }, "max_ms": { "type": "integer" } } },
                        "timeout_ms": { "type": "integer", "minimum": 1 }, "idempotent": { "type": "boolean" },
                        "delay_ms": { "type": "integer", "minimum": 0 }, "expires_ms": { "type": "integer", "minimum": 1 },
                        "idempotency_key": string, "metadata": { "type": "object" } } },
                "BatchRequest": { "type": "object", "required": ["tasks"],
                    "properties": { "tasks": { "type": "array", "items": r("TaskRequest") } } },
                "Task": { "type": "object",
                    "properties": {
                        "id": string, "queue": string,
                        "state": { "enum": ["queued", "scheduled", "running", "succeeded", "failed", "dead", "review", "cancelled"] },
                        "priority": { "type": "integer" }, "attempt": { "type": "integer" }, "max_attempts": { "type": "integer" },
                        "server": opt_string, "call": r("Call"), "result": {}, "error": opt_string,
                        "created_at": { "type": "string", "format": "date-time" },
                        "started_at": { "type": ["string", "null"], "format": "date-time" },
                        "finished_at": { "type": ["string", "null"], "format": "date-time" },
                        "idempotent": { "type": "boolean" }, "pinned_server": string,
                        "tags": { "type": "array", "items": string }, "idempotency_key": string,
                        "metadata": { "type": "object" } } },
                "Batch": { "type": "object", "properties": { "tasks": { "type": "array",
                    "items": { "oneOf": [r("Task"), r("Error")] } } } },
                "TaskPage": { "type": "object", "properties": { "tasks": { "type": "array", "items": r("Task") }, "next_cursor": opt_string } },
                "Queue": { "type": "object", "properties": { "queue": string, "paused": { "type": "boolean" },
                    "counts": { "type": "object", "additionalProperties": { "type": "integer" } } } },
                "Server": { "type": "object", "properties": { "name": string, "url": string, "era": opt_string,
                    "health": { "enum": ["online", "degraded", "offline"] }, "available": { "type": "boolean" },
                    "in_flight": { "type": "integer" }, "max_concurrency": { "type": "integer" },
                    "tools": { "type": ["array", "null"], "items": string } } },
                "ServerConfig": { "type": "object", "required": ["name", "url"],
                    "description": "the keys of a [[servers]] entry in the configuration file",
                    "properties": { "name": string, "url": string, "transport": { "enum": ["auto", "streamable-http", "sse"] },
                                    "tags": { "type": "array", "items": string }, "max_concurrency": { "type": "integer" } } },
                "Event": { "type": "object", "properties": { "id": string, "queue": string, "kind": string,
                    "task": string, "attempt": { "type": "integer" }, "server": string, "error": string } },
                "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "object",
                    "required": ["code", "message"],
                    "properties": { "code": string, "message": string, "field": string } } } }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_described() {
        let doc = build();
        for (path, methods) in ROUTES {
            for m in *methods {
                assert!(doc["paths"][path][m].is_object(), "{m} {path} is not in the document");
            }
        }
        let described = doc["paths"].as_object().map_or(0, |p| p.len());
        assert_eq!(described, ROUTES.len(), "the document describes a route the router lacks");
    }
}
