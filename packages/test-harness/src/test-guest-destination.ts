/**
 * The test guest on a postcopy destination (an `IncomingGuest` of @vmig/migration, typed
 * structurally so that the harness does not depend on the library it tests). Its vCPU
 * threads are the source's, from the `vmig-vcpus` state: created parked when the source
 * announces that state at setup, resumed at RUN. Each write is checked against the received
 * map and tracked; at the end the threads stop and every write is checked (postcopy-verify.ts).
 */
import { type GuestRam, type MissingPagesShared, type PreemptReaderShared, toVmigError, type VmigError } from '@vmig/core';
import type { VcpuState, VcpuStateDevice } from './guest-devices.js';
import { checkStampedRam } from './postcopy-verify.js';
import { VcpuPool } from './vcpu-pool.js';

interface Run {
  ram: GuestRam;
  received: MissingPagesShared;
  preemptReader: PreemptReaderShared | undefined;
}

export class TestGuestDestination {
  private vcpus: Promise<VcpuPool> | undefined;
  /** How many threads `vcpus` has (known before they are up). */
  private vcpuThreads = 0;
  private fatal: (e: VmigError) => void = () => {};

  constructor(private readonly vcpuState: VcpuStateDevice) {}

  bind(ctx: { prepare(): Run | undefined; fatal(e: VmigError): void }): void {
    this.fatal = ctx.fatal;
    // The vCPU state announced at setup: create the threads now, parked.
    this.vcpuState.onLoaded = (st) => {
      if (this.vcpus || st.writers === 0) return;
      const r = ctx.prepare();
      if (r) this.vcpus = this.start(r, st, true);
    };
  }

  run(r: Run): number {
    const st = this.vcpuState.loaded;
    const n = st?.writers ?? 0;
    // Threads made ready for another count than the final state's: start afresh.
    if (this.vcpus && this.vcpuThreads !== n) {
      void this.vcpus.then((p) => p.terminate(), () => {});
      this.vcpus = undefined;
    }
    if (n === 0 || !st) return 0;
    this.vcpus ??= this.start(r, st, false);
    void this.vcpus.then((p) => p.resume(), () => {});
    return n;
  }

  async finish(ram: GuestRam, switched: boolean): Promise<Record<string, unknown> | undefined> {
    const pool = await this.vcpus;
    if (!switched) {
      await pool?.terminate();
      return undefined;
    }
    const writes = pool?.writes ?? 0;
    const tracks = (await pool?.terminate()) ?? [];
    return { writers: pool?.count ?? 0, writes, ...checkStampedRam(ram, tracks, pool?.count ?? 0) };
  }

  async abort(): Promise<void> {
    await (await this.vcpus?.catch(() => undefined))?.terminate();
  }

  private start(r: Run, st: VcpuState, parked: boolean): Promise<VcpuPool> {
    this.vcpuThreads = st.writers;
    const p = VcpuPool.start(r.ram, {
      writers: st.writers,
      dirtyRate: st.dirtyRate ?? 0,
      pattern: st.pattern === 'hot' ? 'hot' : 'uniform',
      hotPages: st.hotPages ?? 64,
      seed: (st.seed ?? 1) + 1,
      missing: r.received,
      preempt: r.preemptReader,
      track: true,
      startStopped: parked,
    });
    p.catch((e: unknown) => this.fatal(toVmigError(e, 'VMIG_ERR_WORKER')));
    return p;
  }
}
