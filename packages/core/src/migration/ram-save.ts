/**
 * Source side of the "ram" section (QEMU's ram.c save path): the migration bitmap, the
 * page scan with its wrap ("complete round"), zero-page detection and page records.
 */
import type { ByteWriter } from '../io.js';
import { AtomicBitmap } from '../ram/bitmap.js';
import { type GuestRam, isZeroPage, type RamBlock, TARGET_PAGE_SIZE } from '../ram/ram-block.js';
import { QEMU_VM_SECTION_END, QEMU_VM_SECTION_PART, QEMU_VM_SECTION_START, RAM_SECTION_IDSTR, RAM_SECTION_VERSION } from '../wire/constants.js';
import {
  putRamEos,
  putRamMemSize,
  putRamPage,
  putRamZeroPage,
  putSectionFooter,
  putSectionFull,
  putSectionPart,
} from '../wire/main-stream.js';
import { clearDirtyLog, syncDirtyLog } from './dirty-sync.js';
import type { MigrationStats } from './stats.js';

/** Where zero pages are detected (QEMU's zero-page-detection parameter). */
export type ZeroPageDetection = 'none' | 'legacy' | 'multifd';

/**
 * Carries normal pages. The default writes them on the main stream; multifd replaces it
 * with its channels. A sender must have read (copied or sent) the page before it returns
 * or hold the page only while the dirty-log rule covers it (see dirty-sync.ts).
 */
export interface PageSender {
  /** Saves one page of `block`. `w` is the main stream, positioned inside a RAM section. */
  savePage(w: ByteWriter, block: RamBlock, page: number): void;
}

/**
 * Multifd as the migration thread sees it (implemented in packages/multifd): a PageSender
 * that carries normal pages on its channels, plus the flush-and-sync barrier.
 */
export interface MultifdLink extends PageSender {
  /** Backpressure: resolves when the channels can take more pages. */
  ready(): Promise<void>;
  /**
   * multifd_ram_flush_and_sync: every queued page is written, then every channel writes a
   * SYNC packet. The caller then puts the marker on the main stream (MULTIFD_FLUSH, or EOS
   * in the legacy dialect).
   */
  flushAndSync(): Promise<void>;
  /** QEMU <= 7.2 dialect (multifd-flush-after-each-section): sync at every section's EOS. */
  readonly flushAfterEachSection: boolean;
  /** Pages handed over and not written yet, as bytes of whole pages (for the rate limit). */
  readonly pendingBytes: number;
  /** Bytes written on the channels that their kernel send queues still hold (not on the link yet); absent: unknown. */
  unsentBytes?(): number;
  /**
   * The last barrier is written: nothing more goes on multifd. A destination may now close
   * its channels (QEMU does once it has loaded); that is no longer a failure.
   */
  quiesce(): void;
}

export interface ScanResult {
  /** True if the scan passed the end of the last block (QEMU's complete_round). */
  wrapped: boolean;
}

export class RamSaver implements PageSender {
  readonly bitmaps: AtomicBitmap[];
  private blockIdx = 0;
  private nextPage = 0;
  /** Block of the last record on the main stream, for RAM_SAVE_FLAG_CONTINUE. */
  private lastSentBlock: RamBlock | undefined;
  /** Pages set in the migration bitmaps (QEMU's migration_dirty_pages). */
  dirtyPages = 0;
  private lastSyncTime = 0;
  /** Optional replacement for normal pages (multifd). */
  pageSender: PageSender = this;

  constructor(
    readonly ram: GuestRam,
    private readonly stats: MigrationStats,
    private zeroPageDetection: ZeroPageDetection = 'legacy',
  ) {
    this.bitmaps = ram.blocks.map((b) => AtomicBitmap.create(b.pages));
  }

  /** ram_save_setup: start dirty logging, then mark every page dirty. */
  setup(): void {
    for (let i = 0; i < this.ram.blocks.length; i++) {
      // Clear the log first: a write after this point is in the log, and every page is
      // in the migration bitmap anyway, so nothing written before or after is missed.
      clearDirtyLog(this.ram.blocks[i]!);
      this.bitmaps[i]!.setAll();
    }
    this.dirtyPages = this.ram.totalPages;
    this.stats.remainingPages = this.dirtyPages;
    this.lastSyncTime = performance.now();
  }

  /** migration_bitmap_sync: returns pages newly dirtied since the last sync. */
  bitmapSync(): number {
    let newly = 0;
    for (let i = 0; i < this.ram.blocks.length; i++) newly += syncDirtyLog(this.ram.blocks[i]!, this.bitmaps[i]!);
    this.dirtyPages += newly;
    const now = performance.now();
    const secs = (now - this.lastSyncTime) / 1000;
    if (secs > 0) this.stats.dirtyPagesRate = newly / secs;
    this.lastSyncTime = now;
    this.stats.dirtySyncCount++;
    this.stats.remainingPages = this.dirtyPages;
    return newly;
  }

  /**
   * Drops pages from the migration bitmap (free page hints; see lifecycle/free-page-hint.ts
   * for why the dirty log is left alone). Returns how many were set. Migration thread only.
   */
  discardFreePages(idstr: string, startPage: number, npages: number): number {
    const idx = this.ram.blocks.findIndex((b) => b.idstr === idstr);
    const block = this.ram.blocks[idx];
    if (!block) throw new RangeError(`free page hint for unknown block '${idstr}'`);
    if (!Number.isInteger(startPage) || !Number.isInteger(npages) || startPage < 0 || npages < 0 || startPage + npages > block.pages) {
      throw new RangeError(`free page hint [${startPage}, +${npages}) outside block '${idstr}' (${block.pages} pages)`);
    }
    const bitmap = this.bitmaps[idx]!;
    let n = 0;
    for (let p = startPage; p < startPage + npages; p++) if (bitmap.testAndClear(p)) n++;
    this.dirtyPages -= n;
    this.stats.remainingPages = this.dirtyPages;
    return n;
  }

  /**
   * The postcopy switch: from now on every page goes on the main stream (or the preempt
   * channel), never multifd, and zero pages are found here.
   */
  usePostcopyStreams(): void {
    this.pageSender = this;
    if (this.zeroPageDetection === 'multifd') this.zeroPageDetection = 'legacy';
  }

  /**
   * A page the destination asked for, on the main stream (ram_save_queue_pages +
   * get_queued_page): sent if it is still dirty (otherwise it was sent already and is on its
   * way), and the scan moves next to it. Returns whether the page was sent.
   */
  saveRequestedPage(w: ByteWriter, blockIdx: number, page: number): boolean {
    if (!this.bitmaps[blockIdx]!.testAndClear(page)) return false;
    this.dirtyPages--;
    this.stats.remainingPages = this.dirtyPages;
    this.moveScan(blockIdx, page + 1);
    this.savePageChecked(w, blockIdx, page);
    return true;
  }

  /** The scan goes on from `page` of block `blockIdx` (requested pages pull it along). */
  moveScan(blockIdx: number, page: number): void {
    this.blockIdx = blockIdx;
    this.nextPage = page;
  }

  /**
   * Pages another thread cleared from the migration bitmaps and sent itself (the return-path
   * thread, urgent-pages.ts): off the dirty count.
   */
  clearedElsewhere(pages: number): void {
    this.dirtyPages -= pages;
    this.stats.remainingPages = this.dirtyPages;
  }

  /**
   * Postcopy recovery (ram_dirty_bitmap_reload): block `blockIdx`'s migration bitmap becomes
   * every page the destination has not received (`received`: bit i of byte i/8, as the wire
   * carries it). After the switch the source's RAM no longer changes, so this is exactly
   * what is left to send. Migration thread only, with no other thread clearing bits (the
   * return-path thread of the broken connection has ended). Then restartScan().
   */
  reloadFromReceived(blockIdx: number, received: Uint8Array): void {
    const bm = this.bitmaps[blockIdx]!;
    const words = bm.words;
    const tail = bm.nbits & 31;
    for (let w = 0; w < words.length; w++) {
      const b = w * 4;
      const got = (received[b] ?? 0) | ((received[b + 1] ?? 0) << 8) | ((received[b + 2] ?? 0) << 16) | ((received[b + 3] ?? 0) << 24);
      const valid = w === words.length - 1 && tail !== 0 ? (1 << tail) - 1 : -1;
      Atomics.store(words, w, ~got & valid);
    }
  }

  /** After the bitmaps were reloaded: the dirty count from them, the scan from the start (ram_state_resume_prepare). */
  restartScan(): void {
    this.dirtyPages = this.bitmaps.reduce((n, b) => n + b.count(), 0);
    this.stats.remainingPages = this.dirtyPages;
    this.blockIdx = 0;
    this.nextPage = 0;
    this.lastSentBlock = undefined;
  }

  writeSetupSection(w: ByteWriter, sectionId: number): void {
    putSectionFull(w, QEMU_VM_SECTION_START, { sectionId, idstr: RAM_SECTION_IDSTR, instanceId: 0, versionId: RAM_SECTION_VERSION });
    putRamMemSize(w, this.ram.blocks);
  }

  /** Ends a RAM section part: EOS and footer. */
  writeSectionEnd(w: ByteWriter, sectionId: number): void {
    putRamEos(w);
    putSectionFooter(w, sectionId);
  }

  writePartHeader(w: ByteWriter, sectionId: number, final: boolean): void {
    putSectionPart(w, final ? QEMU_VM_SECTION_END : QEMU_VM_SECTION_PART, sectionId);
    // Name the block again in every section: the reader need not carry it across.
    this.lastSentBlock = undefined;
  }

  /**
   * Sends up to `maxPages` dirty pages from the scan position, or until the scan wraps.
   * Clears each page's migration-bitmap bit BEFORE the page is read (here or, with multifd,
   * by a channel thread later). The clear is a testAndClear: after the postcopy switch the
   * return-path thread may clear a bit between findNextSet and here, and then it sent and
   * counted the page (urgent-pages.ts, rule 1).
   */
  savePages(w: ByteWriter, maxPages: number): ScanResult {
    const blocks = this.ram.blocks;
    let pages = 0;
    while (pages < maxPages) {
      const bitmap = this.bitmaps[this.blockIdx]!;
      const page = bitmap.findNextSet(this.nextPage);
      if (page < 0) {
        this.blockIdx++;
        this.nextPage = 0;
        if (this.blockIdx >= blocks.length) {
          this.blockIdx = 0;
          return { wrapped: true };
        }
        continue;
      }
      this.nextPage = page + 1;
      if (!bitmap.testAndClear(page)) continue;
      this.dirtyPages--;
      this.savePageChecked(w, this.blockIdx, page);
      pages++;
    }
    this.stats.remainingPages = this.dirtyPages;
    return { wrapped: false };
  }

  private savePageChecked(w: ByteWriter, blockIdx: number, page: number): void {
    const block = this.ram.blocks[blockIdx]!;
    if (this.zeroPageDetection === 'legacy' && block.isZeroPage(page)) {
      this.putZeroPageRecord(w, block, page);
      return;
    }
    this.pageSender.savePage(w, block, page);
  }

  private putZeroPageRecord(w: ByteWriter, block: RamBlock, page: number): void {
    putRamZeroPage(w, page * TARGET_PAGE_SIZE, block.idstr, this.lastSentBlock === block);
    this.lastSentBlock = block;
    this.stats.zeroPages++;
  }

  private putPageRecord(w: ByteWriter, block: RamBlock, page: number, data: Uint8Array): void {
    putRamPage(w, page * TARGET_PAGE_SIZE, block.idstr, this.lastSentBlock === block, data);
    this.lastSentBlock = block;
    this.stats.normalPages++;
  }

  /** The default PageSender: a RAM_SAVE_FLAG_PAGE record on the main stream. */
  savePage(w: ByteWriter, block: RamBlock, page: number): void {
    this.putPageRecord(w, block, page, block.page(page));
  }

  /**
   * The record of one page from the bytes given (the page in RAM, or a copy of it taken
   * earlier), on the main stream, bypassing the scan and the bitmap (background snapshot).
   */
  savePageFrom(w: ByteWriter, blockIdx: number, page: number, data: Uint8Array): void {
    const block = this.ram.blocks[blockIdx]!;
    if (this.zeroPageDetection === 'legacy' && isZeroPage(data, 0)) this.putZeroPageRecord(w, block, page);
    else this.putPageRecord(w, block, page, data);
  }
}
