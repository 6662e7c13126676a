/**
 * The destination's return path as a shared writer: every thread that writes a return-path
 * message (the main thread's PONG and SHUT, a faulting vCPU's page request) writes it whole
 * with `fs.writeSync` on the main socket's fd under one lock, so messages never interleave
 * and a page request leaves the moment the vCPU faults, not when a busy main thread gets to
 * it (QEMU's fault thread requests pages itself; its return path has a mutex too).
 *
 * Shared state: an Int32 control array.
 * - LOCK (0 free, 1 held): taken with compareExchange, released with store + notify; a
 *   waiter sleeps on the word. The holder is the only one who writes the fd or LAST_BLOCK.
 * - CLOSING: set (without the lock) by the owner before it closes the socket; a writer that
 *   waits for room gives up, and no one writes once it is set, so the fd is never written
 *   after it was closed (its number could name another file by then).
 * - LAST_BLOCK: the block of the last page request, so the next one for the same block can
 *   be a REQ_PAGES without the name (the source keeps the same state).
 * - BROKEN: a write failed (peer gone); further writes are dropped.
 * - REQUESTS: page requests written.
 *
 * Ownership: the main thread owns the socket (its handle); it calls close() before it ends
 * or destroys it, and close() returns only after any write in progress has finished.
 */
import fs from 'node:fs';
import { encodeRpReqPages } from '../wire/postcopy.js';

const LOCK = 0;
const CLOSING = 1;
const LAST_BLOCK = 2;
const BROKEN = 3;
const REQUESTS = 4;
/** A word nobody notifies: sleeping on it is a plain short sleep. */
const NAP = 5;
const WORDS = 6;

/** How long a writer sleeps when the socket buffer is full (ms). */
const FULL_NAP_MS = 0.2;

export interface ReturnPathShared {
  fd: number;
  ctl: SharedArrayBuffer;
}

export function createReturnPath(fd: number): ReturnPathShared {
  const ctl = new SharedArrayBuffer(WORDS * 4);
  new Int32Array(ctl)[LAST_BLOCK] = -1;
  return { fd, ctl };
}

export class ReturnPathWriter {
  private readonly ctl: Int32Array;

  constructor(private readonly s: ReturnPathShared) {
    this.ctl = new Int32Array(s.ctl);
  }

  private lock(): void {
    while (Atomics.compareExchange(this.ctl, LOCK, 0, 1) !== 0) Atomics.wait(this.ctl, LOCK, 1, 1);
  }

  private unlock(): void {
    Atomics.store(this.ctl, LOCK, 0);
    Atomics.notify(this.ctl, LOCK, 1);
  }

  /** Writes `msg` whole, with the lock held. False if closed or broken (nothing written). */
  private writeLocked(msg: Uint8Array): boolean {
    if (Atomics.load(this.ctl, CLOSING) !== 0 || Atomics.load(this.ctl, BROKEN) !== 0) return false;
    let off = 0;
    while (off < msg.length) {
      try {
        off += fs.writeSync(this.s.fd, msg, off, msg.length - off);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') {
          Atomics.store(this.ctl, BROKEN, 1);
          return false;
        }
        // The socket buffer is full: the source is not reading. Wait unless we must stop.
        if (Atomics.load(this.ctl, CLOSING) !== 0) {
          // A message cut short would corrupt the stream: nothing may follow it.
          if (off > 0) Atomics.store(this.ctl, BROKEN, 1);
          return false;
        }
        Atomics.wait(this.ctl, NAP, 0, FULL_NAP_MS);
      }
    }
    return true;
  }

  /** Writes one return-path message (from any thread). False if it could not be written. */
  write(msg: Uint8Array): boolean {
    this.lock();
    try {
      return this.writeLocked(msg);
    } finally {
      this.unlock();
    }
  }

  /**
   * A page request for one page (QEMU's migrate_send_rp_req_pages): REQ_PAGES_ID naming the
   * block, or REQ_PAGES when the last request was for the same block.
   */
  requestPage(blockIdx: number, idstr: string, offset: number, length: number): boolean {
    this.lock();
    try {
      const same = Atomics.load(this.ctl, LAST_BLOCK) === blockIdx;
      if (!this.writeLocked(encodeRpReqPages(same ? undefined : idstr, offset, length))) return false;
      Atomics.store(this.ctl, LAST_BLOCK, blockIdx);
      Atomics.add(this.ctl, REQUESTS, 1);
      return true;
    } finally {
      this.unlock();
    }
  }

  get requests(): number {
    return Atomics.load(this.ctl, REQUESTS);
  }

  /** No write starts after this returns, and none is in progress: the fd may be closed. */
  close(): void {
    Atomics.store(this.ctl, CLOSING, 1);
    this.lock();
    this.unlock();
  }
}
