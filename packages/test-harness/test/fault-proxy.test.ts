/**
 * FaultProxy over real loopback sockets: a target server that records what each connection
 * received (and echoes it back when asked), clients that write known bytes through the
 * proxy; each fault must happen at its byte.
 */
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { FaultProxy } from '../src/fault-proxy.js';

interface Peer {
  sock: net.Socket;
  received: Buffer[];
  ended: boolean;
  closed: boolean;
  errors: string[];
}
const total = (p: Peer): number => p.received.reduce((n, b) => n + b.length, 0);
const all = (p: Peer): Buffer => Buffer.concat(p.received);

function track(sock: net.Socket): Peer {
  const p: Peer = { sock, received: [], ended: false, closed: false, errors: [] };
  sock.on('data', (d: Buffer) => p.received.push(d));
  sock.on('end', () => (p.ended = true));
  sock.on('close', () => (p.closed = true));
  sock.on('error', (e: NodeJS.ErrnoException) => p.errors.push(e.code ?? e.message));
  return p;
}

interface Target {
  server: net.Server;
  port: number;
  /** One per accepted connection, in accept order. */
  peers: Peer[];
}

/** A sink (or echo) server; with allowHalfOpen it ends its side only after the client did. */
async function startTarget(echo: boolean): Promise<Target> {
  const peers: Peer[] = [];
  const server = net.createServer({ allowHalfOpen: true }, (sock) => {
    const p = track(sock);
    peers.push(p);
    if (echo) sock.on('data', (d: Buffer) => sock.write(d));
    sock.on('end', () => sock.end());
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { server, port: (server.address() as net.AddressInfo).port, peers };
}

async function connect(proxy: FaultProxy): Promise<Peer> {
  const sock = net.connect({ port: proxy.port, host: '127.0.0.1', allowHalfOpen: true });
  const p = track(sock);
  await new Promise<void>((r, j) => sock.once('connect', r).once('error', j));
  return p;
}

async function until(pred: () => boolean, what: string, ms = 3000): Promise<void> {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

let cleanup: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const f of cleanup.reverse()) await f();
  cleanup = [];
});

async function setup(echo = false): Promise<{ proxy: FaultProxy; target: Target }> {
  const target = await startTarget(echo);
  const proxy = await FaultProxy.start({ target: { host: '127.0.0.1', port: target.port } });
  cleanup.push(
    () => proxy.close(),
    () => {
      for (const p of target.peers) p.sock.destroy();
      target.server.close();
    },
  );
  expect(proxy.uri).toBe(`tcp:127.0.0.1:${proxy.port}`);
  return { proxy, target };
}

describe('FaultProxy', () => {
  it('passes bytes and half-closes through, both ways, and counts them', async () => {
    const { proxy, target } = await setup(true);
    const c = await connect(proxy);
    const data = randomBytes(300_000);
    c.sock.end(data);
    await until(() => c.closed, 'the client to close');
    expect(all(target.peers[0]!).equals(data)).toBe(true);
    expect(all(c).equals(data)).toBe(true);
    expect(c.ended).toBe(true);
    expect(target.peers[0]!.ended).toBe(true);
    expect(proxy.connections[0]!.bytes).toEqual({ up: 300_000, down: 300_000 });
    await until(() => proxy.connections[0]!.state === 'closed', 'the proxy to see the connection closed');
    expect(proxy.faults).toEqual([]);
  });

  it('corrupt: flips exactly the given bit of the given byte, in the given direction', async () => {
    const { proxy, target } = await setup(true);
    proxy.addRule({ connection: 0, direction: 'up', afterBytes: 70_000, action: 'corrupt', bit: 3 });
    proxy.addRule({ connection: 0, direction: 'down', afterBytes: 10, action: 'corrupt' });
    const c = await connect(proxy);
    const data = randomBytes(100_000);
    c.sock.write(data);
    await until(() => total(c) === data.length, 'the echo');
    const up = Buffer.from(data);
    up[70_000]! ^= 1 << 3;
    expect(all(target.peers[0]!).equals(up)).toBe(true);
    const down = Buffer.from(up);
    down[10]! ^= 1;
    expect(all(c).equals(down)).toBe(true);
    expect(proxy.faults.map((f) => `${f.direction}:${f.action}@${f.at}`).sort()).toEqual(['down:corrupt@10', 'up:corrupt@70000']);
  });

  it('close after N bytes up: the target gets exactly N bytes then a FIN; the client sees its connection end', async () => {
    const { proxy, target } = await setup();
    proxy.addRule({ connection: 'all', direction: 'up', afterBytes: 5000, action: 'close' });
    const c = await connect(proxy);
    const data = randomBytes(200_000);
    c.sock.write(data);
    await until(() => target.peers[0]?.ended === true, 'the FIN at the target');
    expect(all(target.peers[0]!).equals(data.subarray(0, 5000))).toBe(true);
    expect(target.peers[0]!.errors).toEqual([]);
    await until(() => c.ended || c.closed, 'the client to see the end');
    expect(proxy.connections[0]!.state).toBe('closed');
    expect(proxy.connections[0]!.bytes.up).toBe(5000);
  });

  it('reset after N bytes down: the client gets exactly N bytes, then both ends are reset', async () => {
    const { proxy, target } = await setup(true);
    proxy.addRule({ connection: 0, direction: 'down', afterBytes: 12_345, action: 'reset' });
    const c = await connect(proxy);
    const data = randomBytes(100_000);
    c.sock.write(data);
    await until(() => target.peers[0]?.closed === true && (c.closed || c.ended), 'both ends to see the reset');
    expect(all(c).equals(data.subarray(0, 12_345))).toBe(true);
    // The target had nothing in flight: it sees the RST as such. The client may read its last
    // bytes and the RST in one go, which libuv reports as an EOF (POLLHUP after a partial
    // read), so it sees ECONNRESET or an end.
    expect(target.peers[0]!.errors).toContain('ECONNRESET');
    expect(c.errors.length > 0 || c.ended).toBe(true);
    expect(c.errors.filter((e) => e !== 'ECONNRESET')).toEqual([]);
    expect(proxy.connections[0]!.state).toBe('reset');
  });

  it('freeze after N bytes up: the target gets exactly N, later bytes never arrive, nothing closes; thaw delivers the rest', async () => {
    const { proxy, target } = await setup();
    proxy.addRule({ connection: 'all', direction: 'up', afterBytes: 3000, action: 'freeze' });
    const c = await connect(proxy);
    const data = randomBytes(10_000);
    c.sock.write(data);
    await until(() => proxy.connections[0]?.state === 'frozen', 'the freeze');
    await sleep(150);
    const more = randomBytes(5000);
    c.sock.write(more);
    // The target's answer does not reach the client either: the whole link is silent.
    target.peers[0]!.sock.write('hello');
    await sleep(150);
    const t = target.peers[0]!;
    expect(all(t).equals(data.subarray(0, 3000))).toBe(true);
    expect(total(c)).toBe(0);
    // Both connections stay open: no FIN, no RST, still writable.
    expect([c.ended, c.closed, c.errors, c.sock.destroyed]).toEqual([false, false, [], false]);
    expect([t.ended, t.closed, t.errors, t.sock.destroyed]).toEqual([false, false, [], false]);
    expect(proxy.connections[0]!.bytes).toEqual({ up: 3000, down: 0 });
    expect(proxy.connections[0]!.frozen).toEqual({ up: true, down: true });
    // Nothing was dropped: thawed, the link carries on where it stopped.
    proxy.thaw();
    await until(() => total(t) === 15_000 && total(c) === 5, 'the held bytes');
    expect(all(t).equals(Buffer.concat([data, more]))).toBe(true);
    expect(all(c).toString()).toBe('hello');
    expect(proxy.connections[0]!.state).toBe('open');
  });

  it('a frozen link holds the sender back by flow control (the client cannot write much more)', async () => {
    const { proxy, target } = await setup();
    proxy.addRule({ connection: 0, direction: 'up', afterBytes: 0, action: 'freeze' });
    const c = await connect(proxy);
    await until(() => proxy.connections[0]?.state === 'frozen', 'the freeze');
    // Write until the client's socket says stop; the proxy does not read a frozen link, so
    // the kernel buffers fill up and the writes stop being taken.
    const chunk = Buffer.alloc(1 << 20);
    let written = 0;
    while (c.sock.write(chunk) && written < 256 << 20) written += chunk.length;
    expect(written).toBeLessThan(256 << 20);
    await sleep(100);
    expect(total(target.peers[0]!)).toBe(0);
    expect(c.sock.writableLength).toBeGreaterThan(0);
  });

  it('rules name connections by accept order; on-demand freeze of one direction, cut by reset and by close', async () => {
    const { proxy, target } = await setup(true);
    proxy.addRule({ connection: 1, direction: 'up', afterBytes: 100, action: 'close' });
    const c0 = await connect(proxy);
    await until(() => target.peers.length === 1, 'connection 0');
    const c1 = await connect(proxy);
    await until(() => target.peers.length === 2, 'connection 1');
    const c2 = await connect(proxy);
    await until(() => target.peers.length === 3, 'connection 2');
    for (const c of [c0, c1, c2]) c.sock.write(Buffer.alloc(1000, 1));
    await until(() => total(c0) === 1000 && total(c2) === 1000 && target.peers[1]!.ended, 'echoes and the close');
    expect(total(target.peers[1]!)).toBe(100);

    // On demand: freeze connection 0's 'down' only: its bytes still go up, no echo comes back.
    proxy.freeze(0, 'down');
    c0.sock.write(Buffer.alloc(500, 2));
    await until(() => total(target.peers[0]!) === 1500, 'bytes up while down is frozen');
    await sleep(100);
    expect(total(c0)).toBe(1000);
    expect(proxy.connections[0]!.frozen).toEqual({ up: false, down: true });

    proxy.cut(2, 'reset');
    await until(() => c2.closed && target.peers[2]!.closed, 'the reset');
    expect(c2.errors).toContain('ECONNRESET');
    expect(target.peers[2]!.errors).toContain('ECONNRESET');
    proxy.cut(0, 'close');
    await until(() => c0.ended && target.peers[0]!.ended, 'the FINs');
    expect(c0.errors).toEqual([]);
    expect(proxy.summary().map((s) => s.state)).toEqual(['closed', 'closed', 'reset']);
  });

  it('a peer reset passes through as a reset; a target that refuses resets the client', async () => {
    const { proxy, target } = await setup();
    const c = await connect(proxy);
    c.sock.write('x');
    await until(() => target.peers[0] !== undefined && total(target.peers[0]) === 1, 'a byte');
    c.sock.resetAndDestroy();
    await until(() => target.peers[0]!.closed, 'the target to see it');
    expect(target.peers[0]!.errors).toContain('ECONNRESET');

    const dead = await startTarget(false);
    const port = dead.port;
    await new Promise((r) => dead.server.close(r));
    const proxy2 = await FaultProxy.start({ target: { port } });
    cleanup.push(() => proxy2.close());
    const c2 = track(net.connect(proxy2.port, '127.0.0.1'));
    await until(() => c2.closed, 'the client to be reset');
    expect(c2.errors).toContain('ECONNRESET');
    expect(proxy2.connections[0]!.errors.join()).toMatch(/ECONNREFUSED/);
  });

  it('close() never hangs: frozen links, clients that never read, a client still connecting', async () => {
    const { proxy } = await setup(true);
    proxy.addRule({ connection: 'all', direction: 'up', afterBytes: 10, action: 'freeze' });
    const clients = [await connect(proxy), await connect(proxy)];
    for (const c of clients) {
      c.sock.pause();
      c.sock.write(Buffer.alloc(1 << 20));
    }
    await until(() => proxy.connections.length === 2 && proxy.connections.every((x) => x.state === 'frozen'), 'the freezes');
    const t0 = Date.now();
    await proxy.close();
    expect(Date.now() - t0).toBeLessThan(1500);
    await until(() => clients.every((c) => c.closed), 'the clients to see the end');
    await proxy.close();
  });
});
