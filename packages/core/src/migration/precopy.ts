/**
 * The source's migration thread for precopy (QEMU's migration_thread /
 * migration_iteration_run / migration_completion): setup, iterate in rounds over the
 * migration bitmap with a dirty-log sync at each wrap, switch over once what is dirty fits
 * the downtime limit at the measured bandwidth, then stop the vCPUs and send the rest.
 */
import type { DeviceRegistry } from '../devices/device.js';
import { postcopySplitError, VmigError, toVmigError } from '../errors.js';
import { MemorySink, type StreamSink } from '../io.js';
import type { GuestRam } from '../ram/ram-block.js';
import { TARGET_PAGE_SIZE } from '../ram/ram-block.js';
import {
  MIG_CMD_OPEN_RETURN_PATH,
  MIG_CMD_PACKAGED,
  MIG_CMD_POSTCOPY_ADVISE,
  MIG_CMD_POSTCOPY_LISTEN,
  MIG_CMD_POSTCOPY_RAM_DISCARD,
  MIG_CMD_POSTCOPY_RUN,
} from '../wire/constants.js';
import { putCommand, putEof, putFileHeader, putRamMultifdFlush } from '../wire/main-stream.js';
import { discardCommands, encodePackagedLength, encodePostcopyAdvise } from '../wire/postcopy.js';
import { putDeviceSections, putDeviceSectionsAndEof, putSetupDeviceSections } from './device-sections.js';
import { MigrationNotifiers, type MigrationStateEvent, type PrecopyNotifyReason } from '../lifecycle/notifiers.js';
import { silentLogger, type Logger } from '../log.js';
import { AutoConverge } from './auto-converge.js';
import { createUrgentPages, UrgentPagesTally } from '../postcopy/urgent-pages.js';
import { PageRequestQueue } from './page-requests.js';
import { type MultifdLink, RamSaver, type ZeroPageDetection } from './ram-save.js';
import { RateLimiter } from './rate-limit.js';
import { Watchdog } from './watchdog.js';
import type { SourceReturnPath } from './source-return-path.js';
import { isTerminal, type MigrationStatus } from './state.js';
import { MigrationStats, type MigrationInfo } from './stats.js';

/** vm_stop / vm_start as the migration thread sees them. */
export interface VmRunControl {
  /** Stops every vCPU; resolves only once each has acknowledged it is parked. */
  stop(): Promise<void>;
  /** Lets the vCPUs run again (after a failed or cancelled migration). */
  resume(): void;
  /** Auto-converge: the share of time (0..99 %) the vCPUs must sleep. */
  setThrottle?(pct: number): void;
}

export interface MigrationParams {
  /** downtime-limit, ms (QEMU default 300). */
  downtimeLimitMs: number;
  /** max-bandwidth, bytes/s; 0 = unlimited. */
  maxBandwidth: number;
  zeroPageDetection: ZeroPageDetection;
  /** Name sent in the configuration section. */
  machineName: string;
  /** The auto-converge capability. */
  autoConverge: boolean;
  /** The postcopy-ram capability: ADVISE at setup; the switch on command or automatically. */
  postcopy: boolean;
  /** Switch to postcopy after this many complete rounds (0: not by count). */
  postcopyAfterRounds: number;
  /** max-postcopy-bandwidth, bytes/s, for background pages after the switch; 0 = unlimited. */
  maxPostcopyBandwidth: number;
}

/** What migrate-set-parameters may change while a migration runs. */
export interface RuntimeParams {
  maxBandwidth?: number;
  downtimeLimitMs?: number;
}

export const DEFAULT_PARAMS: MigrationParams = {
  downtimeLimitMs: 300,
  maxBandwidth: 0,
  zeroPageDetection: 'legacy',
  machineName: 'none',
  autoConverge: false,
  postcopy: false,
  postcopyAfterRounds: 0,
  maxPostcopyBandwidth: 0,
};

/** What the bounded waits wait for, as the timeout's message names it. */
const MAIN = 'the main channel to take more bytes';
const MULTIFD = 'the multifd channels to take more pages';
const SHUT = "the destination's answer (SHUT) after the stream ended";

/** Postcopy's automatic switch: rounds in a row in which what is dirty did not shrink by a tenth. */
const POSTCOPY_STALLED_ROUNDS = 3;
/** Background pages per postcopy section: requests wait behind at most this many (no preempt). */
const POSTCOPY_SLICE_PAGES = 32;

export interface PrecopyContext {
  ram: GuestRam;
  sink: StreamSink;
  vm: VmRunControl;
  devices: DeviceRegistry;
  params: MigrationParams;
  /** Counters to fill (shared with multifd); a fresh set if omitted. */
  stats?: MigrationStats | undefined;
  /** Multifd channels for normal pages; without it pages go on the main stream. */
  multifd?: MultifdLink | undefined;
  /** The destination's replies; when given, OPEN_RETURN_PATH is sent and SHUT awaited. */
  returnPath?: SourceReturnPath | undefined;
  onStatus?: (info: MigrationInfo) => void;
  /** About once a second while iterating. */
  onProgress?: (info: MigrationInfo) => void;
  signal?: AbortSignal | undefined;
  /** Notifier chains; a fresh, empty set if omitted. */
  notifiers?: MigrationNotifiers | undefined;
  log?: Logger | undefined;
  /**
   * The longest any wait on the destination or the vCPUs may last (ms, --channel-timeout):
   * past it the migration fails with VMIG_ERR_TIMEOUT (before the postcopy switch, with the
   * guest running here again). Default 30 s.
   */
  channelTimeoutMs?: number | undefined;
}

export const DEFAULT_CHANNEL_TIMEOUT_MS = 30_000;

/** How often bandwidth is measured (QEMU's BUFFER_DELAY). */
const BANDWIDTH_PERIOD_MS = 100;
/** Pages per slice: the unit between backpressure checks (the main stream buffers them). */
const SLICE_PAGES = 1024;
/**
 * With multifd a slice only queues jobs of page numbers, so it can be larger: fewer turns of
 * the loop between the channels' completions (1 GiB of zeros: ~0.45 s -> ~0.33 s).
 */
const MULTIFD_SLICE_PAGES = 8192;
/** How long one RAM section iterates (QEMU's MAX_WAIT in ram_save_iterate). */
const SECTION_MS = 50;
const RAM_SECTION_ID = 2;

export class PrecopyMigration {
  readonly stats: MigrationStats;
  readonly saver: RamSaver;
  private error: VmigError | undefined;
  /** Bounds every guard() that waits on a peer or a thread. */
  private readonly watchdog: Watchdog;
  /** The rejecters of the guard() calls now waiting: fail() rejects them all. */
  private readonly guarded = new Set<(e: VmigError) => void>();
  private shutStatus: Promise<number> | undefined;
  readonly notifiers: MigrationNotifiers;
  private readonly log: Logger;
  private readonly params: MigrationParams;
  private limiter: RateLimiter | undefined;
  private autoConverge: AutoConverge | undefined;
  /** migrate-start-postcopy was asked for. */
  private postcopyRequested = false;
  /** The package (LISTEN, devices, RUN) is written: page requests are served from here on. */
  private postcopyListening = false;
  /**
   * The destination may have run the guest: from here a failure cannot give the guest back
   * to the source (its state is split between the two sides).
   */
  private guestSplit = false;
  /** Page requests from the destination for the main stream, after the switch. */
  private readonly requests: PageRequestQueue;
  /** What the return-path thread sent itself (preempt), after the switch. */
  private urgent: UrgentPagesTally | undefined;
  /** Bytes it wrote on the preempt channel, as last counted. */
  private urgentBytes = 0;

  constructor(private readonly ctx: PrecopyContext) {
    this.stats = ctx.stats ?? new MigrationStats();
    this.notifiers = ctx.notifiers ?? new MigrationNotifiers();
    this.log = ctx.log ?? silentLogger;
    this.params = { ...ctx.params };
    this.saver = new RamSaver(ctx.ram, this.stats, ctx.params.zeroPageDetection);
    if (ctx.multifd) this.saver.pageSender = ctx.multifd;
    this.requests = new PageRequestQueue(ctx.ram, this.saver, this.stats);
    this.stats.totalBytes = ctx.ram.totalBytes;
    const timeoutMs = ctx.channelTimeoutMs ?? DEFAULT_CHANNEL_TIMEOUT_MS;
    this.watchdog = new Watchdog(timeoutMs, (what) =>
      this.fail(new VmigError('VMIG_ERR_TIMEOUT', `waited ${timeoutMs} ms for ${what} (--channel-timeout): the peer is stopped or the link is frozen`, { phase: this.stats.status })),
    );
  }

  /** Records the first error; later ones are dropped. Wakes anything in guard(). */
  fail(err: unknown): void {
    if (this.error) return;
    this.error = toVmigError(err, 'VMIG_ERR_CHANNEL');
    for (const reject of this.guarded) reject(this.error);
    this.guarded.clear();
  }

  /**
   * `p`, or the first failure if that comes first. Not Promise.race with one long-lived
   * failure promise: every race leaves a reaction on it for good, and a rate-limited
   * migration guards hundreds of thousands of waits (the source's heap grew past 90 MB and
   * its collections took up to 86 ms).
   */
  private guard<T>(p: Promise<T>, waitingFor: string | null): Promise<T> {
    if (this.error) return Promise.reject(this.error);
    return new Promise<T>((resolve, reject) => {
      this.guarded.add(reject);
      // Bounded (watchdog.ts), unless it is a sleep of our own.
      const w = waitingFor === null ? -1 : this.watchdog.enter(waitingFor);
      p.then(resolve, reject).finally(() => {
        this.guarded.delete(reject);
        if (w >= 0) this.watchdog.leave(w);
      });
    });
  }

  /** A sleep of the migration thread's own (rate limit, waiting for dirty pages): cut short by a failure, not bounded. */
  private nap(ms: number): Promise<void> {
    return this.guard(sleep(ms), null);
  }

  private setStatus(s: MigrationStatus): void {
    this.stats.status = s;
    this.ctx.onStatus?.(this.stats.info());
    this.notifyState({ type: 'status', status: s });
  }

  private notifyState(e: MigrationStateEvent): void {
    // A state notifier cannot change the migration's course; its errors are only logged.
    for (const err of this.notifiers.state.notifyAll(e)) this.log.warn({ error: err.toJSON(), event: e.type }, 'migration state notifier failed');
  }

  /**
   * migration_cancel: cancelling now, cancelled once everything is cleaned up. Before run()
   * it only records the cancel, which run() finds at once.
   */
  cancel(): void {
    const st = this.stats.status;
    if (isTerminal(st) || st === 'cancelling') return;
    if (st !== 'none') this.setStatus('cancelling');
    this.fail(new VmigError('VMIG_ERR_CANCELLED', 'migration cancelled'));
  }

  /** migrate-set-parameters while running. */
  setParameters(p: RuntimeParams): void {
    if (p.downtimeLimitMs !== undefined) this.params.downtimeLimitMs = p.downtimeLimitMs;
    if (p.maxBandwidth !== undefined) {
      this.params.maxBandwidth = p.maxBandwidth;
      this.limiter?.setRate(p.maxBandwidth);
    }
  }

  /** migrate-start-postcopy: switch at the next chance. */
  startPostcopy(): void {
    if (!this.params.postcopy) throw new VmigError('VMIG_ERR_POSTCOPY', 'postcopy was not enabled for this migration (--postcopy)');
    const st = this.stats.status;
    if (st !== 'setup' && st !== 'active') throw new VmigError('VMIG_ERR_POSTCOPY', `cannot start postcopy in state ${st}`);
    this.postcopyRequested = true;
  }

  get parameters(): Readonly<MigrationParams> {
    return this.params;
  }

  async run(): Promise<MigrationInfo> {
    const { ctx, stats } = this;
    const onAbort = (): void => this.cancel();
    ctx.signal?.addEventListener('abort', onAbort, { once: true });
    this.watchdog.start();
    stats.startTime = performance.now();
    this.setStatus('setup');
    this.notifyState({ type: 'setup', status: 'setup' });
    let outcome: 'completed' | 'failed' | 'cancelled' = 'completed';
    try {
      if (ctx.signal?.aborted) this.cancel();
      if (this.error) throw this.error;
      await this.setup();
      this.setStatus('active');
      if ((await this.iterate()) === 'postcopy') await this.postcopy();
      else await this.complete();
      stats.endTime = performance.now();
    } catch (e) {
      this.fail(e);
      stats.endTime = performance.now();
      if (this.guestSplit) {
        stats.error = postcopySplitError(this.error!).toJSON();
        outcome = 'failed';
      } else {
        stats.error = this.error!.toJSON();
        outcome = this.error!.code === 'VMIG_ERR_CANCELLED' ? 'cancelled' : 'failed';
        // The source keeps running: its RAM was only read, never written.
        ctx.vm.setThrottle?.(0);
        ctx.vm.resume();
      }
    } finally {
      ctx.signal?.removeEventListener('abort', onAbort);
      this.watchdog.stop();
    }
    // migration_cleanup: CLEANUP exactly once, on every path, before the final status. The
    // vCPUs run unthrottled again; the stats keep the throttle the migration ended with.
    ctx.vm.setThrottle?.(0);
    for (const err of this.notifiers.precopy.notifyAll({ reason: 'CLEANUP', status: outcome })) {
      this.log.warn({ error: err.toJSON() }, 'precopy CLEANUP notifier failed');
    }
    this.setStatus(outcome);
    this.notifyState(outcome === 'completed' ? { type: 'done', status: outcome } : { type: 'failed', status: outcome, error: stats.error });
    return stats.info();
  }

  /** precopy_notify for the reasons whose errors are reported but do not stop anything. */
  private notifyPrecopy(reason: PrecopyNotifyReason): void {
    const err = this.notifiers.precopy.notify({ reason });
    if (err) this.log.warn({ error: err.toJSON(), reason }, 'precopy notifier failed');
  }

  /**
   * migration_bitmap_sync_precopy: the notifiers around a precopy sync (never the postcopy
   * discard sync, which calls the saver directly), and auto-converge's check.
   */
  private bitmapSyncPrecopy(): number {
    this.notifyPrecopy('BEFORE_BITMAP_SYNC');
    const newly = this.saver.bitmapSync();
    this.notifyPrecopy('AFTER_BITMAP_SYNC');
    const ac = this.autoConverge;
    if (ac) {
      const pct = ac.onBitmapSync(newly, TARGET_PAGE_SIZE, this.writtenBytes(), performance.now());
      if (pct !== undefined) {
        this.stats.cpuThrottlePercentage = pct;
        this.ctx.vm.setThrottle?.(pct);
        this.log.info({ cpuThrottlePercentage: pct }, 'auto-converge: throttling vCPUs');
      }
    }
    return newly;
  }

  private async setup(): Promise<void> {
    const { sink, returnPath } = this.ctx;
    const params = this.params;
    // qemu_savevm_state_setup: an error from a SETUP notifier fails the migration.
    const vetoed = this.notifiers.precopy.notify({ reason: 'SETUP' });
    if (vetoed) throw vetoed;
    this.saver.setup();
    // ram_init_bitmaps: the first sync, right after logging started.
    this.bitmapSyncPrecopy();
    if (params.autoConverge) this.autoConverge = new AutoConverge(performance.now(), 0);
    putFileHeader(sink, params.machineName);
    if (returnPath) {
      putCommand(sink, MIG_CMD_OPEN_RETURN_PATH);
      this.shutStatus = returnPath.shut;
      this.shutStatus.then(
        (status) => {
          if (status !== 0) this.fail(new VmigError('VMIG_ERR_REMOTE', 'destination failed to load the migration stream', { channel: 'return-path' }));
        },
        (e: unknown) => this.fail(e),
      );
    }
    if (params.postcopy) {
      if (!returnPath) throw new VmigError('VMIG_ERR_POSTCOPY', 'postcopy needs the return path');
      putCommand(sink, MIG_CMD_POSTCOPY_ADVISE, encodePostcopyAdvise());
    }
    this.saver.writeSetupSection(sink, RAM_SECTION_ID);
    // The setup barrier: every channel synced once before any page travels.
    await this.multifdSync(true);
    this.saver.writeSectionEnd(sink, RAM_SECTION_ID);
    // Postcopy: what the destination must prepare before the switch (its vCPU threads).
    if (params.postcopy) putSetupDeviceSections(sink, this.ctx.devices, RAM_SECTION_ID + 1);
    await this.guard(sink.flush(), MAIN);
    this.stats.setupTimeMs = performance.now() - this.stats.startTime;
  }

  /** Bytes on every channel (main stream and multifd) the transports took. */
  private flushedBytes(): number {
    return this.ctx.sink.bytesFlushed + this.stats.multifdBytes;
  }

  private writtenBytes(): number {
    return this.ctx.sink.bytesWritten + this.stats.multifdBytes;
  }

  /**
   * What max-bandwidth charges: bytes written, plus pages handed to multifd and not written
   * yet (as whole pages). Charging them only once written let up to the channels' in-flight
   * jobs through on top of the limit.
   */
  private chargedBytes(): number {
    return this.writtenBytes() + (this.ctx.multifd?.pendingBytes ?? 0);
  }

  /** Pages were handed to multifd since the last barrier. */
  private unsynced = false;

  /**
   * The flush-and-sync barrier, written inside a RAM section before its EOS: every channel
   * writes SYNC after what it holds, then the main stream carries RAM_SAVE_FLAG_MULTIFD_FLUSH
   * (modern) or relies on the EOS that follows (legacy dialect, QEMU 7.2). `always` forces it
   * in the modern dialect too (setup, a round boundary, completion); in the legacy dialect
   * every section end syncs.
   */
  private async multifdSync(always: boolean): Promise<void> {
    const mf = this.ctx.multifd;
    // After the postcopy switch multifd carries nothing and syncs nothing.
    if (!mf || this.postcopyListening) return;
    if (!mf.flushAfterEachSection && !always) return;
    await this.guard(mf.flushAndSync(), MULTIFD);
    this.unsynced = false;
    if (!mf.flushAfterEachSection) putRamMultifdFlush(this.ctx.sink);
  }

  /** Backpressure on every channel. */
  private async channelsReady(): Promise<void> {
    await this.guard(this.ctx.sink.ready(), MAIN);
    if (this.ctx.multifd) await this.guard(this.ctx.multifd.ready(), MULTIFD);
  }

  private async iterate(): Promise<'complete' | 'postcopy'> {
    const { sink } = this.ctx;
    const { stats, saver, params } = this;
    let periodStart = performance.now();
    // Bandwidth counts what the transports took, not what is queued in front of them.
    let periodBytes = this.flushedBytes();
    let periodPages = stats.normalPages + stats.zeroPages;
    let lastProgress = periodStart;
    const limiter = new RateLimiter(params.maxBandwidth, BANDWIDTH_PERIOD_MS, periodStart);
    this.limiter = limiter;
    limiter.account(this.chargedBytes());
    let rounds = 0;
    let stalled = 0;
    let lastPending = Infinity;

    for (;;) {
      if (this.error) throw this.error;
      if (this.postcopyRequested) return 'postcopy';
      const now = performance.now();
      if (now - periodStart >= BANDWIDTH_PERIOD_MS) {
        const secs = (now - periodStart) / 1000;
        stats.bandwidth = (this.flushedBytes() - periodBytes) / secs;
        stats.pagesPerSecond = (stats.normalPages + stats.zeroPages - periodPages) / secs;
        periodStart = now;
        periodBytes = this.flushedBytes();
        periodPages = stats.normalPages + stats.zeroPages;
        if (now - lastProgress >= 1000) {
          lastProgress = now;
          this.ctx.onProgress?.(stats.info(now));
        }
      }

      const threshold = (stats.bandwidth * params.downtimeLimitMs) / 1000;
      let pending = saver.dirtyPages * TARGET_PAGE_SIZE;
      if (pending <= threshold || saver.dirtyPages === 0) {
        // A new round starts: pages of the last one must all land before any page of the
        // next (a page re-sent on another channel must not be overtaken by its old copy).
        if (this.unsynced) await this.barrierSection();
        // The scan wrapped or little is left: look at what the vCPUs dirtied since.
        this.bitmapSyncPrecopy();
        pending = saver.dirtyPages * TARGET_PAGE_SIZE;
        stats.expectedDowntimeMs = stats.bandwidth > 0 ? (pending / stats.bandwidth) * 1000 : 0;
        rounds++;
        // A switch that is due wins over completing (QEMU checks start_postcopy first too).
        if (params.postcopy && params.postcopyAfterRounds > 0 && rounds >= params.postcopyAfterRounds) {
          this.log.info({ rounds, pending }, 'switching to postcopy after the rounds asked for');
          return 'postcopy';
        }
        if (pending <= threshold) return 'complete';
        if (params.postcopy) {
          // The automatic switch: rounds stopped making progress (what is dirty no longer
          // shrinks by a tenth from one round to the next) while it does not fit the limit.
          stalled = pending > 0.9 * lastPending ? stalled + 1 : 0;
          lastPending = pending;
          if (stalled >= POSTCOPY_STALLED_ROUNDS) {
            this.log.info({ rounds, pending, stalled }, 'switching to postcopy: precopy does not converge');
            return 'postcopy';
          }
        }
        if (saver.dirtyPages === 0) {
          // Nothing dirty yet and no bandwidth measured: wait for the vCPUs a little.
          await this.nap(5);
          continue;
        }
      }
      stats.expectedDowntimeMs = stats.bandwidth > 0 ? (pending / stats.bandwidth) * 1000 : stats.expectedDowntimeMs;

      limiter.account(this.chargedBytes());
      if (limiter.allowance(now) <= 0) {
        // migration_rate_limit: over max-bandwidth, wait for credit.
        await this.nap(limiter.waitMs(now));
        continue;
      }

      // One RAM section (ram_save_iterate): slices of pages until the scan wraps, the
      // section has run SECTION_MS, or the rate limit is reached.
      saver.writePartHeader(sink, RAM_SECTION_ID, false);
      const sectionStart = performance.now();
      let wrapped = false;
      do {
        const pagesBefore = saver.dirtyPages;
        const allowance = limiter.allowance();
        const r = saver.savePages(sink, Math.min(this.ctx.multifd ? MULTIFD_SLICE_PAGES : SLICE_PAGES, Math.max(1, Math.ceil(allowance / TARGET_PAGE_SIZE))));
        if (this.ctx.multifd && saver.dirtyPages !== pagesBefore) this.unsynced = true;
        wrapped = r.wrapped;
        await this.channelsReady();
        limiter.account(this.chargedBytes());
      } while (!wrapped && saver.dirtyPages > 0 && performance.now() - sectionStart < SECTION_MS && limiter.allowance() > 0);
      await this.multifdSync(wrapped);
      saver.writeSectionEnd(sink, RAM_SECTION_ID);
      // Like QEMU's qemu_fflush at the end of ram_save_iterate: the section, and above all
      // a barrier marker in it, must reach the destination now. Multifd channels parked at
      // their SYNC wait for that marker; left in a staging buffer it would deadlock them.
      await this.guard(sink.flush(), MAIN);
      stats.transferred = this.writtenBytes();
      stats.precopyBytes = stats.transferred;
      await this.channelsReady();
    }
  }

  /** A RAM section holding only the barrier (a round ended without the scan seeing the wrap). */
  private async barrierSection(): Promise<void> {
    this.saver.writePartHeader(this.ctx.sink, RAM_SECTION_ID, false);
    await this.multifdSync(true);
    this.saver.writeSectionEnd(this.ctx.sink, RAM_SECTION_ID);
    await this.guard(this.ctx.sink.flush(), MAIN);
  }

  /**
   * postcopy_start, then postcopy's page loop (QEMU's order): flush-and-sync every multifd
   * channel and EOS (save_postcopy_prepare), stop, the completion hook, the final (discard)
   * bitmap sync, discard commands for every page still dirty, the package {LISTEN, device
   * state, RUN}. Then background pages on the main stream, requested pages first (on the
   * preempt channel if there is one), and the END section and EOF.
   */
  private async postcopy(): Promise<void> {
    const { ctx, stats, saver } = this;
    const { sink, vm, devices } = ctx;
    // setup() refused postcopy without a return path.
    const rp = ctx.returnPath!;
    if (rp.openPreempt) await this.guard(rp.openPreempt(), 'the postcopy preempt channel to connect');
    // Multifd writes are not atomic: every page queued on a channel lands before the switch.
    await this.barrierSection();
    ctx.multifd?.quiesce();
    const downtimeStart = performance.now();
    const bytesBefore = this.writtenBytes();
    await this.guard(vm.stop(), 'the vCPUs to stop');
    if (this.error) throw this.error;
    for (const d of devices.list()) d.flushToRam?.();
    // ram_postcopy_send_discard_bitmap: the sync without precopy's notifiers.
    saver.bitmapSync();
    saver.usePostcopyStreams();
    for (const [i, block] of ctx.ram.blocks.entries()) {
      const bm = saver.bitmaps[i]!;
      for (const cmd of discardCommands(block.idstr, block.pages, (from) => bm.findNextSet(from), (from) => bm.findNextClear(from))) {
        putCommand(sink, MIG_CMD_POSTCOPY_RAM_DISCARD, cmd);
      }
    }
    const pkg = new MemorySink();
    putCommand(pkg, MIG_CMD_POSTCOPY_LISTEN);
    putDeviceSections(pkg, devices, RAM_SECTION_ID + 1);
    putCommand(pkg, MIG_CMD_POSTCOPY_RUN);
    const blob = pkg.bytes();
    putCommand(sink, MIG_CMD_PACKAGED, encodePackagedLength(blob.length));
    sink.putBytes(blob);
    // Requests are accepted before the package can reach the destination (whose vCPUs ask
    // for pages only after RUN).
    const urgent = createUrgentPages(saver.bitmaps, this.params.zeroPageDetection !== 'none');
    this.urgent = new UrgentPagesTally(urgent);
    rp.listen(urgent, (type, data) => this.requests.add(type, data));
    this.postcopyListening = true;
    this.guestSplit = true;
    await this.guard(sink.flush(), MAIN);
    stats.downtimeMs = performance.now() - downtimeStart;
    stats.downtimeBytes = this.writtenBytes() - bytesBefore;
    this.setStatus('postcopy-active');
    const postcopyStart = this.writtenBytes();
    // Background pages only; requested pages are never held back.
    const limiter = new RateLimiter(this.params.maxPostcopyBandwidth, BANDWIDTH_PERIOD_MS, performance.now());
    limiter.account(this.writtenBytes());

    while (this.takeUrgent() > 0) {
      if (this.error) throw this.error;
      limiter.account(this.writtenBytes());
      if (limiter.allowance() <= 0) {
        // Requests keep being served while background pages wait for credit.
        if (this.requests.pending > 0) {
          saver.writePartHeader(sink, RAM_SECTION_ID, false);
          this.requests.serve(sink);
          saver.writeSectionEnd(sink, RAM_SECTION_ID);
          await this.guard(sink.flush(), MAIN);
        }
        await this.nap(Math.min(2, limiter.waitMs()));
        continue;
      }
      saver.writePartHeader(sink, RAM_SECTION_ID, false);
      this.requests.serve(sink);
      saver.savePages(sink, POSTCOPY_SLICE_PAGES);
      saver.writeSectionEnd(sink, RAM_SECTION_ID);
      await this.guard(sink.flush(), MAIN);
      // A flush the kernel takes at once resolves without an I/O turn: yield, so that page
      // requests on the return path are read now, not once the socket buffer is full.
      await new Promise<void>((r) => setImmediate(r));
      stats.transferred = this.writtenBytes() + this.urgentBytes;
      stats.postcopyBytes = stats.transferred - postcopyStart;
    }
    saver.writePartHeader(sink, RAM_SECTION_ID, true);
    saver.writeSectionEnd(sink, RAM_SECTION_ID);
    putEof(sink);
    await this.guard(sink.flush(), MAIN);
    stats.remainingPages = 0;
    // The destination answers once every page is in place (requested pages the return-path
    // thread sent included: it has written them before it reads SHUT).
    const status = await this.guard(this.shutStatus!, SHUT);
    this.takeUrgent();
    stats.transferred = this.writtenBytes() + this.urgentBytes;
    stats.postcopyBytes = stats.transferred - postcopyStart;
    if (status !== 0) throw new VmigError('VMIG_ERR_REMOTE', `destination reported failure ${status}`, { channel: 'return-path' });
  }

  /**
   * Counts what the return-path thread sent itself since the last call, and moves the scan
   * next to the page it was last asked for. Returns the pages still dirty.
   */
  private takeUrgent(): number {
    const u = this.urgent!.take();
    const { stats, saver } = this;
    saver.clearedElsewhere(u.cleared);
    if (u.next) saver.moveScan(u.next.block, u.next.page);
    stats.postcopyRequests += u.requests;
    stats.normalPages += u.normal;
    stats.zeroPages += u.zero;
    this.urgentBytes = u.bytes;
    return saver.dirtyPages;
  }

  private async complete(): Promise<void> {
    const { sink, vm, devices } = this.ctx;
    const { stats, saver } = this;
    const downtimeStart = performance.now();
    const bytesBefore = this.writtenBytes();
    await this.guard(vm.stop(), 'the vCPUs to stop');
    if (this.error) throw this.error;
    this.notifyPrecopy('COMPLETE');
    // The completion hook: devices flush cached state into RAM now, before the final sync.
    for (const d of devices.list()) d.flushToRam?.();

    this.bitmapSyncPrecopy();
    saver.writePartHeader(sink, RAM_SECTION_ID, true);
    while (saver.dirtyPages > 0) {
      saver.savePages(sink, SLICE_PAGES);
      await this.channelsReady();
    }
    // Every page must have landed before the device state and EOF are loaded.
    await this.multifdSync(true);
    this.ctx.multifd?.quiesce();
    saver.writeSectionEnd(sink, RAM_SECTION_ID);

    putDeviceSectionsAndEof(sink, devices, RAM_SECTION_ID + 1);
    await this.guard(sink.flush(), MAIN);
    stats.transferred = this.writtenBytes();
    stats.downtimeBytes = this.writtenBytes() - bytesBefore;
    stats.remainingPages = 0;

    if (this.shutStatus) {
      const status = await this.guard(this.shutStatus, SHUT);
      if (status !== 0) throw new VmigError('VMIG_ERR_REMOTE', `destination reported failure ${status}`, { channel: 'return-path' });
    }
    stats.downtimeMs = performance.now() - downtimeStart;
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, Math.max(0, ms)));
}
