/**
 * max-bandwidth as a token bucket (QEMU's migration_rate_limit, smoothed): credit accrues
 * at `bytesPerSecond` and is capped at one period's worth, so a pause never turns into a
 * burst larger than one period. Credit is handed out in bursts of at least MIN_BURST (or a
 * quarter period at low rates): handed out as it trickled in, a capped migration sent a
 * section per page or two, and the source's migration thread spent its time on section
 * framing and garbage (498 collections in a 200 MB/s run of 1 GiB; 85 with bursts).
 */
const MIN_BURST = 256 * 1024;

export class RateLimiter {
  private tokens: number;
  private last: number;

  constructor(
    private bytesPerSecond: number,
    private readonly periodMs = 100,
    now = performance.now(),
  ) {
    this.tokens = (bytesPerSecond * periodMs) / 1000;
    this.last = now;
  }

  /** migrate-set-parameters max-bandwidth, while running: takes effect from now. */
  setRate(bytesPerSecond: number, now = performance.now()): void {
    this.refill(now);
    this.bytesPerSecond = bytesPerSecond;
    const cap = (bytesPerSecond * this.periodMs) / 1000;
    this.tokens = Math.min(cap, this.tokens);
  }

  get unlimited(): boolean {
    return this.bytesPerSecond <= 0;
  }

  /** The least credit handed out at once. */
  private get minBurst(): number {
    return Math.min(MIN_BURST, (this.bytesPerSecond * this.periodMs) / 4000);
  }

  private refill(now: number): void {
    const cap = (this.bytesPerSecond * this.periodMs) / 1000;
    this.tokens = Math.min(cap, this.tokens + ((now - this.last) * this.bytesPerSecond) / 1000);
    this.last = now;
  }

  /** Bytes that may be sent now (0 if the caller must wait: less than a burst is due). */
  allowance(now = performance.now()): number {
    if (this.unlimited) return Infinity;
    this.refill(now);
    return this.tokens >= this.minBurst ? this.tokens : 0;
  }

  /** Milliseconds until a burst of credit is available again. */
  waitMs(now = performance.now()): number {
    if (this.unlimited) return 0;
    this.refill(now);
    const missing = this.minBurst - this.tokens;
    return missing <= 0 ? 0 : Math.max(1, (missing * 1000) / this.bytesPerSecond + 1);
  }

  consume(bytes: number): void {
    if (!this.unlimited) this.tokens -= bytes;
  }

  private accounted: number | undefined;

  /**
   * Charges whatever a running byte counter grew by since the last call. Bytes that other
   * threads report asynchronously (multifd channels) are charged whenever they arrive.
   */
  account(totalBytes: number): void {
    if (this.accounted !== undefined) this.consume(totalBytes - this.accounted);
    this.accounted = totalBytes;
  }
}
