/**
 * `vmig bench --link PROFILE`: source and destination on two simulated hosts (test-harness's
 * NetnsLink: two network namespaces, a veth pair shaped by tbf, delay and loss by netem or a
 * proxy). Per profile: multifd over 1, 2, 4 and 8 channels; none, zlib and lz4 on text RAM;
 * convergence with writers dirtying at 25 % and 50 % of the link's rate, auto-converge off
 * and on. One JSON line per run: time, downtime against its limit, rounds, throughput.
 */
import { InvalidArgumentError } from '@vmig/core';
import { type CliProcess, LINK_PROFILES, NetnsLink, spawnCli } from '@vmig/test-harness';

export interface LinkCase {
  name: string;
  shared: string[];
  source: string[];
}

/** A run that has not converged after this long is stopped (it is reported, not waited for). */
const RUN_LIMIT_MS = 90_000;

export function linkCases(ram: string, rateMbit: number): LinkCase[] {
  const mf = (n: number): string[] => ['--ram', ram, '--multifd-channels', String(n)];
  const bytesPerSec = (rateMbit * 1e6) / 8;
  const cases: LinkCase[] = [];
  for (const n of [1, 2, 4, 8]) cases.push({ name: `link-random-${n}ch`, shared: mf(n), source: ['--fill', 'random'] });
  for (const c of ['none', 'zlib', 'lz4']) cases.push({ name: `link-text-${c}-2ch`, shared: [...mf(2), '--multifd-compression', c], source: ['--fill', 'text'] });
  for (const pct of [25, 50]) {
    for (const ac of [false, true]) {
      cases.push({
        name: `link-writers-${pct}pct${ac ? '-autoconverge' : ''}`,
        shared: mf(2),
        source: ['--fill', 'random', '--writers', '2', '--dirty-rate', String(Math.round((bytesPerSec * pct) / 100)), ...(ac ? ['--auto-converge'] : [])],
      });
    }
  }
  return cases;
}

/** Runs the cases (all, or those named in `wanted`) on each profile; returns the failures. */
export async function linkSeries(cliMain: string, profiles: string[], ram: string, wanted: string[] | undefined, repeat: number, emit: (r: Record<string, unknown>) => void): Promise<number> {
  if (!NetnsLink.available()) throw new InvalidArgumentError('bench --link needs root, ip (iproute2) and tc: it makes network namespaces');
  for (const p of profiles) if (!LINK_PROFILES[p]) throw new InvalidArgumentError(`bench --link: unknown profile '${p}' (${Object.keys(LINK_PROFILES).join(', ')})`);
  let failures = 0;
  for (const p of profiles) {
    const profile = LINK_PROFILES[p]!;
    const cases = linkCases(ram, profile.rateMbit).filter((c) => !wanted || wanted.includes(c.name));
    if (cases.length === 0) throw new InvalidArgumentError(`bench --link: no case named ${wanted?.join(', ')} (cases: ${linkCases(ram, 1).map((c) => c.name).join(', ')})`);
    const link = NetnsLink.create(profile);
    try {
      for (const c of cases) {
        for (let i = 0; i < repeat; i++) {
          const r = await runOnLink(cliMain, link, c);
          if (!r.verified) failures++;
          emit({ series: 'link', profile: profile.name, rateMbit: profile.rateMbit, delayMs: profile.delayMs, lossPct: profile.lossPct, delayBy: link.delayBy, case: c.name, run: i + 1, ...r });
        }
      }
    } finally {
      await link.destroy();
    }
  }
  return failures;
}

async function runOnLink(cliMain: string, link: NetnsLink, c: LinkCase): Promise<Record<string, unknown>> {
  let dst: CliProcess | undefined;
  let src: CliProcess | undefined;
  try {
    dst = spawnCli(cliMain, ['incoming', `tcp:${link.dstAddr}:0`, '--json', ...c.shared], { prefix: link.exec('dst', []) });
    const { uri } = (await dst.waitFor((l) => l['event'] === 'listening', 60_000)) as { uri: string };
    const port = await link.path(Number(uri.split(':').pop()));
    src = spawnCli(cliMain, ['migrate', `tcp:${link.dstAddr}:${port}`, '--json', ...c.shared, ...c.source], { prefix: link.exec('src', []) });
    const s = src;
    const limit = setTimeout(() => s.child.kill('SIGTERM'), RUN_LIMIT_MS);
    const [source, destination] = await Promise.all([src.done, dst.done]);
    clearTimeout(limit);
    const sr = source.report as Record<string, any> | undefined;
    const dr = destination.report as Record<string, any> | undefined;
    const verified = sr?.status === 'completed' && dr?.status === 'completed' && sr.ramDigest === dr.ramDigest;
    const limitMs = 300;
    return {
      verified,
      converged: sr?.status === 'completed',
      totalTimeMs: sr?.totalTimeMs,
      downtimeMs: sr?.downtimeMs,
      downtimeLimitMs: limitMs,
      downtimeWithinLimit: typeof sr?.downtimeMs === 'number' ? sr.downtimeMs <= limitMs : null,
      expectedDowntimeMs: sr?.expectedDowntimeMs,
      rounds: sr?.ram?.dirtySyncCount,
      cpuThrottlePercentage: sr?.cpuThrottlePercentage,
      throughputMBps: sr?.totalTimeMs ? Math.round(sr.ram.transferred / 1e6 / (sr.totalTimeMs / 1000)) : null,
      transferredBytes: sr?.ram?.transferred,
      ...(verified ? {} : { error: sr?.error ?? dr?.error ?? { message: `source exited ${source.code}, destination ${destination.code}` } }),
    };
  } finally {
    for (const p of [src, dst]) if (p && p.child.exitCode === null) p.child.kill('SIGKILL');
  }
}
