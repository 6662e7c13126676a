/**
 * Worker threads must load real JavaScript. Every worker entry is compiled to `dist/`;
 * a module in `src/` (run by vitest) or in `dist/` (run by node) finds it at
 * `../dist/<file>` relative to itself, since both folders sit side by side in the package.
 * Callers must live at the top level of src/.
 */
export function workerUrl(fromModule: string, file: string): URL {
  return new URL(`../dist/${file}`, fromModule);
}
