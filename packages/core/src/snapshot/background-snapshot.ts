/**
 * Background snapshot (QEMU 6.0's bg_migration_thread, seed 004; qemu-wire.md section 6):
 * setup sections; stop the vCPUs; save device state into a memory buffer; write-protect all
 * RAM; resume the vCPUs; one pass over RAM with no dirty tracking, in which a write fault
 * makes the faulting page the next one saved (or, with a copy-on-write buffer, the writer
 * copies it and goes on); each page is unprotected once saved; at the end the buffered device
 * sections and EOF. RAM has no SECTION_END. The file equals RAM as it was at the stop.
 */
import type { DeviceRegistry } from '../devices/device.js';
import { toVmigError, VmigError } from '../errors.js';
import { MemorySink, type StreamSink } from '../io.js';
import { silentLogger, type Logger } from '../log.js';
import type { GuestRam } from '../ram/ram-block.js';
import { putFileHeader } from '../wire/main-stream.js';
import { putDeviceSectionsAndEof } from '../migration/device-sections.js';
import type { VmRunControl } from '../migration/vm.js';
import { RamSaver } from '../migration/ram-save.js';
import type { MigrationStatus } from '../migration/state.js';
import { MigrationStats } from '../migration/stats.js';
import type { WriteProtectSaver, WriteProtectStats } from './write-protect.js';

export interface SnapshotContext {
  ram: GuestRam;
  /** The file. Errors on it become VMIG_ERR_SNAPSHOT_IO. */
  sink: StreamSink;
  vm: VmRunControl;
  devices: DeviceRegistry;
  wp: WriteProtectSaver;
  /** Zero pages as RAM_SAVE_FLAG_ZERO records (legacy detection) or as normal pages. */
  zeroPages: boolean;
  machineName?: string;
  /** Test mode: runs with the vCPUs stopped, after the devices flushed (digest RAM here). */
  atStop?: () => void;
  onStatus?: (status: MigrationStatus) => void;
  onProgress?: (info: SnapshotInfo) => void;
  signal?: AbortSignal | undefined;
  log?: Logger;
}

export interface SnapshotInfo {
  status: MigrationStatus;
  totalTimeMs: number;
  setupTimeMs: number;
  downtimeMs?: number;
  ram: {
    total: number;
    /** Bytes written to the file. */
    transferred: number;
    normal: number;
    duplicate: number;
    pagesByScan: number;
    pagesByFault: number;
    pagesByCow: number;
  };
  writeProtect: WriteProtectStats;
  error?: { code: string; message: string };
}

const RAM_SECTION_ID = 2;
/** Pages between looks at the fault slots: bounds a blocked writer's wait. */
const FAULT_POLL_PAGES = 16;
/** Pages per RAM section part. */
const SECTION_PAGES = 2048;

export class BackgroundSnapshot {
  private readonly stats = new MigrationStats();
  private readonly saver: RamSaver;
  private readonly log: Logger;
  private pagesByScan = 0;
  private pagesByFault = 0;
  private pagesByCow = 0;
  private readonly faults: number[] = [];
  private stopped = false;

  constructor(private readonly ctx: SnapshotContext) {
    // The saver writes the RAM section and page records; its bitmap and scan are not used
    // (one pass, no dirty tracking).
    this.saver = new RamSaver(ctx.ram, this.stats, ctx.zeroPages ? 'legacy' : 'none');
    this.log = ctx.log ?? silentLogger;
    this.stats.totalBytes = ctx.ram.totalBytes;
  }

  private setStatus(s: MigrationStatus): void {
    this.stats.status = s;
    this.ctx.onStatus?.(s);
  }

  info(): SnapshotInfo {
    const i = this.stats.info();
    const out: SnapshotInfo = {
      status: i.status,
      totalTimeMs: i.totalTimeMs,
      setupTimeMs: i.setupTimeMs,
      ram: {
        total: i.ram.total,
        transferred: this.ctx.sink.bytesWritten,
        normal: i.ram.normal,
        duplicate: i.ram.duplicate,
        pagesByScan: this.pagesByScan,
        pagesByFault: this.pagesByFault,
        pagesByCow: this.pagesByCow,
      },
      writeProtect: this.ctx.wp.stats(),
    };
    if (i.downtimeMs !== undefined) out.downtimeMs = i.downtimeMs;
    if (i.error) out.error = i.error;
    return out;
  }

  async run(): Promise<SnapshotInfo> {
    const { ctx, stats } = this;
    stats.startTime = performance.now();
    this.setStatus('setup');
    try {
      this.checkCancel();
      await this.setup();
      this.setStatus('active');
      await this.pass();
      await this.finish();
      stats.endTime = performance.now();
      this.setStatus('completed');
    } catch (e) {
      let err = toVmigError(e, 'VMIG_ERR_SNAPSHOT_IO');
      if (err.channel === 'file' && err.code !== 'VMIG_ERR_SNAPSHOT_IO') err = new VmigError('VMIG_ERR_SNAPSHOT_IO', err.message, {}, { cause: err });
      stats.endTime = performance.now();
      stats.error = err.toJSON();
      // Rule 4 of write-protect.ts: nobody stays blocked, then the vCPUs run on.
      ctx.wp.unprotectAll();
      if (this.stopped) ctx.vm.resume();
      this.setStatus(err.code === 'VMIG_ERR_CANCELLED' ? 'cancelled' : 'failed');
    }
    return this.info();
  }

  private checkCancel(): void {
    if (this.ctx.signal?.aborted) throw new VmigError('VMIG_ERR_CANCELLED', 'snapshot cancelled');
  }

  private async setup(): Promise<void> {
    const { ctx, stats } = this;
    putFileHeader(ctx.sink, ctx.machineName ?? 'none');
    this.saver.writeSetupSection(ctx.sink, RAM_SECTION_ID);
    this.saver.writeSectionEnd(ctx.sink, RAM_SECTION_ID);
    await ctx.sink.flush();
    stats.setupTimeMs = performance.now() - stats.startTime;

    // The brief stop: device state into memory, protect everything, run again.
    const downtimeStart = performance.now();
    await ctx.vm.stop();
    this.stopped = true;
    for (const d of ctx.devices.list()) d.flushToRam?.();
    ctx.atStop?.();
    this.deviceState = new MemorySink();
    putDeviceSectionsAndEof(this.deviceState, ctx.devices, RAM_SECTION_ID + 1);
    ctx.wp.protectAll();
    ctx.vm.resume();
    this.stopped = false;
    stats.downtimeMs = performance.now() - downtimeStart;
  }
  private deviceState: MemorySink | undefined;

  /** Saves one page from RAM (the caller holds its claim; the page is still protected). */
  private readonly saveGlobalPage = (page: number): void => {
    this.savePageCopy(page, undefined);
  };

  /** A page record from RAM, or from a copy of the page taken at its fault. */
  private savePageCopy(page: number, copy: Uint8Array | undefined): void {
    const [b, local] = this.ctx.ram.locate(page);
    this.saver.savePageFrom(this.ctx.sink, b, local, copy ?? this.ctx.ram.blocks[b]!.page(local));
  }

  /** Faulted pages first: blocking faults from RAM, copies from the copy-on-write ring. */
  private serveFaults(): void {
    const { wp } = this.ctx;
    this.faults.length = 0;
    wp.takeFaults(this.faults);
    for (const p of this.faults) if (wp.saveFromRam(p, this.saveGlobalPage)) this.pagesByFault++;
    this.pagesByCow += wp.drainCow((p, data) => this.savePageCopy(p, data));
  }

  /** Backpressure on the file, while still serving faults (they must not wait for the disk). */
  private async fileReady(): Promise<void> {
    const { sink, wp } = this.ctx;
    let ready = false;
    const r = sink.ready().then(() => (ready = true));
    for (;;) {
      this.serveFaults();
      if (ready) return;
      const seq = wp.faultSeq;
      await Promise.race([r, wp.waitFault(seq, 20)]);
      this.checkCancel();
    }
  }

  private async pass(): Promise<void> {
    const { ctx } = this;
    let inSection = 0;
    let lastProgress = performance.now();
    const sectionStart = (): void => this.saver.writePartHeader(ctx.sink, RAM_SECTION_ID, false);
    const sectionEnd = (): void => this.saver.writeSectionEnd(ctx.sink, RAM_SECTION_ID);
    sectionStart();
    const total = ctx.ram.totalPages;
    for (let page = 0; page < total; page++) {
      if (page % FAULT_POLL_PAGES === 0) {
        this.serveFaults();
        if (inSection >= SECTION_PAGES) {
          // Start the next part before waiting: faults served meanwhile are page records and
          // must be inside a RAM section.
          sectionEnd();
          sectionStart();
          inSection = 0;
          await this.fileReady();
          this.checkCancel();
          const now = performance.now();
          if (now - lastProgress >= 1000) {
            lastProgress = now;
            ctx.onProgress?.(this.info());
          }
        }
      }
      if (ctx.wp.saveFromRam(page, this.saveGlobalPage)) {
        this.pagesByScan++;
        inSection++;
      }
    }
    // Copies reserved by writers but not yet published are a few microseconds away.
    while (ctx.wp.cowPending > 0) {
      this.serveFaults();
      if (ctx.wp.cowPending > 0) await ctx.wp.waitFault(ctx.wp.faultSeq, 5);
    }
    this.serveFaults();
    sectionEnd();
  }

  private async finish(): Promise<void> {
    const { ctx } = this;
    // Every page is saved, so nothing is protected any more.
    ctx.wp.unprotectAll();
    ctx.sink.putBytes(this.deviceState!.bytes());
    await ctx.sink.flush();
    this.stats.transferred = ctx.sink.bytesWritten;
    this.stats.remainingPages = 0;
  }
}
