/** Messages between `vmig incoming` and its preempt channel thread (preempt-channel.worker.ts). */
import type { MissingPagesShared, PreemptReaderShared, RamBlockShared } from '@vmig/core';

export type PreemptToThread =
  /**
   * LISTEN, or a recovery's new channel: the channel's fd (the thread reads it from now on),
   * the bytes read from it already, where its pages go, and the reader role it shares with
   * the vCPUs.
   */
  | { t: 'start'; fd: number; first: Uint8Array; ram: RamBlockShared[]; missing: MissingPagesShared; reader: PreemptReaderShared }
  /** Postcopy paused: stop reading this channel, answer 'detached', wait for the next. */
  | { t: 'detach' }
  /** A failure elsewhere, or the end: stop reading, then the thread ends. */
  | { t: 'stop' };

/** What the thread is given when it boots. */
export interface PreemptThreadData {
  /** The slice (us) to ask for at the first 'start' (thread-slice.ts); 0: none. */
  faultSliceUs: number;
  /**
   * Liveness (--channel-timeout, ms): a vCPU waits for a page and nothing was placed from the
   * channel for this long: the channel failed (VMIG_ERR_TIMEOUT), which pauses postcopy.
   */
  timeoutMs: number;
}

export type PreemptFromThread =
  /** Placing from now on, with this slice (us; null: the kernel's). */
  | { t: 'slice'; us: number | null }
  /** The channel ended between records; nobody reads its fd any more. */
  | { t: 'end' }
  /** Answer to 'detach': nobody reads the channel's fd any more. */
  | { t: 'detached' }
  | { t: 'error'; error: { code: string; message: string } };
