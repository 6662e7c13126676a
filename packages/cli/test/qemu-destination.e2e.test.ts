/**
 * vmig as a QEMU 7.2 source: a real `qemu-system-x86_64 -M none` destination (Debian's, which
 * .ci/run installs), driven over its human monitor. The test guest leaves its own device
 * sections out (`--guest-devices none`), multifd speaks 7.2's dialect with the uuid QEMU
 * expects (all zeros, QEMU's default `-uuid`), and QEMU's RAM afterwards (`pmemsave`) must
 * have the digest the source reported at its stop, its writers running all along.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { BufferedWriter, connect, parseMigrationUri } from '@vmig/channel';
import { DEFAULT_PARAMS, DeviceRegistry, GlobalStateDevice, GuestRam, MigrationThread, TimerDevice } from '@vmig/core';
import { ControlClient, digestRam, FaultProxy, fillRam, spawnCli } from '@vmig/test-harness';
import { CLI_MAIN, haveQemu, QEMU } from './cli.js';

type Json = Record<string, unknown>;

const tmp = mkdtempSync(join(tmpdir(), 'vmig-qemu-dst-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));
const RAM = 16 << 20;

/** A QEMU destination and its human monitor: commands in, output collected. */
class QemuMonitor {
  private out = '';
  readonly proc: ChildProcess;

  constructor(args: string[]) {
    this.proc = spawn(QEMU, ['-M', 'none,memory-backend=mem', '-object', `memory-backend-ram,id=mem,size=${RAM}`, '-nographic', '-nodefaults', '-S', '-monitor', 'stdio', ...args], {
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    this.proc.stdout!.setEncoding('utf8').on('data', (d: string) => (this.out += d));
    this.proc.stderr!.setEncoding('utf8').on('data', (d: string) => (this.out += d));
  }

  send(cmd: string): void {
    this.proc.stdin!.write(cmd + '\n');
  }

  /** Asks `info migrate` until it says completed or failed (bounded). */
  async migrationStatus(ms = 30_000): Promise<string> {
    const deadline = Date.now() + ms;
    while (Date.now() < deadline) {
      this.out = '';
      this.send('info migrate');
      await new Promise((r) => setTimeout(r, 200));
      const m = /Migration status: (\w+)/.exec(this.out);
      if (m && m[1] !== 'active' && m[1] !== 'setup') return m[1]!;
      if (this.proc.exitCode !== null) return `exited: ${this.out.slice(-500)}`;
    }
    return `no end within ${ms} ms: ${this.out.slice(-500)}`;
  }

  /** Asks `info migrate` until it says `status` (bounded); returns what it last said. */
  async waitStatus(status: string, ms = 30_000): Promise<string> {
    const deadline = Date.now() + ms;
    let last = '';
    while (Date.now() < deadline) {
      this.out = '';
      this.send('info migrate');
      await new Promise((r) => setTimeout(r, 200));
      last = /Migration status: ([\w-]+)/.exec(this.out)?.[1] ?? last;
      if (last === status) return last;
    }
    return last;
  }

  /** Guest RAM as QEMU holds it (pmemsave), digested as the reports digest it. */
  async ramDigest(file: string): Promise<string> {
    this.send(`pmemsave 0 ${RAM} "${file}"`);
    for (let i = 0; i < 100; i++) {
      await new Promise((r) => setTimeout(r, 50));
      try {
        const b = readFileSync(file);
        if (b.length === RAM) {
          const ram = GuestRam.create([{ idstr: 'mem', size: RAM }], { prefault: false });
          ram.blocks[0]!.host.set(b);
          return digestRam(ram).digest;
        }
      } catch {
        // not written yet
      }
    }
    throw new Error(`pmemsave wrote nothing: ${this.out.slice(-500)}`);
  }

  quit(): Promise<void> {
    if (this.proc.exitCode !== null) return Promise.resolve();
    this.send('quit');
    return new Promise((r) => {
      const t = setTimeout(() => this.proc.kill('SIGKILL'), 5000);
      this.proc.once('exit', () => (clearTimeout(t), r()));
    });
  }
}

const monitors: QemuMonitor[] = [];
afterEach(async () => {
  for (const m of monitors.splice(0)) await m.quit();
});

/**
 * A QEMU destination: `hmp` first (capabilities, parameters), then migrate_incoming on a TCP
 * port of its own (or on `from`, an `exec:` URI). Resolves once QEMU had the moment it takes
 * to listen (a probe connection would be taken for the migration).
 */
async function qemuDestination(hmp: string[] = [], from?: string): Promise<{ qemu: QemuMonitor; uri: string }> {
  const qemu = new QemuMonitor(['-incoming', 'defer']);
  monitors.push(qemu);
  for (const c of hmp) qemu.send(c);
  const uri = from ?? `tcp:127.0.0.1:${20_000 + Math.floor(Math.random() * 20_000)}`;
  qemu.send(`migrate_incoming ${from ? `"${from}"` : uri}`);
  if (!from) await new Promise((r) => setTimeout(r, 500));
  return { qemu, uri };
}

/** `vmig migrate` (the test guest, its own sections left out) into `uri`; QEMU's RAM must be the source's at its stop. */
async function expectMigratedInto(qemu: QemuMonitor, uri: string, flags: string[], dumpName: string, env?: NodeJS.ProcessEnv): Promise<Json> {
  const src = await spawnCli(CLI_MAIN, ['migrate', uri, '--json', '--ram-block', `mem=${RAM}`, '--guest-devices', 'none', '--writers', '2', '--dirty-rate', '8M', ...flags], env ? { env } : {}).done;
  expect(src.code, src.stderr).toBe(0);
  expect(src.report?.['status']).toBe('completed');
  expect(await qemu.migrationStatus()).toBe('completed');
  expect(await qemu.ramDigest(join(tmp, dumpName))).toBe(src.report?.['ramDigest']);
  return src.report!;
}

describe.runIf(haveQemu())('a real QEMU 7.2 destination', () => {
  const cases = [
    { channels: 0, compression: 'none' },
    { channels: 2, compression: 'none' },
    { channels: 2, compression: 'zlib' },
    { channels: 4, compression: 'none' },
    // The source's RAM in 1 MiB segments: its packets' runs and zero-page checks cut at their edges.
    { channels: 2, compression: 'none', segments: true },
  ];
  for (const { channels, compression, segments } of cases) {
    const what = `${channels ? `${channels} multifd channels (7.2's dialect), compression ${compression}` : 'the main channel'}${segments ? ", the source's RAM in 1 MiB segments" : ''}`;
    it(`vmig migrate --guest-devices none into it over ${what}, writers running: QEMU's RAM has the source's digest`, async () => {
      const hmp = channels ? ['migrate_set_capability multifd on', `migrate_set_parameter multifd-channels ${channels}`, `migrate_set_parameter multifd-compression ${compression}`] : [];
      const { qemu, uri } = await qemuDestination(hmp);
      const mf = channels ? ['--multifd-channels', String(channels), '--multifd-flush-after-each-section', '--multifd-compression', compression] : [];
      const env = segments ? { ...process.env, VMIG_RAM_SEGMENT_BYTES: String(1 << 20) } : undefined;
      await expectMigratedInto(qemu, uri, ['--seed', String(channels + 7), ...mf], `ram-${channels}-${compression}${segments ? '-seg' : ''}.bin`, env);
    });
  }

  it('vmig migrate --postcopy into it (postcopy-ram), writers running until the switch: QEMU\'s RAM has the source\'s digest', async () => {
    const { qemu, uri } = await qemuDestination(['migrate_set_capability postcopy-ram on']);
    const report = await expectMigratedInto(qemu, uri, ['--postcopy', '--postcopy-after-rounds', '1'], 'ram-postcopy.bin');
    expect((report['ram'] as { postcopyBytes: number }).postcopyBytes).toBeGreaterThan(0);
  });

  it('postcopy recovery into it: the link reset after the switch, QEMU pauses, migrate_recover there, migrate resume=true here: QEMU\'s RAM has the source\'s digest', async () => {
    const port = 20_000 + Math.floor(Math.random() * 20_000);
    const { qemu, uri } = await qemuDestination(['migrate_set_capability postcopy-ram on']);
    const proxies: FaultProxy[] = [await FaultProxy.start({ target: { host: '127.0.0.1', port: Number(uri.split(':').pop()) } })];
    try {
      const src = spawnCli(CLI_MAIN, [
        'migrate', proxies[0]!.uri, '--json', '--ram-block', `mem=${RAM}`, '--guest-devices', 'none', '--writers', '2', '--dirty-rate', '8M',
        '--postcopy', '--max-bandwidth', '4M', '--max-postcopy-bandwidth', '2M', '--channel-timeout', '3000', '--control', `unix:${join(tmp, 'src-recovery.sock')}`,
      ]);
      const ctl = await ControlClient.connect(((await src.waitFor((l) => l['event'] === 'control')) as { address: string }).address.slice('unix:'.length));
      await ctl.execute('qmp_capabilities');
      // Early in the first round: most pages are still to come after the switch.
      await src.waitFor((l) => l['event'] === 'status' && l['status'] === 'active');
      await new Promise((r) => setTimeout(r, 300));
      expect((await ctl.execute('migrate-start-postcopy'))['return']).toEqual({});
      await src.waitFor((l) => l['event'] === 'status' && l['status'] === 'postcopy-active');
      await new Promise((r) => setTimeout(r, 300));
      proxies[0]!.cut(0, 'reset');
      await src.waitFor((l) => l['event'] === 'status' && l['status'] === 'postcopy-paused', 30_000);
      // QEMU pauses too once its reads fail.
      expect(await qemu.waitStatus('postcopy-paused')).toBe('postcopy-paused');
      qemu.send(`migrate_recover tcp:127.0.0.1:${port}`);
      await new Promise((r) => setTimeout(r, 500));
      proxies.push(await FaultProxy.start({ target: { host: '127.0.0.1', port } }));
      expect((await ctl.execute('migrate', { uri: proxies[1]!.uri, resume: true }))['return']).toEqual({});
      const run = await src.done;
      ctl.close();
      expect(run.code, run.stderr).toBe(0);
      expect((run.report?.['ram'] as { postcopyRecoveries: number }).postcopyRecoveries).toBe(1);
      expect(await qemu.migrationStatus()).toBe('completed');
      expect(await qemu.ramDigest(join(tmp, 'ram-recovery.bin'))).toBe(run.report?.['ramDigest']);
    } finally {
      for (const p of proxies) await p.close();
    }
  });

  it("through the library's API (core's MigrationThread with the application's own device list): the same", async () => {
    const { qemu, uri } = await qemuDestination();
    const ram = GuestRam.create([{ idstr: 'mem', size: RAM }]);
    fillRam(ram, 'random', '11');
    const sock = await connect(parseMigrationUri(uri));
    // An application's guest: its RAM, its run control, and the device sections QEMU knows.
    const mig = new MigrationThread({
      ram,
      sink: new BufferedWriter(sock, { channel: 'main' }),
      vm: { stop: async () => {}, resume: () => {} },
      devices: new DeviceRegistry().register(new TimerDevice()).register(new GlobalStateDevice('running')),
      params: DEFAULT_PARAMS,
    });
    const info = await mig.run();
    sock.end();
    expect(info.status, JSON.stringify(info.error)).toBe('completed');
    expect(await qemu.migrationStatus()).toBe('completed');
    expect(await qemu.ramDigest(join(tmp, 'ram-api.bin'))).toBe(digestRam(ram).digest);
  });

  it('a vmig snapshot file (--guest-devices none) loads into it; its RAM is what vmig restore loads', async () => {
    const file = join(tmp, 'guest.snap');
    const snap = await spawnCli(CLI_MAIN, ['snapshot', file, '--json', '--ram-block', `mem=${RAM}`, '--guest-devices', 'none', '--writers', '2', '--dirty-rate', '8M']).done;
    expect(snap.code, snap.stderr).toBe(0);
    const restored = await spawnCli(CLI_MAIN, ['restore', file, '--json']).done;
    expect(restored.code, restored.stderr).toBe(0);
    const { qemu } = await qemuDestination([], `exec:cat ${file}`);
    expect(await qemu.migrationStatus()).toBe('completed');
    expect(await qemu.ramDigest(join(tmp, 'snap-ram.bin'))).toBe(restored.report?.['ramDigest']);
  });

  it("the test guest's own sections are what QEMU refuses (so --guest-devices none is needed)", async () => {
    const { uri } = await qemuDestination();
    const src = await spawnCli(CLI_MAIN, ['migrate', uri, '--json', '--ram-block', `mem=${RAM}`, '--channel-timeout', '5000']).done;
    expect(src.code).toBe(1);
    expect(src.report?.['status']).toBe('failed');
  });
});

describe('--uuid', () => {
  it('checked in every MultiFDInit_t: a destination with another uuid refuses the channels', async () => {
    const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--ram', '16M', '--multifd-channels', '2', '--uuid', '12345678-9abc-def0-1234-56789abcdef0']);
    const { uri } = (await dst.waitFor((l) => l['event'] === 'listening')) as { uri: string };
    const [s, d] = await Promise.all([spawnCli(CLI_MAIN, ['migrate', uri, '--json', '--ram', '16M', '--multifd-channels', '2']).done, dst.done]);
    expect(d.report?.['error']).toMatchObject({ code: 'VMIG_ERR_MULTIFD_HANDSHAKE' });
    expect(String((d.report?.['error'] as { message: string }).message)).toMatch(/received uuid 00000000-0000-0000-0000-000000000000, expected 12345678-9abc-def0-1234-56789abcdef0/);
    expect(s.code).toBe(1);
  });

  it('the same uuid on both ends: completes', async () => {
    const u = ['--uuid', '12345678-9abc-def0-1234-56789abcdef0'];
    const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--ram', '16M', '--multifd-channels', '2', ...u]);
    const { uri } = (await dst.waitFor((l) => l['event'] === 'listening')) as { uri: string };
    const [s, d] = await Promise.all([spawnCli(CLI_MAIN, ['migrate', uri, '--json', '--ram', '16M', '--multifd-channels', '2', ...u]).done, dst.done]);
    expect(d.report?.['status']).toBe('completed');
    expect(d.report?.['ramDigest']).toBe(s.report?.['ramDigest']);
  });

  it('a malformed uuid is a bad flag', async () => {
    const r = await spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--uuid', 'not-a-uuid']).done;
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/--uuid/);
  });
});
