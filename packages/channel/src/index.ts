export * from './uri.js';
export * from './transport.js';
export * from './byte-reader.js';
export * from './buffered-writer.js';
export * from './handoff.js';
export * from './tls.js';
export * from './tls-bridge.js';
