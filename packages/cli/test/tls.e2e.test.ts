/**
 * TLS on every channel of a precopy migration (main, return path, multifd), QEMU's model:
 * real processes, certificates made at test time with openssl. Every refusal ends both
 * processes with exit 1 and a code, within the channel timeout.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { makeTlsCreds, spawnCli, type CliProcess } from '@vmig/test-harness';
import { CLI_MAIN } from './cli.js';

type Report = Record<string, any>;

const tmp = mkdtempSync(join(tmpdir(), 'vmig-tls-'));
const creds = makeTlsCreds(join(tmp, 'good'));
/** Another CA: the source does not trust the destination's certificate. */
const strangerCreds = makeTlsCreds(join(tmp, 'stranger'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const children: CliProcess[] = [];
afterEach(() => {
  for (const c of children.splice(0)) if (c.child.exitCode === null) c.child.kill('SIGKILL');
});

async function pair(dstArgs: string[], srcArgs: string[]): Promise<{ source: Report | undefined; destination: Report | undefined; ms: number }> {
  const t0 = performance.now();
  const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--channel-timeout', '3000', ...dstArgs]);
  children.push(dst);
  const { uri } = (await dst.waitFor((l) => l['event'] === 'listening')) as { uri: string };
  const src = spawnCli(CLI_MAIN, ['migrate', uri, '--json', '--channel-timeout', '3000', ...srcArgs]);
  children.push(src);
  const [s, d] = await Promise.all([src.done, dst.done]);
  if (s.report?.status !== 'failed') expect(s.code, s.stderr).toBe(s.report?.status === 'completed' ? 0 : 1);
  return { source: s.report, destination: d.report, ms: performance.now() - t0 };
}

const guest = ['--ram', '32M', '--writers', '2', '--dirty-rate', '8M'];

function expectBothFailed(r: { source: Report | undefined; destination: Report | undefined; ms: number }, dstCode: string): void {
  expect(r.destination?.status).toBe('failed');
  expect(r.destination?.error.code).toBe(dstCode);
  expect(r.source?.status).toBe('failed');
  expect(r.source?.error.code).toMatch(/^VMIG_ERR_/);
  expect(r.source?.writersResumed).toBe(true);
  expect(r.ms).toBeLessThan(60_000); // a bound on a hang, not a speed figure
}

describe('TLS', () => {
  for (const channels of [0, 2]) {
    const mf = channels ? ['--multifd-channels', String(channels)] : [];
    it(`migrates over TLS${channels ? ` with ${channels} multifd channels, each its own handshake` : ''}: digests equal`, async () => {
      const tls = ['--tls-creds', creds, ...mf];
      const r = await pair(['--ram', '32M', ...tls], [...guest, ...tls]);
      expect(r.destination?.status, JSON.stringify(r.destination?.error)).toBe('completed');
      expect(r.source?.status).toBe('completed');
      expect(r.destination?.ramDigest).toBe(r.source?.ramDigest);
    });
  }

  for (const preempt of [false, true]) {
    it(`postcopy over TLS${preempt ? ' with its preempt channel (TLS too) and 2 multifd channels' : ''}: the destination's writes kept, RAM verified`, async () => {
      const args = ['demo', '--json', '--ram', '64M', '--postcopy', '--postcopy-after-rounds', '1', '--tls-creds', creds, ...(preempt ? ['--postcopy-preempt', '--multifd-channels', '2'] : [])];
      const run = await spawnCli(CLI_MAIN, args).done;
      expect(run.code, run.stderr.slice(-2000)).toBe(0);
      const r = run.report as Report;
      expect(r['verified'], JSON.stringify(r).slice(0, 2000)).toBe(true);
      expect(r['destination'].postcopy.postcopyPages).toBeGreaterThan(0);
      if (preempt) expect(r['destination'].postcopy.preemptPagesByVcpus + r['destination'].postcopy.preemptPagesByThread).toBeGreaterThan(0);
    });
  }

  it('the client certificate on the --tls-authz list: admitted', async () => {
    const r = await pair(['--ram', '32M', '--tls-creds', creds, '--tls-authz', 'CN=someone-else', '--tls-authz', 'CN=vmig-client,O=vmig'], [...guest, '--tls-creds', creds]);
    expect(r.destination?.status, JSON.stringify(r.destination?.error)).toBe('completed');
    expect(r.destination?.ramDigest).toBe(r.source?.ramDigest);
  });

  it('a client certificate not on the --tls-authz list: refused on both ends', async () => {
    const r = await pair(['--ram', '32M', '--tls-creds', creds, '--tls-authz', 'CN=someone-else'], [...guest, '--tls-creds', creds]);
    expectBothFailed(r, 'VMIG_ERR_TLS');
    expect(r.destination?.error.message).toMatch(/not in --tls-authz/);
  });

  it('a plaintext source into a TLS destination: refused on both ends', async () => {
    const r = await pair(['--ram', '32M', '--tls-creds', creds, '--multifd-channels', '2'], [...guest, '--multifd-channels', '2']);
    expectBothFailed(r, 'VMIG_ERR_TLS');
  });

  it('a TLS source into a plaintext destination: refused on both ends', async () => {
    const r = await pair(['--ram', '32M'], [...guest, '--tls-creds', creds]);
    expectBothFailed(r, 'VMIG_ERR_TLS');
    expect(r.source?.error.code).toBe('VMIG_ERR_TLS');
  });

  it("a destination certificate from a CA the source does not trust: refused on both ends", async () => {
    const r = await pair(['--ram', '32M', '--tls-creds', strangerCreds], [...guest, '--tls-creds', creds]);
    expectBothFailed(r, 'VMIG_ERR_TLS');
    expect(r.source?.error.code).toBe('VMIG_ERR_TLS');
  });

  it('a destination certificate for another name (--tls-hostname): refused on both ends', async () => {
    const r = await pair(['--ram', '32M', '--tls-creds', creds], [...guest, '--tls-creds', creds, '--tls-hostname', 'migration.example.org']);
    expectBothFailed(r, 'VMIG_ERR_TLS');
    expect(r.source?.error.message).toMatch(/migration\.example\.org/);
  });

  it('bad flags: --tls-authz without --tls-creds, a directory without the files', async () => {
    for (const args of [
      ['incoming', 'tcp:127.0.0.1:0', '--tls-authz', 'CN=x'],
      ['incoming', 'tcp:127.0.0.1:0', '--tls-creds', join(tmp, 'nope')],
    ]) {
      const run = await spawnCli(CLI_MAIN, args).done;
      expect(run.code, args.join(' ')).toBe(2);
      expect(run.stderr).toMatch(/tls/i);
    }
  });
});
