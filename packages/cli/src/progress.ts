/**
 * The live progress line in a terminal (cli-progress): transferred/total, throughput,
 * dirty rate, round and expected downtime. Only used when stderr is a TTY and not --json.
 */
import { SingleBar } from 'cli-progress';
import type { MigrationInfo } from '@vmig/core';
import { fmtBytes } from './output.js';

export class ProgressLine {
  private readonly bar: SingleBar;
  private started = false;

  constructor(private readonly total: number) {
    this.bar = new SingleBar({
      stream: process.stderr,
      format: 'vmig {bar} {sent}/{size} | {mbps} Mbit/s | dirty {dirty}/s | round {round} | throttle {throttle}% | expected downtime {downtime} ms',
      barsize: 24,
      hideCursor: true,
      clearOnComplete: false,
      etaBuffer: 1,
    });
  }

  update(i: MigrationInfo): void {
    // Progress within a round: what is not dirty anymore.
    const done = Math.max(0, this.total - i.ram.remaining);
    const payload = {
      sent: fmtBytes(i.ram.transferred),
      size: fmtBytes(this.total),
      mbps: i.ram.mbps.toFixed(0),
      dirty: fmtBytes(i.ram.dirtyPagesRate * i.ram.pageSize),
      round: i.ram.dirtySyncCount,
      throttle: i.cpuThrottlePercentage,
      downtime: i.expectedDowntimeMs.toFixed(0),
    };
    if (!this.started) {
      this.bar.start(this.total, done, payload);
      this.started = true;
    } else this.bar.update(done, payload);
  }

  stop(): void {
    if (this.started) this.bar.stop();
    this.started = false;
  }
}
