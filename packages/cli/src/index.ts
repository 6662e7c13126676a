/**
 * vmig, the library: live migration of memory held in SharedArrayBuffers, in QEMU's wire
 * format. `migrate()` on the source, `incoming()` on the destination, `snapshot()` and
 * `restore()` for files; the guest is the application's (its RAM, its vCPU threads behind
 * `vm.stop()`/`vm.resume()`, its devices). Worker threads import '@vmig/core/vcpu'-sized
 * pieces from 'vmig/vcpu'. See docs/library.md.
 */
export {
  GuestRam,
  RamBlock,
  TARGET_PAGE_SIZE,
  type RamBlockShared,
  VmigError,
  StreamError,
  InvalidArgumentError,
  type VmigErrorCode,
  type VmigErrorJSON,
  MigrationNotifiers,
  type PrecopyNotifyReason,
  type PostcopyNotifyReason,
  MsgpackDevice,
  type VmStateDevice,
  type ByteWriter,
  type StreamSource,
  type VmRunControl,
  type MigrationInfo,
  type MigrationStatus,
  type MigrationParams,
  type RuntimeParams,
  type ZeroPageDetection,
  type SnapshotInfo,
  createWriteProtect,
  type WriteProtectShared,
  type MissingPagesShared,
  type PreemptReaderShared,
  type Logger,
} from '@vmig/core';
export { loadTlsCreds, type TlsCreds, type TlsOptions } from '@vmig/channel';
export { type CompressionName } from '@vmig/multifd';
export {
  migrate,
  OutgoingMigration,
  type MigrateOptions,
  type OutgoingMigrationEvents,
  type PostcopyScheduling,
  incoming,
  IncomingMigration,
  type IncomingOptions,
  type IncomingResult,
  type IncomingMigrationEvents,
  type IncomingGuest,
  type IncomingGuestContext,
  type IncomingGuestRun,
  snapshot,
  SnapshotJob,
  type SnapshotOptions,
  type SnapshotEvents,
  restore,
  type RestoreOptions,
  type RestoreResult,
  DEFAULT_MAX_RAM,
  MAX_MULTIFD_CHANNELS,
} from '@vmig/migration';
