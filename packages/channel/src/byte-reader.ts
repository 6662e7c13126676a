/**
 * A StreamSource over a Readable (a socket): queues the chunks the socket delivers and
 * hands contiguous views to decoders. A read that crosses chunk boundaries is assembled in
 * a reusable scratch buffer (only that read is copied, not the chunks). The socket is
 * paused while more than `highWaterMark` bytes wait here: that is the backpressure.
 */
import type { Readable } from 'node:stream';
import { EndOfStream, VmigError, type StreamSource } from '@vmig/core';

const EMPTY = new Uint8Array(0);

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

  constructor(
    private readonly input: Readable,
    private readonly opts: { channel?: string; highWaterMark?: number; maxRead?: number; initial?: Uint8Array } = {},
  ) {
    // Bytes already read off this stream by someone else (a peek at its magic).
    if (opts.initial && opts.initial.length > 0) this.queue.push(opts.initial);
    input.on('data', (chunk: Buffer) => {
      this.queue.push(chunk);
      this.queued += chunk.length;
      if (this.queued > (opts.highWaterMark ?? 4 << 20)) input.pause();
      this.notify();
    });
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
    if (this.queued <= (this.opts.highWaterMark ?? 4 << 20) / 2 && this.input.isPaused()) this.input.resume();
    return c;
  }

  private async nextChunk(): Promise<Uint8Array> {
    for (;;) {
      const c = this.takeChunk();
      if (c) return c;
      if (this.error) throw this.error;
      if (this.ended) throw new EndOfStream(1);
      await new Promise<void>((r) => (this.wake = r));
    }
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
    let filled = have;
    while (filled < n) {
      const c = await this.nextChunk().catch((e) => this.rethrow(e, n - filled));
      const take = Math.min(n - filled, c.length);
      out.set(c.subarray(0, take), filled);
      filled += take;
      if (take < c.length) {
        this.queue.unshift(c.subarray(take));
        this.queued += c.length - take;
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
