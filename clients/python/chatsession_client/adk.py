"""chatsession as the session service of Google's Agent Development Kit
(`pip install 'chatsession-client[adk]'`).

    from google.adk.runners import Runner
    from chatsession_client.adk import ChatsessionSessionService

    session_service = ChatsessionSessionService("localhost:50051")
    runner = Runner(agent=agent, app_name="weather", session_service=session_service)

`ChatsessionSessionService` implements `google.adk.sessions.BaseSessionService` as ADK's own
`DatabaseSessionService` and `SqliteSessionService` do:

- `create_session` stores a session of `(app_name, user_id)` with the given id (surrounding
  whitespace stripped, as ADK's services do) or a new uuid, and raises ADK's
  `AlreadyExistsError` when that user already has one with that id in that app;
- `get_session` returns it with its events, or None when there is none; `GetSessionConfig`'s
  `num_recent_events` keeps the newest n (0: none) and `after_timestamp` those at or after it;
- `list_sessions` lists a user's sessions of the app, or with `user_id=None` every user's,
  without events, least recently updated first (ADK's order);
- `delete_session` deletes it (a missing one is no error);
- `append_event` stores the event (not a partial one) and applies its `state_delta`: `app:` keys
  to the state every session of the app shares, `user:` keys to the state the user's sessions
  of the app share, `temp:` keys to the session object only (never stored), the others to the
  session's own state in the same atomic step as the event. The event's timestamp becomes the
  message's time and the session's `last_update_time`. A session object that is no longer the
  newest (another writer appended since it was read) raises ADK's `StaleSessionError`, and one
  that was deleted `SessionNotFoundError`, as the database services do;
- `get_user_state` returns the user's state of the app, without the `user:` prefix.

How ADK maps onto chatsession (see the README's "Google ADK" section):

- An ADK session is the chatsession session `<user>/<app_name>:<session_id>` (readable in
  grpcurl), or `<user>/adk-<hash>` when the app name holds a ':' or either is outside
  [A-Za-z0-9_.:-] or the id would pass 128 characters (the hash: 26 letters of base32 of
  sha256 over app, user and id). `<user>` is the ADK user id when it is 1-128 characters of
  [A-Za-z0-9_.:-] that do not start with `b32.`, else `b32.` and the id's UTF-8 in lowercase
  base32 without padding (so any user id has a chatsession user of its own; it must then be
  at most 76 bytes). The ADK ids are kept in the session's labels `adk/app`, `adk/user_id` and
  `adk/session_id`, which listings read back. The session belongs to the chatsession app
  named by the ADK app name, encoded as a user id is; `app:` keys are that app's state.
- Each event is one message whose `payload` is the event's `model_dump(mode="json")` (read back
  with `Event.model_validate_json`, so bytes, function calls and responses, actions and
  metadata come back equal); its role is user for the user's events, tool for function
  responses, assistant otherwise; its content is the event's text (`[function_call NAME]`,
  `[function_response NAME]`, `[MIME type]` for parts without text); an event's function calls
  are its tool calls; its tokens are the model's output tokens in `usage_metadata`, or about
  4 characters a token of its text.
- State values are JSON: a number holding an integer comes back as an int, as from ADK's
  database services; values that are not JSON are stored as their `str()`, as theirs do.
- Sessions never expire and keep every message unless `ttl_seconds` / `max_messages` say
  otherwise (ADK applications own their retention).

Errors beyond ADK's are chatsession_client's `ChatSessionError` subclasses
(`PermissionDeniedError` for a token not allowed that user or app, `InvalidArgumentError`
naming the refused field, `StateFullError`, `UnavailableError` after the client's retries);
an id that cannot be mapped raises `ValueError` before anything is sent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from google.adk.errors import StaleSessionError
from google.adk.errors.already_exists_error import AlreadyExistsError as AdkAlreadyExistsError
from google.adk.errors.session_not_found_error import SessionNotFoundError
from google.adk.events.event import Event
from google.adk.sessions.base_session_service import (
    BaseSessionService,
    GetSessionConfig,
    ListSessionsResponse,
)
from google.adk.sessions.session import Session
from google.adk.sessions.state import State
from google.genai import types
from pydantic_core import to_jsonable_python
from typing_extensions import override

from chatsession.v1 import session_pb2
from chatsession_client import _adapters, _state
from chatsession_client._calls import Message, message
from chatsession_client._payload import payload_of
from chatsession_client.client import SessionClient
from chatsession_client.errors import AlreadyExistsError, NotFoundError, SeqMismatchError

__all__ = [
    "ChatsessionSessionService",
    "app_id_for",
    "event_message",
    "message_event",
    "session_id_for",
    "user_id_for",
]

APP_LABEL = "adk/app"
USER_LABEL = "adk/user_id"
SESSION_LABEL = "adk/session_id"
_ENCODED = "b32."
_MAX_ID = 128
_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_APP = re.compile(r"[A-Za-z0-9_.-]+")
_MAX_SESSION_ID = 128
# The server's rule for state keys (checked here too for the keys written after an append: see
# _check_shared).
_MAX_STATE_KEY_BYTES = 256
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# A user's state holds the `user:` keys of every app: each under `<app_name>/` (ADK keys user
# state by app and user).
_USER_KEY_SEPARATOR = "/"
T = TypeVar("T")


def user_id_for(user_id: str) -> str:
    """The chatsession user of an ADK user id (see the module docstring)."""
    return _encoded(user_id, "user_id")


def app_id_for(app_name: str) -> str:
    """The chatsession app of an ADK app name, encoded as a user id is."""
    return _encoded(app_name, "app_name")


def _encoded(name: str, field: str) -> str:
    """`name` itself when it is a valid chatsession id that does not start with "b32.", else
    "b32." and its UTF-8 in lowercase base32 without padding: one id per name, never another's."""
    if _ID.fullmatch(name) and not name.startswith(_ENCODED):
        return name
    encoded = _ENCODED + base64.b32encode(name.encode()).decode().lower().rstrip("=")
    if not name or len(encoded) > _MAX_ID:
        raise ValueError(
            f"{field} must be 1-76 bytes of UTF-8 (or 1-128 characters of [A-Za-z0-9_.:-]): {name!r}"
        )
    return encoded


def session_id_for(app_name: str, user_id: str, session_id: str) -> str:
    """The chatsession session id of an ADK session (see the module docstring)."""
    owner = user_id_for(user_id)
    readable = f"{owner}/{app_name}:{session_id}"
    if _APP.fullmatch(app_name) and _ID.fullmatch(session_id) and len(readable) <= _MAX_SESSION_ID:
        return readable
    digest = hashlib.sha256("\0".join((app_name, user_id, session_id)).encode()).digest()
    hashed = f"{owner}/adk-{base64.b32encode(digest).decode().lower()[:26]}"
    if len(hashed) > _MAX_SESSION_ID:
        raise ValueError(f"user_id is too long to name its sessions: {user_id!r}")
    return hashed


class ChatsessionSessionService(BaseSessionService):
    """An ADK session service kept by a chatsession server.

    Connects to `target` with `token` (the caller's bearer token) and `client_options` (the
    other keyword arguments of `chatsession_client.SessionClient`: `tls`, `root_certificates`,
    `timeout`, `retry`, ...), one client per event loop (ADK's `Runner.run` runs each call in
    a loop of its own), or uses `client`, a SessionClient shared with the application (then
    `close()` leaves it open). Sessions are created with `ttl_seconds` and `max_messages`
    (default -1: never expire, keep every message; 0: the server's defaults) and `labels`
    (beside the adapter's own `adk/...` labels). `count_tokens` gives an event's tokens for the
    service's budgets (default: the model's output tokens, else about 4 characters a token).
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        token: str | None = None,
        client: SessionClient | None = None,
        ttl_seconds: int = -1,
        max_messages: int = -1,
        labels: Mapping[str, str] | None = None,
        count_tokens: Callable[[Event], int] | None = None,
        **client_options: Any,
    ) -> None:
        self._clients = _adapters.LoopClients(_adapters.Connection(target, token, client_options), client)
        self._ttl_seconds = ttl_seconds
        self._max_messages = max_messages
        self._labels = dict(labels or {})
        self._count_tokens = count_tokens

    def _client(self) -> SessionClient:
        return self._clients.get()

    async def close(self) -> None:
        """Close the client this service opened for the running loop (not a `client` it was given)."""
        await self._clients.close()

    async def __aenter__(self) -> ChatsessionSessionService:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- BaseSessionService --------------------------------------------------------------------

    @override
    async def create_session(
        self,
        *,
        app_name: str,
        user_id: str,
        state: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> Session:
        adk_id = session_id.strip() if session_id and session_id.strip() else str(uuid.uuid4())
        cs_id = session_id_for(app_name, user_id, adk_id)
        deltas = _split_state(state or {})
        _check_shared(app_name, deltas)
        client = self._client()
        labels = {**self._labels, APP_LABEL: app_name, USER_LABEL: user_id, SESSION_LABEL: adk_id}
        try:
            created = await client.create_session(
                user_id_for(user_id),
                session_id=cs_id,
                app=app_id_for(app_name),
                labels=labels,
                ttl_seconds=self._ttl_seconds,
                max_messages=self._max_messages,
            )
        except AlreadyExistsError as exc:
            raise AdkAlreadyExistsError(f"Session with id {adk_id} already exists.") from exc
        try:
            session_state, user_state, app_state = await asyncio.gather(
                self._write_session_state(cs_id, deltas.session),
                self._write_user_state(app_name, user_id, deltas.user),
                self._write_app_state(app_name, deltas.app),
            )
        except BaseException:
            # A state the server refused (a value past its limits, a full state): no session
            # without the state it was asked for.
            with contextlib.suppress(Exception):
                await client.delete_session(cs_id, allow_missing=True)
            raise
        session = Session(
            id=adk_id,
            app_name=app_name,
            user_id=user_id,
            state=_merge(session_state, user_state, app_state),
            last_update_time=created.last_active.ToMicroseconds() / 1e6,
        )
        session._storage_update_marker = str(created.message_count)
        return session

    @override
    async def get_session(
        self,
        *,
        app_name: str,
        user_id: str,
        session_id: str,
        config: GetSessionConfig | None = None,
    ) -> Session | None:
        adk_id = session_id.strip()
        cs_id = session_id_for(app_name, user_id, adk_id)
        client = self._client()
        try:
            stored, events, session_state, user_state, app_state = await asyncio.gather(
                client.get_session(cs_id),
                self._events(client, cs_id, config or GetSessionConfig()),
                client.get_state(cs_id),
                self._user_state(app_name, user_id),
                self._app_state(app_name),
            )
        except NotFoundError:
            return None
        session = Session(
            id=adk_id,
            app_name=app_name,
            user_id=user_id,
            state=_merge(session_state, user_state, app_state),
            events=events,
            last_update_time=stored.last_active.ToMicroseconds() / 1e6,
        )
        session._storage_update_marker = str(stored.message_count)
        return session

    @override
    async def list_sessions(self, *, app_name: str, user_id: str | None = None) -> ListSessionsResponse:
        client = self._client()
        listed = [s async for s in self._app_sessions(client, app_name, user_id)]
        user_ids = {s.labels[USER_LABEL] for s in listed}
        app_state, *user_states = await _bounded(
            [self._app_state(app_name), *(self._user_state(app_name, u) for u in sorted(user_ids))]
        )
        by_user = dict(zip(sorted(user_ids), user_states, strict=True))
        states = await _bounded([_state_or_none(client, s.session_id) for s in listed])
        sessions = []
        for stored, session_state in zip(listed, states, strict=True):
            if session_state is None:  # deleted since the listing
                continue
            adk_user = stored.labels[USER_LABEL]
            session = Session(
                id=stored.labels[SESSION_LABEL],
                app_name=app_name,
                user_id=adk_user,
                state=_merge(session_state, by_user[adk_user], app_state),
                last_update_time=stored.last_active.ToMicroseconds() / 1e6,
            )
            session._storage_update_marker = str(stored.message_count)
            sessions.append(session)
        # ADK's order: least recently updated first (chatsession lists newest first).
        sessions.sort(key=lambda s: (s.last_update_time, s.user_id, s.id))
        return ListSessionsResponse(sessions=sessions)

    @override
    async def delete_session(self, *, app_name: str, user_id: str, session_id: str) -> None:
        cs_id = session_id_for(app_name, user_id, session_id.strip())
        await self._client().delete_session(cs_id, allow_missing=True)

    @override
    async def get_user_state(self, *, app_name: str, user_id: str) -> dict[str, Any]:
        return await self._user_state(app_name, user_id)

    @override
    async def append_event(self, session: Session, event: Event) -> Event:
        if event.partial:
            return event
        self._apply_temp_state(session, event)
        event = self._trim_temp_delta_state(event)
        deltas = _split_state(event.actions.state_delta if event.actions else {})
        _check_shared(session.app_name, deltas)
        cs_id = session_id_for(session.app_name, session.user_id, session.id)
        marker = session._storage_update_marker
        client = self._client()
        try:
            reply = await client.append(
                cs_id,
                [event_message(event, self._count_tokens)],
                expected_last_seq=int(marker) if marker is not None else None,
                state_delta=deltas.session if deltas.session else None,
            )
        except NotFoundError as exc:
            raise SessionNotFoundError(f"Session {session.id} not found.") from exc
        except SeqMismatchError as exc:
            raise StaleSessionError(
                f"Session {session.id} was modified in storage after this session object was read"
                " (another writer appended to it): get the session again."
            ) from exc
        # After the event, as ADK's database services write them: a retry applies them again,
        # which is harmless (each key is set to its value).
        writes = []
        if deltas.user:
            writes.append(self._write_user_state(session.app_name, session.user_id, deltas.user))
        if deltas.app:
            writes.append(self._write_app_state(session.app_name, deltas.app))
        await asyncio.gather(*writes)
        session.last_update_time = reply.session.last_active.ToMicroseconds() / 1e6
        session._storage_update_marker = str(reply.session.message_count)
        return self._commit_event_to_session(session, event)

    # --- chatsession calls ---------------------------------------------------------------------

    async def _events(self, client: SessionClient, cs_id: str, config: GetSessionConfig) -> list[Event]:
        limit = config.num_recent_events
        if limit == 0:
            return []
        if limit is None:
            messages = [m async for m in client.iter_messages(cs_id, page_size=_adapters.PAGE)]
        else:
            messages = await _newest(client, cs_id, limit)
        events = [message_event(m) for m in messages]
        if config.after_timestamp is not None:
            events = [e for e in events if e.timestamp >= config.after_timestamp]
        return events

    async def _app_sessions(self, client: SessionClient, app_name: str, user_id: str | None) -> Any:
        owner = user_id_for(user_id) if user_id is not None else None
        async for s in client.iter_sessions(owner, app=app_id_for(app_name), page_size=_adapters.PAGE):
            # Sessions of the app that other clients created are not ADK's.
            if s.labels.get(APP_LABEL) == app_name and USER_LABEL in s.labels and SESSION_LABEL in s.labels:
                yield s

    async def _user_state(self, app_name: str, user_id: str) -> dict[str, Any]:
        prefix = app_name + _USER_KEY_SEPARATOR
        state = await self._client().get_state(user_id=user_id_for(user_id))
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}

    async def _write_user_state(
        self, app_name: str, user_id: str, delta: Mapping[str, Any]
    ) -> dict[str, Any]:
        if not delta:
            return await self._user_state(app_name, user_id)
        prefix = app_name + _USER_KEY_SEPARATOR
        state = await self._client().update_state(
            user_id=user_id_for(user_id), values={prefix + k: v for k, v in delta.items()}
        )
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}

    async def _app_state(self, app_name: str) -> dict[str, Any]:
        return await self._client().get_state(app=app_id_for(app_name))

    async def _write_app_state(self, app_name: str, delta: Mapping[str, Any]) -> dict[str, Any]:
        if not delta:
            return await self._app_state(app_name)
        return await self._client().update_state(app=app_id_for(app_name), values=dict(delta))

    async def _write_session_state(self, cs_id: str, delta: Mapping[str, Any]) -> dict[str, Any]:
        if not delta:
            return {}
        return await self._client().update_state(cs_id, dict(delta))


# A listing reads each session's state and each user's: at most this many calls in flight.
_LISTING_CALLS = 32


async def _bounded(calls: Sequence[Awaitable[T]]) -> list[T]:
    """The results of `calls`, in order, with at most _LISTING_CALLS of them running at once."""
    limit = asyncio.Semaphore(_LISTING_CALLS)

    async def one(call: Awaitable[T]) -> T:
        async with limit:
            return await call

    return list(await asyncio.gather(*(one(c) for c in calls)))


async def _state_or_none(client: SessionClient, cs_id: str) -> dict[str, Any] | None:
    try:
        return await client.get_state(cs_id)
    except NotFoundError:
        return None


async def _newest(client: SessionClient, cs_id: str, limit: int) -> list[Message]:
    page = await client.list_messages(cs_id, page_size=min(limit, _adapters.PAGE))
    found = list(page.messages)
    while len(found) < limit and page.has_more and found:
        page = await client.list_messages(
            cs_id, page_size=min(limit - len(found), _adapters.PAGE), before_seq=found[0].seq
        )
        found[:0] = page.messages
    return found


class _Deltas:
    __slots__ = ("app", "session", "user")

    def __init__(self) -> None:
        self.app: dict[str, Any] = {}
        self.user: dict[str, Any] = {}
        self.session: dict[str, Any] = {}


def _split_state(state: Mapping[str, Any]) -> _Deltas:
    """`app:`, `user:` (both without their prefix) and session keys, as JSON values (a value
    that is not JSON as its `str()`, as ADK's database services store it); `temp:` dropped."""
    out = _Deltas()
    for key, value in to_jsonable_python(dict(state), fallback=str).items():
        if key.startswith(State.APP_PREFIX):
            out.app[key.removeprefix(State.APP_PREFIX)] = value
        elif key.startswith(State.USER_PREFIX):
            out.user[key.removeprefix(State.USER_PREFIX)] = value
        elif not key.startswith(State.TEMP_PREFIX):
            out.session[key] = value
    return out


def _check_shared(app_name: str, deltas: _Deltas) -> None:
    """Refuse (ValueError, TypeError) before anything is written a `user:` or `app:` key or value
    the server would refuse: those are written after the event, which would then be stored
    without them. (The session's keys travel with the event and are refused with it.)"""
    keys = [(f"user:{k}", _USER_KEY_SEPARATOR.join((app_name, k))) for k in deltas.user]
    keys += [(f"app:{k}", k) for k in deltas.app]
    for given, stored in keys:
        if not 1 <= len(stored.encode()) <= _MAX_STATE_KEY_BYTES or _CONTROL_CHARACTER.search(stored):
            raise ValueError(
                f"state key {given!r}: stored as {stored!r}, it must be 1-{_MAX_STATE_KEY_BYTES} bytes"
                " of UTF-8 without control characters"
            )
    for value in (*deltas.user.values(), *deltas.app.values()):
        _state.to_value(value)


def _merge(session: Mapping[str, Any], user: Mapping[str, Any], app: Mapping[str, Any]) -> dict[str, Any]:
    """A session's state as ADK shows it: its own keys, then `app:` and `user:` keys prefixed."""
    merged = dict(session)
    merged.update({State.APP_PREFIX + k: v for k, v in app.items()})
    merged.update({State.USER_PREFIX + k: v for k, v in user.items()})
    return merged


# --- Events as messages ------------------------------------------------------------------------


def event_message(event: Event, count_tokens: Callable[[Event], int] | None = None) -> Message:
    """The chatsession message that stores `event` (its JSON form in the payload); see the
    module docstring for its role, content, tool calls and tokens."""
    parts: Sequence[types.Part] = (event.content.parts or []) if event.content else []
    calls = [p.function_call for p in parts if p.function_call]
    responses = [p.function_response for p in parts if p.function_response]
    if event.author == "user" and not responses:
        role = "user"
    elif responses and not calls:
        role = "tool"
    else:
        role = "assistant"
    text = _text(parts) or f"[{event.author} event]"
    if count_tokens is not None:
        tokens = count_tokens(event)
    elif event.usage_metadata and event.usage_metadata.candidates_token_count:
        tokens = event.usage_metadata.candidates_token_count
    else:
        tokens = _adapters.estimate_tokens(text)
    return message(
        role,
        text,
        tokens=tokens,
        name=event.author[:256],
        tool_calls=[(c.id or "", c.name or "", json.dumps(c.args or {}, ensure_ascii=False)) for c in calls]
        if role == "assistant"
        else (),
        tool_call_id=(responses[0].id or "") if role == "tool" and len(responses) == 1 else "",
        metadata={"adk.event_id": event.id, "adk.invocation_id": event.invocation_id},
        payload=event.model_dump(mode="json"),
        created_at=event.timestamp,
    )


def message_event(stored: Message) -> Event:
    """The ADK event a message stores; a message another client appended (no payload) as an
    event of its role's author with its text."""
    payload = payload_of(stored)
    if isinstance(payload, dict):
        return Event.model_validate_json(json.dumps(payload))
    author = "user" if stored.role == session_pb2.ROLE_USER else (stored.name or "model")
    return Event(
        author=author,
        invocation_id="",
        content=types.Content(
            role="user" if stored.role == session_pb2.ROLE_USER else "model",
            parts=[types.Part(text=stored.content)],
        ),
        timestamp=stored.created_at.ToMicroseconds() / 1e6,
    )


def _text(parts: Iterable[types.Part]) -> str:
    out: list[str] = []
    for part in parts:
        if part.text is not None and not part.thought:
            out.append(part.text)
        elif part.function_call:
            out.append(f"[function_call {part.function_call.name}]")
        elif part.function_response:
            out.append(f"[function_response {part.function_response.name}]")
        elif part.inline_data:
            out.append(f"[{part.inline_data.mime_type or 'inline_data'}]")
        elif part.file_data:
            out.append(f"[{part.file_data.mime_type or 'file_data'}]")
    return "\n".join(t for t in out if t)
