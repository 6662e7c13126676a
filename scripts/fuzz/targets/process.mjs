/**
 * The built CLI as a process, fed mutated inputs from outside:
 *
 *  - sockets      `node packages/cli/dist/main.js incoming tcp:127.0.0.1:0 --json ...`: the
 *                 fuzzer connects like a source and sends a mutated stream, then half-closes.
 *                 Seeds: a vmig precopy stream (with the integrity section), QEMU 7.2's three
 *                 connections (`--multifd-channels 2`; one of the three mutated), postcopy
 *                 command streams (`--postcopy`);
 *  - restore-cli  `vmig restore FILE --json` on a mutated snapshot file.
 *
 * Outcome of one run:
 *  - crash: killed by a signal, an exit code other than 0/1, a stack trace or 'Uncaught' on
 *    stderr, no final JSON report with a status, a report that contradicts the exit code, an
 *    error code outside VMIG_ERR_* or VMIG_ERR_INTERNAL, or a report whose message is a JavaScript engine error
 *    (a TypeError/RangeError the CLI wrapped into a VmigError: the in-process targets count
 *    those as crashes too);
 *  - hang: still running `processHangMs` after the input ended (then killed);
 *  - rejected: exit 1 with a VMIG_ERR_ code;
 *  - ok: exit 0; the RAM it dumped (--dump-ram) is compared with what the unmutated stream
 *    gives (wrongRam). With --integrity, vmig precopy streams go to `incoming --integrity`:
 *    a wrong RAM there is a strict failure. QEMU and postcopy streams cannot carry digests.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CLI_MAIN } from '../pkgs.mjs';
import { mutate } from '../mutate.mjs';
import * as S from '../seeds.mjs';
import { incomingSeeds, postcopySeeds, snapshotSeeds, loadOnceForScreening, MAX_RAM } from './loadvm.mjs';

/** A JavaScript engine error inside a report's message: an internal error the CLI wrapped. */
const ENGINE_ERROR = /Cannot read propert|Cannot set propert|is not a function|is not iterable|is not defined|is not a constructor|Invalid array length|Invalid typed array length|Array buffer allocation failed|Maximum call stack|out of memory|Cannot access|Cannot convert|outside bitmap|offset is out of bounds|Unexpected token|undefined|\bNaN\b/;
const STACK = /Uncaught|\n\s+at \S.*:\d+:\d+\)?\s*(\n|$)|"stack":/;

function refBytes(seed) {
  return Buffer.concat(seed.refFresh.blocks.map((b) => b.bytes));
}

/** The seeds, each with what to send and the flags to run `incoming` with. */
export async function prepareProcessTargets(opts) {
  const incoming = await incomingSeeds();
  const postcopy = await postcopySeeds();
  const q = S.qemuCapture();
  const sockets = [];
  for (const s of incoming.filter((x) => x.name.startsWith('vmig-precopy'))) {
    const strict = opts.integrity && s.integrity === true;
    sockets.push({ name: s.name, conns: [s], args: strict ? ['--integrity'] : [], ref: refBytes(s), strict });
  }
  sockets.push({
    name: 'qemu-7.2-multifd-2ch',
    conns: [incoming.find((s) => s.name === 'qemu-7.2-conn0'), { bytes: q.conn1, hot: S.packetHot(q.conn1.subarray(64)).map((h) => h + 64).concat([0, 4, 24]), tokens: S.MULTIFD_TOKENS }, { bytes: q.conn2, hot: S.packetHot(q.conn2.subarray(64)).map((h) => h + 64).concat([0, 4, 24]), tokens: S.MULTIFD_TOKENS }],
    args: ['--multifd-channels', '2'],
    ref: Buffer.from(q.ram),
    strict: false,
  });
  for (const s of postcopy) sockets.push({ name: s.name, conns: [s], args: ['--postcopy'], ref: refBytes(s), strict: false });
  const restores = (await snapshotSeeds()).map((s) => ({ name: s.name, conns: [s], ref: refBytes(s), seed: s }));
  const dir = mkdtempSync(join(tmpdir(), 'vmig-fuzz-proc-'));
  return { sockets, restores, dir };
}

export function closeProcessTargets(state) {
  rmSync(state.dir, { recursive: true, force: true });
}

/** Runs the CLI, collects its JSON lines and stderr; `onLine` sees each JSON line. */
function runCli(args, onLine) {
  const child = spawn(process.execPath, [CLI_MAIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const lines = [];
  let stderr = '';
  let partial = '';
  child.stdout.setEncoding('utf8');
  child.stdout.on('data', (d) => {
    partial += d;
    let nl;
    while ((nl = partial.indexOf('\n')) >= 0) {
      const text = partial.slice(0, nl);
      partial = partial.slice(nl + 1);
      try {
        const l = JSON.parse(text);
        lines.push(l);
        onLine?.(l);
      } catch {
        lines.push({ unparsed: text });
      }
    }
  });
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (d) => (stderr += d.length + stderr.length < 200_000 ? d : ''));
  const done = new Promise((resolve) => child.on('close', (code, signal) => resolve({ code, signal, lines, stderr })));
  return { child, done };
}

/** Classifies a finished run. `dump`: the file --dump-ram wrote (exit 0). */
function classify(run, { ref, strict, dump, hung }) {
  if (hung) return { kind: 'hang', error: `still running after the input ended; stderr: ${run.stderr.slice(-300)}` };
  const report = [...run.lines].reverse().find((l) => l.event === 'report');
  const tail = `exit ${run.code}/${run.signal}, report ${JSON.stringify(report?.error ?? report?.status)}, stderr ${run.stderr.slice(-400)}`;
  if (run.signal) return { kind: 'crash', code: run.signal, error: `killed by ${run.signal}: ${tail}` };
  if (run.code !== 0 && run.code !== 1) return { kind: 'crash', code: `exit ${run.code}`, error: tail };
  if (STACK.test(run.stderr)) return { kind: 'crash', code: 'stack-trace', error: tail };
  if (!report || typeof report.status !== 'string') return { kind: 'crash', code: 'no-report', error: tail };
  if (run.lines.at(-1) !== report) return { kind: 'crash', code: 'report-not-last', error: tail };
  if ((run.code === 0) !== (report.status === 'completed')) return { kind: 'crash', code: 'status-vs-exit', error: tail };
  if (run.code === 1) {
    const code = report.error?.code;
    // VMIG_ERR_INTERNAL: the CLI's own word for an error nobody expected.
    if (typeof code !== 'string' || !code.startsWith('VMIG_ERR_') || code === 'VMIG_ERR_INTERNAL') return { kind: 'crash', code: String(code), error: tail };
    if (ENGINE_ERROR.test(report.error?.message ?? '')) return { kind: 'crash', code: `internal (${code})`, error: `an engine error reported as ${code}: ${report.error.message}` };
    return { kind: 'rejected', code };
  }
  let got;
  try {
    got = readFileSync(dump);
  } catch (e) {
    return { kind: 'crash', code: 'no-dump', error: `exit 0 without its --dump-ram file: ${e.message}` };
  }
  // Strict: the run required the integrity check (--integrity) or its report says it passed.
  return got.equals(ref) ? { kind: 'ok' } : { kind: 'ok', wrongRam: { strict: strict || report.integrity?.verified === true } };
}

function connect(port) {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    s.on('error', () => {});
    s.on('data', () => {}); // the return path: read and drop
    s.once('connect', () => resolve(s));
    s.once('error', () => resolve(undefined));
  });
}

/** One `vmig incoming` run over sockets. */
export async function runSocketInput(state, rng, index, opts) {
  const seed = rng.pick(state.sockets);
  // One connection of the seed is mutated (the main one twice as often).
  const which = seed.conns.length === 1 ? 0 : rng.weighted([[2, 0], [1, 1], [1, 2]]);
  const datas = seed.conns.map((c) => c.bytes);
  const m = mutate(rng, seed.conns[which], []);
  datas[which] = m.bytes;
  const dump = join(state.dir, `dump-${index}.bin`);
  let extra = seed.args;
  if (seed.name.startsWith('qemu')) {
    // Mostly the channel count the capture has; sometimes one the source does not match, and
    // sometimes insisting on QEMU 7.2's dialect (which it speaks).
    extra = ['--multifd-channels', String(rng.weighted([[8, 2], [1, 1], [1, 4]])), ...(rng.chance(0.3) ? ['--multifd-flush-after-each-section'] : [])];
  }
  const args = ['incoming', 'tcp:127.0.0.1:0', '--json', '--channel-timeout', String(opts.channelTimeoutMs), '--max-ram', `${MAX_RAM >> 20}M`, '--dump-ram', dump, ...extra];
  // Half the time each connection's bytes go in pieces, a turn of the event loop apart, so
  // that the destination's reads end inside fields.
  const pieces = rng.chance(0.5) ? rng.range(2, 12) : 1;
  let listening;
  const gotListening = new Promise((r) => (listening = r));
  const { child, done } = runCli(args, (l) => l.event === 'listening' && listening(l));
  const t0 = performance.now();
  let hung = false;
  const socks = [];
  try {
    let startTimer;
    const first = await Promise.race([gotListening, done.then(() => undefined), new Promise((r) => (startTimer = setTimeout(r, 30_000)))]);
    clearTimeout(startTimer);
    if (first) {
      const port = Number(String(first.uri).split(':').pop());
      for (const d of datas) {
        const s = await connect(port);
        if (!s) break;
        socks.push(s);
        if (pieces === 1) s.write(Buffer.from(d));
        else {
          const cuts = [...new Set(Array.from({ length: pieces - 1 }, () => rng.int(d.length + 1)))].sort((a, b) => a - b);
          let prev = 0;
          for (const c of [...cuts, d.length]) {
            s.write(Buffer.from(d.subarray(prev, c)));
            prev = c;
            await new Promise((r) => setTimeout(r, 1));
          }
        }
      }
      for (const s of socks) s.end();
    }
    // A main stream that does not begin with QEVM is turned away, and `incoming` goes on
    // listening for a source, by design (as QEMU's -incoming waits): not a hang. Such a run
    // gets a shorter wait, and is counted as turned away if its log says so.
    const notQevm = datas[0].length < 4 || Buffer.compare(Buffer.from(datas[0].subarray(0, 4)), Buffer.from('QEVM')) !== 0;
    const wait = notQevm ? Math.min(opts.processHangMs, opts.channelTimeoutMs + 3000) : opts.processHangMs;
    let timer;
    const exited = await Promise.race([done.then(() => true), new Promise((r) => (timer = setTimeout(() => r(false), wait)))]);
    clearTimeout(timer);
    if (!exited) {
      hung = true;
      child.kill('SIGKILL');
    }
  } finally {
    for (const s of socks) s.destroy();
  }
  const run = await done;
  let outcome = classify(run, { ref: seed.ref, strict: seed.strict, dump, hung });
  if (hung && /connection turned away/.test(run.stderr) && /neither a migration stream/.test(run.stderr) && datas.length === 1) {
    outcome = { kind: 'rejected', code: 'turned-away (still listening)' };
  }
  rmSync(dump, { force: true });
  return { ...outcome, seed: `${seed.name}${seed.conns.length > 1 ? `/conn${which}` : ''}`, ops: m.ops, input: datas[which], ms: Math.round(performance.now() - t0), args: extra };
}

/** One `vmig restore` run on a mutated snapshot file. */
export async function runRestoreInput(state, rng, index, opts) {
  const seed = rng.pick(state.restores);
  const m = mutate(rng, seed.conns[0], state.restores.map((r) => r.conns[0]).filter((c) => c !== seed.conns[0]));
  // restore builds whatever RAM a file declares, pre-faulted, with no cap: a file declaring
  // gigabytes would take this machine's memory. Screen in process first; skip those.
  if (await loadOnceForScreening(seed.seed, m.bytes)) return { kind: 'skipped', note: 'restore-uncapped-ram', seed: seed.name, ops: m.ops, input: m.bytes };
  const file = join(state.dir, `snap-${index}.bin`);
  const dump = join(state.dir, `restored-${index}.bin`);
  writeFileSync(file, m.bytes);
  const t0 = performance.now();
  const { child, done } = runCli(['restore', file, '--json', '--dump-ram', dump]);
  let timer;
  const exited = await Promise.race([done.then(() => true), new Promise((r) => (timer = setTimeout(() => r(false), opts.processHangMs)))]);
  clearTimeout(timer);
  if (!exited) child.kill('SIGKILL');
  const run = await done;
  const outcome = classify(run, { ref: seed.ref, strict: false, dump, hung: !exited });
  rmSync(file, { force: true });
  rmSync(dump, { force: true });
  return { ...outcome, seed: seed.name, ops: m.ops, input: m.bytes, ms: Math.round(performance.now() - t0) };
}
