/**
 * poll(2) on a socket's fd (libc.ts) as the source's return-path thread uses it, through
 * SyncFd.waitReadable: it says whether there is something to read, it wakes when data comes
 * while it waits in another thread, and close() waits for a poll in progress, after which
 * the fd is never read again. Real sockets on loopback, a real worker thread.
 */
import net from 'node:net';
import { Worker } from 'node:worker_threads';
import { afterEach, describe, expect, it } from 'vitest';
import { stopReading } from '@vmig/channel';
import { createSyncFd, libc, READ_CLOSED, READ_NONE, SyncFd } from '@vmig/core';

const coreModule = import.meta.resolve('@vmig/core');

async function socketPair(): Promise<{ client: net.Socket; server: net.Socket; close(): void }> {
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const accepted = new Promise<net.Socket>((r) => srv.once('connection', r));
  const client = net.connect((srv.address() as net.AddressInfo).port, '127.0.0.1');
  await new Promise<void>((r) => client.once('connect', () => r()));
  const server = await accepted;
  return {
    client,
    server,
    close: () => {
      client.destroy();
      server.destroy();
      srv.close();
    },
  };
}

/** A worker that waits in waitReadable on the fd, then reads: what it saw, in order. */
const WAITER = `
import { parentPort, workerData } from 'node:worker_threads';
const { libc, SyncFd } = await import(workerData.coreModule);
const fd = new SyncFd(workerData.io);
const polled = new Int32Array(workerData.polled);
parentPort.postMessage({ t: 'polling' });
// Marks the end of the poll itself, inside waitReadable.
fd.waitReadable(workerData.ms, (f, ms) => {
  const r = libc().pollIn(f, ms);
  Atomics.store(polled, 0, 1);
  return r;
});
const buf = new Uint8Array(64);
parentPort.postMessage({ t: 'read', n: fd.readSome(buf) });
`;

function startWaiter(io: ReturnType<typeof createSyncFd>, ms: number): { worker: Worker; polled: Int32Array; messages: Promise<{ t: string; n?: number }[]> } {
  const polled = new Int32Array(new SharedArrayBuffer(4));
  const worker = new Worker(WAITER, { eval: true, workerData: { coreModule, io, ms, polled: polled.buffer } });
  const seen: { t: string; n?: number }[] = [];
  const messages = new Promise<typeof seen>((resolve, reject) => {
    worker.on('message', (m) => {
      seen.push(m);
      if (m.t === 'read') resolve(seen);
    });
    worker.on('error', reject);
  });
  return { worker, polled, messages };
}

describe.runIf(process.platform === 'linux')('poll(2) on a socket fd', () => {
  let cleanup: (() => void) | undefined;
  afterEach(() => cleanup?.());

  // On Linux the fast paths are expected: tests that adapt to a missing libc must not pass
  // by quietly taking the fallback.
  it('koffi loads libc here (poll(2), sched_setattr(2))', () => {
    expect(libc()).not.toBeNull();
  });

  it('says whether there is something to read', async () => {
    const pair = await socketPair();
    cleanup = pair.close;
    const { fd } = stopReading(pair.server);
    const pollIn = libc()!.pollIn;
    expect(pollIn(fd, 20)).toBe(false);
    pair.client.write('x');
    // The byte is on its way over loopback: a poll long enough to see it arrive.
    expect(pollIn(fd, 10_000)).toBe(true);
    const io = new SyncFd(createSyncFd(fd));
    expect(io.readSome(new Uint8Array(8))).toBe(1);
    expect(io.readSome(new Uint8Array(8))).toBe(READ_NONE);
  });

  it('wakes a thread waiting in it when data comes', async () => {
    const pair = await socketPair();
    cleanup = pair.close;
    const shared = createSyncFd(stopReading(pair.server).fd);
    const { worker, messages } = startWaiter(shared, 60_000);
    await new Promise<void>((r) => worker.once('message', () => r()));
    await new Promise((r) => setTimeout(r, 50));
    pair.client.write('hello');
    // Without the wake-up the worker would sit in poll for a minute and the test time out.
    expect((await messages).at(-1)).toEqual({ t: 'read', n: 5 });
    await worker.terminate();
  });

  it('close() waits for a poll in progress; the fd is not read after it', async () => {
    const pair = await socketPair();
    cleanup = pair.close;
    const shared = createSyncFd(stopReading(pair.server).fd);
    const { worker, polled, messages } = startWaiter(shared, 300);
    await new Promise<void>((r) => worker.once('message', () => r()));
    await new Promise((r) => setTimeout(r, 50));
    new SyncFd(shared).close();
    // The poll had ended before close() returned: the fd may be closed now.
    expect(Atomics.load(polled, 0)).toBe(1);
    // Data that comes after close() is not read: the waiter sees the close instead.
    pair.client.write('late');
    expect((await messages).at(-1)).toEqual({ t: 'read', n: READ_CLOSED });
    await worker.terminate();
  });
});
