/**
 * The control socket (`--control`): QMP as QEMU's specification describes it
 * (docs/interop/qmp-spec in QEMU's source), for the commands vmig has. One JSON object per
 * line each way. On connect the server greets with `{"QMP": {"version": {"qemu": ...,
 * "package"}, "capabilities": []}}`; a client must send `qmp_capabilities` first (anything
 * else is `CommandNotFound`, in QEMU's words) and then sends `{"execute": NAME, "arguments":
 * {...}, "id": ANY}`, answered with `{"return": ..., "id"}` or `{"error": {"class", "desc"},
 * "id"}`. Events go to every client that negotiated: `{"event", "data", "timestamp":
 * {"seconds", "microseconds"}}`. `query-version` and `query-commands` are the server's own.
 */
import { chmod, unlink } from 'node:fs/promises';
import net from 'node:net';
import tls from 'node:tls';
import { formatMigrationUri, parseMigrationUri, sameDistinguishedName, type TlsOptions } from '@vmig/channel';
import { readFileSync } from 'node:fs';
import { InvalidArgumentError, type RuntimeParams, VmigError, type Logger } from '@vmig/core';
import { QMP_VERSION } from './qmp-info.js';

/** A command handler: returns the `return` value, or throws (InvalidArgumentError → GenericError). */
export type ControlCommand = (args: Record<string, unknown>) => unknown;

const PACKAGE_VERSION = (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }).version;

/** Names taken besides QEMU's own (QMP's cancel is `migrate_cancel`, with an underscore). */
const ALIASES: Record<string, string> = { 'migrate-cancel': 'migrate_cancel' };

/** How long clients may take to read the last events and hang up, at close (ms). */
const CLOSE_GRACE_MS = 500;
/** Longest request line accepted; a client sending more is disconnected. */
export const MAX_LINE = 64 * 1024;

export class ControlServer {
  private readonly clients = new Set<net.Socket>();
  /** Clients past qmp_capabilities: they may run commands and get events. */
  private readonly negotiated = new WeakSet<net.Socket>();
  /** What every QMP server answers, whatever the commands it was given. */
  private readonly builtins: Record<string, ControlCommand> = {
    'query-version': () => ({ ...QMP_VERSION, package: `vmig ${PACKAGE_VERSION}` }),
    'query-commands': () => ['qmp_capabilities', ...Object.keys(this.builtins), ...Object.keys(this.commands)].map((name) => ({ name })),
  };

  private constructor(
    private readonly server: net.Server,
    private readonly commands: Record<string, ControlCommand>,
    private readonly log: Logger,
    readonly address: string,
  ) {
    // A TLS server's connections count once their handshake (and authz) passed.
    server.on(server instanceof tls.Server ? 'secureConnection' : 'connection', (s: net.Socket) => this.accept(s));
  }

  /**
   * Listens on `unix:PATH`, created mode 0600 (only this user may cancel or steer the
   * migration), or on `tcp:HOST:PORT` with TLS only, and only for clients whose certificate
   * the CA of `tls` signed (and on `tls.authz`, if given): a TCP socket without that would
   * take commands from anyone who reaches it.
   */
  static async listen(uriText: string, commands: Record<string, ControlCommand>, log: Logger, tls?: TlsOptions): Promise<ControlServer> {
    const uri = parseMigrationUri(uriText);
    if (uri.transport === 'tcp' && !tls?.creds.ca) {
      throw new InvalidArgumentError(
        `--control ${uriText}: a TCP control socket needs TLS with client certificates (--tls-creds DIR with ca-cert.pem, server-cert.pem and server-key.pem); or use unix:PATH`,
      );
    }
    const server = uri.transport === 'tcp' && tls ? controlTlsServer(tls) : net.createServer();
    await new Promise<void>((resolve, reject) => {
      server.once('error', (e: NodeJS.ErrnoException) =>
        reject(new VmigError('VMIG_ERR_CONTROL', `control socket ${formatMigrationUri(uri)}: ${e.code === 'EADDRINUSE' ? 'address in use' : e.message}`)),
      );
      if (uri.transport === 'tcp') {
        server.listen(uri.port, uri.host, resolve);
        return;
      }
      // The socket file is created inside listen(): with this umask it is never open to others.
      const umask = process.umask(0o177);
      try {
        server.listen(uri.path, resolve);
      } finally {
        process.umask(umask);
      }
    });
    let address: string;
    if (uri.transport === 'unix') {
      await chmod(uri.path, 0o600);
      address = formatMigrationUri(uri);
    } else {
      const a = server.address();
      address = `tcp:${uri.host}:${typeof a === 'object' && a ? a.port : uri.port}`;
    }
    return new ControlServer(server, commands, log, address);
  }

  /** Sends an event to every connected client. */
  event(name: string, data: Record<string, unknown>): void {
    const now = Date.now();
    const line = JSON.stringify({ event: name, data, timestamp: { seconds: Math.floor(now / 1000), microseconds: (now % 1000) * 1000 } }) + '\n';
    for (const c of this.clients) if (!c.destroyed && this.negotiated.has(c)) c.write(line);
  }

  async close(): Promise<void> {
    // Let clients read what was sent (the last events), then close: a client that stays
    // connected gets a moment, not a say in when this process ends.
    this.server.close();
    for (const c of this.clients) c.end();
    const deadline = performance.now() + CLOSE_GRACE_MS;
    while (this.clients.size > 0 && performance.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    for (const c of this.clients) c.destroy();
    const a = this.address;
    if (a.startsWith('unix:')) await unlink(a.slice(5)).catch(() => {});
  }

  private accept(sock: net.Socket): void {
    if (sock.destroyed) return; // refused by --tls-authz
    this.clients.add(sock);
    sock.on('close', () => this.clients.delete(sock));
    sock.on('error', () => {});
    sock.write(JSON.stringify({ QMP: { version: { ...QMP_VERSION, package: `vmig ${PACKAGE_VERSION}` }, capabilities: [] } }) + '\n');
    let pending = '';
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => {
      pending += chunk;
      let nl: number;
      while ((nl = pending.indexOf('\n')) >= 0) {
        const line = pending.slice(0, nl).trim();
        pending = pending.slice(nl + 1);
        if (line.length > MAX_LINE) {
          this.reply(sock, { error: { class: 'GenericError', desc: `request longer than ${MAX_LINE} bytes` } });
          sock.end();
          pending = '';
          return;
        }
        if (line) this.handle(sock, line);
      }
      if (pending.length > MAX_LINE) {
        this.reply(sock, { error: { class: 'GenericError', desc: `request longer than ${MAX_LINE} bytes` } });
        sock.end();
        pending = '';
      }
    });
  }

  private reply(sock: net.Socket, obj: Record<string, unknown>): void {
    if (sock.destroyed) return;
    let line: string;
    try {
      line = JSON.stringify(obj);
    } catch {
      // An id nested too deep to encode again (JSON.stringify runs out of stack): answer
      // without it rather than let a client's request end the process.
      line = JSON.stringify({ error: { class: 'GenericError', desc: "the reply could not be encoded (is 'id' nested too deep?)" } });
    }
    sock.write(line + '\n');
  }

  private handle(sock: net.Socket, line: string): void {
    let req: unknown;
    try {
      req = JSON.parse(line);
    } catch {
      this.reply(sock, { error: { class: 'GenericError', desc: 'request is not valid JSON' } });
      return;
    }
    const r = req as { execute?: unknown; arguments?: unknown; id?: unknown };
    const id = r && typeof r === 'object' && 'id' in r ? { id: r.id } : {};
    if (!r || typeof r !== 'object' || typeof r.execute !== 'string') {
      this.reply(sock, { error: { class: 'GenericError', desc: "expected an object with 'execute'" }, ...id });
      return;
    }
    // Capabilities negotiation first, as QEMU's monitor requires (and says).
    if (r.execute === 'qmp_capabilities') {
      if (this.negotiated.has(sock)) this.reply(sock, { error: { class: 'CommandNotFound', desc: 'Capabilities negotiation is already complete, command ignored' }, ...id });
      else {
        this.negotiated.add(sock);
        this.reply(sock, { return: {}, ...id });
      }
      return;
    }
    if (!this.negotiated.has(sock)) {
      this.reply(sock, { error: { class: 'CommandNotFound', desc: "Expecting capabilities negotiation with 'qmp_capabilities'" }, ...id });
      return;
    }
    const name = Object.hasOwn(ALIASES, r.execute) ? ALIASES[r.execute]! : r.execute;
    const cmd = Object.hasOwn(this.builtins, name) ? this.builtins[name] : Object.hasOwn(this.commands, name) ? this.commands[name] : undefined;
    if (!cmd) {
      this.reply(sock, { error: { class: 'CommandNotFound', desc: `the command ${r.execute} has not been found` }, ...id });
      return;
    }
    const args = r.arguments ?? {};
    if (typeof args !== 'object' || args === null || Array.isArray(args)) {
      this.reply(sock, { error: { class: 'GenericError', desc: "'arguments' must be an object" }, ...id });
      return;
    }
    const failed = (e: unknown): void => {
      const desc = e instanceof Error ? e.message : String(e);
      if (!(e instanceof InvalidArgumentError)) this.log.warn({ error: desc, command: r.execute }, 'control command failed');
      this.reply(sock, { error: { class: 'GenericError', desc }, ...id });
    };
    try {
      const ret = cmd(args as Record<string, unknown>);
      // A command that takes time (migrate-recover binds a listener) answers once done.
      if (ret instanceof Promise) ret.then((v: unknown) => this.reply(sock, { return: v ?? {}, ...id }), failed);
      else this.reply(sock, { return: ret ?? {}, ...id });
    } catch (e) {
      failed(e);
    }
  }
}

/** The TCP control socket's TLS: this side's server certificate, client certificates required. */
function controlTlsServer(opts: TlsOptions): tls.Server {
  const server = tls.createServer({ ca: opts.creds.ca, cert: opts.creds.cert, key: opts.creds.key, requestCert: true, rejectUnauthorized: true, minVersion: 'TLSv1.2' });
  server.on('tlsClientError', () => {});
  if (opts.authz?.length) {
    server.prependListener('secureConnection', (s: tls.TLSSocket) => {
      const subject = s.getPeerX509Certificate()?.subject;
      if (!subject || !opts.authz!.some((dn) => sameDistinguishedName(dn, subject))) s.destroy();
    });
  }
  return server;
}

/** migrate-set-parameters arguments (QMP names), validated. */
export function runtimeParams(args: Record<string, unknown>): RuntimeParams {
  const p: RuntimeParams = {};
  for (const [k, v] of Object.entries(args)) {
    if (k === 'max-bandwidth') {
      if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw new InvalidArgumentError('max-bandwidth must be an integer >= 0 (bytes per second)');
      p.maxBandwidth = v;
    } else if (k === 'downtime-limit') {
      if (typeof v !== 'number' || !Number.isInteger(v) || v < 1 || v > 2_000_000) throw new InvalidArgumentError('downtime-limit must be an integer 1..2000000 (ms)');
      p.downtimeLimitMs = v;
    } else {
      throw new InvalidArgumentError(`parameter '${k}' cannot be set (max-bandwidth, downtime-limit)`);
    }
  }
  return p;
}
