/**
 * --metrics: Prometheus text scraped from a live migration on both ends, and from a
 * background snapshot; the report's timeline.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { runMigrationPair, spawnCli } from '@vmig/test-harness';
import { CLI_MAIN } from './cli.js';

type Json = Record<string, any>;

/** `name{labels} value` lines as a map (the role label dropped). */
async function scrape(address: string): Promise<Map<string, number>> {
  const port = address.split(':').pop();
  const res = await fetch(`http://127.0.0.1:${port}/metrics`, { signal: AbortSignal.timeout(5000) });
  expect(res.status).toBe(200);
  expect(res.headers.get('content-type')).toContain('text/plain');
  const out = new Map<string, number>();
  for (const line of (await res.text()).split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const i = line.lastIndexOf(' ');
    out.set(line.slice(0, i).replace(/,?role="[a-z]+"/, '').replace('{}', ''), Number(line.slice(i + 1)));
  }
  return out;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('--metrics', () => {
  it('both ends serve Prometheus text during a migration: query-migrate fields, per-channel bytes, the process', async () => {
    const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--multifd-channels', '2', '--metrics', 'tcp:127.0.0.1:0']);
    const dstMetrics = String((await dst.waitFor((l) => l['event'] === 'metrics'))['address']);
    const listening = await dst.waitFor((l) => l['event'] === 'listening');
    const src = spawnCli(CLI_MAIN, [
      'migrate', String(listening['uri']), '--json', '--ram', '128M', '--multifd-channels', '2', '--writers', '1', '--dirty-rate', '8M',
      '--max-bandwidth', '40M', '--metrics', 'tcp:127.0.0.1:0',
    ]);
    const srcMetrics = String((await src.waitFor((l) => l['event'] === 'metrics'))['address']);
    await src.waitFor((l) => l['event'] === 'status' && l['status'] === 'active');
    await sleep(500);
    const a = await scrape(srcMetrics);
    await sleep(800);
    const b = await scrape(srcMetrics);
    const d = await scrape(dstMetrics);

    expect(a.get('vmig_migration_status{status="active"}')).toBe(1);
    expect(a.get('vmig_migration_status{status="completed"}')).toBe(0);
    expect(a.get('vmig_migration_ram_total_bytes')).toBe(128 * 2 ** 20);
    // A live migration: the figures move between two scrapes.
    expect(b.get('vmig_migration_ram_transferred_bytes')!).toBeGreaterThan(a.get('vmig_migration_ram_transferred_bytes')!);
    expect(b.get('vmig_migration_ram_remaining_bytes')).toBeDefined();
    expect(b.get('vmig_migration_ram_mbps')!).toBeGreaterThan(0);
    for (const name of ['vmig_migration_ram_dirty_sync_count', 'vmig_migration_ram_dirty_pages_rate', 'vmig_migration_expected_downtime_ms', 'vmig_migration_cpu_throttle_percentage', 'vmig_migration_ram_postcopy_requests', 'vmig_migration_ram_multifd_bytes']) {
      expect(b.has(name), name).toBe(true);
    }
    expect(b.get('vmig_multifd_channel_bytes{channel="0"}')!).toBeGreaterThan(0);
    expect(b.get('vmig_multifd_channel_bytes{channel="1"}')!).toBeGreaterThan(0);
    // The process's own.
    expect(b.get('process_resident_memory_bytes')!).toBeGreaterThan(0);
    expect(b.has('process_cpu_seconds_total')).toBe(true);
    expect(b.has('nodejs_eventloop_lag_seconds')).toBe(true);

    expect(d.get('vmig_migration_status{status="active"}')).toBe(1);
    expect(d.has('vmig_multifd_channel_bytes{channel="0"}')).toBe(true);

    const [s, r] = await Promise.all([src.done, dst.done]);
    expect(s.code, s.stderr).toBe(0);
    expect(r.code, r.stderr).toBe(0);
    expect(r.report?.['ramDigest']).toBe(s.report?.['ramDigest']);
    // The report's timeline: every phase, one entry per round.
    const t = s.report?.['timeline'] as Json;
    expect(t.phases.map((p: Json) => p.phase)).toEqual(['setup', 'iterations', 'stop-and-copy', 'completion']);
    // Syncs: one at setup, one ending each round, one after the stop.
    expect(t.rounds.length).toBe(s.report?.['ram'].dirtySyncCount - 2);
    expect(t.rounds[0]).toMatchObject({ round: 1 });
    // Every page of the (random) RAM went in a round or in the final pass (a round may end
    // before its scan wrapped, when what is left fits the downtime limit).
    expect(t.rounds.reduce((n: number, x: Json) => n + x.bytes, 0) + s.report?.['ram'].downtimeBytes).toBeGreaterThan(128 * 2 ** 20);
    for (const x of t.rounds) expect(Object.keys(x).sort()).toEqual(['bytes', 'cpuThrottlePercentage', 'dirtiedPages', 'durationMs', 'expectedDowntimeMs', 'mbps', 'remainingBytes', 'round', 'startMs']);
  });

  it('a postcopy destination serves its requests and its vCPUs\' fault latency as a histogram', async () => {
    const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--postcopy', '--postcopy-blocktime', '--metrics', 'tcp:127.0.0.1:0']);
    const address = String((await dst.waitFor((l) => l['event'] === 'metrics'))['address']);
    const listening = await dst.waitFor((l) => l['event'] === 'listening');
    const src = spawnCli(CLI_MAIN, [
      'migrate', String(listening['uri']), '--json', '--ram', '128M', '--writers', '2', '--dirty-rate', '64M', '--postcopy',
      '--postcopy-after-rounds', '1', '--max-postcopy-bandwidth', '16M',
    ]);
    await dst.waitFor((l) => l['event'] === 'postcopy' && l['reason'] === 'INBOUND_LISTEN');
    let m = await scrape(address);
    for (let i = 0; i < 20 && !(m.get('vmig_postcopy_fault_latency_seconds_count')! > 0); i++) {
      await sleep(200);
      m = await scrape(address);
    }
    expect(m.get('vmig_migration_status{status="postcopy-active"}')).toBe(1);
    expect(m.get('vmig_postcopy_fault_latency_seconds_count')!).toBeGreaterThan(0);
    expect(m.get('vmig_migration_ram_postcopy_requests')!).toBeGreaterThan(0);
    expect(m.has('vmig_postcopy_fault_latency_seconds_bucket{le="+Inf"}')).toBe(true);
    const [s, r] = await Promise.all([src.done, dst.done]);
    expect(s.code, s.stderr).toBe(0);
    expect(r.code, r.stderr).toBe(0);
    expect(r.report?.['postcopy'].badStamps).toBe(0);
    expect((s.report?.['timeline'] as Json).phases.map((p: Json) => p.phase)).toEqual(['setup', 'iterations', 'stop-and-copy', 'postcopy', 'completion']);
  });

  it('a background snapshot serves its writer stalls as a histogram', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'vmig-metrics-'));
    const file = join(dir, 'snap.vmig');
    const snap = spawnCli(CLI_MAIN, ['snapshot', file, '--json', '--ram', '256M', '--writers', '2', '--dirty-rate', '64M', '--metrics', 'tcp:127.0.0.1:0']);
    const address = String((await snap.waitFor((l) => l['event'] === 'metrics'))['address']);
    await snap.waitFor((l) => l['event'] === 'status' && l['status'] === 'active');
    const m = await scrape(address);
    expect(m.has('vmig_snapshot_stall_seconds_count')).toBe(true);
    expect(m.has('vmig_snapshot_stall_seconds_bucket{le="0.001"}')).toBe(true);
    expect((await snap.done).code).toBe(0);
    rmSync(dir, { recursive: true, force: true });
  });

  it('a bad address is a bad flag: exit 2', async () => {
    const r = await spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--metrics', 'http://x']).done;
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('metrics');
  });
});

describe('--log-level debug', () => {
  it('both ends log each phase and channel: connect, handshake, barrier, rounds, the switchover and why', async () => {
    const { source, destination } = await runMigrationPair(
      CLI_MAIN,
      ['--multifd-channels', '2', '--log-level', 'debug'],
      ['--ram', '64M', '--multifd-channels', '2', '--writers', '1', '--dirty-rate', '8M', '--max-bandwidth', '64M', '--log-level', 'debug'],
    );
    expect(source.code, source.stderr).toBe(0);
    expect(destination.code, destination.stderr).toBe(0);
    const msgs = (stderr: string) =>
      stderr
        .split('\n')
        .filter((l) => l.startsWith('{'))
        .map((l) => JSON.parse(l) as Json);
    const src = msgs(source.stderr);
    const dst = msgs(destination.stderr);
    const has = (lines: Json[], msg: string, where: string) => expect(lines.some((l) => String(l['msg']).startsWith(msg)), `${where}: ${msg}`).toBe(true);
    for (const m of ['connected', 'multifd channels connected', 'return-path thread reading', 'setup done', 'multifd barrier', 'round ended', 'switchover: what is dirty fits', 'vCPUs stopped', 'device state and EOF sent', 'migration thread done']) has(src, m, 'source');
    for (const m of ['main channel connected', 'multifd channel connected', 'loading the main stream', 'RAM ready', 'multifd barrier dialect', 'multifd barrier: every channel', 'stream loaded', 'loaded; SHUT sent']) has(dst, m, 'destination');
    // Each round's numbers.
    const round = src.find((l) => l['msg'] === 'round ended (dirty-log sync)')!;
    for (const k of ['round', 'pending', 'dirtiedPages', 'mbps', 'expectedDowntimeMs', 'downtimeLimitMs']) expect(round, k).toHaveProperty(k);
    // Both ends name their role.
    expect(src[0]!['role']).toBe('source');
    expect(dst[0]!['role']).toBe('destination');
  });
});
