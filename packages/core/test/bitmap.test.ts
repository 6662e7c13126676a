import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { AtomicBitmap, popcount32 } from '../src/index.js';

describe('AtomicBitmap', () => {
  it('set, test, clear, test-and-set, test-and-clear', () => {
    const b = AtomicBitmap.create(100);
    expect(b.test(37)).toBe(false);
    expect(b.testAndSet(37)).toBe(false);
    expect(b.testAndSet(37)).toBe(true);
    expect(b.test(37)).toBe(true);
    expect(b.testAndClear(37)).toBe(true);
    expect(b.testAndClear(37)).toBe(false);
    b.set(99);
    b.clear(99);
    expect(b.count()).toBe(0);
    expect(() => b.set(100)).toThrow(RangeError);
    expect(() => b.test(-1)).toThrow(RangeError);
  });

  it('setAll sets exactly nbits and findNextSet walks them', () => {
    for (const n of [1, 31, 32, 33, 64, 1000]) {
      const b = AtomicBitmap.create(n);
      b.setAll();
      expect(b.count()).toBe(n);
      let seen = 0;
      for (let i = b.findNextSet(0); i >= 0; i = b.findNextSet(i + 1)) seen++;
      expect(seen).toBe(n);
    }
  });

  it('fetchAndClearWord and orWord report what changed', () => {
    const b = AtomicBitmap.create(64);
    b.set(1);
    b.set(33);
    expect(b.orWord(0, 0b110)).toBe(0b100);
    expect(b.fetchAndClearWord(0)).toBe(0b110);
    expect(b.fetchAndClearWord(0)).toBe(0);
    expect(b.test(33)).toBe(true);
  });

  it('behaves like a set of integers (property)', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 300 }), fc.array(fc.tuple(fc.boolean(), fc.nat()), { maxLength: 200 }), (n, ops) => {
        const b = AtomicBitmap.create(n);
        const model = new Set<number>();
        for (const [add, raw] of ops) {
          const i = raw % n;
          if (add) {
            expect(b.testAndSet(i)).toBe(model.has(i));
            model.add(i);
          } else {
            expect(b.testAndClear(i)).toBe(model.has(i));
            model.delete(i);
          }
        }
        expect(b.count()).toBe(model.size);
        const sorted = [...model].sort((x, y) => x - y);
        const walked: number[] = [];
        for (let i = b.findNextSet(0); i >= 0; i = b.findNextSet(i + 1)) walked.push(i);
        expect(walked).toEqual(sorted);
        const clear: number[] = [];
        for (let i = b.findNextClear(0); i >= 0; i = b.findNextClear(i + 1)) clear.push(i);
        expect(clear).toEqual(Array.from({ length: n }, (_, i) => i).filter((i) => !model.has(i)));
      }),
    );
  });

  it('setRange sets exactly the range, across word edges (property)', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 300 }), fc.nat(), fc.nat(), (n, a, b) => {
        const start = a % n;
        const len = b % (n - start + 1);
        const bm = AtomicBitmap.create(n);
        bm.setRange(start, len);
        for (let i = 0; i < n; i++) expect(bm.test(i)).toBe(i >= start && i < start + len);
      }),
    );
    expect(() => AtomicBitmap.create(64).setRange(60, 5)).toThrow(RangeError);
  });

  it('popcount32', () => {
    expect(popcount32(0)).toBe(0);
    expect(popcount32(-1)).toBe(32);
    expect(popcount32(0x80000001)).toBe(2);
  });
});
