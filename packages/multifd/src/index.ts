export * from './wire/multifd-wire.js';
export * from './compress/method.js';
export * from './compress/registry.js';
export * from './multifd-send.js';
export * from './multifd-recv.js';
export * from './packet-receiver.js';
