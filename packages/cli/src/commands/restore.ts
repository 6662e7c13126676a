/**
 * `vmig restore FILE [--dump-ram OUT] [--json]`: loads a snapshot (QEMU's stream format) into
 * fresh RAM, reports its digest.
 */
import { createReadStream } from 'node:fs';
import { open } from 'node:fs/promises';
import { ByteReader } from '@vmig/channel';
import {
  DeviceRegistry,
  EndOfStream,
  GlobalStateDevice,
  GuestRam,
  InvalidArgumentError,
  qemuLoadVmState,
  readVmDescription,
  StreamError,
  TimerDevice,
  toVmigError,
  VmigError,
} from '@vmig/core';
import { digestRam, ItsTableDevice, VcpuStateDevice } from '@vmig/test-harness';
import { parseCommandArgs } from '../args.js';
import { createLogger } from '../log.js';
import { maxRamSetting, parseSnapshotFile, RESTORE_OPTIONS, sharedSettings } from '../options.js';
import { dumpRam } from '../dump-ram.js';
import { fmtBytes, Output } from '../output.js';

export async function restoreCommand(argv: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs('restore', argv, RESTORE_OPTIONS);
  if (positionals.length !== 1) throw new InvalidArgumentError('restore: expected one FILE');
  const file = parseSnapshotFile(positionals[0]!);
  const { json, logLevel } = sharedSettings(values);
  const maxRam = maxRamSetting(values);
  const out = new Output(json);
  const log = createLogger(logLevel, 'restore');
  const start = performance.now();
  let ram: GuestRam | undefined;
  let fh;
  try {
    fh = await open(file, 'r');
  } catch (e) {
    const err = new VmigError('VMIG_ERR_SNAPSHOT_IO', `cannot open '${file}': ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
    out.report({ role: 'restore', status: 'failed', error: err.toJSON() }, `vmig: restore failed: ${err.message} [${err.code}]`);
    return 1;
  }
  const stream = createReadStream('', { fd: fh.fd, autoClose: false, highWaterMark: 1 << 20 });
  try {
    const reader = new ByteReader(stream, { channel: 'file' });
    const vcpuState = new VcpuStateDevice(() => ({ writers: 0, writes: 0, pattern: '' }));
    const its = new ItsTableDevice(() => ram);
    const devices = new DeviceRegistry().register(new TimerDevice()).register(new GlobalStateDevice()).register(vcpuState).register(its);
    const result = await qemuLoadVmState(reader, {
      channel: 'file',
      createRam: (blocks) => GuestRam.fromStream(blocks, maxRam),
      // RAM is created from the file's block list, fresh.
      zeroUnlessLoaded: true,
      onRamReady: (r) => (ram = r),
      devices,
    });
    ram = result.ram;
    try {
      await readVmDescription(reader);
    } catch (e) {
      if (!(e instanceof EndOfStream)) throw e;
    }
    const digest = digestRam(ram);
    const dumpFile = values['dump-ram'];
    if (typeof dumpFile === 'string' && dumpFile.length > 0) await dumpRam(ram, dumpFile);
    out.report(
      {
        role: 'restore',
        status: 'completed',
        file,
        totalTimeMs: Math.round((performance.now() - start) * 1000) / 1000,
        ram: { total: ram.totalBytes, normal: result.normalPages, duplicate: result.zeroPages, blocks: ram.blocks.map((b) => ({ idstr: b.idstr, size: b.usedLength })) },
        devices: { 'vmig-vcpus': vcpuState.loaded ?? null, 'vmig-its': its.flushed ? { ...its.flushed, tableInRam: its.tableInRam } : null },
        ramDigest: digest.digest,
      },
      `vmig: restored ${fmtBytes(ram.totalBytes)} from ${file} (${result.normalPages} pages, ${result.zeroPages} zero pages), digest ${digest.digest}`,
    );
    return 0;
  } catch (e) {
    const err =
      e instanceof EndOfStream
        ? new StreamError('VMIG_ERR_STREAM_TRUNCATED', `snapshot file '${file}' ends early (truncated?)`, { channel: 'file', phase: 'load' })
        : toVmigError(e, 'VMIG_ERR_SNAPSHOT_IO');
    log.error({ error: err.toJSON() }, 'restore failed');
    out.report({ role: 'restore', status: 'failed', file, error: err.toJSON() }, `vmig: restore failed: ${err.message} [${err.code}]`);
    return 1;
  } finally {
    stream.destroy();
    await fh.close().catch(() => {});
  }
}
