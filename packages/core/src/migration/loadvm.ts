/**
 * Destination main loop (QEMU's qemu_loadvm_state / qemu_loadvm_state_main): header,
 * sections, commands, EOF. With postcopy the loop also runs the packaged blob (LISTEN,
 * device state, RUN) and keeps loading RAM after RUN while the vCPUs run.
 */
import { DeviceRegistry, checkDeviceVersion } from '../devices/device.js';
import { isTransportFailure, StreamError, toVmigError, VmigError, type VmigErrorCode } from '../errors.js';
import { EndOfStream, MemorySource, type StreamSource } from '../io.js';
import type { GuestRam } from '../ram/ram-block.js';
import type { PostcopyIncoming } from '../postcopy/postcopy-incoming.js';
import {
  MAX_VM_CMD_PACKAGED_SIZE,
  MAX_VMDESC_LEN,
  MIG_CMD_OPEN_RETURN_PATH,
  MIG_CMD_PACKAGED,
  MIG_CMD_PING,
  MIG_CMD_POSTCOPY_ADVISE,
  MIG_CMD_POSTCOPY_LISTEN,
  MIG_CMD_POSTCOPY_RAM_DISCARD,
  MIG_CMD_POSTCOPY_RESUME,
  MIG_CMD_POSTCOPY_RUN,
  MIG_CMD_RECV_BITMAP,
  QEMU_VM_COMMAND,
  QEMU_VM_EOF,
  QEMU_VM_SECTION_END,
  QEMU_VM_SECTION_FULL,
  QEMU_VM_SECTION_PART,
  QEMU_VM_SECTION_START,
  QEMU_VM_VMDESCRIPTION,
  RAM_SECTION_IDSTR,
  RAM_SECTION_VERSION,
} from '../wire/constants.js';
import { getString, getU32, getU8, readFileHeader, readSectionFooter, readSectionHeader } from '../wire/main-stream.js';
import { decodeRecvBitmapCmd } from '../wire/recovery.js';
import { RamLoadState, type RamLoadOptions } from './ram-load.js';

export interface LoadVmOptions extends RamLoadOptions {
  /** The postcopy state machine (it also places the main channel's pages after LISTEN). */
  postcopy?: PostcopyIncoming | undefined;
  devices: DeviceRegistry;
  /** MIG_CMD_OPEN_RETURN_PATH: the source wants replies on the return path. */
  onOpenReturnPath?: () => void;
  /** MIG_CMD_PING: reply with PONG on the return path. */
  onPing?: (value: number) => void;
  /** The first failure elsewhere (multifd, preempt channel): waiting for pages stops on it. */
  failed?: () => VmigError | undefined;
  /**
   * Postcopy recovery (QEMU's postcopy_pause_incoming): the main stream failed after RUN
   * with `cause`, a transport failure (a malformed stream is not recovered). Resolves with
   * the new main connection's stream (migrate-recover, then the source's `migrate
   * resume=true`), on which the load goes on; rejects to end the load with that error.
   */
  onPostcopyPause?: (cause: VmigError) => Promise<StreamSource>;
  /** MIG_CMD_RECV_BITMAP (recovering only): the block's received bitmap on the return path. */
  onRecvBitmap?: (idstr: string) => void;
  /** MIG_CMD_POSTCOPY_RESUME (recovering only): RESUME_ACK, and page requests flow again. */
  onPostcopyResume?: () => Promise<void>;
}

export interface LoadVmResult {
  machine: string | undefined;
  ram: GuestRam;
  normalPages: number;
  zeroPages: number;
  returnPathOpened: boolean;
}

/** How the section loop ended: EOF, RUN inside a package (LOADVM_QUIT), or the package's end. */
type LoopEnd = 'eof' | 'quit' | 'end';

class LoadVm {
  readonly ramLoad: RamLoadState;
  ramSectionId: number | undefined;
  returnPathOpened = false;
  /** The source's machine type (the configuration section), for error messages. */
  machine: string | undefined;
  /** On a recovery connection, until POSTCOPY_RESUME. */
  recovering = false;

  constructor(private readonly opts: LoadVmOptions) {
    this.ramLoad = new RamLoadState({
      ...opts,
      onRamReady: (ram) => {
        opts.postcopy?.attachRam(ram);
        opts.onRamReady?.(ram);
      },
    });
    if (opts.ram) opts.postcopy?.attachRam(opts.ram);
  }

  private fail(msg: string, code: VmigErrorCode = 'VMIG_ERR_STREAM_FORMAT', channel = 'main'): never {
    throw new StreamError(code, msg, { channel, phase: 'load' });
  }

  private postcopy(cmd: string): PostcopyIncoming {
    if (!this.opts.postcopy) this.fail(`${cmd}: the source uses postcopy but this side was started without --postcopy`, 'VMIG_ERR_POSTCOPY');
    return this.opts.postcopy;
  }

  /**
   * qemu_loadvm_state_main over `s`. `packagedLen`: `s` is a MIG_CMD_PACKAGED blob of that
   * many bytes, which ends without EOF.
   */
  async loop(s: StreamSource, packagedLen?: number): Promise<LoopEnd> {
    const { opts } = this;
    const packaged = packagedLen !== undefined;
    const channel = packaged ? 'main/packaged' : (opts.channel ?? 'main');
    for (;;) {
      if (packaged && s.bytesRead === packagedLen) return 'end';
      const h = await readSectionHeader(s, channel);
      switch (h.type) {
        case QEMU_VM_SECTION_START:
        case QEMU_VM_SECTION_FULL: {
          if (h.idstr === RAM_SECTION_IDSTR && h.instanceId === 0) {
            if (h.type !== QEMU_VM_SECTION_START || this.ramSectionId !== undefined) this.fail('unexpected second RAM section start');
            if (h.versionId !== RAM_SECTION_VERSION) this.fail(`RAM section version ${h.versionId}, expected ${RAM_SECTION_VERSION}`, 'VMIG_ERR_DEVICE_VERSION');
            this.ramSectionId = h.sectionId;
            await this.ramLoad.loadSectionBody(s);
          } else {
            const dev = opts.devices.find(h.idstr, h.instanceId);
            if (!dev) {
              // vmig is not a VM: it loads RAM, the sections QEMU's `-M none` sends, and the
              // devices registered here. A real machine's device state cannot go anywhere.
              const known = opts.devices.list().map((d) => d.idstr).join(', ');
              this.fail(
                `unknown section '${h.idstr}' instance ${h.instanceId}${this.machine && this.machine !== 'none' ? ` (the source is machine '${this.machine}': vmig takes QEMU's -M none only)` : ''}; this side loads RAM and ${known}`,
                'VMIG_ERR_UNKNOWN_SECTION',
              );
            }
            checkDeviceVersion(dev, h.versionId);
            await dev.load(s, h.versionId);
          }
          await readSectionFooter(s, h.sectionId, channel);
          break;
        }
        case QEMU_VM_SECTION_PART:
        case QEMU_VM_SECTION_END: {
          if (h.sectionId !== this.ramSectionId) this.fail(`section ${h.sectionId} continued but never started`, 'VMIG_ERR_UNKNOWN_SECTION');
          await this.ramLoad.loadSectionBody(s);
          await readSectionFooter(s, h.sectionId, channel);
          break;
        }
        case QEMU_VM_COMMAND: {
          const end = await this.command(s, h.cmd, h.data, packaged);
          if (end) return end;
          break;
        }
        case QEMU_VM_EOF:
          if (packaged) this.fail('EOF inside a packaged command');
          return 'eof';
      }
    }
  }

  private async command(s: StreamSource, cmd: number, data: Uint8Array, packaged: boolean): Promise<LoopEnd | undefined> {
    const { opts } = this;
    switch (cmd) {
      case MIG_CMD_OPEN_RETURN_PATH:
        this.returnPathOpened = true;
        opts.onOpenReturnPath?.();
        return undefined;
      case MIG_CMD_PING:
        if (data.length !== 4) this.fail('PING with a payload that is not 4 bytes');
        opts.onPing?.(((data[0]! << 24) | (data[1]! << 16) | (data[2]! << 8) | data[3]!) >>> 0);
        return undefined;
      case MIG_CMD_POSTCOPY_ADVISE:
        this.postcopy('POSTCOPY_ADVISE').onAdvise(data);
        return undefined;
      case MIG_CMD_POSTCOPY_RAM_DISCARD:
        this.postcopy('POSTCOPY_RAM_DISCARD').onDiscard(data);
        return undefined;
      case MIG_CMD_RECV_BITMAP: {
        // loadvm_handle_recv_bitmap: only on a recovery connection, for a block this side has.
        if (!this.recovering || !opts.onRecvBitmap) this.fail('RECV_BITMAP outside a postcopy recovery', 'VMIG_ERR_POSTCOPY');
        const idstr = decodeRecvBitmapCmd(data);
        if (!this.ramLoad.ram?.find(idstr)) this.fail(`RECV_BITMAP for unknown RAM block '${idstr}'`, 'VMIG_ERR_UNKNOWN_BLOCK');
        opts.onRecvBitmap(idstr);
        return undefined;
      }
      case MIG_CMD_POSTCOPY_RESUME:
        if (!this.recovering || !opts.onPostcopyResume) this.fail('POSTCOPY_RESUME outside a postcopy recovery', 'VMIG_ERR_POSTCOPY');
        if (data.length !== 0) this.fail('POSTCOPY_RESUME with a payload');
        this.recovering = false;
        await opts.onPostcopyResume();
        return undefined;
      case MIG_CMD_POSTCOPY_LISTEN:
        if (!packaged) this.fail('POSTCOPY_LISTEN outside a packaged command', 'VMIG_ERR_POSTCOPY');
        await this.postcopy('POSTCOPY_LISTEN').onListen();
        return undefined;
      case MIG_CMD_POSTCOPY_RUN:
        if (!packaged) this.fail('POSTCOPY_RUN outside a packaged command', 'VMIG_ERR_POSTCOPY');
        this.postcopy('POSTCOPY_RUN').onRun();
        return 'quit';
      case MIG_CMD_PACKAGED: {
        // loadvm_handle_cmd_packaged: the blob is read whole, then loaded like a stream.
        if (packaged) this.fail('a packaged command inside a packaged command');
        this.postcopy('PACKAGED');
        if (data.length !== 4) this.fail('PACKAGED without its 4-byte length');
        const len = ((data[0]! << 24) | (data[1]! << 16) | (data[2]! << 8) | data[3]!) >>> 0;
        if (len > MAX_VM_CMD_PACKAGED_SIZE) this.fail(`PACKAGED blob of ${len} bytes (limit ${MAX_VM_CMD_PACKAGED_SIZE})`);
        await s.ensure(len);
        const blob = s.buf.slice(s.pos, s.pos + len);
        s.pos += len;
        const end = await this.loop(new MemorySource([blob]), len);
        if (end !== 'quit') this.fail('PACKAGED blob ended without POSTCOPY_RUN', 'VMIG_ERR_POSTCOPY');
        return undefined;
      }
      default:
        this.fail(`unsupported command ${cmd}`);
    }
  }
}

export async function qemuLoadVmState(s: StreamSource, opts: LoadVmOptions): Promise<LoadVmResult> {
  const header = await readFileHeader(s, opts.channel ?? 'main');
  // vmig is not a VM: a real machine's device state (fw_cfg, apic, ...) has nowhere to go.
  // Said at once, from the configuration section, not at the first section it cannot load.
  if (header.machine !== undefined && header.machine !== 'none') {
    throw new StreamError(
      'VMIG_ERR_MACHINE',
      `the source is machine '${header.machine}': vmig takes guest RAM from QEMU's '-M none' (and vmig sources) only, since it cannot load the device state of a real machine`,
      { channel: opts.channel ?? 'main', phase: 'load' },
    );
  }
  const lv = new LoadVm(opts);
  lv.machine = header.machine;
  let stream = s;
  for (;;) {
    try {
      await lv.loop(stream);
      if (lv.ramSectionId === undefined || !lv.ramLoad.ram) throw new StreamError('VMIG_ERR_STREAM_FORMAT', 'stream ended without a RAM section', { channel: 'main', phase: 'load' });
      // Postcopy: the main stream is done, but requested pages may still be on the preempt channel.
      await opts.postcopy?.finish(opts.failed ?? (() => undefined));
      break;
    } catch (e) {
      // After RUN the guest runs here: a broken connection pauses the load instead of ending it.
      // So does anything wrong on a recovery connection before its RESUME: whoever connected
      // there (a stranger, a source that went away) cannot end the guest.
      if (!opts.onPostcopyPause || opts.postcopy?.state !== 'running' || !(lv.recovering || isTransportFailure(e))) throw e;
      const cause = e instanceof EndOfStream ? new VmigError('VMIG_ERR_PEER_CLOSED', 'the source closed the main channel', { channel: 'main', phase: 'postcopy' }) : toVmigError(e, 'VMIG_ERR_CHANNEL');
      stream = await opts.onPostcopyPause(cause);
      lv.recovering = true;
    }
  }
  const { ramLoad } = lv;
  if (!ramLoad.ram) throw new StreamError('VMIG_ERR_STREAM_FORMAT', 'stream ended without a RAM section', { channel: 'main', phase: 'load' });
  return {
    machine: header.machine,
    ram: ramLoad.ram,
    normalPages: ramLoad.normalPages,
    zeroPages: ramLoad.zeroPages,
    returnPathOpened: lv.returnPathOpened,
  };
}

/** Reads the optional JSON description QEMU appends after EOF. */
export async function readVmDescription(s: StreamSource): Promise<unknown> {
  await s.ensure(1);
  const type = getU8(s);
  if (type !== QEMU_VM_VMDESCRIPTION) {
    throw new StreamError('VMIG_ERR_STREAM_FORMAT', `expected vmdesc after EOF, got 0x${type.toString(16)}`, { channel: 'main' });
  }
  await s.ensure(4);
  const len = getU32(s);
  if (len > MAX_VMDESC_LEN) throw new StreamError('VMIG_ERR_STREAM_FORMAT', `vmdesc of ${len} bytes`, { channel: 'main' });
  await s.ensure(len);
  try {
    return JSON.parse(getString(s, len));
  } catch {
    throw new StreamError('VMIG_ERR_STREAM_FORMAT', 'vmdesc is not JSON', { channel: 'main' });
  }
}
