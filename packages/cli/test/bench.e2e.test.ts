/**
 * `vmig bench --vs-qemu`: each scenario QEMU can run, run by a QEMU 7.2 pair too, alternating,
 * with the ratio of the medians (live QEMU: Debian's qemu-system-x86, which .ci/run installs).
 * `vmig bench --sizes`: the cost as the guest grows.
 */
import { spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { spawnCli } from '@vmig/test-harness';
import { CLI_MAIN, haveQemu } from './cli.js';

type Json = Record<string, any>;

describe.runIf(haveQemu())('bench --vs-qemu', () => {
  it('runs the same migration between two QEMU 7.2 processes, alternating with vmig, and prints each ratio', async () => {
    const r = await spawnCli(CLI_MAIN, ['bench', '--vs-qemu', '--scenario', 'multifd-random-2ch', '--scenario', 'precopy-zero-1ch', '--ram', '64M', '--repeat', '2']).done;
    expect(r.code, r.stderr).toBe(0);
    const lines = r.lines as Json[];
    for (const name of ['multifd-random-2ch', 'precopy-zero-1ch']) {
      const vmig = lines.filter((l) => l['scenario'] === name);
      const qemu = lines.filter((l) => l['scenario'] === `${name} (QEMU 7.2)`);
      expect(vmig.length, name).toBe(2);
      expect(qemu.length, name).toBe(2);
      for (const q of qemu) {
        expect(q['verified'], JSON.stringify(q['error'])).toBe(true);
        expect(q['totalTimeMs']).toBeGreaterThan(0);
        expect(Number.isFinite(q['downtimeMs'])).toBe(true);
      }
      const s = lines.find((l) => l['vsQemu'] === name)!;
      expect(s['runs']).toBe(2);
      expect(s['ratio']).toBeCloseTo(s['vmigMedianMs'] / s['qemuMedianMs'], 1);
    }
  });

  it('a scenario QEMU cannot run (writers, postcopy, snapshot) is refused with the reason', async () => {
    const r = await spawnCli(CLI_MAIN, ['bench', '--vs-qemu', '--scenario', 'snapshot-writers-100M']).done;
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('none of these scenarios');
  });
});

describe('bench --sizes', () => {
  it('runs multifd-random-2ch at each size, with time per GiB and peak RSS against RAM + 25 % + 100 MiB', async () => {
    const r = await spawnCli(CLI_MAIN, ['bench', '--sizes', '32M,64M']).done;
    expect(r.code, r.stderr).toBe(0);
    const runs = (r.lines as Json[]).filter((l) => l['series'] === 'growth' && 'run' in l);
    expect(runs.map((l) => l['ramBytes'])).toEqual([32 << 20, 64 << 20]);
    for (const l of runs) {
      expect(l['verified']).toBe(true);
      expect(l['msPerGiB']).toBeGreaterThan(0);
      expect(l['rssLimitBytes']).toBe(Math.round(l['ramBytes'] * 1.25 + 100 * 2 ** 20));
      expect(l['peakRssBytes'].source).toBeGreaterThan(l['ramBytes']);
      expect(typeof l['rssWithinLimit'].destination).toBe('boolean');
    }
  });
});

describe('bench --link: two hosts simulated by network namespaces', () => {
  const netnsOk = (): boolean => process.getuid?.() === 0 && spawnSync('ip', ['netns', 'list']).status === 0;
  it.runIf(netnsOk() || process.env['CI'] === 'true')('runs source and destination in two namespaces over a shaped veth link, with a delay proxy where there is no netem, and removes the namespaces', async () => {
    const before = spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' }).stdout;
    const r = await spawnCli(CLI_MAIN, ['bench', '--link', '1g-wan', '--ram', '32M', '--scenario', 'link-random-2ch', '--scenario', 'link-writers-25pct']).done;
    expect(r.code, r.stderr).toBe(0);
    const lines = r.lines as Json[];
    expect(lines.map((l) => l['case'])).toEqual(['link-random-2ch', 'link-writers-25pct']);
    for (const l of lines) {
      expect(l['verified'], JSON.stringify(l['error'])).toBe(true);
      expect(l).toMatchObject({ series: 'link', profile: '1g-wan', rateMbit: 1000, delayMs: 10 });
      expect(['netem', 'proxy']).toContain(l['delayBy']);
      // The link's rate holds it back: 1 Gbit/s is at most 125 MB/s.
      expect(l['throughputMBps']).toBeLessThanOrEqual(130);
      expect(typeof l['downtimeWithinLimit']).toBe('boolean');
    }
    // Nothing left behind.
    expect(spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' }).stdout).toBe(before);
  });

  it('an unknown profile or case is refused (exit 2)', async () => {
    const a = await spawnCli(CLI_MAIN, ['bench', '--link', 'moon']).done;
    expect(a.code).toBe(2);
    expect(a.stderr).toMatch(/unknown profile 'moon'|needs root/);
  });
});

describe('bench postcopy, preempt on against off', () => {
  it("alternates the scenarios run by run, reports the guest's progress against the same writers with no migration, then the medians and issue 20's goals", async () => {
    const off = 'postcopy-hot-2ch';
    const on = 'postcopy-hot-2ch-preempt';
    const r = await spawnCli(CLI_MAIN, ['bench', '--scenario', off, '--scenario', on, '--ram', '256M', '--repeat', '2']).done;
    expect(r.code, r.stderr).toBe(0);
    const lines = r.lines as Json[];
    const runs = lines.filter((l) => typeof l['scenario'] === 'string');
    expect(runs.map((l) => l['scenario'])).toEqual([off, on, off, on]);
    for (const l of runs) {
      expect(l['verified'], JSON.stringify(l['error'])).toBe(true);
      const pc = l['postcopy'] as Json;
      expect(pc['noMigrationWritesPerSecond']).toBeGreaterThan(0);
      expect(pc['pagesMissingMs']).toBeGreaterThan(0);
      // A vCPU counts a write while missing before it makes it: each may have counted one it had not finished when stopped.
      expect(pc['writesWhileMissing']).toBeLessThanOrEqual(pc['destinationWrites'] + pc['vcpuBlocktimeMs'].length);
      expect(pc['guestWritesPerSecond']).toBeCloseTo((pc['writesWhileMissing'] / pc['pagesMissingMs']) * 1000, -1);
      expect(pc['guestProgress']).toBeCloseTo(pc['guestWritesPerSecond'] / pc['noMigrationWritesPerSecond'], 2);
      expect(pc['vcpuBlocktimeMs']).toHaveLength(2);
    }
    for (const name of [off, on]) {
      const s = lines.find((l) => l['postcopySummary'] === name)!;
      expect(s['runs']).toBe(2);
      const m = s['medians'] as Json;
      const mine = runs.filter((l) => l['scenario'] === name).map((l) => l['postcopy']['faults'] as number);
      expect(m['faults']).toBe((mine[0]! + mine[1]!) / 2);
    }
    const cmp = lines.find((l) => l['preemptVsOff'])!;
    expect(Object.keys(cmp['goals'] as Json).sort()).toEqual(['blockedAtMost07x', 'p99AtMost5ms', 'progressAtLeastOff']);
    const mOn = lines.find((l) => l['postcopySummary'] === on)!['medians'] as Json;
    expect((cmp['goals'] as Json)['p99AtMost5ms']).toBe(mOn['faultLatencyP99Ms'] <= 5);
  });
});
