import { InvalidArgumentError, VmigError } from '../errors.js';
import { AtomicBitmap } from './bitmap.js';
import { copyBytes } from './copy-bytes.js';

/** QEMU's TARGET_PAGE_BITS / TARGET_PAGE_SIZE for x86: every page here is 4 KiB. */
export const TARGET_PAGE_BITS = 12;
export const TARGET_PAGE_SIZE = 1 << TARGET_PAGE_BITS;
/** idstr travels as u8 length + bytes. */
export const MAX_IDSTR_LENGTH = 255;
/** One block may be at most this large; a guest, MAX_RAM_BLOCKS (wire/constants.ts) of them. */
export const MAX_BLOCK_BYTES = 64 * 2 ** 30;
/**
 * A block's memory is a list of SharedArrayBuffers of this size (the last may be shorter):
 * a typed array on Node 20 stops at 4 GiB, and fresh memory is cheaper to hand out in pieces.
 */
export const RAM_SEGMENT_BYTES = 2 ** 30;
/** Segments are whole MiB (RAM digests cover 1 MiB ranges that never cross one). */
const SEGMENT_UNIT = 2 ** 20;

/**
 * The segment size for blocks made without one: RAM_SEGMENT_BYTES, or VMIG_RAM_SEGMENT_BYTES
 * from the environment (a testing knob: small segments put segment edges into small guests).
 */
export function defaultSegmentBytes(): number {
  const env = typeof process !== 'undefined' ? process.env['VMIG_RAM_SEGMENT_BYTES'] : undefined;
  if (env === undefined || env === '') return RAM_SEGMENT_BYTES;
  const n = Number(env);
  validateSegmentBytes(n);
  return n;
}

export function validateSegmentBytes(n: number): void {
  if (!Number.isSafeInteger(n) || n < SEGMENT_UNIT || n % SEGMENT_UNIT !== 0 || n > RAM_SEGMENT_BYTES * 2) {
    throw new InvalidArgumentError(`RAM segment size must be a multiple of 1 MiB from 1 MiB to 2 GiB, got ${n}`);
  }
}

/** What a RamBlock is made of, in a form that can be posted to a worker (SABs share). */
export interface RamBlockShared {
  idstr: string;
  usedLength: number;
  /** The memory: segments of `segmentBytes` (the last may be shorter). */
  segments: SharedArrayBuffer[];
  segmentBytes: number;
  dirtyLog: SharedArrayBuffer;
  loaded: SharedArrayBuffer;
  arrived: SharedArrayBuffer;
}

export function validateIdstr(idstr: string): void {
  const len = Buffer.byteLength(idstr);
  if (len === 0 || len > MAX_IDSTR_LENGTH) {
    throw new InvalidArgumentError(`RAM block name must be 1..${MAX_IDSTR_LENGTH} bytes, got ${len}`);
  }
}

export function validateBlockSize(size: number): void {
  if (!Number.isSafeInteger(size) || size <= 0 || size % TARGET_PAGE_SIZE !== 0 || size > MAX_BLOCK_BYTES) {
    throw new InvalidArgumentError(
      `RAM block size must be a positive multiple of ${TARGET_PAGE_SIZE} up to ${MAX_BLOCK_BYTES}, got ${size}`,
    );
  }
}

/**
 * A named region of guest RAM (QEMU's RAMBlock). Its memory is a list of segments
 * (SharedArrayBuffers of `segmentBytes`, the last one shorter if need be) shared with the vCPU
 * and channel threads: every byte range that code touches at once lies inside one segment (a
 * page always does; runs of pages are cut at segment edges, see `segmentEnd`). `dirtyLog` has
 * one bit per page, set by vCPUs after they write (see migration/dirty-sync.ts for the
 * ordering rule).
 */
export class RamBlock {
  readonly pages: number;
  /** A view of each segment (Buffer: compare and copy without another wrapper). */
  readonly segments: readonly Buffer[];
  readonly dirtyLog: AtomicBitmap;
  /**
   * Destination: pages a migration load wrote (QEMU's receivedmap, for precopy). Loaders
   * write the page, then set its bit (Atomics.or); loaders on other threads are ordered
   * against it by the multifd barrier.
   */
  readonly loaded: AtomicBitmap;
  /**
   * Destination: pages that arrived at least once, as data or as a zero page, on any
   * channel. A precopy stream sends every page in its first pass, so a load that ends with
   * a clear bit here is missing pages (a multifd channel this side never read). Set after
   * the page is in place (Atomics.or); read once the last barrier is passed.
   */
  readonly arrived: AtomicBitmap;
  /** Pages per segment. */
  private readonly segmentPages: number;
  /** The segments as plain Uint8Arrays: their subarray() is cheaper than a Buffer's (a page at a time, on hot paths). */
  private readonly views: readonly Uint8Array[];

  private constructor(
    readonly idstr: string,
    readonly usedLength: number,
    readonly segmentBytes: number,
    readonly segmentSabs: readonly SharedArrayBuffer[],
    dirtyLogSab: SharedArrayBuffer,
    loadedSab: SharedArrayBuffer,
    arrivedSab: SharedArrayBuffer,
  ) {
    this.pages = usedLength / TARGET_PAGE_SIZE;
    this.segmentPages = segmentBytes / TARGET_PAGE_SIZE;
    this.segments = segmentSabs.map((sab, i) => Buffer.from(sab, 0, Math.min(segmentBytes, usedLength - i * segmentBytes)));
    this.views = this.segments.map((s) => new Uint8Array(s.buffer, 0, s.length));
    this.dirtyLog = new AtomicBitmap(dirtyLogSab, this.pages);
    this.loaded = new AtomicBitmap(loadedSab, this.pages);
    this.arrived = new AtomicBitmap(arrivedSab, this.pages);
  }

  /**
   * Allocates a block and, unless `prefault` is false, touches every page of it now: fresh
   * memory is expensive to touch on first use (page faults), so it is touched once here and
   * never reallocated.
   */
  static create(idstr: string, usedLength: number, opts: { prefault?: boolean; segmentBytes?: number } = {}): RamBlock {
    validateIdstr(idstr);
    validateBlockSize(usedLength);
    const segmentBytes = opts.segmentBytes ?? defaultSegmentBytes();
    validateSegmentBytes(segmentBytes);
    const pages = usedLength / TARGET_PAGE_SIZE;
    const sabs: SharedArrayBuffer[] = [];
    for (let off = 0; off < usedLength; off += segmentBytes) sabs.push(new SharedArrayBuffer(Math.min(segmentBytes, usedLength - off)));
    const block = new RamBlock(
      idstr,
      usedLength,
      segmentBytes,
      sabs,
      new SharedArrayBuffer(AtomicBitmap.bytesFor(pages)),
      new SharedArrayBuffer(AtomicBitmap.bytesFor(pages)),
      new SharedArrayBuffer(AtomicBitmap.bytesFor(pages)),
    );
    if (opts.prefault !== false) for (const seg of block.segments) prefault(seg);
    return block;
  }

  static fromShared(s: RamBlockShared): RamBlock {
    return new RamBlock(s.idstr, s.usedLength, s.segmentBytes, s.segments, s.dirtyLog, s.loaded, s.arrived);
  }

  toShared(): RamBlockShared {
    return {
      idstr: this.idstr,
      usedLength: this.usedLength,
      segments: [...this.segmentSabs],
      segmentBytes: this.segmentBytes,
      dirtyLog: this.dirtyLog.sab,
      loaded: this.loaded.sab,
      arrived: this.arrived.sab,
    };
  }

  /**
   * The whole block as one view, for a block of one segment (1 GiB or less by default). A
   * larger block has no single view: use page(), bytes(), read() and write().
   */
  get host(): Buffer {
    if (this.segments.length !== 1) {
      throw new VmigError('VMIG_ERR_RAM_LIMIT', `RAM block '${this.idstr}' of ${this.usedLength} bytes is in ${this.segments.length} segments: use page(), bytes(), read() or write() instead of host`);
    }
    return this.segments[0]!;
  }

  /** The first offset past `offset`'s segment (a run that starts at `offset` must end there at the latest). */
  segmentEnd(offset: number): number {
    return Math.min(this.usedLength, (Math.floor(offset / this.segmentBytes) + 1) * this.segmentBytes);
  }

  /** `length` bytes at `offset` as one view (no copy); the range must lie inside one segment. */
  bytes(offset: number, length: number): Buffer {
    const seg = Math.floor(offset / this.segmentBytes);
    const inner = offset - seg * this.segmentBytes;
    const s = this.segments[seg];
    if (!s || offset < 0 || inner + length > s.length) throw new RangeError(`${length} bytes at ${offset} of block '${this.idstr}' are not inside one segment`);
    return s.subarray(inner, inner + length);
  }

  /** A view of page `page` (no copy). */
  page(page: number): Uint8Array {
    const seg = Math.floor(page / this.segmentPages);
    const inner = (page - seg * this.segmentPages) * TARGET_PAGE_SIZE;
    return this.views[seg]!.subarray(inner, inner + TARGET_PAGE_SIZE);
  }

  /** Copies one page's bytes (`data`, a page long) into page `page`, without a view of it. */
  writePage(page: number, data: Uint8Array): void {
    const seg = Math.floor(page / this.segmentPages);
    copyBytes(this.views[seg]!, (page - seg * this.segmentPages) * TARGET_PAGE_SIZE, data);
  }

  /** Fills page `page` with `byte`. */
  fillPage(page: number, byte: number): void {
    const seg = Math.floor(page / this.segmentPages);
    const inner = (page - seg * this.segmentPages) * TARGET_PAGE_SIZE;
    this.views[seg]!.fill(byte, inner, inner + TARGET_PAGE_SIZE);
  }

  /** Whether page `page` is all zero. */
  isZeroPage(page: number): boolean {
    const seg = Math.floor(page / this.segmentPages);
    const inner = (page - seg * this.segmentPages) * TARGET_PAGE_SIZE;
    return isZeroPage(this.segments[seg]!, inner);
  }

  /** A copy of `length` bytes at `offset`, wherever segment edges fall. */
  read(offset: number, length: number): Buffer {
    const out = Buffer.allocUnsafe(length);
    for (let done = 0; done < length; ) {
      const n = Math.min(length - done, this.segmentEnd(offset + done) - (offset + done));
      copyBytes(out, done, this.bytes(offset + done, n));
      done += n;
    }
    return out;
  }

  /** Copies `data` to `offset`, wherever segment edges fall (no dirty-log bit: see writeGuest). */
  write(offset: number, data: Uint8Array): void {
    if (!Number.isInteger(offset) || offset < 0 || offset + data.length > this.usedLength) {
      throw new RangeError(`write of ${data.length} bytes at ${offset} outside block '${this.idstr}' (${this.usedLength} bytes)`);
    }
    for (let done = 0; done < data.length; ) {
      const n = Math.min(data.length - done, this.segmentEnd(offset + done) - (offset + done));
      copyBytes(this.bytes(offset + done, n), 0, data.subarray(done, done + n));
      done += n;
    }
  }

  /**
   * A write from the migration thread on the guest's behalf (a device flushing cached state
   * into RAM). Same order as a vCPU write (dirty-sync.ts): the data first, then the dirty-log
   * bit of every page it touched, so the next bitmap sync resends them.
   */
  writeGuest(offset: number, data: Uint8Array): void {
    if (!Number.isInteger(offset) || offset < 0 || offset + data.length > this.usedLength) {
      throw new RangeError(`write of ${data.length} bytes at ${offset} outside block '${this.idstr}' (${this.usedLength} bytes)`);
    }
    if (data.length === 0) return;
    this.write(offset, data);
    this.markDirty(offset, data.length);
  }

  /**
   * Marks `length` bytes at `offset` written, so that the next bitmap sync sends their pages
   * again. Any thread, AFTER the write (the ordering rule of migration/dirty-sync.ts: the
   * sync clears the bit before it reads the page, so a write marked after it is never lost).
   */
  markDirty(offset: number, length: number): void {
    if (!Number.isInteger(offset) || !Number.isInteger(length) || offset < 0 || length < 0 || offset + length > this.usedLength) {
      throw new RangeError(`range of ${length} bytes at ${offset} outside block '${this.idstr}' (${this.usedLength} bytes)`);
    }
    if (length === 0) return;
    const last = Math.floor((offset + length - 1) / TARGET_PAGE_SIZE);
    for (let p = Math.floor(offset / TARGET_PAGE_SIZE); p <= last; p++) this.dirtyLog.set(p);
  }

  /**
   * A load's zero page at `offset` (RAM_SAVE_FLAG_ZERO, or a multifd packet's zero list).
   * `zeroUnlessLoaded`: the loader knows every page no load wrote is zero (RAM it created
   * fresh for this migration), so such a page needs no work at all, as in QEMU's
   * multifd_recv_zero_page_process. Otherwise the page is read and zeroed if it is not
   * (reading is cheaper than writing).
   */
  loadZeroPage(offset: number, zeroUnlessLoaded: boolean): void {
    const p = offset / TARGET_PAGE_SIZE;
    if (zeroUnlessLoaded && !this.loaded.test(p)) return;
    if (!this.isZeroPage(p)) this.fillPage(p, 0);
  }
}

const ZERO_PAGE = Buffer.alloc(TARGET_PAGE_SIZE);

/**
 * Whether the page at `offset` of `host` is all zero. Like QEMU's buffer_is_zero, a few
 * bytes are looked at first: a page with data almost always has one of them set, and then
 * it costs no call into native code (a page of random data: a third of the time it took).
 */
export function isZeroPage(host: Uint8Array, offset: number): boolean {
  if (!mayBeZero(host, offset)) return false;
  return ZERO_PAGE.compare(host, offset, offset + TARGET_PAGE_SIZE) === 0;
}

/** False if the page at `offset` certainly has data (its first, middle or last byte is set). */
export function mayBeZero(host: Uint8Array, offset: number): boolean {
  return (host[offset]! | host[offset + TARGET_PAGE_SIZE / 2]! | host[offset + TARGET_PAGE_SIZE - 1]!) === 0;
}

function gib(bytes: number): string {
  return `${(bytes / 2 ** 30).toFixed(bytes < 2 ** 30 ? 3 : 1)} GiB`;
}

/** Writes one byte per page so the kernel maps every page now, not during migration. */
function prefault(segment: Uint8Array): void {
  for (let off = 0; off < segment.length; off += TARGET_PAGE_SIZE) segment[off] = 0;
}

/** The guest's RAM: its blocks, in registration order (the order they travel in). */
export class GuestRam {
  private readonly byName = new Map<string, RamBlock>();

  constructor(readonly blocks: readonly RamBlock[]) {
    for (const b of blocks) {
      if (this.byName.has(b.idstr)) throw new InvalidArgumentError(`duplicate RAM block name '${b.idstr}'`);
      this.byName.set(b.idstr, b);
    }
  }

  /**
   * Allocates the blocks (zero, pre-faulted unless `prefault: false`). A block is named by
   * `idstr` (QEMU's word) or `name`; its size is a multiple of 4 KiB.
   */
  static create(blockSpecs: readonly ({ idstr: string; size: number } | { name: string; size: number })[], opts: { prefault?: boolean; segmentBytes?: number } = {}): GuestRam {
    if (blockSpecs.length === 0) throw new InvalidArgumentError('guest RAM needs at least one block');
    const specs = blockSpecs.map((b) => ({ idstr: 'idstr' in b ? b.idstr : b.name, size: b.size }));
    const names = new Set<string>();
    for (const s of specs) {
      validateIdstr(s.idstr);
      validateBlockSize(s.size);
      if (names.has(s.idstr)) throw new InvalidArgumentError(`duplicate RAM block name '${s.idstr}'`);
      names.add(s.idstr);
    }
    return new GuestRam(specs.map((s) => RamBlock.create(s.idstr, s.size, opts)));
  }

  /**
   * Guest RAM as a stream's block list declares it (a destination or a restore without its
   * own RAM): refused with VMIG_ERR_RAM_LIMIT above `maxBytes`, before anything is allocated,
   * and not pre-faulted (zero pages never touch a fresh page; loaders fault in what they
   * write, in parallel).
   */
  static fromStream(blocks: readonly { idstr: string; usedLength: number }[], maxBytes: number): GuestRam {
    const total = blocks.reduce((n, b) => n + b.usedLength, 0);
    const huge = blocks.find((b) => b.usedLength > MAX_BLOCK_BYTES);
    if (huge) {
      throw new VmigError('VMIG_ERR_RAM_LIMIT', `the stream declares RAM block '${huge.idstr}' of ${gib(huge.usedLength)}, more than a block may hold (${gib(MAX_BLOCK_BYTES)})`, { channel: 'main', phase: 'load' });
    }
    if (total > maxBytes) {
      throw new VmigError('VMIG_ERR_RAM_LIMIT', `the stream declares ${gib(total)} of guest RAM in ${blocks.length} block(s), more than --max-ram ${gib(maxBytes)}`, {
        channel: 'main',
        phase: 'load',
      });
    }
    return GuestRam.create(
      blocks.map((b) => ({ idstr: b.idstr, size: b.usedLength })),
      { prefault: false },
    );
  }

  static fromShared(shared: readonly RamBlockShared[]): GuestRam {
    return new GuestRam(shared.map((s) => RamBlock.fromShared(s)));
  }

  /** The same RAM in another thread: `GuestRam.attach(ram.share())` there (no copy). */
  static attach(shared: readonly RamBlockShared[]): GuestRam {
    return GuestRam.fromShared(shared);
  }

  toShared(): RamBlockShared[] {
    return this.blocks.map((b) => b.toShared());
  }

  /** What to post to a worker thread (SharedArrayBuffers: the memory, not a copy). */
  share(): RamBlockShared[] {
    return this.toShared();
  }

  /** The block named `name`; throws if there is none. */
  block(name: string): RamBlock {
    const b = this.byName.get(name);
    if (!b) throw new InvalidArgumentError(`no RAM block named '${name}' (blocks: ${[...this.byName.keys()].join(', ')})`);
    return b;
  }

  /**
   * A global page index (pages of all blocks, in block order) as [block index, page in
   * block]. Throws past the end.
   */
  locate(globalPage: number): [number, number] {
    let p = globalPage;
    for (let b = 0; b < this.blocks.length; b++) {
      const n = this.blocks[b]!.pages;
      if (p < n) return [b, p];
      p -= n;
    }
    throw new RangeError(`page ${globalPage} is past the end of guest RAM (${this.totalPages} pages)`);
  }

  find(idstr: string): RamBlock | undefined {
    return this.byName.get(idstr);
  }

  get totalBytes(): number {
    return this.blocks.reduce((n, b) => n + b.usedLength, 0);
  }

  get totalPages(): number {
    return this.totalBytes / TARGET_PAGE_SIZE;
  }

  /** Pages of every block that never arrived (RamBlock.arrived), as [block, count] pairs. */
  missingPages(): { idstr: string; missing: number }[] {
    return this.blocks.map((b) => ({ idstr: b.idstr, missing: b.pages - b.arrived.count() })).filter((m) => m.missing > 0);
  }
}
