/**
 * The destination's postcopy (QEMU's loadvm_postcopy_handle_* and postcopy-ram.c): the
 * incoming state machine NONE -> ADVISE -> DISCARD -> LISTENING -> RUNNING -> END, the
 * received map and placing pages that arrive after LISTEN. vCPUs that fault request their
 * pages themselves on the shared return path (missing-pages.ts).
 */
import { StreamError, VmigError } from '../errors.js';
import type { MigrationNotifiers, PostcopyNotifyReason } from '../lifecycle/notifiers.js';
import { type GuestRam, type RamBlock, TARGET_PAGE_SIZE } from '../ram/ram-block.js';
import { checkPostcopyAdvise, decodePostcopyRamDiscard } from '../wire/postcopy.js';
import { createMissingPages, MissingPagesPlacer, type MissingPagesShared, type PostcopyBlocktime } from './missing-pages.js';
import { RamPagePlacer, type PostcopyPlacing } from './page-placer.js';
import type { ReturnPathShared } from './return-path-writer.js';
import type { LatencyBuckets } from '../stats/latency-histogram.js';

export type PostcopyIncomingState = 'none' | 'advise' | 'discard' | 'listening' | 'running' | 'end';

/** VcpuPool's limit: the received map has a fault slot for each. */
const MAX_VCPUS = 256;

export interface PostcopyIncomingOptions {
  /** The return path, shared with the vCPUs (they write their page requests on it). */
  returnPath: () => ReturnPathShared | undefined;
  /** POSTCOPY_RUN: start the vCPUs, which must check `shared` before each write. */
  onRun: (shared: MissingPagesShared, placer: MissingPagesPlacer) => void;
  notifiers?: MigrationNotifiers | undefined;
  /** At LISTEN, once pages go through the received map (the preempt thread may start). */
  onListen?: (() => void) | undefined;
  /** At LISTEN: multifd channels stop writing guest RAM (and any still writing finish first). */
  sealMultifd?: (() => Promise<void>) | undefined;
  /** --postcopy-blocktime: vCPUs time their faults. */
  blocktime?: boolean | undefined;
  /** The slice (us) a faulting vCPU takes until every page is in (missing-pages.ts rule 5); 0: none. */
  vcpuFaultSliceUs?: number | undefined;
  /**
   * After EOF, the longest the missing pages may go without one arriving (ms,
   * --channel-timeout): a source that discarded a page and never sends it must not hold the
   * destination for good. Default 30 s.
   */
  finishTimeoutMs?: number | undefined;
}

export interface PostcopyIncomingStats {
  state: PostcopyIncomingState;
  /** Page requests sent on the return path. */
  postcopyRequests: number;
  /** Pages placed after LISTEN. */
  postcopyPages: number;
  /** Pages that arrived already in place and were dropped. */
  duplicatePages: number;
  /** Pages marked not received by POSTCOPY_RAM_DISCARD. */
  discardedPages: number;
}

export class PostcopyIncoming implements PostcopyPlacing {
  state: PostcopyIncomingState = 'none';
  private ram: GuestRam | undefined;
  private readonly blockBase = new Map<RamBlock, number>();
  private placerImpl: MissingPagesPlacer | undefined;
  private pagePlacer: RamPagePlacer | undefined;
  private discarded = 0;

  constructor(private readonly opts: PostcopyIncomingOptions) {}

  private fail(message: string, code: 'VMIG_ERR_POSTCOPY' | 'VMIG_ERR_STREAM_FORMAT' | 'VMIG_ERR_UNKNOWN_BLOCK' | 'VMIG_ERR_BAD_OFFSET' = 'VMIG_ERR_POSTCOPY'): never {
    throw new StreamError(code, message, { channel: 'main', phase: `postcopy ${this.state}` });
  }

  private expect(...states: PostcopyIncomingState[]): void {
    if (!states.includes(this.state)) this.fail(`postcopy command in state ${this.state.toUpperCase()}`);
  }

  private notify(reason: PostcopyNotifyReason): void {
    const err = this.opts.notifiers?.postcopy.notify({ reason });
    if (err) throw new VmigError('VMIG_ERR_NOTIFIER', `postcopy ${reason} notifier refused: ${err.message}`, { channel: 'main', phase: 'postcopy' });
  }

  /** True once pages must go through the received map (after LISTEN). */
  get placing(): boolean {
    return this.state === 'listening' || this.state === 'running';
  }

  get placer(): MissingPagesPlacer | undefined {
    return this.placerImpl;
  }

  /** POSTCOPY_ADVISE: the source will switch to postcopy; can this side do it? */
  onAdvise(data: Uint8Array): void {
    this.expect('none');
    checkPostcopyAdvise(data);
    this.notify('PROBE');
    this.state = 'advise';
    this.notify('INBOUND_ADVISE');
  }

  /** Guest RAM exists (from the setup section or given up front). */
  attachRam(ram: GuestRam): void {
    this.ram = ram;
    let base = 0;
    for (const b of ram.blocks) {
      this.blockBase.set(b, base);
      base += b.pages;
    }
  }

  /**
   * The received map, created at once if need be, so that vCPU threads can be made ready
   * (parked) before the switch. Nothing checks it until they run, after RUN.
   */
  prepare(): MissingPagesShared {
    if (!this.ram) this.fail('postcopy: the received map needs the RAM block list');
    const rp = this.opts.returnPath();
    if (!rp) this.fail('postcopy needs the return path');
    const blocks = this.ram.blocks.map((b) => ({ idstr: b.idstr, pages: b.pages }));
    this.placerImpl ??= new MissingPagesPlacer(createMissingPages(blocks, MAX_VCPUS, this.opts.blocktime ?? false, rp, this.opts.vcpuFaultSliceUs ?? 0));
    return this.placerImpl.shared;
  }

  /**
   * Precopy is over: every page it sent landed (the source flushed and synced multifd first),
   * so every page counts as received until a discard says otherwise.
   */
  private enterDiscard(): MissingPagesPlacer {
    if (this.state !== 'discard') {
      this.prepare();
      this.placerImpl!.markAllReceived();
    }
    this.state = 'discard';
    return this.placerImpl!;
  }

  /** POSTCOPY_RAM_DISCARD: pages dirtied after they were sent are not received. */
  onDiscard(data: Uint8Array): void {
    this.expect('advise', 'discard');
    const placer = this.enterDiscard();
    const { idstr, ranges } = decodePostcopyRamDiscard(data);
    const block = this.ram!.find(idstr);
    if (!block) this.fail(`discard for unknown RAM block '${idstr}'`, 'VMIG_ERR_UNKNOWN_BLOCK');
    const base = this.blockBase.get(block)!;
    for (const r of ranges) {
      if (!Number.isSafeInteger(r.start) || !Number.isSafeInteger(r.length) || r.start % TARGET_PAGE_SIZE || r.length % TARGET_PAGE_SIZE || r.start + r.length > block.usedLength) {
        this.fail(`discard range 0x${r.start.toString(16)}+0x${r.length.toString(16)} outside block '${idstr}' or not page aligned`, 'VMIG_ERR_BAD_OFFSET');
      }
      placer.markMissing(base + r.start / TARGET_PAGE_SIZE, r.length / TARGET_PAGE_SIZE);
      this.discarded += r.length / TARGET_PAGE_SIZE;
    }
  }

  /** POSTCOPY_LISTEN: from now on pages are placed through the received map, never by multifd. */
  async onListen(): Promise<void> {
    this.expect('advise', 'discard');
    const placer = this.enterDiscard();
    await this.opts.sealMultifd?.();
    this.state = 'listening';
    this.notify('INBOUND_LISTEN');
    this.opts.onListen?.();
  }

  /** POSTCOPY_RUN: the vCPUs start here, before all pages arrived. */
  onRun(): void {
    this.expect('listening');
    this.state = 'running';
    this.opts.onRun(this.placerImpl!.shared, this.placerImpl!);
  }

  /** A page that arrived on the main channel after LISTEN. `data` null: a zero page. */
  placePage(block: RamBlock, offset: number, data: Uint8Array | null): void {
    this.pagePlacer ??= new RamPagePlacer(this.ram!, this.placerImpl!);
    this.pagePlacer.placePage(block, offset, data);
  }

  /**
   * EOF on the main stream: every page must be in place (the preempt channel may still be
   * delivering requested ones). Resolves at END; rejects through `failed` meanwhile.
   */
  async finish(failed: () => VmigError | undefined): Promise<void> {
    if (!this.placing) return;
    const placer = this.placerImpl!;
    const timeoutMs = this.opts.finishTimeoutMs ?? 30_000;
    let missing = placer.missing();
    let progressAt = performance.now();
    while (missing > 0) {
      const err = failed();
      if (err) throw err;
      await new Promise((r) => setTimeout(r, 5));
      const now = placer.missing();
      if (now < missing) progressAt = performance.now();
      else if (performance.now() - progressAt > timeoutMs) {
        // A link that stopped delivering (the preempt channel frozen, say): postcopy recovery can get over it.
        throw new VmigError('VMIG_ERR_TIMEOUT', `the stream ended with ${now} page(s) not placed, and none arrived for ${timeoutMs} ms (--channel-timeout)`, { channel: 'main', phase: 'postcopy' });
      }
      missing = now;
    }
    this.state = 'end';
    this.notify('INBOUND_END');
  }

  /** A failure while postcopy runs: release blocked vCPUs (they give up). */
  abort(): void {
    this.placerImpl?.abort();
  }

  /** Fault latencies so far (with blocktime on), counted in the buckets of `boundsMs`. */
  faultLatencyBuckets(boundsMs: readonly number[]): LatencyBuckets | undefined {
    return this.placerImpl?.faultLatencyBuckets(boundsMs);
  }

  blocktime(): PostcopyBlocktime | undefined {
    return this.placerImpl?.blocktime();
  }

  stats(): PostcopyIncomingStats {
    return {
      state: this.state,
      postcopyRequests: this.placerImpl?.requests ?? 0,
      postcopyPages: this.placerImpl?.placed ?? 0,
      duplicatePages: this.placerImpl?.dropped ?? 0,
      discardedPages: this.discarded,
    };
  }
}
