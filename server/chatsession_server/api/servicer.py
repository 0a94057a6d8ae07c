"""SessionService: validate, call the store, convert. No Valkey, no business rules."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, MutableMapping
from typing import Any, TypeAlias

from google.protobuf import struct_pb2
from grpc import aio

from chatsession.v1 import session_service_pb2 as pb
from chatsession.v1 import session_service_pb2_grpc
from chatsession_server.api import validation
from chatsession_server.api.convert import (
    SharedWatchReplies,
    add_messages,
    masked_session,
    message_to_proto,
    session_to_proto,
    usage_to_proto,
)
from chatsession_server.api.limits import Limits
from chatsession_server.api.page_token import PageTokens
from chatsession_server.api.payload import fill_value
from chatsession_server.api.watch import Watch
from chatsession_server.errors import SessionNotFound
from chatsession_server.ports import MessageFeed, SessionStorage

Context: TypeAlias = aio.ServicerContext[Any, Any]


class SessionServicer(session_service_pb2_grpc.SessionServiceServicer):
    def __init__(
        self,
        store: SessionStorage,
        feed: MessageFeed,
        limits: Limits,
        page_tokens: PageTokens,
        *,
        heartbeat_seconds: float,
        watch_buffer_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        self._store = store
        self._feed = feed
        self._limits = limits
        self._tokens = page_tokens
        self._heartbeat_seconds = heartbeat_seconds
        self._watch_buffer_bytes = watch_buffer_bytes
        # Needs WatchMessages' response serializer to pass bytes through (convert.serialized_or).
        self.watch_replies = SharedWatchReplies(watch_buffer_bytes)

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: Context
    ) -> pb.CreateSessionResponse:
        new = validation.create_session(request, self._limits)
        session, _ = await self._store.create(new)
        return pb.CreateSessionResponse(session=session_to_proto(session))

    async def GetSession(self, request: pb.GetSessionRequest, context: Context) -> pb.GetSessionResponse:
        session_id, fields = validation.get_session(request)
        session = session_to_proto(await self._store.get(session_id, fields=fields))
        if fields is None:
            return pb.GetSessionResponse(session=session)
        return pb.GetSessionResponse(session=masked_session(session, fields))

    async def UpdateSession(
        self, request: pb.UpdateSessionRequest, context: Context
    ) -> pb.UpdateSessionResponse:
        session_id, patch = validation.update_session(request, self._limits)
        session = await self._store.update(session_id, patch)
        return pb.UpdateSessionResponse(session=session_to_proto(session))

    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: Context
    ) -> pb.DeleteSessionResponse:
        session_id = validation.session_id(request.session_id)
        if not await self._store.delete(session_id) and not request.allow_missing:
            raise SessionNotFound(session_id)
        return pb.DeleteSessionResponse()

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Context
    ) -> pb.ListSessionsResponse:
        listed, limit = validation.list_sessions(request)
        cursor = self._tokens.decode(request.page_token, listed) if request.page_token else None
        page = await self._store.list_sessions(listed.user_id, limit, cursor, app=listed.app)
        token = self._tokens.encode(listed, page.next_cursor) if page.next_cursor else ""
        return pb.ListSessionsResponse(
            sessions=[session_to_proto(s) for s in page.sessions], next_page_token=token
        )

    async def AppendMessages(
        self, request: pb.AppendMessagesRequest, context: Context
    ) -> pb.AppendMessagesResponse:
        session_id, messages, request_id, expected = validation.append_messages(request, self._limits)
        state_delta = validation.append_state_delta(request)
        result = await self._store.append(
            session_id, messages, request_id=request_id, expected_last_seq=expected, state_delta=state_delta
        )
        reply = pb.AppendMessagesResponse(session=session_to_proto(result.session), replayed=result.replayed)
        add_messages(reply.messages, result.messages)
        return reply

    async def ListMessages(
        self, request: pb.ListMessagesRequest, context: Context
    ) -> pb.ListMessagesResponse:
        session_id, query = validation.list_messages(request)
        page = await self._store.list_messages(session_id, query)
        reply = pb.ListMessagesResponse(
            has_more=page.has_more,
            last_seq=page.last_seq,
            window_start_seq=page.window_start_seq,
            history_trimmed=page.history_trimmed,
        )
        add_messages(reply.messages, page.messages)
        return reply

    def WatchMessages(
        self, request: pb.WatchMessagesRequest, context: Context
    ) -> AsyncIterator[pb.WatchMessagesResponse]:
        # Not a generator itself: the watch is the stream's iterator (one layer less per idle watch).
        # Its messages come serialized (bytes, which the method's serializer passes as they are).
        session_id, after_seq = validation.watch_messages(request)
        return Watch[Any](
            self._store,
            self._feed,
            session_id,
            after_seq,
            heartbeat_seconds=self._heartbeat_seconds,
            present=self.watch_replies,
            page_bytes=self._watch_buffer_bytes,
        )

    async def ForkSession(self, request: pb.ForkSessionRequest, context: Context) -> pb.ForkSessionResponse:
        session, replayed = await self._store.fork(validation.fork_session(request))
        return pb.ForkSessionResponse(session=session_to_proto(session), replayed=replayed)

    async def GetUserUsage(
        self, request: pb.GetUserUsageRequest, context: Context
    ) -> pb.GetUserUsageResponse:
        return usage_to_proto(await self._store.user_usage(validation.get_user_usage(request)))

    async def GetContext(self, request: pb.GetContextRequest, context: Context) -> pb.GetContextResponse:
        session_id, query = validation.get_context(request)
        found = await self._store.get_context(session_id, query)
        reply = pb.GetContextResponse(tokens=found.tokens, truncated=found.truncated)
        add_messages(reply.messages, found.messages)
        return reply

    async def CompactMessages(
        self, request: pb.CompactMessagesRequest, context: Context
    ) -> pb.CompactMessagesResponse:
        session_id, compaction = validation.compact_messages(request, self._limits)
        result = await self._store.compact(session_id, compaction)
        return pb.CompactMessagesResponse(
            summary=message_to_proto(result.summary),
            session=session_to_proto(result.session),
            replayed=result.replayed,
        )

    async def ClearMessages(
        self, request: pb.ClearMessagesRequest, context: Context
    ) -> pb.ClearMessagesResponse:
        session_id, keep_system_prompt, request_id = validation.clear_messages(request)
        session = await self._store.clear(
            session_id, keep_system_prompt=keep_system_prompt, request_id=request_id
        )
        return pb.ClearMessagesResponse(session=session_to_proto(session))

    async def GetState(self, request: pb.GetStateRequest, context: Context) -> pb.GetStateResponse:
        scope, keys = validation.get_state(request)
        reply = pb.GetStateResponse()
        _fill_state(reply.state, await self._store.get_state(scope, keys))
        return reply

    async def UpdateState(self, request: pb.UpdateStateRequest, context: Context) -> pb.UpdateStateResponse:
        scope, delta = validation.update_state(request)
        reply = pb.UpdateStateResponse()
        _fill_state(reply.state, await self._store.update_state(scope, delta))
        return reply

    async def TruncateMessages(
        self, request: pb.TruncateMessagesRequest, context: Context
    ) -> pb.TruncateMessagesResponse:
        session_id, truncation = validation.truncate_messages(request)
        result = await self._store.truncate(session_id, truncation)
        reply = pb.TruncateMessagesResponse(
            session=session_to_proto(result.session),
            removed_count=result.removed_count,
            replayed=result.replayed,
            after_seq=result.after_seq,
        )
        add_messages(reply.removed_messages, result.removed)
        return reply


def _fill_state(target: MutableMapping[str, struct_pb2.Value], state: Mapping[str, str]) -> None:
    for key, text in state.items():
        fill_value(target[key], text)
