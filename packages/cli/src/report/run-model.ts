/**
 * What a report page shows, read from a run's `--json` lines (pure: no I/O). It takes the
 * output of `vmig migrate`, `vmig incoming` or `vmig demo` (whose report holds both ends), in
 * any combination: the source's report gives the rounds, phases and channels, its progress
 * lines the figures over time, the destination's report the postcopy fault latencies.
 */

type Json = Record<string, any>;

export interface SeriesPoint {
  /** Since the migration started (s). */
  t: number;
  mbps: number;
  remainingMiB: number;
  dirtyMiBps: number;
}

export interface RunModel {
  title: string;
  summary: [string, string][];
  /** Figures over time: the progress lines, then each round's end. */
  series: SeriesPoint[];
  rounds: { round: number; endS: number; mib: number; durationMs: number; expectedDowntimeMs: number }[];
  phases: { phase: string; startS: number; endS: number }[];
  channelsMiB: number[];
  latency: { bucketsMs: number[]; counts: number[] } | undefined;
}

const MiB = 2 ** 20;

export function parseRunLines(text: string): Json[] {
  const out: Json[] = [];
  for (const line of text.split('\n')) {
    const t = line.trim();
    if (!t.startsWith('{')) continue;
    try {
      out.push(JSON.parse(t) as Json);
    } catch {
      // A line cut by a crash: the rest of the run still tells its story.
    }
  }
  return out;
}

export function buildRunModel(lines: Json[]): RunModel {
  const reports = lines.filter((l) => l['event'] === 'report');
  const demo = reports.find((r) => r['role'] === 'demo');
  const source: Json | undefined = reports.find((r) => r['role'] === 'source') ?? demo?.['source'];
  const destination: Json | undefined = reports.find((r) => r['role'] === 'destination') ?? demo?.['destination'];
  if (!source && !destination) throw new Error('no report line from migrate, incoming or demo (run them with --json)');

  const series: SeriesPoint[] = [];
  for (const p of lines.filter((l) => l['event'] === 'progress' && l['ram'])) {
    series.push({ t: p['totalTimeMs'] / 1000, mbps: p['ram'].mbps, remainingMiB: p['ram'].remaining / MiB, dirtyMiBps: (p['ram'].dirtyPagesRate * p['ram'].pageSize) / MiB });
  }
  const timeline: Json = source?.['timeline'] ?? { rounds: [], phases: [] };
  const rounds = (timeline['rounds'] as Json[]).map((r) => ({
    round: r['round'],
    endS: (r['startMs'] + r['durationMs']) / 1000,
    mib: r['bytes'] / MiB,
    durationMs: r['durationMs'],
    expectedDowntimeMs: r['expectedDowntimeMs'],
    remainingMiB: (r['remainingBytes'] ?? 0) / MiB,
    dirtyMiBps: r['durationMs'] > 0 ? (r['dirtiedPages'] * 4096) / MiB / (r['durationMs'] / 1000) : 0,
    mbps: r['mbps'],
  }));
  // The start: everything to send, nothing sent yet.
  if (source?.['ram']?.total) series.push({ t: 0, mbps: 0, remainingMiB: source['ram'].total / MiB, dirtyMiBps: 0 });
  for (const r of rounds) series.push({ t: r.endS, mbps: r.mbps, remainingMiB: r.remainingMiB, dirtyMiBps: r.dirtyMiBps });
  series.sort((a, b) => a.t - b.t);
  const phases = (timeline['phases'] as Json[]).map((p) => ({ phase: p['phase'], startS: p['startMs'] / 1000, endS: (p['startMs'] + p['durationMs']) / 1000 }));

  const s = source ?? {};
  const summary: [string, string][] = [];
  const add = (k: string, v: unknown, unit = ''): void => {
    if (v !== undefined && v !== null) summary.push([k, `${typeof v === 'number' ? Math.round(v * 10) / 10 : String(v)}${unit}`]);
  };
  add('status', s['status'] ?? destination?.['status']);
  add('guest RAM', s['ram']?.total !== undefined ? s['ram'].total / MiB : destination?.['ram']?.total / MiB, ' MiB');
  add('total time', s['totalTimeMs'] ?? destination?.['totalTimeMs'], ' ms');
  add('downtime', s['downtimeMs'], ' ms');
  add('rounds (dirty-log syncs)', s['ram']?.dirtySyncCount);
  add('sent', s['ram']?.transferred !== undefined ? s['ram'].transferred / MiB : undefined, ' MiB');
  add('postcopy requests', destination?.['postcopy']?.postcopyRequests);
  add('fault latency p99', destination?.['postcopy']?.faultLatencyP99Ms, ' ms');
  if (s['error'] ?? destination?.['error']) add('error', `${(s['error'] ?? destination?.['error']).code}: ${(s['error'] ?? destination?.['error']).message}`);
  if (demo) add('verified', demo['verified'] ? 'yes: digests equal' : 'NO');

  return {
    title: `vmig ${demo ? 'demo' : source ? 'migration' : 'incoming migration'}: ${summary.find(([k]) => k === 'status')?.[1] ?? '?'}`,
    summary,
    series,
    rounds: rounds.map(({ round, endS, mib, durationMs, expectedDowntimeMs }) => ({ round, endS, mib, durationMs, expectedDowntimeMs })),
    phases,
    channelsMiB: ((s['multifdChannelBytes'] as number[] | undefined) ?? []).map((b) => b / MiB),
    latency: destination?.['postcopy']?.faultLatencyHistogram,
  };
}
