/** A loopback TCP connection for tests that play the source against a destination's fd. */
import net from 'node:net';

export interface Loopback {
  /** The destination's end, which the code under test reads or writes through `fd`. */
  dst: net.Socket;
  fd: number;
  /** The source's end, the test's. */
  src: net.Socket;
  server: net.Server;
}

export async function loopback(): Promise<Loopback> {
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
  const dst = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
  await new Promise<void>((r) => dst.once('connect', r));
  const src = await accepted;
  return { dst, fd: (dst as unknown as { _handle: { fd: number } })._handle.fd, src, server };
}
