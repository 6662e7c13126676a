/**
 * `vmig report` and `vmig bench --html`: one self-contained page, rendered in a real headless
 * browser (Debian's chromium): the charts are drawn with data, the screenshot is not blank.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PNG } from 'pngjs';
import { afterAll, describe, expect, it } from 'vitest';
import { runMigrationPair, spawnCli } from '@vmig/test-harness';
import { CHROMIUM, CLI_MAIN, haveChromium } from './cli.js';

const dir = mkdtempSync(join(tmpdir(), 'vmig-report-'));
const browser = haveChromium();
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function chromium(args: string[]): string {
  const r = spawnSync(CHROMIUM, ['--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars', `--user-data-dir=${join(dir, 'profile')}`, ...args], {
    encoding: 'utf8',
    timeout: 60_000,
    killSignal: 'SIGKILL',
  });
  if (r.status !== 0) throw new Error(`chromium exited ${r.status}: ${r.stderr}`);
  return r.stdout;
}

/** The page as the browser left it once its scripts ran: what it says it drew. */
function rendered(page: string): { charts: number; points: number } {
  const body = /<body[^>]*data-charts="(\d+)"[^>]*data-points="(\d+)"/.exec(chromium(['--dump-dom', `file://${page}`]));
  expect(body, 'the page script did not finish').not.toBeNull();
  return { charts: Number(body![1]), points: Number(body![2]) };
}

/** Share of pixels that are not the background, and how many colours there are. */
function ink(png: string): { inked: number; colours: number } {
  const img = PNG.sync.read(readFileSync(png));
  let inked = 0;
  const colours = new Set<number>();
  for (let i = 0; i < img.data.length; i += 4) {
    const [r, g, b] = [img.data[i]!, img.data[i + 1]!, img.data[i + 2]!];
    if (r < 245 || g < 245 || b < 245) inked++;
    colours.add((r << 16) | (g << 8) | b);
  }
  return { inked: inked / (img.width * img.height), colours: colours.size };
}

function selfContained(html: string): void {
  // Nothing fetched at view time: no external script, style, image or font.
  expect(html).not.toMatch(/<(script|link|img)[^>]+(src|href)=["']?(https?:)?\/\//i);
  expect(html).not.toMatch(/@import|url\(\s*["']?https?:/i);
}

describe.runIf(browser)('the report page in a headless browser', () => {
  it('vmig report: a postcopy run (both ends) becomes one page with every chart drawn', async () => {
    const { source, destination } = await runMigrationPair(
      CLI_MAIN,
      ['--multifd-channels', '2', '--postcopy', '--postcopy-blocktime'],
      ['--ram', '128M', '--multifd-channels', '2', '--writers', '2', '--dirty-rate', '64M', '--max-bandwidth', '100M', '--postcopy', '--postcopy-after-rounds', '2', '--max-postcopy-bandwidth', '32M'],
    );
    expect(source.code, source.stderr).toBe(0);
    expect(destination.code, destination.stderr).toBe(0);
    const src = join(dir, 'source.jsonl');
    const dst = join(dir, 'destination.jsonl');
    writeFileSync(src, source.lines.map((l) => JSON.stringify(l)).join('\n'));
    writeFileSync(dst, destination.lines.map((l) => JSON.stringify(l)).join('\n'));
    const page = join(dir, 'report.html');
    const r = await spawnCli(CLI_MAIN, ['report', src, dst, '-o', page]).done;
    expect(r.code, r.stderr).toBe(0);
    const html = readFileSync(page, 'utf8');
    selfContained(html);
    for (const title of ['Throughput', 'Remaining RAM and dirty rate', 'Each round', 'Postcopy fault latency', 'Bytes per multifd channel']) expect(html).toContain(title);

    const drawn = rendered(page);
    expect(drawn.charts).toBe(5);
    expect(drawn.points).toBeGreaterThan(20);
    const shot = join(dir, 'report.png');
    chromium([`--screenshot=${shot}`, '--window-size=1200,2400', `file://${page}`]);
    const { inked, colours } = ink(shot);
    expect(inked).toBeGreaterThan(0.02);
    expect(colours).toBeGreaterThan(20);
  });

  it('vmig bench --html: the same kind of page for a series', async () => {
    const page = join(dir, 'bench.html');
    const r = await spawnCli(CLI_MAIN, ['bench', '--scenario', 'multifd-random-2ch', '--scenario', 'multifd-zero-2ch', '--ram', '64M', '--html', page]).done;
    expect(r.code, r.stderr).toBe(0);
    selfContained(readFileSync(page, 'utf8'));
    const drawn = rendered(page);
    expect(drawn.charts).toBe(2);
    expect(drawn.points).toBeGreaterThanOrEqual(4);
    // `vmig report` reads bench output too.
    const lines = join(dir, 'bench.jsonl');
    writeFileSync(lines, r.lines.map((l) => JSON.stringify(l)).join('\n'));
    expect((await spawnCli(CLI_MAIN, ['report', lines, '-o', join(dir, 'bench2.html')]).done).code).toBe(0);
  });
});

describe('vmig report: bad input', () => {
  it('no file, no -o, a missing file, a file without a report: exit 2 with the reason', async () => {
    const empty = join(dir, 'empty.jsonl');
    writeFileSync(empty, '{"event":"status"}\nnot json\n');
    for (const [args, words] of [
      [[], 'expected one or more files'],
      [[empty], '-o FILE'],
      [[join(dir, 'nope.jsonl'), '-o', join(dir, 'x.html')], 'ENOENT'],
      [[empty, '-o', join(dir, 'x.html')], 'no report line'],
    ] as const) {
      const r = await spawnCli(CLI_MAIN, ['report', ...args]).done;
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.stderr).toContain(words);
    }
  });
});
