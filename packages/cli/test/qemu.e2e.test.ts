import { spawn, spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { spawnCli } from '@vmig/test-harness';
import { CLI_MAIN } from './cli.js';

// A live QEMU 7.2 source (Debian's qemu-system-x86, which .ci/run installs) migrating a
// 16 MiB RAM block with multifd into `vmig incoming`. CI must run it; elsewhere it needs QEMU.
const QEMU = 'qemu-system-x86_64';
const haveQemu = spawnSync(QEMU, ['--version']).status === 0;
if (!haveQemu && process.env['CI']) throw new Error(`${QEMU} is required in CI (.ci/run installs qemu-system-x86)`);

const tmp = mkdtempSync(join(tmpdir(), 'vmig-qemu-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe.runIf(haveQemu)('a real QEMU 7.2 source', () => {
  for (const channels of [2, 4]) {
    it(`migrates into vmig incoming over ${channels} multifd channels (legacy flush): RAM identical`, async () => {
      const mem = join(tmp, `guest-${channels}.mem`);
      const ram = crypto.randomBytes(16 << 20);
      ram.fill(0, 0, 100 * 4096); // zero pages travel on the main channel in 7.2
      writeFileSync(mem, ram);
      const dump = join(tmp, `out-${channels}.bin`);
      const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--multifd-channels', String(channels), '--multifd-flush-after-each-section', '--dump-ram', dump]);
      const { uri } = (await dst.waitFor((l) => l['event'] === 'listening')) as { uri: string };
      const qemu = spawn(QEMU, ['-M', 'none,memory-backend=mem', '-object', `memory-backend-file,id=mem,size=16M,mem-path=${mem},share=off`, '-nographic', '-nodefaults', '-S', '-monitor', 'stdio'], {
        stdio: ['pipe', 'ignore', 'ignore'],
      });
      qemu.stdin.write(`migrate_set_capability multifd on\nmigrate_set_parameter multifd-channels ${channels}\nmigrate -d ${uri}\n`);
      const run = await dst.done;
      qemu.stdin.end('quit\n');
      await new Promise((r) => qemu.once('exit', r));
      expect(run.code, run.stderr).toBe(0);
      expect(run.report?.machine).toBe('none');
      expect(run.report?.ram.blocks).toEqual([{ idstr: 'mem', size: 16 << 20 }]);
      expect(readFileSync(dump).equals(ram)).toBe(true);
    });
  }
});
