import net from 'node:net';
import { describe, expect, it } from 'vitest';
import { EndOfStream, getU32 } from '@vmig/core';
import { BufferedWriter, ByteReader, connect, detachFd, listen, parseMigrationUri } from '../src/index.js';

async function pair(): Promise<{ client: net.Socket; server: net.Socket; close: () => Promise<void> }> {
  const l = await listen(parseMigrationUri('tcp:127.0.0.1:0'));
  const [client, server] = await Promise.all([connect(l.uri), l.accept()]);
  return { client, server, close: () => l.close() };
}

describe('migration URIs', () => {
  it('parses tcp and unix, rejects the rest with a stable code', () => {
    expect(parseMigrationUri('tcp:127.0.0.1:4444')).toEqual({ transport: 'tcp', host: '127.0.0.1', port: 4444 });
    expect(parseMigrationUri('tcp:[::1]:5')).toEqual({ transport: 'tcp', host: '::1', port: 5 });
    expect(parseMigrationUri('unix:/tmp/x.sock')).toEqual({ transport: 'unix', path: '/tmp/x.sock' });
    for (const bad of ['tcp:host', 'tcp::4444', 'tcp:h:99999', 'udp:h:1', 'exec:cat', 'unix:', '']) {
      expect(() => parseMigrationUri(bad), bad).toThrow(expect.objectContaining({ code: 'VMIG_ERR_INVALID_ARG' }));
    }
  });

  it('a refused connection is VMIG_ERR_CONNECT', async () => {
    const l = await listen(parseMigrationUri('tcp:127.0.0.1:0'));
    const uri = l.uri;
    await l.close();
    await expect(connect(uri)).rejects.toMatchObject({ code: 'VMIG_ERR_CONNECT' });
  });
});

describe('BufferedWriter -> socket -> ByteReader', () => {
  for (const mode of ['socket chunks', 'pooled (fromFd)'] as const) {
    it(`carries records of every size across chunk boundaries, in order: ${mode}`, async () => {
      const { client, server, close } = await pair();
      const w = new BufferedWriter(client, { bufferSize: 1000 });
      const r = mode === 'pooled (fromFd)' ? ByteReader.fromFd(detachFd(server), { highWaterMark: 64 * 1024 }) : new ByteReader(server, { highWaterMark: 64 * 1024 });
      const sizes = Array.from({ length: 2000 }, (_, i) => (i * 7919) % 9000);
      const writing = (async () => {
        for (let i = 0; i < sizes.length; i++) {
          w.put32(i);
          w.put32(sizes[i]!);
          w.putBytes(new Uint8Array(sizes[i]!).fill(i & 0xff));
          if (i % 50 === 0) await w.ready();
        }
        await w.flush();
        client.end();
      })();
      for (let i = 0; i < sizes.length; i++) {
        await r.ensure(8);
        expect(getU32(r)).toBe(i);
        const n = getU32(r);
        expect(n).toBe(sizes[i]);
        await r.ensure(n);
        expect(r.buf.subarray(r.pos, r.pos + n).every((b) => b === (i & 0xff))).toBe(true);
        r.pos += n;
      }
      await writing;
      await expect(r.ensure(1)).rejects.toBeInstanceOf(EndOfStream);
      expect(r.bytesRead).toBe(w.bytesWritten);
      // Reused, not one buffer per read: ~9 MB went through 256 KiB pool buffers (~35 of them
      // without reuse); with a 64 KiB high-water mark a handful are ever in use at once.
      if (mode === 'pooled (fromFd)') expect(r.pooledBuffers).toBeLessThanOrEqual(8);
      r.input.destroy();
      await close();
    });
  }

  it('flush leaves no listener behind (it runs once per RAM section)', async () => {
    const { client, server, close } = await pair();
    server.resume();
    const w = new BufferedWriter(client);
    const before = client.listenerCount('close');
    for (let i = 0; i < 50; i++) {
      w.putBytes(new Uint8Array(256 * 1024));
      await w.flush();
    }
    expect(client.listenerCount('close')).toBe(before);
    client.destroy();
    await close();
  });

  it('refuses a read larger than its limit instead of allocating it', async () => {
    const { client, server, close } = await pair();
    const r = new ByteReader(server, { maxRead: 1024 });
    await expect(r.ensure(1 << 30)).rejects.toMatchObject({ code: 'VMIG_ERR_STREAM_FORMAT' });
    client.destroy();
    await close();
  });

  it('reports a peer that went away as an error, not a hang', async () => {
    const { client, server, close } = await pair();
    const w = new BufferedWriter(server);
    client.destroy();
    await new Promise((r) => setTimeout(r, 50));
    let failed = false;
    try {
      for (let i = 0; i < 200; i++) {
        w.putBytes(new Uint8Array(1 << 20));
        await w.ready();
      }
      await w.flush();
    } catch (e) {
      failed = true;
      expect((e as { code: string }).code).toBe('VMIG_ERR_PEER_CLOSED');
    }
    expect(failed).toBe(true);
    await close();
  });
});
