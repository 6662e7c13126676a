/**
 * One multifd send channel (QEMU's multifd_send_thread): a worker thread that owns its
 * socket. It connects, sends MultiFDInit_t, then turns each job from the migration thread
 * into one packet read straight out of guest RAM (SharedArrayBuffer).
 *
 * Ownership: a job's pages had their migration-bitmap bits cleared by the migration thread
 * before the job was posted; this thread reads them afterwards, which the dirty-log rule
 * allows (a write after the clear re-dirties the page and it is sent again later).
 * Packets are written in the order jobs arrive, and a SYNC job is written after every job
 * posted before it: that is the sender half of the barrier.
 */
import net from 'node:net';
import { parentPort, workerData } from 'node:worker_threads';
import { GuestRam, isZeroPage, TARGET_PAGE_SIZE, toVmigError, VmigError } from '@vmig/core';
import { compressionByName } from './compress/registry.js';
import type { SendChannelConfig, SendToChannel } from './send-protocol.js';
import { encodeMultifdInit, encodeMultifdPacketHeader, MULTIFD_FLAG_SYNC, MULTIFD_MAX_PAYLOAD, MULTIFD_PACKET_HEADER_SIZE, MULTIFD_PACKET_SIZE } from './wire/multifd-wire.js';

const cfg = workerData as SendChannelConfig;
const port = parentPort!;
const ram = GuestRam.fromShared(cfg.ram);
const hosts = ram.blocks.map((b) => Buffer.from(b.hostSab, 0, b.usedLength));
const compressor = compressionByName(cfg.compression)?.createSender();
const channel = `multifd/${cfg.id}`;
const ZERO_RUN = Buffer.alloc(MULTIFD_PACKET_SIZE);
const PACKET_MAX = MULTIFD_PACKET_HEADER_SIZE + MULTIFD_MAX_PAYLOAD;

// Packet buffers are reused once the socket reports them written (fresh memory faults).
const free: Buffer[] = [];
const pagesScratch = Buffer.allocUnsafeSlow(MULTIFD_PACKET_SIZE);
let failed = false;

function fail(err: unknown): void {
  if (failed) return;
  failed = true;
  const e = toVmigError(err, 'VMIG_ERR_CHANNEL', { channel });
  port.postMessage({ t: 'error', error: e.toJSON() });
}

const sock = net.connect(cfg.uri.transport === 'tcp' ? { host: cfg.uri.host, port: cfg.uri.port } : { path: cfg.uri.path });
sock.setNoDelay(true);
sock.on('error', (e: NodeJS.ErrnoException) => fail(new VmigError('VMIG_ERR_PEER_CLOSED', `multifd channel: ${e.code ?? e.message}`, { channel })));
sock.on('close', () => {
  if (!closing) fail(new VmigError('VMIG_ERR_PEER_CLOSED', 'multifd channel closed by the peer', { channel }));
});
sock.on('data', () => {}); // nothing comes back on a multifd channel
let closing = false;

sock.once('connect', () => {
  sock.write(encodeMultifdInit({ uuid: cfg.uuid, id: cfg.id }));
  port.postMessage({ t: 'ready' });
});

function writePacket(buf: Buffer, len: number, after: () => void): void {
  sock.write(buf.subarray(0, len), (err) => {
    free.push(buf);
    if (err) fail(err);
    else after();
  });
}

/**
 * The header from `buf`, then the pages at `offsets` straight out of guest RAM, corked into
 * one writev. The socket holds views of guest RAM until the callback: a vCPU write to one
 * of those pages meanwhile may make it go torn, which the dirty-log rule already covers (the
 * write set its dirty bit after the migration thread cleared it, so the page goes again).
 */
function writeFromRam(buf: Buffer, host: Buffer, offsets: number[], after: () => void): void {
  sock.cork();
  let pending = 1;
  const done = (err?: Error | null): void => {
    if (err) fail(err);
    else if (--pending === 0) after();
  };
  sock.write(buf.subarray(0, MULTIFD_PACKET_HEADER_SIZE), (err) => {
    free.push(buf);
    done(err);
  });
  for (let i = 0; i < offsets.length; ) {
    let j = i + 1;
    while (j < offsets.length && offsets[j] === offsets[j - 1]! + TARGET_PAGE_SIZE) j++;
    pending++;
    sock.write(host.subarray(offsets[i]!, offsets[j - 1]! + TARGET_PAGE_SIZE), done);
    i = j;
  }
  sock.uncork();
}

// Jobs run one after another (compression is async): packets leave in the order jobs came.
let chain: Promise<void> = Promise.resolve();
port.on('message', (m: SendToChannel) => {
  chain = chain.then(() => handle(m)).catch(fail);
});

async function handle(m: SendToChannel): Promise<void> {
  if (failed) return;
  if (m.t === 'job') {
    await sendPages(m.block, m.pages, m.packetNum);
  } else if (m.t === 'sync') {
    const buf = free.pop() ?? Buffer.allocUnsafeSlow(PACKET_MAX);
    encodeMultifdPacketHeader(buf, 0, { flags: MULTIFD_FLAG_SYNC, normalPages: 0, zeroPages: 0, nextPacketSize: 0, packetNum: m.packetNum, ramblock: '', offsets: new Float64Array(0) });
    writePacket(buf, MULTIFD_PACKET_HEADER_SIZE, () => port.postMessage({ t: 'synced', bytes: MULTIFD_PACKET_HEADER_SIZE }));
  } else {
    closing = true;
    sock.end(() => port.close());
  }
}

async function sendPages(blockIdx: number, pages: Uint32Array, packetNum: number): Promise<void> {
  const block = ram.blocks[blockIdx]!;
  const host = hosts[blockIdx]!;
  const normal: number[] = [];
  const zero: number[] = [];
  if (cfg.zeroPageDetection === 'multifd') {
    // zero-page-detection=multifd: this thread finds zero pages and lists them, no payload.
    // A run of contiguous pages is checked with one compare first (a call per page costs
    // more than the compare itself); only a run that is not all zero is checked page by page.
    for (let i = 0; i < pages.length; ) {
      let j = i + 1;
      while (j < pages.length && pages[j] === pages[j - 1]! + 1) j++;
      const start = pages[i]! * TARGET_PAGE_SIZE;
      const end = (pages[j - 1]! + 1) * TARGET_PAGE_SIZE;
      if (ZERO_RUN.compare(host, start, end, 0, end - start) === 0) {
        for (let off = start; off < end; off += TARGET_PAGE_SIZE) zero.push(off);
      } else {
        for (let off = start; off < end; off += TARGET_PAGE_SIZE) (isZeroPage(host, off) ? zero : normal).push(off);
      }
      i = j;
    }
  } else {
    for (const p of pages) normal.push(p * TARGET_PAGE_SIZE);
  }
  const buf = free.pop() ?? Buffer.allocUnsafeSlow(PACKET_MAX);
  let flags = 0;
  let payloadLen = normal.length * TARGET_PAGE_SIZE;
  // Compressed, the payload is built in `buf` after the header; uncompressed it goes
  // straight from guest RAM to the socket (writeFromRam).
  const compressed = compressor !== undefined && normal.length > 0;
  if (compressed) {
    for (let i = 0; i < normal.length; i++) host.copy(pagesScratch, i * TARGET_PAGE_SIZE, normal[i]!, normal[i]! + TARGET_PAGE_SIZE);
    // Only the method may choose to send raw: a stateful stream (zlib) has consumed the
    // pages, so its output must go out even when it grew (random data does).
    const out = await compressor.compress(pagesScratch.subarray(0, payloadLen));
    if (out && out.payload.length > MULTIFD_MAX_PAYLOAD) throw new VmigError('VMIG_ERR_MULTIFD_PACKET', `compressed packet of ${out.payload.length} bytes`, { channel });
    if (out) {
      flags = out.flag;
      payloadLen = out.payload.length;
      out.payload.copy(buf, MULTIFD_PACKET_HEADER_SIZE);
    } else {
      pagesScratch.copy(buf, MULTIFD_PACKET_HEADER_SIZE, 0, payloadLen);
    }
  }
  encodeMultifdPacketHeader(buf, 0, {
    flags,
    normalPages: normal.length,
    zeroPages: zero.length,
    nextPacketSize: payloadLen,
    packetNum,
    ramblock: block.idstr,
    offsets: Float64Array.from([...normal, ...zero]),
  });
  const len = MULTIFD_PACKET_HEADER_SIZE + payloadLen;
  const done = (): void => port.postMessage({ t: 'done', bytes: len, normal: normal.length, zero: zero.length });
  if (compressed) writePacket(buf, len, done);
  else writeFromRam(buf, host, normal, done);
}
