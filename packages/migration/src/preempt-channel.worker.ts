/**
 * The destination's preempt channel thread (QEMU's postcopy_preempt_thread, "mig/dst/preempt").
 * It starts with `vmig incoming` (booting one takes tens of ms), gets its channel at LISTEN
 * in a 'start' message, and is the channel's owner from then on. Requested pages are read and
 * placed by the vCPU that waits for them (core's postcopy/preempt-reader.ts); this thread
 * reads only what no vCPU does: copies of pages that came in the background first, the end
 * of the stream; with `--postcopy-preempt-reader thread`, or where vCPUs cannot block in
 * poll(2), everything. A bad record or a truncated stream, found by whichever thread read
 * it, is reported from here.
 *
 * Postcopy recovery: a channel that ended or failed is reported ('end', 'error'), and the
 * thread waits for the next one (another 'start', after the source reconnected) or 'stop'.
 * 'detach' gives up the current channel (the migration paused): the thread answers
 * 'detached' once nobody reads its fd any more.
 *
 * Ownership: the main thread keeps each connection's handle and closes it once this thread
 * said it is done with it ('end', 'error', 'detached'); before saying so, this thread makes
 * sure nobody reads the fd any more (PreemptReader.close, which waits for a vCPU reading it).
 */
import { parentPort, receiveMessageOnPort, workerData } from 'node:worker_threads';
import { GuestRam, MissingPagesPlacer, PreemptReader, preemptReads, setThreadName, toVmigError, VmigError } from '@vmig/core';
import type { PreemptFromThread, PreemptThreadData, PreemptToThread } from './preempt-protocol.js';
import { canSetThreadSlice, setThreadSliceUs } from './thread-slice.js';

setThreadName('mig/dst/preempt');
const port = parentPort!;
const channel = 'preempt';
const { faultSliceUs, timeoutMs } = workerData as PreemptThreadData;
// Loaded now, not at LISTEN.
const sliceable = faultSliceUs > 0 && canSetThreadSlice();
let reader: PreemptReader | undefined;
let placer: MissingPagesPlacer | undefined;

port.on('message', (m: PreemptToThread) => {
  if (m.t === 'start') run(m);
  else if (m.t === 'detach') port.postMessage({ t: 'detached' } satisfies PreemptFromThread);
  // 'stop' between channels, or before the first: nothing to report; the thread ends.
  else port.close();
});

/** One channel, until it ends, fails, or this thread is told to detach or stop; synchronous (messages are taken between turns). */
function run(m: Extract<PreemptToThread, { t: 'start' }>): void {
  let err: VmigError | undefined;
  let next: PreemptToThread['t'] | undefined;
  try {
    if (reader) reader.reattach(m.fd, m.first);
    else {
      // This thread is on the fault path from now on (thread-slice.ts).
      port.postMessage({ t: 'slice', us: sliceable ? (setThreadSliceUs(faultSliceUs) ?? null) : null } satisfies PreemptFromThread);
      placer = new MissingPagesPlacer(m.missing);
      reader = new PreemptReader(m.reader, GuestRam.fromShared(m.ram), placer);
      reader.attach(m.fd, m.first);
    }
    // Liveness: while a vCPU waits, pages must keep coming (a frozen link sends nothing, and
    // closes nothing).
    let placed = -1;
    let progressAt = performance.now();
    for (;;) {
      next = (receiveMessageOnPort(port)?.message as PreemptToThread | undefined)?.t;
      if (next === 'stop' || next === 'detach') break;
      const now = performance.now();
      const p = preemptReads(m.reader);
      const total = p.preemptPagesByThread + p.preemptPagesByVcpus;
      if (total !== placed || !placer!.anyWaiting()) {
        placed = total;
        progressAt = now;
      } else if (timeoutMs > 0 && now - progressAt > timeoutMs) {
        err = new VmigError('VMIG_ERR_TIMEOUT', `a vCPU waited ${timeoutMs} ms and no page came on the preempt channel (--channel-timeout): the link is frozen or the source stopped`, { channel });
        break;
      }
      const st = reader.service();
      if (st === 'ended') break;
      if (st === 'failed') {
        err = reader.error;
        break;
      }
    }
  } catch (e) {
    err = toVmigError(e, 'VMIG_ERR_CHANNEL', { channel });
  }
  reader?.close();
  if (next === 'stop') {
    port.postMessage({ t: 'error', error: new VmigError('VMIG_ERR_CANCELLED', 'load aborted', { channel }).toJSON() } satisfies PreemptFromThread);
    port.close();
  } else if (next === 'detach') port.postMessage({ t: 'detached' } satisfies PreemptFromThread);
  else if (err === undefined) port.postMessage({ t: 'end' } satisfies PreemptFromThread);
  else port.postMessage({ t: 'error', error: err.toJSON() } satisfies PreemptFromThread);
}
