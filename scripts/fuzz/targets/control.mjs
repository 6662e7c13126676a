/**
 * The control socket (packages/cli/src/control.ts): a real ControlServer on a unix socket,
 * with the commands `vmig migrate` registers (migrate.ts, over a MigrationThread that is
 * not running), each input sent by a fresh client as request line(s), then a half-close.
 *
 * Invariants: the server stays up (an exception in its handlers would reach the worker's
 * uncaughtException hook: a crash); every non-blank request line gets exactly one reply, in
 * order, that is one JSON object with `return` or `error` {class, desc}, carrying the
 * request's `id` when it had one; a handler throws only VmigErrors; the server closes the
 * connection after the client's half-close, within the time bound.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { control, core } from '../pkgs.mjs';
import { FuzzTimeout, InvariantError, describeError } from '../common.mjs';
import { mutate } from '../mutate.mjs';
import * as S from '../seeds.mjs';

const { ControlServer, MAX_LINE, runtimeParams } = control;
const { DEFAULT_PARAMS, GuestRam, InvalidArgumentError, MemorySink, MigrationThread, VmigError, TARGET_PAGE_SIZE: P, DeviceRegistry } = core;

/** JSON texts a request's values may be: deep nesting, edge numbers, odd strings and keys. */
function weirdValue(rng) {
  const depth = rng.pick([3, 100, 1000, 3000, 6000, 20000]);
  return rng.weighted([
    [3, () => '['.repeat(depth) + ']'.repeat(depth)],
    [3, () => '{"a":'.repeat(depth) + '1' + '}'.repeat(depth)],
    [1, () => '[' + '{},'.repeat(depth) + '0]'],
    [2, () => rng.pick(['1e308', '-1e308', '1e-324', '-0', '0.5', '9007199254740993', '-1', '4294967296', '18446744073709551616', '123456789012345678901234567890'])],
    [2, () => rng.pick(['null', 'true', 'false', '[]', '{}', '""', '"\\u0000"', '"\\ud800"', '"__proto__"', `"${'x'.repeat(rng.pick([255, 4096, 60000]))}"`])],
    [2, () => rng.pick(['{"__proto__":{"max-bandwidth":1}}', '{"constructor":{"prototype":{}}}', '{"max-bandwidth":1,"max-bandwidth":-1}', '{"toString":1}', '{"downtime-limit":2000000,"max-bandwidth":9007199254740991}'])],
  ])();
}

const COMMANDS = ['qmp_capabilities', 'query-migrate', 'query-migrate-parameters', 'migrate-set-parameters', 'migrate-start-postcopy', 'migrate-cancel', '__proto__', 'constructor', 'hasOwnProperty', 'toString', ''];

/** A request built as text from parts, some of them odd (what byte mutations rarely reach: a deep but valid value). */
function structuredLine(rng) {
  const parts = [];
  parts.push(`"execute":${rng.chance(0.8) ? JSON.stringify(rng.pick(COMMANDS)) : weirdValue(rng)}`);
  if (rng.chance(0.6)) {
    const args = rng.chance(0.5) ? `{"${rng.pick(['max-bandwidth', 'downtime-limit', 'multifd-channels', '__proto__'])}":${weirdValue(rng)}}` : weirdValue(rng);
    parts.push(`"arguments":${args}`);
  }
  if (rng.chance(0.7)) parts.push(`"id":${weirdValue(rng)}`);
  if (rng.chance(0.2)) parts.push(`"__proto__":${weirdValue(rng)}`);
  for (let i = parts.length - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [parts[i], parts[j]] = [parts[j], parts[i]];
  }
  return new Uint8Array(Buffer.from(`{${parts.join(',')}}`));
}

/** Whether two JSON values print the same (so -0 and 0 agree); too deep to print here: assumed equal. */
function sameJson(a, b) {
  try {
    return JSON.stringify(a) === JSON.stringify(b);
  } catch {
    return true;
  }
}

/** What the server does with a line: one reply per non-blank line (after the same decoding). */
function expectedLines(bytes) {
  const text = Buffer.from(bytes).toString('utf8') + '\n';
  const pieces = text.split('\n');
  pieces.pop();
  return { lines: pieces.map((l) => l.trim()).filter((l) => l.length > 0), long: pieces.some((l) => l.length > MAX_LINE - 1024) };
}

export const controlTarget = {
  name: 'control',
  async prepare() {
    const dir = mkdtempSync(join(tmpdir(), 'vmig-fuzz-ctl-'));
    const path = join(dir, 'ctl.sock');
    const ram = GuestRam.create([{ idstr: 'pc.ram', size: 16 * P }], { prefault: false });
    const mig = new MigrationThread({ ram, sink: new MemorySink(), vm: { stop: async () => {}, resume() {} }, devices: new DeviceRegistry(), params: { ...DEFAULT_PARAMS } });
    const state = { dir, path, handlerCrashes: [], warns: 0, cancels: 0 };
    // A handler may refuse (InvalidArgumentError, VmigError); anything else is recorded.
    const guard = (fn) => (args) => {
      try {
        return fn(args);
      } catch (e) {
        if (!(e instanceof VmigError)) state.handlerCrashes.push(describeError(e));
        throw e;
      }
    };
    const commands = {
      'query-migrate': guard(() => mig.stats.info()),
      'migrate-start-postcopy': guard(() => {
        mig.startPostcopy();
        return {};
      }),
      'migrate-cancel': guard(() => {
        state.cancels++;
        return {};
      }),
      'migrate-set-parameters': guard((args) => {
        mig.setParameters(runtimeParams(args));
        return {};
      }),
      'query-migrate-parameters': guard(() => {
        const p = mig.parameters;
        return { 'max-bandwidth': p.maxBandwidth, 'downtime-limit': p.downtimeLimitMs, 'auto-converge': p.autoConverge, 'postcopy-ram': p.postcopy };
      }),
    };
    const log = { warn: () => void state.warns++, info() {}, error() {}, debug() {}, trace() {}, fatal() {} };
    state.server = await ControlServer.listen(`unix:${path}`, commands, log);
    state.seeds = S.CONTROL_LINES.map((l, i) => {
      const bytes = new Uint8Array(Buffer.from(l));
      const hot = [];
      for (let k = 0; k < bytes.length; k++) if ('{}[]:,"'.includes(String.fromCharCode(bytes[k]))) hot.push(k, k + 1);
      return { name: `line-${i}`, bytes, hot, tokens: S.CONTROL_TOKENS };
    });
    return state;
  },
  async close(state) {
    await state.server.close();
    rmSync(state.dir, { recursive: true, force: true });
  },
  async run(state, rng, opts) {
    let seed = rng.pick(state.seeds);
    let { bytes, ops } = { bytes: seed.bytes, ops: [] };
    // Half the inputs are requests built from odd parts, some of those then byte-mutated too.
    if (rng.chance(0.5)) {
      seed = { name: 'structured', bytes: structuredLine(rng), hot: [], tokens: S.CONTROL_TOKENS };
      ops = ['structured'];
      if (rng.chance(0.3)) ({ bytes, ops } = mutate(rng, seed, state.seeds));
      else bytes = seed.bytes;
    } else {
      ({ bytes, ops } = mutate(rng, seed, state.seeds));
    }
    const crashesBefore = state.handlerCrashes.length;
    let outcome;
    try {
      const replies = await exchange(state.path, bytes, opts.hangMs, rng);
      const { lines, long } = expectedLines(bytes);
      if (state.handlerCrashes.length > crashesBefore) throw new InvariantError(`a command handler threw a non-VmigError: ${state.handlerCrashes.at(-1)}`);
      if (long) {
        if (replies.length < 1) throw new InvariantError('a line over the limit got no reply');
      } else if (replies.length !== lines.length) {
        throw new InvariantError(`${lines.length} request line(s), ${replies.length} repl(ies)`);
      }
      let errors = 0;
      replies.forEach((r, i) => {
        let obj;
        try {
          obj = JSON.parse(r);
        } catch {
          throw new InvariantError(`reply ${i} is not JSON: ${r.slice(0, 100)}`);
        }
        if (!obj || typeof obj !== 'object' || Array.isArray(obj)) throw new InvariantError(`reply ${i} is not an object`);
        const hasReturn = Object.hasOwn(obj, 'return');
        const hasError = Object.hasOwn(obj, 'error');
        if (hasReturn === hasError) throw new InvariantError(`reply ${i} has ${hasReturn ? 'both' : 'neither'} return and error`);
        if (hasError) {
          errors++;
          if (typeof obj.error?.class !== 'string' || typeof obj.error?.desc !== 'string') throw new InvariantError(`reply ${i}: error without class/desc`);
        }
        if (!long) {
          let req;
          try {
            req = JSON.parse(lines[i]);
          } catch {
            req = undefined;
          }
          if (req && typeof req === 'object' && 'id' in req && !sameJson(obj.id, req.id)) throw new InvariantError(`reply ${i} carries id ${JSON.stringify(obj.id)?.slice(0, 80)}, request ${JSON.stringify(req.id)?.slice(0, 80)}`);
        }
      });
      outcome = errors === replies.length && replies.length > 0 ? { kind: 'rejected', code: 'GenericError' } : { kind: 'ok' };
    } catch (e) {
      if (e instanceof FuzzTimeout) outcome = { kind: 'hang', error: e.message };
      else if (e instanceof InvariantError) outcome = { kind: 'crash', code: 'invariant', error: e.message };
      else outcome = { kind: 'crash', code: e?.code ?? e?.name, error: `client: ${describeError(e)}` };
    }
    return { ...outcome, seed: seed.name, ops, input: bytes };
  },
};

/** Connects, waits for the greeting, sends `bytes` + '\n' (in random pieces), half-closes, collects reply lines until the server closes. */
function exchange(path, bytes, hangMs, rng) {
  return new Promise((resolve, reject) => {
    const sock = net.connect(path);
    let data = '';
    let greeted = false;
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new FuzzTimeout(hangMs));
    }, hangMs);
    sock.setEncoding('utf8');
    // The server may close first (a line over its limit, or after a failure): a write of the
    // client's then fails. That is the client's problem; 'close' follows and ends the exchange.
    sock.on('error', (e) => {
      if (e.code === 'EPIPE' || e.code === 'ECONNRESET') return;
      clearTimeout(timer);
      reject(e);
    });
    sock.on('data', (d) => {
      data += d;
      if (!greeted && data.includes('\n')) {
        greeted = true;
        const all = Buffer.concat([Buffer.from(bytes), Buffer.from('\n')]);
        // In one write or a few, so that lines cross the server's reads.
        let pos = 0;
        while (pos < all.length) {
          const n = rng.chance(0.5) ? all.length - pos : rng.range(1, Math.max(1, all.length - pos));
          sock.write(all.subarray(pos, pos + n));
          pos += n;
        }
        sock.end();
      }
    });
    sock.on('close', () => {
      clearTimeout(timer);
      const lines = data.split('\n').filter((l) => l.length > 0);
      if (!lines[0]?.includes('"QMP"')) return reject(new InvariantError(`no greeting: ${data.slice(0, 80)}`));
      resolve(lines.slice(1));
    });
  });
}
