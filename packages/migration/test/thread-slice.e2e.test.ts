/**
 * --postcopy-fault-slice-us (thread-slice.ts): in a real process, a worker thread asks for a
 * slice and the kernel's own account of that thread (/proc/.../sched) shows it, the thread's
 * nice value kept; the main thread keeps the default. A child process, so that the test
 * runner's threads keep theirs.
 */
import { describe, expect, it } from 'vitest';
import { kernelHasCustomSlices, runChildScript } from '@vmig/test-harness';

const sliceModule = new URL('../dist/thread-slice.js', import.meta.url).href;

const CHILD = `
import fs from 'node:fs';
import os from 'node:os';
import { Worker } from 'node:worker_threads';
const slice = (tid) => { const m = /se\\.slice\\s*:\\s*(\\d+)/.exec(fs.readFileSync('/proc/self/task/' + tid + '/sched', 'utf8')); return m ? Number(m[1]) : null; };
const code = "import { parentPort } from 'node:worker_threads'; import fs from 'node:fs'; import os from 'node:os';" +
  "const m = await import(" + JSON.stringify(process.argv[1]) + ");" +
  "const tid = Number(fs.readlinkSync('/proc/thread-self').split('/').pop());" +
  "os.setPriority(tid, 3);" +
  "const can = m.canSetThreadSlice(); const got = m.setThreadSliceUs(250); const read = m.threadSliceUs();" +
  "parentPort.postMessage({ tid, can, got, read, nice: os.getPriority(tid) }); setInterval(() => {}, 1000);";
const before = slice(process.pid);
const w = new Worker(code, { eval: true });
const r = await new Promise((res, rej) => { w.once('message', res); w.once('error', rej); });
console.log(JSON.stringify({ ...r, kernelSlice: slice(r.tid), mainBefore: before, mainAfter: slice(process.pid) }));
await w.terminate();
`;

describe.runIf(process.platform === 'linux')('the fault path threads ask for a short slice', () => {
  it('sets the calling thread only, keeps its nice; or says it cannot', () => {
    const out = runChildScript(CHILD, sliceModule);
    expect(out.nice).toBe(3);
    if (kernelHasCustomSlices()) {
      expect(out.can).toBe(true);
      expect(out.got).toBe(250);
      expect(out.read).toBe(250);
      expect(out.kernelSlice).toBe(250_000);
      expect(out.mainAfter).toBe(out.mainBefore);
      expect(out.mainAfter).not.toBe(250_000);
    } else {
      // Nothing to set: the caller hears so, and nothing changed.
      expect(out.got).toBeUndefined();
    }
  });
});
