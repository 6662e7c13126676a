/**
 * lz4 (vmig's own method, flag MULTIFD_FLAG_VMIG_LZ4): each packet's pages compressed as one
 * block with lz4-napi, whose output is a 4-byte little-endian size then the lz4 block. A packet
 * that does not shrink is sent raw (nocomp), so incompressible RAM costs one attempt, not a
 * bigger stream.
 *
 * The sender uses the async `compress` (the work runs on libuv's thread pool), not
 * `compressSync`: with the synchronous call the source's peak RSS for 1 GiB of text RAM was
 * 1.5-1.6 GiB, memory that lz4-napi's allocator (mimalloc) kept after the buffers were
 * freed; with `compress` it is 1.25 GiB (docs/benchmarks.md).
 */
import { compress, uncompressSync } from 'lz4-napi';
import { StreamError } from '@vmig/core';
import { MULTIFD_FLAG_VMIG_LZ4 } from '../wire/multifd-wire.js';
import type { MultifdCompressionMethod } from './method.js';

export const lz4Method: MultifdCompressionMethod = {
  name: 'lz4',
  flag: MULTIFD_FLAG_VMIG_LZ4,
  createSender() {
    return {
      async compress(pages) {
        const payload = await compress(pages);
        return payload.length < pages.length ? { payload, flag: MULTIFD_FLAG_VMIG_LZ4 } : undefined;
      },
    };
  },
  createReceiver() {
    return {
      async decompress(payload, out) {
        // Check the declared size before lz4-napi allocates it.
        if (payload.length < 4 || payload.readUInt32LE(0) !== out.length) {
          throw new StreamError('VMIG_ERR_MULTIFD_PACKET', `lz4: payload declares ${payload.length < 4 ? '?' : payload.readUInt32LE(0)} bytes, expected ${out.length}`);
        }
        let data: Buffer;
        try {
          data = uncompressSync(payload);
        } catch (e) {
          throw new StreamError('VMIG_ERR_MULTIFD_PACKET', `lz4: ${(e as Error).message}`);
        }
        if (data.length !== out.length) throw new StreamError('VMIG_ERR_MULTIFD_PACKET', `lz4: ${data.length} bytes, expected ${out.length}`);
        data.copy(out);
      },
    };
  },
};
