"""State values: a google.protobuf.Value to the JSON text a state stores, and back.

The text is written here once and stored as it is (no Lua script re-encodes it): JSON's own
numbers, with a number that holds an integer (the only kind a Value has is a double) written as
one, `3` rather than `3.0`, so that every JSON reader gets back what the caller meant.
"""

from __future__ import annotations

import json
import math
from typing import Any

from google.protobuf import struct_pb2

MAX_EXACT_INTEGER = 2**53
"""Integers a double holds exactly: those are written without a fraction."""

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class BadValue(ValueError):
    """Why a Value cannot be stored (the text names no caller's data)."""


def value_to_json(value: struct_pb2.Value, max_depth: int) -> str:
    """The JSON text of `value`; BadValue when it nests arrays and objects more than `max_depth`
    deep or holds a number JSON has no text for (NaN, infinities). A Value with no kind set is
    null."""
    try:
        return _ENCODER.encode(_python(value, max_depth))
    except _TooDeep:
        raise BadValue(f"nests arrays and objects more than {max_depth} deep") from None


class _TooDeep(Exception):
    pass


def _python(value: struct_pb2.Value, depth_left: int) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise BadValue("holds a number JSON cannot (NaN or infinite)")
        negative_zero = number == 0 and math.copysign(1.0, number) < 0  # its text keeps the sign
        if number.is_integer() and abs(number) <= MAX_EXACT_INTEGER and not negative_zero:
            return int(number)
        return number
    if kind == "bool_value":
        return value.bool_value
    if kind == "null_value" or kind is None:
        # No kind set: what a map entry given as JSON null is on the wire (grpcurl sends one).
        return None
    if depth_left <= 0:
        raise _TooDeep
    if kind == "struct_value":
        return {key: _python(item, depth_left - 1) for key, item in value.struct_value.fields.items()}
    return [_python(item, depth_left - 1) for item in value.list_value.values]


def fill_value(target: struct_pb2.Value, text: str) -> None:
    """Sets `target` (a field or map entry of a reply, filled in place) to the JSON text a state
    holds."""
    obj = json.loads(text)
    if obj is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif isinstance(obj, bool):
        target.bool_value = obj
    elif isinstance(obj, int | float):
        target.number_value = obj
    elif isinstance(obj, str):
        target.string_value = obj
    elif isinstance(obj, dict):
        target.struct_value.update(obj)
    else:
        target.list_value.extend(obj)
