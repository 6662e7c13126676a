/**
 * The stamp a test vCPU writes: 64 bytes (16 words) in one slot of a page: a magic, the
 * writer, its sequence number, the page (in its block), then words derived from the
 * sequence. Writers own disjoint slot ranges of every page (`stampSlot`), so two writers
 * never write the same bytes and a slot holds exactly one writer's last stamp.
 */
import { TARGET_PAGE_SIZE } from '@vmig/core/vcpu';

export const STAMP_MAGIC = 0x56434155; // "VCAU"
export const SLOT_WORDS = 16;
export const SLOT_BYTES = SLOT_WORDS * 4;
export const SLOTS_PER_PAGE = TARGET_PAGE_SIZE / SLOT_BYTES;

/** The slot writer `writer` of `writers` uses in `page` (always the same one for that page). */
export function stampSlot(writer: number, writers: number, page: number): number {
  const span = Math.max(1, Math.floor(SLOTS_PER_PAGE / Math.max(1, writers)));
  return ((writer % SLOTS_PER_PAGE) * span + (page % span)) % SLOTS_PER_PAGE;
}

/** Writes the stamp into `words` at word index `base`; plain stores (torn by design if read meanwhile). */
export function writeStamp(words: Int32Array, base: number, writer: number, seq: number, page: number): void {
  words[base] = STAMP_MAGIC;
  words[base + 1] = writer;
  words[base + 2] = seq;
  words[base + 3] = page;
  for (let i = 4; i < SLOT_WORDS; i++) words[base + i] = (seq * 2654435761 + i) | 0;
}

/** Whether `words[base..base+16)` is exactly the stamp (writer, seq, page). */
export function isStamp(words: Int32Array, base: number, writer: number, seq: number, page: number): boolean {
  if (words[base] !== STAMP_MAGIC || words[base + 1] !== writer || words[base + 2] !== (seq | 0) || words[base + 3] !== page) return false;
  for (let i = 4; i < SLOT_WORDS; i++) if (words[base + i] !== ((seq * 2654435761 + i) | 0)) return false;
  return true;
}
