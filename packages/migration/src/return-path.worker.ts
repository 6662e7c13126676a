/**
 * The source's return-path thread (QEMU's source_return_path_thread): reads the
 * destination's messages on the main connection and, after the postcopy switch with a
 * preempt channel, sends requested pages itself on that channel (urgent-pages.ts), so that
 * no hop of a page request waits for the migration thread.
 *
 * It does its I/O outside any event loop, as a QEMU thread does with blocking calls:
 * `fs.readSync` / `fs.writeSync` on the fds (sync-fd.ts), poll(2) when nothing is there
 * (a short nap where poll cannot be called), and its control messages taken with
 * receiveMessageOnPort between reads.
 * Ownership: the migration thread owns both sockets and closes them, always after
 * SyncFd.close(), which waits for any read or write of this thread in progress.
 */
import { receiveMessageOnPort, workerData } from 'node:worker_threads';
import {
  decodeRpPong,
  decodeRpRecvBitmap,
  decodeRpResumeAck,
  decodeRpShut,
  GuestRam,
  libc,
  MemorySink,
  MIG_RP_MSG_PONG,
  MIG_RP_MSG_RECV_BITMAP,
  MIG_RP_MSG_REQ_PAGES,
  MIG_RP_MSG_REQ_PAGES_ID,
  MIG_RP_MSG_RESUME_ACK,
  MIG_RP_MSG_SHUT,
  putRamEos,
  READ_CLOSED,
  RecvBitmapTrailer,
  READ_EOF,
  READ_NONE,
  RpMessageReader,
  StreamError,
  setThreadName,
  SyncFd,
  toVmigError,
  UrgentPageSender,
  VmigError,
} from '@vmig/core';
import type { ReturnPathFromThread, ReturnPathThreadData, ReturnPathToThread } from './return-path-thread.js';
import { canSetThreadSlice, setThreadSliceUs } from './thread-slice.js';

/**
 * Between reads that found nothing the thread blocks in poll(2) until the destination sends
 * something (libc.ts), and looks at its control messages at least this often (ms).
 */
const POLL_MS = 2;
/**
 * Where poll(2) cannot be called, it naps instead (ms). Before the switch only PONG and SHUT
 * come (a SHUT read up to 1 ms late lengthens precopy's measured downtime by as much). After
 * it, with a preempt channel, every nap is added to a page fault's latency. Each nap-and-read
 * costs ~30 us of CPU, so 0.1 ms (in practice ~0.2 ms with the kernel's timer slack) costs
 * ~15 % of a core during postcopy (docs/benchmarks.md). Without preempt a requested page
 * waits tens of ms in the main stream anyway: the idle nap then.
 */
const IDLE_NAP_MS = 1;
const POSTCOPY_NAP_MS = 0.1;
const channel = 'return-path';

// A read that finds nothing throws EAGAIN (thousands of times a second after the switch
// when the thread naps): without a stack to capture, a throw costs ~5 us instead of ~9 us.
Error.stackTraceLimit = 0;

setThreadName('mig/src/rp');
const poller = libc()?.pollIn;
const { port, faultSliceUs } = workerData as ReturnPathThreadData;
// Loaded now, not at the switch.
const sliceable = faultSliceUs > 0 && canSetThreadSlice();
type Start = Extract<ReturnPathToThread, { t: 'start' }>;
let main: SyncFd;
let ram: GuestRam;
/** With a preempt channel: where requested pages go, and who writes their records. */
let urgent: { preempt: SyncFd; sender: UrgentPageSender } | undefined;
let listening = false;
let stopped = false;
/** Postcopy recovery: the bitmap being read after a RECV_BITMAP message. */
let bitmap: RecvBitmapTrailer | undefined;

function post(m: ReturnPathFromThread): void {
  port.postMessage(m);
}

function takeControl(): void {
  for (let r; (r = receiveMessageOnPort(port)); ) {
    const m = r.message as ReturnPathToThread;
    if (m.t === 'stop') stopped = true;
    else if (m.t === 'listen') {
      listening = true;
      if (m.preempt) {
        urgent = { preempt: new SyncFd(m.preempt), sender: new UrgentPageSender(ram, m.urgent) };
        // This thread is on the fault path now (thread-slice.ts).
        post({ t: 'slice', us: sliceable ? (setThreadSliceUs(faultSliceUs) ?? null) : null });
      }
    }
  }
}

const batch = new MemorySink();

/** One message; false once the return path is done (SHUT). */
function handle(type: number, body: Uint8Array): boolean {
  if (type === MIG_RP_MSG_SHUT) {
    post({ t: 'shut', status: decodeRpShut(body) });
    return false;
  }
  if (type === MIG_RP_MSG_PONG) {
    post({ t: 'pong', value: decodeRpPong(body) });
    return true;
  }
  if (type === MIG_RP_MSG_RECV_BITMAP) {
    // Postcopy recovery: the raw bitmap follows (read in run()); its size is checked against the block here.
    const idstr = decodeRpRecvBitmap(body);
    const block = ram.find(idstr);
    if (!block) throw new StreamError('VMIG_ERR_UNKNOWN_BLOCK', `received bitmap for unknown RAM block '${idstr}'`, { channel });
    bitmap = new RecvBitmapTrailer(idstr, block.pages);
    return true;
  }
  if (type === MIG_RP_MSG_RESUME_ACK) {
    post({ t: 'resume-ack', value: decodeRpResumeAck(body) });
    return true;
  }
  if (type === MIG_RP_MSG_REQ_PAGES || type === MIG_RP_MSG_REQ_PAGES_ID) {
    // The switch is posted before the package that lets the destination ask can reach it,
    // so a request read before the switch was seen may only have overtaken its message.
    if (!listening) takeControl();
    if (!listening) throw new StreamError('VMIG_ERR_STREAM_FORMAT', 'page request before the postcopy switch', { channel });
    if (urgent) urgent.sender.serve(batch, type, body);
    else post({ t: 'request', type, data: body.slice() });
    return true;
  }
  throw new StreamError('VMIG_ERR_STREAM_FORMAT', `unexpected return-path message ${type}`, { channel });
}

/** The urgent pages of one read, with the EOS that ends their RAM part, in one write. */
function sendBatch(): void {
  if (!urgent || batch.bytesWritten === 0) return;
  putRamEos(batch);
  const n = batch.bytesWritten;
  if (!urgent.preempt.write(batch.view())) {
    if (urgent.preempt.closing) return;
    throw new VmigError('VMIG_ERR_PEER_CLOSED', 'preempt channel: write failed', { channel: 'preempt' });
  }
  urgent.sender.wrote(n);
  batch.reset();
}

function run(start: Start): void {
  main = new SyncFd(start.main);
  ram = GuestRam.fromShared(start.ram);
  const reader = new RpMessageReader(start.initial);
  for (;;) {
    takeControl();
    if (stopped) return;
    let more = true;
    while (more) {
      if (bitmap) {
        const b = bitmap;
        reader.takeRaw((buf, s, e) => b.feed(buf, s, e));
        if (!b.done) break;
        post({ t: 'recv-bitmap', idstr: b.idstr, bitmap: b.bitmap });
        bitmap = undefined;
      }
      const m = reader.next();
      if (!m) break;
      more = handle(m.type, m.data);
    }
    sendBatch();
    if (!more) return;
    let n: number;
    try {
      n = main.readSome(reader.space());
    } catch (e) {
      throw new VmigError('VMIG_ERR_PEER_CLOSED', `return path: ${(e as NodeJS.ErrnoException).code ?? String(e)}`, { channel }, { cause: e });
    }
    if (n === READ_CLOSED) return;
    if (n === READ_EOF) throw new VmigError('VMIG_ERR_PEER_CLOSED', 'destination closed the connection', { channel });
    if (n === READ_NONE) main.waitReadable(poller ? POLL_MS : urgent ? POSTCOPY_NAP_MS : IDLE_NAP_MS, poller);
    else reader.filled(n);
  }
}

// Booted early; the main connection comes in the first message (or a stop, if it never does).
// From then on this thread never returns to its event loop until it is done.
port.once('message', (m: ReturnPathToThread) => {
  if (m.t === 'start') {
    try {
      run(m);
    } catch (e) {
      post({ t: 'error', error: toVmigError(e, 'VMIG_ERR_CHANNEL', { channel }).toJSON() });
    }
  }
  port.close();
});
