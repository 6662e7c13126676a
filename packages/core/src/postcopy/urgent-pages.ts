/**
 * Requested pages sent by the source's return-path thread itself, on the preempt channel
 * (QEMU 8's ram_save_host_page_urgent: "send requested page directly in rp-return thread").
 * No hop of a request then waits for the migration thread, which is busy streaming
 * background pages. Both halves live here so that every Atomics pairing is in one file: the
 * return-path thread's `UrgentPageSender` and the migration thread's `UrgentPagesTally`.
 *
 * Shared state (SharedArrayBuffers):
 * - the migration bitmaps (RamSaver.bitmaps), one per block;
 * - ctl (Int32): CLEARED, pages whose bit this thread cleared and the migration thread has
 *   not counted yet; NEXT, 1 + the global index of the page after the last one requested (0:
 *   none), where the migration thread moves its scan; REQUESTS, NORMAL, ZERO: counters;
 * - bytes (BigInt64): bytes written on the preempt channel.
 *
 * Ordering rules:
 * 1. A bit of the migration bitmap is cleared with testAndClear by whichever thread sends the
 *   page (the migration thread's scan does the same): exactly one thread clears it, and that
 *   thread alone counts it (here: Atomics.add on CLEARED, after the clear; the migration
 *   thread takes it off its dirty count with Atomics.exchange). A count can lag its clear, never
 *   the other way, so the migration thread never stops while a set bit is uncounted.
 * 2. After the switch the source's RAM no longer changes (the vCPUs are stopped), so this
 *   thread reads a page without any further pairing. A requested page whose bit was clear
 *   is sent anyway: its first copy may still sit behind megabytes of background pages in the
 *   main stream's buffers. Both copies are the same, and the destination keeps whichever
 *   lands first (it drops a page already in place).
 */
import type { ByteWriter } from '../io.js';
import { AtomicBitmap } from '../ram/bitmap.js';
import { type GuestRam, TARGET_PAGE_SIZE } from '../ram/ram-block.js';
import { putRamPage, putRamZeroPage } from '../wire/main-stream.js';
import { PageRequestChecker } from '../migration/page-requests.js';

const CLEARED = 0;
const NEXT = 1;
const REQUESTS = 2;
const NORMAL = 3;
const ZERO = 4;
const WORDS = 5;

export interface UrgentPagesShared {
  bitmaps: SharedArrayBuffer[];
  /** Pages per block, in block order (global page index = block base + page). */
  pages: number[];
  /** Zero pages as ZERO records ('legacy', as the main stream after the switch) or not. */
  zeroPages: boolean;
  ctl: SharedArrayBuffer;
  bytes: SharedArrayBuffer;
}

export function createUrgentPages(bitmaps: readonly AtomicBitmap[], zeroPages: boolean): UrgentPagesShared {
  return {
    bitmaps: bitmaps.map((b) => b.sab),
    pages: bitmaps.map((b) => b.nbits),
    zeroPages,
    ctl: new SharedArrayBuffer(WORDS * 4),
    bytes: new SharedArrayBuffer(8),
  };
}

/** The return-path thread's half: page requests in, page records out. */
export class UrgentPageSender {
  private readonly ctl: Int32Array;
  private readonly bytes: BigInt64Array;
  private readonly bitmaps: AtomicBitmap[];
  private readonly bases: number[] = [];
  private readonly checker: PageRequestChecker;

  constructor(
    private readonly ram: GuestRam,
    private readonly s: UrgentPagesShared,
  ) {
    this.ctl = new Int32Array(s.ctl);
    this.bytes = new BigInt64Array(s.bytes);
    this.bitmaps = s.bitmaps.map((sab, i) => new AtomicBitmap(sab, s.pages[i]!));
    let base = 0;
    for (const n of s.pages) {
      this.bases.push(base);
      base += n;
    }
    this.checker = new PageRequestChecker(ram);
  }

  /**
   * One REQ_PAGES_ID / REQ_PAGES (checked like the migration thread's queue): a record for
   * each page, naming its block, appended to `w`. Throws a VmigError on a bad request.
   */
  serve(w: ByteWriter, type: number, data: Uint8Array): void {
    const req = this.checker.check(type, data);
    Atomics.add(this.ctl, REQUESTS, 1);
    const block = this.ram.blocks[req.block]!;
    const bitmap = this.bitmaps[req.block]!;
    for (let p = req.page; p < req.page + req.pages; p++) {
      // Rule 1: clear first, then count; the scan will not send it again.
      if (bitmap.testAndClear(p)) Atomics.add(this.ctl, CLEARED, 1);
      const offset = p * TARGET_PAGE_SIZE;
      if (this.s.zeroPages && block.isZeroPage(p)) {
        putRamZeroPage(w, offset, block.idstr, false);
        Atomics.add(this.ctl, ZERO, 1);
      } else {
        putRamPage(w, offset, block.idstr, false, block.page(p));
        Atomics.add(this.ctl, NORMAL, 1);
      }
    }
    Atomics.store(this.ctl, NEXT, this.bases[req.block]! + req.page + req.pages + 1);
  }

  /** `n` bytes went out on the preempt channel. */
  wrote(n: number): void {
    Atomics.add(this.bytes, 0, BigInt(n));
  }
}

/** What the return-path thread did since the migration thread last looked. */
export interface UrgentDelta {
  /** Pages whose migration-bitmap bit it cleared: off the dirty count. */
  cleared: number;
  /** Where the scan goes next (after the last page requested), if a request came. */
  next: { block: number; page: number } | undefined;
  requests: number;
  normal: number;
  zero: number;
  /** Bytes on the preempt channel so far (a total, not a delta). */
  bytes: number;
}

/** The migration thread's half: takes the counts (rule 1) and the scan hint. */
export class UrgentPagesTally {
  private readonly ctl: Int32Array;
  private readonly bytes: BigInt64Array;

  constructor(private readonly s: UrgentPagesShared) {
    this.ctl = new Int32Array(s.ctl);
    this.bytes = new BigInt64Array(s.bytes);
  }

  take(): UrgentDelta {
    const next = Atomics.exchange(this.ctl, NEXT, 0) - 1;
    let hint: UrgentDelta['next'];
    if (next >= 0) {
      let block = 0;
      let page = next;
      while (block < this.s.pages.length - 1 && page >= this.s.pages[block]!) page -= this.s.pages[block++]!;
      hint = { block, page };
    }
    return {
      cleared: Atomics.exchange(this.ctl, CLEARED, 0),
      next: hint,
      requests: Atomics.exchange(this.ctl, REQUESTS, 0),
      normal: Atomics.exchange(this.ctl, NORMAL, 0),
      zero: Atomics.exchange(this.ctl, ZERO, 0),
      bytes: Number(Atomics.load(this.bytes, 0)),
    };
  }
}
