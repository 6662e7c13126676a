/**
 * The library's edges, found by trying to break it as a user would: every outcome is a
 * result (never a rejection of `result`), a cancel ends any wait, and a process that used the
 * library exits by itself afterwards. Real sockets and threads; the "exits by itself" cases
 * run in a child process that never calls process.exit.
 */
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { GuestRam, loadTlsCredsForTest, migrate, incoming, snapshot } from './api.js';
import { makeTlsCreds } from '@vmig/test-harness';

const dir = mkdtempSync(join(tmpdir(), 'vmig-api-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const vm = { stop: async () => {}, resume: () => {} };
const dist = new URL('../dist/index.js', import.meta.url).href;
const coreDist = new URL('../../core/dist/index.js', import.meta.url).href;

/** Runs `body` (an ES module's text, with migrate/incoming/GuestRam in scope) in a child; its stdout's last line as JSON, and how long it took to exit by itself. */
function child(body: string, timeoutMs = 20_000): { out: any; ms: number; code: number | null; stderr: string } {
  const script = `import { migrate, incoming } from ${JSON.stringify(dist)}; import { GuestRam } from ${JSON.stringify(coreDist)};\n${body}`;
  const t0 = performance.now();
  const r = spawnSync(process.execPath, ['--unhandled-rejections=strict', '--input-type=module', '-e', script], { encoding: 'utf8', timeout: timeoutMs, killSignal: 'SIGKILL' });
  const last = r.stdout.trim().split('\n').pop() ?? '';
  return { out: last ? JSON.parse(last) : undefined, ms: performance.now() - t0, code: r.status, stderr: r.stderr };
}

describe('the library at its edges', () => {
  it('a multifd migration that fails at setup (RAM blocks differ) ends on both sides, and the process exits by itself', () => {
    const r = child(`
      const dst = await incoming({ uri: 'tcp:127.0.0.1:0', multifdChannels: 2, ram: GuestRam.create([{ name: 'a', size: 4 << 20 }]) });
      const src = migrate({ uri: dst.uri, ram: GuestRam.create([{ name: 'b', size: 4 << 20 }]), vm: { stop: async () => {}, resume: () => {} }, multifdChannels: 2 });
      const [s, d] = await Promise.all([src.result, dst.done.then(() => 'completed', (e) => e.code)]);
      console.log(JSON.stringify({ source: s.status, destination: d }));
    `);
    expect(r.code, r.stderr).toBe(0);
    expect(r.out).toEqual({ source: 'failed', destination: 'VMIG_ERR_UNKNOWN_BLOCK' });
    expect(r.ms).toBeLessThan(15_000);
  });

  it('cancel() while the TLS handshake hangs: cancelled at once, not after the channel timeout', async () => {
    // A server that accepts and never answers.
    const silent = net.createServer(() => {});
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
    const port = (silent.address() as net.AddressInfo).port;
    const creds = loadTlsCredsForTest(makeTlsCreds(join(dir, 'tls')));
    const resumed: number[] = [];
    const src = migrate({ uri: `tcp:127.0.0.1:${port}`, ram: GuestRam.create([{ name: 'a', size: 1 << 20 }]), vm: { stop: async () => {}, resume: () => resumed.push(1) }, tls: { creds }, channelTimeoutMs: 30_000 });
    await new Promise((r) => setTimeout(r, 300));
    const t0 = performance.now();
    src.cancel();
    const info = await src.result;
    expect(performance.now() - t0).toBeLessThan(2000);
    expect(info.status).toBe('cancelled');
    expect(info.error?.code).toBe('VMIG_ERR_CANCELLED');
    await expect(src.done).rejects.toMatchObject({ code: 'VMIG_ERR_CANCELLED' });
    silent.close();
  });

  it('incoming().cancel() with a connection that never said anything: the process exits at once', () => {
    const r = child(`
      import('node:net').then(async ({ default: net }) => {
        const dst = await incoming({ uri: 'tcp:127.0.0.1:0', channelTimeoutMs: 30000 });
        const port = Number(dst.uri.split(':').pop());
        const c = net.connect(port, '127.0.0.1');
        c.on('error', () => {});
        await new Promise((r) => setTimeout(r, 200));
        dst.cancel();
        const code = await dst.done.then(() => 'completed', (e) => e.code);
        c.on('close', () => {});
        console.log(JSON.stringify({ code }));
      });
    `);
    expect(r.code, r.stderr).toBe(0);
    expect(r.out).toEqual({ code: 'VMIG_ERR_CANCELLED' });
    expect(r.ms).toBeLessThan(8000);
  });

  it('bad options throw at the call; an outcome is never a rejection of result', async () => {
    const ram = GuestRam.create([{ name: 'a', size: 1 << 20 }]);
    expect(() => migrate({ uri: 'http://x', ram, vm })).toThrow(/unsupported migration URI/);
    expect(() => migrate({ uri: 'tcp:127.0.0.1:1', ram: undefined as never, vm })).toThrow(/ram: expected a GuestRam/);
    expect(() => migrate({ uri: 'tcp:127.0.0.1:1', ram, vm: undefined as never })).toThrow(/vm: expected/);
    expect(() => migrate({ uri: 'tcp:127.0.0.1:1', ram, vm, maxBandwidth: 'abc' as never })).toThrow(/maxBandwidth/);
    expect(() => migrate({ uri: 'tcp:127.0.0.1:1', ram, vm, downtimeLimitMs: -5 })).toThrow(/downtimeLimitMs/);
    // A vm whose resume throws: still a failed result.
    const src = migrate({ uri: 'tcp:127.0.0.1:1', ram, vm: { stop: async () => {}, resume: () => { throw new Error('boom'); } } });
    expect((await src.result).status).toBe('failed');
    // A snapshot file that cannot be created: a failed result, with its code.
    const job = snapshot({ file: join(dir, 'no', 'such', 'dir', 'x.snap'), ram, vm });
    const info = await job.result;
    expect(info.status).toBe('failed');
    expect(info.error?.code).toBe('VMIG_ERR_SNAPSHOT_IO');
    await expect(job.done).rejects.toMatchObject({ code: 'VMIG_ERR_SNAPSHOT_IO' });
  });

  it('a unix socket left by a killed process does not block a new listener; a live one is not taken over', async () => {
    const path = join(dir, 'stale.sock');
    const holder = spawn(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(path)}, () => console.log('up'))`], { stdio: ['ignore', 'pipe', 'ignore'] });
    await new Promise((r) => holder.stdout!.once('data', r));
    // Live: refused.
    await expect(incoming({ uri: `unix:${path}` })).rejects.toMatchObject({ code: 'VMIG_ERR_CONNECT' });
    holder.kill('SIGKILL');
    await new Promise((r) => holder.once('exit', r));
    expect(existsSync(path)).toBe(true);
    // Stale: removed and bound.
    const dst = await incoming({ uri: `unix:${path}` });
    dst.cancel();
    await expect(dst.done).rejects.toMatchObject({ code: 'VMIG_ERR_CANCELLED' });
  });
});
