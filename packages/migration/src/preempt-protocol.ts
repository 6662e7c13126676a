/** Messages between `vmig incoming` and its preempt channel thread (preempt-channel.worker.ts). */
import type { MissingPagesShared, PreemptReaderShared, RamBlockShared } from '@vmig/core';

export type PreemptToThread =
  /**
   * LISTEN: the channel's fd (the thread owns it from now on), the bytes read from it
   * already, where its pages go, and the reader role it shares with the vCPUs.
   */
  | { t: 'start'; fd: number; first: Uint8Array; ram: RamBlockShared[]; missing: MissingPagesShared; reader: PreemptReaderShared }
  /** A failure elsewhere: stop reading, close the channel (before 'start': just end). */
  | { t: 'stop' };

/** What the thread is given when it boots. */
export interface PreemptThreadData {
  /** The slice (us) to ask for at 'start' (thread-slice.ts); 0: none. */
  faultSliceUs: number;
}

export type PreemptFromThread =
  /** Placing from now on, with this slice (us; null: the kernel's). */
  | { t: 'slice'; us: number | null }
  | { t: 'end' }
  | { t: 'error'; error: { code: string; message: string } };
