import { spawnSync } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { MemorySink, putFileHeader, putRamMemSize, putRamPage, putSectionFull, QEMU_VM_SECTION_START, TARGET_PAGE_SIZE } from '@vmig/core';
import { runMigrationPair, spawnCli } from '@vmig/test-harness';
import { CLI_MAIN } from './cli.js';

type Report = Record<string, any>;

function expectVerified(source: Report | undefined, destination: Report | undefined): void {
  expect(source?.status, JSON.stringify(source?.error)).toBe('completed');
  expect(destination?.status, JSON.stringify(destination?.error)).toBe('completed');
  expect(typeof source?.ramDigest).toBe('string');
  // The digest of the source's RAM at stop equals the destination's after load: a lost
  // write or a torn page would make them differ.
  expect(destination?.ramDigest).toBe(source?.ramDigest);
}

describe('precopy between two processes over loopback', () => {
  it('256 MiB random RAM, 2 writers at 20 MB/s: completes, digests equal, downtime reported', async () => {
    const { source, destination } = await runMigrationPair(CLI_MAIN, ['--ram', '256M'], ['--ram', '256M', '--fill', 'random', '--writers', '2', '--dirty-rate', '20M']);
    expectVerified(source.report, destination.report);
    const r = source.report!;
    expect(r.downtimeMs).toBeGreaterThan(0);
    expect(r.ram.total).toBe(256 << 20);
    expect(r.ram.transferred).toBeGreaterThanOrEqual(256 << 20);
    expect(r.ram.dirtySyncCount).toBeGreaterThanOrEqual(2);
    expect(r.writes).toBeGreaterThan(0);
    expect(source.code).toBe(0);
    expect(destination.code).toBe(0);
  });

  it('writers re-dirtying a small hot set every few microseconds: digests still equal', async () => {
    // Unthrottled writers (dirty-rate 0) hammer 16 pages; the destination is not told the RAM
    // layout and builds it from the stream.
    const { source, destination } = await runMigrationPair(CLI_MAIN, [], ['--ram', '64M', '--writers', '2', '--dirty-rate', '0', '--pattern', 'hot', '--hot-pages', '16']);
    expectVerified(source.report, destination.report);
    // Many more writes than pages: the same pages were rewritten while being sent.
    expect(source.report!.writes).toBeGreaterThan(16 * 100);
  });

  it('several RAM blocks, text fill, zero pages and a bandwidth limit', async () => {
    const blocks = ['--ram-block', 'pc.ram=24M', '--ram-block', 'vga.vram=8M'];
    const { source, destination } = await runMigrationPair(CLI_MAIN, blocks, [...blocks, '--fill', 'text', '--writers', '1', '--dirty-rate', '4M', '--max-bandwidth', '64M', '--downtime-limit', '20']);
    expectVerified(source.report, destination.report);
    expect(destination.report!.ram.blocks).toEqual([
      { idstr: 'pc.ram', size: 24 << 20 },
      { idstr: 'vga.vram', size: 8 << 20 },
    ]);
    // While iterating the source keeps to --max-bandwidth (the stop-and-copy phase is not
    // rate limited, as in QEMU).
    const r = source.report!;
    const iterateSecs = (r.totalTimeMs - r.downtimeMs - r.setupTimeMs) / 1000;
    expect(r.ram.precopyBytes / iterateSecs).toBeLessThan(64 * 2 ** 20 * 1.25);
  });

  it('over a unix socket, with multifd channels too', async () => {
    const path = join(mkdtempSync(join(tmpdir(), 'vmig-unix-')), 'mig.sock');
    const dst = spawnCli(CLI_MAIN, ['incoming', `unix:${path}`, '--json', '--multifd-channels', '2']);
    await dst.waitFor((l) => l['event'] === 'listening');
    const src = await spawnCli(CLI_MAIN, ['migrate', `unix:${path}`, '--json', '--ram', '32M', '--writers', '1', '--dirty-rate', '8M', '--multifd-channels', '2']).done;
    const d = await dst.done;
    expectVerified(src.report, d.report);
  });

  it('zero RAM travels as zero pages', async () => {
    const { source, destination } = await runMigrationPair(CLI_MAIN, ['--ram', '64M'], ['--ram', '64M', '--fill', 'zero']);
    expectVerified(source.report, destination.report);
    expect(source.report!.ram.duplicate).toBe((64 << 20) / TARGET_PAGE_SIZE);
    expect(source.report!.ram.transferred).toBeLessThan(4 << 20);
  });
});

describe('failure paths', () => {
  it('nothing listening: exit 1, status failed, VMIG_ERR_CONNECT', async () => {
    const srv = net.createServer();
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
    const port = (srv.address() as net.AddressInfo).port;
    await new Promise((r) => srv.close(r));
    const run = await spawnCli(CLI_MAIN, ['migrate', `tcp:127.0.0.1:${port}`, '--ram', '16M', '--writers', '1', '--json']).done;
    expect(run.code).toBe(1);
    expect(run.report?.status).toBe('failed');
    expect((run.report?.error as Report).code).toBe('VMIG_ERR_CONNECT');
  });

  it('destination killed mid-migration: the source fails clearly and exits', async () => {
    const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--ram', '256M']);
    const listening = await dst.waitFor((l) => l['event'] === 'listening');
    const src = spawnCli(CLI_MAIN, ['migrate', String(listening['uri']), '--json', '--ram', '256M', '--writers', '2', '--max-bandwidth', '32M']);
    await src.waitFor((l) => l['event'] === 'status' && l['status'] === 'active');
    dst.child.kill('SIGKILL');
    const run = await src.done;
    expect(run.code).toBe(1);
    expect(run.report?.status).toBe('failed');
    expect(['VMIG_ERR_PEER_CLOSED', 'VMIG_ERR_CHANNEL']).toContain((run.report?.error as Report).code);
  });

  it('source killed mid-migration: the destination fails clearly and exits', async () => {
    const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json']);
    const listening = await dst.waitFor((l) => l['event'] === 'listening');
    const src = spawnCli(CLI_MAIN, ['migrate', String(listening['uri']), '--json', '--ram', '128M', '--max-bandwidth', '16M']);
    await src.waitFor((l) => l['event'] === 'status' && l['status'] === 'active');
    src.child.kill('SIGKILL');
    const run = await dst.done;
    expect(run.code).toBe(1);
    expect(run.report?.status).toBe('failed');
    expect((run.report?.error as Report).code).toBe('VMIG_ERR_PEER_CLOSED');
  });

  it('a hostile source writing past a RAM block: destination rejects it with a stable code', async () => {
    const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--ram', '1M']);
    const listening = await dst.waitFor((l) => l['event'] === 'listening');
    const port = Number(String(listening['uri']).split(':').pop());
    const w = new MemorySink();
    putFileHeader(w, 'none');
    putSectionFull(w, QEMU_VM_SECTION_START, { sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 });
    putRamMemSize(w, [{ idstr: 'pc.ram', usedLength: 1 << 20 }]);
    putRamPage(w, 1 << 20, 'pc.ram', false, new Uint8Array(TARGET_PAGE_SIZE));
    const sock = net.connect(port, '127.0.0.1');
    sock.on('error', () => {});
    sock.write(w.bytes());
    const run = await dst.done;
    sock.destroy();
    expect(run.code).toBe(1);
    expect((run.report?.error as Report).code).toBe('VMIG_ERR_BAD_OFFSET');
  });

  it('a workload that cannot converge keeps iterating, reports expected downtime, and cancels on SIGINT', async () => {
    const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--ram', '64M']);
    const listening = await dst.waitFor((l) => l['event'] === 'listening');
    const src = spawnCli(CLI_MAIN, ['migrate', String(listening['uri']), '--json', '--ram', '64M', '--writers', '2', '--dirty-rate', '64M', '--max-bandwidth', '8M', '--downtime-limit', '50']);
    const progress = await src.waitFor((l) => l['event'] === 'progress' && (l['ram'] as Report).dirtySyncCount >= 2, 60_000);
    expect(progress['expectedDowntimeMs']).toBeGreaterThan(50);
    src.child.kill('SIGINT');
    const run = await src.done;
    expect(run.code).toBe(1);
    expect(run.report?.status).toBe('cancelled');
    expect((run.report?.error as Report).code).toBe('VMIG_ERR_CANCELLED');
    const d = await dst.done;
    expect(d.code).toBe(1);
    expect(d.report?.status).toBe('failed');
  });
});

describe('command line', () => {
  const bad: [string, string[]][] = [
    ['unknown flag', ['migrate', 'tcp:127.0.0.1:1', '--ram', '1M', '--bogus']],
    ['bad size', ['migrate', 'tcp:127.0.0.1:1', '--ram', '12Q']],
    ['size not page aligned', ['migrate', 'tcp:127.0.0.1:1', '--ram', '1000']],
    ['zero size', ['migrate', 'tcp:127.0.0.1:1', '--ram', '0']],
    ['missing --ram', ['migrate', 'tcp:127.0.0.1:1']],
    ['bad URI', ['migrate', 'http://x', '--ram', '1M']],
    ['bad port', ['incoming', 'tcp:127.0.0.1:70000']],
    ['no URI', ['incoming']],
    ['bad fill', ['migrate', 'tcp:127.0.0.1:1', '--ram', '1M', '--fill', 'stripes']],
    ['negative writers', ['migrate', 'tcp:127.0.0.1:1', '--ram', '1M', '--writers', '-1']],
    ['dirty rate without writers', ['migrate', 'tcp:127.0.0.1:1', '--ram', '1M', '--dirty-rate', '1M']],
    ['bad downtime limit', ['migrate', 'tcp:127.0.0.1:1', '--ram', '1M', '--downtime-limit', 'soon']],
    ['duplicate block', ['migrate', 'tcp:127.0.0.1:1', '--ram-block', 'a=1M', '--ram-block', 'a=1M']],
    ['block without size', ['migrate', 'tcp:127.0.0.1:1', '--ram-block', 'a']],
    ['unknown command', ['teleport']],
    ['demo with a URI', ['demo', 'tcp:127.0.0.1:1']],
  ];
  for (const [name, args] of bad) {
    it(`${name}: one line on stderr, exit 2`, () => {
      const r = spawnSync(process.execPath, [CLI_MAIN, ...args], { encoding: 'utf8', timeout: 30_000 });
      expect(r.status, r.stderr).toBe(2);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(/^vmig: /);
    });
  }
});

describe('vmig demo', () => {
  it('runs both ends and prints verified', async () => {
    const run = await spawnCli(CLI_MAIN, ['demo', '--ram', '64M', '--json']).done;
    expect(run.code).toBe(0);
    expect(run.report?.verified).toBe(true);
  });

  it('--postcopy: switches, the destination writers fault, stamps check out, verified', async () => {
    const run = await spawnCli(CLI_MAIN, ['demo', '--ram', '64M', '--postcopy', '--json']).done;
    expect(run.code, JSON.stringify(run.report)).toBe(0);
    expect(run.report?.verified).toBe(true);
    const pc = run.report?.destination.postcopy;
    expect(pc.state).toBe('end');
    expect(pc.badStamps).toBe(0);
    expect(pc.restoredDigest).toBe(run.report?.source.ramDigest);
    expect(pc.postcopyPages).toBeGreaterThan(0);
  });
});
