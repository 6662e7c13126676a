/**
 * The control socket (`--control unix:PATH`): a small JSON protocol in the spirit of QMP.
 * One JSON object per line each way. On connect the server sends a greeting
 * `{"QMP":{...}}`; a client sends `{"execute": NAME, "arguments": {...}, "id": ANY}` and
 * gets `{"return": ..., "id"}` or `{"error": {"class", "desc"}, "id"}`. Events go to every
 * client: `{"event": NAME, "data": {...}, "timestamp": {"seconds", "microseconds"}}`.
 */
import { chmod, unlink } from 'node:fs/promises';
import net from 'node:net';
import { formatMigrationUri, parseMigrationUri } from '@vmig/channel';
import { InvalidArgumentError, VmigError, type Logger } from '@vmig/core';

/** A command handler: returns the `return` value, or throws (InvalidArgumentError → GenericError). */
export type ControlCommand = (args: Record<string, unknown>) => unknown;

/** How long clients may take to read the last events and hang up, at close (ms). */
const CLOSE_GRACE_MS = 500;
/** Longest request line accepted; a client sending more is disconnected. */
const MAX_LINE = 64 * 1024;

export class ControlServer {
  private readonly clients = new Set<net.Socket>();

  private constructor(
    private readonly server: net.Server,
    private readonly commands: Record<string, ControlCommand>,
    private readonly log: Logger,
    readonly address: string,
  ) {
    server.on('connection', (s) => this.accept(s));
  }

  /**
   * Listens on a `unix:PATH` address, created mode 0600: only this user may cancel or steer
   * the migration. A TCP control socket would take commands from anyone who can reach it;
   * it needs TLS with client certificates, which vmig does not have yet, so it is refused.
   */
  static async listen(uriText: string, commands: Record<string, ControlCommand>, log: Logger): Promise<ControlServer> {
    const uri = parseMigrationUri(uriText);
    if (uri.transport !== 'unix') {
      throw new InvalidArgumentError(`--control ${uriText}: a TCP control socket would take commands from anyone who reaches it (it needs TLS with client certificates, not supported yet); use unix:PATH`);
    }
    const server = net.createServer();
    await new Promise<void>((resolve, reject) => {
      server.once('error', (e: NodeJS.ErrnoException) =>
        reject(new VmigError('VMIG_ERR_CONTROL', `control socket ${formatMigrationUri(uri)}: ${e.code === 'EADDRINUSE' ? 'address in use' : e.message}`)),
      );
      // The socket file is created inside listen(): with this umask it is never open to others.
      const umask = process.umask(0o177);
      try {
        server.listen(uri.path, resolve);
      } finally {
        process.umask(umask);
      }
    });
    await chmod(uri.path, 0o600);
    return new ControlServer(server, { ...commands, qmp_capabilities: () => ({}) }, log, formatMigrationUri(uri));
  }

  /** Sends an event to every connected client. */
  event(name: string, data: Record<string, unknown>): void {
    const now = Date.now();
    const line = JSON.stringify({ event: name, data, timestamp: { seconds: Math.floor(now / 1000), microseconds: (now % 1000) * 1000 } }) + '\n';
    for (const c of this.clients) if (!c.destroyed) c.write(line);
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
    this.clients.add(sock);
    sock.on('close', () => this.clients.delete(sock));
    sock.on('error', () => {});
    sock.write(JSON.stringify({ QMP: { version: { package: 'vmig' }, capabilities: [] } }) + '\n');
    let pending = '';
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => {
      pending += chunk;
      let nl: number;
      while ((nl = pending.indexOf('\n')) >= 0) {
        const line = pending.slice(0, nl).trim();
        pending = pending.slice(nl + 1);
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
    if (!sock.destroyed) sock.write(JSON.stringify(obj) + '\n');
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
    const cmd = Object.hasOwn(this.commands, r.execute) ? this.commands[r.execute] : undefined;
    if (!cmd) {
      this.reply(sock, { error: { class: 'CommandNotFound', desc: `the command ${r.execute} has not been found` }, ...id });
      return;
    }
    const args = r.arguments ?? {};
    if (typeof args !== 'object' || args === null || Array.isArray(args)) {
      this.reply(sock, { error: { class: 'GenericError', desc: "'arguments' must be an object" }, ...id });
      return;
    }
    try {
      this.reply(sock, { return: cmd(args as Record<string, unknown>) ?? {}, ...id });
    } catch (e) {
      const desc = e instanceof Error ? e.message : String(e);
      if (!(e instanceof InvalidArgumentError)) this.log.warn({ error: desc, command: r.execute }, 'control command failed');
      this.reply(sock, { error: { class: 'GenericError', desc }, ...id });
    }
  }
}
