'use strict';
// State values: plain JavaScript values in and out. On the wire a state value is a
// google.protobuf.Value (a JSON value); protobufjs hands it over as its message object, which this
// turns into the value it stands for (and back).

/**
 * A plain JSON value (null, boolean, number, string, array, plain object) as a Value message object.
 * @param {unknown} value
 * @returns {object}
 */
function toValue(value) {
  if (value === null) return { nullValue: 'NULL_VALUE' };
  switch (typeof value) {
    case 'boolean':
      return { boolValue: value };
    case 'number':
      if (!Number.isFinite(value)) throw new TypeError(`a state value is JSON: ${value} is not`);
      return { numberValue: value };
    case 'string':
      return { stringValue: value };
    case 'object':
      if (Array.isArray(value)) return { listValue: { values: value.map(toValue) } };
      return { structValue: { fields: mapValues(/** @type {Record<string, unknown>} */ (value), toValue) } };
    default:
      throw new TypeError(`a state value is JSON: ${typeof value} is not`);
  }
}

/**
 * A Value message object (as protobufjs decodes it, `kind` naming the field set) as a plain value.
 * @param {any} value
 * @returns {unknown}
 */
function fromValue(value) {
  switch (value?.kind) {
    case 'boolValue':
      return value.boolValue;
    case 'numberValue':
      return value.numberValue;
    case 'stringValue':
      return value.stringValue;
    case 'listValue':
      return (value.listValue.values ?? []).map(fromValue);
    case 'structValue':
      return mapValues(value.structValue.fields ?? {}, fromValue);
    default: // nullValue, or no kind at all: a JSON null
      return null;
  }
}

/**
 * @template T, U
 * @param {Record<string, T>} object
 * @param {(value: T) => U} f
 * @returns {Record<string, U>}
 */
function mapValues(object, f) {
  return Object.fromEntries(Object.entries(object).map(([key, value]) => [key, f(value)]));
}

/**
 * A StateDelta whose `set` holds plain values, as the request wants it.
 * @param {{set?: Record<string, unknown>, remove?: string[]} | undefined} delta
 */
function deltaToProto(delta) {
  if (delta === undefined || delta === null) return delta;
  return { ...delta, set: mapValues(delta.set ?? {}, toValue) };
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

module.exports = { toValue, fromValue, deltaToProto, withPlainState };
