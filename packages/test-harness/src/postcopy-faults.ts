/**
 * A `vmig migrate` and a `vmig incoming` with control sockets, every channel through a
 * FaultProxy: the link can be cut, reset or frozen after the postcopy switch, and the pair
 * recovered as an operator would (migrate-recover on the destination, `migrate resume=true`
 * on the source, through a new proxy). `vmig demo --postcopy-faults N` and the recovery
 * tests run on it.
 */
import { join } from 'node:path';
import { ControlClient } from './control-client.js';
import { FaultProxy } from './fault-proxy.js';
import { type CliProcess, spawnCli } from './process-pair.js';

export interface RecoveryPair {
  src: CliProcess;
  dst: CliProcess;
  srcCtl: ControlClient;
  dstCtl: ControlClient;
  /** The proxy the source's channels go through now (a new one after each recovery). */
  proxy: FaultProxy;
  /** Every proxy made, for close(). */
  proxies: FaultProxy[];
}

export interface RecoveryPairOptions {
  /** Where the control sockets go (a private directory). */
  dir: string;
  stderr?: 'pipe' | 'inherit';
}

/** Starts both sides (`incomingArgs` / `migrateArgs` without command, URI, --json, --control). */
export async function startRecoveryPair(cliMain: string, incomingArgs: string[], migrateArgs: string[], opts: RecoveryPairOptions): Promise<RecoveryPair> {
  const dst = spawnCli(cliMain, ['incoming', 'tcp:127.0.0.1:0', '--json', '--control', `unix:${join(opts.dir, 'dst.sock')}`, ...incomingArgs], { stderr: opts.stderr });
  const proxies: FaultProxy[] = [];
  let src: CliProcess | undefined;
  try {
    const { uri } = (await dst.waitFor((l) => l['event'] === 'listening', 60_000)) as { uri: string };
    const proxy = await proxyTo(uri);
    proxies.push(proxy);
    src = spawnCli(cliMain, ['migrate', proxy.uri, '--json', '--control', `unix:${join(opts.dir, 'src.sock')}`, ...migrateArgs], { stderr: opts.stderr });
    const srcCtl = await controlOf(src);
    const dstCtl = await controlOf(dst);
    return { src, dst, srcCtl, dstCtl, proxy, proxies };
  } catch (e) {
    dst.child.kill('SIGKILL');
    src?.child.kill('SIGKILL');
    for (const p of proxies) await p.close();
    throw e;
  }
}

async function proxyTo(uri: string): Promise<FaultProxy> {
  return FaultProxy.start({ target: { host: '127.0.0.1', port: Number(uri.split(':').pop()) } });
}

async function controlOf(p: CliProcess): Promise<ControlClient> {
  const { address } = (await p.waitFor((l) => l['event'] === 'control', 60_000)) as { address: string };
  const c = await ControlClient.connect(address.slice('unix:'.length));
  const r = await c.execute('qmp_capabilities');
  if (!r['return']) throw new Error(`qmp_capabilities refused: ${JSON.stringify(r)}`);
  return c;
}

/** How many times `p` reported `status`. */
export function statusCount(p: CliProcess, status: string): number {
  return p.lines.filter((l) => l['event'] === 'status' && l['status'] === status).length;
}

/** Until both sides switched to postcopy. */
export async function postcopySwitched(pair: RecoveryPair, timeoutMs = 60_000): Promise<void> {
  await pair.src.waitFor((l) => l['event'] === 'status' && l['status'] === 'postcopy-active', timeoutMs);
  await pair.dst.waitFor((l) => l['event'] === 'postcopy' && l['reason'] === 'INBOUND_LISTEN', timeoutMs);
}

/** Until both sides paused for the `nth` time. */
export async function bothPaused(pair: RecoveryPair, nth: number, timeoutMs = 30_000): Promise<void> {
  await pair.src.waitFor(() => statusCount(pair.src, 'postcopy-paused') >= nth, timeoutMs);
  await pair.dst.waitFor(() => statusCount(pair.dst, 'postcopy-paused') >= nth, timeoutMs);
}

/** migrate-recover on the destination (any free port): the address it listens on. */
export async function migrateRecover(pair: RecoveryPair, timeoutMs = 30_000): Promise<string> {
  const recoverLines = (): Record<string, unknown>[] => pair.dst.lines.filter((l) => l['event'] === 'recover');
  const before = recoverLines().length;
  const r = await pair.dstCtl.execute('migrate-recover', { uri: 'tcp:127.0.0.1:0' });
  if (!r['return']) throw new Error(`migrate-recover refused: ${JSON.stringify(r)}`);
  await pair.dst.waitFor(() => recoverLines().length > before, timeoutMs);
  return (recoverLines()[before] as { uri: string }).uri;
}

/**
 * A recovery: migrate-recover on the destination, a new proxy to it, `migrate resume=true`
 * on the source; resolves once the source is postcopy-active again.
 */
export async function recoverPair(pair: RecoveryPair, timeoutMs = 30_000): Promise<void> {
  const uri = await migrateRecover(pair, timeoutMs);
  pair.proxy = await proxyTo(uri);
  pair.proxies.push(pair.proxy);
  const active = statusCount(pair.src, 'postcopy-active');
  const m = await pair.srcCtl.execute('migrate', { uri: pair.proxy.uri, resume: true });
  if (!m['return']) throw new Error(`migrate resume=true refused: ${JSON.stringify(m)}`);
  await pair.src.waitFor(() => statusCount(pair.src, 'postcopy-active') > active, timeoutMs);
}

/**
 * After the switch: `n` times, a moment (`delayMs`) into postcopy, the main connection is reset
 * and the pair recovered. Stops early if the migration ends first. Returns the recoveries made.
 */
export async function injectPostcopyFaults(pair: RecoveryPair, n: number, delayMs = 250, onFault?: (i: number) => void): Promise<number> {
  await postcopySwitched(pair);
  let done = 0;
  const ended = (): boolean => pair.src.child.exitCode !== null || statusCount(pair.src, 'completed') > 0;
  const srcEnded = pair.src.done.then(() => 'ended' as const);
  for (let i = 1; i <= n; i++) {
    await new Promise((r) => setTimeout(r, delayMs));
    if (ended()) break;
    onFault?.(i);
    pair.proxy.cut(0, 'reset');
    // The migration may have ended just before the cut.
    if ((await Promise.race([bothPaused(pair, i).then(() => 'paused' as const), srcEnded])) === 'ended') break;
    await recoverPair(pair);
    done = i;
  }
  return done;
}

/** Control connections and proxies closed; processes killed if still running. */
export async function closeRecoveryPair(pair: RecoveryPair): Promise<void> {
  pair.srcCtl.close();
  pair.dstCtl.close();
  for (const c of [pair.src, pair.dst]) if (c.child.exitCode === null) c.child.kill('SIGKILL');
  for (const p of pair.proxies) await p.close();
}
