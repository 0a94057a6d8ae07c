"""SessionStore: every RPC's storage step, one Valkey round trip each where the data allows.

The owner's index (`user_sessions:{uid}`) and a session live in different cluster slots. On
standalone Valkey the scripts keep the index exact in the same step. In a cluster it is a
second step, ordered so that a crash or error between the two steps never hides a live session
from its owner's listing and never shows one that does not exist:
- create: index entry first (its score strictly raised: see scripts.ENTER_INDEX), then the
  session. A crash in between leaves an
  entry without a session: listings skip it (they describe every candidate) and remove it once
  it is older than INDEX_PRUNE_GRACE_SECONDS, and only if its score is unchanged. The session
  step is refused once CREATE_STEP_GAP_SECONDS have passed since the entry was written, so no
  create can complete after its entry was pruned.
- append: the session first, then ZADD GT of its new last_active. A failure in between leaves
  a stale (lower) score: the session is still listed; the next append or a listing that meets
  it repairs the score. The append itself is acknowledged (the message is stored).
- delete: the session first, then the entry is removed unless its score is newer than the
  deleted session's last_active (a namesake created since keeps its entry). A failure in
  between leaves an entry without a session: skipped, then pruned as above; the delete is
  acknowledged.
tests/test_cluster_index.py injects a failure between the steps of each.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from glide import InfBound, Limit, RangeByScore, ScoreBoundary, UpdateOptions

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
from chatsession_server.errors import (
    ChatSessionError,
    FieldViolation,
    InvalidArgument,
    PreconditionFailed,
    QuotaExceeded,
    SessionAlreadyExists,
    SessionNotFound,
    StoreUnavailable,
)
from chatsession_server.store import codec, keys, scripts
from chatsession_server.store.scripts import Status
from chatsession_server.store.valkey import ValkeyConnection

log = logging.getLogger(__name__)

# Appends up to this size travel to watchers inside the publish; larger ones are only announced.
INLINE_PUBLISH_BYTES = 64 * 1024
# Cluster only (see the module docstring): how old an index entry without a session must be
# before a listing removes it, and the most time a create may take between its two steps.
INDEX_PRUNE_GRACE_SECONDS = 600.0
CREATE_STEP_GAP_SECONDS = 60.0
MAX_INDEX_READ = 1000
# A page of messages (or of sessions) stops short of this much, so that its reply fits the 4 MiB
# a gRPC client receives by default (a message alone is at most 1 MiB, a session far less: a page
# of one always fits).
PAGE_BYTES = 3 * 1024 * 1024


class SessionStore:
    def __init__(
        self,
        conn: ValkeyConnection,
        *,
        idempotency_limit: int = 1000,
        max_labels: int = 64,
        max_session_bytes: int = 0,
        clock: Callable[[], float] = time.time,
        prune_grace_seconds: float = INDEX_PRUNE_GRACE_SECONDS,
    ) -> None:
        self._conn = conn
        self._idempotency_limit = idempotency_limit
        self._max_labels = max_labels
        self._max_session_bytes = max_session_bytes
        self._clock = clock
        self._prune_grace_seconds = prune_grace_seconds
        # Standalone: the scripts keep the index themselves (they are given its key or its head).
        self._index_in_script = not conn.cluster
        self._index_head = "" if conn.cluster else keys.USER_INDEX_KEY_HEAD
        self._publish = "SPUBLISH" if conn.cluster else "PUBLISH"

    @staticmethod
    def _session_keys(session_id: str) -> list[str]:
        return [keys.chat_key(session_id), keys.meta_key(session_id), keys.requests_key(session_id)]

    async def _run(self, script: scripts.LuaScript[Any], keys_: Sequence[str], args: Any) -> Any:
        return await self._conn.script(script.script, script.keys(*keys_), script.argv(args))

    # --- the owner's index as a step of its own (cluster) -----------------------------------

    async def _index_touch(self, user_id: str, session_id: str, score: float) -> None:
        """Adds the entry or raises its score (never lowers it: GT)."""
        index = keys.user_index_key(user_id)
        batch = self._conn.batch(atomic=False)
        batch.zadd(index, {session_id: score}, update_condition=UpdateOptions.GREATER_THAN)
        await self._conn.run(batch)
        await self._conn.replicated(index)

    async def _unindex(self, user_id: str, session_id: str, last_active: str) -> None:
        index = keys.user_index_key(user_id)
        await self._run(scripts.UNINDEX, [index], scripts.UnindexArgs(session_id, last_active))
        await self._conn.replicated(index)

    async def create(self, new: NewSession) -> tuple[Session, bool]:
        """Create a session; returns it and whether this was a replay of an earlier create."""
        now = codec.format_time(self._clock())
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
        session_keys = self._session_keys(new.session_id)
        if self._index_in_script:
            session_keys.append(keys.user_index_key(new.user_id))
        else:
            score_set = await self._enter_index(new.user_id, new.session_id, now)
            indexed_at = time.monotonic()
        args = scripts.CreateArgs(
            now=now,
            ttl=new.ttl_seconds,
            request_id=new.request_id,
            user_id=new.user_id,
            session_id=new.session_id,
            fields=fields,
        )
        if not self._index_in_script and time.monotonic() - indexed_at > CREATE_STEP_GAP_SECONDS:
            raise StoreUnavailable("creating the session took too long; retry with the same request_id")
        reply = await self._run(scripts.CREATE, session_keys, args)
        status = Status.of(reply)
        if status is Status.EXISTS:
            if not self._index_in_script:
                owner, last_active = reply[1].decode(), reply[2].decode()
                await self._revert_index(new, score_set, last_active if owner == new.user_id else "")
            raise SessionAlreadyExists(new.session_id)
        session = _session_from(new.session_id, reply[1])
        if status is Status.REPLAYED and not self._index_in_script:
            # The entry was there already: put back the score the session really has.
            await self._revert_index(new, score_set, codec.format_time(session.last_active))
        await self._conn.replicated(keys.meta_key(new.session_id))
        return session, status is Status.REPLAYED

    async def _enter_index(self, user_id: str, session_id: str, now: str) -> str:
        """A create's index step (cluster); returns the score written."""
        index = keys.user_index_key(user_id)
        written = await self._run(scripts.ENTER_INDEX, [index], scripts.EnterIndexArgs(session_id, now))
        await self._conn.replicated(index)
        return written.decode() if isinstance(written, bytes) else str(written)

    async def _revert_index(self, new: NewSession, score_set: str, previous: str) -> None:
        """Undo a refused create's index step (cluster): put back the owner's score, or remove an
        entry that another user's session id does not deserve. Best effort: an entry left
        behind is skipped by listings and pruned after the grace period."""
        args = scripts.RevertIndexArgs(new.session_id, score_set, previous)
        try:
            await self._run(scripts.REVERT_INDEX, [keys.user_index_key(new.user_id)], args)
        except ChatSessionError as exc:
            log.warning(
                "session %s: index entry of a refused create left to pruning (%s)", new.session_id, exc
            )

    async def get(self, session_id: str, *, owners: Collection[str] | None = None) -> Session:
        """The session; not found when it belongs to none of `owners` (None: anyone's)."""
        batch = self._conn.batch(atomic=True)
        batch.hgetall(keys.meta_key(session_id)).llen(keys.chat_key(session_id)).ttl(
            keys.meta_key(session_id)
        )
        meta, stored, ttl = await self._conn.run(batch)
        if not meta:
            raise SessionNotFound(session_id)
        session = codec.decode_session(session_id, meta, int(stored), int(ttl))
        if owners is not None and session.user_id not in owners:
            raise SessionNotFound(session_id)
        return session

    async def update(
        self, session_id: str, patch: SessionPatch, *, owners: Collection[str] | None = None
    ) -> Session:
        to_set: dict[str, str] = {}
        if patch.title is not None:
            to_set["title"] = patch.title
        if patch.model is not None:
            to_set["model"] = patch.model
        labels_to_set = patch.replace_labels if patch.replace_labels is not None else patch.set_labels
        for key, value in labels_to_set.items():
            to_set[codec.LABEL_FIELD_PREFIX + key] = value
        to_delete = [codec.LABEL_FIELD_PREFIX + key for key in sorted(patch.remove_labels)]
        args = scripts.UpdateArgs(
            owners=scripts.owners_arg(owners),
            ttl=patch.ttl_seconds,
            max_messages=patch.max_messages,
            clear_labels=patch.replace_labels is not None,
            max_labels=self._max_labels,
            set_count=len(to_set),
            changes=[*codec.flatten(to_set.items()), *to_delete],
        )
        reply = await self._run(scripts.UPDATE, self._session_keys(session_id), args)
        status = Status.of(reply)
        if status is Status.NOT_FOUND:
            raise SessionNotFound(session_id)
        if status is Status.TOO_MANY_LABELS:
            raise InvalidArgument(
                [
                    FieldViolation(
                        "session.labels",
                        f"the session would have {int(reply[1])} labels; the limit is {self._max_labels}",
                    )
                ]
            )
        await self._conn.replicated(keys.meta_key(session_id))
        return _session_from(session_id, reply[1])

    async def delete(self, session_id: str, *, owners: Collection[str] | None = None) -> bool:
        """Delete a session; False when there was none (of `owners`)."""
        args = scripts.DeleteArgs(
            owners=scripts.owners_arg(owners),
            index_key_head=self._index_head,
            session_id=session_id,
            publish_command=self._publish,
            channel=keys.watch_channel(session_id),
        )
        reply = await self._run(scripts.DELETE, self._session_keys(session_id), args)
        if Status.of(reply) is Status.NOT_FOUND:
            return False
        await self._conn.replicated(keys.meta_key(session_id))
        if not self._index_in_script:
            try:
                await self._unindex(reply[1].decode(), session_id, reply[2].decode())
            except ChatSessionError as exc:
                # The session is gone: acknowledge it. Listings skip the entry, then prune it.
                log.warning("session %s: index entry left to pruning (%s)", session_id, exc)
        return True

    async def append(
        self,
        session_id: str,
        messages: Sequence[NewMessage],
        *,
        request_id: str = "",
        expected_last_seq: int | None = None,
        owners: Collection[str] | None = None,
    ) -> AppendResult:
        now = self._clock()
        bodies = [codec.encode_body(m, now) for m in messages]
        args = scripts.AppendArgs(
            owners=scripts.owners_arg(owners),
            now=codec.format_time(now),
            request_id=request_id,
            fingerprint=codec.fingerprint(messages) if request_id else "",
            expected_last_seq=expected_last_seq,
            token_sum=sum(m.tokens for m in messages),
            index_key_head=self._index_head,
            session_id=session_id,
            idempotency_limit=self._idempotency_limit,
            publish_command=self._publish,
            channel=keys.watch_channel(session_id),
            inline_publish_bytes=INLINE_PUBLISH_BYTES,
            max_session_bytes=self._max_session_bytes,
            bodies=bodies,
        )
        reply = await self._run(scripts.APPEND, self._session_keys(session_id), args)
        status = Status.of(reply)
        if status is Status.NOT_FOUND:
            raise SessionNotFound(session_id)
        if status is Status.REQUEST_ID_REUSED:
            raise PreconditionFailed(
                "REQUEST_ID_REUSED",
                "request_id",
                f"request_id {request_id!r} was already used for different messages in this session",
            )
        if status is Status.TOO_LARGE:
            raise QuotaExceeded(
                "max_session_bytes",
                self._max_session_bytes,
                f"session {session_id}",
                f"session {session_id!r} stores {int(reply[1])} bytes and this append adds {int(reply[2])}: "
                f"the limit per session is {self._max_session_bytes} (--max-session-bytes); set a window "
                "(max_messages) or start a new session",
            )
        if status is Status.SEQ_MISMATCH:
            raise PreconditionFailed(
                "LAST_SEQ_MISMATCH",
                "expected_last_seq",
                f"the session's last seq is {int(reply[1])}, not {expected_last_seq}",
            )
        if status is Status.REPLAYED:
            stored = codec.decode_messages(reply[2])
            result = AppendResult(stored, _session_from(session_id, reply[3]), replayed=True)
        else:
            first_seq = int(reply[1])
            # The script stored exactly stored_json(seq, body): the reply is built from the
            # request, with no read-back and no JSON round trip.
            stored = tuple(codec.stored_message(m, first_seq + i, now) for i, m in enumerate(messages))
            result = AppendResult(stored, _session_from(session_id, reply[2]), replayed=False)
        # A replay repeats the index step too: it may be what failed the first time.
        await self._conn.replicated(keys.meta_key(session_id))
        if not self._index_in_script:
            session = result.session
            try:
                await self._index_touch(session.user_id, session_id, session.last_active)
            except ChatSessionError as exc:
                # The messages are stored: acknowledge them. The score stays stale until the
                # next append or a listing repairs it; the session stays listed meanwhile.
                log.warning("session %s: index score not updated (%s); repaired later", session_id, exc)
        return result

    async def list_messages(
        self, session_id: str, query: MessageQuery, *, owners: Collection[str] | None = None
    ) -> MessagePage:
        reply = await self._run(
            scripts.LIST_MESSAGES,
            [keys.chat_key(session_id), keys.meta_key(session_id)],
            scripts.ListMessagesArgs(
                scripts.owners_arg(owners), query.limit, query.after_seq, query.before_seq, PAGE_BYTES
            ),
        )
        if Status.of(reply) is Status.NOT_FOUND:
            raise SessionNotFound(session_id)
        _, items, has_more, last_seq, window_start, trimmed = reply
        return MessagePage(
            messages=codec.decode_messages(items),
            has_more=bool(has_more),
            last_seq=int(last_seq),
            window_start_seq=int(window_start),
            history_trimmed=bool(trimmed),
        )

    async def list_sessions(self, user_id: str, limit: int, cursor: SessionCursor | None) -> SessionPage:
        """A page of the user's live sessions, most recently active first.

        Reads the index by score (no SCAN), describes the candidates in one pipeline, and prunes
        index entries whose session has expired, so a page holds only live sessions. Each read
        goes on from the last row read (its score and id), never from an offset, so rows that
        leave or join the range meanwhile (pruned, or a score repaired) cannot make it skip one.
        Each read that meets dead entries reads twice as many next time (up to MAX_INDEX_READ),
        so a page behind thousands of expired entries takes a few round trips, not hundreds. A
        page stops short of PAGE_BYTES of sessions, so that its reply fits a client.
        """
        index = keys.user_index_key(user_id)
        found: list[tuple[Session, float]] = []
        size = 0
        position = cursor  # the last row read: the next read starts after it
        ties = 0  # rows read at the position's score, which the next read meets again first
        read = limit + 1  # one more than needed tells whether a next page exists
        while True:
            fetch = max(limit - len(found) + 1, read) + ties
            # No bulk removal by score: a session can outlive its score (a TTL raised by an
            # update, a score whose index step failed), so only a read of the session decides.
            top = InfBound.POS_INF if position is None else ScoreBoundary(position.last_active)
            batch = self._conn.batch(atomic=False)
            batch.zrange_withscores(index, RangeByScore(top, InfBound.NEG_INF, Limit(0, fetch)), reverse=True)
            ranked: dict[bytes, float] = (await self._conn.run(batch))[-1]
            rows = [(member.decode(), float(score)) for member, score in ranked.items()]
            fresh = [row for row in rows if position is None or _after_cursor(position, *row)]
            live, dead = await self._describe_many(user_id, fresh)
            if dead:
                await self._prune(user_id, dead)
            for session, score in live:
                size += _listed_bytes(session)
                if found and size > PAGE_BYTES:
                    return await self._page(user_id, found[:limit], more=True)
                found.append((session, score))
            if len(found) > limit or len(rows) < fetch:
                break
            if fresh:
                position = SessionCursor(fresh[-1][1], fresh[-1][0])
                ties = sum(1 for _, score in rows if score == position.last_active)
            else:  # every row read was at the position's score and seen already: read further
                ties = fetch
            if dead:
                read = min(2 * read, MAX_INDEX_READ)
        return await self._page(user_id, found[:limit], more=len(found) > limit)

    async def _page(self, user_id: str, shown: list[tuple[Session, float]], *, more: bool) -> SessionPage:
        """The page of `shown`, with a cursor after its last session when `more` follow. Only the
        scores of sessions returned are repaired: one raised past the page's end would jump over
        the cursor and be skipped by the next page."""
        await self._repair_scores(user_id, shown)
        next_cursor = None
        if more:
            last, score = shown[-1]
            next_cursor = SessionCursor(score, last.session_id)
        return SessionPage(tuple(session for session, _ in shown), next_cursor)

    async def _prune(self, user_id: str, dead: Sequence[tuple[str, float]]) -> None:
        """Removes index entries found dead (in a cluster, those old and untouched enough)."""
        index = keys.user_index_key(user_id)
        if self._index_in_script:
            pairs = [item for session_id, _ in dead for item in (session_id, keys.meta_key(session_id))]
            await self._run(scripts.PRUNE_INDEX, [index], scripts.PruneIndexArgs(user_id, pairs))
        else:
            cutoff = codec.format_time(self._clock() - self._prune_grace_seconds)
            seen = [item for session_id, score in dead for item in (session_id, repr(score))]
            await self._run(scripts.PRUNE_STALE, [index], scripts.PruneStaleArgs(cutoff, seen))

    async def _repair_scores(self, user_id: str, live: Sequence[tuple[Session, float]]) -> None:
        """Raises index scores that lag their session's last_active (an append whose index step
        failed, in a cluster). Never needed on standalone Valkey, where the scripts keep them."""
        behind = {
            session.session_id: session.last_active for session, score in live if session.last_active > score
        }
        if behind:
            batch = self._conn.batch(atomic=False)
            batch.zadd(keys.user_index_key(user_id), behind, update_condition=UpdateOptions.GREATER_THAN)
            await self._conn.run(batch)

    async def _describe_many(
        self, user_id: str, candidates: Sequence[tuple[str, float]]
    ) -> tuple[list[tuple[Session, float]], list[tuple[str, float]]]:
        """Live sessions (with their index score) for index rows, in order, and the dead rows."""
        if not candidates:
            return [], []
        batch = self._conn.batch(atomic=False)
        for session_id, _ in candidates:
            meta = keys.meta_key(session_id)
            batch.hgetall(meta).llen(keys.chat_key(session_id)).ttl(meta)
        rows = await self._conn.run(batch)
        live: list[tuple[Session, float]] = []
        dead: list[tuple[str, float]] = []
        owner = codec.MetaField.USER_ID.encode()
        for i, (session_id, score) in enumerate(candidates):
            meta, stored, ttl = rows[3 * i : 3 * i + 3]
            if not meta or meta.get(owner) != user_id.encode():
                dead.append((session_id, score))
                continue
            live.append((codec.decode_session(session_id, meta, int(stored), int(ttl)), score))
        return live, dead


def _listed_bytes(session: Session) -> int:
    """About what a session takes in a ListSessions reply: its strings, plus the fixed fields."""
    texts = [session.session_id, session.user_id, session.title, session.model, *session.labels.keys()]
    texts += session.labels.values()
    return sum(len(text.encode()) for text in texts) + 64


def _after_cursor(cursor: SessionCursor, session_id: str, score: float) -> bool:
    """True when an index row sorts after the cursor (score descending, then session_id descending)."""
    if score != cursor.last_active:
        return score < cursor.last_active
    return session_id < cursor.session_id


def _session_from(session_id: str, described: Any) -> Session:
    meta_flat, stored, ttl = described
    return codec.decode_session(session_id, codec.pairs_to_map(meta_flat), int(stored), int(ttl))
