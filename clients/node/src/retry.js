'use strict';
// Retries with full-jitter exponential backoff, the server's RetryInfo and an overall deadline;
// the same decisions as the Python client's chatsession_client/retry.py. Only the decisions live
// here (whether to retry, how long to wait, what is left of the deadline): the unary calls and
// the watch do the waiting.

const { performance } = require('node:perf_hooks');
const grpc = require('@grpc/grpc-js');

/**
 * @typedef {object} RetryPolicy
 * @property {number} [maxAttempts] attempts of one call, the first included (default: no limit
 *   but the deadline)
 * @property {number} [initialBackoffMs] longest wait before the first retry (default 100); the
 *   wait is random up to it (full jitter) and never shorter than the server's RetryInfo delay
 * @property {number} [maxBackoffMs] the doubling stops here (default 2000)
 * @property {number} [deadlineMs] how long one call may take in all, attempts and waits
 *   (default 30000)
 */

/** @type {Required<RetryPolicy>} */
const DEFAULT_RETRY = Object.freeze({ maxAttempts: Infinity, initialBackoffMs: 100, maxBackoffMs: 2000, deadlineMs: 30_000 });

// What a retry can cure: the server or the network away for a moment (UNAVAILABLE, a server
// shutting down or Valkey unreachable, with RetryInfo), or too slow this time (DEADLINE_EXCEEDED,
// as during a Valkey failover). Not RESOURCE_EXHAUSTED (a quota or a full store: the same call
// fails the same way), not the caller's errors.
const RETRYABLE_CODES = new Set([grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED]);

/**
 * The policy of one call: `override` (a call's `retry` option) over `base` (the client's) over
 * the defaults; false: no retries.
 * @param {RetryPolicy | false | undefined} base
 * @param {RetryPolicy | false | undefined} override
 * @returns {Required<RetryPolicy> | false}
 */
function retryPolicy(base, override) {
  if (override === false || (base === false && override === undefined)) return false;
  return { ...DEFAULT_RETRY, ...(base || {}), ...(override || {}) };
}

/** Where one call (or one watch, since its last event) stands in its retry policy. */
class Backoff {
  /** @param {Required<RetryPolicy>} policy */
  constructor(policy) {
    this.policy = policy;
    this.end = performance.now() + policy.deadlineMs;
    this.backoffMs = policy.initialBackoffMs;
    this.attempts = 1;
  }

  /** Begin afresh: a watch that received an event has made progress. */
  restart() {
    this.end = performance.now() + this.policy.deadlineMs;
    this.backoffMs = this.policy.initialBackoffMs;
    this.attempts = 1;
  }

  /** Milliseconds left of the deadline (Infinity without one). */
  remainingMs() {
    return Math.max(this.end - performance.now(), 0);
  }

  /**
   * Milliseconds to wait before retrying after `error`, or undefined to give up (a code not
   * retried, the attempts spent or no time left).
   * @param {{code?: unknown, retryDelayMs?: number}} error
   * @returns {number | undefined}
   */
  nextDelayMs(error) {
    if (typeof error.code !== 'number' || !RETRYABLE_CODES.has(error.code)) return undefined;
    if (this.attempts >= this.policy.maxAttempts) return undefined;
    const delayMs = Math.max(Math.random() * this.backoffMs, error.retryDelayMs ?? 0);
    if (delayMs >= this.remainingMs()) return undefined;
    this.backoffMs = Math.min(this.backoffMs * 2, this.policy.maxBackoffMs);
    this.attempts += 1;
    return delayMs;
  }
}

module.exports = { Backoff, DEFAULT_RETRY, RETRYABLE_CODES, retryPolicy };
