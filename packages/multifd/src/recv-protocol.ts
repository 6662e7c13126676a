/**
 * The control plane between the destination's load loop and a multifd recv thread, as
 * comlink calls (recv-rpc.ts): the thread exposes RecvChannelApi, the load loop listens to
 * RecvChannelEvents through a proxy. Pages never travel here: they go from the socket
 * straight into guest RAM, and the barrier is Atomics (recv-control.ts).
 */
import type { TlsOptions } from '@vmig/channel';
import type { RamBlockShared, VmigErrorJSON } from '@vmig/core';

/** A recv thread's workerData: it starts before its channel connects (see multifd-recv.ts). */
export interface RecvThreadConfig {
  id: number;
  control: SharedArrayBuffer;
  /** Guest RAM is zero but for what loads write (RamBlock.loadZeroPage). */
  zeroUnlessLoaded: boolean;
  /** The compression bits (MULTIFD_FLAG_COMPRESSION_MASK) every packet with pages must carry. */
  compressionFlag: number;
}

export interface RecvTotals {
  normal: number;
  zero: number;
  bytes: number;
}

/** What the load loop calls on a recv thread. None of these throws: failures come as `error` events. */
export interface RecvChannelApi {
  /** Where the thread's events go (first call, before any channel). */
  listen(events: RecvChannelEvents): void;
  /** Guest RAM exists (given at start, or built from the stream's block list). */
  setRam(ram: RamBlockShared[]): void;
  /** The channel's connection: from this call on the thread owns `fd`. */
  attach(fd: number, leftover: Uint8Array): void;
  /**
   * A connection that may be a channel, under TLS: the thread owns `fd`, does the handshake
   * and resolves with the MultiFDInit_t it read through it (null if that failed: see `error`).
   */
  attachTls(fd: number, tls: TlsOptions, timeoutMs: number): Promise<Uint8Array | null>;
  /** The init it read was accepted: it serves channel `id` (its barrier slots, its name). */
  adopt(id: number): void;
}

export interface RecvChannelEvents {
  /** At each SYNC, before the thread parks at the barrier. */
  stats(t: RecvTotals): void;
  /** The channel ended cleanly (between packets). */
  end(t: RecvTotals): void;
  error(e: VmigErrorJSON): void;
}
