/**
 * A bitmap over a SharedArrayBuffer, one bit per target page, every access through
 * Atomics so that several threads can share it. Layout: bit i lives in 32-bit word
 * i >>> 5 at mask 1 << (i & 31). Used for the dirty log (vCPUs set, migration thread
 * fetch-and-clears), the migration bitmap (source), the received map (destination) and
 * the write-protect map (background snapshot).
 *
 * Atomics operations are sequentially consistent: a thread that writes page data and then
 * sets a bit publishes the data to any thread that observes the bit (release/acquire and
 * more). Every caller that relies on that says so where it pairs.
 */
export class AtomicBitmap {
  readonly words: Int32Array;

  constructor(
    readonly sab: SharedArrayBuffer,
    readonly nbits: number,
  ) {
    if (sab.byteLength < AtomicBitmap.bytesFor(nbits)) throw new RangeError('bitmap buffer too small');
    this.words = new Int32Array(sab, 0, AtomicBitmap.bytesFor(nbits) / 4);
  }

  static bytesFor(nbits: number): number {
    return Math.ceil(nbits / 32) * 4 || 4;
  }

  static create(nbits: number): AtomicBitmap {
    return new AtomicBitmap(new SharedArrayBuffer(AtomicBitmap.bytesFor(nbits)), nbits);
  }

  private check(i: number): void {
    if (!(i >= 0 && i < this.nbits)) throw new RangeError(`bit ${i} outside bitmap of ${this.nbits}`);
  }

  set(i: number): void {
    this.check(i);
    Atomics.or(this.words, i >>> 5, 1 << (i & 31));
  }

  /** Sets bits [start, start + n), a word at a time (one Atomics.or per word, not per bit). */
  setRange(start: number, n: number): void {
    if (n <= 0) return;
    this.check(start);
    this.check(start + n - 1);
    const end = start + n;
    for (let i = start; i < end; ) {
      const lo = i & 31;
      const hi = Math.min(32, lo + (end - i));
      Atomics.or(this.words, i >>> 5, hi - lo === 32 ? -1 : ((1 << (hi - lo)) - 1) << lo);
      i += hi - lo;
    }
  }

  clear(i: number): void {
    this.check(i);
    Atomics.and(this.words, i >>> 5, ~(1 << (i & 31)));
  }

  test(i: number): boolean {
    this.check(i);
    return (Atomics.load(this.words, i >>> 5) & (1 << (i & 31))) !== 0;
  }

  /** Sets bit i; true if it was already set. */
  testAndSet(i: number): boolean {
    this.check(i);
    const m = 1 << (i & 31);
    return (Atomics.or(this.words, i >>> 5, m) & m) !== 0;
  }

  /** Clears bit i; true if it was set. */
  testAndClear(i: number): boolean {
    this.check(i);
    const m = 1 << (i & 31);
    return (Atomics.and(this.words, i >>> 5, ~m) & m) !== 0;
  }

  /** Atomically takes word w and leaves it zero (the dirty-log harvest). */
  fetchAndClearWord(w: number): number {
    return Atomics.exchange(this.words, w, 0);
  }

  /** ORs bits into word w; returns the bits that were newly set. */
  orWord(w: number, bits: number): number {
    const old = Atomics.or(this.words, w, bits);
    return bits & ~old;
  }

  /** The first set bit at index >= from, or -1. */
  findNextSet(from: number): number {
    if (from >= this.nbits || from < 0) return -1;
    const words = this.words;
    let w = from >>> 5;
    let v = Atomics.load(words, w) & (~0 << (from & 31));
    for (;;) {
      if (v !== 0) {
        const bit = (w << 5) + (31 - Math.clz32(v & -v));
        return bit < this.nbits ? bit : -1;
      }
      if (++w >= words.length) return -1;
      v = Atomics.load(words, w);
    }
  }

  /** The first clear bit at index >= from, or -1. */
  findNextClear(from: number): number {
    if (from >= this.nbits || from < 0) return -1;
    const words = this.words;
    let w = from >>> 5;
    let v = ~Atomics.load(words, w) & (~0 << (from & 31));
    for (;;) {
      if (v !== 0) {
        const bit = (w << 5) + (31 - Math.clz32(v & -v));
        return bit < this.nbits ? bit : -1;
      }
      if (++w >= words.length) return -1;
      v = ~Atomics.load(words, w);
    }
  }

  /** Number of set bits. */
  count(): number {
    let n = 0;
    const words = this.words;
    for (let w = 0; w < words.length; w++) n += popcount32(Atomics.load(words, w));
    return n;
  }

  setAll(): void {
    const full = Math.floor(this.nbits / 32);
    for (let w = 0; w < full; w++) Atomics.store(this.words, w, -1);
    const rest = this.nbits & 31;
    if (rest) Atomics.store(this.words, full, (1 << rest) - 1);
  }

  clearAll(): void {
    for (let w = 0; w < this.words.length; w++) Atomics.store(this.words, w, 0);
  }
}

export function popcount32(v: number): number {
  v = v - ((v >>> 1) & 0x55555555);
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return (((v + (v >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}
