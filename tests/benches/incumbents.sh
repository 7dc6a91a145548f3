#!/usr/bin/env bash
# incumbents.sh — mcpq's Redis queue against the incumbent job queues on Redis — BullMQ (Node.js)
# and Celery (Python, Redis as its broker) — through one workload on this machine: N no-op jobs
# enqueued by 2 producers (in batches of 1,000 where the queue has batches), drained, then
# enqueued and run at once on a fresh queue, against a redis-server on a unix socket that persists
# nothing. Prints four tables, each run and the median:
#   1. mcpq, claims and completes in batches of 250 by 4 workers (how its WorkQueue claims);
#   2. mcpq, one task per claim and per complete by 100 workers (a round trip per task, as a
#      BullMQ worker makes);
#   3. BullMQ (pinned below), one Worker of concurrency 100, jobs kept once complete as mcpq keeps
#      finished tasks;
#   4. Celery (pinned below), one worker with the solo pool (the fastest here for no-op tasks),
#      results not stored.
# Installs bullmq and ioredis, and a virtualenv with celery and redis-py, into /tmp/mcpq-incumbents
# (idempotent); needs redis-server, node, npm and python3 (with venv) on PATH, and cargo for
# mcpq's side (a release build).
#   bash tests/benches/incumbents.sh [--tasks N] [--runs N] [--concurrency N] [--priority] [--no-celery]
# --concurrency and --priority (every BullMQ job given a priority, which sends it through BullMQ's
# prioritized set; every mcpq task has one) apply to BullMQ only; --no-celery leaves Celery out
# (about 5 minutes of the run at 50,000 tasks).
set -euo pipefail
cd "$(dirname "$0")/../.."

DIR=/tmp/mcpq-incumbents
BULLMQ=6.7.0
IOREDIS=5.11.1
WANT="bullmq@$BULLMQ ioredis@$IOREDIS"
PY_WANT="celery==5.7.0 kombu==5.7.0 redis==8.1.0 packaging==26.3"

tasks=50000
runs=3
bull_args=()
celery=1
while [ $# -gt 0 ]; do
  case "$1" in
    --tasks) tasks=${2:?--tasks takes a number}; shift 2 ;;
    --runs) runs=${2:?--runs takes a number}; shift 2 ;;
    --concurrency) bull_args+=(--concurrency "${2:?--concurrency takes a number}"); shift 2 ;;
    --priority) bull_args+=(--priority); shift ;;
    --no-celery) celery=0; shift ;;
    *) echo "incumbents.sh: unknown argument $1 (--tasks N, --runs N, --concurrency N, --priority, --no-celery)" >&2; exit 2 ;;
  esac
done
for v in "$tasks" "$runs"; do
  [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "incumbents.sh: --tasks and --runs take a whole number above 0, not $v" >&2; exit 2; }
done

tools=(redis-server node npm cargo)
[ "$celery" = 1 ] && tools+=(python3)
for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null || { echo "incumbents.sh: $tool is not on PATH" >&2; exit 3; }
done

mkdir -p "$DIR"
if [ "$(cat "$DIR/.installed" 2>/dev/null)" != "$WANT" ]; then
  echo "incumbents.sh: installing $WANT into $DIR" >&2
  cat >"$DIR/package.json" <<EOF
{ "name": "mcpq-incumbents", "private": true, "type": "module",
  "dependencies": { "bullmq": "$BULLMQ", "ioredis": "$IOREDIS" } }
EOF
  (cd "$DIR" && npm install --silent --no-audit --no-fund >"$DIR/install.log" 2>&1) ||
    { echo "incumbents.sh: npm install failed; see $DIR/install.log" >&2; exit 3; }
  echo "$WANT" >"$DIR/.installed"
fi
# an ES module resolves its imports next to itself
cp tests/benches/incumbents/bullmq.mjs "$DIR/bullmq.mjs"
if [ "$celery" = 1 ] && [ "$(cat "$DIR/py/.installed" 2>/dev/null)" != "$PY_WANT" ]; then
  echo "incumbents.sh: installing $PY_WANT into $DIR/py" >&2
  rm -rf "$DIR/py"
  python3 -m venv "$DIR/py" >"$DIR/venv.log" 2>&1 ||
    { echo "incumbents.sh: python3 -m venv failed (apt-get install -y python3-venv); see $DIR/venv.log" >&2; exit 3; }
  # shellcheck disable=SC2086 # the pins are separate words
  "$DIR/py/bin/pip" install -q $PY_WANT >"$DIR/pip.log" 2>&1 ||
    { echo "incumbents.sh: pip install failed; see $DIR/pip.log" >&2; exit 3; }
  echo "$PY_WANT" >"$DIR/py/.installed"
fi

echo "== mcpq, batches of 250, 4 workers"
cargo bench -q -p mcpq-tests --bench queue -- --store redis --tasks "$tasks" --runs "$runs"
echo
echo "== mcpq, one task per call, 100 workers"
cargo bench -q -p mcpq-tests --bench queue -- --store redis --tasks "$tasks" --runs "$runs" --batch 1 --workers 100
echo
echo "== BullMQ"
node "$DIR/bullmq.mjs" --tasks "$tasks" --runs "$runs" "${bull_args[@]}"
if [ "$celery" = 1 ]; then
  echo
  echo "== Celery"
  "$DIR/py/bin/python" tests/benches/incumbents/celery_bench.py --tasks "$tasks" --runs "$runs"
fi
