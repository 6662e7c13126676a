/**
 * incoming(): the destination of a live migration (QEMU's `-incoming` / `migrate-incoming`).
 * Listens, accepts the channels (channel-accept.ts), loads one migration stream into guest
 * RAM (core's qemuLoadVmState), answers on the return path, runs the application's guest
 * after a postcopy switch (postcopy-destination.ts), and closes every channel and thread
 * whatever the outcome.
 */
import { EventEmitter } from 'node:events';
import type net from 'node:net';
import { bridgeTls, ByteReader, detachFd, formatMigrationUri, listen, type Listener, type MigrationUri, parseMigrationUri, type TlsBridge, type TlsOptions } from '@vmig/channel';
import {
  createReturnPath,
  DEFAULT_CHANNEL_TIMEOUT_MS,
  DeviceRegistry,
  EndOfStream,
  encodeRpPong,
  encodeRpShut,
  GlobalStateDevice,
  GuestRam,
  type Logger,
  MigrationNotifiers,
  type MigrationStatus,
  postcopySplitError,
  qemuLoadVmState,
  RamIntegrityDevice,
  readVmDescription,
  ReturnPathWriter,
  type ReturnPathShared,
  silentLogger,
  StreamError,
  TimerDevice,
  toVmigError,
  VmigError,
  type VmStateDevice,
} from '@vmig/core';
import { MultifdReceiver } from '@vmig/multifd';
import { acceptChannels } from './channel-accept.js';
import type { IncomingGuest } from './incoming-guest.js';
import { checkMultifdOptions, DEFAULT_POSTCOPY_FAULT_SLICE_US, defaultBackgroundNice, type MultifdOptions } from './options.js';
import { PostcopyDestination, type PreemptReaderChoice } from './postcopy-destination.js';

/** With no `ram`, RAM is built from the stream up to this much unless `maxRam` says otherwise. */
export const DEFAULT_MAX_RAM = 64 * 2 ** 30;

export interface IncomingOptions extends MultifdOptions {
  /** Where to listen: `tcp:HOST:PORT` (port 0: any free one, see `uri`) or `unix:PATH`. */
  uri: string | MigrationUri;
  /** Guest RAM to load into (zero); absent: built from the stream's block list. */
  ram?: GuestRam;
  /** The most RAM a stream may make this side allocate (bytes), when `ram` is absent. */
  maxRam?: number;
  /** The application's devices, loaded from the sections of the same name. */
  devices?: readonly VmStateDevice[];
  /** The postcopy-ram capability: the guest may run here before every page arrived. */
  postcopy?: boolean;
  postcopyPreempt?: boolean;
  /** What runs here after a postcopy switch; none: pages are only placed. */
  guest?: IncomingGuest;
  /** Time the vCPUs' faults (QEMU's postcopy-blocktime). */
  postcopyBlocktime?: boolean;
  /** With preempt: nice value of the load thread after RUN; 0: unchanged. Default 19 (0 with TLS). */
  postcopyBackgroundNice?: number;
  /** With preempt: the CPU slice (us) asked for the preempt channel's thread; 0: the kernel's. Default 100. */
  postcopyFaultSliceUs?: number;
  /** With preempt: whether a faulting vCPU may read the preempt channel itself. Default 'vcpu'. */
  postcopyPreemptReader?: PreemptReaderChoice;
  /** Require the source's RAM digests (it runs with `integrity` too) and check them. */
  integrity?: boolean;
  tls?: TlsOptions;
  /** The longest any wait on the source may last (ms). Default 30 s. */
  channelTimeoutMs?: number;
  /** Postcopy notifier chain (and the others) for the application's hooks. */
  notifiers?: MigrationNotifiers;
  log?: Logger;
}

export interface IncomingResult {
  status: 'completed';
  totalTimeMs: number;
  loadTimeMs: number;
  /** The machine type the source named in its configuration section. */
  machine: string | null;
  /** The loaded RAM (the given one, or the one built from the stream). */
  ram: GuestRam;
  pages: { normal: number; zero: number; multifdBytes: number };
  integrity: { verified: true; ranges: number } | null;
  /** After a postcopy switch: its figures, and what the guest reported. */
  postcopy?: Record<string, unknown>;
}

export interface IncomingMigrationEvents {
  status: [MigrationStatus];
  /** A postcopy notifier fired (ADVISE, DISCARD, LISTEN, RUN, END). */
  postcopy: [string];
}

export class IncomingMigration extends EventEmitter<IncomingMigrationEvents> {
  /** The address actually bound (a TCP port 0 is resolved). */
  readonly uri: string;
  status: MigrationStatus = 'setup';
  /** The result once `completed`; rejects with the VmigError otherwise. */
  readonly done: Promise<IncomingResult>;
  private firstError: VmigError | undefined;
  private rejectFatal!: (e: VmigError) => void;
  private readonly fatalError = new Promise<never>((_, reject) => (this.rejectFatal = reject));
  private mainSock: net.Socket | undefined;
  private rp: ReturnPathWriter | undefined;
  private receiver: MultifdReceiver | undefined;
  private loadRam: GuestRam | undefined;

  constructor(
    private readonly opts: IncomingOptions,
    private readonly listener: Listener,
  ) {
    super();
    this.uri = formatMigrationUri(listener.uri);
    this.fatalError.catch(() => {});
    this.done = this.run();
    this.done.catch(() => {});
  }

  /** Guest RAM once it exists: the given one, or the one built from the stream at its setup. */
  get ram(): GuestRam | undefined {
    return this.loadRam;
  }

  /** Ends the incoming migration with VMIG_ERR_CANCELLED (cleans up, as a failure does). */
  cancel(reason = 'cancelled'): void {
    this.fatal(new VmigError('VMIG_ERR_CANCELLED', `incoming migration ${reason}`, { channel: 'main' }));
  }

  private setStatus(st: MigrationStatus): void {
    if (st === this.status) return;
    this.status = st;
    this.emit('status', st);
  }

  /** The first failure anywhere: unblocks whatever waits, and the migration fails with it. */
  private fatal(e: VmigError): void {
    this.firstError ??= e;
    // The accept of the main channel, or the load loop (it fails on its next read).
    this.rejectFatal(e);
    // No return-path write may be in flight when the fd closes.
    this.rp?.close();
    this.mainSock?.destroy();
    this.receiver?.abort(e);
  }

  private async run(): Promise<IncomingResult> {
    const o = this.opts;
    const timeoutMs = o.channelTimeoutMs ?? DEFAULT_CHANNEL_TIMEOUT_MS;
    const fatal = (e: VmigError): void => this.fatal(e);
    let ram = o.ram;
    this.loadRam = ram;
    const receiver = o.multifdChannels
      ? new MultifdReceiver(o.multifdChannels, true, { compression: o.multifdCompression ?? 'none', timeoutMs, uuid: o.uuid ?? new Uint8Array(16) })
      : undefined;
    this.receiver = receiver;
    if (ram) receiver?.setRam(ram);
    receiver?.onError(fatal);
    let mainReader: ByteReader | undefined;
    /** The return path's fd, shared with the vCPUs for their page requests (postcopy, plaintext). */
    let returnPathShared: ReturnPathShared | undefined;
    /** Over TLS: the local end the return path is written on (tls-bridge.ts); closed after rp. */
    let rpBridge: TlsBridge | undefined;
    const notifiers = o.notifiers ?? new MigrationNotifiers();
    let postcopy: PostcopyDestination | undefined;
    if (o.postcopy) {
      notifiers.postcopy.add((e) => {
        if (e.reason === 'INBOUND_LISTEN') this.setStatus('postcopy-active');
        o.log?.info({ reason: e.reason }, 'postcopy notifier');
        this.emit('postcopy', e.reason);
      });
      postcopy = new PostcopyDestination({
        ram: () => ram,
        guest: o.guest,
        returnPath: () => returnPathShared,
        preempt: o.postcopyPreempt ?? false,
        sealMultifd: receiver ? () => receiver.seal() : undefined,
        notifiers,
        blocktime: o.postcopyBlocktime ?? false,
        backgroundNice: o.postcopyBackgroundNice ?? defaultBackgroundNice(o.tls),
        faultSliceUs: o.postcopyFaultSliceUs ?? DEFAULT_POSTCOPY_FAULT_SLICE_US,
        preemptReader: o.postcopyPreemptReader ?? 'vcpu',
        fatal,
        timeoutMs,
      });
    }
    const onPreempt = o.postcopyPreempt && postcopy ? postcopy.onPreempt.bind(postcopy) : undefined;
    const start = performance.now();
    let loadStart = start;
    let returnPath = false;
    try {
      const main = await Promise.race([acceptChannels(this.listener, receiver, fatal, onPreempt, timeoutMs, o.log ?? silentLogger, o.tls), this.fatalError]);
      if (this.firstError) throw this.firstError;
      loadStart = performance.now();
      this.setStatus('active');
      let rpFd: number;
      if (main.tls) {
        // TLS: this thread reads the main stream off the TLS socket; the return path, which
        // the vCPUs write too (page requests, straight on an fd), goes through a local pair.
        mainReader = new ByteReader(main.sock, { channel: 'main', initial: main.first, idleTimeoutMs: timeoutMs });
        rpBridge = await bridgeTls(main.sock, 'out');
        rpFd = detachFd(rpBridge.sock);
      } else {
        // The main channel reads into a pool of reused buffers (ByteReader.fromFd): from here
        // on `conn` is the connection, and the accepted socket's handle is never used again.
        rpFd = detachFd(main.sock);
        mainReader = ByteReader.fromFd(rpFd, { channel: 'main', initial: main.first, idleTimeoutMs: timeoutMs });
      }
      returnPathShared = createReturnPath(rpFd, timeoutMs);
      const rp = new ReturnPathWriter(returnPathShared);
      this.rp = rp;
      const reader = mainReader;
      const conn = reader.input as net.Socket;
      this.mainSock = conn;
      // A source with integrity on sends its RAM digests; they are checked whenever they come.
      const integrity = new RamIntegrityDevice(() => ram);
      const devices = new DeviceRegistry().register(new TimerDevice()).register(new GlobalStateDevice()).register(integrity);
      for (const d of o.devices ?? []) devices.register(d);
      const result = await qemuLoadVmState(reader, {
        ram,
        zeroUnlessLoaded: true,
        createRam: (blocks) => GuestRam.fromStream(blocks, o.maxRam ?? DEFAULT_MAX_RAM),
        onRamReady: (r) => {
          ram = r;
          this.loadRam = r;
          receiver?.setRam(r);
        },
        multifd: receiver,
        expectLegacyDialect: o.multifdFlushAfterEachSection ?? false,
        devices,
        onOpenReturnPath: () => (returnPath = true),
        onPing: (v) => rp.write(encodeRpPong(v)),
        postcopy: postcopy?.incoming,
        failed: () => this.firstError,
      });
      const loaded = result.ram;
      ram = loaded;
      // A precopy stream sends every page in its first pass: one that never arrived was sent
      // where this side did not read (multifd channels it was not started for).
      if (!postcopy || !POSTCOPY_SWITCHED.includes(postcopy.incoming.state)) checkEveryPageArrived(loaded);
      if (integrity.received) {
        // Nothing may write RAM after the check: multifd is sealed first (a packet with pages
        // after this fails the load), and the main stream is over.
        await receiver?.seal();
        integrity.verify();
      } else if (o.integrity) {
        throw new VmigError('VMIG_ERR_INTEGRITY', 'this side asked for integrity (--integrity), but the source sent no RAM digests (start it with --integrity too)', { channel: 'main', phase: 'load' });
      }
      const loadMs = performance.now() - loadStart;
      // Loaded (the last barrier put every multifd page in place; in postcopy every page is in
      // the received map): tell the source at once (its downtime ends here).
      if (returnPath) rp.write(encodeRpShut(0));
      // Postcopy: the guest ran here since RUN; it stops now.
      const postcopyReport = await postcopy?.finish(loaded);
      // QEMU appends a JSON description after EOF; read it if the source sends one. Everything
      // is loaded by now: a source that hangs up here (over TLS QEMU resets rather than ends)
      // changes nothing.
      try {
        await readVmDescription(reader);
      } catch (e) {
        if (!(e instanceof EndOfStream) && !(e instanceof VmigError && e.code === 'VMIG_ERR_PEER_CLOSED')) throw e;
      }
      rp.close();
      // Over TLS the return path's last bytes (SHUT) may still be in the local pair: closing
      // it waits until they went into the TLS connection, which then ends (tls-bridge.ts).
      if (rpBridge) await rpBridge.close();
      else conn.end();
      await this.listener.close();
      await receiver?.close();
      this.setStatus('completed');
      const mf = receiver?.totals() ?? { normal: 0, zero: 0, bytes: 0 };
      return {
        status: 'completed',
        totalTimeMs: performance.now() - start,
        loadTimeMs: loadMs,
        machine: result.machine ?? null,
        ram: loaded,
        pages: { normal: result.normalPages + mf.normal, zero: result.zeroPages + mf.zero, multifdBytes: mf.bytes },
        integrity: integrity.verified ? { verified: true, ranges: integrity.ranges } : null,
        ...(postcopyReport ? { postcopy: postcopyReport } : {}),
      };
    } catch (e) {
      let err: VmigError =
        this.firstError ??
        (e instanceof EndOfStream ? new VmigError('VMIG_ERR_PEER_CLOSED', 'source closed the migration stream early', { channel: 'main', phase: 'load' }) : toVmigError(e, 'VMIG_ERR_CHANNEL'));
      // This side may have run the guest: it cannot go back to the source whole.
      if (postcopy?.incoming.placing) err = postcopySplitError(err);
      await postcopy?.abort();
      const mainSock = this.mainSock;
      if (mainSock && returnPath && !mainSock.destroyed) {
        this.rp?.write(encodeRpShut(1));
        this.rp?.close();
        // Over TLS: SHUT goes through the local pair first (tls-bridge.ts).
        if (rpBridge) await rpBridge.close(200);
        await drainAndClose(mainSock, mainReader);
      }
      this.rp?.close();
      rpBridge?.sock.destroy();
      mainSock?.destroy();
      await this.listener.close().catch(() => {});
      await receiver?.close(0);
      this.setStatus('failed');
      o.log?.error({ error: err.toJSON() }, 'incoming migration failed');
      throw err;
    }
  }
}

/**
 * Listens on `uri` and waits for one incoming migration (QEMU's `migrate-incoming`). Resolves
 * once the listener is bound (`uri` then says where); `done` settles with the outcome.
 */
export async function incoming(opts: IncomingOptions): Promise<IncomingMigration> {
  checkMultifdOptions(opts);
  const uri = typeof opts.uri === 'string' ? parseMigrationUri(opts.uri) : opts.uri;
  const listener = await listen(uri);
  return new IncomingMigration(opts, listener);
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
