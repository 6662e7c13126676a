/**
 * The shared control block between the destination's load loop and its multifd recv
 * threads: one Int32Array over a SharedArrayBuffer. Slots are named here only.
 *
 * The barrier (QEMU's multifd_recv_sync_main and the SYNC handling in multifd_recv_thread):
 * a recv thread that has applied a SYNC packet, and every page before it, increments
 * POSTED[ch] and notifies it, then Atomics.waits until RELEASED[ch] passes its count. The
 * load loop, at RAM_SAVE_FLAG_MULTIFD_FLUSH (or EOS in the legacy dialect), waits until
 * POSTED[ch] passes its own count for every channel, then increments every RELEASED[ch]
 * and notifies. So the main stream never passes the marker before every channel applied
 * all it held, and no channel reads past its SYNC before the main stream reached the
 * marker. ABORT set to 1 ends every wait (failure, cancel).
 */
export const MAX_CHANNELS = 64;
export const ABORT = 0;
export const POSTED = 1;
export const RELEASED = POSTED + MAX_CHANNELS;
export const CONTROL_WORDS = RELEASED + MAX_CHANNELS;
