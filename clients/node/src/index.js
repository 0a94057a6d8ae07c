'use strict';
// Node.js client of chatsession.v1.SessionService, built at run time from the repository's protos/.
//
// Every unary RPC of the service is a method of SessionClient, found in the service definition
// (CreateSession -> createSession(request, options) returning a Promise): an RPC added to the
// proto needs no code here. Field names are lowerCamelCase (sessionId), int64 fields are numbers,
// enums are their names ('ROLE_USER'). Failures reject with a ChatSessionError.

const path = require('node:path');
const { setTimeout: sleep } = require('node:timers/promises');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { ChatSessionError, toChatSessionError } = require('./errors');

const DEFAULT_PROTO_ROOT = path.resolve(__dirname, '..', '..', '..', 'protos');
const SERVICE_NAME = 'chatsession.v1.SessionService';
const SERVICE_PROTO = 'chatsession/v1/session_service.proto';

const LOADER_OPTIONS = { keepCase: false, longs: Number, enums: String, defaults: true, oneofs: true };

/**
 * @typedef {object} CallOptions
 * @property {number} [timeoutMs] deadline of the call, from now
 * @property {Record<string, string>} [metadata] extra request metadata
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
    /** @type {Record<string, {requestStream: boolean, responseStream: boolean, originalName?: string}>} */
    this.methods = /** @type {any} */ (definition[SERVICE_NAME]);
    for (const method of Object.values(this.methods)) {
      const name = /** @type {string} */ (method.originalName);
      if (!method.requestStream && !method.responseStream && !(name in this)) {
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
  unary(name, request = {}, options = {}) {
    return new Promise((resolve, reject) => {
      this.stub[name](request, this.metadata(options), this.callOptions(options), (/** @type {any} */ error, /** @type {any} */ response) =>
        error ? reject(toChatSessionError(error, this.protoRoot)) : resolve(response),
      );
    });
  }

  /**
   * Follows a session live, as an async iterator of WatchMessagesResponse events (`event` says
   * which of `message`, `historyTrimmed`, `compacted`, `cleared` or `heartbeat` it holds). When the stream breaks with
   * UNAVAILABLE (a server shutting down, a dropped connection) it reconnects after the last seq
   * it delivered, so no message is lost or repeated; other errors (NOT_FOUND when the session
   * is deleted) end the iteration by throwing a ChatSessionError. Leaving the loop cancels the stream.
   * @param {string} sessionId
   * @param {WatchOptions} [options]
   * @returns {AsyncGenerator<any, void, undefined>}
   */
  async *watch(sessionId, options = {}) {
    const { includeHeartbeats = false, maxRetries = 10, initialBackoffMs = 100, maxBackoffMs = 5000 } = options;
    /** @type {number | undefined} */
    let cursor = options.afterSeq;
    let failures = 0;
    for (;;) {
      const call = this.stub.watchMessages(cursor === undefined ? { sessionId } : { sessionId, afterSeq: cursor }, this.metadata({}));
      try {
        for await (const event of call) {
          failures = 0;
          if (event.event === 'message') cursor = event.message.seq;
          else if (event.event === 'historyTrimmed') cursor = event.historyTrimmed.lastMissingSeq;
          // A summary stands at its range's last seq; a clear says the last seq it emptied.
          else if (event.event === 'compacted') cursor = Math.max(cursor ?? 0, event.compacted.summarizes.lastSeq);
          else if (event.event === 'cleared') cursor = Math.max(cursor ?? 0, event.cleared.lastSeq);
          else if (event.event === 'heartbeat') {
            cursor = Math.max(cursor ?? 0, event.heartbeat.lastSeq);
            if (!includeHeartbeats) continue;
          }
          yield event;
        }
        return;
      } catch (raw) {
        const error = toChatSessionError(raw, this.protoRoot);
        if (!(error instanceof ChatSessionError) || error.code !== grpc.status.UNAVAILABLE || failures >= maxRetries) {
          throw error;
        }
        const backoff = Math.min(initialBackoffMs * 2 ** failures, maxBackoffMs);
        failures += 1;
        await sleep(error.retryDelayMs ?? Math.random() * backoff);
      } finally {
        call.cancel();
      }
    }
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

  /** @param {CallOptions} options */
  callOptions(options) {
    return options.timeoutMs === undefined ? {} : { deadline: Date.now() + options.timeoutMs };
  }
}

module.exports = { SessionClient, ChatSessionError, status: grpc.status, DEFAULT_PROTO_ROOT };
