/**
 * The live progress line on a terminal (stderr a TTY, no --json): one line, rewritten in
 * place, that fits the terminal's width. Fields are dropped whole, least useful first, never
 * cut. "remaining" is RAM still to send in this round; "sent" counts every byte, re-sent pages
 * too, so it is not measured against the guest's size. The last frame says how it ended.
 */
import type { MigrationInfo } from '@vmig/core';
import { fmtBytes } from './output.js';

const BAR = 20;

/**
 * As many fields as fit in `columns` - 1 (the cursor's column), in order, each whole; a
 * terminal narrower than the first field gets that field cut (nothing else can go).
 */
function fit(fields: string[], columns: number): string {
  let line = fields[0]!;
  for (const f of fields.slice(1)) {
    const next = `${line} | ${f}`;
    if (next.length > columns - 1) break;
    line = next;
  }
  return line.slice(0, Math.max(1, columns - 1));
}

/** One frame for `columns` columns (pure: tested on its own). */
export function formatProgress(i: MigrationInfo, total: number, columns: number): string {
  const remaining = Math.min(total, i.ram.remaining);
  const frac = total > 0 ? (total - remaining) / total : 1;
  const filled = Math.round(frac * BAR);
  // In priority order: what a glance needs first.
  const fields = [
    `vmig ${i.status}`,
    `[${'#'.repeat(filled)}${'.'.repeat(BAR - filled)}] ${Math.floor(frac * 100)}%`,
    `remaining ${fmtBytes(remaining)} of ${fmtBytes(total)}`,
    `${i.ram.mbps.toFixed(0)} Mbit/s`,
    `round ${i.ram.dirtySyncCount}`,
    `expected downtime ${i.expectedDowntimeMs.toFixed(0)} ms`,
    `dirtying ${fmtBytes(i.ram.dirtyPagesRate * i.ram.pageSize)}/s`,
    `sent ${fmtBytes(i.ram.transferred)}`,
    `throttle ${i.cpuThrottlePercentage}%`,
  ];
  return fit(fields, columns);
}

/** The final frame: the outcome, then the figures that fit. */
export function formatOutcome(i: MigrationInfo, columns: number): string {
  const head =
    i.status === 'completed'
      ? `vmig completed in ${i.totalTimeMs.toFixed(0)} ms`
      : `vmig ${i.status}${i.error ? `: ${i.error.code}` : ''}`;
  const fields = [
    head,
    ...(i.downtimeMs !== undefined ? [`downtime ${i.downtimeMs.toFixed(1)} ms`] : []),
    `${i.ram.dirtySyncCount} round(s)`,
    `sent ${fmtBytes(i.ram.transferred)}`,
  ];
  return fit(fields, columns);
}

export class ProgressLine {
  private last: MigrationInfo | undefined;
  private done = false;

  constructor(
    private readonly total: number,
    private readonly out: NodeJS.WriteStream = process.stderr,
  ) {}

  private get columns(): number {
    return this.out.columns || 80;
  }

  update(i: MigrationInfo): void {
    if (this.done) return;
    this.last = i;
    // Carriage return, the frame, then clear what a longer frame left to its right.
    this.out.write(`\r${formatProgress(i, this.total, this.columns)}\x1b[K`);
  }

  /** The last frame, with the outcome, and a new line; later updates are ignored. */
  finish(final: MigrationInfo): void {
    if (this.done) return;
    this.done = true;
    if (this.last === undefined && final.status !== 'completed') return;
    this.out.write(`\r${formatOutcome(final, this.columns)}\x1b[K\n`);
  }
}
