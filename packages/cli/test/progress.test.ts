import { describe, expect, it } from 'vitest';
import type { MigrationInfo } from '@vmig/core';
import { formatOutcome, formatProgress } from '../src/progress.js';

const MiB = 2 ** 20;
const info = (over: Partial<MigrationInfo['ram']> = {}, status: MigrationInfo['status'] = 'active'): MigrationInfo => ({
  status,
  totalTimeMs: 1234,
  setupTimeMs: 5,
  expectedDowntimeMs: 42,
  cpuThrottlePercentage: 20,
  ram: {
    transferred: 131 * MiB,
    remaining: 16 * MiB,
    total: 64 * MiB,
    duplicate: 0,
    normal: 0,
    normalBytes: 0,
    dirtySyncCount: 3,
    dirtyPagesRate: 1000,
    mbps: 950,
    pagesPerSecond: 0,
    pageSize: 4096,
    precopyBytes: 0,
    downtimeBytes: 0,
    multifdBytes: 0,
    postcopyRequests: 0,
    postcopyBytes: 0,
    ...over,
  },
});

describe('progress line', () => {
  it('shows every field on a wide terminal; remaining is measured against the guest, sent is not', () => {
    const l = formatProgress(info(), 64 * MiB, 240);
    expect(l).toContain('remaining 16.0 MiB of 64.0 MiB');
    expect(l).toContain('round 3');
    expect(l).toContain('throttle 20%');
    expect(l).toContain('expected downtime 42 ms');
    expect(l).toContain('sent 131.0 MiB');
    expect(l).not.toContain('131.0 MiB/64.0 MiB');
    expect(l).toContain('75%');
  });

  it.each([40, 60, 80, 100, 120])('fits %i columns, dropping whole fields, never cutting one', (cols) => {
    const l = formatProgress(info(), 64 * MiB, cols);
    expect(l.length).toBeLessThan(cols);
    const full = formatProgress(info(), 64 * MiB, 1000).split(' | ');
    const shown = l.split(' | ');
    // A prefix of the full list of fields, each whole.
    expect(shown).toEqual(full.slice(0, shown.length));
  });

  it('never shows more remaining than the guest has', () => {
    expect(formatProgress(info({ remaining: 200 * MiB }), 64 * MiB, 200)).toContain('remaining 64.0 MiB of 64.0 MiB');
  });

  it('the last frame says how it ended', () => {
    const done = { ...info({ remaining: 0 }, 'completed'), downtimeMs: 12.5 };
    expect(formatOutcome(done, 120)).toBe('vmig completed in 1234 ms | downtime 12.5 ms | 3 round(s) | sent 131.0 MiB');
    const failed = { ...info({}, 'failed'), error: { code: 'VMIG_ERR_TIMEOUT', message: 'x' } };
    expect(formatOutcome(failed, 120)).toMatch(/^vmig failed: VMIG_ERR_TIMEOUT/);
    expect(formatOutcome(done, 30).length).toBeLessThan(30);
  });
});
