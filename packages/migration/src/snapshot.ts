/**
 * snapshot() and restore(): the guest's RAM and devices to a file while it runs (QEMU's
 * background-snapshot capability, write-protect style: core's snapshot/), and back.
 *
 * The application's writer threads must take part in the write protection: create the
 * shared state with `createWriteProtect(ram.totalPages, writers, cowPages)` before they
 * start, and have each call `WriteProtectVcpu.beforeWrite(page)` (from '@vmig/core/vcpu')
 * before it writes a page. A guest without writer threads passes no `writeProtect`.
 */
import { EventEmitter } from 'node:events';
import { createReadStream, createWriteStream } from 'node:fs';
import { open } from 'node:fs/promises';
import { BufferedWriter, ByteReader } from '@vmig/channel';
import {
  BackgroundSnapshot,
  createWriteProtect,
  DeviceRegistry,
  EndOfStream,
  GlobalStateDevice,
  GuestRam,
  type LatencyBuckets,
  type Logger,
  type MigrationStatus,
  qemuLoadVmState,
  readVmDescription,
  type SnapshotInfo,
  StreamError,
  TimerDevice,
  toVmigError,
  VmigError,
  type VmRunControl,
  type VmStateDevice,
  type WriteProtectShared,
  WriteProtectSaver,
} from '@vmig/core';
import { DEFAULT_MAX_RAM } from './incoming.js';

export interface SnapshotOptions {
  file: string;
  ram: GuestRam;
  /** Stopped for the device state only (the downtime), resumed at once. */
  vm: VmRunControl;
  devices?: readonly VmStateDevice[];
  /** The write-protect state the writer threads use; absent: no thread writes while it runs. */
  writeProtect?: WriteProtectShared;
  /** Zero pages as RAM_SAVE_FLAG_ZERO records (default true). */
  zeroPages?: boolean;
  /** Called with the vCPUs stopped, before the device state is saved (a digest of RAM at the stop). */
  atStop?: () => void;
  log?: Logger;
}

export interface SnapshotEvents {
  status: [MigrationStatus];
  progress: [SnapshotInfo];
}

/** Returned by snapshot(): the running background snapshot. */
export class SnapshotJob extends EventEmitter<SnapshotEvents> {
  /** The final info whatever the outcome. A failed snapshot leaves a partial file, which restore() rejects. */
  readonly result: Promise<SnapshotInfo>;
  /** The final info once `completed`; rejects with the VmigError otherwise. */
  readonly done: Promise<SnapshotInfo>;
  private readonly abort = new AbortController();
  private readonly wp: WriteProtectSaver;

  constructor(private readonly opts: SnapshotOptions) {
    super();
    this.wp = new WriteProtectSaver(opts.writeProtect ?? createWriteProtect(opts.ram.totalPages, 0, 0));
    // Never rejects: a file that cannot be opened is a failed snapshot with its error.
    this.result = this.run().catch((e: unknown) => this.failed(toVmigError(e, 'VMIG_ERR_SNAPSHOT_IO')));
    this.done = this.result.then((info) => {
      if (info.status === 'completed') return info;
      throw VmigError.fromJSON(info.error ?? { code: 'VMIG_ERR_INTERNAL', message: `snapshot ${info.status} without an error` });
    });
    this.done.catch(() => {});
  }

  cancel(): void {
    this.abort.abort();
  }

  private failed(err: VmigError): SnapshotInfo {
    const info: SnapshotInfo = {
      status: 'failed',
      totalTimeMs: 0,
      setupTimeMs: 0,
      ram: { transferred: 0, total: this.opts.ram.totalBytes, pagesByScan: 0, pagesByFault: 0, pagesByCow: 0, normal: 0, duplicate: 0 },
      writeProtect: this.wp.stats(),
      error: err.toJSON(),
    };
    this.emit('status', 'failed');
    return info;
  }

  /** How long writers stalled on write-protected pages so far, counted in the buckets of `boundsMs`. */
  stallBuckets(boundsMs: readonly number[]): LatencyBuckets {
    return this.wp.stallBuckets(boundsMs);
  }

  private async run(): Promise<SnapshotInfo> {
    const o = this.opts;
    const fh = await open(o.file, 'w').catch((e: NodeJS.ErrnoException) => {
      throw new VmigError('VMIG_ERR_SNAPSHOT_IO', `cannot open '${o.file}' for writing: ${e.code ?? e.message}`);
    });
    const stream = createWriteStream('', { fd: fh.fd, autoClose: false });
    try {
      const devices = new DeviceRegistry().register(new TimerDevice()).register(new GlobalStateDevice('running'));
      for (const d of o.devices ?? []) devices.register(d);
      const snap = new BackgroundSnapshot({
        ram: o.ram,
        sink: new BufferedWriter(stream, { channel: 'file' }),
        vm: o.vm,
        devices,
        wp: this.wp,
        zeroPages: o.zeroPages ?? true,
        signal: this.abort.signal,
        log: o.log,
        ...(o.atStop ? { atStop: o.atStop } : {}),
        onStatus: (st) => this.emit('status', st),
        onProgress: (i) => this.emit('progress', i),
      });
      return await snap.run();
    } finally {
      await new Promise<void>((resolve) => stream.end(() => resolve()));
      await fh.close().catch(() => {});
    }
  }
}

/** Saves `ram` and its devices to `file` while the guest runs (QEMU's background snapshot). */
export function snapshot(opts: SnapshotOptions): SnapshotJob {
  return new SnapshotJob(opts);
}

export interface RestoreOptions {
  file: string;
  /** The application's devices, loaded from the sections of the same name. */
  devices?: readonly VmStateDevice[];
  /** The most RAM the file may make this side allocate (bytes). Default 64 GiB. */
  maxRam?: number;
  /** RAM exists (built from the file's block list), before any page or device is loaded. */
  onRamReady?: (ram: GuestRam) => void;
}

export interface RestoreResult {
  ram: GuestRam;
  machine: string | null;
  pages: { normal: number; zero: number };
}

/** Loads a snapshot file (or any QEMU migration stream saved to a file) into new RAM. */
export async function restore(opts: RestoreOptions): Promise<RestoreResult> {
  const fh = await open(opts.file, 'r').catch((e: NodeJS.ErrnoException) => {
    throw new VmigError('VMIG_ERR_SNAPSHOT_IO', `cannot open '${opts.file}': ${e.code ?? e.message}`);
  });
  const stream = createReadStream('', { fd: fh.fd, autoClose: false, highWaterMark: 1 << 20 });
  try {
    const reader = new ByteReader(stream, { channel: 'file' });
    const devices = new DeviceRegistry().register(new TimerDevice()).register(new GlobalStateDevice());
    for (const d of opts.devices ?? []) devices.register(d);
    const result = await qemuLoadVmState(reader, {
      channel: 'file',
      createRam: (blocks) => GuestRam.fromStream(blocks, opts.maxRam ?? DEFAULT_MAX_RAM),
      // RAM is created from the file's block list, fresh.
      zeroUnlessLoaded: true,
      ...(opts.onRamReady ? { onRamReady: opts.onRamReady } : {}),
      devices,
    });
    try {
      await readVmDescription(reader);
    } catch (e) {
      if (!(e instanceof EndOfStream)) throw e;
    }
    return { ram: result.ram, machine: result.machine ?? null, pages: { normal: result.normalPages, zero: result.zeroPages } };
  } catch (e) {
    throw e instanceof EndOfStream
      ? new StreamError('VMIG_ERR_STREAM_TRUNCATED', `snapshot file '${opts.file}' ends early (truncated?)`, { channel: 'file', phase: 'load' })
      : toVmigError(e, 'VMIG_ERR_SNAPSHOT_IO');
  } finally {
    stream.destroy();
    await fh.close().catch(() => {});
  }
}
