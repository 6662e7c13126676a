/**
 * Auto-converge (QEMU's migration_trigger_throttle / mig_throttle_guest_down): once a
 * period (at least a second, measured between bitmap syncs) the bytes the vCPUs dirtied are
 * compared with the bytes sent; if they exceed 50 % of what was sent for the second time,
 * the vCPUs are throttled: 20 % first, then 10 % more each time, at most 99 %.
 */
export const THROTTLE_TRIGGER_THRESHOLD_PCT = 50;
export const CPU_THROTTLE_INITIAL = 20;
export const CPU_THROTTLE_INCREMENT = 10;
export const CPU_THROTTLE_MAX = 99;
/** Minimum length of a period (QEMU: end_time > time_last_bitmap_sync + 1000). */
export const THROTTLE_PERIOD_MS = 1000;

export class AutoConverge {
  /** cpu-throttle-percentage. */
  percentage = 0;
  private dirtyRateHighCount = 0;
  private dirtyPagesPeriod = 0;
  private bytesXferPrev = 0;
  private periodStart: number;

  constructor(now: number, transferred: number) {
    this.periodStart = now;
    this.bytesXferPrev = transferred;
  }

  /**
   * Called at every precopy bitmap sync with the pages it found newly dirty and the bytes
   * transferred so far. Returns the new throttle when it changes.
   */
  onBitmapSync(newlyDirtyPages: number, pageSize: number, transferred: number, now: number): number | undefined {
    this.dirtyPagesPeriod += newlyDirtyPages;
    if (now - this.periodStart < THROTTLE_PERIOD_MS) return undefined;
    const bytesXferPeriod = transferred - this.bytesXferPrev;
    const bytesDirtyPeriod = this.dirtyPagesPeriod * pageSize;
    const threshold = (bytesXferPeriod * THROTTLE_TRIGGER_THRESHOLD_PCT) / 100;
    this.periodStart = now;
    this.bytesXferPrev = transferred;
    this.dirtyPagesPeriod = 0;
    if (bytesDirtyPeriod > threshold && ++this.dirtyRateHighCount >= 2) {
      this.dirtyRateHighCount = 0;
      this.percentage = this.percentage === 0 ? CPU_THROTTLE_INITIAL : Math.min(CPU_THROTTLE_MAX, this.percentage + CPU_THROTTLE_INCREMENT);
      return this.percentage;
    }
    return undefined;
  }
}
