/**
 * A StreamSink over a Writable (a socket). Encoders append into a staging buffer; a full
 * buffer goes to the socket as one write (whole batches, never a write per page) and a
 * fresh one from a small pool takes its place. Staging buffers are reused once the socket
 * reports them written, so memory is touched once. `ready()` is the backpressure point:
 * it waits while more than `highWaterMark` bytes sit in the socket's queue.
 */
import type { Writable } from 'node:stream';
import { copyBytes, setBe32, setBe64, VmigError, type StreamSink } from '@vmig/core';

export interface BufferedWriterOptions {
  channel?: string;
  /** Staging buffer size; one socket write each. */
  bufferSize?: number;
  /** ready() waits while the socket holds more than this. */
  highWaterMark?: number;
}

export class BufferedWriter implements StreamSink {
  private cur: Buffer;
  private len = 0;
  private readonly free: Buffer[] = [];
  private flushed = 0;
  private taken = 0;
  /** Writes handed to the socket whose callbacks have not fired yet. */
  private inFlight = 0;
  private onIdle: (() => void) | undefined;
  private error: Error | undefined;
  private readonly size: number;
  private readonly hwm: number;
  private readonly channel: string;

  constructor(
    private readonly out: Writable,
    opts: BufferedWriterOptions = {},
  ) {
    this.size = opts.bufferSize ?? 512 * 1024;
    this.hwm = opts.highWaterMark ?? 8 << 20;
    this.channel = opts.channel ?? 'main';
    this.cur = Buffer.allocUnsafeSlow(this.size);
    out.on('error', (err: NodeJS.ErrnoException) => {
      this.error ??= new VmigError('VMIG_ERR_PEER_CLOSED', `write failed: ${err.code ?? err.message}`, { channel: this.channel }, { cause: err });
    });
  }

  get bytesWritten(): number {
    return this.flushed + this.len;
  }

  get bytesFlushed(): number {
    return this.taken;
  }

  private room(n: number): void {
    if (this.len + n > this.size) this.pushStaging();
  }

  put8(v: number): void {
    this.room(1);
    this.cur[this.len++] = v & 0xff;
  }

  put16(v: number): void {
    this.room(2);
    this.cur[this.len++] = (v >>> 8) & 0xff;
    this.cur[this.len++] = v & 0xff;
  }

  put32(v: number): void {
    this.room(4);
    setBe32(this.cur, this.len, v);
    this.len += 4;
  }

  put64(v: number): void {
    this.room(8);
    setBe64(this.cur, this.len, v);
    this.len += 8;
  }

  putBytes(b: Uint8Array): void {
    let off = 0;
    while (off < b.length) {
      if (this.len === this.size) this.pushStaging();
      const take = Math.min(b.length - off, this.size - this.len);
      // Guest pages come from SharedArrayBuffers: copyBytes says why not set().
      copyBytes(this.cur, this.len, b.subarray(off, off + take));
      this.len += take;
      off += take;
    }
  }

  /** Hands the staging buffer to the socket and takes a free one. */
  private pushStaging(): void {
    if (this.len === 0) return;
    const buf = this.cur;
    const n = this.len;
    this.flushed += n;
    this.len = 0;
    this.cur = this.free.pop() ?? Buffer.allocUnsafeSlow(this.size);
    if (this.error || this.out.destroyed) {
      // The socket is gone: drop the bytes; ready()/flush() report the error.
      this.free.push(buf);
      this.error ??= new VmigError('VMIG_ERR_PEER_CLOSED', 'connection closed', { channel: this.channel });
      return;
    }
    // Ownership of `buf` passes to the socket until its write callback; only then may it
    // be staged into again.
    this.inFlight++;
    this.out.write(buf.subarray(0, n), () => {
      this.taken += n;
      // Always recycle: allocating fresh memory means page faults, which are slow. The
      // pool never exceeds what backpressure lets be in flight at once.
      this.free.push(buf);
      if (--this.inFlight === 0) {
        const idle = this.onIdle;
        this.onIdle = undefined;
        idle?.();
      }
    });
  }

  /**
   * The backpressure point, and the place where the event loop runs: it always yields to
   * it once (setImmediate), so that write completions recycle staging buffers and other
   * I/O (the return path, timers) is serviced even when the socket never pushes back. A
   * loop of awaits on already-resolved promises would starve all of that.
   */
  async ready(): Promise<void> {
    await new Promise<void>((r) => setImmediate(r));
    if (this.error) throw this.error;
    while (this.out.writableLength > this.hwm) {
      await this.waitDrain();
      if (this.error) throw this.error;
    }
  }

  /** Resolves once every byte written so far has been handed to the kernel. */
  async flush(): Promise<void> {
    this.pushStaging();
    if (this.error) throw this.error;
    if (this.inFlight > 0) {
      await new Promise<void>((resolve) => {
        // A destroyed socket never calls back: wake up on close as well, and drop that
        // listener once done (flush runs once per RAM section).
        const done = (): void => {
          this.out.off('close', done);
          this.onIdle = undefined;
          resolve();
        };
        this.onIdle = done;
        this.out.once('close', done);
      });
    }
    if (this.error) throw this.error;
    if (this.out.destroyed && this.inFlight > 0) throw new VmigError('VMIG_ERR_PEER_CLOSED', 'connection closed', { channel: this.channel });
  }

  private waitDrain(): Promise<void> {
    return new Promise((resolve) => {
      const done = (): void => {
        this.out.off('drain', done);
        this.out.off('close', done);
        this.out.off('error', done);
        if (this.out.destroyed && !this.error) {
          this.error = new VmigError('VMIG_ERR_PEER_CLOSED', 'connection closed', { channel: this.channel });
        }
        resolve();
      };
      this.out.on('drain', done);
      this.out.on('close', done);
      this.out.on('error', done);
    });
  }
}
