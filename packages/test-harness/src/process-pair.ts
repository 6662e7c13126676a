/**
 * Source and destination as real processes on loopback: spawn `vmig incoming` on port 0,
 * read the bound URI from its first JSON line, spawn `vmig migrate` against it, collect
 * both final reports.
 */
import { spawn, type ChildProcess } from 'node:child_process';

export interface CliRun {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** Every JSON line printed on stdout. */
  lines: Record<string, unknown>[];
  /** The last line whose event is 'report', if any. */
  report: Record<string, unknown> | undefined;
  stderr: string;
}

export interface CliProcess {
  child: ChildProcess;
  done: Promise<CliRun>;
  /** Every JSON line printed on stdout so far. */
  readonly lines: readonly Record<string, unknown>[];
  /** Resolves with the first JSON line that satisfies `pred`. */
  waitFor(pred: (line: Record<string, unknown>) => boolean, timeoutMs?: number): Promise<Record<string, unknown>>;
}

/** Every child still running: killed when this process exits, so a failing test leaves none behind. */
const running = new Set<ChildProcess>();
process.once('exit', () => {
  for (const c of running) c.kill('SIGKILL');
});

/** `prefix`: a command that runs the CLI (`ip netns exec NS`, which execs into it: same pid). */
export function spawnCli(cliMain: string, args: string[], opts: { stderr?: 'pipe' | 'inherit'; env?: NodeJS.ProcessEnv; prefix?: string[] } = {}): CliProcess {
  const argv = [...(opts.prefix ?? []), process.execPath, cliMain, ...args];
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', opts.stderr ?? 'pipe'], env: opts.env ?? process.env });
  running.add(child);
  child.once('exit', () => running.delete(child));
  const lines: Record<string, unknown>[] = [];
  const watchers: { pred: (l: Record<string, unknown>) => boolean; resolve: (l: Record<string, unknown>) => void }[] = [];
  let stderr = '';
  let partial = '';
  child.stdout!.setEncoding('utf8');
  child.stdout!.on('data', (d: string) => {
    partial += d;
    let nl: number;
    while ((nl = partial.indexOf('\n')) >= 0) {
      const text = partial.slice(0, nl);
      partial = partial.slice(nl + 1);
      let line: Record<string, unknown>;
      try {
        line = JSON.parse(text) as Record<string, unknown>;
      } catch {
        continue;
      }
      lines.push(line);
      for (const w of watchers.splice(0)) {
        if (w.pred(line)) w.resolve(line);
        else watchers.push(w);
      }
    }
  });
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (d: string) => (stderr += d));
  const done = new Promise<CliRun>((resolve) => {
    child.on('close', (code, signal) => {
      const report = [...lines].reverse().find((l) => l['event'] === 'report');
      resolve({ code, signal, lines, report, stderr });
    });
  });
  return {
    child,
    done,
    lines,
    waitFor(pred, timeoutMs = 120_000) {
      const seen = lines.find(pred);
      if (seen) return Promise.resolve(seen);
      return new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`timed out waiting for output from ${args[0]}; stderr: ${stderr}`)), timeoutMs);
        void done.then((r) => {
          clearTimeout(t);
          reject(new Error(`${args[0]} exited (${r.code}) before the awaited output; stderr: ${r.stderr}`));
        });
        watchers.push({
          pred,
          resolve: (l) => {
            clearTimeout(t);
            resolve(l);
          },
        });
      });
    },
  };
}

export interface PairResult {
  source: CliRun;
  destination: CliRun;
}

/**
 * Runs one migration between two processes. `incomingArgs` and `migrateArgs` exclude the
 * command and URI; --json is added to both.
 */
export async function runMigrationPair(
  cliMain: string,
  incomingArgs: string[],
  migrateArgs: string[],
  opts: { host?: string; stderr?: 'pipe' | 'inherit'; onSourceSpawned?: (p: CliProcess) => void } = {},
): Promise<PairResult> {
  const dst = spawnCli(cliMain, ['incoming', `tcp:${opts.host ?? '127.0.0.1'}:0`, '--json', ...incomingArgs], { stderr: opts.stderr });
  let listening: Record<string, unknown>;
  try {
    listening = await dst.waitFor((l) => l['event'] === 'listening');
  } catch (e) {
    dst.child.kill('SIGKILL');
    throw e;
  }
  const src = spawnCli(cliMain, ['migrate', String(listening['uri']), '--json', ...migrateArgs], { stderr: opts.stderr });
  opts.onSourceSpawned?.(src);
  const source = await src.done;
  // If the source died without ever connecting, the destination waits forever: stop it.
  const killer = setTimeout(() => dst.child.kill('SIGTERM'), 30_000);
  const destination = await dst.done;
  clearTimeout(killer);
  return { source, destination };
}
