/**
 * zlib, QEMU-compatible (multifd-zlib.c): one deflate stream per channel for the whole
 * migration, Z_SYNC_FLUSH at the end of each packet; the receiver keeps one inflate stream
 * per channel. Node's zlib engine is driven synchronously through _processChunk, the call
 * zlib.deflateSync itself makes, so one packet is one synchronous step.
 */
import zlib from 'node:zlib';
import { StreamError } from '@vmig/core';
import { MULTIFD_FLAG_ZLIB, MULTIFD_PACKET_SIZE } from '../wire/multifd-wire.js';
import type { MultifdCompressionMethod } from './method.js';

interface SyncEngine {
  _processChunk(chunk: Buffer, flushFlag: number): Buffer;
}

export const zlibMethod: MultifdCompressionMethod = {
  name: 'zlib',
  flag: MULTIFD_FLAG_ZLIB,
  createSender() {
    const engine = zlib.createDeflate({ level: 1 }) as unknown as SyncEngine;
    return {
      compress(pages) {
        return { payload: engine._processChunk(pages, zlib.constants.Z_SYNC_FLUSH), flag: MULTIFD_FLAG_ZLIB };
      },
    };
  },
  createReceiver() {
    // maxOutputLength bounds what a hostile payload can make us allocate.
    const engine = zlib.createInflate({ maxOutputLength: MULTIFD_PACKET_SIZE }) as unknown as SyncEngine;
    return {
      decompress(payload, out) {
        let data: Buffer;
        try {
          data = engine._processChunk(payload, zlib.constants.Z_SYNC_FLUSH);
        } catch (e) {
          throw new StreamError('VMIG_ERR_MULTIFD_PACKET', `zlib: ${(e as Error).message}`);
        }
        if (data.length !== out.length) throw new StreamError('VMIG_ERR_MULTIFD_PACKET', `zlib: inflated ${data.length} bytes, expected ${out.length}`);
        data.copy(out);
      },
    };
  },
};
