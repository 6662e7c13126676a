/**
 * Migration threads carry QEMU's names (core/thread-name.ts), so that `top -H`, `ps -L` and
 * `perf` tell them apart: a real postcopy migration with preempt and two multifd channels,
 * both processes' threads listed from /proc while it runs; and setThreadName itself, in a
 * worker of a child process, names that thread only.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { spawnCli } from '@vmig/test-harness';
import { runChildScript } from '@vmig/test-harness';
import { CLI_MAIN } from './cli.js';

const coreModule = new URL('../../core/dist/thread-name.js', import.meta.url).href;

/** The names of a process's threads right now (empty once it has ended). */
function threadNames(pid: number): string[] {
  try {
    return readdirSync(`/proc/${pid}/task`).flatMap((tid) => {
      try {
        return [readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').trim()];
      } catch {
        return [];
      }
    });
  } catch {
    return [];
  }
}

const CHILD = `
import fs from 'node:fs';
import { Worker } from 'node:worker_threads';
const comm = (tid) => fs.readFileSync('/proc/self/task/' + tid + '/comm', 'utf8').trim();
const code = "import { parentPort } from 'node:worker_threads'; import fs from 'node:fs';" +
  "const { setThreadName } = await import(" + JSON.stringify(process.argv[1]) + ");" +
  "const ok = setThreadName('mig/dst/a-name-longer-than-fifteen');" +
  "parentPort.postMessage({ ok, tid: Number(fs.readlinkSync('/proc/thread-self').split('/').pop()) }); setInterval(() => {}, 1000);";
const main = comm(process.pid);
const w = new Worker(code, { eval: true });
const r = await new Promise((res, rej) => { w.once('message', res); w.once('error', rej); });
console.log(JSON.stringify({ ...r, worker: comm(r.tid), mainBefore: main, mainAfter: comm(process.pid) }));
await w.terminate();
`;

describe.runIf(process.platform === 'linux')('migration threads are named', () => {
  it('setThreadName names the calling thread only, cut to the kernel limit', () => {
    const out = runChildScript(CHILD, coreModule);
    expect(out.ok).toBe(true);
    expect(out.worker).toBe('mig/dst/a-name-');
    expect(out.mainAfter).toBe(out.mainBefore);
  });

  it('a postcopy migration with preempt and two channels runs threads named as QEMU names them', async () => {
    const shared = ['--ram', '64M', '--multifd-channels', '2', '--postcopy', '--postcopy-preempt'];
    const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', ...shared]);
    const listening = await dst.waitFor((l) => l['event'] === 'listening');
    const src = spawnCli(CLI_MAIN, [
      ...['migrate', String(listening['uri']), '--json', ...shared, '--postcopy-after-rounds', '1', '--downtime-limit', '5'],
      ...['--writers', '2', '--dirty-rate', '64M', '--max-bandwidth', '100M', '--max-postcopy-bandwidth', '8M'],
    ]);
    const seen = { source: new Set<string>(), destination: new Set<string>() };
    let running = true;
    const sampler = (async () => {
      while (running) {
        for (const n of threadNames(src.child.pid!)) seen.source.add(n);
        for (const n of threadNames(dst.child.pid!)) seen.destination.add(n);
        await new Promise((r) => setTimeout(r, 5));
      }
    })();
    const [source, destination] = await Promise.all([src.done, dst.done]);
    running = false;
    await sampler;
    expect(source.report?.['status'], source.stderr).toBe('completed');
    expect(destination.report?.['status'], destination.stderr).toBe('completed');
    for (const n of ['mig/src/send_0', 'mig/src/send_1', 'mig/src/rp', 'CPU 0/vmig', 'CPU 1/vmig']) expect([...seen.source]).toContain(n);
    for (const n of ['mig/dst/recv_0', 'mig/dst/recv_1', 'mig/dst/preempt', 'CPU 0/vmig', 'CPU 1/vmig']) expect([...seen.destination]).toContain(n);
    // The main thread keeps the process's name: `ps` still shows node.
    expect([...seen.source]).toContain('node');
  }, 60_000);
});
