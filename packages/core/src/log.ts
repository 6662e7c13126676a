/**
 * The logger core writes through: structured (an object, then a message), the subset of
 * pino's API that core needs, so the CLI can pass a pino logger and tests nothing at all.
 */
export interface Logger {
  debug(obj: object, msg?: string): void;
  info(obj: object, msg?: string): void;
  warn(obj: object, msg?: string): void;
  error(obj: object, msg?: string): void;
}

const nop = (): void => {};
export const silentLogger: Logger = { debug: nop, info: nop, warn: nop, error: nop };
