"""OwnerIndex: the owner's index and usage, kept with every session write.

The owner's index (`user_sessions:{uid}`) and usage (`usage:{uid}`, with `usage_seen:{uid}`) live
in the owner's cluster slot, a session in its own. On standalone Valkey the session scripts keep
them exact in the same step (`InScriptOwnerIndex`: the scripts are given the index key or the
heads of the two names). In a cluster they are a second step (`SecondStepOwnerIndex`), ordered so
that a crash or error between the two steps never hides a live session from its owner's listing
and never shows one that does not exist:
- create: index entry first (its score strictly raised: see owner_scripts.ENTER_INDEX), then the
  session. A crash in between leaves an entry without a session: listings skip it (they
  describe every candidate) and remove it once it is older than INDEX_PRUNE_GRACE_SECONDS, and
  only if its score is unchanged. The session step is not sent once CREATE_STEP_GAP_SECONDS
  have passed since the index step began (and each step is bounded by the Valkey timeout), so no
  create can complete after its entry was pruned.
- append: the session first, then the score set to its new last_active, unless a later append's
  step got there first (usage_seen's record tells by message_count): last_active may move back
  when a caller gives its messages' created_at (an import), so the score is set, not only
  raised. A failure in between leaves a stale score: the session is still listed; the next
  append sets it, and a listing that meets it raises a lower one (a higher one, left by an
  import whose step failed, stays until the session's next append). The append itself is
  acknowledged (the message is stored).
- delete: the session first, then the entry is removed unless its score is newer than the
  deleted session's last_active (a namesake created since keeps its entry). A failure in
  between leaves an entry without a session: skipped, then pruned as above; the delete is
  acknowledged.
tests/test_cluster_index.py injects a failure between the steps of each.

A session of an app is also in its owner's index of the app (`user_sessions:{uid}:<app>`, the
owner's slot: kept by the same scripts as the owner's index, in the same step) and in the app's
index (`app_sessions:{<app>}`, the app's own slot). Standalone, the session scripts keep both.
In a cluster the app's index is one step more, right after the owner's, with the same rules: a
create enters it (after the owner's entry, before the session; a refused create reverts it), an
append sets its score after the owner's step (not when that step was late), a delete removes it
after the owner's. A failure leaves what the owner's index would: an entry without a session
(skipped, then pruned by a listing of the app) or a stale score (set by the next append, or
raised by a listing), never a live session missing.

Standalone, the create, append and fork scripts count the usage in their own step, and a replay
never reaches that code. In a cluster it is the second step too (owner_scripts.USAGE_SYNC, in the
same script as the append's index step: still two round trips), and it counts not "this call"
but what the session's counters (message_count, token_count, returned by the first step) show
beyond what the last sync of that session counted (`usage_seen:{uid}`): a replay's step counts
nothing new, concurrent steps arriving out of order count each message once, and a step that
failed is made up by the session's next one (its next append, or a replay of the failed call).
What is lost: the last step of a session that never syncs again (it expires or is deleted
first), and its messages are then counted on the day and under the model of the step that makes
them up.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from glide import UpdateOptions

from chatsession_server.domain import AppendResult, Listed, Session
from chatsession_server.errors import ChatSessionError, StoreUnavailable
from chatsession_server.logs import loggable
from chatsession_server.store import codec, keys
from chatsession_server.store.lua import owner_scripts
from chatsession_server.store.lua.runtime import LuaScript, ScriptRunner, Status
from chatsession_server.store.valkey import ValkeyConnection

log = logging.getLogger(__name__)

A = TypeVar("A")

# Cluster only (see the module docstring): how old an index entry without a session must be
# before a listing removes it, and the most time a create may take between its two steps.
INDEX_PRUNE_GRACE_SECONDS = 600.0
CREATE_STEP_GAP_SECONDS = 60.0


class OwnerIndex(abc.ABC):
    """What a session write does in its owner's slot, in whichever step the deployment allows."""

    index_head: str
    """what APPEND and DELETE are given to keep the index themselves ('': a second step does)"""
    usage_head: str
    """what CREATE, APPEND and FORK_WRITE are given to count the usage ('': a second step does)"""
    app_index_head: str
    """what the session scripts are given to keep an app's index ('': a step of its own does)"""

    def __init__(self, conn: ValkeyConnection, scripts: ScriptRunner, key_space: keys.KeySpace) -> None:
        self._conn = conn
        self._scripts = scripts
        self._keys = key_space

    @abc.abstractmethod
    async def write_new(
        self,
        script: LuaScript[A],
        session_keys: list[str],
        args: A,
        *,
        user_id: str,
        session_id: str,
        now: str,
        doing: str,
        app: str = "",
    ) -> tuple[Status, Any]:
        """Runs a create's or a fork's write (CREATE or FORK_WRITE, replying CREATED, REPLAYED or
        EXISTS) with the indexes kept (those of `app` too); `doing` names it in an error
        ("creating")."""

    @abc.abstractmethod
    async def count_created(self, session: Session, described: Any) -> None:
        """After a create or a fork is written (or found written, by a retry): count the new
        session."""

    @abc.abstractmethod
    async def appended(
        self, result: AppendResult, described: Any, messages: int, tokens: int, appended_at: float
    ) -> None:
        """After an append (or its replay) of `messages` messages and `tokens` tokens at
        `appended_at`: the index score and the usage. A ChatSessionError of this step is logged,
        not raised: the messages are stored."""

    @abc.abstractmethod
    async def deleted(self, session_id: str, reply: Any) -> None:
        """After a delete (DELETE's reply: status, owner, last_active). A ChatSessionError of
        this step is logged, not raised: the session is gone."""

    @abc.abstractmethod
    async def prune(self, listed: Listed, dead: Sequence[tuple[str, float]]) -> None:
        """Removes entries a listing of `listed` found dead (session id, score) from the index it
        read, if they still are."""

    async def repair_scores(self, listed: Listed, live: Sequence[tuple[Session, float]]) -> None:
        """Raises scores of the index a listing read that lag their session's last_active (an
        append whose index step failed, in a cluster). Never needed on standalone Valkey, where
        the scripts keep them."""
        behind = {
            session.session_id: session.last_active for session, score in live if session.last_active > score
        }
        if behind:
            batch = self._conn.batch(atomic=False)
            index = self._keys.listing_index(listed.user_id, listed.app)
            batch.zadd(index, behind, update_condition=UpdateOptions.GREATER_THAN)
            await self._conn.run(batch)


class InScriptOwnerIndex(OwnerIndex):
    """Standalone Valkey: every key is reachable from any script, so the session scripts keep the
    index and the usage in their own step."""

    def __init__(self, conn: ValkeyConnection, scripts: ScriptRunner, key_space: keys.KeySpace) -> None:
        super().__init__(conn, scripts, key_space)
        self.index_head = key_space.user_index_head
        self.usage_head = key_space.usage_head
        self.app_index_head = key_space.app_index_head

    async def write_new(
        self,
        script: LuaScript[A],
        session_keys: list[str],
        args: A,
        *,
        user_id: str,
        session_id: str,
        now: str,
        doing: str,
        app: str = "",
    ) -> tuple[Status, Any]:
        session_keys.append(self._keys.user_index(user_id))
        return await self._scripts.call(script, session_keys, args)

    async def count_created(self, session: Session, described: Any) -> None:
        pass  # counted by the write

    async def appended(
        self, result: AppendResult, described: Any, messages: int, tokens: int, appended_at: float
    ) -> None:
        pass  # kept by the append

    async def deleted(self, session_id: str, reply: Any) -> None:
        pass  # removed by the delete

    async def prune(self, listed: Listed, dead: Sequence[tuple[str, float]]) -> None:
        pairs = [item for session_id, _ in dead for item in (session_id, self._keys.meta(session_id))]
        index = self._keys.listing_index(listed.user_id, listed.app)
        args = owner_scripts.PruneIndexArgs(listed.user_id, listed.app, pairs)
        await self._scripts.run(owner_scripts.PRUNE_INDEX, [index], args)


class SecondStepOwnerIndex(OwnerIndex):
    """A cluster: the owner's keys are in another slot than the session's, so each write keeps
    them in a step of its own (see the module docstring for the order and what a failure
    leaves)."""

    def __init__(
        self,
        conn: ValkeyConnection,
        scripts: ScriptRunner,
        key_space: keys.KeySpace,
        *,
        clock: Callable[[], float],
        prune_grace_seconds: float,
        max_ttl_seconds: int,
    ) -> None:
        super().__init__(conn, scripts, key_space)
        self.index_head = ""
        self.usage_head = ""
        self.app_index_head = ""
        self._clock = clock
        self._prune_grace_seconds = prune_grace_seconds
        self._max_ttl_seconds = max_ttl_seconds

    async def write_new(
        self,
        script: LuaScript[A],
        session_keys: list[str],
        args: A,
        *,
        user_id: str,
        session_id: str,
        now: str,
        doing: str,
        app: str = "",
    ) -> tuple[Status, Any]:
        # Timed from before the index steps: the entry's score is `now`, and their WAITs for a
        # replica are part of the gap.
        started = time.monotonic()
        indexes = self._indexes(user_id, app)
        scores_set = [await self.enter(index_keys, session_id, now) for index_keys in indexes]
        if time.monotonic() - started > CREATE_STEP_GAP_SECONDS:
            raise StoreUnavailable(f"{doing} the session took too long; retry with the same request_id")
        status, reply = await self._scripts.call(script, session_keys, args)
        if status is Status.EXISTS:
            owner, last_active, its_app = reply[1].decode(), reply[2].decode(), reply[3].decode()
            # The session holding the id keeps the entries it deserves: its owner's index (if
            # it is this user's), the owner's index of its app and its app's index (if of `app`).
            mine, same_app = owner == user_id, its_app == app
            previous = [
                [last_active if mine else "", last_active if mine and same_app else ""],
                [last_active if same_app else ""],
            ]
        elif status is Status.REPLAYED:
            # The entries were there already: put back the score the session really has.
            score = codec.format_time(codec.decode_described(session_id, reply[1]).last_active)
            previous = [[score, score], [score]]
        else:
            return status, reply
        for index_keys, score_set, put_back in zip(indexes, scores_set, previous, strict=False):
            await self.revert(index_keys, session_id, score_set, put_back)
        return status, reply

    def _indexes(self, user_id: str, app: str) -> list[list[str]]:
        """The keys of each index step of a session: the owner's index (with the owner's index
        of the app, same slot), then the app's index."""
        if not app:
            return [[self._keys.user_index(user_id)]]
        owners = [self._keys.user_index(user_id), self._keys.user_app_index(user_id, app)]
        return [owners, [self._keys.app_index(app)]]

    async def enter(self, index_keys: list[str], session_id: str, now: str) -> str:
        """A create's index step (ENTER_INDEX on `index_keys`, one slot); returns the score written."""
        args = owner_scripts.EnterIndexArgs(session_id, now)
        written = await self._scripts.run(owner_scripts.ENTER_INDEX, index_keys, args)
        await self._conn.replicated(index_keys[0])
        return written.decode() if isinstance(written, bytes) else str(written)

    async def revert(
        self, index_keys: list[str], session_id: str, score_set: str, previous: list[str]
    ) -> None:
        """Undo a refused create's index step: put back each key's score (`previous`, one per
        key), or remove an entry that another session does not deserve ('') . Best effort: an
        entry left behind is skipped by listings and pruned after the grace period."""
        app_previous = previous[1] if len(previous) > 1 else ""
        args = owner_scripts.RevertIndexArgs(session_id, score_set, previous[0], app_previous)
        try:
            await self._scripts.run(owner_scripts.REVERT_INDEX, index_keys, args)
        except ChatSessionError as exc:
            log.warning(
                "session %s: index entry of a refused create left to pruning (%s)", loggable(session_id), exc
            )

    async def count_created(self, session: Session, described: Any) -> None:
        """Best effort: the session exists; a failed step is made up by the session's next one."""
        try:
            await self._sync_usage(session, described, (0, 0), session.created_at, index=False)
        except ChatSessionError as exc:
            log.warning(
                "session %s: usage not updated (%s); made up by its next step",
                loggable(session.session_id),
                exc,
            )

    async def appended(
        self, result: AppendResult, described: Any, messages: int, tokens: int, appended_at: float
    ) -> None:
        # A replay repeats the step too (counting nothing new): it may be what failed the first time.
        recent = (0, 0) if result.replayed else (messages, tokens)
        try:
            await self.touch(result.session, described, recent, appended_at)
        except ChatSessionError as exc:
            # The messages are stored: acknowledge them. The score stays stale until the next
            # append or a listing repairs it, the usage until the session's next step.
            log.warning(
                "session %s: index score and usage not updated (%s); repaired later",
                loggable(result.session.session_id),
                exc,
            )

    async def touch(
        self, session: Session, described: Any, recent: tuple[int, int], appended_at: float
    ) -> None:
        """An append's second step: raise the session's index score (never lower it) and count
        in the owner's usage what is new (`recent`: what this call appended), on the UTC day of
        `appended_at` (the append's own time, not the clock's when this step runs)."""
        await self._sync_usage(session, described, recent, appended_at, index=True)

    async def _sync_usage(
        self, session: Session, described: Any, recent: tuple[int, int], counted_at: float, *, index: bool
    ) -> None:
        """owner_scripts.USAGE_SYNC: count what the session's counters show beyond its last sync
        (see the module docstring) on the UTC day of `counted_at`, with the owner's index score
        too when `index`."""
        now = self._clock()
        meta_map = codec.pairs_to_map(described[0])
        base = meta_map.get(codec.MetaField.USAGE_BASE.encode(), b"0 0").decode()
        args = owner_scripts.UsageSyncArgs(
            session_id=session.session_id,
            created_at=codec.format_time(session.created_at),
            message_count=session.message_count,
            token_count=session.token_count,
            usage_base=base,
            recent_messages=recent[0],
            recent_tokens=recent[1],
            model=session.model,
            usage_days=codec.usage_days(counted_at),
            horizon=codec.format_time(now - self._max_ttl_seconds),
            now=codec.format_time(now),
            index_score=codec.format_time(session.last_active),
        )
        usage_keys = [self._keys.usage(session.user_id), self._keys.usage_seen(session.user_id)]
        if index:
            usage_keys.append(self._keys.user_index(session.user_id))
            if session.app:
                usage_keys.append(self._keys.user_app_index(session.user_id, session.app))
        _, late = await self._scripts.run(owner_scripts.USAGE_SYNC, usage_keys, args)
        await self._conn.replicated(usage_keys[0])
        if index and session.app and not int(late):
            # The app's index, in its own slot: the score as the owner's step set it.
            app_index = self._keys.app_index(session.app)
            batch = self._conn.batch(atomic=False)
            batch.zadd(app_index, {session.session_id: session.last_active})
            await self._conn.run(batch)
            await self._conn.replicated(app_index)

    async def deleted(self, session_id: str, reply: Any) -> None:
        try:
            await self.unindex(reply[1].decode(), session_id, reply[2].decode(), reply[3].decode())
        except ChatSessionError as exc:
            # The session is gone: acknowledge it. Listings skip the entry, then prune it.
            log.warning("session %s: index entry left to pruning (%s)", loggable(session_id), exc)

    async def unindex(self, user_id: str, session_id: str, last_active: str, app: str = "") -> None:
        """A delete's index steps: each entry goes unless a namesake created since holds it."""
        for index_keys in self._indexes(user_id, app):
            await self._scripts.run(
                owner_scripts.UNINDEX, index_keys, owner_scripts.UnindexArgs(session_id, last_active)
            )
            await self._conn.replicated(index_keys[0])

    async def prune(self, listed: Listed, dead: Sequence[tuple[str, float]]) -> None:
        """Only entries old and untouched enough: a create may still be between its steps."""
        cutoff = codec.format_time(self._clock() - self._prune_grace_seconds)
        seen = [item for session_id, score in dead for item in (session_id, repr(score))]
        index = self._keys.listing_index(listed.user_id, listed.app)
        await self._scripts.run(
            owner_scripts.PRUNE_STALE, [index], owner_scripts.PruneStaleArgs(cutoff, seen)
        )


def owner_index_for(
    conn: ValkeyConnection,
    scripts: ScriptRunner,
    key_space: keys.KeySpace,
    *,
    clock: Callable[[], float],
    prune_grace_seconds: float,
    max_ttl_seconds: int,
) -> OwnerIndex:
    """The owner index a connection's deployment allows: in the scripts' own step on standalone
    Valkey, a second step in a cluster."""
    if not conn.cluster:
        return InScriptOwnerIndex(conn, scripts, key_space)
    return SecondStepOwnerIndex(
        conn,
        scripts,
        key_space,
        clock=clock,
        prune_grace_seconds=prune_grace_seconds,
        max_ttl_seconds=max_ttl_seconds,
    )
