/**
 * The non-iterable part of a savevm stream (qemu_savevm_state_complete_precopy_non_iterable):
 * one FULL section per device, then EOF and the JSON description QEMU appends.
 */
import type { DeviceRegistry, VmStateDevice } from '../devices/device.js';
import type { ByteWriter } from '../io.js';
import { TARGET_PAGE_SIZE } from '../ram/ram-block.js';
import { QEMU_VM_SECTION_FULL } from '../wire/constants.js';
import { putEof, putSectionFooter, putSectionFull, putVmDescription } from '../wire/main-stream.js';

/** Writes every device's FULL section, numbering from `firstSectionId`; then EOF and vmdesc. */
export function putDeviceSectionsAndEof(w: ByteWriter, devices: DeviceRegistry, firstSectionId: number): void {
  const descs = putDeviceSections(w, devices, firstSectionId);
  putEof(w);
  putVmDescription(w, JSON.stringify({ page_size: TARGET_PAGE_SIZE, devices: descs }));
}

/** Every device's FULL section (postcopy's package carries them without EOF); returns their descriptions. */
export function putDeviceSections(w: ByteWriter, devices: DeviceRegistry, firstSectionId: number): unknown[] {
  return devices.list().map((d, i) => putDeviceSection(w, d, firstSectionId + i));
}

/**
 * With postcopy: the devices that announce themselves at setup (VmStateDevice.announceAtSetup),
 * numbered as in putDeviceSections.
 */
export function putSetupDeviceSections(w: ByteWriter, devices: DeviceRegistry, firstSectionId: number): void {
  devices.list().forEach((d, i) => {
    if (d.announceAtSetup) putDeviceSection(w, d, firstSectionId + i);
  });
}

/** One device's FULL section; returns its description for the JSON appended after EOF. */
function putDeviceSection(w: ByteWriter, d: VmStateDevice, sectionId: number): unknown {
  putSectionFull(w, QEMU_VM_SECTION_FULL, { sectionId, idstr: d.idstr, instanceId: d.instanceId, versionId: d.versionId });
  d.save(w);
  putSectionFooter(w, sectionId);
  return { name: d.idstr, instance_id: d.instanceId, vmsd_name: d.idstr, version: d.versionId };
}
