/**
 * Postcopy recovery's pure parts: the RECV_BITMAP / RESUME messages (QEMU's formats, read in
 * pieces of any size, hostile ones refused), the source's reload of its dirty bitmaps from a
 * received bitmap, and the destination's held and re-sent page requests.
 */
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import {
  createMissingPages,
  createReturnPath,
  decodeRecvBitmapCmd,
  decodeRpRecvBitmap,
  decodeRpReqPages,
  decodeRpResumeAck,
  encodeRecvBitmapCmd,
  encodeRpRecvBitmap,
  encodeRpResumeAck,
  GuestRam,
  MIG_RP_MSG_RECV_BITMAP,
  MIG_RP_MSG_REQ_PAGES_ID,
  MIG_RP_MSG_RESUME_ACK,
  MIGRATION_RESUME_ACK_VALUE,
  MigrationStats,
  MissingPagesPlacer,
  RamSaver,
  RecvBitmapTrailer,
  recvBitmapBytes,
  recvBitmapTest,
  ReturnPathWriter,
  RpMessageReader,
  StreamError,
  SyncFd,
  createSyncFd,
  TARGET_PAGE_SIZE,
} from '../src/index.js';

const tmp = mkdtempSync(join(tmpdir(), 'vmig-recovery-unit-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** Reads every return-path message (and RECV_BITMAP's raw trailer) out of `bytes`, fed in pieces of `cuts` sizes. */
function readRp(bytes: Uint8Array, pages: (idstr: string) => number, cuts: number[]): { type: number; data: Uint8Array; bitmap?: Uint8Array }[] {
  const reader = new RpMessageReader();
  const out: { type: number; data: Uint8Array; bitmap?: Uint8Array }[] = [];
  let trailer: RecvBitmapTrailer | undefined;
  let pos = 0;
  let i = 0;
  while (pos < bytes.length) {
    const n = Math.min(Math.max(1, cuts[i++ % cuts.length]!), bytes.length - pos);
    const space = reader.space();
    space.set(bytes.subarray(pos, pos + n));
    reader.filled(n);
    pos += n;
    for (;;) {
      if (trailer) {
        const t = trailer;
        reader.takeRaw((b, s, e) => t.feed(b, s, e));
        if (!t.done) break;
        out[out.length - 1]!.bitmap = t.bitmap;
        trailer = undefined;
      }
      const m = reader.next();
      if (!m) break;
      out.push({ type: m.type, data: m.data.slice() });
      if (m.type === MIG_RP_MSG_RECV_BITMAP) {
        const idstr = decodeRpRecvBitmap(m.data);
        trailer = new RecvBitmapTrailer(idstr, pages(idstr));
      }
    }
  }
  return out;
}

describe('RECV_BITMAP and RESUME_ACK on the wire', () => {
  it('a received bitmap, read in pieces of any size after its message, is the destination\'s bits; a RESUME_ACK after it is read too', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 700 }), fc.array(fc.integer({ min: 1, max: 40 }), { minLength: 1, maxLength: 8 }), fc.integer(), (pages, cuts, seed) => {
        const received = (p: number): boolean => ((p * 2654435761 + seed) >>> 7) % 3 === 0;
        const bytes = new Uint8Array([...encodeRpRecvBitmap('pc.ram', pages, received), ...encodeRpResumeAck()]);
        const msgs = readRp(bytes, () => pages, cuts);
        expect(msgs.map((m) => m.type)).toEqual([MIG_RP_MSG_RECV_BITMAP, MIG_RP_MSG_RESUME_ACK]);
        const bitmap = msgs[0]!.bitmap!;
        expect(bitmap.length).toBe(recvBitmapBytes(pages));
        expect(bitmap.length % 8).toBe(0);
        for (let p = 0; p < pages; p++) expect(recvBitmapTest(bitmap, p)).toBe(received(p));
        // The padding after the last page is zero.
        for (let p = pages; p < bitmap.length * 8; p++) expect(recvBitmapTest(bitmap, p)).toBe(false);
        expect(decodeRpResumeAck(msgs[1]!.data)).toBe(MIGRATION_RESUME_ACK_VALUE);
      }),
    );
  });

  it("QEMU's layout: be64 size (bytes, rounded up to 8), bit i of byte i/8, then the end mark 0x0123456789abcdef", () => {
    const b = encodeRpRecvBitmap('ab', 10, (p) => p === 0 || p === 9);
    // Header: type 5, length 3 (u8 2, "ab").
    expect([...b.subarray(0, 7)]).toEqual([0, MIG_RP_MSG_RECV_BITMAP, 0, 3, 2, 0x61, 0x62]);
    expect([...b.subarray(7, 15)]).toEqual([0, 0, 0, 0, 0, 0, 0, 8]);
    expect([...b.subarray(15, 23)]).toEqual([0x01, 0x02, 0, 0, 0, 0, 0, 0]);
    expect([...b.subarray(23)]).toEqual([0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]);
  });

  it('a bitmap of another size, or without its end mark, is refused (ram_dirty_bitmap_reload)', () => {
    const good = encodeRpRecvBitmap('pc.ram', 100, () => true);
    expect(() => readRp(good, () => 200, [good.length])).toThrow(/needs 32/);
    const badEnd = good.slice();
    badEnd[badEnd.length - 1] ^= 1;
    expect(() => readRp(badEnd, () => 100, [7])).toThrow(StreamError);
    expect(() => readRp(badEnd, () => 100, [7])).toThrow(/end mark/);
  });

  it('the command names one block; bad names and a RESUME_ACK of another length are refused', () => {
    expect(decodeRecvBitmapCmd(encodeRecvBitmapCmd('pc.ram'))).toBe('pc.ram');
    for (const bad of [new Uint8Array(0), new Uint8Array([0]), new Uint8Array([5, 0x61]), new Uint8Array([1, 0x61, 0x62])]) {
      expect(() => decodeRecvBitmapCmd(bad)).toThrow(StreamError);
    }
    expect(() => decodeRpResumeAck(new Uint8Array(3))).toThrow(/RESUME_ACK of 3 bytes/);
    expect(() => encodeRecvBitmapCmd('')).toThrow(RangeError);
  });
});

describe("the source's dirty bitmaps from the destination's received bitmap", () => {
  it('dirty = not received, exactly (no bit past the block), and the scan starts over with that count', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 300 }), fc.integer(), (pages, seed) => {
        const ram = GuestRam.create([{ idstr: 'a', size: pages * TARGET_PAGE_SIZE }, { idstr: 'b', size: 3 * TARGET_PAGE_SIZE }]);
        const saver = new RamSaver(ram, new MigrationStats());
        saver.setup();
        const received = (p: number): boolean => ((p * 40503 + seed) >>> 5) % 4 !== 0;
        const bytes = encodeRpRecvBitmap('a', pages, received);
        const bitmap = bytes.subarray(bytes.length - 8 - recvBitmapBytes(pages), bytes.length - 8);
        saver.reloadFromReceived(0, bitmap);
        saver.reloadFromReceived(1, new Uint8Array(8).fill(0xff));
        saver.restartScan();
        let expected = 0;
        for (let p = 0; p < pages; p++) {
          expect(saver.bitmaps[0]!.test(p)).toBe(!received(p));
          if (!received(p)) expected++;
        }
        expect(saver.bitmaps[0]!.count()).toBe(expected);
        expect(saver.bitmaps[1]!.count()).toBe(0);
        expect(saver.dirtyPages).toBe(expected);
      }),
    );
  });
});

describe("the destination's page requests across a pause", () => {
  it('held while paused (nothing written), then every page requested and not received asked for again, the first naming its block', () => {
    const file = join(tmp, 'rp1.bin');
    const fd = openSync(file, 'w');
    const rp = createReturnPath(fd);
    const shared = createMissingPages([{ idstr: 'x', pages: 40 }, { idstr: 'y', pages: 40 }], 4, false, rp);
    const placer = new MissingPagesPlacer(shared);
    placer.markAllReceived();
    placer.markMissing(0, 80);
    const writer = new ReturnPathWriter(rp);
    // Before the pause: one request goes out.
    expect(writer.requestPage(1, 'y', 5 * TARGET_PAGE_SIZE, TARGET_PAGE_SIZE)).toBe(true);
    writer.pause();
    // Paused: a vCPU's request is held (false), nothing is written.
    expect(writer.requestPage(0, 'x', 0, TARGET_PAGE_SIZE)).toBe(false);
    const before = readFileSync(file).length;
    // The vCPUs' `requested` bits (as MissingPagesVcpu sets them): pages 3 and 45 (y:5); 45 is then placed.
    const requested = new Int32Array(shared.requested);
    Atomics.or(requested, 0, 1 << 3);
    Atomics.or(requested, 1, 1 << (45 - 32));
    placer.place(45, () => {});
    writer.reopen(fd);
    expect(writer.requestPage(0, 'x', 0, TARGET_PAGE_SIZE)).toBe(false);
    writer.resume();
    expect(placer.requestAgain()).toBe(1);
    closeSync(fd);
    const after = readFileSync(file).subarray(before);
    const msgs = readRp(after, () => 0, [after.length]);
    expect(msgs).toHaveLength(1);
    // A new return path: the block is named again.
    expect(msgs[0]!.type).toBe(MIG_RP_MSG_REQ_PAGES_ID);
    expect(decodeRpReqPages(msgs[0]!.type, msgs[0]!.data)).toEqual({ idstr: 'x', start: 3 * TARGET_PAGE_SIZE, length: TARGET_PAGE_SIZE });
  });

  it('a SyncFd closed and reopened writes to the new fd only', () => {
    const a = join(tmp, 'a.bin');
    const b = join(tmp, 'b.bin');
    const fa = openSync(a, 'w');
    const fb = openSync(b, 'w');
    const io = new SyncFd(createSyncFd(fa));
    expect(io.write(new Uint8Array([1]))).toBe(true);
    io.close();
    expect(io.write(new Uint8Array([2]))).toBe(false);
    io.reopen(fb);
    expect(io.fd).toBe(fb);
    expect(io.write(new Uint8Array([3]))).toBe(true);
    closeSync(fa);
    closeSync(fb);
    expect([...readFileSync(a)]).toEqual([1]);
    expect([...readFileSync(b)]).toEqual([3]);
  });
});

describe('recovery commands outside a recovery', () => {
  it('RECV_BITMAP and POSTCOPY_RESUME in a stream that is not a recovery connection are refused (VMIG_ERR_POSTCOPY), RAM untouched', async () => {
    const { MemorySink, MemorySource, putFileHeader, putCommand, putEof, qemuLoadVmState, MIG_CMD_RECV_BITMAP, MIG_CMD_POSTCOPY_RESUME } = await import('../src/index.js');
    const { qemuDevices } = await import('./helpers.js');
    for (const [cmd, data] of [
      [MIG_CMD_RECV_BITMAP, encodeRecvBitmapCmd('pc.ram')],
      [MIG_CMD_POSTCOPY_RESUME, new Uint8Array(0)],
    ] as const) {
      const ram = GuestRam.create([{ idstr: 'pc.ram', size: 16 * TARGET_PAGE_SIZE }], { prefault: false });
      const w = new MemorySink();
      putFileHeader(w, 'none');
      putCommand(w, cmd, data);
      putEof(w);
      await expect(qemuLoadVmState(new MemorySource([w.bytes()]), { ram, createRam: () => ram, devices: qemuDevices(), onRecvBitmap: () => {}, onPostcopyResume: async () => {} })).rejects.toMatchObject({
        code: 'VMIG_ERR_POSTCOPY',
        message: expect.stringMatching(/outside a postcopy recovery/),
      });
      expect(ram.blocks[0]!.host.every((b) => b === 0)).toBe(true);
    }
  });
});
