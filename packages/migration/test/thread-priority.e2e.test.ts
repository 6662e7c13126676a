/**
 * --postcopy-background-nice (thread-priority.ts): in a real process, the main thread and
 * the runtime's threads get the nice value, a worker thread created before keeps its own.
 * A child process, so that the test runner's threads keep theirs.
 */
import { describe, expect, it } from 'vitest';
import { runChildScript } from '@vmig/test-harness';

const priorityModule = new URL('../dist/thread-priority.js', import.meta.url).href;

const CHILD = `
import fs from 'node:fs';
import os from 'node:os';
import { Worker } from 'node:worker_threads';
const { lowerBackgroundThreads, restoreThreads } = await import(process.argv[1]);
const nice = (tid) => Number(fs.readFileSync('/proc/self/task/' + tid + '/stat', 'utf8').split(') ')[1].split(' ')[16]);
const runtime = fs.readdirSync('/proc/self/task').map(Number);
const w = new Worker("import { parentPort } from 'node:worker_threads'; import fs from 'node:fs'; parentPort.postMessage(Number(fs.readlinkSync('/proc/thread-self').split('/').pop())); setInterval(() => {}, 1000);", { eval: true });
const workerTid = await new Promise((r) => w.once('message', r));
const none = lowerBackgroundThreads(0);
const change = lowerBackgroundThreads(7);
const after = { main: nice(process.pid), runtime: runtime.map(nice), worker: nice(workerTid) };
const restored = restoreThreads(change);
const back = { main: nice(process.pid), worker: nice(workerTid) };
console.log(JSON.stringify({ none: none === undefined, changed: change ? [...change.before.keys()].length : 0, after, restored, back, root: os.userInfo().uid === 0 }));
await w.terminate();
`;

describe.runIf(process.platform === 'linux')('lowering the background threads after the postcopy switch', () => {
  it('lowers the main and runtime threads, not a worker thread; restores where allowed', () => {
    const out = runChildScript(CHILD, priorityModule);
    expect(out.none).toBe(true);
    expect(out.changed).toBeGreaterThan(1);
    expect(out.after.main).toBe(7);
    expect(out.after.runtime.every((n: number) => n === 7)).toBe(true);
    expect(out.after.worker).toBe(0);
    // Raising it back needs CAP_SYS_NICE: root may, others may not.
    expect(out.restored).toBe(out.root);
    expect(out.back.main).toBe(out.root ? 0 : 7);
    expect(out.back.worker).toBe(0);
  });
});
