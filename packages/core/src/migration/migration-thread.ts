/**
 * The source's migration thread (QEMU's migration_thread in migration.c): the state machine
 * and its cleanup, the rounds of precopy and the switchover (switchover.ts decides), the stop
 * and the completion, or the postcopy switch (postcopy-source.ts). The stream's pieces are
 * written by savevm.ts (header, commands), ram-sections.ts (RAM sections and the multifd
 * flush) and device-sections.ts; every wait on a peer or a thread is bounded (watchdog.ts).
 */
import type { DeviceRegistry } from '../devices/device.js';
import { InvalidArgumentError, isTransportFailure, postcopySplitError, VmigError, toVmigError } from '../errors.js';
import type { StreamSink } from '../io.js';
import type { GuestRam } from '../ram/ram-block.js';
import { TARGET_PAGE_SIZE } from '../ram/ram-block.js';
import { putDeviceSectionsAndEof, putSetupDeviceSections } from './device-sections.js';
import { MigrationNotifiers, type MigrationStateEvent, type PrecopyNotifyReason } from '../lifecycle/notifiers.js';
import { silentLogger, type Logger } from '../log.js';
import { AutoConverge } from './auto-converge.js';
import { type PostcopyLink, PostcopySource, SHUT } from './postcopy-source.js';
import { MAIN, RAM_SECTION_ID, RamSections } from './ram-sections.js';
import { type MultifdLink, RamSaver, type ZeroPageDetection } from './ram-save.js';
import { RateLimiter } from './rate-limit.js';
import { putPing, putStreamStart } from './savevm.js';
import { SwitchoverPolicy } from './switchover.js';
import type { VmRunControl } from './vm.js';
import { Watchdog } from './watchdog.js';
import type { SourceReturnPath } from './source-return-path.js';
import { isTerminal, type MigrationStatus } from './state.js';
import { MigrationStats, type MigrationInfo } from './stats.js';

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

export interface MigrationContext {
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
   * Bytes the main channel's kernel send queue holds (written, not yet on the link). With
   * multifd's (MultifdLink.unsentBytes), what the bandwidth that decides the switchover does
   * not count: a slow link drains a full queue long after the transports took it.
   */
  mainUnsentBytes?: (() => number) | undefined;
  /** Postcopy recovery; without it a failure after the switch fails the migration. */
  recovery?: PostcopyRecovery | undefined;
  /**
   * The longest any wait on the destination or the vCPUs may last (ms, --channel-timeout):
   * past it the migration fails with VMIG_ERR_TIMEOUT (before the postcopy switch, with the
   * guest running here again). Default 30 s.
   */
  channelTimeoutMs?: number | undefined;
}

export const DEFAULT_CHANNEL_TIMEOUT_MS = 30_000;

/**
 * Postcopy recovery's channels (implemented outside core: sockets and threads). After the
 * switch a transport failure pauses the migration instead of failing it: pause() lets go of
 * every channel, and each `migrate URI resume=true` reconnects them.
 */
export interface PostcopyRecovery {
  /** Closes the broken channels and their threads (their failures say nothing any more). */
  pause(): Promise<void>;
  /** Connects the main channel (and its return path's thread) to `uri`. */
  reconnect(uri: string): Promise<Omit<PostcopyLink, 'shutStatus'>>;
}

/** The value of the PING sent at setup to measure the link's round trip. */
const PING_RTT = 0x76726d67;
/** The PINGs of drainBeforeStop: this value plus a count. */
const PING_DRAIN = 0x76640000;
/** How long the first drain waits for the setup's PONG before taking the peer for one that ignores PING. */
const PONG_GRACE_MS = 1000;
/** What drainBeforeStop waits for, as a timeout names it. */
const LOADED = 'the destination to load what was sent (PONG)';

/** How often bandwidth is measured (QEMU's BUFFER_DELAY). */
const BANDWIDTH_PERIOD_MS = 100;

export class MigrationThread {
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
  /**
   * The destination may have run the guest: from here a failure cannot give the guest back
   * to the source (its state is split between the two sides).
   */
  private guestSplit = false;
  /** The RAM sections and the multifd flush on the main stream. */
  private readonly sections: RamSections;
  /** Bumped at each pause: failures of the channels before it say nothing any more. */
  private epoch = 0;
  /** The round trip measured at setup (PING/PONG, ms); 0 until it is known. */
  private roundTripMs = 0;
  /** writtenBytes() when drainBeforeStop last saw the destination load everything; -1: never. */
  private drainedAt = -1;
  private drains = 0;
  /** Resolves true once the destination answered the setup's PING (never, for a peer that ignores PING). */
  private setupPong: Promise<boolean> | undefined;
  /** migrate_cancel was asked for (a pause may have cleared the error it set). */
  private cancelRequested = false;
  /** Postcopy paused: the next `migrate URI resume=true`. */
  private resumeWaiter: { resolve: (uri: string) => void; reject: (e: VmigError) => void } | undefined;

  constructor(private readonly ctx: MigrationContext) {
    this.stats = ctx.stats ?? new MigrationStats();
    this.notifiers = ctx.notifiers ?? new MigrationNotifiers();
    this.log = ctx.log ?? silentLogger;
    this.params = { ...ctx.params };
    this.saver = new RamSaver(ctx.ram, this.stats, ctx.params.zeroPageDetection);
    if (ctx.multifd) this.saver.pageSender = ctx.multifd;
    this.sections = new RamSections(this.saver, ctx.sink, ctx.multifd, this.stats, (p, what) => this.guard(p, what), this.log);
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
    this.cancelRequested = true;
    const e = new VmigError('VMIG_ERR_CANCELLED', 'migration cancelled');
    this.fail(e);
    this.resumeWaiter?.reject(e);
  }

  /**
   * migrate-pause (postcopy-active only): the channels are given up as a network failure
   * would break them; the migration goes to postcopy-paused.
   */
  pause(): void {
    if (this.stats.status !== 'postcopy-active' || !this.ctx.recovery) throw new InvalidArgumentError(`migrate-pause is only possible in postcopy-active (now ${this.stats.status})`);
    this.fail(new VmigError('VMIG_ERR_CHANNEL', 'paused by migrate-pause', { channel: 'main', phase: 'postcopy' }));
  }

  /** `migrate URI resume=true`: postcopy-paused only; the recovery then runs on the migration thread. */
  resume(uri: string): void {
    if (this.stats.status !== 'postcopy-paused' || !this.resumeWaiter) throw new InvalidArgumentError(`migrate with resume is only possible in postcopy-paused (now ${this.stats.status})`);
    const w = this.resumeWaiter;
    this.resumeWaiter = undefined;
    w.resolve(uri);
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
    stats.timeline.begin(stats.startTime);
    stats.timeline.enter('setup', stats.startTime);
    this.setStatus('setup');
    this.notifyState({ type: 'setup', status: 'setup' });
    let outcome: 'completed' | 'failed' | 'cancelled' = 'completed';
    try {
      if (ctx.signal?.aborted) this.cancel();
      if (this.error) throw this.error;
      await this.setup();
      stats.timeline.enter('iterations', performance.now());
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
        this.vmCall(() => {
          ctx.vm.setThrottle?.(0);
          ctx.vm.resume();
        }, 'resume');
      }
    } finally {
      ctx.signal?.removeEventListener('abort', onAbort);
      this.watchdog.stop();
      stats.timeline.close(stats.endTime ?? performance.now());
    }
    // migration_cleanup: CLEANUP exactly once, on every path, before the final status. The
    // vCPUs run unthrottled again; the stats keep the throttle the migration ended with.
    this.vmCall(() => ctx.vm.setThrottle?.(0), 'setThrottle');
    for (const err of this.notifiers.precopy.notifyAll({ reason: 'CLEANUP', status: outcome })) {
      this.log.warn({ error: err.toJSON() }, 'precopy CLEANUP notifier failed');
    }
    this.setStatus(outcome);
    this.notifyState(outcome === 'completed' ? { type: 'done', status: outcome } : { type: 'failed', status: outcome, error: stats.error });
    return stats.info();
  }

  /** The application's vm hooks after the outcome is known: a throw is logged, the cleanup goes on. */
  private vmCall(f: () => void, what: string): void {
    try {
      f();
    } catch (e) {
      this.log.warn({ error: toVmigError(e, 'VMIG_ERR_INTERNAL').toJSON(), hook: what }, 'vm hook failed');
    }
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
      const pct = ac.onBitmapSync(newly, TARGET_PAGE_SIZE, this.sections.writtenBytes(), performance.now());
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
    if (params.postcopy && !returnPath) throw new VmigError('VMIG_ERR_POSTCOPY', 'postcopy needs the return path');
    putStreamStart(sink, { machineName: params.machineName, returnPath: !!returnPath, postcopy: params.postcopy });
    if (returnPath) this.watchShut(returnPath);
    await this.sections.setupSection();
    // Postcopy: what the destination must prepare before the switch (its vCPU threads).
    if (params.postcopy) putSetupDeviceSections(sink, this.ctx.devices, RAM_SECTION_ID + 1);
    await this.guard(sink.flush(), MAIN);
    if (returnPath?.pong) {
      // The link's round trip, while nothing is queued yet (a PING of its own, flushed): the
      // completion costs one (EOF out, SHUT back) on top of the last pages, so the
      // switchover leaves room for it. Not waited for: until it is known it counts as 0.
      putPing(sink, PING_RTT);
      const t0 = performance.now();
      await this.guard(sink.flush(), MAIN);
      this.setupPong = returnPath.pong(PING_RTT).then(() => {
        this.roundTripMs = performance.now() - t0;
        return true;
      });
    }
    this.stats.setupTimeMs = performance.now() - this.stats.startTime;
    this.log.debug({ setupTimeMs: this.stats.setupTimeMs, blocks: this.ctx.ram.blocks.length, multifd: !!this.ctx.multifd, returnPath: !!returnPath, postcopy: params.postcopy }, 'setup done');
  }

  /** The destination's SHUT, or its return path's failure, on the channels of this epoch. */
  private watchShut(returnPath: SourceReturnPath): void {
    const epoch = this.epoch;
    this.shutStatus = returnPath.shut;
    this.shutStatus.then(
      (status) => {
        if (status !== 0 && epoch === this.epoch) this.fail(new VmigError('VMIG_ERR_REMOTE', 'destination failed to load the migration stream', { channel: 'return-path' }));
      },
      (e: unknown) => {
        if (epoch === this.epoch) this.fail(e);
      },
    );
  }

  /** Whether a failure of the channels of `epoch` still counts (migrate.ts's socket listeners). */
  failIfCurrent(epoch: number, e: unknown): void {
    if (epoch === this.epoch) this.fail(e);
  }

  get channelEpoch(): number {
    return this.epoch;
  }

  /** Written and still in a kernel send queue, on every channel (0 where it cannot be known). */
  private unsentBytes(): number {
    return (this.ctx.mainUnsentBytes?.() ?? 0) + (this.ctx.multifd?.unsentBytes?.() ?? 0);
  }

  private async iterate(): Promise<'complete' | 'postcopy'> {
    const { stats, saver, params, sections } = this;
    let periodStart = performance.now();
    // Bandwidth counts what the links carried: not what is queued in front of the transports,
    // nor what the kernel's send queues took and have not sent (a slow link drains them late).
    const drained = (): number => sections.flushedBytes() - this.unsentBytes();
    let periodBytes = drained();
    let periodPages = stats.normalPages + stats.zeroPages;
    let lastProgress = periodStart;
    const limiter = new RateLimiter(params.maxBandwidth, BANDWIDTH_PERIOD_MS, periodStart);
    this.limiter = limiter;
    limiter.account(sections.chargedBytes());
    const policy = new SwitchoverPolicy();
    // The round under way: since the last dirty-log sync (setup's was the first).
    let roundStart = performance.now();
    let roundBytes = sections.writtenBytes();

    for (;;) {
      if (this.error) throw this.error;
      if (this.postcopyRequested) return 'postcopy';
      const now = performance.now();
      if (now - periodStart >= BANDWIDTH_PERIOD_MS) {
        const secs = (now - periodStart) / 1000;
        const d = drained();
        stats.bandwidth = Math.max(0, d - periodBytes) / secs;
        stats.pagesPerSecond = (stats.normalPages + stats.zeroPages - periodPages) / secs;
        periodStart = now;
        periodBytes = Math.max(periodBytes, d);
        periodPages = stats.normalPages + stats.zeroPages;
        if (now - lastProgress >= 1000) {
          lastProgress = now;
          this.ctx.onProgress?.(stats.info(now));
        }
      }

      // What the stop must still carry: the dirty pages, and what the send queues hold; in the
      // time the limit leaves once the completion's round trip (EOF out, SHUT back) is taken.
      let pending = saver.dirtyPages * TARGET_PAGE_SIZE;
      const budgetMs = Math.max(0, params.downtimeLimitMs - this.roundTripMs);
      if (pending <= SwitchoverPolicy.threshold(stats.bandwidth, budgetMs) || saver.dirtyPages === 0) {
        await sections.endRound();
        // The scan wrapped or little is left: look at what the vCPUs dirtied since.
        const dirtied = this.bitmapSyncPrecopy();
        pending = saver.dirtyPages * TARGET_PAGE_SIZE + this.unsentBytes();
        stats.expectedDowntimeMs = stats.bandwidth > 0 ? (pending / stats.bandwidth) * 1000 + this.roundTripMs : 0;
        const roundEnd = performance.now();
        stats.timeline.round({
          round: policy.rounds + 1,
          startedAt: roundStart,
          endedAt: roundEnd,
          bytes: sections.writtenBytes() - roundBytes,
          dirtiedPages: dirtied,
          remainingBytes: pending,
          mbps: Math.round((stats.bandwidth * 8) / 1e3) / 1e3,
          expectedDowntimeMs: Math.round(stats.expectedDowntimeMs * 1000) / 1000,
          cpuThrottlePercentage: stats.cpuThrottlePercentage,
        });
        roundStart = roundEnd;
        roundBytes = sections.writtenBytes();
        this.log.debug(
          { round: policy.rounds + 1, pending, dirtiedPages: dirtied, mbps: (stats.bandwidth * 8) / 1e6, expectedDowntimeMs: stats.expectedDowntimeMs, downtimeLimitMs: params.downtimeLimitMs, throttle: stats.cpuThrottlePercentage },
          'round ended (dirty-log sync)',
        );
        const { decision, reason } = policy.afterRound(pending, stats.bandwidth, { ...params, downtimeLimitMs: budgetMs }, saver.dirtyPages * TARGET_PAGE_SIZE);
        // A queue the source cannot see drained first; then what was dirtied meanwhile is looked at again.
        if (decision === 'complete' && (await this.drainBeforeStop())) continue;
        if (decision !== 'iterate') {
          if (reason) this.log.info({ rounds: policy.rounds, pending, reason }, `switching to ${decision}`);
          else this.log.debug({ rounds: policy.rounds, pending, roundTripMs: this.roundTripMs, thresholdBytes: SwitchoverPolicy.threshold(stats.bandwidth, budgetMs) }, 'switchover: what is dirty fits the downtime limit');
          return decision;
        }
        if (saver.dirtyPages === 0) {
          // Nothing dirty yet and no bandwidth measured: wait for the vCPUs a little.
          await this.nap(5);
          continue;
        }
      }
      stats.expectedDowntimeMs = stats.bandwidth > 0 ? (pending / stats.bandwidth) * 1000 + this.roundTripMs : stats.expectedDowntimeMs;

      limiter.account(sections.chargedBytes());
      if (limiter.allowance(now) <= 0) {
        // migration_rate_limit: over max-bandwidth, wait for credit.
        await this.nap(limiter.waitMs(now));
        continue;
      }
      await sections.iterateSection(limiter);
      stats.transferred = sections.writtenBytes();
      stats.precopyBytes = stats.transferred;
    }
  }

  /**
   * Before the stop, everything sent so far is loaded by the destination. What the source
   * measures ends at its own send queues (TIOCOUTQ): bytes already past them and not loaded
   * yet (the destination's receive queues, a proxy or a router on the path, a destination
   * slower than the link) would be carried during the downtime, unseen by the estimate. A
   * PING after the round's barrier comes back as a PONG once the destination has loaded
   * everything before it, multifd pages included (QEMU answers it the same way). Returns
   * whether it waited: the caller syncs the dirty log again and decides anew. Nothing is
   * waited for when nothing was written since the last drain, or when the destination did
   * not answer the setup's PING within PONG_GRACE_MS of the first drain (no return path, or a
   * peer that ignores PING: it is not asked again).
   */
  private async drainBeforeStop(): Promise<boolean> {
    const { sink, returnPath } = this.ctx;
    if (!returnPath?.pong || !this.setupPong || this.sections.writtenBytes() === this.drainedAt) return false;
    let grace: NodeJS.Timeout | undefined;
    const answered = await this.guard(Promise.race([this.setupPong, new Promise<boolean>((r) => (grace = setTimeout(() => r(false), PONG_GRACE_MS)))]), LOADED);
    clearTimeout(grace);
    if (!answered) {
      this.log.debug({ graceMs: PONG_GRACE_MS }, 'the destination does not answer PING: no drain before the stop');
      this.setupPong = undefined;
      return false;
    }
    const value = PING_DRAIN + (++this.drains & 0xffff);
    putPing(sink, value);
    const t0 = performance.now();
    await this.guard(sink.flush(), MAIN);
    await this.guard(returnPath.pong(value), LOADED);
    this.drainedAt = this.sections.writtenBytes();
    this.log.debug({ waitedMs: performance.now() - t0 }, 'before the stop: the destination loaded everything sent');
    return true;
  }

  /**
   * postcopy_start and postcopy's page loop (postcopy-source.ts); after the switch a
   * transport failure pauses (postcopy_pause) and each recovery goes on from where it is.
   */
  private async postcopy(): Promise<void> {
    const { ctx } = this;
    const pc = new PostcopySource({
      ram: ctx.ram,
      sink: ctx.sink,
      vm: ctx.vm,
      devices: ctx.devices,
      // setup() refused postcopy without a return path.
      returnPath: ctx.returnPath!,
      saver: this.saver,
      sections: this.sections,
      stats: this.stats,
      shutStatus: this.shutStatus!,
      guard: (p, what) => this.guard(p, what),
      nap: (ms) => this.nap(ms),
      failed: () => this.error,
      zeroPageDetection: this.params.zeroPageDetection,
      maxPostcopyBandwidth: this.params.maxPostcopyBandwidth,
      onStop: () => this.stats.timeline.enter('stop-and-copy', performance.now()),
      onSwitched: () => (this.guestSplit = true),
      onActive: () => {
        this.stats.timeline.enter('postcopy', performance.now());
        this.setStatus('postcopy-active');
      },
      onCompletion: () => this.stats.timeline.enter('completion', performance.now()),
    });
    let resumed = false;
    for (;;) {
      try {
        if (resumed) await pc.continue();
        else await pc.run();
        return;
      } catch (e) {
        this.fail(e);
        const err = this.error!;
        if (!this.guestSplit || !ctx.recovery || this.cancelRequested || !isTransportFailure(err)) throw err;
        await this.postcopyPaused(pc, err);
        resumed = true;
      }
    }
  }

  /**
   * postcopy_pause: the channels are let go, the guest's pages all stay here, and each
   * `migrate URI resume=true` tries a recovery until one works (then it returns) or the
   * migration is cancelled (then it throws).
   */
  private async postcopyPaused(pc: PostcopySource, cause: VmigError): Promise<void> {
    const recovery = this.ctx.recovery!;
    const { stats } = this;
    for (let err = cause; ; ) {
      this.epoch++;
      await recovery.pause();
      if (this.cancelRequested) throw this.error ?? err;
      const uri = new Promise<string>((resolve, reject) => (this.resumeWaiter = { resolve, reject }));
      // The next failure is the recovery's own.
      this.error = undefined;
      if (err === cause) stats.timeline.enter('postcopy-paused', performance.now());
      this.log.warn({ error: err.toJSON() }, 'postcopy paused: every page stays here; on the destination migrate-recover URI, then here migrate URI resume=true');
      this.setStatus('postcopy-paused');
      try {
        const target = await uri;
        this.setStatus('postcopy-recover');
        const link = await this.guard(recovery.reconnect(target), 'the recovery connection');
        this.watchShut(link.returnPath);
        await pc.resume({ ...link, shutStatus: this.shutStatus! });
        stats.postcopyRecoveries++;
        stats.timeline.enter('postcopy', performance.now());
        this.log.info({ uri: target, recoveries: stats.postcopyRecoveries }, 'postcopy resumed');
        this.setStatus('postcopy-active');
        return;
      } catch (e) {
        this.fail(e);
        err = this.error!;
        if (this.cancelRequested) throw err;
        this.log.warn({ error: err.toJSON() }, 'postcopy recovery failed; still paused');
      } finally {
        this.resumeWaiter = undefined;
      }
    }
  }

  /** migration_completion: stop, the completion hook, the last pass, the device state, EOF, SHUT. */
  private async complete(): Promise<void> {
    const { sink, vm, devices } = this.ctx;
    const { stats, sections } = this;
    const downtimeStart = performance.now();
    stats.timeline.enter('stop-and-copy', downtimeStart);
    const bytesBefore = sections.writtenBytes();
    await this.guard(vm.stop(), 'the vCPUs to stop');
    if (this.error) throw this.error;
    this.log.debug({ stopMs: performance.now() - downtimeStart }, 'vCPUs stopped');
    this.notifyPrecopy('COMPLETE');
    // The completion hook: devices flush cached state into RAM now, before the final sync.
    for (const d of devices.list()) d.flushToRam?.();
    this.bitmapSyncPrecopy();
    await sections.completeSection();
    putDeviceSectionsAndEof(sink, devices, RAM_SECTION_ID + 1);
    await this.guard(sink.flush(), MAIN);
    stats.transferred = sections.writtenBytes();
    stats.downtimeBytes = sections.writtenBytes() - bytesBefore;
    stats.remainingPages = 0;
    // The destination loads what is in flight and answers.
    stats.timeline.enter('completion', performance.now());
    this.log.debug({ downtimeBytes: stats.downtimeBytes }, 'device state and EOF sent; waiting for the destination (SHUT)');

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
