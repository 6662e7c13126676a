/**
 * Per-page digests of guest RAM (xxh3-64) and one digest over them; the single digest is
 * what reports carry, the per-page array locates a difference when debugging.
 * digestRam runs on the calling thread; parallel-digest.ts spreads the same work over cores.
 */
import { xxh3 } from '@node-rs/xxhash';
import { type GuestRam, TARGET_PAGE_SIZE } from '@vmig/core';
import { digestPages } from './page-digest.js';

export interface RamDigest {
  /** xxh3-64 of each page, blocks in order. */
  pages: BigUint64Array;
  /** xxh3-64 over `pages`, hex. */
  digest: string;
}

export function digestRam(ram: GuestRam): RamDigest {
  const pages = new BigUint64Array(ram.totalPages);
  let first = 0;
  for (const block of ram.blocks) {
    for (const seg of block.segments) {
      const n = seg.length / TARGET_PAGE_SIZE;
      digestPages(seg, pages.subarray(first, first + n));
      first += n;
    }
  }
  return { pages, digest: hexDigest(pages) };
}

export function hexDigest(pages: BigUint64Array): string {
  return xxh3.xxh64(Buffer.from(pages.buffer, pages.byteOffset, pages.byteLength)).toString(16).padStart(16, '0');
}
