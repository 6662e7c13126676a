/** The scheduler slice of the page-fault path's threads: core's thread-slice.ts (vCPU threads load only core). */
export { canSetThreadSlice, MAX_SLICE_US, MIN_SLICE_US, setThreadSliceUs, threadSliceUs } from '@vmig/core';
