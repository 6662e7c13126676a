/**
 * The migration thread's side of multifd sending (QEMU's multifd_send / multifd_send_sync_main):
 * batches dirty pages of one block into jobs, hands each job to a channel with room, and
 * runs the flush-and-sync barrier. A job is up to JOB_PACKETS packets of 128 pages; the
 * channel cuts it into packets, numbered from the job's first packet_num (one counter for
 * all channels, as QEMU's).
 */
import { Worker } from 'node:worker_threads';
import type { MigrationUri, TlsOptions } from '@vmig/channel';
import { type ByteWriter, FirstError, TARGET_PAGE_SIZE, type GuestRam, libc, type MigrationStats, type MultifdLink, type RamBlock, VmigError, workerUrl, workerExecArgv } from '@vmig/core';
import type { CompressionName } from './compress/registry.js';
import { JOB_PACKETS, type SendChannelConfig, type SendFromChannel, type SendToChannel } from './send-protocol.js';
import { MULTIFD_PAGE_COUNT } from './wire/multifd-wire.js';

export interface MultifdSendOptions {
  uri: MigrationUri;
  channels: number;
  compression: CompressionName;
  zeroPageDetection: 'none' | 'legacy' | 'multifd';
  /** QEMU 7.2's dialect: sync on every RAM section's EOS instead of RAM_SAVE_FLAG_MULTIFD_FLUSH. */
  flushAfterEachSection: boolean;
  uuid?: Uint8Array;
  connectTimeoutMs?: number;
  /** TLS on every channel: each thread does its own handshake. */
  tls?: TlsOptions | undefined;
}

const JOB_PAGES = JOB_PACKETS * MULTIFD_PAGE_COUNT;
/** Jobs a channel may hold at once: with 2, it has the next job at hand when one is written. */
const MAX_INFLIGHT = 2;

interface Job {
  block: number;
  pages: Uint32Array;
}

export class MultifdSender implements MultifdLink {
  private readonly inflight: number[];
  private readonly blockIndex = new Map<RamBlock, number>();
  /** The job being filled by savePage: its block and its first `batchLength` pages. */
  private batchBlock = -1;
  private readonly batchPages = new Uint32Array(new ArrayBuffer(JOB_PAGES * 4));
  private batchLength = 0;
  /** blockIndex's answer for the block savePage saw last (a scan stays in one block for long). */
  private lastBlock: RamBlock | undefined;
  private lastBlockIdx = -1;
  private readonly queue: Job[] = [];
  private packetNum = 0;
  private next = 0;
  private readonly failure = new FirstError();
  private wake: (() => void) | undefined;
  private syncPending = 0;
  /** Pages given to savePage whose packet is not written yet. */
  private pendingPages = 0;
  readonly flushAfterEachSection: boolean;

  private constructor(
    private readonly workers: Worker[],
    private readonly stats: MigrationStats,
    ram: GuestRam,
    opts: MultifdSendOptions,
  ) {
    this.inflight = workers.map(() => 0);
    ram.blocks.forEach((b, i) => this.blockIndex.set(b, i));
    this.flushAfterEachSection = opts.flushAfterEachSection;
    workers.forEach((w, id) => {
      w.on('message', (m: SendFromChannel) => this.onMessage(id, m));
      w.on('error', (e) => this.fail(new VmigError('VMIG_ERR_WORKER', `multifd send thread failed: ${e.message}`, { channel: `multifd/${id}` })));
      w.on('exit', () => {
        if (!this.closed) this.fail(new VmigError('VMIG_ERR_WORKER', 'multifd send thread exited', { channel: `multifd/${id}` }));
      });
    });
  }

  private closed = false;
  /** Bytes each channel wrote (its jobs and SYNC packets). */
  readonly channelBytes: number[] = [];
  /** Each connected channel's socket fd (send-channel.worker.ts 'ready'). */
  private readonly fds: number[] = [];
  /** The last barrier is written (quiesce()). */
  private quiesced = false;
  private readyCount = 0;

  /** Spawns the channel threads; resolves once every channel connected and sent its init. */
  static async start(ram: GuestRam, stats: MigrationStats, opts: MultifdSendOptions): Promise<MultifdSender> {
    // QEMU's -uuid, all zeros unless set: a QEMU destination checks it against its own.
    const uuid = opts.uuid ?? new Uint8Array(16);
    const workers = Array.from({ length: opts.channels }, (_, id) => {
      const cfg: SendChannelConfig = {
        ram: ram.toShared(),
        uri: opts.uri,
        id,
        uuid,
        compression: opts.compression,
        zeroPageDetection: opts.zeroPageDetection,
        tls: opts.tls,
        tlsTimeoutMs: opts.connectTimeoutMs ?? 10_000,
      };
      return new Worker(workerUrl(import.meta.url, 'send-channel.worker.js'), { workerData: cfg, execArgv: workerExecArgv() });
    });
    const s = new MultifdSender(workers, stats, ram, opts);
    const deadline = performance.now() + (opts.connectTimeoutMs ?? 10_000);
    while (s.readyCount < workers.length) {
      if (s.error) break;
      if (performance.now() > deadline) s.fail(new VmigError('VMIG_ERR_CONNECT', 'multifd channels did not connect in time', { channel: 'multifd' }));
      await s.waitEvent(100);
    }
    if (s.error) {
      await s.destroy();
      throw s.error;
    }
    return s;
  }

  get pendingBytes(): number {
    return this.pendingPages * TARGET_PAGE_SIZE;
  }

  /**
   * Bytes the channels wrote that their kernel send queues still hold (not on the link yet).
   * Read by the migration thread on the channels' fds (an fd is the process's, whichever
   * thread owns its socket); 0 once the channels are quiesced or where it cannot be known.
   */
  unsentBytes(): number {
    const c = libc();
    if (!c || this.quiesced) return 0;
    let n = 0;
    for (const fd of this.fds) n += c.unsentBytes(fd);
    return n;
  }

  get channels(): number {
    return this.workers.length;
  }

  private onMessage(id: number, m: SendFromChannel): void {
    switch (m.t) {
      case 'ready':
        this.readyCount++;
        if (m.fd >= 0) this.fds.push(m.fd);
        break;
      case 'done':
        this.inflight[id]!--;
        this.pendingPages -= m.normal + m.zero;
        this.stats.normalPages += m.normal;
        this.stats.zeroPages += m.zero;
        this.stats.multifdBytes += m.bytes;
        this.channelBytes[id] = (this.channelBytes[id] ?? 0) + m.bytes;
        this.dispatch();
        break;
      case 'synced':
        this.syncPending--;
        this.stats.multifdBytes += m.bytes;
        this.channelBytes[id] = (this.channelBytes[id] ?? 0) + m.bytes;
        break;
      case 'error':
        // After the last barrier the destination may hang up (QEMU closes its channels once
        // loaded); the main channel says whether the migration succeeded.
        if (!this.quiesced) this.fail(VmigError.fromJSON(m.error));
        break;
    }
    this.notify();
  }

  /** Called once with the first failure of any channel. */
  onError(cb: (e: VmigError) => void): void {
    this.failure.onError(cb);
  }

  private get error(): VmigError | undefined {
    return this.failure.error;
  }

  private fail(e: VmigError): void {
    if (this.failure.set(e)) this.notify();
  }

  private notify(): void {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  private waitEvent(timeoutMs = 1000): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(resolve, timeoutMs);
      this.wake = () => {
        clearTimeout(t);
        resolve();
      };
    });
  }

  /** PageSender: queue one page; `w` (the main stream) is not used. */
  savePage(_w: ByteWriter, block: RamBlock, page: number): void {
    if (block !== this.lastBlock) {
      this.lastBlock = block;
      this.lastBlockIdx = this.blockIndex.get(block)!;
    }
    const idx = this.lastBlockIdx;
    this.pendingPages++;
    if (this.batchLength > 0 && this.batchBlock !== idx) this.enqueueBatch();
    this.batchBlock = idx;
    this.batchPages[this.batchLength++] = page;
    if (this.batchLength === JOB_PAGES) this.enqueueBatch();
  }

  private enqueueBatch(): void {
    // A copy of the batch (it is transferred to the channel); the batch array is reused.
    if (this.batchLength > 0) this.queue.push({ block: this.batchBlock, pages: this.batchPages.slice(0, this.batchLength) });
    this.batchLength = 0;
    this.dispatch();
  }

  /** Hands queued jobs to channels with room, round robin from the last one used. */
  private dispatch(): void {
    while (this.queue.length > 0 && !this.error) {
      let ch = -1;
      for (let k = 0; k < this.workers.length; k++) {
        const c = (this.next + k) % this.workers.length;
        if (this.inflight[c]! < MAX_INFLIGHT) {
          ch = c;
          break;
        }
      }
      if (ch < 0) return;
      this.next = (ch + 1) % this.workers.length;
      const job = this.queue.shift()!;
      const pages = job.pages;
      this.inflight[ch]!++;
      const msg: SendToChannel = { t: 'job', block: job.block, pages, packetNum: this.packetNum };
      this.packetNum += Math.ceil(pages.length / MULTIFD_PAGE_COUNT);
      this.workers[ch]!.postMessage(msg, [pages.buffer as ArrayBuffer]);
    }
  }

  private throwIfFailed(): void {
    if (this.error) throw this.error;
  }

  /** Backpressure: resolves once the queue in front of the channels is short. */
  async ready(): Promise<void> {
    this.throwIfFailed();
    this.dispatch();
    while (this.queue.length > this.workers.length) {
      await this.waitEvent();
      this.throwIfFailed();
    }
  }

  /**
   * multifd_ram_flush_and_sync: the partial batch goes out, every queued job is handed to a
   * channel, then every channel writes a SYNC packet after the jobs it holds; resolves when
   * all SYNC packets are written. The caller then puts the marker on the main stream.
   */
  async flushAndSync(): Promise<void> {
    this.enqueueBatch();
    while (this.queue.length > 0) {
      await this.waitEvent();
      this.throwIfFailed();
      this.dispatch();
    }
    this.syncPending += this.workers.length;
    for (const w of this.workers) {
      const msg: SendToChannel = { t: 'sync', packetNum: this.packetNum++ };
      w.postMessage(msg);
    }
    while (this.syncPending > 0) {
      await this.waitEvent();
      this.throwIfFailed();
    }
  }

  /** MultifdLink.quiesce: from now on a channel the peer closes is not a failure. */
  quiesce(): void {
    this.quiesced = true;
  }

  /** Orderly end: every channel ends its socket and its thread exits. */
  async close(): Promise<void> {
    this.closed = true;
    const exits = this.workers.map((w) => new Promise<void>((r) => w.once('exit', () => r())));
    for (const w of this.workers) w.postMessage({ t: 'close' } satisfies SendToChannel);
    const timeout = new Promise<void>((r) => setTimeout(r, 2000).unref());
    await Promise.race([Promise.all(exits), timeout]);
    await this.destroy();
  }

  /** Ends every channel thread now (their sockets close with them). */
  async destroy(): Promise<void> {
    this.closed = true;
    // A flush or a backpressure wait still in progress (the migration failed elsewhere) ends
    // now instead of waiting for channels that are gone.
    this.fail(new VmigError('VMIG_ERR_CANCELLED', 'multifd channels closed', { channel: 'multifd' }));
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}
