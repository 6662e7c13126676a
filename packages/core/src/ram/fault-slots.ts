/**
 * Per-writer fault slots and a doorbell: how a vCPU thread that must wait for a page tells
 * the thread that serves it (background snapshot's write faults, postcopy's missing pages).
 *
 * Pairing: a writer stores page + 1 in its own slot (Atomics.store), then bumps SEQ and
 * notifies it (`post`). The server reads SEQ, then the slots (`take` / `peek`): a fault
 * posted after its read of SEQ has bumped SEQ past what it read, so its next `wait` returns
 * at once and the fault is seen then. None is missed. Anything else that must wake the
 * server (a copy published, an abort) calls `ring`.
 */
export interface FaultSlotsShared {
  /** Int32 per writer: 0, or the faulted page + 1. */
  slots: SharedArrayBuffer;
  /** Int32: the doorbell. */
  seq: SharedArrayBuffer;
}

export function createFaultSlots(writers: number): FaultSlotsShared {
  return { slots: new SharedArrayBuffer(Math.max(1, writers) * 4), seq: new SharedArrayBuffer(4) };
}

export class FaultSlots {
  private readonly slots: Int32Array;
  private readonly seqWord: Int32Array;

  constructor(s: FaultSlotsShared) {
    this.slots = new Int32Array(s.slots);
    this.seqWord = new Int32Array(s.seq);
  }

  /** Writer `writer` waits for `page` (a global page index). */
  post(writer: number, page: number): void {
    Atomics.store(this.slots, writer, page + 1);
    this.ring();
  }

  /** Writer `writer` no longer waits (when the server does not take the slot itself). */
  clear(writer: number): void {
    Atomics.store(this.slots, writer, 0);
  }

  /** Wakes the server. */
  ring(): void {
    Atomics.add(this.seqWord, 0, 1);
    Atomics.notify(this.seqWord, 0);
  }

  get seq(): number {
    return Atomics.load(this.seqWord, 0);
  }

  /** Resolves when the doorbell rings after `seen` (at once if it already has), or after `ms`. */
  async wait(seen: number, ms: number): Promise<void> {
    await Atomics.waitAsync(this.seqWord, 0, seen, ms).value;
  }

  /** Takes the posted faults (each slot is emptied): pages into `out`. */
  take(out: number[]): void {
    for (let i = 0; i < this.slots.length; i++) {
      const p = Atomics.exchange(this.slots, i, 0);
      if (p !== 0) out.push(p - 1);
    }
  }

  /** Reads the posted faults, leaving the slots to their writers: pages into `out`. */
  peek(out: number[]): void {
    for (let i = 0; i < this.slots.length; i++) {
      const p = Atomics.load(this.slots, i);
      if (p !== 0) out.push(p - 1);
    }
  }
}
