/**
 * The source's return path on a thread of its own (return-path.worker.ts), as core's
 * SourceReturnPath. The migration thread keeps the main connection's handle for writing
 * the main stream; the thread reads the other direction with `fs.readSync` on the same fd.
 * With --postcopy-preempt this side opens the preempt channel at the switch and the thread
 * writes requested pages on it.
 *
 * Ownership: both sockets stay the caller's (main) and this object's (preempt) to close,
 * and only after close(), which waits until the thread does no more I/O on their fds.
 */
import type net from 'node:net';
import { MessageChannel, type MessagePort, receiveMessageOnPort, Worker } from 'node:worker_threads';
import { bridgeTls, connect, stopReading, type MigrationUri, type TlsBridge } from '@vmig/channel';
import {
  createSyncFd,
  type GuestRam,
  MemorySink,
  putRamEos,
  type RamBlockShared,
  type SourceReturnPath,
  SyncFd,
  type SyncFdShared,
  type UrgentPagesShared,
  VmigError,
  workerUrl,
  workerExecArgv,
} from '@vmig/core';
import { awaitExit, exitOf } from './worker-exit.js';

export interface ReturnPathThreadData {
  port: MessagePort;
  /** The slice (us) to ask for once it serves requests on a preempt channel; 0: none. */
  faultSliceUs: number;
}

export type ReturnPathToThread =
  /** The main connection is up: the thread reads it from now on. */
  | {
      t: 'start';
      main: SyncFdShared;
      /** Bytes the main connection's handle had read before the thread took over. */
      initial: Uint8Array;
      ram: RamBlockShared[];
    }
  /** The switch: requests are accepted; with a preempt channel the thread serves them. */
  | { t: 'listen'; urgent: UrgentPagesShared; preempt: SyncFdShared | undefined }
  | { t: 'stop' };

export type ReturnPathFromThread =
  | { t: 'shut'; status: number }
  /** It serves requests on the preempt channel now, with this slice (us; null: the kernel's). */
  | { t: 'slice'; us: number | null }
  /** A page request for the main stream (no preempt channel). */
  | { t: 'request'; type: number; data: Uint8Array }
  /** Postcopy recovery: a block's received bitmap (MIG_RP_MSG_RECV_BITMAP, as the wire carries it). */
  | { t: 'recv-bitmap'; idstr: string; bitmap: Uint8Array }
  /** Postcopy recovery: MIG_RP_MSG_RESUME_ACK's value. */
  | { t: 'resume-ack'; value: number }
  /** MIG_RP_MSG_PONG's value. */
  | { t: 'pong'; value: number }
  | { t: 'error'; error: { code: string; message: string } };

export class ReturnPathThread implements SourceReturnPath {
  readonly shut: Promise<number>;
  readonly resumeAck: Promise<number>;
  private ack!: { resolve: (value: number) => void; reject: (e: VmigError) => void };
  /** Postcopy recovery: received bitmaps asked for and not come yet, by block. */
  private readonly bitmapWaiters = new Map<string, { resolve: (b: Uint8Array) => void; reject: (e: VmigError) => void }>();
  private failure: VmigError | undefined;
  /** PONGs waited for, by value (never rejected: a PONG that does not come is only not measured). */
  private readonly pongWaiters = new Map<number, () => void>();
  readonly openPreempt: (() => Promise<void>) | undefined;
  /** An error on the preempt channel's socket (its owner decides what it means). */
  onPreemptError: ((e: Error) => void) | undefined;
  /** The slice the thread got when it began serving requests (thread-slice.ts); null: none. */
  faultSliceUs: number | null = null;
  private readonly worker: Worker;
  private readonly exited: Promise<void>;
  private readonly port: MessagePort;
  private main: SyncFd | undefined;
  private preemptSock: net.Socket | undefined;
  /** Over TLS: the preempt channel as a local socket (tls-bridge.ts); preemptSock is its end. */
  private preemptBridge: TlsBridge | undefined;
  private preempt: { io: SyncFd; shared: SyncFdShared } | undefined;
  private queue: ((type: number, data: Uint8Array) => void) | undefined;
  private settle!: { resolve: (status: number) => void; reject: (e: VmigError) => void };
  private closed = false;
  /** How long a write on the return path's fds may wait for the peer (sync-fd.ts). */
  private readonly writeTimeoutMs: number | undefined;

  /**
   * Starts the thread; it reads nothing until attach(). Start it early (booting a thread
   * costs tens of ms of CPU, which the migration would otherwise pay at its start).
   */
  /**
   * `secure`: TLS for the preempt channel (it resolves with the TLS socket); the thread then
   * writes requested pages through a local pair (tls-bridge.ts).
   */
  constructor(
    opts: {
      preemptUri?: MigrationUri | undefined;
      faultSliceUs?: number;
      writeTimeoutMs?: number;
      secure?: (sock: net.Socket) => Promise<net.Socket>;
    } = {},
  ) {
    this.writeTimeoutMs = opts.writeTimeoutMs;
    this.shut = new Promise<number>((resolve, reject) => (this.settle = { resolve, reject }));
    this.shut.catch(() => {});
    this.resumeAck = new Promise<number>((resolve, reject) => (this.ack = { resolve, reject }));
    this.resumeAck.catch(() => {});
    const { port1, port2 } = new MessageChannel();
    this.port = port1;
    this.worker = new Worker(workerUrl(import.meta.url, 'return-path.worker.js'), {
      execArgv: workerExecArgv(),
      workerData: { port: port2, faultSliceUs: opts.faultSliceUs ?? 0 } satisfies ReturnPathThreadData,
      transferList: [port2],
    });
    this.exited = exitOf(this.worker);
    port1.on('message', (m: ReturnPathFromThread) => this.onMessage(m));
    // Nothing waits on it until attach(): it must not keep the process alive on its own.
    this.worker.unref();
    port1.unref();
    this.worker.on('error', (e) => this.fail(new VmigError('VMIG_ERR_WORKER', `return-path thread failed: ${e.message}`, { channel: 'return-path' })));
    this.worker.on('exit', () => {
      // What it said last may still wait in the port: its error says more than this one.
      for (let r; (r = receiveMessageOnPort(port1)); ) this.onMessage(r.message as ReturnPathFromThread);
      this.fail(new VmigError('VMIG_ERR_WORKER', 'return-path thread ended before SHUT', { channel: 'return-path' }));
    });
    const uri = opts.preemptUri;
    this.openPreempt = uri
      ? async () => {
          let ps = await connect(uri, { channel: 'preempt', ...(opts.writeTimeoutMs !== undefined ? { timeoutMs: opts.writeTimeoutMs } : {}) });
          if (opts.secure) {
            const t = await opts.secure(ps);
            this.preemptBridge = await bridgeTls(t, 'out');
            ps = this.preemptBridge.sock;
          }
          this.preemptSock = ps;
          ps.on('error', (e) => this.onPreemptError?.(e));
          const shared = createSyncFd(stopReading(ps).fd, this.writeTimeoutMs);
          const io = new SyncFd(shared);
          this.preempt = { io, shared };
          // QEMU's preempt channel has no magic; an empty RAM part (EOS) tells it apart at once.
          const eos = new MemorySink();
          putRamEos(eos);
          if (!io.write(eos.view())) throw new VmigError('VMIG_ERR_CONNECT', 'preempt channel: write failed', { channel: 'preempt' });
        }
      : undefined;
  }

  /** `sock`: the main connection, nothing read from it yet by anyone else; `ram`: what requests name. */
  attach(sock: net.Socket, ram: GuestRam): void {
    const { fd, leftover } = stopReading(sock);
    const main = createSyncFd(fd, this.writeTimeoutMs);
    this.main = new SyncFd(main);
    this.port.postMessage({ t: 'start', main, initial: new Uint8Array(leftover), ram: ram.toShared() } satisfies ReturnPathToThread);
    // From here the migration waits on it (SHUT): a main connection that is not reading is
    // no active handle and would not keep the process alive while it waits.
    this.worker.ref();
    this.port.ref();
  }

  listen(urgent: UrgentPagesShared, queue: (type: number, data: Uint8Array) => void): void {
    this.queue = queue;
    this.port.postMessage({ t: 'listen', urgent, preempt: this.preempt?.shared } satisfies ReturnPathToThread);
  }

  pong(value: number): Promise<void> {
    return new Promise((resolve) => this.pongWaiters.set(value, resolve));
  }

  receivedBitmap(idstr: string): Promise<Uint8Array> {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => this.bitmapWaiters.set(idstr, { resolve, reject }));
  }

  private onMessage(m: ReturnPathFromThread): void {
    if (m.t === 'shut') this.settle.resolve(m.status);
    else if (m.t === 'recv-bitmap') {
      const w = this.bitmapWaiters.get(m.idstr);
      if (!w) return this.fail(new VmigError('VMIG_ERR_STREAM_FORMAT', `a received bitmap for block '${m.idstr}' that was not asked for`, { channel: 'return-path' }));
      this.bitmapWaiters.delete(m.idstr);
      w.resolve(m.bitmap);
    } else if (m.t === 'resume-ack') this.ack.resolve(m.value);
    else if (m.t === 'pong') {
      this.pongWaiters.get(m.value)?.();
      this.pongWaiters.delete(m.value);
    }
    else if (m.t === 'slice') this.faultSliceUs = m.us;
    else if (m.t === 'request') {
      try {
        this.queue!(m.type, m.data);
      } catch (e) {
        this.fail(e as VmigError);
      }
    } else if (m.t === 'error') this.fail(VmigError.fromJSON(m.error));
  }

  private fail(e: VmigError): void {
    // After SHUT (or close) nothing here changes the outcome.
    this.failure ??= e;
    this.settle.reject(e);
    this.ack.reject(e);
    for (const w of this.bitmapWaiters.values()) w.reject(e);
    this.bitmapWaiters.clear();
  }

  /**
   * The thread stops reading and writing; then it ends, and so does the preempt channel.
   * The main connection is the caller's to close, after this. Also for a thread never
   * attached (the migration did not start).
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.fail(new VmigError('VMIG_ERR_CANCELLED', 'return path closed', { channel: 'return-path' }));
    this.main?.close();
    this.preempt?.io.close();
    this.port.postMessage({ t: 'stop' } satisfies ReturnPathToThread);
    // It reads 'stop' between reads (or, not attached, as its first message) and ends.
    await awaitExit(this.worker, this.exited);
    this.port.close();
    // Over TLS the last pages may still be in the local pair: they go out first.
    if (this.preemptBridge) await this.preemptBridge.close();
    this.preemptSock?.destroy();
  }
}
