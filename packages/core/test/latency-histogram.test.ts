import { Worker } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import { BUCKETS, bucketOf, bucketRange, LatencyHistogram, latencyHistogramBytes } from '../src/index.js';

const make = (writers: number): LatencyHistogram => new LatencyHistogram(new SharedArrayBuffer(latencyHistogramBytes(writers)), writers);

describe('LatencyHistogram buckets', () => {
  it('maps every value into the bucket whose range holds it, ranges contiguous, at most 1/32 wide', () => {
    let prevHi = 0;
    for (let i = 0; i < BUCKETS; i++) {
      const { lo, hi } = bucketRange(i);
      expect(lo).toBe(prevHi);
      prevHi = hi;
      expect(bucketOf(lo)).toBe(i);
      expect(bucketOf(hi - 1)).toBe(i);
      expect(bucketOf(lo + (hi - lo) / 2)).toBe(i);
      if (lo >= 64) expect((hi - lo) / lo).toBeLessThanOrEqual(1 / 32);
    }
    expect(prevHi).toBe(2 ** 32);
    expect(bucketOf(0)).toBe(0);
    expect(bucketOf(-5)).toBe(0);
    expect(bucketOf(1e12)).toBe(BUCKETS - 1);
  });

  it('takes the same memory whatever the number of samples', () => {
    expect(latencyHistogramBytes(2)).toBeLessThan(8 * 1024);
    const h = make(1);
    for (let i = 0; i < 200_000; i++) h.record(0, 0.1);
    expect(h.summary().count).toBe(200_000);
  });
});

describe('LatencyHistogram percentiles', () => {
  it('covers the whole run: slow faults after the first 16,384 samples move p99', () => {
    const h = make(2);
    // 50,000 fast faults first, then 2,000 slow ones (3.8 % of all): p99 is a slow one.
    for (let i = 0; i < 50_000; i++) h.record(i & 1, 0.1);
    for (let i = 0; i < 2_000; i++) h.record(i & 1, 20);
    const s = h.summary();
    expect(s.count).toBe(52_000);
    expect(s.p50Ms).toBeGreaterThanOrEqual(0.1);
    expect(s.p50Ms).toBeLessThanOrEqual(0.1 * (1 + 1 / 32));
    expect(s.p99Ms).toBeGreaterThanOrEqual(20);
    expect(s.p99Ms).toBeLessThanOrEqual(20 * (1 + 1 / 32));
    expect(s.maxMs).toBe(20);
    expect(s.perWriterTotalMs).toEqual([2500 + 20_000, 2500 + 20_000]);
    expect(s.totalMs).toBe(45_000);
  });

  it('gives each quantile within one bucket (3 %) of the exact one, never above the max', () => {
    const h = make(1);
    const xs: number[] = [];
    let x = 7;
    for (let i = 0; i < 30_000; i++) {
      x = (x * 1103515245 + 12345) >>> 0;
      // 10 us .. ~100 ms, log-uniform.
      const ms = 0.01 * 10 ** ((x % 40_000) / 10_000);
      xs.push(ms);
      h.record(0, ms);
    }
    xs.sort((a, b) => a - b);
    const exact = (q: number): number => xs[Math.ceil(q * xs.length) - 1]!;
    const s = h.summary();
    for (const [q, got] of [[0.5, s.p50Ms], [0.99, s.p99Ms]] as const) {
      expect(got).toBeGreaterThanOrEqual(exact(q) * 0.999);
      expect(got).toBeLessThanOrEqual(exact(q) * (1 + 1 / 32) + 0.001);
    }
    expect(s.p99Ms).toBeLessThanOrEqual(s.maxMs);
    expect(s.maxMs).toBeCloseTo(xs[xs.length - 1]!, 3);
  });

  it('is empty before any sample', () => {
    expect(make(2).summary()).toEqual({ count: 0, totalMs: 0, p50Ms: 0, p99Ms: 0, maxMs: 0, perWriterTotalMs: [0, 0] });
  });

  it('sums fine buckets into the coarse buckets of a report', () => {
    const h = make(1);
    for (const ms of [0.02, 0.05, 0.07, 0.3, 3, 3, 2000]) h.record(0, ms);
    expect(h.coarse([0.05, 0.1, 1, 5])).toEqual([2, 1, 1, 2, 1]);
  });
});

// vCPU threads record into one histogram at once: no sample may be lost (Atomics.add).
describe('LatencyHistogram under concurrent writer threads', () => {
  it('counts every sample of every thread', async () => {
    const writers = 3;
    const n = 200_000;
    const sab = new SharedArrayBuffer(latencyHistogramBytes(writers));
    const workers = Array.from({ length: writers }, (_, index) => new Worker(new URL('./fixtures/latency-recorder.mjs', import.meta.url), { workerData: { sab, writers, index, n } }));
    await Promise.all(workers.map((w) => new Promise<void>((resolve, reject) => w.once('exit', () => resolve()).once('error', reject))));
    const h = new LatencyHistogram(sab, writers);
    const counts = h.counts();
    expect(counts.reduce((a, b) => a + b, 0)).toBe(writers * n);
    // Each thread recorded 0.00, 0.01, ... 9.99 ms, n / 1000 times each: 0 ms is bucket 0.
    expect(counts[0]).toBe((writers * n) / 1000);
    expect(h.summary().count).toBe(writers * n);
  });
});
