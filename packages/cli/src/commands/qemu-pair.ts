/**
 * `vmig bench --vs-qemu`: the same migration between two QEMU 7.2 processes (`-M none`, one
 * RAM backend, driven over HMP on stdio, as the live QEMU tests drive it), timed by QEMU's
 * own `info migrate` (total time, downtime). Both backends are pre-allocated before the
 * migration starts, as vmig's two sides pre-fault theirs, unless the destination's is asked
 * not to be (QEMU's default, compared with a vmig destination that builds RAM from the stream).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, openSync, writeSync } from 'node:fs';
import net from 'node:net';
import { VmigError } from '@vmig/core';

export const QEMU = 'qemu-system-x86_64';

export interface QemuPairOptions {
  ramBytes: number;
  /** RAM contents: a file of random bytes (made once by makeRandomMemFile), or zero. */
  memFile: string | undefined;
  multifdChannels: number;
  /** prealloc=on for the destination's backend (off: pages are faulted in as they arrive). */
  destinationPrealloc: boolean;
  /** Bounds the whole run: QEMU's start (pre-allocation), the migration, the exit. */
  timeoutMs: number;
}

export interface QemuRun {
  totalTimeMs: number;
  downtimeMs: number;
  setupMs: number;
}

export function haveQemu(): boolean {
  return spawnSync(QEMU, ['--version']).status === 0;
}

/** A file of `bytes` random bytes, the source's RAM. */
export function makeRandomMemFile(path: string, bytes: number): void {
  const fd = openSync(path, 'w');
  const chunk = Buffer.alloc(16 << 20);
  try {
    for (let off = 0; off < bytes; off += chunk.length) writeSync(fd, randomFillSync(chunk), 0, Math.min(chunk.length, bytes - off));
  } finally {
    closeSync(fd);
  }
}

/** One QEMU with its monitor on stdio: commands in, the text it printed since, out. */
class Monitor {
  private out = '';
  private exited = false;
  constructor(readonly child: ChildProcess) {
    child.stdout!.setEncoding('utf8');
    child.stdout!.on('data', (d: string) => (this.out += d));
    child.stderr!.setEncoding('utf8');
    child.stderr!.on('data', (d: string) => (this.out += d));
    child.once('exit', () => (this.exited = true));
  }

  send(cmd: string): void {
    this.child.stdin!.write(`${cmd}\n`);
  }

  /** Waits until the output so far matches `re` (or the process ends, or the deadline passes). */
  async waitFor(re: RegExp, deadline: number, what: string): Promise<RegExpMatchArray> {
    for (;;) {
      const m = this.out.match(re);
      if (m) return m;
      if (this.exited) throw new VmigError('VMIG_ERR_PEER_CLOSED', `QEMU exited while waiting for ${what}: ${this.out.slice(-400)}`);
      if (performance.now() > deadline) throw new VmigError('VMIG_ERR_TIMEOUT', `QEMU: no ${what} in time: ${this.out.slice(-400)}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  take(): string {
    const o = this.out;
    this.out = '';
    return o;
  }

  async stop(): Promise<void> {
    if (this.exited) return;
    const gone = new Promise((r) => this.child.once('exit', r));
    this.child.stdin!.end('quit\n');
    const t = setTimeout(() => this.child.kill('SIGKILL'), 5000);
    await gone;
    clearTimeout(t);
  }
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

function qemu(backend: string, extra: string[]): Monitor {
  return new Monitor(spawn(QEMU, ['-M', 'none,memory-backend=mem', '-object', backend, '-nographic', '-nodefaults', '-S', '-monitor', 'stdio', ...extra], { stdio: ['pipe', 'pipe', 'pipe'] }));
}

export async function runQemuPair(o: QemuPairOptions): Promise<QemuRun> {
  const deadline = performance.now() + o.timeoutMs;
  const size = o.ramBytes;
  const caps = o.multifdChannels > 0 ? ['migrate_set_capability multifd on', `migrate_set_parameter multifd-channels ${o.multifdChannels}`] : [];
  // QEMU 7.2 limits a migration to 128 MiB/s unless told; vmig does not limit by default.
  const params = ['migrate_set_parameter max-bandwidth 100G'];
  const dst = qemu(`memory-backend-ram,id=mem,size=${size},prealloc=${o.destinationPrealloc ? 'on' : 'off'}`, ['-incoming', 'defer']);
  const src = qemu(o.memFile ? `memory-backend-file,id=mem,size=${size},mem-path=${o.memFile},share=off,prealloc=on` : `memory-backend-ram,id=mem,size=${size},prealloc=on`, []);
  try {
    // The prompt comes once the backend is allocated.
    await Promise.all([dst.waitFor(/\(qemu\)/, deadline, 'monitor prompt'), src.waitFor(/\(qemu\)/, deadline, 'monitor prompt')]);
    const port = await freePort();
    for (const c of caps) dst.send(c);
    dst.send(`migrate_incoming tcp:127.0.0.1:${port}`);
    dst.send('info migrate_capabilities');
    await dst.waitFor(/multifd: (on|off)[\s\S]*\(qemu\)/, deadline, 'the destination listening');
    for (const c of [...caps, ...params]) src.send(c);
    src.take();
    src.send(`migrate -d tcp:127.0.0.1:${port}`);
    for (;;) {
      await new Promise((r) => setTimeout(r, 100));
      src.take();
      src.send('info migrate');
      const m = await src.waitFor(/Migration status: (\S+)[\s\S]*?\(qemu\)/, deadline, 'info migrate');
      const text = m[0];
      if (m[1] === 'completed') {
        const num = (re: RegExp): number => Number(re.exec(text)?.[1] ?? NaN);
        return { totalTimeMs: num(/total time: (\d+) ms/), downtimeMs: num(/downtime: (\d+) ms/), setupMs: num(/setup: (\d+) ms/) };
      }
      if (m[1] === 'failed' || m[1] === 'cancelled') throw new VmigError('VMIG_ERR_REMOTE', `QEMU migration ${m[1]}: ${text.slice(-400)}`);
    }
  } finally {
    await Promise.all([src.stop(), dst.stop()]);
  }
}
