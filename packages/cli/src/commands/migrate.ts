/**
 * `vmig migrate URI --ram SIZE ...`: the source. Builds a test guest (RAM + vCPU writers),
 * migrates it to a destination while the writers run, reports.
 */
import { BufferedWriter, ByteReader, connect, parseMigrationUri } from '@vmig/channel';
import {
  DeviceRegistry,
  GlobalStateDevice,
  GuestRam,
  InvalidArgumentError,
  MigrationStats,
  PrecopyMigration,
  TimerDevice,
  toVmigError,
  type MigrationInfo,
} from '@vmig/core';
import { MultifdSender } from '@vmig/multifd';
import { digestRam, fillRam, VcpuPool } from '@vmig/test-harness';
import { parseCommandArgs } from '../args.js';
import { MIGRATE_OPTIONS, migrateSettings } from '../options.js';
import { fmtBytes, Output } from '../output.js';
import { resourceUsage } from '../resources.js';

export async function migrateCommand(argv: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs('migrate', argv, MIGRATE_OPTIONS);
  if (positionals.length !== 1) throw new InvalidArgumentError('migrate: expected one URI (tcp:HOST:PORT or unix:PATH)');
  const uri = parseMigrationUri(positionals[0]!);
  const s = migrateSettings(values);
  const out = new Output(s.json);

  const ram = GuestRam.create(s.ram.map((r) => ({ idstr: r.idstr, size: r.size })));
  fillRam(ram, s.fill, s.seed);
  const vcpus = await VcpuPool.start(ram, { writers: s.writers, dirtyRate: s.dirtyRate, pattern: s.pattern, hotPages: s.hotPages, seed: Number(s.seed) || 1 });
  out.event({ event: 'guest', ram: ram.totalBytes, writers: s.writers, dirtyRate: s.dirtyRate, fill: s.fill }, `vmig: guest of ${fmtBytes(ram.totalBytes)} (${s.fill}), ${s.writers} writer(s)`);

  const abort = new AbortController();
  const onSignal = (): void => abort.abort();
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);

  let info: MigrationInfo;
  let sock;
  try {
    sock = await connect(uri, { channel: 'main' });
  } catch (e) {
    const err = toVmigError(e, 'VMIG_ERR_CONNECT');
    await vcpus.terminate();
    out.report({ role: 'source', status: 'failed', error: err.toJSON() }, `vmig: migration failed: ${err.message} [${err.code}]`);
    return 1;
  }
  const stats = new MigrationStats();
  let multifd: MultifdSender | undefined;
  if (s.multifdChannels > 0) {
    try {
      multifd = await MultifdSender.start(ram, stats, {
        uri,
        channels: s.multifdChannels,
        compression: s.compression,
        zeroPageDetection: s.params.zeroPageDetection,
        flushAfterEachSection: s.flushAfterEachSection,
      });
    } catch (e) {
      const err = toVmigError(e, 'VMIG_ERR_CONNECT');
      sock.destroy();
      await vcpus.terminate();
      out.report({ role: 'source', status: 'failed', error: err.toJSON() }, `vmig: migration failed: ${err.message} [${err.code}]`);
      return 1;
    }
  }
  const sink = new BufferedWriter(sock, { channel: 'main' });
  const returnPath = new ByteReader(sock, { channel: 'return-path' });
  const devices = new DeviceRegistry().register(new TimerDevice()).register(new GlobalStateDevice('running'));
  const mig = new PrecopyMigration({
    ram,
    sink,
    stats,
    multifd,
    vm: vcpus,
    devices,
    params: s.params,
    returnPath,
    signal: abort.signal,
    onStatus: (i) => out.event({ event: 'status', status: i.status, totalTimeMs: i.totalTimeMs }, `vmig: status ${i.status}`),
    onProgress: (i) =>
      out.event(
        { event: 'progress', ...i },
        `vmig: ${fmtBytes(i.ram.transferred)} sent, ${fmtBytes(i.ram.remaining)} dirty, ${i.ram.mbps.toFixed(0)} Mbit/s, round ${i.ram.dirtySyncCount}, expected downtime ${i.expectedDowntimeMs.toFixed(0)} ms`,
      ),
  });
  sock.on('error', (e) => mig.fail(e));
  multifd?.onError((e) => mig.fail(e));
  info = await mig.run();
  process.off('SIGINT', onSignal);
  process.off('SIGTERM', onSignal);

  // After success the vCPUs stay stopped: RAM is exactly what was migrated.
  const digest = info.status === 'completed' ? digestRam(ram).digest : undefined;
  sock.destroy();
  if (info.status === 'completed') await multifd?.close();
  else await multifd?.destroy();
  const writes = vcpus.writes;
  await vcpus.terminate();
  const report = { role: 'source', ...info, writes, resources: resourceUsage(), ...(digest ? { ramDigest: digest } : {}) };
  out.report(
    report,
    info.status === 'completed'
      ? `vmig: migration completed: ${fmtBytes(info.ram.total)} in ${info.totalTimeMs.toFixed(0)} ms, downtime ${info.downtimeMs?.toFixed(1)} ms, ${info.ram.dirtySyncCount} sync(s), ${fmtBytes(info.ram.transferred)} sent, digest ${digest}`
      : `vmig: migration ${info.status}: ${info.error?.message} [${info.error?.code}]`,
  );
  return info.status === 'completed' ? 0 : 1;
}
