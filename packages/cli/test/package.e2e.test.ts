// The published shape: the tarballs of scripts/pack.mjs install with plain npm into an empty
// folder, `npx vmig demo` runs there, and the library imports (and type-checks) as `vmig`.
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, expect, it } from 'vitest';

const ROOT = fileURLToPath(new URL('../../../', import.meta.url));
const dir = mkdtempSync(join(tmpdir(), 'vmig-package-'));
const tarballs = join(dir, 'tarballs');
const app = join(dir, 'app');

const run = (cmd: string, args: string[], cwd: string, timeout = 120_000) => {
  const r = spawnSync(cmd, args, { cwd, encoding: 'utf8', timeout, killSignal: 'SIGKILL' });
  return { code: r.status, out: r.stdout, err: r.stderr };
};

beforeAll(() => {
  const p = run(process.execPath, [join(ROOT, 'scripts/pack.mjs'), '--no-build', tarballs], ROOT);
  expect(p.code, p.err).toBe(0);
  mkdirSync(app);
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'app', private: true, type: 'module' }));
  const tgz = readdirSync(tarballs).map((f) => join(tarballs, f));
  const i = run('npm', ['install', '--no-audit', '--no-fund', ...tgz], app, 300_000);
  expect(i.code, i.err).toBe(0);
}, 400_000);

afterAll(() => rmSync(dir, { recursive: true, force: true }));

it('each tarball holds its package.json, LICENSE and built code only, with versions for workspace ranges', () => {
  for (const f of readdirSync(tarballs)) {
    const list = run('tar', ['tzf', join(tarballs, f)], dir).out.trim().split('\n');
    expect(list, f).toContain('package/LICENSE');
    expect(list, f).toContain('package/package.json');
    expect(list.filter((e) => !/^package\/(LICENSE|package\.json|dist\/.*\.(js|d\.ts))$/.test(e)), f).toEqual([]);
    const pkg = run('tar', ['xzf', join(tarballs, f), '-O', 'package/package.json'], dir).out;
    expect(pkg, f).not.toContain('workspace:');
    expect(JSON.parse(pkg).license, f).toBe('MIT');
  }
});

it('npx vmig --version and npx vmig demo work in the folder it was installed in', () => {
  const v = run('npx', ['vmig', '--version'], app);
  expect(v.code, v.err).toBe(0);
  expect(v.out).toMatch(/^vmig \d+\.\d+\.\d+/);
  const d = run('npx', ['vmig', 'demo', '--ram', '64M'], app);
  expect(d.code, d.err).toBe(0);
  expect(d.out).toContain('verified');
});

it("the library: migrate() into incoming() between two of the app's own processes, RAM byte-equal, and its types check", () => {
  // The destination: prints where it listens, then a digest of what it received.
  writeFileSync(
    join(app, 'dst.mjs'),
    `import { createHash } from 'node:crypto';
import { incoming } from 'vmig';
const dst = await incoming({ uri: 'tcp:127.0.0.1:0', multifdChannels: 2 });
console.log(dst.uri);
const r = await dst.done;
console.log(createHash('sha256').update(r.ram.block('kv').host).digest('hex'));
`,
  );
  // The source: its own RAM and a vm that has no threads.
  writeFileSync(
    join(app, 'src.mjs'),
    `import { spawn } from 'node:child_process';
import { createHash, randomFillSync } from 'node:crypto';
import { createInterface } from 'node:readline';
import { GuestRam, migrate } from 'vmig';
const ram = GuestRam.create([{ name: 'kv', size: 8 * 2 ** 20 }]);
randomFillSync(ram.block('kv').host);
const child = spawn(process.execPath, ['dst.mjs'], { stdio: ['ignore', 'pipe', 'inherit'] });
const lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
const uri = (await lines.next()).value;
const info = await migrate({ uri, ram, vm: { stop: async () => {}, resume: () => {} }, multifdChannels: 2 }).done;
const theirs = (await lines.next()).value;
const mine = createHash('sha256').update(ram.block('kv').host).digest('hex');
console.log(JSON.stringify({ status: info.status, equal: mine === theirs }));
`,
  );
  const r = run(process.execPath, ['src.mjs'], app, 60_000);
  expect(r.code, r.err).toBe(0);
  expect(JSON.parse(r.out)).toEqual({ status: 'completed', equal: true });

  writeFileSync(
    join(app, 'typed.ts'),
    `import { GuestRam, incoming, migrate, VmigError, type IncomingResult, type MigrationInfo } from 'vmig';
import { MissingPagesVcpu } from 'vmig/vcpu';
const ram: GuestRam = GuestRam.create([{ name: 'kv', size: 4096 }]);
ram.block('kv').markDirty(0, 10);
export async function f(): Promise<[MigrationInfo, IncomingResult]> {
  const dst = await incoming({ uri: 'tcp:127.0.0.1:0' });
  const src = migrate({ uri: dst.uri, ram, vm: { stop: async () => {}, resume: () => {} }, downtimeLimitMs: 50 });
  src.on('progress', (i) => i.ram.remaining);
  return [await src.done, await dst.done];
}
export const e: VmigError | undefined = undefined;
export const v: typeof MissingPagesVcpu = MissingPagesVcpu;
// @ts-expect-error a misspelt option is a type error
migrate({ uri: '', ram, vm: { stop: async () => {}, resume: () => {} }, multifdChanels: 2 });
`,
  );
  const tsc = join(ROOT, 'node_modules/typescript/bin/tsc');
  const t = run(process.execPath, [tsc, '--noEmit', '--strict', '--module', 'nodenext', '--moduleResolution', 'nodenext', '--target', 'es2022', '--typeRoots', join(ROOT, 'node_modules/@types'), '--types', 'node', 'typed.ts'], app);
  expect(t.code, t.out + t.err).toBe(0);
});
