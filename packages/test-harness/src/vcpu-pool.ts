/**
 * The vCPUs of a test guest: writer workers over guest RAM, stopped and resumed with the
 * protocol in vcpu-control.ts. Implements core's VmRunControl (vm_stop / vm_start).
 */
import { Worker } from 'node:worker_threads';
import { type GuestRam, InvalidArgumentError, type MissingPagesShared, type PreemptReaderShared, type RamBlockShared, TARGET_PAGE_SIZE, VmigError, type VmRunControl, workerExecArgv, workerUrl, type WriteProtectShared } from '@vmig/core';
import { controlBytes, PARKED, RUN_STATE, STARTED, STATE_EXIT, STATE_RUN, STATE_STOP, THROTTLE_PCT, WRITES_BASE } from './vcpu-control.js';

export type WritePattern = 'uniform' | 'hot';

export interface WriterOptions {
  writers: number;
  /** Total bytes dirtied per second across all writers (one page per write); 0 = as fast as they can. */
  dirtyRate: number;
  pattern?: WritePattern;
  /** Size of the hot set, in pages. */
  hotPages?: number;
  seed?: number;
  /** Background snapshot: writers check this write-protect map before each write. */
  writeProtect?: WriteProtectShared;
  /** Postcopy destination: writers check this received map before each write. */
  missing?: MissingPagesShared;
  /** With `missing` and preempt: the preempt channel, which a faulting writer may read itself. */
  preempt?: PreemptReaderShared;
  /** Writers remember what they overwrote (postcopy verification); terminate() returns it. */
  track?: boolean;
  /** Writers start parked (vm_start comes later, with resume()). */
  startStopped?: boolean;
}

/** What a tracking writer overwrote: per page (global index), its slot's bytes before the first write and its last seq. */
export interface WriterTrack {
  writer: number;
  pages: Int32Array;
  last: Int32Array;
  /** 64 bytes per page, in `pages` order. */
  orig: Uint8Array;
}

/** What each writer worker receives (SABs are shared, not copied). */
export interface WriterConfig {
  ram: RamBlockShared[];
  control: SharedArrayBuffer;
  index: number;
  writers: number;
  pagesPerSecond: number;
  pattern: WritePattern;
  hotPages: number;
  seed: number;
  writeProtect?: WriteProtectShared | undefined;
  missing?: MissingPagesShared | undefined;
  preempt?: PreemptReaderShared | undefined;
  track?: boolean | undefined;
}

export class VcpuPool implements VmRunControl {
  private readonly ctl: Int32Array;
  private readonly tracks: WriterTrack[] = [];
  private constructor(
    private readonly workers: Worker[],
    control: SharedArrayBuffer,
  ) {
    this.ctl = new Int32Array(control);
    for (const w of workers) w.on('message', (m: WriterTrack) => this.tracks.push(m));
  }

  static async start(ram: GuestRam, opts: WriterOptions): Promise<VcpuPool> {
    if (!Number.isInteger(opts.writers) || opts.writers < 0 || opts.writers > 256) {
      throw new InvalidArgumentError(`writers must be 0..256, got ${opts.writers}`);
    }
    const control = new SharedArrayBuffer(controlBytes(opts.writers));
    const ctl = new Int32Array(control);
    if (opts.startStopped) Atomics.store(ctl, RUN_STATE, STATE_STOP);
    const pagesPerSecond = opts.dirtyRate / TARGET_PAGE_SIZE / Math.max(1, opts.writers);
    const workers: Worker[] = [];
    for (let i = 0; i < opts.writers; i++) {
      const cfg: WriterConfig = {
        ram: ram.toShared(),
        control,
        index: i,
        writers: opts.writers,
        pagesPerSecond,
        pattern: opts.pattern ?? 'uniform',
        hotPages: opts.hotPages ?? 64,
        seed: opts.seed ?? 1,
        writeProtect: opts.writeProtect,
        missing: opts.missing,
        preempt: opts.preempt,
        track: opts.track,
      };
      workers.push(new Worker(workerUrl(import.meta.url, 'vcpu-writer.worker.js'), { workerData: cfg, execArgv: workerExecArgv() }));
    }
    const pool = new VcpuPool(workers, control);
    const failed = new Promise<never>((_, reject) => {
      for (const w of workers) w.once('error', (e) => reject(new VmigError('VMIG_ERR_WORKER', `vCPU writer failed: ${e.message}`)));
    });
    failed.catch(() => {});
    // Wait until every writer runs its loop.
    while (Atomics.load(ctl, STARTED) < opts.writers) {
      const seen = Atomics.load(ctl, STARTED);
      await Promise.race([Atomics.waitAsync(ctl, STARTED, seen, 1000).value, failed]);
    }
    return pool;
  }

  get count(): number {
    return this.workers.length;
  }

  /** vm_stop: resolves once every writer is parked with its last write published. */
  async stop(): Promise<void> {
    Atomics.store(this.ctl, RUN_STATE, STATE_STOP);
    Atomics.notify(this.ctl, RUN_STATE);
    for (;;) {
      const parked = Atomics.load(this.ctl, PARKED);
      if (parked >= this.workers.length) return;
      await Atomics.waitAsync(this.ctl, PARKED, parked, 100).value;
    }
  }

  /** vm_start. */
  resume(): void {
    if (Atomics.load(this.ctl, RUN_STATE) === STATE_EXIT) return;
    Atomics.store(this.ctl, RUN_STATE, STATE_RUN);
    Atomics.notify(this.ctl, RUN_STATE);
  }

  get stopped(): boolean {
    return Atomics.load(this.ctl, RUN_STATE) === STATE_STOP;
  }

  /** Auto-converge: share of time writers sleep, 0..99. */
  setThrottle(pct: number): void {
    Atomics.store(this.ctl, THROTTLE_PCT, Math.max(0, Math.min(99, Math.round(pct))));
  }

  /** Writes done so far by all writers (each counter wraps at 2^32). */
  get writes(): number {
    let n = 0;
    for (let i = 0; i < this.workers.length; i++) n += Atomics.load(this.ctl, WRITES_BASE + i) >>> 0;
    return n;
  }

  /**
   * Writes writer `i` has completed. Its writes are numbered from 0 in their stamps, so a
   * write stamped `seq >= writesOf(i) + 1` began after this call returned.
   */
  writesOf(i: number): number {
    return Atomics.load(this.ctl, WRITES_BASE + i) >>> 0;
  }

  /**
   * Whether the writers are writing: the write count moves within `ms`. How a source checks
   * that its guest runs on after a failed or cancelled migration or snapshot.
   */
  async keepsWriting(ms: number): Promise<boolean> {
    const before = this.writes;
    await new Promise((r) => setTimeout(r, ms));
    return this.writes !== before;
  }

  /** Ends every writer and waits for the threads to exit; returns what tracking writers overwrote. */
  async terminate(): Promise<WriterTrack[]> {
    Atomics.store(this.ctl, RUN_STATE, STATE_EXIT);
    Atomics.notify(this.ctl, RUN_STATE);
    await Promise.all(
      this.workers.map(
        (w) =>
          new Promise<void>((resolve) => {
            const t = setTimeout(() => void w.terminate().then(() => resolve()), 2000);
            w.once('exit', () => {
              clearTimeout(t);
              resolve();
            });
          }),
      ),
    );
    return this.tracks;
  }
}
