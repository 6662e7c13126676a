/** vm_stop / vm_start as the migration thread sees them. */
export interface VmRunControl {
  /** Stops every vCPU; resolves only once each has acknowledged it is parked. */
  stop(): Promise<void>;
  /** Lets the vCPUs run again (after a failed or cancelled migration). */
  resume(): void;
  /** Auto-converge: the share of time (0..99 %) the vCPUs must sleep. */
  setThrottle?(pct: number): void;
}
