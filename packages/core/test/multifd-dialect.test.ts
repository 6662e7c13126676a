import { describe, expect, it } from 'vitest';
import { MultifdDialect } from '../src/index.js';

/** A barrier that records what the load loop did. */
function barrier() {
  const log: string[] = [];
  return { log, b: { sync: async () => void log.push('sync'), setDialect: (legacy: boolean) => void log.push(legacy ? 'legacy' : 'modern') } };
}

const codeOf = async (p: Promise<unknown>): Promise<string> => p.then(() => 'ok', (e: { code: string }) => e.code);

describe('the multifd dialect read off the stream', () => {
  it('modern: a FLUSH before the first EOS; then only FLUSH is a barrier', async () => {
    const { log, b } = barrier();
    const d = new MultifdDialect(b, false, 'main');
    await d.onFlush();
    await d.onEos();
    await d.onEos();
    await d.onFlush();
    expect(log).toEqual(['modern', 'sync', 'sync']);
  });

  it("QEMU 7.2: the first EOS came without a FLUSH; every EOS is a barrier; a FLUSH later is refused", async () => {
    const { log, b } = barrier();
    const d = new MultifdDialect(b, false, 'main');
    await d.onEos();
    await d.onEos();
    expect(log).toEqual(['legacy', 'sync', 'sync']);
    expect(await codeOf(d.onFlush())).toBe('VMIG_ERR_MULTIFD_DIALECT');
  });

  it('--multifd-flush-after-each-section here and a modern stream: refused before any barrier', async () => {
    const { log, b } = barrier();
    expect(await codeOf(new MultifdDialect(b, true, 'main').onFlush())).toBe('VMIG_ERR_MULTIFD_DIALECT');
    expect(log).toEqual([]);
  });

  it('no multifd here: a FLUSH is refused, an EOS is only an EOS', async () => {
    const d = new MultifdDialect(undefined, false, 'main');
    expect(await codeOf(d.onEos())).toBe('ok');
    expect(await codeOf(d.onFlush())).toBe('VMIG_ERR_MULTIFD_CHANNELS');
  });
});
