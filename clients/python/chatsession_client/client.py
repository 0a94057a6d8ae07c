"""SessionClient: a small typed async client over the generated stubs.

async with SessionClient("localhost:50051") as client:
    session = await client.create_session("alice", title="Trip planning")
    await client.append(session.session_id, [user("Hi!", tokens=3)])
    page = await client.list_messages(session.session_id, page_size=20)

Over TLS, as a caller of a server with --auth-tokens-file:

    SessionClient("chat.internal:50051", token="...", root_certificates=ca_pem)
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf import field_mask_pb2

from chatsession.v1 import session_pb2, session_service_pb2, session_service_pb2_grpc
from chatsession_client.errors import from_rpc_error
from chatsession_client.retry import Retry

T = TypeVar("T")
Session = session_pb2.Session
Message = session_pb2.Message

_ROLES = {
    "system": session_pb2.ROLE_SYSTEM,
    "user": session_pb2.ROLE_USER,
    "assistant": session_pb2.ROLE_ASSISTANT,
    "tool": session_pb2.ROLE_TOOL,
}


def message(
    role: str | int,
    content: str,
    *,
    tokens: int = 0,
    name: str = "",
    metadata: Mapping[str, str] | None = None,
    tool_calls: Iterable[tuple[str, str, str]] = (),
    tool_call_id: str = "",
) -> Message:
    """Build a Message; `role` is "system"/"user"/"assistant"/"tool" or a Role value.
    `tool_calls` are (id, name, arguments) triples."""
    return Message(
        role=_ROLES[role] if isinstance(role, str) else role,  # type: ignore[arg-type]
        content=content,
        tokens=tokens,
        name=name,
        metadata=dict(metadata or {}),
        tool_calls=[session_pb2.ToolCall(id=i, name=n, arguments=a) for i, n, a in tool_calls],
        tool_call_id=tool_call_id,
    )


def system(content: str, **kw: Any) -> Message:
    return message("system", content, **kw)


def user(content: str, **kw: Any) -> Message:
    return message("user", content, **kw)


def assistant(content: str, **kw: Any) -> Message:
    return message("assistant", content, **kw)


def tool(content: str, **kw: Any) -> Message:
    return message("tool", content, **kw)


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
        pem_given = root_certificates is not None or private_key is not None or certificate_chain is not None
        if credentials is not None and pem_given:
            raise ValueError("pass either credentials or root_certificates/private_key/certificate_chain")
        if credentials is None and (tls or pem_given):
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
        if channel is not None and credentials is not None:
            raise ValueError("TLS options configure the client's own channel: not with channel=")
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
        # Plain metadata rather than call credentials: those need TLS, and a token over plaintext
        # to a server on the same host is a normal development setup.
        self._metadata: tuple[tuple[str, str], ...] = (
            () if token is None else (("authorization", f"Bearer {token}"),)
        )

    async def __aenter__(self) -> SessionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_channel:
            await self._channel.close()

    async def _call(self, rpc: Callable[..., Awaitable[T]], request: Any) -> T:
        async def attempt(timeout: float | None) -> T:
            try:
                return await rpc(request, timeout=timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc) from exc

        return await self._retry.run(attempt, self._timeout)

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
    ) -> Session:
        """Create a session. A request_id is generated when not given, so retries are safe."""
        request = session_service_pb2.CreateSessionRequest(
            session_id=session_id,
            user_id=user_id,
            model=model,
            title=title,
            labels=dict(labels or {}),
            ttl_seconds=ttl_seconds,
            max_messages=max_messages,
            request_id=request_id if request_id is not None else uuid.uuid4().hex,
        )
        return (await self._call(self._stub.CreateSession, request)).session

    async def get_session(self, session_id: str, *, read_mask: Iterable[str] | None = None) -> Session:
        """The session; with `read_mask` (e.g. ["token_count"]) only those fields, read alone."""
        request = session_service_pb2.GetSessionRequest(session_id=session_id)
        if read_mask is not None:
            request.read_mask.paths.extend(read_mask)
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
        """Change the given fields only (an update mask is built from the arguments that are not None)."""
        session = Session(session_id=session_id)
        paths: list[str] = []
        if title is not None:
            session.title = title
            paths.append("title")
        if model is not None:
            session.model = model
            paths.append("model")
        if ttl_seconds is not None:
            session.ttl_seconds = ttl_seconds
            paths.append("ttl_seconds")
        if max_messages is not None:
            session.max_messages = max_messages
            paths.append("max_messages")
        if labels is not None:
            session.labels.update(labels)
            paths.append("labels")
        request = session_service_pb2.UpdateSessionRequest(
            session=session, update_mask=field_mask_pb2.FieldMask(paths=paths)
        )
        return (await self._call(self._stub.UpdateSession, request)).session

    async def delete_session(self, session_id: str, *, allow_missing: bool = False) -> None:
        """Delete a session. A retry that finds it gone (deleted by the first attempt) succeeds."""
        request = session_service_pb2.DeleteSessionRequest(session_id=session_id, allow_missing=allow_missing)
        attempts = 0

        async def once(
            req: session_service_pb2.DeleteSessionRequest, **call: Any
        ) -> session_service_pb2.DeleteSessionResponse:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                req = session_service_pb2.DeleteSessionRequest(session_id=session_id, allow_missing=True)
            return await self._stub.DeleteSession(req, **call)

        await self._call(once, request)

    async def list_sessions_page(
        self, user_id: str, *, page_size: int = 0, page_token: str = ""
    ) -> session_service_pb2.ListSessionsResponse:
        request = session_service_pb2.ListSessionsRequest(
            user_id=user_id, page_size=page_size, page_token=page_token
        )
        return await self._call(self._stub.ListSessions, request)

    async def list_sessions(self, user_id: str, *, page_size: int = 0) -> AsyncIterator[Session]:
        """Every live session of the user, most recently active first, fetched page by page."""
        token = ""
        while True:
            page = await self.list_sessions_page(user_id, page_size=page_size, page_token=token)
            for session in page.sessions:
                yield session
            token = page.next_page_token
            if not token:
                return

    async def append(
        self,
        session_id: str,
        messages: Iterable[Message],
        *,
        request_id: str | None = None,
        expected_last_seq: int | None = None,
    ) -> session_service_pb2.AppendMessagesResponse:
        """Append messages. A request_id is generated when not given, so a retry never duplicates."""
        request = session_service_pb2.AppendMessagesRequest(
            session_id=session_id,
            messages=list(messages),
            request_id=request_id if request_id is not None else uuid.uuid4().hex,
        )
        if expected_last_seq is not None:
            request.expected_last_seq = expected_last_seq
        return await self._call(self._stub.AppendMessages, request)

    async def list_messages(
        self,
        session_id: str,
        *,
        page_size: int = 0,
        after_seq: int | None = None,
        before_seq: int | None = None,
    ) -> session_service_pb2.ListMessagesResponse:
        """The newest messages, or those after `after_seq` / before `before_seq` (ascending seq)."""
        request = session_service_pb2.ListMessagesRequest(session_id=session_id, page_size=page_size)
        if after_seq is not None:
            request.after_seq = after_seq
        if before_seq is not None:
            request.before_seq = before_seq
        return await self._call(self._stub.ListMessages, request)

    async def iter_messages(
        self, session_id: str, *, after_seq: int = 0, page_size: int = 0
    ) -> AsyncIterator[Message]:
        """Every stored message after `after_seq`, oldest first, fetched page by page."""
        while True:
            page = await self.list_messages(session_id, page_size=page_size, after_seq=after_seq)
            for m in page.messages:
                yield m
            if not page.has_more or not page.messages:
                return
            after_seq = page.messages[-1].seq

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
        request = session_service_pb2.ForkSessionRequest(
            session_id=session_id,
            new_session_id=new_session_id,
            request_id=request_id if request_id is not None else uuid.uuid4().hex,
        )
        if at_seq is not None:
            request.at_seq = at_seq
        return await self._call(self._stub.ForkSession, request)

    async def get_user_usage(self, user_id: str) -> session_service_pb2.GetUserUsageResponse:
        """Messages, tokens and sessions created by the user: in total, per model, per UTC day."""
        request = session_service_pb2.GetUserUsageRequest(user_id=user_id)
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
        cursor = after_seq
        backoff = self._retry.initial_backoff
        last_progress = time.monotonic()
        while True:
            request = session_service_pb2.WatchMessagesRequest(session_id=session_id)
            if cursor is not None:
                request.after_seq = cursor
            call = self._stub.WatchMessages(request, metadata=self._metadata)
            try:
                async for event in call:
                    last_progress = time.monotonic()
                    backoff = self._retry.initial_backoff
                    kind = event.WhichOneof("event")
                    if kind == "message":
                        cursor = event.message.seq
                    elif kind == "history_trimmed":
                        cursor = event.history_trimmed.last_missing_seq
                    elif kind == "compacted":
                        last = event.compacted.summarizes.last_seq
                        cursor = last if cursor is None else max(cursor, last)
                    elif kind == "cleared":
                        last = event.cleared.last_seq
                        cursor = last if cursor is None else max(cursor, last)
                    elif kind == "heartbeat":
                        cursor = (
                            event.heartbeat.last_seq
                            if cursor is None
                            else max(cursor, event.heartbeat.last_seq)
                        )
                        if not include_heartbeats:
                            continue
                    yield event
                return
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc)
                # The retry policy's codes (UNAVAILABLE, DEADLINE_EXCEEDED by default): a watch is a
                # read, and resuming from the cursor never repeats nor loses a message.
                if (
                    error.code not in self._retry.codes
                    or time.monotonic() - last_progress > self._retry.deadline
                ):
                    raise error from exc
            finally:
                call.cancel()
            await asyncio.sleep(random.uniform(0, backoff))
            backoff = min(backoff * self._retry.multiplier, self._retry.max_backoff)

    async def get_context(
        self, session_id: str, *, max_tokens: int = 0, max_messages: int = 0
    ) -> session_service_pb2.GetContextResponse:
        """What a prompt is built from: the pinned system prompt, the summary, then the newest
        messages that fit `max_tokens` (0: no limit) and `max_messages` (0: no limit)."""
        request = session_service_pb2.GetContextRequest(
            session_id=session_id, max_tokens=max_tokens, max_messages=max_messages
        )
        return await self._call(self._stub.GetContext, request)

    async def compact_messages(
        self, session_id: str, up_to_seq: int, summary: Message, *, request_id: str | None = None
    ) -> session_service_pb2.CompactMessagesResponse:
        """Replace the messages up to `up_to_seq` (after the pinned prompt) with `summary` (a
        system or assistant message). A request_id is generated when not given, so retries are safe."""
        request = session_service_pb2.CompactMessagesRequest(
            session_id=session_id,
            up_to_seq=up_to_seq,
            summary=summary,
            request_id=request_id if request_id is not None else uuid.uuid4().hex,
        )
        return await self._call(self._stub.CompactMessages, request)

    async def clear_messages(self, session_id: str, *, keep_system_prompt: bool = False) -> Session:
        """Empty the history and the summary; the session, its counters and expiry stay."""
        request = session_service_pb2.ClearMessagesRequest(
            session_id=session_id, keep_system_prompt=keep_system_prompt
        )
        return (await self._call(self._stub.ClearMessages, request)).session
