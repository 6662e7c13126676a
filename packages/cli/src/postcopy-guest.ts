/**
 * The postcopy side of `vmig incoming`: core's PostcopyIncoming, plus the test guest's part
 * of it. The destination's vCPU threads are the source's (from its `vmig-vcpus` state):
 * created parked when the source announces that state at setup, resumed at RUN. The
 * preempt connection belongs to a thread of its own (preempt-channel.worker.ts); a vCPU
 * that faults reads the pages it asked for from it (core's postcopy/preempt-reader.ts). At
 * the end the threads stop and their writes are checked (test-harness postcopy-verify.ts).
 */
import type net from 'node:net';
import { Worker } from 'node:worker_threads';
import { detachFd } from '@vmig/channel';
import {
  createPreemptReader,
  type GuestRam,
  type MigrationNotifiers,
  type MissingPagesShared,
  PostcopyIncoming,
  preemptReaderMode,
  preemptReads,
  type PreemptReaderShared,
  type ReturnPathShared,
  TARGET_PAGE_SIZE,
  toVmigError,
  VmigError,
  workerUrl,
} from '@vmig/core';
import { checkStampedRam, VcpuPool, type VcpuState, type VcpuStateDevice } from '@vmig/test-harness';
import type { PreemptFromThread, PreemptThreadData, PreemptToThread } from './preempt-protocol.js';
import type { PreemptReaderChoice } from './options.js';
import { lowerBackgroundThreads, restoreThreads, type PriorityChange } from './thread-priority.js';
import { awaitExit, exitOf } from './worker-exit.js';

export interface PostcopyGuestOptions {
  /** Guest RAM once it exists (the destination may build it from the stream). */
  ram: () => GuestRam | undefined;
  vcpuState: VcpuStateDevice;
  /** The return path (the main connection's), once it exists. */
  returnPath: () => ReturnPathShared | undefined;
  /** --postcopy-preempt: start the preempt channel's thread now. */
  preempt: boolean;
  sealMultifd: (() => Promise<void>) | undefined;
  notifiers: MigrationNotifiers;
  blocktime: boolean;
  /** Nice value for the load thread after RUN (thread-priority.ts); 0: unchanged. */
  backgroundNice: number;
  /** Slice (us) for the preempt thread from LISTEN (thread-slice.ts); 0: the kernel's. */
  faultSliceUs: number;
  /** With preempt: who reads the preempt channel (core's postcopy/preempt-reader.ts). */
  preemptReader: PreemptReaderChoice;
  /** The first failure anywhere: the migration fails with it. */
  fatal: (e: VmigError) => void;
  /** --channel-timeout (ms). */
  timeoutMs: number;
}

export class PostcopyGuest {
  readonly incoming: PostcopyIncoming;
  private vcpus: Promise<VcpuPool> | undefined;
  /** How many threads `vcpus` has (known before they are up). */
  private vcpuThreads = 0;
  /** The preempt channel's thread, started with `vmig incoming` (see its file). */
  private readonly preemptThread: Worker | undefined;
  private preemptChannel: { sock: net.Socket; fd: number; first: Uint8Array } | undefined;
  private preemptStarted = false;
  private preemptDone: Promise<void> = Promise.resolve();
  private preemptExited: Promise<void> | undefined;
  /** The preempt channel's reader role, shared by its thread and the vCPUs. */
  private readonly preemptReader: PreemptReaderShared | undefined;
  private lowered: PriorityChange | undefined;
  /** The preempt thread's slice once it places (us); null: the kernel's. */
  private faultSliceUs: number | null = null;

  constructor(private readonly opts: PostcopyGuestOptions) {
    if (opts.preempt) {
      this.preemptThread = this.startPreemptThread();
      this.preemptReader = createPreemptReader(opts.preemptReader === 'vcpu');
    }
    this.incoming = new PostcopyIncoming({
      returnPath: opts.returnPath,
      onListen: () => this.startPreempt(),
      notifiers: opts.notifiers,
      sealMultifd: opts.sealMultifd,
      blocktime: opts.blocktime,
      finishTimeoutMs: opts.timeoutMs,
      onRun: (shared, placer) => {
        // vm_start: threads created parked at setup resume; otherwise (or if the count
        // changed) they start now.
        const st = opts.vcpuState.loaded;
        const n = st?.writers ?? 0;
        placer.setRunningVcpus(n);
        if (this.vcpus && this.vcpuThreads !== n) {
          void this.vcpus.then((p) => p.terminate(), () => {});
          this.vcpus = undefined;
        }
        const ram = opts.ram();
        if (n === 0 || !ram || !st) return;
        this.vcpus ??= this.startVcpus(ram, st, shared, false);
        void this.vcpus.then((p) => p.resume(), () => {});
        // The guest runs here now: background pages must not delay its faults. The vCPU
        // threads exist (created above or at setup) and keep their priority. Without
        // preempt this thread places requested pages too, so it keeps its own.
        if (opts.preempt) this.lowered = lowerBackgroundThreads(opts.backgroundNice);
      },
    });
    // The vCPU state announced at setup: create the threads now, parked, so that RUN costs
    // no thread start while pages stream in.
    opts.vcpuState.onLoaded = (st) => {
      const ram = opts.ram();
      if (this.incoming.state !== 'advise' || this.vcpus || !ram || st.writers === 0) return;
      this.vcpus = this.startVcpus(ram, st, this.incoming.prepare(), true);
    };
  }

  /** Each write checked against the received map, and tracked for the final check. */
  private startVcpus(ram: GuestRam, st: VcpuState, shared: MissingPagesShared, parked: boolean): Promise<VcpuPool> {
    this.vcpuThreads = st.writers;
    const p = VcpuPool.start(ram, {
      writers: st.writers,
      dirtyRate: st.dirtyRate ?? 0,
      pattern: st.pattern === 'hot' ? 'hot' : 'uniform',
      hotPages: st.hotPages ?? 64,
      seed: (st.seed ?? 1) + 1,
      missing: shared,
      preempt: this.preemptReader,
      track: true,
      startStopped: parked,
    });
    p.catch((e: unknown) => this.opts.fatal(toVmigError(e, 'VMIG_ERR_WORKER')));
    return p;
  }

  private startPreemptThread(): Worker {
    const w = new Worker(workerUrl(import.meta.url, 'preempt-channel.worker.js'), {
      workerData: { faultSliceUs: this.opts.faultSliceUs } satisfies PreemptThreadData,
    });
    this.preemptExited = exitOf(w);
    let ended!: () => void;
    this.preemptDone = new Promise<void>((r) => (ended = r));
    w.on('message', (m: PreemptFromThread) => {
      if (m.t === 'slice') return void (this.faultSliceUs = m.us);
      if (m.t === 'error') this.opts.fatal(VmigError.fromJSON(m.error));
      ended();
    });
    w.on('error', (e) => {
      this.opts.fatal(new VmigError('VMIG_ERR_WORKER', `preempt channel thread failed: ${e.message}`, { channel: 'preempt' }));
      ended();
    });
    w.on('exit', () => ended());
    // Nothing waits on it until a preempt channel exists.
    w.unref();
    return w;
  }

  /** Waits for the thread to finish with its channel, or tells it to stop; then it ends. */
  private async stopPreempt(): Promise<void> {
    const w = this.preemptThread;
    if (!w) return;
    if (this.preemptStarted) await this.preemptDone;
    else w.postMessage({ t: 'stop' } satisfies PreemptToThread);
    await awaitExit(w, this.preemptExited!);
    // Nobody reads the fd any more (the thread ended; PreemptReader.close made sure no vCPU does).
    this.preemptChannel?.sock.destroy();
  }

  /** The preempt connection (`--postcopy-preempt`): handed to its thread at LISTEN. */
  onPreempt(sock: net.Socket, first: Buffer): void {
    if (!this.preemptThread || this.preemptChannel) {
      sock.destroy();
      this.opts.fatal(new VmigError('VMIG_ERR_CHANNEL', this.preemptChannel ? 'a second preempt channel' : 'a preempt channel, but this side was started without --postcopy-preempt', { channel: 'preempt' }));
      return;
    }
    // Ownership: the accepted handle stops reading; its fd is read by the thread and the
    // vCPUs (core's postcopy/preempt-reader.ts), and the handle closes it when they are done.
    this.preemptChannel = { sock, fd: detachFd(sock), first };
    this.preemptThread.ref();
    this.startPreempt();
  }

  /** Once both the channel and LISTEN are there, the thread starts placing. */
  private startPreempt(): void {
    const ch = this.preemptChannel;
    const ram = this.opts.ram();
    const missing = this.incoming.placer?.shared;
    if (this.preemptStarted || !ch || !ram || !this.incoming.placing || !missing) return;
    this.preemptStarted = true;
    this.preemptThread!.postMessage({ t: 'start', fd: ch.fd, first: ch.first, ram: ram.toShared(), missing, reader: this.preemptReader! } satisfies PreemptToThread);
  }

  /**
   * The load is complete. After a switch: the vCPUs stop and their writes are checked; the
   * report's `postcopy` part is returned. Without one (precopy converged first) threads made
   * ready for it end, and there is nothing to report.
   */
  async finish(ram: GuestRam): Promise<Record<string, unknown> | undefined> {
    await this.stopPreempt();
    restoreThreads(this.lowered);
    const pool = await this.vcpus;
    if (this.incoming.state !== 'end') {
      await pool?.terminate();
      return undefined;
    }
    const writes = pool?.writes ?? 0;
    const tracks = (await pool?.terminate()) ?? [];
    const pc = this.incoming.stats();
    return {
      ...pc,
      postcopyBytes: pc.postcopyPages * TARGET_PAGE_SIZE,
      writers: pool?.count ?? 0,
      writes,
      ...checkStampedRam(ram, tracks, pool?.count ?? 0),
      ...(this.opts.blocktime ? this.incoming.blocktime() : {}),
      ...(this.preemptReader ? { preemptReader: preemptReaderMode(this.preemptReader), ...preemptReads(this.preemptReader) } : {}),
      ...(this.opts.preempt ? { scheduling: { backgroundNice: this.lowered?.nice ?? null, faultSliceUs: this.faultSliceUs } } : {}),
    };
  }

  /** A failure: blocked vCPUs give up without writing, then every thread ends. */
  async abort(): Promise<void> {
    this.incoming.abort();
    restoreThreads(this.lowered);
    this.preemptThread?.postMessage({ t: 'stop' } satisfies PreemptToThread);
    await this.stopPreempt();
    await (await this.vcpus?.catch(() => undefined))?.terminate();
  }
}
