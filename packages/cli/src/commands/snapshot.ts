/**
 * `vmig snapshot FILE --ram SIZE [--writers N --dirty-rate R] [--snapshot-cow-buffer SIZE]
 * [--verify] [--json]`: a background snapshot of a running test guest into a file in QEMU's
 * stream format; `vmig restore FILE` loads it.
 */
import { createWriteProtect, GuestRam, InvalidArgumentError, type MigrationStatus } from '@vmig/core';
import { snapshot, type SnapshotJob } from '@vmig/migration';
import { MetricsServer, migrationRegistry } from '../metrics.js';
import { digestRam, fillRam, ItsTableDevice, VcpuPool, VcpuStateDevice } from '@vmig/test-harness';
import { parseCommandArgs } from '../args.js';
import { createLogger } from '../log.js';
import { SNAPSHOT_OPTIONS, snapshotSettings } from '../options.js';
import { fmtBytes, Output } from '../output.js';
import { resourceUsage } from '../resources.js';

const RESUME_CHECK_MS = 200;

export async function snapshotCommand(argv: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs('snapshot', argv, SNAPSHOT_OPTIONS);
  if (positionals.length !== 1) throw new InvalidArgumentError('snapshot: expected one FILE');
  const s = snapshotSettings(positionals[0]!, values);
  const out = new Output(s.json);
  const log = createLogger(s.logLevel, 'snapshot');

  let snapStatus: MigrationStatus = 'setup';
  let running: SnapshotJob | undefined;
  const metrics = s.metrics
    ? await MetricsServer.listen(s.metrics, migrationRegistry({ status: () => snapStatus, snapshotStalls: (bounds) => running?.stallBuckets(bounds) }, 'snapshot'))
    : undefined;
  if (metrics) out.event({ event: 'metrics', address: metrics.address }, `vmig: metrics on http ${metrics.address}/metrics`);

  const ram = GuestRam.create(s.ram.map((r) => ({ idstr: r.idstr, size: r.size })));
  fillRam(ram, s.fill, s.seed);
  const writeProtect = createWriteProtect(ram.totalPages, s.writers, s.cowBufferPages);
  const vcpus = await VcpuPool.start(ram, { writers: s.writers, dirtyRate: s.dirtyRate, pattern: s.pattern, hotPages: s.hotPages, seed: Number(s.seed) || 1, writeProtect });
  out.event(
    { event: 'guest', ram: ram.totalBytes, writers: s.writers, dirtyRate: s.dirtyRate, fill: s.fill, snapshotCowBuffer: s.cowBufferPages * 4096 },
    `vmig: guest of ${fmtBytes(ram.totalBytes)} (${s.fill}), ${s.writers} writer(s); snapshot to ${s.file}${s.cowBufferPages ? ` with a ${fmtBytes(s.cowBufferPages * 4096)} copy-on-write buffer` : ''}`,
  );

  // The test guest's own sections, unless the file is for QEMU (--guest-devices none).
  const devices = s.guestDevices === 'test' ? [new VcpuStateDevice(() => ({ writers: vcpus.count, writes: vcpus.writes, pattern: s.pattern })), new ItsTableDevice(() => ram)] : [];
  let digestAtStop: string | undefined;
  const job = snapshot({
    file: s.file,
    ram,
    vm: vcpus,
    devices,
    writeProtect,
    zeroPages: s.zeroPages,
    log,
    ...(s.verify ? { atStop: () => (digestAtStop = digestRam(ram).digest) } : {}),
  });
  running = job;
  const onSignal = (): void => job.cancel();
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  job.on('status', (st) => {
    snapStatus = st;
    log.info({ status: st }, 'snapshot status');
    out.event({ event: 'status', status: st }, `vmig: snapshot ${st}`);
  });
  job.on('progress', (i) => out.event({ event: 'progress', ...i }, `vmig: ${fmtBytes(i.ram.transferred)} written, ${i.writeProtect.faultsBlocking + i.writeProtect.faultsCow} fault(s)`));
  const info = await job.result;
  process.off('SIGINT', onSignal);
  process.off('SIGTERM', onSignal);

  let writersResumed: boolean | undefined;
  if (vcpus.count > 0 && s.dirtyRate > 0) {
    // Writers never stay blocked: after the snapshot (done or failed) they keep writing.
    writersResumed = await vcpus.keepsWriting(RESUME_CHECK_MS);
  }
  const writes = vcpus.writes;
  await vcpus.terminate();
  const ok = info.status === 'completed';
  out.report(
    {
      role: 'snapshot',
      file: s.file,
      snapshotCowBuffer: s.cowBufferPages * 4096,
      ...info,
      writes,
      ...(writersResumed !== undefined ? { writersResumed } : {}),
      resources: resourceUsage(),
      ...(ok && digestAtStop ? { ramDigest: digestAtStop } : {}),
    },
    ok
      ? `vmig: snapshot completed: ${fmtBytes(info.ram.total)} to ${s.file} in ${info.totalTimeMs.toFixed(0)} ms, downtime ${info.downtimeMs?.toFixed(1)} ms; pages by scan ${info.ram.pagesByScan}, by fault ${info.ram.pagesByFault}, by copy-on-write ${info.ram.pagesByCow}; writer stall p50 ${info.writeProtect.stallP50Ms} ms, p99 ${info.writeProtect.stallP99Ms} ms, max ${info.writeProtect.stallMaxMs} ms${digestAtStop ? `; digest at stop ${digestAtStop}` : ''}`
      : `vmig: snapshot ${info.status}: ${info.error?.message} [${info.error?.code}]${writersResumed ? '; the guest keeps running' : ''}`,
  );
  await metrics?.close();
  return ok ? 0 : 1;
}
