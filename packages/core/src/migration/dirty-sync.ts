/**
 * QEMU's migration_bitmap_sync: fold each block's dirty log into its migration bitmap.
 *
 * Memory-ordering rule (pairs with the vCPU writer, which writes page data FIRST and then
 * sets the dirty-log bit with Atomics.or):
 *   here the dirty-log word is taken with Atomics.exchange(…, 0) BEFORE the page is read
 *   (pages are read only later, by the page scan). A write that completes after that read
 *   sets its bit again after the exchange, so the next sync sees it and the page is resent.
 *   A write in progress during the read may produce a torn copy on the wire, but its bit is
 *   set after the data is complete, hence after the exchange: the torn copy is always
 *   superseded. The reverse order (read, then clear) could clear the bit of a write that
 *   landed in between and lose it.
 */
import type { AtomicBitmap } from '../ram/bitmap.js';
import { popcount32 } from '../ram/bitmap.js';
import type { RamBlock } from '../ram/ram-block.js';

/** Returns the number of pages that became dirty in `bitmap` (were clear, now set). */
export function syncDirtyLog(block: RamBlock, bitmap: AtomicBitmap): number {
  const log = block.dirtyLog;
  let newly = 0;
  for (let w = 0; w < log.words.length; w++) {
    // Cheap pre-check: most words are clean; only exchange the ones that are not.
    if (Atomics.load(log.words, w) === 0) continue;
    const bits = log.fetchAndClearWord(w);
    if (bits !== 0) newly += popcount32(bitmap.orWord(w, bits));
  }
  return newly;
}

/** Starts dirty logging from now: drops whatever the log held. */
export function clearDirtyLog(block: RamBlock): void {
  block.dirtyLog.clearAll();
}
