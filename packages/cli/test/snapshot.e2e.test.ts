/**
 * Background snapshot and restore through the real CLI, with writer threads running: the
 * file must equal RAM at the stop (digests taken at the stop with --verify vs the digest of
 * what `restore` loads), in both modes, and failures must leave the writers running.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { spawnCli } from '@vmig/test-harness';
import { CLI_MAIN } from './cli.js';

type Json = Record<string, any>;
const dir = mkdtempSync(join(tmpdir(), 'vmig-snap-'));

async function snapshot(file: string, args: string[]): Promise<{ code: number | null; report: Json | undefined }> {
  const run = await spawnCli(CLI_MAIN, ['snapshot', file, '--json', ...args]).done;
  return { code: run.code, report: run.report };
}

async function restore(file: string): Promise<{ code: number | null; report: Json | undefined }> {
  const run = await spawnCli(CLI_MAIN, ['restore', file, '--json']).done;
  return { code: run.code, report: run.report };
}

describe('background snapshot', () => {
  const cases: [string, string[]][] = [
    ['blocking faults, hot set at a high rate', ['--pattern', 'hot', '--hot-pages', '512', '--dirty-rate', '200M']],
    ['blocking faults, uniform pages', ['--pattern', 'uniform', '--dirty-rate', '100M']],
    ['copy-on-write buffer, hot set at a high rate', ['--pattern', 'hot', '--hot-pages', '512', '--dirty-rate', '200M', '--snapshot-cow-buffer', '4M']],
    ['copy-on-write buffer, uniform pages', ['--pattern', 'uniform', '--dirty-rate', '100M', '--snapshot-cow-buffer', '4M']],
  ];
  for (const [name, args] of cases) {
    it(`${name}: restore reproduces RAM as it was at the stop`, async () => {
      const file = join(dir, `${name.replace(/\W+/g, '-')}.snap`);
      const s = await snapshot(file, ['--ram', '128M', '--writers', '2', '--verify', ...args]);
      expect(s.code, JSON.stringify(s.report?.['error'])).toBe(0);
      const r = s.report!;
      expect(r['status']).toBe('completed');
      expect(typeof r['ramDigest']).toBe('string');
      // The writers did hit protected pages: the write-protect path was exercised.
      const wp = r['writeProtect'];
      expect(wp.faultsBlocking + wp.faultsCow).toBeGreaterThan(0);
      if (args.includes('--snapshot-cow-buffer')) expect(r['ram'].pagesByCow).toBeGreaterThan(0);
      else expect(r['ram'].pagesByCow).toBe(0);
      expect(r['ram'].pagesByScan + r['ram'].pagesByFault + r['ram'].pagesByCow).toBe(32768);
      expect(r['writeProtect'].stallCount).toBeGreaterThan(0);
      expect(r['writersResumed']).toBe(true);

      const l = await restore(file);
      expect(l.code, JSON.stringify(l.report?.['error'])).toBe(0);
      // Equal although the writers kept writing during the whole pass.
      expect(l.report?.['ramDigest']).toBe(r['ramDigest']);
      expect(l.report?.['devices']['vmig-its'].tableInRam).toBe(true);
    });
  }

  it('a full copy-on-write buffer falls back to blocking faults, still exact', async () => {
    const file = join(dir, 'tiny-cow.snap');
    const s = await snapshot(file, ['--ram', '64M', '--writers', '2', '--pattern', 'uniform', '--dirty-rate', '200M', '--snapshot-cow-buffer', '4K', '--verify']);
    expect(s.code, JSON.stringify(s.report?.['error'])).toBe(0);
    expect(s.report?.['writeProtect'].cowBufferFull).toBeGreaterThan(0);
    expect(s.report?.['ram'].pagesByFault).toBeGreaterThan(0);
    expect((await restore(file)).report?.['ramDigest']).toBe(s.report?.['ramDigest']);
  });

  it('restore --dump-ram writes the RAM', async () => {
    const file = join(dir, 'small.snap');
    const s = await snapshot(file, ['--ram', '4M', '--fill', 'text']);
    expect(s.code).toBe(0);
    const dump = join(dir, 'small.ram');
    const run = spawnSync(process.execPath, [CLI_MAIN, 'restore', file, '--dump-ram', dump], { encoding: 'utf8' });
    expect(run.status).toBe(0);
    expect(statSync(dump).size).toBe(4 << 20);
  });

  it('a file that fills up (no space): failed with VMIG_ERR_SNAPSHOT_IO, writers keep running', async () => {
    const s = await snapshot('/dev/full', ['--ram', '64M', '--writers', '2', '--dirty-rate', '100M', '--pattern', 'hot']);
    expect(s.code).toBe(1);
    expect(s.report?.['status']).toBe('failed');
    expect(s.report?.['error'].code).toBe('VMIG_ERR_SNAPSHOT_IO');
    expect(s.report?.['error'].message).toContain('ENOSPC');
    expect(s.report?.['writersResumed']).toBe(true);
  });

  it('a file that cannot be created: failed with VMIG_ERR_SNAPSHOT_IO', async () => {
    const s = await snapshot(join(dir, 'no-such-dir', 'x.snap'), ['--ram', '4M']);
    expect(s.code).toBe(1);
    expect(s.report?.['error'].code).toBe('VMIG_ERR_SNAPSHOT_IO');
  });
});

describe('restore of a bad file', () => {
  it('truncated, corrupted, missing: clear errors with stable codes', async () => {
    const file = join(dir, 'good.snap');
    const s = await snapshot(file, ['--ram', '8M', '--fill', 'random']);
    expect(s.code).toBe(0);
    const bytes = readFileSync(file);

    const truncated = join(dir, 'truncated.snap');
    writeFileSync(truncated, bytes.subarray(0, Math.floor(bytes.length / 2)));
    const t = await restore(truncated);
    expect(t.code).toBe(1);
    expect(t.report?.['error'].code).toBe('VMIG_ERR_STREAM_TRUNCATED');

    const badMagic = join(dir, 'magic.snap');
    const m = Buffer.from(bytes);
    m[0] ^= 0xff;
    writeFileSync(badMagic, m);
    expect((await restore(badMagic)).report?.['error'].code).toBe('VMIG_ERR_STREAM_MAGIC');

    // A page record in the middle with its flags smashed.
    const corrupt = join(dir, 'corrupt.snap');
    const c = Buffer.from(bytes);
    // The first 'pc.ram' is in the block list of the setup section; the second names the
    // block of the first page record (u64 offset|flags, u8 length, idstr).
    const at = c.indexOf(Buffer.from('pc.ram'), c.indexOf(Buffer.from('pc.ram')) + 1) - 9;
    c.writeUInt32BE(0xdeadbeef, at);
    c.writeUInt32BE(0xdeadbeef, at + 4);
    writeFileSync(corrupt, c);
    const k = await restore(corrupt);
    expect(k.code).toBe(1);
    expect(k.report?.['status']).toBe('failed');
    expect(String(k.report?.['error'].code)).toMatch(/^VMIG_ERR_(STREAM_FORMAT|BAD_OFFSET|UNKNOWN_BLOCK)$/);

    const missing = await restore(join(dir, 'missing.snap'));
    expect(missing.code).toBe(1);
    expect(missing.report?.['error'].code).toBe('VMIG_ERR_SNAPSHOT_IO');
  });

  it('options that make no sense with a snapshot are refused, exit 2', () => {
    for (const args of [
      ['snapshot', 'tcp:127.0.0.1:4444', '--ram', '4M'],
      ['snapshot', 'unix:/tmp/x', '--ram', '4M'],
      ['snapshot', join(dir, 'x.snap'), '--ram', '4M', '--postcopy'],
      ['snapshot', join(dir, 'x.snap'), '--ram', '4M', '--multifd-channels', '2'],
      ['snapshot', join(dir, 'x.snap'), '--ram', '4M', '--auto-converge'],
      ['snapshot', join(dir, 'x.snap'), '--ram', '4M', '--snapshot-cow-buffer', '1000'],
      ['snapshot', join(dir, 'x.snap')],
      ['restore'],
    ]) {
      const r = spawnSync(process.execPath, [CLI_MAIN, ...args], { encoding: 'utf8' });
      expect(r.status, args.join(' ')).toBe(2);
      expect(r.stderr.trim().split('\n'), args.join(' ')).toHaveLength(1);
    }
  });
});
