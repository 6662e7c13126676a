/**
 * Nothing may hang: every way a peer, a link or a channel can go wrong ends, on every
 * process, within --channel-timeout (plus a margin) with exit code 1, a final `--json`
 * report naming a stable error code, and, on a source with writers, `writersResumed: true`.
 *
 * The peers here are real `vmig` processes, fake sources written in the test (raw sockets
 * replaying the real QEMU 7.2 capture in fixtures/), and a FaultProxy (test-harness) that
 * freezes the link. Every case runs with --channel-timeout 2000 and asserts a generous hang
 * bound, never a speed. Whatever a case spawned is killed after it.
 */
import { readFileSync } from 'node:fs';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { MULTIFD_INIT_SIZE } from '@vmig/multifd';
import { type CliProcess, type CliRun, FaultProxy, spawnCli } from '@vmig/test-harness';
import { CLI_MAIN } from './cli.js';
import { ControlClient } from '@vmig/test-harness';

type Json = Record<string, any>;

const TIMEOUT_MS = 2000;
const TIMEOUT = ['--channel-timeout', String(TIMEOUT_MS)];
/** No case may take longer than this from the fault to the last exit (a hang bound, not a speed). */
const HANG_BOUND_MS = 15_000;
/** Writers that keep dirtying RAM: the source's report must then say they run again. */
const WRITERS = ['--writers', '2', '--dirty-rate', '8M'];

const VECTOR = new URL('./fixtures/qemu-7.2-multifd-2ch/', import.meta.url);
const vector = (name: string): Buffer => gunzipSync(readFileSync(new URL(name, VECTOR)));
const tmp = mkdtempSync(join(tmpdir(), 'vmig-trust-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

// Everything a case started, stopped after it whatever happened.
const children: CliProcess[] = [];
const sockets: net.Socket[] = [];
const proxies: FaultProxy[] = [];
const controls: ControlClient[] = [];
afterEach(async () => {
  for (const c of controls.splice(0)) c.close();
  for (const s of sockets.splice(0)) s.destroy();
  for (const p of proxies.splice(0)) await p.close();
  const running = children.splice(0);
  for (const p of running) if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill('SIGKILL');
  await Promise.all(running.map((p) => p.done));
});

function cli(args: string[]): CliProcess {
  const p = spawnCli(CLI_MAIN, args);
  children.push(p);
  return p;
}

async function incoming(args: string[]): Promise<{ dst: CliProcess; uri: string; port: number }> {
  const dst = cli(['incoming', 'tcp:127.0.0.1:0', '--json', ...TIMEOUT, ...args]);
  const uri = String((await dst.waitFor((l) => l['event'] === 'listening', 30_000))['uri']);
  return { dst, uri, port: Number(uri.split(':').pop()) };
}

function migrate(uri: string, args: string[]): CliProcess {
  return cli(['migrate', uri, '--json', ...TIMEOUT, ...args]);
}

/** Resolves with the run, or rejects if it outlives `ms` (then the afterEach kills it). */
async function within(p: CliProcess, ms: number, what: string): Promise<CliRun & { ms: number }> {
  const t0 = performance.now();
  let timer: NodeJS.Timeout | undefined;
  const hang = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} still running after ${ms} ms: it hangs`)), ms);
  });
  try {
    const run = await Promise.race([p.done, hang]);
    return { ...run, ms: performance.now() - t0 };
  } finally {
    clearTimeout(timer);
  }
}

/** A failed run: exit 1 on its own, a final report, status failed, a code from `codes`. */
function expectFailed(run: CliRun, codes: readonly string[], what: string): void {
  const info = `${what}: exit ${run.code}/${run.signal}, report ${JSON.stringify(run.report?.['error'] ?? run.report?.['status'])}, stderr ${run.stderr.slice(-600)}`;
  expect(run.signal, info).toBeNull();
  expect(run.code, info).toBe(1);
  expect(run.report, info).toBeDefined();
  expect(run.lines.at(-1)?.['event'], `${info}: the report is the last line`).toBe('report');
  expect(run.report?.['status'], info).toBe('failed');
  expect(codes, info).toContain((run.report?.['error'] as Json | undefined)?.['code']);
}

function expectWritersResumed(run: CliRun): void {
  expect(run.report?.['writersResumed'], JSON.stringify(run.report?.['error'])).toBe(true);
}

async function connectTo(port: number): Promise<net.Socket> {
  const s = net.connect(port, '127.0.0.1');
  sockets.push(s);
  s.on('error', () => {});
  await new Promise<void>((r, j) => s.once('connect', r).once('error', j));
  return s;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const code = (run: CliRun): unknown => (run.report?.['error'] as Json | undefined)?.['code'];

describe('a destination waiting for multifd channels that do not come right (fake QEMU source)', () => {
  const CODES = ['VMIG_ERR_TIMEOUT', 'VMIG_ERR_MULTIFD_CHANNELS', 'VMIG_ERR_MULTIFD_HANDSHAKE', 'VMIG_ERR_PEER_CLOSED'];
  // The main stream is QEMU 7.2's whole main channel, left open: only the channels are wrong.
  const cases: [string, (() => Buffer) | undefined][] = [
    ['(a) no multifd channel ever connects', undefined],
    ['(b) one channel sends a valid MultiFDInit_t, then a FIN', () => vector('conn1.bin.gz').subarray(0, MULTIFD_INIT_SIZE)],
    ['(c) one channel whose MultiFDInit_t is cut short (30 bytes, then a FIN)', () => vector('conn1.bin.gz').subarray(0, 30)],
    [
      '(d) one channel whose MultiFDInit_t has a bad magic, then a FIN',
      () => {
        const b = Buffer.from(vector('conn1.bin.gz').subarray(0, MULTIFD_INIT_SIZE));
        b[0]! ^= 0xff;
        return b;
      },
    ],
  ];
  for (const [name, channel] of cases) {
    it(`${name}: exit 1 with a report, within the timeout`, async () => {
      const { dst, port } = await incoming(['--multifd-channels', '2']);
      const main = await connectTo(port);
      main.write(vector('conn0.bin.gz'));
      if (channel) {
        const ch = await connectTo(port);
        ch.end(channel());
      }
      const run = await within(dst, HANG_BOUND_MS, 'the destination');
      expectFailed(run, CODES, 'destination');
      console.log(`[trust] multifd ${name}: ${String(code(run))} after ${Math.round(run.ms)} ms: ${(run.report?.['error'] as Json)['message']}`);
    });
  }
});

describe('multifd channel count mismatch between two vmig processes', () => {
  for (const [srcN, dstN] of [
    [2, 4],
    [4, 2],
  ] as const) {
    it(`source --multifd-channels ${srcN}, destination ${dstN}: both exit 1, the source's writers run on`, async () => {
      const { dst, uri } = await incoming(['--ram', '32M', '--multifd-channels', String(dstN)]);
      const src = migrate(uri, ['--ram', '32M', ...WRITERS, '--multifd-channels', String(srcN)]);
      const [s, d] = await Promise.all([within(src, HANG_BOUND_MS, 'the source'), within(dst, HANG_BOUND_MS, 'the destination')]);
      console.log(`[trust] channels ${srcN}->${dstN}: source ${String(code(s))} (${Math.round(s.ms)} ms), destination ${String(code(d))} (${Math.round(d.ms)} ms): ${(d.report?.['error'] as Json | undefined)?.['message']}`);
      // The destination is the side that can tell: it names the mismatch.
      expectFailed(d, ['VMIG_ERR_MULTIFD_CHANNELS'], 'destination');
      // The source learns it from the destination's answer, from a channel the destination
      // closed, or (with more channels than it takes) from a channel whose connect the
      // destination, done already, refused.
      expectFailed(s, ['VMIG_ERR_MULTIFD_CHANNELS', 'VMIG_ERR_PEER_CLOSED', 'VMIG_ERR_CHANNEL', 'VMIG_ERR_REMOTE', 'VMIG_ERR_TIMEOUT', 'VMIG_ERR_CONNECT'], 'source');
      expectWritersResumed(s);
    });
  }
});

it('the QEMU 7.2 capture (2 channels) replayed into --multifd-channels 4: exit 1, not a hang', async () => {
  const { dst, port } = await incoming(['--multifd-channels', '4']);
  for (const name of ['conn0.bin.gz', 'conn1.bin.gz', 'conn2.bin.gz']) {
    const s = await connectTo(port);
    s.end(vector(name));
  }
  const run = await within(dst, HANG_BOUND_MS, 'the destination');
  console.log(`[trust] QEMU 2ch into 4: ${String(code(run))} after ${Math.round(run.ms)} ms: ${(run.report?.['error'] as Json | undefined)?.['message']}`);
  expectFailed(run, ['VMIG_ERR_MULTIFD_CHANNELS', 'VMIG_ERR_TIMEOUT', 'VMIG_ERR_PEER_CLOSED'], 'destination');
});

describe('barrier dialect on one end only: followed (equal digests) or refused (both fail), never a hang', () => {
  for (const side of ['source', 'destination'] as const) {
    it(`--multifd-flush-after-each-section on the ${side} only`, async () => {
      const legacy = ['--multifd-flush-after-each-section'];
      const { dst, uri } = await incoming(['--ram', '32M', '--multifd-channels', '2', ...(side === 'destination' ? legacy : [])]);
      const src = migrate(uri, ['--ram', '32M', ...WRITERS, '--multifd-channels', '2', ...(side === 'source' ? legacy : [])]);
      const [s, d] = await Promise.all([within(src, 60_000, 'the source'), within(dst, 60_000, 'the destination')]);
      console.log(`[trust] dialect on ${side} only: source ${s.code} ${String(s.report?.['status'])} ${String(code(s) ?? '')}, destination ${d.code} ${String(d.report?.['status'])} ${String(code(d) ?? '')}`);
      expect(s.report, s.stderr).toBeDefined();
      expect(d.report, d.stderr).toBeDefined();
      if (s.code === 0 || d.code === 0) {
        // Followed: both completed, with the same RAM.
        expect([s.code, d.code, s.report?.['status'], d.report?.['status']], JSON.stringify([s.report?.['error'], d.report?.['error']])).toEqual([0, 0, 'completed', 'completed']);
        expect(typeof s.report?.['ramDigest']).toBe('string');
        expect(d.report?.['ramDigest']).toBe(s.report?.['ramDigest']);
      } else {
        // Refused: both fail with a code; the source's guest runs on.
        expectFailed(d, ['VMIG_ERR_MULTIFD_DIALECT', 'VMIG_ERR_TIMEOUT', 'VMIG_ERR_PEER_CLOSED', 'VMIG_ERR_MULTIFD_PACKET'], 'destination');
        expectFailed(s, ['VMIG_ERR_MULTIFD_DIALECT', 'VMIG_ERR_TIMEOUT', 'VMIG_ERR_PEER_CLOSED', 'VMIG_ERR_CHANNEL', 'VMIG_ERR_REMOTE'], 'source');
        expectWritersResumed(s);
      }
    });
  }
});

describe('a frozen link (FaultProxy between source and destination)', () => {
  for (const multifd of [0, 2]) {
    it(`${multifd ? `${multifd} multifd channels` : 'main channel only'}: the link freezes after ~4 MiB; both exit 1 (the source VMIG_ERR_TIMEOUT) and its writers run on`, async () => {
      const channels = multifd ? ['--multifd-channels', String(multifd)] : [];
      const { dst, port } = await incoming(['--ram', '64M', ...channels]);
      const proxy = await FaultProxy.start({ target: { host: '127.0.0.1', port } });
      proxies.push(proxy);
      // Without multifd the RAM goes on connection 0; with it, mostly on the channels: freeze
      // every connection as soon as one carried 4 MiB (the main channel then carries less).
      proxy.addRule({ connection: multifd ? 1 : 0, direction: 'up', afterBytes: 4 << 20, action: 'freeze' });
      let frozenAt = 0;
      proxy.once('fault', () => {
        frozenAt = performance.now();
        proxy.freeze();
      });
      const src = migrate(proxy.uri, ['--ram', '64M', '--fill', 'random', ...WRITERS, ...channels]);
      const [s, d] = await Promise.all([within(src, 30_000, 'the source'), within(dst, 30_000, 'the destination')]);
      expect(frozenAt, `the link never froze: ${JSON.stringify(proxy.summary())}, source ${JSON.stringify(s.report?.['status'])}`).toBeGreaterThan(0);
      const end = performance.now();
      console.log(
        `[trust] frozen link (multifd ${multifd}): source ${String(code(s))} ${Math.round(s.ms)} ms, destination ${String(code(d))} ${Math.round(d.ms)} ms; ${Math.round(end - frozenAt)} ms after the freeze; proxy ${JSON.stringify(proxy.summary())}`,
      );
      expectFailed(s, ['VMIG_ERR_TIMEOUT'], 'source');
      expectWritersResumed(s);
      expectFailed(d, ['VMIG_ERR_TIMEOUT', 'VMIG_ERR_PEER_CLOSED', 'VMIG_ERR_MULTIFD_CHANNELS'], 'destination');
      expect(end - frozenAt).toBeLessThan(HANG_BOUND_MS);
      // The link was silent, not closed: nothing reached the destination after the freeze.
      expect(proxy.connections.every((c) => c.state === 'frozen' || c.state === 'closed')).toBe(true);
    });
  }
});

it('the destination stopped (SIGSTOP) mid-migration: the source exits 1 and its writers run on', async () => {
  const { dst, uri } = await incoming(['--ram', '32M']);
  const src = migrate(uri, ['--ram', '32M', ...WRITERS, '--max-bandwidth', '4M']);
  await src.waitFor((l) => l['event'] === 'status' && l['status'] === 'active', 30_000);
  dst.child.kill('SIGSTOP');
  const s = await within(src, HANG_BOUND_MS, 'the source');
  console.log(`[trust] SIGSTOP destination: source ${String(code(s))} after ${Math.round(s.ms)} ms: ${(s.report?.['error'] as Json | undefined)?.['message']}`);
  dst.child.kill('SIGKILL');
  const d = await dst.done;
  expect(d.signal).toBe('SIGKILL');
  expectFailed(s, ['VMIG_ERR_TIMEOUT'], 'source');
  expectWritersResumed(s);
});

describe('vmig incoming cancelled by a signal: exit 1, VMIG_ERR_CANCELLED', () => {
  const WAITING_RUNS = 5;
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    // At once after the 'listening' line: a script that waits for it and then signals must
    // get the report too. A few runs, since a missed handler shows only when the signal
    // comes before the process got on.
    it(`${sig} while waiting for a source (at once after 'listening', ${WAITING_RUNS} runs)`, async () => {
      for (let i = 0; i < WAITING_RUNS; i++) {
        const { dst } = await incoming(['--ram', '32M']);
        dst.child.kill(sig);
        const d = await within(dst, HANG_BOUND_MS, 'the destination');
        expectFailed(d, ['VMIG_ERR_CANCELLED'], `destination, run ${i}`);
      }
    });

    it(`${sig} while loading`, async () => {
      const { dst, uri } = await incoming(['--ram', '32M']);
      const src = migrate(uri, ['--ram', '32M', ...WRITERS, '--max-bandwidth', '4M']);
      await src.waitFor((l) => l['event'] === 'status' && l['status'] === 'active', 30_000);
      await sleep(300);
      dst.child.kill(sig);
      const [d, s] = await Promise.all([within(dst, HANG_BOUND_MS, 'the destination'), within(src, HANG_BOUND_MS, 'the source')]);
      console.log(`[trust] incoming ${sig} while loading: destination ${String(code(d))} ${Math.round(d.ms)} ms, source ${String(code(s))} ${Math.round(s.ms)} ms`);
      expectFailed(d, ['VMIG_ERR_CANCELLED'], 'destination');
      // The source sees its peer go away.
      expectFailed(s, ['VMIG_ERR_PEER_CLOSED', 'VMIG_ERR_CHANNEL', 'VMIG_ERR_REMOTE', 'VMIG_ERR_CANCELLED', 'VMIG_ERR_TIMEOUT'], 'source');
      expectWritersResumed(s);
    });
  }
});

it('a control client that stays connected does not keep migrate alive after completed', async () => {
  const path = join(tmp, 'ctl.sock');
  const { dst, uri } = await incoming(['--ram', '32M']);
  const src = migrate(uri, ['--ram', '32M', '--control', `unix:${path}`]);
  await src.waitFor((l) => l['event'] === 'control', 30_000);
  const c = await ControlClient.connect(path);
  controls.push(c);
  await c.waitFor((l) => 'QMP' in l);
  expect((await c.execute('qmp_capabilities'))['return']).toEqual({});
  const report = await src.waitFor((l) => l['event'] === 'report', 60_000);
  expect(report['status'], JSON.stringify(report['error'])).toBe('completed');
  const completedAt = performance.now();
  // The client is still connected and silent; the source must exit on its own.
  const s = await within(src, HANG_BOUND_MS, 'the source (control client connected)');
  console.log(`[trust] control client connected: the source exited ${Math.round(performance.now() - completedAt)} ms after its report`);
  expect(s.code).toBe(0);
  expect(s.signal).toBeNull();
  expect((await within(dst, HANG_BOUND_MS, 'the destination')).code).toBe(0);
});

it('the destination killed right after its completed report: the source exits with a report (time printed)', async () => {
  const { dst, uri } = await incoming(['--ram', '32M']);
  const src = migrate(uri, ['--ram', '32M', ...WRITERS]);
  const dstReport = await dst.waitFor((l) => l['event'] === 'report', 60_000);
  dst.child.kill('SIGKILL');
  const killedAt = performance.now();
  const s = await within(src, 60_000, 'the source');
  const ms = performance.now() - killedAt;
  console.log(`[trust] destination SIGKILLed after its ${String(dstReport['status'])} report: the source exited ${s.code} (${String(s.report?.['status'])} ${String(code(s) ?? '')}) ${Math.round(ms)} ms later`);
  expect(dstReport['status']).toBe('completed');
  expect(s.signal).toBeNull();
  expect(s.report, s.stderr).toBeDefined();
  expect(s.lines.at(-1)?.['event']).toBe('report');
  if (s.code !== 0) {
    expectFailed(s, ['VMIG_ERR_PEER_CLOSED', 'VMIG_ERR_CHANNEL', 'VMIG_ERR_REMOTE', 'VMIG_ERR_TIMEOUT'], 'source');
    expectWritersResumed(s);
  } else {
    expect(s.report?.['status']).toBe('completed');
  }
});

it('--channel-timeout is accepted by migrate, incoming and demo (demo completes, verified)', async () => {
  const demo = cli(['demo', '--ram', '16M', '--writers', '1', '--dirty-rate', '4M', '--json', ...TIMEOUT]);
  const run = await within(demo, 60_000, 'the demo');
  expect(run.code, run.stderr).toBe(0);
  expect(run.report?.['verified']).toBe(true);
  const bad = await within(cli(['incoming', 'tcp:127.0.0.1:0', '--channel-timeout', 'soon']), HANG_BOUND_MS, 'incoming with a bad flag');
  expect(bad.code).toBe(2);
});
