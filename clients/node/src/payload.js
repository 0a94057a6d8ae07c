'use strict';
// A message's payload as a plain JS value, in and out. On the wire it is a google.protobuf.Value
// (numbers are doubles, as JS numbers are); protobufjs gives and takes it in its message form
// ({numberValue: 1}, {structValue: {fields: {...}}}, ...), which these convert from and to.
//
// In: null, booleans, strings, finite numbers, arrays and objects (an object's toJSON is called
// first and its undefined properties are left out; undefined in an array becomes null: as
// JSON.stringify does). NaN, infinities, bigints, functions and symbols throw a TypeError. Out:
// the same value; -0 stays -0. An object's key order is not kept (a Value's object is a map).

/**
 * @param {unknown} value
 * @param {string} [where]
 * @returns {object} the Value as protobufjs takes it
 */
function toValue(value, where = 'payload') {
  if (value !== null && typeof value === 'object' && typeof (/** @type {any} */ (value).toJSON) === 'function') {
    value = /** @type {any} */ (value).toJSON();
  }
  if (value === null || value === undefined) return { nullValue: 'NULL_VALUE' };
  switch (typeof value) {
    case 'boolean':
      return { boolValue: value };
    case 'string':
      return { stringValue: value };
    case 'number':
      if (!Number.isFinite(value)) throw new TypeError(`${where}: ${value} is not a JSON number`);
      return { numberValue: value };
    case 'object':
      if (Array.isArray(value)) return { listValue: { values: value.map((item, i) => toValue(item, `${where}[${i}]`)) } };
      /** @type {Record<string, object>} */
      const fields = {};
      for (const [key, item] of Object.entries(value)) {
        if (item !== undefined) fields[key] = toValue(item, `${where}.${key}`);
      }
      return { structValue: { fields } };
    default:
      throw new TypeError(`${where}: a ${typeof value} is not a JSON value`);
  }
}

/**
 * @param {any} value a Value as protobufjs gives it (with the `kind` oneof name)
 * @returns {unknown}
 */
function fromValue(value) {
  switch (value.kind) {
    case 'numberValue':
      return value.numberValue;
    case 'stringValue':
      return value.stringValue;
    case 'boolValue':
      return value.boolValue;
    case 'structValue': {
      /** @type {Record<string, unknown>} */
      const out = {};
      for (const [key, item] of Object.entries(value.structValue.fields ?? {})) out[key] = fromValue(item);
      return out;
    }
    case 'listValue':
      return (value.listValue.values ?? []).map(fromValue);
    default:
      return null;
  }
}

/** Request fields that hold Messages (one or a list). */
const MESSAGE_FIELDS = ['messages', 'summary'];
/** Response fields that hold Messages (one or a list). */
const REPLY_MESSAGE_FIELDS = ['messages', 'summary', 'message', 'removedMessages'];

/**
 * A request with its messages' plain payloads as Values (a copy; the caller's objects untouched).
 * @param {any} request
 * @returns {object}
 */
function encodePayloads(request) {
  let out = request;
  for (const field of MESSAGE_FIELDS) {
    const held = request?.[field];
    if (held == null) continue;
    const encode = (/** @type {any} */ m, /** @type {string} */ where) =>
      m && m.payload !== undefined ? { ...m, payload: toValue(m.payload, `${where}.payload`) } : m;
    const encoded = Array.isArray(held) ? held.map((m, i) => encode(m, `${field}[${i}]`)) : encode(held, field);
    out = { ...out, [field]: encoded };
  }
  return out;
}

/**
 * A response (or watch event) with its messages' payloads as plain values, in place: `payload`
 * is undefined on a message without one.
 * @param {any} reply
 * @returns {any}
 */
function decodePayloads(reply) {
  for (const field of REPLY_MESSAGE_FIELDS) {
    const held = reply?.[field];
    if (held == null) continue;
    for (const m of Array.isArray(held) ? held : [held]) {
      if (m && typeof m === 'object' && 'payload' in m) m.payload = m.payload == null ? undefined : fromValue(m.payload);
    }
  }
  return reply;
}

module.exports = { toValue, fromValue, encodePayloads, decodePayloads };
