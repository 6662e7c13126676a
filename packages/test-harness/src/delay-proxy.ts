/**
 * DelayProxy: one-way delay and loss on a TCP path where the kernel has no `netem` (this
 * project's machine: `tbf` shapes the rate, nothing adds latency). Every connection to it is
 * forwarded to one target; each chunk read in either direction is written `delayMs` later,
 * in order. Loss is modelled by the head-of-line block it causes in a TCP stream: each full
 * segment (1448 bytes) is lost with probability `loss`, and a lost one arrives one round
 * trip (2 x delay) late, with everything that arrives behind it meanwhile (the receiver
 * delivers in order); data after that is not delayed further. What it does not model: the
 * congestion window's halving after a loss (a real TCP stream over such a path is much
 * slower). The proxy holds at most `maxHeldBytes` per direction (then it stops reading, so
 * the sender's queues fill as behind a real window of that size).
 *
 *   const p = await DelayProxy.start({ listen: { host, port: 0 }, target: { host, port }, delayMs: 10, loss: 0.001 });
 *   p.port; await p.close();
 */
import net from 'node:net';

export interface DelayProxyOptions {
  listen: { host: string; port: number };
  target: { host: string; port: number };
  /** One-way delay (ms), each direction. */
  delayMs: number;
  /** Probability that a 1448-byte segment is lost (0..1). */
  loss?: number;
  /** Most bytes held per direction before reading stops; default 64 MiB. */
  maxHeldBytes?: number;
  /** Random numbers (tests); Math.random by default. */
  random?: () => number;
}

const SEGMENT = 1448;

/** One direction: chunks waiting for their time. */
class Pipe {
  private readonly queue: { at: number; chunk: Buffer }[] = [];
  private held = 0;
  /** When the last chunk is released (releases never go back in time: the stream stays in order). */
  private last = 0;
  /** Until when a lost segment blocks the stream (head of line). */
  private blockedUntil = 0;
  private timer: NodeJS.Timeout | undefined;
  private ended = false;

  constructor(
    private readonly from: net.Socket,
    private readonly to: net.Socket,
    private readonly o: DelayProxyOptions,
  ) {
    from.on('data', (chunk: Buffer) => this.take(chunk));
    from.on('end', () => {
      this.ended = true;
      this.pump();
    });
  }

  private take(chunk: Buffer): void {
    const now = performance.now();
    const p = this.o.loss ?? 0;
    if (p > 0) {
      const segments = Math.ceil(chunk.length / SEGMENT);
      const random = this.o.random ?? Math.random;
      // One of the chunk's segments lost: it comes a round trip later, and so does what follows it until then.
      if (random() < 1 - (1 - p) ** segments) this.blockedUntil = Math.max(this.blockedUntil, now + 3 * this.o.delayMs);
    }
    const at = Math.max(now + this.o.delayMs, this.blockedUntil, this.last);
    this.last = at;
    this.queue.push({ at, chunk });
    this.held += chunk.length;
    if (this.held > (this.o.maxHeldBytes ?? 64 << 20)) this.from.pause();
    this.pump();
  }

  private pump(): void {
    if (this.timer) return;
    const now = performance.now();
    while (this.queue.length > 0 && this.queue[0]!.at <= now) {
      const { chunk } = this.queue.shift()!;
      this.held -= chunk.length;
      this.to.write(chunk);
    }
    if (this.held <= (this.o.maxHeldBytes ?? 64 << 20) / 2) this.from.resume();
    if (this.queue.length > 0) {
      this.timer = setTimeout(() => {
        this.timer = undefined;
        this.pump();
      }, Math.max(0, this.queue[0]!.at - now));
    } else if (this.ended) this.to.end();
  }
}

export class DelayProxy {
  private constructor(
    private readonly server: net.Server,
    readonly port: number,
    private readonly sockets: Set<net.Socket>,
  ) {}

  static async start(o: DelayProxyOptions): Promise<DelayProxy> {
    const sockets = new Set<net.Socket>();
    const server = net.createServer((client) => {
      const target = net.connect({ host: o.target.host, port: o.target.port });
      for (const s of [client, target]) {
        sockets.add(s);
        s.setNoDelay(true);
        s.on('error', () => {
          client.destroy();
          target.destroy();
        });
        s.on('close', () => sockets.delete(s));
      }
      new Pipe(client, target, o);
      new Pipe(target, client, o);
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(o.listen.port, o.listen.host, resolve);
    });
    return new DelayProxy(server, (server.address() as net.AddressInfo).port, sockets);
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise((r) => this.server.close(r));
  }
}
