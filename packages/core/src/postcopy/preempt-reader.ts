/**
 * The destination's preempt channel, read by whichever thread needs its pages: a vCPU that
 * faults on a missing page reads the channel and places what comes itself (one vCPU at a
 * time: the reader role), instead of waiting for the preempt thread to read, place and wake
 * it. A page request then costs the destination one thread wake-up (the vCPU's, when its
 * page arrives) instead of two; on a small machine every wake-up may wait for a core
 * (docs/benchmarks.md). The preempt thread (QEMU's postcopy_preempt_thread) is the channel's
 * owner here (attach, close) and reads only what nobody else does: copies of pages that came in the background first, and
 * the end of the stream. With `vcpusRead` off, or without poll(2) (libc.ts: a vCPU could
 * only nap and retry), no vCPU takes the role and the preempt thread reads everything, as
 * QEMU's does.
 *
 * Shared state (SharedArrayBuffers):
 * - ctl (Int32): VCPUS_READ (set at creation), ROLE (0 free, 1 held), FD (-1 until the
 *   channel is attached), STATE (OPEN, ENDED, FAILED, CLOSING), START and END (the bytes
 *   read but not yet parsed are buf[START, END)), LAST_BLOCK (the block of the last named
 *   record, for RAM_SAVE_FLAG_CONTINUE; -1: none), NAP (the owner sleeps on it), ERROR_LEN,
 *   and counters: pages placed from this channel by vCPUs and by the owner.
 * - buf: the read buffer; error: the failure, as JSON.
 *
 * Ordering rules:
 * 1. The role: a thread takes it with compareExchange(ROLE, 0, 1) and gives it back with
 *    store(ROLE, 0). Only the holder reads the fd, touches buf, START, END and LAST_BLOCK,
 *    or sets ENDED or FAILED; the atomic take and give order those plain accesses between
 *    holders (the buffer is handed from one to the next with the role).
 * 2. Attach: the owner writes the channel's first bytes into buf and places the whole
 *    records among them (the connection may have come after requested pages were sent: those
 *    bytes will not come again from the socket, and a reader only parses after a read), then
 *    stores FD (release). Nobody takes the role while FD is -1.
 * 3. Pages are placed through the received map (missing-pages.ts rule 1): a page read here
 *    is claimed, copied whole and its bit set, whoever reads it; a copy of a page placed
 *    already is dropped.
 * 4. Handing on: the holder gives the role back as soon as its own page is in (or, the
 *    owner, once nothing more is there), then wakes every vCPU still waiting for a page
 *    (MissingPagesPlacer.wakeWaiting), so that one of them takes the role. A holder waits for data in poll(2) for at most POLL_MS, then
 *    looks at STATE and at the received map again: a closing owner or an abort is seen.
 * 5. Close: the owner sets CLOSING (unless the stream ENDED or FAILED), then takes the role
 *    itself and stores FD -1: no read or poll is in progress then, and none starts, so
 *    whoever holds the fd's handle may close it (the CLI's main thread, once the preempt
 *    thread ended). A holder that died with the role (a terminated thread) cannot read
 *    either, so the owner waits for the role at most CLOSE_WAIT_MS.
 * 6. Reattach (postcopy recovery: the source connects a new preempt channel): the owner
 *    still holds the role from close(); it resets STATE, the buffer and LAST_BLOCK, then does
 *    rule 2 with the new fd and gives the role back.
 */
import fs from 'node:fs';
import { StreamError, toVmigError, VmigError } from '../errors.js';
import { libc } from '../libc.js';
import type { GuestRam, RamBlock } from '../ram/ram-block.js';
import { TARGET_PAGE_SIZE } from '../ram/ram-block.js';
import {
  RAM_SAVE_FLAG_CONTINUE,
  RAM_SAVE_FLAG_EOS,
  RAM_SAVE_FLAG_MEM_SIZE,
  RAM_SAVE_FLAG_MULTIFD_FLUSH,
  RAM_SAVE_FLAG_PAGE,
  RAM_SAVE_FLAG_ZERO,
} from '../wire/constants.js';
import { decodeRamRecordHead, type RamRecordAt } from '../wire/main-stream.js';
import type { MissingPagesPlacer } from './missing-pages.js';

const ROLE = 0;
const FD = 1;
const STATE = 2;
const START = 3;
const END = 4;
const LAST_BLOCK = 5;
const NAP = 6;
const ERROR_LEN = 7;
const VCPU_PAGES = 8;
const OWNER_PAGES = 9;
const VCPUS_READ = 10;
const WORDS = 11;

const OPEN = 0;
/** The source closed the channel between records. */
const ENDED = 1;
/** A bad record, a truncated stream or a failed read: `error` says which. */
const FAILED = 2;
/** The owner is closing the fd. */
const CLOSING = 3;

/** The read buffer: many requested pages (a record is at most 8 + 256 + 4096 bytes). */
const BUF_BYTES = 256 * 1024;
const ERROR_BYTES = 1024;
/** Longest wait in poll(2) before the holder looks at STATE and the received map again (ms). */
const POLL_MS = 20;
/**
 * The owner's sleep between looks at the channel (ms) while vCPUs read it: only leftovers
 * are for the owner then. Reading alone without poll(2), it naps ALONE_NAP_MS.
 */
const OWNER_NAP_MS = 5;
const ALONE_NAP_MS = 0.5;
/** How long the owner waits for the role before it gives the fd up anyway (ms). */
const CLOSE_WAIT_MS = 1000;

const channel = 'preempt';

export interface PreemptReaderShared {
  ctl: SharedArrayBuffer;
  buf: SharedArrayBuffer;
  error: SharedArrayBuffer;
}

/** Pages placed from the preempt channel, by who read them (copies dropped are not counted). */
export interface PreemptReads {
  preemptPagesByVcpus: number;
  preemptPagesByThread: number;
}

/** Who reads the channel: the vCPUs (and the owner, for leftovers), or the owner alone. */
export function preemptReaderMode(s: PreemptReaderShared): 'vcpu' | 'thread' {
  return new Int32Array(s.ctl)[VCPUS_READ] === 1 ? 'vcpu' : 'thread';
}

export function preemptReads(s: PreemptReaderShared): PreemptReads {
  const ctl = new Int32Array(s.ctl);
  return { preemptPagesByVcpus: Atomics.load(ctl, VCPU_PAGES), preemptPagesByThread: Atomics.load(ctl, OWNER_PAGES) };
}

/** `vcpusRead`: faulting vCPUs read the channel (if they can block in poll(2)); else only the owner does. */
export function createPreemptReader(vcpusRead: boolean): PreemptReaderShared {
  const s = { ctl: new SharedArrayBuffer(WORDS * 4), buf: new SharedArrayBuffer(BUF_BYTES), error: new SharedArrayBuffer(ERROR_BYTES) };
  const ctl = new Int32Array(s.ctl);
  ctl[VCPUS_READ] = vcpusRead && libc() !== null ? 1 : 0;
  ctl[FD] = -1;
  ctl[LAST_BLOCK] = -1;
  return s;
}

/** One per thread that may read the channel: the preempt thread and each vCPU. */
export class PreemptReader {
  private readonly ctl: Int32Array;
  private readonly buf: Uint8Array;
  private readonly blockIndex = new Map<RamBlock, number>();
  private readonly blockBase: number[] = [];
  private readonly head: RamRecordAt = { offset: 0, flags: 0, idstr: undefined, headBytes: 0, bodyBytes: 0 };
  private readonly pollIn: ((fd: number, ms: number) => boolean) | undefined;
  /** Set by attach(): this is the owner's instance (for the counters). */
  private owner = false;

  constructor(
    private readonly s: PreemptReaderShared,
    private readonly ram: GuestRam,
    private readonly placer: MissingPagesPlacer,
  ) {
    this.ctl = new Int32Array(s.ctl);
    this.buf = new Uint8Array(s.buf);
    let base = 0;
    ram.blocks.forEach((b, i) => {
      this.blockIndex.set(b, i);
      this.blockBase.push(base);
      base += b.pages;
    });
    this.pollIn = libc()?.pollIn;
    this.vcpusRead = this.ctl[VCPUS_READ] === 1 && this.pollIn !== undefined;
  }

  /** Faulting vCPUs read the channel themselves (only where a thread can block in poll(2)). */
  readonly vcpusRead: boolean;

  /* ------------------------------------------------------------ the vCPU side */

  /**
   * Rule 1: takes the reader role if the channel is open and nobody has it. A vCPU that
   * gets it calls readUntil, which gives it back.
   */
  tryTake(): boolean {
    if (!this.vcpusRead || Atomics.load(this.ctl, FD) < 0 || Atomics.load(this.ctl, STATE) !== OPEN) return false;
    return Atomics.compareExchange(this.ctl, ROLE, 0, 1) === 0;
  }

  /**
   * With the role: reads and places until `done()` (the caller's page is in, or postcopy
   * failed) or the stream cannot be read any more; then rule 4.
   */
  readUntil(done: () => boolean): void {
    try {
      const fd = Atomics.load(this.ctl, FD);
      while (!done() && Atomics.load(this.ctl, STATE) === OPEN) {
        if (!this.readAvailable(fd)) this.pollIn!(fd, POLL_MS);
      }
    } finally {
      this.release();
    }
  }

  /* ------------------------------------------------------------ the owner's side */

  /** Rule 6 (the owner, after close()): a new channel in place of the old one. */
  reattach(fd: number, first: Uint8Array): void {
    Atomics.store(this.ctl, STATE, OPEN);
    Atomics.store(this.ctl, ERROR_LEN, 0);
    this.ctl[LAST_BLOCK] = -1;
    this.attach(fd, first);
    this.release();
  }

  /** Rule 2: the channel exists; `first` are the bytes read from it already. */
  attach(fd: number, first: Uint8Array): void {
    if (first.length > BUF_BYTES - TARGET_PAGE_SIZE) throw new RangeError(`${first.length} bytes read ahead on the preempt channel`);
    this.owner = true;
    this.buf.set(first, 0);
    this.ctl[START] = 0;
    this.ctl[END] = first.length;
    try {
      this.parse();
    } catch (e) {
      this.fail(e);
    }
    Atomics.store(this.ctl, FD, fd);
    // Pages may have been requested before the channel came: their vCPUs may read now.
    this.placer.wakeWaiting();
    this.wakeOwner();
  }

  /**
   * The owner's turn, tens of ms at most: while vCPUs read, it sleeps (until a vCPU ends or
   * fails the stream), then reads and places what is there if no vCPU holds the role.
   * Reading alone, it waits for data in poll(2) (or naps without it) and reads it. Returns
   * the stream's state.
   */
  service(): 'open' | 'ended' | 'failed' {
    const alone = !this.vcpusRead;
    if (!alone || !this.pollIn) Atomics.wait(this.ctl, NAP, 0, alone ? ALONE_NAP_MS : OWNER_NAP_MS);
    if (Atomics.load(this.ctl, STATE) === OPEN && Atomics.compareExchange(this.ctl, ROLE, 0, 1) === 0) {
      try {
        const fd = Atomics.load(this.ctl, FD);
        if (alone && this.pollIn && !this.readAvailable(fd) && Atomics.load(this.ctl, STATE) === OPEN) this.pollIn(fd, POLL_MS);
        while (Atomics.load(this.ctl, STATE) === OPEN && this.readAvailable(fd));
      } finally {
        this.release();
      }
    }
    const st = Atomics.load(this.ctl, STATE);
    return st === ENDED ? 'ended' : st === FAILED ? 'failed' : 'open';
  }

  /** Whoever ended the stream: why, if it failed. */
  get error(): VmigError | undefined {
    if (Atomics.load(this.ctl, STATE) !== FAILED) return undefined;
    const len = Atomics.load(this.ctl, ERROR_LEN);
    const j = JSON.parse(Buffer.from(this.s.error, 0, len).toString('utf8')) as { code: string; message: string };
    return VmigError.fromJSON(j);
  }

  /**
   * Rule 5 (the owner, once): when this returns no read is in progress and none starts; the
   * fd's handle may be closed.
   */
  close(): void {
    Atomics.compareExchange(this.ctl, STATE, OPEN, CLOSING);
    const deadline = performance.now() + CLOSE_WAIT_MS;
    while (Atomics.compareExchange(this.ctl, ROLE, 0, 1) !== 0 && performance.now() < deadline) Atomics.wait(this.ctl, ROLE, 1, 1);
    Atomics.store(this.ctl, FD, -1);
  }

  /* ------------------------------------------------------------ the role holder's work */

  /**
   * Reads what the socket has (never waits) and places every whole record: true if bytes
   * came. End of stream and failures set STATE (and the owner is woken).
   */
  private readAvailable(fd: number): boolean {
    const ctl = this.ctl;
    let end = ctl[END]!;
    let n: number;
    try {
      n = fs.readSync(fd, this.buf, end, BUF_BYTES - end, null);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EAGAIN') return false;
      this.fail(new VmigError('VMIG_ERR_CHANNEL', `preempt channel read failed: ${(e as Error).message}`, { channel }));
      return false;
    }
    if (n === 0) {
      // The source closes the channel only between records.
      if (ctl[START] !== end) this.fail(new VmigError('VMIG_ERR_PEER_CLOSED', 'preempt channel ended inside a record', { channel }));
      else this.setState(ENDED);
      return false;
    }
    end += n;
    ctl[END] = end;
    try {
      this.parse();
    } catch (e) {
      this.fail(e);
    }
    return true;
  }

  /** Places each whole record in buf[START, END), then moves a partial one to the front. */
  private parse(): void {
    const ctl = this.ctl;
    const buf = this.buf;
    const h = this.head;
    const end = ctl[END]!;
    let pos = ctl[START]!;
    while (decodeRamRecordHead(buf, pos, end, h, channel)) {
      if (h.flags & RAM_SAVE_FLAG_MEM_SIZE) this.bad('a RAM block list on the preempt channel');
      else if (h.flags & (RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_ZERO)) this.place(h, pos + h.headBytes);
      else if (h.flags & RAM_SAVE_FLAG_MULTIFD_FLUSH) this.bad('RAM_SAVE_FLAG_MULTIFD_FLUSH after the postcopy switch');
      else if ((h.flags & RAM_SAVE_FLAG_EOS) === 0) this.bad(`RAM record with flags 0x${h.flags.toString(16)} and nothing to do`);
      pos += h.headBytes + h.bodyBytes;
    }
    if (pos === end) {
      ctl[START] = 0;
      ctl[END] = 0;
    } else if (BUF_BYTES - end < TARGET_PAGE_SIZE + 512) {
      buf.copyWithin(0, pos, end);
      ctl[START] = 0;
      ctl[END] = end - pos;
    } else {
      ctl[START] = pos;
    }
  }

  /** ram_load_postcopy for one record, checked as the main channel's loader checks it. */
  private place(h: RamRecordAt, body: number): void {
    let block: RamBlock | undefined;
    if (h.flags & RAM_SAVE_FLAG_CONTINUE) {
      block = this.ram.blocks[this.ctl[LAST_BLOCK]!];
      if (!block) this.bad('RAM_SAVE_FLAG_CONTINUE with no previous block');
    } else {
      block = this.ram.find(h.idstr!);
      if (!block) this.bad(`unknown RAM block '${h.idstr}'`, 'VMIG_ERR_UNKNOWN_BLOCK');
      this.ctl[LAST_BLOCK] = this.blockIndex.get(block)!;
    }
    if (h.offset > block.usedLength - TARGET_PAGE_SIZE) {
      this.bad(`page offset 0x${h.offset.toString(16)} outside block '${block.idstr}' of ${block.usedLength} bytes`, 'VMIG_ERR_BAD_OFFSET');
    }
    const isPage = (h.flags & RAM_SAVE_FLAG_PAGE) !== 0;
    if (!isPage && this.buf[body] !== 0) this.bad('postcopy zero page record with a non-zero fill byte');
    const offset = h.offset;
    const placed = this.placer.place(this.blockBase[this.blockIndex.get(block)!]! + offset / TARGET_PAGE_SIZE, () => {
      if (isPage) block.writePage(offset / TARGET_PAGE_SIZE, this.buf.subarray(body, body + TARGET_PAGE_SIZE));
      else block.fillPage(offset / TARGET_PAGE_SIZE, 0);
    });
    if (placed) Atomics.add(this.ctl, this.owner ? OWNER_PAGES : VCPU_PAGES, 1);
  }

  private bad(message: string, code: ConstructorParameters<typeof StreamError>[0] = 'VMIG_ERR_STREAM_FORMAT'): never {
    throw new StreamError(code, message, { channel, phase: 'load ram' });
  }

  private fail(e: unknown): void {
    const err = toVmigError(e, 'VMIG_ERR_CHANNEL', { channel });
    let json = Buffer.from(JSON.stringify(err.toJSON()), 'utf8');
    if (json.length > ERROR_BYTES) json = Buffer.from(JSON.stringify({ code: err.code, message: err.message.slice(0, ERROR_BYTES / 2) }), 'utf8');
    Buffer.from(this.s.error).set(json, 0);
    this.ctl[ERROR_LEN] = json.length;
    this.setState(FAILED);
  }

  private setState(st: typeof ENDED | typeof FAILED): void {
    // Only from OPEN: a closing owner keeps CLOSING.
    Atomics.compareExchange(this.ctl, STATE, OPEN, st);
    this.wakeOwner();
  }

  private release(): void {
    Atomics.store(this.ctl, ROLE, 0);
    Atomics.notify(this.ctl, ROLE);
    // Rule 4 (where vCPUs never take the role, waking them would be for nothing).
    if (this.vcpusRead) this.placer.wakeWaiting();
  }

  private wakeOwner(): void {
    Atomics.notify(this.ctl, NAP);
  }
}
