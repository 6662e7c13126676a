import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { makeTlsCreds, spawnCli } from '@vmig/test-harness';
import { CLI_MAIN, haveQemu, QEMU } from './cli.js';

// A live QEMU 7.2 source (Debian's qemu-system-x86, which .ci/run installs) migrating a
// 16 MiB RAM block with multifd into `vmig incoming`. CI must run it; elsewhere it needs QEMU.

const tmp = mkdtempSync(join(tmpdir(), 'vmig-qemu-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe.runIf(haveQemu())('a real QEMU 7.2 source', () => {
  const creds = makeTlsCreds(join(tmp, 'tls'));
  const cases = [
    { channels: 2, tls: false, flag: true },
    { channels: 4, tls: false, flag: true },
    // The dialect read off the stream: no flag needed.
    { channels: 2, tls: false, flag: false },
    // QEMU's tls-creds-x509 client on every channel into vmig's TLS destination.
    { channels: 0, tls: true, flag: false },
    { channels: 2, tls: true, flag: false },
    // vmig's RAM in 1 MiB segments: QEMU's packets of 128 pages cross their edges.
    { channels: 2, tls: false, flag: false, segments: true },
    { channels: 0, tls: false, flag: false, segments: true },
  ];
  for (const { channels, tls, flag, segments } of cases) {
    const what = `${channels ? `over ${channels} multifd channels` : 'on the main channel'}${flag ? ' (--multifd-flush-after-each-section)' : ''}${tls ? ', TLS on every channel' : ''}${segments ? ', vmig\'s RAM in 1 MiB segments' : ''}`;
    it(`migrates into vmig incoming ${what}: RAM identical`, async () => {
      const name = `${channels}-${tls}-${flag}-${segments ?? false}`;
      const mem = join(tmp, `guest-${name}.mem`);
      const ram = crypto.randomBytes(16 << 20);
      ram.fill(0, 0, 100 * 4096); // zero pages travel on the main channel in 7.2
      writeFileSync(mem, ram);
      const dump = join(tmp, `out-${name}.bin`);
      const dstArgs = ['incoming', 'tcp:127.0.0.1:0', '--json', '--dump-ram', dump];
      if (channels) dstArgs.push('--multifd-channels', String(channels));
      if (flag) dstArgs.push('--multifd-flush-after-each-section');
      if (tls) dstArgs.push('--tls-creds', creds);
      const dst = spawnCli(CLI_MAIN, dstArgs, segments ? { env: { ...process.env, VMIG_RAM_SEGMENT_BYTES: String(1 << 20) } } : {});
      const { uri } = (await dst.waitFor((l) => l['event'] === 'listening')) as { uri: string };
      const qemuArgs = ['-M', 'none,memory-backend=mem', '-object', `memory-backend-file,id=mem,size=16M,mem-path=${mem},share=off`, '-nographic', '-nodefaults', '-S', '-monitor', 'stdio'];
      if (tls) qemuArgs.push('-object', `tls-creds-x509,id=tls0,dir=${creds},endpoint=client`);
      const qemu = spawn(QEMU, qemuArgs, { stdio: ['pipe', 'ignore', 'ignore'] });
      const hmp = [
        ...(channels ? ['migrate_set_capability multifd on', `migrate_set_parameter multifd-channels ${channels}`] : []),
        ...(tls ? ['migrate_set_parameter tls-creds tls0'] : []),
        `migrate -d ${uri}`,
      ];
      qemu.stdin.write(hmp.join('\n') + '\n');
      const run = await dst.done;
      qemu.stdin.end('quit\n');
      await new Promise((r) => qemu.once('exit', r));
      expect(run.code, run.stderr).toBe(0);
      expect(run.report?.machine).toBe('none');
      expect(run.report?.ram.blocks).toEqual([{ idstr: 'mem', size: 16 << 20 }]);
      expect(readFileSync(dump).equals(ram)).toBe(true);
    });
  }

  for (const preempt of [false, true]) {
    it(`switches to postcopy on migrate_start_postcopy${preempt ? ', with postcopy-preempt and 2 multifd channels' : ''}: RAM identical`, async () => {
      const name = `postcopy-${preempt}`;
      const mem = join(tmp, `guest-${name}.mem`);
      const ram = crypto.randomBytes(16 << 20);
      writeFileSync(mem, ram);
      const dump = join(tmp, `out-${name}.bin`);
      const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--postcopy', '--dump-ram', dump, ...(preempt ? ['--postcopy-preempt', '--multifd-channels', '2'] : [])]);
      const { uri } = (await dst.waitFor((l) => l['event'] === 'listening')) as { uri: string };
      const qemu = spawn(QEMU, ['-M', 'none,memory-backend=mem', '-object', `memory-backend-file,id=mem,size=16M,mem-path=${mem},share=off`, '-nographic', '-nodefaults', '-S', '-monitor', 'stdio'], {
        stdio: ['pipe', 'ignore', 'ignore'],
      });
      // A slow link, so that most pages are still to come at the switch.
      const caps = ['migrate_set_capability postcopy-ram on', 'migrate_set_parameter max-bandwidth 4M'];
      if (preempt) caps.push('migrate_set_capability postcopy-preempt on', 'migrate_set_capability multifd on', 'migrate_set_parameter multifd-channels 2');
      qemu.stdin.write([...caps, `migrate -d ${uri}`].join('\n') + '\n');
      await dst.waitFor((l) => l['event'] === 'postcopy' && l['reason'] === 'INBOUND_ADVISE');
      qemu.stdin.write('migrate_start_postcopy\n');
      const run = await dst.done;
      qemu.stdin.end('quit\n');
      await new Promise((r) => qemu.once('exit', r));
      expect(run.code, run.stderr).toBe(0);
      expect((run.report?.['postcopy'] as { postcopyPages: number }).postcopyPages).toBeGreaterThan(0);
      expect(readFileSync(dump).equals(ram)).toBe(true);
    });
  }

  it('a real machine type (-M pc) is refused at once, by name: vmig cannot load its device state', async () => {
    const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json']);
    const { uri } = (await dst.waitFor((l) => l['event'] === 'listening')) as { uri: string };
    const qemu = spawn(QEMU, ['-M', 'pc', '-m', '16', '-nographic', '-nodefaults', '-S', '-monitor', 'stdio'], { stdio: ['pipe', 'ignore', 'ignore'] });
    qemu.stdin.write(`migrate -d ${uri}\n`);
    const run = await dst.done;
    qemu.stdin.end('quit\n');
    await new Promise((r) => qemu.once('exit', r));
    expect(run.code).toBe(1);
    expect(run.report?.['error']).toMatchObject({ code: 'VMIG_ERR_MACHINE' });
    expect(String((run.report?.['error'] as { message: string }).message)).toMatch(/machine 'pc-i440fx-7\.2'/);
  });
});
