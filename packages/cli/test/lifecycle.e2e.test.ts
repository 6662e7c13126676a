/**
 * The migration lifecycle, both ends in this process over a real loopback socket with real
 * writer threads: notifier chains on every path, the completion hook, free page hints,
 * device state versions.
 */
import { describe, expect, it } from 'vitest';
import { DeviceRegistry, FreePageHinting, type MigrationStateEvent, type PrecopyNotifyData, TARGET_PAGE_SIZE, VmigError, type VmStateDevice } from '@vmig/core';
import { digestRam, ItsTableDevice, VcpuStateDevice } from '@vmig/test-harness';
import { differingPages, migrateInProcess } from './in-process.js';

const MiB = 1 << 20;

/** Records both chains as strings: `SETUP`, `CLEANUP:failed`, `state:status:active`, ... */
function recordChains(mig: { notifiers: { precopy: { add: (f: (e: PrecopyNotifyData) => void) => unknown }; state: { add: (f: (e: MigrationStateEvent) => void) => unknown } } }, log: string[]): void {
  mig.notifiers.precopy.add((e) => void log.push(e.status ? `${e.reason}:${e.status}` : e.reason));
  mig.notifiers.state.add((e) => void log.push(`state:${e.type}:${e.status}`));
}

const precopyOnly = (log: string[]): string => log.filter((e) => !e.startsWith('state:')).join(',');
const count = (log: string[], e: string): number => log.filter((x) => x === e).length;

/** The value of the PING the source sends at setup (migration-thread.ts). */
const SETUP_PING = 0x76726d67;

describe('the drain before the stop', () => {
  it('a destination that answers PING: the vCPUs stop only after it loaded everything sent (the PONG of a PING after the last round)', async () => {
    const log: string[] = [];
    const r = await migrateInProcess({
      ramBytes: 32 * MiB,
      writers: { writers: 2, dirtyRate: 8 * MiB },
      // Slow to load: each PONG but the setup's is written 100 ms after its PING. A source
      // that did not wait for it would reach COMPLETE before the PONG was even written.
      answerPing: (value) => ({ delayMs: value === SETUP_PING ? 0 : 100, onSent: () => void log.push(`pong:${value.toString(16)}`) }),
      prepare: (mig) => recordChains(mig, log),
    });
    expect(r.info.status, JSON.stringify(r.info.error)).toBe('completed');
    const drains = log.filter((e) => e.startsWith('pong:') && e !== `pong:${SETUP_PING.toString(16)}`);
    expect(drains.length, log.join(' ')).toBeGreaterThan(0);
    expect(log.indexOf(drains[drains.length - 1]!)).toBeLessThan(log.indexOf('COMPLETE'));
    expect(differingPages(r.srcRam, r.dstRam!)).toEqual([]);
  });

  it('a destination that never answers PING is never asked to drain: one PING (the setup\'s), completed', async () => {
    const pings: number[] = [];
    const r = await migrateInProcess({
      ramBytes: 16 * MiB,
      writers: { writers: 1, dirtyRate: 4 * MiB },
      answerPing: (value) => void pings.push(value),
    });
    expect(r.info.status, JSON.stringify(r.info.error)).toBe('completed');
    expect(pings).toEqual([SETUP_PING]);
    expect(differingPages(r.srcRam, r.dstRam!)).toEqual([]);
  });
});

describe('notifier chains', () => {
  it('complete: SETUP, syncs in BEFORE/AFTER pairs, COMPLETE, the final sync, CLEANUP once; state events in order', async () => {
    const log: string[] = [];
    const r = await migrateInProcess({
      ramBytes: 32 * MiB,
      writers: { writers: 2, dirtyRate: 8 * MiB },
      prepare: (mig) => recordChains(mig, log),
    });
    expect(r.info.status, JSON.stringify(r.info.error)).toBe('completed');
    expect(precopyOnly(log)).toMatch(/^SETUP(,BEFORE_BITMAP_SYNC,AFTER_BITMAP_SYNC)+,COMPLETE,BEFORE_BITMAP_SYNC,AFTER_BITMAP_SYNC,CLEANUP:completed$/);
    expect(log.filter((e) => e.startsWith('state:'))).toEqual(['state:status:setup', 'state:setup:setup', 'state:status:active', 'state:status:completed', 'state:done:completed']);
    // CLEANUP comes before the final status is announced.
    expect(log.indexOf('CLEANUP:completed')).toBeLessThan(log.indexOf('state:status:completed'));
    expect(differingPages(r.srcRam, r.dstRam!)).toEqual([]);
  });

  it('an error from a SETUP notifier fails the migration with that error; CLEANUP once; RAM untouched', async () => {
    const log: string[] = [];
    let before = '';
    const r = await migrateInProcess({
      ramBytes: 8 * MiB,
      prepare: (mig, { srcRam }) => {
        before = digestRam(srcRam).digest;
        mig.notifiers.precopy.add((e) => (e.reason === 'SETUP' ? new Error('balloon says no') : undefined));
        recordChains(mig, log);
      },
    });
    expect(r.info.status).toBe('failed');
    expect(r.info.error?.code).toBe('VMIG_ERR_NOTIFIER');
    expect(r.info.error?.message).toContain('balloon says no');
    // The vetoing notifier stopped the chain: the recorder after it never heard SETUP.
    expect(precopyOnly(log)).toBe('CLEANUP:failed');
    expect(log.slice(-2)).toEqual(['state:status:failed', 'state:failed:failed']);
    expect(digestRam(r.srcRam).digest).toBe(before);
  });

  it('the destination vanishing mid-iteration: failed, CLEANUP once, writers keep running', async () => {
    const log: string[] = [];
    const r = await migrateInProcess({
      ramBytes: 32 * MiB,
      writers: { writers: 2, dirtyRate: 4 * MiB },
      params: { maxBandwidth: 8 * MiB },
      prepare: (mig, { destroyDestination }) => {
        recordChains(mig, log);
        mig.notifiers.state.add((e) => {
          if (e.type === 'status' && e.status === 'active') setTimeout(destroyDestination, 150);
        });
      },
    });
    expect(r.info.status).toBe('failed');
    expect(['VMIG_ERR_PEER_CLOSED', 'VMIG_ERR_CHANNEL']).toContain(r.info.error?.code);
    expect(count(log, 'CLEANUP:failed')).toBe(1);
    expect(log).not.toContain('COMPLETE');
    expect(r.writersRunningAfter).toBe(true);
  });

  it('a failure in the completion phase (a device cannot flush): failed after COMPLETE, CLEANUP once, writers resumed', async () => {
    const log: string[] = [];
    const broken: VmStateDevice = {
      idstr: 'broken',
      instanceId: 0,
      versionId: 1,
      minimumVersionId: 1,
      save: () => {},
      load: async () => {},
      flushToRam: () => {
        throw new VmigError('VMIG_ERR_DEVICE_STATE', 'device could not flush its cache');
      },
    };
    const r = await migrateInProcess({
      ramBytes: 16 * MiB,
      writers: { writers: 1, dirtyRate: 4 * MiB },
      srcDevices: () => new DeviceRegistry().register(broken),
      prepare: (mig) => recordChains(mig, log),
    });
    expect(r.info.status).toBe('failed');
    expect(r.info.error?.code).toBe('VMIG_ERR_DEVICE_STATE');
    expect(precopyOnly(log)).toMatch(/,COMPLETE,CLEANUP:failed$/);
    expect(count(log, 'CLEANUP:failed')).toBe(1);
    expect(r.writersRunningAfter).toBe(true);
  });

  it('cancel: cancelling, then CLEANUP once, then cancelled; writers resume', async () => {
    const log: string[] = [];
    const r = await migrateInProcess({
      ramBytes: 32 * MiB,
      writers: { writers: 2, dirtyRate: 4 * MiB },
      params: { maxBandwidth: 8 * MiB },
      prepare: (mig, { abort }) => {
        recordChains(mig, log);
        mig.notifiers.state.add((e) => {
          if (e.type === 'status' && e.status === 'active') setTimeout(() => abort.abort(), 100);
        });
      },
    });
    expect(r.info.status).toBe('cancelled');
    expect(r.info.error?.code).toBe('VMIG_ERR_CANCELLED');
    const states = log.filter((e) => e.startsWith('state:status:'));
    expect(states.slice(-2)).toEqual(['state:status:cancelling', 'state:status:cancelled']);
    expect(count(log, 'CLEANUP:cancelled')).toBe(1);
    expect(log.indexOf('CLEANUP:cancelled')).toBeGreaterThan(log.indexOf('state:status:cancelling'));
    expect(log.indexOf('CLEANUP:cancelled')).toBeLessThan(log.indexOf('state:status:cancelled'));
    expect(log.at(-1)).toBe('state:failed:cancelled');
    expect(r.writersRunningAfter).toBe(true);
  });
});

describe('completion hook', () => {
  it("a device's writes into RAM after the stop travel in the final pass", async () => {
    let dstIts: ItsTableDevice | undefined;
    let srcIts: ItsTableDevice | undefined;
    const r = await migrateInProcess({
      ramBytes: 32 * MiB,
      writers: { writers: 2, dirtyRate: 16 * MiB },
      srcDevices: (ram) => new DeviceRegistry().register((srcIts = new ItsTableDevice(() => ram))),
      dstDevices: (ram) => new DeviceRegistry().register((dstIts = new ItsTableDevice(ram))),
    });
    expect(r.info.status, JSON.stringify(r.info.error)).toBe('completed');
    expect(srcIts?.flushed).toBeDefined();
    expect(dstIts?.flushed).toEqual(srcIts?.flushed);
    expect(dstIts?.tableInRam).toBe(true);
    expect(differingPages(r.srcRam, r.dstRam!)).toEqual([]);
  });
});

describe('free page hinting', () => {
  it('hinted pages are not sent; a write racing with the hint is never lost', async () => {
    const RAM = 16 * MiB;
    const HINT_FROM = 1024;
    const HINT_PAGES = 2048;
    const REUSED = [1100, 1101, 1102, 2000, 3071];
    let hinting: FreePageHinting | undefined;
    let windowWrites: number[] = [];
    let skipped = 0;
    let hinted = false;
    const r = await migrateInProcess({
      ramBytes: RAM,
      writers: { writers: 2, dirtyRate: 2 * MiB },
      params: { maxBandwidth: 32 * MiB },
      prepare: (mig, { vcpus, srcRam }) => {
        hinting = new FreePageHinting(mig.saver);
        hinting.attach(mig.notifiers.precopy);
        mig.notifiers.precopy.add((e) => {
          if (e.reason !== 'AFTER_BITMAP_SYNC' || hinted) return;
          hinted = true;
          // Writes completed before this point may be skipped if their page is hinted;
          // a write stamped later than this began after the window opened.
          windowWrites = [0, 1].map((i) => vcpus.writesOf(i));
          skipped = hinting!.hint('pc.ram', HINT_FROM, HINT_PAGES);
          // The guest reuses some of the pages it just reported free.
          for (const p of REUSED) srcRam.blocks[0]!.writeGuest(p * TARGET_PAGE_SIZE + 8, Buffer.from(`reused ${p}`));
        });
      },
    });
    expect(r.info.status, JSON.stringify(r.info.error)).toBe('completed');
    expect(skipped).toBe(HINT_PAGES);
    const src = r.srcRam.blocks[0]!;
    const words = new Int32Array(src.segmentSabs[0]!);
    const writtenInWindow = (page: number): boolean => {
      for (let slot = 0; slot < TARGET_PAGE_SIZE / 64; slot++) {
        const w = (page * TARGET_PAGE_SIZE) / 4 + slot * 16;
        if (words[w] !== 0x56434155 || words[w + 3] !== page) continue;
        const writer = words[w + 1]!;
        if ((writer === 0 || writer === 1) && words[w + 2]! >>> 0 >= windowWrites[writer]! + 1) return true;
      }
      return false;
    };
    const diff = differingPages(r.srcRam, r.dstRam!);
    let racing = 0;
    for (let p = HINT_FROM; p < HINT_FROM + HINT_PAGES; p++) if (writtenInWindow(p)) racing++;
    // Writers did write hinted pages after the hint, so the race was exercised.
    expect(racing).toBeGreaterThan(0);
    for (const p of diff) {
      // Only hinted pages may differ, and only if nothing wrote them after the window opened.
      expect(p >= HINT_FROM && p < HINT_FROM + HINT_PAGES, `page ${p} differs but was not hinted`).toBe(true);
      expect(writtenInWindow(p), `page ${p}: a write after the hint was lost`).toBe(false);
      expect(REUSED).not.toContain(p);
    }
    // And hinting did save something: most hinted pages were never sent.
    expect(diff.length).toBeGreaterThan(HINT_PAGES / 2);
  });
});

describe('device state', () => {
  it('a device version the destination does not support is a clear error on both ends', async () => {
    const r = await migrateInProcess({
      ramBytes: 8 * MiB,
      srcDevices: () => new DeviceRegistry().register(new VcpuStateDevice(() => ({ writers: 0, writes: 0, pattern: 'uniform' }), 2)),
      dstDevices: () => new DeviceRegistry().register(new VcpuStateDevice(() => ({ writers: 0, writes: 0, pattern: '' }))),
    });
    expect(r.dstError?.code).toBe('VMIG_ERR_DEVICE_VERSION');
    expect(r.dstError?.message).toContain("device 'vmig-vcpus'");
    expect(r.info.status).toBe('failed');
    expect(r.info.error?.code).toBe('VMIG_ERR_REMOTE');
  });

  it('device state round-trips through msgpack', async () => {
    let dev: VcpuStateDevice | undefined;
    const r = await migrateInProcess({
      ramBytes: 8 * MiB,
      srcDevices: () => new DeviceRegistry().register(new VcpuStateDevice(() => ({ writers: 3, writes: 12345, pattern: 'hot' }))),
      dstDevices: () => new DeviceRegistry().register((dev = new VcpuStateDevice(() => ({ writers: 0, writes: 0, pattern: '' })))),
    });
    expect(r.info.status).toBe('completed');
    expect(dev?.loaded).toEqual({ writers: 3, writes: 12345, pattern: 'hot' });
  });
});
