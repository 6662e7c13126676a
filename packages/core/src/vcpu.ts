/**
 * What a vCPU thread needs from core, and nothing else: a writer worker loads this small
 * entry instead of the whole package, so that starting vCPUs (at a postcopy RUN, while
 * pages stream in) costs little.
 */
export { GuestRam, TARGET_PAGE_SIZE, type RamBlockShared } from './ram/ram-block.js';
export { WriteProtectVcpu, type WriteProtectShared } from './snapshot/write-protect.js';
export { MissingPagesPlacer, MissingPagesVcpu, type MissingPagesShared } from './postcopy/missing-pages.js';
export { PreemptReader, type PreemptReaderShared } from './postcopy/preempt-reader.js';
export { setThreadName } from './thread-name.js';
