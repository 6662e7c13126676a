/**
 * The two device sections QEMU 7.2 `-M none` sends after RAM, so that vmig can load a real
 * QEMU stream and a QEMU destination could load ours.
 */
import { VmigError } from '../errors.js';
import type { ByteWriter, StreamSource } from '../io.js';
import { getU32 } from '../wire/main-stream.js';
import type { VmStateDevice } from './device.js';

/** `timer` v2 (cpus.c vmstate_timers): int64 cpu_ticks_offset, 8 unused, int64 cpu_clock_offset. */
export class TimerDevice implements VmStateDevice {
  readonly idstr = 'timer';
  readonly instanceId = 0;
  readonly versionId = 2;
  readonly minimumVersionId = 2;
  /** The raw 24 bytes last loaded (or to save). */
  state = new Uint8Array(24);

  save(w: ByteWriter): void {
    w.putBytes(this.state);
  }

  async load(s: StreamSource): Promise<void> {
    await s.ensure(24);
    this.state = s.buf.slice(s.pos, s.pos + 24);
    s.pos += 24;
  }
}

const RUNSTATE_LEN = 100;

/** `globalstate` v1 (global_state.c): uint32 size, 100-byte NUL-padded runstate name. */
export class GlobalStateDevice implements VmStateDevice {
  readonly idstr = 'globalstate';
  readonly instanceId = 0;
  readonly versionId = 1;
  readonly minimumVersionId = 1;

  constructor(public runstate = 'running') {}

  save(w: ByteWriter): void {
    const name = new TextEncoder().encode(this.runstate);
    const buf = new Uint8Array(RUNSTATE_LEN);
    buf.set(name.subarray(0, RUNSTATE_LEN - 1));
    w.put32(Math.min(name.length, RUNSTATE_LEN - 1) + 1);
    w.putBytes(buf);
  }

  async load(s: StreamSource): Promise<void> {
    await s.ensure(4 + RUNSTATE_LEN);
    const size = getU32(s);
    if (size > RUNSTATE_LEN) {
      throw new VmigError('VMIG_ERR_DEVICE_STATE', `globalstate: runstate size ${size} > ${RUNSTATE_LEN}`, { phase: 'load' });
    }
    const raw = s.buf.subarray(s.pos, s.pos + RUNSTATE_LEN);
    const end = raw.indexOf(0);
    this.runstate = new TextDecoder().decode(raw.subarray(0, end < 0 ? Math.min(size, RUNSTATE_LEN) : end));
    s.pos += RUNSTATE_LEN;
  }
}
