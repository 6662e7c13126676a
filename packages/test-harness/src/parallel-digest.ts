/**
 * digestRam spread over cores (about 0.8 s per GiB on one thread): every block is cut into
 * page ranges, a piscina pool digests them into one shared per-page array, and this thread
 * digests that array. Same per-page array, same digest as digestRam, bit for bit.
 */
import { availableParallelism } from 'node:os';
import { Piscina } from 'piscina';
import { type GuestRam, InvalidArgumentError, TARGET_PAGE_SIZE, VmigError, workerExecArgv, workerUrl } from '@vmig/core';
import { digestRam, hexDigest, type RamDigest } from './digest.js';
import type { DigestRange } from './digest.worker.js';

/** Bytes one task digests (about 25 ms): enough tasks that the threads finish together, few enough that the messages cost nothing. */
export const DIGEST_RANGE_BYTES = 32 * 2 ** 20;
/** Below this, starting threads costs about what it saves: digest on this thread. */
export const PARALLEL_DIGEST_MIN_BYTES = 64 * 2 ** 20;

export interface ParallelDigestOptions {
  /** Pool size; default os.availableParallelism(). */
  threads?: number;
}

/**
 * The pool lives for this call only: destroy() ends every thread and waits for it to exit,
 * on success or failure, so none outlives the call.
 *
 * The caller must keep RAM still until this settles (vCPUs stopped, loads done), as for
 * digestRam. RAM written by other threads reaches the pool's threads through this one:
 * whatever ordered those writes before this call, piscina's task hand-off (postMessage,
 * then an Atomics.add the thread waits on) orders before the thread's reads.
 */
export async function digestRamParallel(ram: GuestRam, opts: ParallelDigestOptions = {}): Promise<RamDigest> {
  const threads = opts.threads ?? availableParallelism();
  if (!Number.isInteger(threads) || threads < 1) throw new InvalidArgumentError(`digest threads must be a positive integer, got ${threads}`);
  if (ram.totalBytes < PARALLEL_DIGEST_MIN_BYTES) return digestRam(ram);

  const pagesSab = new SharedArrayBuffer(ram.totalPages * BigUint64Array.BYTES_PER_ELEMENT);
  const doneSab = new SharedArrayBuffer(Int32Array.BYTES_PER_ELEMENT);
  const tasks = pageRanges(ram, pagesSab, doneSab);
  const size = Math.min(threads, tasks.length);
  const pool = new Piscina<DigestRange, void>({ filename: workerUrl(import.meta.url, 'digest.worker.js').href, minThreads: size, maxThreads: size, execArgv: workerExecArgv() });
  try {
    await Promise.all(tasks.map((t) => pool.run(t)));
  } catch (e) {
    throw new VmigError('VMIG_ERR_WORKER', `RAM digest thread failed: ${e instanceof Error ? e.message : String(e)}`, {}, { cause: e });
  } finally {
    await pool.destroy();
  }
  // Takes the array over from the pool: this load sees every task's Atomics.add, each made
  // after that task's stores into its slice (digest.worker.ts), so the plain reads below see
  // every slice whole. The count also checks that the ranges covered every page.
  const digested = Atomics.load(new Int32Array(doneSab), 0);
  if (digested !== ram.totalPages) throw new VmigError('VMIG_ERR_INTERNAL', `RAM digest covered ${digested} of ${ram.totalPages} pages`);
  const pages = new BigUint64Array(pagesSab);
  return { pages, digest: hexDigest(pages) };
}

/** Every segment of every block cut into ranges of at most DIGEST_RANGE_BYTES, in guest page order. */
function pageRanges(ram: GuestRam, pages: SharedArrayBuffer, done: SharedArrayBuffer): DigestRange[] {
  const ranges: DigestRange[] = [];
  let firstPage = 0;
  for (const block of ram.blocks) {
    block.segmentSabs.forEach((host, i) => {
      const segLength = block.segments[i]!.length;
      for (let offset = 0; offset < segLength; offset += DIGEST_RANGE_BYTES) {
        const length = Math.min(DIGEST_RANGE_BYTES, segLength - offset);
        ranges.push({ host, offset, length, pages, firstPage, done });
        firstPage += length / TARGET_PAGE_SIZE;
      }
    });
  }
  return ranges;
}
