/**
 * Names the calling thread as QEMU names its migration threads ("mig/src/rp",
 * "mig/dst/preempt", "mig/src/send_0", ...), so that `top -H`, `ps -L` and `perf` tell
 * them apart instead of listing a dozen "node" threads. Linux only: a thread writes its own
 * name to /proc/thread-self/comm, which the kernel keeps to 15 bytes. Elsewhere, or if
 * /proc is not mounted, nothing happens.
 */
import { writeFileSync } from 'node:fs';

/** The kernel's limit (TASK_COMM_LEN minus the terminating NUL). */
export const THREAD_NAME_MAX = 15;

/** Names the calling thread; false if this platform has no per-thread name. */
export function setThreadName(name: string): boolean {
  if (process.platform !== 'linux') return false;
  try {
    writeFileSync('/proc/thread-self/comm', name.slice(0, THREAD_NAME_MAX));
    return true;
  } catch {
    return false;
  }
}
