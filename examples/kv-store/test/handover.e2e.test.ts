// The example, run as a user would: two real processes, real worker threads, loopback TCP.
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { expect, it } from 'vitest';

const handover = fileURLToPath(new URL('../handover.mjs', import.meta.url));

it('kv-store handover: every acknowledged write is in the new process, which serves on', () => {
  const r = spawnSync(process.execPath, [handover, '--keys', '65536', '--channels', '2'], { encoding: 'utf8', timeout: 120_000, killSignal: 'SIGKILL' });
  expect(r.status, r.stderr).toBe(0);
  const report = JSON.parse(r.stdout) as {
    migration: { status: string };
    oldProcess: { acknowledgedWrites: number; lost: number };
    newProcess: { received: { acknowledgedWrites: number; lost: number }; servedOn: { acknowledgedWrites: number; lost: number } };
  };
  expect(report.migration.status).toBe('completed');
  // The writers were busy during the migration, and every write they acknowledged arrived.
  expect(report.oldProcess.acknowledgedWrites).toBeGreaterThan(10_000);
  expect(report.newProcess.received).toMatchObject({ lost: 0, acknowledgedWrites: report.oldProcess.acknowledgedWrites });
  expect(report.newProcess.servedOn.lost).toBe(0);
  expect(report.newProcess.servedOn.acknowledgedWrites).toBeGreaterThan(report.oldProcess.acknowledgedWrites);
});
