/**
 * A StreamSource over a Readable (a socket): queues the chunks the socket delivers and
 * hands contiguous views to decoders. A read that crosses chunk boundaries is assembled in
 * a reusable scratch buffer (only that read is copied, not the chunks). The socket is
 * paused while more than `highWaterMark` bytes wait here: that is the backpressure.
 *
 * Over a socket made by `ByteReader.fromFd`, the chunks are not Node's (a fresh 64 KiB
 * allocation per read, which here means page faults and garbage collection at hundreds of
 * MB/s) but a pool of reused buffers the socket reads into (`onread`). A view handed out is
 * valid until the next ensure(), as always; its pool buffer goes back to the pool once the
 * reader has moved past every chunk in it.
 */
import type net from 'node:net';
import type { Readable } from 'node:stream';
import { EndOfStream, VmigError, type StreamSource } from '@vmig/core';
import { type ReadTarget, socketReadingInto } from './handoff.js';

const EMPTY = new Uint8Array(0);
const POOL_CHUNK = 256 * 1024;
/** A read that leaves less than this in a pool buffer moves on to the next one. */
const POOL_MIN_READ = 16 * 1024;

/** A pool buffer: how much of it is filled, and how many queued chunks still point into it. */
interface PoolBuffer {
  buf: Uint8Array;
  used: number;
  refs: number;
}

export interface ByteReaderOptions {
  channel?: string;
  highWaterMark?: number;
  maxRead?: number;
  initial?: Uint8Array;
  /**
   * The longest a read may wait for the peer's next bytes (ms); past it the read fails with
   * VMIG_ERR_TIMEOUT (a peer stopped, a link frozen). Unbounded if absent.
   */
  idleTimeoutMs?: number;
}

export class ByteReader implements StreamSource {
  buf: Uint8Array = EMPTY;
  pos = 0;
  private readonly queue: Uint8Array[] = [];
  private queued = 0;
  private base = 0;
  private ended = false;
  private error: Error | undefined;
  private wake: (() => void) | undefined;
  /** Two scratch buffers, so an assembled view is never the target of the next assembly. */
  private readonly scratch: Uint8Array[] = [new Uint8Array(64 * 1024), new Uint8Array(64 * 1024)];
  private discarding = false;
  private poolPaused = false;
  /** fail() was called: its error comes before anything still queued. */
  private failed = false;

  /**
   * Wraps a connected socket's fd (handed over with detachFd, which stopped all reading
   * on its old handle) in a socket that reads into this reader's pool. Write through
   * `reader.input` (it is a net.Socket).
   */
  static fromFd(fd: number, opts: ByteReaderOptions = {}): ByteReader & { input: net.Socket } {
    // The pool exists before the socket: it asks for its first buffer while it is built.
    const pool = new ReadPool();
    const sock = socketReadingInto(fd, pool, { writable: true });
    return new ByteReader(sock, opts, pool) as ByteReader & { input: net.Socket };
  }

  constructor(
    readonly input: Readable,
    private readonly opts: ByteReaderOptions = {},
    private readonly pool?: ReadPool,
  ) {
    // Bytes already read off this stream by someone else (a peek at its magic).
    if (opts.initial && opts.initial.length > 0) this.queue.push(opts.initial);
    if (pool) {
      pool.onChunk = (chunk) => this.poolChunk(chunk);
    } else {
      input.on('data', (chunk: Buffer) => {
        if (this.discarding) return;
        this.queue.push(chunk);
        this.queued += chunk.length;
        if (this.queued > (opts.highWaterMark ?? 4 << 20)) input.pause();
        this.notify();
      });
    }
    input.on('end', () => {
      this.ended = true;
      this.notify();
    });
    input.on('close', () => {
      this.ended = true;
      this.notify();
    });
    input.on('error', (err: NodeJS.ErrnoException) => {
      this.error = new VmigError('VMIG_ERR_PEER_CLOSED', `connection failed: ${err.code ?? err.message}`, { channel: opts.channel ?? 'main' }, { cause: err });
      this.notify();
    });
    input.resume();
  }

  /** A chunk the socket read into the pool; returns false to stop reading (backpressure). */
  private poolChunk(chunk: Uint8Array): boolean {
    if (this.discarding) {
      this.pool!.retire(chunk);
      return true;
    }
    this.queue.push(chunk);
    this.queued += chunk.length;
    this.notify();
    // Returning false stops reading on the handle; takeChunk starts it again.
    if (this.queued > (this.opts.highWaterMark ?? 4 << 20)) this.poolPaused = true;
    return !this.poolPaused;
  }

  /** Pool buffers allocated so far (pooled readers; 0 otherwise): bounded by the high-water mark. */
  get pooledBuffers(): number {
    return this.pool?.allocated ?? 0;
  }

  /** The reader has moved past `chunk`. */
  private retire(chunk: Uint8Array): void {
    this.pool?.retire(chunk);
  }

  /**
   * From now on everything that arrives is dropped (a failed load that still drains its
   * connection, so that closing it does not reset it).
   */
  discard(): void {
    this.discarding = true;
    for (const c of this.queue) this.retire(c);
    this.queue.length = 0;
    this.queued = 0;
    this.poolPaused = false;
    this.input.resume();
  }

  /**
   * The next read (or the one waiting) fails with `err` at once, whatever is queued: this
   * side gives the connection up (postcopy's migrate-pause, a broken sibling channel).
   */
  fail(err: Error): void {
    if (this.failed) return;
    this.failed = true;
    this.error = err;
    this.notify();
  }

  get bytesRead(): number {
    return this.base + this.pos;
  }

  private notify(): void {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  private takeChunk(): Uint8Array | undefined {
    const c = this.queue.shift();
    if (!c) return undefined;
    this.queued -= c.length;
    if (this.queued <= (this.opts.highWaterMark ?? 4 << 20) / 2) {
      if (this.poolPaused) {
        this.poolPaused = false;
        this.input.resume();
      } else if (this.input.isPaused()) {
        this.input.resume();
      }
    }
    return c;
  }

  private async nextChunk(): Promise<Uint8Array> {
    for (;;) {
      if (this.failed) throw this.error!;
      const c = this.takeChunk();
      if (c) return c;
      if (this.error) throw this.error;
      if (this.ended) throw new EndOfStream(1);
      await this.waitForData();
    }
  }

  /** Until the socket delivers something (or ends, or fails), at most idleTimeoutMs. */
  private waitForData(): Promise<void> {
    const ms = this.opts.idleTimeoutMs;
    if (ms === undefined) return new Promise<void>((r) => (this.wake = r));
    return new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        this.error ??= new VmigError('VMIG_ERR_TIMEOUT', `no data from the peer for ${ms} ms (--channel-timeout)`, { channel: this.opts.channel ?? 'main' });
        this.notify();
      }, ms);
      this.wake = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }

  async ensure(n: number): Promise<void> {
    let have = this.buf.length - this.pos;
    if (have >= n) return;
    const max = this.opts.maxRead ?? 16 << 20;
    if (n > max) throw new VmigError('VMIG_ERR_STREAM_FORMAT', `read of ${n} bytes exceeds limit ${max}`, { channel: this.opts.channel ?? 'main' });
    // Fast path: nothing left in the current chunk and the next one holds the whole read.
    if (have === 0) {
      const c = await this.nextChunk().catch((e) => this.rethrow(e, n));
      this.base += this.buf.length;
      this.retire(this.buf);
      this.buf = c;
      this.pos = 0;
      if (c.length >= n) return;
      have = c.length;
    }
    // Assemble: tail of the current view + as much of the following chunks as needed.
    const slot = this.scratch[0]!.buffer === this.buf.buffer ? 1 : 0;
    if (this.scratch[slot]!.length < n) this.scratch[slot] = new Uint8Array(n);
    const out = this.scratch[slot]!;
    out.set(this.buf.subarray(this.pos, this.pos + have));
    this.base += this.pos;
    this.retire(this.buf);
    let filled = have;
    while (filled < n) {
      const c = await this.nextChunk().catch((e) => this.rethrow(e, n - filled));
      const take = Math.min(n - filled, c.length);
      out.set(c.subarray(0, take), filled);
      filled += take;
      if (take < c.length) {
        // The rest stays queued: same pool buffer, so it keeps its reference.
        this.queue.unshift(c.subarray(take));
        this.queued += c.length - take;
      } else {
        this.retire(c);
      }
    }
    this.buf = out.subarray(0, n);
    this.pos = 0;
  }

  private rethrow(e: unknown, missing: number): never {
    if (e instanceof EndOfStream) throw new EndOfStream(missing);
    throw e;
  }
}

/**
 * The buffers a pooled socket reads into (ByteReader.fromFd): reads fill a pool buffer from
 * its start; a buffer goes back to the free list once it is no longer being filled and every
 * chunk in it was retired by the reader.
 */
class ReadPool implements ReadTarget {
  onChunk: (chunk: Uint8Array) => boolean = () => true;
  private filling: PoolBuffer | undefined;
  private readonly free: PoolBuffer[] = [];
  private readonly owner = new Map<ArrayBufferLike, PoolBuffer>();

  /** Where the socket's next read lands: the rest of the buffer being filled. */
  target(): Uint8Array {
    let f = this.filling;
    if (!f || f.buf.length - f.used < POOL_MIN_READ) {
      if (f && f.refs === 0) this.free.push(f);
      f = this.free.pop();
      if (!f) {
        f = { buf: new Uint8Array(POOL_CHUNK), used: 0, refs: 0 };
        this.owner.set(f.buf.buffer, f);
      }
      f.used = 0;
      this.filling = f;
    }
    return f.buf.subarray(f.used);
  }

  /** `n` bytes landed at target(). */
  landed(buf: Uint8Array, n: number): boolean {
    const f = this.filling!;
    f.used += n;
    f.refs++;
    return this.onChunk(buf.subarray(0, n));
  }

  get allocated(): number {
    return this.owner.size;
  }

  retire(chunk: Uint8Array): void {
    const f = this.owner.get(chunk.buffer);
    if (!f || --f.refs > 0 || f === this.filling) return;
    this.free.push(f);
  }
}
