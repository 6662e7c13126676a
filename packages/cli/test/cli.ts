import { release } from 'node:os';
import { fileURLToPath } from 'node:url';

/** The built CLI entry, as `./vmig` runs it. */
export const CLI_MAIN = fileURLToPath(new URL('../dist/main.js', import.meta.url));

/** Whether this kernel takes a custom slice for a SCHED_OTHER thread (EEVDF, Linux 6.12+; thread-slice.ts). */
export function kernelHasCustomSlices(): boolean {
  if (process.platform !== 'linux' || !['x64', 'arm64'].includes(process.arch)) return false;
  const [major = 0, minor = 0] = release().split('.').map(Number);
  return major > 6 || (major === 6 && minor >= 12);
}
