/**
 * A vCPU: a worker thread that keeps writing guest RAM at a given rate.
 *
 * Each write stores a 64-byte stamp (writer, sequence, page) into this writer's slot of a
 * page (stamp.ts) with plain stores, THEN sets the page's dirty-log bit with Atomics.or. The
 * Atomics.or publishes the stamp: a migration thread that takes the bit with
 * Atomics.exchange and then reads the page sees the stamp or something newer
 * (see core/migration/dirty-sync.ts for the other half of this pairing).
 *
 * On a postcopy destination each write first asks the received map (core's
 * postcopy/missing-pages.ts) and, with `track`, remembers for each page it wrote the slot's
 * bytes before its first write and its last sequence number there, posted to the parent at
 * exit so the destination can check every write survived (postcopy-verify.ts).
 */
import { parentPort, workerData } from 'node:worker_threads';
import { GuestRam, MissingPagesPlacer, MissingPagesVcpu, PreemptReader, setThreadName, TARGET_PAGE_SIZE, WriteProtectVcpu } from '@vmig/core/vcpu';
import { xorshift } from './rng.js';
import { hotSet } from './write-pattern.js';
import { SLOT_BYTES, SLOT_WORDS, stampSlot, writeStamp } from './stamp.js';
import { PARKED, RUN_STATE, STARTED, STATE_EXIT, STATE_RUN, STATE_STOP, THROTTLE_PCT, WRITES_BASE } from './vcpu-control.js';
import type { WriterConfig, WriterTrack } from './vcpu-pool.js';

const cfg = workerData as WriterConfig;
// QEMU's vCPU threads are "CPU n/KVM".
setThreadName(`CPU ${cfg.index}/vmig`);
const ram = GuestRam.fromShared(cfg.ram);
const ctl = new Int32Array(cfg.control);
const rng = xorshift(cfg.seed * 7919 + cfg.index + 1);
const blocks = ram.blocks;
/** Per block, per segment: the segment as Int32 words (a page never crosses a segment). */
const words = blocks.map((b) => b.segmentSabs.map((sab, i) => new Int32Array(sab, 0, b.segments[i]!.length / 4)));
const segmentPages = blocks.map((b) => b.segmentBytes / TARGET_PAGE_SIZE);
// The pages it writes (write-pattern.ts).
const { writable: writablePages, pages: hotPages, stride: hotStride } = hotSet(ram.totalPages, cfg.hotPages);
// Background snapshot: every write first asks the write-protect map (core/snapshot/write-protect.ts).
const writeProtect = cfg.writeProtect ? new WriteProtectVcpu(cfg.writeProtect, cfg.index) : undefined;
// Postcopy destination: every write first asks the received map.
// With preempt it may read the preempt channel and place pages itself (core's postcopy/preempt-reader.ts).
const preempt = cfg.missing && cfg.preempt ? new PreemptReader(cfg.preempt, ram, new MissingPagesPlacer(cfg.missing)) : undefined;
const missing = cfg.missing ? new MissingPagesVcpu(cfg.missing, cfg.index, preempt) : undefined;

function pickPage(): number {
  return cfg.pattern === 'hot' ? (rng() % hotPages) * hotStride : rng() % writablePages;
}

/**
 * With `track`: per page written, the slot's bytes before the first write and the last seq.
 * Typed arrays that grow by doubling, not a Map entry and a 64-byte buffer per page: the
 * destination's writers run during postcopy, when both cores are short (docs/benchmarks.md),
 * and every object they keep is work for the garbage collector's threads.
 */
class WriteTrack {
  /** Per global page: its index in the arrays below, plus one (0: never written). */
  private readonly indexOf = new Int32Array(ram.totalPages);
  count = 0;
  pages = new Int32Array(1024);
  last = new Int32Array(1024);
  orig = new Uint8Array(1024 * SLOT_BYTES);

  /** Records a write of `seq` to `globalPage`, whose slot starts at byte `slotByte` of `host`. */
  write(globalPage: number, host: Uint8Array, slotByte: number, seq: number): void {
    let i = this.indexOf[globalPage]! - 1;
    if (i < 0) {
      i = this.count++;
      if (i === this.pages.length) this.grow();
      this.indexOf[globalPage] = i + 1;
      this.pages[i] = globalPage;
      this.orig.set(host.subarray(slotByte, slotByte + SLOT_BYTES), i * SLOT_BYTES);
    }
    this.last[i] = seq;
  }

  private grow(): void {
    const n = this.pages.length * 2;
    const pages = new Int32Array(n);
    const last = new Int32Array(n);
    const orig = new Uint8Array(n * SLOT_BYTES);
    pages.set(this.pages);
    last.set(this.last);
    orig.set(this.orig);
    this.pages = pages;
    this.last = last;
    this.orig = orig;
  }
}
const track = cfg.track ? new WriteTrack() : undefined;

let seq = 0;
function writeOnce(): void {
  const globalPage = pickPage();
  const [b, page] = ram.locate(globalPage);
  writeProtect?.beforeWrite(globalPage, blocks[b]!.page(page));
  // A failed postcopy: the page will never come, and nothing may be written.
  if (missing && !missing.beforeWrite(globalPage)) return;
  const slot = stampSlot(cfg.index, cfg.writers, page);
  const seg = Math.floor(page / segmentPages[b]!);
  const base = ((page - seg * segmentPages[b]!) * TARGET_PAGE_SIZE) / 4 + slot * SLOT_WORDS;
  const w = words[b]![seg]!;
  track?.write(globalPage, blocks[b]!.segments[seg]!, base * 4, seq);
  writeStamp(w, base, cfg.index, seq, page);
  // Publish: the dirty bit after the data (release through Atomics.or).
  blocks[b]!.dirtyLog.set(page);
  seq++;
  Atomics.add(ctl, WRITES_BASE + cfg.index, 1);
}

/** Parks until the state leaves STOP (vm_stop acknowledgement). */
function park(): void {
  Atomics.add(ctl, PARKED, 1);
  Atomics.notify(ctl, PARKED);
  while (Atomics.load(ctl, RUN_STATE) === STATE_STOP) Atomics.wait(ctl, RUN_STATE, STATE_STOP);
  Atomics.sub(ctl, PARKED, 1);
  Atomics.notify(ctl, PARKED);
}

const pagesPerMs = cfg.pagesPerSecond / 1000;
const CATCH_UP_MS = 5;
Atomics.add(ctl, STARTED, 1);
Atomics.notify(ctl, STARTED);

let clockStart = performance.now();
let done = 0;
for (;;) {
  const st = Atomics.load(ctl, RUN_STATE);
  if (st === STATE_EXIT) break;
  if (st === STATE_STOP) {
    park();
    clockStart = performance.now();
    done = 0;
    continue;
  }
  const throttle = Atomics.load(ctl, THROTTLE_PCT);
  const now = performance.now();
  const rate = pagesPerMs * (1 - throttle / 100);
  const target = cfg.pagesPerSecond > 0 ? (now - clockStart) * rate : Infinity;
  // A vCPU does not make up for time it spent blocked (a fault, a throttle): at most
  // CATCH_UP_MS of writes are owed, so a long wait is not followed by a burst at full speed.
  if (Number.isFinite(target) && target - done > CATCH_UP_MS * rate) done = target - CATCH_UP_MS * rate;
  if (done >= target) {
    // Sleep on RUN_STATE so that a stop or exit wakes us at once.
    Atomics.wait(ctl, RUN_STATE, STATE_RUN, Math.max(0.2, Math.min(5, (done - target) / rate)));
    continue;
  }
  const burst = Math.min(64, Number.isFinite(target) ? Math.ceil(target - done) : 64);
  for (let i = 0; i < burst; i++) writeOnce();
  done += burst;
  // Unlimited rate with a throttle: sleep the throttled share of a 1 ms period.
  if (!Number.isFinite(target) && throttle > 0) Atomics.wait(ctl, RUN_STATE, STATE_RUN, throttle / 100);
}

if (track) {
  const n = track.count;
  const msg: WriterTrack = { writer: cfg.index, pages: track.pages.slice(0, n), last: track.last.slice(0, n), orig: track.orig.slice(0, n * SLOT_BYTES) };
  parentPort!.postMessage(msg);
}
