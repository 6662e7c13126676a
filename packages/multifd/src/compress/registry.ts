/** The compression methods, registered once each, looked up by name or by packet flags. */
import { InvalidArgumentError, StreamError } from '@vmig/core';
import { MULTIFD_FLAG_COMPRESSION_MASK, MULTIFD_FLAG_VMIG_LZ4 } from '../wire/multifd-wire.js';
import { lz4Method } from './lz4.js';
import type { MultifdCompressionMethod } from './method.js';
import { zlibMethod } from './zlib.js';

const METHODS: readonly MultifdCompressionMethod[] = [zlibMethod, lz4Method];

export const COMPRESSION_NAMES = ['none', ...METHODS.map((m) => m.name)] as const;
export type CompressionName = 'none' | 'zlib' | 'lz4';

/** The method for a --multifd-compression value; undefined for 'none'. */
export function compressionByName(name: string): MultifdCompressionMethod | undefined {
  if (name === 'none') return undefined;
  const m = METHODS.find((x) => x.name === name);
  if (!m) throw new InvalidArgumentError(`--multifd-compression: expected one of ${COMPRESSION_NAMES.join(', ')}, got '${name}'`);
  return m;
}

/** The method a packet's flags name; undefined for a nocomp packet. */
export function compressionByFlags(flags: number, channel: string): MultifdCompressionMethod | undefined {
  const bits = flags & (MULTIFD_FLAG_COMPRESSION_MASK | MULTIFD_FLAG_VMIG_LZ4);
  if (bits === 0) return undefined;
  const m = METHODS.find((x) => x.flag === bits);
  if (!m) throw new StreamError('VMIG_ERR_MULTIFD_PACKET', `packet compressed with unsupported method flags 0x${bits.toString(16)}`, { channel });
  return m;
}
