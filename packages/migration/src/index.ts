export { migrate, OutgoingMigration, type MigrateOptions, type OutgoingMigrationEvents, type PostcopyScheduling } from './migrate.js';
export { incoming, IncomingMigration, DEFAULT_MAX_RAM, type IncomingOptions, type IncomingResult, type IncomingMigrationEvents } from './incoming.js';
export type { IncomingGuest, IncomingGuestContext, IncomingGuestRun } from './incoming-guest.js';
export { PREEMPT_READERS, type PreemptReaderChoice } from './postcopy-destination.js';
export { DEFAULT_POSTCOPY_BACKGROUND_NICE, DEFAULT_POSTCOPY_FAULT_SLICE_US, MAX_MULTIFD_CHANNELS, type MultifdOptions } from './options.js';
export { ReturnPathThread } from './return-path-thread.js';
export { MAX_SLICE_US, MIN_SLICE_US } from './thread-slice.js';
export { restore, snapshot, SnapshotJob, type RestoreOptions, type RestoreResult, type SnapshotEvents, type SnapshotOptions } from './snapshot.js';
