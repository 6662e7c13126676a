/**
 * Flag parsing and validation. Every bad flag or value becomes an InvalidArgumentError,
 * which main.ts prints as one line on stderr with exit code 2.
 */
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { InvalidArgumentError } from '@vmig/core';

const UNITS: Record<string, number> = { '': 1, B: 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };

/** "1G", "512M", "4096", "1.5G", "64KiB": binary units, QEMU style. */
export function parseSize(flag: string, v: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?$/i.exec(v.trim());
  if (!m) throw new InvalidArgumentError(`--${flag}: invalid size '${v}' (use a number with an optional K, M, G or T suffix)`);
  const n = Math.round(Number(m[1]) * UNITS[m[2]!.toUpperCase()]!);
  if (!Number.isSafeInteger(n)) throw new InvalidArgumentError(`--${flag}: size '${v}' is too large`);
  return n;
}

export function parseIntFlag(flag: string, v: string, min: number, max: number): number {
  if (!/^\d+$/.test(v.trim())) throw new InvalidArgumentError(`--${flag}: expected an integer ${min}..${max}, got '${v}'`);
  const n = Number(v);
  if (n < min || n > max) throw new InvalidArgumentError(`--${flag}: expected an integer ${min}..${max}, got ${n}`);
  return n;
}

export function parseChoice<T extends string>(flag: string, v: string, choices: readonly T[]): T {
  if (!(choices as readonly string[]).includes(v)) throw new InvalidArgumentError(`--${flag}: expected one of ${choices.join(', ')}, got '${v}'`);
  return v as T;
}

export interface RamSpec {
  idstr: string;
  size: number;
}

/** --ram SIZE (one block 'pc.ram') and/or --ram-block NAME=SIZE (repeatable). */
export function parseRamSpecs(ram: string | undefined, blocks: string[] | undefined): RamSpec[] | undefined {
  const specs: RamSpec[] = [];
  if (ram !== undefined) specs.push({ idstr: 'pc.ram', size: parseSize('ram', ram) });
  for (const b of blocks ?? []) {
    const eq = b.indexOf('=');
    if (eq <= 0) throw new InvalidArgumentError(`--ram-block: expected NAME=SIZE, got '${b}'`);
    specs.push({ idstr: b.slice(0, eq), size: parseSize('ram-block', b.slice(eq + 1)) });
  }
  return specs.length ? specs : undefined;
}

type Options = NonNullable<ParseArgsConfig['options']>;

/** util.parseArgs in strict mode, with its errors turned into InvalidArgumentError. */
export interface ParsedArgs {
  values: Record<string, string | boolean | string[] | undefined>;
  positionals: string[];
}

export function parseCommandArgs(command: string, argv: string[], options: Options): ParsedArgs {
  // `--ram -5M`: util.parseArgs would call the value an ambiguous option; say what is wrong.
  for (let i = 0; i + 1 < argv.length; i++) {
    const name = argv[i]!.startsWith('--') ? argv[i]!.slice(2) : undefined;
    if (name && !name.includes('=') && options[name]?.type === 'string' && /^-\d/.test(argv[i + 1]!)) {
      throw new InvalidArgumentError(`--${name}: '${argv[i + 1]}' is negative; sizes, counts and times are never below 0`);
    }
  }
  try {
    const { values, positionals } = parseArgs({ args: argv, options, allowPositionals: true, strict: true });
    return { values: values as ParsedArgs['values'], positionals };
  } catch (e) {
    const msg = e instanceof Error ? e.message.split('\n')[0]! : String(e);
    throw new InvalidArgumentError(`${command}: ${msg.replace(/\. To specify a positional argument.*$/, '')}`);
  }
}
