/** Helpers for tests that run a snippet in a child Node process (so the test runner keeps its own threads as they are). */
import { spawnSync } from 'node:child_process';
import { release } from 'node:os';

/** Whether this kernel takes a custom slice for a SCHED_OTHER thread (EEVDF, Linux 6.12+; thread-slice.ts). */
export function kernelHasCustomSlices(): boolean {
  if (process.platform !== 'linux' || !['x64', 'arm64'].includes(process.arch)) return false;
  const [major = 0, minor = 0] = release().split('.').map(Number);
  return major > 6 || (major === 6 && minor >= 12);
}

/**
 * Runs `script` (an ES module) in a child Node process with `moduleUrl` as its argument and
 * returns the JSON it printed; throws with its stderr if it failed. Tests of thread
 * scheduling and names use it so that the test runner's own threads keep theirs.
 */
export function runChildScript(script: string, moduleUrl: string): any {
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script, moduleUrl], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`child exited ${r.status}: ${r.stderr}`);
  return JSON.parse(r.stdout.trim());
}
