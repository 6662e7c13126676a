/**
 * The received map's accounting of what the guest feels (missing-pages.ts rules 4 and 5):
 * writes made while pages are missing, and the time from RUN to the last page.
 */
import { describe, expect, it } from 'vitest';
import { createMissingPages, createReturnPath, MissingPagesPlacer, MissingPagesVcpu } from '../src/index.js';

const BLOCKS = [{ idstr: 'pc.ram', pages: 64 }];

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
