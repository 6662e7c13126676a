/**
 * A device of our own whose state is a plain object, carried as msgpack in a FULL section:
 * u32 length, then the msgpack bytes (a FULL section carries no length of its own, and a
 * length lets the loader bound what it reads).
 */
import { Packr } from 'msgpackr';
import { StreamError } from '../errors.js';
import type { ByteWriter, StreamSource } from '../io.js';
import { getU32 } from '../wire/main-stream.js';
import type { VmStateDevice } from './device.js';

/** A device's state may not exceed this on the wire (a hostile length must not allocate without limit). */
export const MAX_DEVICE_STATE_BYTES = 16 << 20;

// Plain records only: no msgpackr extensions, structures or class revival from the stream.
const packr = new Packr({ useRecords: false, moreTypes: false, mapsAsObjects: true });

export abstract class MsgpackDevice<S> implements VmStateDevice {
  abstract readonly idstr: string;
  abstract readonly instanceId: number;
  abstract readonly versionId: number;
  abstract readonly minimumVersionId: number;

  /** The state to send (called once, after the vCPUs stopped). */
  protected abstract saveState(): S;
  /** Applies a loaded state; throw to reject it. */
  protected abstract loadState(state: unknown, versionId: number): void;

  save(w: ByteWriter): void {
    const bytes = packr.pack(this.saveState());
    w.put32(bytes.length);
    w.putBytes(bytes);
  }

  async load(s: StreamSource, versionId: number): Promise<void> {
    await s.ensure(4);
    const len = getU32(s);
    const where = { channel: 'main', phase: 'load' };
    if (len > MAX_DEVICE_STATE_BYTES) throw new StreamError('VMIG_ERR_DEVICE_STATE', `device '${this.idstr}': state of ${len} bytes (limit ${MAX_DEVICE_STATE_BYTES})`, where);
    await s.ensure(len);
    const bytes = Buffer.from(s.buf.buffer, s.buf.byteOffset + s.pos, len);
    s.pos += len;
    let state: unknown;
    try {
      state = packr.unpack(bytes);
    } catch (e) {
      throw new StreamError('VMIG_ERR_DEVICE_STATE', `device '${this.idstr}': state is not valid msgpack (${(e as Error).message})`, where);
    }
    try {
      this.loadState(state, versionId);
    } catch (e) {
      throw new StreamError('VMIG_ERR_DEVICE_STATE', `device '${this.idstr}': ${(e as Error).message}`, where);
    }
  }
}
