/** A writer thread of the store (kv-store.mjs): puts to its own keys until told to quit. */
import { parentPort, workerData } from 'node:worker_threads';
import { GuestRam, MissingPagesVcpu } from 'vmig/vcpu';

const STOP = 0;
const PARKED = 1;
const QUIT = 2;
const RECORD = 64;

const { ram, ctl, acked: ackedSab, id, writers, keys, received } = workerData;
/** On a postcopy destination: a page is asked for (and waited for) before it is touched. */
const missing = received ? new MissingPagesVcpu(received, id) : undefined;
const block = GuestRam.attach(ram).block('kv');
const host = block.host;
const view = new DataView(host.buffer, host.byteOffset, keys * RECORD);
const c = new Int32Array(ctl);
const acked = new Float64Array(ackedSab);
const sleep = new Int32Array(new SharedArrayBuffer(4));
const mine = Math.floor((keys - id - 1) / writers) + 1;
let seed = (id + 1) * 0x9e3779b9;

function checksum(key, version) {
  return (Math.imul(key ^ 0x9e3779b9, 2654435761) ^ Math.imul(version | 0, 40503) ^ Math.floor(version / 2 ** 32)) >>> 0;
}

parentPort.postMessage('running');
for (;;) {
  if (Atomics.load(c, QUIT)) break;
  if (Atomics.load(c, STOP)) {
    // Parked: no write until resumed. The Atomics.add + notify pairs with KvStore.stop's wait.
    Atomics.add(c, PARKED, 1);
    Atomics.notify(c, PARKED);
    while (Atomics.load(c, STOP) === 1) Atomics.wait(c, STOP, 1, 100);
    Atomics.sub(c, PARKED, 1);
    continue;
  }
  for (let i = 0; i < 64; i++) {
    seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
    const k = id + writers * (seed % mine);
    const version = acked[k] + 1;
    const off = k * RECORD;
    // false: postcopy failed, this write must not happen (the store is split between two processes).
    if (missing && !missing.beforeWrite(off >>> 12)) break;
    host.fill(version % 251, off + 16, off + RECORD);
    view.setUint32(off + 8, k, true);
    view.setUint32(off + 12, checksum(k, version), true);
    view.setFloat64(off, version, true);
    // After the write, so that the next bitmap sync sends it again.
    block.markDirty(off, RECORD);
    // Acknowledged: the client may now rely on it.
    acked[k] = version;
  }
  Atomics.wait(sleep, 0, 0, 1);
}
