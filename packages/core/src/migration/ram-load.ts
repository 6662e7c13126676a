/**
 * Destination side of the "ram" section (QEMU's ram_load_precopy): applies RAM records
 * from the main stream to guest RAM. Every block name, offset and length read from the
 * wire is checked before anything is written, so a hostile stream can never write outside
 * a RAM block.
 */
import { StreamError } from '../errors.js';
import type { StreamSource } from '../io.js';
import { GuestRam, RamBlock, TARGET_PAGE_SIZE, validateBlockSize } from '../ram/ram-block.js';
import {
  MAX_RAM_BLOCKS,
  RAM_SAVE_FLAG_CONTINUE,
  RAM_SAVE_FLAG_EOS,
  RAM_SAVE_FLAG_MEM_SIZE,
  RAM_SAVE_FLAG_MULTIFD_FLUSH,
  RAM_SAVE_FLAG_PAGE,
  RAM_SAVE_FLAG_ZERO,
} from '../wire/constants.js';
import type { PostcopyPlacing } from '../postcopy/page-placer.js';
import { getU64, getU8, RAM_RECORD_FLAGS_KNOWN, readCountedString, splitRamAddr, takeCountedString } from '../wire/main-stream.js';

export interface RamBlockSpec {
  idstr: string;
  usedLength: number;
}

export interface RamLoadOptions {
  /** RAM given up front (must match the stream's block list), or undefined to create it. */
  ram?: GuestRam | undefined;
  /** Creates RAM from the stream's block list when none was given. */
  createRam: (blocks: readonly RamBlockSpec[]) => GuestRam;
  /**
   * This side reads multifd channels: the load loop's half of their barrier, and where the
   * dialect read off the stream is published (multifd-recv.ts). Without it, a stream that
   * syncs multifd is refused.
   */
  multifd?: MultifdBarrier | undefined;
  /**
   * The stream must speak QEMU 7.2's dialect (incoming --multifd-flush-after-each-section);
   * without it the dialect is read from the stream (MultifdDialect).
   */
  expectLegacyDialect?: boolean | undefined;
  /**
   * Guest RAM is all zero but for what loads write (this side created it fresh): zero pages
   * for pages never loaded need no work (RamBlock.loadZeroPage).
   */
  zeroUnlessLoaded?: boolean | undefined;
  /** Called once guest RAM exists (after MEM_SIZE). */
  onRamReady?: (ram: GuestRam) => void;
  /**
   * Postcopy: once it is `placing` (after LISTEN), pages go through the received map and
   * multifd markers mean nothing (no page travels on multifd after the switch).
   */
  postcopy?: PostcopyPlacing | undefined;
  channel?: string;
}

/** The load loop's half of the multifd barrier. */
export interface MultifdBarrier {
  /** Waits for every channel's SYNC, then releases them all. */
  sync(): Promise<void>;
  /** The stream's dialect, known before the first sync releases any channel. */
  setDialect(legacy: boolean): void;
}

/**
 * Where a stream puts the multifd barrier, read off the stream itself: a modern source
 * writes RAM_SAVE_FLAG_MULTIFD_FLUSH in its setup section, before the setup EOS (QEMU >= 8.0,
 * and vmig); QEMU 7.2 never writes it and syncs at every EOS instead. So the first of the
 * two markers decides, and a stream that later mixes them is refused.
 */
export class MultifdDialect {
  legacy: boolean | undefined;

  constructor(
    private readonly barrier: MultifdBarrier | undefined,
    private readonly expectLegacy: boolean,
    private readonly channel: string,
  ) {}

  /** RAM_SAVE_FLAG_MULTIFD_FLUSH: a barrier in the modern dialect. */
  async onFlush(): Promise<void> {
    if (!this.barrier) {
      throw new StreamError('VMIG_ERR_MULTIFD_CHANNELS', 'the stream uses multifd (RAM_SAVE_FLAG_MULTIFD_FLUSH) but this side was started without --multifd-channels', { channel: this.channel });
    }
    if (this.legacy === true) throw this.mixed();
    if (this.legacy === undefined) this.decide(false);
    await this.barrier.sync();
  }

  /** RAM_SAVE_FLAG_EOS: a barrier in QEMU 7.2's dialect; the first one without a flush before it decides that dialect. */
  async onEos(): Promise<void> {
    if (!this.barrier) return;
    if (this.legacy === undefined) this.decide(true);
    if (this.legacy) await this.barrier.sync();
  }

  private decide(legacy: boolean): void {
    if (this.expectLegacy && !legacy) {
      throw new StreamError(
        'VMIG_ERR_MULTIFD_DIALECT',
        'the source syncs multifd with RAM_SAVE_FLAG_MULTIFD_FLUSH, but this side was started with --multifd-flush-after-each-section (QEMU 7.2\'s dialect): drop the flag here, or give it to the source too',
        { channel: this.channel },
      );
    }
    this.legacy = legacy;
    this.barrier!.setDialect(legacy);
  }

  private mixed(): StreamError {
    return new StreamError('VMIG_ERR_MULTIFD_DIALECT', 'RAM_SAVE_FLAG_MULTIFD_FLUSH in a stream that synced multifd at EOS (QEMU 7.2\'s dialect) so far', { channel: this.channel });
  }
}

export class RamLoadState {
  ram: GuestRam | undefined;
  readonly dialect: MultifdDialect;
  private lastBlock: RamBlock | undefined;
  normalPages = 0;
  zeroPages = 0;
  private readonly channel: string;

  constructor(private readonly opts: RamLoadOptions) {
    this.ram = opts.ram;
    this.channel = opts.channel ?? 'main';
    this.dialect = new MultifdDialect(opts.multifd, opts.expectLegacyDialect === true, this.channel);
  }

  private fail(message: string, code: ConstructorParameters<typeof StreamError>[0] = 'VMIG_ERR_STREAM_FORMAT'): never {
    throw new StreamError(code, message, { channel: this.channel, phase: 'load ram' });
  }

  /** Reads RAM records up to and including the next RAM_SAVE_FLAG_EOS. */
  async loadSectionBody(s: StreamSource): Promise<void> {
    for (;;) {
      if (s.buf.length - s.pos < 8) await s.ensure(8);
      const addr = getU64(s);
      if (!Number.isFinite(addr)) this.fail('RAM record address beyond 2^53');
      const { offset, flags } = splitRamAddr(addr);
      if ((flags & ~RAM_RECORD_FLAGS_KNOWN) !== 0) {
        this.fail(`unknown RAM_SAVE_FLAG bits 0x${(flags & ~RAM_RECORD_FLAGS_KNOWN).toString(16)}`);
      }

      if (flags & RAM_SAVE_FLAG_MEM_SIZE) {
        await this.loadMemSize(s, offset);
        continue;
      }
      if (flags & (RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_ZERO)) {
        // Synchronous unless the block's name is not all here yet: no promise per page.
        const block = flags & RAM_SAVE_FLAG_CONTINUE ? this.continuedBlock() : this.namedBlock(takeCountedString(s) ?? (await readCountedString(s)));
        if (offset > block.usedLength - TARGET_PAGE_SIZE) {
          this.fail(`page offset 0x${offset.toString(16)} outside block '${block.idstr}' of ${block.usedLength} bytes`, 'VMIG_ERR_BAD_OFFSET');
        }
        const pc = this.opts.postcopy;
        if (pc?.placing) {
          // ram_load_postcopy: the whole page goes in through the received map, or is
          // dropped if it is there already (a vCPU may have written it since).
          if (flags & RAM_SAVE_FLAG_PAGE) {
            if (s.buf.length - s.pos < TARGET_PAGE_SIZE) await s.ensure(TARGET_PAGE_SIZE);
            pc.placePage(block, offset, s.buf.subarray(s.pos, s.pos + TARGET_PAGE_SIZE));
            s.pos += TARGET_PAGE_SIZE;
            this.normalPages++;
          } else {
            if (s.buf.length - s.pos < 1) await s.ensure(1);
            if (getU8(s) !== 0) this.fail('postcopy zero page record with a non-zero fill byte');
            pc.placePage(block, offset, null);
            this.zeroPages++;
          }
          continue;
        }
        if (flags & RAM_SAVE_FLAG_PAGE) {
          if (s.buf.length - s.pos < TARGET_PAGE_SIZE) await s.ensure(TARGET_PAGE_SIZE);
          block.writePage(offset / TARGET_PAGE_SIZE, s.buf.subarray(s.pos, s.pos + TARGET_PAGE_SIZE));
          block.loaded.set(offset / TARGET_PAGE_SIZE);
          block.arrived.set(offset / TARGET_PAGE_SIZE);
          s.pos += TARGET_PAGE_SIZE;
          this.normalPages++;
        } else {
          if (s.buf.length - s.pos < 1) await s.ensure(1);
          const ch = getU8(s);
          // QEMU's ram_handle_compressed: fill with the byte (always 0 in practice); a page
          // known to be zero needs nothing (RamBlock.loadZeroPage).
          if (ch !== 0) {
            block.fillPage(offset / TARGET_PAGE_SIZE, ch);
            block.loaded.set(offset / TARGET_PAGE_SIZE);
          } else {
            block.loadZeroPage(offset, this.opts.zeroUnlessLoaded === true);
          }
          block.arrived.set(offset / TARGET_PAGE_SIZE);
          this.zeroPages++;
        }
        continue;
      }
      if (flags & RAM_SAVE_FLAG_MULTIFD_FLUSH) {
        if (this.opts.postcopy?.placing) this.fail('RAM_SAVE_FLAG_MULTIFD_FLUSH after the postcopy switch');
        await this.dialect.onFlush();
        continue;
      }
      if (flags & RAM_SAVE_FLAG_EOS) {
        if (!this.opts.postcopy?.placing) await this.dialect.onEos();
        return;
      }
      this.fail(`RAM record with flags 0x${flags.toString(16)} and nothing to do`);
    }
  }

  private continuedBlock(): RamBlock {
    if (!this.lastBlock) this.fail('RAM_SAVE_FLAG_CONTINUE with no previous block');
    return this.lastBlock;
  }

  private namedBlock(idstr: string): RamBlock {
    if (!this.ram) this.fail('RAM page before the block list (MEM_SIZE)');
    const block = this.ram.find(idstr);
    if (!block) this.fail(`unknown RAM block '${idstr}'`, 'VMIG_ERR_UNKNOWN_BLOCK');
    this.lastBlock = block;
    return block;
  }

  private async loadMemSize(s: StreamSource, total: number): Promise<void> {
    const blocks: RamBlockSpec[] = [];
    let remaining = total;
    while (remaining > 0) {
      if (blocks.length >= MAX_RAM_BLOCKS) this.fail(`more than ${MAX_RAM_BLOCKS} RAM blocks`);
      const idstr = await readCountedString(s);
      await s.ensure(8);
      const usedLength = getU64(s);
      try {
        validateBlockSize(usedLength);
      } catch {
        this.fail(`block '${idstr}' has invalid length ${usedLength}`);
      }
      if (usedLength > remaining) this.fail(`block list longer than its total ${total}`);
      if (blocks.some((b) => b.idstr === idstr)) this.fail(`RAM block '${idstr}' listed twice`);
      blocks.push({ idstr, usedLength });
      remaining -= usedLength;
    }
    if (this.ram) {
      for (const b of blocks) {
        const mine = this.ram.find(b.idstr);
        if (!mine) this.fail(`unknown RAM block '${b.idstr}' in block list`, 'VMIG_ERR_UNKNOWN_BLOCK');
        if (mine.usedLength !== b.usedLength) {
          this.fail(`length mismatch for block '${b.idstr}': stream 0x${b.usedLength.toString(16)}, here 0x${mine.usedLength.toString(16)}`, 'VMIG_ERR_BLOCK_MISMATCH');
        }
      }
    } else {
      this.ram = this.opts.createRam(blocks);
    }
    this.opts.onRamReady?.(this.ram);
  }
}
