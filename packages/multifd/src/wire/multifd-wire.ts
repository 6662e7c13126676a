/**
 * Multifd wire format (QEMU migration/multifd.h), pure: constants, MultiFDInit_t and
 * MultiFDPacket_t headers, encoders and bounds-checked decoders. Integers big-endian.
 *
 * MultiFDInit_t (64 bytes): u32 magic, u32 version, u8 uuid[16], u8 id, u8 unused1[7],
 *   u64 unused2[4].
 * MultiFDPacket_t (320 bytes + 8 x page_count): u32 magic, u32 version, u32 flags,
 *   u32 pages_alloc, u32 normal_pages, u32 next_packet_size, u64 packet_num,
 *   u32 zero_pages, u32 unused32, u64 unused64[3], char ramblock[256], u64 offset[]
 *   (normal offsets first, then zero offsets). Always sent at full length.
 */
import { getBe32, getBe64, setBe32, setBe64, StreamError, TARGET_PAGE_SIZE } from '@vmig/core';

export const MULTIFD_MAGIC = 0x11223344;
export const MULTIFD_VERSION = 1;
export const MULTIFD_INIT_SIZE = 64;
/** QEMU's MULTIFD_PACKET_SIZE: 512 KiB of pages per packet. */
export const MULTIFD_PACKET_SIZE = 512 * 1024;
export const MULTIFD_PAGE_COUNT = MULTIFD_PACKET_SIZE / TARGET_PAGE_SIZE; // 128
export const MULTIFD_HEADER_FIXED = 320;
export const MULTIFD_PACKET_HEADER_SIZE = MULTIFD_HEADER_FIXED + 8 * MULTIFD_PAGE_COUNT; // 1344
export const MULTIFD_RAMBLOCK_LEN = 256;

export const MULTIFD_FLAG_SYNC = 1 << 0;
/** Compression method bits (0x1f << 1 in QEMU). */
export const MULTIFD_FLAG_COMPRESSION_MASK = 0x1f << 1;
export const MULTIFD_FLAG_NOCOMP = 0 << 1;
export const MULTIFD_FLAG_ZLIB = 1 << 1;
export const MULTIFD_FLAG_ZSTD = 2 << 1;
export const MULTIFD_FLAG_QPL = 4 << 1;
export const MULTIFD_FLAG_UADK = 8 << 1;
export const MULTIFD_FLAG_QATZIP = 16 << 1;
export const MULTIFD_FLAG_DEVICE_STATE = 1 << 6;
/**
 * vmig's private lz4 method. QEMU uses no bit above DEVICE_STATE, so 1 << 8 cannot be
 * mistaken for one of its methods; both ends must agree on `--multifd-compression lz4`.
 */
export const MULTIFD_FLAG_VMIG_LZ4 = 1 << 8;
export const MULTIFD_FLAGS_KNOWN = MULTIFD_FLAG_SYNC | MULTIFD_FLAG_COMPRESSION_MASK | MULTIFD_FLAG_VMIG_LZ4;

/** Largest payload a packet may announce (a compressor's worst case stays far below). */
export const MULTIFD_MAX_PAYLOAD = MULTIFD_PACKET_SIZE + (MULTIFD_PACKET_SIZE >>> 4) + 4096;

export interface MultifdInit {
  uuid: Uint8Array; // 16 bytes
  id: number;
}

export function encodeMultifdInit(init: MultifdInit): Uint8Array {
  const b = new Uint8Array(MULTIFD_INIT_SIZE);
  setBe32(b, 0, MULTIFD_MAGIC);
  setBe32(b, 4, MULTIFD_VERSION);
  b.set(init.uuid.subarray(0, 16), 8);
  b[24] = init.id;
  return b;
}

function fail(message: string, channel: string, code: 'VMIG_ERR_MULTIFD_HANDSHAKE' | 'VMIG_ERR_MULTIFD_PACKET' | 'VMIG_ERR_MULTIFD_CHANNELS' = 'VMIG_ERR_MULTIFD_PACKET'): never {
  throw new StreamError(code, message, { channel });
}

/** Decodes and checks MultiFDInit_t: magic, version, and that the id is one expected. */
export function decodeMultifdInit(b: Uint8Array, channels: number, channel = 'multifd'): MultifdInit {
  if (b.length < MULTIFD_INIT_SIZE) fail('short MultiFDInit_t', channel, 'VMIG_ERR_MULTIFD_HANDSHAKE');
  const magic = getBe32(b, 0);
  if (magic !== MULTIFD_MAGIC) fail(`multifd init: bad magic 0x${magic.toString(16)}`, channel, 'VMIG_ERR_MULTIFD_HANDSHAKE');
  const version = getBe32(b, 4);
  if (version !== MULTIFD_VERSION) fail(`multifd init: version ${version}, expected ${MULTIFD_VERSION}`, channel, 'VMIG_ERR_MULTIFD_HANDSHAKE');
  const id = b[24]!;
  if (id >= channels) {
    fail(`multifd init: channel id ${id}, but this side expects ${channels} channel(s), ids 0..${channels - 1} (--multifd-channels must be the same on both ends)`, channel, 'VMIG_ERR_MULTIFD_CHANNELS');
  }
  return { uuid: b.slice(8, 24), id };
}

export interface MultifdPacketHeader {
  flags: number;
  pagesAlloc: number;
  normalPages: number;
  zeroPages: number;
  nextPacketSize: number;
  packetNum: number;
  ramblock: string;
  /** Byte offsets in the block: normalPages normal ones, then zeroPages zero ones. */
  offsets: Float64Array;
}

const utf8 = new TextEncoder();
const utf8d = new TextDecoder();

/** Writes a full-length packet header at b[pos..pos+1344). */
/** The last block name encoded (a channel sends one block's pages packet after packet). */
let lastName = { text: '', bytes: new Uint8Array(0) };

function encodedName(ramblock: string): Uint8Array {
  if (lastName.text !== ramblock) {
    const bytes = utf8.encode(ramblock);
    if (bytes.length >= MULTIFD_RAMBLOCK_LEN) throw new RangeError('ramblock name too long');
    lastName = { text: ramblock, bytes };
  }
  return lastName.bytes;
}

export function encodeMultifdPacketHeader(b: Uint8Array, pos: number, h: Omit<MultifdPacketHeader, 'pagesAlloc'> & { pagesAlloc?: number }): void {
  b.fill(0, pos, pos + MULTIFD_PACKET_HEADER_SIZE);
  setBe32(b, pos, MULTIFD_MAGIC);
  setBe32(b, pos + 4, MULTIFD_VERSION);
  setBe32(b, pos + 8, h.flags);
  setBe32(b, pos + 12, h.pagesAlloc ?? MULTIFD_PAGE_COUNT);
  setBe32(b, pos + 16, h.normalPages);
  setBe32(b, pos + 20, h.nextPacketSize);
  setBe64(b, pos + 24, h.packetNum);
  setBe32(b, pos + 32, h.zeroPages);
  const name = encodedName(h.ramblock);
  b.set(name, pos + 64);
  const n = h.normalPages + h.zeroPages;
  for (let i = 0; i < n; i++) setBe64(b, pos + MULTIFD_HEADER_FIXED + 8 * i, h.offsets[i]!);
}

/**
 * Decodes a packet header and checks every count (QEMU's multifd_recv_unfill_packet):
 * pages_alloc <= page_count, normal <= pages_alloc, zero <= pages_alloc - normal, a
 * NUL-terminated block name, a bounded payload size, page-aligned offsets.
 * Offsets against the block's size are checked by checkMultifdOffsets once the block is known.
 */
export function decodeMultifdPacketHeader(b: Uint8Array, pos: number, channel = 'multifd'): MultifdPacketHeader {
  const magic = getBe32(b, pos);
  if (magic !== MULTIFD_MAGIC) fail(`packet: bad magic 0x${magic.toString(16)}`, channel);
  const version = getBe32(b, pos + 4);
  if (version !== MULTIFD_VERSION) fail(`packet: version ${version}`, channel);
  const flags = getBe32(b, pos + 8);
  if ((flags & ~MULTIFD_FLAGS_KNOWN) !== 0) fail(`packet: unknown flags 0x${flags.toString(16)}`, channel);
  const pagesAlloc = getBe32(b, pos + 12);
  if (pagesAlloc > MULTIFD_PAGE_COUNT) fail(`packet: pages_alloc ${pagesAlloc} > ${MULTIFD_PAGE_COUNT}`, channel);
  const normalPages = getBe32(b, pos + 16);
  if (normalPages > pagesAlloc) fail(`packet: normal_pages ${normalPages} > pages_alloc ${pagesAlloc}`, channel);
  const zeroPages = getBe32(b, pos + 32);
  if (zeroPages > pagesAlloc - normalPages) fail(`packet: zero_pages ${zeroPages} > ${pagesAlloc - normalPages}`, channel);
  const nextPacketSize = getBe32(b, pos + 20);
  const packetNum = getBe64(b, pos + 24);
  const nameBytes = b.subarray(pos + 64, pos + 64 + MULTIFD_RAMBLOCK_LEN);
  const nul = nameBytes.indexOf(0);
  if (nul < 0) fail('packet: ramblock name not terminated', channel);
  const ramblock = utf8d.decode(nameBytes.subarray(0, nul));
  const n = normalPages + zeroPages;
  const offsets = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const off = getBe64(b, pos + MULTIFD_HEADER_FIXED + 8 * i);
    if (!Number.isFinite(off) || off % TARGET_PAGE_SIZE !== 0) fail(`packet ${packetNum}: offset ${off} not page aligned`, channel);
    offsets[i] = off;
  }
  return { flags, pagesAlloc, normalPages, zeroPages, nextPacketSize, packetNum, ramblock, offsets };
}

/** Every offset must leave a whole page inside the block. */
export function checkMultifdOffsets(h: MultifdPacketHeader, usedLength: number, channel = 'multifd'): void {
  for (let i = 0; i < h.offsets.length; i++) {
    const off = h.offsets[i]!;
    if (off > usedLength - TARGET_PAGE_SIZE) {
      throw new StreamError('VMIG_ERR_BAD_OFFSET', `packet ${h.packetNum}: offset 0x${off.toString(16)} outside block '${h.ramblock}' of ${usedLength} bytes`, { channel });
    }
  }
}

/**
 * A packet against what this side agreed on (QEMU's multifd_recv_unfill_packet and the recv
 * methods' flag checks): a packet with pages carries exactly the compression bits of this
 * side's method, or none (a packet sent raw); in QEMU 7.2's dialect the word at offset 32 is unused and must be 0 (a
 * 7.2 source sends it zeroed; read as zero_pages it would name pages that were never sent).
 */
export function checkMultifdExpected(h: MultifdPacketHeader, compressionFlag: number, legacy: boolean, channel = 'multifd'): void {
  if (legacy && h.zeroPages !== 0) {
    throw new StreamError('VMIG_ERR_MULTIFD_PACKET', `packet ${h.packetNum}: word at offset 32 holds ${h.zeroPages}, but it is unused in QEMU 7.2's dialect (no zero pages in packets)`, { channel });
  }
  const bits = h.flags & (MULTIFD_FLAG_COMPRESSION_MASK | MULTIFD_FLAG_VMIG_LZ4);
  // A packet that did not shrink travels raw (vmig's lz4 sends it so): raw is always understood.
  if (h.normalPages > 0 && bits !== compressionFlag && bits !== MULTIFD_FLAG_NOCOMP) {
    throw new StreamError(
      'VMIG_ERR_MULTIFD_DIALECT',
      `packet ${h.packetNum}: compression flags 0x${bits.toString(16)}, but this side expects 0x${compressionFlag.toString(16)} (--multifd-compression must be the same on both ends)`,
      { channel },
    );
  }
}
