/**
 * The preempt channel read by the faulting vCPUs themselves (core's postcopy/preempt-reader.ts)
 * with real writer threads (VcpuPool) and real loopback connections: the return path the
 * writers request pages on, and the preempt channel the test, as the source, answers on. The
 * test's main thread is the channel's owner (the preempt thread's part: attach, service,
 * close).
 */
import type net from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import {
  createMissingPages,
  createPreemptReader,
  createReturnPath,
  decodeRpReqPages,
  GuestRam,
  libc,
  MemorySink,
  MissingPagesPlacer,
  PreemptReader,
  preemptReaderMode,
  preemptReads,
  type PreemptReaderShared,
  putRamEos,
  putRamPage,
  putRamZeroPage,
  RAM_SAVE_FLAG_PAGE,
  ReturnPathWriter,
  TARGET_PAGE_SIZE,
} from '@vmig/core';
import { checkStampedRam, digestRam, VcpuPool } from '../src/index.js';
import { loopback } from './loopback.js';

const PAGES = 256;
const canPoll = libc() !== null;

interface Rig {
  /** The preempt channel's fd, for a test that attaches it itself (`attach: false`). */
  fd: number;
  ram: GuestRam;
  placer: MissingPagesPlacer;
  shared: PreemptReaderShared;
  owner: PreemptReader;
  /** Page requests decoded off the return path so far (global pages). */
  requests: number[];
  preempt: net.Socket;
}

let pool: VcpuPool | undefined;
const cleanups: (() => void)[] = [];
afterEach(async () => {
  await pool?.terminate();
  pool = undefined;
  for (const c of cleanups.splice(0)) c();
});

/** RAM with every page filled with its own byte; `missing` pages not received; `writers` on a hot set of `hot` pages. */
async function setup(opts: { writers: number; hot: number; missing: number[]; vcpusRead?: boolean; attach?: boolean }): Promise<Rig> {
  const ram = GuestRam.create([{ idstr: 'pc.ram', size: PAGES * TARGET_PAGE_SIZE }]);
  for (let p = 0; p < PAGES; p++) ram.blocks[0]!.host.fill(p & 0xff, p * TARGET_PAGE_SIZE, (p + 1) * TARGET_PAGE_SIZE);
  const rp = await loopback();
  const rpShared = createReturnPath(rp.fd);
  const requests: number[] = [];
  let pending = Buffer.alloc(0);
  rp.src.on('data', (b: Buffer) => {
    pending = Buffer.concat([pending, b]);
    while (pending.length >= 4 && pending.length >= 4 + pending.readUInt16BE(2)) {
      const len = pending.readUInt16BE(2);
      const req = decodeRpReqPages(pending.readUInt16BE(0), pending.subarray(4, 4 + len));
      requests.push(req.start / TARGET_PAGE_SIZE);
      pending = pending.subarray(4 + len);
    }
  });
  const pc = await loopback();
  pc.src.setNoDelay(true);
  // The readers read the preempt channel's fd from here on (what @vmig/channel's detachFd
  // does): this handle never reads it again, and closes it after owner.close().
  const handle = (pc.dst as unknown as { _handle: { readStop(): number } })._handle;
  handle.readStop();
  (pc.dst as unknown as { _read: () => void })._read = () => {};
  pc.dst.unref();
  const fd = pc.fd;
  const placer = new MissingPagesPlacer(createMissingPages([{ idstr: 'pc.ram', pages: PAGES }], 8, true, rpShared));
  placer.markAllReceived();
  for (const p of opts.missing) placer.markMissing(p, 1);
  placer.setRunningVcpus(opts.writers);
  const shared = createPreemptReader(opts.vcpusRead ?? true);
  const owner = new PreemptReader(shared, ram, placer);
  if (opts.attach !== false) owner.attach(fd, new Uint8Array(0));
  cleanups.push(() => {
    owner.close();
    pc.dst.destroy();
    new ReturnPathWriter(rpShared).close();
    rp.dst.destroy();
    rp.src.destroy();
    rp.server.close();
    pc.src.destroy();
    pc.server.close();
  });
  pool = await VcpuPool.start(ram, { writers: opts.writers, dirtyRate: 0, pattern: 'hot', hotPages: opts.hot, missing: placer.shared, preempt: shared, track: true });
  return { fd, ram, placer, shared, owner, requests, preempt: pc.src };
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function until(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 500 && !cond(); i++) await sleep(10);
  expect(cond(), what).toBe(true);
}

/** The owner's turns until the stream is no longer open (or 2 s), letting the event loop run between them (the test's socket writes). */
async function serviceWhileOpen(rig: Rig): Promise<'open' | 'ended' | 'failed'> {
  let st = rig.owner.service();
  for (let i = 0; i < 200 && st === 'open'; i++) {
    await sleep(10);
    st = rig.owner.service();
  }
  return st;
}

/** A page record for global page `p` with every byte `fill`. */
function pageRecord(p: number, fill: number, idstr = 'pc.ram'): Uint8Array {
  const w = new MemorySink();
  putRamPage(w, p * TARGET_PAGE_SIZE, idstr, false, new Uint8Array(TARGET_PAGE_SIZE).fill(fill));
  return w.bytes();
}

/** RAM as it should be after `placed` (page -> fill) arrived, before any writer's stamp. */
function expectedDigest(ram: GuestRam, placed: Map<number, number>): string {
  const copy = GuestRam.create([{ idstr: 'pc.ram', size: PAGES * TARGET_PAGE_SIZE }], { prefault: false });
  copy.blocks[0]!.host.set(ram.blocks[0]!.host);
  for (const [p, fill] of placed) copy.blocks[0]!.host.fill(fill, p * TARGET_PAGE_SIZE, (p + 1) * TARGET_PAGE_SIZE);
  return digestRam(copy).digest;
}

async function stopAndCheck(rig: Rig, writers: number, placed: Map<number, number>): Promise<void> {
  expect(await pool!.keepsWriting(100)).toBe(true);
  const tracks = await pool!.terminate();
  pool = undefined;
  const check = checkStampedRam(rig.ram, tracks, writers);
  expect(check.problems).toEqual([]);
  expect(check.restoredDigest).toBe(expectedDigest(rig.ram, placed));
}

describe.runIf(canPoll)('the preempt channel read by the faulting vCPUs', () => {
  it('a record that comes in three pieces: the vCPU waiting for it reads it, places it whole and runs on', async () => {
    const rig = await setup({ writers: 1, hot: 1, missing: [0] });
    expect(preemptReaderMode(rig.shared)).toBe('vcpu');
    await until(() => rig.requests.length === 1, 'the page was requested');
    const rec = pageRecord(0, 0xc3);
    for (const [a, b] of [[0, 5], [5, 2000], [2000, rec.length]] as const) {
      rig.preempt.write(rec.subarray(a, b));
      await sleep(30);
    }
    await stopAndCheck(rig, 1, new Map([[0, 0xc3]]));
    expect(preemptReads(rig.shared)).toEqual({ preemptPagesByVcpus: 1, preemptPagesByThread: 0 });
    expect(rig.owner.service()).toBe('open');
  });

  it('a connection that came after its first pages were sent: the records already read with its first bytes are placed at attach', async () => {
    const rig = await setup({ writers: 2, hot: 1, missing: [0], attach: false });
    await until(() => rig.requests.length === 1, 'the page was requested');
    // What the listener read before the channel was handed over: the source's opening EOS
    // and the whole answer. Nothing more comes from the socket.
    const w = new MemorySink();
    putRamEos(w);
    w.putBytes(pageRecord(0, 0x77));
    rig.owner.attach(rig.fd, w.bytes());
    await stopAndCheck(rig, 2, new Map([[0, 0x77]]));
    expect(preemptReads(rig.shared)).toEqual({ preemptPagesByVcpus: 0, preemptPagesByThread: 1 });
  });

  it('a connection whose first bytes end inside a record: a vCPU reads the rest from the socket and places it', async () => {
    const rig = await setup({ writers: 1, hot: 1, missing: [0], attach: false });
    await until(() => rig.requests.length === 1, 'the page was requested');
    const rec = pageRecord(0, 0x78);
    rig.owner.attach(rig.fd, rec.subarray(0, 3000));
    await sleep(30);
    expect(pool!.writes).toBe(0);
    rig.preempt.write(rec.subarray(3000));
    await stopAndCheck(rig, 1, new Map([[0, 0x78]]));
    expect(preemptReads(rig.shared)).toEqual({ preemptPagesByVcpus: 1, preemptPagesByThread: 0 });
  });

  it('four writers on two missing pages: one reads, the others wait; answered in reverse order, every writer runs on', async () => {
    // A hot set of two pages: 0 and 127 (stride 255 / 2).
    const rig = await setup({ writers: 4, hot: 2, missing: [0, 127] });
    await until(() => rig.requests.length === 2, 'both pages were requested');
    expect([...rig.requests].sort((a, b) => a - b)).toEqual([0, 127]);
    const answers = [...rig.requests].reverse();
    for (const p of answers) {
      rig.preempt.write(pageRecord(p, 0x40 + p));
      await sleep(50);
    }
    await stopAndCheck(rig, 4, new Map(answers.map((p) => [p, 0x40 + p])));
    expect(preemptReads(rig.shared)).toEqual({ preemptPagesByVcpus: 2, preemptPagesByThread: 0 });
    expect(rig.placer.blocktime().faults).toBeGreaterThanOrEqual(2);
  });

  it('a page placed in the background first: the waiting vCPU runs on, its late copy is read by the owner and dropped', async () => {
    const rig = await setup({ writers: 1, hot: 1, missing: [0] });
    await until(() => rig.requests.length === 1, 'the page was requested');
    expect(rig.placer.place(0, () => rig.ram.blocks[0]!.host.fill(0xab, 0, TARGET_PAGE_SIZE))).toBe(true);
    // The vCPU in poll(2) sees it at its next look (at most 20 ms).
    await until(() => pool!.writes > 0, 'the writer wrote');
    rig.preempt.write(pageRecord(0, 0xcd));
    await sleep(50);
    for (let i = 0; i < 5; i++) rig.owner.service();
    expect(rig.placer.dropped).toBe(1);
    await stopAndCheck(rig, 1, new Map([[0, 0xab]]));
    expect(preemptReads(rig.shared)).toEqual({ preemptPagesByVcpus: 0, preemptPagesByThread: 0 });
  });

  it('the end of the stream between records: the owner sees it ended', async () => {
    const rig = await setup({ writers: 1, hot: 1, missing: [0] });
    await until(() => rig.requests.length === 1, 'the page was requested');
    const w = new MemorySink();
    putRamZeroPage(w, 0, 'pc.ram', false);
    putRamEos(w);
    rig.preempt.end(w.bytes());
    await until(() => pool!.writes > 0, 'the writer wrote');
    expect(await serviceWhileOpen(rig)).toBe('ended');
    await stopAndCheck(rig, 1, new Map([[0, 0]]));
  });

  const hostile: [string, () => Uint8Array, string][] = [
    ['a page of an unknown block', () => pageRecord(0, 0xee, 'nope'), 'VMIG_ERR_UNKNOWN_BLOCK'],
    ['a page past the end of the block', () => pageRecord(PAGES, 0xee), 'VMIG_ERR_BAD_OFFSET'],
    ['unknown flag bits', () => Uint8Array.from([0, 0, 0, 0, 0, 0, 0x04, 0]), 'VMIG_ERR_STREAM_FORMAT'],
    ['CONTINUE with no block before', () => { const w = new MemorySink(); w.put64(RAM_SAVE_FLAG_PAGE | 0x20); w.putBytes(new Uint8Array(TARGET_PAGE_SIZE)); return w.bytes(); }, 'VMIG_ERR_STREAM_FORMAT'],
    ['a zero page with a fill byte', () => { const w = new MemorySink(); putRamZeroPage(w, 0, 'pc.ram', false); const b = w.bytes(); b[b.length - 1] = 7; return b; }, 'VMIG_ERR_STREAM_FORMAT'],
    ['the stream cut inside a page', () => pageRecord(0, 0xee).subarray(0, 3000), 'VMIG_ERR_PEER_CLOSED'],
  ];
  for (const [name, bytes, code] of hostile) {
    it(`${name}: ${code}, nothing written, the blocked writer released by the abort`, async () => {
      const rig = await setup({ writers: 2, hot: 1, missing: [0] });
      await until(() => rig.requests.length === 1, 'the page was requested');
      const before = digestRam(rig.ram).digest;
      rig.preempt.end(bytes());
      expect(await serviceWhileOpen(rig)).toBe('failed');
      expect(rig.owner.error?.code).toBe(code);
      expect(rig.owner.error?.channel).toBe('preempt');
      expect(pool!.writes).toBe(0);
      expect(digestRam(rig.ram).digest).toBe(before);
      rig.placer.abort();
      await sleep(50);
      await pool!.terminate();
      pool = undefined;
      expect(digestRam(rig.ram).digest).toBe(before);
    });
  }
});

describe('the preempt channel read by its thread alone (--postcopy-preempt-reader thread, or no poll(2))', () => {
  it('the owner reads and places the page; no vCPU reads', async () => {
    const rig = await setup({ writers: 2, hot: 1, missing: [0], vcpusRead: false });
    expect(preemptReaderMode(rig.shared)).toBe('thread');
    await until(() => rig.requests.length === 1, 'the page was requested');
    rig.preempt.write(pageRecord(0, 0x5a));
    await sleep(50);
    for (let i = 0; i < 5 && rig.placer.missing() > 0; i++) rig.owner.service();
    expect(rig.placer.missing()).toBe(0);
    await stopAndCheck(rig, 2, new Map([[0, 0x5a]]));
    expect(preemptReads(rig.shared)).toEqual({ preemptPagesByVcpus: 0, preemptPagesByThread: 1 });
  });
});
