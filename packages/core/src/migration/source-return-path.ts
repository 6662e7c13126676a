/**
 * The return path as the source's migration thread sees it (QEMU's
 * source_return_path_thread, implemented outside core: it owns a thread and sockets).
 */
import type { UrgentPagesShared } from '../postcopy/urgent-pages.js';

export interface SourceReturnPath {
  /**
   * The status in the destination's SHUT (0: it loaded everything). Rejects with a VmigError
   * when the return path fails first: the destination closed it, or sent something malformed
   * or hostile.
   */
  readonly shut: Promise<number>;
  /** --postcopy-preempt: opens the preempt channel (postcopy_start, before the switch). */
  openPreempt?(): Promise<void>;
  /**
   * The postcopy package is written: page requests are accepted from now on. With a preempt
   * channel the return path sends requested pages itself, through `urgent` (urgent-pages.ts);
   * without one it hands every request to `queue`, for the main stream. `queue` may throw on
   * a bad request; the return path then fails.
   */
  listen(urgent: UrgentPagesShared, queue: (type: number, data: Uint8Array) => void): void;
  /**
   * Postcopy recovery (a return path on a new connection): `idstr`'s received bitmap, as the
   * destination sends it after MIG_CMD_RECV_BITMAP (bit i of byte i/8: page i is in place).
   */
  receivedBitmap?(idstr: string): Promise<Uint8Array>;
  /** Postcopy recovery: the value of the destination's RESUME_ACK. */
  readonly resumeAck?: Promise<number>;
  /** Resolves when the destination's PONG with `value` comes (the answer to MIG_CMD_PING). */
  pong?(value: number): Promise<void>;
}
