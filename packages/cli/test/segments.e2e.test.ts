/**
 * Guest RAM in segments, end to end. Small segments (VMIG_RAM_SEGMENT_BYTES, a different size
 * on each side: the wire does not know about them) put many segment edges into a small guest,
 * so that every path crosses them: the main stream, multifd packets (runs of pages across an
 * edge, zero pages found by the channels), compression, postcopy with preempt, integrity
 * digests, snapshot and restore, --dump-ram. Then one live migration of a single 6 GiB block
 * (more than a typed array holds) with two writers, source and destination as two processes.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { GuestRam } from '@vmig/core';
import { type CliRun, digestRam, spawnCli } from '@vmig/test-harness';
import { CLI_MAIN } from './cli.js';

type Report = Record<string, any>;
const tmp = mkdtempSync(join(tmpdir(), 'vmig-segments-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const MIB = 1 << 20;
const env = (segment: number): NodeJS.ProcessEnv => ({ ...process.env, VMIG_RAM_SEGMENT_BYTES: String(segment) });

/** Source with 1 MiB segments, destination with 3 MiB ones. */
async function pair(incomingArgs: string[], migrateArgs: string[], srcSeg = MIB, dstSeg = 3 * MIB): Promise<{ source: CliRun; destination: CliRun }> {
  const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', ...incomingArgs], { env: env(dstSeg) });
  try {
    const { uri } = (await dst.waitFor((l) => l['event'] === 'listening')) as { uri: string };
    const src = spawnCli(CLI_MAIN, ['migrate', uri, '--json', ...migrateArgs], { env: env(srcSeg) });
    return { source: await src.done, destination: await dst.done };
  } finally {
    if (dst.child.exitCode === null) dst.child.kill('SIGKILL');
  }
}

function expectEqualDigests(source: CliRun, destination: CliRun): void {
  expect(destination.report?.['status'], JSON.stringify(destination.report?.['error'])).toBe('completed');
  expect(source.report?.['status'], JSON.stringify(source.report?.['error'])).toBe('completed');
  expect(destination.report?.['ramDigest']).toBe(source.report?.['ramDigest']);
}

describe('RAM in small segments (1 MiB on the source, 3 MiB on the destination)', () => {
  const writers = ['--writers', '2', '--dirty-rate', '32M'];
  const cases: [string, string[]][] = [
    ['main channel', []],
    ['multifd, 2 channels (zero pages found by the channels)', ['--multifd-channels', '2']],
    ['multifd, 2 channels, zlib', ['--multifd-channels', '2', '--multifd-compression', 'zlib']],
    ['multifd, 2 channels, --integrity', ['--multifd-channels', '2', '--integrity']],
  ];
  for (const [name, args] of cases) {
    it(`${name}: digests equal, with writers`, async () => {
      // Two blocks whose sizes are not whole segments.
      const ram = ['--ram', '45M', '--ram-block', 'extra=7M'];
      const { source, destination } = await pair([...args], [...ram, ...args, ...writers, ...(args.includes('zlib') ? ['--fill', 'text'] : [])]);
      expectEqualDigests(source, destination);
      if (args.includes('--integrity')) expect(destination.report?.['integrity'].verified).toBe(true);
    });
  }

  it('postcopy with preempt: verified by stamps', async () => {
    const shared = ['--ram', '45M', '--postcopy', '--postcopy-preempt'];
    const { source, destination } = await pair(shared, [...shared, '--postcopy-after-rounds', '1', '--downtime-limit', '5', '--max-postcopy-bandwidth', '16M', ...writers]);
    expect(destination.report?.['status'], JSON.stringify(destination.report?.['error'])).toBe('completed');
    const pc = destination.report?.['postcopy'] as Report;
    expect(pc.postcopyPages).toBeGreaterThan(0);
    expect(pc.badStamps).toBe(0);
    expect(pc.restoredDigest).toBe(source.report?.['ramDigest']);
  });

  it('--dump-ram writes every segment in order: the file is the source\'s RAM', async () => {
    const dump = join(tmp, 'dump.bin');
    const { source, destination } = await pair(['--dump-ram', dump], ['--ram', '45M']);
    expectEqualDigests(source, destination);
    const bytes = readFileSync(dump);
    expect(bytes.length).toBe(45 * MIB);
    const flat = GuestRam.create([{ idstr: 'pc.ram', size: 45 * MIB }], { prefault: false });
    flat.blocks[0]!.host.set(bytes);
    expect(digestRam(flat).digest).toBe(source.report?.['ramDigest']);
  });

  it('snapshot with 1 MiB segments, restored with 3 MiB ones: RAM as at the stop', async () => {
    const file = join(tmp, 'seg.snap');
    const s = await spawnCli(CLI_MAIN, ['snapshot', file, '--json', '--ram', '45M', '--writers', '2', '--verify', '--dirty-rate', '64M', '--snapshot-cow-buffer', '2M'], { env: env(MIB) }).done;
    expect(s.code, JSON.stringify(s.report?.['error'])).toBe(0);
    const r = await spawnCli(CLI_MAIN, ['restore', file, '--json'], { env: env(3 * MIB) }).done;
    expect(r.code, JSON.stringify(r.report?.['error'])).toBe(0);
    expect(r.report?.['ramDigest']).toBe(s.report?.['ramDigest']);
  });
});

describe('a guest above 4 GiB', () => {
  it('one 6 GiB block, two writers, multifd over 2 channels, two processes: digests equal', async () => {
    const args = ['--ram', '6G', '--multifd-channels', '2'];
    const { source, destination } = await pair(['--multifd-channels', '2'], [...args, '--writers', '2', '--dirty-rate', '64M'], 2 ** 30, 2 ** 30);
    expectEqualDigests(source, destination);
    expect(source.report?.['ram'].total).toBe(6 * 2 ** 30);
    expect(destination.report?.['ram'].blocks).toEqual([{ idstr: 'pc.ram', size: 6 * 2 ** 30 }]);
  }, 240_000);
});
