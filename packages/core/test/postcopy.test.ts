/**
 * Postcopy's wire messages and the destination's state machine, fed hostile input: every
 * bad message is a clear error with a stable code and nothing lands outside a block.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  createReturnPath,
  checkPostcopyAdvise,
  decodePostcopyRamDiscard,
  decodeRpReqPages,
  discardCommands,
  encodePostcopyAdvise,
  encodePostcopyRamDiscard,
  encodeRpReqPages,
  GuestRam,
  MAX_DISCARDS_PER_COMMAND,
  MemorySink,
  MemorySource,
  MIG_CMD_OPEN_RETURN_PATH,
  MIG_CMD_PACKAGED,
  MIG_CMD_POSTCOPY_ADVISE,
  MIG_CMD_POSTCOPY_LISTEN,
  MIG_CMD_POSTCOPY_RAM_DISCARD,
  MIG_CMD_POSTCOPY_RUN,
  MIG_RP_MSG_REQ_PAGES,
  MIG_RP_MSG_REQ_PAGES_ID,
  MigrationNotifiers,
  PostcopyIncoming,
  putCommand,
  putFileHeader,
  putRamMemSize,
  putSectionFooter,
  putSectionFull,
  putEof,
  putRamEos,
  QEMU_VM_SECTION_START,
  qemuLoadVmState,
  TARGET_PAGE_SIZE,
  VmigError,
  encodePackagedLength,
} from '../src/index.js';
import { qemuDevices } from './helpers.js';

const P = TARGET_PAGE_SIZE;


/** The code of the VmigError `f` throws, undefined if it does not throw. */
function codeOf(f: () => unknown): string | undefined {
  try {
    f();
  } catch (e) {
    return (e as VmigError).code;
  }
  return undefined;
}

describe('postcopy wire messages', () => {
  it('discard commands round-trip and cover exactly the set bits, at most 12 ranges each', () => {
    fc.assert(
      fc.property(fc.array(fc.boolean(), { minLength: 1, maxLength: 300 }), (bits) => {
        const nextSet = (from: number): number => bits.indexOf(true, from);
        const nextClear = (from: number): number => bits.indexOf(false, from);
        const seen = new Array<boolean>(bits.length).fill(false);
        for (const cmd of discardCommands('pc.ram', bits.length, nextSet, nextClear)) {
          const { idstr, ranges } = decodePostcopyRamDiscard(cmd);
          expect(idstr).toBe('pc.ram');
          expect(ranges.length).toBeGreaterThan(0);
          expect(ranges.length).toBeLessThanOrEqual(MAX_DISCARDS_PER_COMMAND);
          for (const r of ranges) for (let p = r.start / P; p < (r.start + r.length) / P; p++) seen[p] = true;
        }
        expect(seen).toEqual(bits);
      }),
    );
  });

  it('page requests round-trip, with and without the block name', () => {
    const a = encodeRpReqPages('pc.ram', 5 * P, P);
    expect((a[0]! << 8) | a[1]!).toBe(MIG_RP_MSG_REQ_PAGES_ID);
    expect(decodeRpReqPages(MIG_RP_MSG_REQ_PAGES_ID, a.subarray(4))).toEqual({ idstr: 'pc.ram', start: 5 * P, length: P });
    const b = encodeRpReqPages(undefined, 7 * P, 2 * P);
    expect((b[0]! << 8) | b[1]!).toBe(MIG_RP_MSG_REQ_PAGES);
    expect(decodeRpReqPages(MIG_RP_MSG_REQ_PAGES, b.subarray(4))).toEqual({ idstr: undefined, start: 7 * P, length: 2 * P });
  });

  it('malformed messages are rejected with stable codes', () => {
    const code = codeOf;
    expect(code(() => checkPostcopyAdvise(new Uint8Array(3)))).toBe('VMIG_ERR_STREAM_FORMAT');
    const bigPages = encodePostcopyAdvise();
    bigPages[6] = 0x20; // 2 MiB host pages
    expect(code(() => checkPostcopyAdvise(bigPages))).toBe('VMIG_ERR_POSTCOPY');
    const d = encodePostcopyRamDiscard('pc.ram', [{ start: 0, length: P }]);
    const badVersion = d.slice();
    badVersion[0] = 1;
    expect(code(() => decodePostcopyRamDiscard(badVersion))).toBe('VMIG_ERR_STREAM_FORMAT');
    expect(code(() => decodePostcopyRamDiscard(d.subarray(0, d.length - 3)))).toBe('VMIG_ERR_STREAM_FORMAT');
    const noNul = d.slice();
    noNul[2 + 6] = 1;
    expect(code(() => decodePostcopyRamDiscard(noNul))).toBe('VMIG_ERR_STREAM_FORMAT');
    expect(code(() => decodePostcopyRamDiscard(new Uint8Array([0, 200, 0])))).toBe('VMIG_ERR_STREAM_FORMAT');
    const req = encodeRpReqPages('pc.ram', 0, P).subarray(4);
    expect(code(() => decodeRpReqPages(MIG_RP_MSG_REQ_PAGES_ID, req.subarray(0, 10)))).toBe('VMIG_ERR_STREAM_FORMAT');
    expect(code(() => decodeRpReqPages(MIG_RP_MSG_REQ_PAGES_ID, req.subarray(0, req.length - 1)))).toBe('VMIG_ERR_STREAM_FORMAT');
    expect(code(() => decodeRpReqPages(MIG_RP_MSG_REQ_PAGES, req))).toBe('VMIG_ERR_STREAM_FORMAT');
  });
});

/** A stream up to the switch: header, return path, ADVISE, the RAM setup section, then `rest`. */
function streamWith(rest: (w: MemorySink) => void, advise = true): Uint8Array {
  const w = new MemorySink();
  putFileHeader(w, 'none');
  putCommand(w, MIG_CMD_OPEN_RETURN_PATH);
  if (advise) putCommand(w, MIG_CMD_POSTCOPY_ADVISE, encodePostcopyAdvise());
  putSectionFull(w, QEMU_VM_SECTION_START, { sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 });
  putRamMemSize(w, [{ idstr: 'pc.ram', usedLength: 64 * P }]);
  putRamEos(w);
  putSectionFooter(w, 2);
  rest(w);
  return w.bytes();
}

function packaged(w: MemorySink, inner: (p: MemorySink) => void): void {
  const p = new MemorySink();
  inner(p);
  const blob = p.bytes();
  putCommand(w, MIG_CMD_PACKAGED, encodePackagedLength(blob.length));
  w.putBytes(blob);
}

async function load(bytes: Uint8Array, notifiers = new MigrationNotifiers()): Promise<{ err: VmigError | undefined; pc: PostcopyIncoming; ram: GuestRam }> {
  const ram = GuestRam.create([{ idstr: 'pc.ram', size: 64 * P }], { prefault: false });
  ram.blocks[0]!.host.fill(0x5a);
  // No vCPU runs here, so nothing is written on the return path.
  const pc = new PostcopyIncoming({ returnPath: () => createReturnPath(-1), onRun: () => {}, notifiers });
  let err: VmigError | undefined;
  try {
    await qemuLoadVmState(new MemorySource([bytes]), { ram, createRam: () => ram, devices: qemuDevices(), postcopy: pc });
  } catch (e) {
    err = e as VmigError;
  }
  pc.abort();
  return { err, pc, ram };
}

describe('the destination state machine against hostile streams', () => {
  it('the whole sequence with no page left to send ends in END, notifiers in order', async () => {
    const order: string[] = [];
    const n = new MigrationNotifiers();
    n.postcopy.add((e) => void order.push(e.reason));
    const r = await load(
      streamWith((w) => {
        packaged(w, (p) => {
          putCommand(p, MIG_CMD_POSTCOPY_LISTEN);
          putCommand(p, MIG_CMD_POSTCOPY_RUN);
        });
        putEof(w);
      }),
      n,
    );
    expect(r.err).toBeUndefined();
    expect(r.pc.state).toBe('end');
    expect(order).toEqual(['PROBE', 'INBOUND_ADVISE', 'INBOUND_LISTEN', 'INBOUND_END']);
  });

  it('a refusing PROBE notifier stops it at ADVISE', async () => {
    const n = new MigrationNotifiers();
    n.postcopy.add((e) => (e.reason === 'PROBE' ? new Error('no userfaultfd here') : undefined));
    const r = await load(streamWith(() => {}), n);
    expect(r.err?.code).toBe('VMIG_ERR_NOTIFIER');
    expect(r.err?.message).toContain('no userfaultfd here');
  });

  const cases: [string, (w: MemorySink) => void, string][] = [
    ['LISTEN outside a package', (w) => putCommand(w, MIG_CMD_POSTCOPY_LISTEN), 'VMIG_ERR_POSTCOPY'],
    ['RUN before LISTEN', (w) => packaged(w, (p) => putCommand(p, MIG_CMD_POSTCOPY_RUN)), 'VMIG_ERR_POSTCOPY'],
    ['a package without RUN', (w) => packaged(w, (p) => putCommand(p, MIG_CMD_POSTCOPY_LISTEN)), 'VMIG_ERR_POSTCOPY'],
    ['a second ADVISE', (w) => putCommand(w, MIG_CMD_POSTCOPY_ADVISE, encodePostcopyAdvise()), 'VMIG_ERR_POSTCOPY'],
    ['a discard for an unknown block', (w) => putCommand(w, MIG_CMD_POSTCOPY_RAM_DISCARD, encodePostcopyRamDiscard('nope', [{ start: 0, length: P }])), 'VMIG_ERR_UNKNOWN_BLOCK'],
    ['a discard past the block', (w) => putCommand(w, MIG_CMD_POSTCOPY_RAM_DISCARD, encodePostcopyRamDiscard('pc.ram', [{ start: 63 * P, length: 2 * P }])), 'VMIG_ERR_BAD_OFFSET'],
    ['a discard not page aligned', (w) => putCommand(w, MIG_CMD_POSTCOPY_RAM_DISCARD, encodePostcopyRamDiscard('pc.ram', [{ start: 100, length: P }])), 'VMIG_ERR_BAD_OFFSET'],
    [
      'a package longer than the limit',
      (w) => {
        putCommand(w, MIG_CMD_PACKAGED, encodePackagedLength(0xffffffff));
      },
      'VMIG_ERR_STREAM_FORMAT',
    ],
    ['a discard after LISTEN', (w) => {
      packaged(w, (p) => {
        putCommand(p, MIG_CMD_POSTCOPY_LISTEN);
        putCommand(p, MIG_CMD_POSTCOPY_RUN);
      });
      putCommand(w, MIG_CMD_POSTCOPY_RAM_DISCARD, encodePostcopyRamDiscard('pc.ram', [{ start: 0, length: P }]));
    }, 'VMIG_ERR_POSTCOPY'],
  ];
  for (const [name, rest, code] of cases) {
    it(`${name}: ${code}, RAM untouched`, async () => {
      const r = await load(streamWith(rest));
      expect(r.err?.code).toBe(code);
      expect(r.ram.blocks[0]!.host.every((b) => b === 0x5a)).toBe(true);
    });
  }

  it('a postcopy stream into a destination without --postcopy: VMIG_ERR_POSTCOPY', async () => {
    const ram = GuestRam.create([{ idstr: 'pc.ram', size: 64 * P }], { prefault: false });
    await expect(qemuLoadVmState(new MemorySource([streamWith(() => {})]), { ram, createRam: () => ram, devices: qemuDevices() })).rejects.toMatchObject({ code: 'VMIG_ERR_POSTCOPY' });
  });
});

describe('the source serving page requests (RamSaver.saveRequestedPage)', () => {
  /** Page offsets of the PAGE records in a main-stream fragment. */
  function pagesIn(bytes: Uint8Array): number[] {
    const out: number[] = [];
    for (let p = 0; p + 8 <= bytes.length; ) {
      const addr = Number(Buffer.from(bytes).readBigUInt64BE(p));
      const flags = addr % P;
      p += 8;
      if (!(flags & 0x20)) p += 1 + bytes[p]!; // idstr
      if (flags & 0x08) {
        out.push((addr - flags) / P);
        p += P;
      } else if (flags & 0x02) p += 1;
    }
    return out;
  }

  it('sends a dirty page at once, moves the scan next to it, and does not send it twice on the main stream', async () => {
    const { RamSaver, MigrationStats } = await import('../src/index.js');
    const ram = GuestRam.create([{ idstr: 'pc.ram', size: 64 * P }], { prefault: false });
    for (let p = 0; p < 64; p++) ram.blocks[0]!.host.fill(p + 1, p * P, (p + 1) * P);
    const saver = new RamSaver(ram, new MigrationStats(), 'legacy');
    saver.setup();
    const w = new MemorySink();
    expect(saver.saveRequestedPage(w, 0, 40)).toBe(true);
    expect(saver.dirtyPages).toBe(63);
    saver.savePages(w, 3);
    // The requested page, then the scan goes on right after it.
    expect(pagesIn(w.bytes())).toEqual([40, 41, 42, 43]);
    // Already sent: not again on the main stream (it is on its way there).
    const again = new MemorySink();
    expect(saver.saveRequestedPage(again, 0, 41)).toBe(false);
    expect(again.bytes().length).toBe(0);
    expect(saver.dirtyPages).toBe(60);
  });
});

describe('requested pages sent by the return-path thread (urgent-pages.ts)', () => {
  const records = (bytes: Uint8Array): { page: number; idstr: string | undefined; zero: boolean }[] => {
    const out: { page: number; idstr: string | undefined; zero: boolean }[] = [];
    for (let p = 0; p + 8 <= bytes.length; ) {
      const addr = Number(Buffer.from(bytes).readBigUInt64BE(p));
      const flags = addr % P;
      p += 8;
      let idstr: string | undefined;
      if (!(flags & 0x20) && flags & 0x0a) {
        idstr = Buffer.from(bytes.subarray(p + 1, p + 1 + bytes[p]!)).toString();
        p += 1 + bytes[p]!;
      }
      if (flags & 0x08) p += P;
      else if (flags & 0x02) p += 1;
      if (flags & 0x0a) out.push({ page: (addr - flags) / P, idstr, zero: (flags & 0x02) !== 0 });
    }
    return out;
  };

  it('names each page in full, clears and counts a dirty page once, sends an already-sent page again, and moves the scan', async () => {
    const { RamSaver, MigrationStats, createUrgentPages, UrgentPageSender, UrgentPagesTally } = await import('../src/index.js');
    const ram = GuestRam.create([{ idstr: 'a', size: 8 * P }, { idstr: 'b', size: 16 * P }], { prefault: false });
    for (let p = 1; p < 16; p++) ram.blocks[1]!.host.fill(p, p * P, (p + 1) * P);
    const saver = new RamSaver(ram, new MigrationStats(), 'legacy');
    saver.setup();
    const shared = createUrgentPages(saver.bitmaps, true);
    const sender = new UrgentPageSender(ram, shared);
    const tally = new UrgentPagesTally(shared);
    const w = new MemorySink();
    sender.serve(w, MIG_RP_MSG_REQ_PAGES_ID, encodeRpReqPages('b', 4 * P, 2 * P).subarray(4));
    // REQ_PAGES: the block of the request before it; page 0 of 'b' is all zeros.
    sender.serve(w, MIG_RP_MSG_REQ_PAGES, encodeRpReqPages(undefined, 0, P).subarray(4));
    expect(records(w.bytes())).toEqual([
      { page: 4, idstr: 'b', zero: false },
      { page: 5, idstr: 'b', zero: false },
      { page: 0, idstr: 'b', zero: true },
    ]);
    let t = tally.take();
    expect(t).toMatchObject({ cleared: 3, next: { block: 1, page: 1 }, requests: 2, normal: 2, zero: 1 });
    saver.clearedElsewhere(t.cleared);
    expect(saver.dirtyPages).toBe(24 - 3);
    // Sent already (here or by the scan): sent again, counted as a page but not cleared again.
    const again = new MemorySink();
    sender.serve(again, MIG_RP_MSG_REQ_PAGES_ID, encodeRpReqPages('b', 5 * P, P).subarray(4));
    expect(records(again.bytes())).toEqual([{ page: 5, idstr: 'b', zero: false }]);
    t = tally.take();
    expect(t).toMatchObject({ cleared: 0, next: { block: 1, page: 6 }, requests: 1, normal: 1 });
    // Nothing new: no hint, no counts.
    expect(tally.take()).toMatchObject({ cleared: 0, next: undefined, requests: 0 });
    // The scan skips what the thread sent: every other page goes exactly once.
    saver.moveScan(1, 6);
    const rest = new MemorySink();
    while (saver.dirtyPages > 0) saver.savePages(rest, 4);
    const sent = records(rest.bytes()).map((r) => `${r.idstr ?? ''}${r.page}`);
    expect(sent).toHaveLength(21);
    expect(sent.filter((x) => x === 'b4' || x === 'b5' || x === 'b0')).toEqual([]);
  });
});

describe('hostile page requests at the source', () => {
  const hostile: [string, number, Uint8Array, string][] = [
    ['REQ_PAGES first', MIG_RP_MSG_REQ_PAGES, encodeRpReqPages(undefined, 0, P), 'VMIG_ERR_UNKNOWN_BLOCK'],
    ['unknown block', MIG_RP_MSG_REQ_PAGES_ID, encodeRpReqPages('nope', 0, P), 'VMIG_ERR_UNKNOWN_BLOCK'],
    ['misaligned', MIG_RP_MSG_REQ_PAGES_ID, encodeRpReqPages('pc.ram', 100, P), 'VMIG_ERR_BAD_OFFSET'],
    ['empty', MIG_RP_MSG_REQ_PAGES_ID, encodeRpReqPages('pc.ram', 0, 0), 'VMIG_ERR_BAD_OFFSET'],
    ['past the block', MIG_RP_MSG_REQ_PAGES_ID, encodeRpReqPages('pc.ram', 15 * P, 2 * P), 'VMIG_ERR_BAD_OFFSET'],
  ];

  it('the migration thread\'s queue: stable codes, nothing queued; good ones queued and counted', async () => {
    const { PageRequestQueue, RamSaver, MigrationStats } = await import('../src/index.js');
    const ram = GuestRam.create([{ idstr: 'pc.ram', size: 16 * P }], { prefault: false });
    const stats = new MigrationStats();
    const q = new PageRequestQueue(ram, new RamSaver(ram, stats), stats);
    for (const [name, type, m, code] of hostile) expect(codeOf(() => q.add(type, m.subarray(4))), name).toBe(code);
    expect(q.pending).toBe(0);
    expect(codeOf(() => q.add(MIG_RP_MSG_REQ_PAGES_ID, encodeRpReqPages('pc.ram', 15 * P, P).subarray(4)))).toBeUndefined();
    expect(codeOf(() => q.add(MIG_RP_MSG_REQ_PAGES, encodeRpReqPages(undefined, 2 * P, 2 * P).subarray(4)))).toBeUndefined();
    expect(q.pending).toBe(3);
    expect(stats.postcopyRequests).toBe(2);
  });

  it('the return-path thread\'s sender: the same codes, before any record or bitmap change', async () => {
    const { RamSaver, MigrationStats, createUrgentPages, UrgentPageSender } = await import('../src/index.js');
    const ram = GuestRam.create([{ idstr: 'pc.ram', size: 16 * P }], { prefault: false });
    const saver = new RamSaver(ram, new MigrationStats(), 'legacy');
    saver.setup();
    const sender = new UrgentPageSender(ram, createUrgentPages(saver.bitmaps, true));
    const w = new MemorySink();
    for (const [name, type, m, code] of hostile) expect(codeOf(() => sender.serve(w, type, m.subarray(4))), name).toBe(code);
    expect(w.bytesWritten).toBe(0);
    expect(saver.bitmaps[0]!.findNextClear(0)).toBe(-1);
  });
});
