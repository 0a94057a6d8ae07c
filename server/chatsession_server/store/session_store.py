"""SessionStore: every RPC's storage step, one Valkey round trip each where the data allows."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from glide import InfBound, Limit, RangeByScore, ScoreBoundary

from chatsession_server.domain import (
    AppendResult,
    MessagePage,
    MessageQuery,
    NewMessage,
    NewSession,
    Session,
    SessionCursor,
    SessionPage,
    SessionPatch,
)
from chatsession_server.errors import PreconditionFailed, SessionAlreadyExists, SessionNotFound
from chatsession_server.store import codec, keys, scripts
from chatsession_server.store.valkey import ValkeyConnection, make_script

# Appends up to this size travel to watchers inside the publish; larger ones are only announced.
INLINE_PUBLISH_BYTES = 64 * 1024


class SessionStore:
    def __init__(
        self,
        conn: ValkeyConnection,
        *,
        max_ttl_seconds: int,
        idempotency_limit: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._conn = conn
        self._max_ttl_seconds = max_ttl_seconds
        self._idempotency_limit = idempotency_limit
        self._clock = clock
        self._create = make_script(scripts.CREATE)
        self._append = make_script(scripts.APPEND)
        self._list_messages = make_script(scripts.LIST_MESSAGES)
        self._update = make_script(scripts.UPDATE)
        self._delete = make_script(scripts.DELETE)
        self._prune_index = make_script(scripts.PRUNE_INDEX)

    @staticmethod
    def _session_keys(session_id: str) -> list[str]:
        return [keys.chat_key(session_id), keys.meta_key(session_id), keys.requests_key(session_id)]

    async def create(self, new: NewSession) -> tuple[Session, bool]:
        """Create a session; returns it and whether this was a replay of an earlier create."""
        now = self._clock()
        fields = codec.new_session_fields(
            user_id=new.user_id,
            model=new.model,
            title=new.title,
            labels=new.labels,
            created_at=now,
            ttl_seconds=new.ttl_seconds,
            max_messages=new.max_messages,
            request_id=new.request_id,
        )
        reply = await self._conn.script(
            self._create,
            [*self._session_keys(new.session_id), keys.user_index_key(new.user_id)],
            [
                codec.format_time(now),
                str(new.ttl_seconds),
                new.request_id,
                new.user_id,
                new.session_id,
                *fields,
            ],
        )
        status = reply[0]
        if status == b"exists":
            raise SessionAlreadyExists(new.session_id)
        return _session_from(new.session_id, reply[1]), status == b"replayed"

    async def get(self, session_id: str) -> Session:
        batch = self._conn.batch(atomic=True)
        batch.hgetall(keys.meta_key(session_id)).llen(keys.chat_key(session_id)).ttl(
            keys.meta_key(session_id)
        )
        meta, stored, ttl = await self._conn.run(batch)
        if not meta:
            raise SessionNotFound(session_id)
        return codec.decode_session(session_id, meta, int(stored), int(ttl))

    async def update(self, session_id: str, patch: SessionPatch) -> Session:
        to_set: dict[str, str] = {}
        if patch.title is not None:
            to_set["title"] = patch.title
        if patch.model is not None:
            to_set["model"] = patch.model
        labels_to_set = patch.replace_labels if patch.replace_labels is not None else patch.set_labels
        for key, value in labels_to_set.items():
            to_set[codec.LABEL_FIELD_PREFIX + key] = value
        to_delete = [codec.LABEL_FIELD_PREFIX + key for key in sorted(patch.remove_labels)]
        args = [
            "" if patch.ttl_seconds is None else str(patch.ttl_seconds),
            "" if patch.max_messages is None else str(patch.max_messages),
            "1" if patch.replace_labels is not None else "0",
            str(len(to_set)),
            *codec.flatten(to_set.items()),
            *to_delete,
        ]
        reply = await self._conn.script(self._update, self._session_keys(session_id), args)
        if reply[0] == b"not_found":
            raise SessionNotFound(session_id)
        return _session_from(session_id, reply[1])

    async def delete(self, session_id: str) -> bool:
        """Delete a session; False when there was none."""
        deleted = await self._conn.script(
            self._delete,
            self._session_keys(session_id),
            [keys.USER_INDEX_KEY_HEAD, session_id, keys.watch_channel(session_id)],
        )
        return bool(deleted)

    async def append(
        self,
        session_id: str,
        messages: Sequence[NewMessage],
        *,
        request_id: str = "",
        expected_last_seq: int | None = None,
    ) -> AppendResult:
        now = self._clock()
        bodies = [codec.encode_body(m, now) for m in messages]
        reply = await self._conn.script(
            self._append,
            self._session_keys(session_id),
            [
                codec.format_time(now),
                request_id,
                codec.fingerprint(messages) if request_id else "",
                "" if expected_last_seq is None else str(expected_last_seq),
                str(sum(m.tokens for m in messages)),
                keys.USER_INDEX_KEY_HEAD,
                session_id,
                str(self._idempotency_limit),
                keys.watch_channel(session_id),
                str(INLINE_PUBLISH_BYTES),
                *bodies,
            ],
        )
        status = reply[0]
        if status == b"not_found":
            raise SessionNotFound(session_id)
        if status == b"request_id_reused":
            raise PreconditionFailed(
                "REQUEST_ID_REUSED",
                "request_id",
                f"request_id {request_id!r} was already used for different messages in this session",
            )
        if status == b"seq_mismatch":
            raise PreconditionFailed(
                "LAST_SEQ_MISMATCH",
                "expected_last_seq",
                f"the session's last seq is {int(reply[1])}, not {expected_last_seq}",
            )
        if status == b"replayed":
            stored = tuple(codec.decode_message(raw) for raw in reply[2])
            return AppendResult(stored, _session_from(session_id, reply[3]), replayed=True)
        first_seq = int(reply[1])
        # The script stored exactly stored_json(seq, body): decode our own copy, no read-back.
        stored = tuple(
            codec.decode_message(codec.stored_json(first_seq + i, body)) for i, body in enumerate(bodies)
        )
        return AppendResult(stored, _session_from(session_id, reply[2]), replayed=False)

    async def list_messages(self, session_id: str, query: MessageQuery) -> MessagePage:
        reply = await self._conn.script(
            self._list_messages,
            [keys.chat_key(session_id), keys.meta_key(session_id)],
            [
                str(query.limit),
                "" if query.after_seq is None else str(query.after_seq),
                "" if query.before_seq is None else str(query.before_seq),
            ],
        )
        if reply[0] == b"not_found":
            raise SessionNotFound(session_id)
        _, items, has_more, last_seq, window_start, trimmed = reply
        return MessagePage(
            messages=tuple(codec.decode_message(raw) for raw in items),
            has_more=bool(has_more),
            last_seq=int(last_seq),
            window_start_seq=int(window_start),
            history_trimmed=bool(trimmed),
        )

    async def list_sessions(self, user_id: str, limit: int, cursor: SessionCursor | None) -> SessionPage:
        """A page of the user's live sessions, most recently active first.

        Reads the index by score (no SCAN), describes the candidates in one pipeline, and prunes
        index entries whose session has expired, so a page holds only live sessions.
        """
        index = keys.user_index_key(user_id)
        top: InfBound | ScoreBoundary = (
            InfBound.POS_INF if cursor is None else ScoreBoundary(cursor.last_active)
        )
        found: list[tuple[Session, float]] = []
        offset = 0
        while True:
            fetch = limit - len(found) + 1  # one more than needed tells whether a next page exists
            batch = self._conn.batch(atomic=False)
            if offset == 0:
                # Sessions idle longer than the largest TTL are gone for sure: drop them in bulk.
                stale = ScoreBoundary(self._clock() - self._max_ttl_seconds, is_inclusive=False)
                batch.zremrangebyscore(index, InfBound.NEG_INF, stale)
            batch.zrange_withscores(
                index, RangeByScore(top, InfBound.NEG_INF, Limit(offset, fetch)), reverse=True
            )
            ranked: dict[bytes, float] = (await self._conn.run(batch))[-1]
            rows = [(member.decode(), float(score)) for member, score in ranked.items()]
            candidates = [row for row in rows if cursor is None or _after_cursor(cursor, *row)]
            live, dead = await self._describe_many(user_id, candidates)
            removed = 0
            if dead:
                removed = int(await self._conn.script(self._prune_index, [index], [user_id, *dead]))
            found.extend(live)
            offset += len(rows) - removed
            if len(found) > limit or len(rows) < fetch:
                break
        next_cursor = None
        if len(found) > limit:
            del found[limit:]
            last, score = found[-1]
            next_cursor = SessionCursor(score, last.session_id)
        return SessionPage(tuple(session for session, _ in found), next_cursor)

    async def _describe_many(
        self, user_id: str, candidates: Sequence[tuple[str, float]]
    ) -> tuple[list[tuple[Session, float]], list[str]]:
        """Live sessions (with their index score) for index rows, in order, and the dead rows as
        flat (session_id, meta key) pairs for PRUNE_INDEX."""
        if not candidates:
            return [], []
        batch = self._conn.batch(atomic=False)
        for session_id, _ in candidates:
            meta = keys.meta_key(session_id)
            batch.hgetall(meta).llen(keys.chat_key(session_id)).ttl(meta)
        rows = await self._conn.run(batch)
        live: list[tuple[Session, float]] = []
        dead: list[str] = []
        for i, (session_id, score) in enumerate(candidates):
            meta, stored, ttl = rows[3 * i : 3 * i + 3]
            if not meta or meta.get(b"user_id") != user_id.encode():
                dead.extend([session_id, keys.meta_key(session_id)])
                continue
            live.append((codec.decode_session(session_id, meta, int(stored), int(ttl)), score))
        return live, dead


def _after_cursor(cursor: SessionCursor, session_id: str, score: float) -> bool:
    """True when an index row sorts after the cursor (score descending, then session_id descending)."""
    if score != cursor.last_active:
        return score < cursor.last_active
    return session_id < cursor.session_id


def _session_from(session_id: str, described: Any) -> Session:
    meta_flat, stored, ttl = described
    return codec.decode_session(session_id, codec.pairs_to_map(meta_flat), int(stored), int(ttl))
