/**
 * The destination's preempt channel thread (QEMU's postcopy_preempt_thread, "mig/dst/preempt"):
 * requested pages are read and placed here, not on the main thread, which is busy loading
 * background pages at hundreds of MB/s. The thread starts with `vmig incoming` (booting one
 * takes tens of ms) and gets its channel at LISTEN in a 'start' message. It places through
 * the shared received map (missing-pages.ts, rule 1: the claim bit decides between it and
 * the main thread when a page comes both ways).
 * Ownership: from 'start' on, this thread owns the channel's fd and closes it.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { ByteReader } from '@vmig/channel';
import { EndOfStream, GuestRam, MissingPagesPlacer, RamLoadState, RamPagePlacer, setThreadName, StreamError, toVmigError, VmigError } from '@vmig/core';
import type { PreemptFromThread, PreemptThreadData, PreemptToThread } from './preempt-protocol.js';
import { canSetThreadSlice, setThreadSliceUs } from './thread-slice.js';

setThreadName('mig/dst/preempt');
const port = parentPort!;
const channel = 'preempt';
let reader: (ByteReader & { input: { destroy(): void } }) | undefined;
let finished = false;
const { faultSliceUs } = workerData as PreemptThreadData;
// Loaded now, not at LISTEN.
const sliceable = faultSliceUs > 0 && canSetThreadSlice();

port.on('message', (m: PreemptToThread) => {
  if (m.t === 'start') void run(m);
  // Told to stop before it had a channel: nothing to report; the thread ends.
  else if (!reader) port.close();
  else finish(new VmigError('VMIG_ERR_CANCELLED', 'load aborted', { channel }));
});

async function run(m: Extract<PreemptToThread, { t: 'start' }>): Promise<void> {
  // This thread is on the fault path from now on (thread-slice.ts).
  port.postMessage({ t: 'slice', us: sliceable ? (setThreadSliceUs(faultSliceUs) ?? null) : null } satisfies PreemptFromThread);
  const r = ByteReader.fromFd(m.fd, { channel, initial: m.first });
  reader = r;
  r.input.on('error', () => {});
  const ram = GuestRam.fromShared(m.ram);
  const placer = new RamPagePlacer(ram, new MissingPagesPlacer(m.missing));
  const load = new RamLoadState({
    ram,
    createRam: () => {
      throw new StreamError('VMIG_ERR_STREAM_FORMAT', 'a RAM block list on the preempt channel', { channel });
    },
    postcopy: placer,
    channel,
  });
  try {
    for (;;) await load.loadSectionBody(r);
  } catch (e) {
    // The channel ends cleanly only between records.
    if (e instanceof EndOfStream && r.buf.length === r.pos) finish();
    else finish(e instanceof EndOfStream ? new VmigError('VMIG_ERR_PEER_CLOSED', 'preempt channel ended inside a record', { channel }) : e);
  }
}

function finish(err?: unknown): void {
  if (finished) return;
  finished = true;
  if (err === undefined) port.postMessage({ t: 'end' } satisfies PreemptFromThread);
  else port.postMessage({ t: 'error', error: toVmigError(err, 'VMIG_ERR_CHANNEL', { channel }).toJSON() } satisfies PreemptFromThread);
  reader?.input.destroy();
  port.close();
}
