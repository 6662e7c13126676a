/**
 * The in-process targets' child process (forked by fuzz.mjs). A child, not a worker thread:
 * a native crash (a decompressor, an allocation failure) then ends only this process, and
 * the parent records it against the input that was running and starts a new child after it.
 *
 * Messages to the parent, in order:
 *   ['prep', job]                       a target's seeds are being built (no watchdog)
 *   ['r', job, index, outcome]          one input's outcome (see common.mjs); compact
 *   ['done']
 * The parent knows which input is running from the last 'r': a child that goes quiet for
 * too long is stuck inside one input (a synchronous loop), and is killed.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Rng } from './rng.mjs';
import { hexPrefix } from './mutate.mjs';
import { describeError } from './common.mjs';
import { inProcessTarget } from './targets/index.mjs';

process.setSourceMapsEnabled(true);

/** Sends an outcome; the input's bytes only when someone will look at them. */
function report(job, index, out, opts) {
  const interesting = out.kind === 'crash' || out.kind === 'hang' || out.wrongRam;
  const msg = { k: out.kind };
  if (out.code !== undefined) msg.c = out.code;
  if (out.wrongRam) msg.w = out.wrongRam.strict ? 2 : 1;
  if (out.note) msg.n = out.note;
  if (interesting) {
    msg.seed = out.seed;
    msg.ops = out.ops;
    msg.hex = hexPrefix(out.input ?? new Uint8Array(0));
    msg.len = out.input?.length;
    if (out.error) msg.e = out.error;
    if (opts.saveDir && out.input && (out.kind !== 'ok' || out.wrongRam?.strict)) {
      mkdirSync(opts.saveDir, { recursive: true });
      writeFileSync(join(opts.saveDir, `${job.name}-${index}.bin`), out.input);
    }
  }
  process.send(['r', job.name, index, msg]);
}

/** Exceptions that escape the code under test asynchronously belong to the input running. */
let uncaught;
process.on('uncaughtException', (e) => (uncaught ??= e));
process.on('unhandledRejection', (e) => (uncaught ??= e));

/**
 * Self-test of the parent's watchdog (VMIG_FUZZ_SELFTEST=stuck:TARGET:INDEX or
 * abort:TARGET:INDEX): that input loops forever, or kills this process natively.
 */
const [selfKind, selfTarget, selfIndex] = (process.env.VMIG_FUZZ_SELFTEST ?? '').split(':');
function selfTest(name, index) {
  if (selfTarget !== name || Number(selfIndex) !== index) return;
  if (selfKind === 'stuck') for (;;);
  if (selfKind === 'abort') process.abort();
}

async function main(jobs, opts) {
  for (const job of jobs) {
    if (job.start >= job.end) continue;
    process.send(['prep', job.name]);
    const target = inProcessTarget(job.name);
    const state = await target.prepare();
    for (let i = job.start; i < job.end; i++) {
      uncaught = undefined;
      selfTest(job.name, i);
      let out;
      try {
        out = await target.run(state, Rng.for(opts.seed, job.name, i), opts);
      } catch (e) {
        out = { kind: 'crash', code: 'harness', error: `the target's harness threw: ${describeError(e)}` };
      }
      if (uncaught !== undefined) out = { ...out, kind: 'crash', code: 'uncaught', error: `uncaught after the input: ${describeError(uncaught)}` };
      report(job, i, out, opts);
    }
    await target.close?.(state);
  }
  process.send(['done']);
}

process.once('message', ([jobs, opts]) => {
  main(jobs, opts).then(
    () => process.disconnect(),
    (e) => {
      process.send(['fatal', describeError(e, 10)]);
      process.disconnect();
    },
  );
});
