// Draws docs/benchmarks.md's pictures from `vmig bench` output (JSON lines), as SVG files:
//   ./vmig bench --repeat 3 > bench.jsonl && node scripts/bench-svg.mjs bench.jsonl docs/img
// One horizontal bar chart per figure (total time, downtime, throughput), the median of each
// scenario's runs, the scenario's name on its bar. Plain SVG, no dependency: it renders on
// GitHub and in any viewer.
import { readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';

const [input, outDir = 'docs/img'] = process.argv.slice(2);
if (!input) {
  console.error('usage: node scripts/bench-svg.mjs BENCH.jsonl [OUT_DIR]');
  process.exit(2);
}
const runs = readFileSync(input, 'utf8')
  .split('\n')
  .filter((l) => l.startsWith('{'))
  .map((l) => JSON.parse(l))
  .filter((r) => typeof r.scenario === 'string' && r.verified);
const byScenario = new Map();
for (const r of runs) byScenario.set(r.scenario, [...(byScenario.get(r.scenario) ?? []), r]);

const median = (xs) => {
  const s = xs.filter((x) => typeof x === 'number').sort((a, b) => a - b);
  return s.length ? s[Math.floor((s.length - 1) / 2)] : undefined;
};
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c]);

function barChart(title, unit, rows) {
  const W = 760;
  const row = 22;
  const left = 250;
  const top = 40;
  const max = Math.max(...rows.map((r) => r.value), 1);
  const h = top + rows.length * row + 30;
  const bars = rows
    .map((r, i) => {
      const y = top + i * row;
      const w = Math.max(1, ((W - left - 90) * r.value) / max);
      return `<text x="${left - 8}" y="${y + 15}" text-anchor="end">${esc(r.name)}</text>
<rect x="${left}" y="${y + 3}" width="${w.toFixed(1)}" height="${row - 6}" fill="#1f6feb" opacity="0.8"/>
<text x="${left + w + 6}" y="${y + 15}">${esc(r.label)}</text>`;
    })
    .join('\n');
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${h}" viewBox="0 0 ${W} ${h}" font-family="system-ui, sans-serif" font-size="12" fill="#1f2328">
<rect width="100%" height="100%" fill="#fff"/>
<text x="12" y="22" font-size="15" font-weight="600">${esc(title)}</text>
${bars}
<text x="${W - 12}" y="${h - 8}" text-anchor="end" fill="#57606a">median of ${esc(String(Math.min(...rows.map((r) => r.n))))}+ runs per scenario, ${esc(unit)}</text>
</svg>
`;
}

const figures = [
  { file: 'bench-total-time.svg', title: 'Total time per scenario (1 GiB unless named)', key: 'totalTimeMs', unit: 'ms', fmt: (v) => `${Math.round(v)} ms` },
  { file: 'bench-downtime.svg', title: 'Downtime per scenario', key: 'downtimeMs', unit: 'ms', fmt: (v) => `${v.toFixed(1)} ms` },
  { file: 'bench-throughput.svg', title: 'Throughput (RAM size / total time)', key: 'throughputMBps', unit: 'MB/s', fmt: (v) => `${Math.round(v)} MB/s` },
];
mkdirSync(outDir, { recursive: true });
for (const f of figures) {
  const rows = [...byScenario.entries()]
    .map(([name, rs]) => ({ name, value: median(rs.map((r) => r[f.key])), n: rs.length }))
    .filter((r) => r.value !== undefined)
    .map((r) => ({ ...r, label: f.fmt(r.value) }));
  if (rows.length === 0) continue;
  writeFileSync(join(outDir, f.file), barChart(f.title, f.unit, rows));
  console.log(`${join(outDir, f.file)}: ${rows.length} scenario(s)`);
}
