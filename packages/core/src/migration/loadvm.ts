/**
 * Destination main loop (QEMU's qemu_loadvm_state): header, sections, commands, EOF.
 */
import { DeviceRegistry, checkDeviceVersion } from '../devices/device.js';
import { StreamError, type VmigErrorCode } from '../errors.js';
import type { StreamSource } from '../io.js';
import type { GuestRam } from '../ram/ram-block.js';
import {
  MAX_VMDESC_LEN,
  MIG_CMD_OPEN_RETURN_PATH,
  MIG_CMD_PING,
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
import { RamLoadState, type RamLoadOptions } from './ram-load.js';

export interface LoadVmOptions extends RamLoadOptions {
  devices: DeviceRegistry;
  /** MIG_CMD_OPEN_RETURN_PATH: the source wants replies on the return path. */
  onOpenReturnPath?: () => void;
  /** MIG_CMD_PING: reply with PONG on the return path. */
  onPing?: (value: number) => void;
}

export interface LoadVmResult {
  machine: string | undefined;
  ram: GuestRam;
  normalPages: number;
  zeroPages: number;
  returnPathOpened: boolean;
}

export async function qemuLoadVmState(s: StreamSource, opts: LoadVmOptions): Promise<LoadVmResult> {
  const channel = opts.channel ?? 'main';
  const header = await readFileHeader(s, channel);
  const ramLoad = new RamLoadState(opts);
  let ramSectionId: number | undefined;
  let returnPathOpened = false;
  const fail: (msg: string, code?: VmigErrorCode) => never = (msg, code = 'VMIG_ERR_STREAM_FORMAT') => {
    throw new StreamError(code, msg, { channel, phase: 'load' });
  };

  for (;;) {
    const h = await readSectionHeader(s, channel);
    switch (h.type) {
      case QEMU_VM_SECTION_START:
      case QEMU_VM_SECTION_FULL: {
        if (h.idstr === RAM_SECTION_IDSTR && h.instanceId === 0) {
          if (h.type !== QEMU_VM_SECTION_START || ramSectionId !== undefined) fail('unexpected second RAM section start');
          if (h.versionId !== RAM_SECTION_VERSION) fail(`RAM section version ${h.versionId}, expected ${RAM_SECTION_VERSION}`, 'VMIG_ERR_DEVICE_VERSION');
          ramSectionId = h.sectionId;
          await ramLoad.loadSectionBody(s);
        } else {
          const dev = opts.devices.find(h.idstr, h.instanceId);
          if (!dev) fail(`unknown section '${h.idstr}' instance ${h.instanceId}`, 'VMIG_ERR_UNKNOWN_SECTION');
          checkDeviceVersion(dev, h.versionId);
          await dev.load(s, h.versionId);
        }
        await readSectionFooter(s, h.sectionId, channel);
        break;
      }
      case QEMU_VM_SECTION_PART:
      case QEMU_VM_SECTION_END: {
        if (h.sectionId !== ramSectionId) fail(`section ${h.sectionId} continued but never started`, 'VMIG_ERR_UNKNOWN_SECTION');
        await ramLoad.loadSectionBody(s);
        await readSectionFooter(s, h.sectionId, channel);
        break;
      }
      case QEMU_VM_COMMAND: {
        if (h.cmd === MIG_CMD_OPEN_RETURN_PATH) {
          returnPathOpened = true;
          opts.onOpenReturnPath?.();
        } else if (h.cmd === MIG_CMD_PING) {
          if (h.data.length !== 4) fail('PING with a payload that is not 4 bytes');
          opts.onPing?.(((h.data[0]! << 24) | (h.data[1]! << 16) | (h.data[2]! << 8) | h.data[3]!) >>> 0);
        } else {
          fail(`unsupported command ${h.cmd}`);
        }
        break;
      }
      case QEMU_VM_EOF: {
        if (ramSectionId === undefined || !ramLoad.ram) fail('stream ended without a RAM section');
        return {
          machine: header.machine,
          ram: ramLoad.ram,
          normalPages: ramLoad.normalPages,
          zeroPages: ramLoad.zeroPages,
          returnPathOpened,
        };
      }
    }
  }
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
