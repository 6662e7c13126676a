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
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import {
  bothPaused,
  closeRecoveryPair,
  makeTlsCreds,
  migrateRecover,
  spawnCli,
  postcopySwitched,
  recoverPair,
  type RecoveryPair,
  startRecoveryPair,
  statusCount,
} from '@vmig/test-harness';
import { CLI_MAIN } from './cli.js';

type Report = Record<string, any>;
const tmp = mkdtempSync(join(tmpdir(), 'vmig-recovery-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const pairs: RecoveryPair[] = [];
afterEach(async () => {
  for (const p of pairs.splice(0)) await closeRecoveryPair(p);
});

/**
 * Both ends with writers, switching after one round, background pages slowed so that
 * postcopy lasts (and the destination's vCPUs fault); every channel through a proxy.
 */
async function startPair(extra: string[] = [], migrateExtra: string[] = []): Promise<RecoveryPair> {
  const shared = ['--ram', '64M', '--postcopy', '--channel-timeout', '3000', ...extra];
  const migrateArgs = [...shared, '--postcopy-after-rounds', '1', '--downtime-limit', '5', '--postcopy-blocktime', '--writers', '2', '--dirty-rate', '64M', '--max-bandwidth', '100M', '--max-postcopy-bandwidth', '4M', ...migrateExtra];
  const pair = await startRecoveryPair(CLI_MAIN, shared, migrateArgs, { dir: mkdtempSync(join(tmp, 'p')) });
  pairs.push(pair);
  return pair;
}

/** Both exit 0; the destination's RAM, its own writes taken out, equals the source's; no write lost. */
async function expectVerified(pair: RecoveryPair, recoveries: number): Promise<void> {
  const [s, d] = await Promise.all([pair.src.done, pair.dst.done]);
  const source = s.report as Report | undefined;
  const destination = d.report as Report | undefined;
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
  expect(source!.timeline.phases.filter((p: Report) => p.phase === 'postcopy-paused')).toHaveLength(recoveries);
  expect(s.code).toBe(0);
  expect(d.code).toBe(0);
}

const later = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe('postcopy recovery between two vmig processes', () => {
  for (const mode of ['close', 'reset'] as const) {
    it(`the main connection ${mode === 'close' ? 'closed (FIN)' : 'reset (RST)'} after the switch: both pause, recover, verified by stamps`, async () => {
      const pair = await startPair();
      await postcopySwitched(pair);
      await later(300);
      pair.proxy.cut(0, mode);
      await bothPaused(pair, 1);
      // Paused: each side says how to go on.
      expect((await pair.src.waitFor((l) => l['event'] === 'paused'))['control']).toMatch(/^unix:/);
      expect(((await pair.dst.waitFor((l) => l['event'] === 'paused'))['error'] as Report).code).toMatch(/VMIG_ERR_/);
      // The guest runs on at the destination while paused (QEMU's RunState), not at the source.
      expect((await pair.dstCtl.execute('query-status'))['return']).toMatchObject({ status: 'running', running: true });
      expect((await pair.srcCtl.execute('query-status'))['return']).toMatchObject({ status: 'postmigrate', running: false });
      await recoverPair(pair);
      await expectVerified(pair, 1);
    });
  }

  it('the main connection reset right after the switch (RUN in flight), then again during the last pages: two recoveries, verified', async () => {
    const pair = await startPair();
    await pair.dst.waitFor((l) => l['event'] === 'postcopy' && l['reason'] === 'INBOUND_LISTEN');
    pair.proxy.cut(0, 'reset');
    await bothPaused(pair, 1);
    await recoverPair(pair);
    // The last pages: less than an eighth of RAM still to send.
    for (;;) {
      const q = (await pair.srcCtl.execute('query-migrate'))['return'] as Report;
      if (q['status'] === 'postcopy-active' && q['ram'].remaining < (64 << 20) / 8) break;
      await later(20);
    }
    pair.proxy.cut(0, 'reset');
    await bothPaused(pair, 2);
    await recoverPair(pair);
    await expectVerified(pair, 2);
  });

  it('the link frozen after the switch: both pause within the channel timeout, recover, verified', async () => {
    const pair = await startPair();
    await postcopySwitched(pair);
    await later(300);
    pair.proxy.freeze();
    await bothPaused(pair, 1);
    await recoverPair(pair);
    await expectVerified(pair, 1);
  });

  it('with preempt: the preempt connection reset, frozen, then the main one reset, then migrate-pause on each side: five recoveries, verified', async () => {
    // Background pages slower still: postcopy outlasts five recoveries.
    const pair = await startPair(['--postcopy-preempt'], ['--max-postcopy-bandwidth', '1M']);
    await postcopySwitched(pair);
    await later(200);
    // Connection 1 is the preempt channel (after main; no multifd).
    pair.proxy.cut(1, 'reset');
    await bothPaused(pair, 1);
    await recoverPair(pair);
    await later(200);
    pair.proxy.freeze(1);
    await bothPaused(pair, 2);
    await recoverPair(pair);
    await later(200);
    pair.proxy.cut(0, 'reset');
    await bothPaused(pair, 3);
    await recoverPair(pair);
    expect((await pair.dstCtl.execute('migrate-pause'))['return']).toEqual({});
    await bothPaused(pair, 4);
    await recoverPair(pair);
    expect((await pair.srcCtl.execute('migrate-pause'))['return']).toEqual({});
    await bothPaused(pair, 5);
    await recoverPair(pair);
    await expectVerified(pair, 5);
  });

  it('over TLS with preempt: the main connection reset, recovered with new handshakes, verified', async () => {
    const creds = makeTlsCreds(join(tmp, 'creds'));
    const pair = await startPair(['--tls-creds', creds, '--postcopy-preempt']);
    await postcopySwitched(pair);
    await later(300);
    pair.proxy.cut(0, 'reset');
    await bothPaused(pair, 1);
    await recoverPair(pair);
    await expectVerified(pair, 1);
  });

  it('recoveries that fail leave both paused, and the next one works: the source resumes to a dead address; a stranger, then a silent peer, take the recovery connection', async () => {
    const pair = await startPair();
    await postcopySwitched(pair);
    pair.proxy.cut(0, 'reset');
    await bothPaused(pair, 1);
    // Nobody listens there: the source's reconnect fails, and it is paused again.
    const dead = net.createServer();
    await new Promise<void>((r) => dead.listen(0, '127.0.0.1', r));
    const deadPort = (dead.address() as net.AddressInfo).port;
    await new Promise((r) => dead.close(r));
    expect((await pair.srcCtl.execute('migrate', { uri: `tcp:127.0.0.1:${deadPort}`, resume: true }))['return']).toEqual({});
    await pair.src.waitFor(() => statusCount(pair.src, 'postcopy-paused') >= 2, 30_000);
    // Out of place: refused with a reason, nothing changes.
    expect((await pair.srcCtl.execute('migrate-pause'))['error']['desc']).toMatch(/postcopy-active/);
    expect((await pair.dstCtl.execute('migrate-pause'))['error']['desc']).toMatch(/postcopy-active/);
    expect((await pair.srcCtl.execute('migrate', { uri: 'tcp:nonsense', resume: true }))['error']['desc']).toBeTruthy();
    expect((await pair.dstCtl.execute('migrate-recover', { uri: 'ftp:x' }))['error']['desc']).toBeTruthy();
    // A stranger takes the destination's recovery listener and sends garbage: still paused.
    const uri = await migrateRecover(pair);
    const stranger = net.connect(Number(uri.split(':').pop()), '127.0.0.1');
    await new Promise((r) => stranger.once('connect', r));
    stranger.end(Buffer.from('GET / HTTP/1.1\r\n\r\n'));
    await pair.dst.waitFor(() => statusCount(pair.dst, 'postcopy-paused') >= 2, 30_000);
    expect(statusCount(pair.dst, 'postcopy-recover')).toBe(1);
    stranger.destroy();
    // A peer that connects and says nothing holds the recovery for the channel timeout at most.
    const silentUri = await migrateRecover(pair);
    const silent = net.connect(Number(silentUri.split(':').pop()), '127.0.0.1');
    silent.on('error', () => {});
    await pair.dst.waitFor(() => statusCount(pair.dst, 'postcopy-paused') >= 3, 30_000);
    silent.destroy();
    // Then the real one.
    await recoverPair(pair);
    await expectVerified(pair, 1);
  });

  it('paused, then cancelled (SIGTERM) on both: each exits 1, says the guest is split', async () => {
    const pair = await startPair();
    await postcopySwitched(pair);
    pair.proxy.cut(0, 'reset');
    await bothPaused(pair, 1);
    pair.src.child.kill('SIGTERM');
    pair.dst.child.kill('SIGTERM');
    for (const run of await Promise.all([pair.src.done, pair.dst.done])) {
      expect(run.code).toBe(1);
      expect((run.report?.['error'] as Report).code).toBe('VMIG_ERR_POSTCOPY');
      expect((run.report?.['error'] as Report).message).toContain('split');
    }
  });
});

describe('vmig demo --postcopy-faults', () => {
  it('resets the link after the switch and recovers each time: verified', async () => {
    const demo = spawnCli(CLI_MAIN, ['demo', '--json', '--ram', '64M', '--postcopy', '--max-postcopy-bandwidth', '8M', '--postcopy-faults', '2']);
    const run = await demo.done;
    const report = run.report as Report;
    expect(report.verified, JSON.stringify(report).slice(0, 2000)).toBe(true);
    expect(report.linkFailures).toBe(2);
    expect(report.destination.postcopy.recoveries).toBe(2);
    expect(run.lines.filter((l) => l['event'] === 'link-failure')).toHaveLength(2);
    expect(run.code).toBe(0);
  });

  it('flags: --postcopy-faults without --postcopy, out of range, or with --control: exit 2', async () => {
    for (const args of [['--postcopy-faults', '1'], ['--postcopy', '--postcopy-faults', '0'], ['--postcopy', '--postcopy-faults', 'x'], ['--postcopy', '--postcopy-faults', '1', '--control', 'unix:/tmp/x.sock']]) {
      const run = await spawnCli(CLI_MAIN, ['demo', ...args]).done;
      expect(run.code, args.join(' ')).toBe(2);
      expect(run.stderr).toMatch(/postcopy-faults/);
    }
  });
});
