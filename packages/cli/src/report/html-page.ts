/**
 * One self-contained HTML page of charts: uPlot (MIT, ~50 KB) and its CSS inlined, the data
 * inlined as JSON, nothing fetched at view time. The page marks itself once drawn
 * (`<body data-charts="N" data-points="M">`) so that a headless browser can check it.
 */
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';

export interface ChartSpec {
  title: string;
  kind: 'line' | 'bars';
  xLabel: string;
  /** X values (numbers); with `xNames`, bars are drawn at 0..n-1 and named. */
  x: number[];
  xNames?: string[];
  series: { label: string; values: (number | null)[]; axis?: 'left' | 'right' }[];
  yLabel: string;
  yRightLabel?: string;
  /** Vertical marks (round ends). */
  marks?: number[];
  /** Shaded spans (downtime, postcopy, paused for recovery). */
  bands?: { from: number; to: number; label: string }[];
  /** The x axis ends here at least (the run's end). */
  xMax?: number;
}

/** A bar chart with one named bar (group) per item: the bars stand at 0..n-1, named `names`. */
export function barChart(title: string, xLabel: string, names: string[], series: ChartSpec['series'], yLabel: string, yRightLabel?: string): ChartSpec {
  return { title, kind: 'bars', xLabel, x: names.map((_, i) => i), xNames: names, series, yLabel, ...(yRightLabel ? { yRightLabel } : {}) };
}

export interface PageSpec {
  title: string;
  summary: [string, string][];
  charts: ChartSpec[];
  /** Said where a chart has nothing to draw in this run. */
  empty: string[];
}

function uplotAssets(): { js: string; css: string } {
  const require = createRequire(import.meta.url);
  const dist = dirname(require.resolve('uplot/dist/uPlot.iife.min.js'));
  return { js: readFileSync(join(dist, 'uPlot.iife.min.js'), 'utf8'), css: readFileSync(join(dist, 'uPlot.min.css'), 'utf8') };
}

const esc = (s: string): string => s.replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c]!);

/** The page's own script: draws each ChartSpec with uPlot. */
const DRAW = `
const COLORS = ['#1f6feb', '#d1242f', '#1a7f37', '#9a6700', '#8250df', '#bf3989'];
let points = 0;
const specs = JSON.parse(document.getElementById('charts-data').textContent);
for (const [i, c] of specs.entries()) {
  const el = document.createElement('section');
  el.className = 'chart';
  document.getElementById('charts').appendChild(el);
  const bars = c.kind === 'bars';
  const xs = c.xNames ? c.xNames.map((_, j) => j) : c.x;
  const series = [{ label: c.xLabel }].concat(c.series.map((s, j) => ({
    label: s.label,
    stroke: COLORS[j % COLORS.length],
    fill: bars ? COLORS[j % COLORS.length] + '99' : undefined,
    width: bars ? 1 : 2,
    scale: s.axis === 'right' ? 'r' : 'y',
    // Side by side: with two series, the first left of its tick and the second right of it.
    paths: bars ? uPlot.paths.bars({ size: [0.7 / c.series.length, 60], align: c.series.length === 1 ? 0 : j === 0 ? -1 : 1 }) : undefined,
    points: { show: !bars && xs.length < 40 },
  })));
  for (const s of c.series) points += s.values.filter((v) => v !== null).length;
  const axes = [
    { label: c.xLabel, values: c.xNames ? (u, ticks) => ticks.map((t) => c.xNames[t] ?? '') : undefined },
    { label: c.yLabel, scale: 'y' },
  ];
  if (c.yRightLabel) axes.push({ label: c.yRightLabel, scale: 'r', side: 1, grid: { show: false } });
  const draw = (u) => {
    const ctx = u.ctx;
    ctx.save();
    for (const b of c.bands ?? []) {
      const x0 = u.valToPos(b.from, 'x', true), x1 = u.valToPos(b.to, 'x', true);
      ctx.fillStyle = b.label === 'downtime' ? 'rgba(209,36,47,0.15)' : b.label === 'postcopy' ? 'rgba(130,80,223,0.12)' : 'rgba(154,103,0,0.18)';
      ctx.fillRect(x0, u.bbox.top, Math.max(2, x1 - x0), u.bbox.height);
      ctx.fillStyle = '#444';
      ctx.fillText(b.label, x0 + 3, u.bbox.top + 12);
    }
    ctx.strokeStyle = 'rgba(0,0,0,0.25)';
    ctx.setLineDash([4, 4]);
    for (const m of c.marks ?? []) {
      const x = u.valToPos(m, 'x', true);
      ctx.beginPath(); ctx.moveTo(x, u.bbox.top); ctx.lineTo(x, u.bbox.top + u.bbox.height); ctx.stroke();
    }
    ctx.restore();
  };
  new uPlot({
    title: c.title,
    width: Math.min(1100, window.innerWidth - 40),
    height: 300,
    scales: { x: { time: false, range: bars ? (u, min, max) => [min - 0.5, max + 0.5] : (u, min, max) => [0, Math.max(max, c.xMax ?? 0)] } },
    series,
    axes,
    hooks: { draw: [draw] },
  }, [xs].concat(c.series.map((s) => s.values)), el);
}
document.body.dataset.charts = String(specs.length);
document.body.dataset.points = String(points);
`;

export function renderPage(p: PageSpec): string {
  const { js, css } = uplotAssets();
  const rows = p.summary.map(([k, v]) => `<tr><th>${esc(k)}</th><td>${esc(v)}</td></tr>`).join('');
  const empty = p.empty.map((e) => `<p class="empty">${esc(e)}</p>`).join('');
  // JSON inside <script type="application/json">: only "</" could end it early.
  const data = JSON.stringify(p.charts).replace(/<\//g, '<\\/');
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>${esc(p.title)}</title>
<style>${css}
body { font: 14px system-ui, sans-serif; margin: 20px; color: #1f2328; background: #fff; }
table { border-collapse: collapse; margin: 12px 0 20px; } th, td { text-align: left; padding: 3px 14px 3px 0; } th { color: #57606a; font-weight: normal; }
section.chart { margin: 10px 0 26px; } .empty { color: #57606a; }
</style></head>
<body><h1>${esc(p.title)}</h1><table>${rows}</table><div id="charts"></div>${empty}
<script type="application/json" id="charts-data">${data}</script>
<script>${js}</script>
<script>${DRAW}</script>
</body></html>
`;
}
