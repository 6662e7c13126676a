/**
 * digestRamParallel against digestRam: the same per-page array and digest over blocks whose
 * sizes do not divide into the pool's ranges, one changed byte seen at its page, and a
 * process that digests in parallel still exits by itself (no pool thread left behind).
 * The pool's threads load dist/digest.worker.js: build first.
 */
import { spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { GuestRam, TARGET_PAGE_SIZE } from '@vmig/core';
import { DIGEST_RANGE_BYTES, digestRam, digestRamParallel, fillRam, PARALLEL_DIGEST_MIN_BYTES } from '../src/index.js';

const MiB = 2 ** 20;

/** 4 KiB, 3 MiB + 4 KiB and 70 MiB (two whole ranges and a short one), random. */
function randomRam(): GuestRam {
  const ram = GuestRam.create([
    { idstr: 'rom', size: TARGET_PAGE_SIZE },
    { idstr: 'vga.vram', size: 3 * MiB + TARGET_PAGE_SIZE },
    { idstr: 'pc.ram', size: 70 * MiB },
  ]);
  for (const b of ram.blocks) {
    for (let off = 0; off < b.usedLength; off += 16 * MiB) randomFillSync(b.host, off, Math.min(16 * MiB, b.usedLength - off));
  }
  return ram;
}

/** The first index where `a` and `b` differ, or -1. */
function firstDifference(a: BigUint64Array, b: BigUint64Array): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  return a.findIndex((v, i) => v !== b[i]);
}

describe('digestRamParallel', () => {
  const ram = randomRam();

  it('gives the per-page array and digest of digestRam, across blocks and ranges', async () => {
    expect(ram.totalBytes).toBeGreaterThanOrEqual(PARALLEL_DIGEST_MIN_BYTES);
    expect(ram.blocks[2]!.usedLength % DIGEST_RANGE_BYTES).not.toBe(0);
    const sync = digestRam(ram);
    for (const threads of [1, 2, 3]) {
      const par = await digestRamParallel(ram, { threads });
      expect(firstDifference(par.pages, sync.pages)).toBe(-1);
      expect(par.digest).toBe(sync.digest);
    }
  });

  it('sees one changed byte, at its page', async () => {
    const before = await digestRamParallel(ram);
    const block = ram.blocks[2]!;
    const offset = DIGEST_RANGE_BYTES + 5 * MiB + 123;
    const orig = block.host[offset]!;
    block.host[offset] = orig ^ 1;
    try {
      const after = await digestRamParallel(ram);
      expect(after.digest).not.toBe(before.digest);
      const page = ram.blocks[0]!.pages + ram.blocks[1]!.pages + Math.floor(offset / TARGET_PAGE_SIZE);
      expect(firstDifference(after.pages, before.pages)).toBe(page);
      expect(firstDifference(after.pages.subarray(page + 1), before.pages.subarray(page + 1))).toBe(-1);
    } finally {
      block.host[offset] = orig;
    }
  });

  it('digests small RAM on the calling thread, with the same result', async () => {
    const small = GuestRam.create([{ idstr: 'pc.ram', size: MiB }]);
    randomFillSync(small.blocks[0]!.host);
    expect((await digestRamParallel(small)).digest).toBe(digestRam(small).digest);
  });

  it('leaves no thread that keeps the process alive', () => {
    const harness = new URL('../dist/index.js', import.meta.url).href;
    const script = `
      import { GuestRam } from '@vmig/core';
      import { digestRamParallel } from '${harness}';
      const ram = GuestRam.create([{ idstr: 'pc.ram', size: ${PARALLEL_DIGEST_MIN_BYTES} }]);
      console.log((await digestRamParallel(ram, { threads: 2 })).digest);
    `;
    // Run from the package so that '@vmig/core' resolves as it does for the harness.
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { cwd: fileURLToPath(new URL('..', import.meta.url)), encoding: 'utf8', timeout: 30_000 });
    expect(r.stderr).toBe('');
    expect(r.signal).toBeNull();
    expect(r.status).toBe(0);
    expect(r.stdout.trim()).toMatch(/^[0-9a-f]{16}$/);
  });
});

describe('RAM in segments: the same fill and the same digests whatever the segment size', () => {
  it('random and text fills, digestRam and digestRamParallel: equal for 1 MiB segments and one segment', async () => {
    for (const pattern of ['random', 'text'] as const) {
      const flat = GuestRam.create([{ idstr: 'pc.ram', size: 70 * MiB }, { idstr: 'b', size: 3 * MiB + TARGET_PAGE_SIZE }], { prefault: false });
      const split = GuestRam.create([{ idstr: 'pc.ram', size: 70 * MiB }, { idstr: 'b', size: 3 * MiB + TARGET_PAGE_SIZE }], { prefault: false, segmentBytes: MiB });
      expect(split.blocks[0]!.segments).toHaveLength(70);
      fillRam(flat, pattern, 7);
      fillRam(split, pattern, 7);
      const a = digestRam(flat);
      const b = digestRam(split);
      expect(b.digest).toBe(a.digest);
      expect(firstDifference(a.pages, b.pages)).toBe(-1);
      expect((await digestRamParallel(split)).digest).toBe(a.digest);
    }
  });
});
