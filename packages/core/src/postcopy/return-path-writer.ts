/**
 * The destination's return path as a shared writer: every thread that writes a return-path
 * message (the main thread's PONG and SHUT, a faulting vCPU's page request) writes it whole
 * on the main socket's fd (sync-fd.ts: `fs.writeSync` under one lock), so messages never
 * interleave and a page request leaves the moment the vCPU faults, not when a busy main
 * thread gets to it (QEMU's fault thread requests pages itself; its return path has a mutex
 * too).
 *
 * Shared state, besides the fd's own (sync-fd.ts): an Int32 array.
 * - LAST_BLOCK: the block of the last page request, so the next one for the same block can
 *   be a REQ_PAGES without the name (the source keeps the same state). Written only with the
 *   fd's lock held.
 * - REQUESTS: page requests written.
 * - HOLD: postcopy recovery (paused, or the new connection not resumed yet): page requests
 *   are not written (requestPage returns false), so that none reaches a source before its
 *   RESUME_ACK; the vCPU's `requested` bit stays set and resume() writes them all again
 *   (missing-pages.ts, rule 6). Read with the fd's lock held; set and cleared by the owner.
 *
 * Ownership: the main thread owns the socket (its handle); it calls close() before it ends
 * or destroys it, and close() returns only after any write in progress has finished.
 */
import { createSyncFd, SyncFd, type SyncFdShared } from '../sync-fd.js';
import { encodeRpReqPages } from '../wire/postcopy.js';

const LAST_BLOCK = 0;
const REQUESTS = 1;
const HOLD = 2;
const WORDS = 3;

export interface ReturnPathShared {
  io: SyncFdShared;
  ctl: SharedArrayBuffer;
}

/** `writeTimeoutMs`: how long a write may wait for the source to take bytes (sync-fd.ts). */
export function createReturnPath(fd: number, writeTimeoutMs?: number): ReturnPathShared {
  const ctl = new SharedArrayBuffer(WORDS * 4);
  new Int32Array(ctl)[LAST_BLOCK] = -1;
  return { io: createSyncFd(fd, writeTimeoutMs), ctl };
}

export class ReturnPathWriter {
  private readonly ctl: Int32Array;
  private readonly io: SyncFd;

  constructor(s: ReturnPathShared) {
    this.ctl = new Int32Array(s.ctl);
    this.io = new SyncFd(s.io);
  }

  /** Writes one return-path message (from any thread). False if it could not be written. */
  write(msg: Uint8Array): boolean {
    return this.io.write(msg);
  }

  /**
   * A page request for one page (QEMU's migrate_send_rp_req_pages): REQ_PAGES_ID naming the
   * block, or REQ_PAGES when the last request was for the same block.
   */
  requestPage(blockIdx: number, idstr: string, offset: number, length: number): boolean {
    this.io.lock();
    try {
      if (Atomics.load(this.ctl, HOLD) !== 0) return false;
      const same = Atomics.load(this.ctl, LAST_BLOCK) === blockIdx;
      if (!this.io.writeLocked(encodeRpReqPages(same ? undefined : idstr, offset, length))) return false;
      Atomics.store(this.ctl, LAST_BLOCK, blockIdx);
      Atomics.add(this.ctl, REQUESTS, 1);
      return true;
    } finally {
      this.io.unlock();
    }
  }

  get requests(): number {
    return Atomics.load(this.ctl, REQUESTS);
  }

  /** No write starts after this returns, and none is in progress: the fd may be closed. */
  close(): void {
    this.io.close();
  }

  /**
   * Postcopy paused: page requests are held from now on (HOLD), and the fd is let go as
   * close() does. Messages of the owner's own (write()) go on once reopen() gave a new fd.
   */
  pause(): void {
    Atomics.store(this.ctl, HOLD, 1);
    this.io.close();
  }

  /** Recovery: the new connection's fd, for the owner's messages (requests still held). */
  reopen(fd: number): void {
    this.io.reopen(fd);
  }

  /**
   * RESUME_ACK is written: requests flow again. The next one names its block (the source's
   * new return path has no previous one). Returns once no request is held any more; the
   * caller then writes again those a vCPU asked for meanwhile.
   */
  resume(): void {
    this.io.lock();
    try {
      Atomics.store(this.ctl, LAST_BLOCK, -1);
      Atomics.store(this.ctl, HOLD, 0);
    } finally {
      this.io.unlock();
    }
  }
}
