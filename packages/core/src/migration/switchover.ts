/**
 * When the source stops iterating (QEMU's migration_iteration_run and the postcopy switch
 * decision): after each round's bitmap sync, complete if what is dirty fits the downtime
 * limit at the measured bandwidth, switch to postcopy when asked to after N rounds or when
 * precopy stopped converging, or go on. Pure: no I/O, no clock.
 */

/** Postcopy's automatic switch: rounds in a row in which what is dirty did not shrink by a tenth. */
export const POSTCOPY_STALLED_ROUNDS = 3;

export interface SwitchoverParams {
  downtimeLimitMs: number;
  postcopy: boolean;
  /** Switch after this many complete rounds (0: not by count). */
  postcopyAfterRounds: number;
}

export type SwitchoverDecision = 'complete' | 'postcopy' | 'iterate';

export class SwitchoverPolicy {
  rounds = 0;
  private stalled = 0;
  private lastPending = Infinity;

  /** The bytes that may be left for the stop-and-copy phase at `bandwidth` (bytes/s). */
  static threshold(bandwidth: number, downtimeLimitMs: number): number {
    return (bandwidth * downtimeLimitMs) / 1000;
  }

  /**
   * A round ended and the bitmap was synced; `pending` bytes must still go (dirty now, and
   * written but still in the send queues); `dirty` of them are dirty pages (what converges
   * or not: the queues drain by themselves). Also says why, for the log.
   */
  afterRound(pending: number, bandwidth: number, p: SwitchoverParams, dirty = pending): { decision: SwitchoverDecision; reason?: string } {
    this.rounds++;
    // A switch that is due wins over completing (QEMU checks start_postcopy first too).
    if (p.postcopy && p.postcopyAfterRounds > 0 && this.rounds >= p.postcopyAfterRounds) return { decision: 'postcopy', reason: 'the rounds asked for are done' };
    if (pending <= SwitchoverPolicy.threshold(bandwidth, p.downtimeLimitMs)) return { decision: 'complete' };
    // Before a bandwidth was measured nothing can converge yet: no round counts as stalled
    // (a destination that refused the stream must be heard before a switch is decided).
    if (p.postcopy && bandwidth > 0) {
      // What is dirty no longer shrinks by a tenth from one round to the next, while it
      // does not fit the limit.
      this.stalled = dirty > 0.9 * this.lastPending ? this.stalled + 1 : 0;
      this.lastPending = dirty;
      if (this.stalled >= POSTCOPY_STALLED_ROUNDS) return { decision: 'postcopy', reason: 'precopy does not converge' };
    }
    return { decision: 'iterate' };
  }
}
