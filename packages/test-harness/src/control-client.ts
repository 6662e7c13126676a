/** A line-oriented JSON client for the control socket (tests only). */
import { readFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import tls from 'node:tls';

type Json = Record<string, any>;

export class ControlClient {
  private readonly lines: Json[] = [];
  private waiters: { pred: (l: Json) => boolean; resolve: (l: Json) => void }[] = [];
  private nextId = 1;
  private constructor(private readonly sock: net.Socket) {
    let partial = '';
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      partial += d;
      let nl: number;
      while ((nl = partial.indexOf('\n')) >= 0) {
        const line = JSON.parse(partial.slice(0, nl)) as Json;
        partial = partial.slice(nl + 1);
        this.lines.push(line);
        this.waiters = this.waiters.filter((w) => (w.pred(line) ? (w.resolve(line), false) : true));
      }
    });
  }

  static async connect(path: string): Promise<ControlClient> {
    const sock = net.connect(path);
    await new Promise<void>((r, j) => sock.once('connect', r).once('error', j));
    return new ControlClient(sock);
  }

  /** Over TLS to `tcp:127.0.0.1:PORT`, with the client certificate of `creds` (a tls-creds-x509 directory) or none. */
  static async connectTls(port: number, creds: string, withCert = true): Promise<ControlClient> {
    const read = (f: string): string => readFileSync(join(creds, f), 'utf8');
    const sock = tls.connect({ host: '127.0.0.1', port, ca: read('ca-cert.pem'), ...(withCert ? { cert: read('client-cert.pem'), key: read('client-key.pem') } : {}) });
    await new Promise<void>((r, j) => sock.once('secureConnect', r).once('error', j));
    return new ControlClient(sock);
  }

  /** Resolves when the server ends the connection. */
  closed(): Promise<void> {
    return new Promise((r) => (this.sock.closed ? r() : this.sock.once('close', () => r())));
  }

  waitFor(pred: (l: Json) => boolean, ms = 60_000): Promise<Json> {
    const seen = this.lines.find(pred);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`control: timed out; got ${JSON.stringify(this.lines.slice(-5))}`)), ms);
      this.waiters.push({ pred, resolve: (l) => (clearTimeout(t), resolve(l)) });
    });
  }

  raw(text: string): void {
    this.sock.write(text + '\n');
  }

  async execute(name: string, args?: Json): Promise<Json> {
    const id = this.nextId++;
    this.raw(JSON.stringify({ execute: name, ...(args ? { arguments: args } : {}), id }));
    return this.waitFor((l) => l['id'] === id);
  }

  events(name: string): Json[] {
    return this.lines.filter((l) => l['event'] === name);
  }

  close(): void {
    this.sock.destroy();
  }
}

