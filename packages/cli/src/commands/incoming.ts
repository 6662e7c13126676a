/**
 * `vmig incoming URI`: the destination. Listens, tells each connection apart by its first
 * bytes (the main channel's QEVM magic, or a multifd channel's MultiFDInit_t), loads one
 * migration stream into guest RAM, replies on the return path, reports the loaded RAM's
 * digest, exits.
 */
import type net from 'node:net';
import { bridgeTls, ByteReader, detachFd, formatMigrationUri, listen, parseMigrationUri, readFirstBytes, tlsAccept, type Listener, type TlsBridge, type TlsOptions } from '@vmig/channel';
import {
  createReturnPath,
  DeviceRegistry,
  EndOfStream,
  encodeRpPong,
  encodeRpShut,
  GlobalStateDevice,
  GuestRam,
  InvalidArgumentError,
  MigrationNotifiers,
  type MigrationStatus,
  postcopySplitError,
  qemuLoadVmState,
  QEMU_VM_FILE_MAGIC,
  RamIntegrityDevice,
  readVmDescription,
  ReturnPathWriter,
  type ReturnPathShared,
  StreamError,
  TimerDevice,
  toVmigError,
  VmigError,
} from '@vmig/core';
import { MULTIFD_INIT_SIZE, MULTIFD_MAGIC, MultifdReceiver } from '@vmig/multifd';
import { digestRam, ItsTableDevice, VcpuStateDevice } from '@vmig/test-harness';
import type { Logger } from '@vmig/core';
import { createLogger } from '../log.js';
import { PostcopyGuest } from '../postcopy-guest.js';
import { dumpRam } from '../dump-ram.js';
import { ControlServer } from '../control.js';
import { applyQmpCapabilities, applyQmpMultifdParameters, INCOMING_OPTIONS, incomingSettings, tlsOptions } from '../options.js';
import { qmpCapabilities, qmpStatus } from '../qmp-info.js';
import { parseCommandArgs } from '../args.js';
import { fmtBytes, Output } from '../output.js';
import { resourceUsage } from '../resources.js';

interface MainChannel {
  /** The connection: the accepted socket, or TLS over it. */
  sock: net.Socket;
  first: Buffer;
  tls: boolean;
}

/**
 * Accepts connections until the listener closes: the first QEVM one is the main channel,
 * multifd ones go to the receiver. Anything else is closed, and its reason kept for the
 * multifd barrier's timeout message (a channel whose init was cut short or corrupted is
 * then missing). Once a multifd channel arrived, the main channel must follow within
 * `timeoutMs`.
 */
function acceptChannels(
  listener: Listener,
  receiver: MultifdReceiver | undefined,
  onFatal: (e: VmigError) => void,
  onPreempt: ((sock: net.Socket, first: Buffer) => void) | undefined,
  timeoutMs: number,
  log: Logger,
  tls: TlsOptions | undefined,
): Promise<MainChannel> {
  return new Promise((resolveMain) => {
    let mainSeen = false;
    /** Under TLS: the connection that will be the main channel passed its handshake. */
    let mainTls = false;
    let preemptSeen = false;
    let mainTimer: NodeJS.Timeout | undefined;
    const turnAway = (sock: net.Socket, reason: string): void => {
      log.warn({ reason }, 'connection turned away');
      receiver?.turnAway(reason);
      sock.destroy();
    };
    /**
     * Under TLS the first bytes are encrypted, so connections are told apart by order, as
     * QEMU's sources (and vmig's) open them: the main channel first, its handshake done on
     * this thread; every later one goes whole to a multifd thread, which does its own. A
     * failed handshake fails the migration: a plaintext source, a wrong CA, a refused name.
     */
    const handleTls = async (sock: net.Socket, opts: TlsOptions): Promise<void> => {
      sock.on('error', () => {});
      if (mainTls) {
        if (receiver?.hasFreeSlot) receiver.addTlsConnection(sock, opts);
        else if (onPreempt && !preemptSeen) {
          // The preempt channel (after main and every multifd channel, as QEMU opens them):
          // its handshake here, its pages to the preempt machinery through a local pair.
          preemptSeen = true;
          try {
            const t = await tlsAccept(sock, opts, timeoutMs, 'preempt');
            onPreempt((await bridgeTls(t, 'in')).sock, Buffer.alloc(0));
          } catch (e) {
            sock.destroy();
            onFatal(toVmigError(e, 'VMIG_ERR_TLS', { channel: 'preempt' }));
          }
        } else turnAway(sock, 'a connection after every channel this side expects');
        return;
      }
      mainTls = true;
      let t: net.Socket;
      let first: Buffer;
      try {
        t = await tlsAccept(sock, opts, timeoutMs, 'main');
      } catch (e) {
        sock.destroy();
        onFatal(toVmigError(e, 'VMIG_ERR_TLS', { channel: 'main' }));
        return;
      }
      try {
        first = await readFirstBytes(t, 4, timeoutMs);
      } catch (e) {
        t.destroy();
        // A TLS client checks the server's certificate once the handshake is over, and hangs up.
        onFatal(new VmigError('VMIG_ERR_TLS', `the source hung up right after the TLS handshake (did it refuse this side's certificate?): ${(e as Error).message}`, { channel: 'main' }));
        return;
      }
      if (first.readUInt32BE(0) !== QEMU_VM_FILE_MAGIC) {
        t.destroy();
        onFatal(new StreamError('VMIG_ERR_STREAM_MAGIC', 'under TLS the main channel must connect first: the first connection is not a migration stream (QEVM)', { channel: 'main' }));
        return;
      }
      mainSeen = true;
      resolveMain({ sock: t, first, tls: true });
    };
    const handle = async (sock: net.Socket): Promise<void> => {
      if (tls) return handleTls(sock, tls);
      sock.on('error', () => {});
      if (onPreempt && mainSeen && !preemptSeen && !receiver?.hasFreeSlot) {
        // After the main channel and every multifd channel, the preempt channel (QEMU's
        // rule): it sends no magic, and may say nothing until the switch (QEMU 7.2 opens it
        // at setup), so its first bytes are not waited for here.
        preemptSeen = true;
        onPreempt(sock, Buffer.alloc(0));
        return;
      }
      let first: Buffer;
      try {
        first = await readFirstBytes(sock, 4, timeoutMs);
      } catch (e) {
        turnAway(sock, `a connection without its first bytes (${(e as Error).message})`);
        return;
      }
      const magic = first.readUInt32BE(0);
      if (magic === QEMU_VM_FILE_MAGIC && !mainSeen) {
        mainSeen = true;
        clearTimeout(mainTimer);
        resolveMain({ sock, first, tls: false });
      } else if (magic === MULTIFD_MAGIC) {
        if (!receiver) {
          sock.destroy();
          onFatal(new StreamError('VMIG_ERR_MULTIFD_CHANNELS', 'a multifd channel connected, but this side was started without --multifd-channels', { channel: 'multifd' }));
          return;
        }
        if (first.length < MULTIFD_INIT_SIZE) {
          try {
            first = Buffer.concat([first, await readFirstBytes(sock, MULTIFD_INIT_SIZE - first.length, timeoutMs)]);
          } catch (e) {
            turnAway(sock, `a multifd channel whose MultiFDInit_t was cut short (${(e as Error).message})`);
            return;
          }
        }
        receiver.addChannel(sock, first);
        if (!mainSeen && !mainTimer) {
          mainTimer = setTimeout(
            () => onFatal(new VmigError('VMIG_ERR_TIMEOUT', `a multifd channel connected, but the main channel did not within ${timeoutMs} ms (--channel-timeout)`, { channel: 'main' })),
            timeoutMs,
          );
          mainTimer.unref();
        }
      } else if (first[0] === 0x16 && first[1] === 0x03) {
        // A TLS ClientHello: the source uses TLS and this side does not.
        sock.destroy();
        onFatal(new VmigError('VMIG_ERR_TLS', 'a TLS client connected, but this side was started without --tls-creds', { channel: 'main' }));
      } else if (onPreempt && mainSeen && !preemptSeen) {
        // The postcopy preempt channel: no magic, it starts with a RAM record.
        preemptSeen = true;
        onPreempt(sock, first);
      } else {
        turnAway(sock, `a connection that began 0x${magic.toString(16).padStart(8, '0')}, neither a migration stream (QEVM) nor a multifd channel`);
      }
    };
    void (async () => {
      for (;;) {
        let sock: net.Socket;
        try {
          sock = await listener.accept();
        } catch {
          clearTimeout(mainTimer);
          return; // listener closed
        }
        handle(sock).catch(() => sock.destroy());
      }
    })();
  });
}

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
          'query-status': () => qmpStatus(status, 'destination'),
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
        },
        log,
        settings.control.startsWith('tcp:') ? tls : undefined,
      )
    : undefined;
  if (control) out.event({ event: 'control', address: control.address }, `vmig: control socket on ${control.address}`);
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
  };

  // Pre-fault RAM before anyone connects, so that touching fresh memory is not migration time.
  let ram = settings.ram ? GuestRam.create(settings.ram) : undefined;
  const listener = await listen(uri);

  // Guest RAM here is always created fresh (zero) for this migration.
  const receiver =
    settings.multifdChannels > 0
      ? new MultifdReceiver(settings.multifdChannels, true, { compression: settings.compression, timeoutMs: settings.channelTimeoutMs, uuid: settings.uuid })
      : undefined;
  if (ram) receiver?.setRam(ram);
  let firstError: VmigError | undefined;
  let mainSock: net.Socket | undefined;
  let mainReader: ByteReader | undefined;
  /** The return path's fd, shared with the vCPUs for their page requests (postcopy, plaintext). */
  let returnPathShared: ReturnPathShared | undefined;
  /** Every return-path message is written through this (SHUT, PONG). */
  let rp: ReturnPathWriter | undefined;
  /** Over TLS: the local end the return path is written on (tls-bridge.ts); closed after rp. */
  let rpBridge: TlsBridge | undefined;
  let rejectFatal!: (e: VmigError) => void;
  const fatalError = new Promise<never>((_, reject) => (rejectFatal = reject));
  fatalError.catch(() => {});
  const fatal = (e: VmigError): void => {
    firstError ??= e;
    // Unblock whatever waits: the accept of the main channel, or the load loop (it fails on
    // its next read).
    rejectFatal(e);
    // No return-path write may be in flight when the fd closes.
    rp?.close();
    mainSock?.destroy();
    receiver?.abort(e);
  };
  receiver?.onError(fatal);
  // Cancel like `migrate` does: clean up and report (a second signal kills at once).
  const onSignal = (sig: NodeJS.Signals): void => fatal(new VmigError('VMIG_ERR_CANCELLED', `incoming migration cancelled (${sig})`, { channel: 'main' }));
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  const setStatus = (st: MigrationStatus): void => {
    if (st === status) return;
    status = st;
    control?.event('MIGRATION', { status: st });
  };
  // Said only now: a client may signal as soon as it reads it.
  out.event({ event: 'listening', uri: formatMigrationUri(listener.uri) }, `vmig: listening on ${formatMigrationUri(listener.uri)}`);

  // Postcopy (postcopy-guest.ts); its vCPU state device is this side's `vmig-vcpus`.
  const vcpuState = new VcpuStateDevice(() => ({ writers: 0, writes: 0, pattern: '' }));
  let postcopy: PostcopyGuest | undefined;
  if (settings.postcopy) {
    const notifiers = new MigrationNotifiers();
    notifiers.postcopy.add((e) => {
      if (e.reason === 'INBOUND_LISTEN') setStatus('postcopy-active');
      log.info({ reason: e.reason }, 'postcopy notifier');
      out.event({ event: 'postcopy', reason: e.reason }, undefined);
    });
    postcopy = new PostcopyGuest({
      ram: () => ram,
      vcpuState,
      returnPath: () => returnPathShared,
      preempt: settings.postcopyPreempt,
      sealMultifd: receiver ? () => receiver.seal() : undefined,
      notifiers,
      blocktime: settings.postcopyBlocktime,
      backgroundNice: settings.postcopyBackgroundNice,
      faultSliceUs: settings.postcopyFaultSliceUs,
      preemptReader: settings.postcopyPreemptReader,
      fatal,
      timeoutMs: settings.channelTimeoutMs,
    });
  }
  const onPreempt = settings.postcopyPreempt && postcopy ? postcopy.onPreempt.bind(postcopy) : undefined;

  const stopSignals = (): void => {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  };
  const start = performance.now();
  let loadStart = start;
  let returnPath = false;
  try {
    const main = await Promise.race([acceptChannels(listener, receiver, fatal, onPreempt, settings.channelTimeoutMs, log, tls), fatalError]);
    if (firstError) throw firstError;
    loadStart = performance.now();
    setStatus('active');
    let reader: ByteReader;
    let rpFd: number;
    if (main.tls) {
      // TLS: this thread reads the main stream off the TLS socket; the return path, which the
      // vCPUs write too (page requests, straight on an fd), goes through a local pair.
      reader = new ByteReader(main.sock, { channel: 'main', initial: main.first, idleTimeoutMs: settings.channelTimeoutMs });
      rpBridge = await bridgeTls(main.sock, 'out');
      rpFd = detachFd(rpBridge.sock);
    } else {
      // The main channel reads into a pool of reused buffers (ByteReader.fromFd): from here on
      // `conn` is the connection, and the accepted socket's handle is never used again.
      rpFd = detachFd(main.sock);
      reader = ByteReader.fromFd(rpFd, { channel: 'main', initial: main.first, idleTimeoutMs: settings.channelTimeoutMs });
    }
    returnPathShared = createReturnPath(rpFd, settings.channelTimeoutMs);
    rp = new ReturnPathWriter(returnPathShared);
    const conn = reader.input as net.Socket;
    mainSock = conn;
    mainReader = reader;
    const its = new ItsTableDevice(() => ram);
    // A source with --integrity sends its RAM digests; they are checked whenever they come.
    const integrity = new RamIntegrityDevice(() => ram);
    const devices = new DeviceRegistry().register(new TimerDevice()).register(new GlobalStateDevice()).register(vcpuState).register(its).register(integrity);
    const result = await qemuLoadVmState(reader, {
      ram,
      zeroUnlessLoaded: true,
      createRam: (blocks) => GuestRam.fromStream(blocks, settings.maxRam),
      onRamReady: (r) => {
        ram = r;
        receiver?.setRam(r);
      },
      multifd: receiver,
      expectLegacyDialect: settings.flushAfterEachSection,
      devices,
      onOpenReturnPath: () => (returnPath = true),
      onPing: (v) => rp!.write(encodeRpPong(v)),
      postcopy: postcopy?.incoming,
      failed: () => firstError,
    });
    ram = result.ram;
    // A precopy stream sends every page in its first pass: one that never arrived was sent
    // where this side did not read (multifd channels it was not started for).
    if (!postcopy || !POSTCOPY_SWITCHED.includes(postcopy.incoming.state)) checkEveryPageArrived(ram);
    if (integrity.received) {
      // Nothing may write RAM after the check: multifd is sealed first (a packet with pages
      // after this fails the load), and the main stream is over.
      await receiver?.seal();
      integrity.verify();
    } else if (settings.integrity) {
      throw new VmigError('VMIG_ERR_INTEGRITY', 'this side was started with --integrity, but the source sent no RAM digests (start it with --integrity too)', { channel: 'main', phase: 'load' });
    }
    const loadMs = performance.now() - loadStart;
    // Loaded (the last barrier put every multifd page in place; in postcopy every page is in
    // the received map): tell the source at once (its downtime ends here).
    if (returnPath) rp.write(encodeRpShut(0));
    // Postcopy: this side's vCPUs ran since RUN; they stop and every page is checked against
    // the source's. Precopy: nothing here wrote guest RAM, so the digest is of RAM as loaded.
    const postcopyReport = await postcopy?.finish(ram);
    if (postcopyReport) its.checkTableInRam();
    const digest = digestRam(ram);
    // QEMU appends a JSON description after EOF; read it if the source sends one. Everything
    // is loaded by now: a source that hangs up here (over TLS QEMU resets rather than ends)
    // changes nothing.
    try {
      await readVmDescription(reader);
    } catch (e) {
      if (!(e instanceof EndOfStream) && !(e instanceof VmigError && e.code === 'VMIG_ERR_PEER_CLOSED')) throw e;
    }
    const dumpFile = values['dump-ram'];
    if (typeof dumpFile === 'string' && dumpFile.length > 0) await dumpRam(ram, dumpFile);
    rp.close();
    // Over TLS the return path's last bytes (SHUT) may still be in the local pair: closing
    // it waits until they went into the TLS connection, which then ends (tls-bridge.ts).
    if (rpBridge) await rpBridge.close();
    else conn.end();
    await listener.close();
    await receiver?.close();
    stopSignals();
    setStatus('completed');
    await closeControl();
    const mf = receiver?.totals() ?? { normal: 0, zero: 0, bytes: 0 };
    out.report(
      {
        role: 'destination',
        status: 'completed',
        totalTimeMs: round(performance.now() - start),
        loadTimeMs: round(loadMs),
        machine: result.machine ?? null,
        ram: {
          total: ram.totalBytes,
          normal: result.normalPages + mf.normal,
          duplicate: result.zeroPages + mf.zero,
          multifdBytes: mf.bytes,
          blocks: ram.blocks.map((b) => ({ idstr: b.idstr, size: b.usedLength })),
        },
        multifdChannels: settings.multifdChannels,
        integrity: integrity.verified ? { verified: true, ranges: integrity.ranges } : null,
        ...(postcopyReport ? { postcopy: postcopyReport } : {}),
        devices: {
          'vmig-vcpus': vcpuState.loaded ?? null,
          'vmig-its': its.flushed ? { ...its.flushed, tableInRam: its.tableInRam } : null,
        },
        ramDigest: digest.digest,
        resources: resourceUsage(),
      },
      `vmig: destination loaded ${fmtBytes(ram.totalBytes)} in ${loadMs.toFixed(0)} ms (${result.normalPages + mf.normal} pages, ${result.zeroPages + mf.zero} zero pages), digest ${digest.digest}`,
    );
    return 0;
  } catch (e) {
    let err: VmigError =
      firstError ??
      (e instanceof EndOfStream ? new VmigError('VMIG_ERR_PEER_CLOSED', 'source closed the migration stream early', { channel: 'main', phase: 'load' }) : toVmigError(e, 'VMIG_ERR_CHANNEL'));
    // This side may have run the guest: it cannot go back to the source whole.
    if (postcopy?.incoming.placing) err = postcopySplitError(err);
    await postcopy?.abort();
    if (mainSock && returnPath && !mainSock.destroyed) {
      rp?.write(encodeRpShut(1));
      rp?.close();
      // Over TLS: SHUT goes through the local pair first (tls-bridge.ts).
      if (rpBridge) await rpBridge.close(200);
      await drainAndClose(mainSock, mainReader);
    }
    rp?.close();
    rpBridge?.sock.destroy();
    mainSock?.destroy();
    await listener.close().catch(() => {});
    await receiver?.close(0);
    stopSignals();
    setStatus('failed');
    await closeControl();
    log.error({ error: err.toJSON() }, 'incoming migration failed');
    out.report(
      { role: 'destination', status: 'failed', totalTimeMs: round(performance.now() - start), error: err.toJSON() },
      `vmig: incoming migration failed: ${err.message} [${err.code}]`,
    );
    return 1;
  }
}

/**
 * Half-closes after a failure and reads (discarding) what the source still sends, for a
 * moment: closing with unread bytes would reset the connection, and the source would see
 * "connection reset" instead of the SHUT that says the destination failed.
 */
async function drainAndClose(sock: net.Socket, reader: ByteReader | undefined, ms = 1000): Promise<void> {
  reader?.discard();
  sock.end();
  await new Promise<void>((resolve) => {
    const t = setTimeout(resolve, ms);
    sock.once('close', () => {
      clearTimeout(t);
      resolve();
    });
  });
}

function round(v: number): number {
  return Math.round(v * 1000) / 1000;
}

/** States after the postcopy switch: pages arrived on request or in the background, not all in a first pass. */
const POSTCOPY_SWITCHED: readonly string[] = ['listening', 'running', 'end'];

function checkEveryPageArrived(ram: GuestRam): void {
  const missing = ram.missingPages();
  if (missing.length === 0) return;
  const list = missing.map((m) => `${m.missing} of block '${m.idstr}'`).join(', ');
  throw new StreamError(
    'VMIG_ERR_PAGES_MISSING',
    `the stream ended with pages that never arrived (${list}): the source sent them where this side did not read (does it use multifd? then start this side with --multifd-channels N)`,
    { channel: 'main', phase: 'load' },
  );
}
