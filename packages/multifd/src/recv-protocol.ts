/** Messages between the destination's load loop and a multifd recv thread. */
import type { RamBlockShared } from '@vmig/core';

export interface RecvChannelConfig {
  fd: number;
  /** Bytes read off the socket after MultiFDInit_t before the handoff. */
  leftover: Uint8Array;
  id: number;
  control: SharedArrayBuffer;
  /** Guest RAM if it exists already; else it comes in a 'ram' message. */
  ram: RamBlockShared[] | undefined;
  /** Guest RAM is zero but for what loads write (RamBlock.loadZeroPage). */
  zeroUnlessLoaded: boolean;
}

export type RecvToChannel = { t: 'ram'; ram: RamBlockShared[] };

export type RecvFromChannel =
  | { t: 'stats'; normal: number; zero: number; bytes: number }
  | { t: 'end'; normal: number; zero: number; bytes: number }
  | { t: 'error'; error: { code: string; message: string } };
