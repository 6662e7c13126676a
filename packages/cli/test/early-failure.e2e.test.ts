/**
 * A migration that fails at once, while its threads are still starting: the threads that
 * load a native module at their start (the source's return-path thread, the destination's
 * preempt thread; libc.ts) are stopped, not terminated mid-load (worker-exit.ts), so the
 * process exits 1 with its report every time instead of aborting. Terminating them was
 * seen to abort about one run in eight, so each case runs a dozen times.
 */
import net from 'node:net';
import { describe, expect, it } from 'vitest';
import { spawnCli } from '@vmig/test-harness';
import { CLI_MAIN } from './cli.js';

const RUNS = 12;

async function closedPort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise((r) => srv.close(r));
  return port;
}

describe('a failure while the threads start', () => {
  it('source: nothing listening, with and without postcopy preempt: exit 1 and a report, every time', async () => {
    const port = await closedPort();
    for (let i = 0; i < RUNS; i++) {
      const extra = i % 2 ? ['--postcopy', '--postcopy-preempt'] : [];
      const run = await spawnCli(CLI_MAIN, ['migrate', `tcp:127.0.0.1:${port}`, '--ram', '16M', '--writers', '1', '--json', ...extra]).done;
      expect({ i, code: run.code, signal: run.signal, status: run.report?.['status'] }).toEqual({ i, code: 1, signal: null, status: 'failed' });
      expect((run.report?.['error'] as Record<string, unknown>)['code']).toBe('VMIG_ERR_CONNECT');
    }
  });

  it('destination with a preempt thread: a bad stream at once, exit 1 and a report, every time', async () => {
    for (let i = 0; i < RUNS; i++) {
      const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--ram', '16M', '--postcopy', '--postcopy-preempt']);
      const listening = await dst.waitFor((l) => l['event'] === 'listening');
      const [, port] = /:(\d+)$/.exec(String(listening['uri']))!;
      const c = net.connect(Number(port), '127.0.0.1');
      c.on('error', () => {});
      // QEMU's magic (so it is the main channel), then a version no one speaks.
      c.end(Buffer.from([0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 0x99]));
      const run = await dst.done;
      expect({ i, code: run.code, signal: run.signal, status: run.report?.['status'] }).toEqual({ i, code: 1, signal: null, status: 'failed' });
    }
  });
});
