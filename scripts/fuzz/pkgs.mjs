/**
 * The built vmig packages, imported from their dist/ directories. The workspace package
 * names (@vmig/core, ...) are not resolvable from the repository root (only each package's
 * own node_modules links them), so the fuzzer imports the built entry points by path. Each
 * dist file resolves its own dependencies from its package's node_modules as usual.
 */
import { existsSync } from 'node:fs';
import { fileURLToPath, pathToFileURL } from 'node:url';

export const ROOT = fileURLToPath(new URL('../../', import.meta.url));
export const CLI_MAIN = `${ROOT}packages/cli/dist/main.js`;
export const FIXTURE_DIR = `${ROOT}packages/cli/test/fixtures/qemu-7.2-multifd-2ch/`;

const entry = (rel) => {
  const path = `${ROOT}${rel}`;
  if (!existsSync(path)) {
    throw new Error(`${rel} is missing: build first (cd ${ROOT} && npx -y pnpm@10.34.8 run build)`);
  }
  return pathToFileURL(path).href;
};

export const core = await import(entry('packages/core/dist/index.js'));
export const multifd = await import(entry('packages/multifd/dist/index.js'));
/** The multifd stream fixture (`@vmig/multifd/testing`). */
export const multifdTesting = await import(entry('packages/multifd/dist/testing.js'));
export const channel = await import(entry('packages/channel/dist/index.js'));
export const harness = await import(entry('packages/test-harness/dist/index.js'));
/** Not exported by vmig's index: the control server is imported from its module. */
export const control = await import(entry('packages/cli/dist/control.js'));
