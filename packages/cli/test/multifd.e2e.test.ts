import { readFileSync } from 'node:fs';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { afterAll, describe, expect, it } from 'vitest';
import { TARGET_PAGE_SIZE } from '@vmig/core';
import { encodeMultifdPacketHeader, MULTIFD_INIT_SIZE, MULTIFD_PACKET_HEADER_SIZE } from '@vmig/multifd';
import { runMigrationPair, spawnCli } from '@vmig/test-harness';
import { CLI_MAIN } from './cli.js';

type Report = Record<string, any>;
const VECTOR = new URL('./fixtures/qemu-7.2-multifd-2ch/', import.meta.url);
const vector = (name: string): Buffer => gunzipSync(readFileSync(new URL(name, VECTOR)));
const tmp = mkdtempSync(join(tmpdir(), 'vmig-multifd-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

function expectVerified(source: Report | undefined, destination: Report | undefined): void {
  expect(source?.status, JSON.stringify(source?.error)).toBe('completed');
  expect(destination?.status, JSON.stringify(destination?.error)).toBe('completed');
  expect(typeof source?.ramDigest).toBe('string');
  expect(destination?.ramDigest).toBe(source?.ramDigest);
}

function connectTo(uri: string): Promise<net.Socket> {
  const port = Number(uri.split(':').pop());
  return new Promise((resolve, reject) => {
    const s = net.connect(port, '127.0.0.1', () => resolve(s));
    s.once('error', reject);
  });
}

describe('multifd: a real QEMU 7.2 migration replayed into vmig incoming', () => {
  it('main channel + 2 multifd channels over real sockets, legacy flush: RAM equals ram.bin byte for byte', async () => {
    const dump = join(tmp, 'ram.out');
    const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--multifd-channels', '2', '--multifd-flush-after-each-section', '--dump-ram', dump]);
    const { uri } = (await dst.waitFor((l) => l['event'] === 'listening')) as { uri: string };
    // QEMU connects the main channel first, then the multifd channels.
    const socks: net.Socket[] = [];
    for (const name of ['conn0.bin.gz', 'conn1.bin.gz', 'conn2.bin.gz']) {
      const s = await connectTo(uri);
      s.on('error', () => {});
      s.write(vector(name));
      socks.push(s);
    }
    // The capture ends where QEMU's source stopped writing: close like it did.
    for (const s of socks) s.end();
    const run = await dst.done;
    expect(run.code, run.stderr).toBe(0);
    expect(run.report?.machine).toBe('none');
    expect(run.report?.ram.blocks).toEqual([{ idstr: 'mem', size: 16 << 20 }]);
    expect(readFileSync(dump).equals(vector('ram.bin.gz'))).toBe(true);
  });

  it('a hostile packet on a channel (a page past the block): a clear error naming the channel, exit 1', async () => {
    const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--multifd-channels', '2', '--multifd-flush-after-each-section']);
    const { uri } = (await dst.waitFor((l) => l['event'] === 'listening')) as { uri: string };
    // The real main stream and channel 1; channel 0 is QEMU's init, then a packet whose one
    // page lies past the 16 MiB block 'mem'.
    const bad = new Uint8Array(MULTIFD_PACKET_HEADER_SIZE);
    encodeMultifdPacketHeader(bad, 0, { flags: 0, normalPages: 1, zeroPages: 0, nextPacketSize: TARGET_PAGE_SIZE, packetNum: 1, ramblock: 'mem', offsets: Float64Array.of(16 << 20) });
    const streams = [vector('conn0.bin.gz'), Buffer.concat([vector('conn1.bin.gz').subarray(0, MULTIFD_INIT_SIZE), bad, Buffer.alloc(TARGET_PAGE_SIZE, 0xaa)]), vector('conn2.bin.gz')];
    const socks: net.Socket[] = [];
    for (const data of streams) {
      const s = await connectTo(uri);
      s.on('error', () => {});
      s.write(data);
      socks.push(s);
    }
    const run = await dst.done;
    for (const s of socks) s.destroy();
    expect(run.code).toBe(1);
    const error = run.report?.error as Report;
    expect(error.code).toBe('VMIG_ERR_BAD_OFFSET');
    expect(error.message).toMatch(/outside block 'mem'.*multifd\/0/);
  });
});

describe('multifd between two vmig processes', () => {
  // Writers hammer a small hot set, unthrottled: the same pages are re-sent round after round,
  // on whichever channel is free. Only the flush-and-sync barrier keeps an old copy from
  // landing after a newer one.
  const matrix: [number, string, string][] = [
    [2, 'none', '96M'],
    [4, 'none', '96M'],
    [2, 'lz4', '96M'],
    [4, 'lz4', '96M'],
    [2, 'zlib', '32M'],
    [4, 'zlib', '32M'],
  ];
  for (const [channels, compression, ram] of matrix) {
    it(`stress: ${channels} channels, ${compression}, writers on a hot set: digests equal`, async () => {
      const shared = ['--ram', ram, '--multifd-channels', String(channels), '--multifd-compression', compression];
      const { source, destination } = await runMigrationPair(CLI_MAIN, shared, [...shared, '--fill', 'random', '--writers', '2', '--dirty-rate', '0', '--pattern', 'hot', '--hot-pages', '64']);
      expectVerified(source.report, destination.report);
      const r = source.report!;
      expect(r.ram.multifdBytes).toBeGreaterThan(0);
      expect(r.ram.dirtySyncCount).toBeGreaterThanOrEqual(2);
      expect(r.writes).toBeGreaterThan(64 * 20);
    });
  }

  it('--max-bandwidth holds for bytes on the multifd channels too', async () => {
    const shared = ['--ram', '64M', '--multifd-channels', '2'];
    const { source, destination } = await runMigrationPair(CLI_MAIN, shared, [...shared, '--max-bandwidth', '64M', '--downtime-limit', '20']);
    expectVerified(source.report, destination.report);
    const r = source.report!;
    const iterateSecs = (r.totalTimeMs - r.downtimeMs - r.setupTimeMs) / 1000;
    expect(r.ram.precopyBytes / iterateSecs).toBeLessThan(64 * 2 ** 20 * 1.25);
    expect(r.ram.precopyBytes).toBeGreaterThan(32 << 20);
  });

  it('legacy dialect (--multifd-flush-after-each-section) on both ends, with writers', async () => {
    const shared = ['--ram', '128M', '--multifd-channels', '2', '--multifd-flush-after-each-section'];
    const { source, destination } = await runMigrationPair(CLI_MAIN, shared, [...shared, '--writers', '2', '--dirty-rate', '30M']);
    expectVerified(source.report, destination.report);
  });

  it('zero pages are found by the channels (zero-page-detection multifd) and carry no payload', async () => {
    const shared = ['--ram', '128M', '--multifd-channels', '2'];
    const { source, destination } = await runMigrationPair(CLI_MAIN, shared, [...shared, '--fill', 'zero']);
    expectVerified(source.report, destination.report);
    expect(source.report!.ram.duplicate).toBe((128 << 20) / 4096);
    // Headers only: 1344 bytes per 128 zero pages.
    expect(source.report!.ram.multifdBytes).toBeLessThan(2 << 20);
  });

  it('multifd on one end only is a clear error, not a hang', async () => {
    const { source, destination } = await runMigrationPair(CLI_MAIN, ['--ram', '32M'], ['--ram', '32M', '--multifd-channels', '2']);
    expect(source.report?.status).toBe('failed');
    expect(destination.report?.status).toBe('failed');
    expect(destination.report?.error.code).toBe('VMIG_ERR_MULTIFD_CHANNELS');
  });

  it('multifd on the destination only: its channels never come, a clear error within --channel-timeout', async () => {
    const t0 = performance.now();
    const { source, destination } = await runMigrationPair(CLI_MAIN, ['--ram', '32M', '--multifd-channels', '2', '--channel-timeout', '1500'], ['--ram', '32M', '--channel-timeout', '1500']);
    expect(destination.report?.status).toBe('failed');
    expect(destination.report?.error.code).toBe('VMIG_ERR_MULTIFD_CHANNELS');
    expect(destination.report?.error.message).toMatch(/channel 0 never connected: 0 of the 2/);
    expect(source.report?.status).toBe('failed');
    expect(performance.now() - t0).toBeLessThan(60_000); // a bound on a hang, not a speed figure
  });

  it('a channel id the destination does not expect is rejected', async () => {
    const { source, destination } = await runMigrationPair(CLI_MAIN, ['--ram', '32M', '--multifd-channels', '2'], ['--ram', '32M', '--multifd-channels', '4']);
    expect(source.report?.status).toBe('failed');
    expect(destination.report?.error.code).toBe('VMIG_ERR_MULTIFD_CHANNELS');
    expect(destination.report?.error.message).toMatch(/channel id/);
  });
});

describe('multifd: hostile channel handshakes', () => {
  async function handshake(inits: { id: number; uuid: number }[]): Promise<Report | undefined> {
    const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--multifd-channels', '2']);
    const { uri } = (await dst.waitFor((l) => l['event'] === 'listening')) as { uri: string };
    const socks: net.Socket[] = [];
    for (const i of inits) {
      const s = await connectTo(uri);
      s.on('error', () => {});
      const b = Buffer.alloc(64);
      b.writeUInt32BE(0x11223344, 0);
      b.writeUInt32BE(1, 4);
      b.fill(i.uuid, 8, 24);
      b[24] = i.id;
      s.write(b);
      socks.push(s);
    }
    const run = await dst.done;
    for (const s of socks) s.destroy();
    expect(run.code).toBe(1);
    return run.report?.error as Report | undefined;
  }

  it('a duplicate channel id is rejected', async () => {
    const e = await handshake([{ id: 0, uuid: 0 }, { id: 0, uuid: 0 }]);
    expect(e?.code).toBe('VMIG_ERR_MULTIFD_HANDSHAKE');
    expect(e?.message).toMatch(/duplicate/);
  });

  it('a channel of another migration (uuid differs) is rejected', async () => {
    const e = await handshake([{ id: 0, uuid: 7 }, { id: 1, uuid: 8 }]);
    expect(e?.code).toBe('VMIG_ERR_MULTIFD_HANDSHAKE');
    expect(e?.message).toMatch(/uuid/);
  });
});

describe('multifd: a channel dying mid-migration', () => {
  it('both ends fail clearly and exit; nothing is left running', async () => {
    const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--ram', '256M', '--multifd-channels', '2']);
    const { uri } = (await dst.waitFor((l) => l['event'] === 'listening')) as { uri: string };
    const dstPort = Number(uri.split(':').pop());
    // A proxy in between; it cuts the second multifd connection after 8 MiB.
    let accepted = 0;
    const open = new Set<net.Socket>();
    const proxy = net.createServer((client) => {
      const n = accepted++;
      const upstream = net.connect(dstPort, '127.0.0.1');
      for (const s of [client, upstream]) {
        open.add(s);
        s.on('error', () => {});
        s.on('close', () => open.delete(s));
      }
      client.pipe(upstream);
      upstream.pipe(client);
      if (n === 2) {
        let seen = 0;
        client.on('data', (d: Buffer) => {
          seen += d.length;
          if (seen > 8 << 20) {
            client.destroy();
            upstream.destroy();
          }
        });
      }
    });
    await new Promise<void>((r) => proxy.listen(0, '127.0.0.1', r));
    const proxyPort = (proxy.address() as net.AddressInfo).port;
    const src = spawnCli(CLI_MAIN, ['migrate', `tcp:127.0.0.1:${proxyPort}`, '--json', '--ram', '256M', '--writers', '2', '--dirty-rate', '20M', '--multifd-channels', '2', '--max-bandwidth', '128M']);
    const [s, d] = await Promise.all([src.done, dst.done]);
    proxy.close();
    for (const sock of open) sock.destroy();
    expect(s.code).toBe(1);
    expect(s.report?.status).toBe('failed');
    expect(['VMIG_ERR_PEER_CLOSED', 'VMIG_ERR_CHANNEL']).toContain(s.report?.error.code);
    expect(d.code).toBe(1);
    expect(d.report?.status).toBe('failed');
    // Both processes exited on their own: no thread or socket kept them alive.
    expect(s.signal).toBeNull();
    expect(d.signal).toBeNull();
  });
});
