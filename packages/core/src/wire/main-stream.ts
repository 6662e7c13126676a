/**
 * QEMU's main migration stream ("QEMUFile"): encoders and decoders, pure. Encoders append
 * to a ByteWriter; decoders read from a StreamSource whose bytes the caller has made
 * available (`ensure`) and check every length they read against a limit.
 */
import { StreamError } from '../errors.js';
import { getBe16, getBe32, getBe64, type ByteWriter, type StreamSource } from '../io.js';
import { TARGET_PAGE_SIZE } from '../ram/ram-block.js';
import {
  MAX_COMMAND_LEN,
  QEMU_VM_COMMAND,
  QEMU_VM_CONFIGURATION,
  QEMU_VM_EOF,
  QEMU_VM_FILE_MAGIC,
  QEMU_VM_FILE_VERSION,
  QEMU_VM_SECTION_END,
  QEMU_VM_SECTION_FOOTER,
  QEMU_VM_SECTION_FULL,
  QEMU_VM_SECTION_PART,
  QEMU_VM_SECTION_START,
  QEMU_VM_VMDESCRIPTION,
  RAM_SAVE_FLAG_CONTINUE,
  RAM_SAVE_FLAG_EOS,
  RAM_SAVE_FLAG_MEM_SIZE,
  RAM_SAVE_FLAG_MULTIFD_FLUSH,
  RAM_SAVE_FLAG_PAGE,
  RAM_SAVE_FLAG_ZERO,
} from './constants.js';

const utf8 = new TextEncoder();
const utf8d = new TextDecoder('utf-8', { fatal: false });

/* ------------------------------------------------------------------ encoders */

export function putCountedString(w: ByteWriter, s: string): void {
  const b = utf8.encode(s);
  if (b.length > 255) throw new RangeError(`idstr '${s}' longer than 255 bytes`);
  w.put8(b.length);
  w.putBytes(b);
}

/** File header plus the configuration section (QEMU 7.2: be32 len + machine name). */
export function putFileHeader(w: ByteWriter, machineName: string): void {
  w.put32(QEMU_VM_FILE_MAGIC);
  w.put32(QEMU_VM_FILE_VERSION);
  w.put8(QEMU_VM_CONFIGURATION);
  const name = utf8.encode(machineName);
  w.put32(name.length);
  w.putBytes(name);
}

export interface SectionId {
  sectionId: number;
  idstr: string;
  instanceId: number;
  versionId: number;
}

/** QEMU_VM_SECTION_START or _FULL header. */
export function putSectionFull(w: ByteWriter, type: typeof QEMU_VM_SECTION_START | typeof QEMU_VM_SECTION_FULL, s: SectionId): void {
  w.put8(type);
  w.put32(s.sectionId);
  putCountedString(w, s.idstr);
  w.put32(s.instanceId);
  w.put32(s.versionId);
}

/** QEMU_VM_SECTION_PART or _END header. */
export function putSectionPart(w: ByteWriter, type: typeof QEMU_VM_SECTION_PART | typeof QEMU_VM_SECTION_END, sectionId: number): void {
  w.put8(type);
  w.put32(sectionId);
}

export function putSectionFooter(w: ByteWriter, sectionId: number): void {
  w.put8(QEMU_VM_SECTION_FOOTER);
  w.put32(sectionId);
}

export function putCommand(w: ByteWriter, cmd: number, data: Uint8Array = new Uint8Array(0)): void {
  w.put8(QEMU_VM_COMMAND);
  w.put16(cmd);
  w.put16(data.length);
  w.putBytes(data);
}

export function putEof(w: ByteWriter): void {
  w.put8(QEMU_VM_EOF);
}

export function putVmDescription(w: ByteWriter, json: string): void {
  const b = utf8.encode(json);
  w.put8(QEMU_VM_VMDESCRIPTION);
  w.put32(b.length);
  w.putBytes(b);
}

/** RAM_SAVE_FLAG_MEM_SIZE: total bytes, then each block's idstr and used_length. */
export function putRamMemSize(w: ByteWriter, blocks: readonly { idstr: string; usedLength: number }[]): void {
  const total = blocks.reduce((n, b) => n + b.usedLength, 0);
  w.put64(total + RAM_SAVE_FLAG_MEM_SIZE);
  for (const b of blocks) {
    putCountedString(w, b.idstr);
    w.put64(b.usedLength);
  }
}

/**
 * The be64 address word of a page record plus, unless it continues the previous record's
 * block, the block's idstr. `offset` is page aligned so flags fit in its low bits.
 */
export function putRamRecordHead(w: ByteWriter, offset: number, flags: number, idstr: string, sameBlock: boolean): void {
  if (sameBlock) {
    w.put64(offset + (flags | RAM_SAVE_FLAG_CONTINUE));
  } else {
    w.put64(offset + flags);
    putCountedString(w, idstr);
  }
}

export function putRamZeroPage(w: ByteWriter, offset: number, idstr: string, sameBlock: boolean): void {
  putRamRecordHead(w, offset, RAM_SAVE_FLAG_ZERO, idstr, sameBlock);
  w.put8(0);
}

export function putRamPage(w: ByteWriter, offset: number, idstr: string, sameBlock: boolean, data: Uint8Array): void {
  putRamRecordHead(w, offset, RAM_SAVE_FLAG_PAGE, idstr, sameBlock);
  w.putBytes(data);
}

export function putRamEos(w: ByteWriter): void {
  w.put64(RAM_SAVE_FLAG_EOS);
}

export function putRamMultifdFlush(w: ByteWriter): void {
  w.put64(RAM_SAVE_FLAG_MULTIFD_FLUSH);
}

/* ------------------------------------------------------------------ decoders */
/* Each get* assumes the caller made its bytes available with ensure(). */

export function getU8(s: StreamSource): number {
  return s.buf[s.pos++]!;
}

export function getU16(s: StreamSource): number {
  const v = getBe16(s.buf, s.pos);
  s.pos += 2;
  return v;
}

export function getU32(s: StreamSource): number {
  const v = getBe32(s.buf, s.pos);
  s.pos += 4;
  return v;
}

export function getU64(s: StreamSource): number {
  const v = getBe64(s.buf, s.pos);
  s.pos += 8;
  return v;
}

export function getString(s: StreamSource, len: number): string {
  const v = utf8d.decode(s.buf.subarray(s.pos, s.pos + len));
  s.pos += len;
  return v;
}

/** Reads u8 len + bytes. */
export async function readCountedString(s: StreamSource): Promise<string> {
  const now = takeCountedString(s);
  if (now !== undefined) return now;
  await s.ensure(1);
  const len = getU8(s);
  await s.ensure(len);
  return getString(s, len);
}

/**
 * u8 len + bytes if all of it is in the buffer already, else undefined (nothing consumed):
 * a record's block name without an async call (a promise per page) in the common case.
 */
export function takeCountedString(s: StreamSource): string | undefined {
  const have = s.buf.length - s.pos;
  if (have < 1 || have < 1 + s.buf[s.pos]!) return undefined;
  const len = getU8(s);
  return getString(s, len);
}

export interface FileHeader {
  version: number;
  /** Machine name from the configuration section, if the stream has one. */
  machine: string | undefined;
}

export async function readFileHeader(s: StreamSource, channel = 'main'): Promise<FileHeader> {
  await s.ensure(8);
  const magic = getU32(s);
  if (magic !== QEMU_VM_FILE_MAGIC) {
    throw new StreamError('VMIG_ERR_STREAM_MAGIC', `bad stream magic 0x${magic.toString(16)}, expected 0x${QEMU_VM_FILE_MAGIC.toString(16)}`, { channel, phase: 'header' });
  }
  const version = getU32(s);
  if (version !== QEMU_VM_FILE_VERSION) {
    throw new StreamError('VMIG_ERR_STREAM_VERSION', `unsupported stream version ${version}, expected ${QEMU_VM_FILE_VERSION}`, { channel, phase: 'header' });
  }
  await s.ensure(1);
  let machine: string | undefined;
  if (s.buf[s.pos] === QEMU_VM_CONFIGURATION) {
    s.pos++;
    await s.ensure(4);
    const len = getU32(s);
    if (len > 256) throw new StreamError('VMIG_ERR_STREAM_FORMAT', `configuration name of ${len} bytes`, { channel, phase: 'header' });
    await s.ensure(len);
    machine = getString(s, len);
  }
  return { version, machine };
}

export type SectionHeader =
  | { type: typeof QEMU_VM_SECTION_START | typeof QEMU_VM_SECTION_FULL; sectionId: number; idstr: string; instanceId: number; versionId: number }
  | { type: typeof QEMU_VM_SECTION_PART | typeof QEMU_VM_SECTION_END; sectionId: number }
  | { type: typeof QEMU_VM_COMMAND; cmd: number; data: Uint8Array }
  | { type: typeof QEMU_VM_EOF };

/** Reads the next top-level element: a section header, a command, or EOF. */
export async function readSectionHeader(s: StreamSource, channel = 'main'): Promise<SectionHeader> {
  await s.ensure(1);
  const type = getU8(s);
  switch (type) {
    case QEMU_VM_SECTION_START:
    case QEMU_VM_SECTION_FULL: {
      await s.ensure(4);
      const sectionId = getU32(s);
      const idstr = await readCountedString(s);
      await s.ensure(8);
      const instanceId = getU32(s);
      const versionId = getU32(s);
      return { type, sectionId, idstr, instanceId, versionId };
    }
    case QEMU_VM_SECTION_PART:
    case QEMU_VM_SECTION_END: {
      await s.ensure(4);
      return { type, sectionId: getU32(s) };
    }
    case QEMU_VM_COMMAND: {
      await s.ensure(4);
      const cmd = getU16(s);
      const len = getU16(s);
      if (len > MAX_COMMAND_LEN) throw new StreamError('VMIG_ERR_STREAM_FORMAT', `command ${cmd} of ${len} bytes`, { channel });
      await s.ensure(len);
      const data = s.buf.slice(s.pos, s.pos + len);
      s.pos += len;
      return { type, cmd, data };
    }
    case QEMU_VM_EOF:
      return { type };
    default:
      throw new StreamError('VMIG_ERR_STREAM_FORMAT', `unknown section type 0x${type.toString(16)} at byte ${s.bytesRead - 1}`, { channel });
  }
}

export async function readSectionFooter(s: StreamSource, sectionId: number, channel = 'main'): Promise<void> {
  await s.ensure(5);
  const marker = getU8(s);
  const id = getU32(s);
  if (marker !== QEMU_VM_SECTION_FOOTER || id !== sectionId) {
    throw new StreamError(
      'VMIG_ERR_STREAM_FORMAT',
      `missing section footer for section ${sectionId} (read 0x${marker.toString(16)}, id ${id})`,
      { channel },
    );
  }
}

/** The address word of a RAM record, split. */
export interface RamRecordHead {
  offset: number;
  flags: number;
}

export function splitRamAddr(addr: number): RamRecordHead {
  // addr < 2^53 (getBe64 maps larger values to Infinity, which the caller rejects).
  const flags = addr % TARGET_PAGE_SIZE;
  return { offset: addr - flags, flags };
}

export const RAM_RECORD_FLAGS_KNOWN =
  RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_MEM_SIZE | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_EOS | RAM_SAVE_FLAG_CONTINUE | RAM_SAVE_FLAG_MULTIFD_FLUSH;

/** A RAM record's head, as decodeRamRecordHead found it in a buffer. */
export interface RamRecordAt {
  offset: number;
  flags: number;
  /** The block's name; undefined with RAM_SAVE_FLAG_CONTINUE (the previous record's block) or for a record that names none. */
  idstr: string | undefined;
  /** Bytes of the head: the address word plus, if named, the block's name. */
  headBytes: number;
  /** Bytes after the head: a page, a fill byte, or none. */
  bodyBytes: number;
}

/**
 * The head of the RAM record at buf[pos, end), for a reader that cannot wait for bytes (a
 * thread reading with fs.readSync): fills `out` and returns true if the whole record
 * (head and body) is there, false if not yet. Only page and zero-page records name a
 * block; a record of any other kind is returned with its flags for the caller to judge.
 * Throws a StreamError for an address beyond 2^53 or unknown flag bits.
 */
export function decodeRamRecordHead(buf: Uint8Array, pos: number, end: number, out: RamRecordAt, channel = 'main'): boolean {
  if (end - pos < 8) return false;
  const addr = getBe64(buf, pos);
  if (!Number.isFinite(addr)) throw new StreamError('VMIG_ERR_STREAM_FORMAT', 'RAM record address beyond 2^53', { channel, phase: 'load ram' });
  const flags = addr % TARGET_PAGE_SIZE;
  if ((flags & ~RAM_RECORD_FLAGS_KNOWN) !== 0) {
    throw new StreamError('VMIG_ERR_STREAM_FORMAT', `unknown RAM_SAVE_FLAG bits 0x${(flags & ~RAM_RECORD_FLAGS_KNOWN).toString(16)}`, { channel, phase: 'load ram' });
  }
  out.offset = addr - flags;
  out.flags = flags;
  out.idstr = undefined;
  out.headBytes = 8;
  out.bodyBytes = flags & RAM_SAVE_FLAG_PAGE ? TARGET_PAGE_SIZE : flags & RAM_SAVE_FLAG_ZERO ? 1 : 0;
  if (out.bodyBytes > 0 && (flags & RAM_SAVE_FLAG_CONTINUE) === 0) {
    if (end - pos < 9) return false;
    const len = buf[pos + 8]!;
    if (end - pos < 9 + len) return false;
    out.idstr = utf8d.decode(buf.subarray(pos + 9, pos + 9 + len));
    out.headBytes = 9 + len;
  }
  return end - pos >= out.headBytes + out.bodyBytes;
}
