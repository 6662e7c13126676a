/**
 * After the postcopy switch with a preempt channel, the threads on the page-fault path ask
 * the kernel for a short time slice (`--postcopy-fault-slice-us`): the source's return-path
 * thread and the destination's preempt thread, each for itself, and a destination vCPU
 * while it faults (postcopy/missing-pages.ts). Each of them runs for tens of microseconds
 * per page and then sleeps. (In core, because vCPU threads load only core.)
 *
 * Why: Linux 6.6+ schedules SCHED_OTHER threads with EEVDF. A thread that wakes (a request
 * has arrived, a page has arrived) waits until the thread on the core has used its slice,
 * 1.4 ms by default on this project's 2-core machine (0.7 ms x (1 + log2 cores)); the
 * vCPUs and the threads streaming background pages use theirs in full. A thread whose own
 * slice is shorter has an earlier deadline when it wakes and, since Linux 6.12, preempts at
 * once. Measured: median p99 fault latency with preempt 4.9-5.0 -> 4.0-4.2 ms (docs/benchmarks.md).
 * A short slice is no higher priority: the thread still gets only its fair share of CPU.
 *
 * The slice is sched_attr.sched_runtime, set with sched_setattr(2) for the calling thread
 * (pid 0), which needs no privilege; glibc has no wrapper, so it is the raw syscall
 * (libc.ts). The kernel keeps it within 100 us..100 ms. Elsewhere (not Linux, another
 * architecture, an older kernel, koffi not loadable) nothing changes and the caller is
 * told so.
 */
import { libc } from './libc.js';

/** The kernel's bounds for a SCHED_OTHER slice (us). */
export const MIN_SLICE_US = 100;
export const MAX_SLICE_US = 100_000;

/** sched_attr, SCHED_ATTR_SIZE_VER1: size u32, policy u32, flags u64, nice s32, priority u32, runtime u64, ... */
const ATTR_SIZE = 56;
const ATTR_POLICY = 4;
const ATTR_FLAGS = 8;
const ATTR_RUNTIME = 24;
const SCHED_OTHER = 0;
const SCHED_BATCH = 3;

const SYSCALLS: Partial<Record<NodeJS.Architecture, { setattr: number; getattr: number }>> = {
  x64: { setattr: 314, getattr: 315 },
  arm64: { setattr: 274, getattr: 275 },
};

interface Sys {
  call: (nr: number, ...typedArgs: unknown[]) => number;
  nr: { setattr: number; getattr: number };
}

let cached: Sys | null | undefined;

function sys(): Sys | null {
  if (cached === undefined) {
    const c = libc();
    const nr = SYSCALLS[process.arch];
    cached = c && nr ? { call: c.syscall, nr } : null;
  }
  return cached;
}

/**
 * Whether this process can set slices; loads the interface. A thread that will set its
 * slice at a moment that counts (the switch) calls this when it starts.
 */
export function canSetThreadSlice(): boolean {
  return threadSliceUs() !== undefined;
}

/** The calling thread's sched_attr, or undefined. */
function getAttr(): Buffer | undefined {
  const s = sys();
  if (!s) return undefined;
  const attr = Buffer.alloc(ATTR_SIZE);
  if (s.call(s.nr.getattr, 'int', 0, 'void *', attr, 'unsigned int', ATTR_SIZE, 'unsigned int', 0) !== 0) return undefined;
  return attr;
}

/** The calling thread's slice in us, or undefined where it cannot be read. */
export function threadSliceUs(): number | undefined {
  const attr = getAttr();
  return attr ? Number(attr.readBigUInt64LE(ATTR_RUNTIME) / 1000n) : undefined;
}

/**
 * Gives the calling thread a slice of `us` microseconds (MIN_SLICE_US..MAX_SLICE_US),
 * keeping its policy and nice value. Returns the slice the kernel now reports, or undefined
 * if it could not be set (then nothing changed).
 */
export function setThreadSliceUs(us: number): number | undefined {
  const s = sys();
  const attr = getAttr();
  if (!s || !attr) return undefined;
  const policy = attr.readUInt32LE(ATTR_POLICY);
  // Real-time and deadline threads have no fair slice: leave them as they are.
  if (policy !== SCHED_OTHER && policy !== SCHED_BATCH) return undefined;
  attr.writeUInt32LE(ATTR_SIZE, 0);
  attr.writeBigUInt64LE(0n, ATTR_FLAGS);
  attr.writeBigUInt64LE(BigInt(Math.round(us)) * 1000n, ATTR_RUNTIME);
  if (s.call(s.nr.setattr, 'int', 0, 'void *', attr, 'unsigned int', 0) !== 0) return undefined;
  // A kernel before EEVDF (6.6) takes the call and ignores the runtime: it reports 0.
  return threadSliceUs() || undefined;
}
