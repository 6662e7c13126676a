/**
 * Postcopy recovery's messages, pure (QEMU's savevm.c qemu_savevm_send_recv_bitmap and
 * qemu_savevm_send_postcopy_resume, migration.c migrate_send_rp_recv_bitmap and
 * migrate_send_rp_resume_ack, ram.c ramblock_recv_bitmap_send and ram_dirty_bitmap_reload):
 *
 * - MIG_CMD_RECV_BITMAP (source -> destination, a command): u8 name length, name.
 * - MIG_RP_MSG_RECV_BITMAP (destination -> source, a return-path message): u8 name length,
 *   name; then OUTSIDE the message's framing, raw on the return path: be64 size, `size`
 *   bytes of the block's received bitmap (bit i of byte i/8 is page i: QEMU's little-endian
 *   longs), the size rounded up to 8 bytes, then be64 RAMBLOCK_RECV_BITMAP_ENDING.
 * - MIG_CMD_POSTCOPY_RESUME: no data.
 * - MIG_RP_MSG_RESUME_ACK: be32 MIGRATION_RESUME_ACK_VALUE.
 */
import { StreamError } from '../errors.js';
import { getBe32, getBe64, setBe32, setBe64 } from '../io.js';
import { MIG_RP_MSG_RECV_BITMAP, MIG_RP_MSG_RESUME_ACK } from './constants.js';
import { encodeRpMessage } from './return-path.js';

/** The end mark after a received bitmap (ram.c RAMBLOCK_RECV_BITMAP_ENDING). */
export const RAMBLOCK_RECV_BITMAP_ENDING = 0x0123456789abcdefn;
/** RESUME_ACK's value (migration.h MIGRATION_RESUME_ACK_VALUE). */
export const MIGRATION_RESUME_ACK_VALUE = 1;

const utf8 = new TextEncoder();
const utf8d = new TextDecoder();

function bad(message: string, channel: string): never {
  throw new StreamError('VMIG_ERR_STREAM_FORMAT', message, { channel, phase: 'postcopy recovery' });
}

/** The bytes of a block's received bitmap on the wire: one bit per page, rounded up to 8 bytes. */
export function recvBitmapBytes(pages: number): number {
  return Math.ceil(Math.ceil(pages / 8) / 8) * 8;
}

/** A counted block name, as both RECV_BITMAP messages carry it. */
function encodeCountedName(idstr: string): Uint8Array {
  const name = utf8.encode(idstr);
  if (name.length === 0 || name.length > 255) throw new RangeError(`block name of ${name.length} bytes`);
  const b = new Uint8Array(1 + name.length);
  b[0] = name.length;
  b.set(name, 1);
  return b;
}

function decodeCountedName(data: Uint8Array, what: string, channel: string): string {
  const n = data[0];
  if (n === undefined || n === 0 || data.length !== 1 + n) bad(`${what} with a bad block name`, channel);
  return utf8d.decode(data.subarray(1));
}

/** MIG_CMD_RECV_BITMAP's data. */
export function encodeRecvBitmapCmd(idstr: string): Uint8Array {
  return encodeCountedName(idstr);
}

export function decodeRecvBitmapCmd(data: Uint8Array): string {
  return decodeCountedName(data, 'RECV_BITMAP', 'main');
}

/**
 * MIG_RP_MSG_RECV_BITMAP with its raw trailer: the message, be64 size, the bitmap
 * (`received(i)` for each of `pages` pages), be64 end mark.
 */
export function encodeRpRecvBitmap(idstr: string, pages: number, received: (page: number) => boolean): Uint8Array {
  const msg = encodeRpMessage(MIG_RP_MSG_RECV_BITMAP, encodeCountedName(idstr));
  const size = recvBitmapBytes(pages);
  const out = new Uint8Array(msg.length + 8 + size + 8);
  out.set(msg, 0);
  setBe64(out, msg.length, size);
  const bits = out.subarray(msg.length + 8, msg.length + 8 + size);
  for (let p = 0; p < pages; p++) if (received(p)) bits[p >>> 3]! |= 1 << (p & 7);
  new DataView(out.buffer, out.byteOffset + msg.length + 8 + size, 8).setBigUint64(0, RAMBLOCK_RECV_BITMAP_ENDING);
  return out;
}

/** The block a MIG_RP_MSG_RECV_BITMAP names (its trailer follows: RecvBitmapTrailer). */
export function decodeRpRecvBitmap(data: Uint8Array): string {
  return decodeCountedName(data, 'RECV_BITMAP reply', 'return-path');
}

/**
 * The raw part after a MIG_RP_MSG_RECV_BITMAP, read in pieces of any size: feed() until
 * `done`. `pages` is the block's size here: the source refuses a bitmap of another size
 * (ram_dirty_bitmap_reload's "bitmap size mismatch") or without the end mark.
 */
export class RecvBitmapTrailer {
  readonly bitmap: Uint8Array;
  private readonly head = new Uint8Array(8);
  private readonly tail = new Uint8Array(8);
  /** Bytes taken so far: 8 of size, then the bitmap, then 8 of end mark. */
  private got = 0;

  constructor(
    readonly idstr: string,
    pages: number,
  ) {
    this.bitmap = new Uint8Array(recvBitmapBytes(pages));
  }

  get done(): boolean {
    return this.got === 16 + this.bitmap.length;
  }

  /** Takes what it needs of buf[start, end); returns how many bytes it took. */
  feed(buf: Uint8Array, start: number, end: number): number {
    const size = this.bitmap.length;
    let pos = start;
    while (pos < end && !this.done) {
      if (this.got < 8) {
        const n = Math.min(8 - this.got, end - pos);
        this.head.set(buf.subarray(pos, pos + n), this.got);
        this.got += n;
        pos += n;
        if (this.got === 8 && getBe64(this.head, 0) !== size) {
          bad(`RECV_BITMAP of block '${this.idstr}': ${getBe64(this.head, 0)} bytes, this side's block needs ${size}`, 'return-path');
        }
      } else if (this.got < 8 + size) {
        const n = Math.min(8 + size - this.got, end - pos);
        this.bitmap.set(buf.subarray(pos, pos + n), this.got - 8);
        this.got += n;
        pos += n;
      } else {
        const n = Math.min(16 + size - this.got, end - pos);
        this.tail.set(buf.subarray(pos, pos + n), this.got - 8 - size);
        this.got += n;
        pos += n;
        if (this.done && new DataView(this.tail.buffer).getBigUint64(0) !== RAMBLOCK_RECV_BITMAP_ENDING) {
          bad(`RECV_BITMAP of block '${this.idstr}' without its end mark`, 'return-path');
        }
      }
    }
    return pos - start;
  }
}

/** Whether page `p` is set in a received bitmap as the wire carries it. */
export function recvBitmapTest(bitmap: Uint8Array, p: number): boolean {
  return (bitmap[p >>> 3]! & (1 << (p & 7))) !== 0;
}

export function encodeRpResumeAck(value = MIGRATION_RESUME_ACK_VALUE): Uint8Array {
  const b = new Uint8Array(4);
  setBe32(b, 0, value);
  return encodeRpMessage(MIG_RP_MSG_RESUME_ACK, b);
}

export function decodeRpResumeAck(data: Uint8Array): number {
  if (data.length !== 4) bad(`RESUME_ACK of ${data.length} bytes`, 'return-path');
  return getBe32(data, 0);
}
