/**
 * A zero-downtime restart of a key-value store: the old process (this one) serves writes
 * from worker threads, starts the new process, migrates the store to it live with vmig's
 * migrate(), and exits; the new one checks that every acknowledged write arrived and serves
 * on. Prints one JSON report; exit 0 only if nothing was lost.
 *
 *   node handover.mjs [--keys N] [--channels N] [--serve-ms MS] [--postcopy]
 *
 * With --postcopy the new process takes over after one round: its writers run before every
 * page arrived and ask vmig for each page they touch first (background pages are held to
 * 4 MiB/s so that they do ask).
 */
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';
import { migrate } from 'vmig';
import { KvStore } from './kv-store.mjs';

const { values } = parseArgs({ options: { keys: { type: 'string', default: '65536' }, channels: { type: 'string', default: '2' }, 'serve-ms': { type: 'string', default: '500' }, postcopy: { type: 'boolean', default: false } } });
const postcopy = values.postcopy;
const keys = Number(values.keys);
const channels = Number(values.channels);
/** Bounds every wait on the new process. */
const TIMEOUT_MS = 30_000;

const child = spawn(process.execPath, [new URL('./new-process.mjs', import.meta.url).pathname, String(keys), String(channels), ...(postcopy ? ['postcopy'] : [])], { stdio: ['ignore', 'pipe', 'inherit'] });
const lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
const exited = new Promise((r) => child.once('exit', (code) => r(code)));
const killTimer = setTimeout(() => child.kill('SIGKILL'), TIMEOUT_MS * 2);
killTimer.unref();
process.once('exit', () => child.kill('SIGKILL'));
const next = async () => {
  const t = new Promise((_, reject) => setTimeout(() => reject(new Error(`the new process said nothing within ${TIMEOUT_MS} ms`)), TIMEOUT_MS).unref());
  const r = await Promise.race([lines.next(), t]);
  if (r.done) throw new Error('the new process ended early');
  return JSON.parse(r.value);
};

const store = KvStore.create(keys);
await store.serve(2);
const { listening } = await next();
await new Promise((r) => setTimeout(r, Number(values['serve-ms'])));

const m = migrate({ uri: listening, ram: store.ram, vm: store, devices: [store.device()], multifdChannels: channels, downtimeLimitMs: 100, ...(postcopy ? { postcopy: true, postcopyAfterRounds: 1, maxPostcopyBandwidth: 4 * 2 ** 20 } : {}) });
m.on('status', (i) => process.stderr.write(`handover: ${i.status}\n`));
const info = await m.result;
// Completed: the writers stay stopped here (the new process owns the store now).
// Failed or cancelled: vmig resumed them and this process serves on.
const source = store.verify();
await store.close();
const result = info.status === 'completed' ? await next() : undefined;
const code = await exited;
const report = {
  migration: { status: info.status, postcopy, totalTimeMs: Math.round(info.totalTimeMs), downtimeMs: info.downtimeMs, rounds: info.ram.dirtySyncCount, error: info.error },
  oldProcess: source,
  newProcess: result,
};
process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
// Every write acknowledged here is there; with postcopy the new process wrote more on top.
const kept = postcopy ? result?.received?.acknowledgedWrites >= source.acknowledgedWrites : result?.received?.acknowledgedWrites === source.acknowledgedWrites;
process.exitCode = info.status === 'completed' && code === 0 && result?.received?.lost === 0 && kept ? 0 : 1;
