/**
 * A vCPU: a worker thread that keeps writing guest RAM at a given rate.
 *
 * Each write stores a 64-byte stamp (writer, sequence, page) into one 64-byte slot of a
 * page with plain stores, THEN sets the page's dirty-log bit with Atomics.or. The
 * Atomics.or publishes the stamp: a migration thread that takes the bit with
 * Atomics.exchange and then reads the page sees the stamp or something newer
 * (see core/migration/dirty-sync.ts for the other half of this pairing).
 */
import { workerData } from 'node:worker_threads';
import { GuestRam, TARGET_PAGE_SIZE, WriteProtectVcpu } from '@vmig/core';
import { xorshift } from './fill.js';
import { PARKED, RUN_STATE, STARTED, STATE_EXIT, STATE_RUN, STATE_STOP, THROTTLE_PCT, WRITES_BASE } from './vcpu-control.js';
import type { WriterConfig } from './vcpu-pool.js';

const cfg = workerData as WriterConfig;
const ram = GuestRam.fromShared(cfg.ram);
const ctl = new Int32Array(cfg.control);
const rng = xorshift(cfg.seed * 7919 + cfg.index + 1);
const blocks = ram.blocks;
const words = blocks.map((b) => new Int32Array(b.hostSab, 0, b.usedLength >>> 2));
const totalPages = ram.totalPages;
const hotPages = Math.max(1, Math.min(cfg.hotPages, totalPages));
const hotStride = Math.max(1, Math.floor(totalPages / hotPages));
const SLOT_WORDS = 16; // 64 bytes
const SLOTS = TARGET_PAGE_SIZE / 64;
// Background snapshot: every write first asks the write-protect map (core/snapshot/write-protect.ts).
const writeProtect = cfg.writeProtect ? new WriteProtectVcpu(cfg.writeProtect, cfg.index) : undefined;

function pickPage(): number {
  return cfg.pattern === 'hot' ? (rng() % hotPages) * hotStride : rng() % totalPages;
}

let seq = 0;
function writeOnce(): void {
  const globalPage = pickPage();
  const [b, page] = ram.locate(globalPage);
  writeProtect?.beforeWrite(globalPage, blocks[b]!.page(page));
  const slot = seq % SLOTS;
  const base = ((page * TARGET_PAGE_SIZE) >>> 2) + slot * SLOT_WORDS;
  const w = words[b]!;
  // The stamp: plain stores, torn by design if the page is read meanwhile.
  w[base] = 0x56434155; // "VCAU"
  w[base + 1] = cfg.index;
  w[base + 2] = seq;
  w[base + 3] = page;
  for (let i = 4; i < SLOT_WORDS; i++) w[base + i] = (seq * 2654435761 + i) | 0;
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
