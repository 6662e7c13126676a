/**
 * Lifecycle through the real CLI: auto-converge, the control socket, cancel and a peer kill
 * leaving the source running, structured logs.
 */
import { mkdtempSync, statSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeTlsCreds, runMigrationPair, spawnCli } from '@vmig/test-harness';
import { CLI_MAIN } from './cli.js';
import { ControlClient } from '@vmig/test-harness';

type Json = Record<string, any>;

describe('convergence and control', () => {
  it('a workload that cannot converge converges with --auto-converge; digests equal', async () => {
    const { source, destination } = await runMigrationPair(
      CLI_MAIN,
      ['--ram', '32M'],
      ['--ram', '32M', '--writers', '2', '--dirty-rate', '12M', '--max-bandwidth', '8M', '--downtime-limit', '100', '--auto-converge'],
    );
    expect(source.report?.['status'], JSON.stringify(source.report?.['error'])).toBe('completed');
    expect(destination.report?.['status']).toBe('completed');
    expect(destination.report?.['ramDigest']).toBe(source.report?.['ramDigest']);
    // It took throttling to get there.
    expect(source.report?.['cpuThrottlePercentage']).toBeGreaterThanOrEqual(20);
    const progress = source.lines.filter((l) => l['event'] === 'progress').map((l) => l['cpuThrottlePercentage'] as number);
    expect(progress.some((p) => p >= 20)).toBe(true);
  });

  it('control socket: greeting, query-migrate, set parameters, errors, pass events, cancel; the source keeps running', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'vmig-ctl-'));
    const path = join(dir, 'ctl.sock');
    const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--ram', '64M']);
    const listening = await dst.waitFor((l) => l['event'] === 'listening');
    const src = spawnCli(CLI_MAIN, [
      'migrate', String(listening['uri']), '--json', '--ram', '64M', '--writers', '2', '--dirty-rate', '64M',
      '--max-bandwidth', '8M', '--downtime-limit', '50', '--control', `unix:${path}`, '--log-level', 'info',
    ]);
    await src.waitFor((l) => l['event'] === 'control');
    const c = await ControlClient.connect(path);
    const greeting = await c.waitFor((l) => 'QMP' in l);
    expect(greeting['QMP']).toBeDefined();
    expect((await c.execute('qmp_capabilities'))['return']).toEqual({});
    await src.waitFor((l) => l['event'] === 'status' && l['status'] === 'active');

    const q = await c.execute('query-migrate');
    expect(q['return'].status).toBe('active');
    expect(q['return'].ram.total).toBe(64 << 20);

    expect((await c.execute('migrate-set-parameters', { 'max-bandwidth': 16 << 20, 'downtime-limit': 20 }))['return']).toEqual({});
    expect((await c.execute('query-migrate-parameters'))['return']).toMatchObject({ 'max-bandwidth': 16 << 20, 'downtime-limit': 20 });
    expect((await c.execute('migrate-set-parameters', { 'downtime-limit': -5 }))['error'].class).toBe('GenericError');
    expect((await c.execute('migrate-set-parameters', { 'multifd-channels': 4 }))['error'].desc).toContain('cannot be set');
    expect((await c.execute('teleport'))['error'].class).toBe('CommandNotFound');
    c.raw('{not json');
    await c.waitFor((l) => l['error']?.desc === 'request is not valid JSON');

    await c.waitFor((l) => l['event'] === 'MIGRATION_PASS' && l['data'].pass >= 2);
    expect((await c.execute('migrate-cancel'))['return']).toEqual({});
    await c.waitFor((l) => l['event'] === 'MIGRATION' && l['data'].status === 'cancelled');
    const statuses = c.events('MIGRATION').map((e) => e['data'].status);
    expect(statuses.slice(-2)).toEqual(['cancelling', 'cancelled']);
    c.close();

    const run = await src.done;
    expect(run.code).toBe(1);
    expect(run.report?.['status']).toBe('cancelled');
    expect((run.report?.['error'] as Json).code).toBe('VMIG_ERR_CANCELLED');
    // The guest runs on at the source after the cancel.
    expect(run.report?.['writersResumed']).toBe(true);
    // Logs are structured (pino JSON on stderr).
    const logs = run.stderr.split('\n').filter(Boolean).map((l) => JSON.parse(l) as Json);
    expect(logs.some((l) => l['msg'] === 'migration status' && l['status'] === 'cancelled' && l['role'] === 'source')).toBe(true);
    const d = await dst.done;
    expect(d.code).toBe(1);
    expect(d.report?.['status']).toBe('failed');
  });

  it('SIGTERM cancels: status events cancelling then cancelled, writers resume', async () => {
    const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--ram', '64M']);
    const listening = await dst.waitFor((l) => l['event'] === 'listening');
    const src = spawnCli(CLI_MAIN, ['migrate', String(listening['uri']), '--json', '--ram', '64M', '--writers', '2', '--max-bandwidth', '8M']);
    await src.waitFor((l) => l['event'] === 'status' && l['status'] === 'active');
    src.child.kill('SIGTERM');
    const run = await src.done;
    expect(run.code).toBe(1);
    const statuses = run.lines.filter((l) => l['event'] === 'status').map((l) => l['status']);
    expect(statuses.slice(-2)).toEqual(['cancelling', 'cancelled']);
    expect(run.report?.['writersResumed']).toBe(true);
    expect((await dst.done).code).toBe(1);
  });

  it('the destination killed: the source fails, its writers keep running, it exits promptly', async () => {
    const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--ram', '64M', '--multifd-channels', '2']);
    const listening = await dst.waitFor((l) => l['event'] === 'listening');
    const src = spawnCli(CLI_MAIN, ['migrate', String(listening['uri']), '--json', '--ram', '64M', '--writers', '2', '--max-bandwidth', '8M', '--multifd-channels', '2']);
    await src.waitFor((l) => l['event'] === 'status' && l['status'] === 'active');
    dst.child.kill('SIGKILL');
    const killedAt = performance.now();
    const run = await src.done;
    expect(run.code).toBe(1);
    expect(run.report?.['status']).toBe('failed');
    expect(run.report?.['writersResumed']).toBe(true);
    // Exits on its own (no leaked worker or socket keeps it alive); generous bound for CI.
    expect(performance.now() - killedAt).toBeLessThan(20_000);
  });

  it('a control address already in use is a clear error', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'vmig-ctl-'));
    const path = join(dir, 'busy.sock');
    const busy = net.createServer().listen(path);
    await new Promise((r) => busy.once('listening', r));
    const src = spawnCli(CLI_MAIN, ['migrate', 'tcp:127.0.0.1:1', '--ram', '1M', '--control', `unix:${path}`]);
    const run = await src.done;
    busy.close();
    expect(run.code).toBe(1);
    expect(run.stderr).toContain('VMIG_ERR_CONTROL');
  });

  it('the unix control socket is mode 0600; a TCP one needs TLS with client certificates', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'vmig-ctl-'));
    const creds = makeTlsCreds(join(dir, 'tls'));
    // Nothing listens at port 1: the source fails at once, after its control socket is up.
    const path = join(dir, 'ctl.sock');
    const unixSrc = spawnCli(CLI_MAIN, ['migrate', 'tcp:127.0.0.1:1', '--json', '--ram', '16M', '--control', `unix:${path}`, '--channel-timeout', '5000']);
    await unixSrc.waitFor((l) => l['event'] === 'control');
    expect(statSync(path).mode & 0o777).toBe(0o600);
    await unixSrc.done;

    const plain = await spawnCli(CLI_MAIN, ['migrate', 'tcp:127.0.0.1:1', '--ram', '16M', '--control', 'tcp:127.0.0.1:0']).done;
    expect(plain.code).toBe(2);
    expect(plain.stderr).toMatch(/needs TLS with client certificates/);

    const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--ram', '32M', '--tls-creds', creds]);
    const { uri } = (await dst.waitFor((l) => l['event'] === 'listening')) as { uri: string };
    const src = spawnCli(CLI_MAIN, [
      'migrate', uri, '--json', '--ram', '32M', '--writers', '1', '--dirty-rate', '64M', '--max-bandwidth', '4M', '--tls-creds', creds, '--control', 'tcp:127.0.0.1:0',
    ]);
    const { address } = (await src.waitFor((l) => l['event'] === 'control')) as { address: string };
    const port = Number(address.split(':').pop());
    // A client without a certificate is turned away in the handshake.
    const stranger = await ControlClient.connectTls(port, creds, false).then(
      async (c) => (await Promise.race([c.closed().then(() => 'closed'), c.waitFor((l) => 'QMP' in l, 5000).then(() => 'greeted')])),
      () => 'refused',
    );
    expect(stranger).not.toBe('greeted');
    const c = await ControlClient.connectTls(port, creds);
    expect((await c.waitFor((l) => 'QMP' in l))['QMP']).toBeDefined();
    expect((await c.execute('qmp_capabilities'))['return']).toEqual({});
    await src.waitFor((l) => l['event'] === 'status' && l['status'] === 'active');
    expect((await c.execute('query-migrate'))['return'].ram.total).toBe(32 << 20);
    expect((await c.execute('migrate-cancel'))['return']).toEqual({});
    const [s] = await Promise.all([src.done, dst.done]);
    expect(s.report?.['status']).toBe('cancelled');
  });
});
