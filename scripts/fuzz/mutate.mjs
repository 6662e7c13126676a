/**
 * Mutation operators over byte strings. A seed is { bytes, hot?: number[], tokens?: Uint8Array[] }:
 * `hot` are offsets where a decoder starts reading a field (found by tracing a load of the
 * unmutated seed), so that most mutations land on structure instead of page payload;
 * `tokens` are byte strings of the format worth inserting (flag words, magics, markers);
 * `top` are offsets where a top-level element of a main stream may start (after a section
 * footer), `sections` whole elements to insert there.
 *
 * Every operator is deterministic given the Rng. mutate() stacks 1..4 of them (AFL's
 * "havoc"), and names what it did, for the report.
 */

/** Byte values at the edges of signed and unsigned ranges. */
export const BOUNDARY_BYTES = [0x00, 0xff, 0x7f, 0x80, 0x01, 0xfe];

/** be32 values a length, count or id field should be tested with. */
const BE32_EXTREMES = [0, 1, 0x7f, 0x80, 0xff, 0x100, 0xfff, 0x1000, 0xffff, 0x10000, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff];
/** be64 values as [hi, lo]: 2^53 and above are the interesting ones for JS numbers. */
const BE64_EXTREMES = [
  [0, 0],
  [0, 1],
  [0, 0x1000],
  [0, 0xfff],
  [0, 0x7fffffff],
  [0, 0xffffffff],
  [0x1, 0],
  [0x1f_ffff, 0xffffffff], // 2^53 - 1
  [0x20_0000, 0], // 2^53
  [0x7fffffff, 0xffffffff],
  [0x80000000, 0],
  [0xffffffff, 0xffffffff],
];

function setBe32(b, p, v) {
  if (p < 0 || p + 4 > b.length) return;
  b[p] = v >>> 24;
  b[p + 1] = (v >>> 16) & 0xff;
  b[p + 2] = (v >>> 8) & 0xff;
  b[p + 3] = v & 0xff;
}

function concat(parts) {
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

/** A position in `b`: mostly a hot offset (plus a small step into its field), else anywhere. */
function position(rng, b, hot) {
  if (b.length === 0) return 0;
  if (hot && hot.length > 0 && rng.chance(0.75)) {
    const h = rng.pick(hot) + (rng.chance(0.5) ? 0 : rng.int(12));
    if (h < b.length) return h;
  }
  return rng.int(b.length);
}

function chunkLen(rng, max) {
  return Math.max(1, Math.min(max, rng.weighted([
    [5, rng.range(1, 8)],
    [3, rng.range(9, 64)],
    [1, rng.range(65, 5000)],
  ])));
}

/** The operators: each takes (rng, bytes, seed, other) and returns [name, newBytes]. */
const OPS = {
  bitflip(rng, b, s) {
    const out = b.slice();
    const n = rng.range(1, 4);
    for (let i = 0; i < n && out.length; i++) {
      const p = position(rng, out, s.hot);
      out[p] ^= 1 << rng.int(8);
    }
    return ['bitflip', out];
  },
  boundaryByte(rng, b, s) {
    const out = b.slice();
    if (out.length) out[position(rng, out, s.hot)] = rng.pick(BOUNDARY_BYTES);
    return ['boundary-byte', out];
  },
  arith(rng, b, s) {
    const out = b.slice();
    if (out.length) {
      const p = position(rng, out, s.hot);
      out[p] = (out[p] + rng.pick([1, -1, 2, -2, 16, -16, 35, -35])) & 0xff;
    }
    return ['arith', out];
  },
  truncate(rng, b, s) {
    const at = rng.chance(0.5) ? position(rng, b, s.hot) : rng.int(b.length + 1);
    return ['truncate', b.slice(0, at)];
  },
  insertRandom(rng, b, s) {
    const at = position(rng, b, s.hot);
    return ['insert-random', concat([b.subarray(0, at), rng.bytes(chunkLen(rng, 256)), b.subarray(at)])];
  },
  insertToken(rng, b, s) {
    if (!s.tokens?.length) return OPS.insertRandom(rng, b, s);
    const at = position(rng, b, s.hot);
    return ['insert-token', concat([b.subarray(0, at), rng.pick(s.tokens), b.subarray(at)])];
  },
  overwriteToken(rng, b, s) {
    if (!s.tokens?.length) return OPS.boundaryByte(rng, b, s);
    const out = b.slice();
    const t = rng.pick(s.tokens);
    const at = position(rng, out, s.hot);
    out.set(t.subarray(0, Math.max(0, out.length - at)), at);
    return ['overwrite-token', out];
  },
  deleteChunk(rng, b, s) {
    if (!b.length) return ['delete', b];
    const at = position(rng, b, s.hot);
    const n = chunkLen(rng, b.length - at);
    return ['delete', concat([b.subarray(0, at), b.subarray(at + n)])];
  },
  duplicateChunk(rng, b, s) {
    if (!b.length) return ['duplicate', b];
    const from = position(rng, b, s.hot);
    const n = chunkLen(rng, b.length - from);
    const chunk = b.subarray(from, from + n);
    // Right after itself (a repeated record) or anywhere (a record out of place).
    const at = rng.chance(0.5) ? from + n : position(rng, b, s.hot);
    return ['duplicate', concat([b.subarray(0, at), chunk, b.subarray(at)])];
  },
  lengthField(rng, b, s) {
    const out = b.slice();
    const at = position(rng, out, s.hot);
    if (rng.chance(0.5)) {
      let v = rng.pick(BE32_EXTREMES);
      if (rng.chance(0.2)) v = (out.length - at + rng.range(-2, 2)) >>> 0;
      setBe32(out, at, v);
      return ['be32-extreme', out];
    }
    const [hi, lo] = rng.pick(BE64_EXTREMES);
    setBe32(out, at, hi);
    setBe32(out, at + 4, rng.chance(0.3) ? (lo | rng.int(0x1000)) >>> 0 : lo); // keep or vary the flag bits
    return ['be64-extreme', out];
  },
  /**
   * A whole top-level element (a RAM section with a page, a device section, a command) where
   * one may start: right after a section footer. What a hostile source would send in the
   * wrong place (e.g. RAM after the integrity section, a second package).
   */
  insertSection(rng, b, s) {
    if (!s.top?.length || !s.sections?.length) return OPS.insertToken(rng, b, s);
    const at = rng.pick(s.top);
    return ['insert-section', concat([b.subarray(0, at), rng.pick(s.sections), b.subarray(at)])];
  },
  /** A run of whole fields (between two hot offsets) deleted, or copied elsewhere. */
  fieldRun(rng, b, s) {
    if (!s.hot || s.hot.length < 3) return OPS.duplicateChunk(rng, b, s);
    const i = rng.int(s.hot.length - 1);
    const j = Math.min(s.hot.length - 1, i + rng.range(1, 8));
    const [from, to] = [s.hot[i], s.hot[j]];
    if (to <= from || to > b.length) return OPS.duplicateChunk(rng, b, s);
    if (rng.chance(0.4)) return ['delete-fields', concat([b.subarray(0, from), b.subarray(to)])];
    const at = Math.min(b.length, rng.pick(s.hot));
    return ['copy-fields', concat([b.subarray(0, at), b.subarray(from, to), b.subarray(at)])];
  },
  splice(rng, b, s, other) {
    if (!other || !other.bytes.length || !b.length) return OPS.duplicateChunk(rng, b, s);
    const i = position(rng, b, s.hot);
    const j = position(rng, other.bytes, other.hot);
    return ['splice', concat([b.subarray(0, i), other.bytes.subarray(j)])];
  },
};

const WEIGHTS = [
  [14, 'bitflip'],
  [10, 'boundaryByte'],
  [5, 'arith'],
  [6, 'truncate'],
  [5, 'insertRandom'],
  [7, 'insertToken'],
  [7, 'overwriteToken'],
  [7, 'deleteChunk'],
  [7, 'duplicateChunk'],
  [12, 'lengthField'],
  [5, 'splice'],
  [4, 'insertSection'],
  [5, 'fieldRun'],
];

/**
 * A mutated copy of `seed.bytes`: 1..4 stacked operators (mostly one, so that a reject is
 * close to its cause). `others`: seeds of the same target to splice with.
 */
export function mutate(rng, seed, others = []) {
  let b = seed.bytes;
  const ops = [];
  const n = rng.weighted([[6, 1], [3, 2], [1, 3], [1, 4]]);
  for (let i = 0; i < n; i++) {
    const op = rng.weighted(WEIGHTS);
    const [name, out] = OPS[op](rng, b, seed, others.length ? rng.pick(others) : undefined);
    ops.push(name);
    b = out;
  }
  return { bytes: b, ops };
}

/** Hex of the first `n` bytes, for reports. */
export function hexPrefix(b, n = 64) {
  return Buffer.from(b.subarray(0, n)).toString('hex') + (b.length > n ? `...(${b.length} bytes)` : '');
}
