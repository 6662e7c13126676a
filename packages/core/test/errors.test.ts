import { describe, expect, it } from 'vitest';
import { FirstError, toVmigError, VmigError } from '../src/index.js';

describe('FirstError', () => {
  it('keeps the first error and tells every listener once, late ones too', () => {
    const f = new FirstError();
    const seen: string[] = [];
    f.onError((e) => seen.push(`a:${e.message}`));
    expect(f.set(new VmigError('VMIG_ERR_CHANNEL', 'first'))).toBe(true);
    expect(f.set(new VmigError('VMIG_ERR_CHANNEL', 'second'))).toBe(false);
    f.onError((e) => seen.push(`b:${e.message}`));
    expect(seen).toEqual(['a:first', 'b:first']);
    expect(f.error?.message).toBe('first');
  });

  it('toVmigError keeps a VmigError and wraps anything else with the fallback code', () => {
    const e = new VmigError('VMIG_ERR_CONNECT', 'x', { channel: 'main' });
    expect(toVmigError(e, 'VMIG_ERR_CHANNEL')).toBe(e);
    expect(toVmigError(new Error('boom'), 'VMIG_ERR_CHANNEL', { phase: 'load' }).message).toBe('boom (phase load)');
    expect(e.message).toBe('x (channel main)');
  });
});
