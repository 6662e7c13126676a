/**
 * What the CLI prints. With --json: one JSON object per line on stdout, the last one the
 * final report. Without: short human lines on stderr and a summary on stdout.
 */
export class Output {
  constructor(readonly json: boolean) {}

  /** An event line (JSON mode) or a short note (human mode). */
  event(obj: Record<string, unknown>, human?: string): void {
    if (this.json) process.stdout.write(JSON.stringify(obj) + '\n');
    else if (human) process.stderr.write(human + '\n');
  }

  /** The final report: the last JSON line, or a readable summary. */
  report(obj: Record<string, unknown>, human: string): void {
    if (this.json) process.stdout.write(JSON.stringify({ event: 'report', ...obj }) + '\n');
    else process.stdout.write(human + '\n');
  }
}

export function fmtBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
