/**
 * Bounds the migration thread's waits on a peer or a thread (--channel-timeout): a wait
 * registers what it waits for when it starts and leaves when it settles; a timer looks at
 * the open waits a few times per timeout and reports the first one older than the timeout.
 * One timer for the whole migration, not one per wait: a rate-limited migration waits
 * hundreds of thousands of times.
 */
export class Watchdog {
  private readonly waits = new Map<number, { since: number; what: string }>();
  private nextId = 0;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    readonly timeoutMs: number,
    private readonly onExpired: (what: string) => void,
  ) {}

  start(): void {
    this.timer ??= setInterval(() => this.check(), Math.max(10, Math.min(1000, this.timeoutMs / 4)));
    // It guards waits; it is not a reason for the process to stay.
    this.timer.unref();
  }

  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
  }

  /** A wait for `what` begins; pass the id to leave(). */
  enter(what: string): number {
    const id = this.nextId++;
    this.waits.set(id, { since: performance.now(), what });
    return id;
  }

  leave(id: number): void {
    this.waits.delete(id);
  }

  private check(): void {
    const now = performance.now();
    for (const w of this.waits.values()) {
      if (now - w.since > this.timeoutMs) {
        this.onExpired(w.what);
        return;
      }
    }
  }
}
