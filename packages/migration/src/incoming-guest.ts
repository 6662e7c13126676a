/**
 * The application's guest on a postcopy destination: what runs here once the source says
 * RUN, before every page arrived (QEMU's vm_start on the destination). Its threads must ask
 * for a page before they touch it: `received` is the received map (core's
 * postcopy/missing-pages.ts); a thread wraps it in `MissingPagesVcpu` (from '@vmig/core/vcpu')
 * and calls `beforeWrite(page)` before each write: it returns at once for a page that is
 * here, and otherwise sends the request on the return path and blocks until it is placed.
 */
import type { GuestRam, MissingPagesShared, PreemptReaderShared, VmigError } from '@vmig/core';

export interface IncomingGuestRun {
  ram: GuestRam;
  /** The received map, to post to the guest's threads. */
  received: MissingPagesShared;
  /** With postcopy-preempt: the preempt channel's reader role, which a faulting thread may take. */
  preemptReader: PreemptReaderShared | undefined;
}

export interface IncomingGuestContext {
  /**
   * At postcopy setup (after ADVISE, before the switch), the received map to make threads
   * ready parked, so that RUN costs no thread start; undefined once that moment has passed.
   */
  prepare(): IncomingGuestRun | undefined;
  /** Fails the incoming migration (a guest thread that died). */
  fatal(e: VmigError): void;
}

export interface IncomingGuest {
  /** Called once, before the stream is read. */
  bind?(ctx: IncomingGuestContext): void;
  /** RUN: start (or resume) the guest's threads; returns how many run (for blocktime). */
  run(r: IncomingGuestRun): number;
  /**
   * The load completed: stop the threads. `switched`: the guest ran here (postcopy); what it
   * returns goes into the report's `postcopy` part.
   */
  finish(ram: GuestRam, switched: boolean): Promise<Record<string, unknown> | undefined>;
  /** A failure: stop every thread (blocked ones already gave up without writing). */
  abort(): Promise<void>;
}
