/**
 * The source's side of postcopy (QEMU's postcopy_start and the page loop that follows it in
 * ram.c/postcopy-ram.c): flush-and-sync multifd, stop the vCPUs, the completion hook, the
 * discard bitmap, the package {LISTEN, device state, RUN}; then background pages on the main
 * stream with requested pages first (on the preempt channel, if there is one, the
 * return-path thread sends those itself), the last section, EOF, and the destination's SHUT.
 * After a broken connection, resume() goes on over new ones (QEMU's postcopy_do_resume).
 */
import { VmigError } from '../errors.js';
import type { StreamSink } from '../io.js';
import { createUrgentPages, UrgentPagesTally, type UrgentPagesShared } from '../postcopy/urgent-pages.js';
import { putEof } from '../wire/main-stream.js';
import type { DeviceRegistry } from '../devices/device.js';
import type { GuestRam } from '../ram/ram-block.js';
import { PageRequestQueue } from './page-requests.js';
import { MAIN, RAM_SECTION_ID, type Guard, type RamSections } from './ram-sections.js';
import type { RamSaver, ZeroPageDetection } from './ram-save.js';
import { RateLimiter } from './rate-limit.js';
import { MIGRATION_RESUME_ACK_VALUE } from '../wire/recovery.js';
import { putDiscardBitmap, putPostcopyPackage, putPostcopyResume, putRecvBitmapRequests } from './savevm.js';
import type { SourceReturnPath } from './source-return-path.js';
import type { MigrationStats } from './stats.js';
import type { VmRunControl } from './vm.js';

/** Background pages per postcopy section: requests wait behind at most this many (no preempt). */
const POSTCOPY_SLICE_PAGES = 32;
/** How often the postcopy bandwidth limit is measured. */
const BANDWIDTH_PERIOD_MS = 100;
export const SHUT = "the destination's answer (SHUT) after the stream ended";

/** The channels postcopy runs on: the first ones, then each recovery's. */
export interface PostcopyLink {
  sink: StreamSink;
  returnPath: SourceReturnPath;
  /** The destination's SHUT status on this return path. */
  shutStatus: Promise<number>;
}

export interface PostcopySourceContext extends PostcopyLink {
  ram: GuestRam;
  vm: VmRunControl;
  devices: DeviceRegistry;
  saver: RamSaver;
  sections: RamSections;
  stats: MigrationStats;
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
  private requests: PageRequestQueue;
  /** What the return-path threads sent themselves (preempt), after the switch. */
  private urgent: { shared: UrgentPagesShared; tally: UrgentPagesTally } | undefined;
  /** Bytes they wrote on the preempt channel, as last counted. */
  private urgentBytes = 0;
  private link: PostcopyLink;
  /** Bytes written before the switch's background pages (for postcopyBytes). */
  private postcopyStart = 0;
  /** The package reached the destination's transport (the downtime ended). */
  private active = false;
  private downtimeStart = 0;
  private bytesBefore = 0;

  constructor(private readonly c: PostcopySourceContext) {
    this.requests = new PageRequestQueue(c.ram, c.saver, c.stats);
    this.link = { sink: c.sink, returnPath: c.returnPath, shutStatus: c.shutStatus };
  }

  /** postcopy_start, then the page loop until SHUT. */
  async run(): Promise<void> {
    const { c } = this;
    const { saver, sections, guard } = c;
    const { sink } = this.link;
    if (this.link.returnPath.openPreempt) await guard(this.link.returnPath.openPreempt(), 'the postcopy preempt channel to connect');
    await sections.beforePostcopy();
    this.downtimeStart = performance.now();
    c.onStop();
    this.bytesBefore = sections.writtenBytes();
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
    this.urgent = { shared: urgent, tally: new UrgentPagesTally(urgent) };
    this.link.returnPath.listen(urgent, (type, data) => this.requests.add(type, data));
    c.onSwitched();
    await guard(sink.flush(), MAIN);
    this.activate();
    this.postcopyStart = sections.writtenBytes();
    await this.pageLoop();
  }

  /** The downtime is over: the package went out (at the switch, or on a recovery's channel). */
  private activate(): void {
    if (this.active) return;
    this.active = true;
    this.c.stats.downtimeMs = performance.now() - this.downtimeStart;
    this.c.stats.downtimeBytes = this.c.sections.writtenBytes() - this.bytesBefore;
    this.c.onActive();
  }

  /**
   * Postcopy recovery on new channels (postcopy_do_resume): RECV_BITMAP for every block, whose
   * answers become the dirty bitmaps (what the destination lacks, whatever the broken
   * connection lost); the preempt channel again; RESUME and its ACK; then the page loop goes
   * on until SHUT. The return-path thread of the broken connection has ended.
   */
  async resume(link: PostcopyLink): Promise<void> {
    const { c } = this;
    const { guard, saver, ram } = c;
    // What the old return-path thread sent and counted before it ended.
    this.takeUrgent();
    this.link = link;
    c.sections.useSink(link.sink);
    putRecvBitmapRequests(link.sink, ram);
    await guard(link.sink.flush(), MAIN);
    for (const [i, block] of ram.blocks.entries()) {
      const received = await guard(link.returnPath.receivedBitmap!(block.idstr), `the destination's received bitmap of block '${block.idstr}'`);
      saver.reloadFromReceived(i, received);
    }
    saver.restartScan();
    if (link.returnPath.openPreempt) await guard(link.returnPath.openPreempt(), 'the postcopy preempt channel to connect');
    // Requests of the new return path name their block first: a queue of its own.
    this.requests = new PageRequestQueue(ram, saver, c.stats);
    // Listening before RESUME: the destination's requests may follow its ACK at once.
    link.returnPath.listen(this.urgent!.shared, (type, data) => this.requests.add(type, data));
    putPostcopyResume(link.sink);
    await guard(link.sink.flush(), MAIN);
    const ack = await guard(link.returnPath.resumeAck!, "the destination's RESUME_ACK");
    if (ack !== MIGRATION_RESUME_ACK_VALUE) throw new VmigError('VMIG_ERR_STREAM_FORMAT', `RESUME_ACK with value ${ack}, expected ${MIGRATION_RESUME_ACK_VALUE}`, { channel: 'return-path', phase: 'postcopy recovery' });
    this.activate();
  }

  /** The page loop (after resume()). */
  async continue(): Promise<void> {
    await this.pageLoop();
  }

  private async pageLoop(): Promise<void> {
    const { c } = this;
    const { saver, stats, sections } = c;
    const { sink } = this.link;
    const postcopyStart = this.postcopyStart;
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
    const status = await c.guard(this.link.shutStatus, SHUT);
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
    const u = this.urgent!.tally.take();
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
