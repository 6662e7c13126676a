/**
 * Every target, by name. In-process targets run in the fuzzer's worker thread (worker.mjs);
 * process targets (the built CLI) run from the main thread (fuzz.mjs).
 *
 * `weight`: the share of --iterations an in-process target gets when all run.
 */
import { loadvmTarget, postcopyTarget, snapshotTarget } from './loadvm.mjs';
import { headerTarget, initTarget, receiverTarget } from './multifd.mjs';
import { returnPathTarget } from './return-path.mjs';
import { controlTarget } from './control.mjs';

export const IN_PROCESS = [
  { target: loadvmTarget, weight: 28 },
  { target: postcopyTarget, weight: 12 },
  { target: snapshotTarget, weight: 10 },
  { target: initTarget, weight: 5 },
  { target: headerTarget, weight: 10 },
  { target: receiverTarget, weight: 15 },
  { target: returnPathTarget, weight: 10 },
  { target: controlTarget, weight: 10 },
];

export const PROCESS_TARGETS = ['sockets', 'restore-cli'];

export const ALL_TARGETS = [...IN_PROCESS.map((t) => t.target.name), ...PROCESS_TARGETS];

export function inProcessTarget(name) {
  return IN_PROCESS.find((t) => t.target.name === name)?.target;
}
