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
 *
 * lz4-napi is loaded on first use, with require: every channel thread loads this module,
 * and an ESM import of the package's CommonJS loader makes Node lex it for its export names
 * in each of them (recv-rpc.ts says why that costs), even when lz4 is not the method.
 */
import { createRequire } from 'node:module';
import type * as Lz4Napi from 'lz4-napi';
import { StreamError } from '@vmig/core';
import { MULTIFD_FLAG_VMIG_LZ4 } from '../wire/multifd-wire.js';
import type { MultifdCompressionMethod } from './method.js';

let loaded: typeof Lz4Napi | undefined;
function lz4(): typeof Lz4Napi {
  return (loaded ??= createRequire(import.meta.url)('lz4-napi') as typeof Lz4Napi);
}

export const lz4Method: MultifdCompressionMethod = {
  name: 'lz4',
  flag: MULTIFD_FLAG_VMIG_LZ4,
  createSender() {
    return {
      async compress(pages) {
        const payload = await lz4().compress(pages);
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
          data = lz4().uncompressSync(payload);
        } catch (e) {
          throw new StreamError('VMIG_ERR_MULTIFD_PACKET', `lz4: ${(e as Error).message}`);
        }
        if (data.length !== out.length) throw new StreamError('VMIG_ERR_MULTIFD_PACKET', `lz4: ${data.length} bytes, expected ${out.length}`);
        data.copy(out);
      },
    };
  },
};
