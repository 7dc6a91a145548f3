//! The HTTP API through its router, without TCP: every field's bad values get a 4xx naming the
//! field, auth guards what it should, and the task routes do what they say on a real store.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use mcpq::api::{ApiState, router};
use mcpq::config::ApiConfig;
use mcpq_queue::{QueueConfigs, QueueName, RedisStore};
use mcpq_tests::RedisServer;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

struct Api {
    router: Router,
    closing: CancellationToken,
    _redis: RedisServer,
}

async fn api_with(cfg: ApiConfig) -> anyhow::Result<Api> {
    let redis = RedisServer::start()?;
    let store: RedisStore = redis.store(&[]).await?;
    let queues = vec![QueueName::default(), QueueName::new("bulk")?];
    let closing = CancellationToken::new();
    let state = ApiState::new(store, queues, QueueConfigs::default(), None, cfg, closing.clone());
    Ok(Api { router: router(state), closing, _redis: redis })
}

async fn api() -> anyhow::Result<Api> {
    api_with(ApiConfig { max_batch: 3, max_body_bytes: 4096, ..ApiConfig::default() }).await
}

impl Api {
    async fn send(&self, req: Request<Body>) -> (StatusCode, Value) {
        let resp = self.router.clone().oneshot(req).await.expect("the router never fails");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.expect("body");
        let v = serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, v)
    }

    async fn call(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let b = Request::builder().method(method).uri(uri);
        let req = match body {
            Some(v) => b.header("content-type", "application/json").body(Body::from(v.to_string())),
            None => b.body(Body::empty()),
        };
        self.send(req.expect("request")).await
    }
}

/// Asserts a 4xx with the error shape, this status and this field.
fn bad(got: (StatusCode, Value), status: u16, field: Option<&str>, case: &str) {
    let (s, v) = got;
    assert_eq!(s.as_u16(), status, "{case}: {v}");
    assert!(v["error"]["code"].is_string() && v["error"]["message"].is_string(), "{case}: {v}");
    assert_eq!(v["error"]["field"].as_str(), field, "{case}: {v}");
}

#[tokio::test]
async fn every_bad_task_field_is_named() -> anyhow::Result<()> {
    let api = api().await?;
    let deep = (0..40).fold(json!(1), |v, _| json!([v]));
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({}), 422, "call"),
        (json!({"call": {}}), 422, "call"),
        (json!({"call": {"tool": "a", "resource": "b"}}), 422, "call"),
        (json!({"call": "echo"}), 422, "call"),
        (json!({"call": {"tool": ""}}), 422, "call.tool"),
        (json!({"call": {"tool": "a\u{7}"}}), 422, "call.tool"),
        (json!({"call": {"tool": "x".repeat(200)}}), 422, "call.tool"),
        (json!({"call": {"tool": 5}}), 422, "call.tool"),
        (json!({"call": {"resource": ""}}), 422, "call.resource"),
        (json!({"call": {"prompt": ""}}), 422, "call.prompt"),
        (json!({"call": {"tool": "a", "arguments": [1]}}), 422, "call.arguments"),
        (json!({"call": {"tool": "a", "arguments": {"d": deep}}}), 422, "call.arguments"),
        (json!({"call": {"prompt": "p", "arguments": {"k": 1}}}), 422, "call.arguments.k"),
        (json!({"call": {"tool": "a", "argz": {}}}), 422, "call.argz"),
        (json!({"call": {"tool": "a"}, "priority": "high"}), 422, "priority"),
        (json!({"call": {"tool": "a"}, "priority": 1u64 << 40}), 422, "priority"),
        (json!({"call": {"tool": "a"}, "max_attempts": 0}), 422, "max_attempts"),
        (json!({"call": {"tool": "a"}, "max_attempts": 5000}), 422, "max_attempts"),
        (json!({"call": {"tool": "a"}, "max_attempts": -1}), 422, "max_attempts"),
        (json!({"call": {"tool": "a"}, "timeout_ms": 0}), 422, "timeout_ms"),
        (json!({"call": {"tool": "a"}, "timeout_ms": 1u64 << 40}), 422, "timeout_ms"),
        (json!({"call": {"tool": "a"}, "delay_ms": 1u64 << 50}), 422, "delay_ms"),
        (json!({"call": {"tool": "a"}, "delay_ms": -5}), 422, "delay_ms"),
        (json!({"call": {"tool": "a"}, "expires_ms": 0}), 422, "expires_ms"),
        (json!({"call": {"tool": "a"}, "tags": [""]}), 422, "tags"),
        (json!({"call": {"tool": "a"}, "tags": "web"}), 422, "tags"),
        (json!({"call": {"tool": "a"}, "server": ""}), 422, "server"),
        (json!({"call": {"tool": "a"}, "strategy": "fastest"}), 422, "strategy"),
        (json!({"call": {"tool": "a"}, "backoff": {"initial_ms": 0, "max_ms": 1}}), 422, "backoff"),
        (json!({"call": {"tool": "a"}, "backoff": {"initial_ms": 1}}), 422, "backoff.max_ms"),
        (json!({"call": {"tool": "a"}, "idempotent": "yes"}), 422, "idempotent"),
        (json!({"call": {"tool": "a"}, "idempotency_key": ""}), 422, "idempotency_key"),
        (json!({"call": {"tool": "a"}, "metadata": [1]}), 422, "metadata"),
        (json!({"call": {"tool": "a"}, "metadata": {"d": deep}}), 422, "metadata"),
        (json!({"call": {"tool": "a"}, "queue": "a b"}), 422, "queue"),
        (json!({"call": {"tool": "a"}, "queue": "nope"}), 404, "queue"),
        (json!({"call": {"tool": "a"}, "prio": 1}), 422, "prio"),
    ];
    for (body, status, field) in cases {
        let case = body.to_string();
        bad(api.call("POST", "/v1/tasks", Some(body)).await, status, Some(field), &case);
    }
    // nothing above was stored
    let (s, v) = api.call("GET", "/v1/queues/default", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["counts"]["queued"], 0, "{v}");
    Ok(())
}

#[tokio::test]
async fn malformed_bodies_headers_and_sizes_get_clear_errors() -> anyhow::Result<()> {
    let api = api().await?;
    let post = |body: &str, ct: &str| {
        Request::builder()
            .method("POST")
            .uri("/v1/tasks")
            .header("content-type", ct)
            .body(Body::from(body.to_owned()))
            .expect("request")
    };
    let (s, v) = api.send(post("{\"call\":", "application/json")).await;
    assert_eq!((s.as_u16(), v["error"]["code"].as_str()), (400, Some("invalid_json")), "{v}");
    bad(api.send(post("{}", "text/plain")).await, 415, Some("Content-Type"), "content type");
    let big = json!({"call": {"tool": "a", "arguments": {"x": "y".repeat(5000)}}}).to_string();
    let (s, v) = api.send(post(&big, "application/json")).await;
    assert_eq!((s.as_u16(), v["error"]["code"].as_str()), (413, Some("body_too_large")), "{v}");
    let key = |k: &[u8]| {
        Request::builder()
            .method("POST")
            .uri("/v1/tasks")
            .header("content-type", "application/json")
            .header("idempotency-key", k)
            .body(Body::from(json!({"call": {"tool": "a"}}).to_string()))
            .expect("request")
    };
    bad(api.send(key(b"")).await, 422, Some("Idempotency-Key"), "empty key");
    bad(api.send(key(&[b'k'; 300])).await, 422, Some("Idempotency-Key"), "long key");
    bad(api.send(key(b"caf\xc3\xa9")).await, 422, Some("Idempotency-Key"), "non-ascii key");
    Ok(())
}

#[tokio::test]
async fn batches_are_checked_whole_and_name_the_item() -> anyhow::Result<()> {
    let api = api().await?;
    let ok = json!({"call": {"tool": "a"}});
    let cases = vec![
        (json!({"tasks": []}), 422, "tasks"),
        (json!({"tasks": [ok, ok, ok, ok]}), 422, "tasks"),
        (
            json!({"tasks": [ok, {"call": {"tool": "a"}, "priority": "x"}]}),
            422,
            "tasks[1].priority",
        ),
        (
            json!({"tasks": [ok, {"call": {"tool": "a"}, "timeout_ms": 0}]}),
            422,
            "tasks[1].timeout_ms",
        ),
        (json!({"tasks": [ok, {"call": {"tool": ""}}]}), 422, "tasks[1].call.tool"),
        (json!({"tasks": [ok, {"call": {"tool": "a"}, "queue": "nope"}]}), 404, "tasks[1].queue"),
        (json!({"task": [ok]}), 422, "task"),
    ];
    for (body, status, field) in cases {
        let case = body.to_string();
        bad(api.call("POST", "/v1/tasks/batch", Some(body)).await, status, Some(field), &case);
    }
    let (s, v) = api.call("GET", "/v1/queues/default", None).await;
    assert_eq!((s, &v["counts"]["queued"]), (StatusCode::OK, &json!(0)), "nothing stored: {v}");
    let (s, v) = api
        .call(
            "POST",
            "/v1/tasks/batch",
            Some(json!({"tasks": [ok, {"call": {"tool": "b"}, "queue": "bulk"}, ok]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let queues: Vec<&str> = v["tasks"]
        .as_array()
        .map_or(vec![], |a| a.iter().filter_map(|t| t["queue"].as_str()).collect());
    assert_eq!(queues, ["default", "bulk", "default"], "answers keep the request's order: {v}");
    Ok(())
}

#[tokio::test]
async fn query_and_path_parameters_are_checked() -> anyhow::Result<()> {
    let api = api().await?;
    let id = uuid::Uuid::now_v7();
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        ("GET", "/v1/tasks?state=bogus".into(), 422, Some("state")),
        ("GET", "/v1/tasks?limit=0".into(), 422, Some("limit")),
        ("GET", "/v1/tasks?limit=5000".into(), 422, Some("limit")),
        ("GET", "/v1/tasks?cursor=x".into(), 422, Some("cursor")),
        ("GET", "/v1/tasks?sate=queued".into(), 422, Some("sate")),
        ("GET", "/v1/tasks?limit=1&limit=2".into(), 422, Some("limit")),
        ("GET", "/v1/tasks?queue=nope".into(), 404, Some("queue")),
        ("GET", "/v1/tasks/not-a-uuid".into(), 422, Some("id")),
        ("GET", format!("/v1/tasks/{id}"), 404, None),
        ("GET", format!("/v1/tasks/{id}?queue=a:b"), 422, Some("queue")),
        ("GET", format!("/v1/tasks/{id}/wait?timeout_ms=-1"), 422, Some("timeout_ms")),
        ("GET", format!("/v1/tasks/{id}/wait?timeout_ms=999999999"), 422, Some("timeout_ms")),
        ("DELETE", format!("/v1/tasks/{id}"), 404, None),
        ("POST", format!("/v1/tasks/{id}/retry"), 404, None),
        ("GET", "/v1/queues/nope".into(), 404, Some("queue")),
        ("POST", "/v1/queues/a%20b/pause".into(), 422, Some("queue")),
        ("GET", "/v1/events?from=yesterday".into(), 422, Some("from")),
        ("GET", "/v1/events?after=12".into(), 422, Some("after")),
        ("GET", "/v1/servers".into(), 404, None),
        ("GET", "/v1/nothing".into(), 404, None),
        ("PUT", "/v1/tasks".into(), 405, None),
    ];
    for (method, uri, status, field) in cases {
        bad(api.call(method, &uri, None).await, status, field, &format!("{method} {uri}"));
    }
    let req = Request::builder()
        .uri("/v1/events")
        .header("last-event-id", "yesterday")
        .body(Body::empty())?;
    bad(api.send(req).await, 422, Some("Last-Event-ID"), "Last-Event-ID");
    Ok(())
}

#[tokio::test]
async fn task_routes_enqueue_get_cancel_retry_and_list() -> anyhow::Result<()> {
    let api = api().await?;
    let body = json!({"call": {"tool": "echo", "arguments": {"n": 1}}, "priority": 7,
                      "tags": ["fast"], "metadata": {"who": "test"}, "max_attempts": 2});
    let (s, created) = api.call("POST", "/v1/tasks", Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    for key in [
        "id",
        "queue",
        "state",
        "priority",
        "attempt",
        "server",
        "call",
        "result",
        "error",
        "created_at",
        "started_at",
        "finished_at",
    ] {
        assert!(created.get(key).is_some(), "the task view lacks {key}: {created}");
    }
    assert_eq!(created["state"], "queued");
    assert_eq!(created["call"], json!({"tool": "echo", "arguments": {"n": 1}}));
    let id = created["id"].as_str().unwrap_or_default().to_owned();
    let (s, got) = api.call("GET", &format!("/v1/tasks/{id}"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(got, created, "GET answers what POST did");
    let (s, page) = api.call("GET", "/v1/tasks?state=queued&limit=10", None).await;
    assert_eq!((s, page["tasks"][0]["id"].as_str()), (StatusCode::OK, Some(id.as_str())), "{page}");
    let (s, v) = api.call("POST", &format!("/v1/tasks/{id}/retry"), None).await;
    assert_eq!(s, StatusCode::CONFLICT, "a queued task cannot be retried: {v}");
    let (s, v) = api.call("DELETE", &format!("/v1/tasks/{id}"), None).await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("cancelled")), "{v}");
    let (s, v) = api.call("DELETE", &format!("/v1/tasks/{id}"), None).await;
    assert_eq!(s, StatusCode::CONFLICT, "cancelling twice: {v}");
    let (s, v) = api.call("GET", &format!("/v1/tasks/{id}/wait?timeout_ms=0"), None).await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("cancelled")), "{v}");
    let (s, v) = api.call("POST", &format!("/v1/tasks/{id}/retry"), None).await;
    assert_eq!(
        (s, v["state"].as_str(), v["attempt"].as_u64()),
        (StatusCode::OK, Some("queued"), Some(0)),
        "{v}"
    );
    let (s, v) = api.call("POST", "/v1/queues/default/pause", None).await;
    assert_eq!(
        (s, v["paused"].as_bool(), v["counts"]["queued"].as_u64()),
        (StatusCode::OK, Some(true), Some(1)),
        "{v}"
    );
    let (s, v) = api.call("POST", "/v1/queues/default/resume", None).await;
    assert_eq!((s, v["paused"].as_bool()), (StatusCode::OK, Some(false)), "{v}");
    // a delayed task is scheduled; waiting on it times out with its current state
    let (s, v) = api
        .call(
            "POST",
            "/v1/tasks",
            Some(json!({"call": {"resource": "file:///x"}, "delay_ms": 60000})),
        )
        .await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::CREATED, Some("scheduled")), "{v}");
    let later = v["id"].as_str().unwrap_or_default();
    let (s, v) = api.call("GET", &format!("/v1/tasks/{later}/wait?timeout_ms=50"), None).await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("scheduled")), "{v}");
    let (s, v) = api.call("GET", "/v1/queues", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v.as_array().map(Vec::len), Some(2), "{v}");
    Ok(())
}

#[tokio::test]
async fn idempotency_keys_give_back_the_same_task_or_refuse_another_body() -> anyhow::Result<()> {
    let api = api().await?;
    let post = |body: Value| {
        Request::builder()
            .method("POST")
            .uri("/v1/tasks")
            .header("content-type", "application/json")
            .header("idempotency-key", "order-17")
            .body(Body::from(body.to_string()))
            .expect("request")
    };
    let body = json!({"call": {"tool": "charge", "arguments": {"cents": 500}}});
    let (s1, first) = api.send(post(body.clone())).await;
    let (s2, again) = api.send(post(body)).await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::OK), "{first} {again}");
    assert_eq!(first["id"], again["id"]);
    assert_eq!(again["idempotency_key"], "order-17");
    let other = json!({"call": {"tool": "charge", "arguments": {"cents": 900}}});
    let (s, v) = api.send(post(other)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(
        (v["error"]["code"].as_str(), v["error"]["field"].as_str()),
        (Some("idempotency_conflict"), Some("Idempotency-Key")),
        "{v}"
    );
    let (_, v) = api.call("GET", "/v1/queues/default", None).await;
    assert_eq!(v["counts"]["queued"], 1, "one task for three requests: {v}");
    Ok(())
}

#[tokio::test]
async fn tokens_guard_everything_but_health_and_the_document() -> anyhow::Result<()> {
    let api = api_with(ApiConfig { tokens: vec!["secret-token-1".into()], ..ApiConfig::default() })
        .await?;
    let with = |uri: &str, auth: Option<&str>| {
        let mut b = Request::builder().uri(uri);
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        b.body(Body::empty()).expect("request")
    };
    for uri in ["/v1/queues/default", "/v1/tasks", "/metrics", "/v1/events"] {
        bad(api.send(with(uri, None)).await, 401, Some("Authorization"), uri);
        bad(api.send(with(uri, Some("Bearer wrong-token"))).await, 401, Some("Authorization"), uri);
        bad(api.send(with(uri, Some("secret-token-1"))).await, 401, Some("Authorization"), uri);
    }
    let (s, _) = api.send(with("/v1/queues/default", Some("Bearer secret-token-1"))).await;
    assert_eq!(s, StatusCode::OK);
    for uri in ["/healthz", "/readyz", "/v1/openapi.json"] {
        let (s, v) = api.send(with(uri, None)).await;
        assert_eq!(s, StatusCode::OK, "{uri}: {v}");
    }
    Ok(())
}

#[tokio::test]
async fn metrics_count_tasks_by_queue_and_state() -> anyhow::Result<()> {
    let api = api().await?;
    for _ in 0..3 {
        let (s, v) = api
            .call("POST", "/v1/tasks", Some(json!({"call": {"tool": "a"}, "queue": "bulk"})))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    let (s, v) = api.call("GET", "/metrics", None).await;
    assert_eq!(s, StatusCode::OK);
    let text = v.as_str().unwrap_or_default();
    assert!(text.contains("mcpq_tasks{queue=\"bulk\",state=\"queued\"} 3"), "{text}");
    assert!(text.contains("mcpq_tasks{queue=\"default\",state=\"queued\"} 0"), "{text}");
    assert!(text.contains("# TYPE mcpq_queue_paused gauge"), "{text}");
    Ok(())
}

#[tokio::test]
async fn every_documented_route_is_served() -> anyhow::Result<()> {
    let api = api().await?;
    let id = uuid::Uuid::now_v7().to_string();
    for (path, methods) in mcpq::api::routes() {
        let uri = path.replace("{id}", &id).replace("{queue}", "default").replace("{name}", "x");
        for m in *methods {
            let req = Request::builder()
                .method(m.to_uppercase().as_str())
                .uri(&uri)
                .body(Body::empty())?;
            // the event stream never ends: look at the status only
            let resp = api.router.clone().oneshot(req).await?;
            let status = resp.status();
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{m} {uri}");
            if status == StatusCode::NOT_FOUND {
                let body = axum::body::to_bytes(resp.into_body(), 1 << 16).await?;
                let v: Value = serde_json::from_slice(&body)?;
                assert!(
                    !v["error"]["message"]
                        .as_str()
                        .unwrap_or_default()
                        .starts_with("no such route"),
                    "{m} {uri}: {v}"
                );
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn odd_but_valid_and_subtly_bad_requests() -> anyhow::Result<()> {
    let api = api_with(ApiConfig { tokens: vec!["secret-token-2".into()], ..ApiConfig::default() })
        .await?;
    let post = |uri: &str, headers: &[(&str, &str)], body: Value| {
        let mut b = Request::builder().method("POST").uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::from(body.to_string())).expect("request")
    };
    let task = json!({"call": {"tool": "a"}});
    let auth = ("authorization", "bearer secret-token-2");
    let json_ct = ("content-type", "Application/JSON; charset=utf-8");
    let (s, v) = api.send(post("/v1/tasks", &[auth, json_ct], task.clone())).await;
    assert_eq!(s, StatusCode::CREATED, "a lowercase scheme and a cased media type are fine: {v}");
    bad(
        api.send(post("/v1/tasks", &[auth, ("content-type", "application/jsonx")], task.clone()))
            .await,
        415,
        Some("Content-Type"),
        "media type",
    );
    bad(
        api.send(post("/v1/tasks?queue=bulk", &[auth], task.clone())).await,
        422,
        Some("queue"),
        "query on POST",
    );
    bad(
        api.send(post(
            "/v1/tasks",
            &[auth, ("idempotency-key", "k1"), ("idempotency-key", "k2")],
            task.clone(),
        ))
        .await,
        422,
        Some("Idempotency-Key"),
        "two keys",
    );
    bad(
        api.send(post(
            "/v1/tasks",
            &[auth],
            json!({"call": {"tool": "a"}, "delay_ms": 5000, "expires_ms": 1000}),
        ))
        .await,
        422,
        Some("expires_ms"),
        "expires before it may start",
    );
    let get = |uri: &str| {
        Request::builder()
            .uri(uri)
            .header("authorization", "Bearer secret-token-2")
            .body(Body::empty())
            .expect("request")
    };
    bad(
        api.send(get("/v1/tasks?cursor=9223372036854775807")).await,
        422,
        Some("cursor"),
        "huge cursor",
    );
    bad(api.send(get("/v1/events?from=now&after=1-0")).await, 422, Some("from"), "from and after");
    // unknown routes and methods answer 401 like any other without a token
    let anon = Request::builder().method("PUT").uri("/v1/tasks").body(Body::empty())?;
    bad(api.send(anon).await, 401, Some("Authorization"), "PUT without a token");
    let anon = Request::builder().uri("/v1/secret").body(Body::empty())?;
    bad(api.send(anon).await, 401, Some("Authorization"), "unknown route without a token");
    Ok(())
}

#[tokio::test]
async fn a_wait_ends_when_the_api_closes() -> anyhow::Result<()> {
    let api = api().await?;
    let (s, v) = api
        .call("POST", "/v1/tasks", Some(json!({"call": {"tool": "a"}, "delay_ms": 3_600_000})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let uri = format!("/v1/tasks/{}/wait?timeout_ms=600000", v["id"].as_str().unwrap_or_default());
    api.closing.cancel();
    let waited =
        tokio::time::timeout(std::time::Duration::from_secs(10), api.call("GET", &uri, None)).await;
    let (s, v) = waited.expect("a wait outlived the API's shutdown");
    assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("scheduled")), "{v}");
    Ok(())
}
