/** The command line a newcomer meets: help, version, mistakes in vmig's words, setup failures reported. */
import net from 'node:net';
import { describe, expect, it } from 'vitest';
import { spawnCli } from '@vmig/test-harness';
import { CLI_MAIN } from './cli.js';

describe('the vmig command line', () => {
  it('--version, help per command (stdout, exit 0); no command: usage on stderr, exit 2', async () => {
    const v = await spawnCli(CLI_MAIN, ['--version']).done;
    expect(v.code).toBe(0);
    const help = spawnCli(CLI_MAIN, ['migrate', '--help']);
    let out = '';
    help.child.stdout!.on('data', (d: Buffer) => (out += d));
    expect((await help.done).code).toBe(0);
    expect(out).toMatch(/usage: vmig migrate URI/);
    expect(out).toMatch(/--channel-timeout VALUE/);
    expect(out).toMatch(/--tls-creds VALUE/);
    const none = await spawnCli(CLI_MAIN, []).done;
    expect(none.code).toBe(2);
    expect(none.stderr).toMatch(/usage: vmig <command>/);
  });

  it("a negative size is named as such, exit 2", async () => {
    const r = await spawnCli(CLI_MAIN, ['migrate', 'tcp:127.0.0.1:1', '--ram', '-5M']).done;
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/--ram: '-5M' is negative/);
  });

  it('a setup failure (the address is in use) still ends with a --json report and a code', async () => {
    const blocker = net.createServer();
    await new Promise<void>((r) => blocker.listen(0, '127.0.0.1', r));
    const port = (blocker.address() as net.AddressInfo).port;
    try {
      const r = await spawnCli(CLI_MAIN, ['incoming', `tcp:127.0.0.1:${port}`, '--json']).done;
      expect(r.code).toBe(1);
      expect(r.report).toMatchObject({ role: 'destination', status: 'failed', error: { code: 'VMIG_ERR_CONNECT' } });
    } finally {
      blocker.close();
    }
  });

  it('a block above 64 GiB: a clear refusal of the flag (exit 2), not a stack trace; blocks above 4 GiB are fine (segments.e2e.test.ts)', async () => {
    const r = await spawnCli(CLI_MAIN, ['migrate', 'tcp:127.0.0.1:1', '--ram', '65G', '--json']).done;
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/RAM block size must be .* up to 68719476736/);
    expect(r.stderr).not.toMatch(/RangeError|    at /);
  });
});
