/**
 * The received map's accounting of what the guest feels (missing-pages.ts rules 4 and 5):
 * writes made while pages are missing, the time from RUN to the last page, and the short
 * scheduler slice a faulting vCPU takes and gives back once every page is in.
 */
import { once } from 'node:events';
import { release } from 'node:os';
import { Worker } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import { createMissingPages, createReturnPath, libc, MissingPagesPlacer, MissingPagesVcpu } from '../src/index.js';

const BLOCKS = [{ idstr: 'pc.ram', pages: 64 }];

/** sched_setattr's slices: Linux 6.12+ on x86-64 or arm64, with koffi. */
function customSlices(): boolean {
  if (process.platform !== 'linux' || !['x64', 'arm64'].includes(process.arch) || libc() === null) return false;
  const [major = 0, minor = 0] = release().split('.').map(Number);
  return major > 6 || (major === 6 && minor >= 12);
}

describe('the guest\'s progress while pages are missing', () => {
  it('counts the writes made while any page is missing, and the time from RUN to the last page', async () => {
    const shared = createMissingPages(BLOCKS, 2, true, createReturnPath(-1));
    const placer = new MissingPagesPlacer(shared);
    placer.markAllReceived();
    placer.markMissing(0, 3);
    placer.setRunningVcpus(1);
    const vcpu = new MissingPagesVcpu(shared, 0);
    // Pages that are here: no fault, each write counted while pages 0..2 are missing.
    for (let i = 0; i < 5; i++) expect(vcpu.beforeWrite(10 + i)).toBe(true);
    placer.place(0, () => {});
    placer.place(1, () => {});
    expect(vcpu.beforeWrite(20)).toBe(true);
    await new Promise((r) => setTimeout(r, 2));
    placer.place(2, () => {});
    // Every page is in: not counted any more.
    for (let i = 0; i < 4; i++) expect(vcpu.beforeWrite(30 + i)).toBe(true);
    const b = placer.blocktime();
    expect(b.writesWhileMissing).toBe(6);
    expect(b.faults).toBe(0);
    expect(b.pagesMissingMs).toBeGreaterThan(0);
    expect(b.writesPerSecondWhileMissing).toBe(Math.round((6 / b.pagesMissingMs) * 1000));
  });

  it('reports no window while a page is still missing', () => {
    const shared = createMissingPages(BLOCKS, 1, true, createReturnPath(-1));
    const placer = new MissingPagesPlacer(shared);
    placer.markAllReceived();
    placer.markMissing(5, 1);
    placer.setRunningVcpus(1);
    expect(new MissingPagesVcpu(shared, 0).beforeWrite(1)).toBe(true);
    const b = placer.blocktime();
    expect(b.writesWhileMissing).toBe(1);
    expect(b.pagesMissingMs).toBe(0);
    expect(b.writesPerSecondWhileMissing).toBe(0);
  });
});

/**
 * Pages 0 and 1 missing, one vCPU thread (fixtures/faulting-vcpu.mjs) that faults on page 0;
 * resolves once it blocks there (rule 2), page 0 not placed yet.
 */
async function faultingVcpu(faultSliceUs = 0): Promise<{ placer: MissingPagesPlacer; w: Worker }> {
  const shared = createMissingPages(BLOCKS, 1, true, createReturnPath(-1), faultSliceUs);
  const placer = new MissingPagesPlacer(shared);
  placer.markAllReceived();
  placer.markMissing(0, 2);
  placer.setRunningVcpus(1);
  const w = new Worker(new URL('./fixtures/faulting-vcpu.mjs', import.meta.url), { workerData: { shared, page: 0, other: 10 } });
  while (placer.blockedVcpus === 0) await new Promise((r) => setTimeout(r, 1));
  return { placer, w };
}

describe('a faulting vCPU\'s scheduler slice', () => {
  it('is the fault slice while pages are missing, and its own again once every page is in', async () => {
    const { placer, w } = await faultingVcpu(150);
    try {
      placer.place(0, () => {});
      const [first] = (await once(w, 'message')) as [{ ok: boolean; before: number | undefined; during: number | undefined }];
      expect(first.ok).toBe(true);
      if (customSlices()) {
        expect(first.during).toBe(150);
        expect(first.before).not.toBe(150);
        expect(placer.vcpusSliced).toBe(1);
      } else expect(placer.vcpusSliced).toBe(0);
      // The last missing page: its next write gives the slice back.
      placer.place(1, () => {});
      w.postMessage('go');
      const [second] = (await once(w, 'message')) as [{ after: number | undefined }];
      expect(second.after).toBe(first.before);
      expect(placer.blocktime().faults).toBe(1);
    } finally {
      await w.terminate();
    }
  });

  it('is left alone without a fault slice', async () => {
    const { placer, w } = await faultingVcpu();
    try {
      placer.place(0, () => {});
      const [first] = (await once(w, 'message')) as [{ during: number | undefined; before: number | undefined }];
      expect(first.during).toBe(first.before);
      expect(placer.vcpusSliced).toBe(0);
    } finally {
      await w.terminate();
    }
  });
});
