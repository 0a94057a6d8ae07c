'use strict';
// State values: plain JavaScript values in and out. On the wire a state value is a
// google.protobuf.Value (a JSON value), converted as a message's payload is (./payload).

const { fromValue, toValue } = require('./payload');

/**
 * A StateDelta whose `set` holds plain values, as the request wants it.
 * @param {{set?: Record<string, unknown>, remove?: string[]} | undefined} delta
 */
function deltaToProto(delta) {
  if (delta === undefined || delta === null) return delta;
  const set = Object.entries(delta.set ?? {}).map(([key, value]) => [key, toValue(value, `stateDelta.set.${key}`)]);
  return { ...delta, set: Object.fromEntries(set) };
}

/**
 * A reply whose `state` map holds Value objects, with plain values instead, sorted by key (a
 * protobuf map has no order).
 * @param {any} reply
 */
function withPlainState(reply) {
  const state = reply.state ?? {};
  return { ...reply, state: Object.fromEntries(Object.keys(state).sort().map((key) => [key, fromValue(state[key])])) };
}

module.exports = { deltaToProto, withPlainState };
