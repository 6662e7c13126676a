/**
 * Notifier chains (QEMU's NotifierWithReturnList): callbacks run in registration order, in
 * the migration thread, synchronously, so their order relative to the migration's own
 * steps is exact. A notifier may return (or throw) an error; the chain stops at the first
 * one and hands it back, the caller decides what it means (an error at SETUP fails the
 * migration; a postcopy notifier's error is a veto).
 *
 * Each chain passes its event object to notifiers; there is no global "in completion" flag
 * to poll (seed 002's trap: a flag read later can already describe another state).
 */
import { toVmigError, type VmigError } from '../errors.js';

export type Notifier<E> = (event: E) => void | Error | undefined;

export class NotifierWithReturnList<E> {
  private readonly notifiers: Notifier<E>[] = [];

  /** Adds a notifier; returns the function that removes it. */
  add(n: Notifier<E>): () => void {
    this.notifiers.push(n);
    return () => {
      const i = this.notifiers.indexOf(n);
      if (i >= 0) this.notifiers.splice(i, 1);
    };
  }

  get size(): number {
    return this.notifiers.length;
  }

  /** Runs every notifier until one fails; returns that failure. */
  notify(event: E): VmigError | undefined {
    // A copy: a notifier may remove itself while the chain runs.
    for (const n of [...this.notifiers]) {
      try {
        const r = n(event);
        if (r instanceof Error) return toVmigError(r, 'VMIG_ERR_NOTIFIER');
      } catch (e) {
        return toVmigError(e, 'VMIG_ERR_NOTIFIER');
      }
    }
    return undefined;
  }

  /** Runs every notifier; failures are returned, not allowed to stop the others (cleanup paths). */
  notifyAll(event: E): VmigError[] {
    const errors: VmigError[] = [];
    for (const n of [...this.notifiers]) {
      try {
        const r = n(event);
        if (r instanceof Error) errors.push(toVmigError(r, 'VMIG_ERR_NOTIFIER'));
      } catch (e) {
        errors.push(toVmigError(e, 'VMIG_ERR_NOTIFIER'));
      }
    }
    return errors;
  }
}

/** QEMU's PrecopyNotifyReason. */
export type PrecopyNotifyReason = 'SETUP' | 'BEFORE_BITMAP_SYNC' | 'AFTER_BITMAP_SYNC' | 'COMPLETE' | 'CLEANUP';

export interface PrecopyNotifyData {
  reason: PrecopyNotifyReason;
  /** With CLEANUP: how the migration ended. */
  status?: 'completed' | 'failed' | 'cancelled';
}

/** QEMU's PostcopyNotifyReason (destination side), used by postcopy. */
export type PostcopyNotifyReason = 'PROBE' | 'INBOUND_ADVISE' | 'INBOUND_LISTEN' | 'INBOUND_END';

export interface PostcopyNotifyData {
  reason: PostcopyNotifyReason;
}

/** What state-change notifiers hear (QEMU's MigrationEvent, plus every status change). */
export interface MigrationStateEvent {
  type: 'setup' | 'status' | 'done' | 'failed';
  status: string;
  error?: { code: string; message: string } | undefined;
}

/** The chains one migration carries. */
export class MigrationNotifiers {
  readonly precopy = new NotifierWithReturnList<PrecopyNotifyData>();
  readonly postcopy = new NotifierWithReturnList<PostcopyNotifyData>();
  readonly state = new NotifierWithReturnList<MigrationStateEvent>();
}
