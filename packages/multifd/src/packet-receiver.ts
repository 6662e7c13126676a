/**
 * The parser of one multifd recv channel (QEMU's multifd_recv_thread + the nocomp recv
 * method), written so the socket reads straight into guest RAM: at every moment it names
 * the bytes the next read should fill (`target()`), and the transport reports how many
 * landed (`landed()`). A packet header goes into a small header buffer; once it is decoded
 * and every count and offset checked, the packet's pages are read directly into their
 * places in the RAM block, one run of contiguous pages at a time, and a read never spans
 * more than the current run, so no byte is ever written outside a page the header named.
 * Compressed payloads go into a payload buffer and are decompressed into RAM.
 *
 * When the parser is waiting (guest RAM not created yet, a decompression running) the
 * transport's reads land in a staging buffer instead, and those bytes go through the same
 * parser by copy once it can take them: direct placement is only the fast path, never a
 * condition for correctness. Bytes read before the channel was handed over (`feed`) take
 * the copy path too.
 *
 * Nothing here knows sockets or threads; recv-channel.worker.ts wires it to a socket.
 */
import { type AtomicBitmap, copyBytes, type GuestRam, type RamBlock, StreamError, TARGET_PAGE_SIZE } from '@vmig/core';
import { compressionByFlags } from './compress/registry.js';
import type { MultifdRecvDecompressor } from './compress/method.js';
import {
  checkMultifdExpected,
  checkMultifdOffsets,
  decodeMultifdPacketHeader,
  type MultifdPacketHeader,
  MULTIFD_FLAG_SYNC,
  MULTIFD_MAX_PAYLOAD,
  MULTIFD_PACKET_HEADER_SIZE,
  MULTIFD_PACKET_SIZE,
} from './wire/multifd-wire.js';

export interface PacketReceiverHooks {
  /** Guest RAM, or undefined while it does not exist yet (then `ramReady` waits for it). */
  ram(): GuestRam | undefined;
  ramReady(): Promise<void>;
  /** Before the first byte of a packet's pages is written (the postcopy seal may refuse). */
  beginPages(h: MultifdPacketHeader): void;
  /** After the last byte of that packet's pages is in place (also when the packet failed). */
  endPages(): void;
  /** A SYNC packet, after every page before it is in place; returns once released. */
  sync(): void;
  /** A wait (RAM, decompression) is over: reading may go on. */
  resume(): void;
  /** The first error; the parser is dead afterwards. */
  fail(e: unknown): void;
  /**
   * What this side agreed on with the source, checked on every packet: the compression bits
   * a packet with pages carries (--multifd-compression), and whether the stream speaks QEMU
   * 7.2's dialect, in which the word at offset 32 is unused (not zero_pages). Unchecked if
   * absent.
   */
  expected?(): { compressionFlag: number; legacy: boolean };
}

export interface ReceivedTotals {
  normal: number;
  zero: number;
  bytes: number;
}

const STAGING_SIZE = 64 * 1024;

type Phase = 'header' | 'pages' | 'payload' | 'waiting' | 'failed';

export class PacketReceiver {
  readonly totals: ReceivedTotals = { normal: 0, zero: 0, bytes: 0 };
  private phase: Phase = 'header';
  /** Bytes of the current target filled so far. */
  private filled = 0;
  private readonly header = new Uint8Array(MULTIFD_PACKET_HEADER_SIZE);
  private readonly staging = new Uint8Array(STAGING_SIZE);
  private payload: Uint8Array | undefined;
  private pages: Uint8Array | undefined;
  private readonly decompressors = new Map<number, MultifdRecvDecompressor>();
  /** Bytes that arrived while the parser was waiting, in order (copies, not views). */
  private readonly parked: Uint8Array[] = [];
  // The packet being received.
  private h: MultifdPacketHeader | undefined;
  private block: RamBlock | undefined;
  private payloadLen = 0;
  /** The packet's method (compressed packets). */
  private decompressor: MultifdRecvDecompressor | undefined;
  /** Runs of contiguous normal pages as [start, end) byte offsets in the block. */
  private runs: number[] = [];
  private run = 0;
  private applying = false;

  /** `channel`: the name errors carry (a function where it is learned late: TLS channels). */
  constructor(
    private readonly hooks: PacketReceiverHooks,
    channel: string | (() => string),
    private readonly zeroUnlessLoaded: boolean,
  ) {
    this.channelName = typeof channel === 'string' ? () => channel : channel;
  }

  private readonly channelName: () => string;

  private get channel(): string {
    return this.channelName();
  }

  /** Waiting for an async step (or dead): a transport that feeds by copy should pause. */
  get paused(): boolean {
    return this.stopped;
  }

  /** True between packets: the only place a channel may end cleanly. */
  get atPacketBoundary(): boolean {
    return this.phase === 'header' && this.filled === 0 && this.parked.length === 0;
  }

  /** Where the next read should land (never empty). */
  target(): Uint8Array {
    if (this.stopped || this.parked.length > 0) return this.staging;
    return this.directTarget();
  }

  private directTarget(): Uint8Array {
    switch (this.phase) {
      case 'header':
        return this.header.subarray(this.filled);
      case 'pages': {
        const start = this.runs[this.run]! + this.filled;
        return this.block!.bytes(start, this.runs[this.run + 1]! - start);
      }
      case 'payload':
        return this.payload!.subarray(this.filled, this.payloadLen);
      default:
        throw new Error(`no direct target while ${this.phase}`);
    }
  }

  /**
   * `n` bytes landed in `buf`, the buffer target() returned for this read. Returns false if
   * the transport should stop reading until `hooks.resume()`.
   */
  landed(buf: Uint8Array, n: number): boolean {
    if (this.phase === 'failed') return false;
    try {
      if (buf === this.staging) this.copyIn(this.staging.subarray(0, n));
      else this.advance(n);
    } catch (e) {
      this.die(e);
    }
    return !this.stopped;
  }

  /** Waiting for an async step, or dead: bytes cannot go to a direct target now. */
  private get stopped(): boolean {
    return this.phase === 'waiting' || this.phase === 'failed';
  }

  /** Bytes read before the channel was handed over: copied through the parser. */
  feed(bytes: Uint8Array): void {
    try {
      this.copyIn(bytes);
    } catch (e) {
      this.die(e);
    }
  }

  private copyIn(bytes: Uint8Array): void {
    let pos = 0;
    while (pos < bytes.length) {
      if (this.stopped || this.parked.length > 0) {
        // Behind bytes already waiting, in order; copied, as `bytes` may be reused.
        if (this.phase !== 'failed') this.parked.push(bytes.slice(pos));
        return;
      }
      const t = this.directTarget();
      const k = Math.min(t.length, bytes.length - pos);
      copyBytes(t, 0, bytes.subarray(pos, pos + k));
      pos += k;
      this.advance(k);
    }
  }

  private advance(n: number): void {
    this.filled += n;
    this.totals.bytes += n;
    switch (this.phase) {
      case 'header':
        if (this.filled === MULTIFD_PACKET_HEADER_SIZE) this.headerDone();
        break;
      case 'pages':
        if (this.runs[this.run]! + this.filled === this.runs[this.run + 1]) {
          this.run += 2;
          this.filled = 0;
          if (this.run >= this.runs.length) this.packetDone();
        }
        break;
      case 'payload':
        if (this.filled === this.payloadLen) this.payloadDone();
        break;
      default:
        throw new Error(`bytes landed while ${this.phase}`);
    }
  }

  private headerDone(): void {
    const h = decodeMultifdPacketHeader(this.header, 0, this.channel);
    const expected = this.hooks.expected?.();
    if (expected) checkMultifdExpected(h, expected.compressionFlag, expected.legacy, this.channel);
    this.h = h;
    this.filled = 0;
    if (h.normalPages + h.zeroPages === 0) {
      this.packetDone();
      return;
    }
    const ram = this.hooks.ram();
    if (!ram) {
      // RAM is built from the main stream's block list, which may come after this packet.
      this.wait(this.hooks.ramReady().then(() => this.startPages()));
      return;
    }
    this.startPages();
  }

  /** Checks the packet against its block, then points the reads at the pages. */
  private startPages(): void {
    const h = this.h!;
    const block = this.hooks.ram()!.find(h.ramblock);
    if (!block) throw new StreamError('VMIG_ERR_UNKNOWN_BLOCK', `packet ${h.packetNum}: unknown RAM block '${h.ramblock}'`, { channel: this.channel });
    checkMultifdOffsets(h, block.usedLength, this.channel);
    const method = compressionByFlags(h.flags, this.channel);
    this.block = block;
    this.hooks.beginPages(h);
    this.applying = true;
    if (h.normalPages === 0) {
      this.packetDone();
    } else if (method) {
      if (h.nextPacketSize > MULTIFD_MAX_PAYLOAD) throw new StreamError('VMIG_ERR_MULTIFD_PACKET', `packet ${h.packetNum}: payload of ${h.nextPacketSize} bytes`, { channel: this.channel });
      let d = this.decompressors.get(method.flag);
      if (!d) this.decompressors.set(method.flag, (d = method.createReceiver()));
      this.decompressor = d;
      this.payload ??= new Uint8Array(MULTIFD_MAX_PAYLOAD);
      if (h.nextPacketSize === 0) throw new StreamError('VMIG_ERR_MULTIFD_PACKET', `packet ${h.packetNum}: compressed pages without a payload`, { channel: this.channel });
      this.payloadLen = h.nextPacketSize;
      this.phase = 'payload';
    } else {
      // nocomp: normal_pages raw pages (next_packet_size is not trusted: QEMU 7.2 leaves it stale).
      // Runs of contiguous pages are read straight into RAM; a run ends at a segment edge.
      const runs: number[] = [];
      for (let i = 0; i < h.normalPages; i++) {
        const off = h.offsets[i]!;
        if (runs.length > 0 && runs[runs.length - 1] === off && block.segmentEnd(off - 1) > off) runs[runs.length - 1] = off + TARGET_PAGE_SIZE;
        else runs.push(off, off + TARGET_PAGE_SIZE);
      }
      this.runs = runs;
      this.run = 0;
      this.phase = 'pages';
    }
  }

  private payloadDone(): void {
    const h = this.h!;
    const d = this.decompressor!;
    this.pages ??= new Uint8Array(MULTIFD_PACKET_SIZE);
    const out = Buffer.from(this.pages.buffer, 0, h.normalPages * TARGET_PAGE_SIZE);
    const payload = Buffer.from(this.payload!.buffer, 0, this.payloadLen);
    this.wait(
      d.decompress(payload, out).then(() => {
        const block = this.block!;
        for (let i = 0; i < h.normalPages; i++) block.writePage(h.offsets[i]! / TARGET_PAGE_SIZE, out.subarray(i * TARGET_PAGE_SIZE, (i + 1) * TARGET_PAGE_SIZE));
        this.packetDone();
      }),
    );
  }

  /** Every page of the packet is in place: mark them loaded, apply zero pages, then SYNC. */
  private packetDone(): void {
    const h = this.h!;
    this.phase = 'header';
    this.filled = 0;
    if (this.applying) {
      const block = this.block!;
      setPageRuns(block.loaded, h.offsets, 0, h.normalPages);
      for (let i = h.normalPages; i < h.offsets.length; i++) block.loadZeroPage(h.offsets[i]!, this.zeroUnlessLoaded);
      setPageRuns(block.arrived, h.offsets, 0, h.offsets.length);
      this.totals.normal += h.normalPages;
      this.totals.zero += h.zeroPages;
      this.applying = false;
      this.hooks.endPages();
    }
    if (h.flags & MULTIFD_FLAG_SYNC) this.hooks.sync();
  }

  /** Parks the parser on `step`; reads go to staging until it is done. */
  private wait(step: Promise<void>): void {
    this.phase = 'waiting';
    step.then(
      () => {
        // The step (startPages, or packetDone after a decompression) set the next phase.
        this.drainParked();
        if (!this.stopped) this.hooks.resume();
      },
      (e: unknown) => this.die(e),
    );
  }

  private drainParked(): void {
    try {
      while (this.parked.length > 0 && !this.stopped) {
        const bytes = this.parked[0]!;
        let pos = 0;
        while (pos < bytes.length && !this.stopped) {
          const t = this.directTarget();
          const k = Math.min(t.length, bytes.length - pos);
          copyBytes(t, 0, bytes.subarray(pos, pos + k));
          pos += k;
          this.advance(k);
        }
        if (pos < bytes.length) this.parked[0] = bytes.subarray(pos);
        else this.parked.shift();
      }
    } catch (e) {
      this.die(e);
    }
  }

  private die(e: unknown): void {
    if (this.phase === 'failed') return;
    this.phase = 'failed';
    this.parked.length = 0;
    if (this.applying) {
      this.applying = false;
      this.hooks.endPages();
    }
    this.hooks.fail(e);
  }
}

/** Sets the bits of the pages at byte offsets `offsets[from..to)`, a run of contiguous pages at a time. */
function setPageRuns(bitmap: AtomicBitmap, offsets: Float64Array, from: number, to: number): void {
  for (let i = from; i < to; ) {
    const first = offsets[i]! / TARGET_PAGE_SIZE;
    let j = i + 1;
    while (j < to && offsets[j] === offsets[j - 1]! + TARGET_PAGE_SIZE) j++;
    bitmap.setRange(first, j - i);
    i = j;
  }
}
