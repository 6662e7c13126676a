/**
 * The CLI's structured logger: pino, JSON lines on stderr (stdout is for reports), level
 * from --log-level (default warn). Core takes it through its Logger interface.
 */
import { destination, pino, type Logger } from 'pino';

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

export function createLogger(level: LogLevel, role: string): Logger {
  // Synchronous writes: a process that exits right after logging must not lose the line.
  return pino({ level, base: { role, pid: process.pid } }, destination({ dest: 2, sync: true }));
}
