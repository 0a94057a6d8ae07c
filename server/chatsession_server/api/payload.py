"""A message's payload (and a state's value): the caller's google.protobuf.Value, as the JSON text
the store keeps, and back.

The store keeps the payload as JSON text written here, once, and never parses it: the scripts
handle it as an opaque string (Lua's cjson would print numbers with 14 significant digits). A
Value's numbers are doubles: the text holds an integral one within +-2^53 as an integer (`3`, not
`3.0`; -0.0 keeps its sign and its `.0`) and any other as Python's shortest round-trip form (at
most 17 significant digits), so parsing the text gives back the very same doubles.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from google.protobuf import struct_pb2

MAX_EXACT_INTEGER = 2**53
"""Integers up to this size are exact as doubles, the numbers a Value holds."""

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class PayloadError(ValueError):
    """A payload the store cannot keep as JSON (the message says why)."""


class PayloadTooLarge(PayloadError):
    """A payload with more than the values allowed."""


def payload_json(value: struct_pb2.Value, *, max_depth: int, max_values: int) -> tuple[str, int]:
    """The JSON text of `value` and how many values it holds (each null, bool, number, string,
    list and object counts one); PayloadError when it nests deeper than `max_depth` lists and
    objects or a number JSON has not (NaN, an infinity); PayloadTooLarge when it holds more than
    `max_values` values (the walk stops there: its cost is bounded)."""
    walk = _Walk(max_values)
    try:
        return _ENCODER.encode(walk.python(value, max_depth)), max_values - walk.left
    except _TooDeep:
        raise PayloadError(f"must nest at most {max_depth} levels of lists and objects") from None
    except _TooMany:
        raise PayloadTooLarge from None


class _TooDeep(Exception):
    pass


class _TooMany(Exception):
    pass


class _Walk:
    __slots__ = ("left",)

    def __init__(self, max_values: int) -> None:
        self.left = max_values

    def python(self, value: struct_pb2.Value, depth_left: int) -> Any:
        self.left -= 1
        if self.left < 0:
            raise _TooMany
        kind = value.WhichOneof("kind")
        if kind == "string_value":
            return value.string_value
        if kind == "number_value":
            return _number(value.number_value)
        if kind == "bool_value":
            return value.bool_value
        if kind == "struct_value":
            if depth_left <= 0:
                raise _TooDeep
            fields = value.struct_value.fields
            return {key: self.python(item, depth_left - 1) for key, item in fields.items()}
        if kind == "list_value":
            if depth_left <= 0:
                raise _TooDeep
            return [self.python(item, depth_left - 1) for item in value.list_value.values]
        return None  # null_value, or a Value with no kind set (JSON null, as json_format reads it)


def _number(number: float) -> int | float:
    if not math.isfinite(number):
        raise PayloadError("must not hold NaN or an infinity (JSON has no such numbers)")
    negative_zero = number == 0 and math.copysign(1, number) < 0
    if number.is_integer() and abs(number) <= MAX_EXACT_INTEGER and not negative_zero:
        return int(number)
    return number


def fill_value(target: struct_pb2.Value, text: str) -> None:
    """Sets `target` (a field or map entry of a reply, filled in place) to the JSON text the store
    keeps, merged from its encoding (see payload_field)."""
    target.MergeFromString(_encode(json.loads(text)))


def payload_field(text: str, field_number: int) -> bytes:
    """The protobuf encoding of a Value field (`field_number` of its message) holding the JSON
    text the store keeps: the reply's message merges it (MergeFromString, in C). Written here
    rather than built as Value objects: a value costs a quarter of the time this way (about 1 us
    against 4), which is what a page of payloads costs to convert."""
    value = _encode(json.loads(text))
    return _varint((field_number << 3) | 2) + _varint(len(value)) + value


_pack_double = struct.Struct("<d").pack
_SMALL = [bytes([n]) for n in range(128)]
# A Value's fields (google/protobuf/struct.proto), each with its wire type: null_value 1 (varint),
# number_value 2 (64-bit), string_value 3, struct_value 5, list_value 6 (length-delimited),
# bool_value 4 (varint); Struct.fields and ListValue.values are field 1, a map entry's key 1 and
# value 2 (length-delimited).
_NULL, _TRUE, _FALSE = b"\x08\x00", b"\x20\x01", b"\x20\x00"
_NUMBER, _STRING, _STRUCT, _LIST, _ITEM, _VALUE = b"\x11", b"\x1a", b"\x2a", b"\x32", b"\x0a", b"\x12"


def _varint(n: int) -> bytes:
    if n < 128:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _encode(obj: Any) -> bytes:
    """A parsed JSON value as an encoded google.protobuf.Value."""
    if obj is None:
        return _NULL
    if obj is True:
        return _TRUE
    if obj is False:
        return _FALSE
    kind = type(obj)
    if kind is str:
        raw: bytes = obj.encode()
        return _STRING + _varint(len(raw)) + raw
    if kind is int or kind is float:
        return _NUMBER + _pack_double(obj)
    if kind is list:
        body = b"".join([_ITEM + _varint(len(item)) + item for item in map(_encode, obj)])
        return _LIST + _varint(len(body)) + body
    entries = []
    for key, item in obj.items():
        raw_key, value = key.encode(), _encode(item)
        entry = _ITEM + _varint(len(raw_key)) + raw_key + _VALUE + _varint(len(value)) + value
        entries.append(_ITEM + _varint(len(entry)) + entry)
    body = b"".join(entries)
    return _STRUCT + _varint(len(body)) + body
