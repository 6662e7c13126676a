/**
 * Migration statistics in the shape of QEMU's query-migrate (camelCase).
 */
import { TARGET_PAGE_SIZE } from '../ram/ram-block.js';
import type { MigrationStatus } from './state.js';

export interface RamStats {
  transferred: number;
  remaining: number;
  total: number;
  duplicate: number;
  normal: number;
  normalBytes: number;
  dirtySyncCount: number;
  dirtyPagesRate: number;
  mbps: number;
  pagesPerSecond: number;
  pageSize: number;
  precopyBytes: number;
  downtimeBytes: number;
  multifdBytes: number;
  /** Postcopy: page requests served, and bytes sent after the switch. */
  postcopyRequests: number;
  postcopyBytes: number;
  /** Postcopy recoveries completed (a connection broke after the switch and was replaced). */
  postcopyRecoveries: number;
}

export interface MigrationInfo {
  status: MigrationStatus;
  totalTimeMs: number;
  setupTimeMs: number;
  downtimeMs?: number;
  expectedDowntimeMs: number;
  /** cpu-throttle-percentage (auto-converge). */
  cpuThrottlePercentage: number;
  ram: RamStats;
  error?: { code: string; message: string };
}

/** The phases of a migration, in QEMU's terms. */
export type MigrationPhase = 'setup' | 'iterations' | 'stop-and-copy' | 'postcopy' | 'postcopy-paused' | 'completion';

export interface PhaseRecord {
  phase: MigrationPhase;
  /** Since the migration started (ms). */
  startMs: number;
  durationMs: number;
}

/** One precopy round: from one dirty-log sync to the next. */
export interface RoundRecord {
  round: number;
  startMs: number;
  durationMs: number;
  /** Bytes written on every channel during the round. */
  bytes: number;
  /** Pages the sync that ended the round found newly dirtied. */
  dirtiedPages: number;
  /** Bytes dirty after that sync: what the next round starts with. */
  remainingBytes: number;
  /** Bandwidth as last measured in the round (Mbit/s). */
  mbps: number;
  expectedDowntimeMs: number;
  cpuThrottlePercentage: number;
}

export interface MigrationTimeline {
  phases: PhaseRecord[];
  rounds: RoundRecord[];
}

/** The most rounds kept (a migration that never converges may run many). */
const MAX_ROUNDS = 10_000;

/** Phases and rounds as they happen; `toJSON()` is the report's `timeline`. */
export class TimelineRecorder {
  private readonly phases: PhaseRecord[] = [];
  private readonly rounds: RoundRecord[] = [];
  private open: { phase: MigrationPhase; at: number } | undefined;
  private start = 0;

  begin(now: number): void {
    this.start = now;
  }

  enter(phase: MigrationPhase, now: number): void {
    this.close(now);
    this.open = { phase, at: now };
  }

  /** Ends the open phase (at the migration's end). */
  close(now: number): void {
    const o = this.open;
    if (!o) return;
    this.phases.push({ phase: o.phase, startMs: round(o.at - this.start), durationMs: round(now - o.at) });
    this.open = undefined;
  }

  round(r: Omit<RoundRecord, 'startMs' | 'durationMs'> & { startedAt: number; endedAt: number }): void {
    if (this.rounds.length >= MAX_ROUNDS) return;
    const { startedAt, endedAt, ...rest } = r;
    this.rounds.push({ ...rest, startMs: round(startedAt - this.start), durationMs: round(endedAt - startedAt) });
  }

  toJSON(): MigrationTimeline {
    return { phases: [...this.phases], rounds: [...this.rounds] };
  }
}

/** Counters the migration thread updates; `info()` renders them. */
export class MigrationStats {
  status: MigrationStatus = 'none';
  startTime = 0;
  setupTimeMs = 0;
  endTime: number | undefined;
  downtimeMs: number | undefined;
  expectedDowntimeMs = 0;
  /** Bytes written on every channel. */
  transferred = 0;
  remainingPages = 0;
  totalBytes = 0;
  zeroPages = 0;
  normalPages = 0;
  dirtySyncCount = 0;
  dirtyPagesRate = 0;
  /** Bytes per second over the last measured period. */
  bandwidth = 0;
  pagesPerSecond = 0;
  precopyBytes = 0;
  downtimeBytes = 0;
  multifdBytes = 0;
  postcopyRequests = 0;
  postcopyBytes = 0;
  postcopyRecoveries = 0;
  cpuThrottlePercentage = 0;
  error: { code: string; message: string } | undefined;
  readonly timeline = new TimelineRecorder();

  info(now = performance.now()): MigrationInfo {
    const end = this.endTime ?? now;
    const out: MigrationInfo = {
      status: this.status,
      totalTimeMs: round(this.startTime ? end - this.startTime : 0),
      setupTimeMs: round(this.setupTimeMs),
      expectedDowntimeMs: round(this.expectedDowntimeMs),
      cpuThrottlePercentage: this.cpuThrottlePercentage,
      ram: {
        transferred: this.transferred,
        remaining: this.remainingPages * TARGET_PAGE_SIZE,
        total: this.totalBytes,
        duplicate: this.zeroPages,
        normal: this.normalPages,
        normalBytes: this.normalPages * TARGET_PAGE_SIZE,
        dirtySyncCount: this.dirtySyncCount,
        dirtyPagesRate: Math.round(this.dirtyPagesRate),
        mbps: round((this.bandwidth * 8) / 1e6),
        pagesPerSecond: Math.round(this.pagesPerSecond),
        pageSize: TARGET_PAGE_SIZE,
        precopyBytes: this.precopyBytes,
        downtimeBytes: this.downtimeBytes,
        multifdBytes: this.multifdBytes,
        postcopyRequests: this.postcopyRequests,
        postcopyBytes: this.postcopyBytes,
        postcopyRecoveries: this.postcopyRecoveries,
      },
    };
    if (this.downtimeMs !== undefined) out.downtimeMs = round(this.downtimeMs);
    if (this.error) out.error = this.error;
    return out;
  }
}

function round(v: number): number {
  return Math.round(v * 1000) / 1000;
}
