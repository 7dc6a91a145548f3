//! Bad input reaches the store as a typed error naming the field, and leaves nothing behind.

use std::time::Duration;

use anyhow::Result;
use mcpq_queue::{Completion, Error, NewTask, QueueName, Settled, Store, TaskId, TaskState};
use mcpq_tests::RedisServer;
use serde_json::json;

fn field(r: mcpq_queue::Result<impl std::fmt::Debug>) -> String {
    match r {
        Err(Error::Invalid(e)) => e.field,
        other => panic!("expected invalid input, got {other:?}"),
    }
}

fn dbsize(server: &RedisServer) -> Result<u64> {
    Ok(redis::cmd("DBSIZE").query(&mut server.raw()?)?)
}

#[tokio::test]
async fn bad_tasks_are_rejected_by_field_and_nothing_is_written() -> Result<()> {
    let server = RedisServer::start()?;
    let store = server.store(&[]).await?;
    let q = QueueName::default();
    let ok = || NewTask::tool("echo", json!({}));
    let cases: Vec<(NewTask, &str)> = vec![
        (NewTask::tool("echo", json!({"blob": "x".repeat(600 * 1024)})), "task"),
        (NewTask::tool("", json!({})), "call.name"),
        (NewTask::tool("echo", json!("not an object")), "call.arguments"),
        (NewTask::resource(""), "call.name"),
        (ok().timeout(Duration::ZERO), "timeout_ms"),
        (ok().timeout(Duration::from_secs(10 * 86_400)), "timeout_ms"),
        (ok().delay(Duration::from_secs(3650 * 86_400)), "delay_ms"),
        (ok().max_attempts(0), "max_attempts"),
        (ok().max_attempts(60_000), "max_attempts"),
        (ok().idempotency_key("a\nb"), "idempotency_key"),
        (ok().tags(["ok", ""]), "tags"),
    ];
    for (task, want) in cases {
        assert_eq!(field(store.enqueue(&q, &[task]).await), want);
    }
    // one bad task in a batch rejects the batch, naming its index
    let batch = vec![ok(), ok().max_attempts(0), ok()];
    assert_eq!(field(store.enqueue(&q, &batch).await), "tasks[1].max_attempts");
    assert_eq!(dbsize(&server)?, 0, "a rejected enqueue wrote something");
    Ok(())
}

#[test]
fn queue_names_with_illegal_characters_are_rejected() {
    for bad in ["", "a{b}", "with space", "colon:s", "ünï", &"q".repeat(200)] {
        assert_eq!(QueueName::new(bad).unwrap_err().field, "queue", "{bad:?}");
    }
}

#[tokio::test]
async fn corrupt_records_are_errors_not_panics() -> Result<()> {
    let server = RedisServer::start()?;
    let store = server.store(&[]).await?;
    let q = QueueName::default();
    let id = TaskId::new();
    let key = "mcpq:{default}:tasks";
    let mut raw = server.raw()?;
    for garbage in [&b""[..], b"\x01\x01", &[0xff; 64], &[1u8; 31]] {
        redis::cmd("HSET")
            .arg(key)
            .arg(id.as_bytes().as_slice())
            .arg(garbage)
            .query::<()>(&mut raw)?;
        assert!(matches!(store.get(&q, id).await, Err(Error::Corrupt(_))), "{garbage:?}");
    }
    Ok(())
}

#[tokio::test]
async fn bad_queue_configuration_is_refused_at_open() -> Result<()> {
    let server = RedisServer::start()?;
    let tiny = mcpq_queue::QueueConfig { events_max: 0, ..Default::default() };
    match server.store(&[("mail", tiny)]).await {
        Err(e) => assert!(e.to_string().contains("queues.mail.events_max"), "{e}"),
        Ok(_) => panic!("a zero-length event stream was accepted"),
    }
    Ok(())
}

#[tokio::test]
async fn a_redis_that_forgot_the_scripts_is_sent_them_again() -> Result<()> {
    let server = RedisServer::start()?;
    let store = server.store(&[]).await?;
    let q = QueueName::default();
    let mut raw = server.raw()?;
    let flush = |raw: &mut redis::Connection| redis::cmd("SCRIPT").arg("FLUSH").query::<()>(raw);
    let tasks: Vec<NewTask> = (0..3).map(|i| NewTask::tool("echo", json!({ "i": i }))).collect();
    store.enqueue(&q, &tasks).await?;
    // as after a restart without persistence: every script must be loaded again
    flush(&mut raw)?;
    let claimed = store.claim(&q, 10, Duration::from_secs(30)).await?;
    assert_eq!(claimed.len(), 3);
    flush(&mut raw)?;
    let done: Vec<Completion> = claimed.iter().map(crate::store_conformance::done).collect();
    let settled = store.complete(&q, &done).await?;
    assert!(settled.iter().all(|s| *s == Settled::Applied(TaskState::Succeeded)), "{settled:?}");
    assert_eq!(store.stats(&q).await?.succeeded, 3);
    Ok(())
}
