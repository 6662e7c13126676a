/**
 * Ending a worker thread that may load a native module (koffi, libc.ts) at its start:
 * terminating it while the module registers itself aborts the whole process (koffi throws
 * into an environment that is being torn down: "FATAL ERROR: napi_throw"). So such a worker
 * is told to stop and left to end by itself; terminate() is only the fallback for one that
 * does not end in time (by then its start is long over).
 */
import type { Worker } from 'node:worker_threads';

/** How long a told-to-stop thread may take to end before it is terminated (ms). */
const EXIT_GRACE_MS = 2000;

/** A promise that settles when `worker` has exited; take it right after creating the worker. */
export function exitOf(worker: Worker): Promise<void> {
  return new Promise<void>((resolve) => worker.once('exit', () => resolve()));
}

/** Waits for a worker that was told to stop to end, terminating it if it does not in time. */
export async function awaitExit(worker: Worker, exited: Promise<void>): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<'late'>((resolve) => (timer = setTimeout(() => resolve('late'), EXIT_GRACE_MS)));
  const r = await Promise.race([exited, late]);
  clearTimeout(timer);
  if (r === 'late') await worker.terminate();
}
