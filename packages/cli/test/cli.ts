import { fileURLToPath } from 'node:url';

/** The built CLI entry, as `./vmig` runs it. */
export const CLI_MAIN = fileURLToPath(new URL('../dist/main.js', import.meta.url));
