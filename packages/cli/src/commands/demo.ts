/**
 * `vmig demo`: both ends as separate processes on loopback, with writers, verified by
 * comparing the source's RAM digest at stop with the destination's after load.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { InvalidArgumentError } from '@vmig/core';
import { closeRecoveryPair, injectPostcopyFaults, type PairResult, runMigrationPair, startRecoveryPair } from '@vmig/test-harness';
import { parseCommandArgs, parseIntFlag } from '../args.js';
import { DEMO_OPTIONS, MIGRATE_OPTIONS, migrateSettings, SHARED_OPTIONS } from '../options.js';
import { fmtBytes, Output } from '../output.js';

const DEMO_DEFAULTS: Record<string, string | boolean> = { ram: '256M', writers: '2', 'dirty-rate': '32M', fill: 'random' };
/**
 * With --postcopy: switch after the first round, slow background pages after the switch and
 * time faults, so that the destination's writers do fault and the run shows it.
 */
const POSTCOPY_DEMO_DEFAULTS: Record<string, string | boolean> = { 'postcopy-after-rounds': '1', 'max-postcopy-bandwidth': '64M', 'postcopy-blocktime': true };

export async function demoCommand(argv: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs('demo', argv, DEMO_OPTIONS);
  if (positionals.length) throw new InvalidArgumentError(`demo: unexpected argument '${positionals[0]}' (demo picks its own URI)`);
  const faultsFlag = values['postcopy-faults'];
  const faults = typeof faultsFlag === 'string' ? parseIntFlag('postcopy-faults', faultsFlag, 1, 20) : 0;
  if (faults > 0 && !values['postcopy']) throw new InvalidArgumentError('--postcopy-faults needs --postcopy');
  if (faults > 0 && values['control'] !== undefined) throw new InvalidArgumentError('--postcopy-faults: the demo makes its own control sockets (no --control)');
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
  const incomingArgs = toArgs(Object.keys(SHARED_OPTIONS));
  const migrateArgs = toArgs(Object.keys(MIGRATE_OPTIONS));
  let linkFailures: number | undefined;
  let pair: PairResult;
  if (faults === 0) pair = await runMigrationPair(cliMain, incomingArgs, migrateArgs, { stderr: 'inherit' });
  else {
    // Every channel through a proxy that resets the main connection after the switch; each
    // time both sides pause and are recovered over their control sockets (postcopy-faults.ts).
    const dir = mkdtempSync(join(tmpdir(), 'vmig-demo-'));
    const rp = await startRecoveryPair(cliMain, incomingArgs, migrateArgs, { dir, stderr: 'inherit' });
    try {
      linkFailures = await injectPostcopyFaults(rp, faults, 300, (i) =>
        out.event({ event: 'link-failure', n: i }, `vmig demo: link failure ${i} of ${faults}: the main connection reset; both sides pause, then recover (migrate-recover, migrate resume=true)`),
      );
      pair = { source: await rp.src.done, destination: await rp.dst.done };
    } finally {
      await closeRecoveryPair(rp);
      rmSync(dir, { recursive: true, force: true });
    }
  }
  const { source, destination } = pair;
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
    { role: 'demo', verified, status: verified ? 'completed' : 'failed', ...(linkFailures !== undefined ? { linkFailures } : {}), source: src, destination: dst },
    verified
      ? `vmig demo: verified. ${fmtBytes(ram?.total ?? 0)} migrated in ${Number(src['totalTimeMs']).toFixed(0)} ms with ${s.writers} writer(s) running; downtime ${Number(src['downtimeMs']).toFixed(1)} ms; ${ram?.dirtySyncCount} dirty sync(s); ${fmtBytes(ram?.transferred ?? 0)} sent; ${pc ? `postcopy: ${String((dst['postcopy'] as Record<string, unknown>)['postcopyPages'])} pages after the switch, ${String((dst['postcopy'] as Record<string, unknown>)['postcopyRequests'])} requested, destination writes all kept; ` : ''}${linkFailures !== undefined ? `${linkFailures} link failure(s) recovered; ` : ''}digests equal (${String(src['ramDigest'])})`
      : `vmig demo: NOT verified. source: ${String(src['status'])} ${JSON.stringify(src['error'] ?? '')}, destination: ${String(dst['status'])} ${JSON.stringify(dst['error'] ?? '')}, digests ${String(src['ramDigest'])} vs ${String(dstDigest)}${pc?.badStamps ? `, ${pc.badStamps} destination write(s) lost` : ''}`,
  );
  return verified ? 0 : 1;
}
