import { describe, expect, it } from 'vitest';
import { RateLimiter } from '../src/index.js';

describe('RateLimiter', () => {
  it('allows one period of credit, then the configured rate', () => {
    const r = new RateLimiter(1000, 100, 0); // 1000 B/s, 100 ms periods
    expect(r.allowance(0)).toBe(100);
    r.consume(100);
    expect(r.allowance(0)).toBe(0);
    expect(r.waitMs(0)).toBeGreaterThan(0);
    expect(r.allowance(50)).toBeCloseTo(50);
    r.consume(80); // overdraw by 30
    expect(r.allowance(50)).toBe(0);
    expect(r.waitMs(50)).toBeGreaterThanOrEqual(30);
    // Over a long time the total sent tracks the rate, and idle time does not bank a burst.
    expect(r.allowance(10_000)).toBe(100);
  });

  it('charges a running counter by its growth, whenever it grew', () => {
    const r = new RateLimiter(1000, 100, 0);
    r.account(5000); // the first call only sets the baseline
    expect(r.allowance(0)).toBe(100);
    r.account(5060);
    expect(r.allowance(0)).toBe(40);
    r.account(5200);
    expect(r.allowance(0)).toBe(0);
  });

  it('hands credit out in bursts, not as it trickles in', () => {
    const r = new RateLimiter(100 << 20, 100, 0); // 100 MiB/s: 10 MiB periods, 256 KiB bursts
    r.consume(10 << 20);
    expect(r.allowance(1)).toBe(0); // 100 KiB accrued: not a burst yet
    expect(r.waitMs(1)).toBeGreaterThan(1);
    expect(r.allowance(3)).toBeGreaterThanOrEqual(256 * 1024);
    expect(r.waitMs(3)).toBe(0);
  });

  it('is unlimited at 0', () => {
    const r = new RateLimiter(0);
    expect(r.allowance()).toBe(Infinity);
    expect(r.waitMs()).toBe(0);
  });
});
