/**
 * The source's side of postcopy page requests (QEMU's ram_save_queue_pages and
 * get_queued_page): requests from the return path, checked against the RAM blocks, queued,
 * and served ahead of background pages (RamSaver.saveRequestedPage).
 */
import { VmigError } from '../errors.js';
import type { ByteWriter } from '../io.js';
import { type GuestRam, TARGET_PAGE_SIZE } from '../ram/ram-block.js';
import { decodeRpReqPages } from '../wire/postcopy.js';
import type { RamSaver } from './ram-save.js';
import type { MigrationStats } from './stats.js';

export class PageRequestQueue {
  /** [block index, page] in arrival order. */
  private readonly queue: [number, number][] = [];
  /** The block of the last REQ_PAGES_ID, for REQ_PAGES. */
  private lastBlock = -1;

  constructor(
    private readonly ram: GuestRam,
    private readonly saver: RamSaver,
    private readonly stats: MigrationStats,
  ) {}

  /** One REQ_PAGES_ID / REQ_PAGES: checked (block, alignment, bounds), then queued. */
  add(type: number, data: Uint8Array): void {
    const req = decodeRpReqPages(type, data);
    const blocks = this.ram.blocks;
    const idx = req.idstr === undefined ? this.lastBlock : blocks.findIndex((b) => b.idstr === req.idstr);
    const block = blocks[idx];
    if (!block) throw new VmigError('VMIG_ERR_UNKNOWN_BLOCK', req.idstr === undefined ? 'REQ_PAGES before any REQ_PAGES_ID' : `page request for unknown RAM block '${req.idstr}'`, { channel: 'return-path' });
    this.lastBlock = idx;
    if (req.start % TARGET_PAGE_SIZE || req.length % TARGET_PAGE_SIZE || req.length === 0 || req.start + req.length > block.usedLength) {
      throw new VmigError('VMIG_ERR_BAD_OFFSET', `page request 0x${req.start.toString(16)}+0x${req.length.toString(16)} outside block '${block.idstr}' or not page aligned`, { channel: 'return-path' });
    }
    this.stats.postcopyRequests++;
    for (let p = req.start / TARGET_PAGE_SIZE; p < (req.start + req.length) / TARGET_PAGE_SIZE; p++) this.queue.push([idx, p]);
  }

  get pending(): number {
    return this.queue.length;
  }

  /**
   * Sends the queued pages (see RamSaver.saveRequestedPage for which go and why `ownStream`
   * matters); returns how many went.
   */
  serve(w: ByteWriter, ownStream: boolean): number {
    let sent = 0;
    for (const [b, p] of this.queue.splice(0)) if (this.saver.saveRequestedPage(w, b, p, ownStream)) sent++;
    return sent;
  }
}
