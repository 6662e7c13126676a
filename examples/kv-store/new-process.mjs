/**
 * The new process of a handover: listens for the store (vmig's incoming()), checks that
 * every acknowledged write arrived, then serves on from where the old process stopped.
 * Prints JSON lines: {"listening": URI}, then the result.
 *
 *   node new-process.mjs KEYS CHANNELS [postcopy]
 */
import { incoming } from 'vmig';
import { KvStore } from './kv-store.mjs';

const keys = Number(process.argv[2] ?? 65536);
const channels = Number(process.argv[3] ?? 2);
const postcopy = process.argv[4] === 'postcopy';
const say = (o) => process.stdout.write(`${JSON.stringify(o)}\n`);

// RAM comes from the stream (its blocks and sizes); the acknowledged versions from the device.
const store = new KvStore(undefined, keys, new Float64Array(new SharedArrayBuffer(keys * 8)));
// With postcopy the store serves here from the switch on, before every page arrived.
const dst = await incoming({
  uri: 'tcp:127.0.0.1:0',
  multifdChannels: channels,
  devices: [store.device()],
  channelTimeoutMs: 10_000,
  ...(postcopy ? { postcopy: true, guest: store.postcopyGuest(2) } : {}),
});
say({ listening: dst.uri });
try {
  const r = await dst.done;
  store.ram = r.ram;
  await store.close();
  const received = store.verify();
  // Serve on: the writers continue from the acknowledged versions.
  await store.serve(2);
  await new Promise((res) => setTimeout(res, 300));
  await store.stop();
  const after = store.verify();
  await store.close();
  say({ status: 'completed', loadTimeMs: Math.round(r.loadTimeMs), postcopy: r.postcopy ?? null, received, servedOn: after });
  process.exitCode = received.lost === 0 && after.lost === 0 ? 0 : 1;
} catch (e) {
  say({ status: 'failed', error: e.toJSON?.() ?? String(e) });
  process.exitCode = 1;
}
