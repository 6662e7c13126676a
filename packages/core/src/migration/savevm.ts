/**
 * The main stream's composition around the RAM (QEMU's savevm.c): the header and the
 * commands of setup, the postcopy package {LISTEN, device state, RUN}, the discard commands.
 * Writers over a sink, no waiting; the RAM sections are ram-sections.ts's, the device
 * sections device-sections.ts's.
 */
import type { DeviceRegistry } from '../devices/device.js';
import { MemorySink, type StreamSink } from '../io.js';
import type { AtomicBitmap } from '../ram/bitmap.js';
import type { GuestRam } from '../ram/ram-block.js';
import {
  MIG_CMD_OPEN_RETURN_PATH,
  MIG_CMD_PACKAGED,
  MIG_CMD_PING,
  MIG_CMD_POSTCOPY_ADVISE,
  MIG_CMD_POSTCOPY_LISTEN,
  MIG_CMD_POSTCOPY_RAM_DISCARD,
  MIG_CMD_POSTCOPY_RESUME,
  MIG_CMD_POSTCOPY_RUN,
  MIG_CMD_RECV_BITMAP,
} from '../wire/constants.js';
import { putCommand, putFileHeader } from '../wire/main-stream.js';
import { discardCommands, encodePackagedLength, encodePostcopyAdvise } from '../wire/postcopy.js';
import { encodeRecvBitmapCmd } from '../wire/recovery.js';
import { putDeviceSections } from './device-sections.js';

/** qemu_savevm_state_header and the commands before the first section. */
export function putStreamStart(sink: StreamSink, opts: { machineName: string; returnPath: boolean; postcopy: boolean }): void {
  putFileHeader(sink, opts.machineName);
  if (opts.returnPath) putCommand(sink, MIG_CMD_OPEN_RETURN_PATH);
  if (opts.postcopy) putCommand(sink, MIG_CMD_POSTCOPY_ADVISE, encodePostcopyAdvise());
}

/** qemu_savevm_send_ping: the destination answers PONG with `value` on the return path. */
export function putPing(sink: StreamSink, value: number): void {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, value);
  putCommand(sink, MIG_CMD_PING, b);
}

/** ram_postcopy_send_discard_bitmap: a discard command per run of dirty pages of each block. */
export function putDiscardBitmap(sink: StreamSink, ram: GuestRam, bitmaps: readonly AtomicBitmap[]): void {
  for (const [i, block] of ram.blocks.entries()) {
    const bm = bitmaps[i]!;
    for (const cmd of discardCommands(block.idstr, block.pages, (from) => bm.findNextSet(from), (from) => bm.findNextClear(from))) {
      putCommand(sink, MIG_CMD_POSTCOPY_RAM_DISCARD, cmd);
    }
  }
}

/**
 * qemu_savevm_send_packaged: LISTEN, the device state and RUN in one blob, so that the
 * destination reads all of it before its vCPUs run.
 */
export function putPostcopyPackage(sink: StreamSink, devices: DeviceRegistry, firstSectionId: number): void {
  const pkg = new MemorySink();
  putCommand(pkg, MIG_CMD_POSTCOPY_LISTEN);
  putDeviceSections(pkg, devices, firstSectionId);
  putCommand(pkg, MIG_CMD_POSTCOPY_RUN);
  const blob = pkg.bytes();
  putCommand(sink, MIG_CMD_PACKAGED, encodePackagedLength(blob.length));
  sink.putBytes(blob);
}

/**
 * Postcopy recovery on a new main channel (ram_dirty_bitmap_sync_all): a RECV_BITMAP per
 * block; the destination answers each with its received bitmap on the return path.
 */
export function putRecvBitmapRequests(sink: StreamSink, ram: GuestRam): void {
  for (const block of ram.blocks) putCommand(sink, MIG_CMD_RECV_BITMAP, encodeRecvBitmapCmd(block.idstr));
}

/** qemu_savevm_send_postcopy_resume: the source is ready; the destination answers RESUME_ACK. */
export function putPostcopyResume(sink: StreamSink): void {
  putCommand(sink, MIG_CMD_POSTCOPY_RESUME);
}
