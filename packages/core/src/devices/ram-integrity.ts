/**
 * vmig's end-to-end integrity check (opt-in, vmig to vmig; QEMU has no such section): the
 * source sends, after the final pass, an xxh64 digest of every 1 MiB range of guest RAM as
 * it stands with the vCPUs stopped; the destination loads the section after its last multifd
 * barrier, so every page is in place, digests its own RAM the same way and refuses the
 * migration (VMIG_ERR_INTEGRITY, before it answers SHUT) if any range differs. It catches
 * what the wire format cannot: a flipped payload bit, a page lost or applied twice in the
 * wrong order, a bug of either end. xxh64, not xxh3: @node-rs/xxhash's xxh64 hashes about
 * 12 GB/s on one core here, its xxh3 1.7 GB/s on large inputs.
 *
 * Section `vmig-integrity` v1: be32 range size, be32 block count, then per block: u8 len +
 * idstr, be64 used_length, be32 range count, and per range two be32 halves (high, low) of
 * its digest. Precopy only: after a postcopy switch the destination's vCPUs write RAM while
 * pages still arrive, and the section travels in the switch's package, before the pages.
 */
import { xxh64 } from '@node-rs/xxhash';
import { VmigError } from '../errors.js';
import type { ByteWriter, StreamSource } from '../io.js';
import type { GuestRam, RamBlock } from '../ram/ram-block.js';
import { getU32, getU64, putCountedString, readCountedString } from '../wire/main-stream.js';
import type { VmStateDevice } from './device.js';

export const INTEGRITY_SECTION = 'vmig-integrity';
/** The unit a digest covers: small enough to say where RAM differs, large enough to hash fast. */
export const INTEGRITY_RANGE_BYTES = 1 << 20;

/** One digest per range of `block`, as two 32-bit halves (high, low) each. */
export function digestRanges(block: RamBlock, rangeBytes = INTEGRITY_RANGE_BYTES): Uint32Array {
  const n = Math.ceil(block.usedLength / rangeBytes);
  const out = new Uint32Array(2 * n);
  const host = Buffer.from(block.hostSab, 0, block.usedLength);
  for (let i = 0; i < n; i++) {
    const d = xxh64(host.subarray(i * rangeBytes, Math.min(block.usedLength, (i + 1) * rangeBytes)));
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

  async load(s: StreamSource): Promise<void> {
    const ram = this.mustHaveRam();
    await s.ensure(8);
    const rangeBytes = getU32(s);
    const blocks = getU32(s);
    if (rangeBytes !== INTEGRITY_RANGE_BYTES) fail(`range of ${rangeBytes} bytes, this side digests ${INTEGRITY_RANGE_BYTES}`, 'VMIG_ERR_DEVICE_STATE');
    if (blocks !== ram.blocks.length) fail(`the section covers ${blocks} RAM block(s), this side has ${ram.blocks.length}`, 'VMIG_ERR_DEVICE_STATE');
    const differ: string[] = [];
    let bad = 0;
    for (let i = 0; i < blocks; i++) {
      const idstr = await readCountedString(s);
      await s.ensure(12);
      const used = getU64(s);
      const n = getU32(s);
      const block = ram.find(idstr);
      if (!block || block.usedLength !== used || n !== Math.ceil(used / rangeBytes)) fail(`block '${idstr}' of ${used} bytes in ${n} ranges does not match this side's RAM`, 'VMIG_ERR_DEVICE_STATE');
      await s.ensure(8 * n);
      const theirs = new Uint32Array(2 * n);
      for (let k = 0; k < 2 * n; k++) theirs[k] = getU32(s);
      const mine = digestRanges(block, rangeBytes);
      for (let r = 0; r < n; r++) {
        if (mine[2 * r] !== theirs[2 * r] || mine[2 * r + 1] !== theirs[2 * r + 1]) {
          bad++;
          if (differ.length < 3) differ.push(`'${idstr}' at 0x${(r * rangeBytes).toString(16)}`);
        }
      }
      this.ranges += n;
    }
    if (bad > 0) fail(`${bad} of ${this.ranges}+ ranges of RAM differ from the source's (${differ.join(', ')}${bad > differ.length ? ', ...' : ''})`, 'VMIG_ERR_INTEGRITY');
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
