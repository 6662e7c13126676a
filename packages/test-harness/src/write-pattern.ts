/**
 * Which pages a vCPU writer writes (vcpu-writer.worker.ts), in one place, so that whoever
 * prepares for the writers (write-rate.ts touches their pages first) picks the same ones.
 * The last page of guest RAM belongs to a device (the test guest's ITS table): writers leave it alone.
 */
export interface HotSet {
  /** Pages the writers may write. */
  writable: number;
  /** With the 'hot' pattern: how many pages, `stride` apart from page 0. */
  pages: number;
  stride: number;
}

export function hotSet(totalPages: number, hotPages: number): HotSet {
  const writable = Math.max(1, totalPages - 1);
  const pages = Math.max(1, Math.min(hotPages, writable));
  return { writable, pages, stride: Math.max(1, Math.floor(writable / pages)) };
}
