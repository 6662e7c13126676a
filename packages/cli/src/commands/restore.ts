/**
 * `vmig restore FILE [--dump-ram OUT] [--json]`: loads a snapshot (QEMU's stream format) into
 * fresh RAM, reports its digest.
 */
import { type GuestRam, InvalidArgumentError, toVmigError } from '@vmig/core';
import { restore, type RestoreResult } from '@vmig/migration';
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
  const vcpuState = new VcpuStateDevice(() => ({ writers: 0, writes: 0, pattern: '' }));
  const its = new ItsTableDevice(() => ram);
  let r: RestoreResult;
  try {
    r = await restore({ file, maxRam, devices: [vcpuState, its], onRamReady: (loaded) => (ram = loaded) });
  } catch (e) {
    const err = toVmigError(e, 'VMIG_ERR_SNAPSHOT_IO');
    log.error({ error: err.toJSON() }, 'restore failed');
    out.report({ role: 'restore', status: 'failed', file, error: err.toJSON() }, `vmig: restore failed: ${err.message} [${err.code}]`);
    return 1;
  }
  const digest = digestRam(r.ram);
  const dumpFile = values['dump-ram'];
  if (typeof dumpFile === 'string' && dumpFile.length > 0) await dumpRam(r.ram, dumpFile);
  out.report(
    {
      role: 'restore',
      status: 'completed',
      file,
      totalTimeMs: Math.round((performance.now() - start) * 1000) / 1000,
      ram: { total: r.ram.totalBytes, normal: r.pages.normal, duplicate: r.pages.zero, blocks: r.ram.blocks.map((b) => ({ idstr: b.idstr, size: b.usedLength })) },
      devices: { 'vmig-vcpus': vcpuState.loaded ?? null, 'vmig-its': its.flushed ? { ...its.flushed, tableInRam: its.tableInRam } : null },
      ramDigest: digest.digest,
    },
    `vmig: restored ${fmtBytes(r.ram.totalBytes)} from ${file} (${r.pages.normal} pages, ${r.pages.zero} zero pages), digest ${digest.digest}`,
  );
  return 0;
}
