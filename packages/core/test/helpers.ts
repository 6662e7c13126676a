import {
  DeviceRegistry,
  GlobalStateDevice,
  GuestRam,
  MemorySink,
  MigrationThread,
  DEFAULT_PARAMS,
  TimerDevice,
  type VmRunControl,
} from '../src/index.js';

export const idleVm: VmRunControl = { stop: async () => {}, resume: () => {} };

export function qemuDevices(): DeviceRegistry {
  return new DeviceRegistry().register(new TimerDevice()).register(new GlobalStateDevice());
}

export function createRamFrom(blocks: readonly { idstr: string; usedLength: number }[]): GuestRam {
  return GuestRam.create(blocks.map((b) => ({ idstr: b.idstr, size: b.usedLength })), { prefault: false });
}

/** Runs a whole precopy migration of `ram` into memory and returns the stream. */
export async function precopyToMemory(ram: GuestRam): Promise<Uint8Array> {
  const sink = new MemorySink();
  const mig = new MigrationThread({ ram, sink, vm: idleVm, devices: qemuDevices(), params: DEFAULT_PARAMS });
  const info = await mig.run();
  if (info.status !== 'completed') throw new Error(`precopy failed: ${JSON.stringify(info.error)}`);
  return sink.bytes();
}

/** Splits `data` at the given cut points (any order, duplicates allowed). */
export function splitAt(data: Uint8Array, cuts: number[]): Uint8Array[] {
  const points = [...new Set(cuts.map((c) => c % (data.length + 1)))].sort((a, b) => a - b);
  const out: Uint8Array[] = [];
  let prev = 0;
  for (const p of points) {
    out.push(data.subarray(prev, p));
    prev = p;
  }
  out.push(data.subarray(prev));
  return out.filter((c) => c.length > 0);
}
