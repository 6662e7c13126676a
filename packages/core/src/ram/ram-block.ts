import { InvalidArgumentError, VmigError } from '../errors.js';
import { AtomicBitmap } from './bitmap.js';

/** QEMU's TARGET_PAGE_BITS / TARGET_PAGE_SIZE for x86: every page here is 4 KiB. */
export const TARGET_PAGE_BITS = 12;
export const TARGET_PAGE_SIZE = 1 << TARGET_PAGE_BITS;
/** idstr travels as u8 length + bytes. */
export const MAX_IDSTR_LENGTH = 255;
/** The largest typed array over a SharedArrayBuffer on Node 20 (and so the largest block today). */
const MAX_VIEW_BYTES = 2 ** 32;
/** One block may be at most this large (Node's SharedArrayBuffer limit is far above). */
export const MAX_BLOCK_BYTES = 64 * 2 ** 30;

/** What a RamBlock is made of, in a form that can be posted to a worker (SABs share). */
export interface RamBlockShared {
  idstr: string;
  usedLength: number;
  host: SharedArrayBuffer;
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
 * A named region of guest RAM (QEMU's RAMBlock): `host` is the memory, in a
 * SharedArrayBuffer shared with vCPU and channel threads; `dirtyLog` has one bit per page,
 * set by vCPUs after they write (see migration/dirty-sync.ts for the ordering rule).
 */
export class RamBlock {
  readonly pages: number;
  readonly host: Uint8Array;
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

  private constructor(
    readonly idstr: string,
    readonly usedLength: number,
    readonly hostSab: SharedArrayBuffer,
    dirtyLogSab: SharedArrayBuffer,
    loadedSab: SharedArrayBuffer,
    arrivedSab: SharedArrayBuffer,
  ) {
    this.pages = usedLength / TARGET_PAGE_SIZE;
    this.host = new Uint8Array(hostSab, 0, usedLength);
    this.dirtyLog = new AtomicBitmap(dirtyLogSab, this.pages);
    this.loaded = new AtomicBitmap(loadedSab, this.pages);
    this.arrived = new AtomicBitmap(arrivedSab, this.pages);
  }

  /**
   * Allocates and pre-faults a block. Fresh memory is expensive to touch on first use
   * (page faults), so it is touched once here and never reallocated.
   */
  static create(idstr: string, usedLength: number, opts: { prefault?: boolean } = {}): RamBlock {
    validateIdstr(idstr);
    validateBlockSize(usedLength);
    if (usedLength > MAX_VIEW_BYTES) {
      // A block is one typed array over one SharedArrayBuffer, and Node 20's stop at 4 GiB.
      throw new VmigError('VMIG_ERR_RAM_LIMIT', `RAM block '${idstr}' of ${usedLength} bytes: blocks above 4 GiB are not supported yet (split the guest into blocks of at most 4G)`);
    }
    const pages = usedLength / TARGET_PAGE_SIZE;
    const block = new RamBlock(
      idstr,
      usedLength,
      new SharedArrayBuffer(usedLength),
      new SharedArrayBuffer(AtomicBitmap.bytesFor(pages)),
      new SharedArrayBuffer(AtomicBitmap.bytesFor(pages)),
      new SharedArrayBuffer(AtomicBitmap.bytesFor(pages)),
    );
    if (opts.prefault !== false) prefault(block.host);
    return block;
  }

  static fromShared(s: RamBlockShared): RamBlock {
    return new RamBlock(s.idstr, s.usedLength, s.host, s.dirtyLog, s.loaded, s.arrived);
  }

  toShared(): RamBlockShared {
    return { idstr: this.idstr, usedLength: this.usedLength, host: this.hostSab, dirtyLog: this.dirtyLog.sab, loaded: this.loaded.sab, arrived: this.arrived.sab };
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
    this.host.set(data, offset);
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
    if (zeroUnlessLoaded && !this.loaded.test(offset / TARGET_PAGE_SIZE)) return;
    if (!isZeroPage(this.host, offset)) this.host.fill(0, offset, offset + TARGET_PAGE_SIZE);
  }

  /** A view of page `page` (no copy). */
  page(page: number): Uint8Array {
    const off = page * TARGET_PAGE_SIZE;
    return this.host.subarray(off, off + TARGET_PAGE_SIZE);
  }
}

const ZERO_PAGE = Buffer.alloc(TARGET_PAGE_SIZE);

/** Whether the page at `offset` of `host` is all zero. */
export function isZeroPage(host: Uint8Array, offset: number): boolean {
  return ZERO_PAGE.compare(host, offset, offset + TARGET_PAGE_SIZE) === 0;
}

function gib(bytes: number): string {
  return `${(bytes / 2 ** 30).toFixed(bytes < 2 ** 30 ? 3 : 1)} GiB`;
}

/** Writes one word per page so the kernel maps every page now, not during migration. */
function prefault(host: Uint8Array): void {
  const words = new Int32Array(host.buffer, host.byteOffset, Math.floor(host.byteLength / 4));
  for (let i = 0; i < words.length; i += TARGET_PAGE_SIZE >>> 2) words[i] = 0;
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
  static create(blockSpecs: readonly ({ idstr: string; size: number } | { name: string; size: number })[], opts: { prefault?: boolean } = {}): GuestRam {
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
