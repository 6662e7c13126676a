import { defineConfig } from 'vitest/config';

// Unit and protocol tests: packages/*/test/**/*.test.ts.
// End-to-end tests (real processes, real sockets): *.e2e.test.ts, run one file at a time
// because each spawns two processes that want both cores.
export default defineConfig({
  test: {
    fileParallelism: false,
    testTimeout: 120_000,
    hookTimeout: 60_000,
    projects: [
      { extends: true, test: { name: 'unit', include: ['packages/*/test/**/*.test.ts'], exclude: ['**/*.e2e.test.ts', '**/node_modules/**'] } },
      { extends: true, test: { name: 'e2e', include: ['packages/*/test/**/*.e2e.test.ts', 'examples/*/test/**/*.e2e.test.ts'], testTimeout: 300_000 } },
    ],
  },
});
