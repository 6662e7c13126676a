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
 *
 * The postcopy seal (no multifd write after the switch): a recv thread increments APPLYING,
 * then checks SEALED, applies the packet's pages (or refuses them if sealed), then
 * decrements APPLYING and notifies it. The load loop, at POSTCOPY_LISTEN, stores SEALED and
 * waits until APPLYING is 0: a thread that saw SEALED clear has finished writing by then,
 * and every later packet sees SEALED set. The flush-and-sync before the switch means no
 * packet should be left at all; the seal makes a stray one an error instead of a write
 * under a running vCPU.
 *
 * The dialect (DIALECT: 0 not known yet, DIALECT_MODERN, DIALECT_LEGACY): the load loop
 * reads it off the main stream (a RAM_SAVE_FLAG_MULTIFD_FLUSH in the setup section, or an
 * EOS without one: QEMU 7.2) and stores it before it releases the setup barrier, so every
 * packet after the first SYNC is parsed knowing it (the release's notify orders the store).
 */
export const MAX_CHANNELS = 64;
export const ABORT = 0;
export const POSTED = 1;
export const RELEASED = POSTED + MAX_CHANNELS;
export const SEALED = RELEASED + MAX_CHANNELS;
export const APPLYING = SEALED + 1;
export const DIALECT = APPLYING + 1;
export const CONTROL_WORDS = DIALECT + 1;
export const DIALECT_MODERN = 1;
export const DIALECT_LEGACY = 2;
