/**
 * Free page hinting (QEMU's qemu_guest_free_page_hint, fed by virtio-balloon; seed 000):
 * the guest reports page ranges it does not use, and they are dropped from the migration
 * bitmap so they are not sent.
 *
 * Hints count only between AFTER_BITMAP_SYNC and the next BEFORE_BITMAP_SYNC (the window
 * the balloon reports in); outside it they are ignored.
 *
 * Why a hint never loses a write: a hint clears the MIGRATION bitmap only, never the dirty
 * log. A vCPU write sets the page's dirty-log bit after its data (dirty-sync.ts); any write
 * after the sync that opened the window is therefore in the log and is folded back into the
 * migration bitmap at the next sync, whether it landed before or after the hint. Only the
 * content the page had at that sync is skipped, which is what "free" means. The migration
 * bitmap is touched only on the migration thread (here and by the page scan), so hints and
 * the scan never race.
 */
import type { RamSaver } from '../migration/ram-save.js';
import type { NotifierWithReturnList, PrecopyNotifyData } from './notifiers.js';

export class FreePageHinting {
  private windowOpen = false;
  /** Pages dropped from the migration bitmap by hints. */
  skippedPages = 0;

  constructor(private readonly saver: RamSaver) {}

  /** Listens to a precopy chain for the window; returns the remover. */
  attach(chain: NotifierWithReturnList<PrecopyNotifyData>): () => void {
    return chain.add((e) => {
      if (e.reason === 'AFTER_BITMAP_SYNC') this.windowOpen = true;
      else this.windowOpen = false;
    });
  }

  get accepting(): boolean {
    return this.windowOpen;
  }

  /**
   * The guest reports [startPage, startPage + npages) of block `idstr` free. Returns how many
   * pages were dropped from the migration bitmap (0 outside the window).
   */
  hint(idstr: string, startPage: number, npages: number): number {
    if (!this.windowOpen) return 0;
    const n = this.saver.discardFreePages(idstr, startPage, npages);
    this.skippedPages += n;
    return n;
  }
}
