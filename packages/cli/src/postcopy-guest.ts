/**
 * The postcopy side of `vmig incoming`: core's PostcopyIncoming, plus the test guest's part
 * of it. The destination's vCPU threads are the source's (from its `vmig-vcpus` state):
 * created parked when the source announces that state at setup, resumed at RUN. The
 * preempt connection's requested pages are loaded here. At the end the threads stop and
 * their writes are checked (test-harness postcopy-verify.ts).
 */
import type net from 'node:net';
import { ByteReader, detachFd } from '@vmig/channel';
import {
  EndOfStream,
  type GuestRam,
  type MigrationNotifiers,
  type MissingPagesShared,
  PostcopyIncoming,
  RamLoadState,
  StreamError,
  TARGET_PAGE_SIZE,
  toVmigError,
  VmigError,
} from '@vmig/core';
import { checkStampedRam, VcpuPool, type VcpuState, type VcpuStateDevice } from '@vmig/test-harness';

export interface PostcopyGuestOptions {
  /** Guest RAM once it exists (the destination may build it from the stream). */
  ram: () => GuestRam | undefined;
  vcpuState: VcpuStateDevice;
  /** Writes a message on the return path. */
  sendRp: (msg: Uint8Array) => void;
  sealMultifd: (() => Promise<void>) | undefined;
  notifiers: MigrationNotifiers;
  blocktime: boolean;
  /** The first failure anywhere: the migration fails with it. */
  fatal: (e: VmigError) => void;
}

export class PostcopyGuest {
  readonly incoming: PostcopyIncoming;
  private vcpus: Promise<VcpuPool> | undefined;
  /** How many threads `vcpus` has (known before they are up). */
  private vcpuThreads = 0;
  private preemptDone: Promise<void> | undefined;

  constructor(private readonly opts: PostcopyGuestOptions) {
    this.incoming = new PostcopyIncoming({
      sendRp: opts.sendRp,
      notifiers: opts.notifiers,
      sealMultifd: opts.sealMultifd,
      blocktime: opts.blocktime,
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
      track: true,
      startStopped: parked,
    });
    p.catch((e: unknown) => this.opts.fatal(toVmigError(e, 'VMIG_ERR_WORKER')));
    return p;
  }

  /** The preempt connection (`--postcopy-preempt`): requested pages, loaded as they come. */
  onPreempt(sock: net.Socket, first: Buffer): void {
    // Read into a pool of reused buffers (ByteReader.fromFd); the accepted handle is done with.
    const reader = ByteReader.fromFd(detachFd(sock), { channel: 'preempt', initial: first });
    reader.input.on('error', () => {});
    const load = new RamLoadState({
      ram: this.opts.ram(),
      createRam: () => {
        throw new StreamError('VMIG_ERR_STREAM_FORMAT', 'a RAM block list on the preempt channel', { channel: 'preempt' });
      },
      postcopy: this.incoming,
      channel: 'preempt',
    });
    this.preemptDone = (async () => {
      try {
        for (;;) await load.loadSectionBody(reader);
      } catch (e) {
        // The channel ends cleanly only between records.
        if (e instanceof EndOfStream && reader.buf.length === reader.pos) return;
        this.opts.fatal(e instanceof EndOfStream ? new VmigError('VMIG_ERR_PEER_CLOSED', 'preempt channel ended inside a record', { channel: 'preempt' }) : toVmigError(e, 'VMIG_ERR_CHANNEL', { channel: 'preempt' }));
      }
    })();
  }

  /**
   * The load is complete. After a switch: the vCPUs stop and their writes are checked; the
   * report's `postcopy` part is returned. Without one (precopy converged first) threads made
   * ready for it end, and there is nothing to report.
   */
  async finish(ram: GuestRam): Promise<Record<string, unknown> | undefined> {
    await this.preemptDone;
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
    };
  }

  /** A failure: blocked vCPUs give up without writing, then every thread ends. */
  async abort(): Promise<void> {
    this.incoming.abort();
    await (await this.vcpus?.catch(() => undefined))?.terminate();
  }
}
