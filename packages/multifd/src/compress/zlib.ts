/**
 * zlib, QEMU-compatible (multifd-zlib.c): one deflate stream per channel for the whole
 * migration, Z_SYNC_FLUSH at the end of each packet; the receiver keeps one inflate stream
 * per channel and expects exactly normal_pages x page_size bytes from each packet.
 */
import zlib from 'node:zlib';
import { StreamError } from '@vmig/core';
import { MULTIFD_FLAG_ZLIB, MULTIFD_PACKET_SIZE } from '../wire/multifd-wire.js';
import type { MultifdCompressionMethod } from './method.js';

/** Feeds `input` and a sync flush through a persistent zlib stream; resolves with the output. */
function syncFlush(engine: zlib.Deflate | zlib.Inflate, input: Buffer, limit: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    let n = 0;
    const onData = (c: Buffer): void => {
      n += c.length;
      if (n > limit) fail(new StreamError('VMIG_ERR_MULTIFD_PACKET', `zlib: packet inflates past ${limit} bytes`));
      else parts.push(c);
    };
    const onError = (e: Error): void => fail(new StreamError('VMIG_ERR_MULTIFD_PACKET', `zlib: ${e.message}`));
    const cleanup = (): void => {
      engine.off('data', onData);
      engine.off('error', onError);
    };
    const fail = (e: Error): void => {
      cleanup();
      reject(e);
    };
    engine.on('data', onData);
    engine.once('error', onError);
    engine.write(input);
    engine.flush(zlib.constants.Z_SYNC_FLUSH, () => {
      cleanup();
      if (n <= limit) resolve(parts.length === 1 ? parts[0]! : Buffer.concat(parts));
    });
  });
}

export const zlibMethod: MultifdCompressionMethod = {
  name: 'zlib',
  flag: MULTIFD_FLAG_ZLIB,
  createSender() {
    const engine = zlib.createDeflate({ level: 1 });
    return {
      async compress(pages) {
        return { payload: await syncFlush(engine, pages, Infinity), flag: MULTIFD_FLAG_ZLIB };
      },
    };
  },
  createReceiver() {
    const engine = zlib.createInflate();
    let broken: Error | undefined;
    return {
      async decompress(payload, out) {
        if (broken) throw broken;
        try {
          const data = await syncFlush(engine, payload, Math.min(out.length, MULTIFD_PACKET_SIZE));
          if (data.length !== out.length) throw new StreamError('VMIG_ERR_MULTIFD_PACKET', `zlib: inflated ${data.length} bytes, expected ${out.length}`);
          data.copy(out);
        } catch (e) {
          // The stream's state is unknown now: every later packet fails too.
          broken = e as Error;
          throw e;
        }
      },
    };
  },
};
