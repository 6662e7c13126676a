/**
 * The destination's preempt channel thread (QEMU's postcopy_preempt_thread, "mig/dst/preempt").
 * It starts with `vmig incoming` (booting one takes tens of ms), gets its channel at LISTEN
 * in a 'start' message, and is the channel's owner from then on. Requested pages are read and
 * placed by the vCPU that waits for them (core's postcopy/preempt-reader.ts); this thread
 * reads only what no vCPU does: copies of pages that came in the background first, the end
 * of the stream; with `--postcopy-preempt-reader thread`, or where vCPUs cannot block in
 * poll(2), everything. A bad record or a
 * truncated stream, found by whichever thread read it, is reported from here.
 * Ownership: the main thread keeps the connection's handle and closes it once this thread has
 * ended; before it ends, this thread makes sure nobody reads the fd any more
 * (PreemptReader.close, which waits for a vCPU reading it).
 */
import { parentPort, receiveMessageOnPort, workerData } from 'node:worker_threads';
import { GuestRam, MissingPagesPlacer, PreemptReader, setThreadName, toVmigError, VmigError } from '@vmig/core';
import type { PreemptFromThread, PreemptThreadData, PreemptToThread } from './preempt-protocol.js';
import { canSetThreadSlice, setThreadSliceUs } from './thread-slice.js';

setThreadName('mig/dst/preempt');
const port = parentPort!;
const channel = 'preempt';
const { faultSliceUs } = workerData as PreemptThreadData;
// Loaded now, not at LISTEN.
const sliceable = faultSliceUs > 0 && canSetThreadSlice();

port.on('message', (m: PreemptToThread) => {
  if (m.t === 'start') run(m);
  // Told to stop before it had a channel: nothing to report; the thread ends.
  else port.close();
});

/** Until the stream ends, fails, or this thread is told to stop; synchronous (messages are taken between turns). */
function run(m: Extract<PreemptToThread, { t: 'start' }>): void {
  // This thread is on the fault path from now on (thread-slice.ts).
  port.postMessage({ t: 'slice', us: sliceable ? (setThreadSliceUs(faultSliceUs) ?? null) : null } satisfies PreemptFromThread);
  const reader = new PreemptReader(m.reader, GuestRam.fromShared(m.ram), new MissingPagesPlacer(m.missing));
  let err: VmigError | undefined;
  try {
    reader.attach(m.fd, m.first);
    for (;;) {
      if ((receiveMessageOnPort(port)?.message as PreemptToThread | undefined)?.t === 'stop') {
        err = new VmigError('VMIG_ERR_CANCELLED', 'load aborted', { channel });
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
  reader.close();
  if (err === undefined) port.postMessage({ t: 'end' } satisfies PreemptFromThread);
  else port.postMessage({ t: 'error', error: err.toJSON() } satisfies PreemptFromThread);
  port.close();
}
