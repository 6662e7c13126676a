/**
 * RAM blocks in segments (ram-block.ts): every access at and around segment edges gives what
 * one flat buffer would; nothing lands in another segment or outside the block.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { copyBytes, GuestRam, isZeroPage, MAX_BLOCK_BYTES, RamBlock, TARGET_PAGE_SIZE, VmigError } from '../src/index.js';

const MIB = 1 << 20;
const P = TARGET_PAGE_SIZE;

describe('copyBytes', () => {
  it('is set() at any size and alignment, into and out of a SharedArrayBuffer; out of range is a RangeError', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 3 * P }), fc.integer({ min: 0, max: 15 }), fc.integer({ min: 0, max: 15 }), fc.boolean(), (len, srcAt, dstAt, intoShared) => {
        const shared = new Uint8Array(new SharedArrayBuffer(4 * P));
        const plain = new Uint8Array(4 * P);
        const [from, into] = intoShared ? [plain, shared] : [shared, plain];
        for (let i = 0; i < from.length; i++) from[i] = (i * 7 + 3) & 0xff;
        into.fill(0xee);
        const expected = Uint8Array.from(into);
        expected.set(from.subarray(srcAt, srcAt + len), dstAt);
        copyBytes(into, dstAt, from.subarray(srcAt, srcAt + len));
        expect(Buffer.compare(Buffer.from(into.buffer), Buffer.from(expected.buffer))).toBe(0);
      }),
    );
    // Overlapping ranges of one buffer: as set() (memmove), both ways.
    const one = new Uint8Array(new SharedArrayBuffer(3 * P));
    for (let i = 0; i < one.length; i++) one[i] = i & 0xff;
    const model = Uint8Array.from(one);
    copyBytes(one, 100, one.subarray(0, 2 * P));
    model.set(model.subarray(0, 2 * P), 100);
    copyBytes(one, 0, one.subarray(300, 300 + 2 * P));
    model.set(model.subarray(300, 300 + 2 * P), 0);
    expect(Buffer.compare(Buffer.from(one.buffer), Buffer.from(model.buffer))).toBe(0);
    const into = new Uint8Array(new SharedArrayBuffer(2 * P));
    expect(() => copyBytes(into, P + 1, new Uint8Array(P))).toThrow(RangeError);
    expect(() => copyBytes(into, 2 * P - 1, new Uint8Array(2))).toThrow(RangeError);
  });
});

describe('isZeroPage', () => {
  it('finds a single set byte wherever it is (the bytes looked at first, and every other one)', () => {
    const buf = Buffer.alloc(3 * P);
    expect(isZeroPage(buf, P)).toBe(true);
    for (let i = 0; i < P; i++) {
      buf[P + i] = 1;
      expect(isZeroPage(buf, P)).toBe(false);
      buf[P + i] = 0;
    }
    buf[P - 1] = 1;
    buf[2 * P] = 1;
    expect(isZeroPage(buf, P)).toBe(true);
  });
});

describe('a RAM block in segments', () => {
  it('write and read of any range around the edges match a flat buffer; page(), bytes(), isZeroPage() too', () => {
    // 1 MiB segments, 3.5 of them: edges at 256, 512 and 768 pages.
    const size = 3.5 * MIB;
    const edgePages = [256, 512, 768];
    const around = fc.constantFrom(...edgePages).chain((e) => fc.integer({ min: -3 * P, max: 3 * P }).map((d) => e * P + d));
    fc.assert(
      fc.property(
        fc.array(fc.tuple(around, fc.integer({ min: 1, max: 3 * P }), fc.integer({ min: 1, max: 255 })), { minLength: 1, maxLength: 12 }),
        (writes) => {
          const block = RamBlock.create('b', size, { prefault: false, segmentBytes: MIB });
          expect(block.segments.map((s) => s.length)).toEqual([MIB, MIB, MIB, MIB / 2]);
          const flat = Buffer.alloc(size);
          for (const [offset, len, byte] of writes) {
            const start = Math.max(0, Math.min(offset, size - len));
            const data = Buffer.alloc(len, byte);
            block.write(start, data);
            flat.set(data, start);
          }
          expect(Buffer.compare(block.read(0, size), flat)).toBe(0);
          for (const e of edgePages) {
            for (const p of [e - 2, e - 1, e, e + 1]) {
              expect(Buffer.compare(block.page(p), flat.subarray(p * P, (p + 1) * P))).toBe(0);
              expect(block.isZeroPage(p)).toBe(flat.subarray(p * P, (p + 1) * P).every((b) => b === 0));
            }
            expect(block.segmentEnd(e * P - 1)).toBe(e * P);
            expect(block.segmentEnd(e * P)).toBe(Math.min(size, (e + 256) * P));
            // A range inside one segment is a view; one across an edge is refused.
            expect(block.bytes(e * P - P, P).length).toBe(P);
            expect(() => block.bytes(e * P - P, 2 * P)).toThrow(RangeError);
          }
        },
      ),
      { numRuns: 60 },
    );
  });

  it('writeGuest across an edge marks every page it touched dirty', () => {
    const block = RamBlock.create('b', 2 * MIB, { prefault: false, segmentBytes: MIB });
    block.writeGuest(MIB - 10, Buffer.alloc(20, 7));
    expect([255, 256].map((p) => block.dirtyLog.test(p))).toEqual([true, true]);
    expect(block.dirtyLog.count()).toBe(2);
    expect([...block.read(MIB - 11, 22)]).toEqual([0, ...new Array(20).fill(7), 0]);
    expect(() => block.write(2 * MIB - 1, Buffer.alloc(2))).toThrow(RangeError);
  });

  it('a zero page loaded where RAM may hold data is zeroed, in its own segment only', () => {
    const block = RamBlock.create('b', 2 * MIB, { prefault: false, segmentBytes: MIB });
    for (const seg of block.segments) seg.fill(9);
    block.loadZeroPage(256 * P, false);
    expect(block.isZeroPage(256)).toBe(true);
    expect(block.page(255).every((b) => b === 9)).toBe(true);
    expect(block.page(257).every((b) => b === 9)).toBe(true);
  });

  it('one view (`host`) only for a block of one segment; sizes up to 64 GiB, the segment a whole MiB', () => {
    expect(RamBlock.create('a', MIB, { prefault: false }).host.length).toBe(MIB);
    const split = RamBlock.create('b', 2 * MIB, { prefault: false, segmentBytes: MIB });
    expect(() => split.host).toThrow(VmigError);
    expect(() => split.host).toThrow(/2 segments/);
    expect(() => RamBlock.create('c', MAX_BLOCK_BYTES + P, { prefault: false })).toThrow(/up to/);
    for (const bad of [0, 4096, MIB + P, 3 * 2 ** 30]) expect(() => RamBlock.create('d', MIB, { prefault: false, segmentBytes: bad })).toThrow(/segment size/);
  });

  it('a block of 5 GiB (more than one typed array may hold) is made of 5 segments, and its last page is reachable', () => {
    const block = RamBlock.create('big', 5 * 2 ** 30, { prefault: false });
    expect(block.segments).toHaveLength(5);
    expect(block.pages).toBe((5 * 2 ** 30) / P);
    block.write(5 * 2 ** 30 - 2, Buffer.from([1, 2]));
    expect([...block.page(block.pages - 1).subarray(P - 2)]).toEqual([1, 2]);
    // Across the 4 GiB mark (no 32-bit offset anywhere).
    block.writeGuest(2 ** 32 - 1, Buffer.from([3, 4]));
    expect([...block.read(2 ** 32 - 1, 2)]).toEqual([3, 4]);
    expect(block.dirtyLog.test(2 ** 32 / P - 1) && block.dirtyLog.test(2 ** 32 / P)).toBe(true);
  });

  it('shared with another thread as its segments (toShared/fromShared): the same memory', () => {
    const ram = GuestRam.create([{ idstr: 'a', size: 3 * MIB }], { prefault: false, segmentBytes: MIB });
    const other = GuestRam.fromShared(ram.toShared());
    other.blocks[0]!.write(MIB + 5, Buffer.from([42]));
    expect(ram.blocks[0]!.read(MIB + 5, 1)[0]).toBe(42);
    expect(other.blocks[0]!.segmentBytes).toBe(MIB);
  });
});
