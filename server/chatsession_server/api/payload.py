"""A message's payload: the caller's google.protobuf.Value, as the JSON text the store keeps, and
back.

The store keeps the payload as JSON text written here, once, and never parses it: the scripts
handle it as an opaque string (Lua's cjson would print numbers with 14 significant digits). A
Value's numbers are doubles: the text holds an integral one within +-2^53 as an integer (`3`, not
`3.0`; -0.0 keeps its sign and its `.0`) and any other as Python's shortest round-trip form (at
most 17 significant digits), so parsing the text gives back the very same doubles.
"""

from __future__ import annotations

import json
import math
from typing import Any

from google.protobuf import struct_pb2

MAX_EXACT_INTEGER = 2**53
"""Integers up to this size are exact as doubles, the numbers a Value holds."""

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class PayloadError(ValueError):
    """A payload the store cannot keep as JSON (the message says why)."""


def payload_json(value: struct_pb2.Value, max_depth: int) -> str:
    """The JSON text of `value`; PayloadError when it nests deeper than `max_depth` lists and
    objects or holds a number JSON has not (NaN, an infinity)."""
    try:
        return _ENCODER.encode(_to_python(value, max_depth))
    except _TooDeep:
        raise PayloadError(f"must nest at most {max_depth} levels of lists and objects") from None


class _TooDeep(Exception):
    pass


def _to_python(value: struct_pb2.Value, depth_left: int) -> Any:
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
        return {key: _to_python(item, depth_left - 1) for key, item in value.struct_value.fields.items()}
    if kind == "list_value":
        if depth_left <= 0:
            raise _TooDeep
        return [_to_python(item, depth_left - 1) for item in value.list_value.values]
    return None  # null_value, or a Value with no kind set (JSON null, as json_format reads it)


def _number(number: float) -> int | float:
    if not math.isfinite(number):
        raise PayloadError("must not hold NaN or an infinity (JSON has no such numbers)")
    negative_zero = number == 0 and math.copysign(1, number) < 0
    if number.is_integer() and abs(number) <= MAX_EXACT_INTEGER and not negative_zero:
        return int(number)
    return number


def set_payload(target: struct_pb2.Value, text: str) -> None:
    """Fills a reply message's payload from the JSON text the store keeps."""
    _set(target, json.loads(text))


def _set(target: struct_pb2.Value, obj: Any) -> None:
    """A parsed JSON value into a Value; protobuf's Struct.update and ListValue.extend fill the
    levels below (SetInParent: an empty object or list is still one)."""
    if obj is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif obj is True or obj is False:
        target.bool_value = obj
    elif isinstance(obj, str):
        target.string_value = obj
    elif isinstance(obj, int | float):
        target.number_value = obj
    elif isinstance(obj, dict):
        target.struct_value.SetInParent()
        target.struct_value.update(obj)
    else:
        target.list_value.SetInParent()
        target.list_value.extend(obj)
