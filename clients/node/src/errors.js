'use strict';
// Rich errors: the google.rpc.Status a server sends in the `grpc-status-details-bin` trailer,
// decoded into plain objects (BadRequest, PreconditionFailure, QuotaFailure, ResourceInfo,
// RetryInfo, ErrorInfo, ...) with the vendored protos/google/rpc files.

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protobuf = require('protobufjs');

const STATUS_DETAILS_KEY = 'grpc-status-details-bin';
const TYPE_URL_PREFIX = 'type.googleapis.com/';

/** @type {Map<string, protobuf.Root>} one decoder per proto root, loaded on first use */
const roots = new Map();

/** @param {string} protoRoot */
function rpcTypes(protoRoot) {
  let root = roots.get(protoRoot);
  if (!root) {
    root = new protobuf.Root();
    // google/protobuf/{any,duration}.proto come bundled with protobufjs; the rest from protoRoot.
    root.resolvePath = (_origin, target) => path.join(protoRoot, target);
    root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto']);
    roots.set(protoRoot, root);
  }
  return root;
}

const CONVERSION = { longs: Number, enums: String, defaults: true, arrays: true, objects: true };

/** @type {Record<number, string>} status code number -> name, e.g. 3 -> 'INVALID_ARGUMENT' */
const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

/**
 * A failed call: `code` and `codeName` (grpc status), `message` (the server's description), the
 * decoded `details` and a property per detail kind this service sends.
 */
class ChatSessionError extends Error {
  /**
   * @param {import('@grpc/grpc-js').ServiceError} cause
   * @param {string} protoRoot
   */
  constructor(cause, protoRoot) {
    super(cause.details || cause.message, { cause });
    this.name = 'ChatSessionError';
    /** @type {number} */
    this.code = cause.code;
    /** @type {string} */
    this.codeName = CODE_NAMES[cause.code] ?? String(cause.code);
    /** @type {import('@grpc/grpc-js').Metadata | undefined} */
    this.metadata = cause.metadata;
    /** @type {{type: string, value: any}[]} every detail; `value` is a Buffer for a type not known here */
    this.details = decodeDetails(cause.metadata, protoRoot);
    const find = (/** @type {string} */ type) => this.details.find((d) => d.type === type)?.value;
    this.badRequest = find('google.rpc.BadRequest');
    this.preconditionFailure = find('google.rpc.PreconditionFailure');
    this.quotaFailure = find('google.rpc.QuotaFailure');
    this.resourceInfo = find('google.rpc.ResourceInfo');
    this.retryInfo = find('google.rpc.RetryInfo');
    this.errorInfo = find('google.rpc.ErrorInfo');
    /** @type {{field: string, description: string}[]} the BadRequest's violations, [] without one */
    this.fieldViolations = this.badRequest?.fieldViolations ?? [];
    const delay = this.retryInfo?.retryDelay;
    /** @type {number | undefined} how long the server asks the caller to wait before a retry */
    this.retryDelayMs = delay ? delay.seconds * 1000 + delay.nanos / 1e6 : undefined;
  }
}

/**
 * @param {import('@grpc/grpc-js').Metadata | undefined} metadata
 * @param {string} protoRoot
 * @returns {{type: string, value: any}[]}
 */
function decodeDetails(metadata, protoRoot) {
  const raw = metadata?.get(STATUS_DETAILS_KEY)[0];
  if (!Buffer.isBuffer(raw)) return [];
  const root = rpcTypes(protoRoot);
  const status = root.lookupType('google.rpc.Status').decode(raw);
  return /** @type {any} */ (status).details.map((/** @type {{type_url?: string, typeUrl?: string, value: Uint8Array}} */ any) => {
    const typeUrl = any.typeUrl ?? any.type_url ?? '';
    const type = typeUrl.startsWith(TYPE_URL_PREFIX) ? typeUrl.slice(TYPE_URL_PREFIX.length) : typeUrl;
    let messageType;
    try {
      messageType = root.lookupType(type);
    } catch {
      return { type, value: Buffer.from(any.value) };
    }
    return { type, value: messageType.toObject(messageType.decode(any.value), CONVERSION) };
  });
}

/**
 * The error a call failed with, as a ChatSessionError (one already converted is returned as is).
 * @param {any} error
 * @param {string} protoRoot
 */
function toChatSessionError(error, protoRoot) {
  if (error instanceof ChatSessionError || typeof error?.code !== 'number') return error;
  return new ChatSessionError(error, protoRoot);
}

module.exports = { ChatSessionError, toChatSessionError, CODE_NAMES };
