/**
 * The few libc calls vmig needs that Node has no API for, through koffi (a foreign-function
 * interface whose prebuilt binaries come as npm packages: nothing is compiled at install).
 * Loaded on first use (~10 ms); null where it cannot be: not Linux with glibc, or no koffi
 * binary for this platform. Every caller has a fallback for that case.
 *
 * - syscall(2), for sched_setattr / sched_getattr, which glibc does not wrap (the CLI's
 *   thread-slice.ts);
 * - poll(2) on one fd, so that a thread of ours can block until a socket has data, as a
 *   QEMU thread blocks in a read, instead of napping and trying again (sync-fd.ts, the
 *   source's return-path thread; postcopy/preempt-reader.ts, a faulting vCPU).
 * - ioctl(2) TIOCOUTQ (SIOCOUTQ) on a socket: bytes written and not yet sent by the kernel,
 *   so that the migration thread measures what a link drained, not what its send queue took
 *   (migration-thread.ts).
 * It lives in core because vCPU threads (which load only core's small `vcpu` entry) poll too.
 */
import { createRequire } from 'node:module';

type Fn = (...args: unknown[]) => number;

interface Koffi {
  load(path: string): { func(decl: string): Fn };
}

export interface Libc {
  /** syscall(nr, ...): the variadic arguments as (type, value) pairs, koffi's convention. */
  syscall(nr: number, ...typedArgs: unknown[]): number;
  /** Blocks until `fd` can be read (data, EOF or an error) or `ms` passed; true if it can. */
  pollIn(fd: number, ms: number): boolean;
  /** Bytes in socket `fd`'s send queue (written, not yet sent); 0 if it cannot say. */
  unsentBytes(fd: number): number;
}

const POLLIN = 0x1;
/** TIOCOUTQ, which is SIOCOUTQ for a socket (asm-generic/ioctls.h). */
const TIOCOUTQ = 0x5411;

let loaded: Libc | null | undefined;

export function libc(): Libc | null {
  if (loaded !== undefined) return loaded;
  loaded = null;
  if (process.platform !== 'linux') return loaded;
  try {
    const c = (createRequire(import.meta.url)('koffi') as Koffi).load('libc.so.6');
    const syscall = c.func('long syscall(long nr, ...)');
    const poll = c.func('int poll(void *fds, unsigned long nfds, int timeout)');
    const ioctl = c.func('int ioctl(int fd, unsigned long request, void *arg)');
    // struct pollfd { int fd; short events; short revents; }, one per thread that polls.
    const pfd = Buffer.alloc(8);
    const outq = Buffer.alloc(4);
    loaded = {
      syscall,
      unsentBytes(fd: number): number {
        return ioctl(fd, TIOCOUTQ, outq) === 0 ? Math.max(0, outq.readInt32LE(0)) : 0;
      },
      pollIn(fd: number, ms: number): boolean {
        pfd.writeInt32LE(fd, 0);
        pfd.writeInt16LE(POLLIN, 4);
        pfd.writeInt16LE(0, 6);
        // EINTR (-1) is a wake-up like any other: the caller looks again.
        return poll(pfd, 1, Math.max(0, Math.ceil(ms))) > 0;
      },
    };
  } catch (e) {
    // No prebuilt koffi for this platform, or no glibc: the fallbacks work (the kernel's
    // slice, the preempt thread reading alone), but slower, so say so once, loudly.
    process.emitWarning(`vmig: poll(2) and sched_setattr(2) are not reachable (koffi: ${(e as Error).message}); the postcopy fault path falls back to its thread and naps`, {
      code: 'VMIG_LIBC_UNAVAILABLE',
    });
  }
  return loaded;
}
