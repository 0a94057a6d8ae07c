"""SessionListing: ListSessions' pages, read from the owner's index (`user_sessions:{uid}`), the
owner's index of an app (`user_sessions:{uid}:<app>`) or an app's index (`app_sessions:{<app>}`).

An index may hold entries whose session is gone (expired, or deleted or
created half-way in a cluster: see owner_index.py) and scores that lag their session's
last_active. A listing describes every candidate, so a page holds only live sessions, and has the
owner index prune the dead entries and repair the lagging scores it met.
"""

from __future__ import annotations

from collections.abc import Sequence

from glide import InfBound, Limit, RangeByScore, ScoreBoundary

from chatsession_server.domain import Listed, Session, SessionCursor, SessionPage
from chatsession_server.store import codec, keys
from chatsession_server.store.owner_index import OwnerIndex
from chatsession_server.store.valkey import ValkeyConnection

MAX_INDEX_READ = 1000
# A page of messages (or of sessions) stops short of this much, so that its reply fits the 4 MiB
# a gRPC client receives by default (a message alone is at most 1 MiB, a session far less: a page
# of one always fits).
PAGE_BYTES = 3 * 1024 * 1024


class SessionListing:
    def __init__(self, conn: ValkeyConnection, key_space: keys.KeySpace, owner_index: OwnerIndex) -> None:
        self._conn = conn
        self._keys = key_space
        self._owner_index = owner_index

    async def list_sessions(self, listed: Listed, limit: int, cursor: SessionCursor | None) -> SessionPage:
        """A page of the live sessions `listed` names, most recently active first.

        Reads the index by score (no SCAN), describes the candidates in one pipeline, and prunes
        index entries whose session has expired, so a page holds only live sessions. Each read
        goes on from the last row read (its score and id), never from an offset, so rows that
        leave or join the range meanwhile (pruned, or a score repaired) cannot make it skip one.
        Each read that meets dead entries reads twice as many next time (up to MAX_INDEX_READ),
        so a page behind thousands of expired entries takes a few round trips, not hundreds. A
        page stops short of PAGE_BYTES of sessions, so that its reply fits a client.
        """
        index = self._keys.listing_index(listed.user_id, listed.app)
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
            live, dead = await self._describe_many(listed, fresh)
            if dead:
                await self._owner_index.prune(listed, dead)
            for session, score in live:
                size += _listed_bytes(session)
                if found and size > PAGE_BYTES:
                    return await self._page(listed, found[:limit], more=True)
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
        return await self._page(listed, found[:limit], more=len(found) > limit)

    async def _page(self, listed: Listed, shown: list[tuple[Session, float]], *, more: bool) -> SessionPage:
        """The page of `shown`, with a cursor after its last session when `more` follow. Only the
        scores of sessions returned are repaired: one raised past the page's end would jump over
        the cursor and be skipped by the next page."""
        await self._owner_index.repair_scores(listed, shown)
        next_cursor = None
        if more:
            last, score = shown[-1]
            next_cursor = SessionCursor(score, last.session_id)
        return SessionPage(tuple(session for session, _ in shown), next_cursor)

    async def _describe_many(
        self, listed: Listed, candidates: Sequence[tuple[str, float]]
    ) -> tuple[list[tuple[Session, float]], list[tuple[str, float]]]:
        """Live sessions (with their index score) for index rows, in order, and the dead rows:
        gone, or (a namesake) of another owner or app than the index's."""
        if not candidates:
            return [], []
        batch = self._conn.batch(atomic=False)
        for session_id, _ in candidates:
            meta = self._keys.meta(session_id)
            batch.hgetall(meta).llen(self._keys.chat(session_id)).ttl(meta)
        rows = await self._conn.run(batch)
        live: list[tuple[Session, float]] = []
        dead: list[tuple[str, float]] = []
        owner_field, app_field = codec.MetaField.USER_ID.encode(), codec.MetaField.APP.encode()
        owner, app = listed.user_id.encode(), listed.app.encode()
        for i, (session_id, score) in enumerate(candidates):
            meta, stored, ttl = rows[3 * i : 3 * i + 3]
            if (
                not meta
                or owner_field not in meta
                or (owner and meta[owner_field] != owner)
                or (app and meta.get(app_field) != app)
            ):
                dead.append((session_id, score))
                continue
            live.append((codec.decode_session(session_id, meta, int(stored), int(ttl)), score))
        return live, dead


def _listed_bytes(session: Session) -> int:
    """About what a session takes in a ListSessions reply: its strings, plus the fixed fields."""
    texts = [session.session_id, session.user_id, session.title, session.model, session.app]
    texts += session.labels.keys()
    texts += session.labels.values()
    return sum(len(text.encode()) for text in texts) + 64


def _after_cursor(cursor: SessionCursor, session_id: str, score: float) -> bool:
    """True when an index row sorts after the cursor (score descending, then session_id descending)."""
    if score != cursor.last_active:
        return score < cursor.last_active
    return session_id < cursor.session_id
