/**
 * Return-path messages, destination -> source on the main socket's other direction
 * (migration.c MIG_RP_MSG_*): be16 type, be16 len, data.
 */
import { StreamError } from '../errors.js';
import { setBe32, type StreamSource } from '../io.js';
import { MIG_RP_MSG_PONG, MIG_RP_MSG_SHUT } from './constants.js';
import { getU16 } from './main-stream.js';

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

export async function readRpMessage(s: StreamSource): Promise<RpMessage> {
  await s.ensure(4);
  const type = getU16(s);
  const len = getU16(s);
  if (len > MAX_RP_MESSAGE_LEN) {
    throw new StreamError('VMIG_ERR_STREAM_FORMAT', `return-path message ${type} of ${len} bytes`, { channel: 'return-path' });
  }
  await s.ensure(len);
  const data = s.buf.slice(s.pos, s.pos + len);
  s.pos += len;
  return { type, data };
}
