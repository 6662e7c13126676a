/**
 * What a guest's own worker threads need, and nothing else (a small import for a thread):
 * the RAM from `ram.share()`, the received map of a postcopy destination, the write
 * protection of a background snapshot.
 */
export { GuestRam, TARGET_PAGE_SIZE, type RamBlockShared, MissingPagesVcpu, type MissingPagesShared, WriteProtectVcpu, type WriteProtectShared, PreemptReader, type PreemptReaderShared } from '@vmig/core/vcpu';
