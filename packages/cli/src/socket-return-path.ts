/**
 * The source's return path read on the main thread, from the main connection's socket: for
 * a TLS connection, whose bytes only its own thread can decrypt, so the return-path thread
 * (return-path.worker.ts, which reads the raw fd) cannot serve it. Precopy only needs SHUT
 * from it, which comes once the migration thread waits for nothing else; postcopy over TLS
 * is refused (options.ts).
 */
import type net from 'node:net';
import { MIG_RP_MSG_PONG, MIG_RP_MSG_SHUT, RpMessageReader, decodeRpShut, StreamError, type SourceReturnPath, VmigError } from '@vmig/core';

const channel = 'return-path';

export class SocketReturnPath implements SourceReturnPath {
  readonly shut: Promise<number>;
  private settle!: { resolve: (status: number) => void; reject: (e: VmigError) => void };
  private readonly reader = new RpMessageReader();

  constructor(private readonly sock: net.Socket) {
    this.shut = new Promise<number>((resolve, reject) => (this.settle = { resolve, reject }));
    this.shut.catch(() => {});
    sock.on('data', this.onData);
    sock.once('end', () => this.settle.reject(new VmigError('VMIG_ERR_PEER_CLOSED', 'destination closed the connection', { channel })));
    sock.once('close', () => this.settle.reject(new VmigError('VMIG_ERR_PEER_CLOSED', 'destination closed the connection', { channel })));
  }

  private readonly onData = (chunk: Buffer): void => {
    try {
      for (let pos = 0; pos < chunk.length; ) {
        const space = this.reader.space();
        const n = Math.min(space.length, chunk.length - pos);
        space.set(chunk.subarray(pos, pos + n));
        this.reader.filled(n);
        pos += n;
        for (let m = this.reader.next(); m; m = this.reader.next()) {
          if (m.type === MIG_RP_MSG_SHUT) {
            this.settle.resolve(decodeRpShut(m.data));
            this.sock.off('data', this.onData);
            return;
          }
          if (m.type !== MIG_RP_MSG_PONG) throw new StreamError('VMIG_ERR_STREAM_FORMAT', `unexpected return-path message ${m.type} in precopy`, { channel });
        }
      }
    } catch (e) {
      this.sock.off('data', this.onData);
      this.settle.reject(e as VmigError);
    }
  };

  listen(): void {
    throw new VmigError('VMIG_ERR_POSTCOPY', 'postcopy over a TLS return path is not supported', { channel });
  }

  /** Nothing to stop: the socket is the caller's, and this only listens on it. */
  async close(): Promise<void> {
    this.sock.off('data', this.onData);
    this.settle.reject(new VmigError('VMIG_ERR_CANCELLED', 'return path closed', { channel }));
  }
}
