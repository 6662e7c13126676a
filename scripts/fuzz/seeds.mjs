/**
 * Seed corpora: valid inputs of every decoder, from three origins:
 *  - the real QEMU 7.2 capture in packages/cli/test/fixtures/qemu-7.2-multifd-2ch/ (main
 *    channel, two multifd channels, the RAM it carried);
 *  - streams produced by vmig's own code in this process (MigrationThread into a
 *    MemorySink, with and without the integrity section, a fake multifd link for the main
 *    channel's modern dialect, a postcopy switch; BackgroundSnapshot for snapshot files;
 *    the multifd packet encoder and the compression methods; the return-path encoders);
 *  - hand-built postcopy command streams (every command in its place).
 * Everything here is deterministic: the same seeds in every process and every run.
 */
import { readFileSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';
import { core, harness, multifd, multifdTesting, FIXTURE_DIR } from './pkgs.mjs';

const {
  DEFAULT_PARAMS,
  DeviceRegistry,
  GlobalStateDevice,
  GuestRam,
  MemorySink,
  MemorySource,
  MigrationThread,
  BackgroundSnapshot,
  WriteProtectSaver,
  createWriteProtect,
  RamIntegrityDevice,
  TimerDevice,
  TARGET_PAGE_SIZE: P,
  putFileHeader,
  putCommand,
  putEof,
  putSectionFull,
  putSectionPart,
  putSectionFooter,
  putRamMemSize,
  putRamPage,
  putRamZeroPage,
  putRamEos,
  putVmDescription,
  encodePostcopyAdvise,
  encodePostcopyRamDiscard,
  encodePackagedLength,
  encodeRpMessage,
  encodeRpPong,
  encodeRpShut,
  encodeRpReqPages,
  QEMU_VM_SECTION_START,
  QEMU_VM_SECTION_PART,
  QEMU_VM_SECTION_END,
  QEMU_VM_SECTION_FULL,
  MIG_CMD_OPEN_RETURN_PATH,
  MIG_CMD_PING,
  MIG_CMD_POSTCOPY_ADVISE,
  MIG_CMD_POSTCOPY_LISTEN,
  MIG_CMD_POSTCOPY_RUN,
  MIG_CMD_POSTCOPY_RAM_DISCARD,
  MIG_CMD_PACKAGED,
  MIG_RP_MSG_REQ_PAGES,
  MIG_RP_MSG_REQ_PAGES_ID,
} = core;
const { ItsTableDevice, VcpuStateDevice, itsTable } = harness;
const { encodeMultifdInit, MULTIFD_FLAG_COMPRESSION_MASK, MULTIFD_FLAG_VMIG_LZ4, MULTIFD_PACKET_HEADER_SIZE, MULTIFD_HEADER_FIXED, MULTIFD_INIT_SIZE } = multifd;
/** A packet's payload is next_packet_size bytes if compressed, else normal_pages pages. */
const COMPRESSED = MULTIFD_FLAG_COMPRESSION_MASK | MULTIFD_FLAG_VMIG_LZ4;

const idleVm = { stop: async () => {}, resume: () => {} };

/* ------------------------------------------------------------------ the QEMU capture */

let qemuCache;
/** conn0 (main), conn1 and conn2 (multifd channels 0 and 1, init included), ram (16 MiB 'mem'). */
export function qemuCapture() {
  qemuCache ??= Object.fromEntries(['conn0', 'conn1', 'conn2', 'ram'].map((n) => [n, new Uint8Array(gunzipSync(readFileSync(`${FIXTURE_DIR}${n}.bin.gz`)))]));
  return qemuCache;
}

/* ------------------------------------------------------------------ guest RAM */

/** A deterministic 32-bit LCG (fills RAM; the fuzzer's Rng is for inputs). */
function lcg(seed) {
  let x = seed >>> 0;
  return () => (x = (Math.imul(x, 1103515245) + 12345) >>> 0);
}

/**
 * Guest RAM with every kind of page: random, zero, text-like, one byte set at its end,
 * pages equal to each other. `layout`: [idstr, pages] per block.
 */
export function makeRam(layout, seed = 1) {
  const ram = GuestRam.create(layout.map(([idstr, pages]) => ({ idstr, size: pages * P })), { prefault: false });
  const next = lcg(seed);
  for (const b of ram.blocks) {
    for (let p = 0; p < b.pages; p++) {
      const kind = p % 5;
      const page = b.page(p);
      if (kind === 0) continue; // zero
      if (kind === 1) for (let i = 0; i < P; i += 4) page[i] = next() & 0xff;
      else if (kind === 2) page.set(Buffer.from(`page ${p} of ${b.idstr} `.repeat(200)).subarray(0, P));
      else if (kind === 3) page[P - 1] = 1;
      else page.fill(0x5a);
    }
  }
  return ram;
}

/** RAM as one buffer, blocks in order (what `--dump-ram` writes). */
export function ramBytes(ram) {
  return Buffer.concat(ram.blocks.map((b) => Buffer.from(b.host)));
}

/* ------------------------------------------------------------------ vmig main streams */

/** The destination's devices in `vmig incoming` (and the ones a vmig source registers). */
export function sourceDevices(ram, { integrity = false } = {}) {
  const reg = new DeviceRegistry().register(new TimerDevice()).register(new GlobalStateDevice());
  if (integrity) reg.register(new RamIntegrityDevice(() => ram));
  return reg;
}

/** A multifd link that carries nothing: the main channel of a multifd migration, modern dialect. */
function mainChannelOnlyLink(legacy) {
  return { savePage() {}, ready: async () => {}, flushAndSync: async () => {}, quiesce() {}, flushAfterEachSection: legacy, pendingBytes: 0 };
}

/** A whole precopy migration of `ram` into memory. */
export async function precopyStream(ram, { zeroPageDetection = 'legacy', integrity = false, multifdLink, postcopy, devices } = {}) {
  const sink = new MemorySink();
  const params = { ...DEFAULT_PARAMS, zeroPageDetection, ...(postcopy ? { postcopy: true, postcopyAfterRounds: 1 } : {}) };
  const ctx = { ram, sink, vm: idleVm, devices: devices ?? sourceDevices(ram, { integrity }), params, ...(multifdLink ? { multifd: multifdLink } : {}) };
  if (postcopy) {
    // A return path that says "loaded" and serves nothing; the writers dirty pages at the
    // stop, so the switch sends discards and then those pages after RUN.
    ctx.returnPath = { shut: Promise.resolve(0), listen() {} };
    ctx.vm = {
      stop: async () => {
        for (const [bi, pages] of postcopy.dirtyAtStop) {
          const b = ram.blocks[bi];
          for (const p of pages) b.writeGuest(p * P, Buffer.alloc(P, (p * 7 + bi) & 0xff || 1));
        }
      },
      resume() {},
    };
  }
  const info = await new MigrationThread(ctx).run();
  if (info.status !== 'completed') throw new Error(`seed precopy failed: ${JSON.stringify(info.error)}`);
  return sink.bytes();
}

/**
 * A postcopy stream built command by command (savevm.c's order): return path, ADVISE, the
 * RAM setup section with half the pages, device sections announced at setup, discards, the
 * package (LISTEN, device state, RUN), then the discarded and never-sent pages in PART
 * sections, END, EOF, vmdesc. `ram` is what the destination must hold at the end.
 */
export function handBuiltPostcopy(ram) {
  const w = new MemorySink();
  putFileHeader(w, 'none');
  putCommand(w, MIG_CMD_OPEN_RETURN_PATH);
  putCommand(w, MIG_CMD_POSTCOPY_ADVISE, encodePostcopyAdvise());
  putCommand(w, MIG_CMD_PING, Uint8Array.of(0, 0, 0, 7));
  putSectionFull(w, QEMU_VM_SECTION_START, { sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 });
  putRamMemSize(w, ram.blocks.map((b) => ({ idstr: b.idstr, usedLength: b.usedLength })));
  // Precopy part: even pages of every block (some as zero records).
  for (const b of ram.blocks) {
    let same = false;
    for (let p = 0; p < b.pages; p += 2) {
      const page = b.page(p);
      if (page.every((x) => x === 0)) putRamZeroPage(w, p * P, b.idstr, same);
      else putRamPage(w, p * P, b.idstr, same, page);
      same = true;
    }
  }
  putRamEos(w);
  putSectionFooter(w, 2);
  // Odd pages were never sent, and pages 0-1 changed since: discard them, at most 12 ranges a command.
  for (const b of ram.blocks) {
    const ranges = [{ start: 0, length: 2 * P }];
    for (let p = 3; p < b.pages; p += 2) ranges.push({ start: p * P, length: P });
    for (let i = 0; i < ranges.length; i += 12) putCommand(w, MIG_CMD_POSTCOPY_RAM_DISCARD, encodePostcopyRamDiscard(b.idstr, ranges.slice(i, i + 12)));
  }
  const pkg = new MemorySink();
  putCommand(pkg, MIG_CMD_POSTCOPY_LISTEN);
  putSectionFull(pkg, QEMU_VM_SECTION_FULL, { sectionId: 3, idstr: 'timer', instanceId: 0, versionId: 2 });
  pkg.putBytes(new Uint8Array(24).fill(3));
  putSectionFooter(pkg, 3);
  putSectionFull(pkg, QEMU_VM_SECTION_FULL, { sectionId: 4, idstr: 'globalstate', instanceId: 0, versionId: 1 });
  pkg.put32(8);
  pkg.putBytes(Buffer.concat([Buffer.from('running\0'), Buffer.alloc(92)]));
  putSectionFooter(pkg, 4);
  putCommand(pkg, MIG_CMD_POSTCOPY_RUN);
  const blob = pkg.bytes();
  putCommand(w, MIG_CMD_PACKAGED, encodePackagedLength(blob.length));
  w.putBytes(blob);
  // After RUN: every page that is missing now, in small PART sections.
  let inSection = 0;
  for (const b of ram.blocks) {
    for (let p = 0; p < b.pages; p++) {
      if (p % 2 === 0 && p >= 2) continue;
      if (inSection === 0) putSectionPart(w, QEMU_VM_SECTION_PART, 2);
      const page = b.page(p);
      if (page.every((x) => x === 0)) putRamZeroPage(w, p * P, b.idstr, false);
      else putRamPage(w, p * P, b.idstr, false, page);
      if (++inSection === 5) {
        putRamEos(w);
        putSectionFooter(w, 2);
        inSection = 0;
      }
    }
  }
  if (inSection) {
    putRamEos(w);
    putSectionFooter(w, 2);
  }
  putSectionPart(w, QEMU_VM_SECTION_END, 2);
  putRamEos(w);
  putSectionFooter(w, 2);
  putEof(w);
  putVmDescription(w, '{"page_size":4096,"devices":[]}');
  return w.bytes();
}

/** vmig-its with a fixed generation (the real one takes Date.now() and the pid): deterministic seeds. */
class FixedItsDevice extends ItsTableDevice {
  constructor(ram) {
    super(ram);
    this.ramGetter = ram;
  }
  flushToRam() {
    const ram = this.ramGetter();
    const b = ram.blocks[ram.blocks.length - 1];
    const offset = b.usedLength - P;
    b.writeGuest(offset, itsTable(0x5eed));
    this.flushed = { block: b.idstr, offset, generation: 0x5eed };
  }
}

/** A background snapshot of `ram` into memory (what `vmig snapshot` writes to its file). */
export async function snapshotStream(ram, { zeroPages }) {
  const sink = new MemorySink();
  const devices = new DeviceRegistry()
    .register(new TimerDevice())
    .register(new GlobalStateDevice('running'))
    .register(new VcpuStateDevice(() => ({ writers: 0, writes: 0, pattern: 'uniform' })))
    .register(new FixedItsDevice(() => ram));
  const wp = new WriteProtectSaver(createWriteProtect(ram.totalPages, 0, 0));
  const info = await new BackgroundSnapshot({ ram, sink, vm: idleVm, devices, wp, zeroPages }).run();
  if (info.status !== 'completed') throw new Error(`seed snapshot failed: ${JSON.stringify(info.error)}`);
  return sink.bytes();
}

/* ------------------------------------------------------------------ tokens */

function be64(hi, lo) {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setUint32(0, hi);
  new DataView(b.buffer).setUint32(4, lo);
  return b;
}

/** Byte strings of the main stream's format, for insertion and overwriting. */
export const MAIN_TOKENS = [
  // RAM record address words: each flag alone and in combinations, offsets at the edges.
  ...[0x02, 0x04, 0x08, 0x10, 0x20, 0x22, 0x28, 0x40, 0x200, 0x100, 0x400, 0x800, 0xfff].map((f) => be64(0, f)),
  be64(0, 0x1000 | 0x28),
  be64(0, 0x3f000 | 0x28),
  be64(0x1f_ffff, 0xfffff000 | 0x08),
  be64(0x20_0000, 0x08),
  be64(1, 0x04),
  // Section types, footer, commands.
  Uint8Array.of(0x00), Uint8Array.of(0x01), Uint8Array.of(0x02), Uint8Array.of(0x03), Uint8Array.of(0x04), Uint8Array.of(0x05), Uint8Array.of(0x06), Uint8Array.of(0x07), Uint8Array.of(0x08),
  Uint8Array.of(0x7e, 0, 0, 0, 2),
  Uint8Array.of(0x03, 0, 0, 0, 2),
  Uint8Array.of(0x02, 0, 0, 0, 2),
  ...[1, 2, 3, 4, 5, 6, 7, 9, 10].map((c) => Uint8Array.of(0x08, 0, c, 0, 0)),
  Uint8Array.of(0x08, 0, 7, 0, 4, 0, 0, 0x10, 0),
  Uint8Array.of(0x08, 0, 7, 0, 4, 0xff, 0xff, 0xff, 0xff),
  Uint8Array.of(0x08, 0, 2, 0, 4, 0, 0, 0, 1),
  Uint8Array.of(0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3),
  // Counted strings: block names, section names, empty, 255 bytes.
  Uint8Array.of(6, ...Buffer.from('pc.ram')),
  Uint8Array.of(3, ...Buffer.from('mem')),
  Uint8Array.of(3, ...Buffer.from('ram')),
  Uint8Array.of(0),
  Uint8Array.of(255),
  Uint8Array.of(14, ...Buffer.from('vmig-integrity')),
  Uint8Array.of(10, ...Buffer.from('vmig-vcpus')),
  Uint8Array.of(8, ...Buffer.from('vmig-its')),
  // A FULL section header of each known device.
  ...[['timer', 2], ['globalstate', 1], ['vmig-vcpus', 1], ['vmig-its', 1], ['vmig-integrity', 1], ['ram', 4]].map(([id, v]) => {
    const w = new MemorySink();
    putSectionFull(w, QEMU_VM_SECTION_FULL, { sectionId: 9, idstr: id, instanceId: 0, versionId: v });
    return w.bytes();
  }),
  // msgpack: a map with huge/negative/float writers.
  Uint8Array.of(0x81, 0xa7, ...Buffer.from('writers'), 0xcd, 0x01, 0x00),
  Uint8Array.of(0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff),
];

/**
 * Whole top-level elements of a main stream, for insertion between sections: RAM PART
 * sections (a page, a zero page, a page with CONTINUE first, an EOS only), an END section,
 * device sections, commands (a PING, a second ADVISE, a package with LISTEN and RUN).
 */
export function mainSections() {
  const out = [];
  const el = (f) => {
    const w = new MemorySink();
    f(w);
    out.push(w.bytes());
  };
  for (const [block, page] of [['pc.ram', 0], ['pc.ram', 63], ['vga.vram', 7], ['mem', 0]]) {
    el((w) => {
      putSectionPart(w, QEMU_VM_SECTION_PART, 2);
      putRamPage(w, page * P, block, false, new Uint8Array(P).fill(0xaa));
      putRamEos(w);
      putSectionFooter(w, 2);
    });
    el((w) => {
      putSectionPart(w, QEMU_VM_SECTION_END, 2);
      putRamZeroPage(w, page * P, block, false);
      putRamEos(w);
      putSectionFooter(w, 2);
    });
  }
  el((w) => {
    putSectionPart(w, QEMU_VM_SECTION_PART, 2);
    putRamEos(w);
    putSectionFooter(w, 2);
  });
  el((w) => {
    putSectionFull(w, QEMU_VM_SECTION_FULL, { sectionId: 3, idstr: 'timer', instanceId: 0, versionId: 2 });
    w.putBytes(new Uint8Array(24).fill(9));
    putSectionFooter(w, 3);
  });
  el((w) => putCommand(w, MIG_CMD_PING, Uint8Array.of(0, 0, 0, 1)));
  el((w) => putCommand(w, MIG_CMD_OPEN_RETURN_PATH));
  el((w) => putCommand(w, MIG_CMD_POSTCOPY_ADVISE, encodePostcopyAdvise()));
  el((w) => putCommand(w, MIG_CMD_POSTCOPY_RAM_DISCARD, encodePostcopyRamDiscard('pc.ram', [{ start: 0, length: P }])));
  el((w) => {
    const pkg = new MemorySink();
    putCommand(pkg, MIG_CMD_POSTCOPY_LISTEN);
    putCommand(pkg, MIG_CMD_POSTCOPY_RUN);
    putCommand(w, MIG_CMD_PACKAGED, encodePackagedLength(pkg.bytes().length));
    w.putBytes(pkg.bytes());
  });
  return out;
}

/** Offsets right after a section footer (0x7e + be32 section id): where a top-level element may start. */
export function topLevelOffsets(bytes, hot) {
  return hot.filter((h) => h >= 5 && bytes[h - 5] === 0x7e && bytes[h - 4] === 0 && bytes[h - 3] === 0);
}

export const MULTIFD_TOKENS = [
  Uint8Array.of(0x11, 0x22, 0x33, 0x44),
  Uint8Array.of(0, 0, 0, 1),
  Uint8Array.of(0, 0, 0, 0x80),
  Uint8Array.of(0, 0, 0, 0x81),
  Uint8Array.of(0, 0, 1, 0),
  Uint8Array.of(0, 0, 0, 2),
  Uint8Array.of(0, 0, 0, 3),
  be64(0, 0x1000),
  be64(0, 0xfff000),
  be64(0, 0x1000000),
  be64(0x20_0000, 0),
  Uint8Array.of(...Buffer.from('mem'), 0),
  Uint8Array.of(...Buffer.from('pc.ram'), 0),
];

/* ------------------------------------------------------------------ hot offsets */

/** A MemorySource that records where every read starts (each decoder field begins at an ensure()). */
class TracingSource extends MemorySource {
  constructor(chunks, hot) {
    super(chunks);
    this.hot = hot;
  }
  ensure(n) {
    this.hot.add(this.bytesRead);
    return super.ensure(n);
  }
}

/**
 * Offsets where the loader starts reading a field of `bytes`, found by loading it once with
 * `load(source)` (a page's payload contributes its start only).
 */
export async function traceHot(bytes, load) {
  const hot = new Set();
  // A seed must load whole: a trace cut short would leave its tail without hot offsets.
  await load(new TracingSource([bytes], hot));
  return [...hot].filter((o) => o < bytes.length).sort((a, b) => a - b);
}

/* ------------------------------------------------------------------ multifd */

/** Splits a multifd channel (after its init) into its packets, given the header's counts. */
export function splitPackets(stream) {
  const out = [];
  let pos = 0;
  while (pos + MULTIFD_PACKET_HEADER_SIZE <= stream.length) {
    const dv = new DataView(stream.buffer, stream.byteOffset + pos);
    const flags = dv.getUint32(8);
    const normal = dv.getUint32(16);
    const nextSize = dv.getUint32(20);
    const len = MULTIFD_PACKET_HEADER_SIZE + ((flags & COMPRESSED) !== 0 ? nextSize : normal * P);
    out.push(stream.subarray(pos, pos + len));
    pos += len;
  }
  return out;
}

/** Hot offsets of a packet stream: every header field of every packet, and its first offsets. */
export function packetHot(stream) {
  const hot = [];
  for (let pos = 0, i = 0; i < 64; i++) {
    if (pos + MULTIFD_PACKET_HEADER_SIZE > stream.length) break;
    for (const f of [0, 4, 8, 12, 16, 20, 24, 32, 36, 64, 65, 66]) hot.push(pos + f);
    for (let k = 0; k < 4; k++) hot.push(pos + MULTIFD_HEADER_FIXED + 8 * k);
    hot.push(pos + MULTIFD_PACKET_HEADER_SIZE);
    const dv = new DataView(stream.buffer, stream.byteOffset + pos);
    const flags = dv.getUint32(8);
    pos += MULTIFD_PACKET_HEADER_SIZE + ((flags & COMPRESSED) !== 0 ? dv.getUint32(20) : dv.getUint32(16) * P);
  }
  return hot;
}

/**
 * A channel's byte stream written by vmig's encoder (`@vmig/multifd/testing`, as the recv
 * parser's tests use it), and the 'pc.ram' RAM it leaves (64 pages, starting as `fill`).
 */
export async function vmigPackets(method, fill = 0xee) {
  const { stream, expected } = await multifdTesting.encodeMultifdStream(method, fill);
  return { stream, expected };
}

/** MultiFDInit_t seeds: QEMU's two inits and vmig's encoder. */
export function multifdInits() {
  const q = qemuCapture();
  return [q.conn1.subarray(0, MULTIFD_INIT_SIZE), q.conn2.subarray(0, MULTIFD_INIT_SIZE), encodeMultifdInit({ uuid: Uint8Array.from({ length: 16 }, (_, i) => i + 1), id: 3 })].map((b) => new Uint8Array(b));
}

/* ------------------------------------------------------------------ return path */

/** Return-path byte streams (destination -> source): PONGs, page requests, SHUT. */
export function returnPathStreams() {
  const cat = (...m) => new Uint8Array(Buffer.concat(m));
  return [
    cat(encodeRpPong(7), encodeRpShut(0)),
    cat(encodeRpPong(1), encodeRpReqPages('pc.ram', 5 * P, P), encodeRpReqPages(undefined, 9 * P, 3 * P), encodeRpReqPages('vga.vram', 0, 2 * P), encodeRpShut(0)),
    cat(encodeRpReqPages('pc.ram', 63 * P, P), encodeRpReqPages(undefined, 0, 64 * P), encodeRpPong(0xffffffff), encodeRpShut(1)),
    cat(encodeRpReqPages('vga.vram', 7 * P, P), encodeRpMessage(MIG_RP_MSG_REQ_PAGES, new Uint8Array(12)), encodeRpMessage(MIG_RP_MSG_REQ_PAGES_ID, Uint8Array.of(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 6, ...Buffer.from('pc.ram'))), encodeRpShut(0)),
  ];
}

export const RP_TOKENS = [
  Uint8Array.of(0, 1, 0, 4),
  Uint8Array.of(0, 2, 0, 4),
  Uint8Array.of(0, 3, 0, 19),
  Uint8Array.of(0, 4, 0, 12),
  Uint8Array.of(0, 5, 0, 0),
  Uint8Array.of(0, 6, 0, 0),
  Uint8Array.of(0, 4, 0x10, 0x00),
  Uint8Array.of(0, 4, 0x10, 0x01),
  be64(0, 0x3f000),
  be64(0x20_0000, 0),
  Uint8Array.of(0x7f, 0xff, 0xf0, 0x00),
];

/* ------------------------------------------------------------------ control socket */

/** Request lines a control client sends (QMP style), valid and almost valid. */
export const CONTROL_LINES = [
  '{"execute":"qmp_capabilities"}',
  '{"execute":"query-migrate","id":1}',
  '{"execute":"query-migrate-parameters","id":"x"}',
  '{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":16777216,"downtime-limit":20},"id":3}',
  '{"execute":"migrate-set-parameters","arguments":{"downtime-limit":-5},"id":4}',
  '{"execute":"migrate-start-postcopy","id":[1,2]}',
  '{"execute":"migrate-cancel","id":{"a":null}}',
  '{"execute":"teleport","id":null}',
  '{"execute":"query-migrate"}\n{"execute":"query-migrate-parameters"}',
  '{"execute":"migrate-set-parameters","arguments":[],"id":9}',
];

export const CONTROL_TOKENS = [
  '"__proto__"', '"constructor"', '"toString"', '"hasOwnProperty"', '{"__proto__":{"execute":"migrate-cancel"}}', '"arguments"', '"execute"',
  '1e309', '-0', '9007199254740993', '1.5', 'null', 'true', '[]', '{}', '"\\u0000"', '"\\ud800"', '\n', '\r\n', '\\', '"', '\u2028', '\ufeff',
  '"max-bandwidth"', '"downtime-limit"', '"multifd-channels"', '"id"', ' '.repeat(300), '['.repeat(2000), '{"a":'.repeat(500),
].map((t) => new Uint8Array(Buffer.from(t)));
