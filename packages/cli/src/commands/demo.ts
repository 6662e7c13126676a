/**
 * `vmig demo`: both ends as separate processes on loopback, with writers, verified by
 * comparing the source's RAM digest at stop with the destination's after load.
 */
import { fileURLToPath } from 'node:url';
import { InvalidArgumentError } from '@vmig/core';
import { runMigrationPair } from '@vmig/test-harness';
import { parseCommandArgs } from '../args.js';
import { MIGRATE_OPTIONS, migrateSettings, SHARED_OPTIONS } from '../options.js';
import { fmtBytes, Output } from '../output.js';

const DEMO_DEFAULTS: Record<string, string | boolean> = { ram: '256M', writers: '2', 'dirty-rate': '32M', fill: 'random' };
/**
 * With --postcopy: switch after the first round, slow background pages after the switch and
 * time faults, so that the destination's writers do fault and the run shows it.
 */
const POSTCOPY_DEMO_DEFAULTS: Record<string, string | boolean> = { 'postcopy-after-rounds': '1', 'max-postcopy-bandwidth': '64M', 'postcopy-blocktime': true };

export async function demoCommand(argv: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs('demo', argv, MIGRATE_OPTIONS);
  if (positionals.length) throw new InvalidArgumentError(`demo: unexpected argument '${positionals[0]}' (demo picks its own URI)`);
  // Defaults for what the user did not say; then validate exactly as `migrate` will.
  const merged: Record<string, string | boolean | string[] | undefined> = { ...values };
  const defaults = { ...DEMO_DEFAULTS, ...(merged['postcopy'] ? POSTCOPY_DEMO_DEFAULTS : {}) };
  for (const [k, v] of Object.entries(defaults)) {
    if (merged[k] !== undefined || (k === 'ram' && merged['ram-block'] !== undefined)) continue;
    // `--writers 0`: a guest that does not write has no dirty rate.
    if (k === 'dirty-rate' && merged['writers'] === '0') continue;
    merged[k] = v;
  }
  const s = migrateSettings(merged);
  const out = new Output(s.json);

  const toArgs = (keys: readonly string[]): string[] => {
    const args: string[] = [];
    for (const k of keys) {
      const v = merged[k];
      if (k === 'json' || v === undefined || v === false) continue;
      if (v === true) args.push(`--${k}`);
      else if (Array.isArray(v)) for (const x of v) args.push(`--${k}`, x);
      else args.push(`--${k}`, v);
    }
    return args;
  };
  const cliMain = fileURLToPath(new URL('../main.js', import.meta.url));
  out.event({ event: 'demo', ram: s.ram, writers: s.writers, dirtyRate: s.dirtyRate }, `vmig demo: ${fmtBytes(s.ram.reduce((n, r) => n + r.size, 0))} of ${s.fill} RAM, ${s.writers} writer(s) at ${fmtBytes(s.dirtyRate)}/s, source and destination as two processes on loopback`);
  const { source, destination } = await runMigrationPair(cliMain, toArgs(Object.keys(SHARED_OPTIONS)), toArgs(Object.keys(MIGRATE_OPTIONS)), { stderr: 'inherit' });
  const src = source.report ?? { status: 'failed', error: { message: `source exited ${source.code}` } };
  const dst = destination.report ?? { status: 'failed', error: { message: `destination exited ${destination.code}` } };
  // The ITS-style device flushed its table into RAM after the stop: it must be there too.
  const its = (dst['devices'] as Record<string, { tableInRam?: boolean } | null> | undefined)?.['vmig-its'];
  // Postcopy: the destination's vCPUs wrote meanwhile, so its RAM with their stamps taken
  // out must equal the source's, and every stamp must be their last write (postcopy-verify.ts).
  const pc = dst['postcopy'] as { restoredDigest?: string; badStamps?: number } | undefined;
  const dstDigest = pc ? pc.restoredDigest : dst['ramDigest'];
  const verified =
    src['status'] === 'completed' &&
    dst['status'] === 'completed' &&
    typeof src['ramDigest'] === 'string' &&
    src['ramDigest'] === dstDigest &&
    (pc === undefined || pc.badStamps === 0) &&
    its?.tableInRam === true;
  const ram = src['ram'] as { total: number; transferred: number; dirtySyncCount: number } | undefined;
  out.report(
    { role: 'demo', verified, status: verified ? 'completed' : 'failed', source: src, destination: dst },
    verified
      ? `vmig demo: verified. ${fmtBytes(ram?.total ?? 0)} migrated in ${Number(src['totalTimeMs']).toFixed(0)} ms with ${s.writers} writer(s) running; downtime ${Number(src['downtimeMs']).toFixed(1)} ms; ${ram?.dirtySyncCount} dirty sync(s); ${fmtBytes(ram?.transferred ?? 0)} sent; ${pc ? `postcopy: ${String((dst['postcopy'] as Record<string, unknown>)['postcopyPages'])} pages after the switch, ${String((dst['postcopy'] as Record<string, unknown>)['postcopyRequests'])} requested, destination writes all kept; ` : ''}digests equal (${String(src['ramDigest'])})`
      : `vmig demo: NOT verified. source: ${String(src['status'])} ${JSON.stringify(src['error'] ?? '')}, destination: ${String(dst['status'])} ${JSON.stringify(dst['error'] ?? '')}, digests ${String(src['ramDigest'])} vs ${String(dstDigest)}${pc?.badStamps ? `, ${pc.badStamps} destination write(s) lost` : ''}`,
  );
  return verified ? 0 : 1;
}
