/**
 * Postcopy's messages, pure (savevm.c qemu_savevm_send_postcopy_*, migration.c
 * migrate_send_rp_req_pages): the commands on the main stream and the page requests on the
 * return path. Decoders check every length against what they were given.
 */
import { StreamError } from '../errors.js';
import { getBe32, getBe64, setBe32, setBe64 } from '../io.js';
import { TARGET_PAGE_SIZE } from '../ram/ram-block.js';
import { MAX_DISCARDS_PER_COMMAND, MIG_RP_MSG_REQ_PAGES, MIG_RP_MSG_REQ_PAGES_ID, POSTCOPY_RAM_DISCARD_VERSION } from './constants.js';
import { encodeRpMessage } from './return-path.js';

const utf8 = new TextEncoder();
const utf8d = new TextDecoder();

function bad(message: string, channel = 'main'): never {
  throw new StreamError('VMIG_ERR_STREAM_FORMAT', message, { channel, phase: 'postcopy' });
}

/** POSTCOPY_ADVISE: be64 host page size summary, be64 target page size. */
export function encodePostcopyAdvise(): Uint8Array {
  const b = new Uint8Array(16);
  setBe64(b, 0, TARGET_PAGE_SIZE);
  setBe64(b, 8, TARGET_PAGE_SIZE);
  return b;
}

/** Checks an ADVISE: both sides must use the same page sizes (loadvm_postcopy_handle_advise). */
export function checkPostcopyAdvise(data: Uint8Array): void {
  if (data.length !== 16) bad(`POSTCOPY_ADVISE of ${data.length} bytes, expected 16`);
  const summary = getBe64(data, 0);
  const target = getBe64(data, 8);
  if (summary !== TARGET_PAGE_SIZE || target !== TARGET_PAGE_SIZE) {
    throw new StreamError('VMIG_ERR_POSTCOPY', `postcopy page sizes differ: source ${summary}/${target}, here ${TARGET_PAGE_SIZE}`, { channel: 'main', phase: 'postcopy' });
  }
}

/** A run of pages, in bytes from the start of a block. */
export interface ByteRange {
  start: number;
  length: number;
}

/**
 * POSTCOPY_RAM_DISCARD: u8 version, u8 name length, name, a NUL, then (be64 start, be64
 * length) pairs in bytes, at most MAX_DISCARDS_PER_COMMAND per command.
 */
export function encodePostcopyRamDiscard(idstr: string, ranges: readonly ByteRange[]): Uint8Array {
  if (ranges.length === 0 || ranges.length > MAX_DISCARDS_PER_COMMAND) throw new RangeError(`discard command with ${ranges.length} ranges`);
  const name = utf8.encode(idstr);
  const b = new Uint8Array(3 + name.length + 16 * ranges.length);
  b[0] = POSTCOPY_RAM_DISCARD_VERSION;
  b[1] = name.length;
  b.set(name, 2);
  b[2 + name.length] = 0;
  let p = 3 + name.length;
  for (const r of ranges) {
    setBe64(b, p, r.start);
    setBe64(b, p + 8, r.length);
    p += 16;
  }
  return b;
}

export function decodePostcopyRamDiscard(data: Uint8Array): { idstr: string; ranges: ByteRange[] } {
  if (data.length < 3) bad('POSTCOPY_RAM_DISCARD too short');
  if (data[0] !== POSTCOPY_RAM_DISCARD_VERSION) bad(`POSTCOPY_RAM_DISCARD version ${data[0]}, expected ${POSTCOPY_RAM_DISCARD_VERSION}`);
  const len = data[1]!;
  if (data.length < 3 + len || data[2 + len] !== 0) bad('POSTCOPY_RAM_DISCARD: block name not terminated');
  const idstr = utf8d.decode(data.subarray(2, 2 + len));
  const rest = data.length - 3 - len;
  if (rest % 16 !== 0) bad(`POSTCOPY_RAM_DISCARD: ${rest} bytes of ranges is not a whole number of pairs`);
  const ranges: ByteRange[] = [];
  for (let p = 3 + len; p < data.length; p += 16) ranges.push({ start: getBe64(data, p), length: getBe64(data, p + 8) });
  return { idstr, ranges };
}

/**
 * Runs of set bits in a block's bitmap as discard ranges, grouped into commands of at most
 * MAX_DISCARDS_PER_COMMAND (postcopy_each_ram_send_discard). `nextSet` / `nextClear`: the
 * first set / clear page at or after one, or -1.
 */
export function discardCommands(idstr: string, pages: number, nextSet: (from: number) => number, nextClear: (from: number) => number): Uint8Array[] {
  const cmds: Uint8Array[] = [];
  let ranges: ByteRange[] = [];
  for (let p = nextSet(0); p >= 0 && p < pages; ) {
    const end = nextClear(p);
    const stop = end < 0 ? pages : end;
    ranges.push({ start: p * TARGET_PAGE_SIZE, length: (stop - p) * TARGET_PAGE_SIZE });
    if (ranges.length === MAX_DISCARDS_PER_COMMAND) {
      cmds.push(encodePostcopyRamDiscard(idstr, ranges));
      ranges = [];
    }
    p = stop >= pages ? -1 : nextSet(stop);
  }
  if (ranges.length) cmds.push(encodePostcopyRamDiscard(idstr, ranges));
  return cmds;
}

/** MIG_CMD_PACKAGED's data: be32 length of the blob that follows on the stream. */
export function encodePackagedLength(len: number): Uint8Array {
  const b = new Uint8Array(4);
  setBe32(b, 0, len);
  return b;
}

/** A page request from the destination: a byte range of a block. */
export interface PageRequest {
  /** The block, or undefined for "the same as the previous request" (REQ_PAGES). */
  idstr: string | undefined;
  start: number;
  length: number;
}

/** REQ_PAGES_ID (be64 start, be32 len, u8 name len, name) or REQ_PAGES (no name). */
export function encodeRpReqPages(idstr: string | undefined, start: number, length: number): Uint8Array {
  const name = idstr === undefined ? undefined : utf8.encode(idstr);
  const b = new Uint8Array(12 + (name ? 1 + name.length : 0));
  setBe64(b, 0, start);
  setBe32(b, 8, length);
  if (name) {
    b[12] = name.length;
    b.set(name, 13);
  }
  return encodeRpMessage(name ? MIG_RP_MSG_REQ_PAGES_ID : MIG_RP_MSG_REQ_PAGES, b);
}

export function decodeRpReqPages(type: number, data: Uint8Array): PageRequest {
  if (data.length < 12) bad(`page request of ${data.length} bytes`, 'return-path');
  const start = getBe64(data, 0);
  const length = getBe32(data, 8);
  if (type === MIG_RP_MSG_REQ_PAGES) {
    if (data.length !== 12) bad('REQ_PAGES with trailing bytes', 'return-path');
    return { idstr: undefined, start, length };
  }
  const n = data[12];
  if (n === undefined || data.length !== 13 + n || n === 0) bad('REQ_PAGES_ID with a bad block name', 'return-path');
  return { idstr: utf8d.decode(data.subarray(13)), start, length };
}
