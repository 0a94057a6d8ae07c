"""A message's payload: a JSON-able Python value in, the same value out.

The payload travels as a google.protobuf.Value, whose numbers are doubles. Going in, an int must
lie within +-2^53 (beyond, a double would round it: refused rather than changed), a float must be
finite (JSON has no NaN or infinity), dict keys must be strings, and tuples go as lists. Coming
out, an integral number within +-2^53 comes back as an int, any other as a float: `3` and `3.0`
both come back as `3`, and -0.0 stays the float -0.0. (json_format.MessageToDict gives every
number as a float instead.) An object's key order is not kept: a Value's object is a map.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2

from chatsession.v1 import session_pb2

MAX_EXACT_INTEGER = 2**53
"""The largest integer magnitude a payload carries exactly (a double's 53-bit mantissa)."""


def payload_value(value: Any) -> struct_pb2.Value:
    """A JSON-able Python value as the Value a Message's payload holds; ValueError (TypeError for
    a type JSON has not) when it would not come back the same."""
    out = struct_pb2.Value()
    fill_value(out, value, "payload")
    return out


def fill_value(target: struct_pb2.Value, value: Any, where: str) -> None:
    """Sets `target` (a fresh Value, such as a map entry) to `value`, by the rules above (a state
    value follows them too); errors name the place as `where` and the path below it."""
    if value is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif value is True or value is False:
        target.bool_value = value
    elif isinstance(value, str):
        target.string_value = value
    elif isinstance(value, int):
        if abs(value) > MAX_EXACT_INTEGER:
            raise ValueError(
                f"{where}: {value} is beyond +-2^53 (2**53), which JSON numbers (doubles) cannot hold "
                "exactly; send it as a string"
            )
        target.number_value = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value} is not a JSON number")
        target.number_value = value
    elif isinstance(value, Mapping):
        struct = target.struct_value
        struct.SetInParent()  # an empty dict is still an object
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: object keys must be strings, not {type(key).__name__}")
            fill_value(struct.fields[key], item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        values = target.list_value.values
        target.list_value.SetInParent()
        for i, item in enumerate(value):
            fill_value(values.add(), item, f"{where}[{i}]")
    else:
        raise TypeError(f"{where}: a {type(value).__name__} is not a JSON value")


def payload_of(message: session_pb2.Message, default: Any = None) -> Any:
    """The payload of a message the service returned, as a Python value (None for JSON null);
    `default` when it has none."""
    if not message.HasField("payload"):
        return default
    return value_to_python(message.payload)


def value_to_python(value: struct_pb2.Value) -> Any:
    """A Value as a Python value: dicts, lists, str, bool, None, and numbers as the module
    docstring says."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        negative_zero = number == 0 and math.copysign(1, number) < 0
        if number.is_integer() and abs(number) <= MAX_EXACT_INTEGER and not negative_zero:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {key: value_to_python(item) for key, item in value.struct_value.fields.items()}
    if kind == "list_value":
        return [value_to_python(item) for item in value.list_value.values]
    return None
