/**
 * `vmig bench`: benchmark scenarios, each a real source and destination process over
 * loopback. Prints one JSON object per scenario, then a summary line. Timings are measured
 * here, never asserted in tests.
 */
import { fileURLToPath } from 'node:url';
import { InvalidArgumentError } from '@vmig/core';
import { runMigrationPair } from '@vmig/test-harness';
import { parseCommandArgs } from '../args.js';

interface Scenario {
  name: string;
  description: string;
  /** Flags for both ends (the RAM layout). */
  shared: string[];
  /** Flags for the source only. */
  source: string[];
}

function scenarios(ram: string): Scenario[] {
  return [
    { name: 'precopy-random-1ch', description: `${ram} random RAM, no writers, one channel`, shared: ['--ram', ram], source: ['--fill', 'random'] },
    { name: 'precopy-zero-1ch', description: `${ram} zero RAM, no writers, one channel`, shared: ['--ram', ram], source: ['--fill', 'zero'] },
    {
      name: 'precopy-random-writers-1ch',
      description: `${ram} random RAM, 2 writers at 50 MB/s, one channel`,
      shared: ['--ram', ram],
      source: ['--fill', 'random', '--writers', '2', '--dirty-rate', '50M'],
    },
  ];
}

const BENCH_OPTIONS = {
  scenario: { type: 'string', multiple: true },
  ram: { type: 'string' },
  repeat: { type: 'string' },
  list: { type: 'boolean' },
} as const;

export async function benchCommand(argv: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs('bench', argv, BENCH_OPTIONS);
  if (positionals.length) throw new InvalidArgumentError(`bench: unexpected argument '${positionals[0]}'`);
  const ram = (values['ram'] as string | undefined) ?? '1G';
  const all = scenarios(ram);
  if (values['list']) {
    for (const s of all) process.stdout.write(JSON.stringify({ name: s.name, description: s.description }) + '\n');
    return 0;
  }
  const wanted = (values['scenario'] as string[] | undefined) ?? all.map((s) => s.name);
  for (const w of wanted) if (!all.some((s) => s.name === w)) throw new InvalidArgumentError(`bench: unknown scenario '${w}' (see vmig bench --list)`);
  const repeat = values['repeat'] === undefined ? 1 : Number(values['repeat']);
  if (!Number.isInteger(repeat) || repeat < 1 || repeat > 20) throw new InvalidArgumentError('bench: --repeat must be 1..20');
  const cliMain = fileURLToPath(new URL('../main.js', import.meta.url));
  let failures = 0;
  for (const s of all.filter((x) => wanted.includes(x.name))) {
    for (let i = 0; i < repeat; i++) {
      const { source, destination } = await runMigrationPair(cliMain, s.shared, [...s.shared, ...s.source]);
      const src = source.report as Record<string, any> | undefined;
      const dst = destination.report as Record<string, any> | undefined;
      const ok = src?.status === 'completed' && dst?.status === 'completed' && src?.ramDigest === dst?.ramDigest;
      if (!ok) failures++;
      const total = src?.ram?.total ?? 0;
      process.stdout.write(
        JSON.stringify({
          scenario: s.name,
          description: s.description,
          run: i + 1,
          verified: ok,
          totalTimeMs: src?.totalTimeMs,
          downtimeMs: src?.downtimeMs,
          setupTimeMs: src?.setupTimeMs,
          throughputMBps: src?.totalTimeMs ? Math.round(total / 1e6 / (src.totalTimeMs / 1000)) : null,
          transferredBytes: src?.ram?.transferred,
          dirtySyncCount: src?.ram?.dirtySyncCount,
          source: src?.resources,
          destination: dst?.resources,
          error: src?.error ?? dst?.error,
        }) + '\n',
      );
    }
  }
  return failures ? 1 : 0;
}
