/**
 * Worker threads must load real JavaScript. Every worker entry is compiled to `dist/`;
 * a module in `src/` (run by vitest) or in `dist/` (run by node) finds it at
 * `../dist/<file>` relative to itself, since both folders sit side by side in the package.
 * Callers must live at the top level of src/.
 */
export function workerUrl(fromModule: string, file: string): URL {
  return new URL(`../dist/${file}`, fromModule);
}

/**
 * The Node flags a worker thread starts with: the process's own, but for those that apply only
 * to the entry the process was started with (`--input-type` belongs to `-e` and stdin, and a
 * worker given it fails to start: an application run as `node --input-type=module -e` would
 * lose every thread of vmig's).
 */
export function workerExecArgv(): string[] {
  return process.execArgv.filter((a) => !a.startsWith('--input-type'));
}
