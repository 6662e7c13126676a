/**
 * comlink over worker_threads for the recv threads' control plane (recv-protocol.ts). The
 * package ships CommonJS builds only; its Node adapter turns a Worker or MessagePort into
 * the endpoint comlink expects.
 */
import type { MessagePort, Worker } from 'node:worker_threads';
import * as Comlink from 'comlink';
import nodeAdapter from 'comlink/dist/umd/node-adapter.js';

export { Comlink };

// The adapter's module.exports is the function; its declaration file says `export default`,
// which under CommonJS interop types the import as the module instead.
const nodeEndpoint = nodeAdapter as unknown as (of: Worker | MessagePort) => Comlink.Endpoint;

export function endpoint(of: Worker | MessagePort): Comlink.Endpoint {
  return nodeEndpoint(of);
}
