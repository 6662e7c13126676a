/**
 * A RAM digest pool thread (piscina, started by parallel-digest.ts): each task digests one
 * page range of one block into its own slice of the shared per-page array.
 */
import { setThreadName, TARGET_PAGE_SIZE } from '@vmig/core/vcpu';
import { digestPages } from './page-digest.js';

/** One task: pages [offset, offset + length) of a block, into entries firstPage.. of `pages`. */
export interface DigestRange {
  /** The block's memory (shared, not copied). */
  host: SharedArrayBuffer;
  /** Bytes into `host`, whole pages. */
  offset: number;
  length: number;
  /** The whole guest's per-page array (BigUint64 entries), shared by every task. */
  pages: SharedArrayBuffer;
  /** This range's first entry in `pages`; the slice it writes is its alone. */
  firstPage: number;
  /** One Int32: pages digested so far, by all tasks. */
  done: SharedArrayBuffer;
}

setThreadName('vmig/digest');

export default function digestRange(t: DigestRange): void {
  const count = t.length / TARGET_PAGE_SIZE;
  digestPages(Buffer.from(t.host, t.offset, t.length), new BigUint64Array(t.pages, t.firstPage * BigUint64Array.BYTES_PER_ELEMENT, count));
  // Publishes this slice: the plain stores above come before this Atomics.add in this
  // thread, and the main thread reads the array only after an Atomics.load that sees every
  // task's add, so it sees every slice whole (the JS memory model's synchronizes-with, not
  // a property of how piscina happens to carry its messages).
  Atomics.add(new Int32Array(t.done), 0, count);
}
