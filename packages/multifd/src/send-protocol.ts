/** Messages between the migration thread and a multifd send channel worker. */
import type { RamBlockShared } from '@vmig/core';
import type { MigrationUri, TlsOptions } from '@vmig/channel';

export interface SendChannelConfig {
  ram: RamBlockShared[];
  uri: MigrationUri;
  id: number;
  uuid: Uint8Array;
  compression: string;
  zeroPageDetection: 'none' | 'legacy' | 'multifd';
  /** TLS on this channel (the thread does the handshake), within tlsTimeoutMs. */
  tls: TlsOptions | undefined;
  tlsTimeoutMs: number;
}

/**
 * Packets per job. Every job costs a message each way between threads, a turn of the
 * channel's event loop and a write: for header-only (zero) packets that was most of the
 * work. A job of 8 packets is one message and one corked write (see benchmarks.md).
 */
export const JOB_PACKETS = 8;

/**
 * To the channel: send these pages of a block as packets of up to 128 pages each, numbered
 * from `packetNum` on; write a SYNC packet; close.
 */
export type SendToChannel =
  | { t: 'job'; block: number; pages: Uint32Array; packetNum: number }
  | { t: 'sync'; packetNum: number }
  | { t: 'close' };

/** From the channel. `done`: every packet of a job was handed to the kernel. */
export type SendFromChannel =
  /** Connected, MultiFDInit_t sent; `fd`: the TCP socket's (for its send queue's size), -1 if unknown. */
  | { t: 'ready'; fd: number }
  | { t: 'done'; bytes: number; normal: number; zero: number }
  | { t: 'synced'; bytes: number }
  | { t: 'error'; error: { code: string; message: string } };
