/**
 * The source's return-path thread against a hostile destination: a real `vmig migrate`
 * process and a fake destination on loopback that reads the stream and answers with bad
 * return-path messages. Each is a clear error with a stable code, exit 1, and the source's
 * guest running again.
 */
import net from 'node:net';
import { describe, expect, it } from 'vitest';
import { encodeRpMessage, encodeRpPong, encodeRpReqPages, encodeRpShut, MIG_RP_MSG_PONG } from '@vmig/core';
import { spawnCli } from '@vmig/test-harness';
import { CLI_MAIN } from './cli.js';

type Report = Record<string, any>;

/** A destination that swallows the stream and, once the source has started, answers `reply` (or hangs up). */
async function hostileDestination(reply: Uint8Array[] | 'close', extraArgs: string[] = []): Promise<Report> {
  const srv = net.createServer((sock) => {
    sock.on('error', () => {});
    let answered = false;
    sock.on('data', () => {
      if (answered) return;
      answered = true;
      // Let the migration get going first: the guest is running and pages flow.
      setTimeout(() => {
        if (reply === 'close') sock.destroy();
        else for (const m of reply) sock.write(m);
      }, 300);
    });
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as net.AddressInfo).port;
  const run = await spawnCli(CLI_MAIN, ['migrate', `tcp:127.0.0.1:${port}`, '--ram', '64M', '--writers', '1', '--max-bandwidth', '16M', '--json', ...extraArgs]).done;
  srv.close();
  expect(run.code).toBe(1);
  expect(run.report?.status).toBe('failed');
  // Before the postcopy switch a failure gives the guest back to the source.
  expect(run.report?.writersResumed).toBe(true);
  return run.report!;
}

describe('a hostile destination on the return path', () => {
  it('a message longer than any the protocol has: VMIG_ERR_STREAM_FORMAT', async () => {
    const r = await hostileDestination([encodeRpPong(1), new Uint8Array([0x00, 0x07, 0xff, 0xff])]);
    expect((r.error as Report).code).toBe('VMIG_ERR_STREAM_FORMAT');
  });

  it('an unknown message type, sent a byte at a time: VMIG_ERR_STREAM_FORMAT', async () => {
    const m = encodeRpMessage(0x77, new Uint8Array([1, 2, 3]));
    const r = await hostileDestination([encodeRpMessage(MIG_RP_MSG_PONG, new Uint8Array(4)), ...Array.from(m, (b) => new Uint8Array([b]))]);
    expect((r.error as Report).code).toBe('VMIG_ERR_STREAM_FORMAT');
    expect((r.error as Report).message).toContain('unexpected return-path message 119');
  });

  it('a page request before the postcopy switch: VMIG_ERR_STREAM_FORMAT', async () => {
    const r = await hostileDestination([encodeRpReqPages('pc.ram', 0, 4096)], ['--postcopy']);
    expect((r.error as Report).code).toBe('VMIG_ERR_STREAM_FORMAT');
    expect((r.error as Report).message).toContain('before the postcopy switch');
  });

  it('SHUT with a failure status: VMIG_ERR_REMOTE', async () => {
    const r = await hostileDestination([encodeRpShut(1)]);
    expect((r.error as Report).code).toBe('VMIG_ERR_REMOTE');
  });

  it('the destination hangs up: VMIG_ERR_PEER_CLOSED', async () => {
    const r = await hostileDestination('close');
    expect(['VMIG_ERR_PEER_CLOSED', 'VMIG_ERR_CHANNEL']).toContain((r.error as Report).code);
  });
});
