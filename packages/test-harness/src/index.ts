export * from './fill.js';
export * from './rng.js';
export * from './digest.js';
export * from './parallel-digest.js';
export * from './vcpu-control.js';
export * from './vcpu-pool.js';
export * from './write-pattern.js';
export * from './write-rate.js';

export * from './process-pair.js';
export * from './fault-proxy.js';
export * from './guest-devices.js';
export * from './stamp.js';
export * from './postcopy-verify.js';
export * from './tls-creds.js';
export * from './test-guest-destination.js';
export * from './child-script.js';
