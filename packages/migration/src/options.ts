/**
 * The options migrate() and incoming() share, and their checks: a combination QEMU would
 * refuse (a capability without the one it needs) is refused here too, before any socket
 * opens, with VMIG_ERR_INVALID_ARG and the option's name.
 */
import { InvalidArgumentError } from '@vmig/core';
import { MIN_SLICE_US } from './thread-slice.js';
import { COMPRESSION_NAMES, type CompressionName } from '@vmig/multifd';

/**
 * Nice value of the threads that move background pages after the postcopy switch
 * (thread-priority.ts): 0, unchanged. Lowered, they run only when the guest's vCPUs do not,
 * and vCPUs whose faults are short hardly ever stop: postcopy then lasted 3x longer and the
 * vCPUs faulted 30x more often (nice 19 against 0: 5,400 faults against 750, every vCPU
 * blocked at once 440 against 200 ms; docs/benchmarks.md). The fault path's short slices
 * (thread-slice.ts) keep faults short without it.
 */
export const DEFAULT_POSTCOPY_BACKGROUND_NICE = 0;
/** Scheduler slice (us) of the page-fault path's threads after the postcopy switch (thread-slice.ts). */
export const DEFAULT_POSTCOPY_FAULT_SLICE_US = MIN_SLICE_US;

/**
 * Over TLS the main thread also pumps the return path and the preempt channel
 * (tls-bridge.ts): it is on the fault path, so it keeps its priority.
 */
export function defaultBackgroundNice(tls: unknown): number {
  return tls ? 0 : DEFAULT_POSTCOPY_BACKGROUND_NICE;
}

/** The most multifd channels either side accepts. */
export const MAX_MULTIFD_CHANNELS = 64;

export interface MultifdOptions {
  /** The multifd capability with this many channels; 0 or absent: pages on the main channel. */
  multifdChannels?: number;
  multifdCompression?: CompressionName;
  /** QEMU 7.2's barrier: a flush after each RAM section (multifd-flush-after-each-section). */
  multifdFlushAfterEachSection?: boolean;
  /** The migration's id in every MultiFDInit_t (QEMU's -uuid); 16 zero bytes by default. */
  uuid?: Uint8Array;
}

interface Checked extends MultifdOptions {
  postcopy?: boolean;
  postcopyPreempt?: boolean;
  integrity?: boolean;
  zeroPageDetection?: string;
  channelTimeoutMs?: number;
}

export function checkMultifdOptions(o: Checked): void {
  const n = o.multifdChannels ?? 0;
  if (!Number.isInteger(n) || n < 0 || n > MAX_MULTIFD_CHANNELS) throw new InvalidArgumentError(`multifdChannels: expected 0..${MAX_MULTIFD_CHANNELS}, got ${n}`);
  const c = o.multifdCompression ?? 'none';
  if (!(COMPRESSION_NAMES as readonly string[]).includes(c)) throw new InvalidArgumentError(`multifdCompression: expected one of ${COMPRESSION_NAMES.join(', ')}, got '${c}'`);
  if (c !== 'none' && n === 0) throw new InvalidArgumentError(`multifdCompression '${c}' needs multifdChannels`);
  if (o.multifdFlushAfterEachSection && n === 0) throw new InvalidArgumentError('multifdFlushAfterEachSection needs multifdChannels');
  if (o.uuid !== undefined && o.uuid.length !== 16) throw new InvalidArgumentError(`uuid: expected 16 bytes, got ${o.uuid.length}`);
  if (o.postcopyPreempt && !o.postcopy) throw new InvalidArgumentError('postcopyPreempt needs postcopy');
  if (o.integrity && o.postcopy) throw new InvalidArgumentError('integrity checks RAM as precopy leaves it; it cannot go with postcopy');
  const t = o.channelTimeoutMs;
  if (t !== undefined && (!Number.isInteger(t) || t < 100)) throw new InvalidArgumentError(`channelTimeoutMs: expected an integer of at least 100, got ${t}`);
}

interface CheckedSource extends Checked {
  ram?: unknown;
  vm?: unknown;
  downtimeLimitMs?: number;
  maxBandwidth?: number;
  maxPostcopyBandwidth?: number;
  postcopyAfterRounds?: number;
}

export function checkMigrateOptions(o: CheckedSource): void {
  const ram = o.ram as { blocks?: unknown } | undefined;
  if (!ram || !Array.isArray(ram.blocks)) throw new InvalidArgumentError('ram: expected a GuestRam (GuestRam.create or GuestRam.attach)');
  const vm = o.vm as { stop?: unknown; resume?: unknown } | undefined;
  if (!vm || typeof vm.stop !== 'function' || typeof vm.resume !== 'function') throw new InvalidArgumentError('vm: expected { stop(): Promise<void>, resume(): void }');
  const num = (name: string, v: number | undefined, min: number, integer = false): void => {
    if (v === undefined) return;
    if (typeof v !== 'number' || !Number.isFinite(v) || v < min || (integer && !Number.isInteger(v))) throw new InvalidArgumentError(`${name}: expected ${integer ? 'an integer' : 'a number'} of at least ${min}, got ${String(v)}`);
  };
  num('downtimeLimitMs', o.downtimeLimitMs, 1);
  num('maxBandwidth', o.maxBandwidth, 0);
  num('maxPostcopyBandwidth', o.maxPostcopyBandwidth, 0);
  num('postcopyAfterRounds', o.postcopyAfterRounds, 0, true);
  checkMultifdOptions(o);
  const z = o.zeroPageDetection;
  if (z !== undefined && !['none', 'legacy', 'multifd'].includes(z)) throw new InvalidArgumentError(`zeroPageDetection: expected none, legacy or multifd, got '${z}'`);
  if (z === 'multifd' && !o.multifdChannels) throw new InvalidArgumentError("zeroPageDetection 'multifd' needs multifdChannels");
  if (z === 'multifd' && o.multifdFlushAfterEachSection) throw new InvalidArgumentError("zeroPageDetection 'multifd' cannot go with multifdFlushAfterEachSection (QEMU 7.2's packets have no zero page list)");
}
