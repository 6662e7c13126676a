/**
 * `vmig report RUN.jsonl [MORE.jsonl ...] -o report.html`: one self-contained page from a run's
 * `--json` output (migrate, incoming, demo; the source's and the destination's may be given
 * together), or from `vmig bench` output.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { InvalidArgumentError } from '@vmig/core';
import { parseCommandArgs } from '../args.js';
import { benchPage } from '../report/bench-page.js';
import { renderPage } from '../report/html-page.js';
import { buildRunModel, parseRunLines } from '../report/run-model.js';
import { runPage } from '../report/run-page.js';

export const REPORT_OPTIONS = {
  output: { type: 'string', short: 'o' },
} as const;

export async function reportCommand(argv: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs('report', argv, REPORT_OPTIONS);
  if (positionals.length === 0) throw new InvalidArgumentError('report: expected one or more files of --json output (vmig report RUN.jsonl -o report.html)');
  const out = values['output'] as string | undefined;
  if (!out) throw new InvalidArgumentError('report: -o FILE (where the page goes) is required');
  const lines = positionals.flatMap((f) => {
    try {
      return parseRunLines(readFileSync(f, 'utf8'));
    } catch (e) {
      throw new InvalidArgumentError(`report: cannot read '${f}': ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
    }
  });
  const isBench = lines.some((l) => typeof l['scenario'] === 'string') && !lines.some((l) => l['event'] === 'report');
  let page;
  try {
    page = isBench ? benchPage(lines) : runPage(buildRunModel(lines));
  } catch (e) {
    throw new InvalidArgumentError(`report: ${(e as Error).message}`);
  }
  writeFileSync(out, renderPage(page));
  process.stderr.write(`vmig: report written to ${out} (${page.charts.length} chart(s))\n`);
  return 0;
}
