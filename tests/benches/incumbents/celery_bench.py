"""Celery, the incumbent job queue of Python, through the workload of mcpq's queue bench
(tests/benches/queue.rs) with Redis as its broker, against the same kind of redis-server: N no-op
tasks sent by 2 producer threads (`apply_async`, one message each: Celery has no bulk send),
then drained by one worker process, then sent and run at once on a fresh queue. Prints, per run
and as the median of the runs: enqueue/s, drain/s, cycle/s, the producing and working processes'
CPU and Redis's CPU per task in the cycle, Redis commands per task over enqueue + drain, and
Redis memory per queued task. Results are not stored (`task_ignore_result`), acks are early
(Celery's default).

python celery_bench.py [--tasks N] [--runs N] [--pool threads|solo|prefork] [--concurrency N]
(run by tests/benches/incumbents.sh, which installs celery and redis-py in a virtualenv)

The same file is the worker's app module: the bench starts `celery -A celery_bench worker` with
MCPQ_CELERY_SOCKET set, and the worker writes when it is ready and when it ran the N-th task.
"""

import argparse
import multiprocessing
import os
import signal
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import redis
from celery import Celery
from celery.signals import task_postrun, worker_ready

PRODUCERS = 2

SOCKET = os.environ.get("MCPQ_CELERY_SOCKET", "/nonexistent")
app = Celery("celery_bench", broker=f"redis+socket://{SOCKET}")
app.conf.update(
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    worker_send_task_events=False,
)


@app.task(name="noop")
def noop():
    return None


# ---- in the worker process: tell the bench when it is ready and when the N-th task ran. The
# count is shared memory made before the prefork pool forks its children, so it counts across them.
_done = multiprocessing.Value("q", 0)


@worker_ready.connect
def _ready(**_):
    _mark("ready")


@task_postrun.connect
def _ran(**_):
    with _done.get_lock():
        _done.value += 1
        n = _done.value
    if n == int(os.environ.get("MCPQ_CELERY_TASKS", "0")):
        _mark("done")


def _mark(what):
    path = os.path.join(os.environ["MCPQ_CELERY_DIR"], what)
    with open(path + ".tmp", "w") as f:
        f.write(f"{time.time()}\n")
    os.replace(path + ".tmp", path)


# ---- in the bench process
def start_redis(dir):
    sock = os.path.join(dir, "redis.sock")
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--save", "", "--appendonly", "no", "--unixsocketperm",
         "700", "--unixsocket", sock, "--dir", dir, "--logfile", os.path.join(dir, "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    admin = redis.Redis(unix_socket_path=sock)
    for _ in range(500):
        try:
            admin.ping()
            return proc, sock, admin
        except (redis.ConnectionError, FileNotFoundError):
            if proc.poll() is not None:
                break
            time.sleep(0.01)
    proc.kill()
    raise RuntimeError(f"redis-server did not come up on {sock}")


def wait_file(path, limit_s, proc):
    deadline = time.time() + limit_s
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {proc.returncode} before {path}")
        if time.time() > deadline:
            raise RuntimeError(f"no {path} after {limit_s} s")
        time.sleep(0.002)
    with open(path) as f:
        return float(f.read())


def proc_cpu_s(pid):
    """CPU seconds of a process and its waited-for children."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid):
    total = proc_cpu_s(pid)
    for child in open(f"/proc/{pid}/task/{pid}/children").read().split():
        total += tree_cpu_s(int(child))
    return total


def redis_cpu_s(admin):
    cpu = admin.info("cpu")
    return cpu["used_cpu_user"] + cpu["used_cpu_sys"]


def commands(admin):
    return sum(v["calls"] for k, v in admin.info("commandstats").items()
               if k != "cmdstat_info" and not k.startswith("cmdstat_config"))


def enqueue_all(queue, n):
    per = -(-n // PRODUCERS)
    errors = []

    def produce(count):
        try:
            for _ in range(count):
                noop.apply_async(queue=queue)
        except Exception as e:  # reported below: a producer that fails fails the run
            errors.append(e)

    threads = [threading.Thread(target=produce, args=(min(per, max(0, n - p * per)),))
               for p in range(PRODUCERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def start_worker(args, sock, queue, dir):
    env = dict(os.environ, MCPQ_CELERY_SOCKET=sock, MCPQ_CELERY_TASKS=str(args.tasks),
               MCPQ_CELERY_DIR=dir, PYTHONPATH=os.path.dirname(os.path.abspath(__file__)))
    for f in ("ready", "done"):
        if os.path.exists(os.path.join(dir, f)):
            os.remove(os.path.join(dir, f))
    # the worker keeps its own descriptor of the log
    with open(os.path.join(dir, f"worker-{queue}.log"), "w") as log:
        return subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "celery"), "-A", "celery_bench",
             "worker", "-Q", queue, "-P", args.pool, "-c", str(args.concurrency),
             "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING"],
            env=env, stdout=subprocess.DEVNULL, stderr=log)


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(args, dir, sock, admin):
    """One run, on a flushed server (Celery's producers keep their broker connections, so every run
    uses the one server)."""
    admin.flushall()
    admin.config_resetstat()
    mem0 = admin.info("memory")["used_memory"]
    t = time.time()
    enqueue_all("bench", args.tasks)
    enqueue_s = time.time() - t
    mem1 = admin.info("memory")["used_memory"]
    queued = admin.llen("bench")
    if queued != args.tasks:
        raise RuntimeError(f"expected {args.tasks} queued, found {queued}")

    worker = start_worker(args, sock, "bench", dir)
    try:
        ready = wait_file(os.path.join(dir, "ready"), 60, worker)
        done = wait_file(os.path.join(dir, "done"), 300, worker)
    finally:
        stop(worker)
    drain_s = done - ready
    cmds = commands(admin)
    left = admin.llen("bench")
    if left != 0:
        raise RuntimeError(f"{left} tasks left queued after the drain")

    worker = start_worker(args, sock, "cycle", dir)
    try:
        wait_file(os.path.join(dir, "ready"), 60, worker)
        me = os.getpid()
        cpu0 = proc_cpu_s(me) + tree_cpu_s(worker.pid)
        redis0 = redis_cpu_s(admin)
        t = time.time()
        enqueue_all("cycle", args.tasks)
        done = wait_file(os.path.join(dir, "done"), 300, worker)
        cycle_s = done - t
        cpu1 = proc_cpu_s(me) + tree_cpu_s(worker.pid)
        redis1 = redis_cpu_s(admin)
    finally:
        stop(worker)
    n = args.tasks
    return [n / enqueue_s, n / drain_s, n / cycle_s, (cpu1 - cpu0) * 1e6 / n,
            (redis1 - redis0) * 1e6 / n, cmds / n, (mem1 - mem0) / n]


COLS = [("enqueue/s", 10, 0), ("drain/s", 10, 0), ("cycle/s", 9, 0), ("client µs", 10, 1),
        ("redis µs", 10, 1), ("cmds/task", 9, 2), ("bytes/task", 10, 1)]


def row(label, values):
    return f"{label:>6} " + " ".join(f"{v:>{w}.{d}f}" for (_, w, d), v in zip(COLS, values))


def positive(text):
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"takes a whole number above 0, not {text}")
    return v


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=positive, default=50000)
    p.add_argument("--runs", type=positive, default=3)
    p.add_argument("--pool", choices=["threads", "solo", "prefork"], default="solo")
    p.add_argument("--concurrency", type=positive, default=1)
    args = p.parse_args()
    # stopped (by timeout(1), say), the run's finally still stops its worker and redis-server
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import celery
    print(f"Celery {celery.__version__}, Python {sys.version.split()[0]}: {args.tasks} no-op tasks, "
          f"{PRODUCERS} producer threads, one worker (pool {args.pool}, concurrency "
          f"{args.concurrency})")
    print(f"{'':>6} " + " ".join(f"{h:>{w}}" for h, w, _ in COLS))
    runs = []
    dir = tempfile.mkdtemp(prefix="mcpq-celery-")
    redis_proc, sock, admin = start_redis(dir)
    try:
        app.conf.broker_url = f"redis+socket://{sock}"
        for i in range(1, args.runs + 1):
            values = run(args, dir, sock, admin)
            runs.append(values)
            print(row(f"run {i}", values), flush=True)
    finally:
        admin.close()
        redis_proc.terminate()
        redis_proc.wait()
        # reported, not raised: it must not hide an error the run is already raising
        shutil.rmtree(dir, onerror=lambda _f, path, exc: print(
            f"celery_bench.py: cannot remove {path}: {exc[1]}", file=sys.stderr))
    print(row("median", [statistics.median(r[i] for r in runs) for i in range(len(COLS))]))


if __name__ == "__main__":
    main()
