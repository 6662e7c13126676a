/**
 * Postcopy recovery between two vmig processes (QEMU's postcopy-paused, migrate-recover,
 * `migrate resume=true`): after the switch a FaultProxy cuts, resets or freezes a connection;
 * both sides pause (the destination's vCPUs keep running and waiting), the destination
 * listens again (migrate-recover, on its control socket), the source reconnects every channel
 * through a fresh proxy (migrate with resume), only the pages the destination lacks are sent,
 * and the migration completes, verified by the stamped writes (every destination write kept,
 * the rest equal to the source's RAM).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { type CliProcess, FaultProxy, spawnCli } from '@vmig/test-harness';
import { CLI_MAIN } from './cli.js';
import { ControlClient } from './control-client.js';

type Report = Record<string, any>;
const tmp = mkdtempSync(join(tmpdir(), 'vmig-recovery-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const children: CliProcess[] = [];
const proxies: FaultProxy[] = [];
const clients: ControlClient[] = [];
afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  for (const c of children.splice(0)) if (c.child.exitCode === null) c.child.kill('SIGKILL');
  for (const p of proxies.splice(0)) await p.close();
});

let pairs = 0;

interface Pair {
  src: CliProcess;
  dst: CliProcess;
  srcCtl: ControlClient;
  dstCtl: ControlClient;
  /** The proxy the source's channels go through now (a new one after each recovery). */
  proxy: FaultProxy;
}

async function proxyTo(uri: string): Promise<FaultProxy> {
  const p = await FaultProxy.start({ target: { host: '127.0.0.1', port: Number(uri.split(':').pop()) } });
  proxies.push(p);
  return p;
}

/**
 * Both ends with writers, switching after one round, background pages slowed so that
 * postcopy lasts (and the destination's vCPUs fault); every channel through a proxy.
 */
async function startPair(extra: string[] = [], srcExtra: string[] = []): Promise<Pair> {
  const n = ++pairs;
  const shared = ['--ram', '64M', '--postcopy', '--channel-timeout', '3000', ...extra];
  const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--control', `unix:${join(tmp, `dst${n}.sock`)}`, ...shared]);
  children.push(dst);
  const { uri } = (await dst.waitFor((l) => l['event'] === 'listening')) as { uri: string };
  const proxy = await proxyTo(uri);
  const src = spawnCli(CLI_MAIN, [
    'migrate', proxy.uri, '--json', '--control', `unix:${join(tmp, `src${n}.sock`)}`, ...shared,
    '--postcopy-after-rounds', '1', '--downtime-limit', '5', '--postcopy-blocktime', '--writers', '2', '--dirty-rate', '64M',
    '--max-bandwidth', '100M', '--max-postcopy-bandwidth', '4M', ...srcExtra,
  ]);
  children.push(src);
  const srcCtl = await controlOf(src);
  const dstCtl = await controlOf(dst);
  return { src, dst, srcCtl, dstCtl, proxy };
}

async function controlOf(p: CliProcess): Promise<ControlClient> {
  const { address } = (await p.waitFor((l) => l['event'] === 'control')) as { address: string };
  const c = await ControlClient.connect(address.slice('unix:'.length));
  clients.push(c);
  expect((await c.execute('qmp_capabilities'))['return']).toEqual({});
  return c;
}

function statusCount(p: CliProcess, status: string): number {
  return p.lines.filter((l) => l['event'] === 'status' && l['status'] === status).length;
}

/** Waits until both sides paused for the `nth` time. */
async function bothPaused(pair: Pair, nth: number): Promise<void> {
  await pair.src.waitFor(() => statusCount(pair.src, 'postcopy-paused') >= nth, 30_000);
  await pair.dst.waitFor(() => statusCount(pair.dst, 'postcopy-paused') >= nth, 30_000);
}

/** migrate-recover on the destination, migrate resume=true on the source, through a new proxy. */
async function recover(pair: Pair, nth: number): Promise<void> {
  const r = await pair.dstCtl.execute('migrate-recover', { uri: 'tcp:127.0.0.1:0' });
  expect(r['return'], JSON.stringify(r)).toEqual({});
  const recoverLines = () => pair.dst.lines.filter((l) => l['event'] === 'recover');
  await pair.dst.waitFor(() => recoverLines().length >= nth);
  const { uri } = recoverLines()[nth - 1] as { uri: string };
  pair.proxy = await proxyTo(uri);
  const m = await pair.srcCtl.execute('migrate', { uri: pair.proxy.uri, resume: true });
  expect(m['return'], JSON.stringify(m)).toEqual({});
  await pair.src.waitFor(() => statusCount(pair.src, 'postcopy-active') >= nth + 1, 30_000);
}

/** Both exit 0; the destination's RAM, its own writes taken out, equals the source's; no write lost. */
async function expectVerified(pair: Pair, recoveries: number): Promise<Report> {
  const [s, d] = await Promise.all([pair.src.done, pair.dst.done]);
  const source = s.report;
  const destination = d.report;
  expect(destination?.status, JSON.stringify(destination?.error)).toBe('completed');
  expect(source?.status, JSON.stringify(source?.error)).toBe('completed');
  const pc = destination!.postcopy as Report;
  expect(pc.state).toBe('end');
  expect(pc.problems).toEqual([]);
  expect(pc.badStamps).toBe(0);
  expect(pc.restoredDigest).toBe(source!.ramDigest);
  expect(destination!.devices['vmig-its'].tableInRam).toBe(true);
  expect(pc.recoveries).toBe(recoveries);
  expect(source!.ram.postcopyRecoveries).toBe(recoveries);
  expect(s.code).toBe(0);
  expect(d.code).toBe(0);
  return { source, destination };
}

async function switched(pair: Pair): Promise<void> {
  await pair.src.waitFor((l) => l['event'] === 'status' && l['status'] === 'postcopy-active');
  await pair.dst.waitFor((l) => l['event'] === 'postcopy' && l['reason'] === 'INBOUND_LISTEN');
}

describe('postcopy recovery between two vmig processes', () => {
  for (const mode of ['close', 'reset'] as const) {
    it(`the main connection ${mode === 'close' ? 'closed (FIN)' : 'reset (RST)'} after the switch: both pause, recover, verified by stamps`, async () => {
      const pair = await startPair();
      await switched(pair);
      await new Promise((r) => setTimeout(r, 300));
      pair.proxy.cut(0, mode);
      await bothPaused(pair, 1);
      await recover(pair, 1);
      await expectVerified(pair, 1);
    });
  }

  it('the link frozen after the switch: both pause within the channel timeout, recover, verified', async () => {
    const pair = await startPair();
    await switched(pair);
    await new Promise((r) => setTimeout(r, 300));
    pair.proxy.freeze();
    await bothPaused(pair, 1);
    await recover(pair, 1);
    await expectVerified(pair, 1);
  });

  it('with preempt: the preempt connection reset, then (recovered) the main one, then migrate-pause on each side: four recoveries, verified', async () => {
    const pair = await startPair(['--postcopy-preempt']);
    await switched(pair);
    await new Promise((r) => setTimeout(r, 200));
    // Connection 1 is the preempt channel (after main; no multifd).
    pair.proxy.cut(1, 'reset');
    await bothPaused(pair, 1);
    await recover(pair, 1);
    await new Promise((r) => setTimeout(r, 200));
    pair.proxy.cut(0, 'reset');
    await bothPaused(pair, 2);
    await recover(pair, 2);
    expect((await pair.dstCtl.execute('migrate-pause'))['return']).toEqual({});
    await bothPaused(pair, 3);
    await recover(pair, 3);
    expect((await pair.srcCtl.execute('migrate-pause'))['return']).toEqual({});
    await bothPaused(pair, 4);
    await recover(pair, 4);
    await expectVerified(pair, 4);
  });

  it('a recovery that fails (the source resumes to a wrong address) leaves both paused; the next one works', async () => {
    const pair = await startPair();
    await switched(pair);
    pair.proxy.cut(0, 'reset');
    await bothPaused(pair, 1);
    // Nobody listens there: the source's reconnect fails, and it is paused again.
    const dead = await proxyTo('tcp:127.0.0.1:1');
    await dead.close();
    expect((await pair.srcCtl.execute('migrate', { uri: dead.uri, resume: true }))['return']).toEqual({});
    await pair.src.waitFor(() => statusCount(pair.src, 'postcopy-paused') >= 2, 30_000);
    // Commands out of place are refused with a reason.
    expect((await pair.srcCtl.execute('migrate-pause'))['error']['desc']).toMatch(/postcopy-active/);
    expect((await pair.dstCtl.execute('migrate-pause'))['error']['desc']).toMatch(/postcopy-active/);
    await recover(pair, 1);
    await expectVerified(pair, 1);
  });

  it('paused, then cancelled (SIGTERM) on both: each exits 1, says the guest is split', async () => {
    const pair = await startPair();
    await switched(pair);
    pair.proxy.cut(0, 'reset');
    await bothPaused(pair, 1);
    pair.src.child.kill('SIGTERM');
    pair.dst.child.kill('SIGTERM');
    for (const run of await Promise.all([pair.src.done, pair.dst.done])) {
      expect(run.code).toBe(1);
      expect(run.report?.['error']?.code).toBe('VMIG_ERR_POSTCOPY');
      expect(run.report?.['error']?.message).toContain('split');
    }
  });
});
