/**
 * The recv channel's parser (packet-receiver.ts) driven by a simulated transport: reads of
 * arbitrary sizes land where target() says, the way Node's onread does over a real socket.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { GuestRam, TARGET_PAGE_SIZE } from '@vmig/core';
import { encodeMultifdStream, MULTIFD_STREAM_PAGES, type MultifdStream } from '../src/testing.js';
import { MULTIFD_PACKET_HEADER_SIZE, PacketReceiver, type PacketReceiverHooks } from '../src/index.js';

const PAGES = MULTIFD_STREAM_PAGES;

/** A channel's byte stream (packets of pages, runs and scattered, zero pages, SYNCs); RAM starts as 0xee (see receiver()). */
const buildStream = (method: 'none' | 'lz4' | 'zlib'): Promise<MultifdStream> => encodeMultifdStream(method, 0xee);

interface Run {
  ram: GuestRam;
  rx: PacketReceiver;
  syncs: number;
  begun: number;
  ended: number;
  error: unknown;
  resumed: () => Promise<void>;
}

/**
 * A receiver with hooks that count; `ramLater` makes guest RAM appear only when asked;
 * `pages` and `segmentBytes` make a larger block in segments.
 */
function receiver(opts: { ramLater?: boolean; onSync?: () => void; pages?: number; segmentBytes?: number } = {}): Run & { giveRam: () => void } {
  const ram = GuestRam.create([{ idstr: 'pc.ram', size: (opts.pages ?? PAGES) * TARGET_PAGE_SIZE }], { prefault: false, ...(opts.segmentBytes ? { segmentBytes: opts.segmentBytes } : {}) });
  // Non-zero everywhere, so zero pages and untouched pages show.
  for (const seg of ram.blocks[0]!.segments) seg.fill(0xee);
  let haveRam = !opts.ramLater;
  let ramWaiter: (() => void) | undefined;
  let resumeWaiter: (() => void) | undefined;
  const run = {
    ram,
    syncs: 0,
    begun: 0,
    ended: 0,
    error: undefined as unknown,
    resumed: () => new Promise<void>((r) => (resumeWaiter = r)),
    giveRam: () => {
      haveRam = true;
      ramWaiter?.();
    },
  } as Run & { giveRam: () => void };
  const hooks: PacketReceiverHooks = {
    ram: () => (haveRam ? ram : undefined),
    ramReady: () => (haveRam ? Promise.resolve() : new Promise<void>((r) => (ramWaiter = r))),
    beginPages: () => void run.begun++,
    endPages: () => void run.ended++,
    sync: () => {
      run.syncs++;
      opts.onSync?.();
    },
    resume: () => resumeWaiter?.(),
    fail: (e) => {
      run.error = e;
      resumeWaiter?.(); // ends drive()
    },
  };
  run.rx = new PacketReceiver(hooks, 'multifd/0', false);
  return run;
}

/** Feeds `stream` as reads of the given sizes (cycled), each landing where target() says. */
async function drive(run: Run, stream: Uint8Array, sizes: number[]): Promise<void> {
  let pos = 0;
  let k = 0;
  while (pos < stream.length && run.error === undefined) {
    const t = run.rx.target();
    expect(t.length).toBeGreaterThan(0);
    const n = Math.min(t.length, sizes[k++ % sizes.length]!, stream.length - pos);
    t.set(stream.subarray(pos, pos + n));
    pos += n;
    const resumed = run.resumed();
    if (!run.rx.landed(t, n)) await resumed;
  }
}

describe('PacketReceiver: reads land straight in guest RAM', () => {
  for (const method of ['none', 'lz4', 'zlib'] as const) {
    it(`${method}: any split of the stream gives the same RAM, counts and SYNCs`, async () => {
      const built = await buildStream(method);
      await fc.assert(
        fc.asyncProperty(fc.array(fc.integer({ min: 1, max: 9000 }), { minLength: 1, maxLength: 20 }), async (sizes) => {
          const run = receiver();
          await drive(run, built.stream, sizes);
          expect(run.error).toBeUndefined();
          expect(Buffer.compare(run.ram.blocks[0]!.host, built.expected)).toBe(0);
          expect(run.syncs).toBe(built.syncs);
          expect(run.begun).toBe(run.ended);
          expect(run.rx.totals).toEqual({ normal: built.normal, zero: built.zero, bytes: built.stream.length });
          expect(run.rx.atPacketBoundary).toBe(true);
        }),
        { numRuns: method === 'zlib' ? 15 : 40 },
      );
    });
  }

  for (const method of ['none', 'lz4'] as const) {
    it(`${method}: runs of pages across a segment edge of the block land on both sides of it, for any split`, async () => {
      // 1 MiB segments (256 pages); the stream's pages moved to 254.., so its first run is 254-257.
      const base = 256 - 2;
      const built = await encodeMultifdStream(method, 0xee, base);
      await fc.assert(
        fc.asyncProperty(fc.array(fc.integer({ min: 1, max: 9000 }), { minLength: 1, maxLength: 20 }), async (sizes) => {
          const run = receiver({ pages: base + PAGES, segmentBytes: 1 << 20 });
          expect(run.ram.blocks[0]!.segments).toHaveLength(2);
          await drive(run, built.stream, sizes);
          expect(run.error).toBeUndefined();
          expect(Buffer.compare(run.ram.blocks[0]!.read(0, (base + PAGES) * TARGET_PAGE_SIZE), built.expected)).toBe(0);
          expect(run.rx.totals).toEqual({ normal: built.normal, zero: built.zero, bytes: built.stream.length });
        }),
        { numRuns: 30 },
      );
    });
  }

  it('waits for guest RAM, staging what arrives meanwhile, then places it in order', async () => {
    const built = await buildStream('none');
    const run = receiver({ ramLater: true });
    // The first bytes arrive before the handoff, as the leftover of the init read.
    run.rx.feed(built.stream.subarray(0, 100));
    const driving = drive(run, built.stream.subarray(100), [3000]);
    await new Promise((r) => setTimeout(r, 20));
    expect(run.ram.blocks[0]!.host[0]).toBe(0xee); // nothing placed before RAM "exists"
    run.giveRam();
    await driving;
    expect(run.error).toBeUndefined();
    expect(Buffer.compare(run.ram.blocks[0]!.host, built.expected)).toBe(0);
  });

  it('a SYNC packet is taken only after every page before it is in place', async () => {
    const built = await buildStream('none');
    let run!: Run;
    const seen: boolean[] = [];
    run = receiver({
      onSync: () => {
        // First SYNC follows packets 0 and 1: pages 5, 6, 7, 20 are in place by then.
        seen.push(Buffer.compare(run.ram.blocks[0]!.host.subarray(20 * TARGET_PAGE_SIZE, 21 * TARGET_PAGE_SIZE), built.expected.subarray(20 * TARGET_PAGE_SIZE, 21 * TARGET_PAGE_SIZE)) === 0);
      },
    });
    await drive(run, built.stream, [777]);
    expect(seen).toEqual([true, true]);
  });

  it('hostile headers fail before a byte is written; begin/end stay paired', async () => {
    const cases: [string, (h: Uint8Array) => void, RegExp][] = [
      ['offset past the block', (h) => h.set([0, 0, 0, 0, 0, 0x10, 0, 0], 320), /outside block/],
      ['unaligned offset', (h) => (h[327] = 1), /not page aligned/],
      ['bad magic', (h) => (h[0] = 0), /bad magic/],
      ['unknown block', (h) => h.set(Buffer.from('nope\0'), 64), /unknown RAM block/],
      ['too many pages', (h) => h.set([0, 0, 1, 0], 12), /pages_alloc/],
    ];
    for (const [name, mutate, msg] of cases) {
      const built = await buildStream('none');
      const stream = built.stream.slice();
      mutate(stream.subarray(0, MULTIFD_PACKET_HEADER_SIZE));
      const run = receiver();
      await drive(run, stream, [5000]);
      expect((run.error as Error | undefined)?.message, name).toMatch(msg);
      expect(run.ram.blocks[0]!.host.every((b) => b === 0xee), name).toBe(true);
      expect(run.begun, name).toBe(run.ended);
      // Dead: further reads go nowhere near RAM.
      expect(run.rx.landed(run.rx.target(), 1)).toBe(false);
    }
  });

  it('a corrupt compressed payload fails the channel', async () => {
    const built = await buildStream('lz4');
    const stream = built.stream.slice();
    stream.fill(0x55, MULTIFD_PACKET_HEADER_SIZE + 4, MULTIFD_PACKET_HEADER_SIZE + 40);
    const run = receiver();
    await drive(run, stream, [4096]);
    expect((run.error as Error | undefined)?.message).toMatch(/lz4/);
    expect(run.begun).toBe(run.ended);
  });
});
