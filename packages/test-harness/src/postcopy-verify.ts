/**
 * Checks a postcopy destination whose vCPUs kept writing (architecture.md, "Correctness you
 * can check"): every page is either untouched and equal to the source's final page, or
 * carries its writers' last stamps with the rest equal to the source's final page.
 *
 * The writers tracked, per page they wrote, their slot's bytes before their first write and
 * their last sequence number. Here each written slot must hold exactly that last stamp (a
 * write that landed before its page was placed was overwritten and fails this), and the RAM
 * with those slots put back must digest to the source's final digest (a page placed torn,
 * or lost, fails that).
 */
import { xxh3 } from '@node-rs/xxhash';
import { type GuestRam, TARGET_PAGE_SIZE } from '@vmig/core';
import { hexDigest } from './digest.js';
import { isStamp, SLOT_BYTES, SLOT_WORDS, stampSlot } from './stamp.js';
import type { WriterTrack } from './vcpu-pool.js';

export interface StampedRamCheck {
  /** Digest of the RAM with every tracked slot restored: must equal the source's ramDigest. */
  restoredDigest: string;
  /** Pages the destination's writers wrote. */
  pagesWritten: number;
  /** Written slots that do not hold their writer's last stamp. */
  badStamps: number;
  /** The first few problems, for the report. */
  problems: string[];
}

export function checkStampedRam(ram: GuestRam, tracks: readonly WriterTrack[], writers: number): StampedRamCheck {
  // Global page -> the tracks that wrote it.
  const byPage = new Map<number, { t: WriterTrack; i: number }[]>();
  for (const t of tracks) {
    for (let i = 0; i < t.pages.length; i++) {
      const p = t.pages[i]!;
      let list = byPage.get(p);
      if (!list) byPage.set(p, (list = []));
      list.push({ t, i });
    }
  }
  const digests = new BigUint64Array(ram.totalPages);
  const scratch = Buffer.alloc(TARGET_PAGE_SIZE);
  const scratchWords = new Int32Array(scratch.buffer, scratch.byteOffset, TARGET_PAGE_SIZE / 4);
  const problems: string[] = [];
  let badStamps = 0;
  let g = 0;
  for (const block of ram.blocks) {
    for (let page = 0; page < block.pages; page++, g++) {
      const bytes = block.page(page);
      const written = byPage.get(g);
      if (!written) {
        digests[g] = xxh3.xxh64(bytes);
        continue;
      }
      scratch.set(bytes);
      for (const { t, i } of written) {
        const slot = stampSlot(t.writer, writers, page);
        if (!isStamp(scratchWords, slot * SLOT_WORDS, t.writer, t.last[i]!, page)) {
          badStamps++;
          if (problems.length < 10) problems.push(`page ${g} ('${block.idstr}' page ${page}): writer ${t.writer}'s last write (seq ${t.last[i]}) is not there`);
        }
        scratch.set(t.orig.subarray(i * SLOT_BYTES, (i + 1) * SLOT_BYTES), slot * SLOT_BYTES);
      }
      digests[g] = xxh3.xxh64(scratch);
    }
  }
  return { restoredDigest: hexDigest(digests), pagesWritten: byPage.size, badStamps, problems };
}
