/**
 * The guest's write rate with no migration: the same vCPU writers (count, rate, pattern, and
 * the tracking a postcopy destination's writers do) over fresh RAM of the same size. The
 * yardstick of the bench's guest progress during postcopy (writes per second while pages
 * are missing, against this).
 */
import { GuestRam, TARGET_PAGE_SIZE } from '@vmig/core';
import { VcpuPool, type WritePattern } from './vcpu-pool.js';
import { hotSet } from './write-pattern.js';

export interface WriteRateOptions {
  ramBytes: number;
  writers: number;
  /** Bytes dirtied per second across all writers (one page per write). */
  dirtyRate: number;
  pattern: WritePattern;
  hotPages: number;
  /** How long to count (ms), after `warmupMs` of writing uncounted. */
  ms: number;
  warmupMs?: number;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Writes per second the writers complete with nothing else of ours running. */
export async function measureWriteRate(o: WriteRateOptions): Promise<number> {
  const ram = GuestRam.create([{ idstr: 'pc.ram', size: o.ramBytes }], { prefault: o.pattern !== 'hot' });
  // A fresh page costs a kernel fault on its first write (as a destination's pre-faulted RAM does not).
  if (o.pattern === 'hot') {
    const hot = hotSet(ram.totalPages, o.hotPages);
    for (let i = 0; i < hot.pages; i++) {
      const [b, page] = ram.locate(i * hot.stride);
      ram.blocks[b]!.host[page * TARGET_PAGE_SIZE] = 0;
    }
  }
  const pool = await VcpuPool.start(ram, { writers: o.writers, dirtyRate: o.dirtyRate, pattern: o.pattern, hotPages: o.hotPages, track: true });
  try {
    await sleep(o.warmupMs ?? 200);
    const w0 = pool.writes;
    const t0 = performance.now();
    await sleep(o.ms);
    const writes = pool.writes - w0;
    return Math.round(writes / ((performance.now() - t0) / 1000));
  } finally {
    await pool.terminate();
  }
}
