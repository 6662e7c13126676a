/**
 * The main-stream loader (core's qemuLoadVmState), the way its two callers in the CLI use it:
 *
 *  - loadvm           `vmig incoming`: the devices it registers (timer, globalstate,
 *                     vmig-vcpus, vmig-its, vmig-integrity), RAM given up front (--ram) or
 *                     built from the stream under a RAM cap (--max-ram), a multifd barrier
 *                     when it has channels, the page check at the end (VMIG_ERR_PAGES_MISSING),
 *                     --integrity's requirement, the vmdesc after EOF;
 *  - loadvm-postcopy  the same with a postcopy state machine (PostcopyIncoming), fed postcopy
 *                     command streams (ADVISE, DISCARD, PACKAGED{LISTEN, devices, RUN}, pages
 *                     after RUN);
 *  - snapshot         `vmig restore`: snapshot files (BackgroundSnapshot's output) through a
 *                     ByteReader, as restore reads its file, into fresh RAM.
 *
 * Invariants checked on every input, accepted or refused:
 *  - only documented refusals are thrown (common.mjs);
 *  - RAM is never resized, and RAM given up front is the RAM the result names;
 *  - no write outside what the loader accepted: RAM given up front is pre-filled, and every
 *    page that differs from the fill afterwards must be one the loader marked loaded or
 *    arrived, or placed through the postcopy map (fresh RAM: the same against zero). An input
 *    refused before its first page record leaves RAM exactly as it was (main-stream.test.ts
 *    'RAM untouched', generalised);
 *  - an accepted input's RAM is compared with the unmutated seed's (wrongRam).
 */
import { Readable } from 'node:stream';
import { channel, core, harness } from '../pkgs.mjs';
import { FuzzTimeout, InvariantError, outcomeOfError, randomChunks, withDeadline } from '../common.mjs';
import { mutate } from '../mutate.mjs';
import * as S from '../seeds.mjs';

const {
  DeviceRegistry,
  EndOfStream,
  GlobalStateDevice,
  GuestRam,
  MemorySource,
  PostcopyIncoming,
  RamIntegrityDevice,
  StreamError,
  TimerDevice,
  VmigError,
  createReturnPath,
  qemuLoadVmState,
  readVmDescription,
  TARGET_PAGE_SIZE: P,
} = core;
const { ByteReader } = channel;
const { ItsTableDevice, VcpuStateDevice, digestRam } = harness;

/** What RAM given up front holds before a load: a value no seed's page is made of. */
const PREFILL = 0x11;
/**
 * How long a postcopy load waits for missing pages after EOF before it fails (the CLI's
 * --channel-timeout): well inside the hang bound, so a stream that never sends a page it
 * discarded is a rejection here, as it is at `vmig incoming`.
 */
const FINISH_TIMEOUT_MS = 500;
/** `vmig incoming --max-ram` as the fuzzer runs it (in process and over sockets). */
export const MAX_RAM = 64 << 20;

/** The received-map placement, recorded: the pages a postcopy load was allowed to write. */
class TracingPostcopy extends PostcopyIncoming {
  constructor(opts, placed) {
    super(opts);
    this.placedPages = placed;
  }
  placePage(block, offset, data) {
    this.placedPages.add(`${block.idstr}:${offset / P}`);
    super.placePage(block, offset, data);
  }
}

/** RAM of `layout` pre-filled with PREFILL, kept per seed and reset before each input. */
class UpFrontRam {
  constructor(layout) {
    this.layout = layout;
    this.ram = undefined;
  }
  /** Fresh contents; `discard`: a load that hung may still hold the old RAM, so make a new one. */
  take(discard = false) {
    if (!this.ram || discard) this.ram = GuestRam.create(this.layout.map(([idstr, pages]) => ({ idstr, size: pages * P })), { prefault: false });
    for (const b of this.ram.blocks) {
      b.host.fill(PREFILL);
      b.loaded.clearAll();
      b.arrived.clearAll();
    }
    return this.ram;
  }
}

const FILL_PAGES = new Map();
function fillPage(v) {
  if (!FILL_PAGES.has(v)) FILL_PAGES.set(v, Buffer.alloc(P, v));
  return FILL_PAGES.get(v);
}

/** Invariant: every page that differs from `fill` was accepted by the loader. */
function checkWrites(ram, fill, placed) {
  const ref = fillPage(fill);
  for (const b of ram.blocks) {
    const host = b.host;
    if (b.host.length !== b.usedLength || b.segments.reduce((n, s) => n + s.length, 0) !== b.usedLength) throw new InvariantError(`block '${b.idstr}' resized: ${b.host.length} bytes, ${b.usedLength} declared`);
    for (let p = 0; p < b.pages; p++) {
      if (b.arrived.test(p) || b.loaded.test(p) || placed.has(`${b.idstr}:${p}`)) continue;
      if (ref.compare(host, p * P, (p + 1) * P) !== 0) throw new InvariantError(`page ${p} of block '${b.idstr}' was written, but the loader accepted no record for it`);
    }
  }
}

function sameRam(ram, ref) {
  if (ram.blocks.length !== ref.blocks.length) return false;
  for (let i = 0; i < ram.blocks.length; i++) {
    const a = ram.blocks[i];
    const b = ref.blocks[i];
    if (a.idstr !== b.idstr || a.usedLength !== b.usedLength) return false;
    if (Buffer.compare(a.host, b.bytes) !== 0) return false;
  }
  return true;
}

/** A snapshot of a RAM for later comparison. */
function freeze(ram) {
  return { blocks: ram.blocks.map((b) => ({ idstr: b.idstr, usedLength: b.usedLength, bytes: Buffer.from(b.host) })) };
}

/**
 * One load of `bytes`, as `mode` ('incoming' or 'restore') runs it. `cfg` fixes what the
 * Rng would choose (used to compute references).
 */
async function loadOnce(seed, bytes, rng, { mode, strictIntegrity, hangMs, cfg = {} }) {
  const upFront = cfg.upFront ?? (mode === 'incoming' && rng.chance(0.5));
  let ram = upFront ? seed.upFront.take(seed.discardUpFront) : undefined;
  seed.discardUpFront = false;
  const fill = upFront ? PREFILL : 0;
  const created = [];
  const placed = new Set();
  let timedOut;
  let capped = false;

  const vcpuState = new VcpuStateDevice(() => ({ writers: 0, writes: 0, pattern: '' }));
  const its = new ItsTableDevice(() => ram);
  const integrity = new RamIntegrityDevice(() => ram);
  const devices = new DeviceRegistry().register(new TimerDevice()).register(new GlobalStateDevice()).register(vcpuState).register(its);
  if (mode === 'incoming') devices.register(integrity);

  let postcopy;
  if (mode === 'incoming' && seed.postcopy) {
    // As postcopy-guest.ts: RUN starts as many vCPUs as vmig-vcpus says (none run here; no
    // vCPU, so nothing is written on the return path).
    postcopy = new TracingPostcopy(
      { returnPath: () => createReturnPath(-1), onRun: (_shared, placer) => placer.setRunningVcpus(vcpuState.loaded?.writers ?? 0), finishTimeoutMs: FINISH_TIMEOUT_MS },
      placed,
    );
  }

  const chunks = cfg.whole ? [bytes] : randomChunks(rng, bytes, seed.hot);
  // restore reads its file through a ByteReader; incoming's main channel is one too (over a
  // socket), so half the incoming loads use it as well.
  const viaReader = mode === 'restore' || (!cfg.whole && rng.chance(0.5));
  const source = viaReader ? new ByteReader(Readable.from(chunks.map((c) => Buffer.from(c)), { objectMode: false }), { channel: mode === 'restore' ? 'file' : 'main' }) : new MemorySource(chunks);
  const multifd = mode === 'incoming' && (cfg.multifd ?? (seed.multifd || rng.chance(0.25))) ? { sync: async () => {}, setDialect: () => {} } : undefined;

  let outcome;
  let result;
  try {
    const load = qemuLoadVmState(source, {
      ram,
      zeroUnlessLoaded: !upFront,
      createRam: (blocks) => {
        const total = blocks.reduce((n, b) => n + b.usedLength, 0);
        if (total > MAX_RAM) {
          if (mode === 'restore') capped = true; // restore has no cap: note what it would allocate
          throw new StreamError('VMIG_ERR_RAM_LIMIT', `the stream declares ${total} bytes of RAM (fuzzer cap ${MAX_RAM})`, { channel: 'main' });
        }
        const r = GuestRam.create(blocks.map((b) => ({ idstr: b.idstr, size: b.usedLength })), { prefault: false });
        created.push(r);
        return r;
      },
      onRamReady: (r) => (ram = r),
      multifd,
      expectLegacyDialect: cfg.legacy ?? (multifd !== undefined && rng.chance(0.1)),
      devices,
      postcopy,
      failed: () => timedOut,
      channel: mode === 'restore' ? 'file' : undefined,
    });
    result = await withDeadline(load, hangMs, () => (timedOut = new FuzzTimeout(hangMs)));
    ram = result.ram;
    if (mode === 'incoming') {
      // incoming.ts: a precopy load must have every page (only for seeds that carry them
      // all). Not after a postcopy switch (POSTCOPY_SWITCHED there): pages placed through the
      // received map do not set `arrived`.
      const switched = postcopy !== undefined && ['listening', 'running', 'end'].includes(postcopy.state);
      if (seed.complete && !switched && ram.missingPages().length > 0) throw new StreamError('VMIG_ERR_PAGES_MISSING', 'pages never arrived', { channel: 'main' });
      // incoming.ts: digests that came are compared once the load is over.
      if (integrity.received) integrity.verify();
      else if (strictIntegrity && seed.integrity) throw new VmigError('VMIG_ERR_INTEGRITY', 'no RAM digests (start it with --integrity too)');
      if (postcopy?.state === 'end') its.checkTableInRam();
    } else {
      digestRam(ram);
    }
    // Both commands read QEMU's JSON description after EOF, if any.
    try {
      await withDeadline(readVmDescription(source), hangMs);
    } catch (e) {
      if (!(e instanceof EndOfStream)) throw e;
    }
    outcome = { kind: 'ok' };
  } catch (e) {
    outcome = outcomeOfError(e);
    if (outcome.kind === 'hang') {
      seed.discardUpFront = true;
      const pc = postcopy ? `; postcopy state ${postcopy.state.toUpperCase()}, ${postcopy.placer?.missing() ?? '?'} page(s) missing` : '';
      outcome.error += ` (read ${source.bytesRead} of ${bytes.length} bytes${pc})`;
    }
  } finally {
    postcopy?.abort();
  }

  // Invariants, whatever happened.
  try {
    if (upFront && result && result.ram !== seed.upFront.ram) throw new InvariantError('the loader returned other RAM than it was given');
    const check = upFront ? seed.upFront.ram : created[created.length - 1];
    if (check) checkWrites(check, fill, placed);
    if (upFront && created.length > 0) throw new InvariantError('the loader created RAM although RAM was given');
  } catch (e) {
    outcome = { kind: 'crash', code: 'invariant', error: `${e.name}: ${e.message}` };
  }
  if (outcome.kind === 'ok') {
    const ref = upFront ? seed.refUpFront : seed.refFresh;
    // Strict: the integrity check was required (--integrity) or said it passed.
    if (ref && !sameRam(ram, ref)) outcome.wrongRam = { strict: seed.integrity === true && (strictIntegrity || integrity.verified) };
  }
  if (capped) outcome.note = 'restore-uncapped-ram';
  return { outcome, ram };
}

/** Builds a seed entry: bytes, hot offsets, references for both RAM modes. */
async function makeSeed(name, bytes, layout, flags, mode) {
  const seed = { name, bytes, layout, ...flags, upFront: new UpFrontRam(layout), tokens: S.MAIN_TOKENS };
  let traceRam;
  seed.hot = await S.traceHot(bytes, async (src) => {
    await qemuLoadVmState(src, {
      createRam: (blocks) => GuestRam.create(blocks.map((b) => ({ idstr: b.idstr, size: b.usedLength })), { prefault: false }),
      onRamReady: (r) => (traceRam = r),
      multifd: flags.multifd ? { sync: async () => {}, setDialect: () => {} } : undefined,
      devices: new DeviceRegistry()
        .register(new TimerDevice())
        .register(new GlobalStateDevice())
        .register(new VcpuStateDevice(() => ({ writers: 0, writes: 0, pattern: '' })))
        .register(new ItsTableDevice(() => traceRam))
        .register(new RamIntegrityDevice(() => traceRam)),
      ...(flags.postcopy ? { postcopy: new PostcopyIncoming({ returnPath: () => createReturnPath(-1), onRun: () => {}, finishTimeoutMs: FINISH_TIMEOUT_MS }) } : {}),
    });
    // QEMU and vmig precopy append a vmdesc; vmig's postcopy and snapshots may not.
    await readVmDescription(src).catch((e) => {
      if (!(e instanceof EndOfStream)) throw e;
    });
  });
  seed.top = S.topLevelOffsets(bytes, seed.hot);
  seed.sections = S.mainSections();
  // References: the unmutated seed, loaded whole, in each RAM mode. They must load.
  for (const upFront of mode === 'incoming' ? [false, true] : [false]) {
    const { outcome, ram } = await loadOnce(seed, bytes, null, { mode, strictIntegrity: false, hangMs: 10_000, cfg: { upFront, whole: true, multifd: !!flags.multifd, legacy: false } });
    if (outcome.kind !== 'ok') throw new Error(`seed ${name} (${upFront ? 'RAM up front' : 'fresh RAM'}) does not load: ${JSON.stringify(outcome)}`);
    seed[upFront ? 'refUpFront' : 'refFresh'] = freeze(ram);
  }
  return seed;
}

const LAYOUT = [['pc.ram', 64], ['vga.vram', 8]];

/** Precopy seeds for `vmig incoming`. Exported: the socket target sends the same streams. */
export async function incomingSeeds() {
  const q = S.qemuCapture();
  const mk = (layout, seed) => S.makeRam(layout, seed);
  const seeds = [
    await makeSeed('qemu-7.2-conn0', q.conn0, [['mem', 4096]], { multifd: true, complete: false }, 'incoming'),
    await makeSeed('vmig-precopy', await S.precopyStream(mk(LAYOUT, 1)), LAYOUT, { complete: true }, 'incoming'),
    await makeSeed('vmig-precopy-nozero', await S.precopyStream(mk(LAYOUT, 2), { zeroPageDetection: 'none' }), LAYOUT, { complete: true }, 'incoming'),
    await makeSeed('vmig-precopy-integrity', await S.precopyStream(mk(LAYOUT, 3), { integrity: true }), LAYOUT, { complete: true, integrity: true }, 'incoming'),
    await makeSeed('vmig-precopy-3blocks', await S.precopyStream(mk([['pc.ram', 32], ['vga.vram', 4], ['rom', 1]], 4)), [['pc.ram', 32], ['vga.vram', 4], ['rom', 1]], { complete: true }, 'incoming'),
  ];
  // The main channel of a vmig multifd migration (pages on channels not fed here): the
  // modern dialect (MULTIFD_FLUSH) with zero pages found by the channels, and QEMU 7.2's.
  const link = (legacy) => ({ savePage() {}, ready: async () => {}, flushAndSync: async () => {}, quiesce() {}, flushAfterEachSection: legacy, pendingBytes: 0 });
  seeds.push(await makeSeed('vmig-multifd-main-modern', await S.precopyStream(mk(LAYOUT, 5), { zeroPageDetection: 'multifd', multifdLink: link(false) }), LAYOUT, { multifd: true, complete: false }, 'incoming'));
  seeds.push(await makeSeed('vmig-multifd-main-legacy', await S.precopyStream(mk(LAYOUT, 6), { multifdLink: link(true) }), LAYOUT, { multifd: true, complete: false }, 'incoming'));
  return seeds;
}

export async function postcopySeeds() {
  const a = S.makeRam(LAYOUT, 7);
  const vmigStream = await S.precopyStream(a, { postcopy: { dirtyAtStop: [[0, [0, 3, 4, 5, 17, 40, 63]], [1, [1, 7]]] } });
  return [
    await makeSeed('vmig-postcopy', vmigStream, LAYOUT, { postcopy: true, complete: true }, 'incoming'),
    await makeSeed('hand-postcopy', S.handBuiltPostcopy(S.makeRam(LAYOUT, 8)), LAYOUT, { postcopy: true, complete: true }, 'incoming'),
  ];
}

export async function snapshotSeeds() {
  return [
    await makeSeed('snapshot-zero-records', await S.snapshotStream(S.makeRam(LAYOUT, 9), { zeroPages: true }), LAYOUT, { complete: true }, 'restore'),
    await makeSeed('snapshot-all-pages', await S.snapshotStream(S.makeRam([['pc.ram', 24], ['rom', 2]], 10), { zeroPages: false }), [['pc.ram', 24], ['rom', 2]], { complete: true }, 'restore'),
  ];
}

function loaderTarget(name, mode, seedsFn) {
  return {
    name,
    async prepare() {
      return { seeds: await seedsFn() };
    },
    async run(state, rng, opts) {
      const seed = rng.pick(state.seeds);
      const { bytes, ops } = mutate(rng, seed, state.seeds.filter((s) => s !== seed));
      const { outcome } = await loadOnce(seed, bytes, rng, { mode, strictIntegrity: opts.integrity, hangMs: opts.hangMs });
      return { ...outcome, seed: seed.name, ops, input: bytes };
    },
  };
}

export const loadvmTarget = loaderTarget('loadvm', 'incoming', incomingSeeds);
export const postcopyTarget = loaderTarget('loadvm-postcopy', 'incoming', postcopySeeds);
export const snapshotTarget = loaderTarget('snapshot', 'restore', snapshotSeeds);

/** Whether `vmig restore` of `bytes` would build more RAM than the fuzzer's cap (process target's screen). */
export async function loadOnceForScreening(seed, bytes) {
  const { outcome } = await loadOnce(seed, bytes, null, { mode: 'restore', strictIntegrity: false, hangMs: 10_000, cfg: { whole: true } });
  return outcome.note === 'restore-uncapped-ram';
}
