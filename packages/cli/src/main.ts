#!/usr/bin/env node
/**
 * The vmig command. Exit codes: 0 success, 1 migration failed, 2 bad command line.
 */
import { VmigError } from '@vmig/core';
import { benchCommand } from './commands/bench.js';
import { demoCommand } from './commands/demo.js';
import { incomingCommand } from './commands/incoming.js';
import { migrateCommand } from './commands/migrate.js';
import { restoreCommand } from './commands/restore.js';
import { snapshotCommand } from './commands/snapshot.js';

const USAGE = `usage: vmig <command> [flags]

commands:
  incoming URI        be the destination: listen on URI, load one migration
  migrate URI         be the source: build a guest (RAM + writers), migrate it to URI
  demo                both ends as two processes on loopback, verified by RAM digest
  snapshot FILE       background snapshot of a running guest into FILE (QEMU stream format)
  restore FILE        load a snapshot file into fresh RAM, report its digest
  bench               benchmark scenarios (JSON lines); --list, --scenario NAME, --ram SIZE
  help                this text

URI: tcp:HOST:PORT or unix:PATH. Sizes take K, M, G suffixes (binary).
See README.md for every flag.`;

const COMMANDS: Record<string, (argv: string[]) => Promise<number>> = {
  incoming: incomingCommand,
  migrate: migrateCommand,
  demo: demoCommand,
  bench: benchCommand,
  snapshot: snapshotCommand,
  restore: restoreCommand,
};

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (cmd === undefined || cmd === 'help' || cmd === '--help' || cmd === '-h') {
    process.stdout.write(USAGE + '\n');
    return cmd === undefined ? 2 : 0;
  }
  const run = COMMANDS[cmd];
  if (!run) {
    process.stderr.write(`vmig: unknown command '${cmd}' (try 'vmig help')\n`);
    return 2;
  }
  try {
    return await run(rest);
  } catch (e) {
    if (e instanceof VmigError && e.code === 'VMIG_ERR_INVALID_ARG') {
      process.stderr.write(`vmig: ${e.message}\n`);
      return 2;
    }
    const err = e instanceof VmigError ? `${e.message} [${e.code}]` : e instanceof Error ? (e.stack ?? e.message) : String(e);
    process.stderr.write(`vmig: ${err}\n`);
    return 1;
  }
}

const code = await main(process.argv.slice(2));
// Exit once stdout has drained; worker threads and sockets are closed by the commands.
process.stdout.write('', () => process.exit(code));
