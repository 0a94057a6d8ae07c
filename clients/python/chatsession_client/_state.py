"""State requests and values: Python values in, Python values out.

A state value is any JSON value; on the wire it is a google.protobuf.Value, converted as a
message's payload is (chatsession_client._payload: integral numbers come back as int).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import struct_pb2

from chatsession.v1 import session_service_pb2
from chatsession_client._payload import fill_value, value_to_python

StateDelta = session_service_pb2.StateDelta


def to_value(obj: Any, target: struct_pb2.Value | None = None) -> struct_pb2.Value:
    """`obj` as a Value, by the payload's rules (chatsession_client._payload), filled into `target`
    (a fresh Value, such as a map entry) when given."""
    value = struct_pb2.Value() if target is None else target
    fill_value(value, obj, "state value")
    return value


from_value = value_to_python
"""A Value as a Python value, by the payload's rules."""


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
