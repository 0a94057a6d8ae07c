'use strict';
// Node.js client of chatsession.v1.SessionService, built at run time from the repository's protos/.
//
// Every unary RPC of the service is a method of SessionClient, found in the service definition
// (CreateSession -> createSession(request, options) returning a Promise): an RPC added to the
// proto needs no code here. Field names are lowerCamelCase (sessionId), int64 fields are numbers,
// enums are their names ('ROLE_USER'). Failures reject with a ChatSessionError.
//
// A unary call that is safe to repeat is retried (see retry.js for when and how long): a read
// (an RPC named Get* or List*, as the proto names its standard methods) as it is; a write when its
// request has a `request_id` field, which the client fills when the caller left it empty, once
// per call, so every attempt carries the same id and the server applies the write once. A write
// without one (UpdateSession, DeleteSession, UpdateState) is never retried.
//
// A message's `payload` (a google.protobuf.Value) is a plain JS value both ways: see payload.js.
// State values are plain JavaScript values too: getState and updateState return `state` as an
// object of them, updateState takes `delta.set` and appendMessages `stateDelta.set` as one.

const path = require('node:path');
const { randomUUID } = require('node:crypto');
const { setTimeout: sleep } = require('node:timers/promises');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { ChatSessionError, toChatSessionError } = require('./errors');
const { Backoff, DEFAULT_RETRY, retryPolicy } = require('./retry');
const { decodePayloads, encodePayloads, fromValue, toValue } = require('./payload');
const { deltaToProto, withPlainState } = require('./state');

const DEFAULT_PROTO_ROOT = path.resolve(__dirname, '..', '..', '..', 'protos');
const SERVICE_NAME = 'chatsession.v1.SessionService';
const SERVICE_PROTO = 'chatsession/v1/session_service.proto';

const LOADER_OPTIONS = { keepCase: false, longs: Number, enums: String, defaults: true, oneofs: true };
const READ_RPC = /^(Get|List)[A-Z]/;

/**
 * @typedef {object} CallOptions
 * @property {number} [timeoutMs] deadline of each attempt, from its start (cut to what is left of
 *   the retry deadline)
 * @property {Record<string, string>} [metadata] extra request metadata
 * @property {import('./retry').RetryPolicy | false} [retry] this call's retry policy, over the
 *   client's; false: one attempt
 *
 * @typedef {object} WatchOptions
 * @property {number} [afterSeq] deliver messages after this seq (0: from the oldest kept);
 *   absent: only messages appended from now on
 * @property {boolean} [includeHeartbeats] yield heartbeat events too (default false)
 * @property {number} [maxRetries] consecutive reconnects without an event before giving up (default 10)
 * @property {number} [initialBackoffMs] first wait before a reconnect (default 100), doubling
 * @property {number} [maxBackoffMs] longest wait before a reconnect (default 5000)
 *
 * @typedef {object} ClientOptions
 * @property {import('@grpc/grpc-js').ChannelCredentials} [credentials] default: plaintext
 * @property {string} [token] sent as `authorization: Bearer <token>` on every call
 * @property {string} [protoRoot] directory holding chatsession/ and google/rpc/ protos
 * @property {import('@grpc/grpc-js').ChannelOptions} [channelOptions]
 * @property {import('./retry').RetryPolicy | false} [retry] retry policy of the unary calls
 *   (default: DEFAULT_RETRY); false: no retries
 *
 * @typedef {object} UnaryRpc
 * @property {boolean} requestIdField whether its request has a `request_id`, to be filled
 * @property {boolean} retryable safe to repeat: a read, or a write applied once per request_id
 */

class SessionClient {
  /**
   * @param {string} address HOST:PORT
   * @param {ClientOptions} [options]
   */
  constructor(address, options = {}) {
    this.protoRoot = options.protoRoot ?? DEFAULT_PROTO_ROOT;
    const definition = protoLoader.loadSync(SERVICE_PROTO, { ...LOADER_OPTIONS, includeDirs: [this.protoRoot] });
    const Service = /** @type {any} */ (grpc.loadPackageDefinition(definition)).chatsession.v1.SessionService;
    /** @type {any} */
    this.stub = new Service(address, options.credentials ?? grpc.credentials.createInsecure(), options.channelOptions);
    this.token = options.token;
    this.retry = options.retry;
    /** @type {Record<string, {requestStream: boolean, responseStream: boolean, originalName?: string, path: string, requestType: {type: {field: {name: string}[]}}}>} */
    this.methods = /** @type {any} */ (definition[SERVICE_NAME]);
    /** @type {Map<string, UnaryRpc>} by method name (lowerCamelCase) */
    this.unaryRpcs = new Map();
    for (const method of Object.values(this.methods)) {
      if (method.requestStream || method.responseStream) continue;
      const name = /** @type {string} */ (method.originalName);
      const requestIdField = method.requestType.type.field.some((field) => field.name === 'requestId');
      const read = READ_RPC.test(method.path.slice(method.path.lastIndexOf('/') + 1));
      this.unaryRpcs.set(name, { requestIdField, retryable: read || requestIdField });
      if (!(name in this)) {
        /** @type {any} */ (this)[name] = (/** @type {object} */ request, /** @type {CallOptions} */ callOptions) =>
          this.unary(name, request, callOptions);
      }
    }
  }

  /**
   * Calls the unary RPC `name` (lowerCamelCase, e.g. 'getSession').
   * @param {string} name
   * @param {object} [request]
   * @param {CallOptions} [options]
   * @returns {Promise<any>}
   */
  async unary(name, request = {}, options = {}) {
    const rpc = this.unaryRpcs.get(name);
    request = encodePayloads(request);
    if (rpc?.requestIdField && !(/** @type {{requestId?: string}} */ (request).requestId)) {
      // Made once per call, before the first attempt, so that every retry repeats it.
      request = { ...request, requestId: randomUUID().replaceAll('-', '') };
    }
    const policy = rpc?.retryable ? retryPolicy(this.retry, options.retry) : false;
    if (!policy) return this.attempt(name, request, options, Infinity);
    const backoff = new Backoff(policy);
    for (;;) {
      try {
        return await this.attempt(name, request, options, backoff.remainingMs());
      } catch (error) {
        const delayMs = backoff.nextDelayMs(/** @type {InstanceType<typeof ChatSessionError>} */ (error));
        if (delayMs === undefined) throw error;
        await sleep(delayMs);
      }
    }
  }

  /**
   * One attempt of a unary call, given at most `limitMs`.
   * @param {string} name
   * @param {object} request
   * @param {CallOptions} options
   * @param {number} limitMs
   * @returns {Promise<any>}
   */
  attempt(name, request, options, limitMs) {
    const timeoutMs = Math.min(options.timeoutMs ?? Infinity, limitMs);
    const callOptions = timeoutMs === Infinity ? {} : { deadline: Date.now() + timeoutMs };
    return new Promise((resolve, reject) => {
      this.stub[name](request, this.metadata(options), callOptions, (/** @type {any} */ error, /** @type {any} */ response) =>
        error ? reject(toChatSessionError(error, this.protoRoot)) : resolve(decodePayloads(response)),
      );
    });
  }

  /**
   * Follows a session live, as an async iterator of WatchMessagesResponse events (`event` says
   * which of `message`, `historyTrimmed`, `compacted`, `cleared`, `truncated` or `heartbeat` it holds). When the stream breaks with
   * a code a unary call would be retried on (UNAVAILABLE: a server shutting down, a dropped
   * connection; DEADLINE_EXCEEDED: Valkey slow) it reconnects after the last seq it delivered,
   * with the same backoff, so no message is lost or repeated; other errors (NOT_FOUND when the session
   * is deleted) end the iteration by throwing a ChatSessionError. Leaving the loop cancels the stream.
   * @param {string} sessionId
   * @param {WatchOptions} [options]
   * @returns {AsyncGenerator<any, void, undefined>}
   */
  async *watch(sessionId, options = {}) {
    const { includeHeartbeats = false, maxRetries = 10, initialBackoffMs = 100, maxBackoffMs = 5000 } = options;
    /** @type {number | undefined} */
    let cursor = options.afterSeq;
    const backoff = new Backoff({ maxAttempts: maxRetries + 1, initialBackoffMs, maxBackoffMs, deadlineMs: Infinity });
    for (;;) {
      const call = this.stub.watchMessages(cursor === undefined ? { sessionId } : { sessionId, afterSeq: cursor }, this.metadata({}));
      try {
        for await (const event of call) {
          backoff.restart();
          decodePayloads(event);
          if (event.event === 'message') cursor = event.message.seq;
          else if (event.event === 'historyTrimmed') cursor = event.historyTrimmed.lastMissingSeq;
          // A summary stands at its range's last seq; a clear says the last seq it emptied.
          else if (event.event === 'compacted') cursor = Math.max(cursor ?? 0, event.compacted.summarizes.lastSeq);
          else if (event.event === 'cleared') cursor = Math.max(cursor ?? 0, event.cleared.lastSeq);
          // Seqs go on after a truncation's last seq; messages up to its afterSeq still come.
          else if (event.event === 'truncated' && cursor !== undefined && cursor > event.truncated.afterSeq) {
            cursor = Math.max(cursor, event.truncated.lastSeq);
          }
          else if (event.event === 'heartbeat') {
            cursor = Math.max(cursor ?? 0, event.heartbeat.lastSeq);
            if (!includeHeartbeats) continue;
          }
          yield event;
        }
        return;
      } catch (raw) {
        const error = toChatSessionError(raw, this.protoRoot);
        const delayMs = backoff.nextDelayMs(error);
        if (delayMs === undefined) throw error;
        await sleep(delayMs);
      } finally {
        call.cancel();
      }
    }
  }

  /**
   * A state, whole or by `keys`: `{scope: {sessionId}}` (a session's) or `{scope: {userId}}` (the
   * one every session of a user shares). Resolves to `{state}`, plain values.
   * @param {{scope: {sessionId?: string, userId?: string}, keys?: string[]}} request
   * @param {CallOptions} [options]
   */
  async getState(request, options) {
    return withPlainState(await this.unary('getState', request, options));
  }

  /**
   * Sets `delta.set` (plain values) and removes `delta.remove` in one atomic step; resolves to
   * `{state}`, the whole state after it, plain values.
   * @param {{scope: {sessionId?: string, userId?: string}, delta?: {set?: Record<string, unknown>, remove?: string[]}}} request
   * @param {CallOptions} [options]
   */
  async updateState(request, options) {
    return withPlainState(await this.unary('updateState', { ...request, delta: deltaToProto(request.delta) }, options));
  }

  /**
   * Appends messages; a `stateDelta` (`set` as plain values, `remove`) changes the session's
   * state in the same step.
   * @param {{stateDelta?: {set?: Record<string, unknown>, remove?: string[]}} & Record<string, any>} request
   * @param {CallOptions} [options]
   */
  async appendMessages(request, options) {
    const stateDelta = deltaToProto(request.stateDelta);
    return this.unary('appendMessages', stateDelta ? { ...request, stateDelta } : request, options);
  }

  /**
   * Removes the session's newest stored message and returns it (null when it stores none), in one
   * call (TruncateMessages with popCount 1). Rejects with a ChatSessionError (code ABORTED) in the
   * rare case that an attempt of this call popped the message but its answer was lost: the retry
   * finds the pop done and the message gone.
   * @param {string} sessionId
   * @param {CallOptions & {requestId?: string}} [options]
   * @returns {Promise<any>}
   */
  async popMessage(sessionId, options = {}) {
    const { requestId, ...callOptions } = options;
    const reply = await this.unary('truncateMessages', { sessionId, popCount: 1, returnRemoved: true, requestId }, callOptions);
    if (reply.removedMessages.length > 0) return reply.removedMessages[reply.removedMessages.length - 1];
    if (reply.removedCount > 0) {
      const details = `session ${sessionId}: an earlier attempt of this pop removed its newest message, but its answer was lost; the message is gone`;
      const cause = /** @type {any} */ ({ code: grpc.status.ABORTED, details, metadata: new grpc.Metadata() });
      throw new ChatSessionError(cause, this.protoRoot);
    }
    return null;
  }

  close() {
    this.stub.close();
  }

  /** @param {CallOptions} options */
  metadata(options) {
    const metadata = new grpc.Metadata();
    if (this.token) metadata.set('authorization', `Bearer ${this.token}`);
    for (const [key, value] of Object.entries(options.metadata ?? {})) metadata.set(key, value);
    return metadata;
  }
}

module.exports = { SessionClient, ChatSessionError, status: grpc.status, DEFAULT_PROTO_ROOT, DEFAULT_RETRY, toValue, fromValue };
