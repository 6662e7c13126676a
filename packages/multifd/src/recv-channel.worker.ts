/**
 * One multifd recv channel (QEMU's multifd_recv_thread): a worker thread that owns its
 * socket (the fd handed over by the load loop). The thread is started before its channel
 * connects, so that booting it (a good part of 100 ms here) is not migration time; the
 * channel arrives in a 'channel' message. The socket reads straight into guest RAM:
 * Node's `onread` with a buffer function asks the parser (packet-receiver.ts) where each
 * read should land, so a page's bytes go from the kernel to their place in the
 * SharedArrayBuffer with no copy in between. At a SYNC packet the thread takes part in the
 * barrier described in recv-control.ts.
 */
import net from 'node:net';
import { parentPort, workerData } from 'node:worker_threads';
import { socketReadingInto, tlsAccept, type TlsOptions } from '@vmig/channel';
import { GuestRam, setThreadName, StreamError, toVmigError, VmigError } from '@vmig/core';
import { PacketReceiver } from './packet-receiver.js';
import { MULTIFD_INIT_SIZE } from './wire/multifd-wire.js';
import { ABORT, APPLYING, DIALECT, DIALECT_LEGACY, POSTED, RELEASED, SEALED } from './recv-control.js';
import type { RecvChannelApi, RecvChannelEvents, RecvThreadConfig } from './recv-protocol.js';
import { Comlink, endpoint, type Remote } from './recv-rpc.js';

const cfg = workerData as RecvThreadConfig;
const port = parentPort!;
/**
 * The channel id this thread serves: its slot, or, for a TLS connection (whose id is inside
 * the encrypted init), the id the load loop accepted after this thread read the init.
 */
let id = cfg.id;
let channel = `multifd/${id}`;
setThreadName(`mig/dst/recv_${id}`);
const ctl = new Int32Array(cfg.control);

let ram: GuestRam | undefined;
let ramArrived: (() => void) | undefined;
let adopted: ((id: number) => void) | undefined;
/** The load loop's listener (a comlink proxy); its calls are queued messages, never awaited. */
let events: Remote<RecvChannelEvents> | undefined;

const api: RecvChannelApi = {
  listen(e) {
    events = e as unknown as Remote<RecvChannelEvents>;
  },
  setRam(shared) {
    ram = GuestRam.fromShared(shared);
    ramArrived?.();
  },
  attach(fd, leftover) {
    try {
      attach(fd, leftover);
    } catch (e) {
      finish(e);
    }
  },
  async attachTls(fd, tls, timeoutMs) {
    try {
      return await attachTls(fd, tls, timeoutMs);
    } catch (e) {
      finish(e);
      return null;
    }
  },
  adopt(id) {
    adopted?.(id);
  },
};
Comlink.expose(api, endpoint(port));

let releases = 0;
let finished = false;

const receiver = new PacketReceiver(
  {
    ram: () => ram,
    async ramReady() {
      // RAM may be created from the main stream's block list after this channel connected.
      while (!ram) await new Promise<void>((r) => (ramArrived = r));
    },
    beginPages(h) {
      // The postcopy seal (recv-control.ts): count in, then check.
      Atomics.add(ctl, APPLYING, 1);
      if (Atomics.load(ctl, SEALED) !== 0) {
        throw new StreamError('VMIG_ERR_POSTCOPY', `packet ${h.packetNum}: pages on a multifd channel after the postcopy switch`, { channel });
      }
    },
    endPages() {
      Atomics.sub(ctl, APPLYING, 1);
      Atomics.notify(ctl, APPLYING);
    },
    sync: syncBarrier,
    expected: () => ({ compressionFlag: cfg.compressionFlag, legacy: Atomics.load(ctl, DIALECT) === DIALECT_LEGACY }),
    resume: () => {
      sock?.resume();
      settleEnd();
    },
    fail: (e) => finish(e),
  },
  () => channel,
  cfg.zeroUnlessLoaded,
);

/**
 * The recv half of the barrier: post, then park until the load loop releases us. The
 * thread blocks inside the socket's read callback, so nothing more is read meanwhile: the
 * kernel's buffer fills and the sender waits, as QEMU's recv thread does on its semaphore.
 */
function syncBarrier(): void {
  void events?.stats({ ...receiver.totals });
  Atomics.add(ctl, POSTED + id, 1);
  Atomics.notify(ctl, POSTED + id);
  releases++;
  while (Atomics.load(ctl, RELEASED + id) < releases) {
    if (Atomics.load(ctl, ABORT) !== 0) throw new VmigError('VMIG_ERR_CANCELLED', 'load aborted', { channel });
    Atomics.wait(ctl, RELEASED + id, releases - 1, 200);
  }
}

let sock: net.Socket | undefined;

function attach(fd: number, leftover: Uint8Array): void {
  // Bytes read off the socket before the handoff go first, by copy.
  receiver.feed(leftover);
  const s = socketReadingInto(fd, receiver, { writable: false });
  sock = s;
  watchEnd(s);
  s.on('error', (e: NodeJS.ErrnoException) => finish(new VmigError('VMIG_ERR_PEER_CLOSED', `connection failed: ${e.code ?? e.message}`, { channel }, { cause: e })));
  if (finished) s.destroy(); // the leftover already failed the channel
}

/** The peer ended the stream; judged once the parser took every byte that came before. */
let peerEnded = false;

function watchEnd(s: net.Socket): void {
  s.on('end', () => {
    peerEnded = true;
    settleEnd();
  });
  s.on('close', () => {
    if (!peerEnded) finish(new VmigError('VMIG_ERR_PEER_CLOSED', 'multifd channel closed', { channel }));
  });
}

/**
 * A channel ends cleanly only between packets. Bytes fed while the parser waited (a copy
 * path: TLS) may still be parked when the end comes: then the end waits for them.
 */
function settleEnd(): void {
  if (!peerEnded || receiver.paused) return;
  if (receiver.atPacketBoundary) finish();
  else finish(new VmigError('VMIG_ERR_PEER_CLOSED', 'multifd channel ended inside a packet', { channel }));
}

/**
 * A TLS connection: this thread does the handshake on the socket it owns, reads the
 * MultiFDInit_t through it, and lets the load loop check it and name the channel id before
 * any packet is parsed. Packets then go through the parser by copy (TLS decrypts into its
 * own buffers, so there is no reading straight into guest RAM).
 */
async function attachTls(fd: number, opts: TlsOptions, timeoutMs: number): Promise<Uint8Array> {
  const raw = new net.Socket({ fd, readable: true, writable: true });
  raw.on('error', () => {});
  const t = await tlsAccept(raw, opts, timeoutMs, channel);
  sock = t;
  t.on('error', (e: NodeJS.ErrnoException) => finish(new VmigError('VMIG_ERR_PEER_CLOSED', `connection failed: ${e.code ?? e.message}`, { channel }, { cause: e })));
  const parts: Buffer[] = [];
  let have = 0;
  const first = await new Promise<Buffer>((resolve, reject) => {
    const timer = setTimeout(() => reject(new VmigError('VMIG_ERR_TIMEOUT', `no MultiFDInit_t within ${timeoutMs} ms`, { channel })), timeoutMs);
    const onData = (c: Buffer): void => {
      parts.push(c);
      have += c.length;
      if (have < MULTIFD_INIT_SIZE) return;
      clearTimeout(timer);
      t.off('data', onData);
      t.pause();
      resolve(Buffer.concat(parts));
    };
    t.on('data', onData);
    t.once('end', () => reject(new VmigError('VMIG_ERR_MULTIFD_HANDSHAKE', 'channel ended inside its MultiFDInit_t', { channel })));
  });
  // The load loop checks the init and names the channel with adopt().
  adopted = (accepted) => {
    try {
      serveTls(t, first, accepted);
    } catch (e) {
      finish(e);
    }
  };
  return new Uint8Array(first.subarray(0, MULTIFD_INIT_SIZE));
}

/** The channel's id is known: packets from here on. */
function serveTls(t: net.Socket, first: Buffer, accepted: number): void {
  id = accepted;
  channel = `multifd/${id}`;
  setThreadName(`mig/dst/recv_${id}`);
  receiver.feed(first.subarray(MULTIFD_INIT_SIZE));
  t.on('data', (c: Buffer) => {
    receiver.feed(c);
    if (receiver.paused) t.pause();
  });
  watchEnd(t);
  if (finished) t.destroy();
  else if (!receiver.paused) t.resume();
}

function finish(err?: unknown): void {
  if (finished) return;
  finished = true;
  if (err === undefined) void events?.end({ ...receiver.totals });
  else void events?.error(toVmigError(err, 'VMIG_ERR_CHANNEL', { channel }).toJSON());
  sock?.destroy();
  // The release goes after the last event on the same port; then nothing keeps this thread up.
  events?.[Comlink.releaseProxy]();
  port.close();
}
