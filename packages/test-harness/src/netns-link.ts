/**
 * Two hosts on one machine: two network namespaces joined by a veth pair, the link's rate
 * shaped by `tbf` on both ends, and its delay and loss added by `netem` where the kernel has
 * it, else by a DelayProxy in the destination's namespace (delay-proxy.ts; `delayBy` says
 * which). Needs root (`ip netns`, `tc`). Nothing reaches outside the namespaces it creates:
 * they have no route out, and `destroy()` (also run at process exit and on SIGINT/SIGTERM)
 * deletes them, which deletes the veth pair and its qdiscs.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { VmigError } from '@vmig/core';

export interface LinkProfile {
  name: string;
  /** Rate, Mbit/s. */
  rateMbit: number;
  /** One-way delay (ms). */
  delayMs: number;
  /** Loss (percent of packets). */
  lossPct: number;
}

export const LINK_PROFILES: Record<string, LinkProfile> = {
  /** The rate alone (tbf): what the source can see of the link is all there is to see. */
  '1g': { name: '1g', rateMbit: 1000, delayMs: 0, lossPct: 0 },
  '10g': { name: '10g', rateMbit: 10_000, delayMs: 0.2, lossPct: 0 },
  '1g-wan': { name: '1g-wan', rateMbit: 1000, delayMs: 10, lossPct: 0.1 },
};

const live = new Set<NetnsLink>();
let hooked = false;

function ip(args: string[]): void {
  const r = spawnSync('ip', args, { encoding: 'utf8' });
  if (r.status !== 0) throw new VmigError('VMIG_ERR_INTERNAL', `ip ${args.join(' ')}: ${(r.stderr || r.error?.message || '').trim()}`);
}

function tc(ns: string, args: string[]): { ok: boolean; err: string } {
  const r = spawnSync('tc', ['-n', ns, ...args], { encoding: 'utf8' });
  return { ok: r.status === 0, err: (r.stderr || r.error?.message || '').trim() };
}

export class NetnsLink {
  /** Where the delay and loss come from: the kernel (netem), the proxy, or nowhere (none asked). */
  delayBy: 'netem' | 'proxy' | 'none' = 'none';
  private proxy: ChildProcess | undefined;
  private destroyed = false;

  private constructor(
    readonly profile: LinkProfile,
    readonly srcNs: string,
    readonly dstNs: string,
    readonly srcAddr: string,
    readonly dstAddr: string,
  ) {}

  /** Whether this process may make namespaces (root and `ip netns` there). */
  static available(): boolean {
    return process.getuid?.() === 0 && spawnSync('ip', ['netns', 'list']).status === 0 && spawnSync('tc', ['-V']).status === 0;
  }

  static create(profile: LinkProfile): NetnsLink {
    const id = `${process.pid % 10000}${live.size}`;
    const link = new NetnsLink(profile, `vmig-s${id}`, `vmig-d${id}`, '10.233.0.1', '10.233.0.2');
    live.add(link);
    if (!hooked) {
      hooked = true;
      process.once('exit', () => {
        for (const l of live) l.destroySync();
      });
      for (const sig of ['SIGINT', 'SIGTERM'] as const) {
        process.once(sig, () => {
          for (const l of live) l.destroySync();
          process.exit(130);
        });
      }
    }
    try {
      link.setup();
    } catch (e) {
      link.destroySync();
      throw e;
    }
    return link;
  }

  private setup(): void {
    const { srcNs, dstNs, profile } = this;
    const vs = `${srcNs}v`.slice(0, 15);
    const vd = `${dstNs}v`.slice(0, 15);
    ip(['netns', 'add', srcNs]);
    ip(['netns', 'add', dstNs]);
    ip(['link', 'add', vs, 'type', 'veth', 'peer', 'name', vd]);
    ip(['link', 'set', vs, 'netns', srcNs]);
    ip(['link', 'set', vd, 'netns', dstNs]);
    for (const [ns, dev, addr] of [
      [srcNs, vs, this.srcAddr],
      [dstNs, vd, this.dstAddr],
    ] as const) {
      ip(['-n', ns, 'link', 'set', 'lo', 'up']);
      ip(['-n', ns, 'addr', 'add', `${addr}/24`, 'dev', dev]);
      ip(['-n', ns, 'link', 'set', dev, 'up']);
      const wantDelay = profile.delayMs > 0 || profile.lossPct > 0;
      // netem first (delay, loss and rate in one qdisc) where the kernel has it; else tbf.
      const netem = wantDelay ? tc(ns, ['qdisc', 'add', 'dev', dev, 'root', 'netem', 'delay', `${profile.delayMs}ms`, 'loss', `${profile.lossPct}%`, 'rate', `${profile.rateMbit}mbit`, 'limit', '100000']) : { ok: false, err: '' };
      if (netem.ok) this.delayBy = 'netem';
      else {
        // Burst: at least one 1 ms of the rate (tbf needs a burst above rate / HZ).
        const burst = Math.max(64 * 1024, Math.ceil((profile.rateMbit * 1e6) / 8 / 1000));
        const r = tc(ns, ['qdisc', 'add', 'dev', dev, 'root', 'tbf', 'rate', `${profile.rateMbit}mbit`, 'burst', String(burst), 'latency', '50ms']);
        if (!r.ok) throw new VmigError('VMIG_ERR_INTERNAL', `tc tbf on ${dev}: ${r.err}`);
        if (wantDelay) this.delayBy = 'proxy';
      }
    }
  }

  /** argv to run `cmd` inside a namespace. */
  exec(ns: 'src' | 'dst', cmd: string[]): string[] {
    return ['ip', 'netns', 'exec', ns === 'src' ? this.srcNs : this.dstNs, ...cmd];
  }

  /**
   * Where the source connects to reach `port` of the destination's address: that port, or,
   * when the delay comes from the proxy, the proxy's (started in the destination's namespace).
   * The proxy holds at most what the link carries in three one-way delays (a loss's block
   * included): enough for the full rate; the source cannot see those bytes (on a real path
   * the bytes in flight are in its send queue, unacknowledged, where it measures them).
   */
  async path(port: number): Promise<number> {
    if (this.delayBy !== 'proxy') return port;
    await this.stopProxy();
    const main = fileURLToPath(new URL('./delay-proxy-main.js', import.meta.url));
    const maxHeld = Math.max(64 * 1024, Math.ceil(((this.profile.rateMbit * 1e6) / 8) * ((3 * this.profile.delayMs) / 1000)));
    const [cmd, ...args] = this.exec('dst', [process.execPath, main, this.dstAddr, this.dstAddr, String(port), String(this.profile.delayMs), String(this.profile.lossPct / 100), String(maxHeld)]);
    const child = spawn(cmd!, args, { stdio: ['pipe', 'pipe', 'inherit'] });
    this.proxy = child;
    return new Promise((resolve, reject) => {
      let out = '';
      const timer = setTimeout(() => reject(new VmigError('VMIG_ERR_TIMEOUT', 'the delay proxy did not start within 10 s')), 10_000);
      child.stdout!.setEncoding('utf8');
      child.stdout!.on('data', (d: string) => {
        out += d;
        const nl = out.indexOf('\n');
        if (nl < 0) return;
        clearTimeout(timer);
        resolve((JSON.parse(out.slice(0, nl)) as { port: number }).port);
      });
      child.once('exit', (code) => {
        clearTimeout(timer);
        reject(new VmigError('VMIG_ERR_INTERNAL', `the delay proxy exited (${code})`));
      });
    });
  }

  private async stopProxy(): Promise<void> {
    const p = this.proxy;
    this.proxy = undefined;
    if (!p || p.exitCode !== null) return;
    await new Promise<void>((r) => {
      const t = setTimeout(() => p.kill('SIGKILL'), 2000);
      p.once('exit', () => {
        clearTimeout(t);
        r();
      });
      p.kill('SIGTERM');
    });
  }

  async destroy(): Promise<void> {
    await this.stopProxy();
    this.destroySync();
  }

  private destroySync(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    this.proxy?.kill('SIGKILL');
    // Deleting a namespace deletes its end of the veth pair, and so the pair, and the qdiscs.
    spawnSync('ip', ['netns', 'del', this.srcNs]);
    spawnSync('ip', ['netns', 'del', this.dstNs]);
    live.delete(this);
  }
}
