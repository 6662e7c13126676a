/**
 * Return-path messages, destination -> source on the main socket's other direction
 * (migration.c MIG_RP_MSG_*): be16 type, be16 len, data.
 */
import { StreamError } from '../errors.js';
import { setBe32 } from '../io.js';
import { MIG_RP_MSG_PONG, MIG_RP_MSG_SHUT } from './constants.js';

/** The longest return-path message accepted (the buffer of RpMessageReader holds several). */
export const MAX_RP_MESSAGE_LEN = 4096;

export interface RpMessage {
  type: number;
  data: Uint8Array;
}

export function encodeRpMessage(type: number, data: Uint8Array): Uint8Array {
  const out = new Uint8Array(4 + data.length);
  out[0] = type >>> 8;
  out[1] = type & 0xff;
  out[2] = data.length >>> 8;
  out[3] = data.length & 0xff;
  out.set(data, 4);
  return out;
}

function be32(v: number): Uint8Array {
  const b = new Uint8Array(4);
  setBe32(b, 0, v);
  return b;
}

/** SHUT: the destination is done; 0 means it loaded everything. */
export function encodeRpShut(status: number): Uint8Array {
  return encodeRpMessage(MIG_RP_MSG_SHUT, be32(status));
}

export function encodeRpPong(value: number): Uint8Array {
  return encodeRpMessage(MIG_RP_MSG_PONG, be32(value));
}

/** PONG's value (the PING's); -1 if it has none. */
export function decodeRpPong(data: Uint8Array): number {
  return data.length === 4 ? ((data[0]! << 24) | (data[1]! << 16) | (data[2]! << 8) | data[3]!) >>> 0 : -1;
}

/** SHUT's status (0: the destination loaded everything); a SHUT without one counts as failure. */
export function decodeRpShut(data: Uint8Array): number {
  return data.length >= 4 ? ((data[0]! << 24) | (data[1]! << 16) | (data[2]! << 8) | data[3]!) >>> 0 : 1;
}

/**
 * Return-path messages from bytes read in pieces of any size: read into space(), say how
 * many landed with filled(), then take messages with next() until it gives undefined.
 * A message's data is a view, valid until the next space().
 */
export class RpMessageReader {
  /** Room for the largest message (4 + MAX_RP_MESSAGE_LEN) several times over. */
  private readonly buf = new Uint8Array(64 * 1024);
  private start = 0;
  private end = 0;

  constructor(initial: Uint8Array = new Uint8Array(0)) {
    this.buf.set(initial);
    this.end = initial.length;
  }

  /** Where the next read goes (never empty): what is unread moves to the front first. */
  space(): Uint8Array {
    if (this.start > 0) {
      this.buf.copyWithin(0, this.start, this.end);
      this.end -= this.start;
      this.start = 0;
    }
    return this.buf.subarray(this.end);
  }

  filled(n: number): void {
    this.end += n;
  }

  /**
   * Raw bytes that follow a message outside the framing (RECV_BITMAP's bitmap): `take` gets
   * what is buffered and returns how many bytes it used.
   */
  takeRaw(take: (buf: Uint8Array, start: number, end: number) => number): void {
    this.start += take(this.buf, this.start, this.end);
  }

  /** The next whole message, or undefined until more bytes arrive. Throws on an oversize one. */
  next(): RpMessage | undefined {
    const { buf, start, end } = this;
    if (end - start < 4) return undefined;
    const type = (buf[start]! << 8) | buf[start + 1]!;
    const len = (buf[start + 2]! << 8) | buf[start + 3]!;
    if (len > MAX_RP_MESSAGE_LEN) {
      throw new StreamError('VMIG_ERR_STREAM_FORMAT', `return-path message ${type} of ${len} bytes`, { channel: 'return-path' });
    }
    if (end - start - 4 < len) return undefined;
    this.start = start + 4 + len;
    return { type, data: buf.subarray(start + 4, start + 4 + len) };
  }
}
