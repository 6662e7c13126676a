/**
 * DelayProxy (delay-proxy.ts) on loopback: each direction arrives `delayMs` later, in order,
 * whole; a "lost" segment stalls the stream one more round trip.
 */
import net from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { DelayProxy } from '../src/index.js';

const closers: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of closers.splice(0).reverse()) await c();
});

/** An echo server behind a proxy; resolves with a connected client. */
async function echoThrough(delayMs: number, loss: number, random?: () => number): Promise<net.Socket> {
  const echo = net.createServer((s) => s.pipe(s));
  await new Promise<void>((r) => echo.listen(0, '127.0.0.1', r));
  closers.push(() => new Promise((r) => echo.close(() => r())));
  const proxy = await DelayProxy.start({ listen: { host: '127.0.0.1', port: 0 }, target: { host: '127.0.0.1', port: (echo.address() as net.AddressInfo).port }, delayMs, loss, ...(random ? { random } : {}) });
  closers.push(() => proxy.close());
  const c = net.connect(proxy.port, '127.0.0.1');
  await new Promise((r) => c.once('connect', r));
  closers.push(async () => void c.destroy());
  return c;
}

async function roundTrip(c: net.Socket, bytes: Buffer): Promise<{ ms: number; got: Buffer }> {
  const t0 = performance.now();
  const parts: Buffer[] = [];
  let n = 0;
  return new Promise((resolve) => {
    const onData = (d: Buffer): void => {
      parts.push(d);
      n += d.length;
      if (n >= bytes.length) {
        c.off('data', onData);
        resolve({ ms: performance.now() - t0, got: Buffer.concat(parts) });
      }
    };
    c.on('data', onData);
    c.write(bytes);
  });
}

describe('DelayProxy', () => {
  it('delays each direction, keeps the bytes whole and in order', async () => {
    const c = await echoThrough(30, 0);
    const data = Buffer.from(Array.from({ length: 200_000 }, (_, i) => i % 251));
    const { ms, got } = await roundTrip(c, data);
    expect(Buffer.compare(got, data)).toBe(0);
    // There and back: two one-way delays at least.
    expect(ms).toBeGreaterThanOrEqual(59);
  });

  it('a lost segment stalls the stream one more round trip', async () => {
    const lossless = await echoThrough(20, 0);
    const a = await roundTrip(lossless, Buffer.alloc(1000, 1));
    // random() below the loss probability: every chunk "loses" a segment.
    const lossy = await echoThrough(20, 0.5, () => 0);
    const b = await roundTrip(lossy, Buffer.alloc(1000, 1));
    expect(b.ms - a.ms).toBeGreaterThanOrEqual(70);
  });
});
