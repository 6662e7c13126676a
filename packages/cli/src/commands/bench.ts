/**
 * `vmig bench`: benchmark scenarios, each a real source and destination process over
 * loopback. Prints one JSON object per run. With --repeat, run i of every scenario comes
 * before run i+1 of any, so that a drift of the machine hits them all alike. Timings are
 * measured here, never asserted in tests.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { InvalidArgumentError, toVmigError } from '@vmig/core';
import { makeTlsCreds, measureWriteRate, runMigrationPair, spawnCli } from '@vmig/test-harness';
import { parseCommandArgs, parseSize } from '../args.js';
import { linkSeries } from './bench-link.js';
import { haveQemu, makeRandomMemFile, QEMU, runQemuPair } from './qemu-pair.js';
import { type PostcopyGuest, postcopyFigures, PostcopySeries } from './bench-postcopy.js';
import { benchPage } from '../report/bench-page.js';
import { renderPage } from '../report/html-page.js';

interface Scenario {
  name: string;
  description: string;
  /** Flags for both ends (the RAM layout). */
  shared: string[];
  /** Flags for the source only. */
  source: string[];
  /**
   * Flags for the destination in place of `shared` (the default): without `--ram` it builds
   * its RAM from the stream's block list, as every destination of a QEMU source does.
   */
  destination?: string[];
  /** A background snapshot to a temporary file instead of a migration. */
  snapshot?: boolean;
  /** TLS on every channel, with credentials made for the run (openssl). */
  tls?: boolean;
  /** The same migration QEMU 7.2 can run (`--vs-qemu`): its RAM and its channels. */
  qemu?: { fill: 'random' | 'zero'; channels: number; destinationPrealloc?: boolean };
  /** Postcopy: the writers that run on at the destination (hot pattern), measured with no migration too. */
  guest?: PostcopyGuest;
}

/** The postcopy scenarios' guest: 2 writers dirtying a 128 MiB hot set at 400 MB/s. */
const POSTCOPY_GUEST = { writers: 2, dirtyRate: '400M', hotPages: 32768 };
/** How long the same writers are counted with no migration (ms), before each postcopy run. */
const NO_MIGRATION_MS = 1000;

function scenarios(ram: string): Scenario[] {
  const mf = (n: number): string[] => ['--ram', ram, '--multifd-channels', String(n)];
  return [
    { name: 'precopy-random-1ch', description: `${ram} random RAM, no writers, main channel only`, shared: ['--ram', ram], source: ['--fill', 'random'], qemu: { fill: 'random', channels: 0 } },
    { name: 'precopy-zero-1ch', description: `${ram} zero RAM, no writers, main channel only`, shared: ['--ram', ram], source: ['--fill', 'zero'], qemu: { fill: 'zero', channels: 0 } },
    { name: 'multifd-random-1ch', description: `${ram} random RAM, 1 multifd channel`, shared: mf(1), source: ['--fill', 'random'], qemu: { fill: 'random', channels: 1 } },
    { name: 'multifd-random-2ch', description: `${ram} random RAM, 2 multifd channels`, shared: mf(2), source: ['--fill', 'random'], qemu: { fill: 'random', channels: 2 } },
    { name: 'multifd-random-4ch', description: `${ram} random RAM, 4 multifd channels`, shared: mf(4), source: ['--fill', 'random'], qemu: { fill: 'random', channels: 4 } },
    { name: 'multifd-random-2ch-tls', description: `${ram} random RAM, 2 multifd channels, TLS on every channel`, shared: mf(2), source: ['--fill', 'random'], tls: true },
    { name: 'multifd-random-2ch-integrity', description: `${ram} random RAM, 2 multifd channels, --integrity (range digests at the stop, both sides)`, shared: [...mf(2), '--integrity'], source: ['--fill', 'random'] },
    { name: 'multifd-zero-2ch', description: `${ram} zero RAM, 2 multifd channels (zero pages found by the channels)`, shared: mf(2), source: ['--fill', 'zero'], qemu: { fill: 'zero', channels: 2 } },
    // The destination as QEMU's usually is: RAM not allocated before the stream names it
    // (vmig: no --ram; QEMU: prealloc=off). Fresh pages are faulted in by whoever writes them.
    ...(['random', 'zero'] as const).map((fill) => ({
      name: `multifd-${fill}-2ch-stream`,
      description: `${ram} ${fill} RAM, 2 multifd channels, the destination's RAM built from the stream (no --ram; QEMU: prealloc=off)`,
      shared: mf(2),
      destination: ['--multifd-channels', '2'],
      source: ['--fill', fill],
      qemu: { fill, channels: 2, destinationPrealloc: false },
    })),
    {
      name: 'multifd-text-none-200M',
      description: `${ram} text RAM, 2 channels, no compression, --max-bandwidth 200M`,
      shared: mf(2),
      source: ['--fill', 'text', '--max-bandwidth', '200M'],
    },
    {
      name: 'multifd-text-lz4-200M',
      description: `${ram} text RAM, 2 channels, lz4, --max-bandwidth 200M`,
      shared: [...mf(2), '--multifd-compression', 'lz4'],
      source: ['--fill', 'text', '--max-bandwidth', '200M'],
    },
    {
      name: 'multifd-random-writers-2ch',
      description: `${ram} random RAM, 2 channels, 2 writers at 50 MB/s`,
      shared: mf(2),
      source: ['--fill', 'random', '--writers', '2', '--dirty-rate', '50M'],
    },
    ...(
      [
        [false, '', false, false],
        [true, '', false, false],
        [true, '', true, false],
        [true, '100M', false, false],
        [true, '', false, true],
      ] as const
    ).map(([preempt, cap, threadReads, tls]) => ({
      name: `postcopy-hot-2ch${preempt ? '-preempt' : ''}${threadReads ? '-thread' : ''}${cap ? `-${cap}` : ''}${tls ? '-tls' : ''}`,
      tls,
      description: `${ram} random RAM, 2 channels, 2 writers dirtying a 128 MiB hot set at 400 MB/s against --max-bandwidth 300M (no convergence), postcopy after 2 rounds, preempt ${preempt ? `on (read by ${threadReads ? 'the preempt thread alone' : 'the faulting vCPUs'})` : 'off'}, background pages after the switch ${cap ? `capped at ${cap}` : 'unlimited'}${tls ? ', TLS on every channel' : ''}`,
      shared: [...mf(2), '--postcopy', '--postcopy-blocktime', ...(preempt ? ['--postcopy-preempt'] : []), ...(threadReads ? ['--postcopy-preempt-reader', 'thread'] : [])],
      guest: { writers: POSTCOPY_GUEST.writers, dirtyRate: parseSize('dirty-rate', POSTCOPY_GUEST.dirtyRate), hotPages: POSTCOPY_GUEST.hotPages },
      source: [
        ...['--fill', 'random', '--writers', String(POSTCOPY_GUEST.writers), '--dirty-rate', POSTCOPY_GUEST.dirtyRate, '--pattern', 'hot', '--hot-pages', String(POSTCOPY_GUEST.hotPages)],
        ...['--max-bandwidth', '300M', '--downtime-limit', '50', '--postcopy-after-rounds', '2'],
        ...(cap ? ['--max-postcopy-bandwidth', cap] : []),
      ],
    })),
    {
      name: 'snapshot-writers-100M',
      description: `background snapshot of ${ram} random RAM, 2 writers at 100 MB/s, blocking write faults`,
      shared: ['--ram', ram],
      source: ['--fill', 'random', '--writers', '2', '--dirty-rate', '100M'],
      snapshot: true,
    },
    {
      name: 'snapshot-writers-100M-cow',
      description: `background snapshot of ${ram} random RAM, 2 writers at 100 MB/s, 64 MiB copy-on-write buffer`,
      shared: ['--ram', ram],
      source: ['--fill', 'random', '--writers', '2', '--dirty-rate', '100M', '--snapshot-cow-buffer', '64M'],
      snapshot: true,
    },
  ];
}

export const BENCH_OPTIONS = {
  scenario: { type: 'string', multiple: true },
  html: { type: 'string' },
  'vs-qemu': { type: 'boolean' },
  sizes: { type: 'string' },
  link: { type: 'string' },
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
  if (values['link'] === undefined) for (const w of wanted) if (!all.some((s) => s.name === w)) throw new InvalidArgumentError(`bench: unknown scenario '${w}' (see vmig bench --list)`);
  const repeat = values['repeat'] === undefined ? 1 : Number(values['repeat']);
  if (!Number.isInteger(repeat) || repeat < 1 || repeat > 20) throw new InvalidArgumentError('bench: --repeat must be 1..20');
  const cliMain = fileURLToPath(new URL('../main.js', import.meta.url));
  let failures = 0;
  let tlsDir: string | undefined;
  const tlsFlags = (): string[] => {
    tlsDir ??= mkdtempSync(join(tmpdir(), 'vmig-bench-tls-'));
    return ['--tls-creds', makeTlsCreds(tlsDir)];
  };
  if (values['sizes'] !== undefined) return growthSeries(cliMain, String(values['sizes']), repeat);
  if (values['link'] !== undefined) {
    const profiles = String(values['link']).split(',');
    const failures = await linkSeries(cliMain, profiles, (values['ram'] as string | undefined) ?? '256M', values['scenario'] as string[] | undefined, repeat, emit);
    const html = values['html'] as string | undefined;
    if (html) writeFileSync(html, renderPage(benchPage(results)));
    return failures === 0 ? 0 : 1;
  }
  const vsQemu = values['vs-qemu'] === true;
  if (vsQemu && !haveQemu()) throw new InvalidArgumentError(`bench --vs-qemu needs ${QEMU} (Debian: apt-get install qemu-system-x86)`);
  // With --vs-qemu: the scenarios QEMU can run too (no writers), each run alternating with QEMU's.
  const chosen = all.filter((x) => wanted.includes(x.name) && (!vsQemu || x.qemu));
  if (chosen.length === 0) throw new InvalidArgumentError('bench --vs-qemu: none of these scenarios is one QEMU can run (see --list: precopy-* and multifd-random/zero without writers)');
  const qemuDir = vsQemu ? mkdtempSync(join(tmpdir(), 'vmig-bench-qemu-')) : undefined;
  try {
    failures = await runScenarios(cliMain, chosen, repeat, tlsFlags, parseSize('ram', ram), qemuDir === undefined ? undefined : { dir: qemuDir, ramBytes: parseSize('ram', ram) });
  } finally {
    if (tlsDir) rmSync(tlsDir, { recursive: true, force: true });
    if (qemuDir) rmSync(qemuDir, { recursive: true, force: true });
  }
  const html = values['html'] as string | undefined;
  if (html) writeFileSync(html, renderPage(benchPage(results)));
  return failures === 0 ? 0 : 1;
}

/** Every result line of this run, for --html. */
const results: Record<string, unknown>[] = [];

/** A result: one JSON line on stdout. */
function emit(r: Record<string, unknown>): void {
  results.push(r);
  process.stdout.write(JSON.stringify(r) + '\n');
}

async function runScenarios(cliMain: string, scenarios: Scenario[], repeat: number, tlsFlags: () => string[], ramBytes: number, vsQemu: { dir: string; ramBytes: number } | undefined): Promise<number> {
  let failures = 0;
  const creds = scenarios.some((s) => s.tls) ? tlsFlags() : [];
  let randomMem: string | undefined;
  const timesOf = new Map(scenarios.map((s) => [s.name, { vmig: [] as number[], qemu: [] as number[] }]));
  const postcopy = new PostcopySeries();
  // Round-robin: run i of every scenario before run i+1 of any.
  for (let i = 0; i < repeat; i++) {
    for (const x of scenarios) {
      const s = x.tls ? { ...x, shared: [...x.shared, ...creds] } : x;
      const times = timesOf.get(s.name)!;
      if (vsQemu && s.qemu) {
        // QEMU's run first in each pair, then vmig's: alternating, so a drift of the machine hits both.
        if (s.qemu.fill === 'random' && !randomMem) makeRandomMemFile((randomMem = join(vsQemu.dir, 'random.mem')), vsQemu.ramBytes);
        try {
          const q = await runQemuPair({
            ramBytes: vsQemu.ramBytes,
            memFile: s.qemu.fill === 'random' ? randomMem : undefined,
            multifdChannels: s.qemu.channels,
            destinationPrealloc: s.qemu.destinationPrealloc ?? true,
            timeoutMs: 300_000,
          });
          times.qemu.push(q.totalTimeMs);
          emit({ scenario: `${s.name} (QEMU 7.2)`, peer: 'qemu', run: i + 1, verified: true, totalTimeMs: q.totalTimeMs, downtimeMs: q.downtimeMs, setupTimeMs: q.setupMs, throughputMBps: Math.round(vsQemu.ramBytes / 1e6 / (q.totalTimeMs / 1000)) });
        } catch (e) {
          failures++;
          emit({ scenario: `${s.name} (QEMU 7.2)`, peer: 'qemu', run: i + 1, verified: false, error: toVmigError(e, 'VMIG_ERR_INTERNAL').toJSON() });
        }
      }
      if (s.snapshot) {
        if (!(await benchSnapshot(cliMain, s, i + 1))) failures++;
        continue;
      }
      // The same writers with no migration, just before the run (nothing else of ours runs then).
      const noMigration = s.guest ? await measureWriteRate({ ramBytes, ...s.guest, pattern: 'hot', ms: NO_MIGRATION_MS }) : undefined;
      const { source, destination } = await runMigrationPair(cliMain, s.destination ?? s.shared, [...s.shared, ...s.source]);
      const src = source.report as Record<string, any> | undefined;
      const dst = destination.report as Record<string, any> | undefined;
      // Postcopy: the destination's own writes are taken out before comparing (postcopy-verify.ts).
      const pc = dst?.postcopy as Record<string, any> | undefined;
      const ok = src?.status === 'completed' && dst?.status === 'completed' && src?.ramDigest === (pc ? pc.restoredDigest : dst?.ramDigest) && (!pc || pc.badStamps === 0);
      if (!ok) failures++;
      if (ok && typeof src?.totalTimeMs === 'number') times.vmig.push(src.totalTimeMs);
      const figures = pc ? postcopyFigures(pc, src, noMigration) : undefined;
      if (figures && ok) postcopy.add(s.name, figures);
      const total = src?.ram?.total ?? 0;
      emit({
          scenario: s.name,
          description: s.description,
          run: i + 1,
          verified: ok,
          totalTimeMs: src?.totalTimeMs,
          downtimeMs: src?.downtimeMs,
          setupTimeMs: src?.setupTimeMs,
          throughputMBps: src?.totalTimeMs ? Math.round(total / 1e6 / (src.totalTimeMs / 1000)) : null,
          transferredBytes: src?.ram?.transferred,
          multifdBytes: src?.ram?.multifdBytes,
          dirtySyncCount: src?.ram?.dirtySyncCount,
          ...(figures ? { postcopy: figures } : {}),
          source: src?.resources,
          destination: dst?.resources,
          error: src?.error ?? dst?.error,
        });
    }
  }
  for (const s of scenarios) {
    const times = timesOf.get(s.name)!;
    if (vsQemu && s.qemu && times.vmig.length > 0 && times.qemu.length > 0) {
      const vm = median(times.vmig);
      const qm = median(times.qemu);
      emit({ vsQemu: s.name, runs: Math.min(times.vmig.length, times.qemu.length), vmigMedianMs: vm, qemuMedianMs: qm, ratio: Math.round((vm / qm) * 100) / 100 });
    }
  }
  for (const line of postcopy.summaries()) emit(line);
  return failures;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor((s.length - 1) / 2)]!;
}

/** One snapshot run: the file goes to a temporary directory, removed afterwards. */
async function benchSnapshot(cliMain: string, s: Scenario, run: number): Promise<boolean> {
  const dir = mkdtempSync(join(tmpdir(), 'vmig-bench-'));
  try {
    const r = (await spawnCli(cliMain, ['snapshot', join(dir, 'bench.snap'), '--json', ...s.shared, ...s.source]).done).report as Record<string, any> | undefined;
    const ok = r?.status === 'completed';
    emit({
        scenario: s.name,
        description: s.description,
        run,
        verified: ok,
        totalTimeMs: r?.totalTimeMs,
        downtimeMs: r?.downtimeMs,
        throughputMBps: r?.totalTimeMs ? Math.round((r?.ram?.total ?? 0) / 1e6 / (r.totalTimeMs / 1000)) : null,
        writtenBytes: r?.ram?.transferred,
        pagesByScan: r?.ram?.pagesByScan,
        pagesByFault: r?.ram?.pagesByFault,
        pagesByCow: r?.ram?.pagesByCow,
        writeProtect: r?.writeProtect,
        snapshot: r?.resources,
        error: r?.error,
      });
    return ok;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * `--sizes 256M,1G,...`: the cost as the guest grows. `multifd-random-2ch` at each size
 * (one block, in segments above 1 GiB), with the time per GiB against the smallest size of
 * 1 GiB or more, and each side's peak RSS against RAM + 25 % + 100 MiB.
 */
async function growthSeries(cliMain: string, sizesText: string, repeat: number): Promise<number> {
  const sizes = sizesText.split(',').map((t) => parseSize('sizes', t.trim()));
  let failures = 0;
  const perGiB = new Map<number, number>();
  for (const bytes of sizes) {
    const shared = ['--ram', String(bytes), '--multifd-channels', '2'];
    const times: number[] = [];
    for (let i = 0; i < repeat; i++) {
      const { source, destination } = await runMigrationPair(cliMain, shared, [...shared, '--fill', 'random']);
      const src = source.report as Record<string, any> | undefined;
      const dst = destination.report as Record<string, any> | undefined;
      const ok = src?.status === 'completed' && dst?.status === 'completed' && src?.ramDigest === dst?.ramDigest;
      if (!ok) failures++;
      const limit = bytes * 1.25 + 100 * 2 ** 20;
      const rss = { source: src?.resources?.maxRssBytes, destination: dst?.resources?.maxRssBytes };
      if (ok) times.push(src!.totalTimeMs);
      emit({
        series: 'growth',
        ramBytes: bytes,
        blocks: 1,
        run: i + 1,
        verified: ok,
        totalTimeMs: src?.totalTimeMs,
        msPerGiB: src?.totalTimeMs ? Math.round((src.totalTimeMs / (bytes / 2 ** 30)) * 10) / 10 : null,
        downtimeMs: src?.downtimeMs,
        peakRssBytes: rss,
        rssLimitBytes: Math.round(limit),
        rssWithinLimit: { source: rss.source <= limit, destination: rss.destination <= limit },
        error: src?.error ?? dst?.error,
      });
    }
    if (times.length) perGiB.set(bytes, median(times) / (bytes / 2 ** 30));
  }
  const base = [...perGiB.keys()].filter((b) => b >= 2 ** 30).sort((a, b) => a - b)[0];
  if (base !== undefined) {
    for (const [bytes, ms] of perGiB) emit({ series: 'growth', ramBytes: bytes, medianMsPerGiB: Math.round(ms * 10) / 10, vsSmallestGiB: Math.round((ms / perGiB.get(base)!) * 100) / 100 });
  }
  return failures === 0 ? 0 : 1;
}
