/**
 * The control socket is QMP: one client, the same calls, against a real QEMU 7.2 (`-qmp`)
 * and against vmig (`--control`), both of them migration sources mid-migration; the answers
 * must have the same shape, vmig's names a subset of QEMU's. And vmig's destination has one.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { spawnCli } from '@vmig/test-harness';
import { CLI_MAIN, haveQemu, QEMU } from './cli.js';
import { ControlClient } from '@vmig/test-harness';

type Json = Record<string, any>;

const tmp = mkdtempSync(join(tmpdir(), 'vmig-qmp-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

async function connectWhenReady(path: string): Promise<ControlClient> {
  for (let i = 0; i < 100; i++) {
    try {
      return await ControlClient.connect(path);
    } catch {
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  throw new Error(`nothing listens on ${path}`);
}

/** The same sequence of QMP calls on a source that is migrating; what came back. */
async function conversation(c: ControlClient): Promise<Json> {
  const greeting = await c.waitFor((l) => 'QMP' in l);
  const early = await c.execute('query-status');
  const negotiate = await c.execute('qmp_capabilities');
  const again = await c.execute('qmp_capabilities');
  const version = await c.execute('query-version');
  const commands = await c.execute('query-commands');
  const status = await c.execute('query-status');
  const caps = await c.execute('query-migrate-capabilities');
  const params = await c.execute('query-migrate-parameters');
  const unknown = await c.execute('no-such-command');
  return { greeting, early, negotiate, again, version, commands, status, caps, params, unknown };
}

describe.runIf(haveQemu())('QMP: vmig answers as QEMU 7.2 does', () => {
  it('greeting, negotiation, version, commands, status, capabilities, parameters and query-migrate: same shapes', async () => {
    const procs: ChildProcess[] = [];
    try {
      // QEMU migrating into a vmig destination (which has a control socket too).
      const dstQ = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--control', `unix:${join(tmp, 'dstq.sock')}`]);
      const { uri: uriQ } = (await dstQ.waitFor((l) => l['event'] === 'listening')) as { uri: string };
      const mem = join(tmp, 'guest.mem');
      writeFileSync(mem, crypto.randomBytes(16 << 20));
      const qmpPath = join(tmp, 'qemu.qmp');
      const qemu = spawn(QEMU, ['-M', 'none,memory-backend=mem', '-object', `memory-backend-file,id=mem,size=16M,mem-path=${mem},share=off`, '-nographic', '-nodefaults', '-S', '-qmp', `unix:${qmpPath},server=on,wait=off`], { stdio: 'ignore' });
      procs.push(qemu);
      const q = await connectWhenReady(qmpPath);
      // vmig migrating into another vmig destination, slowly enough to be asked mid-way.
      const dstV = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json']);
      const { uri: uriV } = (await dstV.waitFor((l) => l['event'] === 'listening')) as { uri: string };
      const srcPath = join(tmp, 'src.sock');
      const src = spawnCli(CLI_MAIN, ['migrate', uriV, '--json', '--ram', '16M', '--max-bandwidth', '4M', '--control', `unix:${srcPath}`]);
      await src.waitFor((l) => l['event'] === 'control');
      const v = await connectWhenReady(srcPath);

      const fromQ = await conversation(q);
      const fromV = await conversation(v);
      // Both migrate: QEMU slowly too, so that both are asked while active.
      expect((await q.execute('migrate-set-parameters', { 'max-bandwidth': 4 << 20 }))['return']).toEqual({});
      expect((await q.execute('migrate', { uri: uriQ }))['return']).toEqual({});
      await src.waitFor((l) => l['event'] === 'status' && l['status'] === 'active');
      await new Promise((r) => setTimeout(r, 300));
      const migQ = (await q.execute('query-migrate'))['return'] as Json;
      const migV = (await v.execute('query-migrate'))['return'] as Json;

      // The greeting: version.qemu {major, minor, micro}, package, capabilities.
      for (const g of [fromQ['greeting'], fromV['greeting']]) {
        expect(Object.keys(g['QMP']).sort()).toEqual(['capabilities', 'version']);
        expect(Object.keys(g['QMP']['version']['qemu']).sort()).toEqual(['major', 'micro', 'minor']);
        expect(typeof g['QMP']['version']['package']).toBe('string');
      }
      // Before qmp_capabilities, and after it twice: QEMU's errors, word for word.
      expect(fromV['early']['error']).toEqual(fromQ['early']['error']);
      expect(fromV['negotiate']['return']).toEqual(fromQ['negotiate']['return']);
      expect(fromV['again']['error']).toEqual(fromQ['again']['error']);
      expect(fromV['unknown']['error']['class']).toBe(fromQ['unknown']['error']['class']);
      // The id comes back.
      expect(fromV['status']['id']).toBeDefined();
      // Shapes: vmig's names are QEMU's.
      expect(Object.keys(fromV['version']['return']).sort()).toEqual(Object.keys(fromQ['version']['return']).sort());
      const qemuCommands = new Set((fromQ['commands']['return'] as Json[]).map((c) => c['name']));
      for (const c of fromV['commands']['return'] as Json[]) expect(qemuCommands, c['name']).toContain(c['name']);
      expect(Object.keys(fromV['status']['return']).sort()).toEqual(Object.keys(fromQ['status']['return']).sort());
      const qemuCaps = new Set((fromQ['caps']['return'] as Json[]).map((c) => c['capability']));
      for (const c of fromV['caps']['return'] as Json[]) {
        expect(Object.keys(c).sort()).toEqual(['capability', 'state']);
        expect(qemuCaps, c['capability']).toContain(c['capability']);
      }
      // zero-page-detection is QEMU 9.0's parameter (7.2 has the behaviour it calls legacy).
      const qemuParams = [...Object.keys(fromQ['params']['return']), 'zero-page-detection'];
      for (const k of Object.keys(fromV['params']['return'])) expect(qemuParams, k).toContain(k);
      expect(migV['status']).toBe('active');
      expect(migQ['status']).toBe('active');
      for (const k of Object.keys(migV)) expect(Object.keys(migQ), k).toContain(k);
      for (const k of Object.keys(migV['ram'])) expect(Object.keys(migQ['ram']), `ram.${k}`).toContain(k);
      expect(migV['ram']['total']).toBe(16 << 20);

      // The destinations end with their migrations; events reached the QMP clients.
      const d = await dstQ.done;
      expect(d.code, d.stderr).toBe(0);
      const s = await src.done;
      expect(s.code).toBe(0);
      expect(v.events('MIGRATION').map((e) => e['data']['status'])).toContain('completed');
      q.close();
      v.close();
    } finally {
      for (const p of procs) p.kill('SIGKILL');
    }
  });
});

describe('QMP on the destination', () => {
  it('vmig incoming --control: status through the migration, MIGRATION events, the socket gone at the end', async () => {
    const path = join(tmp, 'dst.sock');
    const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--control', `unix:${path}`]);
    const { uri } = (await dst.waitFor((l) => l['event'] === 'listening')) as { uri: string };
    const c = await connectWhenReady(path);
    expect((await c.execute('qmp_capabilities'))['return']).toEqual({});
    expect((await c.execute('query-status'))['return']).toMatchObject({ status: 'inmigrate', running: false });
    const src = spawnCli(CLI_MAIN, ['migrate', uri, '--json', '--ram', '32M', '--max-bandwidth', '16M']);
    await c.waitFor((l) => l['event'] === 'MIGRATION' && l['data']['status'] === 'active');
    expect((await c.execute('query-migrate'))['return']).toEqual({ status: 'active' });
    await c.waitFor((l) => l['event'] === 'MIGRATION' && l['data']['status'] === 'completed');
    await c.closed();
    const [s, d] = await Promise.all([src.done, dst.done]);
    expect(d.code).toBe(0);
    expect(s.code).toBe(0);
  });

  it("no URI: both ends wait for QMP's migrate-incoming / migrate, take capabilities and parameters first, and stay until quit", async () => {
    const dstPath = join(tmp, 'qmp-dst.sock');
    const srcPath = join(tmp, 'qmp-src.sock');
    const dst = spawnCli(CLI_MAIN, ['incoming', '--json', '--control', `unix:${dstPath}`]);
    const src = spawnCli(CLI_MAIN, ['migrate', '--json', '--ram', '32M', '--writers', '2', '--dirty-rate', '8M', '--control', `unix:${srcPath}`]);
    const d = await connectWhenReady(dstPath);
    const s = await connectWhenReady(srcPath);
    // The calls a QEMU pair takes.
    for (const c of [d, s]) {
      expect((await c.execute('qmp_capabilities'))['return']).toEqual({});
      expect((await c.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: true }] }))['return']).toEqual({});
      expect((await c.execute('migrate-set-parameters', { 'multifd-channels': 2 }))['return']).toEqual({});
    }
    expect((await d.execute('query-migrate'))['return']).toEqual({});
    expect((await d.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' }))['return']).toEqual({});
    const { uri } = (await dst.waitFor((l) => l['event'] === 'listening')) as { uri: string };
    expect((await s.execute('migrate', { uri }))['return']).toEqual({});
    await s.waitFor((l) => l['event'] === 'MIGRATION' && l['data']['status'] === 'completed');
    await d.waitFor((l) => l['event'] === 'MIGRATION' && l['data']['status'] === 'completed');
    // Still there, and it says how it ended.
    const info = (await s.execute('query-migrate'))['return'];
    expect(info['status']).toBe('completed');
    expect(info['ram']['multifd-bytes']).toBeGreaterThan(0);
    expect((await s.execute('migrate', { uri }))['error']['desc']).toMatch(/in progress/);
    expect((await d.execute('query-migrate'))['return']).toEqual({ status: 'completed' });
    for (const c of [d, s]) expect((await c.execute('quit'))['return']).toEqual({});
    const [sr, dr] = await Promise.all([src.done, dst.done]);
    expect(sr.code).toBe(0);
    expect(dr.code).toBe(0);
    expect(dr.report?.['ramDigest']).toBe(sr.report?.['ramDigest']);
    expect(dr.report?.['multifdChannels']).toBe(2);
  });
});
