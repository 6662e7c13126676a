/**
 * comlink over worker_threads for the recv threads' control plane (recv-protocol.ts); its
 * Node adapter turns a Worker or MessagePort into the endpoint comlink expects.
 *
 * Both are loaded with require, not import: the package's main build is CommonJS (UMD), and
 * an ESM import of CommonJS makes Node lex the file for its export names, in every thread
 * that loads it. That lexer is hot enough to be compiled by TurboFan, once per thread, on the
 * two cores the migration needs.
 */
import { createRequire } from 'node:module';
import type { MessagePort, Worker } from 'node:worker_threads';
import type * as ComlinkApi from 'comlink';

const require = createRequire(import.meta.url);

export const Comlink = require('comlink') as typeof ComlinkApi;
export type Remote<T> = ComlinkApi.Remote<T>;

// The adapter's module.exports is the function.
const nodeEndpoint = require('comlink/dist/umd/node-adapter.js') as (of: Worker | MessagePort) => ComlinkApi.Endpoint;

export function endpoint(of: Worker | MessagePort): ComlinkApi.Endpoint {
  return nodeEndpoint(of);
}
