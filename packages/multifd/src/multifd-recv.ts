/**
 * The destination's side of multifd (QEMU's multifd_recv_new_channel / multifd_recv_sync_main):
 * accepts channels (checking MultiFDInit_t: magic, version, one migration's uuid, an expected
 * and unused id), hands each socket to its own recv thread, and runs the barrier. The recv
 * threads are started with the receiver, before any channel connects: a thread takes ~0.1 s
 * to boot here, which started on connect would fall inside the first round, while the
 * source's packets wait in the kernel.
 */
import type net from 'node:net';
import { Worker } from 'node:worker_threads';
import { detachFd, type TlsOptions } from '@vmig/channel';
import { FirstError, type GuestRam, StreamError, VmigError, workerUrl, workerExecArgv } from '@vmig/core';
import { ABORT, APPLYING, CONTROL_WORDS, DIALECT, DIALECT_LEGACY, DIALECT_MODERN, MAX_CHANNELS, POSTED, RELEASED, SEALED } from './recv-control.js';
import { type CompressionName, compressionByName } from './compress/registry.js';
import type { RecvChannelApi, RecvThreadConfig, RecvTotals } from './recv-protocol.js';
import { Comlink, endpoint, type Remote } from './recv-rpc.js';
import { decodeMultifdInit, MULTIFD_INIT_SIZE, type MultifdInit } from './wire/multifd-wire.js';

export class MultifdReceiver {
  readonly control = new SharedArrayBuffer(CONTROL_WORDS * 4);
  private readonly ctl = new Int32Array(this.control);
  private readonly workers: Worker[];
  /** Each thread's control plane (comlink, recv-protocol.ts). */
  private readonly threads: Remote<RecvChannelApi>[] = [];
  /** Channel ids whose init was accepted. */
  private readonly attached: boolean[];
  /** Threads (slots) that own a connection. */
  private readonly slotBusy: boolean[];
  /** The channel id each thread serves (its slot, but for TLS connections: see addTlsConnection). */
  private readonly channelOfSlot: number[] = [];
  private readonly consumed: number[];
  private readonly ended: boolean[];
  /** The migration's uuid (--uuid), or the first channel's when not given. */
  private uuid: Uint8Array | undefined;
  private readonly failure = new FirstError();
  private readonly channelStats: { normal: number; zero: number; bytes: number }[];

  /**
   * `zeroUnlessLoaded`: this side created guest RAM fresh, so a zero page for a page no load
   * wrote needs no work (RamBlock.loadZeroPage).
   */
  /** Why connections that looked like multifd channels were turned away (for the timeout's message). */
  private readonly turnedAway: string[] = [];
  private readonly compressionFlag: number;
  private readonly timeoutMs: number;

  constructor(
    readonly channels: number,
    private readonly zeroUnlessLoaded = false,
    opts: { compression?: CompressionName; timeoutMs?: number; uuid?: Uint8Array } = {},
  ) {
    this.uuid = opts.uuid;
    this.compressionFlag = compressionByName(opts.compression ?? 'none')?.flag ?? 0;
    this.timeoutMs = opts.timeoutMs ?? 30_000;
    if (channels < 1 || channels > MAX_CHANNELS) throw new RangeError(`multifd channels must be 1..${MAX_CHANNELS}`);
    this.attached = new Array<boolean>(channels).fill(false);
    this.slotBusy = new Array<boolean>(channels).fill(false);
    this.workers = Array.from({ length: channels }, (_, id) => this.startThread(id));
    this.consumed = new Array<number>(channels).fill(0);
    this.ended = new Array<boolean>(channels).fill(false);
    this.channelStats = Array.from({ length: channels }, () => ({ normal: 0, zero: 0, bytes: 0 }));
  }

  /** Called with the first failure of any channel. */
  onError(cb: (e: VmigError) => void): void {
    this.failure.onError(cb);
  }

  private get error(): VmigError | undefined {
    return this.failure.error;
  }

  /** Ends the load's use of multifd: every wait here fails with `e` (the first failure anywhere). */
  abort(e: VmigError): void {
    this.fail(e);
  }

  private fail(e: VmigError): void {
    if (!this.failure.set(e)) return;
    // Wake every channel parked at the barrier: they see ABORT and end.
    Atomics.store(this.ctl, ABORT, 1);
    for (let ch = 0; ch < this.channels; ch++) Atomics.notify(this.ctl, RELEASED + ch);
  }

  /**
   * A connection whose first bytes (`first`, at least the init) are a multifd channel's.
   * Rejects a bad init with a clear error; the connection is then closed.
   */
  addChannel(sock: net.Socket, first: Buffer): void {
    let init;
    try {
      init = this.checkInit(first);
    } catch (e) {
      sock.destroy();
      this.fail(e as VmigError);
      return;
    }
    // Ownership handoff: from this message on the thread owns the fd (handoff.ts).
    const fd = detachFd(sock);
    this.slotBusy[init.id] = true;
    const leftover = first.subarray(MULTIFD_INIT_SIZE);
    void this.threads[init.id]!.attach(fd, leftover);
  }

  /**
   * A connection under TLS, not read yet (its init is encrypted): a free thread takes its fd,
   * does the handshake, reads the init and posts it; checkInit() then names the channel it
   * serves. A handshake that fails fails the load (VMIG_ERR_TLS).
   */
  addTlsConnection(sock: net.Socket, tls: TlsOptions): void {
    const slot = this.slotBusy.indexOf(false);
    if (slot < 0) {
      this.turnAway('a connection past the channels this side expects');
      sock.destroy();
      return;
    }
    this.slotBusy[slot] = true;
    const fd = detachFd(sock);
    void this.threads[slot]!.attachTls(fd, tls, this.timeoutMs).then((init) => {
      if (!init) return; // the thread reported why
      try {
        const checked = this.checkInit(init);
        this.channelOfSlot[slot] = checked.id;
        void this.threads[slot]!.adopt(checked.id);
      } catch (e) {
        this.fail(e as VmigError);
      }
    });
  }

  /** A thread has no connection yet (under TLS, a connection after main goes to one). */
  get hasFreeSlot(): boolean {
    return this.slotBusy.includes(false);
  }

  /** MultiFDInit_t: magic, version, an expected and unused id, one migration's uuid. Marks the id attached. */
  private checkInit(first: Uint8Array): MultifdInit {
    const init = decodeMultifdInit(first, this.channels, 'multifd');
    if (this.attached[init.id]) throw new StreamError('VMIG_ERR_MULTIFD_HANDSHAKE', `multifd init: duplicate channel id ${init.id}`, { channel: `multifd/${init.id}` });
    if (this.uuid && Buffer.compare(Buffer.from(this.uuid), Buffer.from(init.uuid)) !== 0) {
      // QEMU's words: multifd_recv_initial_packet.
      throw new StreamError(
        'VMIG_ERR_MULTIFD_HANDSHAKE',
        `multifd init: channel ${init.id} belongs to another migration (received uuid ${formatUuid(init.uuid)}, expected ${formatUuid(this.uuid)}; --uuid must be the same on both ends)`,
        { channel: `multifd/${init.id}` },
      );
    }
    this.uuid ??= init.uuid;
    this.attached[init.id] = true;
    return init;
  }

  /**
   * A connection that was to be a multifd channel and is not (its init cut short, or not a
   * multifd init at all): it is dropped; if a channel is then missing, the barrier's
   * timeout names it, with this reason.
   */
  turnAway(reason: string): void {
    this.turnedAway.push(reason);
  }

  private startThread(id: number): Worker {
    const cfg: RecvThreadConfig = { id, control: this.control, zeroUnlessLoaded: this.zeroUnlessLoaded, compressionFlag: this.compressionFlag };
    const w = new Worker(workerUrl(import.meta.url, 'recv-channel.worker.js'), { workerData: cfg, execArgv: workerExecArgv() });
    // `id` is the thread's slot: the channel it serves is the same, but for a TLS connection,
    // whose id comes with its init.
    this.channelOfSlot[id] = id;
    const thread = Comlink.wrap<RecvChannelApi>(endpoint(w));
    this.threads[id] = thread;
    const stats = (t: RecvTotals): void => {
      this.channelStats[id] = { normal: t.normal, zero: t.zero, bytes: t.bytes };
    };
    void thread.listen(
      Comlink.proxy({
        stats,
        end: (t: RecvTotals) => {
          stats(t);
          this.ended[this.channelOfSlot[id]!] = true;
        },
        error: (e) => this.fail(VmigError.fromJSON(e)),
      }),
    );
    w.on('error', (e) => this.fail(new VmigError('VMIG_ERR_WORKER', `multifd recv thread failed: ${e.message}`, { channel: `multifd/${id}` })));
    return w;
  }

  get connected(): number {
    return this.attached.filter(Boolean).length;
  }

  /** Guest RAM exists (possibly built from the stream's block list): tell every channel. */
  setRam(ram: GuestRam): void {
    const shared = ram.toShared();
    for (const t of this.threads) void t.setRam(shared);
  }

  /**
   * The load loop's half of the barrier, at RAM_SAVE_FLAG_MULTIFD_FLUSH (or EOS in the legacy
   * dialect): wait for every channel's SYNC, then release them all.
   */
  async sync(): Promise<void> {
    // Bounded: a channel that never connects (the source opened fewer), that ended, or that
    // sends nothing (a frozen link) fails the load instead of holding it for good.
    const deadline = performance.now() + this.timeoutMs;
    for (let ch = 0; ch < this.channels; ch++) {
      for (;;) {
        if (this.error) throw this.error;
        const posted = Atomics.load(this.ctl, POSTED + ch);
        if (posted > this.consumed[ch]!) break;
        if (this.ended[ch]) {
          this.fail(new VmigError('VMIG_ERR_PEER_CLOSED', `multifd channel ${ch} ended before its SYNC (the source closed it early)`, { channel: `multifd/${ch}` }));
          continue;
        }
        if (performance.now() > deadline) this.fail(this.syncTimeout(ch));
        else await Atomics.waitAsync(this.ctl, POSTED + ch, posted, 200).value;
      }
      this.consumed[ch]!++;
    }
    for (let ch = 0; ch < this.channels; ch++) {
      Atomics.add(this.ctl, RELEASED + ch, 1);
      Atomics.notify(this.ctl, RELEASED + ch);
    }
  }

  private syncTimeout(ch: number): VmigError {
    const why = this.turnedAway.length > 0 ? `; connections turned away: ${this.turnedAway.slice(-3).join('; ')}` : '';
    if (!this.attached[ch]) {
      return new VmigError(
        'VMIG_ERR_MULTIFD_CHANNELS',
        `multifd channel ${ch} never connected: ${this.connected} of the ${this.channels} channels this side expects arrived within ${this.timeoutMs} ms (--multifd-channels must be the same on both ends)${why}`,
        { channel: `multifd/${ch}` },
      );
    }
    return new VmigError('VMIG_ERR_TIMEOUT', `multifd channel ${ch} sent no SYNC within ${this.timeoutMs} ms (--channel-timeout)`, { channel: `multifd/${ch}` });
  }

  /** The stream's barrier dialect, read off the main stream: published before the barrier releases anyone. */
  setDialect(legacy: boolean): void {
    Atomics.store(this.ctl, DIALECT, legacy ? DIALECT_LEGACY : DIALECT_MODERN);
  }

  /**
   * The postcopy switch (recv-control.ts): no channel writes guest RAM from now on. Resolves
   * once any packet being applied is done; a packet with pages after this is an error.
   */
  async seal(timeoutMs = 5000): Promise<void> {
    Atomics.store(this.ctl, SEALED, 1);
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      if (this.error) throw this.error;
      const n = Atomics.load(this.ctl, APPLYING);
      if (n === 0) return;
      if (performance.now() > deadline) throw new StreamError('VMIG_ERR_POSTCOPY', 'a multifd channel is still writing pages at the postcopy switch', { channel: 'multifd' });
      await Atomics.waitAsync(this.ctl, APPLYING, n, 50).value;
    }
  }

  /** What each channel received so far (as of its last SYNC or its end). */
  channelTotals(): RecvTotals[] {
    return this.channelStats.map((s) => ({ ...s }));
  }

  totals(): { normal: number; zero: number; bytes: number } {
    return this.channelStats.reduce((a, s) => ({ normal: a.normal + s.normal, zero: a.zero + s.zero, bytes: a.bytes + s.bytes }), { normal: 0, zero: 0, bytes: 0 });
  }

  /** Waits briefly for channels to see their sockets end, then ends every thread. */
  async close(graceMs = 2000): Promise<void> {
    const deadline = performance.now() + graceMs;
    while (this.attached.some((a, i) => a && !this.ended[i]) && performance.now() < deadline && !this.error) await new Promise((r) => setTimeout(r, 10));
    Atomics.store(this.ctl, ABORT, 1);
    for (let ch = 0; ch < this.channels; ch++) Atomics.notify(this.ctl, RELEASED + ch);
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}

function formatUuid(u: Uint8Array): string {
  const h = Buffer.from(u).toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}
