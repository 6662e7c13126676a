/**
 * vmig's end-to-end integrity check (opt-in, vmig to vmig; QEMU has no such section): the
 * source sends, after the final pass, an xxh64 digest of every 1 MiB range of guest RAM as
 * it stands with the vCPUs stopped; the destination keeps them, and once the load is over
 * (EOF, multifd sealed: nothing writes RAM any more) digests its own RAM the same way and
 * refuses the migration (VMIG_ERR_INTEGRITY, before it answers SHUT) if any range differs. It catches
 * what the wire format cannot: a flipped payload bit, a page lost or applied twice in the
 * wrong order, a bug of either end. xxh64, not xxh3: @node-rs/xxhash's xxh64 hashes about
 * 12 GB/s on one core here, its xxh3 1.7 GB/s on large inputs.
 *
 * Section `vmig-integrity` v1: be32 range size, be32 block count, then per block: u8 len +
 * idstr, be64 used_length, be32 range count, and per range two be32 halves (high, low) of
 * its digest. Precopy only: after a postcopy switch the destination's vCPUs write RAM while
 * pages still arrive, and the section travels in the switch's package, before the pages.
 *
 * @node-rs/xxhash is loaded on first use, with require: core is loaded by every thread of
 * vmig's, and an ESM import of the package's 29 KB CommonJS loader made Node lex it for its
 * export names in each of them, a lexer hot enough for TurboFan to compile, once per thread,
 * on the cores the migration needs (multifd/src/recv-rpc.ts).
 */
import { createRequire } from 'node:module';
import type * as XxHash from '@node-rs/xxhash';
import { VmigError } from '../errors.js';
import type { ByteWriter, StreamSource } from '../io.js';
import type { GuestRam, RamBlock } from '../ram/ram-block.js';
import { getU32, getU64, putCountedString, readCountedString } from '../wire/main-stream.js';
import type { VmStateDevice } from './device.js';

let xxhash: typeof XxHash | undefined;
function xxh64(data: Uint8Array): bigint {
  xxhash ??= createRequire(import.meta.url)('@node-rs/xxhash') as typeof XxHash;
  return xxhash.xxh64(data);
}

export const INTEGRITY_SECTION = 'vmig-integrity';
/** The unit a digest covers: small enough to say where RAM differs, large enough to hash fast. */
export const INTEGRITY_RANGE_BYTES = 1 << 20;

/** One digest per range of `block`, as two 32-bit halves (high, low) each. */
export function digestRanges(block: RamBlock, rangeBytes = INTEGRITY_RANGE_BYTES): Uint32Array {
  const n = Math.ceil(block.usedLength / rangeBytes);
  const out = new Uint32Array(2 * n);
  for (let i = 0; i < n; i++) {
    // A range never crosses a segment edge: segments are whole MiB (ram-block.ts).
    const start = i * rangeBytes;
    const d = xxh64(block.bytes(start, Math.min(block.usedLength, start + rangeBytes) - start));
    out[2 * i] = Number(d >> 32n);
    out[2 * i + 1] = Number(d & 0xffffffffn);
  }
  return out;
}

export class RamIntegrityDevice implements VmStateDevice {
  readonly idstr = INTEGRITY_SECTION;
  readonly instanceId = 0;
  readonly versionId = 1;
  readonly minimumVersionId = 1;
  /** Destination: the section arrived and every range matched. */
  verified = false;
  /** Ranges compared (destination). */
  ranges = 0;
  /** Destination: the source's digests per block, from load() until verify(). */
  private theirs: Map<RamBlock, Uint32Array> | undefined;

  /** `ram`: guest RAM when the section is saved or loaded (it may be built from the stream). */
  constructor(private readonly ram: () => GuestRam | undefined) {}

  save(w: ByteWriter): void {
    const ram = this.mustHaveRam();
    w.put32(INTEGRITY_RANGE_BYTES);
    w.put32(ram.blocks.length);
    for (const b of ram.blocks) {
      putCountedString(w, b.idstr);
      w.put64(b.usedLength);
      const d = digestRanges(b);
      w.put32(d.length / 2);
      for (const v of d) w.put32(v);
    }
  }

  /**
   * Reads the source's digests. They are compared by verify(), once the load is over and
   * nothing writes RAM any more: a check at this point could be undone by RAM records that
   * follow the section.
   */
  async load(s: StreamSource): Promise<void> {
    if (this.received) fail('a second integrity section', 'VMIG_ERR_DEVICE_STATE');
    const ram = this.mustHaveRam();
    await s.ensure(8);
    const rangeBytes = getU32(s);
    const blocks = getU32(s);
    if (rangeBytes !== INTEGRITY_RANGE_BYTES) fail(`range of ${rangeBytes} bytes, this side digests ${INTEGRITY_RANGE_BYTES}`, 'VMIG_ERR_DEVICE_STATE');
    if (blocks !== ram.blocks.length) fail(`the section covers ${blocks} RAM block(s), this side has ${ram.blocks.length}`, 'VMIG_ERR_DEVICE_STATE');
    const theirs = new Map<RamBlock, Uint32Array>();
    for (let i = 0; i < blocks; i++) {
      const idstr = await readCountedString(s);
      await s.ensure(12);
      const used = getU64(s);
      const n = getU32(s);
      const block = ram.find(idstr);
      if (!block || theirs.has(block) || block.usedLength !== used || n !== Math.ceil(used / rangeBytes)) {
        fail(`block '${idstr}' of ${used} bytes in ${n} ranges does not match this side's RAM`, 'VMIG_ERR_DEVICE_STATE');
      }
      await s.ensure(8 * n);
      const d = new Uint32Array(2 * n);
      for (let k = 0; k < 2 * n; k++) d[k] = getU32(s);
      theirs.set(block, d);
    }
    this.theirs = theirs;
  }

  /** The source's digests arrived (load()). */
  get received(): boolean {
    return this.theirs !== undefined;
  }

  /** Digests this side's RAM as loaded and compares; VMIG_ERR_INTEGRITY if a range differs. */
  verify(): void {
    if (!this.theirs) fail('no digests to compare with', 'VMIG_ERR_INTEGRITY');
    const differ: string[] = [];
    let bad = 0;
    for (const [block, theirs] of this.theirs) {
      const mine = digestRanges(block);
      for (let r = 0; r < mine.length / 2; r++) {
        if (mine[2 * r] !== theirs[2 * r] || mine[2 * r + 1] !== theirs[2 * r + 1]) {
          bad++;
          if (differ.length < 3) differ.push(`'${block.idstr}' at 0x${(r * INTEGRITY_RANGE_BYTES).toString(16)}`);
        }
      }
      this.ranges += mine.length / 2;
    }
    if (bad > 0) fail(`${bad} of ${this.ranges} ranges of RAM differ from the source's (${differ.join(', ')}${bad > differ.length ? ', ...' : ''})`, 'VMIG_ERR_INTEGRITY');
    this.verified = true;
  }

  private mustHaveRam(): GuestRam {
    const ram = this.ram();
    if (!ram) fail('integrity section before guest RAM exists', 'VMIG_ERR_DEVICE_STATE');
    return ram;
  }
}

function fail(message: string, code: 'VMIG_ERR_INTEGRITY' | 'VMIG_ERR_DEVICE_STATE'): never {
  throw new VmigError(code, `${INTEGRITY_SECTION}: ${message}`, { phase: 'load' });
}
