import { Worker } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import { AtomicBitmap } from '../src/index.js';

// Several threads set bits (as vCPUs set dirty bits) while this thread harvests words with
// fetch-and-clear (as the dirty sync does). Every bit set must be harvested exactly once.
describe('AtomicBitmap under concurrent writer threads', () => {
  it('loses no bit while being harvested', async () => {
    const nbits = 1 << 20;
    const writers = 3;
    const log = AtomicBitmap.create(nbits);
    const harvested = new Uint32Array(Math.ceil(nbits / 32));
    let duplicates = 0;
    const harvest = (): void => {
      for (let w = 0; w < log.words.length; w++) {
        const bits = log.fetchAndClearWord(w) >>> 0;
        if ((harvested[w]! & bits) !== 0) duplicates++;
        harvested[w] = harvested[w]! | bits;
      }
    };
    const workers = Array.from(
      { length: writers },
      (_, index) => new Worker(new URL('./fixtures/bit-setter.mjs', import.meta.url), { workerData: { sab: log.sab, nbits, index, writers } }),
    );
    const exited = workers.map((w) => new Promise<void>((resolve, reject) => w.once('exit', () => resolve()).once('error', reject)));
    let running = true;
    void Promise.all(exited).then(() => (running = false));
    let rounds = 0;
    while (running) {
      harvest();
      rounds++;
      await new Promise((r) => setImmediate(r));
    }
    await Promise.all(exited);
    harvest();
    expect(duplicates).toBe(0);
    let total = 0;
    for (const w of harvested) total += (w >>> 0).toString(2).replace(/0/g, '').length;
    expect(total).toBe(nbits);
    expect(rounds).toBeGreaterThan(1);
  });
});
