"""SessionStore: every RPC's storage step, one Valkey round trip each where the data allows.

The owner's index (`user_sessions:{uid}`) and a session live in different cluster slots. On
standalone Valkey the scripts keep the index exact in the same step. In a cluster it is a
second step, ordered so that a crash or error between the two steps never hides a live session
from its owner's listing and never shows one that does not exist:
- create: index entry first (its score strictly raised: see owner_scripts.ENTER_INDEX), then the
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

The owner's usage (`usage:{uid}`, `KeySpace.usage`) shares the index's slot. Standalone, the
create, append and fork scripts count it in their own step, and a replay never reaches that code.
In a cluster it is the second step too (owner_scripts.USAGE_SYNC, in the same script as the append's
index step: still two round trips), and it counts not "this call" but what the session's
counters (message_count, token_count, returned by the first step) show beyond what the last sync
of that session counted (`usage_seen:{uid}`): a replay's step counts nothing new, concurrent
steps arriving out of order count each message once, and a step that failed is made up by the
session's next one (its next append, or a replay of the failed call). What is lost: the last
step of a session that never syncs again (it expires or is deleted first), and its messages are
then counted on the day and under the model of the step that makes them up.

ForkSession is two steps in every mode: FORK_READ reads the source (owner check, at_seq check,
the prompt, summary and messages to copy) and writes nothing; FORK_WRITE writes the whole fork in
one script in the new session's slot, recording the request_id and "<source> <at_seq>" in its
meta. A crash between them leaves nothing; a crash after leaves a complete fork, which the retry
(same request_id) finds and returns (replayed) instead of ALREADY_EXISTS. If the source is gone or
trimmed by the time of the retry, a probe of the fork's slot still returns the fork. In a cluster
the fork also enters the index first and syncs usage after, exactly as a create.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from glide import InfBound, Limit, RangeByScore, ScoreBoundary, UpdateOptions

from chatsession_server.domain import (
    AppendResult,
    Compaction,
    CompactResult,
    Context,
    ContextQuery,
    MessagePage,
    MessageQuery,
    NewFork,
    NewMessage,
    NewSession,
    Session,
    SessionCursor,
    SessionPage,
    SessionPatch,
    UserUsage,
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
from chatsession_server.store import codec, keys
from chatsession_server.store.lua import owner_scripts, session_scripts
from chatsession_server.store.lua.runtime import LuaScript, Status, owners_arg
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
        max_fork_bytes: int = 0,
        max_fork_messages: int = 0,
        clock: Callable[[], float] = time.time,
        prune_grace_seconds: float = INDEX_PRUNE_GRACE_SECONDS,
        max_ttl_seconds: int = 30 * 86_400,
        key_space: keys.KeySpace = keys.DEFAULT_KEY_SPACE,
    ) -> None:
        self._conn = conn
        self._keys = key_space
        self._idempotency_limit = idempotency_limit
        self._max_labels = max_labels
        self._max_session_bytes = max_session_bytes
        self._max_fork_bytes = max_fork_bytes
        self._max_fork_messages = max_fork_messages
        self._clock = clock
        self._prune_grace_seconds = prune_grace_seconds
        # Standalone: the scripts keep the index themselves (they are given its key or its head).
        self._index_in_script = not conn.cluster
        self._index_head = "" if conn.cluster else self._keys.user_index_head
        self._publish = "SPUBLISH" if conn.cluster else "PUBLISH"
        self._usage_head = "" if conn.cluster else self._keys.usage_head
        self._max_ttl_seconds = max_ttl_seconds

    def _session_keys(self, session_id: str) -> list[str]:
        return [
            self._keys.chat(session_id),
            self._keys.meta(session_id),
            self._keys.requests(session_id),
            self._keys.summary(session_id),
        ]

    async def _run(self, script: LuaScript[Any], keys_: Sequence[str], args: Any) -> Any:
        return await self._conn.script(script.script, script.keys(*keys_), script.argv(args))

    # --- the owner's index as a step of its own (cluster) -----------------------------------

    async def _index_touch(
        self, session: Session, described: Any, recent: tuple[int, int], appended_at: float
    ) -> None:
        """An append's second step (cluster): raise the session's index score (never lower it)
        and count in the owner's usage what is new (`recent`: what this call appended), on the
        UTC day of `appended_at` (the append's own time, not the clock's when this step runs)."""
        await self._sync_usage(session, described, recent, appended_at, index=True)

    async def _count_created(self, session: Session, described: Any) -> None:
        """A create's or a fork's last step (cluster): count the session in the owner's usage.
        Best effort: the session exists; a failed step is made up by the session's next one."""
        try:
            await self._sync_usage(session, described, (0, 0), session.created_at, index=False)
        except ChatSessionError as exc:
            log.warning(
                "session %s: usage not updated (%s); made up by its next step", session.session_id, exc
            )

    async def _sync_usage(
        self, session: Session, described: Any, recent: tuple[int, int], counted_at: float, *, index: bool
    ) -> None:
        """owner_scripts.USAGE_SYNC: count what the session's counters show beyond its last sync (see
        the module docstring) on the UTC day of `counted_at`, with the owner's index score too
        when `index`."""
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
        await self._run(owner_scripts.USAGE_SYNC, usage_keys, args)
        await self._conn.replicated(usage_keys[0])

    async def _unindex(self, user_id: str, session_id: str, last_active: str) -> None:
        index = self._keys.user_index(user_id)
        await self._run(owner_scripts.UNINDEX, [index], owner_scripts.UnindexArgs(session_id, last_active))
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
            session_keys.append(self._keys.user_index(new.user_id))
        else:
            score_set = await self._enter_index(new.user_id, new.session_id, now)
            indexed_at = time.monotonic()
        args = session_scripts.CreateArgs(
            now=now,
            ttl=new.ttl_seconds,
            request_id=new.request_id,
            user_id=new.user_id,
            session_id=new.session_id,
            model=new.model,
            usage_key_head=self._usage_head,
            usage_days=codec.usage_days(float(now)),
            fields=fields,
        )
        if not self._index_in_script and time.monotonic() - indexed_at > CREATE_STEP_GAP_SECONDS:
            raise StoreUnavailable("creating the session took too long; retry with the same request_id")
        reply = await self._run(session_scripts.CREATE, session_keys, args)
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
        await self._conn.replicated(self._keys.meta(new.session_id))
        if not self._index_in_script:
            await self._count_created(session, reply[1])
        return session, status is Status.REPLAYED

    async def _enter_index(self, user_id: str, session_id: str, now: str) -> str:
        """A create's index step (cluster); returns the score written."""
        index = self._keys.user_index(user_id)
        written = await self._run(
            owner_scripts.ENTER_INDEX, [index], owner_scripts.EnterIndexArgs(session_id, now)
        )
        await self._conn.replicated(index)
        return written.decode() if isinstance(written, bytes) else str(written)

    async def _revert_index(self, new: NewSession, score_set: str, previous: str) -> None:
        """Undo a refused create's index step (cluster): put back the owner's score, or remove an
        entry that another user's session id does not deserve. Best effort: an entry left
        behind is skipped by listings and pruned after the grace period."""
        args = owner_scripts.RevertIndexArgs(new.session_id, score_set, previous)
        try:
            await self._run(owner_scripts.REVERT_INDEX, [self._keys.user_index(new.user_id)], args)
        except ChatSessionError as exc:
            log.warning(
                "session %s: index entry of a refused create left to pruning (%s)", new.session_id, exc
            )

    async def get(
        self,
        session_id: str,
        *,
        owners: Collection[str] | None = None,
        fields: Collection[str] | None = None,
    ) -> Session:
        """The session; not found when it belongs to none of `owners` (None: anyone's). With
        `fields` (Session field names, `labels.<key>`), only those are read: see `_get_fields`."""
        if fields is not None:
            return await self._get_fields(session_id, fields, owners)
        batch = self._conn.batch(atomic=True)
        batch.hgetall(self._keys.meta(session_id)).llen(self._keys.chat(session_id)).ttl(
            self._keys.meta(session_id)
        )
        meta, stored, ttl = await self._conn.run(batch)
        if not meta:
            raise SessionNotFound(session_id)
        session = codec.decode_session(session_id, meta, int(stored), int(ttl))
        if owners is not None and session.user_id not in owners:
            raise SessionNotFound(session_id)
        return session

    async def _get_fields(
        self, session_id: str, fields: Collection[str], owners: Collection[str] | None
    ) -> Session:
        """One HMGET of the named meta fields (and of the owner, to check it); LLEN and TTL only
        when `messages_stored` or `expires_in_seconds` are named. `labels` (the whole map, whose
        keys are not known beforehand) reads the hash with HGETALL instead. Fields not named
        keep their zero values."""
        meta_key = self._keys.meta(session_id)
        wanted = [codec.MetaField.USER_ID.value]
        wanted += [_META_OF_FIELD[f] for f in fields if f in _META_OF_FIELD]
        wanted += [codec.LABEL_FIELD_PREFIX + f[len("labels.") :] for f in fields if f.startswith("labels.")]
        whole = "labels" in fields
        batch = self._conn.batch(atomic=True)
        if whole:
            batch.hgetall(meta_key)
        else:
            batch.hmget(meta_key, wanted)
        if "messages_stored" in fields:
            batch.llen(self._keys.chat(session_id))
        if "expires_in_seconds" in fields:
            batch.ttl(meta_key)
        replies = await self._conn.run(batch)
        if whole:
            meta: dict[bytes, bytes] = replies[0]
        else:
            meta = {name.encode(): value for name, value in zip(wanted, replies[0], strict=True) if value}
        owner = meta.get(codec.MetaField.USER_ID.encode())
        if owner is None or (owners is not None and owner.decode() not in owners):
            raise SessionNotFound(session_id)
        rest = iter(replies[1:])
        stored = int(next(rest)) if "messages_stored" in fields else 0
        ttl = int(next(rest)) if "expires_in_seconds" in fields else 0
        return codec.decode_session(session_id, meta, stored, ttl)

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
        args = session_scripts.UpdateArgs(
            owners=owners_arg(owners),
            ttl=patch.ttl_seconds,
            max_messages=patch.max_messages,
            clear_labels=patch.replace_labels is not None,
            max_labels=self._max_labels,
            set_count=len(to_set),
            changes=[*codec.flatten(to_set.items()), *to_delete],
        )
        reply = await self._run(session_scripts.UPDATE, self._session_keys(session_id), args)
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
        await self._conn.replicated(self._keys.meta(session_id))
        return _session_from(session_id, reply[1])

    async def delete(self, session_id: str, *, owners: Collection[str] | None = None) -> bool:
        """Delete a session; False when there was none (of `owners`)."""
        args = session_scripts.DeleteArgs(
            owners=owners_arg(owners),
            index_key_head=self._index_head,
            session_id=session_id,
            publish_command=self._publish,
            channel=self._keys.watch_channel(session_id),
        )
        reply = await self._run(session_scripts.DELETE, self._session_keys(session_id), args)
        if Status.of(reply) is Status.NOT_FOUND:
            return False
        await self._conn.replicated(self._keys.meta(session_id))
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
        args = session_scripts.AppendArgs(
            owners=owners_arg(owners),
            now=codec.format_time(now),
            request_id=request_id,
            fingerprint=codec.fingerprint(messages) if request_id else "",
            expected_last_seq=expected_last_seq,
            token_sum=sum(m.tokens for m in messages),
            index_key_head=self._index_head,
            session_id=session_id,
            idempotency_limit=self._idempotency_limit,
            publish_command=self._publish,
            channel=self._keys.watch_channel(session_id),
            inline_publish_bytes=INLINE_PUBLISH_BYTES,
            max_session_bytes=self._max_session_bytes,
            usage_key_head=self._usage_head,
            usage_days=codec.usage_days(now),
            bodies=bodies,
        )
        reply = await self._run(session_scripts.APPEND, self._session_keys(session_id), args)
        status = Status.of(reply)
        if status is Status.NOT_FOUND:
            raise SessionNotFound(session_id)
        if status is Status.REQUEST_ID_REUSED:
            raise _request_id_reused(request_id)
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
            described = reply[3]
            result = AppendResult(stored, _session_from(session_id, described), replayed=True)
        else:
            first_seq = int(reply[1])
            # The script stored exactly stored_json(seq, body): the reply is built from the
            # request, with no read-back and no JSON round trip.
            stored = tuple(codec.stored_message(m, first_seq + i, now) for i, m in enumerate(messages))
            described = reply[2]
            result = AppendResult(stored, _session_from(session_id, described), replayed=False)
        # A replay repeats the index and usage step too: it may be what failed the first time.
        await self._conn.replicated(self._keys.meta(session_id))
        if not self._index_in_script:
            recent = (0, 0) if result.replayed else (len(messages), args.token_sum)
            try:
                await self._index_touch(result.session, described, recent, now)
            except ChatSessionError as exc:
                # The messages are stored: acknowledge them. The score stays stale until the next
                # append or a listing repairs it, the usage until the session's next step.
                log.warning(
                    "session %s: index score and usage not updated (%s); repaired later", session_id, exc
                )
        return result

    async def list_messages(
        self, session_id: str, query: MessageQuery, *, owners: Collection[str] | None = None
    ) -> MessagePage:
        reply = await self._run(
            session_scripts.LIST_MESSAGES,
            [self._keys.chat(session_id), self._keys.meta(session_id), self._keys.summary(session_id)],
            session_scripts.ListMessagesArgs(
                owners_arg(owners), query.limit, query.after_seq, query.before_seq, PAGE_BYTES
            ),
        )
        if Status.of(reply) is Status.NOT_FOUND:
            raise SessionNotFound(session_id)
        _, items, has_more, last_seq, window_start, trimmed, rewrites, cleared_at_seq = reply
        return MessagePage(
            messages=codec.decode_messages(items),
            has_more=bool(has_more),
            last_seq=int(last_seq),
            window_start_seq=int(window_start),
            history_trimmed=bool(trimmed),
            rewrites=int(rewrites),
            cleared_at_seq=int(cleared_at_seq),
        )

    async def fork(self, fork: NewFork, *, owners: Collection[str] | None = None) -> tuple[Session, bool]:
        """Copy `fork.source_id` up to `fork.at_seq` into the new session `fork.session_id` (see
        the module docstring for the two steps); returns it and whether this was a replay."""
        source = fork.source_id
        origin = f"{source} {'' if fork.at_seq is None else fork.at_seq}"
        reply = await self._run(
            session_scripts.FORK_READ,
            [self._keys.chat(source), self._keys.meta(source), self._keys.summary(source)],
            session_scripts.ForkReadArgs(
                owners_arg(owners), fork.at_seq, self._max_fork_bytes, self._max_fork_messages
            ),
        )
        status = Status.of(reply)
        if status is not Status.OK:
            # A retry whose source has changed or gone since: the fork its first attempt made.
            found = await self._find_fork(fork, origin, owners) if fork.request_id else None
            if found is None:
                if status is Status.TOO_LARGE:
                    raise self._fork_too_large(source, int(reply[1]), int(reply[2]))
                raise _fork_refused(fork, status, reply)
            return found, True
        _, meta_flat, prompt, recent, summary = reply
        items, summary_json, message_count, token_count = codec.fork_contents(prompt, summary, recent)
        now = codec.format_time(self._clock())
        fields = codec.fork_fields(
            codec.pairs_to_map(meta_flat),
            source_id=source,
            origin=origin,
            created_at=now,
            request_id=fork.request_id,
            message_count=message_count,
            token_count=token_count,
            pinned=len(prompt),
            stored_bytes=sum(len(item.encode()) for item in items) + len(summary_json.encode()),
        )
        labels = sum(1 for name in fields if name.startswith(codec.LABEL_FIELD_PREFIX))
        if labels > self._max_labels:
            # `forked_from` would take the fork past the limit, and every later UpdateSession of
            # it would be refused: refuse the fork instead, before anything is written.
            raise PreconditionFailed(
                "LABELS_FULL",
                "session_id",
                f"a fork of session {source!r} would have {labels} labels (with "
                f"`{codec.FORKED_FROM_LABEL}`), more than the limit of {self._max_labels}: remove one first",
            )
        user_id = fields[codec.MetaField.USER_ID]
        fork_keys = self._session_keys(fork.session_id)
        if self._index_in_script:
            fork_keys.append(self._keys.user_index(user_id))
        else:
            score_set = await self._enter_index(user_id, fork.session_id, now)
            indexed_at = time.monotonic()
        args = self._fork_write_args(fork, origin, owners, user_id=user_id, now=now, probe=False)
        args = dataclasses.replace(
            args,
            ttl=int(fields[codec.MetaField.TTL_SECONDS]),
            model=fields.get(codec.MetaField.MODEL, ""),
            summary_json=summary_json,
            field_count=len(fields),
            payload=[*codec.flatten(fields.items()), *items],
        )
        if not self._index_in_script and time.monotonic() - indexed_at > CREATE_STEP_GAP_SECONDS:
            raise StoreUnavailable("forking the session took too long; retry with the same request_id")
        reply = await self._run(session_scripts.FORK_WRITE, fork_keys, args)
        status = Status.of(reply)
        new = NewSession(fork.session_id, user_id, "", "", {}, 0, 0, fork.request_id)
        if status is Status.EXISTS:
            if not self._index_in_script:
                owner, last_active = reply[1].decode(), reply[2].decode()
                await self._revert_index(new, score_set, last_active if owner == user_id else "")
            raise SessionAlreadyExists(fork.session_id)
        session = _session_from(fork.session_id, reply[1])
        if status is Status.REPLAYED and not self._index_in_script:
            await self._revert_index(new, score_set, codec.format_time(session.last_active))
        await self._conn.replicated(self._keys.meta(fork.session_id))
        if not self._index_in_script:
            await self._count_created(session, reply[1])
        return session, status is Status.REPLAYED

    def _fork_too_large(self, source: str, stored_bytes: int, stored_messages: int) -> QuotaExceeded:
        if self._max_fork_bytes and stored_bytes > self._max_fork_bytes:
            limit, value, held = "max_fork_bytes", self._max_fork_bytes, f"{stored_bytes} bytes"
        else:
            limit, value, held = "max_fork_messages", self._max_fork_messages, f"{stored_messages} messages"
        flag = "--" + limit.replace("_", "-")
        return QuotaExceeded(
            limit,
            value,
            f"session {source}",
            f"session {source!r} stores {held}, more than a fork may copy ({flag} {value}): "
            "compact it (CompactMessages) first",
        )

    def _fork_write_args(
        self,
        fork: NewFork,
        origin: str,
        owners: Collection[str] | None,
        *,
        user_id: str,
        now: str,
        probe: bool,
    ) -> session_scripts.ForkWriteArgs:
        """FORK_WRITE's arguments for a probe; a write replaces what it copies."""
        return session_scripts.ForkWriteArgs(
            owners=owners_arg(owners),
            now=now,
            ttl=0,
            request_id=fork.request_id,
            user_id=user_id,
            session_id=fork.session_id,
            origin=origin,
            probe=probe,
            usage_key_head=self._usage_head,
            model="",
            usage_days=codec.usage_days(float(now)) if now else "",  # "": a probe counts nothing
            summary_json="",
            field_count=0,
            payload=[],
        )

    async def _find_fork(self, fork: NewFork, origin: str, owners: Collection[str] | None) -> Session | None:
        """The fork a first attempt with this request_id made, or None; writes nothing (its index
        entry was entered by that attempt, before its write)."""
        args = self._fork_write_args(fork, origin, owners, user_id="", now="", probe=True)
        reply = await self._run(session_scripts.FORK_WRITE, self._session_keys(fork.session_id), args)
        if Status.of(reply) is not Status.REPLAYED:
            return None
        session = _session_from(fork.session_id, reply[1])
        if not self._index_in_script:  # that attempt's usage step may be what failed
            await self._count_created(session, reply[1])
        return session

    async def user_usage(self, user_id: str) -> UserUsage:
        """The user's usage; per-day figures for the last codec.USAGE_DAYS UTC days."""
        batch = self._conn.batch(atomic=False)
        batch.hgetall(self._keys.usage(user_id))
        (fields,) = await self._conn.run(batch)
        oldest = codec.usage_days(self._clock()).split()[1]
        return codec.decode_usage(fields, oldest)

    async def get_context(
        self, session_id: str, query: ContextQuery, *, owners: Collection[str] | None = None
    ) -> Context:
        """Pinned prompt, summary and the newest messages that fit the budget, in one script."""
        args = session_scripts.ContextArgs(
            owners_arg(owners), query.max_tokens, query.max_messages, PAGE_BYTES
        )
        keys_ = [self._keys.chat(session_id), self._keys.meta(session_id), self._keys.summary(session_id)]
        reply = await self._run(session_scripts.GET_CONTEXT, keys_, args)
        status = Status.of(reply)
        if status is Status.NOT_FOUND:
            raise SessionNotFound(session_id)
        if status is Status.OVER_BUDGET:
            raise PreconditionFailed(
                "CONTEXT_OVER_BUDGET",
                "max_tokens",
                f"the pinned system prompt and the summary alone take {int(reply[1])} tokens, more than "
                f"max_tokens {query.max_tokens}",
            )
        if status is Status.REPLY_TOO_LARGE:
            raise PreconditionFailed(
                "CONTEXT_TOO_LARGE",
                "session_id",
                f"the pinned system prompt and the summary alone take {int(reply[1])} bytes, more than "
                f"a reply holds ({PAGE_BYTES}); read them with ListMessages",
            )
        _, items, tokens, truncated = reply
        return Context(tuple(codec.decode_message(raw) for raw in items), int(tokens), bool(truncated))

    async def compact(
        self, session_id: str, compaction: Compaction, *, owners: Collection[str] | None = None
    ) -> CompactResult:
        now = self._clock()
        summary = compaction.summary
        args = session_scripts.CompactArgs(
            owners=owners_arg(owners),
            request_id=compaction.request_id,
            # "c": never equal to an append's fingerprint, so a request_id of either kind
            # reused for the other is refused.
            fingerprint="c" + codec.fingerprint([summary]) + f":{compaction.up_to_seq}"
            if compaction.request_id
            else "",
            up_to_seq=compaction.up_to_seq,
            idempotency_limit=self._idempotency_limit,
            publish_command=self._publish,
            channel=self._keys.watch_channel(session_id),
            max_session_bytes=self._max_session_bytes,
            summary_body=codec.encode_body(summary, now),
        )
        reply = await self._run(session_scripts.COMPACT, self._session_keys(session_id), args)
        status = Status.of(reply)
        if status is Status.NOT_FOUND:
            raise SessionNotFound(session_id)
        if status is Status.REQUEST_ID_REUSED:
            raise _request_id_reused(compaction.request_id)
        if status is Status.UP_TO_SEQ_AHEAD:
            raise PreconditionFailed(
                "UP_TO_SEQ_AHEAD",
                "up_to_seq",
                f"up_to_seq {compaction.up_to_seq} is beyond the session's last seq {int(reply[1])}",
            )
        if status is Status.UP_TO_SEQ_IN_PROMPT:
            raise PreconditionFailed(
                "UP_TO_SEQ_IN_PROMPT",
                "up_to_seq",
                f"up_to_seq {compaction.up_to_seq} is within the pinned system prompt "
                f"(seqs 1-{int(reply[1])}), which is never compacted",
            )
        if status is Status.TOO_LARGE:
            raise QuotaExceeded(
                "max_session_bytes",
                self._max_session_bytes,
                f"session {session_id}",
                f"session {session_id!r} stores {int(reply[1])} bytes and would store {int(reply[2])} "
                f"after this compaction: the limit per session is {self._max_session_bytes} "
                "(--max-session-bytes); write a shorter summary",
            )
        if status is Status.ALREADY_COMPACTED:
            raise PreconditionFailed(
                "ALREADY_COMPACTED",
                "up_to_seq",
                f"up_to_seq {compaction.up_to_seq} is below the last seq {int(reply[1])} an earlier "
                "compaction replaced",
            )
        await self._conn.replicated(self._keys.meta(session_id))
        stored = codec.decode_message(reply[1]) if reply[1] else None
        session = _session_from(session_id, reply[2])
        if stored is None:  # a replay after a clear: the summary is gone
            raise PreconditionFailed(
                "SUMMARY_CLEARED",
                "request_id",
                f"request_id {compaction.request_id!r} compacted this session, but it has been cleared since",
            )
        return CompactResult(stored, session, replayed=status is Status.REPLAYED)

    async def clear(
        self,
        session_id: str,
        *,
        keep_system_prompt: bool,
        request_id: str = "",
        owners: Collection[str] | None = None,
    ) -> Session:
        args = session_scripts.ClearArgs(
            owners_arg(owners),
            keep_system_prompt,
            request_id,
            # "x": never equal to an append's or a compaction's fingerprint (see compact).
            f"x{int(keep_system_prompt)}" if request_id else "",
            self._idempotency_limit,
            self._publish,
            self._keys.watch_channel(session_id),
        )
        reply = await self._run(session_scripts.CLEAR, self._session_keys(session_id), args)
        status = Status.of(reply)
        if status is Status.NOT_FOUND:
            raise SessionNotFound(session_id)
        if status is Status.REQUEST_ID_REUSED:
            raise _request_id_reused(request_id)
        await self._conn.replicated(self._keys.meta(session_id))
        return _session_from(session_id, reply[1])

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
        index = self._keys.user_index(user_id)
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
        index = self._keys.user_index(user_id)
        if self._index_in_script:
            pairs = [item for session_id, _ in dead for item in (session_id, self._keys.meta(session_id))]
            await self._run(owner_scripts.PRUNE_INDEX, [index], owner_scripts.PruneIndexArgs(user_id, pairs))
        else:
            cutoff = codec.format_time(self._clock() - self._prune_grace_seconds)
            seen = [item for session_id, score in dead for item in (session_id, repr(score))]
            await self._run(owner_scripts.PRUNE_STALE, [index], owner_scripts.PruneStaleArgs(cutoff, seen))

    async def _repair_scores(self, user_id: str, live: Sequence[tuple[Session, float]]) -> None:
        """Raises index scores that lag their session's last_active (an append whose index step
        failed, in a cluster). Never needed on standalone Valkey, where the scripts keep them."""
        behind = {
            session.session_id: session.last_active for session, score in live if session.last_active > score
        }
        if behind:
            batch = self._conn.batch(atomic=False)
            batch.zadd(self._keys.user_index(user_id), behind, update_condition=UpdateOptions.GREATER_THAN)
            await self._conn.run(batch)

    async def _describe_many(
        self, user_id: str, candidates: Sequence[tuple[str, float]]
    ) -> tuple[list[tuple[Session, float]], list[tuple[str, float]]]:
        """Live sessions (with their index score) for index rows, in order, and the dead rows."""
        if not candidates:
            return [], []
        batch = self._conn.batch(atomic=False)
        for session_id, _ in candidates:
            meta = self._keys.meta(session_id)
            batch.hgetall(meta).llen(self._keys.chat(session_id)).ttl(meta)
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


# GetSession read_mask paths read from a meta field of their own.
_META_OF_FIELD = {
    "user_id": codec.MetaField.USER_ID.value,
    "model": codec.MetaField.MODEL.value,
    "title": codec.MetaField.TITLE.value,
    "created_at": codec.MetaField.CREATED_AT.value,
    "last_active": codec.MetaField.LAST_ACTIVE.value,
    "message_count": codec.MetaField.MESSAGE_COUNT.value,
    "token_count": codec.MetaField.TOKEN_COUNT.value,
    "ttl_seconds": codec.MetaField.TTL_SECONDS.value,
    "max_messages": codec.MetaField.MAX_MESSAGES.value,
}


def _request_id_reused(request_id: str) -> PreconditionFailed:
    """An append, compaction or clear whose request_id this session recorded for another request
    (request_ids of the three share one record per session)."""
    return PreconditionFailed(
        "REQUEST_ID_REUSED",
        "request_id",
        f"request_id {request_id!r} was already used for another request in this session",
    )


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


def _fork_refused(fork: NewFork, status: Status, reply: Any) -> ChatSessionError:
    if status is Status.BEYOND_LAST:
        return PreconditionFailed(
            "AT_SEQ_BEYOND_LAST",
            "at_seq",
            f"session {fork.source_id!r} ends at seq {int(reply[1])}: at_seq {fork.at_seq} is beyond it",
        )
    if status is Status.TRIMMED:
        pinned, base, summary_seq = int(reply[1]), int(reply[2]), int(reply[3])
        at_summary = f", {summary_seq} (the summary)" if summary_seq > 0 else ""
        return PreconditionFailed(
            "AT_SEQ_TRIMMED",
            "at_seq",
            f"seq {fork.at_seq} of session {fork.source_id!r} was trimmed by the window or compacted: "
            f"fork at 0-{pinned} (the prompt){at_summary} or after {base}",
        )
    return SessionNotFound(fork.source_id)
