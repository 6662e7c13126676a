/**
 * `vmig migrate URI --ram SIZE ...`: the source. Builds a test guest (RAM + vCPU writers and
 * its devices), migrates it to a destination while the writers run, reports.
 */
import type net from 'node:net';
import { BufferedWriter, bridgeTls, connect, type MigrationUri, parseMigrationUri, tlsConnect } from '@vmig/channel';
import {
  DeviceRegistry,
  GlobalStateDevice,
  GuestRam,
  InvalidArgumentError,
  MigrationNotifiers,
  MigrationStats,
  PrecopyMigration,
  RamIntegrityDevice,
  TimerDevice,
  toVmigError,
  type MigrationInfo,
} from '@vmig/core';
import { MultifdSender } from '@vmig/multifd';
import { digestRam, fillRam, ItsTableDevice, VcpuPool, VcpuStateDevice } from '@vmig/test-harness';
import { parseCommandArgs } from '../args.js';
import { ControlServer, runtimeParams } from '../control.js';
import { qmpCapabilities, qmpMigrationInfo, qmpParameters, qmpStatus } from '../qmp-info.js';
import { createLogger } from '../log.js';
import { applyQmpCapabilities, applyQmpMultifdParameters, MIGRATE_OPTIONS, migrateSettings, tlsOptions } from '../options.js';
import { fmtBytes, Output } from '../output.js';
import { ProgressLine } from '../progress.js';
import { resourceUsage } from '../resources.js';
import { ReturnPathThread } from '../return-path-thread.js';
import { lowerBackgroundThreads, restoreThreads, type PriorityChange } from '../thread-priority.js';

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
  let mig: PrecopyMigration | undefined;
  const stats = new MigrationStats();
  const control = s.control
    ? await ControlServer.listen(
        s.control,
        {
          'query-migrate': () => qmpMigrationInfo(mig?.stats.info()),
          'query-status': () => qmpStatus(mig?.stats.status, 'source'),
          'query-migrate-capabilities': () =>
            qmpCapabilities({ 'auto-converge': s.params.autoConverge, 'postcopy-ram': s.postcopy, 'postcopy-preempt': s.postcopyPreempt, multifd: s.multifdChannels > 0 }),
          migrate: (args) => {
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

  // The return path's thread boots while the guest is built (see return-path-thread.ts);
  // with --postcopy-preempt it opens the channel for requested pages at the switch and
  // sends them there itself.
  const tls = tlsOptions(s, 'client');
  const returnPathFor = (u: MigrationUri): ReturnPathThread =>
    new ReturnPathThread({
      preemptUri: s.postcopyPreempt ? u : undefined,
      faultSliceUs: s.postcopyPreempt ? s.postcopyFaultSliceUs : 0,
      onPreemptError: (e) => mig?.fail(e),
      writeTimeoutMs: s.channelTimeoutMs,
      // With TLS the preempt channel is TLS too; the thread writes its pages through a pair.
      ...(tls ? { secure: (ps: net.Socket) => tlsConnect(ps, u.transport === 'tcp' ? u.host : 'localhost', tls, s.channelTimeoutMs, 'preempt') } : {}),
    });
  let rpThread = uri ? returnPathFor(uri) : undefined;
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
    return code;
  };

  if (!uri) {
    const asked = await Promise.race([migrateCommand, quit.then(() => undefined)]);
    if (!asked) {
      await vcpus.terminate();
      return finish(0);
    }
    uri = asked;
    rpThread = returnPathFor(uri);
  }
  started = true;
  const target = uri;
  const rp = rpThread!;

  const failEarly = async (e: unknown): Promise<number> => {
    const err = toVmigError(e, 'VMIG_ERR_CONNECT');
    log.error({ error: err.toJSON() }, 'migration could not start');
    await rp.close();
    // The vCPUs were never stopped: say that they run, as a failure after setup does.
    const writersResumed = vcpus.count > 0 && s.dirtyRate > 0 ? await vcpus.keepsWriting(RESUME_CHECK_MS) : undefined;
    await vcpus.terminate();
    control?.event('MIGRATION', { status: 'failed' });
    out.report(
      { role: 'source', status: 'failed', error: err.toJSON(), ...(writersResumed !== undefined ? { writersResumed } : {}) },
      `vmig: migration failed: ${err.message} [${err.code}]`,
    );
    return finish(1);
  };

  let sock;
  try {
    sock = await connect(target, { channel: 'main', timeoutMs: s.channelTimeoutMs });
    if (tls) sock = await tlsConnect(sock, target.transport === 'tcp' ? target.host : 'localhost', tls, s.channelTimeoutMs, 'main');
  } catch (e) {
    return failEarly(e);
  }
  let multifd: MultifdSender | undefined;
  if (s.multifdChannels > 0) {
    try {
      multifd = await MultifdSender.start(ram, stats, {
        uri: target,
        channels: s.multifdChannels,
        compression: s.compression,
        zeroPageDetection: s.params.zeroPageDetection,
        flushAfterEachSection: s.flushAfterEachSection,
        uuid: s.uuid,
        connectTimeoutMs: s.channelTimeoutMs,
        tls,
      });
    } catch (e) {
      sock.destroy();
      return failEarly(e);
    }
  }
  const sink = new BufferedWriter(sock, { channel: 'main' });
  // Over TLS the return-path thread reads the decrypted direction through a local pair
  // (tls-bridge.ts); the migration thread writes the main stream on the TLS socket itself.
  const rpSock = tls ? (await bridgeTls(sock, 'in')).sock : sock;
  const returnPath = rp;
  returnPath.attach(rpSock, ram);
  const its = new ItsTableDevice(() => ram);
  const devices = new DeviceRegistry().register(new TimerDevice()).register(new GlobalStateDevice('running'));
  // The test guest's own sections, unless the destination is QEMU (--guest-devices none).
  if (s.guestDevices === 'test') {
    devices
      .register(new VcpuStateDevice(() => ({ writers: vcpus.count, writes: vcpus.writes, pattern: s.pattern, dirtyRate: s.dirtyRate, hotPages: s.hotPages, seed: Number(s.seed) || 1 })))
      .register(its);
  }
  if (s.integrity) devices.register(new RamIntegrityDevice(() => ram));
  const notifiers = new MigrationNotifiers();
  notifiers.precopy.add((e) => {
    if (e.reason === 'AFTER_BITMAP_SYNC') control?.event('MIGRATION_PASS', { pass: stats.dirtySyncCount });
  });
  const progress = !s.json && process.stderr.isTTY ? new ProgressLine(ram.totalBytes) : undefined;
  let lowered: PriorityChange | undefined;
  let switched = false;
  mig = new PrecopyMigration({
    ram,
    sink,
    stats,
    multifd,
    vm: vcpus,
    devices,
    params: s.params,
    returnPath,
    signal: abort.signal,
    notifiers,
    log,
    channelTimeoutMs: s.channelTimeoutMs,
    onStatus: (i) => {
      if (i.status !== 'active') progress?.stop();
      // With preempt, after the switch this thread only streams background pages: requests
      // are the return-path thread's (thread-priority.ts). Without, it serves them itself.
      if (i.status === 'postcopy-active' && s.postcopyPreempt) {
        switched = true;
        lowered = lowerBackgroundThreads(s.postcopyBackgroundNice);
      }
      control?.event('MIGRATION', { status: i.status });
      log.info({ status: i.status }, 'migration status');
      out.event({ event: 'status', status: i.status, totalTimeMs: i.totalTimeMs }, progress ? undefined : `vmig: status ${i.status}`);
    },
    onProgress: (i) => {
      if (progress) progress.update(i);
      else
        out.event(
          { event: 'progress', ...i },
          `vmig: ${fmtBytes(i.ram.transferred)} sent, ${fmtBytes(i.ram.remaining)} dirty, ${i.ram.mbps.toFixed(0)} Mbit/s, round ${i.ram.dirtySyncCount}, throttle ${i.cpuThrottlePercentage}%, expected downtime ${i.expectedDowntimeMs.toFixed(0)} ms`,
        );
    },
  });
  sock.on('error', (e) => mig?.fail(e));
  multifd?.onError((e) => mig?.fail(e));
  const info: MigrationInfo = await mig.run();
  progress?.stop();
  restoreThreads(lowered);

  // After success the vCPUs stay stopped: RAM is exactly what was migrated. After a failure
  // or cancel before the postcopy switch they run again: check that they really do. After
  // the switch they stay stopped (the guest is split; the error says so).
  const digest = info.status === 'completed' ? digestRam(ram).digest : undefined;
  // The thread does no more I/O on the sockets' fds before they close.
  await returnPath.close();
  sock.destroy();
  if (rpSock !== sock) rpSock.destroy();
  if (info.status === 'completed') await multifd?.close();
  else await multifd?.destroy();
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
    ...(switched ? { postcopyScheduling: { backgroundNice: lowered?.nice ?? null, faultSliceUs: rp.faultSliceUs } } : {}),
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
