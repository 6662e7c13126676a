/** Messages between the destination's load loop and a multifd recv thread. */
import type { TlsOptions } from '@vmig/channel';
import type { RamBlockShared } from '@vmig/core';

/** A recv thread's workerData: it starts before its channel connects (see multifd-recv.ts). */
export interface RecvThreadConfig {
  id: number;
  control: SharedArrayBuffer;
  /** Guest RAM is zero but for what loads write (RamBlock.loadZeroPage). */
  zeroUnlessLoaded: boolean;
  /** The compression bits (MULTIFD_FLAG_COMPRESSION_MASK) every packet with pages must carry. */
  compressionFlag: number;
}

export type RecvToChannel =
  /** Guest RAM exists (given on the command line, or built from the stream's block list). */
  | { t: 'ram'; ram: RamBlockShared[] }
  /** The channel's connection: from now on the thread owns `fd`. */
  | { t: 'channel'; fd: number; leftover: Uint8Array }
  /** A connection that may be a channel, under TLS: the thread owns `fd`, does the handshake and posts the init. */
  | { t: 'tls-channel'; fd: number; tls: TlsOptions; timeoutMs: number }
  /** The init it posted was accepted: it serves channel `id` (its barrier slots, its name). */
  | { t: 'adopt'; id: number };

export type RecvFromChannel =
  | { t: 'stats'; normal: number; zero: number; bytes: number }
  | { t: 'end'; normal: number; zero: number; bytes: number }
  | { t: 'error'; error: { code: string; message: string } }
  /** A TLS connection's MultiFDInit_t, read after the handshake, for the load loop to check. */
  | { t: 'init'; init: Uint8Array };
