/** A run's page (run-model.ts) as charts (html-page.ts). */
import { barChart, type ChartSpec, type PageSpec } from './html-page.js';
import type { RunModel } from './run-model.js';

export function runPage(m: RunModel): PageSpec {
  const charts: ChartSpec[] = [];
  const empty: string[] = [];
  const t = m.series.map((p) => p.t);
  const marks = m.rounds.map((r) => r.endS);
  const xMax = Math.max(0, ...m.phases.map((p) => p.endS));
  const bands = m.phases
    .filter((p) => p.phase === 'stop-and-copy' || p.phase === 'postcopy' || p.phase === 'postcopy-paused')
    .map((p) => ({ from: p.startS, to: p.endS, label: p.phase === 'stop-and-copy' ? 'downtime' : p.phase === 'postcopy' ? 'postcopy' : 'paused (recovery)' }));
  if (m.series.length > 0) {
    charts.push({
      title: 'Throughput (rounds dashed, downtime and postcopy shaded)',
      kind: 'line',
      xLabel: 'time (s)',
      x: t,
      series: [{ label: 'Mbit/s', values: m.series.map((p) => p.mbps) }],
      yLabel: 'Mbit/s',
      marks,
      bands,
      xMax,
    });
    charts.push({
      title: 'Remaining RAM and dirty rate',
      kind: 'line',
      xLabel: 'time (s)',
      x: t,
      series: [
        { label: 'remaining (MiB)', values: m.series.map((p) => p.remainingMiB) },
        { label: 'dirtied (MiB/s)', values: m.series.map((p) => p.dirtyMiBps), axis: 'right' },
      ],
      yLabel: 'MiB',
      yRightLabel: 'MiB/s',
      marks,
      bands,
      xMax,
    });
  } else empty.push('No figures over time: the run printed no progress and no rounds.');
  if (m.rounds.length > 0) {
    charts.push(
      barChart(
        'Each round: bytes sent and expected downtime at its end',
        'round',
        m.rounds.map((r) => String(r.round)),
        [
          { label: 'sent (MiB)', values: m.rounds.map((r) => r.mib) },
          { label: 'expected downtime (ms)', values: m.rounds.map((r) => r.expectedDowntimeMs), axis: 'right' },
        ],
        'MiB',
        'ms',
      ),
    );
  }
  if (m.latency) {
    const names = m.latency.bucketsMs.map((b) => `<=${b}`).concat([`>${m.latency.bucketsMs.at(-1)}`]);
    charts.push(barChart('Postcopy fault latency (destination vCPUs)', 'latency (ms)', names, [{ label: 'faults', values: m.latency.counts }], 'faults'));
  } else empty.push('No postcopy fault latencies (a postcopy run with --postcopy-blocktime, and the destination\'s output, have them).');
  if (m.channelsMiB.length > 0) {
    charts.push(barChart('Bytes per multifd channel', 'channel', m.channelsMiB.map((_, i) => String(i)), [{ label: 'MiB', values: m.channelsMiB }], 'MiB'));
  }
  return { title: m.title, summary: m.summary, charts, empty };
}
