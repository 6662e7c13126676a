/**
 * The source's side of postcopy page requests (QEMU's ram_save_queue_pages and
 * get_queued_page): requests from the return path, checked against the RAM blocks, queued,
 * and served ahead of background pages on the main stream (RamSaver.saveRequestedPage).
 * With a preempt channel the return-path thread serves them instead (urgent-pages.ts),
 * through the same checks.
 */
import { VmigError } from '../errors.js';
import type { ByteWriter } from '../io.js';
import { type GuestRam, TARGET_PAGE_SIZE } from '../ram/ram-block.js';
import { decodeRpReqPages } from '../wire/postcopy.js';
import type { RamSaver } from './ram-save.js';
import type { MigrationStats } from './stats.js';

/** A checked page request: `pages` pages of block `block` from page `page` on. */
export interface CheckedPageRequest {
  block: number;
  page: number;
  pages: number;
}

/**
 * Decodes and checks REQ_PAGES_ID / REQ_PAGES in arrival order: a REQ_PAGES names no block
 * and means the block of the request before it.
 */
export class PageRequestChecker {
  private lastBlock = -1;

  constructor(private readonly ram: GuestRam) {}

  check(type: number, data: Uint8Array): CheckedPageRequest {
    const req = decodeRpReqPages(type, data);
    const blocks = this.ram.blocks;
    const idx = req.idstr === undefined ? this.lastBlock : blocks.findIndex((b) => b.idstr === req.idstr);
    const block = blocks[idx];
    if (!block) throw new VmigError('VMIG_ERR_UNKNOWN_BLOCK', req.idstr === undefined ? 'REQ_PAGES before any REQ_PAGES_ID' : `page request for unknown RAM block '${req.idstr}'`, { channel: 'return-path' });
    this.lastBlock = idx;
    if (req.start % TARGET_PAGE_SIZE || req.length % TARGET_PAGE_SIZE || req.length === 0 || req.start + req.length > block.usedLength) {
      throw new VmigError('VMIG_ERR_BAD_OFFSET', `page request 0x${req.start.toString(16)}+0x${req.length.toString(16)} outside block '${block.idstr}' or not page aligned`, { channel: 'return-path' });
    }
    return { block: idx, page: req.start / TARGET_PAGE_SIZE, pages: req.length / TARGET_PAGE_SIZE };
  }
}

export class PageRequestQueue {
  /** [block index, page] in arrival order. */
  private readonly queue: [number, number][] = [];
  private readonly checker: PageRequestChecker;

  constructor(
    ram: GuestRam,
    private readonly saver: RamSaver,
    private readonly stats: MigrationStats,
  ) {
    this.checker = new PageRequestChecker(ram);
  }

  /** One REQ_PAGES_ID / REQ_PAGES: checked (block, alignment, bounds), then queued. */
  add(type: number, data: Uint8Array): void {
    const req = this.checker.check(type, data);
    this.stats.postcopyRequests++;
    for (let p = req.page; p < req.page + req.pages; p++) this.queue.push([req.block, p]);
  }

  get pending(): number {
    return this.queue.length;
  }

  /** Sends the queued pages still dirty on the main stream; returns how many went. */
  serve(w: ByteWriter): number {
    let sent = 0;
    for (const [b, p] of this.queue.splice(0)) if (this.saver.saveRequestedPage(w, b, p)) sent++;
    return sent;
  }
}
