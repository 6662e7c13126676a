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

it('kv-store handover with postcopy: the new process serves before every page arrived, asking for each page it touches; nothing lost', () => {
  const r = spawnSync(process.execPath, [handover, '--keys', '65536', '--channels', '2', '--postcopy'], { encoding: 'utf8', timeout: 120_000, killSignal: 'SIGKILL' });
  expect(r.status, r.stderr).toBe(0);
  const report = JSON.parse(r.stdout) as {
    migration: { status: string };
    oldProcess: { acknowledgedWrites: number; lost: number };
    newProcess: { postcopy: { postcopyRequests: number; writers: number }; received: { acknowledgedWrites: number; lost: number }; servedOn: { lost: number } };
  };
  expect(report.migration.status).toBe('completed');
  expect(report.newProcess.postcopy.writers).toBe(2);
  // Its writers touched pages that had not arrived: each was asked for and placed first.
  expect(report.newProcess.postcopy.postcopyRequests).toBeGreaterThan(0);
  expect(report.newProcess.received.lost).toBe(0);
  expect(report.newProcess.received.acknowledgedWrites).toBeGreaterThanOrEqual(report.oldProcess.acknowledgedWrites);
  expect(report.newProcess.servedOn.lost).toBe(0);
});
