/**
 * What counts as what. An input ends in exactly one of:
 *  - ok        the decoder accepted it (and every invariant held);
 *  - rejected  it refused it the documented way: a VmigError whose code starts 'VMIG_ERR_'
 *              (or, from an in-memory reader, EndOfStream: the signal that the input ran out,
 *              which the CLI turns into VMIG_ERR_PEER_CLOSED / VMIG_ERR_STREAM_TRUNCATED);
 *  - crash     anything else thrown (TypeError, RangeError, an Error without a code, a code
 *              outside VMIG_ERR_*, VMIG_ERR_INTERNAL), or an invariant broken (a write outside what the decoder
 *              accepted, RAM resized, a decoded value outside the limits it claims to check);
 *  - hang      it did not finish within the bound after its input was exhausted (in process
 *              the whole input is in memory from the start, so the bound (--hang-ms) runs
 *              from the start of the load; an input that keeps the process busy in a
 *              synchronous loop is caught by fuzz.mjs's watchdog instead).
 * Independently, an ok load whose RAM differs from what the unmutated input gives is counted
 * as wrongRam ("exit 0 with RAM other than sent").
 */
import { core } from './pkgs.mjs';

const { VmigError, EndOfStream } = core;

/** Raised by the harness itself when its time bound passes (never by the code under test). */
export class FuzzTimeout extends Error {
  constructor(ms) {
    super(`no result within ${ms} ms after the input was exhausted`);
    this.name = 'FuzzTimeout';
  }
}

/** A broken invariant (reported as a crash). */
export class InvariantError extends Error {
  constructor(message) {
    super(message);
    this.name = 'InvariantError';
  }
}

/** Is `e` a documented refusal? */
export function isRefusal(e) {
  if (e instanceof EndOfStream) return true;
  // VMIG_ERR_INTERNAL is how the CLI reports what nobody expected: never a refusal.
  return e instanceof VmigError && typeof e.code === 'string' && e.code.startsWith('VMIG_ERR_') && e.code !== 'VMIG_ERR_INTERNAL';
}

/** The short code for the tally: the VMIG_ERR_ code, 'EndOfStream', or the error's name. */
export function codeOf(e) {
  if (e instanceof EndOfStream) return 'EndOfStream';
  if (e instanceof VmigError) return e.code;
  return e?.name ?? typeof e;
}

/** One line of error, with the first frames of its stack (file:line in src/ with --enable-source-maps). */
export function describeError(e, frames = 4) {
  if (!(e instanceof Error)) return `non-Error thrown: ${String(e)}`;
  const stack = (e.stack ?? '').split('\n').slice(1, 1 + frames).map((l) => l.trim()).join(' | ');
  return `${e.name}${e.code ? ` [${e.code}]` : ''}: ${e.message}${stack ? ` @ ${stack}` : ''}`;
}

/** An outcome from an error thrown by the code under test. */
export function outcomeOfError(e) {
  if (e instanceof FuzzTimeout) return { kind: 'hang', error: e.message };
  if (isRefusal(e)) return { kind: 'rejected', code: codeOf(e) };
  return { kind: 'crash', code: codeOf(e), error: describeError(e) };
}

/**
 * `p`, or a FuzzTimeout after `ms` (then `onTimeout` runs: it should make `p` settle, if it
 * can; a promise that never settles is left behind).
 */
export function withDeadline(p, ms, onTimeout) {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => {
      onTimeout?.();
      reject(new FuzzTimeout(ms));
    }, ms);
  });
  return Promise.race([p, deadline]).finally(() => clearTimeout(timer));
}

/**
 * Splits `bytes` into chunks at random points (the reads a transport might deliver): up to
 * 40 cuts, half of them next to a hot offset (inside a field), the rest anywhere; no more
 * cuts than that, so that a large stream is never fed a byte at a time.
 */
export function randomChunks(rng, bytes, hot) {
  if (bytes.length === 0 || rng.chance(0.3)) return [bytes];
  const n = rng.range(1, 40);
  const cuts = new Set();
  for (let i = 0; i < n; i++) {
    if (hot?.length && rng.chance(0.5)) cuts.add(Math.min(bytes.length, rng.pick(hot) + rng.range(0, 9)));
    else cuts.add(rng.int(bytes.length + 1));
  }
  const points = [...cuts].sort((a, b) => a - b);
  const out = [];
  let prev = 0;
  for (const p of points) {
    if (p > prev) out.push(bytes.subarray(prev, p));
    prev = Math.max(prev, p);
  }
  if (prev < bytes.length) out.push(bytes.subarray(prev));
  return out;
}
