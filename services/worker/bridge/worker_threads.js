// Stands in for `node:worker_threads` in tool code (via the import map): Kiln tools may not start
// threads, which would keep running between invocations outside the one-at-a-time accounting.
// Everything a library may read at import time is here; only starting a worker throws.
const deny = () => {
  throw new Deno.errors.NotCapable("Requires worker access: Kiln tools cannot spawn worker threads");
};
export class Worker {
  constructor() {
    deny();
  }
}
export const isMainThread = true;
export const parentPort = null;
export const workerData = null;
export const threadId = 0;
export const resourceLimits = {};
export const SHARE_ENV = Symbol.for("nodejs.worker_threads.SHARE_ENV");
export const MessageChannel = globalThis.MessageChannel;
export const MessagePort = globalThis.MessagePort;
export const BroadcastChannel = globalThis.BroadcastChannel;
export function markAsUntransferable() {}
export function moveMessagePortToContext() {
  deny();
}
export function receiveMessageOnPort() {
  return undefined;
}
export function getEnvironmentData() {
  return undefined;
}
export function setEnvironmentData() {}
export default {
  Worker,
  isMainThread,
  parentPort,
  workerData,
  threadId,
  resourceLimits,
  SHARE_ENV,
  MessageChannel,
  MessagePort,
  BroadcastChannel,
  markAsUntransferable,
  moveMessagePortToContext,
  receiveMessageOnPort,
  getEnvironmentData,
  setEnvironmentData,
};
