/** Messages between the destination's load loop and a multifd recv thread. */
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
  | { t: 'channel'; fd: number; leftover: Uint8Array };

export type RecvFromChannel =
  | { t: 'stats'; normal: number; zero: number; bytes: number }
  | { t: 'end'; normal: number; zero: number; bytes: number }
  | { t: 'error'; error: { code: string; message: string } };
