import { readFileSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { DeviceRegistry, GlobalStateDevice, MemorySource, qemuLoadVmState, readVmDescription, TARGET_PAGE_SIZE, TimerDevice } from '../src/index.js';
import { createRamFrom, splitAt } from './helpers.js';

const VECTOR = new URL('../../cli/test/fixtures/qemu-7.2-multifd-2ch/', import.meta.url);
const load = (name: string): Uint8Array => gunzipSync(readFileSync(new URL(name, VECTOR)));

// The main channel of a real QEMU 7.2 migration (multifd, 2 channels, legacy flush on EOS):
// RAM setup, zero pages on the main stream, EOS markers, timer + globalstate, EOF, vmdesc.
describe('QEMU 7.2 capture, main channel', () => {
  it('decodes without error, split at arbitrary points', async () => {
    const conn0 = load('conn0.bin.gz');
    const ramBin = load('ram.bin.gz');
    const globalstate = new GlobalStateDevice('');
    const timer = new TimerDevice();
    let syncs = 0;
    let legacy: boolean | undefined;
    const src = new MemorySource(splitAt(conn0, [1, 5, 8, 13, 77, 4096, 4100, 9000, 20000]));
    const res = await qemuLoadVmState(src, {
      createRam: createRamFrom,
      devices: new DeviceRegistry().register(timer).register(globalstate),
      // The dialect is read off the stream: no MULTIFD_FLUSH before the setup EOS.
      multifd: { sync: async () => void syncs++, setDialect: (l) => (legacy = l) },
    });
    expect(res.machine).toBe('none');
    expect(res.ram.blocks.map((b) => [b.idstr, b.usedLength])).toEqual([['mem', 16 << 20]]);
    expect(res.normalPages).toBe(0); // normal pages travel on the multifd channels
    expect(res.zeroPages).toBeGreaterThan(0);
    expect(legacy).toBe(true);
    expect(syncs).toBeGreaterThan(1); // every EOS is a barrier in QEMU 7.2's dialect
    expect(globalstate.runstate).toBe('prelaunch');
    // Every page the main channel declared zero is zero in the RAM QEMU sent.
    const host = res.ram.blocks[0]!.host;
    let zeroChecked = 0;
    for (let off = 0; off < host.length; off += TARGET_PAGE_SIZE) {
      if (Buffer.from(ramBin.subarray(off, off + TARGET_PAGE_SIZE)).equals(Buffer.alloc(TARGET_PAGE_SIZE))) zeroChecked++;
    }
    expect(zeroChecked).toBeGreaterThanOrEqual(res.zeroPages);
    const desc = (await readVmDescription(src)) as { page_size: number; devices: { name: string }[] };
    expect(desc.page_size).toBe(4096);
    expect(desc.devices.map((d) => d.name)).toEqual(['timer', 'globalstate']);
  });
});
