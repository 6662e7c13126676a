/**
 * The per-page step of a RAM digest, shared by digestRam (one thread) and the digest pool's
 * workers (digest.worker.ts), so that both produce the same per-page array bit for bit.
 * Imports only core's small vCPU entry: a pool worker loads this, not all of core.
 */
import { xxh3 } from '@node-rs/xxhash';
import { TARGET_PAGE_SIZE } from '@vmig/core/vcpu';

/** xxh3-64 of each page of `bytes` (whole pages) into `out[0..]`, one entry a page. */
export function digestPages(bytes: Buffer, out: BigUint64Array): void {
  for (let p = 0, off = 0; off < bytes.length; p++, off += TARGET_PAGE_SIZE) {
    out[p] = xxh3.xxh64(bytes.subarray(off, off + TARGET_PAGE_SIZE));
  }
}
