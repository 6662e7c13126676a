/**
 * `@vmig/multifd/testing`: not part of the migration, a fixture for whoever tests a multifd
 * receiver (this package's tests, the fuzzer's seeds). A channel's byte stream as vmig's
 * encoder writes it, with the RAM it must leave behind: packets with runs of contiguous pages
 * and scattered ones, zero pages, an empty SYNC packet, each compressed with `method` where
 * that shrinks it.
 */
import { TARGET_PAGE_SIZE } from '@vmig/core';
import { compressionByName } from './compress/registry.js';
import { encodeMultifdPacketHeader, MULTIFD_FLAG_SYNC, MULTIFD_PACKET_HEADER_SIZE } from './wire/multifd-wire.js';

/** The block the stream names ('pc.ram'), in pages. */
export const MULTIFD_STREAM_PAGES = 64;

export interface MultifdStream {
  stream: Uint8Array;
  /** Block 'pc.ram' after the stream is applied to one that started as `fill` everywhere. */
  expected: Uint8Array;
  syncs: number;
  normal: number;
  zero: number;
}

const PACKETS: readonly { normal: number[]; zero: number[]; sync?: boolean }[] = [
  { normal: [0, 1, 2, 3], zero: [10] },
  { normal: [7, 5, 6, 20], zero: [] },
  { normal: [], zero: [], sync: true },
  { normal: [1, 2], zero: [0, 30] },
  { normal: [63, 40, 41, 42, 43], zero: [3], sync: true },
];

/** A page no other page equals, not zero anywhere it is sampled. */
function page(seed: number): Uint8Array {
  const p = new Uint8Array(TARGET_PAGE_SIZE);
  for (let i = 0; i < p.length; i += 64) p[i] = (seed * 31 + i) & 0xff || 1;
  return p;
}

/**
 * `fill`: what the destination's block holds before (non-zero, so zeroed and untouched pages
 * show). `pageBase`: every page moved up by that many (the block is then `pageBase +
 * MULTIFD_STREAM_PAGES` pages), to put the runs across a segment edge of the block.
 */
export async function encodeMultifdStream(method: string, fill = 0xee, pageBase = 0): Promise<MultifdStream> {
  const P = TARGET_PAGE_SIZE;
  const expected = new Uint8Array((pageBase + MULTIFD_STREAM_PAGES) * P).fill(fill);
  const parts: Uint8Array[] = [];
  const tx = compressionByName(method)?.createSender();
  let syncs = 0;
  let normal = 0;
  let zero = 0;
  let seed = 1;
  for (const p of PACKETS) {
    const data = new Uint8Array(p.normal.length * P);
    p.normal.forEach((pg, i) => {
      const d = page(seed++);
      data.set(d, i * P);
      expected.set(d, (pageBase + pg) * P);
    });
    for (const z of p.zero) expected.fill(0, (pageBase + z) * P, (pageBase + z + 1) * P);
    let flags = p.sync ? MULTIFD_FLAG_SYNC : 0;
    let payload: Uint8Array = data;
    if (tx && data.length > 0) {
      const out = await tx.compress(Buffer.from(data));
      if (out) {
        flags |= out.flag;
        payload = out.payload;
      }
    }
    const h = new Uint8Array(MULTIFD_PACKET_HEADER_SIZE);
    encodeMultifdPacketHeader(h, 0, {
      flags,
      normalPages: p.normal.length,
      zeroPages: p.zero.length,
      nextPacketSize: payload.length,
      packetNum: parts.length,
      ramblock: 'pc.ram',
      offsets: Float64Array.from([...p.normal, ...p.zero].map((x) => (pageBase + x) * P)),
    });
    parts.push(h, payload);
    if (p.sync) syncs++;
    normal += p.normal.length;
    zero += p.zero.length;
  }
  return { stream: new Uint8Array(Buffer.concat(parts)), expected, syncs, normal, zero };
}
