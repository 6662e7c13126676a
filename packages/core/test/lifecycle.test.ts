import { describe, expect, it } from 'vitest';
import {
  AutoConverge,
  CPU_THROTTLE_INITIAL,
  CPU_THROTTLE_MAX,
  FreePageHinting,
  GuestRam,
  MigrationNotifiers,
  MigrationStats,
  NotifierWithReturnList,
  RamSaver,
  type PrecopyNotifyData,
} from '../src/index.js';

describe('NotifierWithReturnList', () => {
  it('runs notifiers in order and stops at the first error', () => {
    const chain = new NotifierWithReturnList<number>();
    const seen: string[] = [];
    chain.add((n) => void seen.push(`a${n}`));
    chain.add(() => new Error('veto'));
    chain.add((n) => void seen.push(`c${n}`));
    const err = chain.notify(1);
    expect(err?.code).toBe('VMIG_ERR_NOTIFIER');
    expect(err?.message).toBe('veto');
    expect(seen).toEqual(['a1']);
  });

  it('a throwing notifier is an error too; notifyAll runs every notifier anyway', () => {
    const chain = new NotifierWithReturnList<number>();
    const seen: number[] = [];
    chain.add(() => {
      throw new Error('boom');
    });
    chain.add((n) => void seen.push(n));
    expect(chain.notify(1)?.message).toBe('boom');
    expect(seen).toEqual([]);
    expect(chain.notifyAll(2).map((e) => e.message)).toEqual(['boom']);
    expect(seen).toEqual([2]);
  });

  it('a notifier can remove itself while the chain runs', () => {
    const chain = new NotifierWithReturnList<number>();
    const seen: string[] = [];
    const remove = chain.add(() => {
      seen.push('once');
      remove();
    });
    chain.add(() => void seen.push('always'));
    chain.notify(0);
    chain.notify(0);
    expect(seen).toEqual(['once', 'always', 'always']);
    expect(chain.size).toBe(1);
  });
});

describe('postcopy notifier chain (destination)', () => {
  it('hears PROBE, INBOUND_ADVISE, INBOUND_LISTEN, INBOUND_END in order; an error is a veto', () => {
    const n = new MigrationNotifiers();
    const heard: string[] = [];
    n.postcopy.add((e) => void heard.push(e.reason));
    for (const reason of ['PROBE', 'INBOUND_ADVISE', 'INBOUND_LISTEN', 'INBOUND_END'] as const) expect(n.postcopy.notify({ reason })).toBeUndefined();
    expect(heard).toEqual(['PROBE', 'INBOUND_ADVISE', 'INBOUND_LISTEN', 'INBOUND_END']);
    n.postcopy.add((e) => (e.reason === 'PROBE' ? new Error('this device cannot do postcopy') : undefined));
    expect(n.postcopy.notify({ reason: 'PROBE' })?.message).toBe('this device cannot do postcopy');
    expect(n.postcopy.notify({ reason: 'INBOUND_ADVISE' })).toBeUndefined();
  });
});

describe('AutoConverge (QEMU trigger)', () => {
  it('throttles only on the second high period, 20 % first, +10 % after, at most 99 %', () => {
    const ac = new AutoConverge(0, 0);
    let t = 0;
    let sent = 0;
    // A period: 1000 pages dirtied (4 MB) against 4 MB sent: 100 % > 50 %.
    const period = (): number | undefined => {
      t += 1000;
      sent += 4_096_000;
      return ac.onBitmapSync(1000, 4096, sent, t);
    };
    expect(period()).toBeUndefined();
    expect(period()).toBe(CPU_THROTTLE_INITIAL);
    expect(period()).toBeUndefined();
    expect(period()).toBe(30);
    const steps: number[] = [];
    for (let i = 0; i < 40; i++) {
      const v = period();
      if (v !== undefined) steps.push(v);
    }
    expect(steps.slice(0, 3)).toEqual([40, 50, 60]);
    expect(Math.max(...steps)).toBe(CPU_THROTTLE_MAX);
    expect(ac.percentage).toBe(CPU_THROTTLE_MAX);
  });

  it('does not trigger below 50 % or within a period shorter than a second', () => {
    const ac = new AutoConverge(0, 0);
    // 40 % dirtied of what was sent, many periods.
    for (let i = 1; i <= 10; i++) expect(ac.onBitmapSync(400, 4096, i * 4_096_000, i * 1000)).toBeUndefined();
    const ac2 = new AutoConverge(0, 0);
    // Lots dirtied, but syncs every 100 ms: they add up into one period.
    for (let i = 1; i < 10; i++) expect(ac2.onBitmapSync(1000, 4096, i * 1000, i * 100)).toBeUndefined();
    expect(ac2.percentage).toBe(0);
  });
});

describe('FreePageHinting', () => {
  it('only between AFTER_BITMAP_SYNC and the next BEFORE_BITMAP_SYNC; clears the migration bitmap, never the dirty log', () => {
    const ram = GuestRam.create([{ idstr: 'pc.ram', size: 1 << 20 }]);
    const saver = new RamSaver(ram, new MigrationStats());
    saver.setup();
    const chain = new NotifierWithReturnList<PrecopyNotifyData>();
    const h = new FreePageHinting(saver);
    h.attach(chain);
    expect(h.hint('pc.ram', 0, 10)).toBe(0); // no window yet
    chain.notify({ reason: 'AFTER_BITMAP_SYNC' });
    ram.blocks[0]!.dirtyLog.set(5); // a write to a page about to be hinted
    expect(h.hint('pc.ram', 0, 10)).toBe(10);
    expect(h.hint('pc.ram', 0, 10)).toBe(0); // already clear
    expect(saver.dirtyPages).toBe(256 - 10);
    expect(ram.blocks[0]!.dirtyLog.test(5)).toBe(true);
    chain.notify({ reason: 'BEFORE_BITMAP_SYNC' });
    expect(h.hint('pc.ram', 20, 10)).toBe(0);
    // The next sync brings the written page back.
    expect(saver.bitmapSync()).toBe(1);
    expect(saver.bitmaps[0]!.test(5)).toBe(true);
    expect(() => h.hint('pc.ram', 250, 10)).not.toThrow(); // window closed: ignored
    chain.notify({ reason: 'AFTER_BITMAP_SYNC' });
    expect(() => h.hint('pc.ram', 250, 10)).toThrow(RangeError);
    expect(() => h.hint('nope', 0, 1)).toThrow(RangeError);
  });
});
