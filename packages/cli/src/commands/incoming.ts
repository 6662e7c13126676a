/**
 * `vmig incoming URI`: the destination. Listens, loads one migration stream into guest RAM,
 * replies on the return path, reports the loaded RAM's digest, exits.
 */
import { open } from 'node:fs/promises';
import type net from 'node:net';
import { ByteReader, formatMigrationUri, listen, parseMigrationUri } from '@vmig/channel';
import {
  DeviceRegistry,
  EndOfStream,
  GlobalStateDevice,
  GuestRam,
  qemuLoadVmState,
  readVmDescription,
  encodeRpPong,
  encodeRpShut,
  InvalidArgumentError,
  TimerDevice,
  toVmigError,
  VmigError,
} from '@vmig/core';
import { digestRam } from '@vmig/test-harness';
import { INCOMING_OPTIONS, sharedSettings } from '../options.js';
import { parseCommandArgs } from '../args.js';
import { fmtBytes, Output } from '../output.js';
import { resourceUsage } from '../resources.js';

export async function incomingCommand(argv: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs('incoming', argv, INCOMING_OPTIONS);
  if (positionals.length !== 1) throw new InvalidArgumentError('incoming: expected one URI (tcp:HOST:PORT or unix:PATH)');
  const uri = parseMigrationUri(positionals[0]!);
  const settings = sharedSettings(values);
  const out = new Output(settings.json);

  // Pre-fault RAM before anyone connects, so that touching fresh memory is not migration time.
  let ram = settings.ram ? GuestRam.create(settings.ram) : undefined;
  const listener = await listen(uri);
  out.event({ event: 'listening', uri: formatMigrationUri(listener.uri) }, `vmig: listening on ${formatMigrationUri(listener.uri)}`);

  let sock: net.Socket | undefined;
  const start = performance.now();
  let loadStart = start;
  let returnPath = false;
  try {
    sock = await listener.accept();
    await listener.close();
    loadStart = performance.now();
    const conn = sock;
    const reader = new ByteReader(conn, { channel: 'main' });
    const devices = new DeviceRegistry().register(new TimerDevice()).register(new GlobalStateDevice());
    const result = await qemuLoadVmState(reader, {
      ram,
      createRam: (blocks) => GuestRam.create(blocks.map((b) => ({ idstr: b.idstr, size: b.usedLength }))),
      devices,
      onOpenReturnPath: () => (returnPath = true),
      onPing: (v) => conn.write(encodeRpPong(v)),
    });
    ram = result.ram;
    const loadMs = performance.now() - loadStart;
    // Loaded: tell the source at once (its downtime ends here), then digest. Nothing on
    // this side writes guest RAM in precopy, so the digest is of RAM as loaded.
    if (returnPath) conn.write(encodeRpShut(0));
    const digest = digestRam(ram);
    // QEMU appends a JSON description after EOF; read it if the source sends one.
    try {
      await readVmDescription(reader);
    } catch (e) {
      if (!(e instanceof EndOfStream)) throw e;
    }
    const dumpFile = values['dump-ram'];
    if (typeof dumpFile === 'string' && dumpFile.length > 0) await dumpRam(ram, dumpFile);
    conn.end();
    out.report(
      {
        role: 'destination',
        status: 'completed',
        totalTimeMs: round(performance.now() - start),
        loadTimeMs: round(loadMs),
        machine: result.machine ?? null,
        ram: {
          total: ram.totalBytes,
          normal: result.normalPages,
          duplicate: result.zeroPages,
          blocks: ram.blocks.map((b) => ({ idstr: b.idstr, size: b.usedLength })),
        },
        ramDigest: digest.digest,
        resources: resourceUsage(),
      },
      `vmig: destination loaded ${fmtBytes(ram.totalBytes)} in ${loadMs.toFixed(0)} ms (${result.normalPages} pages, ${result.zeroPages} zero pages), digest ${digest.digest}`,
    );
    return 0;
  } catch (e) {
    const err = e instanceof EndOfStream ? new VmigError('VMIG_ERR_PEER_CLOSED', 'source closed the migration stream early', { channel: 'main', phase: 'load' }) : toVmigError(e, 'VMIG_ERR_CHANNEL');
    if (sock && returnPath && !sock.destroyed) sock.write(encodeRpShut(1));
    sock?.end();
    sock?.destroy();
    await listener.close().catch(() => {});
    out.report(
      { role: 'destination', status: 'failed', totalTimeMs: round(performance.now() - start), error: err.toJSON() },
      `vmig: incoming migration failed: ${err.message} [${err.code}]`,
    );
    return 1;
  }
}

/** --dump-ram FILE: the received RAM, blocks in stream order. */
async function dumpRam(ram: GuestRam, file: string): Promise<void> {
  const fh = await open(file, 'w');
  try {
    for (const b of ram.blocks) await fh.write(b.host);
  } finally {
    await fh.close();
  }
}

function round(v: number): number {
  return Math.round(v * 1000) / 1000;
}
