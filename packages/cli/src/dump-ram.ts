import { open } from 'node:fs/promises';
import type { GuestRam } from '@vmig/core';

/** --dump-ram FILE: the RAM, blocks in stream order. */
export async function dumpRam(ram: GuestRam, file: string): Promise<void> {
  const fh = await open(file, 'w');
  try {
    for (const b of ram.blocks) for (const seg of b.segments) await fh.write(seg);
  } finally {
    await fh.close();
  }
}
