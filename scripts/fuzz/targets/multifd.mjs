/**
 * Multifd's decoders (packages/multifd):
 *
 *  - multifd-init     decodeMultifdInit: a channel's first 64 bytes, against 1..64 channels;
 *  - multifd-header   decodeMultifdPacketHeader, then the checks the receiver makes before it
 *                     writes a byte (checkMultifdExpected, checkMultifdOffsets); an accepted
 *                     header must satisfy every limit those functions claim to check;
 *  - packet-receiver  PacketReceiver, the recv thread's parser, fed a mutated channel stream as
 *                     reads of random sizes landing where target() says (as
 *                     packet-receiver.test.ts drives it, and as Node's onread does over a
 *                     socket), sometimes with RAM that appears late (the staging path) or
 *                     bytes handed over before the channel (feed). Seeds: QEMU 7.2's two
 *                     channels (1-3 packets at a time) and vmig's encoder with none, lz4, zlib.
 *                     Invariants: only documented refusals reach hooks.fail, nothing throws
 *                     out of target()/landed()/feed(), target() is never empty, beginPages and
 *                     endPages pair, and no byte of RAM changes outside the pages of a header
 *                     the receiver accepted (beginPages).
 */
import { core, multifd } from '../pkgs.mjs';
import { FuzzTimeout, InvariantError, describeError, isRefusal, outcomeOfError, codeOf } from '../common.mjs';
import { mutate } from '../mutate.mjs';
import * as S from '../seeds.mjs';

const { GuestRam, TARGET_PAGE_SIZE: P } = core;
const {
  decodeMultifdInit,
  decodeMultifdPacketHeader,
  checkMultifdExpected,
  checkMultifdOffsets,
  PacketReceiver,
  MULTIFD_INIT_SIZE,
  MULTIFD_PACKET_HEADER_SIZE,
  MULTIFD_PAGE_COUNT,
  MULTIFD_FLAGS_KNOWN,
  MULTIFD_FLAG_ZLIB,
  MULTIFD_FLAG_VMIG_LZ4,
} = multifd;

const FLAGS = [0, MULTIFD_FLAG_ZLIB, MULTIFD_FLAG_VMIG_LZ4];

/* ------------------------------------------------------------------ MultiFDInit_t */

export const initTarget = {
  name: 'multifd-init',
  async prepare() {
    const hot = [0, 4, 8, 24, 25, 32, 40, 56];
    return { seeds: S.multifdInits().map((bytes, i) => ({ name: `init-${i}`, bytes, hot, tokens: S.MULTIFD_TOKENS })) };
  },
  async run(state, rng) {
    const seed = rng.pick(state.seeds);
    const { bytes, ops } = mutate(rng, seed, state.seeds);
    const channels = rng.chance(0.3) ? rng.range(1, 64) : 2;
    let outcome;
    try {
      const init = decodeMultifdInit(bytes, channels, 'multifd');
      if (bytes.length < MULTIFD_INIT_SIZE) throw new InvariantError(`accepted an init of ${bytes.length} bytes`);
      if (!Number.isInteger(init.id) || init.id < 0 || init.id >= channels) throw new InvariantError(`accepted channel id ${init.id} with ${channels} channels`);
      if (init.uuid.length !== 16) throw new InvariantError(`uuid of ${init.uuid.length} bytes`);
      outcome = { kind: 'ok' };
    } catch (e) {
      outcome = e instanceof InvariantError ? { kind: 'crash', code: 'invariant', error: e.message } : outcomeOfError(e);
    }
    return { ...outcome, seed: seed.name, ops, input: bytes };
  },
};

/* ------------------------------------------------------------------ packet headers */

export const headerTarget = {
  name: 'multifd-header',
  async prepare() {
    const q = S.qemuCapture();
    const seeds = [];
    for (const [name, conn] of [['conn1', q.conn1], ['conn2', q.conn2]]) {
      S.splitPackets(conn.subarray(MULTIFD_INIT_SIZE)).forEach((p, i) => seeds.push({ name: `qemu-${name}-packet${i}`, bytes: p.slice(0, MULTIFD_PACKET_HEADER_SIZE) }));
    }
    for (const m of ['none', 'lz4', 'zlib']) {
      const { stream } = await S.vmigPackets(m);
      S.splitPackets(stream).forEach((p, i) => seeds.push({ name: `vmig-${m}-packet${i}`, bytes: p.slice(0, MULTIFD_PACKET_HEADER_SIZE) }));
    }
    for (const s of seeds) {
      s.hot = S.packetHot(s.bytes);
      s.tokens = S.MULTIFD_TOKENS;
    }
    return { seeds };
  },
  async run(state, rng) {
    const seed = rng.pick(state.seeds);
    const m = mutate(rng, seed, state.seeds);
    // The receiver always decodes a full header buffer: the mutated bytes, cut or zero-padded
    // to its size (a shorter header never reaches the decoder).
    const b = new Uint8Array(MULTIFD_PACKET_HEADER_SIZE);
    b.set(m.bytes.subarray(0, MULTIFD_PACKET_HEADER_SIZE));
    const used = rng.pick([16 << 20, 64 * P, P, rng.range(1, 8192) * P]);
    const flag = rng.chance(0.7) ? 0 : rng.pick(FLAGS);
    const legacy = rng.chance(0.5);
    let outcome;
    try {
      const h = decodeMultifdPacketHeader(b, 0, 'multifd/0');
      checkMultifdExpected(h, flag, legacy, 'multifd/0');
      checkMultifdOffsets(h, used, 'multifd/0');
      // What the checks claim, held by what they accepted.
      if ((h.flags & ~MULTIFD_FLAGS_KNOWN) !== 0) throw new InvariantError(`accepted unknown flags 0x${h.flags.toString(16)}`);
      if (!(h.pagesAlloc <= MULTIFD_PAGE_COUNT && h.normalPages + h.zeroPages <= h.pagesAlloc)) throw new InvariantError(`accepted counts alloc ${h.pagesAlloc} normal ${h.normalPages} zero ${h.zeroPages}`);
      if (h.offsets.length !== h.normalPages + h.zeroPages) throw new InvariantError('offsets and counts disagree');
      for (const off of h.offsets) {
        if (!Number.isSafeInteger(off) || off < 0 || off % P !== 0 || off + P > used) throw new InvariantError(`accepted offset ${off} for a block of ${used} bytes`);
      }
      if (h.ramblock.includes('\0')) throw new InvariantError('block name with a NUL');
      if (legacy && h.zeroPages !== 0) throw new InvariantError('zero pages in the legacy dialect');
      outcome = { kind: 'ok' };
    } catch (e) {
      outcome = e instanceof InvariantError ? { kind: 'crash', code: 'invariant', error: e.message } : outcomeOfError(e);
    }
    return { ...outcome, seed: seed.name, ops: m.ops, input: b };
  },
};

/* ------------------------------------------------------------------ the recv parser */

const FILL = 0xee;

/**
 * RAM per layout, reused across inputs: after an input only the pages it may have written
 * (those of accepted headers) are reset to FILL; the rest was just checked to be FILL. A
 * RAM is replaced after a hang (a parser left behind may still write into it) or a broken
 * invariant.
 */
class RamPool {
  constructor() {
    this.rams = new Map();
    this.fill = Buffer.alloc(16 << 20, FILL);
  }
  take(layout, discard) {
    const key = JSON.stringify(layout);
    let entry = this.rams.get(key);
    if (!entry || discard) {
      const ram = GuestRam.create(layout.map(([idstr, pages]) => ({ idstr, size: pages * P })), { prefault: false });
      for (const b of ram.blocks) b.host.fill(FILL);
      entry = { ram, touched: [] };
      this.rams.set(key, entry);
    }
    for (const [b, p] of entry.touched) b.host.fill(FILL, p * P, (p + 1) * P);
    entry.touched = [];
    for (const b of entry.ram.blocks) {
      b.loaded.clearAll();
      b.arrived.clearAll();
    }
    return entry;
  }

  /**
   * The first page of `ram` that is not FILL and not in `allowed`, or undefined. Compares
   * runs of pages between allowed ones at once. Records the allowed pages for the next reset.
   */
  check(entry, allowed) {
    for (const b of entry.ram.blocks) {
      const host = b.host;
      let start = 0;
      for (let p = 0; p <= b.pages; p++) {
        const ok = p < b.pages && allowed.has(`${b.idstr}:${p}`);
        if (p < b.pages && !ok) continue;
        if (p > start && this.fill.compare(host, start * P, p * P, 0, (p - start) * P) !== 0) {
          for (let q = start; q < p; q++) if (this.fill.compare(host, q * P, (q + 1) * P, 0, P) !== 0) return `${b.idstr}:${q}`;
        }
        if (ok) entry.touched.push([b, p]);
        start = p + 1;
      }
    }
    return undefined;
  }
}

/**
 * Feeds `stream` to a fresh PacketReceiver. Returns { outcome, ram }. `cfg` fixes what the
 * Rng would choose (references).
 */
async function receive(state, seed, stream, rng, { hangMs, cfg = {} }) {
  const entry = state.pool.take(seed.layout, state.discard);
  const ram = entry.ram;
  state.discard = false;
  const ramLater = cfg.ramLater ?? rng.chance(0.2);
  let haveRam = !ramLater;
  let ramWaiter;
  let resumeWaiter;
  let begun = 0;
  let ended = 0;
  let failed;
  let syncs = 0;
  const allowed = new Set();
  const expected = cfg.expected ?? (rng.chance(0.85) ? seed.expected : { compressionFlag: rng.pick(FLAGS), legacy: rng.chance(0.5) });
  const hooks = {
    ram: () => (haveRam ? ram : undefined),
    ramReady: () => (haveRam ? Promise.resolve() : new Promise((r) => (ramWaiter = r))),
    beginPages: (h) => {
      begun++;
      const block = ram.find(h.ramblock);
      for (const off of h.offsets) allowed.add(`${h.ramblock}:${off / P}`);
      if (!block) throw new InvariantError(`beginPages for unknown block '${h.ramblock}'`);
    },
    endPages: () => void ended++,
    sync: () => void syncs++,
    resume: () => resumeWaiter?.(),
    fail: (e) => {
      failed ??= e;
      resumeWaiter?.();
    },
    expected: () => expected,
  };
  // zeroUnlessLoaded false: this RAM is pre-filled, not fresh (a zero page must be written).
  const rx = new PacketReceiver(hooks, 'multifd/0', false);
  let outcome;
  try {
    let pos = 0;
    // Bytes read before the handoff (the leftover of the init read) go through feed().
    if (!cfg.whole && rng.chance(0.2)) {
      const k = Math.min(stream.length, rng.range(1, 2000));
      rx.feed(stream.subarray(0, k));
      pos = k;
    }
    const sizes = cfg.whole ? [65536] : rng.readSizes();
    // Large streams in fewer, larger reads (a megabyte a byte at a time proves nothing more).
    const minRead = Math.ceil(stream.length / 3000);
    let reads = 0;
    while (pos < stream.length && failed === undefined) {
      const t = rx.target();
      if (!(t instanceof Uint8Array) || t.length === 0) throw new InvariantError('target() gave no room');
      const n = Math.min(t.length, Math.max(minRead, sizes[reads % sizes.length]), stream.length - pos);
      t.set(stream.subarray(pos, pos + n));
      pos += n;
      reads++;
      const resumed = new Promise((r) => (resumeWaiter = r));
      if (ramLater && !haveRam && reads >= (cfg.ramAfter ?? 3)) {
        // Guest RAM appears (the main stream's block list came) while bytes are staged.
        haveRam = true;
        ramWaiter?.();
      }
      if (!rx.landed(t, n)) {
        if (!haveRam) {
          haveRam = true;
          ramWaiter?.();
        }
        let timer;
        await Promise.race([resumed, new Promise((_, j) => (timer = setTimeout(() => j(new FuzzTimeout(hangMs)), hangMs)))]).finally(() => clearTimeout(timer));
      }
    }
    if (failed === undefined && !haveRam) {
      haveRam = true;
      ramWaiter?.();
    }
    // Let a last decompression or RAM wait finish.
    if (failed === undefined && !rx.atPacketBoundary) await new Promise((r) => setTimeout(r, 0));
    if (failed !== undefined) {
      outcome = isRefusal(failed) ? { kind: 'rejected', code: codeOf(failed) } : { kind: 'crash', code: codeOf(failed), error: `via hooks.fail: ${describeError(failed)}` };
      if (begun !== ended) throw new InvariantError(`failed with beginPages ${begun} and endPages ${ended}`);
    } else if (!rx.atPacketBoundary) {
      // The recv thread: a channel that ends inside a packet is VMIG_ERR_PEER_CLOSED.
      outcome = { kind: 'rejected', code: 'VMIG_ERR_PEER_CLOSED' };
    } else {
      if (begun !== ended) throw new InvariantError(`at a packet boundary with beginPages ${begun} and endPages ${ended}`);
      outcome = { kind: 'ok' };
    }
  } catch (e) {
    if (e instanceof FuzzTimeout) state.discard = true;
    outcome = e instanceof InvariantError ? { kind: 'crash', code: 'invariant', error: e.message } : outcomeOfError(e);
  }
  // No byte outside the pages of an accepted header.
  if (outcome.kind !== 'hang') {
    const bad = state.pool.check(entry, allowed);
    if (bad) {
      outcome = { kind: 'crash', code: 'invariant', error: `page ${bad} changed, but no accepted header named it` };
      state.discard = true;
    }
  }
  return { outcome, ram, syncs };
}

export const receiverTarget = {
  name: 'packet-receiver',
  async prepare() {
    const q = S.qemuCapture();
    const seeds = [];
    const qemuLayout = [['mem', 4096]];
    for (const [name, conn] of [['conn1', q.conn1], ['conn2', q.conn2]]) {
      const packets = S.splitPackets(conn.subarray(MULTIFD_INIT_SIZE));
      // Windows of one to three packets (a whole channel is ~3 MB: too much per input).
      for (let i = 0; i < packets.length; i += 2) {
        const win = packets.slice(i, i + 1 + (i % 3));
        seeds.push({ name: `qemu-${name}-p${i}`, bytes: new Uint8Array(Buffer.concat(win)), layout: qemuLayout, expected: { compressionFlag: 0, legacy: true } });
      }
    }
    for (const m of ['none', 'lz4', 'zlib']) {
      const { stream } = await S.vmigPackets(m, FILL);
      seeds.push({ name: `vmig-${m}`, bytes: stream, layout: [['pc.ram', 64], ['vga.vram', 4]], expected: { compressionFlag: m === 'lz4' ? MULTIFD_FLAG_VMIG_LZ4 : m === 'zlib' ? MULTIFD_FLAG_ZLIB : 0, legacy: false } });
    }
    const state = { seeds, pool: new RamPool(), discard: false };
    for (const s of seeds) {
      s.hot = S.packetHot(s.bytes);
      s.tokens = S.MULTIFD_TOKENS;
      // Reference: the unmutated seed, read whole.
      const { outcome, ram } = await receive(state, s, s.bytes, null, { hangMs: 10_000, cfg: { whole: true, ramLater: false, expected: s.expected } });
      if (outcome.kind !== 'ok') throw new Error(`seed ${s.name} is not received: ${JSON.stringify(outcome)}`);
      s.ref = ram.blocks.map((b) => Buffer.from(b.host));
    }
    return state;
  },
  async run(state, rng, opts) {
    const seed = rng.pick(state.seeds);
    // Splice only within the same RAM layout (other blocks would be unknown anyway).
    const { bytes, ops } = mutate(rng, seed, state.seeds.filter((s) => s.layout === seed.layout && s !== seed));
    const { outcome, ram } = await receive(state, seed, bytes, rng, { hangMs: opts.hangMs });
    if (outcome.kind === 'ok' && ram.blocks.some((b, i) => Buffer.compare(b.host, seed.ref[i]) !== 0)) outcome.wrongRam = { strict: false };
    return { ...outcome, seed: seed.name, ops, input: bytes };
  },
};
