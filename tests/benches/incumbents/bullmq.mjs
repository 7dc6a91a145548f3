// BullMQ, the incumbent Redis job queue of Node.js, through the workload of mcpq's queue bench
// (tests/benches/queue.rs), against the same kind of redis-server: N no-op jobs enqueued by 2
// producers in batches of 1,000 (`addBulk`), then drained by one Worker, then the concurrent
// enqueue → run → complete cycle on a fresh queue. Prints, per run and as the median of the
// runs: enqueue/s, drain/s, cycle/s, this process's CPU and Redis's CPU per job in the cycle,
// Redis commands per job (INFO commandstats, inside scripts included) and script calls per job
// over enqueue + drain, and Redis memory per queued job. Jobs keep BullMQ's defaults (kept once
// complete, as mcpq keeps finished tasks).
//
// node bullmq.mjs [--tasks N] [--runs N] [--concurrency N] [--priority]
// (run by tests/benches/incumbents.sh, which installs bullmq and ioredis)

import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Queue, Worker } from 'bullmq';
import IORedis from 'ioredis';

const PRODUCERS = 2;
const ENQUEUE_BATCH = 1000;

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  if (i < 0) return fallback;
  const v = Number(process.argv[i + 1]);
  if (!Number.isInteger(v) || v < 1) {
    throw new Error(`--${name} takes a whole number above 0, not ${process.argv[i + 1]}`);
  }
  return v;
}

const TASKS = arg('tasks', 50000);
const RUNS = arg('runs', 3);
const CONCURRENCY = arg('concurrency', 100);
// with a priority every job goes through BullMQ's prioritized set, as every mcpq task has one
const PRIORITY = process.argv.includes('--priority');

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A redis-server on a unix socket in a fresh directory, persisting nothing, as mcpq's benches use. */
async function startRedis() {
  const dir = mkdtempSync(join(tmpdir(), 'mcpq-bullmq-'));
  const socket = join(dir, 'redis.sock');
  const proc = spawn(
    'redis-server',
    ['--port', '0', '--save', '', '--appendonly', 'no', '--unixsocketperm', '700',
      '--unixsocket', socket, '--dir', dir, '--logfile', join(dir, 'redis.log')],
    { stdio: 'ignore' },
  );
  const probe = new IORedis({ path: socket, lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
  // refused connections while the server starts are expected: the loop below retries them
  probe.on('error', () => {});
  for (let i = 0; ; i++) {
    try {
      await probe.connect();
      await probe.ping();
      break;
    } catch (e) {
      if (i >= 500 || proc.exitCode !== null) {
        proc.kill('SIGKILL');
        throw new Error(`redis-server did not come up on ${socket}: ${e.message}`);
      }
      await sleep(10);
    }
  }
  return {
    socket,
    admin: probe,
    async stop() {
      probe.disconnect();
      proc.kill('SIGTERM');
      await new Promise((r) => (proc.exitCode !== null ? r() : proc.once('exit', r)));
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

function info(text) {
  const out = {};
  for (const line of text.split('\r\n')) {
    const i = line.indexOf(':');
    if (i > 0) out[line.slice(0, i)] = line.slice(i + 1);
  }
  return out;
}

async function redisCpuS(admin) {
  const cpu = info(await admin.info('cpu'));
  return Number(cpu.used_cpu_user) + Number(cpu.used_cpu_sys);
}

/** (all commands, script calls) since the last CONFIG RESETSTAT, INFO and CONFIG left out. */
async function commands(admin) {
  let all = 0;
  let scripts = 0;
  for (const [k, v] of Object.entries(info(await admin.info('commandstats')))) {
    const cmd = k.replace(/^cmdstat_/, '');
    if (cmd === k || cmd === 'info' || cmd.startsWith('config')) continue;
    const calls = Number(/calls=(\d+)/.exec(v)[1]);
    all += calls;
    if (cmd === 'evalsha' || cmd === 'eval' || cmd.startsWith('script')) scripts += calls;
  }
  return { all, scripts };
}

function cpuS() {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

async function enqueueAll(queue, n) {
  const per = Math.ceil(n / PRODUCERS);
  const opts = PRIORITY ? { priority: 1 } : undefined;
  await Promise.all(
    Array.from({ length: PRODUCERS }, async (_, p) => {
      let left = Math.min(per, Math.max(0, n - p * per));
      while (left > 0) {
        const size = Math.min(left, ENQUEUE_BATCH);
        left -= size;
        await queue.addBulk(Array.from({ length: size }, () => ({ name: 'noop', data: {}, opts })));
      }
    }),
  );
}

/** Runs a worker until it completed `n` jobs: answers the seconds from its start. */
async function drain(connection, name, n, whileRunning = async () => {}) {
  const worker = new Worker(name, async () => {}, {
    connection: { ...connection, maxRetriesPerRequest: null },
    concurrency: CONCURRENCY,
    autorun: false,
  });
  let done = 0;
  let failed = null;
  const finished = new Promise((resolve) => {
    worker.on('completed', () => {
      if (++done === n) resolve();
    });
    worker.on('failed', (_job, err) => {
      failed = err;
      resolve();
    });
    worker.on('error', (err) => {
      failed = err;
      resolve();
    });
  });
  await worker.waitUntilReady();
  const t = performance.now();
  const running = worker.run();
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${name}: ${done} of ${n} jobs done after 300 s`)), 300_000);
  });
  try {
    await Promise.race([Promise.all([finished, whileRunning()]), timeout]);
  } finally {
    clearTimeout(timer);
  }
  const s = (performance.now() - t) / 1e3;
  await worker.close();
  await running;
  if (failed) throw failed;
  return s;
}

async function run() {
  const redis = await startRedis();
  try {
    const connection = { path: redis.socket };
    const queue = new Queue('bench', { connection });
    // load the scripts before measuring
    await queue.add('warmup', {});
    await queue.obliterate({ force: true });
    await redis.admin.config('RESETSTAT');
    const mem0 = Number(info(await redis.admin.info('memory')).used_memory);

    let t = performance.now();
    await enqueueAll(queue, TASKS);
    const enqueueS = (performance.now() - t) / 1e3;
    const mem1 = Number(info(await redis.admin.info('memory')).used_memory);
    const waiting = await queue.getJobCountByTypes('wait', 'prioritized');
    if (waiting !== TASKS) throw new Error(`expected ${TASKS} waiting, found ${waiting}`);

    const drainS = await drain(connection, 'bench', TASKS);
    const cmds = await commands(redis.admin);
    const counts = await queue.getJobCounts('completed', 'wait', 'prioritized', 'active', 'failed');
    if (counts.completed !== TASKS || counts.wait + counts.prioritized + counts.active + counts.failed !== 0) {
      throw new Error(`expected ${TASKS} completed and nothing else, found ${JSON.stringify(counts)}`);
    }
    await queue.close();

    // the full cycle: producers and a worker at once on a second queue
    const cycle = new Queue('cycle', { connection });
    await cycle.waitUntilReady();
    const [cpu0, redis0] = [cpuS(), await redisCpuS(redis.admin)];
    const cycleS = await drain(connection, 'cycle', TASKS, () => enqueueAll(cycle, TASKS));
    const [cpu1, redis1] = [cpuS(), await redisCpuS(redis.admin)];
    const cycleDone = await cycle.getJobCountByTypes('completed');
    if (cycleDone !== TASKS) throw new Error(`cycle: expected ${TASKS} completed, found ${cycleDone}`);
    await cycle.close();

    return [
      TASKS / enqueueS,
      TASKS / drainS,
      TASKS / cycleS,
      ((cpu1 - cpu0) * 1e6) / TASKS,
      ((redis1 - redis0) * 1e6) / TASKS,
      cmds.all / TASKS,
      cmds.scripts / TASKS,
      (mem1 - mem0) / TASKS,
    ];
  } finally {
    await redis.stop();
  }
}

const COLS = [
  ['enqueue/s', 10, 0],
  ['drain/s', 10, 0],
  ['cycle/s', 9, 0],
  ['client µs', 10, 1],
  ['redis µs', 10, 1],
  ['cmds/task', 9, 2],
  ['scripts/task', 12, 3],
  ['bytes/task', 10, 1],
];

const row = (label, values) =>
  `${label.padStart(6)} ${COLS.map(([, w, d], i) => values[i].toFixed(d).padStart(w)).join(' ')}`;

function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

// installed beside this file by incumbents.sh, as the imports above are
const bullmqVersion = JSON.parse(
  readFileSync(new URL('./node_modules/bullmq/package.json', import.meta.url), 'utf8'),
).version;
console.log(
  `BullMQ ${bullmqVersion}, node ${process.versions.node}: ${TASKS} no-op jobs, ` +
    `${PRODUCERS} producers in batches of ${ENQUEUE_BATCH}, one worker of concurrency ${CONCURRENCY}` +
    `${PRIORITY ? ', every job with a priority' : ''}`,
);
console.log(`${''.padStart(6)} ${COLS.map(([h, w]) => h.padStart(w)).join(' ')}`);
const runs = [];
for (let i = 1; i <= RUNS; i++) {
  const values = await run();
  runs.push(values);
  console.log(row(`run ${i}`, values));
}
console.log(row('median', COLS.map((_, i) => median(runs.map((r) => r[i])))));
console.log(`json ${JSON.stringify({ tasks: TASKS, concurrency: CONCURRENCY, priority: PRIORITY, runs })}`);
