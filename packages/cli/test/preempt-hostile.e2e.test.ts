/**
 * A hostile postcopy preempt connection into a real `vmig incoming`: a fake source (this
 * test, over loopback) takes the destination through the switch (ADVISE, the RAM setup
 * section, a discard, the packaged LISTEN and RUN), keeps the main connection open, and
 * then sends a bad record on the preempt connection. The destination's preempt side must
 * fail the migration with the record's stable code, say the guest is split, and exit 1:
 * no crash, no hang.
 */
import net from 'node:net';
import { describe, expect, it } from 'vitest';
import {
  encodePackagedLength,
  encodePostcopyAdvise,
  encodePostcopyRamDiscard,
  MemorySink,
  MIG_CMD_OPEN_RETURN_PATH,
  MIG_CMD_PACKAGED,
  MIG_CMD_POSTCOPY_ADVISE,
  MIG_CMD_POSTCOPY_LISTEN,
  MIG_CMD_POSTCOPY_RAM_DISCARD,
  MIG_CMD_POSTCOPY_RUN,
  putCommand,
  putFileHeader,
  putRamEos,
  putRamMemSize,
  putRamPage,
  putRamZeroPage,
  putSectionFooter,
  putSectionFull,
  QEMU_VM_SECTION_START,
  TARGET_PAGE_SIZE,
} from '@vmig/core';
import { spawnCli } from '@vmig/test-harness';
import { CLI_MAIN } from './cli.js';

const RAM = 16 << 20;

/** The main stream up to and including the packaged LISTEN + RUN, the first 64 pages discarded. */
function mainStream(): Uint8Array {
  const w = new MemorySink();
  putFileHeader(w, 'none');
  putCommand(w, MIG_CMD_OPEN_RETURN_PATH);
  putCommand(w, MIG_CMD_POSTCOPY_ADVISE, encodePostcopyAdvise());
  putSectionFull(w, QEMU_VM_SECTION_START, { sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 });
  putRamMemSize(w, [{ idstr: 'pc.ram', usedLength: RAM }]);
  putRamEos(w);
  putSectionFooter(w, 2);
  putCommand(w, MIG_CMD_POSTCOPY_RAM_DISCARD, encodePostcopyRamDiscard('pc.ram', [{ start: 0, length: 64 * TARGET_PAGE_SIZE }]));
  const p = new MemorySink();
  putCommand(p, MIG_CMD_POSTCOPY_LISTEN);
  putCommand(p, MIG_CMD_POSTCOPY_RUN);
  putCommand(w, MIG_CMD_PACKAGED, encodePackagedLength(p.bytesWritten));
  w.putBytes(p.bytes());
  return w.bytes();
}

function connect(port: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect(port, '127.0.0.1', () => resolve(s));
    s.on('error', reject);
  });
}

const page = new Uint8Array(TARGET_PAGE_SIZE).fill(0xee);
const cases: [string, (w: MemorySink) => void, string][] = [
  ['a page of an unknown block', (w) => putRamPage(w, 0, 'nope', false, page), 'VMIG_ERR_UNKNOWN_BLOCK'],
  ['a page past the end of RAM', (w) => putRamPage(w, RAM, 'pc.ram', false, page), 'VMIG_ERR_BAD_OFFSET'],
  ['a block list', (w) => putRamMemSize(w, [{ idstr: 'pc.ram', usedLength: RAM }]), 'VMIG_ERR_STREAM_FORMAT'],
  ['a zero page with a fill byte', (w) => w.putBytes(zeroPageFilled(9)), 'VMIG_ERR_STREAM_FORMAT'],
  ['a stream cut inside a page', (w) => w.putBytes(pageCut()), 'VMIG_ERR_PEER_CLOSED'],
];

function zeroPageFilled(fill: number): Uint8Array {
  const w = new MemorySink();
  putRamZeroPage(w, 0, 'pc.ram', false);
  const b = w.bytes().slice();
  b[b.length - 1] = fill;
  return b;
}

function pageCut(): Uint8Array {
  const w = new MemorySink();
  putRamPage(w, 0, 'pc.ram', false, page);
  return w.bytes().subarray(0, 2000);
}

describe('a hostile preempt connection after the postcopy switch', () => {
  for (const [name, record, code] of cases) {
    it(`${name}: ${code}, the guest reported split, exit 1`, async () => {
      const dst = spawnCli(CLI_MAIN, ['incoming', 'tcp:127.0.0.1:0', '--json', '--ram', '16M', '--postcopy', '--postcopy-preempt']);
      const listening = await dst.waitFor((l) => l['event'] === 'listening');
      const port = Number(/:(\d+)$/.exec(String(listening['uri']))![1]);
      const main = await connect(port);
      main.write(mainStream());
      // The destination is running the guest once its LISTEN notifier fired.
      await dst.waitFor((l) => l['event'] === 'postcopy' && l['reason'] === 'INBOUND_LISTEN');
      const preempt = await connect(port);
      const w = new MemorySink();
      // A good record first (the channel starts with a RAM record), then the bad one.
      putRamPage(w, 0, 'pc.ram', false, page);
      record(w);
      preempt.end(w.bytes());
      const run = await dst.done;
      main.destroy();
      preempt.destroy();
      expect(run.code).toBe(1);
      expect(run.report?.['status']).toBe('failed');
      const err = run.report?.['error'] as Record<string, string>;
      expect(err['message']).toContain('split');
      expect(err['message']).toContain(code);
    }, 30_000);
  }
});
