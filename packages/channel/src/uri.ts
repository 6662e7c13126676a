import { InvalidArgumentError } from '@vmig/core';

/** A migration URI: `tcp:HOST:PORT`, `unix:PATH` (QEMU's forms). */
export type MigrationUri = { transport: 'tcp'; host: string; port: number } | { transport: 'unix'; path: string };

export function parseMigrationUri(uri: string): MigrationUri {
  if (uri.startsWith('tcp:')) {
    const rest = uri.slice(4);
    // tcp:[::1]:4444 or tcp:127.0.0.1:4444 or tcp:localhost:4444
    const m = /^(?:\[([^\]]+)\]|([^:[\]]*)):(\d{1,5})$/.exec(rest);
    if (!m) throw new InvalidArgumentError(`invalid tcp URI '${uri}': expected tcp:HOST:PORT`);
    const host = m[1] ?? m[2] ?? '';
    const port = Number(m[3]);
    if (!host) throw new InvalidArgumentError(`invalid tcp URI '${uri}': empty host`);
    if (port > 65535) throw new InvalidArgumentError(`invalid tcp URI '${uri}': port ${port} out of range`);
    return { transport: 'tcp', host, port };
  }
  if (uri.startsWith('unix:')) {
    const path = uri.slice(5);
    if (!path) throw new InvalidArgumentError(`invalid unix URI '${uri}': empty path`);
    return { transport: 'unix', path };
  }
  throw new InvalidArgumentError(`unsupported migration URI '${uri}': expected tcp:HOST:PORT or unix:PATH`);
}

export function formatMigrationUri(u: MigrationUri): string {
  return u.transport === 'tcp' ? `tcp:${u.host.includes(':') ? `[${u.host}]` : u.host}:${u.port}` : `unix:${u.path}`;
}
