/**
 * The byte-stream seams between the wire codecs (pure, here in core) and transports
 * (packages/channel, or memory in tests). Core never sees a socket: it writes through a
 * ByteWriter/StreamSink and reads through a StreamSource.
 */

/** Big-endian appends, QEMU's qemu_put_* family. */
export interface ByteWriter {
  put8(v: number): void;
  put16(v: number): void;
  put32(v: number): void;
  /** v must be a safe integer (< 2^53); QEMU's offsets and sizes are. */
  put64(v: number): void;
  putBytes(b: Uint8Array): void;
}

/** A ByteWriter over a transport, with backpressure. */
export interface StreamSink extends ByteWriter {
  /** Bytes handed to this sink so far. */
  readonly bytesWritten: number;
  /** Bytes the transport has taken (handed to the kernel); what bandwidth is measured on. */
  readonly bytesFlushed: number;
  /** Resolves once the transport can take more (backpressure); rejects if it failed. */
  ready(): Promise<void>;
  /** Pushes buffered bytes to the transport and waits until it has taken them. */
  flush(): Promise<void>;
}

/**
 * A reader over a byte stream that hands out contiguous views. After `await ensure(n)`
 * (or when `buf.length - pos >= n` already), `buf[pos .. pos+n)` are valid; a decoder
 * consumes by advancing `pos`. Bytes before `pos` may be reused by the next ensure().
 */
export interface StreamSource {
  buf: Uint8Array;
  pos: number;
  ensure(n: number): Promise<void>;
  readonly bytesRead: number;
}

const TWO_32 = 0x1_0000_0000;

export function getBe16(b: Uint8Array, p: number): number {
  return ((b[p]! << 8) | b[p + 1]!) >>> 0;
}

export function getBe32(b: Uint8Array, p: number): number {
  return ((b[p]! << 24) | (b[p + 1]! << 16) | (b[p + 2]! << 8) | b[p + 3]!) >>> 0;
}

/**
 * be64 as a number. Values >= 2^53 cannot be represented exactly and are returned as
 * Infinity so that every bounds check downstream rejects them.
 */
export function getBe64(b: Uint8Array, p: number): number {
  const hi = getBe32(b, p);
  const lo = getBe32(b, p + 4);
  if (hi >= 0x20_0000) return Infinity;
  return hi * TWO_32 + lo;
}

export function setBe32(b: Uint8Array, p: number, v: number): void {
  b[p] = v >>> 24;
  b[p + 1] = (v >>> 16) & 0xff;
  b[p + 2] = (v >>> 8) & 0xff;
  b[p + 3] = v & 0xff;
}

export function setBe64(b: Uint8Array, p: number, v: number): void {
  setBe32(b, p, Math.floor(v / TWO_32));
  setBe32(b, p + 4, v >>> 0);
}

/** An in-memory growable sink: stream files in tests, device-state buffers. */
export class MemorySink implements StreamSink {
  private buf = new Uint8Array(4096);
  private len = 0;

  get bytesWritten(): number {
    return this.len;
  }

  get bytesFlushed(): number {
    return this.len;
  }

  private grow(n: number): void {
    if (this.len + n <= this.buf.length) return;
    let cap = this.buf.length * 2;
    while (cap < this.len + n) cap *= 2;
    const next = new Uint8Array(cap);
    next.set(this.buf.subarray(0, this.len));
    this.buf = next;
  }

  put8(v: number): void {
    this.grow(1);
    this.buf[this.len++] = v & 0xff;
  }
  put16(v: number): void {
    this.grow(2);
    this.buf[this.len++] = (v >>> 8) & 0xff;
    this.buf[this.len++] = v & 0xff;
  }
  put32(v: number): void {
    this.grow(4);
    setBe32(this.buf, this.len, v);
    this.len += 4;
  }
  put64(v: number): void {
    this.grow(8);
    setBe64(this.buf, this.len, v);
    this.len += 8;
  }
  putBytes(b: Uint8Array): void {
    this.grow(b.length);
    this.buf.set(b, this.len);
    this.len += b.length;
  }
  ready(): Promise<void> {
    return Promise.resolve();
  }
  flush(): Promise<void> {
    return Promise.resolve();
  }
  /** A copy of everything written. */
  bytes(): Uint8Array {
    return this.buf.slice(0, this.len);
  }
  /** Everything written, without a copy: valid until the next put or reset(). */
  view(): Uint8Array {
    return this.buf.subarray(0, this.len);
  }
  /** Empties the sink and keeps its buffer for reuse. */
  reset(): void {
    this.len = 0;
  }
}

/**
 * A StreamSource over chunks already in memory (a captured stream, a file, a test that
 * splits a stream at arbitrary points). Chunks are served in order; a read that crosses a
 * chunk boundary is assembled in a scratch buffer, exactly as the socket reader does.
 */
export class MemorySource implements StreamSource {
  buf: Uint8Array = new Uint8Array(0);
  pos = 0;
  private next = 0;
  /** Stream offset of buf[0]. */
  private base = 0;
  private readonly chunks: Uint8Array[];
  constructor(chunks: readonly Uint8Array[]) {
    this.chunks = [...chunks];
  }

  get bytesRead(): number {
    return this.base + this.pos;
  }

  ensure(n: number): Promise<void> {
    const have = this.buf.length - this.pos;
    if (have >= n) return Promise.resolve();
    const out = new Uint8Array(n);
    out.set(this.buf.subarray(this.pos));
    let filled = have;
    this.base += this.pos;
    while (filled < n) {
      const c = this.chunks[this.next];
      if (!c) {
        this.buf = out.subarray(0, filled);
        this.pos = 0;
        return Promise.reject(new EndOfStream(n - filled));
      }
      const take = Math.min(n - filled, c.length);
      out.set(c.subarray(0, take), filled);
      filled += take;
      if (take < c.length) {
        // Leave the rest of this chunk for later reads.
        this.chunks[this.next] = c.subarray(take);
      } else {
        this.next++;
      }
    }
    this.buf = out;
    this.pos = 0;
    return Promise.resolve();
  }
}

/** Thrown by sources when the stream ends before the bytes a decoder needs. */
export class EndOfStream extends Error {
  constructor(readonly missing: number) {
    super(`stream ended ${missing} byte(s) short`);
    this.name = 'EndOfStream';
  }
}
