/**
 * One multifd send channel (QEMU's multifd_send_thread): a worker thread that owns its
 * socket. It connects, sends MultiFDInit_t, then turns each job from the migration thread
 * into packets of up to 128 pages, read straight out of guest RAM (SharedArrayBuffer), and
 * writes a job's packets with one corked writev.
 *
 * Ownership: a job's pages had their migration-bitmap bits cleared by the migration thread
 * before the job was posted; this thread reads them afterwards, which the dirty-log rule
 * allows (a write after the clear re-dirties the page and it is sent again later).
 * Packets are written in the order jobs arrive, and a SYNC job is written after every job
 * posted before it: that is the sender half of the barrier.
 */
import net from 'node:net';
import { parentPort, workerData } from 'node:worker_threads';
import { tlsConnect } from '@vmig/channel';
import { copyBytes, GuestRam, isZeroPage, mayBeZero, type RamBlock, setThreadName, TARGET_PAGE_SIZE, toVmigError, VmigError } from '@vmig/core';
import { compressionByName } from './compress/registry.js';
import { JOB_PACKETS, type SendChannelConfig, type SendToChannel } from './send-protocol.js';
import { encodeMultifdInit, encodeMultifdPacketHeader, MULTIFD_FLAG_SYNC, MULTIFD_MAX_PAYLOAD, MULTIFD_PACKET_HEADER_SIZE, MULTIFD_PACKET_SIZE, MULTIFD_PAGE_COUNT } from './wire/multifd-wire.js';

const cfg = workerData as SendChannelConfig;
const port = parentPort!;
const ram = GuestRam.fromShared(cfg.ram);
const compressor = compressionByName(cfg.compression)?.createSender();
const channel = `multifd/${cfg.id}`;
setThreadName(`mig/src/send_${cfg.id}`);
const ZERO_RUN = Buffer.alloc(MULTIFD_PACKET_SIZE);

// A job's header buffer is reused once the socket reports it written (fresh memory faults).
const freeHeaders: Buffer[] = [];
const pagesScratch = Buffer.allocUnsafeSlow(MULTIFD_PACKET_SIZE);
let failed = false;

function fail(err: unknown): void {
  if (failed) return;
  failed = true;
  const e = toVmigError(err, 'VMIG_ERR_CHANNEL', { channel });
  port.postMessage({ t: 'error', error: e.toJSON() });
}

const raw = net.connect(cfg.uri.transport === 'tcp' ? { host: cfg.uri.host, port: cfg.uri.port } : { path: cfg.uri.path });
raw.setNoDelay(true);
/** The channel: the connection itself, or TLS over it (this thread does the handshake). */
let sock: net.Socket = raw;
let closing = false;
function watch(s: net.Socket): void {
  s.on('error', (e: NodeJS.ErrnoException) => fail(new VmigError('VMIG_ERR_PEER_CLOSED', `multifd channel: ${e.code ?? e.message}`, { channel })));
  s.on('close', () => {
    if (!closing) fail(new VmigError('VMIG_ERR_PEER_CLOSED', 'multifd channel closed by the peer', { channel }));
  });
  s.on('data', () => {}); // nothing comes back on a multifd channel
}
let connected = false;
raw.on('error', (e: NodeJS.ErrnoException) => fail(new VmigError(connected ? 'VMIG_ERR_PEER_CLOSED' : 'VMIG_ERR_CONNECT', `multifd channel: ${e.code ?? e.message}`, { channel })));

raw.once('connect', () => {
  connected = true;
  void (async () => {
    if (cfg.tls) sock = await tlsConnect(raw, cfg.uri.transport === 'tcp' ? cfg.uri.host : 'localhost', cfg.tls, cfg.tlsTimeoutMs, channel);
    watch(sock);
    sock.write(encodeMultifdInit({ uuid: cfg.uuid, id: cfg.id }));
    port.postMessage({ t: 'ready', fd: (raw as unknown as { _handle?: { fd?: number } })._handle?.fd ?? -1 });
  })().catch(fail);
});

/**
 * What one job writes, in order: views of the header buffer, of compressed payloads (the
 * method's own output buffers), and of guest RAM. Adjacent views of one buffer are merged, so a job of zero pages is one write.
 */
class Writes {
  private readonly views: Buffer[] = [];

  add(buf: Buffer, start: number, end: number): void {
    const last = this.views[this.views.length - 1];
    if (last && last.buffer === buf.buffer && last.byteOffset + last.length === buf.byteOffset + start) {
      this.views[this.views.length - 1] = Buffer.from(last.buffer, last.byteOffset, last.length + end - start);
    } else {
      this.views.push(buf.subarray(start, end));
    }
  }

  /**
   * Corked into one writev. The socket holds views of guest RAM until the callback: a vCPU
   * write to one of those pages meanwhile may make it go torn, which the dirty-log rule
   * already covers (the write set its dirty bit after the migration thread cleared it, so
   * the page goes again).
   */
  flush(after: () => void): void {
    let pending = this.views.length;
    const done = (err?: Error | null): void => {
      if (err) fail(err);
      else if (--pending === 0) after();
    };
    sock.cork();
    for (const v of this.views) sock.write(v, done);
    sock.uncork();
  }
}

// Jobs run one after another (compression is async): packets leave in the order jobs came.
let chain: Promise<void> = Promise.resolve();
port.on('message', (m: SendToChannel) => {
  chain = chain.then(() => handle(m)).catch(fail);
});

async function handle(m: SendToChannel): Promise<void> {
  if (m.t === 'close') {
    // Orderly end, also after a failure: the thread exits once the socket is closed (a
    // peer gone already closed it, and end()'s callback would never come).
    closing = true;
    if (sock.destroyed) port.close();
    else {
      sock.once('close', () => port.close());
      sock.end(() => port.close());
    }
    return;
  }
  if (failed) return;
  if (m.t === 'job') {
    await sendJob(m.block, m.pages, m.packetNum);
  } else if (m.t === 'sync') {
    const headers = freeHeaders.pop() ?? Buffer.allocUnsafeSlow(JOB_PACKETS * MULTIFD_PACKET_HEADER_SIZE);
    encodeMultifdPacketHeader(headers, 0, { flags: MULTIFD_FLAG_SYNC, normalPages: 0, zeroPages: 0, nextPacketSize: 0, packetNum: m.packetNum, ramblock: '', offsets: new Float64Array(0) });
    const w = new Writes();
    w.add(headers, 0, MULTIFD_PACKET_HEADER_SIZE);
    w.flush(() => {
      freeHeaders.push(headers);
      port.postMessage({ t: 'synced', bytes: MULTIFD_PACKET_HEADER_SIZE });
    });
  }
}

/**
 * One packet's pages as byte offsets in the block: the normal pages first, then the zero
 * pages (the header's order). Reused from packet to packet: a job's packets are built one
 * after the other and each header is encoded before the next packet is split.
 */
const packetOffsets = new Float64Array(MULTIFD_PAGE_COUNT);
const zeroScratch = new Float64Array(MULTIFD_PAGE_COUNT);

/**
 * Fills packetOffsets with the pages of `pages` (normal first, then zero); returns the number
 * of normal pages. zero-page-detection=multifd: this thread finds zero pages and lists them,
 * no payload. A run of contiguous pages that may be zero is checked with one compare first (a
 * call per page costs more than the compare itself); otherwise each page is looked at, and a
 * page with data is known from a few bytes (isZeroPage). A run ends at a segment edge of the
 * block (ram-block.ts).
 */
function splitPages(block: RamBlock, pages: Uint32Array): number {
  let normal = 0;
  if (cfg.zeroPageDetection !== 'multifd') {
    for (let i = 0; i < pages.length; i++) packetOffsets[i] = pages[i]! * TARGET_PAGE_SIZE;
    return pages.length;
  }
  let zero = 0;
  for (let i = 0; i < pages.length; ) {
    const start = pages[i]! * TARGET_PAGE_SIZE;
    const limit = block.segmentEnd(start) / TARGET_PAGE_SIZE;
    let j = i + 1;
    while (j < pages.length && pages[j] === pages[j - 1]! + 1 && pages[j]! < limit) j++;
    const end = (pages[j - 1]! + 1) * TARGET_PAGE_SIZE;
    const run = block.bytes(start, end - start);
    if (mayBeZero(run, 0) && ZERO_RUN.compare(run, 0, run.length, 0, run.length) === 0) {
      for (let off = start; off < end; off += TARGET_PAGE_SIZE) zeroScratch[zero++] = off;
    } else {
      for (let off = start; off < end; off += TARGET_PAGE_SIZE) {
        if (isZeroPage(run, off - start)) zeroScratch[zero++] = off;
        else packetOffsets[normal++] = off;
      }
    }
    i = j;
  }
  packetOffsets.set(zeroScratch.subarray(0, zero), normal);
  return normal;
}

/** One job: its pages as packets of up to 128 pages each, numbered from `packetNum`. */
async function sendJob(blockIdx: number, pages: Uint32Array, packetNum: number): Promise<void> {
  const block = ram.blocks[blockIdx]!;
  const headers = freeHeaders.pop() ?? Buffer.allocUnsafeSlow(JOB_PACKETS * MULTIFD_PACKET_HEADER_SIZE);
  const w = new Writes();
  let bytes = 0;
  let normalCount = 0;
  let zeroCount = 0;
  for (let k = 0; k * MULTIFD_PAGE_COUNT < pages.length; k++) {
    const part = pages.subarray(k * MULTIFD_PAGE_COUNT, (k + 1) * MULTIFD_PAGE_COUNT);
    const normal = splitPages(block, part);
    const zero = part.length - normal;
    let flags = 0;
    let payloadLen = normal * TARGET_PAGE_SIZE;
    // Compressed: the method's output is written as it is. Otherwise (no method, or the
    // method sent it raw) the pages go straight from guest RAM.
    let payload: Buffer | undefined;
    if (compressor !== undefined && normal > 0) {
      for (let i = 0; i < normal; i++) copyBytes(pagesScratch, i * TARGET_PAGE_SIZE, block.page(packetOffsets[i]! / TARGET_PAGE_SIZE));
      // Only the method may choose to send raw: a stateful stream (zlib) has consumed the
      // pages, so its output must go out even when it grew (random data does).
      const out = await compressor.compress(pagesScratch.subarray(0, payloadLen));
      if (out && out.payload.length > MULTIFD_MAX_PAYLOAD) throw new VmigError('VMIG_ERR_MULTIFD_PACKET', `compressed packet of ${out.payload.length} bytes`, { channel });
      if (out) {
        flags = out.flag;
        payload = out.payload;
        payloadLen = payload.length;
      }
    }
    const hpos = k * MULTIFD_PACKET_HEADER_SIZE;
    encodeMultifdPacketHeader(headers, hpos, {
      flags,
      normalPages: normal,
      zeroPages: zero,
      nextPacketSize: payloadLen,
      packetNum: packetNum + k,
      ramblock: block.idstr,
      offsets: packetOffsets,
    });
    w.add(headers, hpos, hpos + MULTIFD_PACKET_HEADER_SIZE);
    if (payload) {
      w.add(payload, 0, payloadLen);
    } else {
      // A view per run of contiguous pages inside one segment.
      for (let i = 0; i < normal; ) {
        const first = packetOffsets[i]!;
        const limit = block.segmentEnd(first);
        let j = i + 1;
        while (j < normal && packetOffsets[j] === packetOffsets[j - 1]! + TARGET_PAGE_SIZE && packetOffsets[j]! < limit) j++;
        const run = block.bytes(first, packetOffsets[j - 1]! + TARGET_PAGE_SIZE - first);
        w.add(run, 0, run.length);
        i = j;
      }
    }
    bytes += MULTIFD_PACKET_HEADER_SIZE + payloadLen;
    normalCount += normal;
    zeroCount += zero;
  }
  w.flush(() => {
    freeHeaders.push(headers);
    port.postMessage({ t: 'done', bytes, normal: normalCount, zero: zeroCount });
  });
}
