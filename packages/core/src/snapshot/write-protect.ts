/**
 * The write-protect map of a background snapshot: the software twin of userfaultfd-wp
 * (architecture.md, seed 004). Both halves live here so every Atomics pairing is in one file:
 * the vCPU side (`WriteProtectVcpu.beforeWrite`, run in writer threads) and the saver side
 * (`WriteProtectSaver`, the snapshot thread).
 *
 * Shared state (SharedArrayBuffers, so writer threads see the same memory):
 * - `wp` bitmap, one bit per page (global page index over all blocks): set = protected, the
 *   page's content at the stop is not saved yet.
 * - `claim` bitmap: set by whoever takes responsibility for saving a page's stop-time
 *   content (the saver, or a writer copying it into the copy-on-write buffer). Taking the
 *   claim is Atomics.or (test-and-set): exactly one party saves each page.
 * - per-writer fault slots and their doorbell (ram/fault-slots.ts).
 * - the copy-on-write ring (optional): page copies made by writers, drained by the saver.
 * - counters and per-writer stall samples for the statistics.
 *
 * Ordering rules:
 * 1. A writer tests `wp` BEFORE it writes the page. The saver reads (saves) a page and only
 *    then clears its `wp` bit with Atomics.and (release) and notifies the word. A writer that
 *    sees the bit clear (Atomics.load, acquire) therefore writes after the save finished: a
 *    page is never saved after a write landed on it.
 * 2. Blocking fault: the writer posts the page in its fault slot (FaultSlots.post), then
 *    Atomics.waits on the page's wp word until its bit is clear. The saver takes the slots
 *    (FaultSlots.take), saves each page (unless its claim is already taken, i.e. it is saved
 *    or being saved), clears the bit, notifies.
 * 3. Copy-on-write fault: the writer takes the claim; if it wins and reserves a ring slot
 *    (compare-exchange on COW_HEAD, never past COW_TAIL + capacity), it copies the page into
 *    the slot, publishes the slot with Atomics.store(cowPage[slot], page + 1), then clears
 *    the wp bit and notifies, and writes. The saver drains slots in order from COW_TAIL once
 *    published, saves the copy, then stores 0 and advances COW_TAIL (which frees the slot).
 *    If the ring is full the writer gives the claim back (Atomics.and) and takes the blocking
 *    path. If it loses the claim, the saver or another writer is saving the page: it waits
 *    for the wp bit like a blocking fault (without posting one).
 * 4. Teardown (failure or cancel): the saver clears every wp bit and notifies every word, so
 *    no writer stays blocked.
 */
import { TARGET_PAGE_SIZE } from '../ram/ram-block.js';
import { FaultSlots, type FaultSlotsShared, createFaultSlots } from '../ram/fault-slots.js';
import { type LatencyBuckets, LatencyHistogram, latencyHistogramBytes } from '../stats/latency-histogram.js';

// Control word indices.
const COW_HEAD = 0;
const COW_TAIL = 1;
const FAULTS_BLOCKING = 2;
const FAULTS_COW = 3;
const COW_FULL = 4;
const ACTIVE = 5;
const CTL_WORDS = 6;

export interface WriteProtectShared {
  pages: number;
  writers: number;
  cowCapacity: number;
  ctl: SharedArrayBuffer;
  wp: SharedArrayBuffer;
  claim: SharedArrayBuffer;
  faults: FaultSlotsShared;
  cowPages: SharedArrayBuffer;
  cowData: SharedArrayBuffer;
  /** Writer stalls (stats/latency-histogram.ts). */
  stalls: SharedArrayBuffer;
}

const words = (pages: number): number => Math.ceil(pages / 32);

export function createWriteProtect(pages: number, writers: number, cowCapacityPages: number): WriteProtectShared {
  return {
    pages,
    writers,
    cowCapacity: cowCapacityPages,
    ctl: new SharedArrayBuffer(CTL_WORDS * 4),
    wp: new SharedArrayBuffer(words(pages) * 4),
    claim: new SharedArrayBuffer(words(pages) * 4),
    faults: createFaultSlots(writers),
    cowPages: new SharedArrayBuffer(Math.max(1, cowCapacityPages) * 4),
    cowData: new SharedArrayBuffer(cowCapacityPages * TARGET_PAGE_SIZE),
    stalls: new SharedArrayBuffer(latencyHistogramBytes(writers)),
  };
}

class Views {
  readonly ctl: Int32Array;
  readonly wp: Int32Array;
  readonly claim: Int32Array;
  readonly faults: FaultSlots;
  readonly cowPages: Int32Array;
  readonly cowData: Uint8Array;
  readonly stalls: LatencyHistogram;
  constructor(readonly s: WriteProtectShared) {
    this.ctl = new Int32Array(s.ctl);
    this.wp = new Int32Array(s.wp);
    this.claim = new Int32Array(s.claim);
    this.faults = new FaultSlots(s.faults);
    this.cowPages = new Int32Array(s.cowPages);
    this.cowData = new Uint8Array(s.cowData);
    this.stalls = new LatencyHistogram(s.stalls, s.writers);
  }

  isProtected(page: number): boolean {
    return (Atomics.load(this.wp, page >>> 5) & (1 << (page & 31))) !== 0;
  }

  /** Test-and-set of the claim bit: true if this caller took it. */
  takeClaim(page: number): boolean {
    const bit = 1 << (page & 31);
    return (Atomics.or(this.claim, page >>> 5, bit) & bit) === 0;
  }

  releaseClaim(page: number): void {
    Atomics.and(this.claim, page >>> 5, ~(1 << (page & 31)));
  }

  /** Rule 1: after the save, clear and wake writers waiting on this word. */
  unprotect(page: number): void {
    Atomics.and(this.wp, page >>> 5, ~(1 << (page & 31)));
    Atomics.notify(this.wp, page >>> 5);
  }
}

/**
 * The vCPU half. `page` is the global page index; `host(page)` the page's bytes in guest RAM.
 */
export class WriteProtectVcpu {
  private readonly v: Views;

  constructor(
    shared: WriteProtectShared,
    private readonly writer: number,
  ) {
    this.v = new Views(shared);
  }

  /** Call before writing `page`. Returns once the page may be written. */
  beforeWrite(page: number, host: Uint8Array): void {
    const v = this.v;
    if (Atomics.load(v.ctl, ACTIVE) === 0 || !v.isProtected(page)) return;
    const t0 = performance.now();
    if (v.s.cowCapacity > 0 && v.takeClaim(page)) {
      const slot = this.reserveCowSlot();
      if (slot >= 0) {
        // Rule 3: copy, publish the slot, then unprotect.
        v.cowData.set(host, slot * TARGET_PAGE_SIZE);
        Atomics.store(v.cowPages, slot, page + 1);
        Atomics.add(v.ctl, FAULTS_COW, 1);
        v.faults.ring();
        v.unprotect(page);
        this.recordStall(performance.now() - t0);
        return;
      }
      // Ring full: give the claim back and block like a plain write fault.
      v.releaseClaim(page);
      Atomics.add(v.ctl, COW_FULL, 1);
    } else if (v.s.cowCapacity > 0) {
      // Someone else holds the claim: wait for the bit without posting a fault.
      this.waitUnprotected(page);
      this.recordStall(performance.now() - t0);
      return;
    }
    // Rule 2: post the fault (which wakes the saver), wait on the page's wp word.
    Atomics.add(v.ctl, FAULTS_BLOCKING, 1);
    v.faults.post(this.writer, page);
    this.waitUnprotected(page);
    this.recordStall(performance.now() - t0);
  }

  private waitUnprotected(page: number): void {
    const v = this.v;
    const w = page >>> 5;
    const bit = 1 << (page & 31);
    for (;;) {
      const cur = Atomics.load(v.wp, w);
      if ((cur & bit) === 0) return;
      // Wakes on any change of the word; the timeout only guards against a lost wake-up.
      Atomics.wait(v.wp, w, cur, 50);
    }
  }

  private reserveCowSlot(): number {
    const v = this.v;
    for (;;) {
      const head = Atomics.load(v.ctl, COW_HEAD);
      if (head - Atomics.load(v.ctl, COW_TAIL) >= v.s.cowCapacity) return -1;
      if (Atomics.compareExchange(v.ctl, COW_HEAD, head, head + 1) === head) return head % v.s.cowCapacity;
    }
  }

  private recordStall(ms: number): void {
    this.v.stalls.record(this.writer, ms);
  }
}

export interface WriteProtectStats {
  faultsBlocking: number;
  faultsCow: number;
  cowBufferFull: number;
  stallCount: number;
  stallP50Ms: number;
  stallP99Ms: number;
  stallMaxMs: number;
}

/** The saver half, on the snapshot thread. */
export class WriteProtectSaver {
  private readonly v: Views;

  constructor(readonly shared: WriteProtectShared) {
    this.v = new Views(shared);
  }

  /** Writer stalls so far, counted in the buckets of `boundsMs`. */
  stallBuckets(boundsMs: readonly number[]): LatencyBuckets {
    return this.v.stalls.buckets(boundsMs);
  }

  /** Protects every page (vCPUs are stopped when this runs) and turns checking on. */
  protectAll(): void {
    const v = this.v;
    v.wp.fill(-1);
    const tail = v.s.pages & 31;
    if (tail) v.wp[v.wp.length - 1] = (1 << tail) - 1;
    v.claim.fill(0);
    // Published by the vm_start that follows (the run-state notify is a release).
    Atomics.store(v.ctl, ACTIVE, 1);
  }

  /** Rule 4: nothing stays protected, nobody stays blocked. */
  unprotectAll(): void {
    const v = this.v;
    Atomics.store(v.ctl, ACTIVE, 0);
    for (let w = 0; w < v.wp.length; w++) {
      Atomics.store(v.wp, w, 0);
      Atomics.notify(v.wp, w);
    }
  }

  get faultSeq(): number {
    return this.v.faults.seq;
  }

  /** Resolves when a writer posts a fault or a copy (or after `ms`). */
  async waitFault(seen: number, ms: number): Promise<void> {
    await this.v.faults.wait(seen, ms);
  }

  /** Takes the posted blocking faults (global pages). */
  takeFaults(out: number[]): void {
    this.v.faults.take(out);
  }


  /**
   * Saves `page` from RAM if nobody did: takes the claim, calls `save` (which must copy the
   * page before it returns), then unprotects. Returns false if the page was already claimed.
   */
  saveFromRam(page: number, save: (page: number) => void): boolean {
    const v = this.v;
    if (!v.takeClaim(page)) return false;
    save(page);
    v.unprotect(page);
    return true;
  }

  /** Drains published copy-on-write slots in order; `save` gets the copy's bytes. */
  drainCow(save: (page: number, data: Uint8Array) => void): number {
    const v = this.v;
    if (v.s.cowCapacity === 0) return 0;
    let n = 0;
    for (;;) {
      const tail = Atomics.load(v.ctl, COW_TAIL);
      if (tail === Atomics.load(v.ctl, COW_HEAD)) return n;
      const slot = tail % v.s.cowCapacity;
      const p = Atomics.load(v.cowPages, slot);
      if (p === 0) return n; // reserved, not published yet
      save(p - 1, v.cowData.subarray(slot * TARGET_PAGE_SIZE, (slot + 1) * TARGET_PAGE_SIZE));
      Atomics.store(v.cowPages, slot, 0);
      Atomics.store(v.ctl, COW_TAIL, tail + 1);
      n++;
    }
  }

  /** Copies still to drain (reserved or published). */
  get cowPending(): number {
    return Atomics.load(this.v.ctl, COW_HEAD) - Atomics.load(this.v.ctl, COW_TAIL);
  }

  stats(): WriteProtectStats {
    const v = this.v;
    const st = v.stalls.summary();
    return {
      faultsBlocking: Atomics.load(v.ctl, FAULTS_BLOCKING),
      faultsCow: Atomics.load(v.ctl, FAULTS_COW),
      cowBufferFull: Atomics.load(v.ctl, COW_FULL),
      stallCount: st.count,
      stallP50Ms: st.p50Ms,
      stallP99Ms: st.p99Ms,
      stallMaxMs: st.maxMs,
    };
  }
}
