/** Messages between the migration thread and a multifd send channel worker. */
import type { RamBlockShared } from '@vmig/core';
import type { MigrationUri } from '@vmig/channel';

export interface SendChannelConfig {
  ram: RamBlockShared[];
  uri: MigrationUri;
  id: number;
  uuid: Uint8Array;
  compression: string;
  zeroPageDetection: 'none' | 'legacy' | 'multifd';
}

/** To the channel: send these pages of a block as one packet; write a SYNC packet; close. */
export type SendToChannel =
  | { t: 'job'; block: number; pages: Uint32Array; packetNum: number }
  | { t: 'sync'; packetNum: number }
  | { t: 'close' };

/** From the channel. `done`: a job's packet was handed to the kernel. */
export type SendFromChannel =
  | { t: 'ready' }
  | { t: 'done'; bytes: number; normal: number; zero: number }
  | { t: 'synced'; bytes: number }
  | { t: 'error'; error: { code: string; message: string } };
