/**
 * The destination's listener: tells each connection apart by its first bytes (the main
 * channel's QEVM magic, or a multifd channel's MultiFDInit_t) or, under TLS, by the order
 * QEMU opens them, and hands each to its owner.
 */
import type net from 'node:net';
import { bridgeTls, type Listener, readFirstBytes, tlsAccept, type TlsOptions } from '@vmig/channel';
import { type Logger, QEMU_VM_FILE_MAGIC, StreamError, toVmigError, VmigError } from '@vmig/core';
import { MULTIFD_INIT_SIZE, MULTIFD_MAGIC, type MultifdReceiver } from '@vmig/multifd';

export interface MainChannel {
  /** The connection: the accepted socket, or TLS over it. */
  sock: net.Socket;
  first: Buffer;
  tls: boolean;
}

/**
 * Accepts connections until the listener closes: the first QEVM one is the main channel,
 * multifd ones go to the receiver. Anything else is closed, and its reason kept for the
 * multifd barrier's timeout message (a channel whose init was cut short or corrupted is
 * then missing). Once a multifd channel arrived, the main channel must follow within
 * `timeoutMs`.
 */
export function acceptChannels(
  listener: Listener,
  receiver: MultifdReceiver | undefined,
  onFatal: (e: VmigError) => void,
  onPreempt: ((sock: net.Socket, first: Buffer) => void) | undefined,
  timeoutMs: number,
  log: Logger,
  tls: TlsOptions | undefined,
): Promise<MainChannel> {
  return new Promise((resolveMain) => {
    let mainSeen = false;
    /** Under TLS: the connection that will be the main channel passed its handshake. */
    let mainTls = false;
    let preemptSeen = false;
    let mainTimer: NodeJS.Timeout | undefined;
    const turnAway = (sock: net.Socket, reason: string): void => {
      log.warn({ reason }, 'connection turned away');
      receiver?.turnAway(reason);
      sock.destroy();
    };
    /**
     * Under TLS the first bytes are encrypted, so connections are told apart by order, as
     * QEMU's sources (and vmig's) open them: the main channel first, its handshake done on
     * this thread; every later one goes whole to a multifd thread, which does its own. A
     * failed handshake fails the migration: a plaintext source, a wrong CA, a refused name.
     */
    const handleTls = async (sock: net.Socket, opts: TlsOptions): Promise<void> => {
      sock.on('error', () => {});
      if (mainTls) {
        if (receiver?.hasFreeSlot) receiver.addTlsConnection(sock, opts);
        else if (onPreempt && !preemptSeen) {
          // The preempt channel (after main and every multifd channel, as QEMU opens them):
          // its handshake here, its pages to the preempt machinery through a local pair.
          preemptSeen = true;
          try {
            const t = await tlsAccept(sock, opts, timeoutMs, 'preempt');
            onPreempt((await bridgeTls(t, 'in')).sock, Buffer.alloc(0));
          } catch (e) {
            sock.destroy();
            onFatal(toVmigError(e, 'VMIG_ERR_TLS', { channel: 'preempt' }));
          }
        } else turnAway(sock, 'a connection after every channel this side expects');
        return;
      }
      mainTls = true;
      let t: net.Socket;
      let first: Buffer;
      try {
        t = await tlsAccept(sock, opts, timeoutMs, 'main');
      } catch (e) {
        sock.destroy();
        onFatal(toVmigError(e, 'VMIG_ERR_TLS', { channel: 'main' }));
        return;
      }
      try {
        first = await readFirstBytes(t, 4, timeoutMs);
      } catch (e) {
        t.destroy();
        // A TLS client checks the server's certificate once the handshake is over, and hangs up.
        onFatal(new VmigError('VMIG_ERR_TLS', `the source hung up right after the TLS handshake (did it refuse this side's certificate?): ${(e as Error).message}`, { channel: 'main' }));
        return;
      }
      if (first.readUInt32BE(0) !== QEMU_VM_FILE_MAGIC) {
        t.destroy();
        onFatal(new StreamError('VMIG_ERR_STREAM_MAGIC', 'under TLS the main channel must connect first: the first connection is not a migration stream (QEVM)', { channel: 'main' }));
        return;
      }
      mainSeen = true;
      log.debug({ channel: 'main' }, 'main channel connected, TLS handshake done');
      resolveMain({ sock: t, first, tls: true });
    };
    const handle = async (sock: net.Socket): Promise<void> => {
      if (tls) return handleTls(sock, tls);
      sock.on('error', () => {});
      if (onPreempt && mainSeen && !preemptSeen && !receiver?.hasFreeSlot) {
        // After the main channel and every multifd channel, the preempt channel (QEMU's
        // rule): it sends no magic, and may say nothing until the switch (QEMU 7.2 opens it
        // at setup), so its first bytes are not waited for here.
        preemptSeen = true;
        onPreempt(sock, Buffer.alloc(0));
        return;
      }
      let first: Buffer;
      try {
        first = await readFirstBytes(sock, 4, timeoutMs);
      } catch (e) {
        turnAway(sock, `a connection without its first bytes (${(e as Error).message})`);
        return;
      }
      const magic = first.readUInt32BE(0);
      if (magic === QEMU_VM_FILE_MAGIC && !mainSeen) {
        mainSeen = true;
        clearTimeout(mainTimer);
        log.debug({ channel: 'main', from: sock.remoteAddress ?? 'unix' }, 'main channel connected');
        resolveMain({ sock, first, tls: false });
      } else if (magic === MULTIFD_MAGIC) {
        if (!receiver) {
          sock.destroy();
          onFatal(new StreamError('VMIG_ERR_MULTIFD_CHANNELS', 'a multifd channel connected, but this side was started without --multifd-channels', { channel: 'multifd' }));
          return;
        }
        if (first.length < MULTIFD_INIT_SIZE) {
          try {
            first = Buffer.concat([first, await readFirstBytes(sock, MULTIFD_INIT_SIZE - first.length, timeoutMs)]);
          } catch (e) {
            turnAway(sock, `a multifd channel whose MultiFDInit_t was cut short (${(e as Error).message})`);
            return;
          }
        }
        log.debug({ channel: 'multifd', id: first[24] }, 'multifd channel connected, handed to its recv thread');
        receiver.addChannel(sock, first);
        if (!mainSeen && !mainTimer) {
          mainTimer = setTimeout(
            () => onFatal(new VmigError('VMIG_ERR_TIMEOUT', `a multifd channel connected, but the main channel did not within ${timeoutMs} ms (--channel-timeout)`, { channel: 'main' })),
            timeoutMs,
          );
          mainTimer.unref();
        }
      } else if (first[0] === 0x16 && first[1] === 0x03) {
        // A TLS ClientHello: the source uses TLS and this side does not.
        sock.destroy();
        onFatal(new VmigError('VMIG_ERR_TLS', 'a TLS client connected, but this side was started without --tls-creds', { channel: 'main' }));
      } else if (onPreempt && mainSeen && !preemptSeen) {
        // The postcopy preempt channel: no magic, it starts with a RAM record.
        preemptSeen = true;
        onPreempt(sock, first);
      } else {
        turnAway(sock, `a connection that began 0x${magic.toString(16).padStart(8, '0')}, neither a migration stream (QEVM) nor a multifd channel`);
      }
    };
    /** Connections not told apart yet (their first bytes or handshake awaited). */
    const identifying = new Set<net.Socket>();
    void (async () => {
      for (;;) {
        let sock: net.Socket;
        try {
          sock = await listener.accept();
        } catch {
          // The listener closed (the migration ended, failed or was cancelled): a connection
          // still being told apart has no one to go to.
          clearTimeout(mainTimer);
          for (const s of identifying) s.destroy();
          return;
        }
        identifying.add(sock);
        handle(sock)
          .catch(() => sock.destroy())
          .finally(() => identifying.delete(sock));
      }
    })();
  });
}

/**
 * Postcopy recovery's listener (migrate-recover): the source's `migrate resume=true` opens
 * the main channel first, which starts with commands (no QEVM header: the stream goes on),
 * then, with preempt, the preempt channel, which may stay silent (QEMU 7.2 opens it at once
 * and writes nothing until a page is requested). So connections are told apart by order, as
 * QEMU's destination does (the first is the main channel): the first goes to the load (after
 * its TLS handshake), the next to `onPreempt`, anything later is turned away. A stranger who
 * connects first gets the main channel, and its first error pauses postcopy again (loadvm.ts).
 * Resolves with the main channel; rejects only when the listener closes first.
 */
export function acceptRecovery(
  listener: Listener,
  onPreempt: ((sock: net.Socket, first: Buffer) => void) | undefined,
  onFatal: (e: VmigError) => void,
  timeoutMs: number,
  log: Logger,
  tls: TlsOptions | undefined,
): Promise<MainChannel> {
  return new Promise((resolveMain, rejectMain) => {
    let accepted = 0;
    const handle = async (sock: net.Socket, n: number): Promise<void> => {
      sock.on('error', () => {});
      if (n === 0) {
        let s: net.Socket = sock;
        if (tls) {
          try {
            s = await tlsAccept(sock, tls, timeoutMs, 'main');
          } catch (e) {
            // A stranger, or a source with other certificates: the next connection may be the main channel.
            sock.destroy();
            log.warn({ error: toVmigError(e, 'VMIG_ERR_TLS').toJSON() }, 'recovery connection refused (TLS)');
            accepted = 0;
            return;
          }
        }
        log.debug({ channel: 'main', tls: !!tls }, 'recovery: main channel connected');
        resolveMain({ sock: s, first: Buffer.alloc(0), tls: !!tls });
        return;
      }
      if (n > 1 || !onPreempt) {
        log.warn({ reason: 'a connection after every channel of the recovery' }, 'connection turned away');
        sock.destroy();
        return;
      }
      if (!tls) return onPreempt(sock, Buffer.alloc(0));
      try {
        const t = await tlsAccept(sock, tls, timeoutMs, 'preempt');
        onPreempt((await bridgeTls(t, 'in')).sock, Buffer.alloc(0));
      } catch (e) {
        sock.destroy();
        onFatal(toVmigError(e, 'VMIG_ERR_TLS', { channel: 'preempt' }));
      }
    };
    void (async () => {
      for (;;) {
        let sock: net.Socket;
        try {
          sock = await listener.accept();
        } catch (e) {
          rejectMain(e);
          return;
        }
        handle(sock, accepted++).catch(() => sock.destroy());
      }
    })();
  });
}
