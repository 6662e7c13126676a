#!/usr/bin/env node
/**
 * The vmig command. Exit codes: 0 success, 1 migration failed, 2 bad command line.
 */
import { readFileSync } from 'node:fs';
import { toVmigError, VmigError } from '@vmig/core';
import { BENCH_OPTIONS, benchCommand } from './commands/bench.js';
import { demoCommand } from './commands/demo.js';
import { incomingCommand } from './commands/incoming.js';
import { migrateCommand } from './commands/migrate.js';
import { REPORT_OPTIONS, reportCommand } from './commands/report.js';
import { restoreCommand } from './commands/restore.js';
import { snapshotCommand } from './commands/snapshot.js';
import { DEMO_OPTIONS, INCOMING_OPTIONS, MIGRATE_OPTIONS, RESTORE_OPTIONS, SNAPSHOT_OPTIONS } from './options.js';

const USAGE = `usage: vmig <command> [flags]

commands:
  incoming URI        be the destination: listen on URI, load one migration
  migrate URI         be the source: build a guest (RAM + writers), migrate it to URI
  demo                both ends as two processes on loopback, verified by RAM digest
  snapshot FILE       background snapshot of a running guest into FILE (QEMU stream format)
  restore FILE        load a snapshot file into fresh RAM, report its digest
  bench               benchmark scenarios (JSON lines); --list, --scenario NAME, --ram SIZE, --html FILE
  report FILE... -o F one HTML page (charts) from a run's --json output, or from bench output
  help                this text (vmig COMMAND --help: the command's flags; vmig --version)

URI: tcp:HOST:PORT or unix:PATH. Sizes take K, M, G suffixes (binary).
See docs/cli.md for every flag.`;

const COMMANDS: Record<string, { run: (argv: string[]) => Promise<number>; synopsis: string; options: Record<string, { type: string; multiple?: boolean; short?: string }>; role: string }> = {
  incoming: { run: incomingCommand, synopsis: 'incoming URI [flags]', options: INCOMING_OPTIONS, role: 'destination' },
  migrate: { run: migrateCommand, synopsis: 'migrate URI --ram SIZE [flags]', options: MIGRATE_OPTIONS, role: 'source' },
  demo: { run: demoCommand, synopsis: 'demo [migrate flags] [--postcopy-faults N]', options: DEMO_OPTIONS, role: 'demo' },
  bench: { run: benchCommand, synopsis: 'bench [--scenario NAME ...] [--ram SIZE] [--repeat N] [--list] [--html FILE]', options: BENCH_OPTIONS, role: 'bench' },
  report: { run: reportCommand, synopsis: 'report RUN.jsonl [MORE.jsonl ...] -o report.html', options: REPORT_OPTIONS, role: 'report' },
  snapshot: { run: snapshotCommand, synopsis: 'snapshot FILE --ram SIZE [flags]', options: SNAPSHOT_OPTIONS, role: 'snapshot' },
  restore: { run: restoreCommand, synopsis: 'restore FILE [flags]', options: RESTORE_OPTIONS, role: 'restore' },
};

/** `vmig COMMAND --help`: the synopsis and every flag the command takes (docs/cli.md explains each). */
function commandHelp(name: string): string {
  const c = COMMANDS[name]!;
  const flags = Object.entries(c.options)
    .map(([k, o]) => `  ${o.short ? `-${o.short}, ` : ''}--${k}${o.type === 'string' ? ' VALUE' : ''}${o.multiple ? ' (repeatable)' : ''}`)
    .join('\n');
  return `usage: vmig ${c.synopsis}\n\nflags:\n${flags}\n  --help\n\nSee docs/cli.md for what each flag does.`;
}

function version(): string {
  return (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }).version;
}

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (cmd === 'help' || cmd === '--help' || cmd === '-h') {
    process.stdout.write(USAGE + '\n');
    return 0;
  }
  if (cmd === '--version' || cmd === '-V') {
    process.stdout.write(`vmig ${version()}\n`);
    return 0;
  }
  if (cmd === undefined) {
    process.stderr.write(USAGE + '\n');
    return 2;
  }
  const command = COMMANDS[cmd];
  if (!command) {
    process.stderr.write(`vmig: unknown command '${cmd}' (try 'vmig help')\n`);
    return 2;
  }
  if (rest.includes('--help') || rest.includes('-h')) {
    process.stdout.write(commandHelp(cmd) + '\n');
    return 0;
  }
  try {
    return await command.run(rest);
  } catch (e) {
    if (e instanceof VmigError && e.code === 'VMIG_ERR_INVALID_ARG') {
      process.stderr.write(`vmig: ${e.message}\n`);
      return 2;
    }
    // A failure before the command could report (RAM that cannot be allocated, an address in
    // use): the same report path, so that --json readers get their last line.
    const err = toVmigError(e, 'VMIG_ERR_INTERNAL');
    if (rest.includes('--json')) process.stdout.write(JSON.stringify({ event: 'report', role: command.role, status: 'failed', error: err.toJSON() }) + '\n');
    process.stderr.write(`vmig: ${err.message} [${err.code}]\n`);
    if (!(e instanceof VmigError) && e instanceof Error && e.stack) process.stderr.write(`${e.stack}\n`);
    return 1;
  }
}

const code = await main(process.argv.slice(2));
// Exit once stdout has drained; worker threads and sockets are closed by the commands.
process.stdout.write('', () => process.exit(code));
