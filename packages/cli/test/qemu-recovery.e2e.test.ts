/**
 * Postcopy recovery between a real QEMU 7.2 source and `vmig incoming` (QEMU's own protocol on
 * its side: postcopy-paused, `migrate -r` after vmig's migrate-recover, RECV_BITMAP,
 * POSTCOPY_RESUME, RESUME_ACK). A FaultProxy between them resets the main connection after
 * the switch; both pause; vmig listens again, QEMU resumes, RAM arrives byte-exact.
 */
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ControlClient, FaultProxy, spawnCli, statusCount } from '@vmig/test-harness';
import { CLI_MAIN, haveQemu, QEMU } from './cli.js';

const tmp = mkdtempSync(join(tmpdir(), 'vmig-qemu-recovery-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe.runIf(haveQemu())('postcopy recovery from a real QEMU 7.2 source', () => {
  for (const preempt of [false, true]) {
    it(`the main connection reset after the switch${preempt ? ' (postcopy-preempt)' : ''}: both pause; migrate-recover, then QEMU's migrate -r: RAM identical`, async () => {
      const mem = join(tmp, `guest-${preempt}.mem`);
      const ram = crypto.randomBytes(16 << 20);
      writeFileSync(mem, ram);
      const dump = join(tmp, `out-${preempt}.bin`);
      const ctlPath = join(tmp, `dst-${preempt}.sock`);
      const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--postcopy', '--control', `unix:${ctlPath}`, '--dump-ram', dump, ...(preempt ? ['--postcopy-preempt'] : [])]);
      const proxies: FaultProxy[] = [];
      const qemu = spawn(QEMU, ['-M', 'none,memory-backend=mem', '-object', `memory-backend-file,id=mem,size=16M,mem-path=${mem},share=off`, '-nographic', '-nodefaults', '-S', '-monitor', 'stdio'], {
        stdio: ['pipe', 'ignore', 'ignore'],
      });
      try {
        const { uri } = (await dst.waitFor((l) => l['event'] === 'listening')) as { uri: string };
        const ctl = await ControlClient.connect(ctlPath);
        await ctl.execute('qmp_capabilities');
        const proxy = await FaultProxy.start({ target: { host: '127.0.0.1', port: Number(uri.split(':').pop()) } });
        proxies.push(proxy);
        // Slow before and after the switch, so that pages are still to come when the link breaks.
        const caps = ['migrate_set_capability postcopy-ram on', 'migrate_set_parameter max-bandwidth 4M', 'migrate_set_parameter max-postcopy-bandwidth 2M'];
        if (preempt) caps.push('migrate_set_capability postcopy-preempt on');
        qemu.stdin.write([...caps, `migrate -d ${proxy.uri}`].join('\n') + '\n');
        await dst.waitFor((l) => l['event'] === 'postcopy' && l['reason'] === 'INBOUND_ADVISE');
        qemu.stdin.write('migrate_start_postcopy\n');
        await dst.waitFor((l) => l['event'] === 'postcopy' && l['reason'] === 'INBOUND_LISTEN');
        await new Promise((r) => setTimeout(r, 500));
        proxy.cut(0, 'reset');
        await dst.waitFor(() => statusCount(dst, 'postcopy-paused') >= 1, 30_000);
        expect((await ctl.execute('migrate-recover', { uri: 'tcp:127.0.0.1:0' }))['return']).toEqual({});
        const { uri: recoverUri } = (await dst.waitFor((l) => l['event'] === 'recover')) as { uri: string };
        const again = await FaultProxy.start({ target: { host: '127.0.0.1', port: Number(recoverUri.split(':').pop()) } });
        proxies.push(again);
        // QEMU pauses once its writes fail; `migrate -r` is refused until then: ask until it takes.
        const resumed = dst.waitFor(() => statusCount(dst, 'postcopy-active') >= 2, 60_000);
        const asking = setInterval(() => qemu.stdin.write(`migrate -d -r ${again.uri}\n`), 500);
        try {
          await resumed;
        } finally {
          clearInterval(asking);
        }
        const run = await dst.done;
        ctl.close();
        expect(run.code, run.stderr).toBe(0);
        expect((run.report?.['postcopy'] as { recoveries: number }).recoveries).toBe(1);
        expect(readFileSync(dump).equals(ram)).toBe(true);
      } finally {
        qemu.stdin.end('quit\n');
        await new Promise((r) => (qemu.exitCode !== null ? r(null) : qemu.once('exit', r)));
        if (dst.child.exitCode === null) dst.child.kill('SIGKILL');
        for (const p of proxies) await p.close();
      }
    });
  }
});
