/** MigrationStatus, as QEMU's qapi/migration.json names them. */
export type MigrationStatus =
  | 'none'
  | 'setup'
  | 'cancelling'
  | 'cancelled'
  | 'active'
  | 'postcopy-active'
  | 'postcopy-paused'
  | 'postcopy-recover'
  | 'completed'
  | 'failed'
  | 'pre-switchover'
  | 'device';

export function isTerminal(s: MigrationStatus): boolean {
  return s === 'completed' || s === 'failed' || s === 'cancelled';
}
