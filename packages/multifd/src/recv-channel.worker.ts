/**
 * One multifd recv channel (QEMU's multifd_recv_thread): a worker thread that owns its
 * socket (the fd handed over by the load loop) and writes packets' pages into guest RAM.
 * Every count and offset is checked before a byte is written. At a SYNC packet it takes part
 * in the barrier described in recv-control.ts.
 */
import net from 'node:net';
import { parentPort, workerData } from 'node:worker_threads';
import { ByteReader } from '@vmig/channel';
import { EndOfStream, GuestRam, StreamError, TARGET_PAGE_SIZE, toVmigError, VmigError } from '@vmig/core';
import { compressionByFlags } from './compress/registry.js';
import type { MultifdRecvDecompressor } from './compress/method.js';
import { ABORT, APPLYING, POSTED, RELEASED, SEALED } from './recv-control.js';
import type { RecvChannelConfig, RecvFromChannel, RecvToChannel } from './recv-protocol.js';
import { checkMultifdOffsets, decodeMultifdPacketHeader, type MultifdPacketHeader, MULTIFD_FLAG_SYNC, MULTIFD_MAX_PAYLOAD, MULTIFD_PACKET_HEADER_SIZE, MULTIFD_PACKET_SIZE } from './wire/multifd-wire.js';

const cfg = workerData as RecvChannelConfig;
const port = parentPort!;
const channel = `multifd/${cfg.id}`;
const ctl = new Int32Array(cfg.control);
const scratch = Buffer.allocUnsafeSlow(MULTIFD_PACKET_SIZE);
const decompressors = new Map<number, MultifdRecvDecompressor>();

let ram: GuestRam | undefined = cfg.ram ? GuestRam.fromShared(cfg.ram) : undefined;
let ramArrived: (() => void) | undefined;
port.on('message', (m: RecvToChannel) => {
  if (m.t === 'ram') {
    ram = GuestRam.fromShared(m.ram);
    ramArrived?.();
  }
});

async function guestRam(): Promise<GuestRam> {
  // RAM may be created from the main stream's block list after this channel connected.
  while (!ram) await new Promise<void>((r) => (ramArrived = r));
  return ram;
}

const stats = { normal: 0, zero: 0, bytes: cfg.leftover.length };
const sock = new net.Socket({ fd: cfg.fd, readable: true, writable: false });
const reader = new ByteReader(sock, { channel, initial: cfg.leftover, maxRead: MULTIFD_MAX_PAYLOAD });
let releases = 0;

/** The recv half of the barrier: post, then park until the load loop releases us. */
function syncBarrier(): void {
  port.postMessage({ t: 'stats', ...stats } satisfies RecvFromChannel);
  Atomics.add(ctl, POSTED + cfg.id, 1);
  Atomics.notify(ctl, POSTED + cfg.id);
  releases++;
  while (Atomics.load(ctl, RELEASED + cfg.id) < releases) {
    if (Atomics.load(ctl, ABORT) !== 0) throw new VmigError('VMIG_ERR_CANCELLED', 'load aborted', { channel });
    Atomics.wait(ctl, RELEASED + cfg.id, releases - 1, 200);
  }
}

async function run(): Promise<void> {
  for (;;) {
    try {
      await reader.ensure(MULTIFD_PACKET_HEADER_SIZE);
    } catch (e) {
      // A channel ends cleanly only between packets.
      if (e instanceof EndOfStream && reader.buf.length - reader.pos === 0) return;
      throw e;
    }
    const h = decodeMultifdPacketHeader(reader.buf, reader.pos, channel);
    reader.pos += MULTIFD_PACKET_HEADER_SIZE;
    stats.bytes += MULTIFD_PACKET_HEADER_SIZE;
    if (h.normalPages + h.zeroPages > 0) {
      // The postcopy seal (recv-control.ts): count in, then check.
      Atomics.add(ctl, APPLYING, 1);
      try {
        if (Atomics.load(ctl, SEALED) !== 0) {
          throw new StreamError('VMIG_ERR_POSTCOPY', `packet ${h.packetNum}: pages on a multifd channel after the postcopy switch`, { channel });
        }
        await applyPages(h);
      } finally {
        Atomics.sub(ctl, APPLYING, 1);
        Atomics.notify(ctl, APPLYING);
      }
    }
    if (h.flags & MULTIFD_FLAG_SYNC) syncBarrier();
  }
}

/** Writes a packet's pages (every count and offset checked first). */
async function applyPages(h: MultifdPacketHeader): Promise<void> {
  const block = (await guestRam()).find(h.ramblock);
  if (!block) throw new StreamError('VMIG_ERR_UNKNOWN_BLOCK', `packet ${h.packetNum}: unknown RAM block '${h.ramblock}'`, { channel });
  checkMultifdOffsets(h, block.usedLength, channel);
  const host = Buffer.from(block.hostSab, 0, block.usedLength);
  const method = compressionByFlags(h.flags, channel);
  if (method) {
    if (h.nextPacketSize > MULTIFD_MAX_PAYLOAD) throw new StreamError('VMIG_ERR_MULTIFD_PACKET', `packet ${h.packetNum}: payload of ${h.nextPacketSize} bytes`, { channel });
    let d = decompressors.get(method.flag);
    if (!d) decompressors.set(method.flag, (d = method.createReceiver()));
    await reader.ensure(h.nextPacketSize);
    const payload = Buffer.from(reader.buf.buffer, reader.buf.byteOffset + reader.pos, h.nextPacketSize);
    const out = scratch.subarray(0, h.normalPages * TARGET_PAGE_SIZE);
    await d.decompress(payload, out);
    reader.pos += h.nextPacketSize;
    stats.bytes += h.nextPacketSize;
    for (let i = 0; i < h.normalPages; i++) out.copy(host, h.offsets[i]!, i * TARGET_PAGE_SIZE, (i + 1) * TARGET_PAGE_SIZE);
    for (let i = 0; i < h.normalPages; i++) block.loaded.set(h.offsets[i]! / TARGET_PAGE_SIZE);
  } else {
    // nocomp: normal_pages raw pages (next_packet_size is not trusted: QEMU 7.2 leaves it stale).
    for (let i = 0; i < h.normalPages; i++) {
      if (reader.buf.length - reader.pos < TARGET_PAGE_SIZE) await reader.ensure(TARGET_PAGE_SIZE);
      block.host.set(reader.buf.subarray(reader.pos, reader.pos + TARGET_PAGE_SIZE), h.offsets[i]!);
      block.loaded.set(h.offsets[i]! / TARGET_PAGE_SIZE);
      reader.pos += TARGET_PAGE_SIZE;
    }
    stats.bytes += h.normalPages * TARGET_PAGE_SIZE;
  }
  for (let i = h.normalPages; i < h.offsets.length; i++) block.loadZeroPage(h.offsets[i]!, cfg.zeroUnlessLoaded);
  stats.normal += h.normalPages;
  stats.zero += h.zeroPages;
}

run().then(
  () => {
    port.postMessage({ t: 'end', ...stats } satisfies RecvFromChannel);
    sock.destroy();
    port.close();
  },
  (e: unknown) => {
    const err = e instanceof EndOfStream ? new VmigError('VMIG_ERR_PEER_CLOSED', 'multifd channel ended inside a packet', { channel }) : toVmigError(e, 'VMIG_ERR_CHANNEL', { channel });
    port.postMessage({ t: 'error', error: err.toJSON() } satisfies RecvFromChannel);
    sock.destroy();
    port.close();
  },
);
