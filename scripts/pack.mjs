// Packs the publishable packages into tarballs that install with plain npm:
//   node scripts/pack.mjs [--no-build] [OUT_DIR]   (default: ./pack; after `pnpm install`)
//   cd some/empty/folder && npm install OUT_DIR/*.tgz && npx vmig demo
// pnpm pack turns the workspace: ranges into the packages' versions; each tarball holds
// its package.json, README/LICENSE and dist/ (the `files` field), nothing else.
import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync, readdirSync, rmSync } from 'node:fs';
import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
const args = process.argv.slice(2);
const build = !args.includes('--no-build');
const out = resolve(args.find((a) => !a.startsWith('--')) ?? `${root}pack`);
const PACKAGES = ['core', 'channel', 'multifd', 'migration', 'test-harness', 'cli'];

// A clean build: dist/ must hold only what the sources make today (--no-build: as it is).
for (const tscArgs of build ? [['-b', '--clean'], ['-b']] : []) {
  const r = spawnSync('npx', ['tsc', ...tscArgs, 'packages/cli', 'packages/test-harness'], { cwd: root, stdio: 'inherit' });
  if (r.status !== 0) process.exit(r.status ?? 1);
}
mkdirSync(out, { recursive: true });
for (const f of readdirSync(out)) if (f.endsWith('.tgz')) rmSync(`${out}/${f}`);
for (const p of PACKAGES) {
  const dir = `${root}packages/${p}`;
  copyFileSync(`${root}LICENSE`, `${dir}/LICENSE`);
  const r = spawnSync('npx', ['-y', 'pnpm@10.34.8', 'pack', '--pack-destination', out], { cwd: dir, stdio: ['ignore', 'pipe', 'inherit'], encoding: 'utf8' });
  rmSync(`${dir}/LICENSE`);
  if (r.status !== 0) process.exit(r.status ?? 1);
}
const tgz = readdirSync(out).filter((f) => f.endsWith('.tgz'));
console.log(`${tgz.length} tarballs in ${out}:\n${tgz.map((f) => `  ${f}`).join('\n')}`);
