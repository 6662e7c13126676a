#!/usr/bin/env node
/**
 * Minimal reproducers of what the fuzzer found, each against the built CLI (a real process,
 * real sockets), reduced by hand from the fuzzer's inputs:
 *
 *   node scripts/fuzz/repro.mjs control-deep-id         `vmig migrate --control`: a request whose
 *                                                       "id" is nested 5,000 deep kills the source
 *   node scripts/fuzz/repro.mjs postcopy-missing-page   `vmig incoming --postcopy`: a page discarded
 *                                                       and never sent; the destination waits forever
 *   node scripts/fuzz/repro.mjs integrity-after-check   `vmig incoming --integrity`: a RAM section
 *                                                       after the vmig-integrity section changes RAM
 *                                                       after the check; exit 0, verified, wrong RAM
 *
 * Each prints what happened and exits 1 while the problem is there, 0 once it is fixed.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CLI_MAIN, core } from './pkgs.mjs';
import * as S from './seeds.mjs';

const {
  MemorySink,
  putFileHeader,
  putCommand,
  putSectionFull,
  putSectionPart,
  putSectionFooter,
  putRamMemSize,
  putRamPage,
  putRamEos,
  putEof,
  encodePostcopyAdvise,
  encodePostcopyRamDiscard,
  encodePackagedLength,
  MIG_CMD_OPEN_RETURN_PATH,
  MIG_CMD_POSTCOPY_ADVISE,
  MIG_CMD_POSTCOPY_RAM_DISCARD,
  MIG_CMD_PACKAGED,
  MIG_CMD_POSTCOPY_LISTEN,
  MIG_CMD_POSTCOPY_RUN,
  QEMU_VM_SECTION_START,
  QEMU_VM_SECTION_PART,
  TARGET_PAGE_SIZE: P,
} = core;

function cli(args) {
  const c = spawn(process.execPath, [CLI_MAIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  c.out = '';
  c.err = '';
  c.stdout.on('data', (d) => (c.out += d));
  c.stderr.on('data', (d) => (c.err += d));
  c.done = new Promise((r) => c.on('exit', (code, signal) => r({ code, signal })));
  return c;
}

async function waitFor(c, re, ms = 30_000) {
  const t0 = Date.now();
  while (!re.test(c.out)) {
    if (Date.now() - t0 > ms || c.exitCode !== null) throw new Error(`no ${re} from the CLI: ${c.out} ${c.err}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** `vmig incoming ARGS`, fed `stream` on one connection; resolves with how it ended (or 'hang'). */
async function incoming(stream, args, limitMs = 30_000) {
  const c = cli(['incoming', 'tcp:127.0.0.1:0', '--json', '--channel-timeout', '2000', ...args]);
  await waitFor(c, /"uri"/);
  const port = Number(/"uri":"tcp:127\.0\.0\.1:(\d+)"/.exec(c.out)[1]);
  const s = net.connect(port, '127.0.0.1', () => s.end(Buffer.from(stream)));
  s.on('data', () => {});
  s.on('error', () => {});
  let timer;
  const r = await Promise.race([c.done, new Promise((res) => (timer = setTimeout(() => res('hang'), limitMs)))]);
  clearTimeout(timer);
  if (r === 'hang') c.kill('SIGKILL');
  s.destroy();
  return { r, last: c.out.trim().split('\n').at(-1), out: c.out };
}

const CASES = {
  /** control.ts: the reply echoes `id`; JSON.stringify of a 5,000-deep id overflows the stack, outside any try. */
  async 'control-deep-id'() {
    const dir = mkdtempSync(join(tmpdir(), 'vmig-repro-'));
    const sockPath = join(dir, 'ctl.sock');
    try {
      const dst = cli(['incoming', 'tcp:127.0.0.1:0', '--json', '--ram', '64M']);
      await waitFor(dst, /"uri"/);
      const uri = JSON.parse(dst.out.split('\n')[0]).uri;
      const src = cli(['migrate', uri, '--json', '--ram', '64M', '--max-bandwidth', '8M', '--control', `unix:${sockPath}`]);
      await waitFor(src, /"control"/);
      const s = net.connect(sockPath);
      s.on('error', () => {});
      s.write(`{"execute":"query-migrate","id":${'['.repeat(5000)}${']'.repeat(5000)}}\n`);
      let timer;
      const r = await Promise.race([src.done, new Promise((res) => (timer = setTimeout(() => res('alive'), 5000)))]);
      clearTimeout(timer);
      s.destroy();
      src.kill('SIGKILL');
      dst.kill('SIGKILL');
      if (r === 'alive') return { fixed: true, what: 'the source survived the request' };
      return { fixed: false, what: `the source died (exit ${r.code}/${r.signal}) mid-migration, no final report; stderr: ${src.err.split('\n').filter((l) => /RangeError|at /.test(l)).slice(0, 4).join(' | ')}` };
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  },

  /** postcopy-incoming.ts finish(): waits for missing pages with no bound once the main stream has ended. */
  async 'postcopy-missing-page'() {
    const w = new MemorySink();
    putFileHeader(w, 'none');
    putCommand(w, MIG_CMD_OPEN_RETURN_PATH);
    putCommand(w, MIG_CMD_POSTCOPY_ADVISE, encodePostcopyAdvise());
    putSectionFull(w, QEMU_VM_SECTION_START, { sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 });
    putRamMemSize(w, [{ idstr: 'pc.ram', usedLength: 2 * P }]);
    putRamPage(w, 0, 'pc.ram', false, new Uint8Array(P).fill(1));
    putRamPage(w, P, 'pc.ram', true, new Uint8Array(P).fill(2));
    putRamEos(w);
    putSectionFooter(w, 2);
    // Page 1 changed since: discarded; then the switch; then EOF without page 1.
    putCommand(w, MIG_CMD_POSTCOPY_RAM_DISCARD, encodePostcopyRamDiscard('pc.ram', [{ start: P, length: P }]));
    const pkg = new MemorySink();
    putCommand(pkg, MIG_CMD_POSTCOPY_LISTEN);
    putCommand(pkg, MIG_CMD_POSTCOPY_RUN);
    putCommand(w, MIG_CMD_PACKAGED, encodePackagedLength(pkg.bytes().length));
    w.putBytes(pkg.bytes());
    putEof(w);
    const { r, last } = await incoming(w.bytes(), ['--postcopy'], 20_000);
    if (r === 'hang') return { fixed: false, what: `still running 20 s after the source closed (--channel-timeout 2000); last line: ${last}` };
    return { fixed: true, what: `exit ${r.code}: ${last}` };
  },

  /** loadvm.ts accepts RAM sections after device sections; ram-integrity.ts checks when its section is loaded. */
  async 'integrity-after-check'() {
    const ram = S.makeRam([['pc.ram', 64], ['vga.vram', 8]], 3);
    const stream = Buffer.from(await S.precopyStream(ram, { integrity: true }));
    // The EOF byte before the vmdesc (0x06): insert a RAM PART section with one page there.
    const eof = stream.lastIndexOf(Buffer.from([0x00, 0x06]));
    const part = new MemorySink();
    putSectionPart(part, QEMU_VM_SECTION_PART, 2);
    putRamPage(part, 0, 'pc.ram', false, new Uint8Array(P).fill(0xaa));
    putRamEos(part);
    putSectionFooter(part, 2);
    const evil = Buffer.concat([stream.subarray(0, eof), part.bytes(), stream.subarray(eof)]);
    const dir = mkdtempSync(join(tmpdir(), 'vmig-repro-'));
    try {
      const dump = join(dir, 'ram.bin');
      const { r, last } = await incoming(evil, ['--integrity', '--dump-ram', dump]);
      if (r === 'hang' || r.code !== 0) return { fixed: true, what: `refused: ${last}` };
      const same = readFileSync(dump).equals(S.ramBytes(ram));
      return { fixed: same, what: `exit 0, report integrity ${JSON.stringify(JSON.parse(last).integrity)}, dumped RAM ${same ? 'equals' : 'differs from'} the source's` };
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  },
};

const name = process.argv[2];
if (!CASES[name]) {
  process.stderr.write(`usage: node scripts/fuzz/repro.mjs ${Object.keys(CASES).join('|')}\n`);
  process.exit(2);
}
const res = await CASES[name]();
process.stdout.write(`${name}: ${res.fixed ? 'FIXED' : 'PRESENT'}: ${res.what}\n`, () => process.exit(res.fixed ? 0 : 1));
