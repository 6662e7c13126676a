/**
 * Both ends of a migration in this process, over a real loopback socket, with real writer
 * threads: for tests that need to hook into the migration (notifiers, devices, hints) and
 * look at both RAMs afterwards.
 */
import net from 'node:net';
import { BufferedWriter, ByteReader } from '@vmig/channel';
import {
  DEFAULT_PARAMS,
  DeviceRegistry,
  encodeRpPong,
  encodeRpShut,
  GuestRam,
  MigrationNotifiers,
  MigrationThread,
  qemuLoadVmState,
  toVmigError,
  type MigrationInfo,
  type MigrationParams,
  type VmigError,
} from '@vmig/core';
import { fillRam, VcpuPool, type WriterOptions } from '@vmig/test-harness';
import { ReturnPathThread } from '@vmig/migration';

export interface InProcessOptions {
  ramBytes: number;
  writers?: WriterOptions;
  params?: Partial<MigrationParams>;
  srcDevices?: (ram: GuestRam, vcpus: VcpuPool) => DeviceRegistry;
  dstDevices?: (ram: () => GuestRam | undefined) => DeviceRegistry;
  /**
   * The destination's answer to a PING (value): the PONG is written after `delayMs` (a
   * destination slow to load what came before), then `onSent` is called; or never
   * (undefined: a peer that ignores PING).
   */
  answerPing?: (value: number) => { delayMs: number; onSent?: () => void } | undefined;
  /** Called with the migration before it runs (register notifiers, schedule faults). */
  prepare?: (mig: MigrationThread, ctx: { srcRam: GuestRam; vcpus: VcpuPool; abort: AbortController; destroyDestination: () => void }) => void;
}

export interface InProcessResult {
  info: MigrationInfo;
  srcRam: GuestRam;
  dstRam: GuestRam | undefined;
  dstError: VmigError | undefined;
  writersRunningAfter: boolean;
}

export async function migrateInProcess(o: InProcessOptions): Promise<InProcessResult> {
  // Started first, as the CLI does: its thread boots while the RAM is made.
  const returnPath = new ReturnPathThread();
  const srcRam = GuestRam.create([{ idstr: 'pc.ram', size: o.ramBytes }]);
  fillRam(srcRam, 'random', '7');
  const dstRamFixed = GuestRam.create([{ idstr: 'pc.ram', size: o.ramBytes }]);
  let dstRam: GuestRam | undefined = dstRamFixed;
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as net.AddressInfo).port;

  let dstSock: net.Socket | undefined;
  const destination = new Promise<VmigError | undefined>((resolve) => {
    server.once('connection', (sock) => {
      dstSock = sock;
      sock.on('error', () => {});
      const reader = new ByteReader(sock, { channel: 'main' });
      let rp = false;
      qemuLoadVmState(reader, {
        ram: dstRamFixed,
        createRam: () => dstRamFixed,
        devices: o.dstDevices?.(() => dstRam) ?? new DeviceRegistry(),
        onOpenReturnPath: () => (rp = true),
        onPing: (value) => {
          const answer = o.answerPing?.(value);
          const pong = (): void => {
            if (sock.destroyed) return;
            sock.write(encodeRpPong(value));
            answer?.onSent?.();
          };
          if (answer?.delayMs === 0) pong();
          else if (answer) setTimeout(pong, answer.delayMs);
        },
      }).then(
        () => {
          if (rp) sock.write(encodeRpShut(0));
          sock.end();
          resolve(undefined);
        },
        (e) => {
          if (rp && !sock.destroyed) sock.write(encodeRpShut(1));
          sock.end();
          resolve(toVmigError(e, 'VMIG_ERR_CHANNEL'));
        },
      );
    });
  });

  const vcpus = await VcpuPool.start(srcRam, o.writers ?? { writers: 0, dirtyRate: 0 });
  const sock = net.connect(port, '127.0.0.1');
  await new Promise<void>((r, j) => sock.once('connect', r).once('error', j));
  const abort = new AbortController();
  returnPath.attach(sock, srcRam);
  const mig = new MigrationThread({
    ram: srcRam,
    sink: new BufferedWriter(sock, { channel: 'main' }),
    returnPath,
    vm: vcpus,
    devices: o.srcDevices?.(srcRam, vcpus) ?? new DeviceRegistry(),
    params: { ...DEFAULT_PARAMS, ...o.params },
    notifiers: new MigrationNotifiers(),
    signal: abort.signal,
  });
  sock.on('error', (e) => mig.fail(e));
  o.prepare?.(mig, { srcRam, vcpus, abort, destroyDestination: () => dstSock?.destroy() });
  const info = await mig.run();
  await returnPath.close();
  sock.destroy();
  const dstError = await destination;
  server.close();
  const writersRunningAfter = vcpus.count > 0 && (await vcpus.keepsWriting(100));
  await vcpus.terminate();
  if (dstError) dstRam = undefined;
  return { info, srcRam, dstRam, dstError, writersRunningAfter };
}

/** Per-page comparison: indices of pages that differ. */
export function differingPages(a: GuestRam, b: GuestRam): number[] {
  const out: number[] = [];
  const x = a.blocks[0]!;
  const y = b.blocks[0]!;
  for (let p = 0; p < x.pages; p++) if (Buffer.compare(x.page(p), y.page(p)) !== 0) out.push(p);
  return out;
}
