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
import type net from 'node:net';
import { parentPort, workerData } from 'node:worker_threads';
import { socketReadingInto } from '@vmig/channel';
import { GuestRam, setThreadName, StreamError, toVmigError, VmigError } from '@vmig/core';
import { PacketReceiver } from './packet-receiver.js';
import { ABORT, APPLYING, DIALECT, DIALECT_LEGACY, POSTED, RELEASED, SEALED } from './recv-control.js';
import type { RecvFromChannel, RecvThreadConfig, RecvToChannel } from './recv-protocol.js';

const cfg = workerData as RecvThreadConfig;
const port = parentPort!;
const channel = `multifd/${cfg.id}`;
setThreadName(`mig/dst/recv_${cfg.id}`);
const ctl = new Int32Array(cfg.control);

let ram: GuestRam | undefined;
let ramArrived: (() => void) | undefined;
port.on('message', (m: RecvToChannel) => {
  if (m.t === 'ram') {
    ram = GuestRam.fromShared(m.ram);
    ramArrived?.();
  } else {
    attach(m.fd, m.leftover);
  }
});

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
    resume: () => sock?.resume(),
    fail: (e) => finish(e),
  },
  channel,
  cfg.zeroUnlessLoaded,
);

/**
 * The recv half of the barrier: post, then park until the load loop releases us. The
 * thread blocks inside the socket's read callback, so nothing more is read meanwhile: the
 * kernel's buffer fills and the sender waits, as QEMU's recv thread does on its semaphore.
 */
function syncBarrier(): void {
  port.postMessage({ t: 'stats', ...receiver.totals } satisfies RecvFromChannel);
  Atomics.add(ctl, POSTED + cfg.id, 1);
  Atomics.notify(ctl, POSTED + cfg.id);
  releases++;
  while (Atomics.load(ctl, RELEASED + cfg.id) < releases) {
    if (Atomics.load(ctl, ABORT) !== 0) throw new VmigError('VMIG_ERR_CANCELLED', 'load aborted', { channel });
    Atomics.wait(ctl, RELEASED + cfg.id, releases - 1, 200);
  }
}

let sock: net.Socket | undefined;

function attach(fd: number, leftover: Uint8Array): void {
  // Bytes read off the socket before the handoff go first, by copy.
  receiver.feed(leftover);
  const s = socketReadingInto(fd, receiver, { writable: false });
  sock = s;
  s.on('end', () => {
    // A channel ends cleanly only between packets.
    if (receiver.atPacketBoundary) finish();
    else finish(new VmigError('VMIG_ERR_PEER_CLOSED', 'multifd channel ended inside a packet', { channel }));
  });
  s.on('close', () => finish(new VmigError('VMIG_ERR_PEER_CLOSED', 'multifd channel closed', { channel })));
  s.on('error', (e: NodeJS.ErrnoException) => finish(new VmigError('VMIG_ERR_PEER_CLOSED', `connection failed: ${e.code ?? e.message}`, { channel }, { cause: e })));
  if (finished) s.destroy(); // the leftover already failed the channel
}

function finish(err?: unknown): void {
  if (finished) return;
  finished = true;
  if (err === undefined) port.postMessage({ t: 'end', ...receiver.totals } satisfies RecvFromChannel);
  else port.postMessage({ t: 'error', error: toVmigError(err, 'VMIG_ERR_CHANNEL', { channel }).toJSON() } satisfies RecvFromChannel);
  sock?.destroy();
  port.close();
}
