/**
 * The source's migration thread for precopy (QEMU's migration_thread /
 * migration_iteration_run / migration_completion): setup, iterate in rounds over the
 * migration bitmap with a dirty-log sync at each wrap, switch over once what is dirty fits
 * the downtime limit at the measured bandwidth, then stop the vCPUs and send the rest.
 */
import type { DeviceRegistry } from '../devices/device.js';
import { VmigError, toVmigError } from '../errors.js';
import { EndOfStream, type StreamSink, type StreamSource } from '../io.js';
import type { GuestRam } from '../ram/ram-block.js';
import { TARGET_PAGE_SIZE } from '../ram/ram-block.js';
import { MIG_CMD_OPEN_RETURN_PATH, MIG_RP_MSG_PONG, MIG_RP_MSG_SHUT, QEMU_VM_SECTION_FULL } from '../wire/constants.js';
import { putCommand, putEof, putFileHeader, putSectionFooter, putSectionFull, putVmDescription } from '../wire/main-stream.js';
import { readRpMessage } from '../wire/return-path.js';
import { RamSaver, type ZeroPageDetection } from './ram-save.js';
import { RateLimiter } from './rate-limit.js';
import type { MigrationStatus } from './state.js';
import { MigrationStats, type MigrationInfo } from './stats.js';

/** vm_stop / vm_start as the migration thread sees them. */
export interface VmRunControl {
  /** Stops every vCPU; resolves only once each has acknowledged it is parked. */
  stop(): Promise<void>;
  /** Lets the vCPUs run again (after a failed or cancelled migration). */
  resume(): void;
}

export interface MigrationParams {
  /** downtime-limit, ms (QEMU default 300). */
  downtimeLimitMs: number;
  /** max-bandwidth, bytes/s; 0 = unlimited. */
  maxBandwidth: number;
  zeroPageDetection: ZeroPageDetection;
  /** Name sent in the configuration section. */
  machineName: string;
}

export const DEFAULT_PARAMS: MigrationParams = {
  downtimeLimitMs: 300,
  maxBandwidth: 0,
  zeroPageDetection: 'legacy',
  machineName: 'none',
};

export interface PrecopyContext {
  ram: GuestRam;
  sink: StreamSink;
  vm: VmRunControl;
  devices: DeviceRegistry;
  params: MigrationParams;
  /** The destination's replies; when given, OPEN_RETURN_PATH is sent and SHUT awaited. */
  returnPath?: StreamSource | undefined;
  onStatus?: (info: MigrationInfo) => void;
  /** About once a second while iterating. */
  onProgress?: (info: MigrationInfo) => void;
  signal?: AbortSignal | undefined;
}

/** How often bandwidth is measured (QEMU's BUFFER_DELAY). */
const BANDWIDTH_PERIOD_MS = 100;
/** Main-stream bytes per PART section before yielding for backpressure. */
const SLICE_BYTES = 4 << 20;
const RAM_SECTION_ID = 2;

export class PrecopyMigration {
  readonly stats = new MigrationStats();
  readonly saver: RamSaver;
  private error: VmigError | undefined;
  private readonly failure: Promise<never>;
  private rejectFailure!: (e: VmigError) => void;
  private shutStatus: Promise<number> | undefined;
  private rounds = 0;

  constructor(private readonly ctx: PrecopyContext) {
    this.saver = new RamSaver(ctx.ram, this.stats, ctx.params.zeroPageDetection);
    this.stats.totalBytes = ctx.ram.totalBytes;
    this.failure = new Promise<never>((_, reject) => {
      this.rejectFailure = reject;
    });
    this.failure.catch(() => {}); // observed through guard()
  }

  /** Records the first error; later ones are dropped. Wakes anything in guard(). */
  fail(err: unknown): void {
    if (this.error) return;
    this.error = toVmigError(err, 'VMIG_ERR_CHANNEL');
    this.rejectFailure(this.error);
  }

  private guard<T>(p: Promise<T>): Promise<T> {
    return Promise.race([p, this.failure]);
  }

  private setStatus(s: MigrationStatus): void {
    this.stats.status = s;
    this.ctx.onStatus?.(this.stats.info());
  }

  async run(): Promise<MigrationInfo> {
    const { ctx, stats } = this;
    const onAbort = (): void => this.fail(new VmigError('VMIG_ERR_CANCELLED', 'migration cancelled'));
    ctx.signal?.addEventListener('abort', onAbort, { once: true });
    stats.startTime = performance.now();
    this.setStatus('setup');
    try {
      if (ctx.signal?.aborted) onAbort();
      await this.setup();
      this.setStatus('active');
      await this.iterate();
      await this.complete();
      stats.endTime = performance.now();
      this.setStatus('completed');
    } catch (e) {
      this.fail(e);
      stats.endTime = performance.now();
      stats.error = this.error!.toJSON();
      // The source keeps running: its RAM was only read, never written.
      ctx.vm.resume();
      this.setStatus(this.error!.code === 'VMIG_ERR_CANCELLED' ? 'cancelled' : 'failed');
    } finally {
      ctx.signal?.removeEventListener('abort', onAbort);
    }
    return stats.info();
  }

  private async setup(): Promise<void> {
    const { sink, returnPath, params } = this.ctx;
    this.saver.setup();
    putFileHeader(sink, params.machineName);
    if (returnPath) {
      putCommand(sink, MIG_CMD_OPEN_RETURN_PATH);
      this.shutStatus = this.readReturnPath(returnPath);
      this.shutStatus.catch(() => {});
    }
    this.saver.writeSetupSection(sink, RAM_SECTION_ID);
    this.saver.writeSectionEnd(sink, RAM_SECTION_ID);
    await this.guard(sink.flush());
    this.stats.setupTimeMs = performance.now() - this.stats.startTime;
  }

  private async readReturnPath(rp: StreamSource): Promise<number> {
    try {
      for (;;) {
        const msg = await rp.ensure(4).then(() => readRpMessage(rp));
        if (msg.type === MIG_RP_MSG_SHUT) {
          const status = msg.data.length >= 4 ? ((msg.data[0]! << 24) | (msg.data[1]! << 16) | (msg.data[2]! << 8) | msg.data[3]!) >>> 0 : 1;
          if (status !== 0) this.fail(new VmigError('VMIG_ERR_REMOTE', 'destination failed to load the migration stream', { channel: 'return-path' }));
          return status;
        }
        if (msg.type !== MIG_RP_MSG_PONG) {
          throw new VmigError('VMIG_ERR_STREAM_FORMAT', `unexpected return-path message ${msg.type}`, { channel: 'return-path' });
        }
      }
    } catch (e) {
      const err =
        e instanceof EndOfStream
          ? new VmigError('VMIG_ERR_PEER_CLOSED', 'destination closed the connection', { channel: 'return-path' })
          : toVmigError(e, 'VMIG_ERR_CHANNEL', { channel: 'return-path' });
      this.fail(err);
      throw err;
    }
  }

  private async iterate(): Promise<void> {
    const { sink, params } = this.ctx;
    const { stats, saver } = this;
    let periodStart = performance.now();
    // Bandwidth counts what the transport took, not what is queued in front of it.
    let periodBytes = sink.bytesFlushed;
    let periodPages = stats.normalPages + stats.zeroPages;
    let lastProgress = periodStart;
    const limiter = new RateLimiter(params.maxBandwidth, BANDWIDTH_PERIOD_MS, periodStart);

    for (;;) {
      if (this.error) throw this.error;
      const now = performance.now();
      if (now - periodStart >= BANDWIDTH_PERIOD_MS) {
        const secs = (now - periodStart) / 1000;
        stats.bandwidth = (sink.bytesFlushed - periodBytes) / secs;
        stats.pagesPerSecond = (stats.normalPages + stats.zeroPages - periodPages) / secs;
        periodStart = now;
        periodBytes = sink.bytesFlushed;
        periodPages = stats.normalPages + stats.zeroPages;
        if (now - lastProgress >= 1000) {
          lastProgress = now;
          this.ctx.onProgress?.(stats.info(now));
        }
      }

      const threshold = (stats.bandwidth * params.downtimeLimitMs) / 1000;
      let pending = saver.dirtyPages * TARGET_PAGE_SIZE;
      if (pending <= threshold || saver.dirtyPages === 0) {
        // The scan wrapped or little is left: look at what the vCPUs dirtied since.
        saver.bitmapSync();
        this.rounds++;
        pending = saver.dirtyPages * TARGET_PAGE_SIZE;
        stats.expectedDowntimeMs = stats.bandwidth > 0 ? (pending / stats.bandwidth) * 1000 : 0;
        if (pending <= threshold) return;
        if (saver.dirtyPages === 0) {
          // Nothing dirty yet and no bandwidth measured: wait for the vCPUs a little.
          await this.guard(sleep(5));
          continue;
        }
      }
      stats.expectedDowntimeMs = stats.bandwidth > 0 ? (pending / stats.bandwidth) * 1000 : stats.expectedDowntimeMs;

      const allowance = limiter.allowance(now);
      if (allowance <= 0) {
        // migration_rate_limit: over max-bandwidth, wait for credit.
        await this.guard(sleep(limiter.waitMs(now)));
        continue;
      }
      const before = sink.bytesWritten;
      saver.writePartHeader(sink, RAM_SECTION_ID, false);
      saver.savePages(sink, Math.min(SLICE_BYTES, allowance));
      saver.writeSectionEnd(sink, RAM_SECTION_ID);
      limiter.consume(sink.bytesWritten - before);
      stats.transferred = sink.bytesWritten;
      stats.precopyBytes = sink.bytesWritten;
      await this.guard(sink.ready());
    }
  }

  private async complete(): Promise<void> {
    const { sink, vm, devices } = this.ctx;
    const { stats, saver } = this;
    const downtimeStart = performance.now();
    const bytesBefore = sink.bytesWritten;
    await this.guard(vm.stop());
    if (this.error) throw this.error;

    saver.bitmapSync();
    saver.writePartHeader(sink, RAM_SECTION_ID, true);
    while (saver.dirtyPages > 0) {
      saver.savePages(sink, SLICE_BYTES);
      await this.guard(sink.ready());
    }
    saver.writeSectionEnd(sink, RAM_SECTION_ID);

    const descs: unknown[] = [];
    let sectionId = RAM_SECTION_ID + 1;
    for (const d of devices.list()) {
      putSectionFull(sink, QEMU_VM_SECTION_FULL, { sectionId, idstr: d.idstr, instanceId: d.instanceId, versionId: d.versionId });
      d.save(sink);
      putSectionFooter(sink, sectionId);
      descs.push({ name: d.idstr, instance_id: d.instanceId, vmsd_name: d.idstr, version: d.versionId });
      sectionId++;
    }
    putEof(sink);
    putVmDescription(sink, JSON.stringify({ page_size: TARGET_PAGE_SIZE, devices: descs }));
    await this.guard(sink.flush());
    stats.transferred = sink.bytesWritten;
    stats.downtimeBytes = sink.bytesWritten - bytesBefore;
    stats.remainingPages = 0;

    if (this.shutStatus) {
      const status = await this.guard(this.shutStatus);
      if (status !== 0) throw new VmigError('VMIG_ERR_REMOTE', `destination reported failure ${status}`, { channel: 'return-path' });
    }
    stats.downtimeMs = performance.now() - downtimeStart;
  }

  get dirtySyncRounds(): number {
    return this.rounds;
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, Math.max(0, ms)));
}
