#!/usr/bin/env python3
"""Instructions Redis spends per task in mcpq's claim and complete scripts, counted by
callgrind: unlike CPU seconds on a shared VM, the count does not drift from run to run.

It starts its own redis-server under `valgrind --tool=callgrind` on a unix socket in a
temporary directory, loads the scripts from `crates/mcpq-queue/lua` (or the directory given),
enqueues N tasks, and drains them the way a fleet does: claims of B tasks, with INFLIGHT claimed
batches outstanding before the oldest is completed (4 x 25: about 100 leased tasks, as in a
3-server drain). Only script execution is counted (`--toggle-collect=evalShaCommand`), from
the first claim to the last completion.

Needs python3 with the `redis` package (`pip install redis`), valgrind and redis-server.

    python3 tests/benches/script_instructions.py [LUA_DIR] [--tasks N] [--batch B] [--inflight K]
"""

import argparse
import glob
import os
import struct
import subprocess
import sys
import tempfile
import time

import redis

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEYS = {k: "{q}:" + k for k in ("tasks", "prios", "scheduled", "events", "leases", "meta", "succeeded")}
KEYS["ready"] = "{q}:ready:"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("lua", nargs="?", default=os.path.join(ROOT, "crates/mcpq-queue/lua"))
    ap.add_argument("--tasks", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--inflight", type=int, default=4)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as dir:
        sock = os.path.join(dir, "redis.sock")
        server = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--toggle-collect=evalShaCommand",
             f"--callgrind-out-file={dir}/cg.%p", "redis-server", "--port", "0",
             "--unixsocket", sock, "--save", "", "--dir", dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            print(f"{run(a, dir, sock, server.pid):.0f} instructions per task (claim + complete)")
        finally:
            server.terminate()
            server.wait(timeout=30)


def run(a, dir, sock, pid):
    r = redis.Redis(unix_socket_path=sock)
    for _ in range(600):  # valgrind takes a few seconds to start the server
        try:
            r.ping()
            break
        except (redis.ConnectionError, FileNotFoundError):
            time.sleep(0.1)
    else:
        sys.exit("redis-server under valgrind did not start within 60 s")

    def load(name):
        with open(os.path.join(a.lua, "prelude.lua")) as p, open(os.path.join(a.lua, name)) as s:
            return r.register_script(p.read() + s.read())

    enqueue, claim, complete = load("enqueue.lua"), load("claim.lua"), load("complete.lua")
    spec, result = os.urandom(100), os.urandom(60)
    for start in range(0, a.tasks, 1000):
        args = [10000, 0, min(1000, a.tasks - start)]
        for i in range(start, min(start + 1000, a.tasks)):
            args += [struct.pack(">Q", i) + os.urandom(8), 0, 3, 1, 0, 0, spec]
        enqueue(keys=[KEYS[k] for k in ("tasks", "ready", "prios", "scheduled", "events")], args=args)

    control = lambda *c: subprocess.run(["callgrind_control", *c, str(pid)], capture_output=True, check=True)
    control("-z")
    pending, done = [], 0

    def settle_oldest():
        items = pending.pop(0)
        complete(keys=[KEYS[k] for k in ("tasks", "leases", "succeeded", "events")],
                 args=[10000, len(items) // 4] + items)
        return len(items) // 4

    while True:
        if len(pending) >= a.inflight:
            done += settle_oldest()
        got = claim(keys=[KEYS[k] for k in ("tasks", "ready", "prios", "leases", "events", "meta")],
                    args=[10000, a.batch, 60000, 0, 64])
        if not got:
            break
        items = []
        ids = got[2]  # the claimed ids, 16 bytes each, then one record per id
        for k, rec in enumerate(got[3:]):
            token = struct.unpack(">I", rec[11:15])[0]
            items += [ids[16 * k:16 * k + 16], token, "s1", result]
        pending.append(items)
    while pending:
        done += settle_oldest()
    if done != a.tasks:
        sys.exit(f"drained {done} of {a.tasks} tasks")
    control("-d")
    dump = max(glob.glob(os.path.join(dir, "cg.*.*")), key=os.path.getmtime)
    with open(dump) as f:
        total = next(int(l.split()[1]) for l in f if l.startswith("totals:"))
    return total / done


if __name__ == "__main__":
    main()
