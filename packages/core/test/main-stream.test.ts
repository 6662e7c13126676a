import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  GuestRam,
  MemorySink,
  MemorySource,
  EndOfStream,
  MIG_CMD_PING,
  putCommand,
  putEof,
  putFileHeader,
  putRamEos,
  putRamMemSize,
  putRamPage,
  putRamZeroPage,
  putSectionFooter,
  putSectionFull,
  putSectionPart,
  QEMU_VM_SECTION_FULL,
  QEMU_VM_SECTION_PART,
  QEMU_VM_SECTION_START,
  qemuLoadVmState,
  decodeRamRecordHead,
  RAM_SAVE_FLAG_CONTINUE,
  RAM_SAVE_FLAG_EOS,
  RAM_SAVE_FLAG_PAGE,
  RAM_SAVE_FLAG_ZERO,
  type RamRecordAt,
  readVmDescription,
  VmigError,
  TARGET_PAGE_SIZE,
  type ByteWriter,
  StreamError,
} from '../src/index.js';
import { createRamFrom, precopyToMemory, qemuDevices, splitAt } from './helpers.js';

function sampleRam(): GuestRam {
  const ram = GuestRam.create(
    [
      { idstr: 'pc.ram', size: 64 * TARGET_PAGE_SIZE },
      { idstr: 'vga.vram', size: 8 * TARGET_PAGE_SIZE },
    ],
    { prefault: false },
  );
  // Mixed content: random pages, zero pages, a page with one byte set at its end.
  let x = 7;
  for (const b of ram.blocks) {
    for (let p = 0; p < b.pages; p++) {
      if (p % 3 === 0) continue;
      for (let i = 0; i < TARGET_PAGE_SIZE; i += 4) {
        x = (x * 1103515245 + 12345) >>> 0;
        b.host[p * TARGET_PAGE_SIZE + i] = x & 0xff;
      }
    }
    b.host[b.usedLength - 1] = 1;
  }
  return ram;
}

describe('main stream round trip', () => {
  it('precopy stream loads back into identical RAM, split at any byte', async () => {
    const ram = sampleRam();
    const stream = await precopyToMemory(ram);
    await fc.assert(
      fc.asyncProperty(fc.array(fc.nat(), { maxLength: 40 }), async (cuts) => {
        const src = new MemorySource(splitAt(stream, cuts));
        const res = await qemuLoadVmState(src, { createRam: createRamFrom, devices: qemuDevices() });
        expect(res.ram.blocks.map((b) => [b.idstr, b.usedLength])).toEqual([
          ['pc.ram', 64 * TARGET_PAGE_SIZE],
          ['vga.vram', 8 * TARGET_PAGE_SIZE],
        ]);
        for (let i = 0; i < ram.blocks.length; i++) expect(Buffer.from(res.ram.blocks[i]!.host).equals(Buffer.from(ram.blocks[i]!.host))).toBe(true);
        expect(res.machine).toBe('none');
        expect(res.zeroPages).toBeGreaterThan(0);
        expect(res.normalPages).toBeGreaterThan(0);
        const desc = (await readVmDescription(src)) as { devices: { name: string }[] };
        expect(desc.devices.map((d) => d.name)).toEqual(['timer', 'globalstate']);
      }),
      { numRuns: 30 },
    );
  });

  it('loads into RAM given up front and checks the block list against it', async () => {
    const ram = sampleRam();
    const stream = await precopyToMemory(ram);
    const mine = GuestRam.create(
      [
        { idstr: 'pc.ram', size: 64 * TARGET_PAGE_SIZE },
        { idstr: 'vga.vram', size: 8 * TARGET_PAGE_SIZE },
      ],
      { prefault: false },
    );
    await qemuLoadVmState(new MemorySource([stream]), { ram: mine, createRam: () => { throw new Error('must not create'); }, devices: qemuDevices() });
    expect(Buffer.from(mine.blocks[0]!.host).equals(Buffer.from(ram.blocks[0]!.host))).toBe(true);

    const wrong = GuestRam.create([{ idstr: 'pc.ram', size: 32 * TARGET_PAGE_SIZE }, { idstr: 'vga.vram', size: 8 * TARGET_PAGE_SIZE }], { prefault: false });
    await expect(qemuLoadVmState(new MemorySource([stream]), { ram: wrong, createRam: createRamFrom, devices: qemuDevices() })).rejects.toMatchObject({
      code: 'VMIG_ERR_BLOCK_MISMATCH',
    });
  });
});

/** A stream up to inside the first RAM section, for one 8-page block 'pc.ram'. */
function hostileStream(body: (w: ByteWriter) => void, opts: { magic?: number; version?: number } = {}): Uint8Array {
  const w = new MemorySink();
  if (opts.magic !== undefined || opts.version !== undefined) {
    w.put32(opts.magic ?? 0x5145564d);
    w.put32(opts.version ?? 3);
  } else {
    putFileHeader(w, 'none');
  }
  putSectionFull(w, QEMU_VM_SECTION_START, { sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 });
  putRamMemSize(w, [{ idstr: 'pc.ram', usedLength: 8 * TARGET_PAGE_SIZE }]);
  body(w);
  return w.bytes();
}

const PAGE = new Uint8Array(TARGET_PAGE_SIZE).fill(0xee);

async function loadHostile(stream: Uint8Array): Promise<{ error: unknown; ram: GuestRam }> {
  const ram = GuestRam.create([{ idstr: 'pc.ram', size: 8 * TARGET_PAGE_SIZE }], { prefault: false });
  ram.blocks[0]!.host.fill(0x11);
  let error: unknown;
  try {
    await qemuLoadVmState(new MemorySource([stream]), { ram, createRam: createRamFrom, devices: qemuDevices() });
  } catch (e) {
    error = e;
  }
  return { error, ram };
}

describe('hostile and malformed streams', () => {
  const cases: [string, Uint8Array, string][] = [
    ['bad magic', hostileStream(() => {}, { magic: 0x12345678 }), 'VMIG_ERR_STREAM_MAGIC'],
    ['bad version', hostileStream(() => {}, { version: 2 }), 'VMIG_ERR_STREAM_VERSION'],
    ['page past the block end', hostileStream((w) => putRamPage(w, 8 * TARGET_PAGE_SIZE, 'pc.ram', false, PAGE)), 'VMIG_ERR_BAD_OFFSET'],
    ['page far past the block end', hostileStream((w) => putRamPage(w, 2 ** 40, 'pc.ram', false, PAGE)), 'VMIG_ERR_BAD_OFFSET'],
    ['address beyond 2^53', hostileStream((w) => { w.put32(0xffffffff); w.put32(RAM_SAVE_FLAG_PAGE); }), 'VMIG_ERR_STREAM_FORMAT'],
    ['unknown block', hostileStream((w) => putRamPage(w, 0, 'nope', false, PAGE)), 'VMIG_ERR_UNKNOWN_BLOCK'],
    ['CONTINUE with no block yet', hostileStream((w) => w.put64(RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE)), 'VMIG_ERR_STREAM_FORMAT'],
    ['unknown RAM flag', hostileStream((w) => w.put64(0x400)), 'VMIG_ERR_STREAM_FORMAT'],
    ['XBZRLE (unsupported)', hostileStream((w) => w.put64(0x40)), 'VMIG_ERR_STREAM_FORMAT'],
    ['block list longer than its total', (() => {
      const w = new MemorySink();
      putFileHeader(w, 'none');
      putSectionFull(w, QEMU_VM_SECTION_START, { sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 });
      w.put64(TARGET_PAGE_SIZE + 4); // MEM_SIZE total 1 page
      w.put8(6); w.putBytes(new TextEncoder().encode('pc.ram')); w.put64(8 * TARGET_PAGE_SIZE);
      return w.bytes();
    })(), 'VMIG_ERR_STREAM_FORMAT'],
    ['missing footer', hostileStream((w) => { putRamEos(w); w.put8(0x7e); w.put32(9); }), 'VMIG_ERR_STREAM_FORMAT'],
    ['PART of a section never started', hostileStream((w) => { putRamEos(w); putSectionFooter(w, 2); putSectionPart(w, QEMU_VM_SECTION_PART, 77); }), 'VMIG_ERR_UNKNOWN_SECTION'],
    ['unknown device section', hostileStream((w) => { putRamEos(w); putSectionFooter(w, 2); putSectionFull(w, QEMU_VM_SECTION_FULL, { sectionId: 5, idstr: 'e1000', instanceId: 0, versionId: 1 }); }), 'VMIG_ERR_UNKNOWN_SECTION'],
    ['device version too new', hostileStream((w) => { putRamEos(w); putSectionFooter(w, 2); putSectionFull(w, QEMU_VM_SECTION_FULL, { sectionId: 5, idstr: 'timer', instanceId: 0, versionId: 3 }); }), 'VMIG_ERR_DEVICE_VERSION'],
    ['unknown section type', hostileStream((w) => { putRamEos(w); putSectionFooter(w, 2); w.put8(0x42); }), 'VMIG_ERR_STREAM_FORMAT'],
    ['unsupported command', hostileStream((w) => { putRamEos(w); putSectionFooter(w, 2); putCommand(w, 99); }), 'VMIG_ERR_STREAM_FORMAT'],
    ['PING of the wrong size', hostileStream((w) => { putRamEos(w); putSectionFooter(w, 2); putCommand(w, MIG_CMD_PING, new Uint8Array(2)); }), 'VMIG_ERR_STREAM_FORMAT'],
    ['EOF without RAM', (() => { const w = new MemorySink(); putFileHeader(w, 'none'); putEof(w); return w.bytes(); })(), 'VMIG_ERR_STREAM_FORMAT'],
  ];

  for (const [name, stream, code] of cases) {
    it(`rejects ${name} with ${code}, RAM untouched`, async () => {
      const { error, ram } = await loadHostile(stream);
      expect(error).toBeInstanceOf(VmigError);
      expect((error as VmigError).code).toBe(code);
      expect(ram.blocks[0]!.host.every((b) => b === 0x11)).toBe(true);
    });
  }

  it('reports a truncated stream, at every length', async () => {
    const stream = await precopyToMemory(GuestRam.create([{ idstr: 'pc.ram', size: 4 * TARGET_PAGE_SIZE }], { prefault: false }));
    // Everything up to EOF is needed; the vmdesc after it is optional.
    const whole = new MemorySource([stream]);
    await qemuLoadVmState(whole, { createRam: createRamFrom, devices: qemuDevices() });
    const eofAt = whole.bytesRead;
    for (let len = 0; len < eofAt; len += 37) {
      await expect(qemuLoadVmState(new MemorySource([stream.subarray(0, len)]), { createRam: createRamFrom, devices: qemuDevices() })).rejects.toBeInstanceOf(EndOfStream);
    }
  });

  it('a valid page at the last offset is accepted', async () => {
    const stream = hostileStream((w) => {
      putRamPage(w, 7 * TARGET_PAGE_SIZE, 'pc.ram', false, PAGE);
      putRamZeroPage(w, 0, 'pc.ram', true);
      putRamEos(w);
      putSectionFooter(w, 2);
      putEof(w);
    });
    const { error, ram } = await loadHostile(stream);
    expect(error).toBeUndefined();
    expect(ram.blocks[0]!.page(7).every((b) => b === 0xee)).toBe(true);
    expect(ram.blocks[0]!.page(0).every((b) => b === 0)).toBe(true);
  });
});

describe('zero pages into RAM created fresh (zeroUnlessLoaded)', () => {
  it('a page loaded earlier is zeroed again; a page never loaded is left alone (it is zero)', async () => {
    const stream = hostileStream((w) => {
      putRamPage(w, 3 * TARGET_PAGE_SIZE, 'pc.ram', false, PAGE);
      putRamZeroPage(w, 3 * TARGET_PAGE_SIZE, 'pc.ram', true);
      putRamPage(w, 5 * TARGET_PAGE_SIZE, 'pc.ram', true, PAGE);
      putRamZeroPage(w, 6 * TARGET_PAGE_SIZE, 'pc.ram', true);
      putRamEos(w);
      putSectionFooter(w, 2);
      putEof(w);
    });
    const ram = GuestRam.create([{ idstr: 'pc.ram', size: 8 * TARGET_PAGE_SIZE }], { prefault: false });
    // A marker the loader must not touch: page 6 was never loaded, so its zero record is skipped.
    ram.blocks[0]!.host[6 * TARGET_PAGE_SIZE] = 0x42;
    await qemuLoadVmState(new MemorySource([stream]), { ram, createRam: createRamFrom, devices: qemuDevices(), zeroUnlessLoaded: true });
    const b = ram.blocks[0]!;
    expect(b.page(3).every((x) => x === 0)).toBe(true);
    expect(b.page(5).every((x) => x === 0xee)).toBe(true);
    expect(b.host[6 * TARGET_PAGE_SIZE]).toBe(0x42);
    expect([3, 5, 6].map((p) => b.loaded.test(p))).toEqual([true, true, false]);
  });

  it('without it, every zero page is made zero', async () => {
    const stream = hostileStream((w) => {
      putRamZeroPage(w, 6 * TARGET_PAGE_SIZE, 'pc.ram', false);
      putRamEos(w);
      putSectionFooter(w, 2);
      putEof(w);
    });
    const ram = GuestRam.create([{ idstr: 'pc.ram', size: 8 * TARGET_PAGE_SIZE }], { prefault: false });
    ram.blocks[0]!.host[6 * TARGET_PAGE_SIZE] = 0x42;
    await qemuLoadVmState(new MemorySource([stream]), { ram, createRam: createRamFrom, devices: qemuDevices() });
    expect(ram.blocks[0]!.page(6).every((x) => x === 0)).toBe(true);
  });
});

describe('decodeRamRecordHead (RAM records read without waiting: the preempt channel)', () => {
  type Rec = { kind: 'page' | 'zero'; page: number; same: boolean; idstr: string } | { kind: 'eos' };
  const rec = fc.oneof(
    fc.record({ kind: fc.constantFrom<'page' | 'zero'>('page', 'zero'), page: fc.nat(1 << 20), same: fc.boolean(), idstr: fc.constantFrom('pc.ram', 'vga.vram', 'x'.repeat(255)) }),
    fc.constant<Rec>({ kind: 'eos' }),
  );

  it('finds each record of any sequence exactly when all its bytes are there, never before', () => {
    fc.assert(
      fc.property(fc.array(rec, { minLength: 1, maxLength: 6 }), (recs) => {
        const w = new MemorySink();
        const ends: number[] = [];
        for (const r of recs) {
          if (r.kind === 'eos') putRamEos(w);
          else if (r.kind === 'page') putRamPage(w, r.page * TARGET_PAGE_SIZE, r.idstr, r.same, PAGE);
          else putRamZeroPage(w, r.page * TARGET_PAGE_SIZE, r.idstr, r.same);
          ends.push(w.bytesWritten);
        }
        const bytes = w.bytes();
        const h: RamRecordAt = { offset: 0, flags: 0, idstr: undefined, headBytes: 0, bodyBytes: 0 };
        let pos = 0;
        recs.forEach((r, i) => {
          // One byte short of the record: not there yet, at every cut from its start.
          for (const cut of [pos, pos + 1, pos + 8, pos + 9, ends[i]! - 1]) {
            if (cut < ends[i]!) expect(decodeRamRecordHead(bytes, pos, Math.max(pos, cut), h)).toBe(false);
          }
          expect(decodeRamRecordHead(bytes, pos, ends[i]!, h)).toBe(true);
          expect(pos + h.headBytes + h.bodyBytes).toBe(ends[i]);
          if (r.kind === 'eos') {
            expect(h.flags).toBe(RAM_SAVE_FLAG_EOS);
          } else {
            expect(h.offset).toBe(r.page * TARGET_PAGE_SIZE);
            expect(h.flags & (RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_ZERO)).toBe(r.kind === 'page' ? RAM_SAVE_FLAG_PAGE : RAM_SAVE_FLAG_ZERO);
            expect(h.idstr).toBe(r.same ? undefined : r.idstr);
            expect(h.bodyBytes).toBe(r.kind === 'page' ? TARGET_PAGE_SIZE : 1);
          }
          pos = ends[i]!;
        });
      }),
    );
  });

  it('rejects unknown flag bits and an address beyond 2^53 with VMIG_ERR_STREAM_FORMAT', () => {
    const h: RamRecordAt = { offset: 0, flags: 0, idstr: undefined, headBytes: 0, bodyBytes: 0 };
    for (const head of [[0, 0x400], [0xffffffff, RAM_SAVE_FLAG_PAGE]]) {
      const w = new MemorySink();
      w.put32(head[0]!);
      w.put32(head[1]!);
      let err: unknown;
      try {
        decodeRamRecordHead(w.bytes(), 0, 8, h, 'preempt');
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(StreamError);
      expect((err as StreamError).code).toBe('VMIG_ERR_STREAM_FORMAT');
      expect((err as StreamError).channel).toBe('preempt');
    }
  });
});
