/**
 * The wire format has no checksum (QEMU's neither): a bit flipped in a page's payload lands
 * in guest RAM. `--integrity` closes the hole end to end. A FaultProxy between the two
 * processes flips one bit inside a multifd packet's pages.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { FaultProxy, spawnCli, type CliProcess } from '@vmig/test-harness';
import { MULTIFD_INIT_SIZE, MULTIFD_PACKET_HEADER_SIZE } from '@vmig/multifd';
import { CLI_MAIN } from './cli.js';

type Report = Record<string, any>;

/** On every multifd channel: inside the pages of the fourth packet of its first job (random RAM: no zero pages). */
const INSIDE_A_PAGE = MULTIFD_INIT_SIZE + MULTIFD_PACKET_HEADER_SIZE + 3 * (MULTIFD_PACKET_HEADER_SIZE + 128 * 4096) + MULTIFD_PACKET_HEADER_SIZE + 100_000;

const children: CliProcess[] = [];
let proxy: FaultProxy | undefined;
afterEach(async () => {
  for (const c of children.splice(0)) if (c.child.exitCode === null) c.child.kill('SIGKILL');
  await proxy?.close();
  proxy = undefined;
});

async function migrateThroughFlip(extra: string[], sourceExtra: string[] = []): Promise<{ source: Report | undefined; destination: Report | undefined }> {
  const shared = ['--ram', '64M', '--multifd-channels', '2', '--channel-timeout', '10000', ...extra];
  const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', ...shared]);
  children.push(dst);
  const { uri } = (await dst.waitFor((l) => l['event'] === 'listening')) as { uri: string };
  proxy = await FaultProxy.start({ target: { host: '127.0.0.1', port: Number(uri.split(':').pop()) } });
  proxy.addRule({ connection: 'all', direction: 'up', afterBytes: INSIDE_A_PAGE, action: 'corrupt', bit: 3 });
  const src = spawnCli(CLI_MAIN, ['migrate', proxy.uri, '--json', '--fill', 'random', ...shared, ...sourceExtra]);
  children.push(src);
  const [s, d] = await Promise.all([src.done, dst.done]);
  expect(proxy.faults.some((f) => f.action === 'corrupt')).toBe(true);
  return { source: s.report, destination: d.report };
}

describe('--integrity: a bit flipped on the wire', () => {
  it('without it, the migration "completes" with RAM other than sent (the hole it closes)', async () => {
    const { source, destination } = await migrateThroughFlip([]);
    expect(source?.status).toBe('completed');
    expect(destination?.status).toBe('completed');
    expect(destination?.ramDigest).not.toBe(source?.ramDigest);
  });

  it('with it, the destination refuses (VMIG_ERR_INTEGRITY) before answering, and the source resumes its guest', async () => {
    const { source, destination } = await migrateThroughFlip(['--integrity'], ['--writers', '1', '--dirty-rate', '1M', '--pattern', 'hot', '--hot-pages', '1']);
    expect(destination?.status).toBe('failed');
    expect(destination?.error.code).toBe('VMIG_ERR_INTEGRITY');
    expect(destination?.error.message).toMatch(/ranges of RAM differ/);
    expect(source?.status).toBe('failed');
    expect(source?.writersResumed).toBe(true);
  });

  it('with it and a clean link: verified, digests equal', async () => {
    const shared = ['--ram', '32M', '--multifd-channels', '2', '--integrity'];
    const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', ...shared]);
    children.push(dst);
    const { uri } = (await dst.waitFor((l) => l['event'] === 'listening')) as { uri: string };
    const src = spawnCli(CLI_MAIN, ['migrate', uri, '--json', ...shared, '--writers', '2', '--dirty-rate', '8M']);
    children.push(src);
    const [s, d] = await Promise.all([src.done, dst.done]);
    expect(d.report?.status, JSON.stringify(d.report?.error)).toBe('completed');
    expect(d.report?.integrity).toEqual({ verified: true, ranges: 32 });
    expect(d.report?.ramDigest).toBe(s.report?.ramDigest);
  });

  it('a destination with --integrity refuses a source without it', async () => {
    const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--ram', '16M', '--integrity']);
    children.push(dst);
    const { uri } = (await dst.waitFor((l) => l['event'] === 'listening')) as { uri: string };
    const src = spawnCli(CLI_MAIN, ['migrate', uri, '--json', '--ram', '16M']);
    children.push(src);
    const [s, d] = await Promise.all([src.done, dst.done]);
    expect(d.code).toBe(1);
    expect(d.report?.error.code).toBe('VMIG_ERR_INTEGRITY');
    expect(s.report?.status).toBe('failed');
  });
});
