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
  encodeRpRecvBitmap,
  encodeRpResumeAck,
  encodeRpShut,
  InvalidArgumentError,
  GlobalStateDevice,
  GuestRam,
  type LatencyBuckets,
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
  type StreamSource,
  StreamError,
  TimerDevice,
  toVmigError,
  VmigError,
  type VmStateDevice,
} from '@vmig/core';
import { MultifdReceiver } from '@vmig/multifd';
import { acceptChannels, acceptRecovery, type MainChannel } from './channel-accept.js';
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
  /**
   * Postcopy recovery: after RUN a broken link pauses the load (postcopy-paused) until
   * recover() and the source's resume, or cancel(), instead of failing it. Default true.
   */
  postcopyRecovery?: boolean;
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
  /** Every status, QEMU's names: after the switch also postcopy-paused and postcopy-recover. */
  status: [MigrationStatus];
  /** A postcopy notifier fired (ADVISE, DISCARD, LISTEN, RUN, END). */
  postcopy: [string];
}

/** The main connection once it is up: the stream's reader and the return path's writer. */
interface MainConnection {
  reader: ByteReader;
  /** The connection (its handle owns the fd from now on). */
  sock: net.Socket;
  returnPath: ReturnPathShared;
  rp: ReturnPathWriter;
  /** Over TLS: the local end the return path is written on (tls-bridge.ts); closed after rp. */
  rpBridge: TlsBridge | undefined;
}

export class IncomingMigration extends EventEmitter<IncomingMigrationEvents> {
  /** The address actually bound (a TCP port 0 is resolved). */
  readonly uri: string;
  status: MigrationStatus = 'setup';
  /** The result once `completed`; rejects with the VmigError otherwise. */
  readonly done: Promise<IncomingResult>;
  private readonly timeoutMs: number;
  private firstError: VmigError | undefined;
  private rejectFatal!: (e: VmigError) => void;
  private readonly fatalError = new Promise<never>((_, reject) => (this.rejectFatal = reject));
  private readonly receiver: MultifdReceiver | undefined;
  private readonly postcopy: PostcopyDestination | undefined;
  private main: MainConnection | undefined;
  private loadRam: GuestRam | undefined;
  /** The source sent OPEN_RETURN_PATH: it waits for SHUT. */
  private returnPathOpen = false;
  /** Postcopy paused: why, and where the recovery's main channel will come from. */
  private paused: { cause: VmigError; main: Promise<MainChannel>; deliver: (m: MainChannel) => void } | undefined;
  /** migrate-recover's listener, while one is open. */
  private recoverListener: Listener | undefined;
  /** Postcopy recoveries that completed (RESUME_ACK sent). */
  private recoveries = 0;
  /** A pause asked for while the load may not be reading (after EOF, waiting for the last pages). */
  private pauseRequest: VmigError | undefined;

  constructor(
    private readonly opts: IncomingOptions,
    private readonly listener: Listener,
  ) {
    super();
    this.uri = formatMigrationUri(listener.uri);
    this.timeoutMs = opts.channelTimeoutMs ?? DEFAULT_CHANNEL_TIMEOUT_MS;
    this.loadRam = opts.ram;
    this.fatalError.catch(() => {});
    const fatal = (e: VmigError): void => this.fatal(e);
    this.receiver = opts.multifdChannels
      ? new MultifdReceiver(opts.multifdChannels, true, { compression: opts.multifdCompression ?? 'none', timeoutMs: this.timeoutMs, uuid: opts.uuid ?? new Uint8Array(16) })
      : undefined;
    if (opts.ram) this.receiver?.setRam(opts.ram);
    this.receiver?.onError(fatal);
    this.postcopy = opts.postcopy ? this.postcopyDestination() : undefined;
    this.done = this.run();
    this.done.catch(() => {});
  }

  /** Guest RAM once it exists: the given one, or the one built from the stream at its setup. */
  get ram(): GuestRam | undefined {
    return this.loadRam;
  }

  /** Bytes each multifd channel received so far. */
  multifdChannelBytes(): number[] {
    return this.receiver?.channelTotals().map((t) => t.bytes) ?? [];
  }

  /** Postcopy so far: requests, pages placed (undefined without postcopy). */
  postcopyStats(): { postcopyRequests: number; postcopyPages: number } | undefined {
    return this.postcopy?.incoming.stats();
  }

  /** Fault latencies of this side's vCPUs so far (postcopy with blocktime), counted in the buckets of `boundsMs`. */
  faultLatencyBuckets(boundsMs: readonly number[]): LatencyBuckets | undefined {
    return this.postcopy?.incoming.faultLatencyBuckets(boundsMs);
  }

  /**
   * Whether the guest runs here (QEMU's RunState `running` against `inmigrate`): once the
   * migration completed, or from postcopy's RUN on, paused or not (the vCPUs keep running
   * while the link is down; only those that fault wait).
   */
  get guestRunning(): boolean {
    const pc = this.postcopy?.incoming.state;
    return this.status === 'completed' || pc === 'running' || pc === 'end';
  }

  /** Why postcopy is paused (status postcopy-paused or postcopy-recover), if it is. */
  get pauseCause(): VmigError | undefined {
    return this.paused?.cause;
  }

  /**
   * migrate-pause: after the postcopy switch, breaks the main connection as a network
   * failure would; the migration goes to postcopy-paused (QEMU's way to test recovery).
   */
  pause(): void {
    if (this.status !== 'postcopy-active') throw new InvalidArgumentError(`migrate-pause is only possible in postcopy-active (now ${this.status})`);
    this.requestPause(new VmigError('VMIG_ERR_CHANNEL', 'paused by migrate-pause', { channel: 'main', phase: 'postcopy' }));
  }

  /** The connections are given up: the load pauses (loadvm.ts), wherever it is. */
  private requestPause(e: VmigError): void {
    this.pauseRequest ??= e;
    this.main?.reader.fail(e);
  }

  /**
   * migrate-recover: while postcopy is paused, listens on `uri` for the source's
   * `migrate URI resume=true`. Resolves with the address bound (a TCP port 0 resolved). A
   * recovery that fails (the source never comes, or goes again) leaves the migration paused,
   * and migrate-recover may be given again.
   */
  async recover(uri: string | MigrationUri): Promise<string> {
    if (this.status !== 'postcopy-paused') throw new InvalidArgumentError(`migrate-recover is only possible in postcopy-paused (now ${this.status})`);
    const paused = this.paused!;
    const target = typeof uri === 'string' ? parseMigrationUri(uri) : uri;
    await this.recoverListener?.close();
    const listener = await listen(target);
    this.recoverListener = listener;
    const o = this.opts;
    const onPreempt = o.postcopyPreempt && this.postcopy ? this.postcopy.onPreempt.bind(this.postcopy) : undefined;
    acceptRecovery(listener, onPreempt, (e) => this.fatal(e), this.timeoutMs, o.log ?? silentLogger, o.tls).then(
      (m) => paused.deliver(m),
      () => {},
    );
    o.log?.info({ uri: formatMigrationUri(listener.uri) }, 'postcopy recovery: listening for the source (migrate URI resume=true)');
    return formatMigrationUri(listener.uri);
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
    this.main?.rp.close();
    this.main?.sock.destroy();
    this.receiver?.abort(e);
    void this.recoverListener?.close();
  }

  private postcopyDestination(): PostcopyDestination {
    const o = this.opts;
    const notifiers = o.notifiers ?? new MigrationNotifiers();
    notifiers.postcopy.add((e) => {
      if (e.reason === 'INBOUND_LISTEN') this.setStatus('postcopy-active');
      o.log?.info({ reason: e.reason }, 'postcopy notifier');
      this.emit('postcopy', e.reason);
    });
    const receiver = this.receiver;
    return new PostcopyDestination({
      ram: () => this.loadRam,
      guest: o.guest,
      returnPath: () => this.main?.returnPath,
      preempt: o.postcopyPreempt ?? false,
      sealMultifd: receiver ? () => receiver.seal() : undefined,
      notifiers,
      blocktime: o.postcopyBlocktime ?? false,
      backgroundNice: o.postcopyBackgroundNice ?? defaultBackgroundNice(o.tls),
      faultSliceUs: o.postcopyFaultSliceUs ?? DEFAULT_POSTCOPY_FAULT_SLICE_US,
      preemptReader: o.postcopyPreemptReader ?? 'vcpu',
      fatal: (e) => this.fatal(e),
      // The preempt connection broke after RUN: the main one is given up too, which pauses the load.
      pause: (e) => this.requestPause(e),
      timeoutMs: this.timeoutMs,
    });
  }

  private async run(): Promise<IncomingResult> {
    const start = performance.now();
    try {
      const accepted = await this.acceptMain();
      const loadStart = performance.now();
      this.setStatus('active');
      this.main = await this.openMain(accepted);
      this.opts.log?.debug({ channel: 'main', tls: accepted.tls }, 'loading the main stream; return path open');
      const loaded = await this.load(this.main);
      const loadTimeMs = performance.now() - loadStart;
      const postcopy = await this.complete(this.main, loaded.ram);
      this.setStatus('completed');
      const mf = this.receiver?.totals() ?? { normal: 0, zero: 0, bytes: 0 };
      return {
        status: 'completed',
        totalTimeMs: performance.now() - start,
        loadTimeMs,
        machine: loaded.machine,
        ram: loaded.ram,
        pages: { normal: loaded.normalPages + mf.normal, zero: loaded.zeroPages + mf.zero, multifdBytes: mf.bytes },
        integrity: loaded.integrity,
        ...(postcopy ? { postcopy } : {}),
      };
    } catch (e) {
      throw await this.failed(e);
    }
  }

  /** Connections until the main channel (channel-accept.ts), or the first failure. */
  private async acceptMain(): Promise<MainChannel> {
    const o = this.opts;
    const onPreempt = o.postcopyPreempt && this.postcopy ? this.postcopy.onPreempt.bind(this.postcopy) : undefined;
    const main = await Promise.race([acceptChannels(this.listener, this.receiver, (e) => this.fatal(e), onPreempt, this.timeoutMs, o.log ?? silentLogger, o.tls), this.fatalError]);
    if (this.firstError) throw this.firstError;
    return main;
  }

  /**
   * The main stream's reader and the return path's writer on the main connection. Recovery
   * gives the return path the vCPUs write on already: it goes on over the new connection.
   */
  private async openMain(main: MainChannel, existing?: MainConnection): Promise<MainConnection> {
    let reader: ByteReader;
    let rpFd: number;
    let rpBridge: TlsBridge | undefined;
    if (main.tls) {
      // TLS: this thread reads the main stream off the TLS socket; the return path, which
      // the vCPUs write too (page requests, straight on an fd), goes through a local pair.
      reader = new ByteReader(main.sock, { channel: 'main', initial: main.first, idleTimeoutMs: this.timeoutMs });
      rpBridge = await bridgeTls(main.sock, 'out');
      rpFd = detachFd(rpBridge.sock);
    } else {
      // The main channel reads into a pool of reused buffers (ByteReader.fromFd): from here
      // on `reader.input` is the connection, and the accepted socket's handle is never used again.
      rpFd = detachFd(main.sock);
      reader = ByteReader.fromFd(rpFd, { channel: 'main', initial: main.first, idleTimeoutMs: this.timeoutMs });
    }
    if (existing) {
      existing.rp.reopen(rpFd);
      return { reader, sock: reader.input as net.Socket, returnPath: existing.returnPath, rp: existing.rp, rpBridge };
    }
    const returnPath = createReturnPath(rpFd, this.timeoutMs);
    return { reader, sock: reader.input as net.Socket, returnPath, rp: new ReturnPathWriter(returnPath), rpBridge };
  }

  /**
   * Postcopy paused (QEMU's postcopy_pause_incoming): every connection is given up, the guest
   * runs on (a vCPU that faults waits, its request held), and the load waits for a recovery
   * connection (migrate-recover). Resolves with its stream; rejects if the migration fails
   * or is cancelled meanwhile.
   */
  private async postcopyPaused(cause: VmigError): Promise<StreamSource> {
    if (this.firstError) throw this.firstError;
    const log = this.opts.log ?? silentLogger;
    const old = this.main!;
    this.pauseRequest = undefined;
    // No request leaves until the source's RESUME_ACK; the fd is let go before it closes.
    old.rp.pause();
    old.rpBridge?.sock.destroy();
    old.sock.destroy();
    await this.listener.close();
    await this.postcopy!.pause();
    for (;;) {
      await this.recoverListener?.close();
      this.recoverListener = undefined;
      let deliver!: (m: MainChannel) => void;
      const main = new Promise<MainChannel>((r) => (deliver = r));
      this.paused = { cause, main, deliver };
      if (this.firstError) throw this.firstError;
      log.warn({ error: cause.toJSON() }, 'postcopy paused: the guest runs here and waits for missing pages; recover with migrate-recover URI here, then migrate URI resume=true on the source');
      this.setStatus('postcopy-paused');
      const accepted = await Promise.race([main, this.fatalError]);
      try {
        this.main = await this.openMain(accepted, old);
      } catch (e) {
        accepted.sock.destroy();
        cause = toVmigError(e, 'VMIG_ERR_CHANNEL');
        continue;
      }
      this.setStatus('postcopy-recover');
      return this.main.reader;
    }
  }

  /** MIG_CMD_RECV_BITMAP: the block's received bitmap on the return path (recovering). */
  private sendRecvBitmap(idstr: string): void {
    const ram = this.loadRam!;
    const idx = ram.blocks.findIndex((b) => b.idstr === idstr);
    const placer = this.postcopy!.incoming.placer!;
    if (!this.main!.rp.write(encodeRpRecvBitmap(idstr, ram.blocks[idx]!.pages, placer.receivedIn(idx)))) {
      throw new VmigError('VMIG_ERR_PEER_CLOSED', 'postcopy recovery: the received bitmap could not be sent', { channel: 'return-path', phase: 'postcopy recovery' });
    }
  }

  /** MIG_CMD_POSTCOPY_RESUME (loadvm_postcopy_handle_resume): RESUME_ACK, then requests flow again. */
  private async resumePostcopy(): Promise<void> {
    const pc = this.postcopy!;
    // The source reconnected the preempt channel before it resumed (postcopy_do_resume).
    if (this.opts.postcopyPreempt) await pc.preemptAttached(this.timeoutMs);
    const rp = this.main!.rp;
    if (!rp.write(encodeRpResumeAck())) throw new VmigError('VMIG_ERR_PEER_CLOSED', 'postcopy recovery: RESUME_ACK could not be sent', { channel: 'return-path', phase: 'postcopy recovery' });
    rp.resume();
    const again = pc.incoming.placer!.requestAgain();
    this.recoveries++;
    this.paused = undefined;
    await this.recoverListener?.close();
    this.recoverListener = undefined;
    this.opts.log?.info({ requestedAgain: again, recoveries: this.recoveries }, 'postcopy resumed');
    this.setStatus('postcopy-active');
  }

  /** qemu_loadvm_state, then what a complete load must satisfy (every page, the digests). */
  private async load(main: MainConnection): Promise<{ ram: GuestRam; machine: string | null; normalPages: number; zeroPages: number; integrity: IncomingResult['integrity'] }> {
    const o = this.opts;
    const receiver = this.receiver;
    // A source with integrity on sends its RAM digests; they are checked whenever they come.
    const integrity = new RamIntegrityDevice(() => this.loadRam);
    const devices = new DeviceRegistry().register(new TimerDevice()).register(new GlobalStateDevice()).register(integrity);
    for (const d of o.devices ?? []) devices.register(d);
    const log = o.log ?? silentLogger;
    let barriers = 0;
    const result = await qemuLoadVmState(main.reader, {
      ram: o.ram,
      zeroUnlessLoaded: true,
      createRam: (blocks) => GuestRam.fromStream(blocks, o.maxRam ?? DEFAULT_MAX_RAM),
      onRamReady: (r) => {
        this.loadRam = r;
        receiver?.setRam(r);
        log.debug({ blocks: r.blocks.map((b) => ({ idstr: b.idstr, size: b.usedLength })), fromStream: o.ram === undefined }, 'RAM ready (setup section read)');
      },
      multifd: receiver && {
        sync: async () => {
          const t0 = performance.now();
          await receiver.sync();
          log.debug({ channel: 'multifd', barrier: ++barriers, waitedMs: performance.now() - t0 }, 'multifd barrier: every channel sent its SYNC; released');
        },
        setDialect: (legacy: boolean) => {
          log.debug({ channel: 'multifd', dialect: legacy ? '7.2' : 'modern' }, 'multifd barrier dialect read off the stream');
          receiver.setDialect(legacy);
        },
      },
      expectLegacyDialect: o.multifdFlushAfterEachSection ?? false,
      devices,
      onOpenReturnPath: () => (this.returnPathOpen = true),
      onPing: (v) => this.main!.rp.write(encodeRpPong(v)),
      postcopy: this.postcopy?.incoming,
      failed: () => this.firstError ?? this.pauseRequest,
      ...(this.postcopy && o.postcopyRecovery !== false
        ? {
            onPostcopyPause: (cause: VmigError) => this.postcopyPaused(cause),
            onRecvBitmap: (idstr: string) => this.sendRecvBitmap(idstr),
            onPostcopyResume: () => this.resumePostcopy(),
          }
        : {}),
    });
    const ram = result.ram;
    this.loadRam = ram;
    // A precopy stream sends every page in its first pass: one that never arrived was sent
    // where this side did not read (multifd channels it was not started for).
    if (!this.postcopy || !POSTCOPY_SWITCHED.includes(this.postcopy.incoming.state)) checkEveryPageArrived(ram);
    log.debug({ normalPages: result.normalPages, zeroPages: result.zeroPages, machine: result.machine, barriers }, 'stream loaded (EOF)');
    if (integrity.received) {
      // Nothing may write RAM after the check: multifd is sealed first (a packet with pages
      // after this fails the load), and the main stream is over.
      await receiver?.seal();
      integrity.verify();
    } else if (o.integrity) {
      throw new VmigError('VMIG_ERR_INTEGRITY', 'this side asked for integrity (--integrity), but the source sent no RAM digests (start it with --integrity too)', { channel: 'main', phase: 'load' });
    }
    return {
      ram,
      machine: result.machine ?? null,
      normalPages: result.normalPages,
      zeroPages: result.zeroPages,
      integrity: integrity.verified ? { verified: true, ranges: integrity.ranges } : null,
    };
  }

  /** Loaded: SHUT, the guest here stops (postcopy), the source's description, every channel closed. */
  private async complete(main: MainConnection, ram: GuestRam): Promise<Record<string, unknown> | undefined> {
    // The last barrier put every multifd page in place; in postcopy every page is in the
    // received map: tell the source at once (its downtime ends here).
    if (this.returnPathOpen) main.rp.write(encodeRpShut(0));
    this.opts.log?.debug({ channel: 'return-path', returnPath: this.returnPathOpen }, 'loaded; SHUT sent');
    const finished = await this.postcopy?.finish(ram);
    const postcopy = finished && { ...finished, recoveries: this.recoveries };
    // QEMU appends a JSON description after EOF; read it if the source sends one. Everything
    // is loaded by now: a source that hangs up here (over TLS QEMU resets rather than ends)
    // changes nothing.
    try {
      await readVmDescription(main.reader);
    } catch (e) {
      if (!(e instanceof EndOfStream) && !(e instanceof VmigError && e.code === 'VMIG_ERR_PEER_CLOSED')) throw e;
    }
    main.rp.close();
    // Over TLS the return path's last bytes (SHUT) may still be in the local pair: closing
    // it waits until they went into the TLS connection, which then ends (tls-bridge.ts).
    if (main.rpBridge) await main.rpBridge.close();
    else main.sock.end();
    await this.listener.close();
    await this.recoverListener?.close();
    await this.receiver?.close();
    return postcopy;
  }

  /** Any failure: SHUT(1) if the source listens for it, every thread and channel closed. */
  private async failed(e: unknown): Promise<VmigError> {
    let err: VmigError =
      this.firstError ??
      (e instanceof EndOfStream ? new VmigError('VMIG_ERR_PEER_CLOSED', 'source closed the migration stream early', { channel: 'main', phase: 'load' }) : toVmigError(e, 'VMIG_ERR_CHANNEL'));
    // This side may have run the guest: it cannot go back to the source whole.
    if (this.postcopy?.incoming.placing) err = postcopySplitError(err);
    await this.postcopy?.abort();
    const main = this.main;
    if (main && this.returnPathOpen && !main.sock.destroyed) {
      main.rp.write(encodeRpShut(1));
      main.rp.close();
      // Over TLS: SHUT goes through the local pair first (tls-bridge.ts).
      if (main.rpBridge) await main.rpBridge.close(200);
      await drainAndClose(main.sock, main.reader);
    }
    main?.rp.close();
    main?.rpBridge?.sock.destroy();
    main?.sock.destroy();
    await this.listener.close().catch(() => {});
    await this.recoverListener?.close().catch(() => {});
    await this.receiver?.close(0);
    this.setStatus('failed');
    this.opts.log?.error({ error: err.toJSON() }, 'incoming migration failed');
    return err;
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
