/**
 * A DelayProxy as a process of its own (it must run inside a network namespace, netns-link.ts):
 * `node delay-proxy-main.js LISTEN_HOST TARGET_HOST TARGET_PORT DELAY_MS LOSS MAX_HELD`. Prints
 * `{"port":N}` once listening; ends on SIGTERM or when its stdin closes.
 */
import { DelayProxy } from './delay-proxy.js';

const [listenHost, targetHost, targetPort, delayMs, loss, maxHeld] = process.argv.slice(2);
const proxy = await DelayProxy.start({
  listen: { host: listenHost!, port: 0 },
  target: { host: targetHost!, port: Number(targetPort) },
  delayMs: Number(delayMs),
  loss: Number(loss),
  maxHeldBytes: Number(maxHeld),
});
process.stdout.write(JSON.stringify({ port: proxy.port }) + '\n');
const stop = (): void => void proxy.close().then(() => process.exit(0));
process.once('SIGTERM', stop);
process.stdin.on('end', stop);
process.stdin.resume();
