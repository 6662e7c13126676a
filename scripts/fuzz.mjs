#!/usr/bin/env node
/**
 * vmig's fuzzer (a tool, not a test): mutated inputs thrown at every decoder, in process and
 * at the built CLI over sockets; prints one JSON object with what happened and exits 1 if
 * anything crashed or hung.
 *
 *   node scripts/fuzz.mjs [--iterations N] [--seed S] [--target NAME[,NAME...]] [--sockets N]
 *                         [--restores N] [--integrity] [--concurrency C] [--hang-ms MS]
 *                         [--process-hang-ms MS] [--channel-timeout MS] [--save DIR]
 *                         [--repro TARGET:INDEX] [--quiet]
 *
 * Run it after a build (`npx -y pnpm@10.34.8 run build`): it imports packages/*\/dist and
 * spawns packages/cli/dist/main.js.
 *
 *   --iterations N     in-process inputs in all (default 100000), shared by the in-process
 *                      targets by weight (targets/index.mjs)
 *   --sockets N        `vmig incoming` runs fed over TCP (default 200)
 *   --restores N       `vmig restore` runs on mutated snapshot files (default sockets / 4)
 *   --target NAMES     only these targets (comma-separated); see --list
 *   --seed S           every input is a function of (S, target, index) alone (default 1)
 *   --integrity        vmig precopy streams go to `incoming --integrity` (in process: the
 *                      digests are required), and an exit 0 with RAM other than sent counts as
 *                      a failure for them (exit0WrongRamStrict, exit code 1); without it, only
 *                      a load whose integrity check passed with RAM other than sent does
 *   --concurrency C    CLI processes at once (default 2)
 *   --hang-ms MS       in process: a load still running this long after its input was
 *                      exhausted is a hang (default 2000)
 *   --process-hang-ms  a CLI still running this long after its input ended is a hang, then
 *                      killed (default 20000)
 *   --channel-timeout  passed to `vmig incoming` (default 5000): its own bounded waits must
 *                      end well within --process-hang-ms
 *   --save DIR         write every input that crashed, hung or broke the integrity promise
 *                      there, as TARGET-INDEX.bin
 *   --repro T:I        rebuild input I of target T, run it alone, print everything about it
 *                      (with --save DIR, also its bytes); in this process, without the
 *                      watchdog: an input that loops synchronously loops here too
 *   --list             the target names
 *
 * Output (stdout): {inputs, byTarget: {NAME: {inputs, ok, rejected, crashes, hangs,
 * exit0WrongRam, exit0WrongRamStrict, skipped, codes}}, crashes: [the first 25: {target,
 * index, kind, code, seed, ops, len, hex, error}], signatures: [distinct problems, with
 * counts and a first input], wrongRam: [a few examples], notes, durationMs, options}.
 * Progress goes to stderr. Exit code 1 if anything crashed or hung, or loaded other RAM than
 * it carried although the integrity check was required (--integrity) or said it passed
 * (exit0WrongRamStrict).
 */
import { fork } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { Rng } from './fuzz/rng.mjs';
import { hexPrefix } from './fuzz/mutate.mjs';
import { ALL_TARGETS, IN_PROCESS, PROCESS_TARGETS, inProcessTarget } from './fuzz/targets/index.mjs';
import { closeProcessTargets, prepareProcessTargets, runRestoreInput, runSocketInput } from './fuzz/targets/process.mjs';

process.setSourceMapsEnabled(true);

const { values } = parseArgs({
  options: {
    iterations: { type: 'string' },
    seed: { type: 'string' },
    target: { type: 'string' },
    sockets: { type: 'string' },
    restores: { type: 'string' },
    integrity: { type: 'boolean' },
    concurrency: { type: 'string' },
    'hang-ms': { type: 'string' },
    'process-hang-ms': { type: 'string' },
    'channel-timeout': { type: 'string' },
    save: { type: 'string' },
    repro: { type: 'string' },
    quiet: { type: 'boolean' },
    list: { type: 'boolean' },
  },
  strict: true,
});

function int(name, dflt, min = 0) {
  const v = values[name];
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isInteger(n) || n < min) {
    process.stderr.write(`fuzz: --${name} must be an integer >= ${min}\n`);
    process.exit(2);
  }
  return n;
}

if (values.list) {
  process.stdout.write(ALL_TARGETS.join('\n') + '\n');
  process.exit(0);
}

const sockets = int('sockets', 200);
const opts = {
  seed: values.seed ?? '1',
  iterations: int('iterations', 100_000),
  sockets,
  restores: int('restores', Math.ceil(sockets / 4)),
  integrity: values.integrity === true,
  concurrency: int('concurrency', 2, 1),
  hangMs: int('hang-ms', 2000, 100),
  processHangMs: int('process-hang-ms', 20_000, 1000),
  channelTimeoutMs: int('channel-timeout', 5000, 100),
  saveDir: values.save,
};
const selected = values.target ? values.target.split(',').map((s) => s.trim()).filter(Boolean) : ALL_TARGETS;
for (const t of selected) {
  if (!ALL_TARGETS.includes(t)) {
    process.stderr.write(`fuzz: unknown target '${t}' (one of ${ALL_TARGETS.join(', ')})\n`);
    process.exit(2);
  }
}
const log = (s) => values.quiet || process.stderr.write(`[fuzz] ${s}\n`);

/* ------------------------------------------------------------------ tally */

const byTarget = {};
const crashes = [];
const wrongRam = [];
const notes = {};
const MAX_LISTED = 25;

function tallyFor(name) {
  return (byTarget[name] ??= { inputs: 0, ok: 0, rejected: 0, crashes: 0, hangs: 0, exit0WrongRam: 0, exit0WrongRamStrict: 0, skipped: 0, codes: {} });
}

/** Distinct problems: same kind, code and place (the first frame in packages/, else the message without numbers). */
const signatures = new Map();
function signatureOf(target, m) {
  const frame = /\/packages\/[^\s|)]+:\d+/.exec(m.e ?? '')?.[0];
  const what = frame ?? (m.e ?? '').replace(/\d+/g, '#').replace(/\(\d+ bytes\)/g, '').slice(0, 120);
  return `${target} ${m.k} ${m.c ?? ''} ${what}`;
}

/** Records one outcome (msg: the runner's compact form, or a process target's outcome). */
function record(target, index, m) {
  const t = tallyFor(target);
  t.inputs++;
  if (m.k === 'ok') t.ok++;
  else if (m.k === 'rejected') t.rejected++;
  else if (m.k === 'crash') t.crashes++;
  else if (m.k === 'hang') t.hangs++;
  else if (m.k === 'skipped') t.skipped++;
  if (m.c !== undefined && m.k !== 'ok') t.codes[m.c] = (t.codes[m.c] ?? 0) + 1;
  if (m.w) {
    t.exit0WrongRam++;
    if (m.w === 2) t.exit0WrongRamStrict++;
    if (wrongRam.length < MAX_LISTED / 5 || m.w === 2) wrongRam.push({ target, index, strict: m.w === 2, seed: m.seed, ops: m.ops, hex: m.hex });
  }
  if (m.n) notes[m.n] = (notes[m.n] ?? 0) + 1;
  if (m.k === 'crash' || m.k === 'hang' || m.w === 2) {
    const sig = m.w === 2 ? `${target} exit0-wrong-ram-with-integrity ${m.seed} ${m.ops?.join('+')}` : signatureOf(target, m);
    const entry = signatures.get(sig) ?? { signature: sig, count: 0, first: { target, index } };
    entry.count++;
    signatures.set(sig, entry);
  }
  if ((m.k === 'crash' || m.k === 'hang') && crashes.length < MAX_LISTED) {
    crashes.push({ target, index, kind: m.k, code: m.c, seed: m.seed, ops: m.ops, len: m.len, hex: m.hex, error: m.e, ...(m.args ? { args: m.args } : {}) });
  }
}

/** A process target's outcome in the runner's compact form. */
function compact(out) {
  const m = { k: out.kind, c: out.code, n: out.note, seed: out.seed, ops: out.ops };
  if (out.wrongRam) m.w = out.wrongRam.strict ? 2 : 1;
  if (out.kind === 'crash' || out.kind === 'hang' || out.wrongRam) {
    m.hex = hexPrefix(out.input ?? new Uint8Array(0));
    m.len = out.input?.length;
    m.e = out.error;
    m.args = out.args;
  }
  return m;
}

/* ------------------------------------------------------------------ budget */

/** The in-process jobs: --iterations shared by weight among the selected targets. */
function inProcessJobs() {
  const chosen = IN_PROCESS.filter((t) => selected.includes(t.target.name));
  const total = chosen.reduce((n, t) => n + t.weight, 0);
  let left = opts.iterations;
  return chosen.map((t, i) => {
    const n = i === chosen.length - 1 ? left : Math.floor((opts.iterations * t.weight) / total);
    left -= n;
    return { name: t.target.name, start: 0, end: n };
  });
}

/* ------------------------------------------------------------------ in-process runner */

/**
 * Runs `jobs` in a child (runner.mjs), restarting it after a native crash or a stuck input:
 * the input that was running when it died or went quiet is recorded, and the child resumes
 * with the next one.
 */
async function runInProcess(jobs) {
  const script = fileURLToPath(new URL('./fuzz/runner.mjs', import.meta.url));
  const syncHangMs = opts.hangMs + 8000;
  let remaining = jobs.map((j) => ({ ...j }));
  let lastProgress = performance.now();
  while (remaining.some((j) => j.start < j.end)) {
    const child = fork(script, [], { execArgv: ['--enable-source-maps'], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    let current = remaining.find((j) => j.start < j.end);
    let next = current.start; // the input the child is on
    let preparing = true;
    let last = performance.now();
    let finished = false;
    let fatal;
    child.on('message', (msg) => {
      last = performance.now();
      if (msg[0] === 'prep') {
        current = remaining.find((j) => j.name === msg[1]);
        next = current.start;
        preparing = true;
      } else if (msg[0] === 'r') {
        preparing = false;
        const [, name, index, m] = msg;
        record(name, index, m);
        const job = remaining.find((j) => j.name === name);
        job.start = index + 1;
        current = job;
        next = index + 1;
        if (performance.now() - lastProgress > 5000) {
          lastProgress = performance.now();
          log(`${name} ${index + 1}/${job.end}; ${Object.entries(byTarget).map(([n, t]) => `${n}: ${t.crashes} crash ${t.hangs} hang`).join(', ')}`);
        }
      } else if (msg[0] === 'done') {
        finished = true;
        // Its work is over: it must not keep the run waiting on a handle left open.
        setTimeout(() => child.kill('SIGKILL'), 1000).unref();
      } else if (msg[0] === 'fatal') {
        fatal = msg[1];
      }
    });
    child.send([remaining, { seed: opts.seed, hangMs: opts.hangMs, integrity: opts.integrity, saveDir: opts.saveDir }]);
    const exit = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
    // Watchdog: an input that keeps the child quiet past the bound is stuck in it.
    let stuck = false;
    const dog = setInterval(() => {
      const quiet = performance.now() - last;
      if (!finished && ((!preparing && quiet > syncHangMs) || quiet > 120_000)) {
        stuck = true;
        child.kill('SIGKILL');
      }
    }, 250);
    const { code, signal } = await exit;
    clearInterval(dog);
    if (fatal) throw new Error(`fuzz runner failed: ${fatal}`);
    if (finished) break;
    if (preparing && !stuck) throw new Error(`fuzz runner died while preparing ${current?.name} (exit ${code}/${signal})`);
    // It died in, or was stuck in, input `next` of `current`.
    const kind = stuck ? 'hang' : 'crash';
    record(current.name, next, { k: kind, c: stuck ? 'stuck' : `child ${code}/${signal}`, e: stuck ? `the input kept the process busy for ${syncHangMs} ms (a synchronous loop?)` : `the fuzzing process died (exit ${code}, signal ${signal})`, seed: '(rebuild with --repro)', hex: '' });
    log(`${current.name} input ${next}: ${kind}; restarting after it`);
    current.start = next + 1;
    remaining = remaining.filter((j) => j.start < j.end);
  }
}

/* ------------------------------------------------------------------ process targets */

async function runProcesses() {
  const want = { sockets: selected.includes('sockets') ? opts.sockets : 0, 'restore-cli': selected.includes('restore-cli') ? opts.restores : 0 };
  if (want.sockets + want['restore-cli'] === 0) return;
  const state = await prepareProcessTargets(opts);
  const queue = [];
  for (let i = 0; i < want.sockets; i++) queue.push(['sockets', i]);
  for (let i = 0; i < want['restore-cli']; i++) queue.push(['restore-cli', i]);
  // Interleaved, so that a shorter run still covers both.
  queue.sort((a, b) => a[1] / Math.max(1, want[a[0]]) - b[1] / Math.max(1, want[b[0]]));
  let done = 0;
  const workers = Array.from({ length: opts.concurrency }, async () => {
    for (let item = queue.shift(); item; item = queue.shift()) {
      const [name, i] = item;
      const rng = Rng.for(opts.seed, name, i);
      const out = name === 'sockets' ? await runSocketInput(state, rng, i, opts) : await runRestoreInput(state, rng, i, opts);
      record(name, i, compact(out));
      if (opts.saveDir && (out.kind === 'crash' || out.kind === 'hang' || out.wrongRam?.strict)) {
        mkdirSync(opts.saveDir, { recursive: true });
        writeFileSync(join(opts.saveDir, `${name}-${i}.bin`), out.input);
      }
      if (++done % 20 === 0) log(`processes ${done}/${want.sockets + want['restore-cli']}`);
    }
  });
  await Promise.all(workers);
  closeProcessTargets(state);
}

/* ------------------------------------------------------------------ --repro */

async function repro(spec) {
  const [name, idx] = spec.split(':');
  const index = Number(idx);
  if (!ALL_TARGETS.includes(name) || !Number.isInteger(index)) {
    process.stderr.write('fuzz: --repro TARGET:INDEX\n');
    process.exit(2);
  }
  const rng = Rng.for(opts.seed, name, index);
  let out;
  if (PROCESS_TARGETS.includes(name)) {
    const state = await prepareProcessTargets(opts);
    out = name === 'sockets' ? await runSocketInput(state, rng, index, opts) : await runRestoreInput(state, rng, index, opts);
    closeProcessTargets(state);
  } else {
    const target = inProcessTarget(name);
    const state = await target.prepare();
    out = await target.run(state, rng, opts);
    await target.close?.(state);
  }
  if (opts.saveDir && out.input) {
    mkdirSync(opts.saveDir, { recursive: true });
    writeFileSync(join(opts.saveDir, `${name}-${index}.bin`), out.input);
  }
  const { input, ...rest } = out;
  process.stdout.write(JSON.stringify({ target: name, index, seed: opts.seed, ...rest, len: input?.length, hex: input ? Buffer.from(input.subarray(0, 256)).toString('hex') : undefined }, null, 2) + '\n', () => process.exit(0));
  await new Promise(() => {}); // until the write's callback exits
}

/* ------------------------------------------------------------------ main */

if (values.repro) await repro(values.repro);

const t0 = performance.now();
const jobs = inProcessJobs();
log(`seed ${opts.seed}; in process: ${jobs.map((j) => `${j.name} ${j.end}`).join(', ') || 'none'}; sockets ${selected.includes('sockets') ? opts.sockets : 0}, restores ${selected.includes('restore-cli') ? opts.restores : 0}`);
await Promise.all([jobs.length ? runInProcess(jobs) : undefined, runProcesses()]);

const inputs = Object.values(byTarget).reduce((n, t) => n + t.inputs, 0);
const totals = Object.values(byTarget).reduce((a, t) => ({ crashes: a.crashes + t.crashes, hangs: a.hangs + t.hangs, strict: a.strict + t.exit0WrongRamStrict }), { crashes: 0, hangs: 0, strict: 0 });
const result = {
  inputs,
  byTarget,
  crashes,
  signatures: [...signatures.values()].sort((a, b) => b.count - a.count),
  wrongRam,
  notes,
  durationMs: Math.round(performance.now() - t0),
  options: { ...opts, targets: selected },
};
const exitCode = totals.crashes + totals.hangs + totals.strict > 0 ? 1 : 0;
// Exit once stdout has drained (a socket or timer of a killed run must not hold it open).
process.stdout.write(JSON.stringify(result, null, 2) + '\n', () => process.exit(exitCode));
