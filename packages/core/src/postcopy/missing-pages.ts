/**
 * The received map of a postcopy destination: the software twin of userfaultfd's missing
 * faults (architecture.md, seed 003). Both halves live here so every Atomics pairing is in
 * one file: the vCPU side (`MissingPagesVcpu.beforeWrite`, in writer threads) and the
 * placing side (`MissingPagesPlacer`, on every thread that places pages: the main channel's
 * load thread and the preempt channel's thread).
 *
 * Shared state (SharedArrayBuffers):
 * - `received` bitmap, one bit per page (global index over all blocks, in block order).
 * - `claimed` bitmap: a placer owns a page once it set the page's bit here.
 * - `requested` bitmap: a page request was written for the page.
 * - the return path (return-path-writer.ts): a faulting vCPU writes its request itself.
 * - `waiting`, one Int32 per vCPU: 1 + the page it waits for (0: none). Only that vCPU
 *   writes its slot; wakeWaiting() and anyWaiting() read them all.
 * - with preempt, the preempt channel's reader role (preempt-reader.ts).
 * - control words: ABORT, the "all vCPUs blocked" bookkeeping, counters.
 * - with blocktime, the guest's progress while pages are missing: per vCPU, the writes it
 *   made while any page was missing (`progress`, one Int32 each); when RUN came and when the
 *   last page was placed (`times`).
 * - the fault latency histogram (stats/latency-histogram.ts, its own pairings).
 *
 * Ordering rules:
 * 1. Placement: a placer claims the page first (Atomics.or on `claimed`; if the bit was set,
 *    another placer has it, or had it, and this copy is dropped). It then copies the WHOLE
 *    page into guest RAM, sets the page's bit in `received` with Atomics.or (release) and
 *    notifies the bit's word. A writer tests `received` with Atomics.load (acquire) before it
 *    touches the page, so it never sees a partly placed page, and a page is placed at most
 *    once: a write that landed after its bit was set is never overwritten.
 * 2. Fault: the writer claims the request (Atomics.or on `requested`; only the first of
 *    several writers faulting on one page sends it), writes the request on the return path,
 *    then Atomics.waits on the page's word of `received` until its bit is set. The placer's
 *    notify after the Atomics.or wakes it; the wait's timeout only guards against a lost
 *    wake-up and lets it see ABORT. With preempt, a waiting writer that can take the preempt
 *    channel's reader role reads and places pages itself until its own is in
 *    (preempt-reader.ts); the others wait as above, and whoever gives the role back wakes
 *    them (wakeWaiting, through `waiting`: the writer sets its slot before it first tries
 *    for the role, so a release after that finds it).
 * 3. Teardown (a failure during postcopy): ABORT is set and every word notified; a blocked
 *    writer gives up without writing (the guest is split, nothing may land).
 * 4. Progress: the placer whose Atomics.sub takes MISSING from 1 to 0 placed the last page;
 *    it stores the time (plain Float64 store) and THEN sets ALL_IN with Atomics.store; a
 *    reader that sees ALL_IN with Atomics.load sees the time. A vCPU counts a write in its
 *    own `progress` slot (Atomics.add, read with Atomics.load by the report) if it saw
 *    MISSING above 0 with Atomics.load before the write: a write that raced the last
 *    placement may be counted, none made after it was seen.
 * 5. Fault slice (with `faultSliceUs`, postcopy-preempt): a vCPU thread that faults asks the
 *    kernel for that scheduler slice for itself (thread-slice.ts), as the other threads on
 *    the fault path do, so that it runs as soon as its page is in instead of waiting out the
 *    slice of a thread moving background pages; it counts itself in SLICED (Atomics.add).
 *    Once it sees MISSING at 0 (Atomics.load) it takes its old slice back: the guest keeps
 *    nothing of postcopy. Not a priority: the thread still gets only its fair share.
 * 6. Recovery (postcopy paused, then resumed on new channels): nothing here changes while
 *    paused; writers that fault keep waiting on `received`, and their requests are held by
 *    the return path (return-path-writer.ts, HOLD) with their `requested` bit set. Once the
 *    return path flows again (ReturnPathWriter.resume, which takes the fd's lock and clears
 *    HOLD), requestAgain() writes a request for every page requested and not received. A
 *    writer whose request found HOLD set had set its `requested` bit before (Atomics.or,
 *    then the HOLD load under the lock), so the scan, which runs after HOLD was cleared,
 *    sees that bit; a request written twice costs one copy that the placer drops.
 */
import { AtomicBitmap } from '../ram/bitmap.js';
import { TARGET_PAGE_SIZE } from '../ram/ram-block.js';
import { type LatencyBuckets, LatencyHistogram, latencyHistogramBytes, type LatencySummary } from '../stats/latency-histogram.js';
import type { PreemptReader } from './preempt-reader.js';
import { setThreadSliceUs, threadSliceUs } from '../thread-slice.js';
import { ReturnPathWriter, type ReturnPathShared } from './return-path-writer.js';

// Control words (Int32).
const ABORT = 0;
const LOCK = 1;
const BLOCKED = 2;
/** vCPUs running (set before they start): "all blocked" means BLOCKED === WRITERS. */
const WRITERS = 3;
/** Pages whose `received` bit is clear. */
const MISSING = 4;
/** Pages placed after LISTEN, and copies dropped because the page was placed already. */
const PLACED = 5;
const DROPPED = 6;
/** 1 once the last missing page was placed and its time stored (rule 4). */
const ALL_IN = 7;
/** vCPUs that took the fault slice (rule 5). */
const SLICED = 8;
const CTL_WORDS = 9;
// Time words (Float64): when every vCPU became blocked, and the total of such spans.
const ALL_START = 0;
const ALL_TOTAL = 1;
/** When RUN came, and when the last missing page was placed (rule 4). */
const RUN_AT = 2;
const ALL_IN_AT = 3;
const TIME_WORDS = 4;

export interface MissingPagesShared {
  pages: number;
  /** The RAM blocks in order: a global page index maps to (block, offset) by these. */
  blocks: { idstr: string; pages: number }[];
  /** Sample rows: the most vCPUs this map can serve. */
  writers: number;
  /** vCPUs time their faults (--postcopy-blocktime). */
  blocktime: boolean;
  /** The slice (us) a faulting vCPU takes until every page is in (rule 5); 0: none. */
  faultSliceUs: number;
  ctl: SharedArrayBuffer;
  times: SharedArrayBuffer;
  received: SharedArrayBuffer;
  claimed: SharedArrayBuffer;
  requested: SharedArrayBuffer;
  returnPath: ReturnPathShared;
  latency: SharedArrayBuffer;
  waiting: SharedArrayBuffer;
  /** Per vCPU, writes made while pages were missing (rule 4; with blocktime). */
  progress: SharedArrayBuffer;
}

export function createMissingPages(
  blocks: readonly { idstr: string; pages: number }[],
  writers: number,
  blocktime: boolean,
  returnPath: ReturnPathShared,
  faultSliceUs = 0,
): MissingPagesShared {
  const pages = blocks.reduce((n, b) => n + b.pages, 0);
  return {
    pages,
    blocks: blocks.map((b) => ({ idstr: b.idstr, pages: b.pages })),
    writers,
    blocktime,
    faultSliceUs,
    ctl: new SharedArrayBuffer(CTL_WORDS * 4),
    times: new SharedArrayBuffer(TIME_WORDS * 8),
    received: new SharedArrayBuffer(AtomicBitmap.bytesFor(pages)),
    claimed: new SharedArrayBuffer(AtomicBitmap.bytesFor(pages)),
    requested: new SharedArrayBuffer(AtomicBitmap.bytesFor(pages)),
    returnPath,
    latency: new SharedArrayBuffer(blocktime ? latencyHistogramBytes(writers) : latencyHistogramBytes(0)),
    waiting: new SharedArrayBuffer(Math.max(1, writers) * 4),
    progress: new SharedArrayBuffer(Math.max(1, writers) * 4),
  };
}

class Views {
  readonly ctl: Int32Array;
  readonly times: Float64Array;
  readonly received: AtomicBitmap;
  readonly claimed: AtomicBitmap;
  readonly requested: AtomicBitmap;
  readonly latency: LatencyHistogram;
  readonly waiting: Int32Array;
  readonly progress: Int32Array;
  constructor(readonly s: MissingPagesShared) {
    this.ctl = new Int32Array(s.ctl);
    this.times = new Float64Array(s.times);
    this.received = new AtomicBitmap(s.received, s.pages);
    this.claimed = new AtomicBitmap(s.claimed, s.pages);
    this.requested = new AtomicBitmap(s.requested, s.pages);
    this.latency = new LatencyHistogram(s.latency, s.blocktime ? s.writers : 0);
    this.waiting = new Int32Array(s.waiting);
    this.progress = new Int32Array(s.progress);
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
  private readonly rp: ReturnPathWriter;
  /** First global page of each block. */
  private readonly bases: number[] = [];
  /** Rule 5: the slice to take at the first fault (0: none, or taken and given back). */
  private sliceUs: number;
  /** This thread's slice before it took the short one; undefined while it has not. */
  private sliceBefore: number | undefined;

  /** `preempt`: this writer may read the preempt channel itself (rule 2). */
  constructor(
    shared: MissingPagesShared,
    private readonly writer: number,
    private readonly preempt?: PreemptReader,
  ) {
    this.v = new Views(shared);
    this.rp = new ReturnPathWriter(shared.returnPath);
    this.sliceUs = shared.faultSliceUs;
    let base = 0;
    for (const b of shared.blocks) {
      this.bases.push(base);
      base += b.pages;
    }
  }

  /** Rule 2's request, by the first writer to fault on `page`. */
  private request(page: number): void {
    if (this.v.requested.testAndSet(page)) return;
    let b = this.bases.length - 1;
    while (this.bases[b]! > page) b--;
    // A failed write (the source is gone) leaves the writer waiting for ABORT.
    this.rp.requestPage(b, this.v.s.blocks[b]!.idstr, (page - this.bases[b]!) * TARGET_PAGE_SIZE, TARGET_PAGE_SIZE);
  }

  /** Rule 5, at the first fault. */
  private takeSlice(): void {
    const before = threadSliceUs();
    this.sliceUs = 0;
    if (before === undefined || setThreadSliceUs(this.v.s.faultSliceUs) === undefined) return;
    this.sliceBefore = before;
    Atomics.add(this.v.ctl, SLICED, 1);
  }

  /** Rule 5, once every page is in. */
  private giveSliceBack(): void {
    setThreadSliceUs(this.sliceBefore!);
    this.sliceBefore = undefined;
  }

  /**
   * Call before touching `page`. Returns true once the page is in place (at once if it
   * already was), false if postcopy failed meanwhile (the write must not happen).
   */
  beforeWrite(page: number): boolean {
    const v = this.v;
    const timed = v.s.blocktime;
    // Rule 4: the guest's progress while pages are missing.
    if (timed && Atomics.load(v.ctl, MISSING) > 0) Atomics.add(v.progress, this.writer, 1);
    if (this.sliceBefore !== undefined && Atomics.load(v.ctl, MISSING) === 0) this.giveSliceBack();
    if (v.received.test(page)) return true;
    if (this.sliceUs > 0) this.takeSlice();
    const t0 = timed ? clock() : 0;
    if (timed) v.blockedDelta(1, t0);
    this.request(page);
    const words = v.received.words;
    const w = page >>> 5;
    const bit = 1 << (page & 31);
    const preempt = this.preempt;
    const done = (): boolean => (Atomics.load(words, w) & bit) !== 0 || Atomics.load(v.ctl, ABORT) !== 0;
    let ok = true;
    // The slot says what this writer waits for (rule 2's wake-ups; the preempt thread's liveness check).
    Atomics.store(v.waiting, this.writer, page + 1);
    for (;;) {
      const cur = Atomics.load(words, w);
      if ((cur & bit) !== 0) break;
      if (Atomics.load(v.ctl, ABORT) !== 0) {
        ok = false;
        break;
      }
      if (preempt?.tryTake()) preempt.readUntil(done);
      // With the role elsewhere, a shorter timeout bounds a wake-up lost between the failed
      // take and this wait.
      else Atomics.wait(words, w, cur, preempt ? 5 : 20);
    }
    Atomics.store(v.waiting, this.writer, 0);
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
  /** From RUN until the last missing page was placed (ms); 0 if that never happened. */
  pagesMissingMs: number;
  /** Writes (beforeWrite calls) the vCPUs made meanwhile, and per second. */
  writesWhileMissing: number;
  writesPerSecondWhileMissing: number;
  faultLatencyP50Ms: number;
  faultLatencyP99Ms: number;
  faultLatencyMaxMs: number;
}

/**
 * The placing half: one per placing thread (the main channel's load thread, the preempt
 * channel's thread), all over the same shared map.
 */
export class MissingPagesPlacer {
  private readonly v: Views;

  constructor(readonly shared: MissingPagesShared) {
    this.v = new Views(shared);
  }

  isReceived(page: number): boolean {
    return this.v.received.test(page);
  }

  /** Every page received: precopy delivered them all before the switch (no writer runs yet). */
  markAllReceived(): void {
    this.v.received.setAll();
    this.v.claimed.setAll();
    Atomics.store(this.v.ctl, MISSING, 0);
  }

  /** Marks [start, start+n) not received (POSTCOPY_RAM_DISCARD; no writer runs yet). */
  markMissing(start: number, n: number): void {
    const v = this.v;
    for (let p = start; p < start + n; p++) {
      v.claimed.clear(p);
      if (v.received.testAndClear(p)) Atomics.add(v.ctl, MISSING, 1);
    }
  }

  /** How many vCPUs run (before they start), at RUN. */
  setRunningVcpus(n: number): void {
    if (n > this.shared.writers) throw new RangeError(`${n} vCPUs, the received map serves ${this.shared.writers}`);
    // Before the vCPUs start: they and every placer see it (worker start / notify order it).
    this.v.times[RUN_AT] = clock();
    Atomics.store(this.v.ctl, WRITERS, n);
  }

  /** Pages not received yet. */
  missing(): number {
    return Atomics.load(this.v.ctl, MISSING);
  }

  /** Pages placed after LISTEN, on every thread. */
  get placed(): number {
    return Atomics.load(this.v.ctl, PLACED);
  }

  /** Pages that arrived although already placed (sent in the background and on request). */
  get dropped(): number {
    return Atomics.load(this.v.ctl, DROPPED);
  }

  /** vCPUs blocked on a missing page right now (with blocktime on). */
  get blockedVcpus(): number {
    return Atomics.load(this.v.ctl, BLOCKED);
  }

  /** vCPUs that took the fault slice (rule 5). */
  get vcpusSliced(): number {
    return Atomics.load(this.v.ctl, SLICED);
  }

  /** Page requests the vCPUs wrote on the return path. */
  get requests(): number {
    return new ReturnPathWriter(this.shared.returnPath).requests;
  }

  /**
   * Rule 1: places one page unless another placer claimed it. `copy` must write the whole
   * page into guest RAM before it returns. Returns false if the page was dropped.
   */
  place(page: number, copy: () => void): boolean {
    const v = this.v;
    if (v.claimed.testAndSet(page)) {
      Atomics.add(v.ctl, DROPPED, 1);
      return false;
    }
    copy();
    v.received.set(page);
    Atomics.notify(v.received.words, page >>> 5);
    Atomics.add(v.ctl, PLACED, 1);
    if (Atomics.sub(v.ctl, MISSING, 1) === 1) {
      // Rule 4: the last missing page; its time, then the flag.
      v.times[ALL_IN_AT] = clock();
      Atomics.store(v.ctl, ALL_IN, 1);
    }
    return true;
  }

  /** Rule 2: every writer waiting for a page looks again (the preempt reader role is free). */
  wakeWaiting(): void {
    const v = this.v;
    const n = Math.min(v.waiting.length, Atomics.load(v.ctl, WRITERS));
    for (let i = 0; i < n; i++) {
      const p = Atomics.load(v.waiting, i) - 1;
      if (p >= 0) Atomics.notify(v.received.words, p >>> 5);
    }
  }

  /** Rule 6: whether page `page` of block `blockIdx` is in place (for the received bitmap). */
  receivedIn(blockIdx: number): (page: number) => boolean {
    let base = 0;
    for (let b = 0; b < blockIdx; b++) base += this.shared.blocks[b]!.pages;
    const received = this.v.received;
    return (page) => received.test(base + page);
  }

  /** Rule 6, after ReturnPathWriter.resume(): the requests still unanswered, again. Returns how many. */
  requestAgain(): number {
    const v = this.v;
    const rp = new ReturnPathWriter(this.shared.returnPath);
    let n = 0;
    let base = 0;
    this.shared.blocks.forEach((b, idx) => {
      for (let p = 0; p < b.pages; p++) {
        const g = base + p;
        if (v.requested.test(g) && !v.received.test(g) && rp.requestPage(idx, b.idstr, p * TARGET_PAGE_SIZE, TARGET_PAGE_SIZE)) n++;
      }
      base += b.pages;
    });
    return n;
  }

  /** Whether any vCPU waits for a page now (its `waiting` slot is set). */
  anyWaiting(): boolean {
    const v = this.v;
    const n = Math.min(v.waiting.length, Atomics.load(v.ctl, WRITERS));
    for (let i = 0; i < n; i++) if (Atomics.load(v.waiting, i) !== 0) return true;
    return false;
  }

  /** Rule 3. */
  abort(): void {
    const v = this.v;
    Atomics.store(v.ctl, ABORT, 1);
    for (let w = 0; w < v.received.words.length; w++) Atomics.notify(v.received.words, w);
  }

  get aborted(): boolean {
    return Atomics.load(this.v.ctl, ABORT) !== 0;
  }

  /** Fault latencies so far (with blocktime on), counted in the buckets of `boundsMs`. */
  faultLatencyBuckets(boundsMs: readonly number[]): LatencyBuckets {
    return this.v.latency.buckets(boundsMs);
  }

  blocktime(): PostcopyBlocktime {
    const v = this.v;
    const s: LatencySummary = v.latency.summary();
    const writers = Atomics.load(v.ctl, WRITERS);
    // Rule 4's reader.
    const missingMs = Atomics.load(v.ctl, ALL_IN) === 1 ? v.times[ALL_IN_AT]! - v.times[RUN_AT]! : 0;
    let writes = 0;
    for (let w = 0; w < writers; w++) writes += Atomics.load(v.progress, w);
    return {
      postcopyBlocktimeMs: Math.round(v.times[ALL_TOTAL]! * 1000) / 1000,
      postcopyVcpuBlocktimeMs: s.perWriterTotalMs.slice(0, writers),
      faults: s.count,
      pagesMissingMs: Math.round(missingMs * 1000) / 1000,
      writesWhileMissing: writes,
      writesPerSecondWhileMissing: missingMs > 0 ? Math.round((writes / missingMs) * 1000) : 0,
      faultLatencyP50Ms: s.p50Ms,
      faultLatencyP99Ms: s.p99Ms,
      faultLatencyMaxMs: s.maxMs,
    };
  }
}
