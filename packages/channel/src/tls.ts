/**
 * TLS on migration channels, QEMU's model (`tls-creds-x509`, `tls-hostname`, `tls-authz`).
 *
 * Credentials are a directory in QEMU's layout: `ca-cert.pem` (the CA both ends trust),
 * `server-cert.pem` + `server-key.pem` (the destination), `client-cert.pem` +
 * `client-key.pem` (the source). The source checks the destination's certificate against
 * the CA and the host name (`--tls-hostname`, else the URI's host). The destination asks
 * for a client certificate and refuses a connection without a valid one whenever the
 * directory has a CA (QEMU's `verify-peer`), and with `--tls-authz` also one whose subject
 * is not on the list.
 *
 * Every handshake is done by the thread that owns the socket (the main thread for the main
 * channel, each multifd thread for its own), bounded by a timeout; every failure is
 * VMIG_ERR_TLS. The credentials are plain strings, so they can be posted to a thread.
 */
import { constants } from 'node:crypto';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import tls from 'node:tls';
import { InvalidArgumentError, VmigError } from '@vmig/core';

export interface TlsCreds {
  /** PEM; absent: the peer is not verified (the destination then asks for no certificate). */
  ca?: string;
  cert?: string;
  key?: string;
}

export interface TlsOptions {
  creds: TlsCreds;
  /** Source: the name the destination's certificate must carry (default: the URI's host). */
  hostname?: string | undefined;
  /** Destination: client certificate subjects allowed (`CN=...,O=...`); any verified one if absent. */
  authz?: readonly string[] | undefined;
}

/** Reads `dir` as QEMU's tls-creds-x509 directory for one end. */
export function loadTlsCreds(dir: string, endpoint: 'client' | 'server'): TlsCreds {
  const read = (name: string, required: boolean): string | undefined => {
    try {
      return readFileSync(join(dir, name), 'utf8');
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (!required && code === 'ENOENT') return undefined;
      throw new InvalidArgumentError(`--tls-creds ${dir}: cannot read ${name} (${code ?? (e as Error).message})`);
    }
  };
  const ca = read('ca-cert.pem', endpoint === 'client');
  const cert = read(`${endpoint}-cert.pem`, endpoint === 'server');
  const key = read(`${endpoint}-key.pem`, cert !== undefined);
  return { ...(ca ? { ca } : {}), ...(cert ? { cert } : {}), ...(key ? { key } : {}) };
}

function tlsError(channel: string, what: string, err?: Error): VmigError {
  return new VmigError('VMIG_ERR_TLS', `TLS ${what}${err ? `: ${(err as NodeJS.ErrnoException).code ?? err.message}` : ''}`, { channel }, { cause: err });
}

/** Source: TLS over a connected socket; resolves once the destination is verified. */
export function tlsConnect(sock: net.Socket, host: string, opts: TlsOptions, timeoutMs: number, channel: string): Promise<tls.TLSSocket> {
  const name = opts.hostname ?? host;
  return new Promise((resolve, reject) => {
    const t = tls.connect({
      socket: sock,
      ca: opts.creds.ca,
      cert: opts.creds.cert,
      key: opts.creds.key,
      minVersion: 'TLSv1.2',
      rejectUnauthorized: true,
      // SNI takes names only; the certificate check takes either.
      ...(net.isIP(name) ? {} : { servername: name }),
      checkServerIdentity: (_, cert) => tls.checkServerIdentity(name, cert),
    });
    settleHandshake(t, 'secureConnect', timeoutMs, channel, `handshake with ${name}`, resolve, reject, () => undefined);
  });
}

/** Destination: TLS over an accepted socket; resolves once the source is verified and allowed. */
export function tlsAccept(sock: net.Socket, opts: TlsOptions, timeoutMs: number, channel: string): Promise<tls.TLSSocket> {
  const verify = opts.creds.ca !== undefined;
  const t = new tls.TLSSocket(sock, {
    isServer: true,
    // TLS 1.2 without resumption tickets: after its handshake the server sends nothing. A
    // TLS 1.3 server sends NewSessionTicket messages, which a source that never reads its channels
    // (QEMU without a return path; any multifd channel) leaves unread, so its close becomes
    // a reset, and a reset makes Node drop decrypted bytes not yet consumed.
    secureContext: tls.createSecureContext({
      ca: opts.creds.ca,
      cert: opts.creds.cert,
      key: opts.creds.key,
      minVersion: 'TLSv1.2',
      maxVersion: 'TLSv1.2',
      secureOptions: constants.SSL_OP_NO_TICKET,
    }),
    requestCert: verify,
    rejectUnauthorized: verify,
  });
  return new Promise((resolve, reject) => {
    settleHandshake(t, 'secure', timeoutMs, channel, 'handshake with the source', resolve, reject, () => {
      if (!opts.authz || opts.authz.length === 0) return undefined;
      const subject = t.getPeerX509Certificate()?.subject;
      if (subject && opts.authz.some((dn) => sameDistinguishedName(dn, subject))) return undefined;
      return tlsError(channel, `client certificate ${subject ? `'${subject.replaceAll('\n', ',')}'` : '(none)'} is not in --tls-authz`);
    });
  });
}

function settleHandshake(
  t: tls.TLSSocket,
  event: 'secure' | 'secureConnect',
  timeoutMs: number,
  channel: string,
  what: string,
  resolve: (t: tls.TLSSocket) => void,
  reject: (e: VmigError) => void,
  check: () => VmigError | undefined,
): void {
  const timer = setTimeout(() => done(tlsError(channel, `${what} did not finish within ${timeoutMs} ms`)), timeoutMs);
  const onError = (e: Error): void => done(tlsError(channel, what, e));
  const onClose = (): void => done(tlsError(channel, `${what}: the peer closed the connection`));
  const done = (e?: VmigError): void => {
    clearTimeout(timer);
    t.off('error', onError);
    t.off('close', onClose);
    t.off(event, onSecure);
    // From here on an error is the owner's to handle ('close' follows it): never an
    // uncaught one because no listener was attached yet (the process would end).
    t.on('error', () => {});
    if (e) {
      t.destroy();
      reject(e);
    } else resolve(t);
  };
  const onSecure = (): void => done(check());
  t.once(event, onSecure);
  t.once('error', onError);
  t.once('close', onClose);
}

/**
 * Whether `allowed` (`CN=a,O=b`, RFC 4514 style, in either order) names `subject` (Node's
 * X509Certificate.subject: one `KEY=value` per line): the same attributes with the same values.
 */
export function sameDistinguishedName(allowed: string, subject: string): boolean {
  const norm = (pairs: string[]): string =>
    pairs
      .map((p) => p.trim())
      .filter(Boolean)
      .map((p) => {
        const eq = p.indexOf('=');
        return `${p.slice(0, eq).trim().toUpperCase()}=${p.slice(eq + 1).trim()}`;
      })
      .sort()
      .join('\n');
  return norm(allowed.split(/(?<!\\),/)) === norm(subject.split('\n'));
}
