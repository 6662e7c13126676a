import { describe, expect, it } from 'vitest';
import { POSTCOPY_STALLED_ROUNDS, SwitchoverPolicy } from '../src/migration/switchover.js';

const precopy = { downtimeLimitMs: 300, postcopy: false, postcopyAfterRounds: 0 };
const MB = 2 ** 20;

describe('SwitchoverPolicy', () => {
  it('completes once what is dirty fits the downtime limit at the measured bandwidth', () => {
    const p = new SwitchoverPolicy();
    // 100 MB/s for 300 ms: 30 MB may be left.
    expect(p.afterRound(31 * 1e6, 100 * 1e6, precopy).decision).toBe('iterate');
    expect(p.afterRound(30 * 1e6, 100 * 1e6, precopy).decision).toBe('complete');
    expect(p.rounds).toBe(2);
  });

  it('without bandwidth measured only nothing dirty completes', () => {
    const p = new SwitchoverPolicy();
    expect(p.afterRound(4096, 0, precopy).decision).toBe('iterate');
    expect(p.afterRound(0, 0, precopy).decision).toBe('complete');
  });

  it('never switches to postcopy without the capability, however stalled', () => {
    const p = new SwitchoverPolicy();
    for (let i = 0; i < 20; i++) expect(p.afterRound(100 * MB, 1 * MB, precopy).decision).toBe('iterate');
  });

  it(`switches to postcopy after ${POSTCOPY_STALLED_ROUNDS} rounds that did not shrink by a tenth`, () => {
    const p = new SwitchoverPolicy();
    const pc = { ...precopy, postcopy: true };
    expect(p.afterRound(100 * MB, MB, pc).decision).toBe('iterate'); // first: nothing to compare
    expect(p.afterRound(95 * MB, MB, pc).decision).toBe('iterate'); // stalled 1
    expect(p.afterRound(80 * MB, MB, pc).decision).toBe('iterate'); // shrank by more than a tenth: 0
    expect(p.afterRound(79 * MB, MB, pc).decision).toBe('iterate'); // 1
    expect(p.afterRound(79 * MB, MB, pc).decision).toBe('iterate'); // 2
    expect(p.afterRound(79 * MB, MB, pc)).toEqual({ decision: 'postcopy', reason: 'precopy does not converge' });
  });

  it('postcopy after N rounds wins over completing', () => {
    const p = new SwitchoverPolicy();
    const pc = { ...precopy, postcopy: true, postcopyAfterRounds: 2 };
    expect(p.afterRound(100 * MB, MB, pc).decision).toBe('iterate');
    expect(p.afterRound(0, MB, pc).decision).toBe('postcopy');
  });

  it('postcopy: rounds before any bandwidth was measured never count as stalled; the dirty pages, not the send queues, say whether it converges', () => {
    const pc = { downtimeLimitMs: 300, postcopy: true, postcopyAfterRounds: 0 };
    const p = new SwitchoverPolicy();
    for (let i = 0; i < 10; i++) expect(p.afterRound(4 * 4096, 0, pc).decision).toBe('iterate');
    const q = new SwitchoverPolicy();
    // 4 MB queued, the dirty pages shrinking fast: converging, not stalled.
    for (const dirty of [8e6, 4e6, 2e6, 1e6]) expect(q.afterRound(4e6 + dirty, 1e6, pc, dirty).decision).toBe('iterate');
  });
});

