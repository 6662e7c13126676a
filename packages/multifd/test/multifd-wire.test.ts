import { describe, expect, it } from 'vitest';
import { setBe32, TARGET_PAGE_SIZE } from '@vmig/core';
import {
  checkMultifdExpected,
  checkMultifdOffsets,
  compressionByFlags,
  compressionByName,
  decodeMultifdInit,
  decodeMultifdPacketHeader,
  encodeMultifdInit,
  encodeMultifdPacketHeader,
  MULTIFD_FLAG_SYNC,
  MULTIFD_FLAG_VMIG_LZ4,
  MULTIFD_FLAG_ZLIB,
  MULTIFD_PACKET_HEADER_SIZE,
  MULTIFD_PACKET_SIZE,
} from '../src/index.js';

const uuid = new Uint8Array(16).map((_, i) => i + 1);

function header(over: Partial<Parameters<typeof encodeMultifdPacketHeader>[2]> = {}): Uint8Array {
  const b = new Uint8Array(MULTIFD_PACKET_HEADER_SIZE);
  encodeMultifdPacketHeader(b, 0, {
    flags: 0,
    normalPages: 2,
    zeroPages: 1,
    nextPacketSize: 2 * TARGET_PAGE_SIZE,
    packetNum: 7,
    ramblock: 'pc.ram',
    offsets: Float64Array.from([0, 8192, 4096]),
    ...over,
  });
  return b;
}

describe('MultiFDInit_t', () => {
  it('round trips', () => {
    const b = encodeMultifdInit({ uuid, id: 3 });
    expect(b.length).toBe(64);
    const d = decodeMultifdInit(b, 4);
    expect(d.id).toBe(3);
    expect([...d.uuid]).toEqual([...uuid]);
  });

  it('rejects bad magic, version, an unexpected id, a short init', () => {
    const bad = (mut: (b: Uint8Array) => void, channels = 4): unknown => {
      const b = encodeMultifdInit({ uuid, id: 1 });
      mut(b);
      try {
        decodeMultifdInit(b, channels);
      } catch (e) {
        return (e as { code: string }).code;
      }
      return 'accepted';
    };
    expect(bad((b) => setBe32(b, 0, 0xdeadbeef))).toBe('VMIG_ERR_MULTIFD_HANDSHAKE');
    expect(bad((b) => setBe32(b, 4, 2))).toBe('VMIG_ERR_MULTIFD_HANDSHAKE');
    // An id past this side's channels: the two ends disagree on --multifd-channels.
    expect(bad(() => {}, 1)).toBe('VMIG_ERR_MULTIFD_CHANNELS');
    expect(() => decodeMultifdInit(new Uint8Array(10), 4)).toThrow(expect.objectContaining({ code: 'VMIG_ERR_MULTIFD_HANDSHAKE' }));
  });
});

describe('MultiFDPacket_t', () => {
  it('round trips at full length', () => {
    const h = decodeMultifdPacketHeader(header(), 0);
    expect(h).toMatchObject({ flags: 0, pagesAlloc: 128, normalPages: 2, zeroPages: 1, packetNum: 7, ramblock: 'pc.ram' });
    expect([...h.offsets]).toEqual([0, 8192, 4096]);
    expect(MULTIFD_PACKET_HEADER_SIZE).toBe(320 + 8 * 128);
  });

  const rejections: [string, (b: Uint8Array) => void, string][] = [
    ['bad magic', (b) => setBe32(b, 0, 1), 'VMIG_ERR_MULTIFD_PACKET'],
    ['bad version', (b) => setBe32(b, 4, 9), 'VMIG_ERR_MULTIFD_PACKET'],
    ['unknown flags', (b) => setBe32(b, 8, 1 << 20), 'VMIG_ERR_MULTIFD_PACKET'],
    ['pages_alloc above page_count', (b) => setBe32(b, 12, 129), 'VMIG_ERR_MULTIFD_PACKET'],
    ['normal above pages_alloc', (b) => setBe32(b, 16, 200), 'VMIG_ERR_MULTIFD_PACKET'],
    ['zero above what is left', (b) => setBe32(b, 32, 127), 'VMIG_ERR_MULTIFD_PACKET'],
    ['unterminated block name', (b) => b.fill(0x41, 64, 320), 'VMIG_ERR_MULTIFD_PACKET'],
    ['unaligned offset', (b) => setBe32(b, 320 + 4, 5), 'VMIG_ERR_MULTIFD_PACKET'],
    ['offset beyond 2^53', (b) => setBe32(b, 320, 0xffffffff), 'VMIG_ERR_MULTIFD_PACKET'],
  ];
  for (const [name, mut, code] of rejections) {
    it(`rejects ${name}`, () => {
      const b = header();
      mut(b);
      expect(() => decodeMultifdPacketHeader(b, 0, 'multifd/0')).toThrow(expect.objectContaining({ code }));
    });
  }

  it('rejects an offset outside the block, naming the channel', () => {
    const h = decodeMultifdPacketHeader(header({ offsets: Float64Array.from([0, 16 * 4096, 4096]) }), 0);
    expect(() => checkMultifdOffsets(h, 16 * 4096, 'multifd/1')).toThrow(/multifd\/1/);
    expect(() => checkMultifdOffsets(h, 17 * 4096)).not.toThrow();
  });
});

describe('compression methods', () => {
  const pages = Buffer.alloc(16 * TARGET_PAGE_SIZE);
  pages.write('the quick brown fox jumps over the lazy dog '.repeat(1000));

  for (const name of ['zlib', 'lz4']) {
    it(`${name}: round trips packet after packet on one channel`, async () => {
      const m = compressionByName(name)!;
      const tx = m.createSender();
      const rx = m.createReceiver();
      for (let k = 0; k < 5; k++) {
        pages[k] = k;
        const c = (await tx.compress(pages))!;
        expect(c.payload.length).toBeLessThan(pages.length);
        expect(compressionByFlags(c.flag, 'multifd/0')).toBe(m);
        const out = Buffer.alloc(pages.length);
        await rx.decompress(c.payload, out);
        expect(out.equals(pages)).toBe(true);
      }
    });

    it(`${name}: rejects garbage`, async () => {
      const rx = compressionByName(name)!.createReceiver();
      const out = Buffer.alloc(4 * TARGET_PAGE_SIZE);
      await expect(rx.decompress(Buffer.from('not compressed at all, not at all'), out)).rejects.toMatchObject({ code: 'VMIG_ERR_MULTIFD_PACKET' });
    });
  }

  it('lz4 sends incompressible pages raw', async () => {
    const random = Buffer.from(Array.from({ length: 8 * TARGET_PAGE_SIZE }, () => Math.floor(Math.random() * 256)));
    expect(await compressionByName('lz4')!.createSender().compress(random)).toBeUndefined();
  });

  it('lz4 refuses a payload declaring more than a packet before allocating it', async () => {
    const evil = Buffer.alloc(16);
    evil.writeUInt32LE(0xffffffff, 0);
    await expect(compressionByName('lz4')!.createReceiver().decompress(evil, Buffer.alloc(MULTIFD_PACKET_SIZE))).rejects.toMatchObject({ code: 'VMIG_ERR_MULTIFD_PACKET' });
  });

  it('zlib refuses a payload that inflates past one packet', async () => {
    const { deflateSync } = await import('node:zlib');
    const bomb = deflateSync(Buffer.alloc(MULTIFD_PACKET_SIZE * 4));
    await expect(compressionByName('zlib')!.createReceiver().decompress(bomb, Buffer.alloc(TARGET_PAGE_SIZE))).rejects.toMatchObject({ code: 'VMIG_ERR_MULTIFD_PACKET' });
  });

  it('flags name methods; unknown ones are refused', () => {
    expect(compressionByFlags(MULTIFD_FLAG_SYNC, 'x')).toBeUndefined();
    expect(compressionByFlags(MULTIFD_FLAG_ZLIB, 'x')?.name).toBe('zlib');
    expect(compressionByFlags(MULTIFD_FLAG_VMIG_LZ4, 'x')?.name).toBe('lz4');
    expect(() => compressionByFlags(0x04, 'x')).toThrow(expect.objectContaining({ code: 'VMIG_ERR_MULTIFD_PACKET' })); // zstd: not here
    expect(() => compressionByName('brotli')).toThrow(expect.objectContaining({ code: 'VMIG_ERR_INVALID_ARG' }));
  });
});

describe('a packet against what this side agreed on (checkMultifdExpected)', () => {
  const code = (f: () => void): string => {
    try {
      f();
    } catch (e) {
      return (e as { code: string }).code;
    }
    return 'accepted';
  };
  const pkt = (over: Partial<Parameters<typeof encodeMultifdPacketHeader>[2]>) => decodeMultifdPacketHeader(header(over), 0);

  it("QEMU 7.2's dialect: the word at offset 32 is unused, a non-zero value is refused, not read as zero pages", () => {
    const zeros = pkt({ normalPages: 1, zeroPages: 2, offsets: Float64Array.from([0, 4096, 8192]) });
    expect(code(() => checkMultifdExpected(zeros, 0, true))).toBe('VMIG_ERR_MULTIFD_PACKET');
    expect(code(() => checkMultifdExpected(zeros, 0, false))).toBe('accepted');
    expect(code(() => checkMultifdExpected(pkt({ normalPages: 2, zeroPages: 0, offsets: Float64Array.from([0, 4096]) }), 0, true))).toBe('accepted');
  });

  it('compression must be this side\'s method, or none (a packet sent raw); SYNC packets carry no pages and are not checked', () => {
    const zlib = pkt({ flags: MULTIFD_FLAG_ZLIB, normalPages: 1, offsets: Float64Array.from([0]), nextPacketSize: 100 });
    const raw = pkt({ normalPages: 1, offsets: Float64Array.from([0]) });
    expect(code(() => checkMultifdExpected(zlib, 0, false))).toBe('VMIG_ERR_MULTIFD_DIALECT');
    expect(code(() => checkMultifdExpected(zlib, MULTIFD_FLAG_VMIG_LZ4, false))).toBe('VMIG_ERR_MULTIFD_DIALECT');
    expect(code(() => checkMultifdExpected(zlib, MULTIFD_FLAG_ZLIB, false))).toBe('accepted');
    expect(code(() => checkMultifdExpected(raw, MULTIFD_FLAG_VMIG_LZ4, false))).toBe('accepted');
    expect(code(() => checkMultifdExpected(pkt({ flags: MULTIFD_FLAG_SYNC | MULTIFD_FLAG_ZLIB, normalPages: 0, zeroPages: 0, offsets: new Float64Array(0) }), 0, false))).toBe('accepted');
  });
});
