/**
 * libc().unsentBytes (ioctl TIOCOUTQ): what a socket's kernel send queue holds, which the
 * migration thread subtracts to measure what a link drained (migration-thread.ts).
 */
import net from 'node:net';
import { describe, expect, it } from 'vitest';
import { libc } from '../src/index.js';

describe.runIf(libc() !== null || process.env['CI'] === 'true')('libc().unsentBytes', () => {
  it('counts bytes a peer has not read, and none once it read them; 0 for an fd that is not a socket', async () => {
    const c = libc()!;
    let peer!: net.Socket;
    const server = net.createServer((s) => {
      peer = s;
      s.pause();
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const sock = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
    await new Promise((r) => sock.once('connect', r));
    const fd = (sock as unknown as { _handle: { fd: number } })._handle.fd;
    sock.write(Buffer.alloc(16 << 20));
    await new Promise((r) => setTimeout(r, 100));
    expect(c.unsentBytes(fd)).toBeGreaterThan(0);
    peer.resume();
    await new Promise<void>((resolve) => {
      let n = 0;
      peer.on('data', (d: Buffer) => {
        n += d.length;
        if (n >= 16 << 20) resolve();
      });
    });
    await new Promise((r) => setTimeout(r, 50));
    expect(c.unsentBytes(fd)).toBe(0);
    expect(c.unsentBytes(999_999)).toBe(0);
    sock.destroy();
    peer.destroy();
    await new Promise((r) => server.close(r));
  });
});
