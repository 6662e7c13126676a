/**
 * Connecting and listening. A transport hands out net.Sockets; what travels on them is
 * someone else's business.
 */
import { lstatSync, unlinkSync } from 'node:fs';
import net from 'node:net';
import { VmigError } from '@vmig/core';
import type { MigrationUri } from './uri.js';

/** Socket options for bulk transfer: no Nagle, big kernel buffers come from the OS. */
function tune(sock: net.Socket): net.Socket {
  sock.setNoDelay(true);
  return sock;
}

export function connect(uri: MigrationUri, opts: { timeoutMs?: number; channel?: string } = {}): Promise<net.Socket> {
  const channel = opts.channel ?? 'main';
  return new Promise((resolve, reject) => {
    const sock = uri.transport === 'tcp' ? net.connect({ host: uri.host, port: uri.port }) : net.connect({ path: uri.path });
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new VmigError('VMIG_ERR_CONNECT', `connect to ${describe(uri)} timed out`, { channel }));
    }, opts.timeoutMs ?? 10_000);
    sock.once('connect', () => {
      clearTimeout(timer);
      sock.removeAllListeners('error');
      resolve(tune(sock));
    });
    sock.once('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      sock.destroy();
      reject(new VmigError('VMIG_ERR_CONNECT', `cannot connect to ${describe(uri)}: ${err.code ?? err.message}`, { channel }, { cause: err }));
    });
  });
}

export interface Listener {
  /** The address actually bound (port 0 resolved). */
  readonly uri: MigrationUri;
  /** Resolves with the next accepted connection. */
  accept(): Promise<net.Socket>;
  close(): Promise<void>;
}

export async function listen(uri: MigrationUri): Promise<Listener> {
  const server = net.createServer({ pauseOnConnect: true });
  const pending: net.Socket[] = [];
  const waiters: { resolve: (s: net.Socket) => void; reject: (e: Error) => void }[] = [];
  let closedError: Error | undefined;
  server.on('connection', (sock) => {
    tune(sock);
    const w = waiters.shift();
    if (w) w.resolve(sock);
    else pending.push(sock);
  });
  if (uri.transport === 'unix') await removeStaleSocket(uri.path);
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) =>
      reject(new VmigError('VMIG_ERR_CONNECT', `cannot listen on ${describe(uri)}: ${err.code ?? err.message}`, { channel: 'listen' }, { cause: err })),
    );
    if (uri.transport === 'tcp') server.listen({ host: uri.host, port: uri.port }, resolve);
    else server.listen({ path: uri.path }, resolve);
  });
  const addr = server.address();
  const bound: MigrationUri = uri.transport === 'tcp' && addr && typeof addr === 'object' ? { transport: 'tcp', host: uri.host, port: addr.port } : uri;
  return {
    uri: bound,
    accept() {
      const s = pending.shift();
      if (s) return Promise.resolve(s);
      if (closedError) return Promise.reject(closedError);
      return new Promise((resolve, reject) => waiters.push({ resolve, reject }));
    },
    close() {
      closedError = new VmigError('VMIG_ERR_CHANNEL', 'listener closed', { channel: 'listen' });
      for (const w of waiters.splice(0)) w.reject(closedError);
      for (const s of pending.splice(0)) s.destroy();
      // Stop accepting; connections already handed out live on (server.close's callback
      // would wait for them to end, so it is not awaited).
      server.close();
      return Promise.resolve();
    },
  };
}

function describe(uri: MigrationUri): string {
  return uri.transport === 'tcp' ? `${uri.host}:${uri.port}` : uri.path;
}

/**
 * A unix socket file left by a process that died blocks a new listener (EADDRINUSE) for good.
 * QEMU unlinks the path before it binds; here only a socket nobody accepts on is removed, so
 * a live listener is never taken over.
 */
async function removeStaleSocket(path: string): Promise<void> {
  let st;
  try {
    st = lstatSync(path);
  } catch {
    return;
  }
  if (!st.isSocket()) return;
  const alive = await new Promise<boolean>((resolve) => {
    const c = net.connect({ path });
    c.once('connect', () => {
      c.destroy();
      resolve(true);
    });
    c.once('error', () => resolve(false));
  });
  if (!alive) {
    try {
      unlinkSync(path);
    } catch {
      // Gone meanwhile, or not ours to remove: listen() says what is wrong.
    }
  }
}
