/**
 * A socket's fd that threads read and write with `fs.readSync` / `fs.writeSync`, outside any
 * event loop, and that its owner can close safely. This is how a thread of ours does what a
 * QEMU thread does with a blocking read or write on its QEMUFile: the destination's vCPUs
 * write page requests on the return path, and the source's return-path thread reads the
 * return path and writes requested pages on the preempt channel. (A second libuv handle on
 * the fd in another thread is not an option: closing either handle closes the fd.)
 *
 * The fd is non-blocking (libuv made it so for its owner's handle): a read or write that
 * cannot proceed fails with EAGAIN. A reader then waits for data with waitReadable(): with a
 * poller (poll(2), which Node itself cannot call outside an event loop: the CLI's libc.ts)
 * it blocks until data comes, else it naps briefly and tries again.
 *
 * Shared state: an Int32 control array.
 * - LOCK (0 free, 1 held): taken with compareExchange, released with store + notify; a
 *   waiter sleeps on the word. Every read, write and poll of the fd happens with it held,
 *   so messages never interleave and close() can wait for the one in progress.
 * - CLOSING: set (without the lock) by the owner before it closes the fd; no read or write
 *   starts once it is set, and a writer waiting for room gives up. The fd is never used
 *   after it was closed (its number could name another file by then).
 * - BROKEN: a write failed or was cut short (peer gone); later writes are dropped.
 * - NAP: a word nobody notifies but wake(): sleeping on it is a short sleep that the owner
 *   can cut short.
 * - FD: the fd, read with the lock held. After close() the owner may reopen() the object on
 *   another connection's fd (postcopy recovery: the vCPUs keep their writer, the connection
 *   under it changes): under the lock it stores the new fd, then clears CLOSING and BROKEN.
 *
 * Ownership: one thread owns the fd (it holds the libuv handle, or opened it); it calls
 * close() before it closes the fd, and close() returns only after any read or write in
 * progress has finished.
 */
import fs from 'node:fs';

const LOCK = 0;
const CLOSING = 1;
const BROKEN = 2;
const NAP = 3;
const FD = 4;
const WORDS = 5;

/** How long a write may wait for room by default (ms): --channel-timeout's default. */
const DEFAULT_WRITE_TIMEOUT_MS = 30_000;
/** How long a writer sleeps when the socket buffer is full (ms). */
const FULL_NAP_MS = 0.2;

/** Blocks until `fd` has something to read or `ms` passed (poll(2) with POLLIN). */
export type FdPoller = (fd: number, ms: number) => boolean;

export interface SyncFdShared {
  fd: number;
  ctl: SharedArrayBuffer;
  /** The longest a write may wait for room in the socket buffer (ms): past it the stream is broken. */
  writeTimeoutMs: number;
}

/** `writeTimeoutMs`: a peer that takes nothing for this long is gone (a stopped process, a frozen link). */
export function createSyncFd(fd: number, writeTimeoutMs = DEFAULT_WRITE_TIMEOUT_MS): SyncFdShared {
  const ctl = new SharedArrayBuffer(WORDS * 4);
  new Int32Array(ctl)[FD] = fd;
  return { fd, ctl, writeTimeoutMs };
}

/** What readSome found. */
export const READ_NONE = 0;
export const READ_EOF = -1;
export const READ_CLOSED = -2;

export class SyncFd {
  private readonly ctl: Int32Array;
  private readonly writeTimeoutMs: number;

  constructor(s: SyncFdShared) {
    this.ctl = new Int32Array(s.ctl);
    this.writeTimeoutMs = s.writeTimeoutMs;
  }

  /** The fd now (it changes only at reopen(), under the lock). */
  get fd(): number {
    return Atomics.load(this.ctl, FD);
  }

  lock(): void {
    while (Atomics.compareExchange(this.ctl, LOCK, 0, 1) !== 0) Atomics.wait(this.ctl, LOCK, 1, 1);
  }

  unlock(): void {
    Atomics.store(this.ctl, LOCK, 0);
    Atomics.notify(this.ctl, LOCK, 1);
  }

  get closing(): boolean {
    return Atomics.load(this.ctl, CLOSING) !== 0;
  }

  get broken(): boolean {
    return Atomics.load(this.ctl, BROKEN) !== 0;
  }

  /** Writes `msg` whole; the caller holds the lock. False if closed or broken (the stream is unusable then). */
  writeLocked(msg: Uint8Array): boolean {
    if (this.closing || this.broken) return false;
    let off = 0;
    let waitingSince: number | undefined;
    while (off < msg.length) {
      try {
        const n = fs.writeSync(this.fd, msg, off, msg.length - off);
        off += n;
        if (n > 0) waitingSince = undefined;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') {
          Atomics.store(this.ctl, BROKEN, 1);
          return false;
        }
        // The socket buffer is full: the peer is not reading. Wait unless we must stop, or
        // the peer took nothing for the whole timeout (then it is gone: nothing may follow).
        waitingSince ??= performance.now();
        if (performance.now() - waitingSince > this.writeTimeoutMs) {
          Atomics.store(this.ctl, BROKEN, 1);
          return false;
        }
        if (this.closing) {
          // A message cut short would corrupt the stream: nothing may follow it.
          if (off > 0) Atomics.store(this.ctl, BROKEN, 1);
          return false;
        }
        this.nap(FULL_NAP_MS);
      }
    }
    return true;
  }

  /** Writes one whole message (from any thread). False if it could not be written. */
  write(msg: Uint8Array): boolean {
    this.lock();
    try {
      return this.writeLocked(msg);
    } finally {
      this.unlock();
    }
  }

  /**
   * Reads what is there now into `buf` (never waits for data): the byte count, READ_NONE
   * if nothing is there, READ_EOF at the end of the stream, READ_CLOSED once close() began.
   * Any other failure (a reset) is thrown.
   */
  readSome(buf: Uint8Array): number {
    this.lock();
    try {
      if (this.closing) return READ_CLOSED;
      const n = fs.readSync(this.fd, buf, 0, buf.length, null);
      return n === 0 ? READ_EOF : n;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EAGAIN') return READ_NONE;
      throw e;
    } finally {
      this.unlock();
    }
  }

  /**
   * Waits up to `ms` for something to read: in `poller` if there is one, else a nap. The
   * poll holds the lock, so the fd cannot be closed under it; close() waits for it to end
   * (at most `ms`).
   */
  waitReadable(ms: number, poller: FdPoller | undefined): void {
    if (!poller) return this.nap(ms);
    this.lock();
    try {
      if (!this.closing) poller(this.fd, ms);
    } finally {
      this.unlock();
    }
  }

  /** Sleeps up to `ms`, or until wake(). */
  nap(ms: number): void {
    Atomics.wait(this.ctl, NAP, 0, ms);
  }

  /** Cuts a nap short (from any thread). */
  wake(): void {
    Atomics.notify(this.ctl, NAP);
  }

  /** No read or write starts after this returns, and none is in progress: the fd may be closed. */
  close(): void {
    Atomics.store(this.ctl, CLOSING, 1);
    this.wake();
    this.lock();
    this.unlock();
  }

  /** After close(), by the owner: reads and writes go to `fd` from now on (see FD above). */
  reopen(fd: number): void {
    this.lock();
    try {
      Atomics.store(this.ctl, FD, fd);
      Atomics.store(this.ctl, BROKEN, 0);
      Atomics.store(this.ctl, CLOSING, 0);
    } finally {
      this.unlock();
    }
  }
}
