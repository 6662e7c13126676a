/**
 * What the control socket answers, in QEMU's QMP names and units (qapi/migration.json,
 * qapi/misc.json): MigrationInfo from vmig's statistics, the capabilities list, the run
 * state. Pure: no sockets here.
 */
import type { MigrationInfo, MigrationParams } from '@vmig/core';

/** The QEMU whose migration protocol vmig speaks, as QMP's greeting and query-version say it. */
export const QMP_VERSION = { qemu: { major: 7, minor: 2, micro: 0 } };

/** query-migrate: QEMU's MigrationInfo (times in ms, mbps in Mbit/s). */
export function qmpMigrationInfo(i: MigrationInfo | undefined): Record<string, unknown> {
  if (!i || i.status === 'none') return {};
  const r = i.ram;
  return {
    status: i.status,
    'total-time': Math.round(i.totalTimeMs),
    'setup-time': Math.round(i.setupTimeMs),
    ...(i.downtimeMs !== undefined ? { downtime: Math.round(i.downtimeMs) } : { 'expected-downtime': Math.round(i.expectedDowntimeMs) }),
    ...(i.cpuThrottlePercentage > 0 ? { 'cpu-throttle-percentage': i.cpuThrottlePercentage } : {}),
    ram: {
      transferred: r.transferred,
      remaining: r.remaining,
      total: r.total,
      duplicate: r.duplicate,
      skipped: 0,
      normal: r.normal,
      'normal-bytes': r.normalBytes,
      'dirty-pages-rate': r.dirtyPagesRate,
      mbps: r.mbps,
      'dirty-sync-count': r.dirtySyncCount,
      'postcopy-requests': r.postcopyRequests,
      'page-size': r.pageSize,
      'multifd-bytes': r.multifdBytes,
      'pages-per-second': r.pagesPerSecond,
      'precopy-bytes': r.precopyBytes,
      'downtime-bytes': r.downtimeBytes,
      'postcopy-bytes': r.postcopyBytes,
    },
    ...(i.error ? { 'error-desc': `${i.error.message} [${i.error.code}]` } : {}),
  };
}

/** The capabilities vmig has, named as QEMU's MigrationCapability. */
export const CAPABILITIES = ['auto-converge', 'postcopy-ram', 'postcopy-preempt', 'multifd'] as const;
export type Capability = (typeof CAPABILITIES)[number];

export function qmpCapabilities(state: Record<Capability, boolean>): { capability: Capability; state: boolean }[] {
  return CAPABILITIES.map((c) => ({ capability: c, state: state[c] }));
}

/** query-migrate-parameters: QEMU's MigrationParameters that vmig has. */
export function qmpParameters(p: Readonly<MigrationParams>, extra: { multifdChannels: number; multifdCompression: string }): Record<string, unknown> {
  return {
    'downtime-limit': p.downtimeLimitMs,
    'max-bandwidth': p.maxBandwidth,
    'max-postcopy-bandwidth': p.maxPostcopyBandwidth,
    'multifd-channels': extra.multifdChannels,
    'multifd-compression': extra.multifdCompression,
    'zero-page-detection': p.zeroPageDetection,
  };
}

/**
 * query-status: the guest's run state as QEMU's RunState. The destination's guest runs once
 * the migration completed or postcopy's RUN came (`guestRunning`).
 */
export function qmpStatus(migration: string | undefined, side: 'source' | 'destination', guestRunning = migration === 'completed'): { status: string; running: boolean; singlestep: boolean } {
  if (side === 'destination') return { status: guestRunning ? 'running' : 'inmigrate', running: guestRunning, singlestep: false };
  if (migration === 'completed' || migration === 'postcopy-active' || migration === 'postcopy-paused' || migration === 'postcopy-recover') return { status: 'postmigrate', running: false, singlestep: false };
  if (migration === 'device') return { status: 'finish-migrate', running: false, singlestep: false };
  return { status: 'running', running: true, singlestep: false };
}
