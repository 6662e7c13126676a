/**
 * RAM fill patterns for tests, the demo and benchmarks. Deterministic for a seed.
 */
import crypto from 'node:crypto';
import { type GuestRam, InvalidArgumentError, type RamBlock } from '@vmig/core';
import { xorshift } from './rng.js';

export type FillPattern = 'zero' | 'random' | 'text';
export const FILL_PATTERNS: readonly FillPattern[] = ['zero', 'random', 'text'];

const CHUNK = 1 << 20;

export function fillRam(ram: GuestRam, pattern: FillPattern, seed: string | number = 1): void {
  for (let i = 0; i < ram.blocks.length; i++) {
    const block = ram.blocks[i]!;
    const blockSeed = `${seed}/${block.idstr}`;
    switch (pattern) {
      case 'zero':
        for (const seg of block.segments) seg.fill(0);
        break;
      case 'random':
        fillRandom(block, blockSeed);
        break;
      case 'text':
        fillText(block, blockSeed);
        break;
      default:
        throw new InvalidArgumentError(`unknown fill pattern '${String(pattern)}'`);
    }
  }
}

/**
 * AES-128-CTR keystream keyed by the seed: incompressible, fast, reproducible. The same
 * bytes whatever the block's segments (block.write cuts at their edges).
 */
function fillRandom(block: RamBlock, seed: string): void {
  const key = crypto.createHash('sha256').update(seed).digest().subarray(0, 16);
  const cipher = crypto.createCipheriv('aes-128-ctr', key, Buffer.alloc(16));
  const zeros = Buffer.alloc(CHUNK);
  for (let off = 0; off < block.usedLength; off += CHUNK) {
    const n = Math.min(CHUNK, block.usedLength - off);
    block.write(off, cipher.update(n === CHUNK ? zeros : zeros.subarray(0, n)));
  }
}

const WORDS = (
  'the of and to in is was that for on as with by at from his her an which are this be or had not but they ' +
  'memory page migration dirty bitmap channel source destination guest block stream packet sync barrier ' +
  'round downtime bandwidth writer thread socket buffer kernel virtual machine state device section ' +
  'compress zero flush queue offset length header version magic return path postcopy snapshot'
).split(' ');

/** English-like text: a seeded pool of words, then RAM assembled from pieces of the pool. */
function fillText(block: RamBlock, seed: string): void {
  const rng = xorshift(hashSeed(seed));
  const length = block.usedLength;
  const pool = Buffer.alloc(Math.min(4 * CHUNK, length));
  let p = 0;
  while (p < pool.length) {
    const w = WORDS[rng() % WORDS.length]!;
    p += pool.write(w + (rng() % 13 === 0 ? '.\n' : ' '), p);
  }
  block.write(0, pool.subarray(0, Math.min(pool.length, length)));
  const PIECE = 512;
  for (let off = pool.length; off < length; off += PIECE) {
    const from = rng() % (pool.length - PIECE);
    // A piece lies in one segment (512 divides a segment's size).
    block.bytes(off, Math.min(PIECE, length - off)).set(pool.subarray(from, from + Math.min(PIECE, length - off)));
  }
}

export function hashSeed(seed: string | number): number {
  const h = crypto.createHash('sha256').update(String(seed)).digest();
  return h.readUInt32LE(0) || 1;
}
