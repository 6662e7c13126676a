/**
 * Return-path messages (destination -> source), as the source's return-path thread
 * (packages/cli/src/return-path.worker.ts) reads them: an RpMessageReader fed reads of random
 * sizes, each whole message dispatched the way the thread's handle() does: SHUT ends it,
 * PONG is dropped, a page request before the switch is refused, after it a request goes to
 * the UrgentPageSender (preempt: the thread writes the pages itself) or to the migration
 * thread's PageRequestQueue (which serves it on the main stream); anything else is refused.
 * A stream that ends before SHUT is the destination closing early (VMIG_ERR_PEER_CLOSED).
 *
 * Invariants: only documented refusals; space() never empty; every page record the sender or
 * the queue wrote names a known block and a page inside it, one record per page requested.
 */
import { core } from '../pkgs.mjs';
import { InvariantError, outcomeOfError } from '../common.mjs';
import { mutate } from '../mutate.mjs';
import * as S from '../seeds.mjs';

const {
  MemorySink,
  MigrationStats,
  PageRequestQueue,
  RamSaver,
  RpMessageReader,
  StreamError,
  UrgentPageSender,
  VmigError,
  createUrgentPages,
  decodeRamRecordHead,
  decodeRpShut,
  MIG_RP_MSG_PONG,
  MIG_RP_MSG_REQ_PAGES,
  MIG_RP_MSG_REQ_PAGES_ID,
  MIG_RP_MSG_SHUT,
  RAM_SAVE_FLAG_PAGE,
  RAM_SAVE_FLAG_ZERO,
  RAM_SAVE_FLAG_CONTINUE,
  TARGET_PAGE_SIZE: P,
} = core;

/** Walks the page records in `bytes`; returns how many; throws InvariantError on a bad one. */
function checkRecords(bytes, ram) {
  const h = { offset: 0, flags: 0, idstr: undefined, headBytes: 0, bodyBytes: 0 };
  let pos = 0;
  let n = 0;
  let last;
  while (pos < bytes.length) {
    if (!decodeRamRecordHead(bytes, pos, bytes.length, h, 'check')) throw new InvariantError(`a cut record at byte ${pos} of what was sent`);
    if (h.flags & (RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_ZERO)) {
      const name = h.flags & RAM_SAVE_FLAG_CONTINUE ? last : h.idstr;
      const b = name === undefined ? undefined : ram.find(name);
      if (!b) throw new InvariantError(`a record for unknown block '${name}'`);
      if (h.offset + P > b.usedLength) throw new InvariantError(`a record at 0x${h.offset.toString(16)} outside '${b.idstr}'`);
      last = name;
      n++;
    }
    pos += h.headBytes + h.bodyBytes;
  }
  return n;
}

export const returnPathTarget = {
  name: 'return-path',
  async prepare() {
    const seeds = S.returnPathStreams().map((bytes, i) => {
      const hot = [];
      for (let p = 0; p + 4 <= bytes.length; ) {
        hot.push(p, p + 2, p + 4, p + 12, p + 16);
        p += 4 + ((bytes[p + 2] << 8) | bytes[p + 3]);
      }
      return { name: `rp-${i}`, bytes, hot, tokens: S.RP_TOKENS };
    });
    return { seeds, ram: S.makeRam([['pc.ram', 64], ['vga.vram', 8]], 11) };
  },
  async run(state, rng) {
    const seed = rng.pick(state.seeds);
    const { bytes, ops } = mutate(rng, seed, state.seeds);
    const { ram } = state;
    const listening = rng.chance(0.7);
    const urgentMode = listening && rng.chance(0.5);
    const stats = new MigrationStats();
    const saver = new RamSaver(ram, stats, 'legacy');
    saver.setup();
    const queue = new PageRequestQueue(ram, saver, stats);
    const sender = urgentMode ? new UrgentPageSender(ram, createUrgentPages(saver.bitmaps, rng.chance(0.5))) : undefined;
    const batch = new MemorySink();
    let requestedPages = 0;
    let outcome;
    try {
      const initialLen = rng.chance(0.3) ? rng.int(Math.min(bytes.length, 200) + 1) : 0;
      const reader = new RpMessageReader(bytes.subarray(0, initialLen));
      let pos = initialLen;
      const sizes = rng.readSizes(9000);
      let shut;
      for (let k = 0; shut === undefined; k++) {
        for (let m = reader.next(); m && shut === undefined; m = shut === undefined ? reader.next() : undefined) {
          if (m.type === MIG_RP_MSG_SHUT) shut = decodeRpShut(m.data);
          else if (m.type === MIG_RP_MSG_PONG) continue;
          else if (m.type === MIG_RP_MSG_REQ_PAGES || m.type === MIG_RP_MSG_REQ_PAGES_ID) {
            if (!listening) throw new StreamError('VMIG_ERR_STREAM_FORMAT', 'page request before the postcopy switch', { channel: 'return-path' });
            const before = batch.bytesWritten;
            if (sender) sender.serve(batch, m.type, m.data);
            else {
              const pending = queue.pending;
              queue.add(m.type, m.data.slice());
              requestedPages += queue.pending - pending;
              // The migration thread serves what is queued on the main stream.
              if (rng.chance(0.5)) queue.serve(batch);
            }
            if (sender) requestedPages += checkRecords(batch.view().subarray(before), ram);
          } else throw new StreamError('VMIG_ERR_STREAM_FORMAT', `unexpected return-path message ${m.type}`, { channel: 'return-path' });
        }
        if (shut !== undefined) break;
        if (pos >= bytes.length) throw new VmigError('VMIG_ERR_PEER_CLOSED', 'destination closed the connection', { channel: 'return-path' });
        const space = reader.space();
        if (!(space.length > 0)) throw new InvariantError('space() gave no room');
        const n = Math.min(space.length, sizes[k % sizes.length], bytes.length - pos);
        space.set(bytes.subarray(pos, pos + n));
        reader.filled(n);
        pos += n;
      }
      queue.serve(batch);
      // One record per page the requests named (urgent: each request's pages; queue: each
      // page still dirty when served, so at most one per page requested).
      const records = checkRecords(batch.view(), ram);
      if (sender ? records !== requestedPages : records > requestedPages) throw new InvariantError(`${records} page records for ${requestedPages} pages requested`);
      outcome = { kind: 'ok' };
    } catch (e) {
      outcome = e instanceof InvariantError ? { kind: 'crash', code: 'invariant', error: e.message } : outcomeOfError(e);
    }
    return { ...outcome, seed: seed.name, ops, input: bytes };
  },
};
