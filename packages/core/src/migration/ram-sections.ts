/**
 * The RAM sections of the main stream and the multifd flush (QEMU's ram.c: ram_save_setup,
 * ram_save_iterate, ram_save_complete, and the flush-and-sync barrier of
 * multifd_send_sync_main with RAM_SAVE_FLAG_MULTIFD_FLUSH). Pages themselves are the
 * saver's (ram-save.ts); every wait here on a channel goes through `guard`, which bounds it
 * and cuts it short on a failure (migration-thread.ts).
 */
import type { StreamSink } from '../io.js';
import type { Logger } from '../log.js';
import { TARGET_PAGE_SIZE } from '../ram/ram-block.js';
import { putRamMultifdFlush } from '../wire/main-stream.js';
import type { RateLimiter } from './rate-limit.js';
import type { MultifdLink, RamSaver } from './ram-save.js';
import type { MigrationStats } from './stats.js';

export const RAM_SECTION_ID = 2;

/** What the waits wait for, as the timeout's message names it. */
export const MAIN = 'the main channel to take more bytes';
const MULTIFD = 'the multifd channels to take more pages';

/** Pages per slice: the unit between backpressure checks (the main stream buffers them). */
const SLICE_PAGES = 1024;
/**
 * With multifd a slice only queues jobs of page numbers, so it can be larger: fewer turns of
 * the loop between the channels' completions (a quarter less time for 1 GiB of zero pages).
 */
const MULTIFD_SLICE_PAGES = 8192;
/** How long one RAM section iterates (QEMU's MAX_WAIT in ram_save_iterate). */
const SECTION_MS = 50;

export type Guard = <T>(p: Promise<T>, waitingFor: string) => Promise<T>;

export class RamSections {
  /** Pages were handed to multifd since the last barrier. */
  private unsynced = false;
  /** After the postcopy switch multifd carries nothing and syncs nothing. */
  private multifdOff = false;
  /** Bytes the main channels before this one took (postcopy recovery replaces the channel). */
  private earlierBytes = 0;

  constructor(
    private readonly saver: RamSaver,
    private sink: StreamSink,
    private readonly multifd: MultifdLink | undefined,
    private readonly stats: MigrationStats,
    private readonly guard: Guard,
    private readonly log: Logger,
  ) {}

  /** Bytes on every channel (main stream and multifd) the transports took. */
  flushedBytes(): number {
    return this.earlierBytes + this.sink.bytesFlushed + this.stats.multifdBytes;
  }

  writtenBytes(): number {
    return this.earlierBytes + this.sink.bytesWritten + this.stats.multifdBytes;
  }

  /**
   * Postcopy recovery: the main stream goes on over a new connection. What the old one had
   * taken counts as sent; what was still queued in front of it is lost (the received bitmap
   * says which pages to send again).
   */
  useSink(sink: StreamSink): void {
    this.earlierBytes += this.sink.bytesFlushed;
    this.sink = sink;
  }

  /**
   * What max-bandwidth charges: bytes written, plus pages handed to multifd and not written
   * yet (as whole pages): charged only once written, the channels' in-flight jobs would pass
   * on top of the limit.
   */
  chargedBytes(): number {
    return this.writtenBytes() + (this.multifd?.pendingBytes ?? 0);
  }

  /** ram_save_setup: the block list, then the setup barrier (every channel synced once before any page travels). */
  async setupSection(): Promise<void> {
    this.saver.writeSetupSection(this.sink, RAM_SECTION_ID);
    await this.multifdSync(true);
    this.saver.writeSectionEnd(this.sink, RAM_SECTION_ID);
  }

  /**
   * The flush-and-sync barrier, written inside a RAM section before its EOS: every channel
   * writes SYNC after what it holds, then the main stream carries RAM_SAVE_FLAG_MULTIFD_FLUSH
   * (modern) or relies on the EOS that follows (legacy dialect, QEMU 7.2). `always` forces it
   * in the modern dialect too (setup, a round boundary, completion); in the legacy dialect
   * every section end syncs.
   */
  private async multifdSync(always: boolean): Promise<void> {
    const mf = this.multifd;
    if (!mf || this.multifdOff) return;
    if (!mf.flushAfterEachSection && !always) return;
    const t0 = performance.now();
    await this.guard(mf.flushAndSync(), MULTIFD);
    this.log.debug({ channel: 'multifd', waitedMs: performance.now() - t0, dialect: mf.flushAfterEachSection ? '7.2' : 'modern' }, 'multifd barrier: every channel wrote its SYNC');
    this.unsynced = false;
    if (!mf.flushAfterEachSection) putRamMultifdFlush(this.sink);
  }

  /** Backpressure on every channel. */
  async channelsReady(): Promise<void> {
    await this.guard(this.sink.ready(), MAIN);
    if (this.multifd) await this.guard(this.multifd.ready(), MULTIFD);
  }

  /**
   * A new round starts: pages of the last one must all land before any page of the next (a
   * page re-sent on another channel must not be overtaken by its old copy).
   */
  async endRound(): Promise<void> {
    if (this.unsynced) await this.barrierSection();
  }

  /** A RAM section holding only the barrier (a round ended without the scan seeing the wrap). */
  async barrierSection(): Promise<void> {
    this.saver.writePartHeader(this.sink, RAM_SECTION_ID, false);
    await this.multifdSync(true);
    this.saver.writeSectionEnd(this.sink, RAM_SECTION_ID);
    await this.guard(this.sink.flush(), MAIN);
  }

  /**
   * One RAM section (ram_save_iterate): slices of pages until the scan wraps, the section has
   * run SECTION_MS, or the rate limit is reached; a barrier if the scan wrapped.
   */
  async iterateSection(limiter: RateLimiter): Promise<void> {
    const { saver, sink } = this;
    saver.writePartHeader(sink, RAM_SECTION_ID, false);
    const sectionStart = performance.now();
    let wrapped = false;
    do {
      const pagesBefore = saver.dirtyPages;
      const allowance = limiter.allowance();
      const r = saver.savePages(sink, Math.min(this.multifd ? MULTIFD_SLICE_PAGES : SLICE_PAGES, Math.max(1, Math.ceil(allowance / TARGET_PAGE_SIZE))));
      if (this.multifd && saver.dirtyPages !== pagesBefore) this.unsynced = true;
      wrapped = r.wrapped;
      await this.channelsReady();
      limiter.account(this.chargedBytes());
    } while (!wrapped && saver.dirtyPages > 0 && performance.now() - sectionStart < SECTION_MS && limiter.allowance() > 0);
    await this.multifdSync(wrapped);
    saver.writeSectionEnd(sink, RAM_SECTION_ID);
    // Like QEMU's qemu_fflush at the end of ram_save_iterate: the section, and above all a
    // barrier marker in it, must reach the destination now. Multifd channels parked at their
    // SYNC wait for that marker; left in a staging buffer it would deadlock them.
    await this.guard(sink.flush(), MAIN);
    await this.channelsReady();
  }

  /**
   * ram_save_complete (vCPUs stopped): every dirty page in the last section, then the barrier:
   * every page must have landed before the device state and EOF are loaded.
   */
  async completeSection(): Promise<void> {
    const { saver, sink } = this;
    saver.writePartHeader(sink, RAM_SECTION_ID, true);
    while (saver.dirtyPages > 0) {
      saver.savePages(sink, SLICE_PAGES);
      await this.channelsReady();
    }
    await this.multifdSync(true);
    this.multifd?.quiesce();
    saver.writeSectionEnd(sink, RAM_SECTION_ID);
  }

  /**
   * save_postcopy_prepare: multifd writes are not atomic, so every page queued on a channel
   * lands before the switch; after it multifd is done.
   */
  async beforePostcopy(): Promise<void> {
    await this.barrierSection();
    this.multifd?.quiesce();
    this.multifdOff = true;
  }

  /** A postcopy section: `write` puts requested and background pages; then it is flushed. */
  async postcopySection(write: () => void): Promise<void> {
    this.saver.writePartHeader(this.sink, RAM_SECTION_ID, false);
    write();
    this.saver.writeSectionEnd(this.sink, RAM_SECTION_ID);
    await this.guard(this.sink.flush(), MAIN);
  }

  /** The last section (QEMU's ram_save_complete after postcopy: nothing left but its end). */
  lastSection(): void {
    this.saver.writePartHeader(this.sink, RAM_SECTION_ID, true);
    this.saver.writeSectionEnd(this.sink, RAM_SECTION_ID);
  }
}
