/**
 * A TLS connection seen as a plain socket by threads that do their I/O straight on an fd
 * (sync-fd.ts: the return path's readers and writers, the postcopy preempt channel). Those
 * threads cannot use a TLS connection, whose state lives in the event loop of the thread that made it;
 * so that thread pumps one direction of the connection between the TLS socket and one end of
 * a local socket pair, and the other end's fd goes to the threads, as an accepted socket's
 * would. The plain bytes cross this process only, in the kernel's socket buffers.
 *
 * Ownership: the pair's far end is the caller's, like an accepted socket (hand its fd over
 * with detachFd or stopReading, close it when the threads are done); the near end and the
 * pumping are this module's, and end with either side.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { VmigError } from '@vmig/core';

/** Two connected local sockets (a unix socket in a private directory, gone once connected). */
export async function socketPair(): Promise<[net.Socket, net.Socket]> {
  const dir = mkdtempSync(join(tmpdir(), 'vmig-pair-'));
  const path = join(dir, 's');
  const server = net.createServer({ pauseOnConnect: true });
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(path, resolve);
    });
    const accepted = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
    const near = net.connect(path);
    await new Promise<void>((resolve, reject) => near.once('connect', resolve).once('error', reject));
    return [near, await accepted];
  } catch (e) {
    throw new VmigError('VMIG_ERR_CHANNEL', `cannot make a local socket pair: ${(e as Error).message}`, { channel: 'tls' });
  } finally {
    server.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

/** One direction of a TLS connection as a local socket (bridgeTls). */
export interface TlsBridge {
  /** The local end: hand its fd to the threads; destroy it when they are done. */
  sock: net.Socket;
  /**
   * 'out' only: ends the local end and resolves once everything written on it went into the
   * TLS connection and that was ended in turn (or the connection is gone), at most `ms`.
   * Exiting before this can lose the last bytes (a return path's SHUT).
   */
  close(ms?: number): Promise<void>;
}

/**
 * One direction of `secure` as a plain socket: 'in' delivers what the peer sends to the
 * returned socket's reader; 'out' sends what is written on the returned socket's fd to the
 * peer. The other direction of `secure` stays the caller's.
 */
export async function bridgeTls(secure: net.Socket, direction: 'in' | 'out'): Promise<TlsBridge> {
  const [near, far] = await socketPair();
  near.on('error', () => {});
  far.on('error', () => {});
  // 'out': settles once `secure` took everything (its 'finish') or is gone.
  const flushed = new Promise<void>((resolve) => {
    secure.once('finish', resolve);
    secure.once('close', resolve);
  });
  if (direction === 'in') {
    secure.pipe(near);
  } else {
    near.resume();
    near.pipe(secure, { end: false });
  }
  // Either side gone: so is the other (a reader of `far` sees the end; a writer, EPIPE).
  secure.once('close', () => near.destroy());
  near.once('close', () => {
    if (direction === 'out') secure.end();
  });
  return {
    sock: far,
    async close(ms = 2000) {
      far.destroy();
      if (direction === 'in') return;
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([flushed, new Promise<void>((r) => (timer = setTimeout(r, ms)))]);
      clearTimeout(timer);
    },
  };
}
