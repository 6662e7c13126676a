/**
 * Identifying an accepted connection by its first bytes, and handing its fd to a worker.
 *
 * Node cannot post a net.Socket to a worker thread, so a channel's fd is handed over and
 * the worker wraps it with `new net.Socket({ fd })`. Before that, the main thread reads the
 * first bytes (QEMU peeks the magic with MSG_PEEK; Node has no peek), so whatever it read
 * beyond what it needed goes along as `leftover`. Reading on the main thread's handle is
 * stopped for good inside the same 'data' callback, so no byte is read twice or lost.
 * Ownership: from the handoff on, the worker owns the fd and closes it; the main thread
 * keeps its (stopped, unreferenced) handle and must never close it, or it would close the
 * worker's fd.
 */
import net from 'node:net';
import { VmigError } from '@vmig/core';

/** Reads until at least `n` bytes arrived; resolves with everything read so far, paused. */
export function readFirstBytes(sock: net.Socket, n: number, timeoutMs = 30_000): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    let have = 0;
    const timer = setTimeout(() => done(new VmigError('VMIG_ERR_CHANNEL', `no data on a new connection within ${timeoutMs} ms`, { channel: 'listen' })), timeoutMs);
    const onData = (chunk: Buffer): void => {
      parts.push(chunk);
      have += chunk.length;
      if (have >= n) {
        sock.pause();
        done();
      }
    };
    const onEnd = (): void => done(new VmigError('VMIG_ERR_PEER_CLOSED', 'connection closed before its first bytes', { channel: 'listen' }));
    const done = (err?: Error): void => {
      clearTimeout(timer);
      sock.off('data', onData);
      sock.off('end', onEnd);
      sock.off('error', onEnd);
      sock.off('close', onEnd);
      if (err) reject(err);
      else resolve(Buffer.concat(parts));
    };
    sock.on('data', onData);
    sock.once('end', onEnd);
    sock.once('error', onEnd);
    // Destroyed by its owner (the listener closed): no 'end' comes, and the timer must not
    // keep the process alive.
    sock.once('close', onEnd);
    sock.resume();
  });
}

interface HandleWithFd {
  fd: number;
  readStop(): number;
}

/**
 * Stops all reading on `sock`'s handle for good and returns its fd, for a thread that reads
 * it another way (sync-fd.ts). The handle stays this thread's: it may still write, and it is
 * the one that closes the fd. Whatever the handle had read and not yet delivered comes back
 * as `leftover` (nothing, unless the peer spoke first).
 */
export function stopReading(sock: net.Socket): { fd: number; leftover: Buffer } {
  const handle = (sock as unknown as { _handle: HandleWithFd | null })._handle;
  if (!handle || typeof handle.fd !== 'number' || handle.fd < 0) {
    throw new VmigError('VMIG_ERR_CHANNEL', 'cannot hand this connection to a worker (no fd)', { channel: 'listen' });
  }
  handle.readStop();
  // Make sure the stream machinery never starts reading on this handle again.
  (sock as unknown as { _read: () => void })._read = () => {};
  sock.removeAllListeners('data');
  const parts: Buffer[] = [];
  for (let b: Buffer | null; (b = sock.read() as Buffer | null) !== null; ) parts.push(b);
  return { fd: handle.fd, leftover: Buffer.concat(parts) };
}

/**
 * Stops all reading on `sock` in this thread and returns its fd for a worker to own. Call it
 * right after readFirstBytes resolved (the socket is paused, nothing more was read).
 */
export function detachFd(sock: net.Socket): number {
  const { fd } = stopReading(sock);
  sock.unref();
  return fd;
}

/** Where a socket's reads land (Node's `onread` with a buffer function). */
export interface ReadTarget {
  /** The bytes the next read may fill (never empty). */
  target(): Uint8Array;
  /** `n` bytes landed in `buf` (what target() returned); false stops reading until resume(). */
  landed(buf: Uint8Array, n: number): boolean;
}

/**
 * Wraps a handed-over fd (detachFd) in a socket that reads where `into` says, with no
 * buffer of Node's in between. The socket asks for its first target while it is built.
 */
export function socketReadingInto(fd: number, into: ReadTarget, opts: { writable: boolean }): net.Socket {
  // `onread` is accepted by the constructor (Node >= 18) though @types/node lists it for connect() only.
  return new net.Socket({
    fd,
    readable: true,
    writable: opts.writable,
    onread: {
      buffer: () => into.target(),
      callback: (n: number, buf: Uint8Array) => into.landed(buf, n),
    },
  } as net.SocketConstructorOpts);
}
