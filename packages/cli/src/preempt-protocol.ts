/** Messages between `vmig incoming` and its preempt channel thread (preempt-channel.worker.ts). */
import type { MissingPagesShared, RamBlockShared } from '@vmig/core';

export type PreemptToThread =
  /** LISTEN: the channel's fd (the thread owns it from now on), and where its pages go. */
  | { t: 'start'; fd: number; first: Uint8Array; ram: RamBlockShared[]; missing: MissingPagesShared }
  /** A failure elsewhere: stop reading, close the channel. */
  | { t: 'stop' };

export type PreemptFromThread = { t: 'end' } | { t: 'error'; error: { code: string; message: string } };
