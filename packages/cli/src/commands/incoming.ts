/**
 * `vmig incoming URI`: the destination (the library's incoming()) for the test guest: loads
 * one migration stream, runs the guest's vCPUs after a postcopy switch, reports the loaded
 * RAM's digest, exits.
 */
import { parseMigrationUri } from '@vmig/channel';
import { GuestRam, InvalidArgumentError, MigrationNotifiers, type MigrationStatus, toVmigError } from '@vmig/core';
import { incoming, type IncomingMigration, type IncomingResult } from '@vmig/migration';
import { digestRam, ItsTableDevice, TestGuestDestination, VcpuStateDevice } from '@vmig/test-harness';
import { createLogger } from '../log.js';
import { dumpRam } from '../dump-ram.js';
import { ControlServer } from '../control.js';
import { applyQmpCapabilities, applyQmpMultifdParameters, INCOMING_OPTIONS, incomingSettings, tlsOptions } from '../options.js';
import { qmpCapabilities, qmpStatus } from '../qmp-info.js';
import { parseCommandArgs } from '../args.js';
import { fmtBytes, Output } from '../output.js';
import { MetricsServer, migrationRegistry } from '../metrics.js';
import { resourceUsage } from '../resources.js';

export async function incomingCommand(argv: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs('incoming', argv, INCOMING_OPTIONS);
  const settings = incomingSettings(values);
  if (positionals.length > 1 || (positionals.length === 0 && !settings.control)) {
    throw new InvalidArgumentError("incoming: expected one URI (tcp:HOST:PORT or unix:PATH), or --control ADDRESS to wait for QMP's migrate-incoming command");
  }
  const tls = tlsOptions(settings, 'server');
  const out = new Output(settings.json);
  const log = createLogger(settings.logLevel, 'destination');

  // The QMP control socket (control.ts), as QEMU's destination has one: the incoming
  // migration's status, its capabilities and parameters, and MIGRATION events. Without a URI
  // the process waits for `migrate-incoming` (capabilities and parameters may be set before)
  // and stays until `quit`.
  const qmpDriven = positionals.length === 0;
  let status: MigrationStatus = qmpDriven ? 'none' : 'setup';
  let incomingAsked!: (u: string) => void;
  const incomingCommand = new Promise<string>((r) => (incomingAsked = r));
  let quitAsked!: () => void;
  const quit = new Promise<void>((r) => (quitAsked = r));
  const control = settings.control
    ? await ControlServer.listen(
        settings.control,
        {
          'query-migrate': () => (status === 'none' ? {} : { status }),
          'query-status': () => qmpStatus(status, 'destination', status === 'completed' || (dst?.guestRunning ?? false)),
          'query-migrate-capabilities': () =>
            qmpCapabilities({ 'auto-converge': false, 'postcopy-ram': settings.postcopy, 'postcopy-preempt': settings.postcopyPreempt, multifd: settings.multifdChannels > 0 }),
          'query-migrate-parameters': () => ({ 'multifd-channels': settings.multifdChannels, 'multifd-compression': settings.compression }),
          'migrate-incoming': (args) => {
            if (!qmpDriven || status !== 'none') throw new InvalidArgumentError("The incoming migration has already been started");
            if (typeof args['uri'] !== 'string') throw new InvalidArgumentError("Parameter 'uri' is missing");
            parseMigrationUri(args['uri']);
            status = 'setup';
            incomingAsked(args['uri']);
            return {};
          },
          'migrate-set-capabilities': (args) => {
            if (!qmpDriven || status !== 'none') throw new InvalidArgumentError("There's a migration process in progress");
            applyQmpCapabilities(settings, args['capabilities']);
            return {};
          },
          'migrate-set-parameters': (args) => {
            if (!qmpDriven || status !== 'none') throw new InvalidArgumentError("There's a migration process in progress");
            const rest = applyQmpMultifdParameters(settings, args);
            if (Object.keys(rest).length > 0) throw new InvalidArgumentError(`parameter '${Object.keys(rest)[0]}' cannot be set on the destination (multifd-channels, multifd-compression)`);
            return {};
          },
          quit: () => {
            quitAsked();
            return {};
          },
          'migrate-recover': async (args) => {
            if (!dst) throw new InvalidArgumentError('no incoming migration yet');
            if (typeof args['uri'] !== 'string') throw new InvalidArgumentError("Parameter 'uri' is missing");
            const bound = await dst.recover(args['uri']);
            out.event({ event: 'recover', uri: bound }, `vmig: postcopy recovery: listening on ${bound}; on the source: {"execute":"migrate","arguments":{"uri":"${bound}","resume":true}}`);
            return {};
          },
          'migrate-pause': () => {
            if (!dst) throw new InvalidArgumentError('no incoming migration yet');
            dst.pause();
            return {};
          },
        },
        log,
        settings.control.startsWith('tcp:') ? tls : undefined,
      )
    : undefined;
  if (control) out.event({ event: 'control', address: control.address }, `vmig: control socket on ${control.address}`);
  let dst: IncomingMigration | undefined;
  const metrics = settings.metrics
    ? await MetricsServer.listen(
        settings.metrics,
        migrationRegistry(
          {
            status: () => status,
            channelBytes: () => dst?.multifdChannelBytes() ?? [],
            postcopy: () => dst?.postcopyStats(),
            faultLatencies: (bounds) => dst?.faultLatencyBuckets(bounds),
          },
          'destination',
        ),
      )
    : undefined;
  if (metrics) out.event({ event: 'metrics', address: metrics.address }, `vmig: metrics on http ${metrics.address}/metrics`);
  let uriText = positionals[0];
  if (uriText === undefined) {
    // Until migrate-incoming, `quit` or a signal.
    process.once('SIGINT', quitAsked);
    process.once('SIGTERM', quitAsked);
    const asked = await Promise.race([incomingCommand, quit.then(() => undefined)]);
    process.off('SIGINT', quitAsked);
    process.off('SIGTERM', quitAsked);
    if (asked === undefined) {
      await control?.close();
      await metrics?.close();
      return 0;
    }
    uriText = asked;
  }
  const uri = parseMigrationUri(uriText);
  /** The end of the process: a QMP-driven one answers queries on how it ended until `quit`. */
  const closeControl = async (): Promise<void> => {
    if (qmpDriven) {
      process.once('SIGINT', quitAsked);
      process.once('SIGTERM', quitAsked);
      await quit;
    }
    await control?.close();
    await metrics?.close();
  };

  const ram = settings.ram ? GuestRam.create(settings.ram) : undefined;
  // The test guest: its devices, and its vCPUs after a postcopy switch (`vmig-vcpus` says
  // how many and how they write).
  const vcpuState = new VcpuStateDevice(() => ({ writers: 0, writes: 0, pattern: '' }));
  const its = new ItsTableDevice(() => dst?.ram);
  const notifiers = new MigrationNotifiers();
  const start = performance.now();
  try {
    dst = await incoming({
      uri: uri,
      ram,
      maxRam: settings.maxRam,
      devices: [vcpuState, its],
      guest: new TestGuestDestination(vcpuState),
      multifdChannels: settings.multifdChannels,
      multifdCompression: settings.compression,
      multifdFlushAfterEachSection: settings.flushAfterEachSection,
      uuid: settings.uuid,
      postcopy: settings.postcopy,
      postcopyPreempt: settings.postcopyPreempt,
      postcopyBlocktime: settings.postcopyBlocktime,
      postcopyBackgroundNice: settings.postcopyBackgroundNice,
      postcopyFaultSliceUs: settings.postcopyFaultSliceUs,
      postcopyPreemptReader: settings.postcopyPreemptReader,
      integrity: settings.integrity,
      // Recovery needs a control socket (migrate-recover); without one a broken link after RUN fails the load.
      postcopyRecovery: control !== undefined,
      tls,
      channelTimeoutMs: settings.channelTimeoutMs,
      notifiers,
      log,
    });
  } catch (e) {
    status = 'failed';
    await closeControl();
    throw e;
  }
  // Cancel like `migrate` does: clean up and report (a second signal kills at once).
  const onSignal = (sig: NodeJS.Signals): void => dst!.cancel(`cancelled (${sig})`);
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  dst.on('status', (st) => {
    status = st;
    control?.event('MIGRATION', { status: st });
    out.event({ event: 'status', status: st }, undefined);
    if (st === 'postcopy-paused') {
      out.event(
        { event: 'paused', control: control?.address ?? null, error: dst?.pauseCause?.toJSON() ?? null },
        control
          ? `vmig: postcopy paused (${dst?.pauseCause?.message}): the guest runs here and waits for its missing pages. To recover, on ${control.address}: {"execute":"migrate-recover","arguments":{"uri":"tcp:HOST:PORT"}}; then on the source: {"execute":"migrate","arguments":{"uri":"tcp:HOST:PORT","resume":true}}`
          : `vmig: postcopy paused (${dst?.pauseCause?.message})`,
      );
    }
  });
  dst.on('postcopy', (reason) => out.event({ event: 'postcopy', reason }, undefined));
  // Said only now: a client may signal as soon as it reads it.
  out.event({ event: 'listening', uri: dst.uri }, `vmig: listening on ${dst.uri}`);
  const stopSignals = (): void => {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  };
  let r: IncomingResult;
  try {
    r = await dst.done;
  } catch (e) {
    const err = toVmigError(e, 'VMIG_ERR_CHANNEL');
    stopSignals();
    await closeControl();
    out.report(
      { role: 'destination', status: 'failed', totalTimeMs: round(performance.now() - start), error: err.toJSON() },
      `vmig: incoming migration failed: ${err.message} [${err.code}]`,
    );
    return 1;
  }
  // Postcopy: the guest's writes were checked against the source's; the ITS table too.
  if (r.postcopy) its.checkTableInRam();
  // Precopy: nothing here wrote guest RAM, so the digest is of RAM as loaded.
  const digest = digestRam(r.ram);
  const dumpFile = values['dump-ram'];
  if (typeof dumpFile === 'string' && dumpFile.length > 0) await dumpRam(r.ram, dumpFile);
  stopSignals();
  await closeControl();
  out.report(
    {
      role: 'destination',
      status: 'completed',
      totalTimeMs: round(performance.now() - start),
      loadTimeMs: round(r.loadTimeMs),
      machine: r.machine,
      ram: {
        total: r.ram.totalBytes,
        normal: r.pages.normal,
        duplicate: r.pages.zero,
        multifdBytes: r.pages.multifdBytes,
        blocks: r.ram.blocks.map((b) => ({ idstr: b.idstr, size: b.usedLength })),
      },
      multifdChannels: settings.multifdChannels,
      integrity: r.integrity,
      ...(r.postcopy ? { postcopy: r.postcopy } : {}),
      devices: {
        'vmig-vcpus': vcpuState.loaded ?? null,
        'vmig-its': its.flushed ? { ...its.flushed, tableInRam: its.tableInRam } : null,
      },
      ramDigest: digest.digest,
      resources: resourceUsage(),
    },
    `vmig: destination loaded ${fmtBytes(r.ram.totalBytes)} in ${r.loadTimeMs.toFixed(0)} ms (${r.pages.normal} pages, ${r.pages.zero} zero pages), digest ${digest.digest}`,
  );
  return 0;
}

function round(v: number): number {
  return Math.round(v * 1000) / 1000;
}
