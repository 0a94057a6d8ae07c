"""SessionClient: a small typed async client over the generated stubs.

async with SessionClient("localhost:50051") as client:
    session = await client.create_session("alice", title="Trip planning")
    await client.append(session.session_id, [user("Hi!", tokens=3)])
    page = await client.list_messages(session.session_id, page_size=20)

Over TLS, as a caller of a server with --auth-tokens-file:

    SessionClient("chat.internal:50051", token="...", root_certificates=ca_pem)

The blocking twin is chatsession_client.sync.SyncSessionClient: the same methods, built from the
same requests (chatsession_client._calls) and the same retry decisions (chatsession_client.retry).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import grpc

from chatsession.v1 import session_service_pb2, session_service_pb2_grpc
from chatsession_client import _calls, _state
from chatsession_client._calls import Message, Session
from chatsession_client.errors import ChatSessionError, from_rpc_error
from chatsession_client.retry import Retry

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class SessionClient:
    """Async client for chatsession.v1.SessionService. Errors are ChatSessionError subclasses.

    `token` is sent as `authorization: Bearer <token>` on every call. TLS is on with `tls=True`
    (the system's root certificates), with any of `root_certificates` (PEM of the CA that signed the
    server's certificate), `private_key` and `certificate_chain` (PEM of a client certificate, for
    mTLS), or with ready-made `credentials`. Without any of them the channel is plaintext.
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        channel: grpc.aio.Channel | None = None,
        timeout: float | None = 10.0,
        retry: Retry | None = None,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        credentials = _calls.channel_credentials(
            tls=tls,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            credentials=credentials,
            channel_given=channel is not None,
        )
        self._own_channel = channel is None
        if channel is None:
            channel = (
                grpc.aio.insecure_channel(target)
                if credentials is None
                else grpc.aio.secure_channel(target, credentials)
            )
        self._channel = channel
        self._stub = session_service_pb2_grpc.SessionServiceStub(self._channel)
        self._timeout = timeout
        self._retry = retry or Retry()
        self._metadata = _calls.call_metadata(token)

    async def __aenter__(self) -> SessionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_channel:
            await self._channel.close()

    async def _call(
        self, rpc: Callable[..., Awaitable[Resp]], request: Req, *, retry_request: Req | None = None
    ) -> Resp:
        """One call with retries; every attempt sends `request` (the same request_id), or
        `retry_request` after the first when given."""
        backoff = self._retry.start(time.monotonic())
        while True:
            try:
                return await rpc(
                    request, timeout=backoff.timeout(self._timeout, time.monotonic()), metadata=self._metadata
                )
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc)
                sleep = backoff.next_sleep(error, time.monotonic())
                if sleep is None:
                    raise error from exc
            await asyncio.sleep(sleep)
            if retry_request is not None:
                request = retry_request

    async def create_session(
        self,
        user_id: str,
        *,
        session_id: str = "",
        model: str = "",
        title: str = "",
        labels: Mapping[str, str] | None = None,
        ttl_seconds: int = 0,
        max_messages: int = 0,
        request_id: str | None = None,
        app: str = "",
    ) -> Session:
        """Create a session. A request_id is generated when not given, so retries are safe.
        Label keys are 1-128 characters from [A-Za-z0-9._/-], never `forked_from` (ForkSession's).
        `ttl_seconds`: 0 the server's default, -1 never expires; `max_messages`: 0 the server's
        default, -1 keeps every message. `app`: the app (namespace) the session belongs to, for
        good (README "Apps")."""
        request = _calls.create_session_request(
            user_id,
            session_id=session_id,
            model=model,
            title=title,
            labels=labels,
            ttl_seconds=ttl_seconds,
            max_messages=max_messages,
            request_id=request_id,
            app=app,
        )
        return (await self._call(self._stub.CreateSession, request)).session

    async def get_session(self, session_id: str, *, read_mask: Iterable[str] | None = None) -> Session:
        """The session; with `read_mask` (e.g. ["token_count"]) only those fields, read alone."""
        request = _calls.get_session_request(session_id, read_mask=read_mask)
        return (await self._call(self._stub.GetSession, request)).session

    async def update_session(
        self,
        session_id: str,
        *,
        title: str | None = None,
        model: str | None = None,
        labels: Mapping[str, str] | None = None,
        ttl_seconds: int | None = None,
        max_messages: int | None = None,
    ) -> Session:
        """Change the given fields only (an update mask is built from the arguments that are not None).
        `labels` replaces them all but a fork's `forked_from` (which stays) and must not name it."""
        request = _calls.update_session_request(
            session_id,
            title=title,
            model=model,
            labels=labels,
            ttl_seconds=ttl_seconds,
            max_messages=max_messages,
        )
        return (await self._call(self._stub.UpdateSession, request)).session

    async def delete_session(self, session_id: str, *, allow_missing: bool = False) -> None:
        """Delete a session. A retry that finds it gone (deleted by the first attempt) succeeds."""
        first, retry = _calls.delete_session_requests(session_id, allow_missing)
        await self._call(self._stub.DeleteSession, first, retry_request=retry)

    async def list_sessions(
        self, user_id: str | None = None, *, app: str | None = None, page_size: int = 0, page_token: str = ""
    ) -> session_service_pb2.ListSessionsResponse:
        """One page of the user's live sessions, most recently active first: of the app `app`
        only, if given; without `user_id`, every user's sessions of the app `app`."""
        request = _calls.list_sessions_request(user_id, app=app, page_size=page_size, page_token=page_token)
        return await self._call(self._stub.ListSessions, request)

    async def iter_sessions(
        self, user_id: str | None = None, *, app: str | None = None, page_size: int = 0
    ) -> AsyncIterator[Session]:
        """Every live session of the user (of `app` only, if given; without `user_id`, of every
        user of `app`), most recently active first, fetched page by page."""
        token: str | None = ""
        while token is not None:
            page = await self.list_sessions(user_id, app=app, page_size=page_size, page_token=token)
            for session in page.sessions:
                yield session
            token = _calls.next_page_token(page)

    async def append(
        self,
        session_id: str,
        messages: Iterable[Message],
        *,
        request_id: str | None = None,
        expected_last_seq: int | None = None,
        state_delta: Mapping[str, Any] | _state.StateDelta | None = None,
    ) -> session_service_pb2.AppendMessagesResponse:
        """Append messages. A request_id is generated when not given, so a retry never duplicates.
        `state_delta` changes the session's state in the same step: a mapping sets those keys
        (any JSON-able values), a `state_delta(values, remove=...)` also removes keys."""
        request = _calls.append_request(
            session_id, messages, request_id=request_id, expected_last_seq=expected_last_seq
        )
        if state_delta is not None:
            request.state_delta.CopyFrom(_state.as_state_delta(state_delta))
        return await self._call(self._stub.AppendMessages, request)

    async def list_messages(
        self,
        session_id: str,
        *,
        page_size: int = 0,
        after_seq: int | None = None,
        before_seq: int | None = None,
    ) -> session_service_pb2.ListMessagesResponse:
        """One page: the newest messages, or those after `after_seq` / before `before_seq` (ascending seq)."""
        request = _calls.list_messages_request(
            session_id, page_size=page_size, after_seq=after_seq, before_seq=before_seq
        )
        return await self._call(self._stub.ListMessages, request)

    async def iter_messages(
        self, session_id: str, *, after_seq: int = 0, page_size: int = 0
    ) -> AsyncIterator[Message]:
        """Every stored message after `after_seq`, oldest first, fetched page by page."""
        cursor: int | None = after_seq
        while cursor is not None:
            page = await self.list_messages(session_id, page_size=page_size, after_seq=cursor)
            for m in page.messages:
                yield m
            cursor = _calls.next_after_seq(page)

    async def fork_session(
        self,
        session_id: str,
        *,
        at_seq: int | None = None,
        new_session_id: str = "",
        request_id: str | None = None,
    ) -> session_service_pb2.ForkSessionResponse:
        """Copy a session (its metadata, pinned prompt, summary and messages up to `at_seq`, or all
        of them) into a new session of the same user. A request_id is generated when not given, so
        a retry returns the same fork (`replayed`)."""
        request = _calls.fork_session_request(
            session_id, at_seq=at_seq, new_session_id=new_session_id, request_id=request_id
        )
        return await self._call(self._stub.ForkSession, request)

    async def get_user_usage(self, user_id: str) -> session_service_pb2.GetUserUsageResponse:
        """Messages, tokens and sessions created by the user: in total, per model, per UTC day."""
        request = _calls.get_user_usage_request(user_id)
        return await self._call(self._stub.GetUserUsage, request)

    async def watch(
        self,
        session_id: str,
        *,
        after_seq: int | None = None,
        include_heartbeats: bool = False,
    ) -> AsyncIterator[session_service_pb2.WatchMessagesResponse]:
        """Follow a session live: events with a `message` (in seq order, each once), a
        `history_trimmed`, a `compacted` or a `cleared`. `after_seq=None` starts with new
        messages only, 0 with the oldest kept.

        When the stream breaks with a code the retry policy retries (UNAVAILABLE: a server
        shutting down, a network blip; DEADLINE_EXCEEDED: Valkey slow, as in a failover) it
        reconnects by itself and resumes after the last seq it delivered, retrying with backoff
        for up to the retry policy's deadline since the last event. Other errors (NOT_FOUND when
        the session is deleted or expires) end the iteration by raising.
        """
        cursor = _calls.WatchCursor(after_seq)
        backoff = self._retry.start(time.monotonic())
        while True:
            call = self._stub.WatchMessages(cursor.request(session_id), metadata=self._metadata)
            try:
                async for event in call:
                    backoff.restart(time.monotonic())
                    if cursor.advance(event, include_heartbeats):
                        yield event
                return
            except grpc.aio.AioRpcError as exc:
                error: ChatSessionError = from_rpc_error(exc)
                sleep = backoff.next_sleep(error, time.monotonic())
                if sleep is None:
                    raise error from exc
            finally:
                call.cancel()
            await asyncio.sleep(sleep)

    async def get_context(
        self, session_id: str, *, max_tokens: int = 0, max_messages: int = 0
    ) -> session_service_pb2.GetContextResponse:
        """What a prompt is built from: the pinned system prompt, the summary, then the newest
        messages that fit `max_tokens` (0: no limit) and `max_messages` (0: no limit)."""
        request = _calls.get_context_request(session_id, max_tokens=max_tokens, max_messages=max_messages)
        return await self._call(self._stub.GetContext, request)

    async def compact_messages(
        self, session_id: str, up_to_seq: int, summary: Message, *, request_id: str | None = None
    ) -> session_service_pb2.CompactMessagesResponse:
        """Replace the messages up to `up_to_seq` (after the pinned prompt) with `summary` (a
        system or assistant message). A request_id is generated when not given, so retries are safe."""
        request = _calls.compact_messages_request(session_id, up_to_seq, summary, request_id=request_id)
        return await self._call(self._stub.CompactMessages, request)

    async def clear_messages(
        self, session_id: str, *, keep_system_prompt: bool = False, request_id: str | None = None
    ) -> Session:
        """Empty the history and the summary; the session, its counters and expiry stay. A
        request_id is generated when not given, so a retry does not empty what was appended since."""
        request = _calls.clear_messages_request(
            session_id, keep_system_prompt=keep_system_prompt, request_id=request_id
        )
        return (await self._call(self._stub.ClearMessages, request)).session

    async def get_state(
        self,
        session_id: str | None = None,
        *,
        user_id: str | None = None,
        app: str | None = None,
        keys: Iterable[str] | None = None,
    ) -> dict[str, Any]:
        """A session's state, or with `user_id=` the state every session of that user shares (with
        `app=`, every session of that app), as Python values; with `keys`, only those it holds."""
        request = _state.get_state_request(session_id, user_id, keys, app)
        return _state.state_of((await self._call(self._stub.GetState, request)).state)

    async def update_state(
        self,
        session_id: str | None = None,
        values: Mapping[str, Any] | None = None,
        *,
        remove: Iterable[str] = (),
        user_id: str | None = None,
        app: str | None = None,
    ) -> dict[str, Any]:
        """Set `values` (key -> any JSON-able value) and remove the keys `remove` in one atomic
        step, in a session's state, a user's (`user_id=`) or an app's (`app=`); returns the whole
        state after it. Safe to retry: the values are absolute."""
        request = _state.update_state_request(session_id, user_id, values, remove, app)
        return _state.state_of((await self._call(self._stub.UpdateState, request)).state)

    async def truncate_messages(
        self,
        session_id: str,
        after_seq: int | None = None,
        *,
        pop_count: int = 0,
        expected_last_seq: int | None = None,
        request_id: str | None = None,
        return_removed: bool = False,
    ) -> session_service_pb2.TruncateMessagesResponse:
        """Remove the newest messages: those with seq > `after_seq` (0 removes everything, the
        pinned prompt too), or else the newest `pop_count` stored. Seqs are never reused: the next
        append still gets `message_count + 1`. `expected_last_seq`: only if the session's
        message_count is still this (else SeqMismatchError, nothing removed). `return_removed`:
        the removed messages come back in `removed_messages` (RemovedTooLargeError, nothing
        removed, past 1000 messages or about 3 MiB). A request_id is generated when not given,
        so a retry removes nothing more (not even messages appended since)."""
        request = _calls.truncate_messages_request(
            session_id,
            after_seq,
            pop_count=pop_count,
            expected_last_seq=expected_last_seq,
            request_id=request_id,
            return_removed=return_removed,
        )
        return await self._call(self._stub.TruncateMessages, request)

    async def pop_message(self, session_id: str, *, request_id: str | None = None) -> Message | None:
        """Remove the session's newest stored message and return it (None when it stores none),
        in one call. Raises PoppedMessageLostError in the rare case that an attempt of this call
        popped the message but its answer was lost (the retry finds the pop done)."""
        request = _calls.truncate_messages_request(
            session_id, pop_count=1, return_removed=True, request_id=request_id
        )
        return _calls.popped_message(session_id, await self._call(self._stub.TruncateMessages, request))
