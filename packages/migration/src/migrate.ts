/**
 * migrate(): the source of a live migration (QEMU's `migrate` command and migration.c's
 * outgoing side). Connects the channels (main, multifd, with TLS if asked), starts the
 * return path's thread, runs core's migration thread over the application's RAM, devices
 * and vCPUs, and cleans up every channel and thread whatever the outcome.
 *
 * The application keeps its vCPUs: `vm.stop()` at the switchover (resolve once every writer
 * is parked), `vm.resume()` after a failure or cancel before the postcopy switch.
 */
import { EventEmitter } from 'node:events';
import type net from 'node:net';
import { BufferedWriter, bridgeTls, connect, formatMigrationUri, type MigrationUri, parseMigrationUri, tlsConnect, type TlsOptions } from '@vmig/channel';
import {
  DEFAULT_CHANNEL_TIMEOUT_MS,
  DEFAULT_PARAMS,
  DeviceRegistry,
  GlobalStateDevice,
  type GuestRam,
  InvalidArgumentError,
  libc,
  type Logger,
  type MigrationInfo,
  MigrationNotifiers,
  type MigrationParams,
  MigrationStats,
  MigrationThread,
  RamIntegrityDevice,
  type RuntimeParams,
  silentLogger,
  TimerDevice,
  toVmigError,
  VmigError,
  type VmRunControl,
  type VmStateDevice,
} from '@vmig/core';
import { MultifdSender } from '@vmig/multifd';
import { checkMigrateOptions, DEFAULT_POSTCOPY_FAULT_SLICE_US, defaultBackgroundNice, type MultifdOptions } from './options.js';
import { ReturnPathThread } from './return-path-thread.js';
import { lowerBackgroundThreads, restoreThreads, type PriorityChange } from './thread-priority.js';

export interface MigrateOptions extends Partial<MigrationParams>, MultifdOptions {
  /** Where the destination listens: `tcp:HOST:PORT` or `unix:PATH`. */
  uri: string | MigrationUri;
  ram: GuestRam;
  /** The application's vCPUs: stopped at the switchover, resumed after a failure or cancel. */
  vm: VmRunControl;
  /** The application's devices, sent after the RAM (a name, an instance, a version, save and load). */
  devices?: readonly VmStateDevice[];
  /** The postcopy-preempt capability: requested pages on a channel of their own. */
  postcopyPreempt?: boolean;
  /** With preempt: the CPU slice (us) asked for the thread that serves requests; 0: the kernel's. Default 100. */
  postcopyFaultSliceUs?: number;
  /** With preempt: the nice value for the background stream after the switch; 0: unchanged. Default 19 (0 with TLS). */
  postcopyBackgroundNice?: number;
  /**
   * Postcopy recovery: after the switch a broken link pauses the migration (postcopy-paused)
   * until resume() or cancel(), instead of failing it. Default true; off, such a failure
   * fails the migration (the guest is split: nothing can run it then).
   */
  postcopyRecovery?: boolean;
  /** RAM digests per MiB sent with the device state, checked by the destination (vmig's own). */
  integrity?: boolean;
  tls?: TlsOptions;
  /** The longest any wait on the destination or the vCPUs may last (ms). Default 30 s. */
  channelTimeoutMs?: number;
  /** Notifier chains (precopy, postcopy, state changes); the application's hooks. */
  notifiers?: MigrationNotifiers;
  log?: Logger;
}

export interface OutgoingMigrationEvents {
  status: [MigrationInfo];
  /** About once a second while iterating. */
  progress: [MigrationInfo];
}

/** How the source scheduled its threads after a postcopy switch with preempt. */
export interface PostcopyScheduling {
  backgroundNice: number | null;
  faultSliceUs: number | null;
}

/** The main connection, its stream and its return path's thread (one per connection: a recovery makes another). */
interface Link {
  main: net.Socket;
  /** `main`'s TCP socket (under TLS, the one beneath it): its send queue is measured. */
  raw: net.Socket;
  /** Where the return-path thread reads: `main`, or over TLS a local pair (tls-bridge.ts). */
  rpSock: net.Socket;
  sink: BufferedWriter;
  rp: ReturnPathThread;
}

/** Returned by migrate(): the running migration. */
export class OutgoingMigration extends EventEmitter<OutgoingMigrationEvents> {
  readonly stats = new MigrationStats();
  /**
   * The final query-migrate info, whatever the outcome (the `status` says it: `completed`,
   * `failed`, `cancelled`, with `error`).
   */
  readonly result: Promise<MigrationInfo>;
  /** The final info once `completed`; rejects with the VmigError otherwise. */
  readonly done: Promise<MigrationInfo>;
  /** Set after a postcopy switch with preempt. */
  scheduling: PostcopyScheduling | undefined;
  private mig: MigrationThread | undefined;
  private multifd: MultifdSender | undefined;
  private readonly abort = new AbortController();
  private readonly params: MigrationParams;
  private readonly target: MigrationUri;

  constructor(private readonly opts: MigrateOptions) {
    super();
    checkMigrateOptions(opts);
    // A bad URI is a bad option: thrown here, like the others.
    this.target = typeof opts.uri === 'string' ? parseMigrationUri(opts.uri) : opts.uri;
    this.params = { ...DEFAULT_PARAMS, ...pickParams(opts) };
    if (opts.multifdChannels && opts.zeroPageDetection === undefined && !opts.multifdFlushAfterEachSection) this.params.zeroPageDetection = 'multifd';
    // Never rejects: whatever goes wrong ends as a failed migration with its error.
    this.result = this.run().catch((e: unknown) => this.failed(toVmigError(e, 'VMIG_ERR_INTERNAL')));
    this.done = this.result.then((info) => {
      if (info.status === 'completed') return info;
      throw VmigError.fromJSON(info.error ?? { code: 'VMIG_ERR_INTERNAL', message: `migration ${info.status} without an error` });
    });
    // `result` is the outcome; a caller that only reads it must not see an unhandled rejection.
    this.done.catch(() => {});
  }

  /** Bytes each multifd channel wrote so far. */
  multifdChannelBytes(): number[] {
    return [...(this.multifd?.channelBytes ?? [])];
  }

  /** query-migrate: the figures so far. */
  info(): MigrationInfo {
    return this.stats.info();
  }

  /** The parameters in force (migrate-set-parameters changes some while it runs). */
  get parameters(): MigrationParams {
    return this.mig?.parameters ?? this.params;
  }

  /** migrate-set-parameters: bandwidth and downtime limit, applied from the next round. */
  setParameters(p: RuntimeParams): void {
    if (this.mig) this.mig.setParameters(p);
    else Object.assign(this.params, p);
  }

  /** migrate-start-postcopy (needs the postcopy capability). */
  startPostcopy(): void {
    if (!this.mig) throw new InvalidArgumentError('no migration is running yet');
    this.mig.startPostcopy();
  }

  /**
   * migrate-pause: after the postcopy switch, gives the channels up as a network failure
   * would; the migration goes to postcopy-paused.
   */
  pause(): void {
    if (!this.mig) throw new InvalidArgumentError('no migration is running yet');
    this.mig.pause();
  }

  /**
   * `migrate URI resume=true`: in postcopy-paused, reconnects every channel to `uri` (where the
   * destination's migrate-recover listens) and goes on with what the destination lacks. A
   * recovery that fails leaves the migration paused; resume may be called again.
   */
  resume(uri: string | MigrationUri): void {
    if (!this.mig) throw new InvalidArgumentError('no migration is running yet');
    this.mig.resume(typeof uri === 'string' ? formatMigrationUri(parseMigrationUri(uri)) : formatMigrationUri(uri));
  }

  /** migrate_cancel: before the postcopy switch the guest runs here again (vm.resume). */
  cancel(): void {
    this.abort.abort();
  }

  private async run(): Promise<MigrationInfo> {
    const o = this.opts;
    const timeoutMs = o.channelTimeoutMs ?? DEFAULT_CHANNEL_TIMEOUT_MS;
    const target = this.target;
    const tlsHost = target.transport === 'tcp' ? target.host : 'localhost';
    const stats = this.stats;
    stats.startTime = performance.now();
    // A device registered twice is the caller's mistake: refused before anything connects.
    const devices = new DeviceRegistry().register(new TimerDevice()).register(new GlobalStateDevice('running'));
    for (const d of o.devices ?? []) devices.register(d);
    if (o.integrity) devices.register(new RamIntegrityDevice(() => o.ram));
    const rp = this.returnPathThread(target, timeoutMs);
    let sock: net.Socket | undefined;
    /** The main channel's TCP socket (under TLS, the one beneath it). */
    let raw: net.Socket | undefined;
    let multifd: MultifdSender | undefined;
    const log = o.log ?? silentLogger;
    // A cancel while the channels connect ends the wait at once; what connects afterwards is closed.
    const cancelled = (): VmigError => new VmigError('VMIG_ERR_CANCELLED', 'migration cancelled while connecting', { channel: 'main' });
    const unlessCancelled = <T>(p: Promise<T>, drop: (v: T) => void): Promise<T> => {
      if (this.abort.signal.aborted) {
        p.then(drop, () => {});
        return Promise.reject(cancelled());
      }
      return new Promise<T>((resolve, reject) => {
        const onAbort = (): void => {
          p.then(drop, () => {});
          reject(cancelled());
        };
        this.abort.signal.addEventListener('abort', onAbort, { once: true });
        p.then(
          (v) => {
            this.abort.signal.removeEventListener('abort', onAbort);
            resolve(v);
          },
          (e: unknown) => {
            this.abort.signal.removeEventListener('abort', onAbort);
            reject(e);
          },
        );
      });
    };
    try {
      sock = await unlessCancelled(connect(target, { channel: 'main', timeoutMs }), (s) => s.destroy());
      raw = sock;
      log.debug({ channel: 'main', uri: formatMigrationUri(target) }, 'connected');
      if (o.tls) {
        const plain = sock;
        sock = await unlessCancelled(tlsConnect(plain, tlsHost, o.tls, timeoutMs, 'main'), (s) => s.destroy()).catch((e: unknown) => {
          plain.destroy();
          throw e;
        });
        log.debug({ channel: 'main', hostname: o.tls.hostname ?? tlsHost }, 'TLS handshake done');
      }
      if (o.multifdChannels) {
        multifd = await unlessCancelled(MultifdSender.start(o.ram, stats, {
          uri: target,
          channels: o.multifdChannels,
          compression: o.multifdCompression ?? 'none',
          zeroPageDetection: this.params.zeroPageDetection,
          flushAfterEachSection: o.multifdFlushAfterEachSection ?? false,
          uuid: o.uuid,
          connectTimeoutMs: timeoutMs,
          tls: o.tls,
        }), (m) => void m.destroy());
        this.multifd = multifd;
        log.debug({ channel: 'multifd', channels: o.multifdChannels, compression: o.multifdCompression ?? 'none', tls: !!o.tls }, 'multifd channels connected, their MultiFDInit_t sent');
      }
    } catch (e) {
      // The vCPUs were never stopped: they run on.
      sock?.destroy();
      await rp.close();
      return this.failed(toVmigError(e, 'VMIG_ERR_CONNECT'));
    }
    let link: Link;
    try {
      link = await this.attachLink(sock, raw!, rp);
    } catch (e) {
      sock.destroy();
      await multifd?.destroy();
      await rp.close();
      return this.failed(toVmigError(e, 'VMIG_ERR_TLS'));
    }
    let lowered: PriorityChange | undefined;
    const mig = new MigrationThread({
      ram: o.ram,
      sink: link.sink,
      stats,
      multifd,
      vm: o.vm,
      devices,
      params: this.params,
      returnPath: rp,
      signal: this.abort.signal,
      notifiers: o.notifiers ?? new MigrationNotifiers(),
      log: o.log,
      channelTimeoutMs: timeoutMs,
      mainUnsentBytes: () => unsentBytes(link.raw),
      recovery: o.postcopyRecovery === false ? undefined : {
        pause: async () => {
          log.debug({ channel: 'main' }, 'postcopy paused: closing the channels');
          await this.closeLink(link);
        },
        reconnect: async (uri) => {
          link = await this.reconnect(uri, timeoutMs);
          return { sink: link.sink, returnPath: link.rp };
        },
      },
      onStatus: (i) => {
        // With preempt, after the switch this thread only streams background pages: requests
        // are the return-path thread's (thread-priority.ts). Without, it serves them itself.
        if (i.status === 'postcopy-active' && o.postcopyPreempt && !lowered) {
          lowered = lowerBackgroundThreads(o.postcopyBackgroundNice ?? defaultBackgroundNice(o.tls));
          this.scheduling = { backgroundNice: lowered?.nice ?? null, faultSliceUs: null };
        }
        this.emit('status', i);
      },
      onProgress: (i) => this.emit('progress', i),
    });
    this.mig = mig;
    this.watchLink(link);
    multifd?.onError((e) => mig.fail(e));
    const info = await mig.run();
    log.debug({ status: info.status, totalTimeMs: info.totalTimeMs, downtimeMs: info.downtimeMs }, 'migration thread done; closing the channels');
    restoreThreads(lowered);
    if (this.scheduling) this.scheduling.faultSliceUs = link.rp.faultSliceUs;
    await this.closeLink(link);
    if (info.status === 'completed') await multifd?.close();
    else await multifd?.destroy();
    return info;
  }

  /** The main connection's stream and return path (its thread `rp`, started already). */
  private async attachLink(main: net.Socket, raw: net.Socket, rp: ReturnPathThread): Promise<Link> {
    const sink = new BufferedWriter(main, { channel: 'main' });
    // Over TLS the return-path thread reads the decrypted direction through a local pair
    // (tls-bridge.ts); the migration thread writes the main stream on the TLS socket itself.
    const rpSock = this.opts.tls ? (await bridgeTls(main, 'in')).sock : main;
    rp.attach(rpSock, this.opts.ram);
    this.opts.log?.debug({ channel: 'return-path', preempt: !!this.opts.postcopyPreempt }, 'return-path thread reading');
    return { main, raw, rpSock, sink, rp };
  }

  /** A failure of these channels fails the migration (or pauses it, after the switch), while they are the current ones. */
  private watchLink(link: Link): void {
    const mig = this.mig!;
    const epoch = mig.channelEpoch;
    link.main.on('error', (e) => mig.failIfCurrent(epoch, e));
    link.rp.onPreemptError = (e) => mig.failIfCurrent(epoch, e);
  }

  /** The thread does no more I/O on the sockets' fds before they close. */
  private async closeLink(link: Link): Promise<void> {
    await link.rp.close();
    link.main.destroy();
    if (link.rpSock !== link.main) link.rpSock.destroy();
  }

  /** Postcopy recovery: main channel, return path and (at resume) preempt channel to `uriText`. */
  private async reconnect(uriText: string, timeoutMs: number): Promise<Link> {
    const o = this.opts;
    const target = parseMigrationUri(uriText);
    const rp = this.returnPathThread(target, timeoutMs);
    let sock: net.Socket | undefined;
    try {
      sock = await connect(target, { channel: 'main', timeoutMs });
      const raw = sock;
      if (o.tls) sock = await tlsConnect(sock, target.transport === 'tcp' ? target.host : 'localhost', o.tls, timeoutMs, 'main');
      const link = await this.attachLink(sock, raw, rp);
      this.watchLink(link);
      o.log?.info({ channel: 'main', uri: formatMigrationUri(target) }, 'postcopy recovery: connected');
      return link;
    } catch (e) {
      sock?.destroy();
      await rp.close();
      throw e;
    }
  }

  /**
   * The return path's thread; it boots while the channels connect (see
   * return-path-thread.ts). With preempt it opens the channel for requested pages at the
   * switch (or a recovery) and sends them there.
   */
  private returnPathThread(target: MigrationUri, timeoutMs: number): ReturnPathThread {
    const o = this.opts;
    const tlsHost = target.transport === 'tcp' ? target.host : 'localhost';
    return new ReturnPathThread({
      preemptUri: o.postcopyPreempt ? target : undefined,
      faultSliceUs: o.postcopyPreempt ? (o.postcopyFaultSliceUs ?? DEFAULT_POSTCOPY_FAULT_SLICE_US) : 0,
      writeTimeoutMs: timeoutMs,
      ...(o.tls ? { secure: (ps: net.Socket) => tlsConnect(ps, tlsHost, o.tls!, timeoutMs, 'preempt') } : {}),
    });
  }

  private failed(err: VmigError): MigrationInfo {
    this.stats.status = err.code === 'VMIG_ERR_CANCELLED' ? 'cancelled' : 'failed';
    this.stats.error = err.toJSON();
    this.stats.endTime = performance.now();
    const info = this.stats.info();
    this.emit('status', info);
    return info;
  }
}

/** Bytes in `sock`'s kernel send queue (libc.ts); 0 where that cannot be known. */
function unsentBytes(sock: net.Socket): number {
  const fd = (sock as unknown as { _handle?: { fd?: number } })._handle?.fd;
  return fd !== undefined && fd >= 0 ? (libc()?.unsentBytes(fd) ?? 0) : 0;
}

/** Starts a migration of `ram` to `uri` (QEMU's `migrate`); see OutgoingMigration. */
export function migrate(opts: MigrateOptions): OutgoingMigration {
  return new OutgoingMigration(opts);
}

function pickParams(o: Partial<MigrationParams>): Partial<MigrationParams> {
  const out: Partial<MigrationParams> = {};
  for (const k of Object.keys(DEFAULT_PARAMS) as (keyof MigrationParams)[]) {
    if (o[k] !== undefined) (out as Record<string, unknown>)[k] = o[k];
  }
  return out;
}
