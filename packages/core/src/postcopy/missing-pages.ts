/**
 * The received map of a postcopy destination: the software twin of userfaultfd's missing
 * faults (architecture.md, seed 003). Both halves live here so every Atomics pairing is in
 * one file: the vCPU side (`MissingPagesVcpu.beforeWrite`, in writer threads) and the
 * placing side (`MissingPagesPlacer`, the destination's load thread).
 *
 * Shared state (SharedArrayBuffers):
 * - `received` bitmap, one bit per page (global index over all blocks, in block order).
 * - per-writer fault slots and their doorbell (ram/fault-slots.ts).
 * - control words: ABORT, the "all vCPUs blocked" bookkeeping.
 * - per-writer fault latency samples (stats/latency-samples.ts).
 *
 * Ordering rules:
 * 1. Placement: the placer copies the WHOLE page into guest RAM, then sets the page's bit
 *    with Atomics.or (release), then notifies the bit's word. A writer tests the bit with
 *    Atomics.load (acquire) before it touches the page, so it never sees a partly placed
 *    page, and a page whose bit is set is never placed again (the placer tests it first):
 *    a write that landed after the bit was set is never overwritten.
 * 2. Fault: the writer posts the page in its fault slot (FaultSlots.post), then
 *    Atomics.waits on the page's word of `received` until its bit is set. The placer's
 *    notify after the Atomics.or wakes it; the wait's timeout only guards against a lost
 *    wake-up and lets it see ABORT. The writer clears its own slot once woken.
 * 3. Teardown (a failure during postcopy): the placer sets ABORT and notifies every word;
 *    a blocked writer gives up without writing (the guest is split, nothing may land).
 */
import { AtomicBitmap } from '../ram/bitmap.js';
import { createFaultSlots, FaultSlots, type FaultSlotsShared } from '../ram/fault-slots.js';
import { LatencySamples, latencySamplesBytes, type LatencySummary } from '../stats/latency-samples.js';

// Control words (Int32).
const ABORT = 0;
const LOCK = 1;
const BLOCKED = 2;
/** vCPUs running (set before they start): "all blocked" means BLOCKED === WRITERS. */
const WRITERS = 3;
const CTL_WORDS = 4;
// Time words (Float64): when every vCPU became blocked, and the total of such spans.
const ALL_START = 0;
const ALL_TOTAL = 1;

export interface MissingPagesShared {
  pages: number;
  /** Fault slots and sample rows: the most vCPUs this map can serve. */
  writers: number;
  /** vCPUs time their faults (--postcopy-blocktime). */
  blocktime: boolean;
  ctl: SharedArrayBuffer;
  times: SharedArrayBuffer;
  received: SharedArrayBuffer;
  faults: FaultSlotsShared;
  latency: SharedArrayBuffer;
}

export function createMissingPages(pages: number, writers: number, blocktime: boolean): MissingPagesShared {
  return {
    pages,
    writers,
    blocktime,
    ctl: new SharedArrayBuffer(CTL_WORDS * 4),
    times: new SharedArrayBuffer(2 * 8),
    received: new SharedArrayBuffer(AtomicBitmap.bytesFor(pages)),
    faults: createFaultSlots(writers),
    latency: new SharedArrayBuffer(blocktime ? latencySamplesBytes(writers) : 8),
  };
}

class Views {
  readonly ctl: Int32Array;
  readonly times: Float64Array;
  readonly received: AtomicBitmap;
  readonly faults: FaultSlots;
  readonly latency: LatencySamples;
  constructor(readonly s: MissingPagesShared) {
    this.ctl = new Int32Array(s.ctl);
    this.times = new Float64Array(s.times);
    this.received = new AtomicBitmap(s.received, s.pages);
    this.faults = new FaultSlots(s.faults);
    this.latency = new LatencySamples(s.latency, s.blocktime ? s.writers : 0);
  }

  /**
   * The "all vCPUs blocked" span (QEMU's total blocktime) under a tiny spin lock: entering
   * and leaving must see each other's start time, which two separate atomics cannot give.
   * `timeOrigin + now()` puts every thread's clock on one scale.
   */
  blockedDelta(delta: 1 | -1, now: number): void {
    while (Atomics.compareExchange(this.ctl, LOCK, 0, 1) !== 0);
    const before = this.ctl[BLOCKED]!;
    this.ctl[BLOCKED] = before + delta;
    const writers = this.ctl[WRITERS]!;
    if (delta === 1 && before + 1 === writers) this.times[ALL_START] = now;
    if (delta === -1 && before === writers) this.times[ALL_TOTAL] = this.times[ALL_TOTAL]! + (now - this.times[ALL_START]!);
    Atomics.store(this.ctl, LOCK, 0);
  }
}

const clock = (): number => performance.timeOrigin + performance.now();

/** The vCPU half, in a writer thread. `page` is the global page index. */
export class MissingPagesVcpu {
  private readonly v: Views;

  constructor(
    shared: MissingPagesShared,
    private readonly writer: number,
  ) {
    this.v = new Views(shared);
  }

  /**
   * Call before touching `page`. Returns true once the page is in place (at once if it
   * already was), false if postcopy failed meanwhile (the write must not happen).
   */
  beforeWrite(page: number): boolean {
    const v = this.v;
    if (v.received.test(page)) return true;
    const timed = v.s.blocktime;
    const t0 = timed ? clock() : 0;
    if (timed) v.blockedDelta(1, t0);
    // Rule 2: post the fault (which rings the doorbell), wait on the page's word.
    v.faults.post(this.writer, page);
    const words = v.received.words;
    const w = page >>> 5;
    const bit = 1 << (page & 31);
    let ok = true;
    for (;;) {
      const cur = Atomics.load(words, w);
      if ((cur & bit) !== 0) break;
      if (Atomics.load(v.ctl, ABORT) !== 0) {
        ok = false;
        break;
      }
      Atomics.wait(words, w, cur, 20);
    }
    v.faults.clear(this.writer);
    if (timed) {
      const t1 = clock();
      v.blockedDelta(-1, t1);
      if (ok) v.latency.record(this.writer, t1 - t0);
    }
    return ok;
  }
}

export interface PostcopyBlocktime {
  /** Time during which every vCPU was blocked at once (QEMU's postcopy-blocktime). */
  postcopyBlocktimeMs: number;
  /** Per vCPU, the time it was blocked (postcopy-vcpu-blocktime). */
  postcopyVcpuBlocktimeMs: number[];
  faults: number;
  faultLatencyP50Ms: number;
  faultLatencyP99Ms: number;
  faultLatencyMaxMs: number;
}

/** The placing half, on the destination's load thread. */
export class MissingPagesPlacer {
  private readonly v: Views;
  /** Pages requested and not yet placed: a second fault on one is not requested again. */
  private readonly requested = new Set<number>();
  private seenSeq = 0;
  placed = 0;
  /** Pages that arrived although already in place (sent in the background and on request). */
  dropped = 0;
  /** Pages whose bit is clear (kept by this thread, the only one that changes bits). */
  private missingCount: number;

  constructor(readonly shared: MissingPagesShared) {
    this.v = new Views(shared);
    this.missingCount = shared.pages;
  }

  isReceived(page: number): boolean {
    return this.v.received.test(page);
  }

  /** Every page received: precopy delivered them all before the switch (no writer runs yet). */
  markAllReceived(): void {
    this.v.received.setAll();
    this.missingCount = 0;
  }

  /** Marks [start, start+n) not received (POSTCOPY_RAM_DISCARD; no writer runs yet). */
  markMissing(start: number, n: number): void {
    for (let p = start; p < start + n; p++) if (this.v.received.testAndClear(p)) this.missingCount++;
  }

  /** How many vCPUs run (before they start). */
  setRunningVcpus(n: number): void {
    if (n > this.shared.writers) throw new RangeError(`${n} vCPUs, the received map serves ${this.shared.writers}`);
    Atomics.store(this.v.ctl, WRITERS, n);
  }

  /** Pages not received yet. */
  missing(): number {
    return this.missingCount;
  }

  /**
   * Rule 1: places one page unless it is in place already. `copy` must write the whole page
   * into guest RAM before it returns. Returns false if the page was dropped.
   */
  place(page: number, copy: () => void): boolean {
    const v = this.v;
    if (v.received.test(page)) {
      this.dropped++;
      return false;
    }
    copy();
    v.received.set(page);
    Atomics.notify(v.received.words, page >>> 5);
    this.requested.delete(page);
    this.placed++;
    this.missingCount--;
    return true;
  }

  /**
   * Waits (up to `ms`) for the doorbell, then returns the pages faulted on that are neither
   * in place nor requested yet; they count as requested from now on.
   */
  async takeFaults(ms: number): Promise<number[]> {
    const v = this.v;
    await v.faults.wait(this.seenSeq, ms);
    this.seenSeq = v.faults.seq;
    const posted: number[] = [];
    // The writers clear their own slots once their page is in: read, do not take.
    v.faults.peek(posted);
    const out: number[] = [];
    for (const p of posted) {
      if (this.requested.has(p) || v.received.test(p)) continue;
      this.requested.add(p);
      out.push(p);
    }
    return out;
  }

  /** Rule 3. */
  abort(): void {
    const v = this.v;
    Atomics.store(v.ctl, ABORT, 1);
    v.faults.ring();
    for (let w = 0; w < v.received.words.length; w++) Atomics.notify(v.received.words, w);
  }

  blocktime(): PostcopyBlocktime {
    const s: LatencySummary = this.v.latency.summary();
    return {
      postcopyBlocktimeMs: Math.round(this.v.times[ALL_TOTAL]! * 1000) / 1000,
      postcopyVcpuBlocktimeMs: s.perWriterTotalMs.slice(0, Atomics.load(this.v.ctl, WRITERS)),
      faults: s.count,
      faultLatencyP50Ms: s.p50Ms,
      faultLatencyP99Ms: s.p99Ms,
      faultLatencyMaxMs: s.maxMs,
    };
  }
}
