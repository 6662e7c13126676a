import { VmigError } from '../errors.js';
import type { ByteWriter, StreamSource } from '../io.js';

/**
 * A device whose state travels in a QEMU_VM_SECTION_FULL section after the RAM
 * (QEMU's SaveStateEntry with a VMStateDescription). A FULL section carries no length:
 * `load` must consume exactly what `save` wrote.
 */
export interface VmStateDevice {
  readonly idstr: string;
  readonly instanceId: number;
  /** The version this side writes. */
  readonly versionId: number;
  /** The oldest version this side can load. */
  readonly minimumVersionId: number;
  save(w: ByteWriter): void;
  /**
   * The completion hook (seed 002): called once the vCPUs are stopped and before the final
   * bitmap sync, so a device can write its cached state into guest RAM (through
   * RamBlock.writeGuest, which dirties the pages) and have it travel in the final pass.
   */
  flushToRam?(): void;
  /**
   * With postcopy, also sent once right after the RAM setup section (in the spirit of
   * QEMU's save_setup): configuration the destination needs before the switch, such as how
   * many vCPU threads to create. The copy in the final device state is loaded last and wins.
   */
  readonly announceAtSetup?: boolean;
  load(s: StreamSource, versionId: number): Promise<void>;
}

export class DeviceRegistry {
  private readonly devices: VmStateDevice[] = [];

  register(d: VmStateDevice): this {
    if (this.find(d.idstr, d.instanceId)) {
      throw new VmigError('VMIG_ERR_INVALID_ARG', `device '${d.idstr}' instance ${d.instanceId} registered twice`);
    }
    this.devices.push(d);
    return this;
  }

  find(idstr: string, instanceId: number): VmStateDevice | undefined {
    return this.devices.find((d) => d.idstr === idstr && d.instanceId === instanceId);
  }

  list(): readonly VmStateDevice[] {
    return this.devices;
  }
}

/** Checks a stream's version against what a device can load (QEMU's vmstate_load_state). */
export function checkDeviceVersion(d: VmStateDevice, versionId: number): void {
  if (versionId > d.versionId || versionId < d.minimumVersionId) {
    throw new VmigError(
      'VMIG_ERR_DEVICE_VERSION',
      `device '${d.idstr}' instance ${d.instanceId}: stream has version ${versionId}, this side loads ${d.minimumVersionId}..${d.versionId}`,
      { phase: 'load' },
    );
  }
}
