/** What the edge tests use: the library's entry, and TLS credentials read as a user would. */
import { loadTlsCreds, type TlsCreds } from '@vmig/channel';

export { GuestRam } from '@vmig/core';
export { incoming, migrate, snapshot } from '../src/index.js';

export function loadTlsCredsForTest(dir: string): TlsCreds {
  return loadTlsCreds(dir, 'client');
}
