/**
 * The received map with real writer threads (VcpuPool) and a real return path (a loopback
 * TCP connection): faults on one page from several writers become one request, written by
 * the writer itself; a page that arrives in the background while a writer waits for it
 * wakes the writer, and the answer to the request that comes after is dropped, not placed
 * over the writer's stamp.
 */
import type net from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { createMissingPages, createReturnPath, decodeRpReqPages, GuestRam, MissingPagesPlacer, ReturnPathWriter, type ReturnPathShared, TARGET_PAGE_SIZE } from '@vmig/core';
import { checkStampedRam, digestRam, VcpuPool } from '../src/index.js';
import { loopback } from './loopback.js';

const PAGES = 256;
let pool: VcpuPool | undefined;
interface Link {
  src: net.Socket;
  dst: net.Socket;
  server: net.Server;
  shared: ReturnPathShared;
  writer: ReturnPathWriter;
}
let link: Link | undefined;
afterEach(async () => {
  await pool?.terminate();
  pool = undefined;
  link?.writer.close();
  link?.src.destroy();
  link?.dst.destroy();
  link?.server.close();
  link = undefined;
});

/** A loopback connection: the destination's end (whose fd the writers write) and the source's. */
async function connectReturnPath(): Promise<Link> {
  const { src, dst, server, fd } = await loopback();
  const shared = createReturnPath(fd);
  return { src, dst, server, shared, writer: new ReturnPathWriter(shared) };
}

/** RAM with every page filled with its own byte; page 0 missing; `writers` hammering page 0. */
async function setup(writers: number): Promise<{ ram: GuestRam; placer: MissingPagesPlacer; received: Buffer[] }> {
  const ram = GuestRam.create([{ idstr: 'pc.ram', size: PAGES * TARGET_PAGE_SIZE }]);
  for (let p = 0; p < PAGES; p++) ram.blocks[0]!.host.fill(p & 0xff, p * TARGET_PAGE_SIZE, (p + 1) * TARGET_PAGE_SIZE);
  const l = await connectReturnPath();
  link = l;
  const received: Buffer[] = [];
  l.src.on('data', (b: Buffer) => received.push(b));
  const placer = new MissingPagesPlacer(createMissingPages([{ idstr: 'pc.ram', pages: PAGES }], 8, true, l.shared));
  placer.markAllReceived();
  placer.markMissing(0, 1);
  placer.setRunningVcpus(writers);
  // The hot set of one page is page 0: every writer faults on it at its first write.
  pool = await VcpuPool.start(ram, { writers, dirtyRate: 0, pattern: 'hot', hotPages: 1, missing: placer.shared, track: true });
  return { ram, placer, received };
}

/** The pages the source was asked for within 300 ms (decoded off the return path). */
async function requestsWhileBlocked(received: Buffer[]): Promise<{ block: string | undefined; page: number }[]> {
  await new Promise((r) => setTimeout(r, 300));
  const bytes = Buffer.concat(received);
  const out: { block: string | undefined; page: number }[] = [];
  for (let off = 0; off < bytes.length; ) {
    const type = bytes.readUInt16BE(off);
    const len = bytes.readUInt16BE(off + 2);
    const req = decodeRpReqPages(type, bytes.subarray(off + 4, off + 4 + len));
    expect(req.length).toBe(TARGET_PAGE_SIZE);
    out.push({ block: req.idstr, page: req.start / TARGET_PAGE_SIZE });
    off += 4 + len;
  }
  return out;
}

/** What RAM should be after page 0 arrived with `fill`, before any writer's stamp. */
function expectedDigest(ram: GuestRam, fill: number): string {
  const copy = GuestRam.create([{ idstr: 'pc.ram', size: PAGES * TARGET_PAGE_SIZE }], { prefault: false });
  copy.blocks[0]!.host.set(ram.blocks[0]!.host);
  copy.blocks[0]!.host.fill(fill, 0, TARGET_PAGE_SIZE);
  return digestRam(copy).digest;
}

describe('missing pages with real writer threads', () => {
  it('four writers fault on one page: one request, all blocked at once, all woken by one placement', async () => {
    const { ram, placer, received } = await setup(4);
    const writesBefore = pool!.writes;
    const requests = await requestsWhileBlocked(received);
    // One REQ_PAGES_ID naming the block, from whichever writer faulted first.
    expect(requests).toEqual([{ block: 'pc.ram', page: 0 }]);
    expect(placer.requests).toBe(1);
    expect(pool!.writes).toBe(writesBefore); // nobody wrote the missing page
    expect(placer.place(0, () => ram.blocks[0]!.host.fill(0xee, 0, TARGET_PAGE_SIZE))).toBe(true);
    expect(await pool!.keepsWriting(100)).toBe(true);
    const tracks = await pool!.terminate();
    pool = undefined;
    const check = checkStampedRam(ram, tracks, 4);
    expect(check.problems).toEqual([]);
    expect(check.pagesWritten).toBe(1);
    expect(check.restoredDigest).toBe(expectedDigest(ram, 0xee));
    const bt = placer.blocktime();
    expect(bt.faults).toBe(4);
    expect(bt.postcopyVcpuBlocktimeMs).toHaveLength(4);
    for (const ms of bt.postcopyVcpuBlocktimeMs) expect(ms).toBeGreaterThan(100);
    // All four waited together for most of the 300 ms.
    expect(bt.postcopyBlocktimeMs).toBeGreaterThan(100);
  });

  it('a page sent in the background while a writer waits for it: the writer wakes, the late answer is dropped', async () => {
    const { ram, placer, received } = await setup(1);
    expect(await requestsWhileBlocked(received)).toEqual([{ block: 'pc.ram', page: 0 }]);
    // The background copy arrives first...
    expect(placer.place(0, () => ram.blocks[0]!.host.fill(0xab, 0, TARGET_PAGE_SIZE))).toBe(true);
    expect(await pool!.keepsWriting(100)).toBe(true);
    // ...then the answer to the request: it must not land over the writer's stamps.
    expect(placer.place(0, () => ram.blocks[0]!.host.fill(0xcd, 0, TARGET_PAGE_SIZE))).toBe(false);
    expect(placer.dropped).toBe(1);
    expect(placer.missing()).toBe(0);
    const tracks = await pool!.terminate();
    pool = undefined;
    const check = checkStampedRam(ram, tracks, 1);
    expect(check.problems).toEqual([]);
    expect(check.restoredDigest).toBe(expectedDigest(ram, 0xab));
  });

  it('the check catches a write lost to a late placement', async () => {
    const { ram, placer, received } = await setup(1);
    await requestsWhileBlocked(received);
    placer.place(0, () => ram.blocks[0]!.host.fill(0xab, 0, TARGET_PAGE_SIZE));
    await pool!.keepsWriting(50);
    const tracks = await pool!.terminate();
    pool = undefined;
    // A placement that ignores the received map (the bug the map prevents) wipes the stamps.
    ram.blocks[0]!.host.fill(0xab, 0, TARGET_PAGE_SIZE);
    const check = checkStampedRam(ram, tracks, 1);
    expect(check.badStamps).toBe(1);
    expect(check.problems[0]).toContain('is not there');
  });

  it('abort releases a blocked writer without its write', async () => {
    const { ram, placer, received } = await setup(2);
    await requestsWhileBlocked(received);
    const before = Buffer.from(ram.blocks[0]!.page(0));
    placer.abort();
    await new Promise((r) => setTimeout(r, 100));
    await pool!.terminate();
    pool = undefined;
    expect(Buffer.compare(Buffer.from(ram.blocks[0]!.page(0)), before)).toBe(0);
  });
});
