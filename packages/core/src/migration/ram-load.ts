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
  /** RAM_SAVE_FLAG_MULTIFD_FLUSH: wait for every multifd channel's SYNC. */
  onMultifdFlush?: () => Promise<void>;
  /** RAM_SAVE_FLAG_EOS: in the legacy multifd dialect, also a sync point. */
  onEos?: () => Promise<void>;
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

export class RamLoadState {
  ram: GuestRam | undefined;
  private lastBlock: RamBlock | undefined;
  normalPages = 0;
  zeroPages = 0;
  private readonly channel: string;

  constructor(private readonly opts: RamLoadOptions) {
    this.ram = opts.ram;
    this.channel = opts.channel ?? 'main';
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
          block.host.set(s.buf.subarray(s.pos, s.pos + TARGET_PAGE_SIZE), offset);
          block.loaded.set(offset / TARGET_PAGE_SIZE);
          s.pos += TARGET_PAGE_SIZE;
          this.normalPages++;
        } else {
          if (s.buf.length - s.pos < 1) await s.ensure(1);
          const ch = getU8(s);
          // QEMU's ram_handle_compressed: fill with the byte (always 0 in practice); a page
          // known to be zero needs nothing (RamBlock.loadZeroPage).
          if (ch !== 0) {
            block.host.fill(ch, offset, offset + TARGET_PAGE_SIZE);
            block.loaded.set(offset / TARGET_PAGE_SIZE);
          } else {
            block.loadZeroPage(offset, this.opts.zeroUnlessLoaded === true);
          }
          this.zeroPages++;
        }
        continue;
      }
      if (flags & RAM_SAVE_FLAG_MULTIFD_FLUSH) {
        if (this.opts.postcopy?.placing) this.fail('RAM_SAVE_FLAG_MULTIFD_FLUSH after the postcopy switch');
        await this.opts.onMultifdFlush?.();
        continue;
      }
      if (flags & RAM_SAVE_FLAG_EOS) {
        if (!this.opts.postcopy?.placing) await this.opts.onEos?.();
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
