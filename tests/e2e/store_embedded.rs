//! What only the embedded store has to show: everything survives a close and a kill, a second
//! process cannot open the same directory, concurrent callers sharing group commits each get
//! their own answer, and damaged records or events are errors, never panics.
//!
//! The tests that need a second process run this test binary again, selecting one of the
//! ignored `child_*` tests and telling it what to do through `MCPQ_E2E_CHILD`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use mcpq_queue::{
    Completion, EmbeddedStore, Enqueued, Error, NewTask, QueueName, Store, TaskId, TaskState,
};
use redb::ReadableTable;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

const HOUR: Duration = Duration::from_secs(3600);
const CHILD_ENV: &str = "MCPQ_E2E_CHILD";

fn q() -> QueueName {
    QueueName::default()
}

fn tool(n: u64) -> NewTask {
    NewTask::tool("echo", json!({ "n": n }))
}

fn store_dir() -> Result<(tempfile::TempDir, PathBuf)> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("data");
    Ok((tmp, dir))
}

/// This test binary, running only the ignored test `name` with `task` in its environment.
fn child(name: &str, task: &str) -> tokio::process::Command {
    // the test binary itself: re-running it is how a test gets a second process
    let exe = std::env::current_exe().expect("the test binary has a path");
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args([&format!("store_embedded::{name}"), "--exact", "--ignored", "--nocapture"])
        .env(CHILD_ENV, task)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    cmd
}

/// Starts the ignored test `name` in a second process with `task`; answers it and its stdout.
fn spawn_child(name: &str, task: &str) -> Result<(Child, Lines<BufReader<ChildStdout>>)> {
    let mut proc = child(name, task).spawn()?;
    let stdout = proc.stdout.take().context("piped stdout")?;
    Ok((proc, BufReader::new(stdout).lines()))
}

/// The task a `child_*` test was started for, if it was.
fn child_task() -> Option<String> {
    std::env::var(CHILD_ENV).ok()
}

#[tokio::test]
async fn everything_survives_closing_and_reopening_the_store() -> Result<()> {
    let (_tmp, dir) = store_dir()?;
    let store = EmbeddedStore::open_path(&dir)?;
    let ids: Vec<TaskId> = store
        .enqueue(&q(), &[tool(1), tool(2), tool(3).delay(HOUR)])
        .await?
        .into_iter()
        .map(Enqueued::id)
        .collect();
    let done = store.claim(&q(), 1, HOUR).await?.remove(0);
    let completion = Completion {
        id: done.task.id,
        token: done.token,
        server: "s1".into(),
        result: json!({"ok": 1}),
    };
    store.complete(&q(), &[completion]).await?;
    let running = store.claim(&q(), 1, HOUR).await?.remove(0);
    store.set_paused(&q(), true).await?;
    let before = store.read_events(&q(), None, 100, None).await?;
    let stats = store.stats(&q()).await?;
    drop(store);

    let store = EmbeddedStore::open_path(&dir)?;
    assert_eq!(store.stats(&q()).await?, stats);
    assert_eq!((stats.succeeded, stats.running, stats.scheduled, stats.paused), (1, 1, 1, true));
    assert_eq!(store.read_events(&q(), None, 100, None).await?, before);
    assert_eq!(store.last_event_id(&q()).await?, before.last().map(|e| e.id));
    let t = store.get(&q(), ids[0]).await?.context("kept")?;
    assert_eq!((t.state, t.result), (TaskState::Succeeded, Some(json!({"ok": 1}))));
    // the lease and its token: the holder can still renew; the deadline it had is listed
    let listed = store.list(&q(), TaskState::Running, 0, 10).await?.tasks;
    assert_eq!(listed.iter().map(|t| t.id).collect::<Vec<_>>(), vec![running.task.id]);
    assert_eq!(store.renew(&q(), &[(running.task.id, running.token)], HOUR).await?, vec![true]);
    assert_eq!(store.get(&q(), ids[2]).await?.context("kept")?.state, TaskState::Scheduled);
    // new events follow the old ones
    store.set_paused(&q(), false).await?;
    store.enqueue(&q(), &[tool(4)]).await?;
    let after = store.read_events(&q(), before.last().map(|e| e.id), 10, None).await?;
    assert_eq!(after.len(), 1);
    assert!(after[0].id > before[before.len() - 1].id);
    Ok(())
}

#[tokio::test]
async fn acknowledged_enqueues_survive_a_killed_process() -> Result<()> {
    let (_tmp, dir) = store_dir()?;
    let (mut proc, mut lines) = spawn_child("child_enqueues_until_killed", &dir.to_string_lossy())?;
    let mut acked = HashSet::new();
    let read = async {
        while acked.len() < 300 {
            let Some(line) = lines.next_line().await? else { bail!("the child ended early") };
            if let Some(id) = line.strip_prefix("acked ") {
                acked.insert(id.parse::<TaskId>()?);
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(60), read).await.context("300 acks within 60 s")??;
    // SIGKILL, mid-write most likely: the child has eight enqueuers going
    proc.kill().await?;

    let store = EmbeddedStore::open_path(&dir)?;
    for id in &acked {
        ensure!(store.get(&q(), *id).await?.is_some(), "acknowledged task {id} was lost");
    }
    let stats = store.stats(&q()).await?;
    assert!(stats.queued >= acked.len() as u64, "{stats:?}");
    let listed = store.list(&q(), TaskState::Queued, 0, 1000).await?;
    assert_eq!(listed.tasks.len() as u64, stats.queued.min(1000));
    Ok(())
}

#[tokio::test]
#[ignore = "a second process for acknowledged_enqueues_survive_a_killed_process"]
async fn child_enqueues_until_killed() -> Result<()> {
    let Some(dir) = child_task() else { return Ok(()) };
    let store = EmbeddedStore::open_path(dir)?;
    let mut workers = Vec::new();
    for w in 0..8 {
        let store = store.clone();
        workers.push(tokio::spawn(async move {
            // bounded: the parent kills this process long before
            for i in 0..100_000u64 {
                let task = tool(w * 1_000_000 + i);
                let id = task.id;
                store.enqueue(&q(), &[task]).await?;
                println!("acked {id}");
            }
            anyhow::Ok(())
        }));
    }
    for w in workers {
        w.await??;
    }
    Ok(())
}

#[tokio::test]
async fn with_sync_ms_a_killed_process_keeps_what_was_synced_and_only_that() -> Result<()> {
    let (_tmp, dir) = store_dir()?;
    let (mut proc, mut lines) =
        spawn_child("child_syncs_once_then_enqueues", &dir.to_string_lossy())?;
    let (mut synced, mut unsynced) = (HashSet::new(), HashSet::new());
    let read = async {
        let mut after_sync = false;
        while unsynced.len() < 100 {
            let Some(line) = lines.next_line().await? else { bail!("the child ended early") };
            if line == "synced" {
                after_sync = true;
            } else if let Some(id) = line.strip_prefix("acked ") {
                let id = id.parse::<TaskId>()?;
                if after_sync {
                    unsynced.insert(id)
                } else {
                    synced.insert(id)
                };
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(50), read).await.context("acks within 50 s")??;
    proc.kill().await?;

    // every task is accounted for: those acknowledged before the sync are queued, those after
    // it fell in the window a crash may lose (a minute long, so no sync came), and no other
    let store = EmbeddedStore::open_path(&dir)?;
    assert_eq!(synced.len(), 100);
    for id in &synced {
        ensure!(store.get(&q(), *id).await?.is_some(), "synced task {id} was lost");
    }
    for id in &unsynced {
        ensure!(store.get(&q(), *id).await?.is_none(), "unsynced task {id} reached the disk");
    }
    let stats = store.stats(&q()).await?;
    assert_eq!(stats.queued, 100, "{stats:?}");
    assert_eq!(store.list(&q(), TaskState::Queued, 0, 1000).await?.tasks.len(), 100);
    Ok(())
}

#[tokio::test]
#[ignore = "a second process for with_sync_ms_a_killed_process_keeps_what_was_synced_and_only_that"]
async fn child_syncs_once_then_enqueues() -> Result<()> {
    let Some(dir) = child_task() else { return Ok(()) };
    let cfg = mcpq_queue::StoreConfig { path: dir.into(), sync_ms: 60_000, ..Default::default() };
    let store = EmbeddedStore::open(&cfg, Default::default())?;
    let enqueue = async |n: u64| {
        let task = tool(n);
        let id = task.id;
        store.enqueue(&q(), &[task]).await?;
        println!("acked {id}");
        anyhow::Ok(())
    };
    for n in 0..100 {
        enqueue(n).await?;
    }
    store.sync().await?;
    println!("synced");
    // bounded: the parent kills this process long before
    for n in 100..100_000 {
        enqueue(n).await?;
    }
    Ok(())
}

fn is_in_use_error(e: &Error, dir: &Path) -> bool {
    matches!(e, Error::Invalid(inv)
        if inv.field == "store.path"
            && inv.message.contains(&dir.display().to_string())
            && inv.message.contains("in use"))
}

#[tokio::test]
async fn a_second_open_of_the_same_directory_is_refused_naming_it() -> Result<()> {
    let (_tmp, dir) = store_dir()?;
    let store = EmbeddedStore::open_path(&dir)?;
    // another process: this binary again, told to open the same directory
    let out = child("child_opens_the_store", &dir.to_string_lossy()).output().await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed:\n{stdout}");
    let line =
        stdout.lines().find_map(|l| l.strip_prefix("refused: ")).context(stdout.to_string())?;
    assert!(line.starts_with("store.path: ") && line.contains("in use"), "{line}");
    // and in this process too (the lock is per open file, not per process)
    match EmbeddedStore::open_path(&dir) {
        Err(e) => assert!(is_in_use_error(&e, &dir), "{e}"),
        Ok(_) => bail!("a second open succeeded"),
    }
    // once the first is closed, the directory opens again
    drop(store);
    EmbeddedStore::open_path(&dir)?;
    Ok(())
}

#[tokio::test]
#[ignore = "a second process for a_second_open_of_the_same_directory_is_refused_naming_it"]
async fn child_opens_the_store() -> Result<()> {
    let Some(dir) = child_task() else { return Ok(()) };
    match EmbeddedStore::open_path(&dir) {
        Err(e) if is_in_use_error(&e, Path::new(&dir)) => println!("refused: {e}"),
        Err(e) => bail!("unexpected error: {e}"),
        Ok(_) => bail!("opened a directory another process holds"),
    }
    Ok(())
}

#[tokio::test]
async fn concurrent_callers_each_get_their_own_answer() -> Result<()> {
    let (_tmp, dir) = store_dir()?;
    let store = EmbeddedStore::open_path(&dir)?;
    let mut callers = Vec::new();
    for c in 0..64u64 {
        let store = store.clone();
        callers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for i in 0..20 {
                // single tasks, batches, and everyone racing for one idempotency key
                let batch = match i % 3 {
                    0 => vec![tool(c * 100 + i)],
                    1 => (0..3).map(|k| tool(c * 100 + i + k * 10_000)).collect(),
                    _ => vec![tool(7).idempotency_key("shared")],
                };
                let out = store.enqueue(&q(), &batch).await?;
                ensure!(
                    out.len() == batch.len(),
                    "{} answers for {} tasks",
                    out.len(),
                    batch.len()
                );
                for (task, answer) in batch.iter().zip(out) {
                    mine.push((task.id, task.idempotency_key.is_some(), answer));
                }
            }
            anyhow::Ok(mine)
        }));
    }
    let mut created = HashSet::new();
    let mut holders = HashSet::new();
    for c in callers {
        for (id, keyed, answer) in c.await?? {
            match answer {
                Enqueued::Created(got) => {
                    assert_eq!(got, id, "a caller got another caller's answer");
                    assert!(created.insert(got));
                    if keyed {
                        holders.insert(got);
                    }
                }
                Enqueued::Existing(holder) => {
                    assert!(keyed, "a fresh task was answered as existing");
                    holders.insert(holder);
                }
                Enqueued::Conflict(_) => bail!("same body, same key: no conflict"),
            }
        }
    }
    assert_eq!(holders.len(), 1, "one task holds the key: {holders:?}");
    assert_eq!(store.stats(&q()).await?.queued, created.len() as u64);
    for id in &created {
        ensure!(store.get(&q(), *id).await?.is_some(), "task {id} missing");
    }
    let mut events = 0;
    let mut after = None;
    for _ in 0..100 {
        let batch = store.read_events(&q(), after, 1000, None).await?;
        let Some(last) = batch.last() else { break };
        after = Some(last.id);
        events += batch.len();
    }
    assert_eq!(events, created.len(), "one enqueue event per created task");
    Ok(())
}

type Bytes = &'static [u8];

/// The embedded store's task table, as the store defines it: (queue, id) → (slot, record).
const TASKS: redb::TableDefinition<'_, (Bytes, u128), (u64, Bytes)> =
    redb::TableDefinition::new("tasks");
/// Its event table: (queue, ms, seq) → (kind, tasks, attempts, servers, errors).
type EntryValue = (Bytes, Bytes, Bytes, Bytes, Bytes);
const EVENTS: redb::TableDefinition<'_, (Bytes, u64, u64), EntryValue> =
    redb::TableDefinition::new("events");

/// Rewrites the record of `id` (keeping its slot) straight in the closed store's file.
fn damage(dir: &Path, id: TaskId, garbage: &[u8]) -> Result<()> {
    let db = redb::Database::open(dir.join("mcpq.redb"))?;
    let txn = db.begin_write()?;
    {
        let mut tasks = txn.open_table(TASKS)?;
        let queue = q();
        let k = (queue.as_str().as_bytes(), u128::from_be_bytes(*id.as_bytes()));
        let slot = tasks.get(k)?.context("the task is stored")?.value().0;
        tasks.insert(k, (slot, garbage))?;
    }
    txn.commit()?;
    Ok(())
}

#[tokio::test]
async fn corrupt_records_and_events_are_errors_not_panics() -> Result<()> {
    let (_tmp, dir) = store_dir()?;
    let store = EmbeddedStore::open_path(&dir)?;
    let [bad, good] = store.enqueue(&q(), &[tool(1).priority(5), tool(2)]).await?[..] else {
        bail!("two answers")
    };
    let (bad, good) = (bad.id(), good.id());
    drop(store);
    for garbage in [&b""[..], b"\x01\x01", &[0xff; 64], &[1u8; 31]] {
        damage(&dir, bad, garbage)?;
        let store = EmbeddedStore::open_path(&dir)?;
        let corrupt = |r: Result<_, Error>| matches!(r, Err(Error::Corrupt(_)));
        assert!(corrupt(store.get(&q(), bad).await.map(drop)), "get {garbage:?}");
        assert!(corrupt(store.list(&q(), TaskState::Queued, 0, 10).await.map(drop)), "list");
        assert!(corrupt(store.cancel(&q(), bad).await.map(drop)), "cancel");
        // the claim meets the bad record first (higher priority) and fails whole: nothing
        // moved, and operations committed alongside it are unaffected
        let (queue, third) = (q(), [tool(3)]);
        let (claimed, other) =
            tokio::join!(store.claim(&queue, 2, HOUR), store.enqueue(&queue, &third));
        assert!(corrupt(claimed.map(drop)), "claim");
        let other = other?[0].id();
        let st = store.stats(&q()).await?;
        assert_eq!((st.queued, st.running), (3, 0), "{st:?}");
        assert_eq!(store.get(&q(), good).await?.context("kept")?.state, TaskState::Queued);
        // out of the way for the next round
        store.cancel(&q(), other).await?;
        drop(store);
    }
    // a damaged event entry: reading past it is an error, not a panic
    {
        let db = redb::Database::open(dir.join("mcpq.redb"))?;
        let txn = db.begin_write()?;
        {
            let mut events = txn.open_table(EVENTS)?;
            let (k, _) = events.first()?.context("events")?;
            let (queue, ms, seq) = k.value();
            let key = (queue.to_vec(), ms, seq);
            drop(k);
            let garbage = (&b"enq"[..], &[1u8; 15][..], &[][..], &[][..], &[][..]);
            events.insert((key.0.as_slice(), key.1, key.2), garbage)?;
        }
        txn.commit()?;
    }
    let store = EmbeddedStore::open_path(&dir)?;
    assert!(matches!(store.read_events(&q(), None, 10, None).await, Err(Error::Corrupt(_))));
    Ok(())
}
