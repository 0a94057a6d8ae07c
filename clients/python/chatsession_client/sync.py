"""SyncSessionClient: the blocking twin of the async SessionClient, for code without an event
loop (Flask, Django, worker processes, scripts).

with SyncSessionClient("localhost:50051") as client:
    session = client.create_session("alice", title="Trip planning")
    client.append(session.session_id, [user("Hi!", tokens=3)])
    for event in client.watch(session.session_id, after_seq=0):
        print(event.message.seq, event.message.content)

Same methods, arguments, exceptions and Retry as SessionClient: requests are built by
chatsession_client._calls and retry decisions made by chatsession_client.retry, so each
method here mirrors its async twin line for line with the awaits taken out. A client is safe
to share between threads (gRPC channels are).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message as ProtoMessage

from chatsession.v1 import session_service_pb2 as pb
from chatsession_client import _calls, _state
from chatsession_client._calls import Message, Session
from chatsession_client.errors import ChatSessionError, from_rpc_error
from chatsession_client.retry import Retry

Req = TypeVar("Req", bound=ProtoMessage)
Resp = TypeVar("Resp", bound=ProtoMessage)

_SERVICE = "/chatsession.v1.SessionService/"


def _unary(
    channel: grpc.Channel, name: str, request: type[Req], response: type[Resp]
) -> grpc.UnaryUnaryMultiCallable[Req, Resp]:
    return channel.unary_unary(
        _SERVICE + name,
        request_serializer=request.SerializeToString,
        response_deserializer=response.FromString,
    )


class _BlockingStub:
    """The service's methods as blocking callables. (The generated stub would work on a blocking
    channel too, but its .pyi types it for grpc.aio only.) A new RPC is one line here."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.CreateSession = _unary(
            channel, "CreateSession", pb.CreateSessionRequest, pb.CreateSessionResponse
        )
        self.GetSession = _unary(channel, "GetSession", pb.GetSessionRequest, pb.GetSessionResponse)
        self.UpdateSession = _unary(
            channel, "UpdateSession", pb.UpdateSessionRequest, pb.UpdateSessionResponse
        )
        self.DeleteSession = _unary(
            channel, "DeleteSession", pb.DeleteSessionRequest, pb.DeleteSessionResponse
        )
        self.ListSessions = _unary(channel, "ListSessions", pb.ListSessionsRequest, pb.ListSessionsResponse)
        self.AppendMessages = _unary(
            channel, "AppendMessages", pb.AppendMessagesRequest, pb.AppendMessagesResponse
        )
        self.ListMessages = _unary(channel, "ListMessages", pb.ListMessagesRequest, pb.ListMessagesResponse)
        self.ForkSession = _unary(channel, "ForkSession", pb.ForkSessionRequest, pb.ForkSessionResponse)
        self.GetUserUsage = _unary(channel, "GetUserUsage", pb.GetUserUsageRequest, pb.GetUserUsageResponse)
        self.GetContext = _unary(channel, "GetContext", pb.GetContextRequest, pb.GetContextResponse)
        self.CompactMessages = _unary(
            channel, "CompactMessages", pb.CompactMessagesRequest, pb.CompactMessagesResponse
        )
        self.ClearMessages = _unary(
            channel, "ClearMessages", pb.ClearMessagesRequest, pb.ClearMessagesResponse
        )
        self.GetState = _unary(channel, "GetState", pb.GetStateRequest, pb.GetStateResponse)
        self.UpdateState = _unary(channel, "UpdateState", pb.UpdateStateRequest, pb.UpdateStateResponse)
        self.TruncateMessages = _unary(
            channel, "TruncateMessages", pb.TruncateMessagesRequest, pb.TruncateMessagesResponse
        )
        self.WatchMessages: grpc.UnaryStreamMultiCallable[
            pb.WatchMessagesRequest, pb.WatchMessagesResponse
        ] = channel.unary_stream(
            _SERVICE + "WatchMessages",
            request_serializer=pb.WatchMessagesRequest.SerializeToString,
            response_deserializer=pb.WatchMessagesResponse.FromString,
        )


class SyncSessionClient:
    """Blocking client for chatsession.v1.SessionService; the options are SessionClient's.

    `sleep` and `clock` are what the retries wait with and measure the deadline by (tests pass
    their own, to check the waits without waiting).
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        channel: grpc.Channel | None = None,
        timeout: float | None = 10.0,
        retry: Retry | None = None,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
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
                grpc.insecure_channel(target)
                if credentials is None
                else grpc.secure_channel(target, credentials)
            )
        self._channel = channel
        self._stub = _BlockingStub(self._channel)
        self._timeout = timeout
        self._retry = retry or Retry()
        self._metadata = _calls.call_metadata(token)
        self._sleep = sleep
        self._clock = clock

    def __enter__(self) -> SyncSessionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own_channel:
            self._channel.close()

    def _call(
        self, rpc: grpc.UnaryUnaryMultiCallable[Req, Resp], request: Req, *, retry_request: Req | None = None
    ) -> Resp:
        """One call with retries; every attempt sends `request` (the same request_id), or
        `retry_request` after the first when given."""
        backoff = self._retry.start(self._clock())
        while True:
            try:
                return rpc(
                    request, timeout=backoff.timeout(self._timeout, self._clock()), metadata=self._metadata
                )
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                sleep = backoff.next_sleep(error, self._clock())
                if sleep is None:
                    raise error from exc
            self._sleep(sleep)
            if retry_request is not None:
                request = retry_request

    def create_session(
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
        return self._call(self._stub.CreateSession, request).session

    def get_session(self, session_id: str, *, read_mask: Iterable[str] | None = None) -> Session:
        """The session; with `read_mask` (e.g. ["token_count"]) only those fields, read alone."""
        request = _calls.get_session_request(session_id, read_mask=read_mask)
        return self._call(self._stub.GetSession, request).session

    def update_session(
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
        return self._call(self._stub.UpdateSession, request).session

    def delete_session(self, session_id: str, *, allow_missing: bool = False) -> None:
        """Delete a session. A retry that finds it gone (deleted by the first attempt) succeeds."""
        first, retry = _calls.delete_session_requests(session_id, allow_missing)
        self._call(self._stub.DeleteSession, first, retry_request=retry)

    def list_sessions(
        self, user_id: str | None = None, *, app: str | None = None, page_size: int = 0, page_token: str = ""
    ) -> pb.ListSessionsResponse:
        """One page of the user's live sessions, most recently active first: of the app `app`
        only, if given; without `user_id`, every user's sessions of the app `app`."""
        request = _calls.list_sessions_request(user_id, app=app, page_size=page_size, page_token=page_token)
        return self._call(self._stub.ListSessions, request)

    def iter_sessions(
        self, user_id: str | None = None, *, app: str | None = None, page_size: int = 0
    ) -> Iterator[Session]:
        """Every live session of the user (of `app` only, if given; without `user_id`, of every
        user of `app`), most recently active first, fetched page by page."""
        token: str | None = ""
        while token is not None:
            page = self.list_sessions(user_id, app=app, page_size=page_size, page_token=token)
            yield from page.sessions
            token = _calls.next_page_token(page)

    def append(
        self,
        session_id: str,
        messages: Iterable[Message],
        *,
        request_id: str | None = None,
        expected_last_seq: int | None = None,
        state_delta: Mapping[str, Any] | _state.StateDelta | None = None,
    ) -> pb.AppendMessagesResponse:
        """Append messages. A request_id is generated when not given, so a retry never duplicates.
        `state_delta` changes the session's state in the same step: a mapping sets those keys
        (any JSON-able values), a `state_delta(values, remove=...)` also removes keys."""
        request = _calls.append_request(
            session_id, messages, request_id=request_id, expected_last_seq=expected_last_seq
        )
        if state_delta is not None:
            request.state_delta.CopyFrom(_state.as_state_delta(state_delta))
        return self._call(self._stub.AppendMessages, request)

    def list_messages(
        self,
        session_id: str,
        *,
        page_size: int = 0,
        after_seq: int | None = None,
        before_seq: int | None = None,
    ) -> pb.ListMessagesResponse:
        """One page: the newest messages, or those after `after_seq` / before `before_seq` (ascending seq)."""
        request = _calls.list_messages_request(
            session_id, page_size=page_size, after_seq=after_seq, before_seq=before_seq
        )
        return self._call(self._stub.ListMessages, request)

    def iter_messages(self, session_id: str, *, after_seq: int = 0, page_size: int = 0) -> Iterator[Message]:
        """Every stored message after `after_seq`, oldest first, fetched page by page."""
        cursor: int | None = after_seq
        while cursor is not None:
            page = self.list_messages(session_id, page_size=page_size, after_seq=cursor)
            yield from page.messages
            cursor = _calls.next_after_seq(page)

    def fork_session(
        self,
        session_id: str,
        *,
        at_seq: int | None = None,
        new_session_id: str = "",
        request_id: str | None = None,
    ) -> pb.ForkSessionResponse:
        """Copy a session (its metadata, pinned prompt, summary and messages up to `at_seq`, or all
        of them) into a new session of the same user. A request_id is generated when not given, so
        a retry returns the same fork (`replayed`)."""
        request = _calls.fork_session_request(
            session_id, at_seq=at_seq, new_session_id=new_session_id, request_id=request_id
        )
        return self._call(self._stub.ForkSession, request)

    def get_user_usage(self, user_id: str) -> pb.GetUserUsageResponse:
        """Messages, tokens and sessions created by the user: in total, per model, per UTC day."""
        request = _calls.get_user_usage_request(user_id)
        return self._call(self._stub.GetUserUsage, request)

    def watch(
        self,
        session_id: str,
        *,
        after_seq: int | None = None,
        include_heartbeats: bool = False,
    ) -> Iterator[pb.WatchMessagesResponse]:
        """Follow a session live, blocking between events; as SessionClient.watch, it resumes
        after the last seq it delivered when the stream breaks with a code the retry policy
        retries, and raises on others. Stop by leaving the loop (the stream is cancelled)."""
        cursor = _calls.WatchCursor(after_seq)
        backoff = self._retry.start(self._clock())
        while True:
            call = self._stub.WatchMessages(cursor.request(session_id), metadata=self._metadata)
            try:
                for event in call:
                    backoff.restart(self._clock())
                    if cursor.advance(event, include_heartbeats):
                        yield event
                return
            except grpc.RpcError as exc:
                error: ChatSessionError = from_rpc_error(exc)
                sleep = backoff.next_sleep(error, self._clock())
                if sleep is None:
                    raise error from exc
            finally:
                call.cancel()
            self._sleep(sleep)

    def get_context(
        self, session_id: str, *, max_tokens: int = 0, max_messages: int = 0
    ) -> pb.GetContextResponse:
        """What a prompt is built from: the pinned system prompt, the summary, then the newest
        messages that fit `max_tokens` (0: no limit) and `max_messages` (0: no limit)."""
        request = _calls.get_context_request(session_id, max_tokens=max_tokens, max_messages=max_messages)
        return self._call(self._stub.GetContext, request)

    def compact_messages(
        self, session_id: str, up_to_seq: int, summary: Message, *, request_id: str | None = None
    ) -> pb.CompactMessagesResponse:
        """Replace the messages up to `up_to_seq` (after the pinned prompt) with `summary` (a
        system or assistant message). A request_id is generated when not given, so retries are safe."""
        request = _calls.compact_messages_request(session_id, up_to_seq, summary, request_id=request_id)
        return self._call(self._stub.CompactMessages, request)

    def clear_messages(
        self, session_id: str, *, keep_system_prompt: bool = False, request_id: str | None = None
    ) -> Session:
        """Empty the history and the summary; the session, its counters and expiry stay. A
        request_id is generated when not given, so a retry does not empty what was appended since."""
        request = _calls.clear_messages_request(
            session_id, keep_system_prompt=keep_system_prompt, request_id=request_id
        )
        return self._call(self._stub.ClearMessages, request).session

    def get_state(
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
        return _state.state_of(self._call(self._stub.GetState, request).state)

    def update_state(
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
        return _state.state_of(self._call(self._stub.UpdateState, request).state)

    def truncate_messages(
        self,
        session_id: str,
        after_seq: int | None = None,
        *,
        pop_count: int = 0,
        expected_last_seq: int | None = None,
        request_id: str | None = None,
        return_removed: bool = False,
    ) -> pb.TruncateMessagesResponse:
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
        return self._call(self._stub.TruncateMessages, request)

    def pop_message(self, session_id: str, *, request_id: str | None = None) -> Message | None:
        """Remove the session's newest stored message and return it (None when it stores none),
        in one call. Raises PoppedMessageLostError in the rare case that an attempt of this call
        popped the message but its answer was lost (the retry finds the pop done)."""
        request = _calls.truncate_messages_request(
            session_id, pop_count=1, return_removed=True, request_id=request_id
        )
        return _calls.popped_message(session_id, self._call(self._stub.TruncateMessages, request))
