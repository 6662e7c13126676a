/** The source's return-path reader: messages from reads of any size, and hostile lengths. */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { encodeRpMessage, MAX_RP_MESSAGE_LEN, RpMessageReader, type VmigError } from '../src/index.js';

describe('RpMessageReader', () => {
  it('gives back every message, in order, however the bytes are split into reads', () => {
    const message = fc.record({ type: fc.integer({ min: 0, max: 0xffff }), data: fc.uint8Array({ maxLength: MAX_RP_MESSAGE_LEN }) });
    fc.assert(
      fc.property(fc.array(message, { maxLength: 40 }), fc.array(fc.integer({ min: 1, max: 9000 }), { minLength: 1 }), fc.integer({ min: 0, max: 200 }), (msgs, reads, initialLen) => {
        const stream = Buffer.concat(msgs.map((m) => encodeRpMessage(m.type, m.data)));
        const initial = stream.subarray(0, Math.min(initialLen, stream.length));
        const r = new RpMessageReader(initial);
        const got: { type: number; data: Uint8Array }[] = [];
        let pos = initial.length;
        for (let i = 0; ; i++) {
          for (let m = r.next(); m; m = r.next()) got.push({ type: m.type, data: m.data.slice() });
          if (pos >= stream.length) break;
          const space = r.space();
          expect(space.length).toBeGreaterThan(0);
          const n = Math.min(reads[i % reads.length]!, space.length, stream.length - pos);
          space.set(stream.subarray(pos, pos + n));
          r.filled(n);
          pos += n;
        }
        expect(got).toEqual(msgs.map((m) => ({ type: m.type, data: new Uint8Array(m.data) })));
      }),
      { numRuns: 200 },
    );
  });

  it('refuses a message longer than MAX_RP_MESSAGE_LEN as soon as its header is in', () => {
    const r = new RpMessageReader(new Uint8Array([0x00, 0x07, 0xff, 0xff]));
    let err: VmigError | undefined;
    try {
      r.next();
    } catch (e) {
      err = e as VmigError;
    }
    expect(err?.code).toBe('VMIG_ERR_STREAM_FORMAT');
  });
});
