/**
 * The flags of each command, named after QEMU's migration parameters, and turning parsed
 * values into typed settings.
 */
import { totalmem } from 'node:os';
import { DEFAULT_CHANNEL_TIMEOUT_MS, DEFAULT_PARAMS, InvalidArgumentError, type MigrationParams, type ZeroPageDetection } from '@vmig/core';
import { FILL_PATTERNS, type FillPattern, type WritePattern } from '@vmig/test-harness';
import { COMPRESSION_NAMES, type CompressionName } from '@vmig/multifd';
import { CAPABILITIES } from './qmp-info.js';
import { formatMigrationUri, loadTlsCreds, parseMigrationUri, type TlsOptions } from '@vmig/channel';
import { LOG_LEVELS, type LogLevel } from './log.js';
import { DEFAULT_POSTCOPY_BACKGROUND_NICE, DEFAULT_POSTCOPY_FAULT_SLICE_US, MAX_MULTIFD_CHANNELS, MAX_SLICE_US, MIN_SLICE_US, PREEMPT_READERS, type PreemptReaderChoice } from '@vmig/migration';
import { parseChoice, parseIntFlag, parseRamSpecs, parseSize, type RamSpec } from './args.js';

/** Flags both ends understand; demo passes these to `incoming`. */
export const SHARED_OPTIONS = {
  ram: { type: 'string' },
  'ram-block': { type: 'string', multiple: true },
  'multifd-channels': { type: 'string' },
  'multifd-compression': { type: 'string' },
  'multifd-flush-after-each-section': { type: 'boolean' },
  postcopy: { type: 'boolean' },
  'postcopy-preempt': { type: 'boolean' },
  'postcopy-blocktime': { type: 'boolean' },
  'postcopy-background-nice': { type: 'string' },
  'postcopy-fault-slice-us': { type: 'string' },
  'postcopy-preempt-reader': { type: 'string' },
  'channel-timeout': { type: 'string' },
  uuid: { type: 'string' },
  integrity: { type: 'boolean' },
  'tls-creds': { type: 'string' },
  'tls-hostname': { type: 'string' },
  'tls-authz': { type: 'string', multiple: true },
  json: { type: 'boolean' },
  'log-level': { type: 'string' },
} as const;

export const INCOMING_OPTIONS = {
  ...SHARED_OPTIONS,
  'dump-ram': { type: 'string' },
  'max-ram': { type: 'string' },
  control: { type: 'string' },
  metrics: { type: 'string' },
} as const;

export interface IncomingSettings extends SharedSettings {
  /** The most guest RAM a stream may declare (bytes), checked before anything is allocated. */
  maxRam: number;
  /** --control ADDRESS: the QMP control socket, if any. */
  control: string | undefined;
  /** --metrics ADDRESS: the Prometheus endpoint (metrics.ts), if any. */
  metrics: string | undefined;
}

export function incomingSettings(v: Values): IncomingSettings {
  return { ...sharedSettings(v), maxRam: maxRamSetting(v), control: controlAddress(v), metrics: metricsAddress(v) };
}

/** --metrics tcp:HOST:PORT or unix:PATH. */
export function metricsAddress(v: Values): string | undefined {
  const m = str(v, 'metrics');
  if (m === undefined) return undefined;
  try {
    return formatMigrationUri(parseMigrationUri(m));
  } catch (e) {
    throw new InvalidArgumentError(`--metrics: ${(e as Error).message}`);
  }
}

function controlAddress(v: Values): string | undefined {
  const control = str(v, 'control');
  return control === undefined ? undefined : formatMigrationUri(parseMigrationUri(control));
}

/** --max-ram SIZE: the most guest RAM a stream or a file may declare; default the machine's memory. */
export function maxRamSetting(v: Values): number {
  const max = str(v, 'max-ram');
  return max === undefined ? totalmem() : parseSize('max-ram', max);
}

/** The test guest a source (or a snapshot) builds: its RAM contents and its writers. */
const GUEST_OPTIONS = {
  'guest-devices': { type: 'string' },
  fill: { type: 'string' },
  seed: { type: 'string' },
  writers: { type: 'string' },
  'dirty-rate': { type: 'string' },
  pattern: { type: 'string' },
  'hot-pages': { type: 'string' },
} as const;

export interface GuestSettings {
  /**
   * 'test': the test guest's own device sections travel with its RAM (`vmig-vcpus`,
   * `vmig-its`: a vmig destination checks them); 'none': only what QEMU 7.2 `-M none` sends
   * (`timer`, `globalstate`), so that a QEMU destination can load the stream.
   */
  guestDevices: 'test' | 'none';
  fill: FillPattern;
  seed: string;
  writers: number;
  dirtyRate: number;
  pattern: WritePattern;
  hotPages: number;
}

function guestSettings(v: Values): GuestSettings {
  const writers = str(v, 'writers') === undefined ? 0 : parseIntFlag('writers', str(v, 'writers')!, 0, 64);
  const dirtyRate = str(v, 'dirty-rate') === undefined ? (writers > 0 ? 16 << 20 : 0) : parseSize('dirty-rate', str(v, 'dirty-rate')!);
  if (dirtyRate > 0 && writers === 0) throw new InvalidArgumentError('--dirty-rate needs --writers N (N >= 1)');
  return {
    guestDevices: str(v, 'guest-devices') === undefined ? 'test' : parseChoice('guest-devices', str(v, 'guest-devices')!, ['test', 'none'] as const),
    fill: str(v, 'fill') === undefined ? 'random' : parseChoice('fill', str(v, 'fill')!, FILL_PATTERNS),
    seed: str(v, 'seed') ?? '1',
    writers,
    dirtyRate,
    pattern: str(v, 'pattern') === undefined ? 'uniform' : parseChoice('pattern', str(v, 'pattern')!, ['uniform', 'hot'] as const),
    hotPages: str(v, 'hot-pages') === undefined ? 64 : parseIntFlag('hot-pages', str(v, 'hot-pages')!, 1, 1 << 30),
  };
}

export const MIGRATE_OPTIONS = {
  ...SHARED_OPTIONS,
  ...GUEST_OPTIONS,
  'max-bandwidth': { type: 'string' },
  'downtime-limit': { type: 'string' },
  'zero-page-detection': { type: 'string' },
  'postcopy-after-rounds': { type: 'string' },
  'max-postcopy-bandwidth': { type: 'string' },
  'auto-converge': { type: 'boolean' },
  control: { type: 'string' },
  metrics: { type: 'string' },
} as const;

/** `vmig demo`: migrate's flags, and the link failures it may inject. */
export const DEMO_OPTIONS = {
  ...MIGRATE_OPTIONS,
  'postcopy-faults': { type: 'string' },
} as const;

export interface SharedSettings {
  ram: RamSpec[] | undefined;
  /** 0 = no multifd. */
  multifdChannels: number;
  compression: CompressionName;
  flushAfterEachSection: boolean;
  /** The postcopy-ram capability, and its preempt channel and blocktime statistics. */
  postcopy: boolean;
  postcopyPreempt: boolean;
  postcopyBlocktime: boolean;
  /** 0: leave priorities alone. */
  postcopyBackgroundNice: number;
  /** 0: the kernel's default slice. */
  postcopyFaultSliceUs: number;
  /** Who reads the preempt channel on the destination (core's postcopy/preempt-reader.ts). */
  postcopyPreemptReader: PreemptReaderChoice;
  /** --channel-timeout (ms). */
  channelTimeoutMs: number;
  /** --uuid (QEMU's -uuid): the migration's id in every MultiFDInit_t; all zeros by default, as QEMU's. */
  uuid: Uint8Array;
  /** --integrity: per-range RAM digests checked end to end (core's devices/ram-integrity.ts). */
  integrity: boolean;
  /** --tls-creds DIR and its companions: TLS on every channel (channel/tls.ts); undefined: plaintext. */
  tls: { dir: string; hostname: string | undefined; authz: string[] | undefined } | undefined;
  json: boolean;
  logLevel: LogLevel;
}


type Values = Record<string, string | boolean | string[] | undefined>;

const str = (v: Values, k: string): string | undefined => v[k] as string | undefined;

export function sharedSettings(v: Values): SharedSettings {
  const channels = str(v, 'multifd-channels');
  const n = channels === undefined ? 0 : parseIntFlag('multifd-channels', channels, 1, MAX_MULTIFD_CHANNELS);
  const compression = parseChoice('multifd-compression', str(v, 'multifd-compression') ?? 'none', COMPRESSION_NAMES as readonly CompressionName[]);
  if (compression !== 'none' && n === 0) throw new InvalidArgumentError(`--multifd-compression ${compression} needs --multifd-channels N`);
  const legacy = v['multifd-flush-after-each-section'] === true;
  if (legacy && n === 0) throw new InvalidArgumentError('--multifd-flush-after-each-section needs --multifd-channels N');
  const postcopy = v['postcopy'] === true;
  for (const f of ['postcopy-preempt', 'postcopy-blocktime']) if (v[f] === true && !postcopy) throw new InvalidArgumentError(`--${f} needs --postcopy`);
  const nice = str(v, 'postcopy-background-nice');
  if (nice !== undefined && !postcopy) throw new InvalidArgumentError('--postcopy-background-nice needs --postcopy');
  const slice = str(v, 'postcopy-fault-slice-us');
  if (slice !== undefined && !postcopy) throw new InvalidArgumentError('--postcopy-fault-slice-us needs --postcopy');
  const sliceUs = slice === undefined ? DEFAULT_POSTCOPY_FAULT_SLICE_US : parseIntFlag('postcopy-fault-slice-us', slice, 0, MAX_SLICE_US);
  if (sliceUs !== 0 && sliceUs < MIN_SLICE_US) throw new InvalidArgumentError(`--postcopy-fault-slice-us must be 0 (the kernel's default) or ${MIN_SLICE_US}..${MAX_SLICE_US}, not ${sliceUs}`);
  if (v['integrity'] === true && postcopy) throw new InvalidArgumentError('--integrity checks RAM as precopy leaves it; it cannot go with --postcopy (the destination runs before every page arrived)');
  const reader = str(v, 'postcopy-preempt-reader');
  if (reader !== undefined && v['postcopy-preempt'] !== true) throw new InvalidArgumentError('--postcopy-preempt-reader needs --postcopy-preempt');
  return {
    ram: parseRamSpecs(str(v, 'ram'), v['ram-block'] as string[] | undefined),
    multifdChannels: n,
    compression,
    flushAfterEachSection: legacy,
    postcopy,
    postcopyPreempt: v['postcopy-preempt'] === true,
    postcopyBlocktime: v['postcopy-blocktime'] === true,
    // Over TLS the main thread also pumps the return path and the preempt channel
    // (tls-bridge.ts): it is on the fault path, so it keeps its priority unless told.
    postcopyBackgroundNice: nice === undefined ? (v['tls-creds'] !== undefined ? 0 : DEFAULT_POSTCOPY_BACKGROUND_NICE) : parseIntFlag('postcopy-background-nice', nice, 0, 19),
    postcopyFaultSliceUs: sliceUs,
    postcopyPreemptReader: reader === undefined ? 'vcpu' : parseChoice('postcopy-preempt-reader', reader, PREEMPT_READERS),
    integrity: v['integrity'] === true,
    uuid: parseUuid(str(v, 'uuid')),
    tls: tlsFlags(v),
    channelTimeoutMs: str(v, 'channel-timeout') === undefined ? DEFAULT_CHANNEL_TIMEOUT_MS : parseIntFlag('channel-timeout', str(v, 'channel-timeout')!, 100, 3_600_000),
    json: v['json'] === true,
    logLevel: parseChoice('log-level', str(v, 'log-level') ?? 'warn', LOG_LEVELS),
  };
}

/** QEMU's -uuid form, 8-4-4-4-12 hex digits; undefined: all zeros (QEMU's default). */
function parseUuid(text: string | undefined): Uint8Array {
  if (text === undefined) return new Uint8Array(16);
  if (!/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(text)) {
    throw new InvalidArgumentError(`--uuid: expected 8-4-4-4-12 hex digits (QEMU's -uuid), got '${text}'`);
  }
  return Uint8Array.from(Buffer.from(text.replaceAll('-', ''), 'hex'));
}

function tlsFlags(v: Values): SharedSettings['tls'] {
  const dir = str(v, 'tls-creds');
  const hostname = str(v, 'tls-hostname');
  const authz = v['tls-authz'] as string[] | undefined;
  if (dir === undefined) {
    if (hostname !== undefined || authz !== undefined) throw new InvalidArgumentError('--tls-hostname and --tls-authz need --tls-creds DIR');
    return undefined;
  }
  if (!dir) throw new InvalidArgumentError('--tls-creds: empty directory name');
  return { dir, hostname, authz };
}

/** The TLS options of one end, its credentials read from the directory (a missing file is a bad flag). */
export function tlsOptions(s: SharedSettings, endpoint: 'client' | 'server'): TlsOptions | undefined {
  if (!s.tls) return undefined;
  return { creds: loadTlsCreds(s.tls.dir, endpoint), hostname: s.tls.hostname, authz: s.tls.authz };
}

export interface MigrateSettings extends SharedSettings, GuestSettings {
  ram: RamSpec[];
  params: MigrationParams;
  /** --control ADDRESS: the control socket, if any. */
  control: string | undefined;
  /** --metrics ADDRESS: the Prometheus endpoint (metrics.ts), if any. */
  metrics: string | undefined;
}

export function migrateSettings(v: Values): MigrateSettings {
  const shared = sharedSettings(v);
  if (!shared.ram) throw new InvalidArgumentError('migrate: --ram SIZE (or --ram-block NAME=SIZE) is required');
  const afterRounds = str(v, 'postcopy-after-rounds');
  if (afterRounds !== undefined && !shared.postcopy) throw new InvalidArgumentError('--postcopy-after-rounds needs --postcopy');
  const maxPostcopyBw = str(v, 'max-postcopy-bandwidth');
  if (maxPostcopyBw !== undefined && !shared.postcopy) throw new InvalidArgumentError('--max-postcopy-bandwidth needs --postcopy');
  const guest = guestSettings(v);
  const zpd = str(v, 'zero-page-detection');
  // QEMU >= 9.0 defaults to multifd detection when multifd is on; legacy otherwise, and in
  // QEMU 7.2's dialect, whose packets have no zero page list.
  const zeroPageDetection: ZeroPageDetection =
    zpd === undefined
      ? shared.multifdChannels > 0 && !shared.flushAfterEachSection
        ? 'multifd'
        : 'legacy'
      : parseChoice('zero-page-detection', zpd, ['none', 'legacy', 'multifd'] as const);
  if (zeroPageDetection === 'multifd' && shared.multifdChannels === 0) throw new InvalidArgumentError('--zero-page-detection multifd needs --multifd-channels N');
  if (zeroPageDetection === 'multifd' && shared.flushAfterEachSection) {
    throw new InvalidArgumentError("--zero-page-detection multifd cannot go with --multifd-flush-after-each-section (QEMU 7.2's packets have no zero page list)");
  }
  const downtime = str(v, 'downtime-limit');
  const maxBw = str(v, 'max-bandwidth');
  return {
    ...shared,
    ram: shared.ram,
    ...guest,
    params: {
      ...DEFAULT_PARAMS,
      zeroPageDetection,
      downtimeLimitMs: downtime === undefined ? DEFAULT_PARAMS.downtimeLimitMs : parseIntFlag('downtime-limit', downtime, 1, 2_000_000),
      maxBandwidth: maxBw === undefined ? 0 : parseSize('max-bandwidth', maxBw),
      autoConverge: v['auto-converge'] === true,
      postcopy: shared.postcopy,
      postcopyAfterRounds: afterRounds === undefined ? 0 : parseIntFlag('postcopy-after-rounds', afterRounds, 1, 1_000_000),
      maxPostcopyBandwidth: maxPostcopyBw === undefined ? 0 : parseSize('max-postcopy-bandwidth', maxPostcopyBw),
    },
    control: controlAddress(v),
    metrics: metricsAddress(v),
  };
}

/** `vmig snapshot FILE`: the guest flags of `migrate`, the snapshot's own, and flags it refuses. */
export const SNAPSHOT_OPTIONS = {
  ram: { type: 'string' },
  'ram-block': { type: 'string', multiple: true },
  ...GUEST_OPTIONS,
  'zero-page-detection': { type: 'string' },
  'snapshot-cow-buffer': { type: 'string' },
  verify: { type: 'boolean' },
  json: { type: 'boolean' },
  'log-level': { type: 'string' },
  // Known so that they are refused with a reason rather than as unknown flags.
  postcopy: { type: 'boolean' },
  'auto-converge': { type: 'boolean' },
  'multifd-channels': { type: 'string' },
  'multifd-compression': { type: 'string' },
  metrics: { type: 'string' },
} as const;

export const RESTORE_OPTIONS = {
  'dump-ram': { type: 'string' },
  'max-ram': { type: 'string' },
  json: { type: 'boolean' },
  'log-level': { type: 'string' },
} as const;

export interface SnapshotSettings extends GuestSettings {
  file: string;
  ram: RamSpec[];
  zeroPages: boolean;
  /** Copy-on-write buffer in pages; 0 = blocking write faults only. */
  cowBufferPages: number;
  verify: boolean;
  json: boolean;
  logLevel: LogLevel;
  metrics: string | undefined;
}

/** Where a snapshot goes: `file:PATH` or a plain path; never a migration URI. */
export function parseSnapshotFile(arg: string): string {
  if (arg.startsWith('file:')) {
    if (arg.length === 5) throw new InvalidArgumentError("snapshot: empty path in 'file:'");
    return arg.slice(5);
  }
  const scheme = /^([a-z][a-z0-9+.-]*):/i.exec(arg);
  if (scheme && ['tcp', 'unix', 'exec', 'fd', 'rdma', 'vsock'].includes(scheme[1]!.toLowerCase())) {
    throw new InvalidArgumentError(`snapshot: '${arg}' is a migration URI; a snapshot is written to a file (PATH or file:PATH)`);
  }
  if (!arg) throw new InvalidArgumentError('snapshot: empty file name');
  return arg;
}

export function snapshotSettings(file: string, v: Values): SnapshotSettings {
  if (v['postcopy']) throw new InvalidArgumentError('--postcopy makes no sense with a background snapshot (there is no destination to run)');
  if (v['auto-converge']) throw new InvalidArgumentError('--auto-converge makes no sense with a background snapshot (one pass, no dirty tracking)');
  if (v['multifd-channels'] !== undefined || v['multifd-compression'] !== undefined) {
    throw new InvalidArgumentError('--multifd-channels/--multifd-compression: a background snapshot is written to one file, not over multifd channels');
  }
  const ram = parseRamSpecs(str(v, 'ram'), v['ram-block'] as string[] | undefined);
  if (!ram) throw new InvalidArgumentError('snapshot: --ram SIZE (or --ram-block NAME=SIZE) is required');
  const guest = guestSettings(v);
  const zpd = parseChoice('zero-page-detection', str(v, 'zero-page-detection') ?? 'legacy', ['none', 'legacy'] as const);
  const cow = str(v, 'snapshot-cow-buffer');
  const cowBytes = cow === undefined ? 0 : parseSize('snapshot-cow-buffer', cow);
  if (cowBytes % 4096 !== 0) throw new InvalidArgumentError('--snapshot-cow-buffer must be a multiple of 4K');
  if (cowBytes > 4 * 2 ** 30) throw new InvalidArgumentError('--snapshot-cow-buffer: at most 4G');
  return {
    file: parseSnapshotFile(file),
    ram,
    ...guest,
    zeroPages: zpd === 'legacy',
    metrics: metricsAddress(v),
    cowBufferPages: cowBytes / 4096,
    verify: v['verify'] === true,
    json: v['json'] === true,
    logLevel: parseChoice('log-level', str(v, 'log-level') ?? 'warn', LOG_LEVELS),
  };
}

/** QEMU's default multifd-channels. */
const DEFAULT_QMP_MULTIFD_CHANNELS = 2;
/** multifd-channels set over QMP while the multifd capability was off. */
const QMP_MULTIFD_CHANNELS = new WeakMap<SharedSettings, number>();

/** QMP's migrate-set-capabilities before `migrate` / `migrate-incoming`: QEMU's MigrationCapability names, the ones vmig has. */
export function applyQmpCapabilities(s: SharedSettings & { params?: MigrationParams }, caps: unknown): void {
  if (!Array.isArray(caps)) throw new InvalidArgumentError("Parameter 'capabilities' is missing");
  for (const c of caps as unknown[]) {
    const { capability, state } = (c ?? {}) as { capability?: unknown; state?: unknown };
    if (typeof state !== 'boolean') throw new InvalidArgumentError("Parameter 'state' expects a boolean");
    if (capability === 'auto-converge' && s.params) s.params.autoConverge = state;
    else if (capability === 'postcopy-ram') {
      s.postcopy = state;
      if (s.params) s.params.postcopy = state;
    }
    else if (capability === 'postcopy-preempt') s.postcopyPreempt = state;
    else if (capability === 'multifd') s.multifdChannels = state ? (s.multifdChannels || (QMP_MULTIFD_CHANNELS.get(s) ?? DEFAULT_QMP_MULTIFD_CHANNELS)) : 0;
    else throw new InvalidArgumentError(`Capability '${String(capability)}' is not supported (${CAPABILITIES.join(', ')})`);
  }
  if (s.postcopyPreempt && !s.postcopy) throw new InvalidArgumentError('Postcopy preempt requires postcopy-ram');
}

/** QMP's multifd parameters, settable before `migrate` / `migrate-incoming`; returns the other arguments. */
export function applyQmpMultifdParameters(s: SharedSettings, args: Record<string, unknown>): Record<string, unknown> {
  const rest: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(args)) {
    if (k === 'multifd-channels') {
      if (typeof v !== 'number' || !Number.isInteger(v) || v < 1 || v > MAX_MULTIFD_CHANNELS) throw new InvalidArgumentError(`multifd-channels must be an integer 1..${MAX_MULTIFD_CHANNELS}`);
      // QEMU keeps the parameter whether or not the capability is on.
      QMP_MULTIFD_CHANNELS.set(s, v);
      if (s.multifdChannels > 0) s.multifdChannels = v;
    } else if (k === 'multifd-compression') {
      if (typeof v !== 'string' || !(COMPRESSION_NAMES as readonly string[]).includes(v)) throw new InvalidArgumentError(`multifd-compression must be one of ${COMPRESSION_NAMES.join(', ')}`);
      s.compression = v as CompressionName;
    } else rest[k] = v;
  }
  return rest;
}
