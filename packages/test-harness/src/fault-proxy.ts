/**
 * FaultProxy: an in-process TCP proxy that plays a bad network between a migration source
 * and its destination, for end-to-end tests.
 *
 * It listens on 127.0.0.1 (port 0) and forwards every accepted connection to one target.
 * Connections are numbered 0, 1, 2, ... in accept order (a vmig source opens the main
 * channel first, then its multifd channels, all to the same address). Bytes are counted per
 * connection and direction: 'up' is client -> target, 'down' is target -> client. With no
 * rule, bytes, FIN and RST pass through as they come (half-close included).
 *
 *   const proxy = await FaultProxy.start({ target: { host: '127.0.0.1', port } });
 *   proxy.uri                                   // 'tcp:127.0.0.1:PORT': give it to the source
 *   proxy.addRule({ connection: 'all', direction: 'up', afterBytes: 4 << 20, action: 'freeze' });
 *   proxy.addRule({ connection: 1, direction: 'up', afterBytes: 100, action: 'corrupt', bit: 7 });
 *   proxy.freeze();  proxy.freeze(2, 'down');  proxy.thaw();   // on demand
 *   proxy.cut(0, 'reset');                      // on demand: 'close' (FIN) or 'reset' (RST)
 *   proxy.connections[0]?.bytes.up              // forwarded byte counters, state
 *   await proxy.waitFor(() => proxy.connections.length >= 3);
 *   await proxy.close();                        // destroys everything, never hangs
 *
 * Rules (`addRule`): `connection` is a connection number or 'all' (the open ones and every
 * one accepted later); a number not accepted yet applies when it is. `afterBytes` is an
 * absolute position in the direction's byte stream; omitted, it is the position reached now
 * (on demand: "from the next byte").
 *
 * - 'close': exactly `afterBytes` bytes go through in that direction, then both sockets get
 *   a FIN (after what was already forwarded is written) and are closed.
 * - 'reset': exactly `afterBytes` bytes are handed to the kernel in that direction, then
 *   both sockets are reset (RST, `socket.resetAndDestroy()`). Bytes still in a kernel send
 *   buffer are lost with a RST, so over a busy link the peer may see fewer. A Node peer
 *   that reads its last bytes and the RST in one go sees an EOF, not ECONNRESET (libuv
 *   reports POLLHUP after a partial read as EOF).
 * - 'freeze': exactly `afterBytes` bytes go through, then the link goes silent: the proxy
 *   stops reading and writing but keeps both sockets open (TCP flow control then stops the
 *   senders, as on a frozen network). `scope: 'connection'` (the default) freezes both
 *   directions; `scope: 'direction'` only the rule's. Nothing is dropped: `thaw()` forwards
 *   what was held (and a FIN or RST that came meanwhile) and resumes.
 * - 'corrupt': the byte at position `afterBytes` (0-based) of that direction has bit `bit`
 *   (0..7, default 0) flipped; everything else passes.
 *
 * A rule whose position a connection has already passed applies at once there (close,
 * reset, freeze) or not at all (corrupt). Every applied fault is in `faults` and emitted as
 * a 'fault' event; each accepted connection is emitted as 'connection'. Every socket has an
 * 'error' listener; errors are recorded on the connection (`errors`), never thrown.
 */
import { EventEmitter } from 'node:events';
import net from 'node:net';

export type FaultDirection = 'up' | 'down';
export type FaultAction = 'close' | 'reset' | 'freeze' | 'corrupt';
export type CutMode = 'close' | 'reset';

export interface FaultRule {
  /** A connection number (accept order, from 0), or 'all' (open and future ones). */
  connection: number | 'all';
  /** Where `afterBytes` is counted: 'up' client -> target, 'down' target -> client. */
  direction: FaultDirection;
  /** Absolute byte position in that direction; default: the position reached now. */
  afterBytes?: number;
  action: FaultAction;
  /** 'corrupt': which bit (0..7) of the byte to flip; default 0. */
  bit?: number;
  /** 'freeze': both directions ('connection', default) or only the rule's ('direction'). */
  scope?: 'connection' | 'direction';
}

export type ConnectionState = 'open' | 'frozen' | 'closed' | 'reset';

export interface ConnectionInfo {
  readonly id: number;
  /** Bytes forwarded (handed to the other socket) per direction. */
  readonly bytes: { readonly up: number; readonly down: number };
  /** Per direction: whether it is frozen. */
  readonly frozen: { readonly up: boolean; readonly down: boolean };
  /** 'frozen' when either direction is; 'closed'/'reset' after a cut, or when both peers are gone. */
  readonly state: ConnectionState;
  /** Errors seen on either socket ('client: ECONNRESET', 'target: ...'). */
  readonly errors: readonly string[];
}

export interface AppliedFault {
  connection: number;
  direction: FaultDirection;
  action: FaultAction | 'thaw';
  /** Byte position in `direction` where it applied. */
  at: number;
}

export interface FaultProxyOptions {
  target: { host?: string; port: number };
}

interface Trigger {
  at: number;
  action: FaultAction;
  bit: number;
  scope: 'connection' | 'direction';
}

const DIRS: readonly FaultDirection[] = ['up', 'down'];

class Conn implements ConnectionInfo {
  readonly bytes = { up: 0, down: 0 };
  readonly frozen = { up: false, down: false };
  readonly errors: string[] = [];
  readonly triggers: Record<FaultDirection, Trigger[]> = { up: [], down: [] };
  /** Bytes read while frozen (the rest of a chunk), forwarded by thaw(). */
  readonly held: Record<FaultDirection, Buffer[]> = { up: [], down: [] };
  /** A FIN (or RST) that came from the reading side of a direction while it was frozen. */
  readonly pendingEnd: Record<FaultDirection, 'end' | 'reset' | undefined> = { up: undefined, down: undefined };
  cut: CutMode | undefined;
  gone = false;

  constructor(
    readonly id: number,
    readonly client: net.Socket,
    readonly target: net.Socket,
  ) {}

  get state(): ConnectionState {
    if (this.cut === 'reset') return 'reset';
    if (this.cut === 'close' || this.gone) return 'closed';
    return this.frozen.up || this.frozen.down ? 'frozen' : 'open';
  }

  /** The socket a direction reads from, and the one it writes to. */
  from(d: FaultDirection): net.Socket {
    return d === 'up' ? this.client : this.target;
  }
  to(d: FaultDirection): net.Socket {
    return d === 'up' ? this.target : this.client;
  }
}

export class FaultProxy extends EventEmitter<{ connection: [ConnectionInfo]; fault: [AppliedFault] }> {
  private readonly conns: Conn[] = [];
  private readonly rules: FaultRule[] = [];
  readonly faults: AppliedFault[] = [];
  private closed = false;

  private constructor(
    private readonly server: net.Server,
    private readonly opts: FaultProxyOptions,
    readonly port: number,
  ) {
    super();
  }

  static async start(opts: FaultProxyOptions): Promise<FaultProxy> {
    const server = net.createServer({ allowHalfOpen: true });
    server.on('error', () => {});
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => {
        server.off('error', reject);
        resolve();
      });
    });
    const proxy = new FaultProxy(server, opts, (server.address() as net.AddressInfo).port);
    server.on('connection', (client) => proxy.accept(client));
    return proxy;
  }

  /** 'tcp:127.0.0.1:PORT', a vmig URI. */
  get uri(): string {
    return `tcp:127.0.0.1:${this.port}`;
  }

  /** Every connection accepted so far, in accept order (index = connection number). */
  get connections(): readonly ConnectionInfo[] {
    return this.conns;
  }

  addRule(rule: FaultRule): void {
    if (rule.action === 'corrupt' && rule.bit !== undefined && !(Number.isInteger(rule.bit) && rule.bit >= 0 && rule.bit <= 7)) throw new RangeError(`bit must be 0..7, got ${rule.bit}`);
    if (rule.afterBytes !== undefined && !(Number.isInteger(rule.afterBytes) && rule.afterBytes >= 0)) throw new RangeError(`afterBytes must be an integer >= 0, got ${rule.afterBytes}`);
    this.rules.push(rule);
    for (const c of this.conns) if (rule.connection === 'all' || rule.connection === c.id) this.arm(c, rule);
  }

  /** Freezes a connection (default: all open ones), both directions or one. */
  freeze(connection: number | 'all' = 'all', direction?: FaultDirection): void {
    for (const d of direction ? [direction] : DIRS) this.addRule({ connection, direction: d, action: 'freeze', scope: 'direction' });
  }

  /** Undoes a freeze (default: all connections, both directions): forwards what was held. */
  thaw(connection: number | 'all' = 'all', direction?: FaultDirection): void {
    for (const c of this.pick(connection)) for (const d of direction ? [direction] : DIRS) this.unfreeze(c, d);
  }

  /** Cuts a connection (default: all open ones) now: FIN ('close', default) or RST ('reset'). */
  cut(connection: number | 'all' = 'all', mode: CutMode = 'close'): void {
    for (const c of this.pick(connection)) this.doCut(c, mode, 'up');
  }

  /** Resolves when `pred` holds (checked on every connection, fault and every 10 ms). */
  waitFor(pred: () => boolean, timeoutMs = 30_000): Promise<void> {
    if (pred()) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const check = (): void => {
        if (!pred()) return;
        done();
        resolve();
      };
      const timer = setInterval(check, 10);
      const limit = setTimeout(() => {
        done();
        reject(new Error(`FaultProxy.waitFor: timed out after ${timeoutMs} ms; connections ${JSON.stringify(this.summary())}`));
      }, timeoutMs);
      const done = (): void => {
        clearInterval(timer);
        clearTimeout(limit);
        this.off('connection', check);
        this.off('fault', check);
      };
      this.on('connection', check);
      this.on('fault', check);
    });
  }

  /** A plain snapshot of the connections, for assertion messages. */
  summary(): { id: number; up: number; down: number; state: ConnectionState }[] {
    return this.conns.map((c) => ({ id: c.id, up: c.bytes.up, down: c.bytes.down, state: c.state }));
  }

  /** Stops listening and destroys every socket. Never waits on a peer. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const serverClosed = new Promise<void>((r) => this.server.close(() => r()));
    for (const c of this.conns) {
      c.client.destroy();
      c.target.destroy();
    }
    // The server's callback runs once the accepted sockets are gone; do not wait longer
    // than a moment for it.
    await Promise.race([serverClosed, new Promise<void>((r) => setTimeout(r, 1000).unref())]);
  }

  private pick(connection: number | 'all'): Conn[] {
    return this.conns.filter((c) => connection === 'all' || c.id === connection);
  }

  private accept(client: net.Socket): void {
    client.on('error', () => {});
    if (this.closed) {
      client.destroy();
      return;
    }
    const target = net.connect({ host: this.opts.target.host ?? '127.0.0.1', port: this.opts.target.port, allowHalfOpen: true });
    const c = new Conn(this.conns.length, client, target);
    this.conns.push(c);
    client.on('error', (e: NodeJS.ErrnoException) => c.errors.push(`client: ${e.code ?? e.message}`));
    target.on('error', (e: NodeJS.ErrnoException) => c.errors.push(`target: ${e.code ?? e.message}`));
    for (const d of DIRS) this.wire(c, d);
    const closed = (): void => {
      if (c.client.destroyed && c.target.destroyed) c.gone = true;
    };
    client.on('close', closed);
    target.on('close', closed);
    this.emit('connection', c);
    for (const r of this.rules) if (r.connection === 'all' || r.connection === c.id) this.arm(c, r);
  }

  private wire(c: Conn, d: FaultDirection): void {
    const src = c.from(d);
    const dst = c.to(d);
    src.on('data', (chunk: Buffer) => this.forward(c, d, chunk));
    // Backpressure, as pipe() does it; a frozen direction stays paused.
    dst.on('drain', () => {
      if (!c.frozen[d] && !c.cut) src.resume();
    });
    src.on('end', () => {
      if (c.cut) return;
      if (c.frozen[d]) c.pendingEnd[d] = 'end';
      else dst.end();
    });
    src.on('close', (hadError) => {
      if (c.cut || this.closed) return;
      // A reset (or any error) from one peer resets the other; a clean close was already
      // passed on as a FIN by 'end'.
      const how = hadError || !src.readableEnded ? 'reset' : undefined;
      if (!how) return;
      if (c.frozen[d]) c.pendingEnd[d] = 'reset';
      else dst.resetAndDestroy();
    });
  }

  private arm(c: Conn, r: FaultRule): void {
    if (c.cut) return;
    const at = r.afterBytes ?? c.bytes[r.direction];
    const t: Trigger = { at, action: r.action, bit: r.bit ?? 0, scope: r.scope ?? 'connection' };
    if (t.action === 'corrupt') {
      if (at >= c.bytes[r.direction]) c.triggers[r.direction].push(t);
      return;
    }
    if (at <= c.bytes[r.direction]) this.apply(c, r.direction, t);
    else c.triggers[r.direction].push(t);
  }

  private forward(c: Conn, d: FaultDirection, chunk: Buffer): void {
    let off = 0;
    while (off < chunk.length) {
      if (c.cut) return;
      if (c.frozen[d]) {
        c.held[d].push(chunk.subarray(off));
        return;
      }
      const pos = c.bytes[d];
      const stop = this.nextStop(c, d);
      const end = stop === undefined ? chunk.length : Math.min(chunk.length, off + (stop.at - pos));
      let piece = chunk.subarray(off, end);
      const corrupts = c.triggers[d].filter((t) => t.action === 'corrupt' && t.at >= pos && t.at < pos + piece.length);
      if (corrupts.length > 0) {
        piece = Buffer.from(piece);
        for (const t of corrupts) {
          piece[t.at - pos]! ^= 1 << t.bit;
          this.record({ connection: c.id, direction: d, action: 'corrupt', at: t.at });
        }
        c.triggers[d] = c.triggers[d].filter((t) => !corrupts.includes(t));
      }
      off = end;
      c.bytes[d] += piece.length;
      const dst = c.to(d);
      const last = stop !== undefined && c.bytes[d] === stop.at;
      if (piece.length > 0) {
        if (last && stop.action === 'reset') {
          // Reset only once these bytes are in the kernel, so the peer gets exactly them.
          c.triggers[d] = c.triggers[d].filter((t) => t !== stop);
          c.cut = 'reset';
          dst.write(piece, () => this.reset(c));
          this.record({ connection: c.id, direction: d, action: 'reset', at: stop.at });
          return;
        }
        if (!dst.write(piece)) c.from(d).pause();
      }
      if (last) {
        c.triggers[d] = c.triggers[d].filter((t) => t !== stop);
        this.apply(c, d, stop);
      }
    }
  }

  private nextStop(c: Conn, d: FaultDirection): Trigger | undefined {
    let best: Trigger | undefined;
    for (const t of c.triggers[d]) if (t.action !== 'corrupt' && (!best || t.at < best.at)) best = t;
    return best;
  }

  private apply(c: Conn, d: FaultDirection, t: Trigger): void {
    if (c.cut) return;
    if (t.action === 'freeze') {
      for (const dir of t.scope === 'connection' ? DIRS : [d]) {
        c.frozen[dir] = true;
        c.from(dir).pause();
      }
      this.record({ connection: c.id, direction: d, action: 'freeze', at: c.bytes[d] });
    } else if (t.action === 'close' || t.action === 'reset') {
      this.doCut(c, t.action, d);
    }
  }

  private doCut(c: Conn, mode: CutMode, d: FaultDirection): void {
    if (c.cut) return;
    c.cut = mode;
    this.record({ connection: c.id, direction: d, action: mode, at: c.bytes[d] });
    if (mode === 'reset') {
      this.reset(c);
      return;
    }
    for (const s of [c.client, c.target]) {
      s.pause();
      // FIN after what was forwarded, then close: later bytes from the peer get a RST from
      // the kernel, as from any closed socket.
      s.end(() => s.destroy());
    }
  }

  private reset(c: Conn): void {
    for (const s of [c.client, c.target]) if (!s.destroyed) s.resetAndDestroy();
  }

  private unfreeze(c: Conn, d: FaultDirection): void {
    if (!c.frozen[d] || c.cut) return;
    c.frozen[d] = false;
    this.record({ connection: c.id, direction: d, action: 'thaw', at: c.bytes[d] });
    const held = c.held[d].splice(0);
    for (const b of held) {
      if (c.frozen[d] || c.cut) {
        c.held[d].push(b);
        continue;
      }
      this.forward(c, d, b);
    }
    if (c.frozen[d] || c.cut) return;
    const pending = c.pendingEnd[d];
    c.pendingEnd[d] = undefined;
    if (pending === 'end') c.to(d).end();
    else if (pending === 'reset') c.to(d).resetAndDestroy();
    else if (!c.to(d).writableNeedDrain) c.from(d).resume();
  }

  private record(f: AppliedFault): void {
    this.faults.push(f);
    this.emit('fault', f);
  }
}
