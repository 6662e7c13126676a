/**
 * A key-value store whose records live in one vmig RAM block (a SharedArrayBuffer), written
 * by worker threads, and what it takes to migrate it: a `vm` (stop and resume the writers)
 * and a device that carries the acknowledged versions with the RAM.
 *
 * Record of key k: 64 bytes at k * 64: version (float64, little-endian), key (uint32),
 * checksum (uint32), 48 payload bytes all equal to version % 251. A writer owns the keys
 * k % writers === its id: it writes the record, marks it dirty (after the write: vmig's
 * rule), then acknowledges the version in `acked` (what a client would be told).
 */
import { Worker } from 'node:worker_threads';
import { GuestRam, MsgpackDevice } from 'vmig';

export const RECORD = 64;
export const BLOCK = 'kv';

// Control words shared with the writers (Int32Array).
export const STOP = 0;
export const PARKED = 1;
export const QUIT = 2;

export function checksum(key, version) {
  return (Math.imul(key ^ 0x9e3779b9, 2654435761) ^ Math.imul(version | 0, 40503) ^ Math.floor(version / 2 ** 32)) >>> 0;
}

export class KvStore {
  /** A new, empty store of `keys` records in a block of `blockBytes`. */
  static create(keys, blockBytes = 16 * 2 ** 20) {
    if (keys * RECORD > blockBytes) throw new RangeError(`${keys} records do not fit in ${blockBytes} bytes`);
    return new KvStore(GuestRam.create([{ name: BLOCK, size: blockBytes }]), keys, new Float64Array(new SharedArrayBuffer(keys * 8)));
  }

  constructor(ram, keys, acked) {
    this.ram = ram;
    this.keys = keys;
    /** The highest acknowledged version of each key (written by the key's owner only). */
    this.acked = acked;
    this.ctl = new Int32Array(new SharedArrayBuffer(12));
    this.workers = [];
  }

  /**
   * Starts `n` writer threads; resolves once each runs. `received`: the received map of a
   * postcopy destination (vmig's IncomingGuest.run); the writers then ask for a page before
   * they touch it.
   */
  async serve(n, received) {
    Atomics.store(this.ctl, QUIT, 0);
    this.workers = await Promise.all(
      Array.from({ length: n }, (_, id) => {
        const w = new Worker(new URL('./writer.worker.mjs', import.meta.url), {
          workerData: { ram: this.ram.share(), ctl: this.ctl.buffer, acked: this.acked.buffer, id, writers: n, keys: this.keys, received },
        });
        return new Promise((resolve, reject) => {
          w.once('message', () => resolve(w));
          w.once('error', reject);
        });
      }),
    );
  }

  /** vm_stop: every writer parks between two writes; resolves once all have (bounded). */
  async stop(timeoutMs = 10_000) {
    Atomics.store(this.ctl, STOP, 1);
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      const parked = Atomics.load(this.ctl, PARKED);
      if (parked >= this.workers.length) return;
      if (performance.now() > deadline) throw new Error(`writers did not park within ${timeoutMs} ms`);
      // The writer's Atomics.add + notify on PARKED pairs with this wait.
      await Atomics.waitAsync(this.ctl, PARKED, parked, 50).value;
    }
  }

  /** vm_start after a failed or cancelled migration. */
  resume() {
    Atomics.store(this.ctl, STOP, 0);
    Atomics.notify(this.ctl, STOP);
  }

  /** Ends the writer threads (stopped or not). */
  async close() {
    Atomics.store(this.ctl, QUIT, 1);
    this.resume();
    await Promise.all(this.workers.map((w) => new Promise((r) => (w.threadId === -1 ? r() : w.once('exit', r)))));
    this.workers = [];
  }

  /** Every key holds its acknowledged version, whole (nothing lost, nothing torn). */
  verify() {
    const host = this.ram.block(BLOCK).host;
    const view = new DataView(host.buffer, host.byteOffset, this.keys * RECORD);
    let writes = 0;
    let lost = 0;
    const examples = [];
    for (let k = 0; k < this.keys; k++) {
      const off = k * RECORD;
      const version = view.getFloat64(off, true);
      const whole =
        version === 0 ||
        (view.getUint32(off + 8, true) === k && view.getUint32(off + 12, true) === checksum(k, version) && host.subarray(off + 16, off + RECORD).every((b) => b === version % 251));
      if (version !== this.acked[k] || !whole) {
        lost++;
        if (examples.length < 5) examples.push({ key: k, inRam: version, acknowledged: this.acked[k], whole });
      }
      writes += this.acked[k];
    }
    return { keys: this.keys, acknowledgedWrites: writes, lost, examples };
  }

  /**
   * The store as vmig's postcopy guest on a destination: its writers start at RUN, before
   * every page arrived, and stop when the migration completes.
   */
  postcopyGuest(writers) {
    let serving;
    return {
      run: ({ ram, received }) => {
        this.ram = ram;
        serving = this.serve(writers, received);
        return writers;
      },
      finish: async () => {
        await serving;
        await this.stop();
        return { writers };
      },
      abort: async () => {
        await serving?.catch(() => {});
        await this.close();
      },
    };
  }

  /** The device that carries `acked` with the RAM (QEMU's VMStateDescription idea). */
  device() {
    const store = this;
    return new (class extends MsgpackDevice {
      idstr = 'kv-acks';
      instanceId = 0;
      versionId = 1;
      minimumVersionId = 1;
      saveState() {
        return { keys: store.keys, acked: Buffer.from(store.acked.buffer) };
      }
      loadState(s) {
        if (!s || s.keys !== store.keys || !(s.acked instanceof Uint8Array) || s.acked.length !== store.keys * 8) throw new Error('kv-acks: malformed state');
        new Uint8Array(store.acked.buffer).set(s.acked);
      }
    })();
  }
}
