/**
 * The shared control block between the migration thread and vCPU writer workers: one
 * Int32Array over a SharedArrayBuffer. Slot indices are named here and nowhere else.
 *
 * Stop protocol (vm_stop): the main thread stores STOP in RUN_STATE and notifies it; each
 * writer checks RUN_STATE between writes, so a write in progress completes (data, then its
 * dirty bit) before the writer increments PARKED, notifies PARKED and Atomics.waits on
 * RUN_STATE. stop() resolves only when PARKED equals the writer count, i.e. every writer's
 * last write and dirty bit happened-before the migration thread's final bitmap sync.
 * Resume stores RUN and notifies RUN_STATE; writers decrement PARKED on the way out.
 */
export const RUN_STATE = 0;
export const PARKED = 1;
export const STARTED = 2;
/** Throttle percentage 0..99 (auto-converge): writers sleep this share of the time. */
export const THROTTLE_PCT = 3;
/** Per-writer write counters start here (wrapping 32-bit). */
export const WRITES_BASE = 8;

export const STATE_RUN = 0;
export const STATE_STOP = 1;
export const STATE_EXIT = 2;

export function controlBytes(writers: number): number {
  return (WRITES_BASE + writers) * 4;
}
