/**
 * The source's side of postcopy (QEMU's postcopy_start and the page loop that follows it in
 * ram.c/postcopy-ram.c): flush-and-sync multifd, stop the vCPUs, the completion hook, the
 * discard bitmap, the package {LISTEN, device state, RUN}; then background pages on the main
 * stream with requested pages first (on the preempt channel, if there is one, the
 * return-path thread sends those itself), the last section, EOF, and the destination's SHUT.
 */
import { VmigError } from '../errors.js';
import type { StreamSink } from '../io.js';
import { createUrgentPages, UrgentPagesTally } from '../postcopy/urgent-pages.js';
import { putEof } from '../wire/main-stream.js';
import type { DeviceRegistry } from '../devices/device.js';
import type { GuestRam } from '../ram/ram-block.js';
import { PageRequestQueue } from './page-requests.js';
import { MAIN, RAM_SECTION_ID, type Guard, type RamSections } from './ram-sections.js';
import type { RamSaver, ZeroPageDetection } from './ram-save.js';
import { RateLimiter } from './rate-limit.js';
import { putDiscardBitmap, putPostcopyPackage } from './savevm.js';
import type { SourceReturnPath } from './source-return-path.js';
import type { MigrationStats } from './stats.js';
import type { VmRunControl } from './vm.js';

/** Background pages per postcopy section: requests wait behind at most this many (no preempt). */
const POSTCOPY_SLICE_PAGES = 32;
/** How often the postcopy bandwidth limit is measured. */
const BANDWIDTH_PERIOD_MS = 100;
export const SHUT = "the destination's answer (SHUT) after the stream ended";

export interface PostcopySourceContext {
  ram: GuestRam;
  sink: StreamSink;
  vm: VmRunControl;
  devices: DeviceRegistry;
  returnPath: SourceReturnPath;
  saver: RamSaver;
  sections: RamSections;
  stats: MigrationStats;
  /** The destination's SHUT status (OPEN_RETURN_PATH was sent at setup). */
  shutStatus: Promise<number>;
  guard: Guard;
  /** A sleep of the thread's own: cut short by a failure. */
  nap: (ms: number) => Promise<void>;
  /** The first failure, if any (checked between steps). */
  failed: () => VmigError | undefined;
  zeroPageDetection: ZeroPageDetection;
  maxPostcopyBandwidth: number;
  /** The vCPUs are about to stop. */
  onStop: () => void;
  /** The package is written: requests are served from here, and the destination may run the guest. */
  onSwitched: () => void;
  /** The package reached the transport: the downtime is over, postcopy-active. */
  onActive: () => void;
  /** Every page and EOF are sent: the destination's answer is awaited. */
  onCompletion: () => void;
}

export class PostcopySource {
  /** Page requests from the destination for the main stream, after the switch. */
  private readonly requests: PageRequestQueue;
  /** What the return-path thread sent itself (preempt), after the switch. */
  private urgent: UrgentPagesTally | undefined;
  /** Bytes it wrote on the preempt channel, as last counted. */
  private urgentBytes = 0;

  constructor(private readonly c: PostcopySourceContext) {
    this.requests = new PageRequestQueue(c.ram, c.saver, c.stats);
  }

  async run(): Promise<void> {
    const { c } = this;
    const { sink, saver, stats, sections, guard } = c;
    if (c.returnPath.openPreempt) await guard(c.returnPath.openPreempt(), 'the postcopy preempt channel to connect');
    await sections.beforePostcopy();
    const downtimeStart = performance.now();
    c.onStop();
    const bytesBefore = sections.writtenBytes();
    await guard(c.vm.stop(), 'the vCPUs to stop');
    const failed = c.failed();
    if (failed) throw failed;
    for (const d of c.devices.list()) d.flushToRam?.();
    // ram_postcopy_send_discard_bitmap: the sync without precopy's notifiers.
    saver.bitmapSync();
    saver.usePostcopyStreams();
    putDiscardBitmap(sink, c.ram, saver.bitmaps);
    putPostcopyPackage(sink, c.devices, RAM_SECTION_ID + 1);
    // Requests are accepted before the package can reach the destination (whose vCPUs ask
    // for pages only after RUN).
    const urgent = createUrgentPages(saver.bitmaps, c.zeroPageDetection !== 'none');
    this.urgent = new UrgentPagesTally(urgent);
    c.returnPath.listen(urgent, (type, data) => this.requests.add(type, data));
    c.onSwitched();
    await guard(sink.flush(), MAIN);
    stats.downtimeMs = performance.now() - downtimeStart;
    stats.downtimeBytes = sections.writtenBytes() - bytesBefore;
    c.onActive();
    await this.pageLoop();
  }

  private async pageLoop(): Promise<void> {
    const { c } = this;
    const { sink, saver, stats, sections } = c;
    const postcopyStart = sections.writtenBytes();
    // Background pages only; requested pages are never held back.
    const limiter = new RateLimiter(c.maxPostcopyBandwidth, BANDWIDTH_PERIOD_MS, performance.now());
    limiter.account(sections.writtenBytes());
    while (this.takeUrgent() > 0) {
      const failed = c.failed();
      if (failed) throw failed;
      limiter.account(sections.writtenBytes());
      if (limiter.allowance() <= 0) {
        // Requests keep being served while background pages wait for credit.
        if (this.requests.pending > 0) await sections.postcopySection(() => this.requests.serve(sink));
        await c.nap(Math.min(2, limiter.waitMs()));
        continue;
      }
      await sections.postcopySection(() => {
        this.requests.serve(sink);
        saver.savePages(sink, POSTCOPY_SLICE_PAGES);
      });
      // A flush the kernel takes at once resolves without an I/O turn: yield, so that page
      // requests on the return path are read now, not once the socket buffer is full.
      await new Promise<void>((r) => setImmediate(r));
      stats.transferred = sections.writtenBytes() + this.urgentBytes;
      stats.postcopyBytes = stats.transferred - postcopyStart;
    }
    sections.lastSection();
    putEof(sink);
    await c.guard(sink.flush(), MAIN);
    stats.remainingPages = 0;
    c.onCompletion();
    // The destination answers once every page is in place (requested pages the return-path
    // thread sent included: it has written them before it reads SHUT).
    const status = await c.guard(c.shutStatus, SHUT);
    this.takeUrgent();
    stats.transferred = sections.writtenBytes() + this.urgentBytes;
    stats.postcopyBytes = stats.transferred - postcopyStart;
    if (status !== 0) throw new VmigError('VMIG_ERR_REMOTE', `destination reported failure ${status}`, { channel: 'return-path' });
  }

  /**
   * Counts what the return-path thread sent itself since the last call, and moves the scan
   * next to the page it was last asked for. Returns the pages still dirty.
   */
  private takeUrgent(): number {
    const u = this.urgent!.take();
    const { stats, saver } = this.c;
    saver.clearedElsewhere(u.cleared);
    if (u.next) saver.moveScan(u.next.block, u.next.page);
    stats.postcopyRequests += u.requests;
    stats.normalPages += u.normal;
    stats.zeroPages += u.zero;
    this.urgentBytes = u.bytes;
    return saver.dirtyPages;
  }
}
