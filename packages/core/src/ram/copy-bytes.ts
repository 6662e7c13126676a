/**
 * Copies between guest RAM (SharedArrayBuffers) and ordinary buffers at memcpy's speed.
 *
 * `TypedArray.prototype.set` with a SharedArrayBuffer on either side copies with relaxed
 * atomic moves, word by word when both sides are equally aligned and byte by byte when they
 * are not, which is the common case here: a page in the main stream follows an 8-byte record
 * header and, for the first page of a block, a 7-byte block name, so every page after it sits
 * at an odd offset in the stream's buffers. Measured here (1 GiB in pages): 540 ms misaligned
 * against 200 ms aligned, and the destination's load loop spent half its time in it.
 * `Buffer.prototype.fill` with a Uint8Array value of the range's length is one plain memcpy
 * in Node's C++, at any alignment (about 200 ms for the same copy). A concurrent write by a
 * vCPU may tear the copy either way; the dirty-log rule covers that (the page goes again).
 */

/** Below this a typed-array copy costs less than a call into Node's C++. */
const NATIVE_COPY_MIN = 512;

const fill = Buffer.prototype.fill as (this: Uint8Array, value: Uint8Array, offset: number, end: number) => unknown;

/**
 * `dst.set(src, at)`, with a plain memcpy for anything but small copies. Throws RangeError if
 * it does not fit. Within one buffer the ranges may overlap, which memcpy does not allow:
 * that copy stays set()'s (memmove's semantics).
 */
export function copyBytes(dst: Uint8Array, at: number, src: Uint8Array): void {
  if (src.length < NATIVE_COPY_MIN || src.buffer === dst.buffer) dst.set(src, at);
  else fill.call(dst, src, at, at + src.length);
}
