"""State requests and values: Python values in, Python values out.

A state value is any JSON value; on the wire it is a google.protobuf.Value, whose numbers are
doubles: a number that holds an integer comes back as an int (3, not 3.0), as JSON readers give it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import struct_pb2

from chatsession.v1 import session_service_pb2

StateDelta = session_service_pb2.StateDelta
MAX_EXACT_INTEGER = 2**53
"""Integers beyond this are not exact as doubles: sending one is a ValueError, not a silent change."""


def to_value(obj: Any, target: struct_pb2.Value | None = None) -> struct_pb2.Value:
    """`obj` (None, bool, int, float, str, and lists, tuples and str-keyed mappings of them) as a
    Value, filled into `target` (a fresh Value, such as a map entry) when given."""
    value = struct_pb2.Value() if target is None else target
    if obj is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(obj, bool):
        value.bool_value = obj
    elif isinstance(obj, int):
        if abs(obj) > MAX_EXACT_INTEGER:
            raise ValueError(f"{obj} is beyond the integers a JSON number keeps exactly (2**53)")
        value.number_value = obj
    elif isinstance(obj, float):
        value.number_value = obj
    elif isinstance(obj, str):
        value.string_value = obj
    elif isinstance(obj, Mapping):
        value.struct_value.SetInParent()  # an empty object is still an object
        fields = value.struct_value.fields
        for key, item in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"object keys must be str, not {type(key).__name__}")
            to_value(item, fields[key])
    elif isinstance(obj, list | tuple):
        value.list_value.SetInParent()
        values = value.list_value.values
        for item in obj:
            to_value(item, values.add())
    else:
        raise TypeError(f"a state value is JSON: {type(obj).__name__} is not")
    return value


def from_value(value: struct_pb2.Value) -> Any:
    """A Value as a Python value: dict, list, str, int (a number holding an integer), float,
    bool or None."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() and abs(number) <= MAX_EXACT_INTEGER else number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {key: from_value(item) for key, item in value.struct_value.fields.items()}
    if kind == "list_value":
        return [from_value(item) for item in value.list_value.values]
    return None


def state_delta(values: Mapping[str, Any] | None = None, remove: Iterable[str] = ()) -> StateDelta:
    """A change of a state: set `values` (key -> any JSON-able value), remove the keys `remove`."""
    delta = StateDelta(remove=list(remove))
    for key, obj in (values or {}).items():
        to_value(obj, delta.set[key])
    return delta


def as_state_delta(change: Mapping[str, Any] | StateDelta) -> StateDelta:
    """An append's `state_delta`: a StateDelta as it is, a mapping as the keys to set."""
    return change if isinstance(change, StateDelta) else state_delta(change)


def state_scope(
    session_id: str | None, user_id: str | None, app: str | None = None
) -> session_service_pb2.StateScope:
    if [session_id, user_id, app].count(None) != 2:
        raise ValueError(
            "name one state: a session_id, user_id= for the state a user's sessions share, "
            "or app= for the state an app's sessions share"
        )
    if session_id is not None:
        return session_service_pb2.StateScope(session_id=session_id)
    if app is not None:
        return session_service_pb2.StateScope(app=app)
    return session_service_pb2.StateScope(user_id=user_id or "")


def get_state_request(
    session_id: str | None, user_id: str | None, keys: Iterable[str] | None, app: str | None = None
) -> session_service_pb2.GetStateRequest:
    return session_service_pb2.GetStateRequest(
        scope=state_scope(session_id, user_id, app), keys=list(keys or ())
    )


def update_state_request(
    session_id: str | None,
    user_id: str | None,
    values: Mapping[str, Any] | None,
    remove: Iterable[str],
    app: str | None = None,
) -> session_service_pb2.UpdateStateRequest:
    return session_service_pb2.UpdateStateRequest(
        scope=state_scope(session_id, user_id, app), delta=state_delta(values, remove)
    )


def state_of(state: Mapping[str, struct_pb2.Value]) -> dict[str, Any]:
    """A reply's state map as Python values, sorted by key (a protobuf map has no order)."""
    return {key: from_value(state[key]) for key in sorted(state)}
