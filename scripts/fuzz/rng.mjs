/**
 * Deterministic randomness: every input is derived from (--seed, target, index) alone, so
 * any one input can be rebuilt without running the others (`--repro TARGET:INDEX`).
 */

/** FNV-1a over a string, then a murmur3 finalizer: a well-mixed 32-bit seed. */
export function hash32(text) {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/** sfc32: small, fast, good enough for fuzzing; never seeded all-zero. */
export class Rng {
  constructor(seed) {
    this.a = seed >>> 0;
    this.b = (seed ^ 0x9e3779b9) >>> 0;
    this.c = (seed ^ 0x243f6a88) >>> 0;
    this.d = 1;
    for (let i = 0; i < 12; i++) this.u32();
  }

  static for(seed, target, index) {
    return new Rng(hash32(`${seed}/${target}/${index}`));
  }

  u32() {
    const t = (((this.a + this.b) | 0) + this.d) | 0;
    this.d = (this.d + 1) | 0;
    this.a = this.b ^ (this.b >>> 9);
    this.b = (this.c + (this.c << 3)) | 0;
    this.c = (this.c << 21) | (this.c >>> 11);
    this.c = (this.c + t) | 0;
    return t >>> 0;
  }

  /** An integer in [0, n). */
  int(n) {
    return n <= 0 ? 0 : Math.floor((this.u32() / 0x1_0000_0000) * n);
  }

  /** An integer in [lo, hi]. */
  range(lo, hi) {
    return lo + this.int(hi - lo + 1);
  }

  chance(p) {
    return this.u32() / 0x1_0000_0000 < p;
  }

  pick(arr) {
    return arr[this.int(arr.length)];
  }

  /** Picks from [[weight, value], ...]. */
  weighted(choices) {
    const total = choices.reduce((n, [w]) => n + w, 0);
    let r = this.int(total);
    for (const [w, v] of choices) {
      if (r < w) return v;
      r -= w;
    }
    return choices[choices.length - 1][1];
  }

  bytes(n) {
    const b = new Uint8Array(n);
    for (let i = 0; i < n; i++) b[i] = this.u32() & 0xff;
    return b;
  }

  /** Read sizes for a simulated transport: mostly small and odd, sometimes large. */
  readSizes(max = 70_000) {
    const n = this.range(1, 12);
    const out = [];
    for (let i = 0; i < n; i++) {
      out.push(this.weighted([
        [3, this.range(1, 16)],
        [4, this.range(17, 4200)],
        [2, this.range(4201, max)],
      ]));
    }
    return out;
  }
}
