/**
 * `vmig migrate URI --ram SIZE ...`: the source. Builds a test guest (RAM + vCPU writers and
 * its devices), migrates it to a destination while the writers run, reports.
 */
import { type MigrationUri, parseMigrationUri } from '@vmig/channel';
import { GuestRam, InvalidArgumentError, type MigrationInfo, MigrationNotifiers } from '@vmig/core';
import { migrate, type OutgoingMigration } from '@vmig/migration';
import { digestRam, fillRam, ItsTableDevice, VcpuPool, VcpuStateDevice } from '@vmig/test-harness';
import { parseCommandArgs } from '../args.js';
import { ControlServer, runtimeParams } from '../control.js';
import { qmpCapabilities, qmpMigrationInfo, qmpParameters, qmpStatus } from '../qmp-info.js';
import { createLogger } from '../log.js';
import { applyQmpCapabilities, applyQmpMultifdParameters, MIGRATE_OPTIONS, migrateSettings, tlsOptions } from '../options.js';
import { fmtBytes, Output } from '../output.js';
import { MetricsServer, migrationRegistry } from '../metrics.js';
import { ProgressLine } from '../progress.js';
import { resourceUsage } from '../resources.js';

/** How long the source watches its writers after a failed or cancelled migration. */
const RESUME_CHECK_MS = 200;

export async function migrateCommand(argv: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs('migrate', argv, MIGRATE_OPTIONS);
  const s = migrateSettings(values);
  if (positionals.length > 1 || (positionals.length === 0 && !s.control)) {
    throw new InvalidArgumentError("migrate: expected one URI (tcp:HOST:PORT or unix:PATH), or --control ADDRESS to wait for QMP's migrate command");
  }
  // Without a URI the process is a QMP server (control.ts): it builds the guest, waits for
  // `migrate` (capabilities and parameters may be set before), and stays until `quit`.
  let uri: MigrationUri | undefined = positionals[0] === undefined ? undefined : parseMigrationUri(positionals[0]);
  const qmpDriven = uri === undefined;
  let started = false;
  let migrateAsked!: (u: MigrationUri) => void;
  const migrateCommand = new Promise<MigrationUri>((r) => (migrateAsked = r));
  let quitAsked!: () => void;
  const quit = new Promise<void>((r) => (quitAsked = r));
  const out = new Output(s.json);
  const log = createLogger(s.logLevel, 'source');

  // Everything a control client can ask for; `mig` exists once the main channel is up.
  const abort = new AbortController();
  // Before anything is said on stdout: a client may signal as soon as it reads a line.
  const onSignal = (): void => {
    abort.abort();
    quitAsked();
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  let mig: OutgoingMigration | undefined;
  const control = s.control
    ? await ControlServer.listen(
        s.control,
        {
          'query-migrate': () => qmpMigrationInfo(mig?.info()),
          'query-status': () => qmpStatus(mig?.stats.status, 'source'),
          'query-migrate-capabilities': () =>
            qmpCapabilities({ 'auto-converge': s.params.autoConverge, 'postcopy-ram': s.postcopy, 'postcopy-preempt': s.postcopyPreempt, multifd: s.multifdChannels > 0 }),
          migrate: (args) => {
            if (args['resume'] === true) {
              // Postcopy recovery: the destination listens (migrate-recover) at `uri`.
              if (!mig) throw new InvalidArgumentError('no migration is running yet');
              if (typeof args['uri'] !== 'string') throw new InvalidArgumentError("Parameter 'uri' is missing");
              mig.resume(args['uri']);
              return {};
            }
            if (started || !qmpDriven) throw new InvalidArgumentError("There's a migration process in progress");
            if (typeof args['uri'] !== 'string') throw new InvalidArgumentError("Parameter 'uri' is missing");
            migrateAsked(parseMigrationUri(args['uri']));
            started = true;
            return {};
          },
          'migrate-set-capabilities': (args) => {
            // Before `migrate` only (QEMU's words); with a URI the migration starts at once.
            if (started || !qmpDriven) throw new InvalidArgumentError("There's a migration process in progress");
            applyQmpCapabilities(s, args['capabilities']);
            return {};
          },
          quit: () => {
            quitAsked();
            return {};
          },
          'migrate-start-postcopy': () => {
            if (!mig) throw new InvalidArgumentError('no migration is running yet');
            mig.startPostcopy();
            return {};
          },
          'migrate-pause': () => {
            if (!mig) throw new InvalidArgumentError('no migration is running yet');
            mig.pause();
            return {};
          },
          migrate_cancel: () => {
            abort.abort();
            return {};
          },
          'migrate-set-parameters': (args) => {
            // Before `migrate`, the multifd parameters too.
            const rest = started || !qmpDriven ? args : applyQmpMultifdParameters(s, args);
            const p = runtimeParams(rest);
            if (mig) mig.setParameters(p);
            else Object.assign(s.params, p);
            return {};
          },
          'query-migrate-parameters': () => qmpParameters(mig?.parameters ?? s.params, { multifdChannels: s.multifdChannels, multifdCompression: s.compression }),
        },
        log,
        // Over TCP: TLS with this side's server certificate, clients with certificates of its CA.
        s.control.startsWith('tcp:') ? tlsOptions(s, 'server') : undefined,
      )
    : undefined;
  if (control) out.event({ event: 'control', address: control.address }, `vmig: control socket on ${control.address}`);
  const metrics = s.metrics
    ? await MetricsServer.listen(
        s.metrics,
        migrationRegistry({ status: () => mig?.info().status ?? 'none', info: () => mig?.info(), channelBytes: () => mig?.multifdChannelBytes() ?? [] }, 'source'),
      )
    : undefined;
  if (metrics) out.event({ event: 'metrics', address: metrics.address }, `vmig: metrics on http ${metrics.address}/metrics`);

  const ram = GuestRam.create(s.ram.map((r) => ({ idstr: r.idstr, size: r.size })));
  fillRam(ram, s.fill, s.seed);
  const vcpus = await VcpuPool.start(ram, { writers: s.writers, dirtyRate: s.dirtyRate, pattern: s.pattern, hotPages: s.hotPages, seed: Number(s.seed) || 1 });
  out.event({ event: 'guest', ram: ram.totalBytes, writers: s.writers, dirtyRate: s.dirtyRate, fill: s.fill }, `vmig: guest of ${fmtBytes(ram.totalBytes)} (${s.fill}), ${s.writers} writer(s)`);

  const finish = async (code: number): Promise<number> => {
    // A QMP-driven process stays (answering queries on how it ended) until `quit` or a signal.
    if (qmpDriven) await quit;
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    await control?.close();
    await metrics?.close();
    return code;
  };

  if (!uri) {
    const asked = await Promise.race([migrateCommand, quit.then(() => undefined)]);
    if (!asked) {
      await vcpus.terminate();
      return finish(0);
    }
    uri = asked;
  }
  started = true;

  const its = new ItsTableDevice(() => ram);
  // The test guest's own sections, unless the destination is QEMU (--guest-devices none).
  const devices =
    s.guestDevices === 'test'
      ? [new VcpuStateDevice(() => ({ writers: vcpus.count, writes: vcpus.writes, pattern: s.pattern, dirtyRate: s.dirtyRate, hotPages: s.hotPages, seed: Number(s.seed) || 1 })), its]
      : [];
  const notifiers = new MigrationNotifiers();
  notifiers.precopy.add((e) => {
    if (e.reason === 'AFTER_BITMAP_SYNC') control?.event('MIGRATION_PASS', { pass: mig?.stats.dirtySyncCount ?? 0 });
  });
  const progress = !s.json && process.stderr.isTTY ? new ProgressLine(ram.totalBytes) : undefined;
  mig = migrate({
    uri,
    ram,
    vm: vcpus,
    devices,
    ...s.params,
    multifdChannels: s.multifdChannels,
    multifdCompression: s.compression,
    multifdFlushAfterEachSection: s.flushAfterEachSection,
    uuid: s.uuid,
    postcopyPreempt: s.postcopyPreempt,
    postcopyFaultSliceUs: s.postcopyFaultSliceUs,
    postcopyBackgroundNice: s.postcopyBackgroundNice,
    integrity: s.integrity,
    // Recovery needs a control socket to be told where to resume; without one a broken
    // link after the switch fails the migration.
    postcopyRecovery: control !== undefined,
    tls: tlsOptions(s, 'client'),
    channelTimeoutMs: s.channelTimeoutMs,
    notifiers,
    log,
  });
  if (abort.signal.aborted) mig.cancel();
  abort.signal.addEventListener('abort', () => mig?.cancel());
  mig.on('status', (i) => {
    control?.event('MIGRATION', { status: i.status });
    log.info({ status: i.status }, 'migration status');
    out.event({ event: 'status', status: i.status, totalTimeMs: i.totalTimeMs }, progress ? undefined : `vmig: status ${i.status}`);
    if (i.status === 'postcopy-paused') {
      out.event(
        { event: 'paused', control: control?.address ?? null },
        control
          ? `vmig: postcopy paused: every page is still here. To recover, on the destination's control socket: {"execute":"migrate-recover","arguments":{"uri":"tcp:HOST:PORT"}}; then on ${control.address}: {"execute":"migrate","arguments":{"uri":"tcp:HOST:PORT","resume":true}}`
          : 'vmig: postcopy paused',
      );
    }
  });
  mig.on('progress', (i) => {
    if (progress) progress.update(i);
    else
      out.event(
        { event: 'progress', ...i },
        `vmig: ${fmtBytes(i.ram.transferred)} sent, ${fmtBytes(i.ram.remaining)} remaining, dirtying ${fmtBytes(i.ram.dirtyPagesRate * i.ram.pageSize)}/s, ${i.ram.mbps.toFixed(0)} Mbit/s, round ${i.ram.dirtySyncCount}, throttle ${i.cpuThrottlePercentage}%, expected downtime ${i.expectedDowntimeMs.toFixed(0)} ms`,
      );
  });
  const info: MigrationInfo = await mig.result;
  progress?.finish(info);

  // After success the vCPUs stay stopped: RAM is exactly what was migrated. After a failure
  // or cancel before the postcopy switch they run again: check that they really do. After
  // the switch they stay stopped (the guest is split; the error says so).
  const digest = info.status === 'completed' ? digestRam(ram).digest : undefined;
  let writersResumed: boolean | undefined;
  if (info.status !== 'completed' && vcpus.count > 0 && s.dirtyRate > 0) {
    writersResumed = await vcpus.keepsWriting(RESUME_CHECK_MS);
  }
  const writes = vcpus.writes;
  await vcpus.terminate();
  const report = {
    role: 'source',
    ...info,
    writes,
    ...(writersResumed !== undefined ? { writersResumed } : {}),
    ...(mig.scheduling ? { postcopyScheduling: mig.scheduling } : {}),
    timeline: mig.stats.timeline.toJSON(),
    ...(s.multifdChannels > 0 ? { multifdChannelBytes: mig.multifdChannelBytes() } : {}),
    devices: { 'vmig-its': its.flushed ?? null },
    resources: resourceUsage(),
    ...(digest ? { ramDigest: digest } : {}),
  };
  out.report(
    report,
    info.status === 'completed'
      ? `vmig: migration completed: ${fmtBytes(info.ram.total)} in ${info.totalTimeMs.toFixed(0)} ms, downtime ${info.downtimeMs?.toFixed(1)} ms, ${info.ram.dirtySyncCount} sync(s), ${fmtBytes(info.ram.transferred)} sent, digest ${digest}`
      : `vmig: migration ${info.status}: ${info.error?.message} [${info.error?.code}]${writersResumed ? '; the guest keeps running here' : ''}`,
  );
  return finish(info.status === 'completed' ? 0 : 1);
}
