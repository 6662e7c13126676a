/**
 * After the postcopy switch with a preempt channel, the threads that move background pages
 * run at a lower CPU priority (`--postcopy-background-nice`), so that on a busy host the
 * fault path is scheduled first: the destination's vCPUs and preempt thread, the source's
 * return-path thread. Without it, on this project's 2-core machine every hop of a page
 * request waited behind the two main threads and V8's helper threads in the run queue
 * (docs/benchmarks.md). Without preempt the main threads serve requests themselves, and
 * lowering them made faults slower (p99 16-25 -> 13-38 ms), so nothing changes then.
 *
 * Which threads: the main thread (the migration thread on the source, the load thread on the
 * destination) and the runtime's own threads (V8's platform workers, which run the garbage
 * collector's concurrent work and compile code), found as the threads this process had when
 * this module loaded, before any worker of ours existed. Worker threads created since keep
 * their priority.
 *
 * Linux only: there nice is per thread (setpriority with a thread id) and /proc/self/task
 * lists the threads; elsewhere nothing changes. Lowering needs no privilege; raising it
 * back does (CAP_SYS_NICE), so restore() is a try.
 */
import fs from 'node:fs';
import os from 'node:os';

const runtimeThreads: number[] = (() => {
  try {
    return fs.readdirSync('/proc/self/task').map(Number);
  } catch {
    return [];
  }
})();

export interface PriorityChange {
  /** The value they were lowered to. */
  nice: number;
  /** Each lowered thread's nice value before. */
  before: Map<number, number>;
}

/** Lowers the main and runtime threads to `nice` (1..19); undefined if nothing changed. */
export function lowerBackgroundThreads(nice: number): PriorityChange | undefined {
  if (nice <= 0) return undefined;
  const before = new Map<number, number>();
  for (const tid of runtimeThreads) {
    try {
      const was = os.getPriority(tid);
      if (was >= nice) continue;
      os.setPriority(tid, nice);
      before.set(tid, was);
    } catch {
      // The thread has ended, or this platform has no per-thread priority.
    }
  }
  return before.size > 0 ? { nice, before } : undefined;
}

/** Gives the threads their old priority back if this process may; false if it may not. */
export function restoreThreads(change: PriorityChange | undefined): boolean {
  if (!change) return true;
  let ok = true;
  for (const [tid, was] of change.before) {
    try {
      os.setPriority(tid, was);
    } catch {
      ok = false;
    }
  }
  return ok;
}
