/**
 * The postcopy side of an incoming migration: core's PostcopyIncoming, the preempt channel's
 * thread (preempt-channel.worker.ts) and thread priorities, around the application's guest
 * (`IncomingGuest`, incoming-guest.ts): what runs here once the source says RUN. A vCPU that
 * faults asks for its page through the received map and, with preempt, reads the pages it
 * asked for itself (core's postcopy/preempt-reader.ts).
 */
import type net from 'node:net';
import { Worker } from 'node:worker_threads';
import { detachFd } from '@vmig/channel';
import {
  createPreemptReader,
  type GuestRam,
  type MigrationNotifiers,
  PostcopyIncoming,
  preemptReaderMode,
  preemptReads,
  type PreemptReaderShared,
  isTransportFailure,
  type ReturnPathShared,
  TARGET_PAGE_SIZE,
  VmigError,
  workerUrl,
  workerExecArgv,
} from '@vmig/core';
import type { IncomingGuest } from './incoming-guest.js';
import type { PreemptFromThread, PreemptThreadData, PreemptToThread } from './preempt-protocol.js';
import { lowerBackgroundThreads, restoreThreads, type PriorityChange } from './thread-priority.js';
import { awaitExit, exitOf } from './worker-exit.js';

/** Who reads the preempt channel: its own thread only, or also a faulting vCPU (preempt-reader.ts). */
export const PREEMPT_READERS = ['vcpu', 'thread'] as const;
export type PreemptReaderChoice = (typeof PREEMPT_READERS)[number];

export interface PostcopyDestinationOptions {
  /** Guest RAM once it exists (the destination may build it from the stream). */
  ram: () => GuestRam | undefined;
  /** The application's guest on this side; none: nothing runs here (pages are only placed). */
  guest: IncomingGuest | undefined;
  /** The return path (the main connection's), once it exists. */
  returnPath: () => ReturnPathShared | undefined;
  /** postcopy-preempt: start the preempt channel's thread now. */
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
  /** A transport failure of the preempt channel after RUN: postcopy pauses (recovery). */
  pause?: (e: VmigError) => void;
  /** The channel timeout (ms). */
  timeoutMs: number;
}

export class PostcopyDestination {
  readonly incoming: PostcopyIncoming;
  /** The preempt channel's thread, started with the incoming migration (see its file). */
  private readonly preemptThread: Worker | undefined;
  private preemptChannel: { sock: net.Socket; fd: number; first: Uint8Array } | undefined;
  /** The thread has the current channel (until it said 'end', 'error' or 'detached'). */
  private preemptStarted = false;
  private preemptDone: Promise<void> = Promise.resolve();
  private channelEnded: () => void = () => {};
  private preemptExited: Promise<void> | undefined;
  /** The preempt channel's reader role, shared by its thread and the vCPUs. */
  private readonly preemptReader: PreemptReaderShared | undefined;
  private lowered: PriorityChange | undefined;
  /** The preempt thread's slice once it places (us); null: the kernel's. */
  private faultSliceUs: number | null = null;

  constructor(private readonly opts: PostcopyDestinationOptions) {
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
      // A faulting vCPU is on the fault path too (it reads the preempt channel itself).
      vcpuFaultSliceUs: opts.preempt ? opts.faultSliceUs : 0,
      finishTimeoutMs: opts.timeoutMs,
      onRun: (shared, placer) => {
        // vm_start: the guest runs here from now on.
        const ram = opts.ram();
        const n = ram && opts.guest ? opts.guest.run({ ram, received: shared, preemptReader: this.preemptReader }) : 0;
        placer.setRunningVcpus(n);
        // Background pages must not delay the guest's faults. Without preempt this thread
        // places requested pages too, so it keeps its own priority.
        if (opts.preempt && n > 0) this.lowered = lowerBackgroundThreads(opts.backgroundNice);
      },
    });
    opts.guest?.bind?.({
      prepare: () => {
        const ram = opts.ram();
        if (this.incoming.state !== 'advise' || !ram) return undefined;
        return { ram, received: this.incoming.prepare(), preemptReader: this.preemptReader };
      },
      fatal: opts.fatal,
    });
  }

  private startPreemptThread(): Worker {
    const w = new Worker(workerUrl(import.meta.url, 'preempt-channel.worker.js'), {
      execArgv: workerExecArgv(),
      workerData: { faultSliceUs: this.opts.faultSliceUs, timeoutMs: this.opts.timeoutMs } satisfies PreemptThreadData,
    });
    this.preemptExited = exitOf(w);
    w.on('message', (m: PreemptFromThread) => {
      if (m.t === 'slice') return void (this.faultSliceUs = m.us);
      // A stale answer about a channel given up already (paused) says nothing.
      if (!this.preemptStarted) return;
      if (m.t === 'error') {
        const e = VmigError.fromJSON(m.error);
        // After RUN a broken preempt connection pauses postcopy (recovery); anything else fails it.
        if (this.incoming.state === 'running' && isTransportFailure(e) && this.opts.pause) this.opts.pause(e);
        else this.opts.fatal(e);
      }
      this.channelEnded();
    });
    w.on('error', (e) => {
      this.opts.fatal(new VmigError('VMIG_ERR_WORKER', `preempt channel thread failed: ${e.message}`, { channel: 'preempt' }));
      this.channelEnded();
    });
    w.on('exit', () => this.channelEnded());
    // Nothing waits on it until a preempt channel exists.
    w.unref();
    return w;
  }

  /** Waits for the thread to finish with its channel, or tells it to stop; then it ends. */
  private async stopPreempt(): Promise<void> {
    const w = this.preemptThread;
    if (!w) return;
    if (this.preemptStarted) await this.preemptDone;
    w.postMessage({ t: 'stop' } satisfies PreemptToThread);
    await awaitExit(w, this.preemptExited!);
    // Nobody reads the fd any more (the thread ended; PreemptReader.close made sure no vCPU does).
    this.preemptChannel?.sock.destroy();
  }

  /**
   * Postcopy paused: the thread lets go of its channel (no vCPU or thread reads it once this
   * resolves), which is closed; the next preempt connection (recovery) takes its place.
   */
  async pause(): Promise<void> {
    if (!this.preemptThread) return;
    if (this.preemptStarted) {
      this.preemptThread.postMessage({ t: 'detach' } satisfies PreemptToThread);
      await this.preemptDone;
    }
    this.preemptStarted = false;
    this.preemptChannel?.sock.destroy();
    this.preemptChannel = undefined;
  }

  /** Recovery: resolves once the source's new preempt channel is in place (at most `ms`). */
  async preemptAttached(ms: number): Promise<void> {
    if (!this.preemptThread) return;
    const deadline = performance.now() + ms;
    while (!this.preemptStarted) {
      if (performance.now() > deadline) throw new VmigError('VMIG_ERR_TIMEOUT', `the source resumed without reconnecting the preempt channel within ${ms} ms (--channel-timeout)`, { channel: 'preempt', phase: 'postcopy recovery' });
      await new Promise((r) => setTimeout(r, 5));
    }
  }

  /** The preempt connection (`--postcopy-preempt`): handed to its thread at LISTEN (or at once, recovering). */
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
    this.preemptDone = new Promise<void>((r) => (this.channelEnded = r));
    this.preemptThread!.postMessage({ t: 'start', fd: ch.fd, first: ch.first, ram: ram.toShared(), missing, reader: this.preemptReader! } satisfies PreemptToThread);
  }

  /**
   * The load is complete. After a switch the guest stops and its report, with the postcopy
   * figures, is returned. Without one (precopy converged first) there is nothing to report.
   */
  async finish(ram: GuestRam): Promise<Record<string, unknown> | undefined> {
    await this.stopPreempt();
    restoreThreads(this.lowered);
    const switched = this.incoming.state === 'end';
    const guest = await this.opts.guest?.finish(ram, switched);
    if (!switched) return undefined;
    const pc = this.incoming.stats();
    return {
      ...pc,
      postcopyBytes: pc.postcopyPages * TARGET_PAGE_SIZE,
      ...guest,
      ...(this.opts.blocktime ? { ...this.incoming.blocktime(), faultLatencyHistogram: latencyHistogram(this.incoming) } : {}),
      ...(this.preemptReader ? { preemptReader: preemptReaderMode(this.preemptReader), ...preemptReads(this.preemptReader) } : {}),
      ...(this.opts.preempt ? { scheduling: { backgroundNice: this.lowered?.nice ?? null, faultSliceUs: this.faultSliceUs, vcpusWithFaultSlice: this.incoming.placer?.vcpusSliced ?? 0 } } : {}),
    };
  }

  /** A failure: blocked vCPUs give up without writing, then every thread ends. */
  async abort(): Promise<void> {
    this.incoming.abort();
    restoreThreads(this.lowered);
    this.preemptThread?.postMessage({ t: 'stop' } satisfies PreemptToThread);
    await this.stopPreempt();
    await this.opts.guest?.abort();
  }
}

/** Upper bounds (ms) of the fault latency histogram's buckets; the last bucket is everything above. */
const LATENCY_BUCKETS_MS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000];

/** Every fault latency of the run as counts per bucket (for the report's picture). */
function latencyHistogram(incoming: PostcopyIncoming): { bucketsMs: number[]; counts: number[] } {
  const b = incoming.faultLatencyBuckets(LATENCY_BUCKETS_MS);
  return { bucketsMs: [...LATENCY_BUCKETS_MS], counts: b?.counts ?? new Array<number>(LATENCY_BUCKETS_MS.length + 1).fill(0) };
}
