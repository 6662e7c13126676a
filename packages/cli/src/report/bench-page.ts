/** A bench series (the JSON lines `vmig bench` prints) as a page: each scenario's medians. */
import { barChart, type ChartSpec, type PageSpec } from './html-page.js';

type Json = Record<string, any>;

function median(xs: number[]): number | null {
  if (xs.length === 0) return null;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor((s.length - 1) / 2)]!;
}

export function benchPage(lines: Json[]): PageSpec {
  const byScenario = new Map<string, Json[]>();
  for (const l of lines) {
    if (typeof l['scenario'] !== 'string') continue;
    byScenario.set(l['scenario'], [...(byScenario.get(l['scenario']) ?? []), l]);
  }
  const names = [...byScenario.keys()];
  const med = (k: string): (number | null)[] => names.map((n) => median(byScenario.get(n)!.map((r) => r[k]).filter((v): v is number => typeof v === 'number')));
  const runs = lines.filter((l) => typeof l['scenario'] === 'string');
  const charts: ChartSpec[] =
    names.length === 0
      ? []
      : [
          barChart(
            'Total time and downtime (medians)',
            'scenario',
            names,
            [
              { label: 'total (ms)', values: med('totalTimeMs') },
              { label: 'downtime (ms)', values: med('downtimeMs'), axis: 'right' },
            ],
            'total ms',
            'downtime ms',
          ),
          barChart('Throughput (medians)', 'scenario', names, [{ label: 'MB/s', values: med('throughputMBps') }], 'MB/s'),
        ];
  return {
    title: `vmig bench: ${names.length} scenario(s), ${runs.length} run(s)`,
    summary: [
      ['runs verified', `${runs.filter((r) => r['verified']).length} of ${runs.length}`],
      ...names.map((n): [string, string] => [n, String(byScenario.get(n)![0]!['description'] ?? '')]),
    ],
    charts,
    empty: names.length === 0 ? ['No bench results in this input.'] : [],
  };
}
