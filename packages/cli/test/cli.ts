import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

/** The built CLI entry, as `./vmig` runs it. */
export const CLI_MAIN = fileURLToPath(new URL('../dist/main.js', import.meta.url));

/** Debian's QEMU 7.2 (`qemu-system-x86`, which .ci/run installs). */
export const QEMU = 'qemu-system-x86_64';

/**
 * Whether the live QEMU tests can run here. In CI they must: a missing QEMU fails the file
 * instead of skipping it.
 */
export function haveQemu(): boolean {
  const ok = spawnSync(QEMU, ['--version']).status === 0;
  if (!ok && process.env['CI']) throw new Error(`${QEMU} is required in CI (.ci/run installs qemu-system-x86)`);
  return ok;
}

/** Debian's chromium, for the report page's test (.ci/run installs it). */
export const CHROMIUM = 'chromium';

/** Whether a headless browser can run here. In CI it must: a missing one fails the file. */
export function haveChromium(): boolean {
  const ok = spawnSync(CHROMIUM, ['--version']).status === 0;
  if (!ok && process.env['CI']) throw new Error(`${CHROMIUM} is required in CI (.ci/run installs it)`);
  return ok;
}
