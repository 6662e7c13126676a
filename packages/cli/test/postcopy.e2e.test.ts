/**
 * Postcopy between two vmig processes: writers on both sides, verified by stamped writes
 * (the destination's RAM with its own writes taken out equals the source's final RAM, and
 * every destination write is still there).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { libc } from '@vmig/core';
import { type CliProcess, type CliRun, runMigrationPair, spawnCli } from '@vmig/test-harness';
import { kernelHasCustomSlices } from '@vmig/test-harness';
import { CLI_MAIN } from './cli.js';
import { ControlClient } from '@vmig/test-harness';

type Report = Record<string, any>;
const tmp = mkdtempSync(join(tmpdir(), 'vmig-postcopy-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** What every successful postcopy run must show. */
function expectPostcopyVerified(source: Report | undefined, destination: Report | undefined): Report {
  expect(destination?.status, JSON.stringify(destination?.error)).toBe('completed');
  expect(source?.status, JSON.stringify(source?.error)).toBe('completed');
  const pc = destination!.postcopy as Report;
  expect(pc, 'the destination switched to postcopy').toBeDefined();
  expect(pc.state).toBe('end');
  // Every destination write survived, and nothing else differs from the source's final RAM.
  expect(pc.problems).toEqual([]);
  expect(pc.badStamps).toBe(0);
  expect(pc.restoredDigest).toBe(source!.ramDigest);
  // The ITS-style table, flushed after the stop and sent after the switch, is in place.
  expect(destination!.devices['vmig-its'].tableInRam).toBe(true);
  return pc;
}

const SWITCH = ['--postcopy', '--postcopy-after-rounds', '1', '--downtime-limit', '5', '--postcopy-blocktime'];

/** Both ends with writers, switching early and sending background pages slowly (postcopy lasts). */
async function startSlowPostcopyPair(): Promise<{ src: CliProcess; dst: CliProcess }> {
  const shared = ['--ram', '64M', '--postcopy'];
  const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', ...shared]);
  const listening = await dst.waitFor((l) => l['event'] === 'listening');
  const src = spawnCli(CLI_MAIN, ['migrate', String(listening['uri']), '--json', ...shared, ...SWITCH, '--writers', '2', '--dirty-rate', '64M', '--max-bandwidth', '100M', '--max-postcopy-bandwidth', '4M']);
  return { src, dst };
}

/** A side that lost its peer after the switch: failed, and it says the guest is split. */
function expectSplitFailure(run: CliRun): void {
  expect(run.code).toBe(1);
  expect(run.report?.['status']).toBe('failed');
  expect((run.report?.['error'] as Report).code).toBe('VMIG_ERR_POSTCOPY');
  expect((run.report?.['error'] as Report).message).toContain('split');
}

describe('postcopy between two vmig processes', () => {
  // Writers dirty pages fast; the switch comes after one round, so a third of RAM or more is
  // still missing when the destination's writers start; background pages are slowed so that
  // they fault.
  // With preempt, the faulting vCPUs read the preempt channel (where poll(2) is there) or,
  // with `--postcopy-preempt-reader thread`, its thread alone does.
  const matrix: [number, boolean, 'vcpu' | 'thread'][] = [
    [2, false, 'vcpu'],
    [2, true, 'vcpu'],
    [2, true, 'thread'],
    [4, false, 'vcpu'],
    [4, true, 'vcpu'],
  ];
  for (const [channels, preempt, reader] of matrix) {
    // With 4 channels and preempt, the fault path's scheduling is left to the kernel.
    const tuned = channels === 2;
    it(`${channels} multifd channels, preempt ${preempt ? `on${tuned ? '' : ' (scheduling untouched)'}, read by ${reader === 'vcpu' ? 'the vCPUs' : 'its thread'}` : 'off'}, writers on both sides: verified by stamps`, async () => {
      const shared = [
        ...['--ram', '128M', '--multifd-channels', String(channels), '--postcopy', '--postcopy-blocktime'],
        ...(preempt ? ['--postcopy-preempt'] : []),
        ...(preempt && !tuned ? ['--postcopy-background-nice', '0', '--postcopy-fault-slice-us', '0'] : []),
        ...(preempt && reader === 'thread' ? ['--postcopy-preempt-reader', 'thread'] : []),
      ];
      const { source, destination } = await runMigrationPair(CLI_MAIN, shared, [
        ...shared,
        ...SWITCH,
        '--writers', '2', '--dirty-rate', '64M', '--max-bandwidth', '200M', '--max-postcopy-bandwidth', '48M',
      ]);
      const pc = expectPostcopyVerified(source.report, destination.report);
      const src = source.report!;
      expect(source.lines.filter((l) => l['event'] === 'status').map((l) => l['status'])).toEqual(['setup', 'active', 'postcopy-active', 'completed']);
      // Pages went on multifd before the switch and on the main (or preempt) channel after it.
      expect(src.ram.multifdBytes).toBeGreaterThan(0);
      expect(src.ram.postcopyBytes).toBeGreaterThan(0);
      expect(pc.discardedPages).toBeGreaterThan(1000);
      expect(pc.postcopyPages).toBe(pc.discardedPages);
      // The destination's writers wrote, faulted, and their faults became requests.
      expect(pc.writes).toBeGreaterThan(100);
      expect(pc.pagesWritten).toBeGreaterThan(50);
      expect(pc.postcopyRequests).toBeGreaterThan(0);
      expect(src.ram.postcopyRequests).toBe(pc.postcopyRequests);
      // Blocktime is reported.
      expect(pc.faults).toBeGreaterThanOrEqual(pc.postcopyRequests);
      expect(pc.postcopyVcpuBlocktimeMs).toHaveLength(2);
      expect(pc.faultLatencyP99Ms).toBeGreaterThan(0);
      // With preempt, what each side did to its threads' scheduling (thread-priority.ts,
      // thread-slice.ts): by default no nice, short slices for the fault path, faulting vCPUs included.
      const scheduling = preempt ? (tuned ? { backgroundNice: null, faultSliceUs: kernelHasCustomSlices() ? 100 : null } : { backgroundNice: null, faultSliceUs: null }) : undefined;
      expect(src.postcopyScheduling).toEqual(scheduling);
      if (preempt) {
        const { vcpusWithFaultSlice, ...rest } = pc.scheduling;
        expect(rest).toEqual(scheduling);
        if (tuned && kernelHasCustomSlices()) expect(vcpusWithFaultSlice).toBeGreaterThan(0);
        else expect(vcpusWithFaultSlice).toBe(0);
      } else expect(pc.scheduling).toBeUndefined();
      // Who placed the requested pages that came on the preempt channel (copies of pages
      // already there are dropped, not counted).
      if (preempt) {
        const mode = reader === 'vcpu' && libc() !== null ? 'vcpu' : 'thread';
        expect(pc.preemptReader).toBe(mode);
        if (mode === 'vcpu') expect(pc.preemptPagesByVcpus).toBeGreaterThan(0);
        else expect(pc.preemptPagesByVcpus).toBe(0);
        if (mode === 'thread') expect(pc.preemptPagesByThread).toBeGreaterThan(0);
        expect(pc.preemptPagesByVcpus + pc.preemptPagesByThread).toBeLessThanOrEqual(pc.postcopyPages);
      } else {
        expect(pc.preemptReader).toBeUndefined();
      }
      // The postcopy notifiers fired on the destination, in order.
      expect(destination.lines.filter((l) => l['event'] === 'postcopy').map((l) => l['reason'])).toEqual(['PROBE', 'INBOUND_ADVISE', 'INBOUND_LISTEN', 'INBOUND_END']);
    });
  }

  it('two RAM blocks, preempt read by the vCPUs: pages of both placed where they belong, verified by stamps', async () => {
    const shared = ['--ram-block', 'pc.ram=32M', '--ram-block', 'vga.vram=64M', '--multifd-channels', '2', '--postcopy', '--postcopy-blocktime', '--postcopy-preempt'];
    const { source, destination } = await runMigrationPair(CLI_MAIN, shared, [
      ...shared,
      ...SWITCH,
      // Uniform writes over both blocks: two thirds of the faults fall in the second one.
      ...['--writers', '2', '--dirty-rate', '64M', '--max-bandwidth', '200M', '--max-postcopy-bandwidth', '16M'],
    ]);
    const pc = expectPostcopyVerified(source.report, destination.report);
    expect(pc.postcopyRequests).toBeGreaterThan(0);
    if (libc() !== null) expect(pc.preemptPagesByVcpus).toBeGreaterThan(0);
  });

  it("QEMU 7.2's multifd dialect (sync at every EOS; zero pages on the main stream, as 7.2 sends them): verified", async () => {
    const shared = ['--ram', '64M', '--multifd-channels', '2', '--multifd-flush-after-each-section', '--postcopy'];
    const { source, destination } = await runMigrationPair(CLI_MAIN, shared, [
      ...shared,
      ...SWITCH,
      ...['--fill', 'text', '--writers', '2', '--dirty-rate', '64M', '--max-postcopy-bandwidth', '64M'],
    ]);
    const pc = expectPostcopyVerified(source.report, destination.report);
    expect(pc.postcopyPages).toBeGreaterThan(0);
  });

  it('switch on command while multifd channels are full of queued pages: the flush-and-sync keeps it exact', async () => {
    // zlib makes the channels the bottleneck, so pages queue up in them; the switch comes
    // mid-round (not at a round's own barrier), and the destination's writers run flat out
    // over all of RAM, so a page landing from multifd after the switch would overwrite them.
    const path = join(tmp, 'ctl-switch.sock');
    const shared = ['--ram', '96M', '--multifd-channels', '4', '--multifd-compression', 'zlib', '--postcopy'];
    const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', ...shared]);
    const listening = await dst.waitFor((l) => l['event'] === 'listening');
    // Background pages after the switch are capped so that postcopy lasts a few seconds
    // whatever the machine's speed: the destination's writers must get to write.
    const src = spawnCli(CLI_MAIN, [
      ...['migrate', String(listening['uri']), '--json', ...shared, '--writers', '2', '--dirty-rate', '0'],
      ...['--max-postcopy-bandwidth', '32M', '--control', `unix:${path}`],
    ]);
    await src.waitFor((l) => l['event'] === 'control');
    const c = await ControlClient.connect(path);
    await c.execute('qmp_capabilities');
    await src.waitFor((l) => l['event'] === 'status' && l['status'] === 'active');
    await new Promise((r) => setTimeout(r, 150));
    expect((await c.execute('migrate-start-postcopy'))['return']).toEqual({});
    await c.waitFor((l) => l['event'] === 'MIGRATION' && l['data'].status === 'postcopy-active');
    c.close();
    const source = await src.done;
    const destination = await dst.done;
    const pc = expectPostcopyVerified(source.report, destination.report);
    expect(source.report!.ram.dirtySyncCount).toBeLessThanOrEqual(2);
    expect(pc.writes).toBeGreaterThan(1000);
  });

  it('a workload that cannot converge switches to postcopy by itself', async () => {
    // 12 MB/s dirtied over 8 MiB against an 8 MB/s link: rounds stop shrinking what is dirty.
    const shared = ['--ram', '8M', '--postcopy'];
    const { source, destination } = await runMigrationPair(CLI_MAIN, shared, [...shared, '--writers', '2', '--dirty-rate', '12M', '--max-bandwidth', '8M', '--downtime-limit', '20']);
    const pc = expectPostcopyVerified(source.report, destination.report);
    expect(source.report!.ram.dirtySyncCount).toBeGreaterThanOrEqual(4);
    expect(pc.discardedPages).toBeGreaterThan(0);
  });

  it('a switch that is not possible is refused: no --postcopy, or after the migration ended', async () => {
    const path = join(tmp, 'ctl-refuse.sock');
    const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--ram', '32M']);
    const listening = await dst.waitFor((l) => l['event'] === 'listening');
    const src = spawnCli(CLI_MAIN, ['migrate', String(listening['uri']), '--json', '--ram', '32M', '--max-bandwidth', '32M', '--control', `unix:${path}`]);
    await src.waitFor((l) => l['event'] === 'control');
    const c = await ControlClient.connect(path);
    await c.execute('qmp_capabilities');
    await src.waitFor((l) => l['event'] === 'status' && l['status'] === 'active');
    const r = await c.execute('migrate-start-postcopy');
    expect(r['error'].desc).toContain('--postcopy');
    c.close();
    expect((await src.done).report?.['status']).toBe('completed');
    expect((await dst.done).report?.['status']).toBe('completed');
  });

  it('a source with --postcopy and a destination without: clear error on both ends, the source keeps running', async () => {
    const { source, destination } = await runMigrationPair(CLI_MAIN, ['--ram', '16M'], ['--ram', '16M', '--postcopy', '--writers', '1', '--dirty-rate', '8M']);
    expect(destination.code).toBe(1);
    expect(destination.report?.error.code).toBe('VMIG_ERR_POSTCOPY');
    expect(destination.report?.error.message).toContain('without --postcopy');
    expect(source.code).toBe(1);
    expect(source.report?.error.code).toBe('VMIG_ERR_REMOTE');
    expect(source.report?.writersResumed).toBe(true);
  });

  it('the destination dies during postcopy: the source fails, says the guest is split, and does not resume', async () => {
    const { src, dst } = await startSlowPostcopyPair();
    await dst.waitFor((l) => l['event'] === 'postcopy' && l['reason'] === 'INBOUND_LISTEN');
    await new Promise((r) => setTimeout(r, 200));
    dst.child.kill('SIGKILL');
    const run = await src.done;
    expectSplitFailure(run);
    // The guest may have run at the destination: the source must not run it again.
    expect(run.report?.writersResumed).toBe(false);
  });

  it('the source dies during postcopy: the destination fails, says the guest is split, its vCPUs end', async () => {
    const { src, dst } = await startSlowPostcopyPair();
    await src.waitFor((l) => l['event'] === 'status' && l['status'] === 'postcopy-active');
    await new Promise((r) => setTimeout(r, 200));
    src.child.kill('SIGKILL');
    expectSplitFailure(await dst.done);
  });

  it('flags: preempt, blocktime, background nice or fault slice without --postcopy, bad --postcopy-after-rounds, nice or slice, a preempt reader without preempt or unknown: exit 2', async () => {
    for (const args of [
      ['incoming', 'tcp:127.0.0.1:0', '--postcopy-preempt'],
      ['migrate', 'tcp:127.0.0.1:1', '--ram', '4M', '--postcopy-blocktime'],
      ['migrate', 'tcp:127.0.0.1:1', '--ram', '4M', '--postcopy-after-rounds', '2'],
      ['migrate', 'tcp:127.0.0.1:1', '--ram', '4M', '--postcopy', '--postcopy-after-rounds', '0'],
      ['migrate', 'tcp:127.0.0.1:1', '--ram', '4M', '--postcopy', '--max-postcopy-bandwidth', 'lots'],
      ['incoming', 'tcp:127.0.0.1:0', '--postcopy-background-nice', '5'],
      ['migrate', 'tcp:127.0.0.1:1', '--ram', '4M', '--postcopy', '--postcopy-background-nice', '20'],
      ['incoming', 'tcp:127.0.0.1:0', '--postcopy', '--postcopy-background-nice', '-1'],
      ['incoming', 'tcp:127.0.0.1:0', '--postcopy-fault-slice-us', '100'],
      ['migrate', 'tcp:127.0.0.1:1', '--ram', '4M', '--postcopy', '--postcopy-fault-slice-us', '99'],
      ['migrate', 'tcp:127.0.0.1:1', '--ram', '4M', '--postcopy', '--postcopy-fault-slice-us', '100001'],
      ['incoming', 'tcp:127.0.0.1:0', '--postcopy', '--postcopy-fault-slice-us', '1ms'],
      ['incoming', 'tcp:127.0.0.1:0', '--postcopy', '--postcopy-preempt-reader', 'thread'],
      ['incoming', 'tcp:127.0.0.1:0', '--postcopy', '--postcopy-preempt', '--postcopy-preempt-reader', 'kernel'],
    ]) {
      const run = await spawnCli(CLI_MAIN, args).done;
      expect(run.code, args.join(' ')).toBe(2);
      expect(run.stderr.trim().split('\n')).toHaveLength(1);
    }
  });
});
